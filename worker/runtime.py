"""Builds a :class:`worker.steps.Runtime` from settings (engine, fal client, media preparer), and
closes one (:func:`close_runtime`).

One place wires the pieces together, so the embedded loop, Celery tasks and tests all get
the same runtime for the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from sqlalchemy import Engine

from jobs import db, store
from jobs.db import open_engine
from jobs.settings import Settings
from worker.fal.client import FalClient
from worker.fal.origin import url_origin_text
from worker.fal.storage import FalStorage, Lookup, MediaPreparer, Record
from worker.limits import limiter_for
from worker.steps import Runtime
from worker.steps.download import close_download_client, download_policy
from worker.steps.reconcile import retry_held
from worker.steps.webhooks import database_fingerprint, webhook_secret


def build_runtime(
    *,
    enqueue_submit: Callable[[str], None],
    enqueue_download: Callable[[str], None],
    settings: Settings,
    allow_missing_key: bool = False,
    batch_ids: frozenset[str] | None = None,
    engine: Engine | None = None,
    client: FalClient | None = None,
    simulated: bool = False,
) -> Runtime:
    """A runtime for this process. ``allow_missing_key`` is for the bundled simulator, and for a
    run that makes no call to fal (:func:`jobs.batches.ends_without_fal`);
    ``batch_ids`` limits the work to those batches (an embedded run; None = every batch);
    ``simulated``: its fal is a ``run --simulate``'s simulator (:attr:`Runtime.simulated`).
    ``engine`` and ``client`` default to the settings' own; tests pass theirs."""
    engine = engine or open_engine(settings)
    client = client or FalClient.from_settings(settings, allow_missing_key=allow_missing_key)

    lookup, record = _upload_cache(engine, url_origin_text(client.rest_url), simulated=simulated)
    media = MediaPreparer.for_storage(
        FalStorage(client, download_policy(settings)),
        inline_max_bytes=settings.inline_max_bytes,
        lookup=lookup,
        record=record,
    )
    # The tick leader's published limits are per API key and database (worker.limits.policy_key):
    # read now, never later inside a round's transaction.
    database = database_fingerprint(webhook_secret(engine)) if settings.limits_backend_url() else None
    rt = Runtime(
        engine=engine,
        client=client,
        settings=settings,
        enqueue_submit=enqueue_submit,
        enqueue_download=enqueue_download,
        media=media,
        batch_ids=batch_ids,
        simulated=simulated,
        limiter=limiter_for(settings, database=database),
    )
    # The submissions it holds are tried again by the keeper of their marks when its reconciler
    # does not run (a worker that does not lead, a prefork child): worker.steps.held.
    rt.held.retry = partial(retry_held, rt, wait=False)
    return rt


def _upload_cache(engine: Engine, origin: str, *, simulated: bool) -> tuple[Lookup, Record]:
    """Where uploaded images are remembered by content (to be uploaded once): the database,
    keyed by the fal they were uploaded to (``origin``: its REST API's ``scheme://host:port``)
    and the content's SHA-256, for :data:`jobs.store.UPLOAD_REUSE` (fal's storage drops files).

    Not for a simulator: its storage URLs live as long as it does (one ``--simulate`` run), and
    remembered in the database a later run would send them to fal, dead. A simulated runtime
    remembers its uploads itself, and never sends the simulator one of fal's.
    """
    if simulated:
        uploaded: dict[tuple[str, str], str] = {}

        def find(sha256: str, content_type: str) -> str | None:
            return uploaded.get((sha256, content_type))

        def remember(sha256: str, url: str, _size_bytes: int, content_type: str) -> None:
            uploaded[(sha256, content_type)] = url

        return find, remember

    def lookup(sha256: str, content_type: str) -> str | None:
        # An upload recorded under another type (earlier versions took it from the file name,
        # so a JPEG named photo.heic went up as image/heic) is not reused: uploaded again under
        # its content's type, the new record replaces it.
        with db.session_scope(engine) as session:
            upload = store.find_upload(session, origin, sha256)
            return upload.provider_url if upload and upload.content_type == content_type else None

    def record(sha256: str, url: str, size_bytes: int, content_type: str) -> None:
        with db.session_scope(engine) as session:
            store.record_upload(
                session,
                origin=origin,
                content_sha256=sha256,
                provider_url=url,
                size_bytes=size_bytes,
                content_type=content_type,
            )

    return lookup, record


def close_runtime(rt: Runtime) -> None:
    """Close what the runtime holds open: the fal client and the shared download client.

    Call it where a runtime's life ends (instead of ``rt.client.close()`` alone). A runtime
    dropped without it still has its download client closed when it is garbage-collected.
    """
    rt.held.close()  # the marks of submissions still held go stale: the next process here takes them over
    rt.submit_leases.close()  # a POST still in flight keeps its lease only until it runs out
    rt.output_leases.close()  # likewise an output being stored
    rt.fal_reach.release()  # a hold on fal it recorded ends with it (best effort)
    try:
        rt.client.close()
    finally:
        close_download_client(rt)
