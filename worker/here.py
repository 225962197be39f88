"""What this process can ask fal about (:class:`jobs.listing.Here`), for the notes of ``status``,
``run`` and the dashboard, computed without loading the HTTP client or the steps: ``status``
talks to no one, and a ``run`` that only watches workers loads none of their steps."""

from __future__ import annotations

from jobs.listing import Here
from jobs.settings import Settings
from worker.fal.origin import url_origin_text
from worker.limits import api_key_id


def queue_origin(queue_url: str) -> str:
    """``scheme://host:port`` of the fal queue URL (never its credentials, path or query): what
    ``Job.fal_origin`` records, in the one form every origin has (:mod:`worker.fal.origin`: as
    httpx reads the URL, the default port explicit). A URL that does not parse is kept as is
    (cut to the column's 255 characters): compared as text, never followed here."""
    try:
        return url_origin_text(queue_url)
    except ValueError:
        return queue_url[:255]


def process_here(settings: Settings) -> Here:
    """What a process with ``settings`` can ask fal about: its API key's id (a hash, never the
    key) and its fal queue's origin. ``key_id`` None without ``FAL_KEY``: it cannot tell whose
    key a request went with."""
    key_id = api_key_id(settings) if settings.fal_key is not None else None
    return Here(key_id=key_id, origin=queue_origin(settings.fal_queue_url))
