"""Every query wanbatch makes: batches, jobs, claims, state changes, money, uploads.

This is the only package that builds SQL; :mod:`jobs.db` owns the connection plumbing (engines,
sessions, migrations) and is imported from there. Nothing here commits: the caller's unit of
work (``jobs.db.session_scope``) does, so a step's state change, its event row and any claim
land together or not at all.

A job changes state through a verb named for what happened (:func:`mark_submitted`,
:func:`retry_later`, :func:`fail_job`, :func:`give_back`, :func:`mark_cancelled`, …), each taking
the :class:`Fence` its caller holds: the job, the state and the version it read, and who acts.
Three rules make concurrent workers safe:

* every verb is one compare-and-set, :func:`transition`, on the expected state and version: a
  late, duplicate or zombie worker matches 0 rows and gets ``False`` instead of overwriting
  newer progress;
* ``version`` is the fencing token. It grows on every transition and every claim, so a worker
  whose lease was taken over cannot write anything fenced with its old token;
* :func:`claim_jobs` hands each due job to exactly one claimer: ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL (https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE),
  and SQLite's single writer (every transaction is ``BEGIN IMMEDIATE``) there.

Job creation writes no event row: the job row itself (``created_at``, ``version`` 0, state
``pending``) records it. That keeps :func:`add_jobs` at one row per job, which is what lets a
100,000-job manifest be stored in seconds; the history starts with the first transition.

The package is split by what its queries are about; everything is imported from here
(``from jobs import store``, ``store.mark_submitted``), never from a part:

* :mod:`~jobs.store.core`: the plumbing every part shares (the kept statements of
  :func:`~jobs.store.core._prepared`, :func:`~jobs.store.core._run`, the ``jobs`` table's shared
  expressions);
* :mod:`~jobs.store.direct`: the kept statements run straight on the driver's cursor
  (:func:`~jobs.store.direct.run_reusable`, below :mod:`~jobs.store.core`);
* :mod:`~jobs.store.transitions`: :func:`transition`, :class:`Fence`, :func:`update_job_fields`;
* state changes by intent: :mod:`~jobs.store.submitting`, :mod:`~jobs.store.outcomes`,
  :mod:`~jobs.store.proofs` (proof that arrives late), :mod:`~jobs.store.unsent` (cancels of jobs
  fal does not hold);
* :mod:`~jobs.store.batches`, :mod:`~jobs.store.dispatch` (its lock, the submit rate and pace),
  :mod:`~jobs.store.creating` (storing a manifest's jobs), :mod:`~jobs.store.repricing` (jobs not
  sent yet priced again with the prices in force);
* :mod:`~jobs.store.leases` and :mod:`~jobs.store.due` (claims);
* reads: :mod:`~jobs.store.reading`, :mod:`~jobs.store.repeats` (reruns' repeats),
  :mod:`~jobs.store.caps` (what the caps count), :mod:`~jobs.store.money`,
  :mod:`~jobs.store.moved_outputs` (a moved project's videos, re-pointed),
  :mod:`~jobs.store.metrics` (all batches);
* :mod:`~jobs.store.uploads`, :mod:`~jobs.store.heartbeats`, :mod:`~jobs.store.fal_outages`,
  :mod:`~jobs.store.held` (accepted submissions a live process holds, their record refused),
  :mod:`~jobs.store.key_refusals` (requests of another API key fal refused to a key),
  :mod:`~jobs.store.cancel_give_ups` (cancels a process gave up at fal, on the jobs' history),
  :mod:`~jobs.store.instance_secrets`, :mod:`~jobs.store.webhook_inbox`,
  :mod:`~jobs.store.dashboard_sessions` (logouts).

A part imports only the parts below it (no cycle), so a test that replaces a name the store
calls itself patches it in the part that calls it (``monkeypatch.setattr(store.leases, …)``).
"""

from jobs.store.batches import ACCOUNT_PAUSE_MARK as ACCOUNT_PAUSE_MARK
from jobs.store.batches import CANNOT_DOWNLOAD as CANNOT_DOWNLOAD
from jobs.store.batches import ID_CHARS as ID_CHARS
from jobs.store.batches import INPUTS_PAUSE_PREFIX as INPUTS_PAUSE_PREFIX
from jobs.store.batches import OUTPUTS_PAUSE_PREFIX as OUTPUTS_PAUSE_PREFIX
from jobs.store.batches import SIMULATED_SUFFIX as SIMULATED_SUFFIX
from jobs.store.batches import batch_name_taken as batch_name_taken
from jobs.store.batches import batch_named as batch_named
from jobs.store.batches import (
    batch_schedule,
    get_batch,
    get_or_create_batch,
    list_batches,
    lock_batch,
    name_for_batch,
    pause_for_inputs,
    pause_for_refusal,
    paused_for_inputs,
    renew_download_pause,
    reruns_follow,
    resume_after_outputs_stored,
    resume_batch,
    root_batch,
    set_batch_budget,
    set_batch_manifest,
    set_batch_manifest_host,
    set_batch_manifest_path,
    set_batch_schedule,
    set_batch_state,
    set_paused_by_user,
)
from jobs.store.batches import downloads_due_now as downloads_due_now
from jobs.store.batches import folder_name as folder_name
from jobs.store.batches import is_stored as is_stored
from jobs.store.batches import paused_for_downloads as paused_for_downloads
from jobs.store.batches import set_batch_reuse_outputs as set_batch_reuse_outputs
from jobs.store.cancel_give_ups import CANCEL_GIVEN_UP as CANCEL_GIVEN_UP
from jobs.store.cancel_give_ups import Uncancelled as Uncancelled
from jobs.store.cancel_give_ups import note_cancel_given_up as note_cancel_given_up
from jobs.store.cancel_give_ups import uncancelled_requests as uncancelled_requests
from jobs.store.caps import FOLLOWED_ALL as FOLLOWED_ALL
from jobs.store.caps import LONGEST_WAIT_SECONDS as LONGEST_WAIT_SECONDS
from jobs.store.caps import QUEUE_DEPTH_SHARE as QUEUE_DEPTH_SHARE
from jobs.store.caps import UNFOLLOWED_SECONDS as UNFOLLOWED_SECONDS
from jobs.store.caps import WAITING_AT_FAL as WAITING_AT_FAL
from jobs.store.caps import CapCounts as CapCounts
from jobs.store.caps import (
    CapHolder,
    CapScope,
    InFlight,
    batch_endpoints,
    cap_holders,
    count_cancelled,
    count_in_states_by_endpoint,
    count_requests,
    count_waiting_since,
    first_submitted_at,
    in_flight,
)
from jobs.store.caps import Followed as Followed
from jobs.store.caps import QueueWaits as QueueWaits
from jobs.store.caps import batches_endpoints as batches_endpoints
from jobs.store.caps import cap_counts as cap_counts
from jobs.store.caps import count_cancelled_of_batches as count_cancelled_of_batches
from jobs.store.caps import followed_now as followed_now
from jobs.store.caps import holders_in as holders_in
from jobs.store.caps import queue_waits as queue_waits
from jobs.store.caps import submitted_at_in_state as submitted_at_in_state
from jobs.store.core import MIN_ID_PREFIX as MIN_ID_PREFIX
from jobs.store.core import UNPROVEN_EXITS as UNPROVEN_EXITS
from jobs.store.core import sent_to_origin as sent_to_origin
from jobs.store.creating import ChangedFile as ChangedFile
from jobs.store.creating import NewJob, add_jobs
from jobs.store.creating import Resubmitted as Resubmitted
from jobs.store.creating import mark_reruns_not_in_manifest as mark_reruns_not_in_manifest
from jobs.store.creating import places_after as places_after
from jobs.store.creating import resubmit_jobs as resubmit_jobs
from jobs.store.creating import revive_budget_cancelled as revive_budget_cancelled
from jobs.store.creating import revive_input_failed as revive_input_failed
from jobs.store.dashboard_sessions import dashboard_session_revoked, revoke_dashboard_session
from jobs.store.dispatch import DISPATCH_LOCK_KEY as DISPATCH_LOCK_KEY
from jobs.store.dispatch import (
    RateRead,
    SubmitTokens,
    cancelled_batches_with_work,
    dispatch_batches,
    hold_submits,
    lock_dispatch,
    scheduled_batches,
    share_pacing,
    take_pace_slot,
    take_submit_tokens,
)
from jobs.store.dispatch import batch_records as batch_records
from jobs.store.dispatch import return_submit_tokens as return_submit_tokens
from jobs.store.due import FEW_DUE_RETRIES as FEW_DUE_RETRIES
from jobs.store.due import batches_with_jobs_to_send as batches_with_jobs_to_send
from jobs.store.due import bring_waits_forward as bring_waits_forward
from jobs.store.due import catch_up_with_timeline as catch_up_with_timeline
from jobs.store.fal_outages import (
    FalHoldRow,
    end_fal_waits,
    fal_holds,
    hold_fal,
    live_fal_hold_owners,
    release_fal_hold,
)
from jobs.store.heartbeats import (
    HEARTBEAT_KEPT,
    BatchBeat,
    WorkersBeat,
    batch_beaters,
    batch_beats,
    drop_heartbeats,
    heartbeat_owners,
    last_heartbeat,
    last_heartbeats,
    live_limits,
    live_simulators,
    mark_broker_down,
    pacing_peers,
    record_heartbeat,
    workers_beats,
    workers_broker_down_since,
    workers_last_beat,
)
from jobs.store.held import held_job_ids, hold_submissions, release_held
from jobs.store.instance_secrets import (
    WEBHOOK_SECRET,
    instance_secret,
    instance_secret_if_made,
    new_secret_value,
)
from jobs.store.key_refusals import REFUSABLE_STATES as REFUSABLE_STATES
from jobs.store.key_refusals import Refused as Refused
from jobs.store.key_refusals import forget_key_refusals as forget_key_refusals
from jobs.store.key_refusals import note_key_refused as note_key_refused
from jobs.store.key_refusals import refused_requests as refused_requests
from jobs.store.leases import (
    LeaseHolder,
    ReleasedLeases,
    adopt_requests_sent_elsewhere,
    claim_due,
    claim_jobs,
    expire_leases,
    extend_lease,
    lease_holders,
    lease_holders_of_batches,
    owners_last_seen,
    record_send,
    release_lease,
    release_process_leases,
    take_lease,
)
from jobs.store.leases import ProvenUnsentSend as ProvenUnsentSend
from jobs.store.leases import TakenBack as TakenBack
from jobs.store.leases import release_step_jobs as release_step_jobs
from jobs.store.leases import take_back_dead_leases as take_back_dead_leases
from jobs.store.metrics import (
    DURATIONS,
    FINISHED_EVENTS,
    JobTotals,
    MetricsScope,
    batch_states,
    count_events_into,
    count_finished_changes,
    duration_buckets,
    duration_histogram,
    job_totals,
)
from jobs.store.money import (
    BatchCost,
    BatchMoney,
    JobMoney,
    batch_committed_usd,
    batch_cost,
    batch_estimated_usd,
    batch_money,
    batch_spent_usd,
    committed_usd,
    committed_usd_since,
    committed_usd_today,
    committed_usd_today_by_batch,
    count_media_mismatches,
    estimated_usd,
    job_money,
    lineage_committed_usd,
    reserved_usd,
    spent_usd,
    unsent_estimate,
    wasted_usd,
)
from jobs.store.moved_outputs import batch_and_reruns as batch_and_reruns
from jobs.store.moved_outputs import output_digest as output_digest
from jobs.store.moved_outputs import outputs_in_folder as outputs_in_folder
from jobs.store.moved_outputs import record_output_move as record_output_move
from jobs.store.moved_outputs import record_output_moves as record_output_moves
from jobs.store.outcomes import ADOPTED_REASON as ADOPTED_REASON
from jobs.store.outcomes import LOST_POSSIBLY_BILLED as LOST_POSSIBLY_BILLED
from jobs.store.outcomes import NOT_SENT as NOT_SENT
from jobs.store.outcomes import OUTPUT_NOT_KEPT as OUTPUT_NOT_KEPT
from jobs.store.outcomes import (
    abandon_request,
    fail_job,
    fail_lost_request,
    fail_unsent,
    give_back,
    give_back_not_sent,
    mark_cancelled,
    mark_cancelling,
    mark_completed,
    mark_running,
    mark_submit_unknown,
    mark_succeeded,
    record_result,
    retry_later,
    status_due,
)
from jobs.store.outcomes import adopted_counts as adopted_counts
from jobs.store.outcomes import find_reusable as find_reusable
from jobs.store.outcomes import mark_adopted as mark_adopted
from jobs.store.outcomes import mark_reused as mark_reused
from jobs.store.outcomes import mark_taking_staged as mark_taking_staged
from jobs.store.outcomes import requeue_after_cancel as requeue_after_cancel
from jobs.store.outcomes import staged_original as staged_original
from jobs.store.proofs import (
    CANCEL_BILLED_AS,
    PROVABLE_FAILURES,
    WINDOW_DUPLICATE,
    StoredProof,
    WindowEnd,
    adopt_before_resend,
    adopt_cancelled_proof,
    adopt_earlier_proof,
    adopt_late_proof,
    adopt_own_proof,
    adopt_restored_proof,
    adopt_unknown_cancelled,
    adopt_window_proof,
    earlier_proof_adoptable,
    note_window_duplicate,
    resend_unsent,
    restored_proof_adoptable,
    sent_attempts,
    stored_proof,
    unknown_cancel_adoptable,
    window_end,
    window_proof_adoptable,
)
from jobs.store.proofs import SUBMIT_UNKNOWN_ERROR as SUBMIT_UNKNOWN_ERROR
from jobs.store.reading import OUTPUT_FOLDER_PROBES as OUTPUT_FOLDER_PROBES
from jobs.store.reading import READ_PAGE_BYTES as READ_PAGE_BYTES
from jobs.store.reading import READ_PAGE_ROWS as READ_PAGE_ROWS
from jobs.store.reading import SIMULATOR_FINISHED as SIMULATOR_FINISHED
from jobs.store.reading import (
    BatchPulse,
    DiffRow,
    FailureGroup,
    JobHead,
    RecordedOutput,
    SubmitView,
    UnfinishedBatch,
    batch_pulse,
    count_in_states,
    count_repeated,
    counts_by_state,
    diff_rows_of_batch,
    failure_reasons,
    get_job,
    item_inputs_of_batch,
    job_events,
    job_heads,
    job_snapshots,
    jobs_of_batch,
    jobs_of_batch_bounded,
    keyed_inputs_of_batch,
    manifest_job_count,
    recorded_outputs_of_batch,
    simulated_batch_ids,
    submit_view,
    unfinished_batches,
    video_bytes_per_job,
)
from jobs.store.reading import batch_requests as batch_requests
from jobs.store.reading import failure_reasons_of_batches as failure_reasons_of_batches
from jobs.store.reading import forget_simulated_results as forget_simulated_results
from jobs.store.reading import handed_off as handed_off
from jobs.store.reading import job_snapshot as job_snapshot
from jobs.store.reading import media_inputs_of_batch as media_inputs_of_batch
from jobs.store.reading import note_simulated_finished as note_simulated_finished
from jobs.store.reading import output_folders_of_batch as output_folders_of_batch
from jobs.store.reading import requests_at_fal as requests_at_fal
from jobs.store.reading import seen_running_since_submit as seen_running_since_submit
from jobs.store.reading import simulated_results as simulated_results
from jobs.store.repeats import REPEAT_NOT_SENT_ERROR as REPEAT_NOT_SENT_ERROR
from jobs.store.repeats import RerunRepeat as RerunRepeat
from jobs.store.repeats import RerunWanted as RerunWanted
from jobs.store.repeats import lineage_repeats as lineage_repeats
from jobs.store.repeats import lineage_repeats_of_batches as lineage_repeats_of_batches
from jobs.store.repeats import rerun_repeats as rerun_repeats
from jobs.store.repeats import rerun_repeats_of_batches as rerun_repeats_of_batches
from jobs.store.repeats import rerun_wanted_of_batches as rerun_wanted_of_batches
from jobs.store.repeats import sent_repeat
from jobs.store.repricing import Repriced as Repriced
from jobs.store.repricing import reprice_unsent as reprice_unsent
from jobs.store.submitting import (
    adopt_request,
    followed_with_key,
    mark_submitted,
    mark_submitting,
    note_handed_on,
    note_held_request,
)
from jobs.store.transitions import UNSENT_STATES as UNSENT_STATES
from jobs.store.transitions import (
    Fence,
    finished_usd,
    incremented,
    refuse_held_request,
    request_holder,
    transition,
    update_job_fields,
    utc_day,
)
from jobs.store.unsent import UnsentCancelled, cancel_unsent, cancel_unsent_jobs
from jobs.store.unsent import cancel_unsent_over as cancel_unsent_over
from jobs.store.unsent import unsent_kind as unsent_kind
from jobs.store.uploads import UPLOAD_REUSE, find_upload, forget_uploads, record_upload
from jobs.store.webhook_inbox import (
    DuplicateNote,
    defer_delivery,
    delivery_counts,
    duplicate_charge_recorded,
    fal_accounts,
    job_key_and_request,
    note_duplicate_charge,
    note_own_request,
    pin_account,
    pinned_account,
    record_duplicate_charge,
    request_known,
    settle_delivery,
    store_delivery,
    take_delivery,
    unprocessed_deliveries,
)
from jobs.store.webhook_inbox import note_request as note_request
from jobs.store.webhook_inbox import prune_deliveries as prune_deliveries
from jobs.store.webhook_inbox import webhooks_heard as webhooks_heard

__all__ = [
    "CANCEL_BILLED_AS",
    "DURATIONS",
    "FINISHED_EVENTS",
    "HEARTBEAT_KEPT",
    "PROVABLE_FAILURES",
    "UPLOAD_REUSE",
    "WEBHOOK_SECRET",
    "WINDOW_DUPLICATE",
    "BatchBeat",
    "BatchCost",
    "BatchMoney",
    "BatchPulse",
    "CapHolder",
    "CapScope",
    "DiffRow",
    "DuplicateNote",
    "FailureGroup",
    "FalHoldRow",
    "Fence",
    "InFlight",
    "JobHead",
    "JobMoney",
    "JobTotals",
    "LeaseHolder",
    "MetricsScope",
    "NewJob",
    "RateRead",
    "RecordedOutput",
    "ReleasedLeases",
    "StoredProof",
    "SubmitTokens",
    "SubmitView",
    "UnfinishedBatch",
    "UnsentCancelled",
    "WindowEnd",
    "WorkersBeat",
    "abandon_request",
    "add_jobs",
    "adopt_before_resend",
    "adopt_cancelled_proof",
    "adopt_earlier_proof",
    "adopt_late_proof",
    "adopt_own_proof",
    "adopt_request",
    "adopt_requests_sent_elsewhere",
    "adopt_restored_proof",
    "adopt_unknown_cancelled",
    "adopt_window_proof",
    "batch_beaters",
    "batch_beats",
    "batch_committed_usd",
    "batch_cost",
    "batch_endpoints",
    "batch_estimated_usd",
    "batch_money",
    "batch_pulse",
    "batch_schedule",
    "batch_spent_usd",
    "batch_states",
    "cancel_unsent",
    "cancel_unsent_jobs",
    "cancelled_batches_with_work",
    "cap_holders",
    "claim_due",
    "claim_jobs",
    "committed_usd",
    "committed_usd_since",
    "committed_usd_today",
    "committed_usd_today_by_batch",
    "count_cancelled",
    "count_events_into",
    "count_finished_changes",
    "count_in_states",
    "count_in_states_by_endpoint",
    "count_media_mismatches",
    "count_repeated",
    "count_requests",
    "count_waiting_since",
    "counts_by_state",
    "dashboard_session_revoked",
    "defer_delivery",
    "delivery_counts",
    "diff_rows_of_batch",
    "dispatch_batches",
    "drop_heartbeats",
    "duplicate_charge_recorded",
    "duration_buckets",
    "duration_histogram",
    "earlier_proof_adoptable",
    "end_fal_waits",
    "estimated_usd",
    "expire_leases",
    "extend_lease",
    "fail_job",
    "fail_lost_request",
    "fail_unsent",
    "failure_reasons",
    "fal_accounts",
    "fal_holds",
    "find_upload",
    "finished_usd",
    "first_submitted_at",
    "followed_with_key",
    "forget_uploads",
    "get_batch",
    "get_job",
    "get_or_create_batch",
    "give_back",
    "give_back_not_sent",
    "heartbeat_owners",
    "held_job_ids",
    "hold_fal",
    "hold_submissions",
    "hold_submits",
    "in_flight",
    "incremented",
    "instance_secret",
    "instance_secret_if_made",
    "item_inputs_of_batch",
    "job_events",
    "job_heads",
    "job_key_and_request",
    "job_money",
    "job_snapshots",
    "job_totals",
    "jobs_of_batch",
    "jobs_of_batch_bounded",
    "keyed_inputs_of_batch",
    "last_heartbeat",
    "last_heartbeats",
    "lease_holders",
    "lease_holders_of_batches",
    "lineage_committed_usd",
    "list_batches",
    "live_fal_hold_owners",
    "live_limits",
    "live_simulators",
    "lock_batch",
    "lock_dispatch",
    "manifest_job_count",
    "mark_broker_down",
    "mark_cancelled",
    "mark_cancelling",
    "mark_completed",
    "mark_running",
    "mark_submit_unknown",
    "mark_submitted",
    "mark_submitting",
    "mark_succeeded",
    "name_for_batch",
    "new_secret_value",
    "note_duplicate_charge",
    "note_handed_on",
    "note_held_request",
    "note_own_request",
    "note_window_duplicate",
    "owners_last_seen",
    "pacing_peers",
    "pause_for_inputs",
    "pause_for_refusal",
    "paused_for_inputs",
    "pin_account",
    "pinned_account",
    "record_duplicate_charge",
    "record_heartbeat",
    "record_result",
    "record_send",
    "record_upload",
    "recorded_outputs_of_batch",
    "refuse_held_request",
    "release_fal_hold",
    "release_held",
    "release_lease",
    "release_process_leases",
    "renew_download_pause",
    "request_holder",
    "request_known",
    "reruns_follow",
    "resend_unsent",
    "reserved_usd",
    "restored_proof_adoptable",
    "resume_after_outputs_stored",
    "resume_batch",
    "retry_later",
    "revoke_dashboard_session",
    "root_batch",
    "scheduled_batches",
    "sent_attempts",
    "sent_repeat",
    "set_batch_budget",
    "set_batch_manifest",
    "set_batch_manifest_host",
    "set_batch_manifest_path",
    "set_batch_schedule",
    "set_batch_state",
    "set_paused_by_user",
    "settle_delivery",
    "share_pacing",
    "simulated_batch_ids",
    "spent_usd",
    "status_due",
    "store_delivery",
    "stored_proof",
    "submit_view",
    "take_delivery",
    "take_lease",
    "take_pace_slot",
    "take_submit_tokens",
    "transition",
    "unfinished_batches",
    "unknown_cancel_adoptable",
    "unprocessed_deliveries",
    "unsent_estimate",
    "update_job_fields",
    "utc_day",
    "video_bytes_per_job",
    "wasted_usd",
    "window_end",
    "window_proof_adoptable",
    "workers_beats",
    "workers_broker_down_since",
    "workers_last_beat",
]
