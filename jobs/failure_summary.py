"""One line for a group of failures whose jobs' errors differ (``status``, ``run``, the dashboard).

``status`` groups failed and cancelled jobs by ``error_type`` and shows one job's error as the
group's example. Where the jobs' errors differ, that example hides the others: twelve jobs
failed because images/p1.png *and* images/p2.png were rewritten after the submit, and the line
named p1.png only, so the user put one file back and ran again into four more failures. The
summary names every file ("media files 'images/p1.png' and 'images/p2.png' changed since …",
the first few and "and N more"), and says how many other errors a group hides otherwise.
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

#: The verb of a cause said of one file, said of several ("does not exist" → "do not exist").
_PLURAL = (("does ", "do "), ("is ", "are "), ("has ", "have "), ("now leads ", "now lead "))


def failure_summary(example: str, errors: Sequence[tuple[str, int]], distinct: int) -> str:
    """The line for a failure group: its ``example`` when its jobs have one error (``distinct``
    1), else its ``errors`` (text, jobs; commonest first, maybe only the first of ``distinct``)
    with the errors that differ only by the file they name said once, naming the files."""
    if distinct <= 1 or not errors:
        return example
    causes: dict[tuple[str, str], list[str]] = {}  # (kind, words) → the files it names, in order
    for error, _jobs in errors:
        about = _ABOUT_A_FILE.fullmatch(error)
        if about is None:
            causes.setdefault(("text", error), [])
        else:
            causes.setdefault(("file", about["rest"]), []).append(about["name"])
    texts = [_cause_text(kind, words, names) for (kind, words), names in causes.items()]
    hidden = sum(max(len(names), 1) for names in list(causes.values())[CAUSES_SHOWN:])
    hidden += max(distinct - len(errors), 0)  # those not read (the rarest: jobs.store.FAILURE_ERRORS_KEPT)
    line = "; also: ".join(texts[:CAUSES_SHOWN])
    if hidden:
        line += f" (and {hidden} other error{'' if hidden == 1 else 's'})"
    return line


def _cause_text(kind: str, words: str, names: list[str]) -> str:
    """One cause: an error as it is, or the words said of files (``names``), the files named."""
    if kind == "text":
        return words
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
