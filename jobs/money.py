"""How money is rounded and written: one definition for every command, page and export.

Sums stay exact :class:`~decimal.Decimal` inside wanbatch; rounding happens only here, at the
edge, and the same way everywhere. Before, ``status`` formatted a float (``$2.835`` printed
``$2.83``, the binary float being just under) while ``cost`` formatted a Decimal with the
default banker's rounding (``$2.84``, but ``$2.825`` → ``$2.82``): two commands, two answers.

- **For people** (:func:`usd_text`): dollars and cents, rounded half up (``ROUND_HALF_UP``, as
  on an invoice: ``$2.835`` → ``$2.84``, ``$2.825`` → ``$2.83``), with thousands separators.
- **In JSON** (:func:`usd_json`): a JSON number of US dollars rounded half up to the micro-dollar
  (6 decimal places), in every ``--json`` object and export. A number keeps ``jq`` and
  spreadsheets working; six places keep per-second prices exact. A float prints its shortest
  round-tripping form, so ``Decimal(str(value))`` gives back exactly the rounded amount.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from jobs.printable import one_line

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")

#: Every cap a user names (``budget.max_usd``, ``rerun --max-usd``, ``WANBATCH_DAILY_BUDGET_USD``)
#: must be below this: a billion US dollars. Money is stored exactly, in nano-dollars; SQLite
#: keeps that in a 64-bit INTEGER, which ends near 9.2 billion dollars — a cap of ten billion
#: could not be stored at all, and sums of spend need room above the cap. No batch costs this.
MAX_USD = Decimal("1e9")


def too_much_usd(value: Decimal | float | int) -> str | None:
    """Why ``value`` is too large for a cap, or None when it is below :data:`MAX_USD`."""
    if as_decimal(value) < MAX_USD:
        return None
    return f"is too large: a cap must be less than {usd_text(MAX_USD)}"


def as_decimal(value: Decimal | float | int | str) -> Decimal:
    """``value`` as a Decimal; a float by its shortest repr (``2.835`` → ``Decimal("2.835")``).

    ``Decimal(2.835)`` would be the binary float's exact value, ``2.83499999…``, and round down:
    the very bug this module exists to prevent.
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def round_cents(value: Decimal | float | int | str) -> Decimal:
    """``value`` rounded half up to the cent: ``2.835`` → ``2.84``, ``-2.835`` → ``-2.84``."""
    return as_decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)


def usd_text(value: Decimal | float | int | str | None, *, none: str = "$0.00") -> str:
    """Dollars for people: ``$2.84``, ``$1,234.50`` (``none`` when there is no amount).

    The only formatting of money that ``status``, ``cost``, ``estimate``, ``run`` and the
    dashboard use, so they never disagree on a cent.
    """
    if value is None:
        return none
    cents = round_cents(value)
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents):,.2f}"


#: The most decimals :func:`usd_apart` shows: money is stored in nano-dollars (``Money``), so two
#: stored amounts that differ always differ by then.
MOST_DECIMALS = 9


def _usd_places(value: Decimal, places: int) -> str:
    """``value`` as dollars rounded half up to ``places`` decimals, with thousands separators."""
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    return f"{sign}${abs(rounded):,.{places}f}"


def usd_apart(*amounts: Decimal | float | int | str) -> tuple[str, ...]:
    """The ``amounts`` a message compares, each as :func:`usd_text` would write it, but with as
    many decimals (the same number for all, from 2 up to :data:`MOST_DECIMALS`) as it takes for
    amounts that differ to read differently.

    A cap compares two amounts; rounded to the cent, an estimate of $1.0125 against a cap of
    $1.01 read "the estimate $1.01 exceeds budget.max_usd $1.01", and a job refused by a cap of
    $0.199999 "would commit $0.20 of the batch's $0.20 cap": each message contradicted itself.
    Now ``$1.013`` and ``$1.010``, ``$0.203`` and ``$0.200``. Amounts that do not differ, or
    whose cents already differ, read as :func:`usd_text` reads them. The one way every message
    that compares money writes it (``estimate``'s budget warning, the budget caps' refusals).
    """
    exact = [as_decimal(a) for a in amounts]
    distinct = len(set(exact))
    for places in range(2, MOST_DECIMALS + 1):
        shown = tuple(_usd_places(a, places) for a in exact)
        if len(set(shown)) == distinct:
            return shown
    return tuple(_usd_places(a, MOST_DECIMALS) for a in exact)


def usd_json(value: Decimal | float | int | str | None) -> float | None:
    """Dollars for JSON: a number rounded half up to the micro-dollar (None stays None)."""
    if value is None:
        return None
    return float(as_decimal(value).quantize(MICRO, rounding=ROUND_HALF_UP))


#: ``error_type`` of a job cancelled before sending because it would cross its batch's budget cap.
BATCH_CAP_ERROR = "budget"
#: ``error_type`` of one cancelled because it would cross ``WANBATCH_DAILY_BUDGET_USD`` (all
#: batches, one UTC day): a new ``--max-usd`` cannot help it, a new day or a higher setting can.
DAILY_CAP_ERROR = "daily_budget"
#: Both: "cancelled for budget" counts them together.
BUDGET_ERRORS = (BATCH_CAP_ERROR, DAILY_CAP_ERROR)


#: How many batches a daily-cap message names, the largest first; the rest are counted
#: ("and 2 more"): the message stays one line however many batches shared the day.
NAMED_BATCHES = 3


@dataclass(frozen=True, slots=True)
class DaySpender:
    """One batch's share of what the day's cap counts (``WANBATCH_DAILY_BUDGET_USD``)."""

    batch_id: str
    name: str
    usd: Decimal


def others_today(spenders: Sequence[DaySpender], own: str | None) -> tuple[Decimal, str]:
    """What the batches other than ``own`` (an id or a name; None: every batch is another)
    committed today, and those batches named, the largest first (``spenders`` are so ordered):
    ``"bob-lh, carol-lh"``, ``"a, b, c and 2 more"``; ``(0, "")`` when none did.

    The day's cap is summed over every batch of the database (one fal account, shared): an audit
    had three people on one PostgreSQL database, and Alice's jobs were cancelled by "$31.39 of
    today's $5.00 cap" of which $30.59 was Bob's and Carol's, which nothing said."""
    others = [s for s in spenders if s.usd > 0 and own not in (s.batch_id, s.name)]
    if not others:
        return Decimal(0), ""
    # As ``status`` shows a name stored before line breaks and tabs were refused: escaped, so
    # the refusal (a job's one-line ``error``, its log line) and the warning stay on one line.
    named = ", ".join(one_line(s.name) for s in others[:NAMED_BATCHES])
    more = len(others) - NAMED_BATCHES
    return sum((s.usd for s in others), Decimal(0)), f"{named} and {more} more" if more > 0 else named


#: The cap a daily-cap refusal names: ``… of today's $5.00 cap …`` (:data:`DAILY_CAP_ERROR`).
_DAILY_CAP_IN_ERROR = re.compile(r"of today's \$([0-9][0-9,]*(?:\.[0-9]+)?) cap")


def daily_cap_in(error: str | None) -> Decimal | None:
    """The day's cap a daily-cap refusal (``error`` of a :data:`DAILY_CAP_ERROR` job) was
    checked against, as it wrote it (its decimals: as many as the message showed), or None.

    The cap is a process's setting, not the batch's: the one that refused a job may not be the
    one of the process that reads it (``status`` in another shell), so the advice compares them."""
    found = _DAILY_CAP_IN_ERROR.search(error or "")
    if found is None:
        return None
    try:
        return Decimal(found.group(1).replace(",", ""))
    except InvalidOperation:
        return None
