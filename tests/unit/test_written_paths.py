"""A problem with a local file names it as the manifest wrote it, in text and under ``--json``.

Audit: a missing ``images/gone\\nx\\u2028.jpg`` was ``file not found: /tmp/…/m1/images/gone…``
(README promises ``file not found: images/x\\ny.jpg``); under ``validate --json`` an issue's
``value`` was the absolute resolved path for a folder or a bad file (``/tmp/…/images/text.png``
where ``images/text.png/`` was written), but the value as written for a symlink out of the
folder; and an ``input_file`` error at run time (stored, shown, exported) held the absolute path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.endpoints import FieldType
from jobs.errors import UsageError
from jobs.manifest import validate_manifest
from jobs.media import check_file
from tests.in_process import run_main
from tests.unit.test_validation import IMAGE_LIMITS
from worker.fal.storage import MediaPreparer, prepare_input

EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "night.jpg"
HEAD = "name: t-written\nendpoint: fal-ai/wan-i2v\nitems:\n"


def _issues(tmp_path: Path, items: str) -> list[tuple[str, object]]:
    path = tmp_path / "m.yaml"
    path.write_text(HEAD + items, encoding="utf-8")
    report = validate_manifest(path)
    return [(issue.message, issue.value) for issue in report.errors]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "text.png").mkdir()  # a folder with an image's name
    (images / "bad.png").write_text("not an image")
    return tmp_path


def test_a_missing_file_is_named_as_written_escaped(folder: Path) -> None:
    [(message, value)] = _issues(folder, '  - {prompt: a, image_url: "images/gone\\nx\\u2028.jpg"}\n')
    assert message == "file not found: images/gone\\nx\\u2028.jpg"  # escaped, on one line
    assert value == "images/gone\nx\u2028.jpg"  # the data, as written
    assert str(folder) not in message


def test_a_folder_and_a_bad_file_are_named_as_written(folder: Path) -> None:
    issues = _issues(
        folder,
        "  - {prompt: a, image_url: images/text.png/}\n"
        "  - {prompt: b, image_url: images/bad.png}\n"
        "  - {prompt: c, image_url: ./images/../images/none.jpg}\n",
    )
    assert issues == [
        ("not a regular file: images/text.png/", "images/text.png/"),
        ("not a readable image", "images/bad.png"),
        ("file not found: ./images/../images/none.jpg", "./images/../images/none.jpg"),
    ]


def test_two_spellings_of_one_file_are_each_named_as_written(folder: Path) -> None:
    """The pass's media cache holds one verdict per spelling, not one per resolved file."""
    issues = _issues(
        folder,
        "  - {prompt: a, image_url: images/none.jpg}\n"
        "  - {prompt: b, image_url: ./images/none.jpg}\n"
        "  - {prompt: c, image_url: images/none.jpg, seed: 2}\n",
    )
    assert [message for message, _ in issues] == [
        "file not found: images/none.jpg",
        "file not found: ./images/none.jpg",
        "file not found: images/none.jpg",
    ]


def test_a_data_file_row_is_named_as_its_row_wrote_it(folder: Path) -> None:
    (folder / "data").mkdir()
    (folder / "data" / "rows.jsonl").write_text('{"prompt": "a", "image_url": "pics/none.jpg"}\n')
    path = folder / "m.yaml"
    path.write_text("name: t-written\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.jsonl\n")
    [issue] = validate_manifest(path).errors
    assert issue.file.endswith("data/rows.jsonl")  # where it was written, relative to that
    assert (issue.message, issue.value) == ("file not found: pics/none.jpg", "pics/none.jpg")


def test_a_missing_items_from_file_is_named_as_written(folder: Path) -> None:
    path = folder / "m.yaml"
    path.write_text('name: t-written\nendpoint: fal-ai/wan-i2v\nitems_from: "./data/../rows\\n.jsonl"\n')
    [issue] = validate_manifest(path).errors
    assert issue.message == "items_from file not found: ./data/../rows\\n.jsonl"
    (folder / "rows.jsonl").mkdir()
    path.write_text("name: t-written\nendpoint: fal-ai/wan-i2v\nitems_from: rows.jsonl\n")
    [issue] = validate_manifest(path).errors
    assert issue.message == "items_from is not a regular file: rows.jsonl"


def test_text_and_json_agree(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(folder)
    (folder / "m.yaml").write_text(HEAD + "  - {prompt: a, image_url: images/text.png/}\n")
    assert run_main(["validate", "m.yaml"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "field 'image_url': not a regular file: images/text.png/ (allowed: " in err
    assert run_main(["validate", "--json", "m.yaml"], monkeypatch) == 2
    [issue] = json.loads(capsys.readouterr().out)["issues"]
    assert (issue["message"], issue["value"]) == ("not a regular file: images/text.png/", "images/text.png/")


def test_check_file_names_the_file_as_shown(tmp_path: Path) -> None:
    """As the caller shows it (the value as written), never the path it stats."""
    assert check_file(tmp_path / "none.png", FieldType.IMAGE, IMAGE_LIMITS, shown="none.png")[0].message == (
        "file not found: none.png"
    )
    assert (
        check_file(tmp_path, FieldType.IMAGE, IMAGE_LIMITS, shown="./")[0].message == "not a regular file: ./"
    )


# ------------------------------------------------------------------------------- at run time


def _preparer() -> MediaPreparer:
    return MediaPreparer(uploader=lambda data, mime, name: "https://x/y", inline_max_bytes=1 << 20)


def test_a_run_time_refusal_names_the_file_relative_to_the_manifest_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    night = images / "night.jpg"
    shutil.copy(EXAMPLE_IMAGE, night)
    gone = str(images / "gone\nx.jpg")
    with pytest.raises(UsageError) as missing:
        prepare_input({"image_url": gone}, ["image_url"], preparer=_preparer(), folder=tmp_path)
    assert str(missing.value) == "media file 'images/gone\\nx.jpg' does not exist"
    with pytest.raises(UsageError) as changed:
        prepare_input(
            {"image_url": str(night)},
            ["image_url"],
            preparer=_preparer(),
            source_files={"image_url": {"source": "images/night.jpg", "sha256": "0" * 64}},
            folder=tmp_path,
        )
    assert str(changed.value).startswith(
        "media file 'images/night.jpg' changed since the manifest was validated"
    )
    with pytest.raises(UsageError) as folder_now:
        prepare_input({"image_url": str(images)}, ["image_url"], preparer=_preparer(), folder=tmp_path)
    assert str(folder_now.value) == "media file 'images' is not a regular file"


def test_a_run_time_refusal_outside_the_manifest_folder_is_absolute(tmp_path: Path) -> None:
    """An --allow-dir file, or a job whose manifest folder is not known: the stored path."""
    (tmp_path / "m").mkdir()
    gone = str(tmp_path / "elsewhere" / "a.jpg")
    for folder in (tmp_path / "m", None):
        with pytest.raises(UsageError) as missing:
            prepare_input({"image_url": gone}, ["image_url"], preparer=_preparer(), folder=folder)
        assert str(missing.value) == f"media file '{gone}' does not exist"


def test_a_run_time_refusal_in_a_folder_no_longer_there_is_absolute(tmp_path: Path) -> None:
    """The project was moved and its batch run by name: ``images/a.jpg`` would name the file
    the user sees in the new folder, which exists; the stored path is what is missing."""
    gone = str(tmp_path / "proj" / "images" / "a.jpg")
    with pytest.raises(UsageError) as missing:
        prepare_input({"image_url": gone}, ["image_url"], preparer=_preparer(), folder=tmp_path / "proj")
    assert str(missing.value) == f"media file '{gone}' does not exist"
