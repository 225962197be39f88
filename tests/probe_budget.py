"""``wanbatch`` with a shorter budget for opening the stop watch's probe connection.

A stop held back by a frozen database asks it, on a new connection, whether it answers at all
(:func:`worker.running.database_silence`); a connect that never completes is silence only after
:data:`worker.running.DATABASE_CONNECT_SECONDS` (30 s: a loaded server may be slow to accept new
clients, and ``tests/e2e/test_stop_watch_in_flight.py`` proves that such a one is not taken for a
frozen one). The tests whose database is frozen outright (SIGSTOP: the connect never completes,
however long it is given) do not wait those 30 s: they run the command through
:func:`wanbatch_command`, which sets the budget in the subprocess and runs the CLI as the console
script does. Everything else — the grace before the question, the answer's own deadline, what
the stop then does — is the product's.
"""

from __future__ import annotations

import sys

#: The budget the frozen-database tests give the probe's connect: a frozen server never
#: completes it, so any budget proves the same; this one leaves the watch well clear of the
#: moments the tests hold things at fal for.
CONNECT_SECONDS = 5.0


def wanbatch_command(connect_seconds: float = CONNECT_SECONDS) -> list[str]:
    """The argv (the command's arguments follow it) of ``wanbatch`` whose stop watch gives up on
    opening its probe connection after ``connect_seconds``."""
    code = (
        "from cli import main; import worker.running as running; "
        f"running.DATABASE_CONNECT_SECONDS = {float(connect_seconds)!r}; main()"
    )
    return [sys.executable, "-c", code]
