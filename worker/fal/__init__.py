"""fal's queue API over httpx: submit, status, result, cancel; uploads and safe downloads.

Knows nothing of the database. Every failure is one of the provider errors of
:mod:`jobs.errors` (the specific subclasses are in :mod:`worker.fal.errors`).
"""

from worker.fal.client import FalClient
from worker.fal.errors import (
    DownloadIntegrityError,
    ProviderProtocolError,
    RequestCancelledError,
    RequestFailedError,
    ResultExpiredError,
    ResultNotReadyError,
    StartTimeoutError,
    SubmitNotSentError,
)
from worker.fal.http import FalKeyAuth, RetryPolicy
from worker.fal.models import CancelOutcome, DownloadResult, RequestHandle, Status, Submitted
from worker.fal.redact import KeyRedactionFilter, install_redaction, redact_text, uninstall_redaction
from worker.fal.storage import FalStorage, MediaPreparer, download, prepare_input, to_data_uri

__all__ = [
    "CancelOutcome",
    "DownloadIntegrityError",
    "DownloadResult",
    "FalClient",
    "FalKeyAuth",
    "FalStorage",
    "KeyRedactionFilter",
    "MediaPreparer",
    "ProviderProtocolError",
    "RequestCancelledError",
    "RequestFailedError",
    "RequestHandle",
    "ResultExpiredError",
    "ResultNotReadyError",
    "RetryPolicy",
    "StartTimeoutError",
    "Status",
    "SubmitNotSentError",
    "Submitted",
    "download",
    "install_redaction",
    "prepare_input",
    "redact_text",
    "to_data_uri",
    "uninstall_redaction",
]
