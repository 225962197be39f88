"""What validation checked is what is recorded, and so what is sent.

A local image rewritten while ``submit`` runs (a sync tool, an export still writing it) was
checked once, then read again to hash it for the job's ``source_files`` and key: the job
recorded the SHA-256 of bytes nobody checked, and the worker, which sends only bytes matching
that hash, sent them and was billed for fal's 422. The check now hashes the very bytes it
decodes, and that hash is the one recorded; the worker then refuses the rewritten file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from PIL import Image
from sqlalchemy import select

from jobs import batches, media
from jobs.db import make_engine, session_factory
from jobs.endpoints import FieldType, MediaConstraints
from jobs.errors import ItemsFileChanged, ManifestError, UsageError
from jobs.models import Job
from jobs.settings import Settings
from worker.fal.storage import MediaPreparer, prepare_input


def _png(size: tuple[int, int] = (480, 480)) -> bytes:
    out = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(out, "PNG")  # noise: a PNG of some size
    return out.getvalue()


def _manifest(folder: Path) -> Path:
    (folder / "images").mkdir()
    path = folder / "m.yaml"
    path.write_text(
        "name: swapped\nendpoint: fal-ai/wan-i2v\n"
        "items:\n  - {prompt: a cat, seed: 7, image_url: images/a.png}\n",
        encoding="utf-8",
    )
    return path


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, image: Path, new: bytes) -> list[int]:
    """``jobs.media._check_image`` wrapped: once the first check of the file is done (it passed),
    the file is rewritten with ``new`` — between the check and anything read after it."""
    real = media._check_image
    swaps: list[int] = []

    def check_then_swap(fh: BinaryIO, size: int, limits: MediaConstraints) -> Any:
        found = real(fh, size, limits)
        if not swaps:
            swaps.append(1)
            image.write_bytes(new)
        return found

    monkeypatch.setattr(media, "_check_image", check_then_swap)
    return swaps


@pytest.fixture
def fresh_caches() -> Any:
    media._check_file_cached.cache_clear()
    media._sha256_cached.cache_clear()
    yield
    media._check_file_cached.cache_clear()
    media._sha256_cached.cache_clear()


def test_a_file_rewritten_after_its_check_is_recorded_as_checked_and_never_sent(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    path = _manifest(tmp_path)
    image = tmp_path / "images" / "a.png"
    checked = _png()
    image.write_bytes(checked)
    truncated = checked[: len(checked) // 2]  # what fal calls "truncated or corrupt"
    swaps = _swap_after_check(monkeypatch, image, truncated)

    settings = Settings(database_url=sqlite_url, output_dir=str(tmp_path / "out"))
    result = batches.submit_manifest(path, settings)

    assert swaps == [1]
    engine = make_engine(sqlite_url)
    try:
        with session_factory(engine)() as session:
            (job,) = session.scalars(select(Job).where(Job.batch_id == result.batch_id)).all()
            stored_input, sources = dict(job.input), dict(job.source_files or {})
    finally:
        engine.dispose()
    recorded = sources["image_url"]["sha256"]
    assert recorded == hashlib.sha256(checked).hexdigest()  # the bytes decoded, not the rewrite
    assert recorded != hashlib.sha256(truncated).hexdigest()
    sent: list[bytes] = []

    def upload(data: bytes, mime: str, name: str) -> str:
        sent.append(data)
        return "https://storage.example/u"

    preparer = MediaPreparer(uploader=upload, inline_max_bytes=0)  # every file uploaded: seen here
    fields = {"image_url": FieldType.IMAGE}
    with pytest.raises(UsageError, match="changed since the manifest was validated"):
        prepare_input(stored_input, fields, preparer=preparer, source_files=sources)
    assert sent == []  # nothing went out
    image.write_bytes(checked)  # the original back: it is what goes
    prepare_input(stored_input, fields, preparer=preparer, source_files=sources)
    assert sent == [checked]


def test_a_file_the_storing_pass_finds_unchecked_is_refused_not_hashed_and_sent(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """The pass that stores the jobs resolves the manifest's paths again: a symlink pointed
    elsewhere since validation (or an ``items_from`` row rewritten) names a file no check read.
    It was hashed from a fresh read and recorded, so the worker, finding the bytes it recorded,
    sent it unchecked (here a truncated PNG, for fal to refuse and bill). Now nothing is stored."""
    path = _manifest(tmp_path)
    folder = tmp_path / "images"
    good, bad = folder / "v1.png", folder / "v2.png"
    checked = _png()
    good.write_bytes(checked)
    bad.write_bytes(checked[: len(checked) // 2])
    link = folder / "a.png"
    link.symlink_to("v1.png")
    real = media._check_image
    swaps: list[int] = []

    def check_then_repoint(fh: BinaryIO, size: int, limits: MediaConstraints) -> Any:
        found = real(fh, size, limits)
        if not swaps:  # the check of v1.png passed: images/a.png now leads to v2.png
            swaps.append(1)
            link.unlink()
            link.symlink_to("v2.png")
        return found

    monkeypatch.setattr(media, "_check_image", check_then_repoint)
    settings = Settings(database_url=sqlite_url, output_dir=str(tmp_path / "out"))
    with pytest.raises(ManifestError) as raised:
        batches.submit_manifest(path, settings)

    assert swaps == [1]
    (issue,) = [i for i in raised.value.issues if i.severity == "error"]
    assert (issue.field, issue.line, issue.item) == ("image_url", 4, 0)
    assert issue.message.startswith("images/a.png (now images/v2.png) was not checked")
    engine = make_engine(sqlite_url)
    try:
        with session_factory(engine)() as session:
            assert session.scalars(select(Job)).all() == []  # nothing stored, nothing to send
    finally:
        engine.dispose()


def test_an_items_from_row_rewritten_since_validation_names_no_unchecked_file(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """The storing pass reads the ``items_from`` rows again: a row rewritten meanwhile to name
    another file (here a corrupt one) is refused, not stored with a hash of a fresh read. The
    refusal says what happened: the rows file is not the one validated (its row's unchecked
    file is only what that change broke), and nothing of the batch is stored."""
    (tmp_path / "images").mkdir()
    good, bad = tmp_path / "images" / "a.png", tmp_path / "images" / "b.png"
    good.write_bytes(_png())
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a PNG after all")
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,seed,image_url\na cat,7,images/a.png\n", encoding="utf-8")
    path = tmp_path / "m.yaml"
    path.write_text("name: rows\nendpoint: fal-ai/wan-i2v\nitems_from: rows.csv\n", encoding="utf-8")
    real = media._check_image
    swaps: list[int] = []

    def check_then_rewrite(fh: BinaryIO, size: int, limits: MediaConstraints) -> Any:
        found = real(fh, size, limits)
        if not swaps:
            swaps.append(1)
            rows.write_text("prompt,seed,image_url\na cat,7,images/b.png\n", encoding="utf-8")
        return found

    monkeypatch.setattr(media, "_check_image", check_then_rewrite)
    settings = Settings(database_url=sqlite_url, output_dir=str(tmp_path / "out"))
    with pytest.raises(ItemsFileChanged) as raised:
        batches.submit_manifest(path, settings)

    assert swaps == [1]
    assert str(raised.value) == (
        "rows.csv changed while submit ran (its bytes differ from those validated); nothing was "
        "submitted: run it again once the file is written"
    )
    engine = make_engine(sqlite_url)
    try:
        with session_factory(engine)() as session:
            assert session.scalars(select(Job)).all() == []
    finally:
        engine.dispose()
