"""fal's result of a Wan request, checked: what a download needs of it, and what a job keeps of
a result it already holds (a webhook carries fal's result in its ``payload``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.fal.errors import ProviderProtocolError


@dataclass(frozen=True)
class Video:
    """The parts of fal's result the download needs, checked (see :func:`parse_result`)."""

    url: str
    file_size: int | None
    seed: int | None
    actual_prompt: str | None


def parse_result(output: object) -> Video:
    """The video reference of a Wan result, or :class:`ProviderProtocolError` naming what is wrong.

    fal's Wan endpoints answer ``{"video": {"url", "content_type", "file_name", "file_size"},
    "seed": int, "actual_prompt"?: str}`` (https://fal.ai/models/fal-ai/wan-i2v/api). Anything
    else is refused here, before it is stored (a JSON object in the text column ``actual_prompt``
    would fail every later write of the job).
    """
    if not isinstance(output, dict):
        raise ProviderProtocolError("fal result: the body is not a JSON object")
    video = output.get("video")
    if not isinstance(video, dict):
        got = "missing" if video is None else f"a {type(video).__name__}"
        raise ProviderProtocolError(f"fal result: 'video' is {got}, not an object")
    url = video.get("url")
    if not isinstance(url, str) or not url:
        raise ProviderProtocolError("fal result: the video has no URL")
    prompt = output.get("actual_prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ProviderProtocolError(f"fal result: 'actual_prompt' is a {type(prompt).__name__}, not text")
    size, seed = video.get("file_size"), output.get("seed")
    return Video(
        url=url,
        file_size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        seed=seed if _is_seed(seed) else None,
        actual_prompt=prompt,
    )


#: The seeds a job can carry: what validation admits (``jobs/endpoints/*.yaml``) and the exports'
#: uint64 column holds. A result's seed outside it is no seed fal draws; kept, it would break the
#: Parquet export and be sent again by ``rerun``, so it is recorded as unknown.
SEED_RANGE = range(2**64)


def _is_seed(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in SEED_RANGE


def fetched_fields(payload: object) -> dict[str, Any]:
    """What fal's result (a success webhook's ``payload``, the result the result call would
    answer) gives a job's download: ``provider_output``, ``seed``, ``actual_prompt``, so the
    video is fetched even once fal no longer keeps the result (an hour; a webhook is retried for
    two); nothing when it is not a Wan result (the download then asks fal for it)."""
    try:
        video = parse_result(payload)
    except ProviderProtocolError:
        return {}
    return {"provider_output": payload, "seed": video.seed, "actual_prompt": video.actual_prompt}
