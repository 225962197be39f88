"""One valid, cheap input per registered endpoint, shared by the simulator and conformance tests."""

from __future__ import annotations

#: One valid, cheap input per registered endpoint.
INPUTS: dict[str, dict[str, str]] = {
    "fal-ai/wan-i2v": {"prompt": "a cat", "image_url": "https://example.com/cat.png", "resolution": "480p"},
    "fal-ai/wan-flf2v": {
        "prompt": "a cat",
        "start_image_url": "https://example.com/a.png",
        "end_image_url": "https://example.com/b.png",
        "resolution": "480p",
    },
    "fal-ai/wan-22": {"prompt": "a cat", "resolution": "480p"},
    "fal-ai/wan-25-preview/image-to-video": {
        "prompt": "a cat",
        "image_url": "https://example.com/cat.png",
        "resolution": "480p",
    },
    "wan/v2.6/image-to-video": {
        "prompt": "a cat",
        "image_url": "https://example.com/cat.png",
        "resolution": "720p",
    },
}
