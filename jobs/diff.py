"""``wanbatch diff``: two stored batches compared job by job.

What a reproducibility sweep asks is "did the same request give the same clip?", so jobs are
paired by what was asked, never by when or where they ran:

1. **by job key** — the hash of the endpoint and the resolved input, seed included. Two jobs with
   the same key sent the same request; a ``rerun`` of a batch whose seeds were pinned gets the
   same keys.
2. **by input except the seed** — the endpoint and the stored resolved input with ``seed`` left
   out, the endpoint's documented defaults filled in (``num_frames: 81`` left out asks what
   ``num_frames: 81`` given asks), images and audio by their bytes as in the job key (the
   SHA-256 ``source_files`` recorded: a file and a data URI of the same image are one input).
   A ``rerun`` writes the seed fal returned (or, with ``--new-seeds``, a fresh one) into the
   input, so the key of a job whose seed fal picked changes while everything else stays; this
   pass pairs those, the one combination of a ``rerun --vary`` that asks what its original
   asked, and a replay sending inline (a data URI) the image another run read from a file,
   under new seeds. Jobs that differ only by seed (a ``matrix: seed: [...]``) pair in item
   order.
3. **by origin** — a rerun's job records the parent's job it repeats (``rerun_of``): a job left
   over pairs with the first of its own repeats left over, for jobs whose input changed
   (``rerun --vary``, which also numbers each original's combinations anew).
4. **by item and variant** — ``item_index`` and the matrix combination's index within the item
   (``variant``): the same place in the same manifest, for jobs whose input changed (an edited
   prompt, a replaced image) and reruns stored before ``rerun_of`` existed. Only for batches of
   one manifest (:func:`_places_rule`): item 0 of two unrelated manifests is no pair, and
   calling it "different" would hide that the batches are unrelated. ``item_index`` alone would
   not do either: every matrix combination of an item shares it. Two jobs of different
   endpoints never pair here (another model is no place of the same experiment), and a job
   whose origin is in the other batch never does either: its place was renumbered.

Jobs left unpaired are ``only_a`` / ``only_b``.

A pair is ``same`` when both jobs have an output and its SHA-256 is equal (byte-for-byte the same
video); anything else — another video, or a job of the pair without one — is ``different``. A
``same`` pair whose two videos are one render (:attr:`Pair.reused`: a side took the other's
output under ``reuse_outputs``, or both took the same original's) is still ``same`` — the bytes
are — but flagged: nothing was rendered twice, so it is no evidence that fal reproduces it. The
seeds, the prompts actually used and the costs are reported per pair, with the fields that differ.
A job never sent (cancelled by a budget or a cancel) has no returned seed: its seed is the one its
input pinned (``pinned_seed``), if any. :meth:`BatchDiff.varied` names, for each job, the input
fields that tell it from the other jobs of its item (a matrix's ``resolution``, say), which
``item_index`` alone cannot.

A batch compared with itself (``diff X X``) pairs every job with itself (:attr:`Pair.same_job`,
by its key): nothing was reused between the two sides, and nothing differs between a job and
itself, so such a pair is never flagged as reused and names nothing in ``differs``; its outcome
keeps its meaning (``same`` when the job has a video, else ``different``: the exit code says
whether every job of the batch has one). :meth:`BatchDiff.same_batch_note` says it in one line.

Each side says whether it is a simulation (``simulated``): the simulator's placeholder videos say
nothing about what fal renders, so a simulation compared with a batch sent to fal is said
(:meth:`BatchDiff.simulated_note`), whatever the counts.

Pure over the store: it reads the two batches and writes nothing.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy.orm import Session

from jobs import store
from jobs.endpoints import get_endpoint
from jobs.errors import UsageError
from jobs.manifest import canonical_json, stored_keyed_input, with_defaults
from jobs.models import Batch
from jobs.money import usd_json
from jobs.output_location import is_s3_url
from jobs.output_store import OutputReadError, output_stamp
from jobs.outputs_on_disk import OnDisk, look_at
from jobs.url_secrets import shareable_text

Outcome = Literal["same", "different", "only_a", "only_b"]
MatchedBy = Literal["job_key", "input", "origin", "item"]
#: When the fourth pass (item and variant) runs: always (``True``), never (``False``), or
#: ``"if_shared"``, only when the first three paired at least one job (see :func:`_places_rule`).
ByPlace = bool | Literal["if_shared"]
_K = TypeVar("_K")
#: How many S3 objects ``diff`` looks up at once (one ``HEAD`` each): fewer than the 10
#: connections botocore keeps per client, so no lookup waits for one or opens one it then drops.
S3_LOOKUPS_AT_ONCE = 8
#: The most seconds ``diff`` spends looking up S3 objects (without ``--verify``): a bucket of
#: many thousand videos, or a slow storage, must not hold the comparison for long. Objects left
#: are not looked up, and said so (:meth:`BatchDiff.lookup_note`).
S3_LOOKUP_SECONDS = 120.0
#: A side's :data:`OnDisk` as the pair's ``differs`` names it.
_DISK_DIFFERS = {"missing": "missing on disk", "changed on disk": "changed on disk"}
#: The input of a side read from the store: not kept (:meth:`JobSide.of`). Never mutated.
_NO_INPUT: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class JobSide:
    """What the diff needs of one job (read once, so the ORM rows can go)."""

    job_id: str
    job_key: str
    item_index: int
    #: The matrix combination within the item: with ``item_index``, the third matching pass.
    variant: int
    endpoint: str
    status: str
    seed: int | None
    #: The prompt fal reports it used (Wan 2.5/2.6 may rewrite it), else the one sent.
    prompt: str | None
    video_sha256: str | None
    cost_usd: float | None
    #: Endpoint and input without the seed, defaults filled in, media by their bytes' SHA-256, as
    #: canonical JSON (read from the store: that text's SHA-256): the second pass.
    unseeded: str
    #: The parent batch's job this one repeats (a rerun's), else None: the third pass.
    rerun_of: str | None = None
    #: The seed the job's input pins (the manifest's, or a rerun's), else None: the seed of a job
    #: never sent, which fal returned none for.
    pinned_seed: int | None = None
    #: The stored input (validated, or resolved for a rerun): what tells an item's jobs apart.
    #: Empty for a side read from the store (:meth:`of`), which keeps no input: :func:`varied_of`.
    input: dict[str, Any] = field(default_factory=dict, compare=False)
    #: ``reuse_outputs``: the job whose output this one took instead of being sent, else None.
    reused_from: str | None = None
    #: The recorded video as found on disk (:func:`on_disk`), None when not looked at.
    on_disk: OnDisk | None = None
    #: Where the video was looked for, kept only when it is not there as recorded (the path
    #: the diff names); None otherwise.
    video_path: str | None = None
    #: Its video is an S3 object that could not be looked up (the storage unreachable or
    #: refusing, or the time bound spent): compared by the SHA-256 recorded only.
    not_looked_up: bool = False
    #: Requests sent for the job (each one fal billed is in ``cost_usd``); None when unknown.
    attempts: int | None = None

    @property
    def disk_problem(self) -> str | None:
        """What ``differs`` says of this side's video on disk (``missing on disk``, ``changed
        on disk``), else None."""
        return None if self.on_disk is None else _DISK_DIFFERS.get(self.on_disk)

    @property
    def rendered_by(self) -> str:
        """The job whose request made this job's video: the one it reused, else itself."""
        return self.reused_from or self.job_id

    def filled_input(self) -> dict[str, Any]:
        """The input with the endpoint's documented defaults filled in."""
        return with_defaults(self.endpoint, self.input)

    @property
    def effective_seed(self) -> int | None:
        """The seed fal used, else (never sent) the one the input pinned."""
        return self.seed if self.seed is not None else self.pinned_seed

    @classmethod
    def of(cls, row: store.DiffRow, disk: DiskCheck | None = None) -> JobSide:
        """The side of the job ``row``: its input is read here (the second pass's key, the
        pinned seed, the prompt) and not kept (:meth:`BatchDiff.varied` reads it again for the
        rows a table shows, :func:`varied_of`), nor is any other JSON column. ``disk``: how its
        recorded video is looked at on disk (:func:`on_disk`); None: not at all."""
        given = row.input if isinstance(row.input, dict) else {}
        prompt = row.actual_prompt if row.actual_prompt is not None else given.get("prompt")
        found, looked_at = (None, None) if disk is None else on_disk(row, disk)
        return cls(
            job_id=row.id,
            job_key=row.job_key,
            item_index=row.item_index,
            variant=row.variant,
            endpoint=sys.intern(row.endpoint),
            status=sys.intern(row.state.value),
            seed=None if row.seed is None else int(row.seed),
            prompt=prompt if isinstance(prompt, str) else None,
            video_sha256=row.output_sha256,
            cost_usd=usd_json(row.actual_usd),
            unseeded=_unseeded(row.endpoint, given, row.source_files),
            rerun_of=row.rerun_of,
            pinned_seed=_pinned(given.get("seed")),
            input=_NO_INPUT,
            reused_from=row.reused_from,
            on_disk=found,
            video_path=looked_at,
            attempts=row.attempts,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_key": self.job_key,
            "item_index": self.item_index,
            "variant": self.variant,
            "endpoint": self.endpoint,
            "status": self.status,
            "seed": self.seed,
            "pinned_seed": self.pinned_seed,
            # Masked as an export masks it (FAL_KEY, a fal key's shape, URL credentials); the
            # comparison reads it as stored.
            "prompt": None if self.prompt is None else shareable_text(self.prompt),
            "video_sha256": self.video_sha256,
            "cost_usd": self.cost_usd,
            "reused_from": self.reused_from,
            # The video as found on disk: "ok", "missing", "changed on disk", or null (not
            # looked at); video_path names where it was looked for when it is not "ok".
            "on_disk": self.on_disk,
            "video_path": self.video_path,
        }


@dataclass(frozen=True, slots=True)
class DiskCheck:
    """How ``diff`` looks at the recorded videos: ``root``, the current output folder, where a
    moved project's videos are looked for (:func:`jobs.moved_outputs.places_to_look`; None: only
    where recorded); ``verify``: hash each video (``--verify``), not only its size.

    Without ``verify``, S3 objects get what a local video gets, its size looked at: one ``HEAD``
    each, :data:`S3_LOOKUPS_AT_ONCE` at a time, for at most ``lookup_seconds``
    (:func:`_look_up_objects`). ``announce`` is told how many before they start (the command
    says so on stderr: a big batch's lookups take a while, and each is a request to the bucket)."""

    root: Path | None
    verify: bool = False
    announce: Callable[[int], None] | None = None
    lookup_seconds: float = S3_LOOKUP_SECONDS


def on_disk(row: store.DiffRow, check: DiskCheck) -> tuple[OnDisk | None, str | None]:
    """What is at the path the video of ``row`` was recorded at, and that path when it is not
    the video recorded (:func:`jobs.outputs_on_disk.look_at`, the check ``status`` shares: one
    ``lstat`` and its size against the recorded one; with ``check.verify`` its SHA-256 too, an
    S3 object's included). ``(None, None)`` for a job without a recorded video, and for an S3
    object without ``check.verify``: those are looked up together afterwards
    (:func:`_look_up_objects`), a few at a time, not one by one as rows are read."""
    return look_at(row, check.root, verify=check.verify)


def _keyed(endpoint: str, given: dict[str, Any], sources: dict[str, Any] | None) -> dict[str, Any]:
    """The input as the job key sees it: defaults filled in, each image or audio by the SHA-256
    of its bytes (:func:`stored_keyed_input`)."""
    filled = with_defaults(endpoint, given)
    try:
        return stored_keyed_input(get_endpoint(endpoint), filled, sources)
    except UsageError:  # an endpoint the registry no longer has: its input as stored
        return filled


def _field_digests(endpoint: str, given: object, sources: object) -> dict[str, str]:
    """Each input field but the seed (as :func:`_keyed` sees it) → the SHA-256 of its canonical
    JSON: what tells two paired jobs' inputs apart, kept small."""
    keyed = _keyed(
        endpoint, given if isinstance(given, dict) else {}, sources if isinstance(sources, dict) else None
    )
    return {
        sys.intern(name): hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]
        for name, value in keyed.items()
        if name != "seed"
    }


def _unseeded(endpoint: str, given: dict[str, Any], sources: dict[str, Any] | None) -> str:
    """The second pass's key: endpoint and input without the seed, defaults filled in, each
    image or audio by the SHA-256 of its bytes as the job key has it (a file and a data URI of
    the same image are one value; :func:`stored_keyed_input`); as the SHA-256 of that text, so
    that a job's whole input (a long prompt, an inline image) is not kept for it."""
    keyed = _keyed(endpoint, given, sources)
    rest = {k: v for k, v in keyed.items() if k != "seed"}
    return hashlib.sha256((endpoint + "\n" + canonical_json(rest)).encode()).hexdigest()


def _pinned(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Pair:
    """One line of the diff: two matched jobs, or one job the other batch has no match for."""

    a: JobSide | None
    b: JobSide | None
    matched_by: MatchedBy | None
    #: The input fields (the seed aside: it has its own check) whose values differ between the
    #: two jobs, as the job key sees them (images by their bytes): set by :func:`diff_batches`
    #: for the pairs matched by origin or by place; the other passes pair equal inputs.
    input_differs: tuple[str, ...] = ()

    @property
    def outcome(self) -> Outcome:
        if self.b is None:
            return "only_a"
        if self.a is None:
            return "only_b"
        same = self.a.video_sha256 is not None and self.a.video_sha256 == self.b.video_sha256
        # The recorded bytes are no verdict when the video on disk is not them (gone, replaced).
        same = same and not self.disk_problems()
        return "same" if same else "different"

    def disk_problems(self) -> list[str]:
        """What ``differs`` says of the pair's videos on disk (:attr:`JobSide.disk_problem`),
        each once."""
        sides = (self.a,) if self.same_job else (self.a, self.b)
        found = [side.disk_problem for side in sides if side is not None and side.disk_problem]
        return list(dict.fromkeys(found))

    @property
    def same_job(self) -> bool:
        """Both sides are one job (a batch compared with itself)."""
        return self.a is not None and self.b is not None and self.a.job_id == self.b.job_id

    @property
    def reused(self) -> bool:
        """Both sides' videos come from one render: one side reused the other's output, or both
        reused the same original's (``reuse_outputs``). Equal bytes then say nothing about
        whether the request reproduces: it was rendered once. Never for a job compared with
        itself (:attr:`same_job`): nothing was reused between the two sides, whether or not the
        job took its video from another."""
        if self.a is None or self.b is None or self.same_job:
            return False
        return self.a.rendered_by == self.b.rendered_by

    def differs(self) -> list[str]:
        """Which of endpoint, video, status, seed, prompt and cost differ, then each input field
        that differs as ``input:NAME`` (:attr:`input_differs`), then ``missing on disk`` /
        ``changed on disk`` when a side's video is not the one recorded (:meth:`disk_problems`).
        Empty for an unmatched job; for a job compared with itself only what is wrong on disk
        (nothing else differs, with a video or without)."""
        a, b = self.a, self.b
        if a is None or b is None:
            return []
        if self.same_job:
            return self.disk_problems()
        checks = {
            "endpoint": a.endpoint != b.endpoint,
            "video": a.video_sha256 is None or a.video_sha256 != b.video_sha256,
            "status": a.status != b.status,
            "seed": a.effective_seed != b.effective_seed,
            "prompt": a.prompt != b.prompt,
            "cost": a.cost_usd != b.cost_usd,
        }
        named = [name for name, differ in checks.items() if differ]
        return named + [f"input:{name}" for name in self.input_differs] + self.disk_problems()

    @property
    def cost_differs(self) -> bool:
        """A pair of the same video whose costs differ: a side paid for more attempts
        (:attr:`attempts_differ`), or the price changed between the runs."""
        return (
            self.outcome == "same"
            and not self.same_job
            and self.a is not None
            and self.b is not None
            and self.a.cost_usd != self.b.cost_usd
        )

    @property
    def attempts_differ(self) -> bool:
        """Whether the two sides sent a different number of requests (both known, both sent): a
        failed attempt fal billed (a 4xx after GPU time, a cancel while running) is in a job's
        cost, so equal videos then differ in cost with the price unchanged."""
        a, b = self.a, self.b
        if a is None or b is None or not a.attempts or not b.attempts:
            return False
        return a.attempts != b.attempts

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.outcome,
            "matched_by": self.matched_by,
            "differs": self.differs(),
            "input_differs": list(self.input_differs),
            "reused": self.reused,
            "a": None if self.a is None else self.a.as_dict(),
            "b": None if self.b is None else self.b.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class BatchDiff:
    """The comparison of batch A with batch B (``diff --json`` is :meth:`as_dict`)."""

    #: ``{"batch": id, "name": name, "simulated": bool}`` of each side (plain values: usable
    #: after the session ends).
    batch_a: dict[str, Any]
    batch_b: dict[str, Any]
    pairs: list[Pair]
    #: Why S3 objects could not be looked up (the first failure), else None.
    lookup_failure: str | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for p in self.pairs if p.outcome == outcome)

    @property
    def identical(self) -> bool:
        """Every job matched and every pair the same video: what exit 0 means."""
        return all(p.outcome == "same" for p in self.pairs)

    @property
    def same_batch(self) -> bool:
        """Both sides are one batch: every job is compared with itself."""
        return bool(self.batch_a["batch"] == self.batch_b["batch"])

    @property
    def reused(self) -> int:
        """How many of the ``same`` pairs are one render, reused (:attr:`Pair.reused`)."""
        return sum(1 for p in self.pairs if p.outcome == "same" and p.reused)

    @property
    def cost_differs(self) -> int:
        """How many ``same`` pairs differ in cost (:attr:`Pair.cost_differs`)."""
        return sum(1 for p in self.pairs if p.cost_differs)

    def cost_note(self) -> str | None:
        """What to say when some ``same`` pairs differ in cost, else None: the table lists only
        pairs that are not the same, so a price change would otherwise go unsaid. A pair whose
        sides sent a different number of requests owes it to the attempts (a failed one fal
        billed: :attr:`Pair.attempts_differ`), said as such; only a pair of equal attempts is
        taken for a price change."""
        differ = [p for p in self.pairs if p.cost_differs]
        if not differ:
            return None
        attempts = sum(1 for p in differ if p.attempts_differ)
        priced = len(differ) - attempts
        said = f"{len(differ)} of the same pairs differ in cost"
        if not attempts:
            said += " (the price changed between the runs?)"
        else:
            said += f": {attempts} of them paid for more than one attempt on one side"
            if priced:
                said += f", {priced} with as many attempts on each side (the price changed between the runs?)"
        tail = "; `wanbatch export` gives each job's attempts" if attempts else ""
        return f"{said}: `--json` gives each side's cost_usd{tail}"

    @property
    def not_looked_up(self) -> int:
        """How many of the compared videos are S3 objects that could not be looked up."""
        return sum(1 for p in self.pairs for side in _sides(p) if side.not_looked_up)

    def lookup_note(self) -> str | None:
        """What to say when some S3 objects could not be looked up, else None: their pairs
        compare by the recorded SHA-256 alone, which a gone object would not change."""
        if not self.not_looked_up:
            return None
        why = f" ({self.lookup_failure})" if self.lookup_failure else ""
        return (
            f"{self.not_looked_up} S3 object(s) could not be looked up{why}: their pairs compare by "
            "the SHA-256 the database records, whether or not the object is still there"
        )

    def disk_note(self) -> str | None:
        """What to say when videos are not on disk as recorded, else None."""
        problems = sum(1 for p in self.pairs for side in _sides(p) if side.disk_problem is not None)
        if not problems:
            return None
        return (
            f"{problems} video(s) are not on disk as the database records them (missing, or another "
            "size or content): their pairs are not the same"
        )

    def same_batch_note(self) -> str | None:
        """What to say when both sides are one batch, else None: the counts then say which of
        its jobs have a video, not whether anything reproduces."""
        if not self.same_batch:
            return None
        return (
            f"both sides are the same batch ({self.batch_a['name']}): every job is compared with "
            "itself, so `same` counts its jobs that have a video and `different` those without one; "
            "this says nothing about whether fal reproduces them"
        )

    def reused_note(self) -> str | None:
        """What to say when some ``same`` pairs reused an output rather than rendering it, else
        None: the count of ``same`` would otherwise read as that many reproductions."""
        if not self.reused:
            return None
        return (
            f"{self.reused} of the same pairs reused an output rather than rendering it "
            "(`reuse_outputs`): they say nothing about whether fal reproduces it"
        )

    def simulated_note(self) -> str | None:
        """What to say when one side is a simulation (``--simulate``) and the other was sent to
        fal, else None. Simulated batches stay apart from paid ones: the simulator's placeholder
        videos say nothing about what fal renders, so "same" or "different" across the two is
        no verdict on reproducibility, which a user comparing by name (a simulation renamed
        ``NAME-simulated``, its rerun still ``NAME-rerun-1``) would not see from the counts."""
        sides = (self.batch_a, self.batch_b)
        simulated = [side for side in sides if side["simulated"]]
        if len(simulated) != 1:
            return None
        paid = next(side for side in sides if not side["simulated"])
        return (
            f"{simulated[0]['name']} is a simulation (`--simulate`) and {paid['name']} was sent to "
            "fal: the simulator's videos are placeholders, so this comparison says nothing about "
            "whether fal reproduces its results"
        )

    def varied(self) -> dict[str, dict[str, Any]]:
        """Job id → the input fields (the seed aside: it has its own column) whose values differ
        between the jobs of its item within its batch, with this job's values, the endpoint's
        defaults filled in: ``{"resolution": "720p"}`` for a matrix over resolutions. A field
        that varies in either batch is named for both sides of the item. Empty for an item of one
        job, or whose jobs differ only by seed.

        From the sides' own inputs: for sides made by hand. Sides read from the store keep none
        (:meth:`JobSide.of`): :func:`varied_of` reads them for the rows shown."""
        return _varied(
            (which, side.item_index, side.job_id, side.endpoint, side.input)
            for pair in self.pairs
            for which, side in (("a", pair.a), ("b", pair.b))
            if side is not None
        )

    def summary(self) -> dict[str, Any]:
        """:meth:`as_dict` without its ``jobs`` (its last field): what ``diff --json`` writes
        before the jobs, which it writes one at a time (:meth:`job_dicts`)."""
        return {
            "batch_a": self.batch_a,
            "batch_b": self.batch_b,
            "same_batch": self.same_batch,
            "identical": self.identical,
            "same": self.count("same"),
            "different": self.count("different"),
            "only_a": self.count("only_a"),
            "only_b": self.count("only_b"),
            "reused": self.reused,
            "cost_differs": self.cost_differs,
            "not_looked_up": self.not_looked_up,
        }

    def job_dicts(self) -> Iterator[dict[str, Any]]:
        """``as_dict()["jobs"]``, one job at a time."""
        return (p.as_dict() for p in self.pairs)

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "jobs": list(self.job_dicts())}


def _sides(pair: Pair) -> list[JobSide]:
    """The pair's jobs, each once (a job compared with itself is one)."""
    sides = [pair.a] if pair.same_job else [pair.a, pair.b]
    return [side for side in sides if side is not None]


def _varied(
    sides: Iterable[tuple[str, int, str, str, dict[str, Any]]], wanted: Collection[str] | None = None
) -> dict[str, dict[str, Any]]:
    """:meth:`BatchDiff.varied` of ``sides`` (``(which batch, item, job id, endpoint, input)``,
    each job of the items once per side), for the jobs ``wanted`` (None: every one). Streamed:
    of each item it keeps the first job's values and which fields differed, and only the inputs
    of the jobs wanted."""
    first: dict[tuple[str, int], dict[str, str]] = {}  # (side, item) → field → its first value
    varying: dict[int, set[str]] = defaultdict(set)  # item → fields that vary in either side
    kept: dict[str, tuple[int, dict[str, Any]]] = {}  # job id → item, filled input
    for which, item, job_id, endpoint, given in sides:
        filled = with_defaults(endpoint, given)
        values = {name: canonical_json(value) for name, value in filled.items() if name != "seed"}
        seen = first.get((which, item))
        if seen is None:
            first[which, item] = values
        else:
            for name, text in values.items():
                if seen.setdefault(name, "null") != text:  # jobs before it had none: null
                    varying[item].add(name)
            varying[item].update(n for n, text in seen.items() if n not in values and text != "null")
        if wanted is None or job_id in wanted:
            kept[job_id] = (item, filled)
    return {
        job_id: {name: filled.get(name) for name in sorted(varying[item])}
        for job_id, (item, filled) in kept.items()
    }


def varied_of(session: Session, diff: BatchDiff, pairs: Iterable[Pair]) -> dict[str, dict[str, Any]]:
    """:meth:`BatchDiff.varied` for the jobs of ``pairs`` (the rows a table shows), of a diff
    read from the store (:func:`diff_batches`), whose sides keep no input: the inputs of their
    items' jobs are read again, streamed, and only the shown jobs' kept."""
    wanted: set[str] = set()
    items: set[int] = set()
    for pair in pairs:
        for side in (pair.a, pair.b):
            if side is not None:
                wanted.add(side.job_id)
                items.add(side.item_index)
    sides = (
        (which, item, job_id, endpoint, given if isinstance(given, dict) else {})
        for which, batch in (("a", diff.batch_a["batch"]), ("b", diff.batch_b["batch"]))
        for job_id, item, endpoint, given in store.item_inputs_of_batch(session, batch, items)
    )
    return _varied(sides, wanted)


def match(a_jobs: list[JobSide], b_jobs: list[JobSide], *, by_place: ByPlace = True) -> list[Pair]:
    """Pair two batches' jobs (see the module docstring), A's item order first, then B's leftovers.

    Both lists must be in item order (as :func:`store.jobs_of_batch` yields them): jobs that
    differ only by seed are paired in that order. ``by_place`` enables the fourth pass (item,
    variant and endpoint), for batches of the same manifest; ``"if_shared"`` only when the other
    passes paired a job (:func:`_places_rule`).
    """
    matched: dict[str, tuple[JobSide, MatchedBy]] = {}  # A's job id → B's job, how
    by_key = {job.job_key: job for job in b_jobs}  # keys are unique within a batch
    taken: set[str] = set()
    for job in a_jobs:
        other = by_key.get(job.job_key)
        if other is not None:
            matched[job.job_id] = (other, "job_key")
            taken.add(other.job_id)
    del by_key
    by_input = _queues((other.unseeded, other) for other in b_jobs if other.job_id not in taken)
    for job in a_jobs:
        if job.job_id not in matched and (queue := by_input.get(job.unseeded)):
            other = queue.pop()
            matched[job.job_id] = (other, "input")
            taken.add(other.job_id)
    del by_input
    _pair_by_origin(a_jobs, b_jobs, matched, taken)
    if by_place == "if_shared":
        by_place = bool(matched)
    a_ids = {job.job_id for job in a_jobs}
    b_ids = {job.job_id for job in b_jobs}
    places = _queues(
        ((other.item_index, other.variant, other.endpoint), other)
        for other in b_jobs
        if by_place and other.job_id not in taken and other.rerun_of not in a_ids
    )
    for job in a_jobs:
        if job.rerun_of in b_ids:
            continue  # a rerun's job whose original is in B: its place was renumbered
        place = (job.item_index, job.variant, job.endpoint)
        if job.job_id not in matched and (queue := places.get(place)):
            other = queue.pop()
            matched[job.job_id] = (other, "item")
            taken.add(other.job_id)
    pairs = [
        Pair(job, *matched[job.job_id]) if job.job_id in matched else Pair(job, None, None) for job in a_jobs
    ]
    pairs.extend(Pair(None, other, None) for other in b_jobs if other.job_id not in taken)
    return pairs


def _queues(entries: Iterable[tuple[_K, JobSide]]) -> dict[_K, list[JobSide]]:
    """Jobs by a key, each key's in reverse order: ``pop()`` takes the first one left. A list,
    not a deque (a deque allocates a block of 64 slots: 600 bytes for a key of one job), and
    only for the keys there are (looking one up adds none)."""
    queues: dict[_K, list[JobSide]] = {}
    for key, job in entries:
        queues.setdefault(key, []).append(job)
    for queue in queues.values():
        queue.reverse()
    return queues


def _pair_by_origin(
    a_jobs: list[JobSide],
    b_jobs: list[JobSide],
    matched: dict[str, tuple[JobSide, MatchedBy]],
    taken: set[str],
) -> None:
    """The third pass: an original left over with the first of its repeats left over, whichever
    side the rerun is on (``matched`` and ``taken`` are updated)."""
    left = [other for other in b_jobs if other.job_id not in taken]
    repeats = _queues((other.rerun_of, other) for other in left if other.rerun_of is not None)  # A's id → B's
    originals = {other.job_id: other for other in left}
    del left
    for job in a_jobs:
        if job.job_id in matched:
            continue
        if queue := repeats.get(job.job_id):
            other = queue.pop()
        elif job.rerun_of is not None and job.rerun_of in originals:
            other = originals.pop(job.rerun_of)
        else:
            continue
        if other.job_id in taken:
            continue
        matched[job.job_id] = (other, "origin")
        taken.add(other.job_id)


def diff_batches(session: Session, ref_a: str, ref_b: str, disk: DiskCheck | None = None) -> BatchDiff:
    """Compare the batches ``ref_a`` and ``ref_b`` (id, id prefix or name; NotFoundError if not).
    ``disk``: how each recorded video is looked at on disk (:func:`on_disk`); None: not at all,
    the recorded SHA-256 taken as it is."""
    batch_a = store.get_batch(session, ref_a)
    batch_b = store.get_batch(session, ref_b)
    # The columns compared, one small record per job: no ORM row, no input kept.
    objects: list[_Object] = []
    a_jobs = _sides_of(session, batch_a.id, disk, objects)
    b_jobs = a_jobs  # a batch compared with itself: read once
    if batch_b.id != batch_a.id:
        b_jobs = _sides_of(session, batch_b.id, disk, objects)
    failure = _look_up_objects(objects, disk) if disk is not None and objects else None
    by_place = _places_rule(session, batch_a, batch_b)
    pairs = match(a_jobs, b_jobs, by_place=by_place)
    _name_input_differences(session, batch_a.id, batch_b.id, pairs)
    return BatchDiff(_named(batch_a), _named(batch_b), pairs, failure)


@dataclass(frozen=True, slots=True)
class _Object:
    """An S3 object to look up: the list its job's side is in, where, and what was recorded."""

    sides: list[JobSide]
    at: int
    uri: str
    size: int | None


def _sides_of(
    session: Session, batch_id: str, disk: DiskCheck | None, objects: list[_Object]
) -> list[JobSide]:
    """The batch's jobs as sides (:meth:`JobSide.of`), each S3 video still to look up (no
    ``--verify``) added to ``objects``."""
    sides: list[JobSide] = []
    for row in store.diff_rows_of_batch(session, batch_id):
        recorded = row.output_path
        looked_up_later = disk is not None and not disk.verify and row.output_sha256 is not None
        if looked_up_later and recorded is not None and is_s3_url(recorded):
            objects.append(_Object(sides, len(sides), recorded, row.output_bytes))
        sides.append(JobSide.of(row, disk))
    return sides


def _look_up_objects(objects: list[_Object], disk: DiskCheck) -> str | None:
    """Look at each S3 object as a local video is looked at: one ``HEAD``, its size against the
    recorded one (``missing`` when it is not there), each side replaced in its list.

    Bounded: :data:`S3_LOOKUPS_AT_ONCE` at a time, each one try with short timeouts, and no
    more than ``disk.lookup_seconds`` in all. The first object that cannot be looked up for
    another reason than "not there" (unreachable, refused) stops the others, which would fail
    alike: those left are marked :attr:`JobSide.not_looked_up`. Returns why, else None."""
    # One HEAD an object, however many jobs name it (outputs reused, a batch compared with itself).
    by_uri: dict[str, list[_Object]] = defaultdict(list)
    for obj in objects:
        by_uri[obj.uri].append(obj)
    if disk.announce is not None:
        disk.announce(len(by_uri))
    failures: list[str] = []
    # Under the lock: a side is written only while the lookups are open, so none that ends
    # past the bound changes a side the comparison is already reading.
    lock = threading.Lock()
    closed = threading.Event()

    def look(uri: str) -> None:
        if failures or closed.is_set():
            return
        try:
            stamp = output_stamp(uri, quick=True)
        except OutputReadError as exc:
            with lock:
                failures.append(str(exc))
            return
        with lock:
            if closed.is_set():
                return
            for obj in by_uri[uri]:
                found: OnDisk = "ok"
                if stamp is None:
                    found = "missing"
                elif obj.size is not None and stamp.size != obj.size:
                    found = "changed on disk"
                where = None if found == "ok" else uri
                obj.sides[obj.at] = replace(obj.sides[obj.at], on_disk=found, video_path=where)

    pool = ThreadPoolExecutor(max_workers=S3_LOOKUPS_AT_ONCE, thread_name_prefix="diff-head")
    try:
        _done, pending = wait([pool.submit(look, uri) for uri in by_uri], timeout=disk.lookup_seconds)
    finally:
        with lock:
            closed.set()
        pool.shutdown(wait=False, cancel_futures=True)
    if pending and not failures:
        failures.append(f"not all looked up within {disk.lookup_seconds:g} s")
    for obj in objects:
        side = obj.sides[obj.at]
        if side.on_disk is None:
            obj.sides[obj.at] = replace(side, not_looked_up=True)
    return failures[0] if failures else None


def _name_input_differences(session: Session, batch_a: str, batch_b: str, pairs: list[Pair]) -> None:
    """Set :attr:`Pair.input_differs` of the pairs matched by origin or by place (in place in
    ``pairs``): their inputs are read again, A's jobs' first (kept as a digest per field), then
    B's, compared as they stream."""
    of_a: dict[str, int] = {}
    of_b: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if pair.matched_by in ("origin", "item") and pair.a is not None and pair.b is not None:
            of_a[pair.a.job_id] = i
            of_b[pair.b.job_id] = i
    if not of_a:
        return
    items_a = {side.item_index for i in of_a.values() if (side := pairs[i].a) is not None}
    items_b = {side.item_index for i in of_b.values() if (side := pairs[i].b) is not None}
    fields_a: dict[int, dict[str, str]] = {}
    for job_id, endpoint, given, sources in store.keyed_inputs_of_batch(session, batch_a, items_a):
        if (at := of_a.get(job_id)) is not None:
            fields_a[at] = _field_digests(endpoint, given, sources)
    for job_id, endpoint, given, sources in store.keyed_inputs_of_batch(session, batch_b, items_b):
        at = of_b.get(job_id)
        if at is None or at not in fields_a:
            continue
        a, b = fields_a.pop(at), _field_digests(endpoint, given, sources)
        names = tuple(sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n)))
        if names:
            pairs[at] = replace(pairs[at], input_differs=names)


def _places_rule(session: Session, batch_a: Batch, batch_b: Batch) -> ByPlace:
    """Whether the two batches are of one manifest, so that jobs left over pair by place.

    - ``True`` when one descends from the other by ``rerun`` or both from one batch (a rerun
      keeps its parent's manifest, even when the parent is submitted again from an edited one),
      or when both stored the very same manifest (SHA-256 of its bytes: a copy, or images
      replaced behind the same text).
    - ``"if_shared"`` when both were submitted from the same file and its text changed between
      them (an edited copy under a new name): an edit when the other passes pair at least one of
      their jobs (the two still ask something alike), a replacement by an unrelated manifest —
      whose item 0 is no place of the other's — when they pair none.
    - ``False`` otherwise: different files, different manifests.
    """
    if _root(session, batch_a) == _root(session, batch_b):
        return True
    if batch_a.manifest_sha256 == batch_b.manifest_sha256:
        return True
    return "if_shared" if batch_a.manifest_path == batch_b.manifest_path else False


def _root(session: Session, batch: Batch) -> str:
    """The id of the batch ``batch``'s ``rerun`` lineage starts from (itself if made from a
    manifest), following ``parent_batch_id``."""
    seen = {batch.id}
    while batch.parent_batch_id is not None and batch.parent_batch_id not in seen:
        batch = store.get_batch(session, batch.parent_batch_id)
        seen.add(batch.id)
    return batch.id


def _named(batch: Batch) -> dict[str, Any]:
    """One side's ``batch_a`` / ``batch_b``: whether it is a simulation is part of its identity
    (a paid batch and a simulation may carry the same manifest's name at different times)."""
    return {"batch": batch.id, "name": batch.name, "simulated": bool(batch.simulated)}
