"""Hostile or careless manifests (audit): each gets one clear located line, exit 2, nothing
stored, in bounded time and memory — never an internal error, a 500 KB line, a wrong count or a
wrong line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cli.output import refused_manifest_text
from falsim.validation import validate_input as sim_validate
from jobs.endpoints import get_endpoint
from jobs.errors import TOO_MUCH_INPUT, ManifestError
from jobs.manifest import report as report_module
from jobs.manifest import validate_manifest
from jobs.manifest.expand import MAX_INPUT_BYTES
from jobs.manifest.items_from import MAX_ITEMS_FROM_LINE
from jobs.manifest.report import ValidationReport
from jobs.store.creating import NewJob, _chunks

TOP = "name: x\nendpoint: fal-ai/wan-22\n"


def validated(folder: Path, text: str, name: str = "m.yaml") -> ValidationReport:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return validate_manifest(path)


# -- 1. explicit YAML tags ---------------------------------------------------------------------


@pytest.mark.parametrize("written", ["!!bool maybe", '!!bool "1"', "!!bool 2"])
def test_a_tag_its_value_cannot_take_is_a_located_error(tmp_path: Path, written: str) -> None:
    """``!!bool maybe`` was exit 70, "internal error: KeyError: 'maybe'"."""
    report = validated(tmp_path, f"{TOP}items:\n  - prompt: a\n    enable_safety_checker: {written}\n")
    (issue,) = report.errors
    assert issue.line == 5
    assert "items[0].enable_safety_checker" in issue.message
    assert "!!" in issue.message


def test_a_bool_tag_on_a_boolean_word_still_reads(tmp_path: Path) -> None:
    report = validated(tmp_path, f"{TOP}items:\n  - prompt: a\n    enable_safety_checker: !!bool yes\n")
    assert report.ok, [str(i) for i in report.issues]


def test_a_null_tag_that_would_drop_a_value_is_refused(tmp_path: Path) -> None:
    """``seed: !!null 5`` silently sent no seed (fal then draws one): the pinned seed was lost."""
    report = validated(tmp_path, f"{TOP}items:\n  - prompt: a\n    seed: !!null 5\n")
    (issue,) = report.errors
    assert issue.line == 5
    assert "!!null" in issue.message
    assert "'5'" in issue.message
    assert validated(tmp_path, f"{TOP}items:\n  - prompt: a\n    seed: !!null ~\n").ok


# -- 2. the input all jobs store ---------------------------------------------------------------


def test_a_huge_prompt_swept_over_many_seeds_is_refused_before_expanding(tmp_path: Path) -> None:
    """1 MiB × 10,000 seeds: submit held 5 GB and wrote a 10.5 GB database, exit 0."""
    seeds = ", ".join(str(s) for s in range(3000))
    text = f"{TOP}matrix:\n  seed: [{seeds}]\nitems:\n  - prompt: {'p' * 1_000_000}\n"
    report = validated(tmp_path, text)
    (issue,) = report.errors
    assert issue.code == TOO_MUCH_INPUT
    assert issue.line == 3
    assert issue.field == "matrix"
    assert "3,000 jobs would store 3.0 GB of input" in issue.message
    assert "2.0 GB" in str(issue.allowed)
    assert report.job_count == 0  # nothing expanded, nothing hashed
    assert MAX_INPUT_BYTES == 2 * 10**9


def test_items_from_rows_past_the_input_limit_are_refused_at_their_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobs.manifest.expand.MAX_INPUT_BYTES", 50_000)
    monkeypatch.setattr(report_module, "MAX_INPUT_BYTES", 50_000)
    rows = "".join(json.dumps({"prompt": f"{i} " + "w" * 2_000}) + "\n" for i in range(10))
    (tmp_path / "rows.jsonl").write_text(rows, encoding="utf-8")
    text = f"{TOP}matrix:\n  seed: [1, 2, 3, 4, 5]\nitems_from: rows.jsonl\n"
    report = validated(tmp_path, text)
    (issue,) = report.errors
    assert issue.code == TOO_MUCH_INPUT
    assert (issue.file.endswith("rows.jsonl"), issue.line) == (True, 5)  # 5 rows × 5 seeds × 2 kB


def test_the_input_limit_counts_text_in_utf8_bytes_not_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt of Chinese characters is 3 bytes each (stored as 6 by SQLite's JSON): counted by
    characters, 1,000,000 of them × 1,500 seeds (4.5 GB) passed as 1.5 GB. The same counting an
    ``items_from`` row's line gets (its bytes)."""
    monkeypatch.setattr("jobs.manifest.expand.MAX_INPUT_BYTES", 50_000)
    monkeypatch.setattr(report_module, "MAX_INPUT_BYTES", 50_000)
    prompt = "中" * 10_000  # 10,000 characters, 30,000 bytes
    text = f"{TOP}matrix:\n  seed: [1, 2]\nitems:\n  - prompt: {prompt}\n"
    report = validated(tmp_path, text)
    (issue,) = report.errors
    assert issue.code == TOO_MUCH_INPUT
    assert "2 jobs would store 60 kB of input" in issue.message
    # An alias repeats one string: counted as often as it is stored, each as its bytes.
    aliased = (
        f"{TOP}defaults:\n  prompt: &p {prompt}\nmatrix:\n  negative_prompt: [*p, *p]\nitems:\n  - seed: 1\n"
    )
    (issue,) = validated(tmp_path, aliased).errors
    assert issue.code == TOO_MUCH_INPUT
    assert "2 jobs would store 120 kB of input" in issue.message


def test_add_jobs_chunks_hold_a_bounded_amount_of_input() -> None:
    """5,000 jobs at a time, whatever their size: 5 GB in memory at once for 1 MiB prompts."""
    prompt = "p" * (30 * 1024 * 1024)
    jobs = [NewJob(str(i), i, "fal-ai/wan-22", {"prompt": prompt}, 0, 0) for i in range(7)]  # type: ignore[arg-type]
    blocks = list(_chunks(jobs, 5000))
    assert [len(block) for block in blocks] == [3, 3, 1]
    assert [job for block in blocks for job in block] == jobs
    assert [len(block) for block in _chunks(jobs, 2)] == [2, 2, 2, 1]


# -- 3. CSV records ----------------------------------------------------------------------------


def _csv_manifest(folder: Path, body: str) -> ValidationReport:
    (folder / "rows.csv").write_text(body, encoding="utf-8")
    return validated(folder, f"{TOP}items_from: rows.csv\n")


def test_a_csv_row_longer_than_a_jsonl_line_is_refused_at_its_line(tmp_path: Path) -> None:
    """A 100 MB line took 30 s and 540 MB; JSONL lines were capped at 1 MiB already."""
    report = _csv_manifest(tmp_path, "prompt,seed\nhello,1\n" + "x," * MAX_ITEMS_FROM_LINE + "\nbye,2\n")
    (issue,) = report.errors
    assert (issue.file.endswith("rows.csv"), issue.line, issue.item) == (True, 3, 1)
    assert f"longer than {MAX_ITEMS_FROM_LINE:,} bytes" in issue.message


def test_a_csv_of_nothing_but_commas_is_too_long_not_empty(tmp_path: Path) -> None:
    """300 MB of commas said "the manifest has no items", after 84 s and 2.7 GB."""
    report = _csv_manifest(tmp_path, "," * (2 * MAX_ITEMS_FROM_LINE) + "\n")
    (issue,) = report.errors
    assert issue.line == 1
    assert issue.item is None
    assert "longer than" in issue.message


def test_a_csv_record_of_many_quoted_lines_is_bounded_too(tmp_path: Path) -> None:
    cell = '"' + ("y" * 999 + "\n") * 100 + '"'  # 100 kB: under the csv module's field limit
    report = _csv_manifest(tmp_path, "prompt,negative_prompt\n" + ",".join([cell] * 2) + "\n")
    assert report.ok, [str(i) for i in report.issues]
    wide = ",".join(["prompt"] + [f"c{i}" for i in range(11)])
    report = _csv_manifest(tmp_path, wide + "\n" + ",".join([cell] * 12) + "\n")
    assert any(
        f"longer than {MAX_ITEMS_FROM_LINE:,} bytes" in i.message and i.line == 2 for i in report.errors
    )


def test_blank_lines_before_the_csv_header_are_skipped_and_the_header_line_named(tmp_path: Path) -> None:
    """The header on line 3 was read as an empty header at line 1: "column 'prompt' is
    required" at line 1, then "2 cells but only 0 header names" on every row."""
    assert _csv_manifest(tmp_path, "\n\nprompt,seed\nhello,1\nbye,2\n").job_count == 2
    report = _csv_manifest(tmp_path, "\n \npromt,seed\nhello,1\n")
    assert [(i.line, i.field) for i in report.errors] == [(3, "promt"), (3, "prompt")]


# -- 4. long keys and values are cut ----------------------------------------------------------


def test_long_unknown_keys_and_endpoints_are_quoted_cut(tmp_path: Path) -> None:
    """A 500,000-character endpoint made a 500 KB error line."""
    text = (
        f"name: x\nendpoint: {'e' * 500_000}\n{'k' * 1000}: 1\n"
        f"budget: {{max_usd: 5, {'b' * 1000}: 1}}\nschedule: {{{'s' * 1000}: 1}}\n"
        f"items:\n  - {{prompt: a, endpoint: {'q' * 100_000}}}\n"
    )
    report = validated(tmp_path, text)
    assert len(report.errors) == 5
    for issue in report.errors:
        assert len(str(issue)) < 600, str(issue)[:200]
        assert "characters)" in str(issue)
        assert len(json.dumps(issue.as_dict())) < 1500


def test_a_long_unknown_field_of_an_item_is_quoted_cut(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "a", "f" * 5000: 2}) + "\n", encoding="utf-8")
    (tmp_path / "rows.csv").write_text(f"prompt,{'c' * 5000}\na,1\n", encoding="utf-8")
    for rows in ("rows.jsonl", "rows.csv"):
        (issue,) = validated(tmp_path, f"{TOP}items_from: {rows}\n").errors
        assert len(str(issue)) < 1000
        assert "(5,000 characters)" in issue.message


# -- 5. messages -------------------------------------------------------------------------------


def test_the_error_count_is_the_real_total_past_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000,000 bad rows said "… (1,000,001 in all)", then "✗ 100002 error(s)"."""
    monkeypatch.setattr(report_module, "MAX_ERRORS", 10)
    (tmp_path / "rows.jsonl").write_text("[]\n" * 25, encoding="utf-8")
    report = validated(tmp_path, f"{TOP}items_from: rows.jsonl\n")
    assert "(25 in all)" in report.errors[-1].message
    refused = ManifestError(report.issues)
    assert refused_manifest_text(refused) == "25 error(s); nothing was submitted."
    assert str(refused).startswith("25 error(s) in manifest")


def test_a_deadline_of_the_wrong_kind_is_named_as_written(tmp_path: Path) -> None:
    """ "got LList [1]": the loader's own class name."""
    report = validated(tmp_path, f"{TOP}schedule: {{deadline: [1]}}\nitems:\n  - prompt: a\n")
    (issue,) = report.errors
    assert "got a list" in issue.message
    assert "LList" not in issue.message


# -- 6. media that cannot work -----------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 400), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("written", ["./landscape.png/", "landscape.png/."])
def test_a_file_written_as_a_folder_is_refused_as_the_system_would(tmp_path: Path, written: str) -> None:
    """``open("landscape.png/")`` is "Not a directory"; validation read the file all the same."""
    (tmp_path / "landscape.png").write_bytes(_png())
    good = "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: a, image_url: landscape.png}\n"
    assert validated(tmp_path, good).ok
    report = validated(tmp_path, good.replace("image_url: landscape.png", f'image_url: "{written}"'))
    (issue,) = report.errors
    assert (issue.line, issue.field) == (4, "image_url")
    assert "not a directory" in issue.message


def test_urls_fal_cannot_reach_are_warned_once_each(tmp_path: Path) -> None:
    urls = [
        "http://169.254.169.254/latest/a.png",
        "http://localhost:8080/a.png",
        "http://10.0.0.7/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/a.png",  # again: not warned again
    ]
    items = "".join(
        f"  - {{prompt: a, image_url: '{url}'}}\n" for url in [*urls, "https://example.com/a.png"]
    )
    report = validated(tmp_path, f"name: x\nendpoint: fal-ai/wan-i2v\nitems:\n{items}")
    assert report.ok
    assert [(i.line, i.value) for i in report.warnings if i.field == "image_url"] == [
        (4, urls[0]),
        (5, urls[1]),
        (6, urls[2]),
        (7, urls[3]),
    ]
    assert "link-local" in report.warnings[0].message


def test_the_simulator_cannot_download_from_private_hosts_either() -> None:
    spec = get_endpoint("fal-ai/wan-i2v")
    payload = {"prompt": "a", "image_url": "http://169.254.169.254/latest/a.png"}
    resolved, errors = sim_validate(spec, payload, local_file_exists=lambda _url: None)
    assert resolved is None
    (error,) = errors
    assert error["type"] == "file_download_error"
    own = {"prompt": "a", "image_url": "https://example.com/a.png"}
    assert sim_validate(spec, own, local_file_exists=lambda _url: None)[0] is not None
    uploaded = {"prompt": "a", "image_url": "http://127.0.0.1:9/files/k/a.png"}  # the simulator's own
    assert sim_validate(spec, uploaded, local_file_exists=lambda _url: True)[0] is not None
