"""Bounds that a setting and a command-line option share, in a module that imports nothing.

``wanbatch worker -c`` must refuse what ``WANBATCH_EMBEDDED_CONCURRENCY`` refuses, and its
option is defined when the CLI is imported, for ``--help`` too, which must not load
:mod:`jobs.settings` (pydantic-settings is a good part of the start-up time).
"""

from __future__ import annotations

#: The most worker threads the embedded mode may start (one pool for submits, one for downloads),
#: and the most tasks ``wanbatch worker`` may run at once: far more than fal runs at once for any
#: account; a million would exhaust the host first.
MAX_THREADS = 1024
