"""Billing units and USD for a job, computed from the registry's pricing data.

All money is :class:`~decimal.Decimal`: a batch of thousands of $0.20 jobs must add up to the
cent, which binary floats do not promise. Inputs the user left out are priced at the
endpoint's documented default, because that is what the provider will apply and bill.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypedDict

from jobs.endpoints import EndpointSpec, get_endpoint
from jobs.errors import UnpricedError, UsageError
from jobs.money import usd_json
from jobs.settings import BudgetSettings


@dataclass(frozen=True, slots=True)
class Estimate:
    """What one job is expected to cost."""

    endpoint: str
    billing_units: Decimal
    usd: Decimal
    #: The endpoint's unit symbol (:func:`unit_symbol`): units of unlike symbols never add up.
    unit: str
    assumption: bool = False


def unit_symbol(endpoint_id: str) -> str:
    """The short symbol of ``endpoint_id``'s billing unit (``s`` for seconds of video, ``unit``
    for fal's per-video units): billing units are summed only among endpoints of one symbol.

    An endpoint no longer registered (a stored job of an older wanbatch) gets a symbol of its own,
    so its units are never added to anyone else's.
    """
    try:
        return get_endpoint(endpoint_id).pricing.unit_symbol
    except UsageError:
        return f"{endpoint_id} unit"


def add_units(into: dict[str, Decimal], unit: str, amount: Decimal) -> None:
    """Add ``amount`` billing units of ``unit`` to the per-unit sums ``into``."""
    into[unit] = into.get(unit, Decimal(0)) + amount


def units_text(by_unit: Mapping[str, Decimal | float | int]) -> str:
    """``15.06 s + 1 unit``: per-unit sums for people, in a stable order (``0`` when empty).

    A one-letter symbol (``s``) is a unit sign and stays as it is; a word (``unit``) takes an
    ``s`` unless the amount is 1.
    """
    parts = []
    for unit, amount in sorted(by_unit.items()):
        number = Decimal(str(amount))
        plural = len(unit) > 1 and number != 1
        parts.append(f"{number.normalize():f} {unit}{'s' if plural else ''}")
    return " + ".join(parts) or "0"


def _unpriced(endpoint_id: str, name: str, value: object) -> UnpricedError:
    """The error of a job ``endpoint_id``'s price table has no price for (``name`` = ``value``)."""
    return UnpricedError(f"{endpoint_id} has no price for {name}={value!r}: the job cannot be priced")


def _number(endpoint_id: str, name: str, value: object) -> Decimal:
    """``value`` as the number a price is computed from; :class:`UnpricedError` when it is none
    (text, a boolean, nothing, NaN or an infinity: no price is a multiple of those)."""
    if type(value) is int:  # the usual case (num_frames), once a job: no other check applies
        return Decimal(str(value))
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise _unpriced(endpoint_id, name, value)
    try:
        number = Decimal(str(value))
    except ArithmeticError:  # decimal.InvalidOperation: "abc"
        raise _unpriced(endpoint_id, name, value) from None
    if not number.is_finite():
        raise _unpriced(endpoint_id, name, value)
    return number


def _value(spec: EndpointSpec, resolved: Mapping[str, Any], name: str) -> Any:
    if name in resolved and resolved[name] is not None:
        return resolved[name]
    fld = spec.field(name)
    return None if fld is None else fld.default


def estimate_job(
    endpoint_id: str, resolved_input: Mapping[str, Any], prices: BudgetSettings | None = None
) -> Estimate:
    """Billing units and USD for one job of ``endpoint_id`` with ``resolved_input``.

    ``prices`` carries the user's ``WANBATCH_PRICING_OVERRIDES``; None prices by the registry
    alone (fal's published prices: what the simulator bills).

    Raises :class:`~jobs.errors.UnpricedError` (one line, never an internal error) when a
    pricing field has a value the price table does not cover, or one that is no number where a
    number prices the job. Validation refuses such inputs before any job is priced; one that
    reaches here all the same (a row that changed after it was validated) is said, not crashed on.
    """
    spec = get_endpoint(endpoint_id)
    pricing = spec.pricing
    units = Decimal(1)
    for factor in pricing.factors:
        value = _value(spec, resolved_input, factor.field)
        if factor.kind == "table":
            assert factor.table is not None
            try:
                units *= factor.table[str(value)]
            except KeyError:
                raise _unpriced(endpoint_id, factor.field, value) from None
        elif factor.kind == "value":
            units *= _number(endpoint_id, factor.field, value) / factor.divide_by
        else:
            assert factor.above is not None
            assert factor.factor is not None
            if _number(endpoint_id, factor.field, value) > factor.above:
                units *= factor.factor

    overrides = prices.usd_override(endpoint_id) if prices is not None else None
    overridden = bool(overrides) and "" in (overrides or {})  # the price used is the user's
    if pricing.usd_per_unit is not None:
        rate = overrides.get("", pricing.usd_per_unit) if overrides else pricing.usd_per_unit
    else:
        assert pricing.usd_per_unit_field is not None
        assert pricing.usd_per_unit_by is not None
        key = str(_value(spec, resolved_input, pricing.usd_per_unit_field))
        table = {**pricing.usd_per_unit_by, **(overrides or {})}
        if "" in table and key not in (overrides or {}):
            table[key] = table[""]
        overridden = overridden or key in (overrides or {})
        try:
            rate = table[key]
        except KeyError:
            raise _unpriced(endpoint_id, pricing.usd_per_unit_field, key) from None
    return Estimate(
        endpoint=endpoint_id,
        billing_units=units,
        usd=units * rate,
        assumption=pricing.assumption and not overridden,
        unit=pricing.unit_symbol,
    )


@lru_cache(maxsize=64)
def _registry_pricing(endpoint: str) -> dict[str, Any]:
    """The registry's pricing entry of ``endpoint`` as JSON (built once, shared by its jobs)."""
    return get_endpoint(endpoint).pricing.model_dump(mode="json", exclude_none=True)


def price_table(endpoint: str, prices: BudgetSettings) -> dict[str, Any]:
    """The pricing a job's estimate used: the registry entry, plus the user's
    ``WANBATCH_PRICING_OVERRIDES`` for the endpoint (``overrides``) when there are any.

    Stored per job (``Job.price_table``), so an estimate stays explainable after fal's prices or
    the registry change, and so a job not sent yet whose table is not the one in force now is
    known to be priced again (:func:`repricer`).
    """
    table = _registry_pricing(endpoint)
    overrides = prices.pricing_overrides.get(endpoint)
    return table if not overrides else {**table, "overrides": overrides}


def priced_otherwise(endpoint: str, stored: Mapping[str, Any] | None, prices: BudgetSettings) -> bool:
    """Whether a job of ``endpoint`` whose estimate used the table ``stored`` (its
    ``price_table``) was priced otherwise than ``prices`` (a process's settings) price it now.

    A job's estimate is what its budget cap reserves when it is sent. Fixed when the job was
    stored, a price corrected afterwards (``WANBATCH_PRICING_OVERRIDES``) was ignored by the cap:
    ``estimate`` said about 3 of 10 jobs fit, and 9 were sent. A job not sent yet that this says
    True of is priced again (:func:`jobs.store.reprice_unsent`). One with no table (stored by a
    version that kept none, or by hand) keeps its estimate: nothing says what priced it.
    """
    return stored is not None and dict(stored) != price_table(endpoint, prices)


class EndpointEstimate(TypedDict):
    """One endpoint's line of ``estimate --json``."""

    jobs: int
    billing_units: float | int
    #: The symbol of the endpoint's billing unit (``s``, ``unit``).
    unit: str
    usd: float | int


class EstimateReport(TypedDict):
    """The ``estimate --json`` object: totals, one line per endpoint, and the assumed prices.

    ``billing_units`` is the sum when every endpoint bills in the same unit, and null when they
    do not (seconds plus videos is no number); ``billing_units_by_unit`` always has the sums per
    unit. USD always adds up.
    """

    jobs: int
    billing_units: float | int | None
    billing_units_by_unit: dict[str, float | int]
    usd: float | int
    by_endpoint: dict[str, EndpointEstimate]
    price_assumptions: list[str]


@dataclass(slots=True)
class Totals:
    """Jobs, units and USD summed, overall and per endpoint (the shape ``estimate --json`` prints).

    Billing units are summed per unit symbol (``by_unit``): an endpoint billed per second and
    one billed per video have no common unit, only a common currency.
    """

    jobs: int = 0
    usd: Decimal = Decimal(0)
    by_unit: dict[str, Decimal] = field(default_factory=dict)
    assumptions: set[str] = field(default_factory=set)
    by_endpoint: dict[str, Totals] = field(default_factory=dict)

    @property
    def billing_units(self) -> Decimal | None:
        """The billing units, when they are all of one unit (or there are none); else None."""
        if len(self.by_unit) > 1:
            return None
        return sum(self.by_unit.values(), Decimal(0))

    def add(self, est: Estimate) -> None:
        """Count one job's estimate in the total and in its endpoint's line."""
        for line in (self, self.by_endpoint.setdefault(est.endpoint, Totals())):
            line.jobs += 1
            line.usd += est.usd
            add_units(line.by_unit, est.unit, est.billing_units)
        if est.assumption:
            self.assumptions.add(est.endpoint)

    def as_dict(self) -> EstimateReport:
        """JSON-ready: USD rounded to the cent only at the end, units as exact numbers."""
        units = self.billing_units
        return {
            "jobs": self.jobs,
            "billing_units": None if units is None else _num(units),
            "billing_units_by_unit": {unit: _num(n) for unit, n in sorted(self.by_unit.items())},
            "usd": _usd(self.usd),
            "by_endpoint": {
                ep: EndpointEstimate(
                    jobs=t.jobs,
                    billing_units=_num(t.billing_units or Decimal(0)),
                    unit=unit_symbol(ep),
                    usd=_usd(t.usd),
                )
                for ep, t in sorted(self.by_endpoint.items())
            },
            "price_assumptions": sorted(self.assumptions),
        }


def _usd(value: Decimal) -> float | int:
    """Dollars as every ``--json`` shows them (:func:`jobs.money.usd_json`: rounded half up to
    the micro-dollar), and as plain as :func:`_num` (2.00 stays 2)."""
    rounded = usd_json(value)
    assert rounded is not None
    return int(rounded) if rounded.is_integer() else rounded


def _num(value: Decimal) -> float | int:
    """A Decimal as the plainest JSON number (4.5 stays 4.5, 2.00 becomes 2)."""
    if value == value.to_integral():
        return int(value)
    return float(value)


def total(estimates: Iterable[Estimate]) -> Totals:
    """Sum many estimates."""
    out = Totals()
    for est in estimates:
        out.add(est)
    return out
