"""The layering the README's "How it works" promises, checked from the source with :mod:`ast`.

- the domain (``jobs``) imports neither execution (``worker``), nor the fal simulator
  (``falsim``), nor the command line (``cli``), nor the web app (``web``): type-only imports
  under ``TYPE_CHECKING`` count;
- the simulator imports nothing from ``worker``, ``cli`` or ``web``: it stands in for fal, not for us;
- no import cycle anywhere in the product, counting imports inside functions and under
  ``TYPE_CHECKING`` (a cycle that only "works" because one side imports lazily is still a cycle).

The product packages are the ones ``pyproject.toml`` ships (``[tool.setuptools.packages.find]``),
so a new top-level package is checked as soon as it is packaged. Everything is read from the
files; nothing is imported, so a broken import cannot hide a violation.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DOMAIN = "jobs"
SIMULATOR = "falsim"
EXECUTION = "worker"
COMMAND_LINE = "cli"
WEB = "web"


def product_packages() -> list[str]:
    """Top-level packages shipped by ``pyproject.toml`` that exist in the tree."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns: list[str] = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatchcase(d.name, p) for p in patterns)
    )


def product_modules() -> dict[str, Path]:
    """Every product module by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for package in product_packages():
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute dotted name."""

    source: str  # the importing module
    target: str  # the imported module (or the name's module, for ``from x import name``)
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """Every import in ``path``, wherever it sits (functions and ``TYPE_CHECKING`` included).

    ``from a import b`` targets the module ``a.b`` when that is a product module, else ``a``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield Import(module, candidate if candidate in known else base, node.lineno)


def product_imports() -> list[Import]:
    """Every import statement of every product module."""
    known = product_modules()
    return [imp for module, path in known.items() for imp in imports_of(module, path, known)]


def _top(name: str) -> str:
    return name.partition(".")[0]


def _violations(importer: str, forbidden: set[str]) -> list[str]:
    return [
        imp.where()
        for imp in product_imports()
        if _top(imp.source) == importer and _top(imp.target) in forbidden
    ]


def test_product_packages_are_found() -> None:
    packages = product_packages()
    assert DOMAIN in packages
    assert EXECUTION in packages
    assert len(product_modules()) > 20


def test_the_domain_imports_neither_execution_nor_the_simulator_nor_the_cli() -> None:
    bad = _violations(DOMAIN, {EXECUTION, SIMULATOR, COMMAND_LINE, WEB})
    assert not bad, "jobs/ must not depend on worker, falsim, cli or web:\n" + "\n".join(bad)


def test_the_domain_needs_no_terminal_toolkit() -> None:
    bad = _violations(DOMAIN, {"click", "rich"})
    assert not bad, "click and rich belong to the cli package:\n" + "\n".join(bad)


def test_the_simulator_imports_nothing_from_execution_or_the_cli() -> None:
    assert SIMULATOR in product_packages(), f"the simulator package {SIMULATOR}/ is not shipped"
    bad = _violations(SIMULATOR, {EXECUTION, COMMAND_LINE, WEB})
    assert not bad, "falsim/ stands in for fal; it must not import worker, cli or web:\n" + "\n".join(bad)


def test_the_cli_runs_no_celery_worker_of_its_own() -> None:
    """A distributed worker's life (Celery's signal receivers, the ticker, the stop watch, its
    restart) is execution: it lives in :mod:`worker.celery_worker`, and ``wanbatch worker`` only
    parses its options and calls it. It was written inside the command, 155 lines deep."""
    bad = [
        imp.where()
        for imp in product_imports()
        if _top(imp.source) == COMMAND_LINE
        and (imp.target.startswith("celery.signals") or imp.target in ("worker.app", "worker.ticker"))
    ]
    assert not bad, "Celery's worker is run by worker.celery_worker, not by cli/:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """Product module → the product modules it imports."""
    known = product_modules()
    graph: dict[str, set[str]] = {module: set() for module in known}
    for imp in product_imports():
        target = imp.target
        while target and target not in known:  # ``from a.b import name`` where a.b is a module
            target = target.rpartition(".")[0]
        if target and target != imp.source:
            graph[imp.source].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly-connected components (iterative), each sorted, of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, so a short one)."""
    members = set(component)
    start = component[0]
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a real component


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
        "def f():\n    from .b import y\n    from .. import other\n"
    )
    known = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    assert [i.target for i in imports_of("pkg", pkg / "__init__.py", known)] == ["pkg.a"]
    assert sorted(i.target for i in imports_of("pkg.a", pkg / "a.py", known)) == [
        "",
        "pkg.b",
        "pkg.b",
        "typing",
    ]


def test_no_import_cycle_in_the_product() -> None:
    graph = import_graph()
    cycles = [" → ".join(a_cycle(graph, c)) for c in strongly_connected(graph)]
    assert not cycles, "import cycles (type-only and in-function imports count):\n" + "\n".join(cycles)


# ----------------------------------------------------------------------------- who builds SQL

#: The modules that may build and run SQL: the store (every write and the workers' queries),
#: :mod:`jobs.db` (engines, migrations, advisory locks) and :mod:`jobs.listing` (the read models
#: of ``status`` and the dashboard: one-pass aggregates and keyset pages, read-only). Alembic's
#: revisions (the ``migrations`` package) are SQL by nature.
SQL_HOMES = frozenset({"jobs.store", "jobs.db", "jobs.listing"})
SQL_PACKAGES = frozenset({"migrations"})
#: Packages whose every module is a SQL home: the store's parts (``jobs/store/*.py``).
SQL_HOME_PACKAGES = frozenset({"jobs.store"})


def is_sql_home(module: str) -> bool:
    """Whether ``module`` may build SQL: a home, a module of a home package, or a migration."""
    return (
        module in SQL_HOMES
        or _top(module) in SQL_PACKAGES
        or any(module.startswith(f"{package}.") for package in SQL_HOME_PACKAGES)
    )


def test_sql_homes_are_the_store_package_and_nothing_beside_it() -> None:
    """The store's parts are homes; a module merely named like it (``jobs.storefront``) or
    another package of ``jobs`` is not."""
    assert is_sql_home("jobs.store")
    assert is_sql_home("jobs.store.leases")
    assert is_sql_home("migrations.versions.0001_initial")
    assert not is_sql_home("jobs.storefront")
    assert not is_sql_home("jobs.storable")
    assert not is_sql_home("jobs.batches")
    assert not is_sql_home("worker.store")
    assert "jobs.store.transitions" in product_modules(), "the store is the jobs.store package"


#: SQLAlchemy names that build a statement or a SQL expression (types, ``Engine``, ``Session``
#: and the declarative schema of ``jobs.models`` are not among them).
SQL_BUILDERS = frozenset(
    {
        "select", "insert", "update", "delete", "text", "func", "literal", "literal_column",
        "column", "table", "and_", "or_", "not_", "case", "exists", "cast", "type_coerce",
        "union", "union_all", "bindparam", "tuple_", "values", "lambda_stmt", "distinct",
        "asc", "desc", "null", "true", "false", "any_", "all_", "between", "over", "join",
        "outerjoin", "aliased", "Select", "Insert", "Update", "Delete", "TextClause",
    }
)  # fmt: skip
#: Methods that run SQL, whatever the receiver (a session, a connection, a result).
SQL_RUNNERS = frozenset({"execute", "exec_driver_sql", "query", "scalars"})
#: Session methods that read or write rows behind the store's back.
SESSION_RUNNERS = frozenset({"scalar", "get", "add", "add_all", "merge", "delete"})


def _receiver(node: ast.expr) -> str:
    """The last name of a call's receiver (``rt.session`` → ``session``), or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def sql_built_in(source: str, where: str) -> list[str]:
    """Where ``source`` builds or runs SQL: SQLAlchemy's statement builders imported or reached
    through a SQLAlchemy module, or a session or connection asked to run something."""
    found: list[tuple[int, str]] = []
    sqlalchemy_names: set[str] = set()  # names bound to a SQLAlchemy module (``sa``, ``postgresql``…)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) == "sqlalchemy":
                    sqlalchemy_names.add(alias.asname or _top(alias.name))
        elif isinstance(node, ast.ImportFrom) and _top(node.module or "") == "sqlalchemy":
            for alias in node.names:
                if alias.name in SQL_BUILDERS:
                    found.append((node.lineno, f"imports sqlalchemy's {alias.name}"))
                elif alias.name[:1].islower():  # a module (``from sqlalchemy.dialects import sqlite``)
                    sqlalchemy_names.add(alias.asname or alias.name)
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in sqlalchemy_names
            and node.attr in SQL_BUILDERS
        ):
            found.append((node.lineno, f"uses {node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method, receiver = node.func.attr, _receiver(node.func.value)
            if method in SQL_RUNNERS or (
                method in SESSION_RUNNERS and receiver.endswith(("session", "conn", "connection"))
            ):
                found.append((node.lineno, f"runs {receiver or '…'}.{method}()"))
    return [f"{where}:{line} {what}" for line, what in sorted(found)]


def test_the_sql_finder_sees_builders_and_runners() -> None:
    source = (
        "import sqlalchemy as sa\nfrom sqlalchemy import Engine, select\n"
        "from sqlalchemy.dialects import postgresql\nfrom sqlalchemy.orm import Session\n"
        "def f(session: Session, engine: Engine) -> None:\n"
        "    session.execute(select(1))\n    sa.text('x')\n    postgresql.insert(t)\n"
        "    session.get(Job, 1)\n    session.commit()\n    {}.get('a')\n"
    )
    assert sql_built_in(source, "m") == [
        "m:2 imports sqlalchemy's select",
        "m:6 runs session.execute()",
        "m:7 uses sa.text",
        "m:8 uses postgresql.insert",
        "m:9 runs session.get()",
    ]


def test_only_the_store_builds_sql() -> None:
    """Every query lives in :mod:`jobs.store` (and the plumbing in :mod:`jobs.db`): a step or a
    report asks the store by intent, never composes SQL of its own."""
    found = [
        hit
        for module, path in sorted(product_modules().items())
        if not is_sql_home(module)
        for hit in sql_built_in(path.read_text(encoding="utf-8"), module)
    ]
    assert not found, "SQL outside jobs.store / jobs.db:\n" + "\n".join(found)
