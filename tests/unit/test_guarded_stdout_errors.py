""":func:`cli.output.guarded` passes a standard output that failed on to :func:`cli.main`.

:class:`~cli.output.StdoutError` and :class:`~cli.output.ReaderGone` are under
:class:`~jobs.errors.WanbatchError` like every error wanbatch raises on purpose, but only
``cli.main`` may answer them: an ``error:`` line on stderr and exit 2 with no ``--json`` object
(stdout is what cannot take it), or no line and exit 141. ``guarded``, which answers every other
WanbatchError with its message (and a ``--json`` object on stdout), must let them by.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cli.output import EXIT_BROKEN_PIPE, EXIT_USAGE, ReaderGone, StdoutError, guarded
from jobs.errors import UsageError, WanbatchError


def _raising(exc: BaseException) -> Callable[[], int | None]:
    def action() -> int | None:
        raise exc

    return action


@pytest.mark.parametrize("as_json", [False, True])
def test_a_reader_gone_passes_guarded(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReaderGone):
        guarded(as_json, _raising(ReaderGone()))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("as_json", [False, True])
def test_an_unwritable_stdout_passes_guarded(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StdoutError, match="cannot write to standard output: No space left"):
        guarded(as_json, _raising(StdoutError("No space left on device")))
    said = capsys.readouterr()
    assert (said.out, said.err) == ("", "")


def test_they_keep_the_bases_their_catchers_use() -> None:
    assert issubclass(StdoutError, WanbatchError)
    assert issubclass(StdoutError, OSError)  # what a failed write raises, caught as one
    assert issubclass(ReaderGone, WanbatchError)
    assert not issubclass(ReaderGone, OSError)
    assert (StdoutError.exit_code, ReaderGone.exit_code) == (EXIT_USAGE, EXIT_BROKEN_PIPE)


def test_any_other_deliberate_error_is_still_answered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        guarded(False, _raising(UsageError("no batch 'x'")))
    assert ended.value.code == 2
    assert "no batch 'x'" in capsys.readouterr().err
