"""When fal's webhooks do not arrive: the one line ``run`` and ``status`` say.

With ``WANBATCH_WEBHOOK_URL`` set, nothing follows fal's status streams: a receiver that fal
cannot reach (``wanbatch serve`` down, a wrong URL, a proxy that does not strip its prefix)
leaves every completion to the safety net's poll, ``WANBATCH_WEBHOOK_POLL_AFTER`` (30 s) after
each job was sent, each job holding its slot meanwhile: a batch drained at a fraction of its
pace without a sign why. Once :data:`SILENT_JOBS` jobs that fal finished have no delivery
stored between them (a receiver fal reaches stores each long before the poll), this says so,
naming the setting and ``wanbatch doctor``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from jobs import store
from jobs.settings import Settings
from jobs.url_secrets import masked_url

#: Jobs fal finished, none with a webhook stored, before the silence is said.
SILENT_JOBS = 5
#: How often ``run`` looks, at most (one indexed count of the batch's jobs sent since it started).
LOOK_EVERY_SECONDS = 10.0
#: ``status`` looks at the jobs sent within this long (jobs of an earlier run, perhaps without
#: a receiver, say nothing of this one).
STATUS_WINDOW_SECONDS = 15 * 60


def silence_text(settings: Settings, finished: int) -> str:
    """The line: ``finished`` jobs fal finished and no webhook came for any."""
    url = masked_url(settings.webhook_url or "")
    return (
        f"no webhook came for any of the last {finished} jobs fal finished: each was found by the "
        f"poll {settings.webhook_poll_after:g} s after it was sent (WANBATCH_WEBHOOK_POLL_AFTER), "
        f"holding its slot meanwhile; fal cannot deliver to WANBATCH_WEBHOOK_URL {url}: check it "
        "with `wanbatch doctor` (or unset it: status streams then tell of each completion)"
    )


def silence(session: Session, settings: Settings, batch_id: str, *, since: datetime) -> str | None:
    """The line when ``batch_id``'s jobs sent since ``since`` show that fal's webhooks do not
    arrive (:data:`SILENT_JOBS` finished, none delivered); None otherwise, and without a receiver."""
    if not settings.webhook_url:
        return None
    return _said(settings, *store.webhooks_heard(session, batch_id, since=since))


def _said(settings: Settings, finished: int, delivered: int) -> str | None:
    if delivered or finished < SILENT_JOBS:
        return None
    return silence_text(settings, finished)


class SilenceWatch:
    """``run``'s look, every :data:`LOOK_EVERY_SECONDS` at most, said once (:meth:`unsaid`).
    Once a delivery of one of its jobs is seen, it looks no more: fal reaches the receiver, and
    the tick prunes applied deliveries (``WANBATCH_WEBHOOK_RETENTION``, 2 hours at the least), so
    a run waiting longer (a schedule's closed window, a daily cap) would find none left and say
    that no webhook came; nor does a run whose webhooks arrive keep counting its jobs."""

    def __init__(
        self, settings: Settings, batch_id: str, since: datetime, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.batch_id = batch_id
        self.since = since
        self.clock = clock
        self._next = 0.0
        self._said = not settings.webhook_url  # nothing to say without a receiver

    def unsaid(self, session: Session) -> str | None:
        """The line, the first time it holds; None before, after, and between looks."""
        if self._said or self.clock() < self._next:
            return None
        self._next = self.clock() + LOOK_EVERY_SECONDS
        finished, delivered = store.webhooks_heard(session, self.batch_id, since=self.since)
        line = _said(self.settings, finished, delivered)
        if line is not None or delivered:
            self._said = True  # said, or fal's webhooks arrive: nothing more to look for
        return line
