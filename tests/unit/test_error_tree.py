"""The exception tree drawn in ``jobs/errors.py``'s docstring is the code's tree, class for class.

Every subclass of :class:`WanbatchError` defined anywhere in the product must be drawn, under its
real base and with the module it lives in; nothing may be drawn that the code does not define.
And every exception class of the product is in that tree, but a module's private signals (a name
that starts with ``_``). The product is every package the distribution ships but ``migrations``:
``falsim`` included, since ``--simulate`` runs the simulator inside the command, where an error it
raised on purpose must reach the user as one line, like any other.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jobs.errors
from jobs.errors import WanbatchError

ROOT = Path(__file__).resolve().parents[2]

#: Packages shipped by setuptools that are not product code with errors of their own.
NOT_PRODUCT = frozenset({"migrations"})

_LINE = re.compile(r"^(?P<prefix>(?:│   |    |├── |└── )*)(?P<name>[A-Z]\w*)\s*(?:\[(?P<module>[\w.]+)\])?")


@dataclass(frozen=True)
class Drawn:
    name: str
    parent: str | None
    module: str


def product_packages() -> list[str]:
    """The top-level packages the distribution ships (``[tool.setuptools.packages.find]``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    names = {pattern.rstrip("*").rstrip(".") for pattern in patterns}
    return sorted(n for n in names if n not in NOT_PRODUCT and (ROOT / n / "__init__.py").is_file())


def import_product() -> None:
    for top in product_packages():
        package = importlib.import_module(top)
        for module in pkgutil.walk_packages(package.__path__, f"{top}."):
            if module.name.rsplit(".", 1)[-1] != "__main__":
                importlib.import_module(module.name)


def code_tree() -> dict[str, type[WanbatchError]]:
    """Every subclass of WanbatchError defined in a product module, by name."""
    tops = tuple(product_packages())
    found: dict[str, type[WanbatchError]] = {}
    todo: list[type[WanbatchError]] = [WanbatchError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".", 1)[0] not in tops:
            continue  # a test's own subclass
        assert cls.__name__ not in found, f"two error classes named {cls.__name__}"
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def product_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a product module (a warning category is none)."""
    import_product()
    tops = tuple(product_packages())
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(
        (cls for cls in found if cls.__module__.split(".", 1)[0] in tops and not issubclass(cls, Warning)),
        key=lambda cls: (cls.__module__, cls.__qualname__),
    )


def drawn_tree() -> dict[str, Drawn]:
    """The tree in jobs.errors' docstring: name, parent (by indentation) and module of each class."""
    doc = jobs.errors.__doc__ or ""
    block = doc.split("::\n", 1)[1]
    drawn: dict[str, Drawn] = {}
    stack: list[str] = []
    for raw in block.splitlines()[1:]:
        if not raw.strip():
            break
        line = raw[4:]  # the literal block's indentation
        match = _LINE.match(line)
        assert match, f"cannot read this line of the tree: {raw!r}"
        depth = len(match["prefix"]) // 4
        del stack[depth:]
        name = match["name"]
        drawn[name] = Drawn(name, stack[-1] if stack else None, match["module"] or "jobs.errors")
        stack.append(name)
    return drawn


def test_every_error_class_is_drawn_under_its_base_with_its_module() -> None:
    import_product()
    code = code_tree()
    drawn = drawn_tree()
    assert sorted(set(code) - set(drawn)) == [], "classes the tree in jobs/errors.py leaves out"
    assert sorted(set(drawn) - set(code)) == [], "classes the tree draws that the code does not define"
    for name, cls in code.items():
        bases = [b.__name__ for b in cls.__bases__ if issubclass(b, WanbatchError)]
        parent = drawn[name].parent
        assert bases == ([parent] if parent else []), f"{name} derives from {bases}, drawn under {parent}"
        assert cls.__module__ == drawn[name].module, f"{name} lives in {cls.__module__}"


def test_the_tree_is_found() -> None:
    drawn = drawn_tree()
    assert drawn["WanbatchError"].parent is None
    assert drawn["AmbiguousSubmitError"].parent == "ProviderError"
    assert drawn["ProviderProtocolError"].module == "worker.fal.errors"


def test_every_public_exception_of_the_product_is_under_the_root() -> None:
    assert {"jobs", "worker", "web", "cli", "falsim"} <= set(product_packages())
    outside = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in product_exceptions()
        if not cls.__name__.startswith("_") and not issubclass(cls, WanbatchError)
    ]
    assert outside == [], "public exception classes not under WanbatchError (jobs/errors.py)"


def test_the_private_signals_are_found_too() -> None:
    # The walk sees classes outside the tree: else the test above would pass on nothing.
    names = {cls.__name__ for cls in product_exceptions() if not issubclass(cls, WanbatchError)}
    assert {"_TooLarge", "_Stop"} <= names
