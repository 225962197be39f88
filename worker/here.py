"""What this process can ask fal about (:class:`jobs.listing.Here`), for the notes of ``status``,
``run`` and the dashboard, computed without loading the HTTP client or the steps: ``status``
talks to no one, and a ``run`` that only watches workers loads none of their steps."""

from __future__ import annotations

from urllib.parse import urlsplit

from jobs.listing import Here
from jobs.settings import Settings
from worker.limits import api_key_id

#: The port a scheme means when a URL names none (as httpx makes it explicit).
_DEFAULT_PORTS = {"http": 80, "https": 443}


def queue_origin(queue_url: str) -> str:
    """``scheme://host:port`` of the fal queue URL (never its credentials, path or query): what
    ``Job.fal_origin`` records, the form :func:`worker.fal.http.origin_text` gives (default port
    explicit, host in lower case, an IPv6 host in brackets). A host that is not plain ASCII goes
    through httpx, as the submit does (IDNA); a URL that does not parse is kept as is."""
    try:
        parts = urlsplit(queue_url)
        host = parts.hostname or ""
        if not host.isascii():
            from worker.fal.http import origin_text

            return origin_text(queue_url)
        scheme = parts.scheme.lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except Exception:  # ValueError and its like: compared as text, never followed here
        return queue_url[:255]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host.lower()}:{port}" if port is not None else f"{scheme}://{host.lower()}"


def process_here(settings: Settings) -> Here:
    """What a process with ``settings`` can ask fal about: its API key's id (a hash, never the
    key) and its fal queue's origin. ``key_id`` None without ``FAL_KEY``: it cannot tell whose
    key a request went with."""
    key_id = api_key_id(settings) if settings.fal_key is not None else None
    return Here(key_id=key_id, origin=queue_origin(settings.fal_queue_url))
