"""Validating a whole manifest: every job checked, every issue located, in one streaming pass.

:func:`validate_manifest` is what ``wanbatch validate`` and ``estimate`` run; it never raises for
bad input. :func:`iter_valid_jobs` is the submit path: it validates everything first, so nothing
is stored (and no money spent) for a manifest that is wrong anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from jobs.digits import WholeTooLong
from jobs.endpoints import get_endpoint
from jobs.errors import TOO_MANY_JOBS, TOO_MUCH_INPUT, Issue, ManifestError, WanbatchError
from jobs.manifest.expand import MAX_INPUT_BYTES, MAX_JOBS, Manifest, jobs_allowed, too_many_jobs_message
from jobs.manifest.fal_key import keyless, known_keys
from jobs.manifest.loading import parse_manifest
from jobs.manifest.model import JobSpec
from jobs.media import UNREACHABLE_URL
from jobs.validation import MediaCache, ValueCache, validate_input

#: Most warnings one validation pass collects; the rest are counted. Errors have their own cap,
#: so no number of warnings ever hides an error.
MAX_ISSUES = 10_000
#: Most errors one validation pass collects (each is a located line the user needs); beyond, a
#: count, so a million bad rows cannot fill the memory.
MAX_ERRORS = 100_000


def validate_job(
    job: JobSpec,
    media_cache: MediaCache | None = None,
    value_cache: ValueCache | None = None,
    checked: dict[str, str] | None = None,
) -> list[Issue]:
    """The located issues of one expanded job: each at the line its offending value came from,
    a local file named as the manifest wrote it (its ``source_files``), not as it resolved. A
    field its file's CSV header was already faulted for (``reported``) is not faulted again.
    The caches hold one pass's verdicts (:mod:`jobs.validation`): every job is still checked
    against its endpoint's schema, each distinct file and value once. ``checked`` collects the
    SHA-256 of each local file's checked bytes (:attr:`Manifest.checked`)."""
    written = {name: source.get("source") for name, source in (job.source_files or {}).items()}
    return validate_input(
        get_endpoint(job.endpoint),
        job.input,
        job.location,
        media_cache,
        skip=job.refused | job.reported,
        written=written,
        value_cache=value_cache,
        checked=checked,
    )


@dataclass
class ValidationReport:
    """Everything wrong (and worth a warning) with a manifest, found in one streaming pass."""

    manifest: Manifest | None
    issues: list[Issue]
    job_count: int

    @property
    def ok(self) -> bool:
        """True when no issue is an error (warnings do not block)."""
        return not any(i.severity == "error" for i in self.issues)

    @property
    def errors(self) -> list[Issue]:
        """The error-severity issues only."""
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        """The warning-severity issues only."""
        return [i for i in self.issues if i.severity == "warning"]

    def raise_for_errors(self) -> None:
        """Raise :class:`ManifestError` with every issue when there is any error."""
        if not self.ok:
            raise ManifestError(self.issues)


def validate_manifest(
    path: str | Path,
    allowed_dirs: Iterable[Path] = (),
    keys: Iterable[str] = (),
    *,
    each_valid: Callable[[JobSpec], None] | None = None,
    now: datetime | None = None,
) -> ValidationReport:
    """Parse, expand and validate every job; never raises for bad input.

    ``each_valid`` is handed every job the pass keeps (a collapsed duplicate is not kept) that
    has no error of its own, as it is checked: a caller that needs each job of a valid manifest
    once (``estimate``'s prices) takes them here rather than expanding the manifest a second
    time, which doubled the time of ``validate`` and ``estimate`` on a million-job sweep. What it
    gathered means something only when the report is ``ok``.

    Issues come in file order (the manifest's own first, then ``items_from`` rows). A problem in
    ``defaults`` or ``matrix`` is reported once, not once per job it reaches. Local files must
    lie inside the manifest's folder or one of ``allowed_dirs``. A value (or line) holding
    FAL_KEY, ``keys`` or one this process remembered, is an error, and no issue shows the key
    (:mod:`jobs.manifest.fal_key`). ``now``: what a schedule's deadline must lie after
    (:func:`jobs.manifest.loading.parse_manifest`; the database's clock by default).
    """
    fal_keys = known_keys(keys)
    report = _validated(path, allowed_dirs, fal_keys, each_valid, now)
    report.issues = [keyless(issue, fal_keys) for issue in report.issues]  # a fal-shaped key too
    return report


def _validated(
    path: str | Path,
    allowed_dirs: Iterable[Path],
    keys: frozenset[str],
    each_valid: Callable[[JobSpec], None] | None,
    now: datetime | None = None,
) -> ValidationReport:
    manifest, issues = parse_manifest(path, allowed_dirs, keys=keys, now=now)
    if manifest is None:
        return ValidationReport(None, issues, 0)
    if manifest.expansion_floor() > MAX_JOBS or manifest.input_size_floor() > MAX_INPUT_BYTES:
        return ValidationReport(manifest, issues, 0)  # reported by parse_manifest; never expanded
    shared = manifest.shared_lines
    seen: set[tuple[object, ...]] = set()
    collected: list[Issue] = list(issues)
    expansion: list[Issue] = []
    kept = {"error": 0, "warning": 0}
    dropped = {"error": 0, "warning": 0}
    count = 0

    # A shared line's first issue of each kind: where it is in ``collected`` (None if capped
    # out), the endpoint of its job, and whether its message names that endpoint yet.
    first_shared: dict[tuple[object, ...], list[object]] = {}

    def add(issue: Issue, endpoint: str | None = None) -> None:
        if isinstance(issue.value, WholeTooLong):  # the loader said it: a number too long
            return
        base: tuple[object, ...] | None = None
        if issue.file == manifest.display and issue.line in shared:
            # Said once per rule, not once per job: a value of ``defaults`` (or the matrix) that
            # breaks other rules on another endpoint (other allowed values) is said again, for
            # the first item of that endpoint, both lines naming their endpoint — the allowed
            # values of one only would send the user from one error to the next.
            base = (issue.file, issue.line, issue.field, issue.message)
            mark: tuple[object, ...] = (*base, issue.allowed)
        elif issue.code == UNREACHABLE_URL:  # one warning per URL, not one per job sending it
            mark = (issue.code, issue.value)
        else:
            mark = (issue.file, issue.line, issue.item, issue.field, issue.message)
        if mark in seen:
            return
        seen.add(mark)
        if base is not None and endpoint is not None and (first := first_shared.get(base)) is not None:
            index, first_endpoint, named = first
            if not named:
                first[2] = True
                if isinstance(index, int):
                    collected[index] = replace(
                        collected[index], message=f"{collected[index].message} on {first_endpoint}"
                    )
            issue = replace(issue, message=f"{issue.message} on {endpoint}")
        severity = "error" if issue.severity == "error" else "warning"
        capped = issue.code not in (TOO_MANY_JOBS, TOO_MUCH_INPUT)  # said past any number of other errors
        if capped and kept[severity] >= (MAX_ERRORS if severity == "error" else MAX_ISSUES):
            dropped[severity] += 1
            if base is not None:
                first_shared.setdefault(base, [None, endpoint, endpoint is None])
            return
        kept[severity] += 1
        if base is not None:
            first_shared.setdefault(base, [len(collected), endpoint, endpoint is None])
        collected.append(issue)

    media_cache: MediaCache = {}
    value_cache = ValueCache()
    warned_expansion: set[str] = set()

    def check_dropped(job: JobSpec) -> None:
        """A job dropped as identical to an earlier one is validated too: its own errors are said."""
        for issue in validate_job(job, media_cache, value_cache, manifest.checked):
            add(issue, job.endpoint)

    for job in manifest.jobs(expansion, dropped=check_dropped):
        count += 1
        for issue in expansion:
            add(issue)
        expansion.clear()
        job_issues = validate_job(job, media_cache, value_cache, manifest.checked)
        for issue in job_issues:
            add(issue, job.endpoint)
        if each_valid is not None and not job.refused and not any(i.severity == "error" for i in job_issues):
            each_valid(job)
        if job.endpoint not in warned_expansion and (warning := _prompt_expansion_warning(job)) is not None:
            warned_expansion.add(job.endpoint)
            add(warning)
        if count > MAX_JOBS:
            add(_too_many_jobs(manifest))
            break
    for issue in expansion:
        add(issue)
    manifest.validated = True  # its checked files are known: a later pass refuses any other
    # Errors first (they are what blocks the manifest), then warnings; each in file order.
    collected.sort(key=lambda i: (i.severity != "error", i.file != manifest.display, i.file, i.line or 0))
    if dropped["error"]:
        total = kept["error"] + dropped["error"]
        note = f"… and {dropped['error']:,} more errors not shown ({total:,} in all)"
        collected.insert(kept["error"], replace(_about_whole(manifest, note), hidden=dropped["error"]))
    if dropped["warning"]:
        note = f"… and {dropped['warning']:,} more warnings not shown"
        collected.append(_about_whole(manifest, note, severity="warning"))
    return ValidationReport(manifest, collected, count)


def _prompt_expansion_warning(job: JobSpec) -> Issue | None:
    """A pinned seed with ``enable_prompt_expansion`` left at a default of ``true``: the endpoint
    rewrites the prompt with an LLM (Wan 2.5 and 2.6 do, by default), so the same seed and
    input do not make the same request twice — a reproducibility sweep would compare rewrites.
    Said once per endpoint, at the first such job."""
    if job.input.get("seed") is None or "enable_prompt_expansion" in job.input:
        return None
    try:
        spec = get_endpoint(job.endpoint)
    except WanbatchError:  # an unknown endpoint is reported by validation already
        return None
    field = spec.field("enable_prompt_expansion")
    if field is None or field.default is not True:
        return None
    return Issue(
        file=job.source,
        line=job.line,
        item=job.item_index,
        field="enable_prompt_expansion",
        message=(
            f"seeds are pinned but enable_prompt_expansion is left at its default (true) on {job.endpoint}: "
            "fal rewrites the prompt with an LLM, so the same seed and input are not the same request; "
            "set enable_prompt_expansion: false for a reproducible run"
        ),
        severity="warning",
    )


def _too_many_jobs(manifest: Manifest) -> Issue:
    return Issue(
        file=manifest.display,
        line=None,
        item=None,
        field=None,
        message=too_many_jobs_message(),
        allowed=jobs_allowed(),
        code=TOO_MANY_JOBS,
    )


def _about_whole(manifest: Manifest, message: str, severity: str = "error") -> Issue:
    """An issue about the manifest as a whole: no line, item or field to point at."""
    return Issue(file=manifest.display, line=None, item=None, field=None, message=message, severity=severity)


def iter_valid_jobs(
    path: str | Path, allowed_dirs: Iterable[Path] = (), keys: Iterable[str] = ()
) -> Iterator[JobSpec]:
    """Validate the whole manifest first, then stream its jobs; :class:`ManifestError` if invalid.

    Two passes over the file, so nothing is stored (and no money spent) for a manifest that is
    wrong anywhere — even on its last line.
    """
    report = validate_manifest(path, allowed_dirs, keys)
    report.raise_for_errors()
    assert report.manifest is not None
    return report.manifest.jobs()
