"""An image's identity is its bytes whatever form it was given in: a local file, or a base64 data
URI whatever its media type's spelling. A replay that sends inline the image the original run
read from a file is the same job (``reuse_outputs`` takes its output, ``diff`` pairs it)."""

from __future__ import annotations

import base64
from pathlib import Path

from PIL import Image

from jobs.endpoints import get_endpoint
from jobs.manifest import JobSpec, job_key, load_manifest


def test_a_file_and_data_uris_of_its_bytes_are_one_job(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (480, 480), (100, 150, 200)).save(tmp_path / "images" / "a.png")
    encoded = base64.b64encode((tmp_path / "images" / "a.png").read_bytes()).decode()
    other = tmp_path / "b.png"
    Image.new("RGB", (480, 480), (1, 2, 3)).save(other)
    forms = [
        "images/a.png",
        f"data:image/png;base64,{encoded}",
        f"DATA:image/PNG;base64,{encoded}",  # another spelling of the same media type
        f"data:image/x-png;name=a.png;base64,{encoded}",
        f"data:image/png;base64,{base64.b64encode(other.read_bytes()).decode()}",  # other bytes
    ]
    keys = []
    for n, form in enumerate(forms):
        path = tmp_path / f"m{n}.yaml"
        path.write_text(
            f"name: m\nendpoint: fal-ai/wan-i2v\nitems:\n  - {{prompt: p, seed: 7, image_url: '{form}'}}\n",
            encoding="utf-8",
        )
        (job,) = load_manifest(path).jobs()
        keys.append(job.key)
    assert [key == keys[0] for key in keys] == [True, True, True, True, False]
    assert keys[4] != keys[0]


def test_a_data_uri_that_does_not_decode_is_keyed_by_its_text() -> None:
    from jobs.manifest import key_of, keyed_input

    spec = get_endpoint("fal-ai/wan-i2v")
    bad = {"prompt": "p", "image_url": "data:image/png;base64,@@@"}
    assert keyed_input(spec, bad) == bad
    assert job_key(spec, bad) == key_of(spec.id, bad)
    assert job_key(spec, bad) != job_key(spec, {**bad, "image_url": "data:image/png;base64,@@@@"})


def test_a_stored_jobs_media_stand_in_by_the_recorded_sha256_and_the_disk_is_not_read(tmp_path: Path) -> None:
    """What ``diff`` compares a stored job's input by: the key's rule, from the store alone."""
    from jobs.manifest import key_of, stored_keyed_input

    spec = get_endpoint("fal-ai/wan-i2v")
    image = tmp_path / "a.png"
    Image.new("RGB", (480, 480), (100, 150, 200)).save(image)
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    (job,) = _jobs(tmp_path, str(image))
    recorded = job.source_files
    assert recorded is not None
    as_file = stored_keyed_input(spec, job.input, recorded)
    assert key_of(spec.id, as_file) == job.key
    assert as_file == stored_keyed_input(spec, {**job.input, "image_url": uri}, None)  # decoded
    Image.new("RGB", (480, 480), (1, 2, 3)).save(image)  # changed since: the record still holds
    assert stored_keyed_input(spec, job.input, recorded) == as_file
    assert stored_keyed_input(spec, job.input, None)["image_url"] == f"missing:{job.input['image_url']}"


def _jobs(folder: Path, image: str) -> list[JobSpec]:
    path = folder / "m.yaml"
    path.write_text(
        f"name: m\nendpoint: fal-ai/wan-i2v\nitems:\n  - {{prompt: p, seed: 7, image_url: '{image}'}}\n",
        encoding="utf-8",
    )
    return list(load_manifest(path).jobs())
