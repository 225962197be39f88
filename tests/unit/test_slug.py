"""Batch names become readable, safe folder names in any script (issue #14)."""

from __future__ import annotations

import random
import re
import string
import unicodedata
from pathlib import Path

import pytest

from jobs import outputs
from jobs.outputs import SLUG_MAX_BYTES, slug


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("東京の夜景", "東京の夜景"),
        ("東京 夜景 sweep", "東京-夜景-sweep"),
        ("café crème", "café-crème"),
        ("cafe\u0301", "café"),  # decomposed é: NFC, so both spellings share one folder
        ("Ωmega_1.0", "Ωmega_1.0"),
        ("हिन्दी नाम", "हिन्दी-नाम"),  # vowel signs (marks) stay with their letters
        ("🎬 night run", "night-run"),  # symbols are no part of a name
        ("seed-resolution-sweep", "seed-resolution-sweep"),
        ("...", "batch"),
        ("", "batch"),
    ],
)
def test_unicode_names_stay_readable(name: str, folder: str) -> None:
    assert slug(name) == folder


@pytest.mark.parametrize(
    "hostile",
    ["../../etc", "/abs/path\\x", "..", ".", "a\x00b", "\u202etxt.exe", "x／y", "a\u2028b", "東京/../夜景"],
)
def test_slugs_carry_no_path_control_or_leading_dot(hostile: str, tmp_path: Path) -> None:
    name = slug(hostile)
    assert name
    assert name not in (".", "..")
    assert not name.startswith((".", "-"))
    assert all(unicodedata.category(c)[0] in "LMN" or c in "._-" for c in name), name
    assert outputs.batch_dir(tmp_path, hostile).parent == tmp_path.resolve()


def test_slugs_are_bounded_in_bytes_and_cut_on_a_character() -> None:
    for name in ("日" * 300, "é" * 300, "x" * 300, "a" + "🎬" * 200):
        made = slug(name)
        assert len(made.encode("utf-8")) <= SLUG_MAX_BYTES
        assert made == unicodedata.normalize("NFC", made)
        made.encode("utf-8").decode("utf-8")  # whole characters only


def test_ascii_names_keep_the_folder_they_always_had() -> None:
    """Batches stored before this change keep downloading into the same folder."""

    def before(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:100] or "batch"

    rng = random.Random(14)
    for _ in range(5000):
        name = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 130)))
        assert slug(name) == before(name), name
