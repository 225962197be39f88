"""A path this session cannot record, or cannot open, is one line and exit 2 — never an internal
error, and never after a video was paid for (audit: a file-system encoding that is not UTF-8).

``LC_ALL=C`` with Python's UTF-8 mode off names files in ASCII (bytes beyond it held as lone
surrogates, which no database stores); a latin-1 locale names ``Crème`` in other bytes than a
UTF-8 session does. The rule (:func:`jobs.fs.name_problem`): what wanbatch records or reads back
must be a name whose bytes on disk are its UTF-8, so every session finds the same folder. The
encodings are decided when the interpreter starts, so each command runs in a subprocess with the
environment a user would have.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from jobs.fs import name_problem, shown_bytes

WANBATCH = str(Path(sys.executable).with_name("wanbatch"))
IMAGE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"
#: A C locale with Python's UTF-8 mode and locale coercion off: file names are ASCII only.
C_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
#: Nothing listens there: a command that got as far as sending would fail otherwise.
NO_FAL = "http://127.0.0.1:9"
ADVICE = "run wanbatch under a UTF-8 locale (LANG=C.UTF-8) or with PYTHONUTF8=1"

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
items:
  - prompt: A calm mountain landscape
    image_url: {image}
    seed: 42
"""


def _env(work: Path, extra: Mapping[str, str | bytes]) -> dict[str, str | bytes]:
    env: dict[str, str | bytes] = {
        k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING", "PYTHONUTF8"))
    }
    env.update(
        FAL_KEY="k-file-name-test",
        WANBATCH_DATABASE_URL=f"sqlite:///{work / 'db.sqlite'}",
        WANBATCH_OUTPUT_DIR=str(work / "outputs"),
        WANBATCH_FAL_QUEUE_URL=NO_FAL,
        WANBATCH_FAL_REST_URL=NO_FAL,
        LANG="C.UTF-8",
    )
    env.update(extra)
    return env


def _wb(work: Path, *args: str, **extra: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return _wb_in(work, work, *args, **extra)


def _wb_in(cwd: Path, work: Path, *args: str, **extra: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """``wanbatch ARGS`` run from ``cwd``, its database and outputs in ``work``."""
    return subprocess.run(
        [WANBATCH, *args],
        capture_output=True,
        timeout=180,
        check=False,
        cwd=cwd,
        env=_env(work, extra),  # bytes values: a name that is no UTF-8
    )


def _manifest(folder: Path, name: str, image: str = "a.jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(IMAGE, folder / image)
    path = folder / "m.yaml"
    path.write_text(MANIFEST.format(name=name, image=image), encoding="utf-8")
    return path


def _one_error(done: subprocess.CompletedProcess[bytes]) -> str:
    """The command's one ``error:`` line (exit 2, no internal error, no traceback)."""
    err = done.stderr.decode("ascii", "replace")
    assert "internal error" not in err, err
    assert "Traceback" not in err, err
    assert done.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _utf8_session() -> None:
    if sys.getfilesystemencoding().lower().replace("-", "") != "utf8":
        pytest.skip("the test process itself must name files in UTF-8")


# ------------------------------------------------------------------ the rule itself


def test_the_rule_in_a_utf8_session() -> None:
    _utf8_session()
    assert name_problem("/srv/outputs/Crème-brûlée") is None  # text: recorded and found again
    assert name_problem("/srv/plain") is None
    problem = name_problem(os.fsdecode(b"/srv/bad\xff name"))
    assert problem == "its name is not UTF-8 text, which wanbatch cannot record: rename it"
    assert shown_bytes(os.fsdecode(b"/srv/bad\xff name")) == "/srv/bad\\xff name"


# ------------------------------------------------------------------ A: the output folder


def test_run_refuses_an_output_folder_it_could_not_record_before_sending(tmp_path: Path) -> None:
    """It rendered, paid, wrote the video, then crashed three times storing its path: the batch
    paused, the job stuck `downloading`, $0 recorded. Now: one line before anything is sent."""
    _manifest(tmp_path, "plain")
    folder = tmp_path / "od" / "réel"
    line = _one_error(_wb(tmp_path, "run", "m.yaml", WANBATCH_OUTPUT_DIR=str(folder), **C_LOCALE))
    assert line == (
        f"error: WANBATCH_OUTPUT_DIR '{tmp_path}/od/r\\xc3\\xa9el' cannot take the outputs: its name "
        f"holds bytes that are not ascii text (check LANG/LC_ALL): {ADVICE}; nothing was sent"
    )
    assert not (tmp_path / "od").exists()  # nothing made
    status = _wb(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["batches"] == []  # nothing stored


def test_run_refuses_an_output_folder_whose_name_is_no_utf8(tmp_path: Path) -> None:
    _utf8_session()
    _manifest(tmp_path, "plain")
    folder = os.fsencode(tmp_path) + b"/bad\xff name"
    line = _one_error(_wb(tmp_path, "run", "m.yaml", WANBATCH_OUTPUT_DIR=folder))
    assert line == (
        f"error: WANBATCH_OUTPUT_DIR '{tmp_path}/bad\\xff name' cannot take the outputs: its name is "
        "not UTF-8 text, which wanbatch cannot record: rename it; nothing was sent"
    )


def test_a_relative_output_folder_under_such_a_working_folder(tmp_path: Path) -> None:
    """The default ``./outputs`` under a working folder named in UTF-8: what it leads to counts."""
    work = tmp_path / "é"
    _manifest(work, "plain")
    line = _one_error(_wb_in(work, tmp_path, "run", "m.yaml", WANBATCH_OUTPUT_DIR="outputs", **C_LOCALE))
    assert line.startswith(
        f"error: WANBATCH_OUTPUT_DIR 'outputs' (that is '{tmp_path}/\\xc3\\xa9/outputs') cannot take "
        "the outputs"
    ), line


def test_doctor_and_worker_say_it_too(tmp_path: Path) -> None:
    folder = str(tmp_path / "od" / "réel")
    done = _wb(tmp_path, "doctor", WANBATCH_OUTPUT_DIR=folder, **C_LOCALE)
    out = " ".join(done.stdout.decode("ascii", "replace").split())  # unwrapped
    assert done.returncode == 1, out
    assert "x output storage WANBATCH_OUTPUT_DIR" in out, out
    assert "r\\xc3\\xa9el' cannot take the outputs: its name holds bytes that are not ascii text" in out
    worker = _wb(
        tmp_path,
        "worker",
        WANBATCH_OUTPUT_DIR=folder,
        WANBATCH_BROKER_URL="redis://127.0.0.1:1/0",
        **C_LOCALE,
    )
    line = _one_error(worker)
    assert "r\\xc3\\xa9el' cannot take the outputs" in line
    assert line.endswith("; the worker was not started"), line


def test_the_download_step_never_crashes_on_such_a_folder(tmp_path: Path) -> None:
    """Defence in depth: a batch folder that cannot be recorded is an OutputFolderError (the
    download step pauses the batch with its reason, the paid video waiting), never a crash."""
    code = (
        "import os, sys; from pathlib import Path; from jobs.outputs import batch_dir, OutputFolderError\n"
        "for root in (Path(os.fsdecode(os.fsencode(sys.argv[1]) + b'/r\\xc3\\xa9el')), Path(sys.argv[1])):\n"
        "    try:\n        batch_dir(root, sys.argv[2])\n"
        "    except OutputFolderError as exc:\n        print('folder error:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "plain"],
        env={**os.environ, **C_LOCALE, "PYTHONIOENCODING": "utf-8"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"folder error: the batch folder '{tmp_path}/r\\xc3\\xa9el/plain' cannot take the outputs: its "
        f"name holds bytes that are not ascii text (check LANG/LC_ALL): {ADVICE}"
    ]


# ------------------------------------------------------------------ B: one folder per batch


def _latin1_locale(tmp_path: Path) -> dict[str, str] | None:
    """A latin-1 locale built with ``localedef`` (None where it cannot be)."""
    localedef = shutil.which("localedef")
    if localedef is None:
        return None
    where = tmp_path / "locales"
    where.mkdir()
    made = subprocess.run(
        [localedef, "-i", "en_US", "-f", "ISO-8859-1", str(where / "en_US.ISO-8859-1")],
        capture_output=True,
        check=False,
    )
    if made.returncode not in (0, 1) or not (where / "en_US.ISO-8859-1").exists():
        return None
    return {
        "LOCPATH": str(where),
        "LC_ALL": "en_US.ISO-8859-1",
        "PYTHONUTF8": "0",
        "PYTHONCOERCECLOCALE": "0",
    }


def test_a_batch_folder_other_sessions_would_not_find_is_refused(tmp_path: Path) -> None:
    """Under latin-1 `Crème brûlée`'s folder was written as ``Cr\\xe8me-br\\xfbl\\xe9e``: a UTF-8
    session's export then said its videos were missing. Under C it paused at its first paid
    download. Both are refused before anything is stored or sent."""
    _manifest(tmp_path, "Crème brûlée")
    line = _one_error(_wb(tmp_path, "submit", "m.yaml", **C_LOCALE))
    assert line == (
        f"error: the batch folder '{tmp_path}/outputs/Cr\\xe8me-br\\xfbl\\xe9e' cannot take the outputs: "
        f"file name cannot be represented in this system's file-name encoding (check LANG/LC_ALL): "
        f"{ADVICE}; nothing was sent"
    )
    latin1 = _latin1_locale(tmp_path)
    if latin1 is None:
        pytest.skip("no localedef to build a latin-1 locale")
    line = _one_error(_wb(tmp_path, "run", "--simulate", "m.yaml", **latin1))
    assert line.endswith(
        "cannot take the outputs: its name would be written in this system's file-name encoding "
        f"(iso8859-1), not in UTF-8 as other sessions read it (check LANG/LC_ALL): {ADVICE}; nothing was sent"
    ), line
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    status = _wb(tmp_path, "status", "--json")
    assert json.loads(status.stdout)["batches"] == []


# ------------------------------------------------------------------ E: the manifest's place


def test_a_manifest_in_a_folder_it_could_not_record(tmp_path: Path) -> None:
    """`validate` said valid, `submit` and `run` were exit 70: all three say it now."""
    _manifest(tmp_path / "dé", "plain")
    for command in ("validate", "submit", "run"):
        done = _wb(tmp_path, command, "dé/m.yaml", **C_LOCALE)
        err = done.stderr.decode("ascii")
        assert done.returncode == 2, (command, err)
        assert "internal error" not in err
        assert (
            "error d\\xc3\\xa9/m.yaml: the manifest's path cannot be recorded: its name holds bytes that "
            f"are not ascii text (check LANG/LC_ALL): {ADVICE}\n"
        ) in err, (command, err)
    status = _wb(tmp_path, "status", "--json")
    assert json.loads(status.stdout)["batches"] == []


# ------------------------------------------------------------------ C, D, F: reading back


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A batch ``Crème ñ`` made under UTF-8 (simulated) from ``ñé.jpg``: its folder, its id."""
    work = tmp_path_factory.mktemp("made")
    _manifest(work, "Crème ñ", image="ñé.jpg")
    done = _wb(work, "run", "--simulate", "m.yaml")
    assert done.returncode == 0, done.stderr.decode()
    status = _wb(work, "status", "--json")
    (batch,) = json.loads(status.stdout)["batches"]
    return work, batch["batch"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_under_c_says_it_in_one_line_and_writes_nothing(made: tuple[Path, str], fmt: str) -> None:
    """Exit 70 in every format, a header-only CSV or an empty Parquet file left on stdout."""
    work, batch = made
    done = _wb(work, "export", batch, "--format", fmt, **C_LOCALE)
    line = _one_error(done)
    assert line == (
        "error: cannot export batch Cr\\xe8me \\xf1: its videos are in "
        f"'{work}/outputs/Cr\\xe8me-\\xf1-simulated', "
        f"which this session cannot open: file name cannot be represented in this system's file-name "
        f"encoding (check LANG/LC_ALL): {ADVICE}; nothing was written"
    )
    assert done.stdout == b""


def test_a_dataset_export_under_c_is_refused_before_its_folder_is_made(made: tuple[Path, str]) -> None:
    work, batch = made
    line = _one_error(_wb(work, "export", batch, "--format", "hf", "-o", "ds", **C_LOCALE))
    assert line.startswith("error: cannot export batch Cr\\xe8me \\xf1: its videos are in"), line
    assert not (work / "ds").exists()


def test_rerun_under_c_of_a_non_ascii_source_says_what_validate_says(made: tuple[Path, str]) -> None:
    work, batch = made
    line = _one_error(_wb(work, "rerun", batch[:8], **C_LOCALE))
    assert line == (
        "error: cannot rerun batch Cr\\xe8me \\xf1: \\xf1\\xe9.jpg: file name cannot be represented in "
        f"this system's file-name encoding (check LANG/LC_ALL): {ADVICE}; nothing was stored"
    )


def test_an_export_target_named_in_bytes_is_shown_as_its_bytes(made: tuple[Path, str]) -> None:
    """``\\udcc3\\udcb1`` on the terminal and lone surrogates in ``--json`` (no strict parser takes
    them): the bytes as ``\\xc3\\xb1``, as every message shows them. (An ASCII-named batch.)"""
    work, _batch = made
    _manifest(work / "plain", "plain")
    assert _wb(work, "submit", "plain/m.yaml").returncode == 0
    (work / "ex").mkdir()
    done = _wb(work, "export", "plain", "-o", "ex/ñ é.jsonl", **C_LOCALE)
    assert done.returncode == 0, done.stderr
    first = done.stderr.decode("ascii").splitlines()[0]  # then: not finished (never sent)
    assert first == "exported 1 record(s) to ex/\\xc3\\xb1 \\xc3\\xa9.jsonl"
    done = _wb(work, "export", "plain", "-o", "ex/ñ 2.jsonl", "--json", **C_LOCALE)
    assert done.returncode == 0, done.stderr
    assert b"\\ud" not in done.stdout  # no surrogate escape
    assert json.loads(done.stdout)["path"] == "ex/\\xc3\\xb1 2.jsonl"
    assert (work / "ex" / "ñ 2.jsonl").is_file()  # the file itself has its real name
