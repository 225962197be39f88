"""The manifest's ``schedule:`` and ``priority:``: parsed onto the Manifest, or located errors."""

from __future__ import annotations

import time as clocktime
from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from jobs import clock
from jobs.batches import schedule_text
from jobs.errors import DEADLINE_PASSED, NEVER_OPENS, Issue, ManifestError
from jobs.manifest import load_manifest, validate_manifest
from jobs.manifest.loading import parse_manifest
from jobs.schedule import Schedule

#: The validation instant: the evening before the example night.
NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
BERLIN = "Europe/Berlin"

HEAD = "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a city at night\n"  # lines 1-4

FULL = (
    HEAD
    + "schedule:\n"  # 5
    + "  not_before: 2026-12-01T22:00:00+01:00\n"  # 6
    + "  deadline: 2026-12-02T06:00:00+01:00\n"  # 7
    + '  window: "22:00-06:00"\n'  # 8
    + "  timezone: Europe/Berlin\n"  # 9
    + "priority: low\n"  # 10
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def errors(tmp_path: Path, text: str, now: datetime = NOW) -> list[Issue]:
    manifest, issues = parse_manifest(write(tmp_path, text), now=now)
    assert manifest is not None
    return [i for i in issues if i.severity == "error"]


def only_error(tmp_path: Path, text: str, now: datetime = NOW) -> Issue:
    found = errors(tmp_path, text, now)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


def schedule_of(tmp_path: Path, body: str) -> Schedule:
    return load_manifest(write(tmp_path, HEAD + "schedule:\n" + body), now=NOW).schedule


# -- parsed --------------------------------------------------------------------------------------


def test_full_schedule_and_priority_are_parsed(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, FULL), now=NOW)
    assert manifest.schedule == Schedule(
        not_before=datetime(2026, 12, 1, 21, tzinfo=UTC),
        deadline=datetime(2026, 12, 2, 5, tzinfo=UTC),
        window=(time(22), time(6)),
        timezone="Europe/Berlin",
    )
    assert manifest.priority == "low"
    assert len(list(manifest.jobs())) == 1  # the jobs expand as before


def test_without_schedule_and_priority_the_defaults_apply(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, HEAD), now=NOW)
    assert manifest.schedule == Schedule()
    assert manifest.schedule.is_empty()
    assert manifest.priority == "normal"


@pytest.mark.parametrize("text", ["schedule:\n", "schedule: {}\n", "schedule: null\npriority: null\n"])
def test_an_empty_schedule_is_the_empty_schedule(tmp_path: Path, text: str) -> None:
    manifest = load_manifest(write(tmp_path, HEAD + text), now=NOW)
    assert manifest.schedule.is_empty()
    assert manifest.priority == "normal"


def test_priority_normal_is_accepted(tmp_path: Path) -> None:
    assert load_manifest(write(tmp_path, HEAD + "priority: normal\n"), now=NOW).priority == "normal"


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2026-12-02T05:00:00Z", datetime(2026, 12, 2, 5, tzinfo=UTC)),
        ('"2026-12-02T06:00:00+01:00"', datetime(2026, 12, 2, 5, tzinfo=UTC)),
        ("2026-12-02 06:00:00 +01:00", datetime(2026, 12, 2, 5, tzinfo=UTC)),
        ("2026-12-01t23:00:00-06:00", datetime(2026, 12, 2, 5, tzinfo=UTC)),
        ("2026-12-02T05:00:00.5Z", datetime(2026, 12, 2, 5, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_timestamps_in_their_iso_8601_forms(tmp_path: Path, written: str, expected: datetime) -> None:
    assert schedule_of(tmp_path, f"  deadline: {written}\n").deadline == expected


def test_only_a_window_uses_utc_by_default(tmp_path: Path) -> None:
    schedule = schedule_of(tmp_path, "  window: 23:30-01:00\n")  # unquoted is fine: it is text
    assert schedule == Schedule(window=(time(23, 30), time(1)))
    assert schedule.timezone == "UTC"


# -- refused, located ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "phrase"),
    [
        ("  not_before: 2026-12-01T22:00:00", "has no UTC offset, so the instant is ambiguous"),
        ("  not_before: 2026-12-01", "has no UTC offset"),
        ("  not_before: tomorrow evening", "'tomorrow evening' is not an ISO 8601 timestamp"),
        ("  not_before: 2026-13-01T22:00:00Z", "is not an ISO 8601 timestamp"),
        ("  not_before: 20261201", "expected an ISO 8601 timestamp, got int 20261201"),
        ("  not_before: [1]", "expected an ISO 8601 timestamp"),
        # Out of range: a batch's schedule arithmetic overflowed datetime and broke `status` and
        # every other batch's dispatch in the database.
        ("  not_before: 9999-12-31T00:00:00Z", "out of range: a time from 1970 up to 3000"),
        ("  not_before: 9999-12-31T23:59:59-12:00", "out of range"),
        ("  not_before: 0001-01-01T00:00:00+14:00", "out of range"),
        ("  not_before: 1969-12-31T23:59:59Z", "out of range"),
    ],
)
def test_a_bad_timestamp_is_a_located_error(tmp_path: Path, line: str, phrase: str) -> None:
    issue = only_error(tmp_path, HEAD + "schedule:\n" + line + "\n")
    assert issue.line == 6
    assert issue.field == "schedule.not_before"
    assert phrase in issue.message
    assert issue.allowed is not None
    assert "with an offset" in issue.allowed
    assert str(issue).startswith(f"{tmp_path / 'm.yaml'}:6: field 'schedule.not_before': ")


def test_an_unknown_timezone_is_a_located_error_with_a_hint(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + "schedule:\n  window: 22:00-06:00\n  timezone: Europe/Berlim\n")
    assert (issue.line, issue.field) == (7, "schedule.timezone")
    assert "unknown time zone 'Europe/Berlim' (did you mean 'Europe/Berlin'?)" in issue.message
    assert issue.allowed is not None
    assert "IANA" in issue.allowed


@pytest.mark.parametrize("zone", ["CEST", "../../etc/passwd", "42"])
def test_other_non_zones_are_refused(tmp_path: Path, zone: str) -> None:
    issue = only_error(tmp_path, HEAD + f"schedule:\n  timezone: {zone}\n")
    assert issue.field == "schedule.timezone"


@pytest.mark.parametrize(
    ("window", "phrase"),
    [
        ('"22:00-22:00"', "schedule window '22:00-22:00' is empty"),
        ('"22:00"', "is not two times HH:MM-HH:MM"),
        ('"22:00 to 06:00"', "is not two times HH:MM-HH:MM"),
        ('"25:00-06:00"', "25:00 is not a time of day"),
        ("22", "window must be text such as"),
    ],
)
def test_a_bad_window_is_a_located_error(tmp_path: Path, window: str, phrase: str) -> None:
    issue = only_error(tmp_path, HEAD + f"schedule:\n  window: {window}\n")
    assert (issue.line, issue.field) == (6, "schedule.window")
    assert phrase in issue.message


def test_an_unknown_schedule_key_gets_did_you_mean(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + "schedule:\n  dedline: 2026-12-02T06:00:00+01:00\n")
    assert (issue.line, issue.field) == (6, "schedule.dedline")
    assert "unknown schedule key 'dedline' (did you mean 'deadline'?)" in issue.message
    assert issue.allowed == "not_before, deadline, window, timezone"


def test_a_schedule_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + 'schedule: "22:00-06:00"\n')
    assert (issue.line, issue.field) == (5, "schedule")
    assert "'schedule' must be a mapping" in issue.message


@pytest.mark.parametrize("deadline", ["2026-12-01T22:00:00+01:00", "2026-12-01T20:00:00Z"])
def test_a_deadline_not_after_not_before_is_refused(tmp_path: Path, deadline: str) -> None:
    text = HEAD + f"schedule:\n  not_before: 2026-12-01T22:00:00+01:00\n  deadline: {deadline}\n"
    issue = only_error(tmp_path, text)
    assert (issue.line, issue.field) == (7, "schedule.deadline")
    assert "is not after not_before" in issue.message


def test_a_deadline_already_past_is_refused(tmp_path: Path) -> None:
    text = HEAD + "schedule:\n  deadline: 2026-12-01T12:00:00Z\n"
    issue = only_error(tmp_path, text, now=NOW)  # exactly now: already too late
    assert (issue.line, issue.field) == (6, "schedule.deadline")
    assert "has already passed (it is now 2026-12-01 12:00 UTC)" in issue.message
    assert errors(tmp_path, text, now=datetime(2026, 12, 1, 11, 59, tzinfo=UTC)) == []


def test_a_window_that_opens_only_after_the_deadline_is_refused(tmp_path: Path) -> None:
    text = (
        HEAD
        + "schedule:\n"  # 5
        + "  deadline: 2026-12-01T21:00:00+01:00\n"  # 6
        + '  window: "22:00-23:00"\n'  # 7
        + "  timezone: Europe/Berlin\n"  # 8
    )
    manifest, issues = parse_manifest(write(tmp_path, text), now=NOW)  # 13:00 in Berlin
    assert manifest is not None
    [issue] = issues
    assert (issue.line, issue.field, issue.code) == (6, "schedule.deadline", NEVER_OPENS)
    assert str(issue) == (
        f"{tmp_path / 'm.yaml'}:6: field 'schedule.deadline': schedule deadline 2026-12-01T21:00+01:00 "
        "passes before the window 22:00-23:00 (Europe/Berlin) next opens, at 2026-12-01T22:00+01:00: "
        "nothing could ever be sent (allowed: a deadline after the window next opens)"
    )
    assert manifest.schedule.window == (time(22), time(23))  # kept, as a past deadline is (stored batches)
    # An hour later the deadline would have let tonight's window open.
    assert errors(tmp_path, text.replace("T21:00", "T22:30")) == []


def test_a_not_before_after_which_no_window_comes_before_the_deadline_is_refused(tmp_path: Path) -> None:
    text = (
        HEAD
        + "schedule:\n"
        + "  not_before: 2026-12-01T23:30:00+01:00\n"  # tonight's window closed at 23:00
        + "  deadline: 2026-12-02T06:00:00+01:00\n"  # 7
        + '  window: "22:00-23:00"\n'
        + "  timezone: Europe/Berlin\n"
    )
    issue = only_error(tmp_path, text)
    assert (issue.line, issue.field, issue.code) == (7, "schedule.deadline", NEVER_OPENS)
    assert "first opens after not_before, at 2026-12-02T22:00+01:00" in issue.message


def test_a_window_the_spring_forward_skips_before_the_deadline_is_refused(tmp_path: Path) -> None:
    text = (
        HEAD
        + "schedule:\n"
        + "  deadline: 2026-03-29T06:00:00+02:00\n"  # 6
        + '  window: "02:00-02:30"\n'  # does not exist in Berlin on 2026-03-29
        + "  timezone: Europe/Berlin\n"
    )
    issue = only_error(tmp_path, text, now=datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert (issue.line, issue.field, issue.code) == (6, "schedule.deadline", NEVER_OPENS)
    assert "next opens, at 2026-03-30T02:00+02:00" in issue.message
    assert "02:00-02:30 does not exist on 2026-03-29: the clocks skip it" in issue.message
    # Half an hour wider, it opens when the clocks resume (03:00 CEST), before the deadline.
    wider = text.replace("02:00-02:30", "02:00-03:30")
    assert errors(tmp_path, wider, datetime(2026, 3, 28, 12, tzinfo=UTC)) == []


@pytest.mark.parametrize(
    ("now", "deadline"),
    [
        (NOW, "2026-12-02T01:00:00+01:00"),  # opens at 22:00, the deadline ends the night at 01:00
        (datetime(2026, 12, 1, 23, 30, tzinfo=UTC), "2026-12-02T01:00:00+01:00"),  # open now (00:30)
        (datetime(2026, 12, 2, 5, 30, tzinfo=UTC), "2026-12-02T22:00:01+01:00"),  # one second of it
    ],
)
def test_a_window_crossing_midnight_that_opens_before_the_deadline_passes(
    tmp_path: Path, now: datetime, deadline: str
) -> None:
    text = HEAD + f'schedule:\n  deadline: {deadline}\n  window: "22:00-06:00"\n  timezone: Europe/Berlin\n'
    assert errors(tmp_path, text, now) == []
    assert load_manifest(write(tmp_path, text), now=now).schedule.window == (time(22), time(6))


def test_the_current_time_is_the_default_now(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "schedule:\n  deadline: 2020-01-01T00:00:00Z\n")
    with pytest.raises(ManifestError, match="has already passed"):
        load_manifest(path)
    report = validate_manifest(path)
    assert not report.ok
    assert [i.field for i in report.errors] == ["schedule.deadline"]


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("lo", "got the text 'lo' (did you mean 'low'?)"),
        ("Low", "did you mean 'low'?"),
        ("high", "fal has no higher priority than normal"),
        ("1", "got int 1"),
    ],
)
def test_a_bad_priority_is_a_located_error(tmp_path: Path, value: str, phrase: str) -> None:
    issue = only_error(tmp_path, HEAD + f"priority: {value}\n")
    assert (issue.line, issue.field) == (5, "priority")
    assert "priority must be normal or low" in issue.message
    assert phrase in issue.message


def test_every_schedule_problem_is_reported_in_one_pass_and_the_schedule_stays_empty(
    tmp_path: Path,
) -> None:
    text = (
        HEAD
        + "schedule:\n"
        + "  not_before: 2026-12-01T22:00:00\n"  # 6: naive
        + "  deadline: 2020-12-02T06:00:00+01:00\n"  # 7: past
        + '  window: "06:00-06:00"\n'  # 8: empty
        + "  timezone: Mars/Olympus\n"  # 9: unknown
        + "  every: day\n"  # 10: unknown key
        + "priority: urgent\n"  # 11
    )
    manifest, issues = parse_manifest(write(tmp_path, text), now=NOW)
    assert manifest is not None
    assert sorted((i.line, i.field) for i in issues) == [
        (6, "schedule.not_before"),
        (7, "schedule.deadline"),
        (8, "schedule.window"),
        (9, "schedule.timezone"),
        (10, "schedule.every"),
        (11, "priority"),
    ]
    assert manifest.schedule.is_empty()
    assert manifest.priority == "normal"


def test_the_new_keys_are_top_level_keys(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + "schedul: {}\n")
    assert "did you mean 'schedule'?" in issue.message
    assert issue.allowed is not None
    assert "schedule, priority" in issue.allowed


def test_pinned_seeds_with_default_prompt_expansion_warn_once_per_endpoint(tmp_path: Path) -> None:
    """Issue #13's reproducibility lock: Wan 2.5/2.6 rewrite the prompt unless told not to."""
    from jobs.manifest.report import validate_manifest

    manifest = tmp_path / "sweep.yaml"
    from tests.unit.test_validation import png_bytes

    (tmp_path / "a.png").write_bytes(png_bytes((1280, 720)))
    manifest.write_text(
        "name: sweep\nendpoint: fal-ai/wan-25-preview/image-to-video\n"
        "defaults: {image_url: a.png}\nmatrix: {seed: [1, 2, 3]}\nitems:\n  - prompt: a boat\n"
    )
    report = validate_manifest(manifest)
    warnings = [w for w in report.warnings if w.field == "enable_prompt_expansion"]
    assert len(warnings) == 1
    assert "enable_prompt_expansion: false" in warnings[0].message
    manifest.write_text(
        "name: sweep\nendpoint: fal-ai/wan-25-preview/image-to-video\n"
        "defaults: {image_url: a.png, enable_prompt_expansion: false}\nmatrix: {seed: [1, 2, 3]}\n"
        "items:\n  - prompt: a boat\n"
    )
    assert not [w for w in validate_manifest(manifest).warnings if w.field == "enable_prompt_expansion"]


@pytest.mark.parametrize("name", ["localtime", "Factory", "posixrules", "posix/Europe/Berlin", "right/UTC"])
def test_host_tz_database_files_are_no_time_zone(tmp_path: Path, name: str) -> None:
    # ZoneInfo loads them on this host, but what they mean depends on the host: refused.
    issue = only_error(tmp_path, HEAD + f"schedule:\n  window: 22:00-06:00\n  timezone: {name}\n")
    assert (issue.line, issue.field) == (7, "schedule.timezone")
    assert f"{name!r} is this host's tz database file, not an IANA time zone name" in issue.message
    assert "'localtime'" not in issue.message.replace(f"{name!r}", "")


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("Z", "UTC"),
        ("utc", "UTC"),
        ("gmt", "UTC"),
        ("utc+00:00", "UTC"),
        ("europe/berlin", "Europe/Berlin"),
        ("AMERICA/NEW_YORK", "America/New_York"),
    ],
)
def test_timezone_hints_ignore_case_and_know_utc(tmp_path: Path, name: str, hint: str) -> None:
    issue = only_error(tmp_path, HEAD + f"schedule:\n  timezone: {name}\n")
    assert issue.field == "schedule.timezone"
    assert f"unknown time zone {name!r} (did you mean {hint!r}?)" in issue.message


def test_local_is_not_pointed_at_the_hosts_zone_file(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + "schedule:\n  timezone: local\n")
    assert "localtime" not in issue.message


# -- valid, but likely not what was meant: warnings ----------------------------------------------


def warnings(tmp_path: Path, text: str) -> list[Issue]:
    manifest, issues = parse_manifest(write(tmp_path, text), now=NOW)
    assert manifest is not None
    assert [i for i in issues if i.severity == "error"] == []
    return [i for i in issues if i.severity == "warning"]


LOCAL_WITHOUT_ZONE = (
    HEAD
    + "schedule:\n"  # 5
    + "  not_before: 2026-12-01T22:00:00+01:00\n"  # 6
    + "  deadline: 2026-12-02T06:00:00+01:00\n"  # 7
    + '  window: "22:00-06:00"\n'  # 8
)


def test_a_window_without_timezone_beside_local_instants_warns_it_is_read_in_utc(tmp_path: Path) -> None:
    """The audit's trap: instants written in +01:00, the window's hours meant as the same local
    time, no ``timezone``: the window is read in UTC, an hour off. Valid (it may be meant), so a
    warning at the window's line, naming the offset and the fix."""
    (warning,) = warnings(tmp_path, LOCAL_WITHOUT_ZONE)
    assert (warning.line, warning.field) == (8, "schedule.window")
    assert warning.message == (
        "schedule window 22:00-06:00 is read in UTC (no timezone given), though not_before and deadline "
        "carry the offset +01:00: add timezone: naming the zone they are local to (such as Europe/Paris), "
        "or timezone: UTC if the window is meant in UTC"
    )
    assert str(warning).startswith(f"{tmp_path / 'm.yaml'}:8: field 'schedule.window': ")
    # Only a warning: the schedule is kept as written, the window in UTC.
    schedule = load_manifest(write(tmp_path, LOCAL_WITHOUT_ZONE), now=NOW).schedule
    assert (schedule.timezone, schedule.window) == ("UTC", (time(22), time(6)))


@pytest.mark.parametrize(
    ("instants", "said"),
    [
        ("  deadline: 2026-12-02T06:00:00-05:30\n", "deadline carries the offset -05:30"),
        (
            "  not_before: 2026-12-01T22:00:00Z\n  deadline: 2026-12-02T06:00:00+02:00\n",
            "deadline carries the offset +02:00",
        ),
        (
            "  not_before: 2026-12-01T22:00:00+01:00\n  deadline: 2026-12-02T06:00:00+02:00\n",
            "not_before carries +01:00 and deadline carries +02:00",
        ),
    ],
)
def test_the_warning_names_each_offset_written(tmp_path: Path, instants: str, said: str) -> None:
    (warning,) = warnings(tmp_path, HEAD + "schedule:\n" + instants + "  window: 22:00-06:00\n")
    assert f"though {said}: add timezone:" in warning.message


@pytest.mark.parametrize(
    "body",
    [
        # A timezone said, whichever: the window is read where the manifest says.
        "  deadline: 2026-12-02T06:00:00+01:00\n  window: 22:00-06:00\n  timezone: Europe/Berlin\n",
        "  deadline: 2026-12-02T06:00:00+01:00\n  window: 22:00-06:00\n  timezone: UTC\n",
        # Instants in UTC: nothing says the window was meant elsewhere.
        "  not_before: 2026-12-01T22:00:00Z\n  deadline: 2026-12-02T06:00:00+00:00\n  window: 22:00-06:00\n",
        # No window: the instants are instants, whatever their offset.
        "  not_before: 2026-12-01T22:00:00+01:00\n  deadline: 2026-12-02T06:00:00+01:00\n",
    ],
)
def test_no_warning_when_the_window_is_read_as_written(tmp_path: Path, body: str) -> None:
    assert warnings(tmp_path, HEAD + "schedule:\n" + body) == []


@pytest.mark.parametrize(
    ("zone_name", "message"),
    [
        (
            "Etc/GMT+1",
            "schedule timezone Etc/GMT+1 is UTC-01:00, not UTC+01:00: Etc/GMT zones have the sign "
            "reversed (POSIX); for UTC+01:00 write Etc/GMT-1 or a city zone (Area/City)",
        ),
        (
            "Etc/GMT-10",
            "schedule timezone Etc/GMT-10 is UTC+10:00, not UTC-10:00: Etc/GMT zones have the sign "
            "reversed (POSIX); for UTC-10:00 write Etc/GMT+10 or a city zone (Area/City)",
        ),
    ],
)
def test_an_etc_gmt_zone_warns_what_its_reversed_sign_means(
    tmp_path: Path, zone_name: str, message: str
) -> None:
    text = HEAD + f'schedule:\n  window: "22:00-06:00"\n  timezone: {zone_name}\n'  # timezone: line 7
    (warning,) = warnings(tmp_path, text)
    assert (warning.line, warning.field, warning.message) == (7, "schedule.timezone", message)
    # Valid all the same: the zone is what it is.
    assert load_manifest(write(tmp_path, text), now=NOW).schedule.timezone == zone_name


@pytest.mark.parametrize("zone_name", ["Etc/GMT+0", "Etc/GMT-0", "Etc/GMT", "Etc/UTC", "Europe/Berlin"])
def test_zones_whose_name_reads_right_do_not_warn(tmp_path: Path, zone_name: str) -> None:
    assert warnings(tmp_path, HEAD + f"schedule:\n  window: 22:00-06:00\n  timezone: {zone_name}\n") == []


def test_validate_prints_both_time_zone_warnings_and_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the audit ran them: ``wanbatch validate`` said nothing of either trap."""
    from tests.in_process import run_main

    later = LOCAL_WITHOUT_ZONE.replace("2026-12-0", "2099-12-0")
    (tmp_path / "tz1.yaml").write_text(later, encoding="utf-8")
    (tmp_path / "tz2.yaml").write_text(
        HEAD + 'schedule:\n  window: "22:00-06:00"\n  timezone: Etc/GMT+1\n', encoding="utf-8"
    )
    for name, where, phrase in [
        ("tz1.yaml", "tz1.yaml:8: field 'schedule.window'", "is read in UTC"),
        ("tz2.yaml", "tz2.yaml:7: field 'schedule.timezone'", "Etc/GMT+1 is UTC-01:00"),
    ]:
        assert run_main(["validate", str(tmp_path / name)], monkeypatch) == 0
        out = capsys.readouterr()
        lines = [line for line in (out.out + out.err).splitlines() if line.startswith("warning")]
        assert len(lines) == 1, out
        assert where in lines[0]
        assert phrase in lines[0]


def test_a_deadline_is_judged_on_the_databases_clock(tmp_path: Path) -> None:
    """``now`` left out is the time on the database's timeline (:func:`jobs.clock.utcnow`), as
    every process reads it: with this host 3 minutes behind the database, a deadline 1 minute
    ahead of the host's clock has passed (validate and submit took it, stored it, and the first
    tick cancelled every job)."""
    host = clocktime.time()
    steady = clock.steady()
    deadline = datetime.fromtimestamp(host + 60, UTC).isoformat(timespec="seconds")
    text = HEAD + f"schedule:\n  deadline: {deadline}\n"
    try:
        clock.take(host + 180.0, before=steady, after=steady, wall=host, say=False)
        manifest, issues = parse_manifest(write(tmp_path, text))
    finally:
        clock.reset()
    assert manifest is not None
    assert [i.code for i in issues if i.severity == "error"] == [DEADLINE_PASSED], [str(i) for i in issues]


@pytest.mark.parametrize(
    ("zone_name", "message"),
    [
        (
            "EST",
            "schedule timezone EST never changes to daylight time: it is UTC-05:00 all year, an hour "
            "off New York's clocks in summer; for New York write America/New_York (for UTC-05:00 all "
            "year, America/Panama)",
        ),
        (
            "MST",
            "schedule timezone MST never changes to daylight time: it is UTC-07:00 all year, an hour "
            "off Denver's clocks in summer; for Denver write America/Denver (for Arizona, America/Phoenix)",
        ),
        (
            "HST",
            "schedule timezone HST is a legacy name: UTC-10:00 all year, no daylight time (as Hawaii's "
            "clocks); write Pacific/Honolulu",
        ),
        (
            "EST5EDT",
            "schedule timezone EST5EDT is a legacy name (it follows the US daylight-saving rules); write "
            "the zone of a place, such as America/New_York",
        ),
        (
            "PST8PDT",
            "schedule timezone PST8PDT is a legacy name (it follows the US daylight-saving rules); write "
            "the zone of a place, such as America/Los_Angeles",
        ),
        (
            "CET",
            "schedule timezone CET is a legacy name (it follows the EU daylight-saving rules); write the "
            "zone of a place, such as Europe/Berlin or Europe/Paris",
        ),
    ],
)
def test_a_legacy_zone_warns_what_it_is_and_which_to_write(
    tmp_path: Path, zone_name: str, message: str
) -> None:
    """``timezone: EST`` with ``window: "22:00-06:00"`` validated silently, and all summer the
    window opened at 23:00 New York time: EST never changes to daylight time."""
    text = HEAD + f'schedule:\n  window: "22:00-06:00"\n  timezone: {zone_name}\n'  # timezone: line 7
    (warning,) = warnings(tmp_path, text)
    assert (warning.line, warning.field, warning.message) == (7, "schedule.timezone", message)
    assert load_manifest(write(tmp_path, text), now=NOW).schedule.timezone == zone_name  # valid


def test_a_whole_day_window_and_an_end_of_day_deadline_are_accepted(tmp_path: Path) -> None:
    """``window: "00:00-24:00"`` (refused: "24:00 is not a time of day") is the whole day, as no
    window; a deadline at ``T24:00`` (refused: "not an ISO 8601 timestamp") is the next day's 00:00."""
    body = '  deadline: 2026-12-02T24:00:00+01:00\n  window: "00:00-24:00"\n  timezone: Europe/Berlin\n'
    assert schedule_of(tmp_path, body) == Schedule(
        deadline=datetime(2026, 12, 2, 23, tzinfo=UTC), timezone=BERLIN
    )
    until_midnight = schedule_of(tmp_path, '  window: "22:00-24:00"\n  timezone: Europe/Berlin\n')
    assert until_midnight.window == (time(22), time(0))


def test_an_empty_window_says_how_to_send_at_any_time(tmp_path: Path) -> None:
    issue = only_error(tmp_path, HEAD + 'schedule:\n  window: "22:00-22:00"\n')
    assert "to send at any time of day leave `window` out, or write 00:00-24:00" in issue.message


def test_a_deadline_without_offset_is_refused_with_the_offset_it_has_in_the_schedules_zone(
    tmp_path: Path,
) -> None:
    """Refused (explicit is right), but the refusal names the offset: it said "add one such as
    +01:00" beside ``timezone: Europe/Berlin``, whatever the date."""
    text = HEAD + "schedule:\n  deadline: 2027-07-02T06:00:00\n  timezone: Europe/Berlin\n"
    issue = only_error(tmp_path, text)
    assert (issue.line, issue.field) == (6, "schedule.deadline")
    assert issue.message == (
        "schedule deadline: '2027-07-02T06:00:00' has no UTC offset, so the instant is ambiguous; in "
        "Europe/Berlin on 2027-07-02 06:00 that is +02:00: write 2027-07-02T06:00:00+02:00"
    )


def test_the_schedule_changed_note_shows_instants_as_status_does() -> None:
    """The note on a resubmit showed the stored UTC form (``deadline 2026-12-07T05:00:00+00:00``)
    where ``status`` shows ``2026-12-07 06:00 +01:00``, in the schedule's zone."""
    stored = Schedule(
        not_before=datetime(2026, 12, 6, 21, tzinfo=UTC),
        deadline=datetime(2026, 12, 7, 5, tzinfo=UTC),
        window=(time(22), time(6)),
        timezone=BERLIN,
    ).as_json()
    assert schedule_text(stored, "low") == (
        "not before 2026-12-06 22:00 +01:00, deadline 2026-12-07 06:00 +01:00, "
        "window 22:00-06:00 Europe/Berlin, priority low"
    )
    assert schedule_text(None) == "none"
