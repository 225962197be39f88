"""When an outage is said: its first failure at once, again at most every ``every`` seconds, its
end once. A fake clock drives it: no test waits."""

from __future__ import annotations

from worker.outage_log import Failure, Held, HoldLog, OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_said_at_once_then_at_most_every_interval_and_its_end_once() -> None:
    clock = Clock()
    outage = OutageLog(30.0, clock)
    # an answer while nothing was down: nothing to say
    assert (outage.answered(), outage.down) == (None, False)

    assert (outage.failed(), outage.down) == (Failure(at=100.0, began=True, due=True, lasted=0.0), True)
    said = []
    for _ in range(29):  # a failure a second: none said before the interval has passed
        clock.now += 1
        said.append(outage.failed().due)
    assert not any(said)
    clock.now += 1
    again = outage.failed()
    assert (again.began, again.due, again.lasted, again.for_how_long) == (False, True, 30.0, " for 30s")

    clock.now += 12
    assert outage.answered() == 42.0  # once: the next answer finds no outage
    assert (outage.answered(), outage.down) == (None, False)

    clock.now += 1  # a new outage, within the interval of the last warning: said at once
    assert outage.failed() == Failure(at=143.0, began=True, due=True, lasted=0.0)


def test_an_outage_under_a_second_old_says_no_length() -> None:
    clock = Clock()
    outage = OutageLog(30.0, clock)
    outage.failed()
    clock.now += 0.9
    assert outage.failed().for_how_long == ""
    clock.now += 0.2
    assert outage.failed().for_how_long == " for 1s"


def test_without_new_outage_said_at_once_the_interval_runs_on_across_answers() -> None:
    """For a caller whose "answered" is only "nothing failed this time": something that comes
    and goes is still said at most every interval, while each outage's length starts afresh."""
    clock = Clock()
    outage = OutageLog(30.0, clock, new_outage_said_at_once=False)
    assert outage.failed().due
    clock.now += 10
    assert outage.answered() == 10.0
    clock.now += 5
    early = outage.failed()
    assert (early.began, early.due, early.lasted) == (True, False, 0.0)
    clock.now += 15  # 30 s since the last warning
    late = outage.failed()
    assert (late.began, late.due, late.lasted) == (False, True, 15.0)


def test_the_clock_can_be_replaced_after_the_fact() -> None:
    outage = OutageLog(30.0)
    clock = Clock()
    outage.clock = clock
    assert outage.failed().at == 100.0


def test_a_hold_is_said_when_it_begins_its_figure_doubles_or_halves_and_each_minute() -> None:
    clock = Clock()
    hold = HoldLog(60.0, clock)
    assert hold.ended() is None  # nothing held: nothing to say
    said = []
    for figure in [4, 4, 5, 7, 4, 8, 8, 4, 3, 2, 2]:  # a round a second
        said.append(hold.holds(figure).due)
        clock.now += 1
    # begins (4); 5 and 7 are within a factor 2 of 4; 8 is 2x; 4 is half of 8; 2 is half of 4
    assert said == [True, False, False, False, False, True, False, True, False, True, False]
    clock.now += 60
    assert hold.holds(2) == Held(due=True, lasted=71.0)
    assert hold.ended() == 71.0


def test_a_hold_that_flaps_is_said_at_most_once_a_minute_and_an_unsaid_one_ends_unsaid() -> None:
    clock = Clock()
    hold = HoldLog(60.0, clock)
    said = []
    for _ in range(30):  # on one round, off the next, for a minute
        said.append(hold.holds(1).due)
        clock.now += 1
        said.append(hold.ended() is not None)
        clock.now += 1
    assert said.count(True) == 2  # the first hold, and its end
    assert said[:2] == [True, True]
    assert hold.holds(1).due  # a minute after the last line: said again
