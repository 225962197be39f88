"""Manifests: load a YAML batch description, expand it into jobs, and validate every job.

The manifest (see the README) names a batch, a default ``endpoint``, ``defaults``, an optional
``matrix``, ``items`` and optionally ``items_from`` (a JSONL or CSV file of more items), and a
``budget``. Loading is cheap and reads only the YAML; :meth:`Manifest.jobs` then *streams* the
expanded jobs, so a 100,000-row ``items_from`` file is never held in memory.

The package, in the order a manifest flows through it (each module imports only those above it):

- ``model``: :class:`JobSpec` and the raw item every step shares;
- ``fal_key``: FAL_KEY refused anywhere in a manifest, and masked in every issue;
- ``keys``: :func:`job_key`, what makes two jobs the same job;
- ``items_from``: streaming JSONL and CSV rows;
- ``checks``: what needs the whole manifest (duplicate keys and jobs, local path confinement);
- ``sources``: each job's ``source_files`` (media as written, with its SHA-256);
- ``expand``: :class:`Manifest` and its stream of jobs;
- ``loading``: YAML with lines → :class:`Manifest` (:func:`load_manifest`);
- ``report``: :func:`validate_manifest` and :func:`iter_valid_jobs`, each job checked by
  :mod:`jobs.validation`, which knows nothing of manifests.

How one job's input is resolved (each later step wins):

1. ``defaults``;
2. the item's own fields;
3. the matrix combination. The matrix applies to every item, giving items × (product of the
   matrix lists) jobs. An item that sets a field the matrix also sets is overridden by the
   matrix, with a warning (the sweep is what the user asked for; the item value is likely a
   leftover). A value the matrix overrides (an item's, a default's) is still validated: one
   refused without the matrix is refused with it.

Then:

- a ``null`` value removes the field (so an item can unset a default; the provider applies its
  own default);
- endpoint defaults are **not** injected: the input stays as the user wrote it, the provider
  applies its documented defaults (pricing reads them from the registry);
- an integer given for a text field whose allowed values are numbers written as text (Wan 2.5's
  ``duration: ["5", "10"]``) becomes that text, so ``duration: 5`` works;
- CSV cells are text; they are converted to the field's type (integer, number, boolean) and an
  empty cell means the field is absent. A cell that does not convert stays text and is reported
  by validation;
- local media paths become absolute, relative to the folder of the file the value was written
  in: the manifest's for ``defaults``, ``matrix`` and ``items`` (whichever item the value lands
  in), the ``items_from`` file's for the values a row sets itself; ``~``, ``..`` and symlinks
  resolved. The result
  must lie inside the manifest's folder (or a folder the user allowed explicitly with
  ``--allow-dir`` / ``WANBATCH_ALLOWED_INPUT_DIRS``); anything else is a located error, and the
  file is never read. The same holds for ``items_from`` itself.

No string anywhere (name, description, any field of any item, ``items_from`` rows) may contain
a NUL character: PostgreSQL cannot store one, so it is refused here, with its location, rather
than by the database in the middle of ``submit``. Nor may any string (or line) hold FAL_KEY, in
any of the forms :mod:`jobs.key_forms` knows, when the key is set: a manifest's values are
stored, sent and exported, the key belongs in FAL_KEY only (:mod:`jobs.manifest.fal_key`).

Every job has a deterministic key: sha256 of the endpoint and the canonical JSON of the resolved
input, in which local files are replaced by ``sha256:<content hash>`` (moving a file keeps the
key; changing its bytes changes it). Identical jobs in one manifest collapse to one, with a
warning naming both items. Jobs whose keys differ only because one writes out an endpoint
default that another leaves out (``resolution: 720p``) are kept (their keys are what was
written), with one warning per group: both are sent and billed for the same video.
"""

from jobs.manifest.expand import Manifest
from jobs.manifest.keys import (
    canonical_json,
    endpoint_defaults,
    job_key,
    key_of,
    keyed_input,
    stored_content_key,
    stored_keyed_input,
    with_defaults,
    written_defaults,
)
from jobs.manifest.loading import load_manifest
from jobs.manifest.model import JobSpec
from jobs.manifest.report import ValidationReport, iter_valid_jobs, validate_job, validate_manifest

__all__ = [
    "JobSpec",
    "Manifest",
    "ValidationReport",
    "canonical_json",
    "endpoint_defaults",
    "iter_valid_jobs",
    "job_key",
    "key_of",
    "keyed_input",
    "load_manifest",
    "stored_content_key",
    "stored_keyed_input",
    "validate_job",
    "validate_manifest",
    "with_defaults",
    "written_defaults",
]
