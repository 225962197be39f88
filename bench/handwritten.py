"""The script a user would write instead of wanbatch: fal-client + a semaphore + httpx downloads.

Run by ``bench/drain.py`` in its own interpreter with ``FAL_KEY``, ``FAL_QUEUE_RUN_HOST`` and
``SSL_CERT_FILE`` pointing fal_client at the simulator. Argv: ``JOBS_JSONL OUT_DIR CONCURRENCY``
(each line ``{"endpoint": ..., "arguments": {...}}``). Prints one JSON line: succeeded, failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import fal_client
import httpx


async def main(jobs_file: Path, out_dir: Path, concurrency: int) -> dict[str, int]:
    jobs = [json.loads(line) for line in jobs_file.read_text().splitlines() if line.strip()]
    fal = fal_client.AsyncClient()
    gate = asyncio.Semaphore(concurrency)
    counts = {"succeeded": 0, "failed": 0}
    async with httpx.AsyncClient(timeout=120) as http:

        async def one(i: int, job: dict[str, Any]) -> None:
            try:
                async with gate:
                    result = await fal.subscribe(job["endpoint"], job["arguments"])
                resp = await http.get(result["video"]["url"])
                resp.raise_for_status()
                (out_dir / f"{i:06d}.mp4").write_bytes(resp.content)
                counts["succeeded"] += 1
            except Exception as exc:  # a user's script logs and carries on
                print(f"job {i} failed: {exc!r}", file=sys.stderr)
                counts["failed"] += 1

        await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    return counts


if __name__ == "__main__":
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(main(Path(sys.argv[1]), out, int(sys.argv[3])))))
