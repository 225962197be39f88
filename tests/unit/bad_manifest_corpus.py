"""The bad-manifest corpus (``bad_manifests/``) and what each file says its error must mention.

Each corpus file says in its header comments what the error must mention:

- ``# expect: <text>``: a phrase the error's message must contain;
- ``# field: <name>`` / ``# item: <n>``: the field and item index the error must name;
- ``# line: <n>`` and ``# in: <file>``: the line (and file, for ``items_from`` rows); without
  ``# line``, the line is the one marked ``#<-`` in the manifest itself.

Cases that would need big files (a 10 MB scalar, a 17 MB manifest, a 26 MB image) are
generated into a folder by :func:`generated_bad_manifests`. The unit corpus test and the CLI's
end-to-end test both read the corpus through this module.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

CORPUS = Path(__file__).parent / "bad_manifests"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))


def expectations(path: Path) -> dict[str, str]:
    """The ``# expect/field/item/line/in`` headers of a corpus file (``marked``: the ``#<-`` line)."""
    found: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate(lines, start=1):
        header = re.match(r"^# (expect|field|item|line|in): (.+)$", text)
        if header:
            found[header.group(1)] = header.group(2).strip()
        if "#<-" in text and "line" not in found:
            found["marked"] = str(number)
    return found


def wanted(path: Path, expect: dict[str, str]) -> list[str]:
    """The substrings one error line must carry: the phrase, ``file:line`` (or just the file
    when there is no line to point at), and the item and field where the corpus names them."""
    line = expect.get("line", expect.get("marked"))
    file_name = expect.get("in", path.name)
    found = [expect["expect"], f"{file_name}:{line}" if line else path.name]
    if "item" in expect:
        found.append(f"item {expect['item']}")
    if "field" in expect:
        found.append(f"field {expect['field']!r}")
    return found


def generated_bad_manifests(folder: Path) -> list[tuple[Path, dict[str, str]]]:
    """Write the big-file cases into ``folder``; return (manifest, expectations) pairs."""
    cases: list[tuple[Path, dict[str, str]]] = []

    big_scalar = folder / "big_scalar.yaml"
    big_scalar.write_text("name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: " + "x" * 10_000_000 + "\n")
    cases.append((big_scalar, {"expect": "10,000,000 characters is refused", "line": "4"}))

    huge = folder / "huge_manifest.yaml"
    with huge.open("wb") as fh:
        fh.write(b"name: x\n")
        fh.truncate(17 * 1024 * 1024)
    cases.append((huge, {"expect": "refused (at most 16,777,216)", "line": ""}))

    heavy = folder / "images" / "heavy.jpg"
    heavy.parent.mkdir(exist_ok=True)
    Image.new("RGB", (640, 360), (10, 20, 30)).save(heavy, quality=50)
    with heavy.open("ab") as fh:  # a valid JPEG followed by 26 MiB of padding: past the schema's 25 MB
        fh.write(b"\0" * (26 * 1024 * 1024))
    too_heavy = folder / "image_too_large_bytes.yaml"
    too_heavy.write_text(
        "name: x\nendpoint: fal-ai/wan-25-preview/image-to-video\nitems:\n"
        "  - prompt: hi\n    image_url: images/heavy.jpg\n"
    )
    cases.append(
        (
            too_heavy,
            {"expect": "larger than the endpoint accepts", "line": "5", "item": "0", "field": "image_url"},
        )
    )
    return cases
