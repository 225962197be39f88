"""The one exception root of wanbatch, and the domain's branches of it.

Every error wanbatch raises on purpose derives from :class:`WanbatchError`, so the CLI can
catch that one class, print its message and exit with its ``exit_code`` — a traceback is
never the answer to bad input. Third-party errors are translated once, at the edge
(``raise … from exc``).

The tree::

    WanbatchError                    exit 1 unless a branch says otherwise
    ├── UsageError                   exit 2: bad option, unknown batch, bad configuration
    │   ├── ConfigError              a WANBATCH_* setting (or FAL_KEY) is missing or malformed
    │   └── NotFoundError            a batch or job id that does not exist
    ├── ManifestError                exit 2: the manifest is invalid; carries every located issue
    ├── StateConflict                a compare-and-set transition lost a race (someone else moved the job)
    ├── BudgetExceeded               a submit would cross a budget cap
    └── ProviderError                anything the provider (fal) said or did not say; see worker.fal.errors
        ├── RetryableProviderError   transient: try again later (429, gateway 5xx, connect errors)
        ├── FinalProviderError       permanent: do not try again (422, 401/403, non-retryable model errors)
        └── AmbiguousSubmitError     the submit POST may have been accepted: never resend blindly

The provider branches live here (not in ``worker``) because the domain's state machine decides
what each of them means for a job, while only ``worker.fal`` raises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class WanbatchError(Exception):
    """Root of every error wanbatch raises deliberately."""

    exit_code: int = 1


class UsageError(WanbatchError):
    """The user asked for something that cannot be done as asked (CLI exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A setting is missing or malformed; the message names the variable, never its secret value."""


class NotFoundError(UsageError):
    """A batch or job the user named does not exist."""


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

    def location(self) -> str:
        """``file:line`` followed by the item and field, as an editor or a person wants it."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.item is not None:
            parts.append(f"item {self.item}")
        if self.field:
            parts.append(f"field {self.field!r}")
        return ": ".join(parts)

    def __str__(self) -> str:
        text = f"{self.location()}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text

    def as_dict(self) -> dict[str, object]:
        """The JSON form used by ``validate --json``."""
        value = self.value
        if not isinstance(value, str | int | float | bool | type(None)):
            value = repr(value)
        elif isinstance(value, str) and len(value) > 200:
            value = value[:200] + "…"
        return {
            "file": self.file,
            "line": self.line,
            "item": self.item,
            "field": self.field,
            "message": self.message,
            "value": value,
            "allowed": self.allowed,
            "severity": self.severity,
        }


class ManifestError(UsageError):
    """The manifest cannot be used; ``issues`` lists every problem found in one pass."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues: list[Issue] = list(issues)
        errors = [i for i in self.issues if i.severity == "error"]
        head = f"{len(errors)} error(s) in manifest"
        super().__init__(head + ":\n" + "\n".join(f"  {i}" for i in errors))


class StateConflict(WanbatchError):
    """A transition expected the job in one state (or version) and found it moved on."""


class BudgetExceeded(WanbatchError):
    """Submitting would spend more than a budget cap allows."""


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
