"""The one exception root of wanbatch, and the domain's branches of it.

Every error wanbatch raises on purpose derives from :class:`WanbatchError`, so the CLI can
catch that one class, print its message and exit with its ``exit_code`` — a traceback is
never the answer to bad input. Third-party errors are translated once, at the edge
(``raise … from exc``). That holds for errors that never reach the command line too (a YAML
problem becomes a located issue, a refused webhook its HTTP answer), and for ``falsim``, the
simulator, which ``--simulate`` runs inside the command. Only a module's private signals (a
name that starts with ``_``, never seen outside it) stand apart; ``tests/unit/test_error_tree.py``
fails on any other exception class of ``jobs``, ``worker``, ``web``, ``cli`` or ``falsim`` that
is not under :class:`WanbatchError`.

The tree — every class, exactly as the code has it (``tests/unit/test_error_tree.py`` checks that
each subclass of :class:`WanbatchError` in the product is drawn here, under its own base). A class
lives in this module unless ``[module]`` names another::

    WanbatchError                    exit 1 unless a branch says otherwise
    ├── UsageError                   exit 2: bad option, unknown batch, bad configuration
    │   ├── ConfigError              a WANBATCH_* setting (or FAL_KEY) is missing or malformed
    │   │   ├── DatabaseUnavailableError [worker.db_outage] the database stayed away mid-run past a lease
    │   │   ├── DatabaseReadOnlyError the database is read-only (mode=ro, not ours to write, a standby)
    │   │   └── SchemaBehindError    the database's schema was downgraded under this process
    │   ├── DatabaseFullError        the database's disk is full: nothing can be stored until space is freed
    │   ├── DatabaseLockedError      another session held a lock an operator's command waited for too long
    │   ├── NotFoundError            a batch or job id that does not exist
    │   ├── MissingInputError        a job's local input file is not there (moved, deleted, disk not mounted)
    │   ├── SimulatedElsewhere       [cli.batch_commands] `--simulate` of a batch another process simulates
    │   ├── ManifestError            the manifest is invalid; carries every located issue
    │   ├── ItemsFileChanged         the items_from file changed between validating and storing it
    │   ├── UnpricedError            a job's input has a value its endpoint's price table does not cover
    │   └── ThreadLimitError         [jobs.thread_limit] no thread can start: `ulimit -u` reached
    ├── StateConflict                a fenced write found the job moved on (its lease lost mid-download)
    │   └── RunStopped               [worker.steps.output_writes] the run stops: downloads end mid-chunk
    ├── RequestHeldError             fal's request id is another job's of the same fal queue: not taken
    ├── Interrupted                  [worker.running] exit 130: SIGINT/SIGTERM stopped the command
    ├── LimiterUnavailableError      [worker.limits] the shared submit-rate limiter is unreachable: no submit
    ├── OutputWriteError             [jobs.outputs] a video or sidecar could not be written (disk full, …)
    │   ├── OutputUploadError        [jobs.output_store] an upload to S3 failed (retried, staged copy kept)
    │   ├── OutputFolderError        [jobs.outputs] the batch's output folder cannot be placed (links out)
    │   └── LocalProbeError          [worker.probe] the probe could not read it here (fds, disk): video kept
    ├── OutputReadError              [jobs.output_store] a stored output could not be read back (export)
    ├── SubmitNotSentError           [worker.fal.errors] the submit failed here before it was sent
    │   └── FalUnreachableError      [worker.fal.errors] the connection to fal failed: nothing sent
    ├── NotAVideoError               [worker.probe] a downloaded output is not a decodable video
    ├── MissingVideoError            [jobs.dataset_export] exit 2: a succeeded job's video is gone: no dataset
    ├── NothingToRerun               [jobs.rerun] exit 0: `rerun --failed-only` found no job to repeat
    ├── YamlProblem                  [jobs.yaml_lines] text that is not acceptable YAML: a located issue
    │   └── WholeNumbersTooLong      [jobs.yaml_lines] whole numbers of too many digits, each located
    ├── UnreadableImage              [jobs.media] (also a ValueError) an input is no image: an issue
    ├── UnreadableAudio              [jobs.media] (also a ValueError) an input is no WAV or MP3: an issue
    ├── WebhookRejected              [worker.fal.webhooks] a delivery refused: answered with its HTTP status
    │   └── JwksUnavailable          [worker.fal.webhooks] fal's signing keys cannot be fetched (503)
    ├── StdoutError                  [cli.output] (also an OSError) exit 2: standard output cannot be written
    ├── ReaderGone                   [cli.output] exit 141, quietly: the reader of stdout left (`| head`)
    └── ProviderError                anything the provider (fal) said or did not say
        ├── RetryableProviderError   transient: try again later (429, gateway 5xx, network errors)
        │   ├── ResultNotReadyError      [worker.fal.errors] the result endpoint said "not finished yet"
        │   ├── DownloadIntegrityError   [worker.fal.errors] the output's size is not what fal described
        │   ├── DownloadUnreachedError   [worker.fal.errors] a download could not connect: held, not a try
        │   └── RequestFailedError       [worker.fal.errors] fal's verdict: a new attempt may succeed
        ├── FinalProviderError       permanent: do not try again (422, 401/403, non-retryable model errors)
        │   ├── AccountLockedError       the account itself is refused: the batch pauses
        │   ├── DownloadRefusedError     [worker.fal.errors] the download policy refused a host: held, paused
        │   ├── ResultExpiredError       [worker.fal.errors] fal no longer keeps the result
        │   ├── RequestCancelledError    [worker.fal.errors] the request was cancelled
        │   └── StartTimeoutError        [worker.fal.errors] our start timeout expired before a runner took it
        ├── AmbiguousSubmitError     the submit POST may have been accepted: never resend blindly
        └── ProviderProtocolError    [worker.fal.errors] an answer fal's protocol cannot produce

The provider branches live here (not in ``worker``) because the domain's state machine decides
what each of them means for a job; the specific subclasses, like every class only ``worker``
raises, live beside the code that raises them (``worker.fal.errors`` classifies fal's answers).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jobs.printable import one_line, quoted
from jobs.url_secrets import mask_urls


class WanbatchError(Exception):
    """Root of every error wanbatch raises deliberately."""

    exit_code: int = 1


class UsageError(WanbatchError):
    """The user asked for something that cannot be done as asked (CLI exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A setting is missing or malformed; the message names the variable, never its secret value."""


class SchemaBehindError(ConfigError):
    """The database's schema is older than this wanbatch's: downgraded under a running process
    (:func:`jobs.db.schema_behind`), which then works on it no more (a worker exits 2)."""


class DatabaseReadOnlyError(ConfigError):
    """A write refused because the database is read-only (SQLite's ``SQLITE_READONLY``: a
    ``mode=ro`` URL, or a file this user may not write; PostgreSQL's ``read_only_sql_transaction``:
    ``default_transaction_read_only = on`` for the role or database, or a standby;
    :func:`jobs.db._refuse_read_only_write`). Nothing was written. A command says so in one line
    (exit 2); the webhook receiver answers a delivery 503 (fal retries), since it was refused for
    the database, not for what it said; a dashboard action or login is answered 503 as well.
    ``reason``: why the database is read-only, as far as the error tells (for the user);
    ``said``: what the database said, on one line (for a log line)."""

    def __init__(self, message: str, *, reason: str = "", said: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.said = said


class DatabaseFullError(UsageError):
    """The database's disk is full (SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``): the
    write was refused and rolled back, and no write can succeed until someone frees space.
    Not a bug and not an outage that passes by itself: one line (exit 2) saying where to free
    space. ``where`` is the database's file, or its URL with the password masked."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


class DatabaseLockedError(UsageError):
    """Another database session held a lock that an operator's command (``status``, ``export``,
    a dashboard page …) needed for longer than it may wait (``WANBATCH_DATABASE_LOCK_WAIT``:
    PostgreSQL's ``lock_timeout`` for that command's transactions, :func:`jobs.db.lock_waits_bounded`).
    Not a bug, and like an outage the same command may succeed later; but waiting for it in
    silence is what the bound is there to end: one line (exit 2, as for a database that cannot
    be reached) naming the session when the server says who it is (``pid``: its process id)."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class NotFoundError(UsageError):
    """A batch or job the user named does not exist."""


class MissingInputError(UsageError):
    """A job's local input file is not there when the job is about to be sent: its project
    folder moved or was renamed, its disk is not mounted, or the file was deleted. Nothing was
    sent, so nothing is lost by waiting: the submit step pauses the batch (and says how to go
    on) instead of failing the job for good, which a moved folder used to do to every job.
    ``path``: the file as stored (absolute)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


#: :attr:`Issue.code` of a schedule deadline already past: refused for a new batch, but not for
#: one already stored, whose interrupted run must still collect what fal made before it.
DEADLINE_PASSED = "deadline_passed"

#: :attr:`Issue.code` of a schedule whose window (after ``not_before``) next opens only after its
#: deadline: nothing could be sent either, so it is treated like :data:`DEADLINE_PASSED`.
NEVER_OPENS = "never_opens"

#: :attr:`Issue.code` of a manifest over the job limit: one error that no cap on the number of
#: errors shown may hide (a file of bad rows past the limit says both).
TOO_MANY_JOBS = "too_many_jobs"

#: :attr:`Issue.code` of a manifest whose jobs would store more input than
#: :data:`jobs.manifest.expand.MAX_INPUT_BYTES`: like :data:`TOO_MANY_JOBS`, never hidden by a
#: cap, and the manifest is not expanded.
TOO_MUCH_INPUT = "too_much_input"


@dataclass(frozen=True, slots=True)
class Issue:
    """One located problem in a manifest: where it is, what is wrong, and what is allowed.

    ``item`` is the 0-based index of the manifest item (``None`` for top-level keys); ``line`` is
    1-based. ``severity`` is ``"error"`` (blocks submission) or ``"warning"`` (reported only).
    """

    file: str
    line: int | None
    item: int | None
    field: str | None
    message: str
    value: object = None
    allowed: str | None = None
    severity: str = "error"
    #: What kind of problem, where code must tell one from the others (:data:`DEADLINE_PASSED`).
    code: str | None = None
    #: For the note that stands for errors not shown (``… and 900,000 more errors not shown``):
    #: how many it stands for, so every count of the errors (:func:`errors_in`) is the real one.
    hidden: int = 0

    def location(self) -> str:
        """``file:line`` followed by the item and field, as an editor or a person wants it."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.item is not None:
            parts.append(f"item {self.item}")
        if self.field:
            parts.append(f"field {quoted(self.field)}")  # a key the user wrote: cut when long
        return ": ".join(parts)

    def __str__(self) -> str:
        """The issue's one line (:func:`jobs.printable.one_line`): "one line per problem", so a
        line break in what it quotes (a file name, a value) cannot forge a line of its own, on
        the terminal or as an entry of ``--json``'s ``details``. A URL it quotes shows no
        credentials (:func:`jobs.url_secrets.mask_urls`), as in every message."""
        text = f"{self.location()}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return one_line(mask_urls(text))

    def as_dict(self) -> dict[str, object]:
        """The JSON form used by ``validate --json``: the value and message as the line shows
        them, a URL's credentials masked."""
        value = self.value
        if not isinstance(value, str | int | float | bool | type(None)):
            value = repr(value)
        if isinstance(value, str):
            value = mask_urls(value)
            if len(value) > 200:
                value = value[:200] + "…"
        field = self.field
        if field is not None and len(field) > 200:  # an unknown key, as long as the user wrote it
            field = field[:200] + "…"
        return {
            "file": self.file,
            "line": self.line,
            "item": self.item,
            "field": field,
            "message": mask_urls(self.message),
            "value": value,
            "allowed": self.allowed,
            "severity": self.severity,
        }


#: Runs of ASCII digits: the numbers in a name or value, as everywhere a number is read.
_NUMBERS = re.compile(r"[0-9]+")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` plainly meant, or an empty string:
    an issue's hint, which the caller follows with the full list of what is allowed.

    Plainly meant: the same but for case or blanks (``NUM_FRAMES``, ``FAL-AI/WAN-22``,
    ``max usd``: :func:`squeezed`), or a near spelling with the same numbers in it
    (:func:`same_numbers`). A near spelling with other numbers is another thing, not a typo:
    ``fal-ai/wan-25`` is not "``fal-ai/wan-22``?", another model, nor ``guidance_scale_3``
    "``guidance_scale_2``?"."""
    choices = list(choices)
    folded = squeezed(word)
    for choice in choices:
        if squeezed(choice) == folded:
            return f" (did you mean {choice!r}?)"
    close = difflib.get_close_matches(word, same_numbers(word, choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def squeezed(text: str) -> str:
    """``text`` without its blanks, in lower case: what two spellings that differ only in case
    or blanks have in common (``720P`` and ``720 p`` are ``720p``)."""
    return "".join(text.split()).lower()


def same_numbers(word: str, choices: Iterable[str]) -> list[str]:
    """The ``choices`` with the same numbers as ``word``, in the same order (``wan/v2.6`` has
    2 and 6; ``wan-26`` has 26): the only ones a near spelling may suggest."""
    numbers = _NUMBERS.findall(word)
    return [choice for choice in choices if _NUMBERS.findall(choice) == numbers]


def errors_in(issues: Iterable[Issue]) -> int:
    """How many errors ``issues`` hold: each error once, and the note that stands for errors
    not shown (:attr:`Issue.hidden`) as the errors it stands for. Counting the listed lines
    said "100002 error(s)" of a file with 1,000,001 bad rows."""
    return sum(i.hidden or 1 for i in issues if i.severity == "error")


class ManifestError(UsageError):
    """The manifest cannot be used; ``issues`` lists every problem found in one pass."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues: list[Issue] = list(issues)
        #: Every error found, the ones a cap left unlisted too (:func:`errors_in`).
        self.error_total = errors_in(self.issues)
        errors = [i for i in self.issues if i.severity == "error"]
        head = f"{self.error_total} error(s) in manifest"
        super().__init__(head + ":\n" + "\n".join(f"  {i}" for i in errors))


class ItemsFileChanged(UsageError):
    """The ``items_from`` file a submit validated is not the one its storing pass read: rows
    appended, rewritten or the file replaced between the two reads (an export still writing it,
    a sync tool). Raised inside the storing transaction, so nothing of the batch is stored: the
    rows stored and sent must be those validated (:meth:`jobs.manifest.expand.Manifest.jobs`)."""


class UnpricedError(UsageError):
    """A job's input holds a value its endpoint's price table does not cover (a resolution no
    price is known for, a duration that is no number). Validation refuses such inputs first;
    this is the one clear line should one reach pricing all the same, never a ``ValueError``
    the command line reports as an internal error (exit 70)."""


class StateConflict(WanbatchError):
    """A fenced write expected the job at one version (or lease) and found it moved on."""


class RequestHeldError(WanbatchError):
    """A request id fal gave for ``job_id`` (a submit's answer, a webhook's proof, a journal's
    entry, a late answer) that job ``holder`` of the same fal queue already holds
    (``jobs.store.request_holder``): a provider protocol error, since fal gives each accepted
    POST a request of its own. Raised before anything is written; the request is never
    recorded on a second job, which would take the other job's video and cost."""

    def __init__(self, job_id: str, request_id: str, holder: str) -> None:
        super().__init__(
            f"fal's request {request_id} is job {holder}'s already: job {job_id} does not take it"
        )
        self.job_id = job_id
        self.request_id = request_id
        self.holder = holder


class ProviderError(WanbatchError):
    """Something went wrong talking to the provider. Subclasses tell the caller what to do next.

    ``status_code`` is the HTTP status when there was a response; ``error_type`` is fal's
    ``error_type`` (body or ``X-Fal-Error-Type``) when it gave one; ``detail`` is the provider's
    own error body (a string or FastAPI's list of field errors), kept for the job's record.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        detail: object = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.detail = detail
        self.request_id = request_id


class RetryableProviderError(ProviderError):
    """Transient: nothing was accepted (or it is safe to ask again); retry with backoff.

    ``retry_after`` is a hint in seconds when the provider gave one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class FinalProviderError(ProviderError):
    """Permanent for this input or account: retrying the same request cannot succeed."""


class AccountLockedError(FinalProviderError):
    """The provider refused the account itself (403 "User is locked", exhausted balance, bad key).

    Final for the request, but the batch should pause rather than fail every job.
    """


class AmbiguousSubmitError(ProviderError):
    """The submit POST may have reached the provider, but no answer came back.

    The request may have been accepted (and will be billed). Resending could pay twice, so the
    caller must record the ambiguity and decide by policy; the client never resends on its own.
    """
