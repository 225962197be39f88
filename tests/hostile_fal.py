"""A fal made of the hostile provider: Wan submit, status, result and file routes that behave,
each of which a test overrides to misbehave exactly where it wants.

Request ids are ``r1``, ``r2``, … in submit order; the result of ``rN`` points at
``{provider.url}/files/rN.mp4`` (a real, tiny MP4). The provider is the configured fal URL, so
its host is one downloads may use.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
from functools import cache
from typing import Any

from falsim.media import Geometry, VideoFactory
from jobs.endpoints.registry import app_base
from tests.hostile import Behaviour, HostileProvider, Recorded, json_reply, raw_reply

COMPLETED = {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 2.5}}


def accept_submits(
    provider: HostileProvider, request_id: str, endpoint: str = "fal-ai/wan-22", urls_on: str | None = None
) -> None:
    """fal accepts every submit to ``endpoint`` as ``request_id``; the answer's URLs point at
    ``urls_on`` when given (a host a hostile answer steers to), else at ``provider``."""
    provider.route("POST", rf"/{endpoint}", accepted_reply(urls_on or provider.url, request_id, endpoint))


def accepted_reply(host: str, request_id: str, endpoint: str = "fal-ai/wan-22") -> Behaviour:
    """fal's answer accepting a submit as ``request_id``, its URLs on ``host`` (for a
    :func:`~tests.hostile.sequence` of answers)."""
    base = f"{host}/{endpoint}/requests/{request_id}"
    return json_reply(
        {
            "request_id": request_id,
            "status": "IN_QUEUE",
            "queue_position": 0,
            "status_url": f"{base}/status",
            "response_url": base,
            "cancel_url": f"{base}/cancel",
        }
    )


@cache
def sample_video() -> bytes:
    """A real MP4 (64x64, 8 frames), encoded once per test session."""
    return VideoFactory().render(Geometry(width=64, height=64, fps=8, num_frames=8), "0" * 16, 1)


class FakeFal:
    """Routes one Wan endpoint's queue API on ``provider``; later ``on_*`` calls override them."""

    def __init__(
        self, provider: HostileProvider, endpoint: str = "fal-ai/wan-22", video: bytes | None = None
    ) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self.base = "/" + app_base(endpoint)
        self.video = video or sample_video()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        provider.route("POST", re.escape("/" + endpoint), self._submit)
        provider.route("GET", rf"{re.escape(self.base)}/requests/[^/]+/status", json_reply(COMPLETED))
        provider.route("GET", rf"{re.escape(self.base)}/requests/[^/]+", self._result)
        mp4 = {"Content-Type": "video/mp4"}
        provider.route("GET", r"/files/[^/]+\.mp4", raw_reply(self.video, headers=mp4))

    def result_for(self, request_id: str, url: str | None = None, **extra: Any) -> dict[str, Any]:
        """The result body fal's Wan endpoints give (video object, seed), optionally changed."""
        body: dict[str, Any] = {
            "video": {
                "url": url or f"{self.provider.url}/files/{request_id}.mp4",
                "content_type": "video/mp4",
                "file_name": f"{request_id}.mp4",
                "file_size": len(self.video),
            },
            "seed": 42,
        }
        body.update(extra)
        return body

    def on_status(self, request_id: str, behaviour: Behaviour) -> None:
        self.provider.route("GET", rf"{re.escape(self.base)}/requests/{request_id}/status", behaviour)

    def on_result(self, request_id: str, behaviour: Behaviour) -> None:
        self.provider.route("GET", rf"{re.escape(self.base)}/requests/{request_id}", behaviour)

    def on_file(self, name: str, behaviour: Behaviour) -> None:
        self.provider.route("GET", rf"/files/{re.escape(name)}", behaviour)

    def posts(self) -> int:
        """Submits received (each one a generation fal would bill)."""
        return self.provider.count("POST", re.escape("/" + self.endpoint))

    def result_calls(self, request_id: str) -> int:
        return self.provider.count("GET", rf"{re.escape(self.base)}/requests/{request_id}")

    def file_gets(self, name: str) -> int:
        return self.provider.count("GET", rf"/files/{re.escape(name)}")

    def _submit(self, req: Recorded, sock: socket.socket) -> None:
        with self._lock:
            request_id = f"r{next(self._ids)}"
        json_reply({"request_id": request_id, "status": "IN_QUEUE", "queue_position": 0})(req, sock)

    def _result(self, req: Recorded, sock: socket.socket) -> None:
        json_reply(self.result_for(req.path.rsplit("/", 1)[1]), headers={"x-fal-request-id": "gw"})(req, sock)
