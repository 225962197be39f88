"""The store's kept statements run straight on the driver's cursor (:func:`run_reusable`).

A job's moves and their event rows, and the dispatch round's counts, run a few dozen times per
job, and ``Connection.execute`` spends several times the driver's own CPU on each. A statement
:func:`jobs.store.core._prepared` keeps for the life of the process is compiled here once,
positionally, and run on the DBAPI cursor with SQLAlchemy's own parameter and result
processors, its rows answering as SQLAlchemy's do for the uses the store makes of them
(:class:`DirectResult`, :class:`DirectRow`). Anything it cannot take goes to
``connection.execute`` unchanged.

Its only caller is :func:`jobs.store.core._run`, and what it runs is the store's kept
statements, so it lives in the store beside them rather than in :mod:`jobs.db` (engines,
sessions, migrations, locks). It imports no part of the store: every part may sit above it.
"""

from __future__ import annotations

import copy
import re
import sqlite3
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql.sqltypes import TupleType


class DirectRow(tuple[Any, ...]):
    """A row read by :func:`run_reusable` on SQLite: a tuple that also answers by column name
    (``row.version``, ``row._mapping``), as SQLAlchemy's own :class:`~sqlalchemy.engine.Row` does
    for the uses the store makes of it."""

    __slots__ = ()
    _fields: tuple[str, ...]
    _index: dict[str, int]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[self._index[name]]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))


class DirectResult:
    """The rows of one statement run by :func:`run_reusable` (all fetched at once: the store's
    hot statements return a row or a few), with the :class:`~sqlalchemy.engine.Result` methods
    the store uses."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[DirectRow], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[DirectRow]:
        return iter(self._rows)

    def all(self) -> list[DirectRow]:
        return self._rows

    def first(self) -> DirectRow | None:
        return self._rows[0] if self._rows else None

    def one(self) -> DirectRow:
        if len(self._rows) != 1:
            raise (NoResultFound if not self._rows else MultipleResultsFound)(
                f"expected one row, got {len(self._rows)}"
            )
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class _Direct:
    """A reusable Core statement compiled once, positionally: its SQL, how each positional
    parameter is made (SQLAlchemy's own bind processors of the parameter's type), and how each
    column it returns is read (SQLAlchemy's result processors).

    An expanding parameter (``IN``, whether a list bound at execution or one written into the
    statement) is rendered here as SQLAlchemy renders it (``__[POSTCOMPILE_name]`` becomes one
    placeholder per element — ``?`` on SQLite, ``%s`` with the cast SQLAlchemy renders on
    PostgreSQL — each element made by the parameter's processor), the SQL kept per set of list
    lengths. An empty list, which SQLAlchemy renders as a special "empty set" expression, is left
    to SQLAlchemy (:meth:`runs`).

    The result processors are taken, as SQLAlchemy takes them, for the type codes the driver
    describes the columns with (psycopg's OIDs: a PostgreSQL ``NUMERIC`` read needs them; SQLite
    gives none), once per set of codes."""

    __slots__ = (
        "defaults",
        "dialect",
        "elements",
        "expanding",
        "names",
        "params",
        "parts",
        "plain",
        "results_for",
        "row_type",
        "sql",
        "sql_for",
        "types",
    )

    def __init__(self, compiled: Any, dialect: Any) -> None:
        self.dialect = dialect
        self.sql: str = compiled.string
        binds = compiled.binds
        mark = "?" if compiled.dialect.paramstyle == "qmark" else "%s"
        self.params: list[tuple[str, Any, bool, Any, bool]] = []
        #: How each expanding parameter's elements are written, in positional order.
        self.elements: list[str] = []
        for name in compiled.positiontup:
            bind = binds[name]
            default = None if bind.required else bind.effective_value
            # The processors SQLAlchemy itself applies (`DefaultExecutionContext`): the type as
            # the dialect implements it (a TypeDecorator's impl, SQLite's DATETIME strings …).
            process = bind.type._cached_bind_processor(dialect)
            self.params.append((bind.key, process, bind.required, default, bool(bind.expanding)))
            if bind.expanding:
                self.elements.append(_element_mark(compiled, bind, mark))
        self.expanding = any(p[4] for p in self.params)
        #: When no parameter expands (a move, its event row: :meth:`arguments`' common case): the
        #: names that must be given, the others' values (the statement's own literals, ``+ 1``),
        #: and (name, processor) in positional order.
        self.names = frozenset(p[0] for p in self.params if p[2])
        self.defaults = {key: default for key, _, required, default, _ in self.params if not required}
        self.plain: list[tuple[str, Any]] | None = (
            None if self.expanding else [(key, process) for key, process, *_ in self.params]
        )
        # The SQL between the expanding parameters' markers, in the order they appear.
        self.parts: list[str] = _POSTCOMPILE.split(self.sql)[::2] if self.expanding else []
        self.sql_for: dict[tuple[int, ...], str] = {}
        columns = getattr(compiled, "_result_columns", None) or []
        names = tuple(c.keyname for c in columns)
        self.types = [c.type for c in columns]
        self.results_for: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        index = {n: i for i, n in enumerate(names)}
        self.row_type = type("Row", (DirectRow,), {"__slots__": (), "_fields": names, "_index": index})

    def results(self, codes: tuple[Any, ...]) -> list[tuple[int, Any]]:
        """The result processors for the columns of the type codes the driver gives
        (:func:`_type_codes`; SQLAlchemy's choice for each column's type and code), as (column's
        index, processor) for the columns that have one: on SQLite only dates and the model's own
        types, so a row of ids, states and numbers is taken as the driver gives it."""
        if self.dialect.name == "sqlite":
            codes = ()
            processors = self.results_for.get(codes)
            if processors is None:
                processors = self.results_for[codes] = _processing(
                    [t._cached_result_processor(self.dialect, None) for t in self.types]
                )
            return processors
        processors = self.results_for.get(codes)
        if processors is None:
            pairs = zip(self.types, codes, strict=True)
            processors = _processing([t._cached_result_processor(self.dialect, code) for t, code in pairs])
            if len(self.results_for) < 16:
                self.results_for[codes] = processors
        return processors

    def runs(self, params: Mapping[str, Any] | None) -> bool:
        """Whether these parameters can run here: every expanding one is a non-empty list."""
        if not self.expanding:
            return True
        given = params or {}
        for key, _, _, default, expanding in self.params:
            if expanding and not given.get(key, default):
                return False
        return True

    def arguments(self, params: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """The SQL and the positional arguments for ``params``."""
        given = params or {}
        if self.plain is not None and given.keys() >= self.names:
            # none expands and none is missing: one list built at once, not an append per value
            known = {**self.defaults, **given}
            args = [known[key] if process is None else process(known[key]) for key, process in self.plain]
            return self.sql, args
        args = []
        lengths: list[int] = []
        for key, process, required, default, expanding in self.params:
            if key in given:
                value = given[key]
            elif required:
                raise ArgumentError(f"a value is required for bind parameter {key!r}")
            else:
                value = default
            if expanding:
                values = list(value)
                lengths.append(len(values))
                args.extend(values if process is None else map(process, values))
            else:
                args.append(process(value) if process is not None else value)
        return (self._sql(tuple(lengths)) if lengths else self.sql), args

    def run(self, cursor: Any, sql: str, args: list[Any]) -> DirectResult:
        cursor.execute(sql, args)
        rows: list[DirectRow] = []
        if self.dialect.name == "sqlite":  # its description is built in C; no codes are needed
            codes: tuple[Any, ...] | None = None if cursor.description is None else ()
        else:
            codes = _type_codes(cursor)
        if codes is not None:
            make, pairs = self.row_type, self.results(codes)
            if pairs:
                for raw in cursor.fetchall():
                    # each row's processed values in place: a list, not a generator resumed per column
                    values = list(raw)
                    for i, p in pairs:
                        values[i] = p(values[i])
                    rows.append(make(values))
            else:  # no column needs one (ids, states, versions): the driver's values as they are
                rows = [make(raw) for raw in cursor.fetchall()]
        return DirectResult(rows, cursor.rowcount)

    def _sql(self, lengths: tuple[int, ...]) -> str:
        sql = self.sql_for.get(lengths)
        if sql is None:
            pieces = [self.parts[0]]
            for n, element, after in zip(lengths, self.elements, self.parts[1:], strict=True):
                pieces += [", ".join([element] * n), after]
            sql = "".join(pieces)
            if len(self.sql_for) < 256:  # claims of 1..N jobs: a few lengths, but bounded anyway
                self.sql_for[lengths] = sql
        return sql


def _type_codes(cursor: Any) -> tuple[Any, ...] | None:
    """The type codes of the columns of a psycopg cursor's result (its OIDs, as
    ``cursor.description`` gives them); None when the statement returned no rows to fetch
    (``description`` None).

    On psycopg, read from its ``pgresult`` under the very rule of ``Cursor.description``, which
    builds a ``Column`` object per column on every access (five Python calls each): the
    statements of a distributed worker read about 500 of them per job (the 400-job drain
    benchmark), about a tenth of all its Python calls, for the codes alone."""
    result = cursor.pgresult
    if not result or not (result.nfields or result.status in _rows_statuses()):
        return None
    ftype = result.ftype
    return tuple([ftype(i) for i in range(result.nfields)])


@cache
def _rows_statuses() -> frozenset[int]:
    """psycopg's result statuses that carry rows (``Cursor.description``'s rule). Imported on
    first use: a SQLite-only process never loads the driver."""
    from psycopg.pq import ExecStatus

    names = ("TUPLES_OK", "SINGLE_TUPLE", "TUPLES_CHUNK")  # the last one from libpq 17 on
    return frozenset(getattr(ExecStatus, name) for name in names if hasattr(ExecStatus, name))


def _processing(processors: list[Any]) -> list[tuple[int, Any]]:
    """(index, processor) of the columns whose processor is not None."""
    return [(i, p) for i, p in enumerate(processors) if p is not None]


#: How SQLAlchemy marks an expanding parameter in a compiled statement's SQL (rendered at
#: execution, ``SQLCompiler._process_parameters_for_postcompile``).
_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")


def _element_mark(compiled: Any, bind: Any, mark: str) -> str:
    """How SQLAlchemy writes one element of the expanding parameter ``bind``: the placeholder,
    with the cast it renders after each on a dialect that renders casts (psycopg's
    ``BindTyping.RENDER_CASTS``; ``SQLCompiler._literal_execute_expanding_parameter``)."""
    dialect = compiled.dialect
    impl = bind.type._unwrapped_dialect_impl(dialect)
    if dialect._bind_typing_render_casts and impl.render_bind_cast:
        return str(compiled.render_bind_cast(bind.type, impl, mark))
    return mark


#: A dialect that binds by name (psycopg's ``pyformat``) → (it, kept alive so its id is never
#: reused; its twin that compiles with positional ``%s`` placeholders, for :class:`_Direct`).
_POSITIONAL: dict[int, tuple[Any, Any]] = {}


def _positional(dialect: Any) -> Any:
    """``dialect`` when it compiles with positional placeholders (SQLite's ``?``); else a copy of
    it that compiles with ``%s`` (``format``, which psycopg takes as it takes ``pyformat``: the
    same SQL, the same casts, literal ``%`` doubled the same way)."""
    if dialect.positional:
        return dialect
    known = _POSITIONAL.get(id(dialect))
    if known is None:
        twin = copy.copy(dialect)
        twin.paramstyle, twin.positional = "format", True
        known = _POSITIONAL[id(dialect)] = (dialect, twin)
    return known[1]


#: (``id(statement)``, the dialect's name, the parameters' names for an INSERT or UPDATE) → (the
#: statement, kept alive so its id is never reused; its direct form, or None when it has none).
_DIRECT: dict[tuple[int, str, tuple[str, ...]], tuple[Any, _Direct | None]] = {}


def _direct_form(statement: Any, dialect: Any, params: Mapping[str, Any] | None) -> _Direct | None:
    """The compiled form of ``statement``; None when SQLAlchemy must run it: a parameter
    rendered into the SQL (``literal_execute``) or computed at execution (a column's Python-side
    default), a tuple ``IN``."""
    # An INSERT or UPDATE is compiled for the columns it is given (SQLAlchemy does the same).
    keys = tuple(sorted(params)) if params and statement.is_dml else ()
    known = _DIRECT.get((id(statement), dialect.name, keys))
    if known is not None:
        return known[1]
    compiled = statement.compile(dialect=_positional(dialect), column_keys=list(keys) if keys else None)
    binds = compiled.binds.values()
    markers = _POSTCOMPILE.findall(compiled.string)
    plain = (
        compiled.positional
        and not compiled.insert_prefetch
        and not compiled.update_prefetch
        and not any(b.literal_execute or b.callable is not None for b in binds)
        and not any(isinstance(b.type, TupleType) for b in binds if b.expanding)
        # each marker stands for the expanding parameter at its place in the positional order
        and markers == [n for n in compiled.positiontup if compiled.binds[n].expanding]
    )
    direct = _Direct(compiled, dialect) if plain else None
    _DIRECT[(id(statement), dialect.name, keys)] = (statement, direct)
    return direct


def run_reusable(connection: Connection, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
    """Run ``statement`` — built once and kept for the life of the process — on ``connection``.

    The store's hot statements (a job's moves and their event rows, the dispatch round's
    counts) run a few dozen times per job. ``Connection.execute`` spends several times the
    driver's own CPU on each (an execution context, events, result metadata): on SQLite about
    100 µs against 20 µs single-threaded (a move: about 470 µs against 410 with its commit); on
    PostgreSQL (psycopg) it was about as much CPU again as the driver's, which every distributed
    worker and its tick leader pay on every statement even though the round trip, not the CPU,
    sets the wall time. Here such a statement is compiled once, positionally, and run straight on
    the DBAPI cursor with SQLAlchemy's own parameter and result processors; errors are raised as
    SQLAlchemy raises them (:class:`~sqlalchemy.exc.DBAPIError`) — on PostgreSQL through
    SQLAlchemy's own handling (``Connection._handle_dbapi_exception``), so a lost connection
    invalidates the connection and the pool, and the engine's ``handle_error`` hooks run, as
    they do for ``execute``. Everywhere else — another driver, a statement :func:`_direct_form`
    cannot take or an empty ``IN`` list, a connection with cursor-execute listeners (tests that
    count statements), on PostgreSQL a connection outside a transaction (``execute`` would
    begin one) — this is ``connection.execute``.

    ``statement`` must be a long-lived object (the store's prepared statements): its compiled
    form is kept under its identity.
    """
    dialect = connection.dialect
    dispatch = connection.dispatch
    if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
        return connection.execute(statement, params)
    if dialect.name == "sqlite":
        direct = _direct_form(statement, dialect, params)
        if direct is None or not direct.runs(params):
            return connection.execute(statement, params)
        sql, args = direct.arguments(params)
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            return direct.run(cursor, sql, args)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(direct.sql, params, exc, sqlite3.Error, dialect=dialect) from exc
        finally:
            cursor.close()
    if dialect.name != "postgresql" or dialect.driver != "psycopg" or not connection.in_transaction():
        return connection.execute(statement, params)
    direct = _direct_form(statement, dialect, params)
    if direct is None or not direct.runs(params):
        return connection.execute(statement, params)
    text, cursor = direct.sql, None
    values: list[Any] | None = None
    try:
        text, values = direct.arguments(params)
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        return direct.run(cursor, text, values)
    except BaseException as exc:  # as Connection._execute_context hands any error over
        connection._handle_dbapi_exception(exc, text, values if values is not None else params, cursor, None)
    finally:
        if cursor is not None:
            cursor.close()
