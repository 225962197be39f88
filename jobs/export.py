"""Export a batch as a dataset: one record per job, JSONL or CSV, streamed.

Fields are the contract's (job_id, batch, endpoint, status, input, seed, request_id,
video_path, video_sha256, billing_units, cost_usd, attempts, error, media, media_mismatch,
source_files, reused_from) plus a few a dataset builder wants (item_index and variant,
rerun_of and parent_batch (a rerun's lineage: the parent batch's job it repeats, and that
batch), in_manifest (the job's item is in the manifest text the batch stores, not only in an earlier
version of it: :func:`in_manifest`), batch_name, seed_text, actual_prompt, registry_sha256,
estimates, error_type, timestamps) and
the provider's metadata the sidecar keeps: ``provider_metrics`` (fal's ``metrics``, e.g.
``inference_time``) and ``provider_output`` (fal's result JSON), each null when fal gave none,
secrets masked and size bounded (:func:`export_provider_json`), and ``possibly_billed_usd`` (what
submits of the job whose outcome stayed unknown, or a request of it fal lost after it started
running, may have cost, as ``status`` and ``cost`` count it).
``seed_text`` is ``seed`` as decimal text, exact in every reader: fal's seeds reach
``2**64 - 1``, and a JSON reader that makes numbers float64 (pyarrow's, hence
``datasets.load_dataset("json")`` and ``"videofolder"``) rounds any seed above ``2**53``. Rows are in
item order, then matrix combination (``variant``). ``media`` is the probed video under the
contract's names (``width``, ``height``, ``frames``, ``fps``, ``duration``) plus ``codec`` and
``duration_s`` (:func:`export_media`).
``input`` is the exact JSON submitted (image references as sent); for a job never submitted
it is the validated input. One exception, as everywhere in an export: FAL_KEY and the
credentials of its URLs are masked (:func:`export_input`; ``source_files`` likewise, and
``actual_prompt`` is scrubbed as ``provider_output``'s strings are); the database keeps it
exact. Rows stream from the database in pages bounded in rows and bytes
(:func:`jobs.store.jobs_of_batch_bounded`), so a 100,000-job batch, or one whose inputs hold
inline images of MBs, exports in bounded memory. ``video_path`` is relative to
``WANBATCH_OUTPUT_DIR`` as the exporting process resolves it (a relative setting, like the
default ``./outputs``, against its working folder) when the stored file lies inside it, else
absolute; for one stored in S3 the object's ``s3://bucket/key`` URI. (An ``hf`` dataset's
``metadata.jsonl`` has its own copy's path instead.)

Every job is a record, finished or not: :func:`record_warnings` says what a reader must know
beside them (the batch has not finished, or no job of it succeeded), counted from the records as
they were written (:func:`tallied`).

CSV cells are neutralised against formula injection (OWASP "CSV Injection",
https://owasp.org/www-community/attacks/CSV_Injection): a text cell starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return gets a leading single quote, so a spreadsheet shows it
as text instead of running it. Batch names and prompts are user text and ``actual_prompt`` and
``request_id`` come from the provider, so none of them is trusted. JSONL is data, not a
spreadsheet, and stays exact.

With ``-o FILE`` the export is written to a temporary file beside FILE and renamed over it at
the end, so a failed export never leaves a truncated file under the final name. That file
(``.FILE.RANDOM.locked.part``) is locked (``flock``) while it is written, as an ``hf`` export's
part folder is: one an export killed outright left behind (nobody holds it) is removed by the
next export to FILE, one held is a running export's and left alone (:func:`_clear_stale_temps`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, TextIO

from sqlalchemy.orm import Session

from jobs import store
from jobs.errors import ConfigError, UsageError
from jobs.fs import file_kind, file_mode, is_missing, name_problem, os_reason, shown_path, utf8_file_names
from jobs.models import Batch, Job
from jobs.money import usd_json, usd_text
from jobs.moved_outputs import moved_path
from jobs.printable import one_line, shell_ref
from jobs.states import UNFINISHED_STATES, JobState
from jobs.url_secrets import (
    MASK,
    is_secret_name,
    mask_jwts,
    mask_params_in_text,
    mask_secret_pairs,
    mask_urls,
    shareable_text,
    without_keys,
)

#: First characters that make a spreadsheet treat a cell as a formula (OWASP CSV Injection).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")

FIELDS = (
    "job_id",
    "batch",
    "batch_name",
    "simulated",
    "item_index",
    "variant",
    "in_manifest",
    "endpoint",
    "status",
    "input",
    "source_files",
    "seed",
    "seed_text",
    "actual_prompt",
    "request_id",
    "video_path",
    "video_sha256",
    "video_bytes",
    "media",
    "media_mismatch",
    "reused_from",
    "rerun_of",
    "parent_batch",
    "registry_sha256",
    "billing_units",
    "cost_usd",
    "est_billing_units",
    "est_usd",
    "attempts",
    "possible_duplicate_charges",
    "error",
    "error_type",
    "submitted_at",
    "finished_at",
    "provider_metrics",
    "provider_output",
    # Added last, so that no CSV column moves: a script may read them by position.
    "possibly_billed_usd",
)


def _num(value: Decimal | None) -> float | None:
    """Billing units as a plain number (exact; units are not money)."""
    return None if value is None else float(value)


def refuse_unusable_outputs(session: Session, batch: Batch) -> None:
    """:class:`ConfigError` (one line, before anything is written) when a recorded video of
    ``batch`` lies in a folder this session cannot name (:func:`jobs.fs.name_problem`): a batch
    stored under UTF-8 (``Crème brûlée``) exported under ``LC_ALL=C``, where resolving its path
    was an internal error in every format, or "its video is missing" in a dataset, after a
    CSV header or an empty Parquet file had gone to standard output.

    Only a session whose file-name encoding is not UTF-8 has anything to look at: every text
    the database holds is a name a UTF-8 session can use. The names in a folder are wanbatch's
    own (ASCII), so its folders are enough: a few queries, not one row per job."""
    if utf8_file_names():
        return
    for folder in store.output_folders_of_batch(session, batch.id):
        if folder.startswith("s3://"):
            continue
        problem = name_problem(folder)
        if problem is not None:
            raise ConfigError(
                f"cannot export batch {one_line(batch.name)}: its videos are in '{shown_path(folder)}', "
                f"which this session cannot open: {problem}; nothing was written"
            )


def _video_path(job: Job, output_dir: Path, moves: Mapping[str, str] | None = None) -> str | None:
    """Relative to ``WANBATCH_OUTPUT_DIR`` when inside it, else absolute; an object in S3 as its
    ``s3://bucket/key`` URI (what every S3 tool, and ``datasets``/``fsspec``, open directly).
    ``moves``: videos of a moved project found under the current output folder whose new path
    the database could not record (:func:`jobs.moved_outputs.follow_outputs`)."""
    output_path = moved_path(job.output_path, moves)
    if output_path is None:
        return None
    if output_path.startswith("s3://"):
        return output_path
    problem = name_problem(output_path)
    if problem is not None:  # refuse_unusable_outputs says so before anything is written
        shown = shown_path(output_path)
        raise ConfigError(f"the video of job {job.id} '{shown}' cannot be opened: {problem}")
    path = Path(output_path)
    try:
        return str(path.resolve().relative_to(output_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _unsent_input(job: Job) -> dict[str, Any]:
    """The input of a job never sent: the validated one, each local media file as the manifest
    named it (``images/car.png``, from ``source_files``), not the absolute path it was resolved
    to: that path says nothing a dataset's reader can use, and tells them the sharer's folders.
    URLs and data URIs stay as they are (they are what would be sent)."""
    sources = job.source_files or {}
    named = {}
    for name, source in sources.items():
        value = job.input.get(name)
        if isinstance(value, str) and isinstance(source, dict) and Path(value).is_absolute():
            named[name] = source.get("source", value)
    return {**job.input, **named} if named else job.input


def export_media(media: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``media`` field: the probed video (``worker.probe.MediaInfo``) as the contract names
    it, ``width``, ``height``, ``frames``, ``fps``, ``duration`` (seconds), plus ``codec`` and
    ``duration_s``, the same seconds under the name the database stores (and exports before
    ``duration`` had). Mapped here, so jobs stored by any version export the same keys."""
    if media is None:
        return None
    out: dict[str, Any] = {}
    for key, value in media.items():
        if key == "duration_s" and "duration" not in media:
            out["duration"] = value
        out[key] = value
    return out


#: Containers nested deeper than this in fal's metadata are exported as :data:`NESTED_TOO_DEEP`.
#: The client refuses an answer nested deeper than 64 levels (``worker.fal.errors.MAX_JSON_DEPTH``),
#: so only a value stored otherwise (a webhook's payload) is ever cut.
PROVIDER_JSON_MAX_DEPTH = 64
NESTED_TOO_DEEP = "[nested too deep]"
#: About the most characters of JSON a provider field is exported with; a larger one is null.
#: Every answer of fal's is read up to 1 MiB (``worker.fal.client.MAX_ANSWER_BYTES``, a webhook's
#: body too), so only a value stored otherwise comes near it: it would swell every row group.
PROVIDER_JSON_MAX_CHARS = 2 * 1024 * 1024
#: A string value up to this long that is a JSON object or array (a raw body fal relayed, a
#: debug echo) is parsed, scrubbed as a value of its own (secret-named fields masked) and, when
#: a secret was masked in it, written back as JSON text; a longer one, one with a field twice in
#: an object (a reader keeps one of them, the parsed value the last) or one whose parse outruns
#: the budget is scrubbed as text only (:func:`jobs.url_secrets.mask_secret_pairs` still masks
#: its ``"access_token": "…"``). Either way, one in which nothing was masked is exported as
#: written, byte for byte (its ``NaN``, its nesting past the depth limit too).
JSON_IN_TEXT_MAX_CHARS = 256 * 1024


class _TooLarge(Exception):
    pass


class _RepeatedField(Exception):
    pass


def export_provider_json(value: Any) -> Any:
    """``provider_metrics`` or ``provider_output`` as exported: fal's JSON as stored, with

    * every string (keys too) scrubbed of secrets: the credentials of every URL in it
      (:func:`jobs.url_secrets.mask_urls`: a signed URL's ``X-Amz-Signature``, ``?token=``, a
      userinfo password, a parameter hiding a signed URL percent-encoded, a URL JSON-escaped),
      the secret parameters of a query string standing alone
      (:func:`jobs.url_secrets.mask_params_in_text`), FAL_KEY in any of its forms when this
      process knows it (:func:`jobs.key_forms.hide_keys`; a string that still holds it encoded
      otherwise, :func:`jobs.key_forms.contains_key`, is masked whole) and anything of a fal
      key's shape (:data:`jobs.key_forms.BARE_KEY`, encoded too). An export is made to be
      shared: the sidecar beside the video is the operator's own and keeps fal's URLs as they were;
      Inside a string, the value of a secret-named pair is masked too
      (:func:`jobs.url_secrets.mask_secret_pairs`: ``access_token=abc``, ``"password": "…"``,
      ``Authorization: Bearer abc``), and a string that is a JSON object or array (up to
      :data:`JSON_IN_TEXT_MAX_CHARS`, no field twice in an object) is scrubbed as the value it
      encodes and, when a secret was masked in it, written back as JSON (else it is the text as
      it was, scrubbed as text: a string is never exported unscrubbed);
    * the value of a field whose name looks secret (``access_token``, ``signature``,
      ``apiKey``; whole words of the name, so ``author`` or ``keyframes`` are kept:
      :func:`jobs.url_secrets.is_secret_name`) masked whole, whatever its type: a string, a
      number, a list (a multi-valued header, ``"Authorization": ["Basic …"]``) or an object (a
      ``credentials`` object) is the mask string, so nothing of it, its structure included, is
      left (null, a boolean, an empty list or object stay: they hold nothing); so is a ``code``
      field beside an OAuth token request's fields (``grant_type``, ``code_verifier``…: the
      authorization code), not an error's ``code``; a JSON Web Token is masked by its shape
      (:func:`jobs.url_secrets.mask_jwts`) in any string; fields whose names are the same once
      scrubbed (``…?token=A``, ``…?token=B``) all kept, the later ones suffixed ``~2``, ``~3``…;
    * containers deeper than :data:`PROVIDER_JSON_MAX_DEPTH` levels as :data:`NESTED_TOO_DEEP`,
      a non-finite number (no JSON) as null, and the whole value null when it would take more
      than about :data:`PROVIDER_JSON_MAX_CHARS` characters of JSON.

    The walk never recurses deeper than the depth limit nor reads past the size limit."""
    if value is None:
        return None
    budget = [PROVIDER_JSON_MAX_CHARS, 0]  # characters left; secrets masked so far
    try:
        return _scrubbed(value, 0, budget)
    except _TooLarge:
        return None


def _scrubbed(value: Any, depth: int, budget: list[int]) -> Any:
    if isinstance(value, str):
        budget[0] -= len(value) + 3
        if budget[0] < 0:
            raise _TooLarge
        if depth < PROVIDER_JSON_MAX_DEPTH and (encoded := _json_in_text(value)) is not None:
            left, masked = budget
            budget[0] += len(value) + 3  # counted as what it encodes instead
            try:
                scrubbed = _scrubbed(encoded, depth + 1, budget)
            except _TooLarge:  # its value takes more than its text: scrubbed as text
                scrubbed = encoded
                budget[1] = masked
            if budget[1] > masked:  # a secret masked in it: the scrubbed value, as JSON text
                return json.dumps(scrubbed, ensure_ascii=False)
            # Nothing secret in the value: the text as written (its NaN, its nesting past the
            # depth limit, its spacing), scrubbed as text all the same.
            budget[0] = left
        return _scrubbed_text(value, budget)
    budget[0] -= 8
    if budget[0] < 0:
        raise _TooLarge
    if isinstance(value, dict | list | tuple) and depth >= PROVIDER_JSON_MAX_DEPTH:
        return NESTED_TOO_DEEP
    if isinstance(value, dict):
        deeper = depth + 1
        out: dict[str, Any] = {}
        suffixes: dict[str, int] = {}  # the next ~n to try per scrubbed name: linear in the fields
        for k, v in value.items():
            name = _scrubbed(str(k), deeper, budget)
            if name in out:
                n = suffixes.get(name, 2)
                while f"{name}~{n}" in out:
                    n += 1
                suffixes[name] = n + 1
                name = f"{name}~{n}"
            if _holds_something(v, str(k)) and (
                is_secret_name(str(k)) or _is_authorization_code(str(k), value)
            ):
                budget[0] -= (len(v) if isinstance(v, str) else len(MASK)) + 3
                if budget[0] < 0:
                    raise _TooLarge
                out[name] = MASK  # a list or an object too: the mask says nothing of it is left
                budget[1] += 1
            else:
                out[name] = _scrubbed(v, deeper, budget)
        return out
    if isinstance(value, list | tuple):
        return [_scrubbed(v, depth + 1, budget) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: Fields of an OAuth token request (RFC 6749 §4.1.3, RFC 7636, RFC 7523) beside which a ``code``
#: field is the authorization code, not an error code (:func:`_is_authorization_code`).
_OAUTH_REQUEST_FIELDS = frozenset(
    {"grant_type", "redirect_uri", "code_verifier", "client_id", "client_secret", "client_assertion"}
)


def _holds_something(value: Any, name: str) -> bool:
    """Whether the value of a field called ``name``, when the name looks secret, can hold a
    secret: a string (but one masked already), a number, a non-empty list or object. Null and a
    boolean say nothing, and stay. A name that is a URL (``"https://…?token=A": 3``, its token
    masked in the name) names no credential: only its string value is masked, as before."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, str):
        return bool(value.strip("*"))
    if "://" in name:
        return False
    if isinstance(value, dict | list | tuple):
        return bool(value)
    return True


def _is_authorization_code(name: str, fields: dict[Any, Any]) -> bool:
    """A ``code`` field is an OAuth authorization code beside a token request's other fields
    (``grant_type``, ``code_verifier``, ``redirect_uri``…); elsewhere an error's code, kept."""
    return name == "code" and any(str(k) in _OAUTH_REQUEST_FIELDS for k in fields)


def _json_in_text(text: str) -> Any:
    """The object or array ``text`` is JSON of (up to :data:`JSON_IN_TEXT_MAX_CHARS`), else None.
    Nesting too deep for the decoder is no JSON here: the text is scrubbed as text."""
    if len(text) > JSON_IN_TEXT_MAX_CHARS or text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        value = json.loads(text, object_pairs_hook=_fields_once)
    except (ValueError, RecursionError, _RepeatedField):
        return None
    return value if isinstance(value, dict | list) else None


def _fields_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of JSON text as a dict; :class:`_RepeatedField` when a field is there twice
    (``{"url": "…?token=…", "url": "x"}``: a dict keeps the last, and the first would be
    exported as written)."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        raise _RepeatedField
    return fields


def _scrubbed_text(text: str, budget: list[int] | None = None) -> str:
    """``text`` without a URL credential, FAL_KEY or a fal-key-shaped string (see above); a
    change counted in ``budget[1]`` (secrets masked)."""
    shown = _without_keys(text)
    if shown is None:
        shown = MASK  # a key encoded in a way hide_keys does not know: nothing of the text is safe
    else:
        shown = mask_jwts(mask_secret_pairs(mask_params_in_text(mask_urls(shown)), mask=MASK))
    if budget is not None and shown != text:
        budget[1] += 1
    return shown


def _without_keys(text: str) -> str | None:
    """``text`` with every form of FAL_KEY this process knows and anything of a fal key's shape
    masked; None when a key is still in it, encoded in a way those do not know
    (:func:`jobs.url_secrets.without_keys`)."""
    return without_keys(text, mask=MASK)


def export_input(value: Any, depth: int = 0) -> Any:
    """``input`` (and ``source_files``) as exported: the JSON as stored, exact but for the
    secrets a dataset must not carry, in every string: FAL_KEY in any of its forms and anything
    of a fal key's shape (a string still holding a key encoded otherwise is the mask whole), and
    the credentials of every URL (:func:`jobs.url_secrets.mask_urls`: a userinfo password, a
    signed URL's ``X-Amz-Signature``, a ``?token=``). Nothing else is touched: field names,
    numbers, a data URI's bytes, a prompt's words stay as submitted. The database keeps the
    exact input (``rerun`` reads it there, never from an export)."""
    if isinstance(value, str):
        return shareable_text(value)
    if depth >= PROVIDER_JSON_MAX_DEPTH:  # no input nests this deep (the manifest's YAML cannot)
        return NESTED_TOO_DEEP if isinstance(value, dict | list | tuple) else value
    if isinstance(value, dict):
        return {k: export_input(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [export_input(v, depth + 1) for v in value]
    return value


def export_manifest_text(text: str) -> str:
    """A batch's manifest text as a dataset carries it (``manifest.yaml``): with the secrets
    :func:`export_input` masks in ``input``, masked here too, so the two agree; a line still
    holding a key encoded otherwise is replaced by a comment saying so."""
    shown = _without_keys(text)
    if shown is not None:
        return mask_urls(shown, mask=MASK)
    lines = []
    for line in text.splitlines(keepends=True):
        kept = _without_keys(line)
        body = "# (a line holding FAL_KEY, masked)" if kept is None else mask_urls(kept, mask=MASK)
        ending = line[len(line.rstrip("\r\n")) :]
        lines.append(body if kept is not None else body + ending)
    return "".join(lines)


def in_manifest(job: Job) -> bool:
    """Whether ``job``'s item is in the manifest the batch stores (``manifest_text``), the one an
    ``hf`` export ships as ``manifest.yaml``: False for a job of an earlier version of it, which
    a resubmit kept, numbered after the manifest's items, and marked (``not_in_manifest``,
    :func:`jobs.store.resubmit_jobs`; what its "no longer in its manifest" warning counted)."""
    return not job.not_in_manifest


def record(
    job: Job, batch: Batch, output_dir: Path, moves: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The export record of one job (``moves``: see :func:`_video_path`)."""
    return {
        "job_id": job.id,
        "batch": batch.id,
        "batch_name": batch.name,
        # Made by ``--simulate``: the bundled simulator's video, not a model's (never paid for).
        "simulated": batch.simulated,
        "item_index": job.item_index,
        "variant": job.variant,  # the matrix combination within the item
        # Whether the job's item is in the manifest text the batch stores (an hf export's
        # manifest.yaml), or came from an earlier version of it (in_manifest).
        "in_manifest": in_manifest(job),
        "endpoint": job.endpoint,
        "status": job.state.value,
        # What was sent (the validated input, for a job never sent), FAL_KEY and URL
        # credentials masked (export_input): the database keeps it exact, for reruns.
        "input": export_input(job.submitted_input if job.submitted_input is not None else _unsent_input(job)),
        # Each media field as the manifest named it, with its SHA-256 (null for URLs).
        "source_files": export_input(job.source_files),
        "seed": job.seed,
        # The same seed as decimal text: JSON readers that make numbers float64 (pyarrow's, so
        # ``datasets``' json and videofolder loaders; JavaScript) round seeds above 2**53.
        "seed_text": None if job.seed is None else str(job.seed),
        # fal's rewrite of the prompt: scrubbed as its other strings are (export_provider_json).
        "actual_prompt": export_provider_json(job.actual_prompt),
        "request_id": job.request_id,
        "video_path": _video_path(job, output_dir, moves),
        "video_sha256": job.output_sha256,
        "video_bytes": job.output_bytes,
        "media": export_media(job.media),  # the probed video, null before it was probed
        "media_mismatch": job.media_mismatch,  # what differed from the request; null when fine
        "reused_from": job.reused_from,  # reuse_outputs: the job whose output this is; null if sent
        # Lineage: the parent batch's job a rerun's job repeats, and that batch (null when made
        # from a manifest). `rerun --vary` numbers variants anew: join a rerun on these, not on
        # item_index and variant.
        "rerun_of": job.rerun_of,
        "parent_batch": batch.parent_batch_id,
        "registry_sha256": job.registry_sha256,  # the endpoint registry entry validated against
        "billing_units": _num(job.actual_billing_units),
        # Money as every --json has it (jobs.money.usd_json: half up to the micro-dollar), so
        # jsonl, csv, parquet and hf agree with `cost`, `status` and `diff` on every job.
        "cost_usd": usd_json(job.actual_usd),
        "est_billing_units": _num(job.est_billing_units),
        "est_usd": usd_json(job.est_usd),
        "attempts": job.attempts,
        "possible_duplicate_charges": job.possible_duplicate_charges,
        "error": _error(job),
        "error_type": job.error_type if job.state.value != "succeeded" else None,
        "submitted_at": job.submitted_at.isoformat() if job.submitted_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        # fal's metadata, as the sidecar has it: its ``metrics`` (``inference_time``, …) and its
        # result JSON, secrets masked and bounded (export_provider_json).
        "provider_metrics": export_provider_json(job.provider_metrics),
        "provider_output": export_provider_json(job.provider_output),
        # What submits of it whose outcome stayed unknown, or a request fal lost after it started
        # running, may have cost (fal may have billed them): the job's share of `status`'s and
        # `cost`'s "possibly billed", null when none.
        "possibly_billed_usd": usd_json(job.ambiguous_usd) if job.ambiguous_usd else None,
    }


def _error(job: Job) -> str | None:
    """The record's ``error``: null on success; else the job's, and, when a submit of it whose
    outcome stayed unknown may have been billed (``ambiguous_usd``), that it had been sent —
    unless its own error already says what is possibly billed (a request fal lost after it
    started running, :func:`jobs.store.fail_lost_request`).

    A job whose submit's answer was lost, sent again and then refused by its budget cap reads
    ``cancelled``, ``error_type: budget``, no cost: "submitting would commit …" says nothing of
    the request fal accepted before, which ``status`` counts as possibly billed.
    """
    if job.state is JobState.SUCCEEDED:
        return None
    if job.error is None or not job.ambiguous_usd:
        return job.error
    if "possibly billed" in job.error:  # its own error says so (a request fal lost after it ran)
        return job.error
    return (
        f"{job.error}; it had been sent: an earlier submit's outcome is unknown, so fal may have "
        f"billed it ({usd_text(job.ambiguous_usd)} possibly billed)"
    )


def records(
    session: Session, batch: Batch | str, output_dir: Path, moves: Mapping[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Every job of ``batch`` (a Batch, or its id, id prefix or name), in item order then matrix
    combination, as export records.

    The batch is looked up now, not when the first record is read: a batch that does not exist
    is an error before a writer has put anything out (a CSV header, a Parquet file's schema and
    footer), so ``export NOPE --format csv > ds.csv`` leaves no header-only "dataset" behind.
    """
    found = batch if isinstance(batch, Batch) else store.get_batch(session, batch)
    return _records(session, found, output_dir, moves)


def _records(
    session: Session, batch: Batch, output_dir: Path, moves: Mapping[str, str] | None
) -> Iterator[dict[str, Any]]:
    for job in store.jobs_of_batch_bounded(session, batch.id):
        yield record(job, batch, output_dir, moves)


def tallied(
    rows: Iterator[dict[str, Any]],
    statuses: Counter[str],
    output_dir: Path | None = None,
    missing: Counter[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """``rows`` as they are, counting each one's ``status`` into ``statuses`` on the way: what
    the written export holds, for :func:`record_warnings` (a count taken before the rows are
    read would miss the jobs that finish while a mid-run export streams). With ``output_dir``
    and ``missing``, each local ``video_path`` is looked at (one ``lstat``) and one that is not
    a regular file there counted as ``missing["videos"]``."""
    for row in rows:
        statuses[row["status"]] += 1
        if missing is not None and output_dir is not None and _video_gone(row.get("video_path"), output_dir):
            missing["videos"] += 1
        yield row


def _video_gone(video_path: object, output_dir: Path) -> bool:
    """The record's local ``video_path`` (relative to ``output_dir``, or absolute) names no
    regular file; False for no video or an ``s3://`` object (not looked at)."""
    if not isinstance(video_path, str) or video_path.startswith("s3://"):
        return False
    try:
        return not stat.S_ISREG((output_dir / video_path).lstat().st_mode)
    except (OSError, ValueError):
        return True


def by_state(counts: Mapping[str, int]) -> str:
    """``"11 pending, 2 running"``: the states with jobs, in lifecycle order."""
    order = {state.value: i for i, state in enumerate(JobState)}
    shown = sorted((state for state, n in counts.items() if n), key=lambda s: order.get(s, len(order)))
    return ", ".join(f"{counts[state]} {state}" for state in shown)


def unfinished_of(counts: Mapping[str, int]) -> dict[str, int]:
    """The jobs of ``counts`` (by state) that have not finished, by state; only states with jobs."""
    return {s.value: counts[s.value] for s in UNFINISHED_STATES if counts.get(s.value)}


def status_hint(batch: Batch) -> str:
    """How the user sees when ``batch`` has finished, and finishes one nothing is processing."""
    ref = shell_ref(batch.name, batch.id)
    simulate = " --simulate" if batch.simulated else ""
    return f"`wanbatch status {ref}`; `wanbatch run {ref}{simulate}` if nothing is processing it"


def record_warnings(batch: Batch, statuses: Mapping[str, int], missing_videos: int = 0) -> list[str]:
    """What a ``jsonl``, ``csv`` or ``parquet`` export of ``batch`` must say beside its records
    (``statuses``: how many records of each status it wrote, :func:`tallied`; ``missing_videos``:
    how many of them name a video that is not on disk, exported all the same).

    Every job is a record, finished or not: a record of a job in flight has no result (no seed,
    no video, no cost), which a dataset builder would read as a failure, or miss, unless told
    that the batch has not finished. A batch of which no job succeeded has no video at all."""
    warnings = []
    unfinished = unfinished_of(statuses)
    if unfinished:
        total = sum(statuses.values())
        warnings.append(
            f"batch {one_line(batch.name)} has not finished: {sum(unfinished.values())} of {total} record(s) "
            f"have no result yet ({by_state(unfinished)}); export again once it "
            f"has finished ({status_hint(batch)})"
        )
    if statuses and not statuses.get(JobState.SUCCEEDED.value) and not unfinished:
        warnings.append(
            f"no job of batch {one_line(batch.name)} succeeded ({by_state(statuses)}): no record has a video"
        )
    if missing_videos:
        ref = shell_ref(batch.name, batch.id)
        warnings.append(
            f"{missing_videos} record(s) name a video that is not on disk (deleted or moved since it "
            f"was stored): their video_path leads nowhere; `wanbatch diff {ref} {ref}` lists them, "
            f"`wanbatch refetch {ref}` fetches them again from fal at no charge while fal still serves them"
        )
    return warnings


def csv_safe(value: object) -> object:
    """A CSV cell a spreadsheet will show as text: a formula-looking text cell gets a leading ``'``.

    Only text is touched: numbers (a negative cost, say) are written as numbers.
    """
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def write_file(rows: Iterator[dict[str, Any]], fmt: str, output: Path) -> int:
    """Write the export to ``output`` atomically (temp file, fsync, rename); returns the count.

    :class:`UsageError` (one line) when ``output`` is a folder or cannot be created or written.
    """

    def text(fh: IO[bytes]) -> int:
        wrapper = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        count = write(rows, fmt, wrapper)
        wrapper.flush()
        wrapper.detach()  # hand the file back open: the caller fsyncs and closes it
        return count

    return write_atomically(output, f"export.{fmt}", text)


def _write_through(output: Path, fill: Callable[[IO[bytes]], int]) -> int:
    """Write straight into a device or pipe (no temporary file, no rename, no fsync: neither
    has a name to publish nor a disk to sync); its errors are one line, like a file's."""
    try:
        with output.open("wb") as fh:
            count = fill(fh)
            fh.flush()
    except OSError as exc:
        raise UsageError(f"cannot write the export to {str(output)!r}: {exc.strerror or exc}") from None
    return count


def write_atomically(output: Path, example_name: str, fill: Callable[[IO[bytes]], int]) -> int:
    """Run ``fill`` on a temporary file beside ``output``, fsync it and rename it over ``output``;
    returns what ``fill`` returned. A failed export never leaves a truncated file under the name.
    A device or pipe (``/dev/stdout``, a FIFO) is written straight through instead, and a symlink's
    target is replaced, not the link.

    :class:`UsageError` (one line) when ``output`` is a folder (``example_name`` shows what a
    file name could be) or cannot be created or written.
    """
    kind = file_kind(output)
    if isinstance(kind, OSError) and not is_missing(kind):  # too long a name, no permission, a loop
        raise UsageError(f"cannot write the export to '{shown_path(output)}': {os_reason(kind)}")
    if kind == "folder":
        raise UsageError(f"-o {str(output)!r} is a folder; give a file name such as {output / example_name}")
    if kind == "other":  # a device (/dev/null, /dev/stdout → a pipe), a FIFO, a socket: renaming
        # a temporary file over one would replace it (as root, -o /dev/null made it a regular file)
        return _write_through(output, fill)
    if output.is_symlink():  # replace the file it points at; the link stays a link
        output = output.resolve()
    if not output.parent.is_dir():  # a mistyped path is not a folder chain to create
        raise UsageError(
            f"cannot write the export to {str(output)!r}: there is no folder {str(output.parent)!r}"
        )
    try:
        mode = _mode_for(output)
    except OSError as exc:
        raise UsageError(f"cannot write the export to {str(output)!r}: {exc.strerror or exc}") from None
    _clear_stale_temps(output)
    try:
        fd, tmp = _locked_temp(output)
    except OSError as exc:  # e.g. /proc/version: the file is there, its folder takes no new file
        raise UsageError(
            f"cannot write the export to {str(output)!r}: cannot create its temporary file beside it "
            f"(in {str(output.parent)!r}): {exc.strerror or exc}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            count = fill(fh)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
            # Renamed while still open, its lock held: closing it first let another export to
            # ``output`` starting in between take it for one a killed export left, and remove it.
            tmp.replace(output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write the export to {str(output)!r}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return count


#: The suffix of what an export writes before it renames it into place: a file beside ``-o
#: FILE`` (:func:`write_atomically`), a folder for ``hf`` (:mod:`jobs.dataset_export`).
PART_SUFFIX = ".part"
#: How an export that holds its temporary file's (or part folder's) ``flock`` while it writes
#: names it (``.FILE.RANDOM.locked.part``): the lock record, made with it. Earlier versions named
#: theirs ``.FILE.RANDOM.part`` and took no lock: nobody holding the lock of such a one does not
#: prove its export ended.
LOCKED_SUFFIX = ".locked" + PART_SUFFIX
#: Seconds a temporary file or part folder without the lock record (:data:`LOCKED_SUFFIX`) must
#: have been left untouched before another export removes it: its export may be one of an earlier
#: version, which takes no lock, still writing. A day: an export writes all along.
UNLOCKED_PART_AGE = 24 * 3600
#: ``tempfile``'s random part of a name (:data:`tempfile._RandomNameSequence`: 8 of these, no
#: dot), which tells the temporary files of an export to ``new`` (``.new.RANDOM.part``) from those
#: of one to ``new.v2`` (``.new.v2.RANDOM.part``), which begin alike.
RANDOM_PART = r"[a-z0-9_]{8}"


def _locked_temp(output: Path) -> tuple[int, Path]:
    """A new hidden temporary file beside ``output`` (``.NAME.RANDOM.locked.part``), open, and
    holding its exclusive ``flock`` (unheld where the file system has none) until it is closed:
    the next export to ``output`` then tells a running export's file from one a killed export
    left (:func:`_clear_stale_temps`). The lock is taken after the file is made, so such a sweep
    may remove it in between: the file at the path is checked to be the one locked, else
    another made."""
    for _ in range(8):
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=LOCKED_SUFFIX, dir=output.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a sweep holds it only for as long as it looks
        except OSError:
            return fd, Path(name)
        try:
            same = os.path.samestat(os.lstat(name), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd, Path(name)
        os.close(fd)
    raise OSError(errno.EAGAIN, "its temporary file kept being removed by another export", str(output.parent))


def _clear_stale_temps(output: Path) -> None:
    """Remove the temporary files that exports to ``output``, ended before they renamed theirs
    into place (``kill -9``, a crash, a power cut: nothing removed them), left beside it: each
    a hidden copy of partial records, 0600, never removed otherwise. By the rules an ``hf``
    export clears its stale part folders by (:func:`jobs.dataset_export._take_stale`): one nobody
    holds the lock of, named as taking one, is removed; one held is a running export's, and left
    alone; one of an earlier version's name (which took no lock) only once untouched for
    :data:`UNLOCKED_PART_AGE`. Nothing here stops the export: each writes its own file, and what
    cannot be told or removed stays for the user to judge."""
    pattern = re.compile(
        re.escape(f".{output.name}.") + RANDOM_PART + r"(?:\.locked)?" + re.escape(PART_SUFFIX)
    )
    try:
        with os.scandir(output.parent) as entries:
            stale = [
                Path(e.path)
                for e in entries
                if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)
            ]
    except OSError:  # a folder it may not list: creating the temporary file there says why
        return
    for temp in stale:
        _remove_unheld(temp)


def _remove_unheld(temp: Path) -> None:
    """Remove the temporary file ``temp`` of an export if that export has ended: nobody holds
    its lock, and its name says its export took one, else it is untouched for
    :data:`UNLOCKED_PART_AGE`. Left as it is otherwise, or when it cannot be told."""
    try:
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone meanwhile, or not ours to open
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a running export's (or no flock here)
        info = os.fstat(fd)
        if not temp.name.endswith(LOCKED_SUFFIX) and info.st_mtime > time.time() - UNLOCKED_PART_AGE:
            return  # an earlier version's export, which takes no lock, may still be writing it
        if os.path.samestat(os.lstat(temp), info):  # the file looked at, not one made since
            temp.unlink()
    except OSError:
        return
    finally:
        os.close(fd)


def _mode_for(output: Path) -> int:
    """The permissions the export gets: those of the file it replaces, else what a plain
    ``open()`` would give a new file (0666 less the umask). ``mkstemp`` makes its file 0600,
    and the rename would otherwise carry that over, hiding a shared dataset from its readers."""
    try:
        return stat.S_IMODE(output.stat().st_mode)
    except FileNotFoundError:
        return file_mode()


def write(rows: Iterator[dict[str, Any]], fmt: str, fh: TextIO) -> int:
    """Write ``rows`` as ``jsonl`` or ``csv`` to ``fh``; returns the number of records.

    CSV text cells are neutralised against formula injection (:func:`csv_safe`).
    """
    count = 0
    if fmt == "jsonl":
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {
            k: csv_safe(json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v)
            for k, v in row.items()
        }
        writer.writerow(flat)
        count += 1
    return count
