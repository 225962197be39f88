"""One line for a group of failures whose jobs' errors differ (``status``, ``run``, the dashboard).

``status`` groups failed and cancelled jobs by ``error_type`` and shows one job's error as the
group's example. Where the jobs' errors differ, that example hides the others: twelve jobs
failed because images/p1.png *and* images/p2.png were rewritten after the submit, and the line
named p1.png only, so the user put one file back and ran again into four more failures. The
summary names every file ("media files 'images/p1.png' and 'images/p2.png' changed since …",
the first few and "and N more"), and says how many other errors a group hides otherwise.

Errors that differ only by the request id they name (a UUID: fal's ``HTTP 404: Result of
request 0051b6e6-… has expired``) are one cause too, said once with how many requests: eight
jobs whose results fal discarded read as one cause, not as "…; also: … (and 6 other errors)".
A group whose failure has a known way on gets it too (:func:`next_step`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Files named per cause before "and N more".
NAMES_SHOWN = 3
#: Causes (the errors, those of files told apart only by the file merged into one) written out
#: before "and N other error(s)": a terminal line wraps to a few lines at most.
CAUSES_SHOWN = 2

#: An error about one input file, as the submit step words it (``worker.fal.storage``):
#: ``media file 'images/car.png' does not exist``. A name holds no line feed (it is shown
#: escaped), and the words after it say what is wrong with it.
_ABOUT_A_FILE = re.compile(r"media file '(?P<name>.+?)' (?P<rest>.+)", re.DOTALL)

#: A request id as fal gives them (a UUID), in an error's words. fal's queue API names each
#: request by such an id (https://docs.fal.ai/model-apis/model-endpoints/queue, "request_id").
_REQUEST_ID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
#: What a merged cause shows in place of each request id.
_ANY_REQUEST = "…"

#: The error type of a rerun's job ended unsent, its original's request proved after all
#: (:data:`jobs.store.REPEAT_NOT_SENT_ERROR`, the same text: this module imports nothing of the store).
REPEAT_NOT_SENT = "original_kept_late_request"

#: The verb of a cause said of one file, said of several ("does not exist" → "do not exist").
_PLURAL = (("does ", "do "), ("is ", "are "), ("has ", "have "), ("now leads ", "now lead "))


def failure_summary(example: str, errors: Sequence[tuple[str, int]], distinct: int) -> str:
    """The line for a failure group: its ``example`` when its jobs have one error (``distinct``
    1), else its ``errors`` (text, jobs; commonest first, maybe only the first of ``distinct``)
    with the errors that differ only by the file they name said once, naming the files."""
    if distinct <= 1 or not errors:
        return example
    causes: dict[tuple[str, str], list[str]] = {}  # (kind, words) → the files it names, in order
    # (kind, words) of a cause told apart only by request ids → those ids' errors and their jobs
    requests: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for error, jobs in errors:
        about = _ABOUT_A_FILE.fullmatch(error)
        if about is not None:
            causes.setdefault(("file", about["rest"]), []).append(about["name"])
            continue
        general = _REQUEST_ID.sub(_ANY_REQUEST, error)
        if general == error:
            causes.setdefault(("text", error), [])
        else:
            causes.setdefault(("requests", general), [])
            requests.setdefault(("requests", general), []).append((error, jobs))
    texts = [
        _cause_text(kind, words, names, requests.get((kind, words), []))
        for (kind, words), names in causes.items()
    ]
    hidden = sum(
        _errors_in(names, requests.get(cause, [])) for cause, names in list(causes.items())[CAUSES_SHOWN:]
    )
    hidden += max(distinct - len(errors), 0)  # those not read (the rarest: jobs.store.FAILURE_ERRORS_KEPT)
    line = "; also: ".join(texts[:CAUSES_SHOWN])
    if hidden:
        line += f" (and {hidden} other error{'' if hidden == 1 else 's'})"
    return line


def _errors_in(names: list[str], requests: list[tuple[str, int]]) -> int:
    """How many of the group's distinct errors one cause stands for (one at least)."""
    return max(len(names), len(requests), 1)


def _cause_text(kind: str, words: str, names: list[str], requests: list[tuple[str, int]]) -> str:
    """One cause: an error as it is, the words said of files (``names``), the files named, or
    errors told apart only by their request ids, with how many requests (``requests``: each
    id's error and its jobs) — the error as it is when there is one."""
    if kind == "text":
        return words
    if kind == "requests":
        if len(requests) == 1:  # one request: its id is worth keeping (export, fal's dashboard)
            return requests[0][0]
        return f"{words} ({sum(jobs for _, jobs in requests)} requests)"
    if len(names) == 1:
        return f"media file '{names[0]}' {words}"
    for one, several in _PLURAL:
        if words.startswith(one):
            words = several + words[len(one) :]
            break
    return f"media files {_names_text(names)} {words}"


def _names_text(names: list[str]) -> str:
    """``'a' and 'b'``; ``'a', 'b' and 'c'``; ``'a', 'b', 'c' and 2 more``."""
    quoted = [f"'{name}'" for name in names]
    if len(quoted) > NAMES_SHOWN:
        return f"{', '.join(quoted[:NAMES_SHOWN])} and {len(quoted) - NAMES_SHOWN} more"
    return f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def next_step(error_type: str | None, *, sent: bool, ref: str, simulated: bool, rerun: bool) -> str | None:
    """The way on for jobs that ended with ``error_type``, where one is known, said after the
    failure group's line (``status``, the end of ``run``, ``status --json``'s ``next_step``);
    None otherwise. ``ref``: the batch as a command names it; ``rerun``: the batch is a rerun
    (it has no manifest of its own to run again).

    * ``result_expired``: fal made and billed the video, then discarded its result before it
      was fetched (fal keeps a request's result for a limited time); only a new render gets it,
      paid again: what ``rerun`` warns of when it repeats such jobs.
    * ``input_file`` never sent: nothing was paid; submitting the manifest again once its files
      are there (from its new folder, if it moved) sends them again
      (:func:`jobs.store.revive_input_failed`).
    * ``original_kept_late_request`` (:data:`jobs.store.REPEAT_NOT_SENT_ERROR`): a rerun's jobs
      ended unsent because the jobs they repeat kept fal's request after all (a late answer or
      fal's webhook proved it): those jobs get their videos from it, in their own batch.
    """
    simulate = " --simulate" if simulated else ""
    if error_type == "result_expired":
        return (
            "fal made and billed these videos but no longer keeps them: "
            f"`wanbatch rerun {ref} --failed-only{simulate}` renders them again, paid again"
        )
    if error_type == REPEAT_NOT_SENT:
        head = "not sent again (an earlier attempt was)" if sent else "never sent, nothing paid"
        return (
            f"{head}: the job each repeats gets its video from its own request after all "
            "(a late answer or fal's webhook proved it), in that job's batch"
        )
    if error_type == "input_file" and not sent:
        if rerun:
            return (
                f"never sent, nothing paid: `wanbatch rerun {ref} --failed-only{simulate}` sends them again"
            )
        return (
            "never sent, nothing paid: once the files are there, `wanbatch run` of the manifest "
            "(from its new folder, if the project moved) sends them again"
        )
    return None
