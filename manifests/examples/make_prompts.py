"""Regenerate ``prompts.jsonl``: 1,000 varied text-to-video prompts, deterministically.

Run from anywhere: ``python manifests/examples/make_prompts.py``. The same seed always writes the
same file, so the committed JSONL can be checked against this script.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "prompts.jsonl"
COUNT = 1000

SUBJECTS = [
    "a red fox",
    "an old fisherman",
    "a paper boat",
    "a hummingbird",
    "a vintage tram",
    "a lighthouse keeper",
    "a snow leopard",
    "a street violinist",
    "a kite",
    "a robot gardener",
    "a sailing ship",
    "a lantern festival crowd",
    "a sleepy cat",
    "a skateboarder",
    "a hot-air balloon",
    "a jellyfish",
    "a steam locomotive",
    "a dancer in a yellow dress",
    "a herd of wild horses",
    "a child with a dandelion",
]
ACTIONS = [
    "walks slowly through",
    "drifts across",
    "circles above",
    "races through",
    "pauses in",
    "glides over",
    "wanders along",
    "spins in",
    "climbs up",
    "rests beside",
]
PLACES = [
    "a foggy pine forest",
    "a neon-lit Tokyo street",
    "a desert at golden hour",
    "a rainy harbor",
    "an alpine meadow",
    "a quiet library",
    "a frozen lake",
    "a bustling night market",
    "a field of sunflowers",
    "the rooftops of an old city",
    "a misty bamboo grove",
    "a coral reef",
]
STYLES = [
    "cinematic lighting",
    "handheld camera",
    "slow motion",
    "aerial drone shot",
    "shallow depth of field",
    "35mm film grain",
    "soft pastel colors",
    "dramatic backlight",
    "wide establishing shot",
    "macro close-up",
]
ASPECTS = ["16:9", "9:16", "1:1"]


def main() -> None:
    rng = random.Random(20240601)
    lines = []
    for _ in range(COUNT):
        subject, action = rng.choice(SUBJECTS).capitalize(), rng.choice(ACTIONS)
        prompt = f"{subject} {action} {rng.choice(PLACES)}, {rng.choice(STYLES)}"
        record: dict[str, object] = {"prompt": prompt, "seed": rng.randrange(1, 2**31)}
        if rng.random() < 0.3:
            record["aspect_ratio"] = rng.choice(ASPECTS)
        lines.append(json.dumps(record, ensure_ascii=False))
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} prompts to {OUT}")


if __name__ == "__main__":
    main()
