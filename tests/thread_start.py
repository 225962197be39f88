"""Where CPython meets the OS's refusal to start a thread (``ulimit -u``, no memory for a stack),
for tests that simulate it: ``Thread.start`` calls :data:`START` with the thread's bound
``_bootstrap`` first. CPython 3.13 renamed the function (``_start_new_thread`` before) and
changed its other arguments, so a stand-in takes them all as they come."""

from __future__ import annotations

import threading

#: The name, in :mod:`threading`, of the function that starts a thread's OS thread.
START = "_start_joinable_thread" if hasattr(threading, "_start_joinable_thread") else "_start_new_thread"
