"""Benchmark: ``wanbatch validate`` of one ``items_from`` JSONL file of many rows, per row's cost.

``bench.manifest_scale`` sweeps few rows over a large matrix (its million jobs are 500 rows);
this is the other shape, a row per job: ``--rows`` items (1,000,000 by default, the job limit)
and no matrix, so what each row costs (reading, hashing and parsing its line, its paths, its
checks) is what is measured. Two files: ``t2v``, text-to-video rows without local files (the
rows :mod:`bench.expand` writes), and ``i2v``, every other row image-to-video with one of three
local images beside the manifest.

Each run is ``python -m cli validate MANIFEST``, a child process per row of the table, its CPU
(user + system), wall time and peak RSS read from the kernel (``os.wait4``). ``--baseline
PATH`` (another checkout, e.g. ``git archive`` of an earlier commit unpacked at PATH) runs each
time right before this one: the two alternate, ``--repeat`` times, and medians are shown.

Run from the repository root: ``python -m bench.validate_rows --baseline /tmp/old``.
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from bench._common import PACKAGES, ROOT, byte_compile, fmt, machine_summary, print_table, today
from bench.expand import write_items
from bench.expand import write_manifest as t2v_manifest
from bench.manifest_scale import CAMERAS, IMAGES, SUBJECTS, _env, run_command

VARIANTS = ("t2v", "i2v")


def i2v_manifest(folder: Path, rows: int) -> Path:
    """``rows`` items, the odd ones ``fal-ai/wan-i2v`` with a local image beside the manifest."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        shutil.copy(ROOT / "manifests" / "examples" / "images" / name, images / name)
    with (folder / "rows.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(rows):
            row: dict[str, object] = {
                "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, {CAMERAS[i % len(CAMERAS)]}, take {i}",
                "seed": 1000 + i,
            }
            if i % 2:
                row["endpoint"] = "fal-ai/wan-i2v"
                row["image_url"] = f"images/{IMAGES[(i // 2) % len(IMAGES)]}"
            fh.write(json.dumps(row) + "\n")
    manifest = folder / "i2v.yaml"
    manifest.write_text(
        "name: bench-i2v\nendpoint: fal-ai/wan-22\ndefaults:\n  num_frames: 81\n"
        "items_from: rows.jsonl\nbudget:\n  max_usd: 100000000\n",
        encoding="utf-8",
    )
    return manifest


def write_variant(folder: Path, variant: str, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "t2v":
        return t2v_manifest(folder, write_items(folder, rows, "jsonl"), "bench-t2v")
    return i2v_manifest(folder, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    byte_compile()
    codes = [("this", ROOT)]
    if args.baseline:
        codes.insert(0, ("baseline", Path(args.baseline)))
        for package in PACKAGES:  # compiled once, as an installed wanbatch is
            compileall.compile_dir(Path(args.baseline) / package, quiet=1)
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wanbatch-validate-rows-") as tmp:
        manifests = {v: write_variant(Path(tmp) / v, v, args.rows) for v in args.variants}
        url = f"sqlite:///{Path(tmp) / 'unused.db'}"
        for n in range(args.repeat):
            for variant, manifest in manifests.items():
                for code, path in codes:
                    argv_ = [sys.executable, "-m", "cli", "validate", str(manifest)]
                    print(f"[{n + 1}/{args.repeat}] {variant} {code} …", file=sys.stderr, flush=True)
                    status, wall, cpu, rss, tail = run_command(argv_, _env(url, path), args.timeout, path)
                    if status != 0:
                        failed.append(f"{variant} {code} exited {status}: {tail.strip()}")
                    runs.setdefault((variant, code), []).append((cpu, wall, rss))
    table = Table(title=f"validate_rows ({today()}, {machine_summary()})", title_justify="left")
    for header in (
        "rows",
        "file",
        "code",
        "CPU (s, median)",
        "CPU runs (s)",
        "wall (s)",
        "µs CPU a row",
        "peak RSS (MB)",
    ):
        table.add_column(header, justify="left" if header in ("file", "code") else "right")
    for (variant, code), figures in runs.items():
        cpu = statistics.median(f[0] for f in figures)
        table.add_row(
            f"{args.rows:,}",
            variant,
            code,
            fmt(cpu),
            ", ".join(fmt(f[0]) for f in figures),
            fmt(statistics.median(f[1] for f in figures)),
            f"{cpu / args.rows * 1e6:.1f}",
            fmt(statistics.median(f[2] for f in figures), 1),
        )
    print_table(table)
    for problem in failed:
        print(f"PROBLEM: {problem}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.validate_rows", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in each items_from file")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (median shown)")
    parser.add_argument("--baseline", metavar="PATH", help="another checkout to run each command with too")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
