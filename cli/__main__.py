"""``python -m cli``: the ``wanbatch`` command, as the console script runs it (same output, same
exit codes; the early Ctrl-C handling is installed when the package is imported, see
:func:`cli._launched_as_command`)."""

from __future__ import annotations

from cli import main

if __name__ == "__main__":
    main()
