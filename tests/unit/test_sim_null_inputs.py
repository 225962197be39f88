"""An explicit ``null`` and an empty data URI, as fal answers them and as wanbatch validates them.

fal's apps declare their input as pydantic models. A field fal documents with a default
("Default value: "1080p"") is declared with that type and default (``resolution:
Literal["720p", "1080p"] = "1080p"``), so ``"resolution": null`` is a 422; a field documented
without one ("seed: Random seed … If None, a random seed is chosen") is ``Optional[int] = None``,
so ``"seed": null`` is the same as leaving it out. The simulator made every optional field
nullable: it took ``"resolution": null`` (and then rendered 720p where fal's default is 1080p).

wanbatch itself never sends a null: in a manifest ``null`` removes a field (README, "How a job's
input is resolved"), and any other null is refused before anything is sent. A data URI with no
media type or no payload is refused by both, the simulator's answer a 422 item in fal's error
format (``loc``, ``msg``, ``type``, ``url``).
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from falsim.validation import validate_input as sim_validate
from jobs.endpoints import FieldType, get_endpoint
from jobs.settings import get_settings
from jobs.validation import check_value
from tests.in_process import run_main

W26 = "wan/v2.6/image-to-video"
W25 = "fal-ai/wan-25-preview/image-to-video"
I2V = "fal-ai/wan-i2v"
URL = "https://example.com/car.png"


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (10, 20, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(autouse=True)
def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _fal_item(item: dict[str, Any]) -> None:
    """One 422 item as fal's error page (https://docs.fal.ai/errors) requires it."""
    assert {"loc", "msg", "type", "url"} <= item.keys(), item
    assert item["loc"][0] == "body", item
    assert isinstance(item["msg"], str), item
    assert item["msg"], item
    assert item["url"].startswith("https://"), item


@pytest.mark.parametrize(
    ("endpoint", "field", "type_"),
    [
        (W26, "resolution", "literal_error"),  # Default value: "1080p"
        (W26, "duration", "literal_error"),  # Default value: "5"
        (W26, "enable_safety_checker", "bool_type"),  # Default value: true
        (W26, "negative_prompt", "string_type"),  # Default value: ""
        (W25, "enable_prompt_expansion", "bool_type"),
        (I2V, "num_frames", "int_type"),  # Default value: 81
        (I2V, "guide_scale", "float_type"),
    ],
)
def test_the_simulator_refuses_null_for_a_field_with_a_published_default(
    endpoint: str, field: str, type_: str
) -> None:
    resolved, errors = sim_validate(get_endpoint(endpoint), {"prompt": "a", "image_url": URL, field: None})
    assert resolved is None
    (item,) = errors
    _fal_item(item)
    assert item["loc"] == ["body", field]
    assert item["type"] == type_
    assert item["input"] is None


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [(W26, "seed"), (W26, "multi_shots"), (W26, "audio_url"), (W25, "negative_prompt"), (I2V, "seed")],
)
def test_the_simulator_takes_null_as_not_given_for_a_field_without_a_default(
    endpoint: str, field: str
) -> None:
    spec = get_endpoint(endpoint)
    resolved, errors = sim_validate(spec, {"prompt": "a", "image_url": URL, field: None})
    assert errors == []
    assert resolved is not None
    left_out, _ = sim_validate(spec, {"prompt": "a", "image_url": URL})
    assert resolved == left_out


@pytest.mark.parametrize(
    "value",
    ["data:;base64,", "data:image/png;base64,", "data:image/;base64,AAAA", "data:;base64,@@"],
    ids=["no-type-no-payload", "no-payload", "half-a-type", "bad-base64"],
)
def test_an_empty_or_broken_data_uri_is_refused_by_both(value: str) -> None:
    spec = get_endpoint(W26)
    resolved, errors = sim_validate(spec, {"prompt": "a", "image_url": value})
    assert resolved is None
    (item,) = errors
    _fal_item(item)
    assert item["loc"] == ["body", "image_url"]
    (problem,) = check_value(spec.fields_by_name["image_url"], value)  # wanbatch's own check
    assert problem.severity == "error"


def test_wanbatch_refuses_a_data_uri_without_a_media_type_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: m\nendpoint: wan/v2.6/image-to-video\nitems:\n"
        '  - prompt: a\n    image_url: "data:;base64,"\n'
        f'  - prompt: b\n    image_url: "data:;base64,{_png_b64()}"\n'
    )
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2, command
        err = capsys.readouterr().err
        assert (
            f"{manifest}:5: item 0: field 'image_url': a data URI of type 'unknown' where image/* is needed"
        ) in err, err
        assert f"{manifest}:7: item 1: field 'image_url': a data URI of type 'unknown'" in err, err
        assert "Traceback" not in err


def test_a_null_in_a_manifest_is_never_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``resolution: null`` removes the field (fal then applies its default, 1080p), so what is
    stored to be sent never holds a null fal would refuse."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: m\nendpoint: wan/v2.6/image-to-video\nitems:\n"
        f"  - prompt: a\n    image_url: {URL}\n    resolution: null\n    seed: null\n"
    )
    assert run_main(["submit", str(manifest)], monkeypatch) == 0
    with sqlite3.connect(tmp_path / "w.db") as conn:
        (stored,) = [json.loads(row[0]) for row in conn.execute("SELECT input FROM jobs")]
    assert None not in stored.values(), stored
    assert "resolution" not in stored
    assert "seed" not in stored
    resolved, errors = sim_validate(get_endpoint(W26), stored)
    assert errors == []
    assert resolved is not None
    assert resolved["resolution"] == "1080p"


def test_wanbatch_refuses_a_null_it_is_handed_directly() -> None:
    fld = get_endpoint(W26).fields_by_name["resolution"]
    (problem,) = check_value(fld, None)
    assert problem.message == "must not be null"
    assert fld.type is FieldType.STRING
