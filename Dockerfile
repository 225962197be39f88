# syntax=docker/dockerfile:1
# One image for every wanbatch role of docker-compose.yml (migrate, worker, serve, simulator, cli):
# the roles differ only by command, so they can never run different code against one database.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every dependency ships manylinux wheels (PyAV bundles its FFmpeg, psycopg[binary] its libpq),
# so no compiler or system library is installed. The sources are only needed to build the
# package: they are installed into site-packages and then removed.
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY cli /tmp/src/cli
COPY jobs /tmp/src/jobs
COPY worker /tmp/src/worker
COPY falsim /tmp/src/falsim
COPY web /tmp/src/web
COPY migrations /tmp/src/migrations
RUN pip install /tmp/src && rm -rf /tmp/src

# Not root: a worker downloads files from URLs that a provider hands out, and Celery warns
# against running as root. uid 1000 matches the usual first user of a Linux host, so files
# written to a bind-mounted ./outputs belong to that user (see HOST_UID in docker-compose.yml).
RUN useradd --create-home --uid 1000 --user-group wanbatch \
    && mkdir -p /app /outputs \
    && chown wanbatch:wanbatch /app /outputs

# /app holds run-time state only (manifests mounted by the cli service; the default SQLite file
# under ./.wanbatch when no WANBATCH_DATABASE_URL is given).
WORKDIR /app
USER wanbatch
ENV WANBATCH_OUTPUT_DIR=/outputs

CMD ["wanbatch", "--help"]
