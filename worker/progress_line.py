"""The one-line progress display of ``run``, ``rerun`` and ``cancel``, laid out for the terminal.

rich's stock columns share a narrow terminal out evenly, so at 80 columns a long schedule note
or a long list of counts pushed the done/total count, the money and the elapsed time off the
line (cut to ``$1…``). This column lays the line out itself, in order of importance:

1. ``done/total``, ``spent/estimated`` and the elapsed time: always whole;
2. the time left (``~3m20s``, or ``-:--:--`` while there is none: see :func:`time_left`);
3. a bar, 10 to 40 cells;
4. the description (``jobs``, or ``jobs · waiting for window …``: why nothing moves), shortened
   with ``…`` — but a note goes before the bar and an unknown time left, which say nothing
   while nothing moves;
5. the counts by state, abbreviated (``run:4``) and then cut when room runs out.

Where stderr is not a terminal, the same facts go out as plain lines now and then instead
(:func:`plain_line`, :class:`PlainProgress`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

from jobs import clock
from jobs.money import usd_text
from jobs.states import JobState

#: Short labels for the counts when the full ones do not fit.
SHORT_STATES = {
    JobState.PENDING.value: "pend",
    JobState.SUBMITTING.value: "sub",
    JobState.SUBMIT_UNKNOWN.value: "unk",
    JobState.RETRY_WAIT.value: "retry",
    JobState.QUEUED.value: "queue",
    JobState.RUNNING.value: "run",
    JobState.DOWNLOADING.value: "dl",
    JobState.CANCELLING.value: "cncl",
    JobState.SUCCEEDED.value: "ok",
    JobState.FAILED.value: "fail",
    JobState.CANCELLED.value: "canc",
}

BAR_MIN, BAR_MAX = 10, 40


def _fit(text: str, cells: int) -> str:
    if cell_len(text) <= cells:
        return text
    return set_cell_size(text, cells - 1).rstrip() + "…" if cells > 1 else ""


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def time_left(task: Task) -> float | None:
    """The seconds left that the line shows: the task's field ``eta``, which ``run`` sets by
    ``status``'s pace and rules (:func:`jobs.listing.forecast`, through
    :func:`jobs.batches.batch_progress`: none while the batch is paused or outside its schedule);
    0 once every job is finished. Never rich's own ``time_remaining``,
    which forecast a paused batch's waiting jobs at the pace they had before the pause."""
    total = int(task.total) if task.total is not None else None
    if total and int(task.completed) >= total:
        return 0.0
    eta = task.fields.get("eta")
    return float(eta) if isinstance(eta, int | float) and eta > 0 else None


def counts_text(counts: dict[str, int], cells: int) -> str:
    """``succeeded:6 running:4``, or ``ok:6 run:4`` when that does not fit, cut to ``cells``."""
    present = [(state.value, counts[state.value]) for state in JobState if counts.get(state.value)]
    full = " ".join(f"{k}:{n}" for k, n in present)
    if cell_len(full) <= cells:
        return full
    return _fit(" ".join(f"{SHORT_STATES[k]}:{n}" for k, n in present), cells)


def money_text(spent_usd: float | None, estimated_usd: float | None) -> str:
    """``$1.80/$2.40``: spent so far over the estimate, rounded like everywhere else."""
    return f"{usd_text(spent_usd)}/{usd_text(estimated_usd)}"


class BatchLineColumn(ProgressColumn):
    """The whole progress line as one column, fitted to the console's width at each refresh.

    Reads the task's ``description``, ``completed``/``total``, ``elapsed`` and the fields
    ``money`` (a string, :func:`money_text`), ``counts`` (jobs by state) and ``eta``
    (:func:`time_left`).
    """

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render(self, task: Task) -> Text:
        width = max(self.console.width - 1, 20)  # one cell spare: some terminals wrap at the edge
        total = int(task.total) if task.total is not None else None
        done = int(task.completed)
        essentials = [
            f"{done}/{'?' if total is None else total}",
            str(task.fields.get("money", "")),
            _clock(task.elapsed),
        ]
        remaining = time_left(task)
        left = f"~{_clock(remaining)} left" if remaining else ("" if total and done >= total else "-:--:--")
        tail = " ".join(p for p in [*essentials, left] if p)
        room = width - cell_len(tail)
        # Narrower than a bar and "jobs" need: the bar goes, then the description shrinks.
        bar = max(BAR_MIN, min(BAR_MAX, room // 3)) if room >= BAR_MIN + 6 else 0
        counts: Any = task.fields.get("counts") or {}
        # A note in the description ("waiting for window (opens …, in 58m)": why nothing moves)
        # comes before the counts, and before the bar and an unknown time left too, which say
        # nothing while nothing moves: they give way first. "jobs" alone always fits.
        description = str(task.description)
        if " · " in description and cell_len(description) > (room - bar - 2 if bar else room - 1):
            bar = 0
            if left == "-:--:--" and cell_len(description) > room - 1:
                tail = " ".join(p for p in essentials if p)
                room = width - cell_len(tail)
        description = _fit(description, max(room - bar - 2, 4) if bar else room - 1)
        room -= cell_len(description) + 1 + (bar + 1 if bar else 0)
        counts_part = counts_text(counts, room - 1) if isinstance(counts, dict) and room > 4 else ""
        line = Text()
        if description:
            line.append(description + " ", style="bold")
        if bar:
            finished = bool(total) and done >= (total or 0)
            filled = bar if finished else (bar * done // total if total else 0)
            line.append("━" * filled, style="bar.finished" if finished else "bar.complete")
            line.append("━" * (bar - filled) + " ", style="bar.back")
        line.append(tail)
        if counts_part:
            line.append(" " + counts_part)
        return line


#: How often the line is drawn again. What it shows changes at most twice a second (``run``
#: reads the batch every 0.5 s) and its clock once a second; rich's default of 10 redraws a
#: second cost about 10 ms of CPU a second (0.44 ms a redraw): as much as all of a waiting
#: run's own work.
REFRESH_PER_SECOND = 2


def batch_progress_display(console: Console, *, disable: bool) -> Progress:
    """The ``Progress`` that ``run`` updates (fields ``money`` and ``counts``; see the module)."""
    return Progress(
        BatchLineColumn(console),
        console=console,
        disable=disable,
        transient=False,
        refresh_per_second=REFRESH_PER_SECOND,
    )


# --------------------------------------------------------------------------- not a terminal

#: When stderr is not a terminal (``nohup``, CI, systemd, ``2> run.log``) the line cannot be
#: redrawn in place, so ``run`` prints it as plain lines instead (:class:`PlainProgress`): one at
#: the start, then one each time another :data:`PLAIN_STEP_PERCENT` % of the jobs is finished
#: (at most one every :data:`PLAIN_MIN_GAP_SECONDS`), at least one every
#: :data:`PLAIN_EVERY_SECONDS` while nothing moves (a batch waiting for its window shows its
#: countdown), one at once when an alert comes or goes (the submit-rate limiter unreachable),
#: and one at the end.
PLAIN_STEP_PERCENT = 5
PLAIN_MIN_GAP_SECONDS = 10.0
PLAIN_EVERY_SECONDS = 60.0


def plain_line(task: Task, *, now: datetime | None = None) -> str:
    """What the progress line shows, as one line of plain text (no bar, no colours, no carriage
    return), with the UTC time first: ``2026-12-02T21:05:00Z jobs: 120/400 (30%) · $1.20/$4.00
    · elapsed 0:05:00 · ~0:12:30 left · succeeded:118 running:8 failed:2``.

    The time is the database's (:func:`jobs.clock.utcnow`), as every stamp of wanbatch and every
    countdown the line carries ("opens 22:00 Europe/Berlin, in 3m"): on a host whose clock is off,
    a stamp of its own disagreed with the countdown beside it."""
    stamp = (now or clock.utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")
    total = int(task.total) if task.total is not None else None
    done = int(task.completed)
    description = str(task.description)
    name, _, note = description.partition(" · ")
    count = f"{done}/{'?' if total is None else total}"
    if total:
        count += f" ({100 * done // total}%)"
    parts = [f"{name}: {count}", str(task.fields.get("money", "")), f"elapsed {_clock(task.elapsed)}"]
    if total and done < total:
        # Held (paused, outside its schedule): no forecast comes, whatever the pace; the note
        # after says why.
        none = "no ETA" if task.fields.get("held") else "no ETA yet"
        remaining = time_left(task)
        parts.append(f"~{_clock(remaining)} left" if remaining else none)
    if note:
        parts.append(note)
    counts: Any = task.fields.get("counts") or {}
    if isinstance(counts, dict) and (listed := counts_text(counts, 10_000)):
        parts.append(listed)
    return stamp + " " + " · ".join(p for p in parts if p)


class PlainProgress:
    """Decides when ``run`` prints its progress as a plain line (see :data:`PLAIN_STEP_PERCENT`).

    It reads nothing itself: it is asked after each refresh of the batch's counts, which
    :class:`worker.running.RefreshBudget` spaces out, so the lines cost nothing more.
    """

    def __init__(
        self,
        step_percent: float = PLAIN_STEP_PERCENT,
        min_gap: float = PLAIN_MIN_GAP_SECONDS,
        every: float = PLAIN_EVERY_SECONDS,
    ) -> None:
        self.step_percent = step_percent
        self.min_gap = min_gap
        self.every = every
        self._last_at: float | None = None  # monotonic time of the last line
        self._last_step = -1
        self._last_alert: str | None = None

    def due(
        self, now: float, done: int, total: int | None, *, final: bool = False, alert: str | None = None
    ) -> bool:
        """Whether to print a line at ``now`` (``time.monotonic()``) with ``done`` of ``total``
        jobs finished; ``final``: the run ends here, which always gets its line. ``alert``: what
        holds every job back now (None: nothing), said at once when it comes and when it goes,
        not up to a minute later."""
        step = int(100 * done / total // self.step_percent) if total else 0
        if final or self._last_at is None or alert != self._last_alert:
            due = True
        else:
            since = now - self._last_at
            due = since >= self.every or (step > self._last_step and since >= self.min_gap)
        if due:
            self._last_at, self._last_step, self._last_alert = now, step, alert
        return due
