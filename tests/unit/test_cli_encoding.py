"""A standard output or error, or a file-name encoding, that is not UTF-8 never makes a command an
"internal error" (audit: exit 70 for ``validate``, ``status``, ``cost``, with and without ``--json``).

The encodings are decided when the interpreter starts, so each command runs in a subprocess
with the environment a user would have (``LC_ALL=C``, ``PYTHONIOENCODING=ascii``…).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WANBATCH = str(Path(sys.executable).with_name("wanbatch"))
IMAGE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"
NAME = "mañana-✓"
#: A C locale with Python's UTF-8 mode and locale coercion off: file names are ASCII only.
C_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
items:
  - prompt: A calm mountain landscape
    image_url: {image}
    seed: 42
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(
        FAL_KEY="k-encoding-test",
        WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        WANBATCH_OUTPUT_DIR=str(tmp_path / "outputs"),
        LANG="C.UTF-8",
        **extra,
    )
    return env


def _wb(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [WANBATCH, *args],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=_env(tmp_path, **extra),
    )


def _manifest(tmp_path: Path, file: str, image: str, name: str = NAME) -> str:
    shutil.copy(IMAGE, tmp_path / image)
    (tmp_path / file).write_text(MANIFEST.format(name=name, image=image), encoding="utf-8")
    return file


def _no_bug(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode("ascii", "replace")
    assert "internal error" not in err, err
    assert "Traceback" not in err, err
    assert b"internal error" not in done.stdout
    return err


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_validate_on_a_stdout_that_is_not_utf8(tmp_path: Path, encoding: str) -> None:
    path = _manifest(tmp_path, "m.yaml", "a.jpg")
    done = _wb(tmp_path, "validate", path, PYTHONIOENCODING=encoding)
    _no_bug(done)
    assert done.returncode == 0
    assert done.stdout.decode(encoding).startswith("ok m.yaml: 1 job(s), all valid")


def test_json_stays_valid_json_on_an_ascii_stdout(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "mañana.yaml", "a.jpg")
    done = _wb(tmp_path, "validate", "--json", path, PYTHONIOENCODING="ascii")
    _no_bug(done)
    assert done.returncode == 0
    report = json.loads(done.stdout.decode("ascii"))
    assert report["ok"] is True
    assert (report["manifest"], report["name"]) == ("mañana.yaml", NAME)


@pytest.mark.parametrize("command", ["status", "cost"])
@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, C_LOCALE], ids=["ascii", "C"])
def test_status_and_cost_of_a_non_ascii_batch(tmp_path: Path, command: str, env: dict[str, str]) -> None:
    path = _manifest(tmp_path, "m.yaml", "a.jpg")
    made = _wb(tmp_path, "submit", "--json", path)
    assert made.returncode == 0, made.stderr.decode()
    batch = json.loads(made.stdout)["batch"]
    for args in ([command, batch[:8]], [command, batch[:8], "--json"], ["status"], ["status", "--json"]):
        done = _wb(tmp_path, *args, **env)
        _no_bug(done)
        assert done.returncode == 0, (args, done.stderr)
        text = done.stdout.decode("ascii")  # nothing beyond ASCII reached the stream
        if "--json" in args:
            document = json.loads(text)
            names = [b["name"] for b in document["batches"]] if "batches" in document else [document["name"]]
            assert names == [NAME]
        else:
            assert "ma\\xf1ana-ok" in text


def test_a_path_the_file_name_encoding_cannot_hold_is_an_issue(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "mañana ✓.yaml", "pаysage é.jpg")
    done = _wb(tmp_path, "validate", path, **C_LOCALE)
    err = _no_bug(done)
    assert done.returncode == 2
    assert (
        ":5: item 0: field 'image_url': file name cannot be represented in this system's file-name "
        "encoding (check LANG/LC_ALL)"
    ) in err
    # The manifest's own name, read in bytes that are not ASCII, is no place a batch can record:
    # `submit` would refuse it, so `validate` says so too (its bytes shown as \xNN).
    assert (
        "error ma\\xc3\\xb1ana \\xe2\\x9c\\x93.yaml: the manifest's path cannot be recorded: its name holds "
        "bytes that are not ascii text (check LANG/LC_ALL)"
    ) in err
    assert "x 2 error(s); nothing was submitted." in err  # not "\u2717"
    done = _wb(tmp_path, "validate", "--json", path, **C_LOCALE)
    _no_bug(done)
    assert done.returncode == 2
    placed, issue = json.loads(done.stdout.decode("ascii"))["issues"]
    assert placed["file"] == "ma\\xc3\\xb1ana \\xe2\\x9c\\x93.yaml"  # strict JSON: no lone surrogate
    assert placed["line"] is None
    assert (issue["line"], issue["item"], issue["field"], issue["value"]) == (
        5,
        0,
        "image_url",
        "pаysage é.jpg",
    )
    assert issue["message"].startswith("file name cannot be represented")


#: Commands that take a batch by name, each as a script would call it. ``run NAME --simulate``
#: finds the batch, then refuses to simulate one sent to fal: found, not "no batch".
BY_NAME = [
    ["status", NAME],
    ["status", NAME, "--json"],
    ["cost", NAME, "--json"],
    ["export", NAME, "--format", "jsonl"],
    ["diff", NAME, NAME, "--json"],
    ["pause", NAME],
    ["resume", NAME],
    ["run", NAME, "--simulate"],
]


def test_a_batch_made_under_utf8_is_found_by_name_under_the_c_locale(tmp_path: Path) -> None:
    """``LC_ALL=C`` (UTF-8 mode off) decodes ``ñ``'s two bytes on the command line as two lone
    surrogates: ``status mañana`` looked for ``ma\\udcc3\\udcb1ana`` and found nothing. Those bytes
    are UTF-8: the name they spell is meant, by every command that takes a batch."""
    path = _manifest(tmp_path, "m.yaml", "a.jpg")
    made = _wb(tmp_path, "submit", "--json", path)
    assert made.returncode == 0, made.stderr.decode()
    batch = json.loads(made.stdout)["batch"]
    for args in BY_NAME:
        done = _wb(tmp_path, *args, **C_LOCALE)
        err = _no_bug(done)
        assert "no batch" not in err, (args, err)
        assert "\\udc" not in err, (args, err)
        if args[0] == "run":
            assert done.returncode == 2, err
            assert "is sent to fal" in err, err
        else:
            assert done.returncode in (0, 1), (args, err)  # diff: 1 when the jobs have no video
        if "--json" in args:
            document = json.loads(done.stdout.decode("ascii"))
            assert batch in json.dumps(document), (args, document)


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_an_unknown_batch_name_is_shown_by_its_bytes_never_a_surrogate(
    tmp_path: Path, json_flag: list[str]
) -> None:
    """A name whose bytes are no UTF-8 (latin-1 ``ñ``) names no batch; its message showed it as
    ``'ma\\udcf1ana'`` (``{ref!r}``): now ``'ma\\xf1ana'``, the byte typed, as the README says."""
    done = subprocess.run(
        [WANBATCH, "status", b"ma\xf1ana", *json_flag],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=_env(tmp_path, **C_LOCALE),
    )
    _no_bug(done)
    assert done.returncode == 2
    said = done.stdout if json_flag else done.stderr
    assert b"\\udc" not in said, said
    if json_flag:
        assert json.loads(said)["error"].startswith("no batch 'ma\\xf1ana': give a batch name")
    else:
        assert said.startswith(b"error: no batch 'ma\\xf1ana': give a batch name"), said
