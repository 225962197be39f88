"""`--simulate` batches and batches sent to fal never mix, from the command line.

The `sim` fixture plays real fal (FAL_KEY set, `WANBATCH_FAL_QUEUE_URL` at the session's
simulator, whose ledger says what "fal" accepted); `--simulate` starts a simulator of its own
inside the command, which this ledger never sees.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts, db_rows, export_jsonl

CLIP = """name: clip
endpoint: fal-ai/wan-22
items:
  - prompt: a lighthouse at dusk
    seed: 7
  - prompt: a lighthouse at dawn
    seed: 8
"""


def _status(wb: Wb, batch: str) -> dict[str, Any]:
    run = wb("status", batch, "--json")
    assert run.code == 0, run.stdout + run.stderr
    report: dict[str, Any] = run.json()
    return report


def test_dropping_simulate_sends_the_manifest_to_fal(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """The README's path: `run --simulate`, then the same without it. Before, the second run
    found the simulated batch done and sent nothing to fal."""
    path = manifest("clip", CLIP)
    first = wb("run", path, "--simulate", "--no-progress", "--json")
    assert first.code == 0, first.stdout + first.stderr
    assert (first.json()["name"], first.json()["simulated"]) == ("clip", True)
    assert sim.ledger()["accepted"] == 0  # the simulation went to its own simulator

    second = wb("run", path, "--no-progress", "--json")
    assert second.code == 0, second.stdout + second.stderr
    assert (
        "batch clip was a simulation (`--simulate`): renamed clip-simulated; a new batch clip goes to fal"
        in " ".join(second.stderr.split())
    )
    report = second.json()
    assert (report["name"], report["simulated"], report["counts"]["succeeded"]) == ("clip", False, 2)
    assert sim.ledger()["accepted"] == 2  # sent to fal this time
    assert report["batch"] != first.json()["batch"]

    kept = _status(wb, "clip-simulated")
    assert (kept["batch"], kept["simulated"]) == (first.json()["batch"], True)
    # The placeholder videos were filed apart from the start: the paid batch's folder has its own.
    simulated = {r["video_path"].split("/")[0] for r in export_jsonl(wb, "clip-simulated")}
    paid = {r["video_path"].split("/")[0] for r in export_jsonl(wb, "clip")}
    assert (simulated, paid) == ({"clip-simulated"}, {"clip"})

    # A --simulate run of the manifest now resumes that simulation; fal sees nothing more.
    again = wb("run", path, "--simulate", "--no-progress", "--json")
    assert again.code == 0, again.stdout + again.stderr
    assert again.json()["batch"] == first.json()["batch"]
    assert sim.ledger()["accepted"] == 2


def test_a_simulation_never_joins_a_paid_batch(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    path = manifest("clip", CLIP)
    paid = wb("run", path, "--no-progress", "--json")
    assert paid.code == 0, paid.stdout + paid.stderr
    simulated = wb("run", path, "--simulate", "--no-progress", "--json")
    assert simulated.code == 0, simulated.stdout + simulated.stderr
    assert (simulated.json()["name"], simulated.json()["simulated"]) == ("clip-simulated", True)
    assert simulated.json()["counts"]["succeeded"] == 2
    assert sim.ledger()["accepted"] == 2  # only the paid run's
    assert _status(wb, "clip")["counts"] == paid.json()["counts"]


def test_processing_a_batch_the_other_way_is_refused(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("clip", CLIP)
    assert wb("submit", path).code == 0  # stored for fal, nothing sent yet

    wrong = wb("run", "clip", "--simulate", "--no-progress")
    assert wrong.code == 2
    assert wrong.stderr.strip().splitlines() == [
        "error: batch clip is sent to fal: `--simulate` would mix simulated videos into it; go on "
        "without `--simulate` (`wanbatch run MANIFEST --simulate` simulates its manifest as a batch "
        "of its own)"
    ]
    assert _status(wb, "clip")["counts"]["pending"] == 2  # nothing went to the simulator

    other = manifest("other", CLIP.replace("name: clip", "name: other"))
    interrupted = wb("run", other, "--simulate", "--no-progress")
    assert interrupted.code == 0
    refused = wb("run", "other", "--no-progress")
    assert refused.code == 2
    assert "batch other is a simulation (made by `--simulate`)" in refused.stderr
    assert "`wanbatch run other --simulate` goes on" in refused.stderr
    assert sim.ledger()["accepted"] == 0  # fal never saw either batch
    assert "Traceback" not in wrong.stderr + refused.stderr


def test_run_of_a_simulation_without_a_key_says_simulate_not_get_a_key(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer after the quickstart has no FAL_KEY: ``run NAME`` of the simulation said
    "FAL_KEY is not set: export FAL_KEY=…", sending them off to get a key for a batch that never
    goes to fal (and then the simulation's refusal). The refusal that says how to go on comes
    first."""
    other = manifest("other", CLIP.replace("name: clip", "name: other"))
    assert wb("run", other, "--simulate", "--no-progress").code == 0
    monkeypatch.delenv("FAL_KEY")
    refused = wb("run", "other", "--no-progress")
    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [
        "error: batch other is a simulation (made by `--simulate`): nothing of it goes to fal; "
        "`wanbatch run other --simulate` goes on (run its manifest without `--simulate` to send it "
        "to fal)"
    ]


def test_the_refusal_names_a_batch_the_shell_would_split_by_its_id(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """ "`wanbatch cancel two words --simulate` goes on" is two arguments to a shell: copied, it
    was a usage error. The refusal names such a batch as every hint does (`shell_ref`)."""
    spaced = manifest("spaced", CLIP.replace("name: clip", 'name: "two words"'))
    assert wb("run", spaced, "--simulate", "--no-progress").code == 0
    batch_id = _leave_one_pending("two words")

    refused = wb("cancel", "two words", "--no-progress")
    assert refused.code == 2
    found = re.search(r"`(wanbatch cancel [^`]*)` goes on", refused.stderr)
    assert found, refused.stderr
    assert found.group(1) == f"wanbatch cancel {batch_id[:12]} --simulate"
    copied = wb(*shlex.split(found.group(1))[1:], "--no-progress")
    assert copied.code == 1, copied.stderr  # the job left pending is cancelled
    assert _status(wb, "two words")["phase"] == "cancelled"


def _leave_one_pending(batch: str) -> str:
    """Put one job of a finished batch back to ``pending`` (a run stopped before sending it);
    returns the batch id."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import Job
    from jobs.settings import get_settings
    from jobs.states import JobState

    with db.session_scope(db.open_engine(get_settings())) as session:
        batch_id = store.get_batch(session, batch).id
        first = next(iter(store.jobs_of_batch(session, batch_id))).id
        session.execute(update(Job).where(Job.id == first).values(state=JobState.PENDING))
    return batch_id


def test_cancel_the_other_way_is_refused_before_anything_changes(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """The README: `cancel` of a simulation without `--simulate` is refused, exit 2. It used to
    cancel the batch first and then say "refused": a script reading exit 2 thought nothing
    happened."""
    other = manifest("other", CLIP.replace("name: clip", "name: other"))
    assert wb("run", other, "--simulate", "--no-progress").code == 0
    _leave_one_pending("other")
    before = _status(wb, "other")

    refused = wb("cancel", "other", "--no-progress")

    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [
        "error: batch other is a simulation (made by `--simulate`): nothing of it goes to fal; "
        "`wanbatch cancel other --simulate` goes on (run its manifest without `--simulate` to send "
        "it to fal)"
    ]
    after = _status(wb, "other")
    assert (after["state"], after["phase"], after["counts"]) == ("active", before["phase"], before["counts"])
    assert after["counts"]["pending"] == 1
    # The way the refusal names goes on.
    cancelled = wb("cancel", "other", "--simulate", "--no-progress", "--json")
    assert cancelled.code == 1, cancelled.stderr
    assert (cancelled.json()["state"], cancelled.json()["counts"]["cancelled"]) == ("cancelled", 1)

    # And a batch for fal is not cancelled by a `cancel --simulate` (which used to cancel it).
    assert wb("submit", manifest("clip", CLIP)).code == 0
    wrong = wb("cancel", "clip", "--simulate", "--no-progress")
    assert wrong.code == 2
    assert wrong.stderr.strip().splitlines()[0].startswith("error: batch clip is sent to fal")
    kept = _status(wb, "clip")
    assert (kept["state"], kept["counts"]["pending"]) == ("active", 2)
    assert sim.ledger()["accepted"] == 0


def test_run_batch_the_other_way_leaves_a_paused_batch_paused(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`run NAME` of a simulation that fal's refusal (or a full disk) paused: refused before
    `run` resumes it (it used to resume the batch, then refuse)."""
    from jobs import db, store
    from jobs.models import BatchState
    from jobs.settings import get_settings

    assert wb("run", manifest("other", CLIP.replace("name: clip", "name: other")), "--simulate").code == 0
    batch_id = _leave_one_pending("other")
    with db.session_scope(db.open_engine(get_settings())) as session:
        store.set_batch_state(session, batch_id, BatchState.PAUSED, reason="disk full")

    refused = wb("run", "other", "--no-progress")

    assert refused.code == 2
    assert "batch other is a simulation" in refused.stderr
    after = _status(wb, "other")
    assert (after["state"], after["pause_reason"]) == ("paused", "disk full")


def test_cancel_simulate_with_a_broker_is_refused_before_anything_changes(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wb("run", manifest("clip", CLIP), "--simulate", "--no-progress").code == 0
    _leave_one_pending("clip")
    monkeypatch.setenv("WANBATCH_BROKER_URL", "redis://127.0.0.1:6379/0")
    refused = wb("cancel", "clip", "--simulate", "--no-progress")
    assert refused.code == 2
    assert "unset WANBATCH_BROKER_URL to simulate" in refused.stderr
    monkeypatch.delenv("WANBATCH_BROKER_URL")
    assert _status(wb, "clip")["counts"]["pending"] == 1


def test_simulate_with_a_broker_is_refused_before_anything_is_stored(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a broker the workers, not this process, send the jobs: with fal's settings."""
    monkeypatch.setenv("WANBATCH_BROKER_URL", "redis://127.0.0.1:6379/0")
    run = wb("run", manifest("clip", CLIP), "--simulate", "--no-progress")
    assert run.code == 2
    assert run.stderr.strip().splitlines() == [
        "error: --simulate runs the work in this process, but WANBATCH_BROKER_URL is set: the workers "
        "would send it to fal; unset WANBATCH_BROKER_URL to simulate"
    ]
    db_file = tmp_path / "wanbatch.db"
    assert not db_file.exists() or counts(f"sqlite:///{db_file}") == (0, 0)


def test_status_tells_how_a_stopped_simulation_goes_on(wb: Wb, manifest: MakeManifest) -> None:
    """A simulation left with work: only `run NAME --simulate` goes on (a worker never sends
    it), and the workers' heartbeat does not make it "processing"."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import Job, utcnow
    from jobs.settings import get_settings
    from jobs.states import JobState

    assert wb("run", manifest("clip", CLIP), "--simulate", "--no-progress").code == 0
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        batch_id = store.get_batch(session, "clip").id
        first = next(iter(store.jobs_of_batch(session, batch_id))).id
        session.execute(update(Job).where(Job.id == first).values(state=JobState.PENDING))
        store.record_heartbeat(session, "worker:2:", ["*"], utcnow())

    report = _status(wb, "clip")
    assert (report["simulated"], report["processing"]) == (True, False)
    human = " ".join(wb("status", "clip").stdout.split())
    assert "· simulated" in human
    assert "nothing is processing it: `wanbatch run clip --simulate` goes on" in human
    assert "or a worker" not in human
    listed = wb("status").stdout.splitlines()  # the batch list names the simulations under its table
    assert f"simulated (`--simulate`): {batch_id[:8]}" in listed
    assert "· simulated: nothing was paid" in " ".join(wb("cost", "clip").stdout.split())
    assert wb("cost", "clip", "--json").json()["simulated"] is True


def test_exports_say_which_videos_are_simulated(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """A dataset made from a simulation must not pass for the model's output."""
    import pyarrow.parquet as pq

    path = manifest("clip", CLIP)
    assert wb("run", path, "--simulate", "--no-progress").code == 0
    assert wb("run", path, "--no-progress").code == 0  # the paid one takes the name back

    for batch, simulated in (("clip-simulated", True), ("clip", False)):
        records = export_jsonl(wb, batch)
        assert [r["simulated"] for r in records] == [simulated, simulated]
        target = tmp_path / f"{batch}.parquet"
        assert wb("export", batch, "--format", "parquet", "-o", target).code == 0
        column = pq.read_table(target).column("simulated")
        assert str(column.type) == "bool"
        assert column.to_pylist() == [simulated, simulated]
        folder = tmp_path / f"{batch}-hf"
        assert wb("export", batch, "--format", "hf", "-o", folder).code == 0
        card = (folder / "README.md").read_text()
        assert ("**Simulated** videos" in card) is simulated
        assert ("tags: [video, synthetic, wanbatch, simulated]" in card) is simulated
        assert ("Videos generated with fal.ai's hosted Wan endpoints" in card) is not simulated


def _leave_at_provider(batch: str, request_id: str) -> str:
    """Put the first job of ``batch`` "at its provider" as ``request_id``, as a run stopped
    right after the submit leaves it; returns the job's id."""
    from jobs import db, store
    from jobs.models import utcnow
    from jobs.settings import get_settings
    from jobs.states import JobState

    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        job = next(iter(store.jobs_of_batch(session, store.get_batch(session, batch).id)))
        assert store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, reason="attempt 1")
        assert store.transition(
            session,
            job.id,
            JobState.SUBMITTING,
            JobState.QUEUED,
            reason=f"accepted as {request_id}",
            request_id=request_id,
            submitted_at=utcnow(),
        )
        return job.id


def _job_state(job_id: str) -> tuple[str, str | None]:
    from jobs import db, store
    from jobs.settings import get_settings

    with db.read_scope(db.open_engine(get_settings())) as session:
        job = store.get_job(session, job_id)
        return job.state.value, job.error


def test_a_simulation_never_asks_its_simulator_about_requests_at_fal(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """A rehearsal while a paid batch still has requests at fal (an interrupted run). Before, the
    `--simulate` run polled them at its own simulator, which answered 404, and each ended
    "provider lost the request" while fal went on running and billing it."""
    assert wb("submit", manifest("prod", CLIP.replace("name: clip", "name: prod"))).code == 0
    paid = _leave_at_provider("prod", "request-at-fal")

    rehearsal = wb("run", manifest("clip", CLIP), "--simulate", "--no-progress", "--json")
    assert rehearsal.code == 0, rehearsal.stdout + rehearsal.stderr
    assert rehearsal.json()["counts"]["succeeded"] == 2
    assert _job_state(paid) == ("queued", None)  # still fal's, untouched


def test_fal_is_never_asked_about_a_simulations_requests(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """The other way: a paid run while an interrupted simulation has requests at its (gone)
    simulator. Polling them at fal would end them "lost"; `run NAME --simulate` resumes them."""
    from jobs import db
    from jobs.settings import get_settings
    from tests.step_runtime import add_batch

    add_batch(
        db.open_engine(get_settings()), "rehearsal", [("fal-ai/wan-22", {"prompt": "x"})], simulated=True
    )
    simulated = _leave_at_provider("rehearsal", "request-at-a-simulator")

    paid = wb("run", manifest("clip", CLIP), "--no-progress", "--json")
    assert paid.code == 0, paid.stdout + paid.stderr
    assert paid.json()["counts"]["succeeded"] == 2
    assert _job_state(simulated) == ("queued", None)
    assert sim.ledger()["accepted"] == 2  # the paid batch's; fal heard nothing of the simulation


def test_a_simulation_never_sends_the_users_fal_key(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """FAL_KEY goes to fal only; and the simulation's requests count against a key of their own,
    not against fal's outstanding cap."""
    from jobs import db
    from jobs.settings import get_settings
    from worker.limits import api_key_id

    path = manifest("clip", CLIP)
    assert wb("run", path, "--simulate", "--no-progress").code == 0
    assert wb("run", path, "--no-progress").code == 0
    keys = dict(
        db_rows(
            str(db.open_engine(get_settings()).url),
            "SELECT batches.name, min(jobs.api_key_id) FROM jobs JOIN batches ON batches.id = jobs.batch_id "
            "GROUP BY batches.name",
        )
    )
    assert keys["clip"] == api_key_id(get_settings())
    assert keys["clip-simulated"] not in (None, keys["clip"])


def test_a_paid_batch_never_reuses_a_simulated_video(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`reuse_outputs: true` gives a pinned-seed job the video of a succeeded twin. Before, the
    twin could be a simulation's: after a rehearsal, "drop `--simulate`" sent nothing to fal and
    filled the paid batch with the simulator's placeholder videos, as if rendered."""
    path = manifest("clip", CLIP + "reuse_outputs: true\n")
    rehearsal = wb("run", path, "--simulate", "--no-progress", "--json")
    assert rehearsal.code == 0, rehearsal.stdout + rehearsal.stderr
    paid = wb("run", path, "--no-progress", "--json")
    assert paid.code == 0, paid.stdout + paid.stderr
    assert paid.json()["counts"]["succeeded"] == 2
    assert sim.ledger()["accepted"] == 2  # rendered by fal, not taken from the rehearsal
    assert [r["reused_from"] for r in export_jsonl(wb, "clip")] == [None, None]

    # Between two batches sent to fal, reuse works as before.
    again = manifest("again", CLIP.replace("name: clip", "name: again") + "reuse_outputs: true\n")
    assert wb("run", again, "--no-progress").code == 0
    assert sim.ledger()["accepted"] == 2
    assert all(r["reused_from"] for r in export_jsonl(wb, "again"))


def test_a_paid_run_never_sends_fal_an_image_url_of_a_simulator(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploaded images are remembered by content, to be sent once. Before, a `--simulate` run's
    uploads (URLs of its own simulator, gone with it) were remembered too, and the paid run
    after it sent fal those dead loopback URLs instead of uploading the images."""
    from jobs.settings import get_settings

    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # every example image is uploaded
    get_settings.cache_clear()
    body = """name: stills
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 1
"""
    path = manifest("stills", body)
    assert wb("run", path, "--simulate", "--no-progress").code == 0
    paid = wb("run", path, "--no-progress", "--json")
    assert paid.code == 0, paid.stdout + paid.stderr
    (record,) = export_jsonl(wb, "stills")
    assert str(record["input"]["image_url"]).startswith(sim.url)  # uploaded to fal's storage


def test_a_simulation_ignores_fals_webhook_receiver(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WANBATCH_WEBHOOK_URL set (a deployment's receiver), `--simulate` used to pass it to
    its simulator: the simulator posted to fal's receiver (rejected there as forged), and the run,
    waiting for webhooks rather than following status streams, heard of each completion only from
    the safety-net poll after WANBATCH_WEBHOOK_POLL_AFTER (here an hour: the run would hang)."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", "https://hooks.example.invalid/webhooks/fal")
    monkeypatch.setenv("WANBATCH_WEBHOOK_POLL_AFTER", "3600")
    run = wb("run", manifest("clip", CLIP), "--simulate", "--no-progress", "--json")
    assert run.code == 0, run.stdout + run.stderr
    assert run.json()["counts"]["succeeded"] == 2


def test_simulate_settings_never_carry_fals_key_or_receiver() -> None:
    from pydantic import SecretStr

    from cli.batch_commands import SIMULATOR_KEY, fal_settings
    from jobs.settings import Settings

    real = Settings(FAL_KEY=SecretStr("real-key"), webhook_url="https://hooks.example.com/webhooks/fal")
    with fal_settings(real, True, check=False) as simulated:
        assert simulated.fal_key is not None
        assert simulated.fal_key.get_secret_value() == SIMULATOR_KEY
        assert simulated.webhook_url is None
        assert simulated.fal_queue_url.startswith("http://127.0.0.1:")


def test_a_rehearsed_sweep_sent_to_fal_keeps_its_rerun_names_apart(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`run --simulate`, `rerun --simulate`, then the manifest for real: the rehearsal's
    `clip-rerun-1` stayed, read as a rerun of the paid `clip`, and `diff clip clip-rerun-1`
    compared fal's videos with the simulator's without a word ("2 same", exit 0)."""
    path = manifest("clip", CLIP)
    for command in (["run", str(path)], ["rerun", "clip"], ["rerun", "clip-rerun-1"]):
        done = wb(*command, "--simulate", "--no-progress", "--json")
        assert done.code == 0, done.stdout + done.stderr

    paid = wb("run", path, "--no-progress", "--json")

    assert paid.code == 0, paid.stdout + paid.stderr
    assert (
        "batch clip was a simulation (`--simulate`): renamed clip-simulated with its simulated reruns "
        "(clip-rerun-1 → clip-simulated-rerun-1, clip-rerun-1-rerun-1 → clip-simulated-rerun-1-rerun-1); "
        "a new batch clip goes to fal"
    ) in " ".join(paid.stderr.split())
    for name in ("clip-simulated-rerun-1", "clip-simulated-rerun-1-rerun-1"):
        assert _status(wb, name)["simulated"] is True
    assert wb("status", "clip-rerun-1", "--json").code == 2  # no batch holds the name now

    rerun = wb("rerun", "clip", "--no-progress", "--json")  # the paid batch's first rerun
    assert rerun.code == 0, rerun.stdout + rerun.stderr
    assert (rerun.json()["name"], rerun.json()["simulated"]) == ("clip-rerun-1", False)
    assert wb("diff", "clip", "clip-rerun-1").stderr == ""

    # Compared across the two kinds all the same, diff says so.
    mixed = wb("diff", "clip", "clip-simulated-rerun-1")
    assert "Traceback" not in mixed.stderr
    assert (
        "warning clip-simulated-rerun-1 is a simulation (`--simulate`) and clip was sent to fal: "
        "the simulator's videos are placeholders"
    ) in " ".join(mixed.stderr.split())
    report = wb("diff", "clip", "clip-simulated-rerun-1", "--json").json()
    assert (report["batch_a"]["simulated"], report["batch_b"]["simulated"]) == (False, True)
    assert wb("diff", "clip-simulated", "clip-simulated-rerun-1").stderr == ""  # two rehearsals
