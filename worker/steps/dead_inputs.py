"""Input URLs fal said it could not download, as this process learned them: the other jobs
that would send one are not sent with it.

fal fetches a media input (``image_url``, ``audio_url``…) only once the request runs, and a
URL it cannot fetch comes back as a 422 whose detail item names the field (``loc``) and the
error type ``file_download_error`` (https://docs.fal.ai/errors) — a 422, which fal "may still"
charge for (https://fal.ai/docs/model-apis/faq). Every job of a batch sharing that URL would
meet the same answer and pay for it: a ``matrix`` of 20 seeds over one image whose URL died
paid 20 times, 16 of them sent after the first had already failed. So
:func:`worker.steps.failures.settle` notes each such URL here, and the submit step asks before
it sends (:func:`worker.steps.submit.submit`):

* a URL the manifest gave (the user's own) fails the job unsent, ``input_unreachable``, its
  error naming the URL, the field and the job fal failed for it — never billed, and ``rerun
  --failed-only`` sends it again once the URL is fixed. Only jobs created before fal said so are
  stopped: a later batch (that rerun) is sent, in case the URL is back; should it still be
  dead, its first job fails and the rest of it are stopped in turn.
* wanbatch's own uploaded copy of a local file (fal's storage dropped it before
  :data:`jobs.store.UPLOAD_REUSE` ran out) is uploaded again before sending, the dead copy
  having been forgotten from the upload cache.

Kept in memory, for this process's life (a handful of URLs at most): a job already sent cannot
be helped, and another process learns it from its own first failure.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

#: A job not sent because fal could not download one of its input URLs for another job.
INPUT_UNREACHABLE = "input_unreachable"


@dataclass(frozen=True, slots=True)
class DeadInput:
    """One input URL fal could not download, and where that was learned."""

    #: The URL as it was sent (:func:`jobs.media.sent_form`).
    url: str
    #: The media field fal's ``loc`` named (``image_url``; ``image_urls[1]`` for a list's item).
    field: str
    #: The job fal failed for it.
    job_id: str
    #: When fal's answer was taken in: only jobs created before it are stopped for a user's URL.
    learned_at: datetime
    #: Whether it was wanbatch's upload of a local file (never the user's to fix).
    upload: bool


class DeadInputs:
    """The input URLs fal could not download, by URL (thread-safe: steps run on many threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dead: dict[str, DeadInput] = {}

    def learn(self, found: Iterable[DeadInput]) -> list[DeadInput]:
        """Note ``found``; returns those not noted before (said once, by the caller). A URL
        noted again is dated again: a rerun that met it dead stops its own later jobs too."""
        new: list[DeadInput] = []
        with self._lock:
            for dead in found:
                if dead.url not in self._dead:
                    new.append(dead)
                self._dead[dead.url] = dead
        return new

    def any(self) -> bool:
        """Whether any input URL is known dead: nearly never, so a submit that finds none skips
        working out which URLs it carries (no lock: a dict's size is read whole, and a URL
        learned a moment later is one the check would have missed just the same)."""
        return bool(self._dead)

    def among(self, urls: Iterable[str]) -> list[DeadInput]:
        """What is known of each of ``urls`` (as sent) fal could not download, in their order."""
        with self._lock:
            return [self._dead[url] for url in urls if url in self._dead]
