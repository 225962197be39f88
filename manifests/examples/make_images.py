"""Regenerate the example images (deterministic, a few KB each, valid for every endpoint).

Run from anywhere: ``python manifests/examples/make_images.py``. Every image is at least 360 px
on each side (Wan 2.5/2.6 refuse smaller), at most 2000 px, and has no alpha channel.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "images"


def _scene(
    size: tuple[int, int], sky: tuple[int, int, int], ground: tuple[int, int, int], sun: int
) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * 2 // 3, width, height), fill=ground)
    draw.ellipse((sun, height // 6, sun + height // 5, height // 6 + height // 5), fill=(250, 220, 90))
    draw.polygon(
        [(width // 5, height * 2 // 3), (width // 3, height // 3), (width // 2, height * 2 // 3)],
        fill=(90, 90, 110),
    )
    return image


def main() -> None:
    HERE.mkdir(exist_ok=True)
    _scene((640, 360), (120, 170, 230), (70, 140, 70), 460).save(HERE / "landscape.jpg", quality=60)
    _scene((480, 480), (240, 160, 120), (150, 110, 60), 300).save(HERE / "square.png", optimize=True)
    _scene((640, 360), (30, 30, 70), (40, 60, 40), 80).save(HERE / "night.jpg", quality=60)
    for path in sorted(HERE.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
