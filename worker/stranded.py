"""A request sent with another API key that fal would not answer this key about.

Apart from :mod:`worker.steps.other_key`, which notes them as the steps meet them: a ``run``
watching distributed workers and ``cancel`` read them from the database and name them, and
must not load the workers' steps (and PyAV with them) to do so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stranded:
    """A job whose request ``request_id`` was sent with the key ``key_id``, about which fal told
    this process's key "not found" (or refused it)."""

    job_id: str
    request_id: str
    key_id: str
    #: The key (its id) fal refused it to, when known (read from the database).
    refused_to: str = ""
