"""Which input URLs a 422 of fal's says it could not download: read from the error's structure
(``loc`` names the field, ``type`` is ``file_download_error``: https://docs.fal.ai/errors), not
from its words, which need not quote the URL."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from jobs.errors import FinalProviderError, RetryableProviderError
from jobs.models import Job
from worker.steps.failures import unreachable_inputs

I2V = "fal-ai/wan-i2v"
FLF = "fal-ai/wan-flf2v"


def _job(endpoint: str, stored: dict[str, Any], sent: dict[str, Any]) -> Job:
    return cast(Job, SimpleNamespace(endpoint=endpoint, input=stored, submitted_input=sent))


def _item(loc: list[Any], msg: str, type_: str = "file_download_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type_, "url": f"https://docs.fal.ai/errors/#{type_}"}


def test_the_field_fal_names_is_the_url_it_could_not_download_whatever_its_words() -> None:
    job = _job(
        FLF,
        {"prompt": "a", "start_image_url": "https://example.com/a.png", "end_image_url": "/m/b.png"},
        {
            "prompt": "a",
            "start_image_url": "https://example.com/a.png",
            "end_image_url": "https://v3.fal.media/files/x/b.png",
        },
    )
    exc = FinalProviderError("422", status_code=422, detail=[_item(["body", "end_image_url"], "Not found")])
    (found,) = unreachable_inputs(job, exc)
    assert (found.field, found.url, found.upload) == (
        "end_image_url",
        "https://v3.fal.media/files/x/b.png",
        True,
    )

    user = FinalProviderError("422", status_code=422, detail=[_item(["body", "start_image_url"], "gone")])
    (found,) = unreachable_inputs(job, user)
    assert (found.field, found.url, found.upload) == ("start_image_url", "https://example.com/a.png", False)


def test_another_error_of_the_field_is_not_a_download_failure() -> None:
    job = _job(I2V, {"image_url": "https://example.com/a.png"}, {"image_url": "https://example.com/a.png"})
    typed = _item(["body", "image_url"], "Failed to download the file? no: too large", "image_too_large")
    assert unreachable_inputs(job, FinalProviderError("422", status_code=422, detail=[typed])) == []
    # Not a 422: fal's words alone do not make it one.
    other = FinalProviderError("500", status_code=500, detail=[_item(["body", "image_url"], "x")])
    assert unreachable_inputs(job, other) == []
    # A data URI fal could not decode is no URL to stop.
    inline = _job(I2V, {"image_url": "data:image/png;base64,xx"}, {"image_url": "data:image/png;base64,xx"})
    bad = FinalProviderError("422", status_code=422, detail=[_item(["body", "image_url"], "bad base64")])
    assert unreachable_inputs(inline, bad) == []


def test_an_item_without_fals_structure_is_read_by_its_words() -> None:
    """fal's error page warns that some APIs do not follow the structure yet: a bare detail
    string quoting the URL is still taken."""
    url = "https://example.com/a.png"
    job = _job(I2V, {"image_url": url}, {"image_url": url})
    exc = FinalProviderError(
        "422", status_code=422, detail=f"Failed to download the file from {url}: 404 Not Found"
    )
    (found,) = unreachable_inputs(job, exc)
    assert (found.field, found.url) == ("image_url", url)
    assert (
        unreachable_inputs(job, RetryableProviderError("x", status_code=422, detail="something else")) == []
    )
