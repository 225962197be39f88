"""YAML with ``safe_load`` semantics that remembers the line of every key and value.

Manifests are written by people, so every error must point at a line. ``yaml.safe_load`` throws
the marks away, so this module composes the node graph (libyaml's fast C parser feeding PyYAML's
Python composer) and builds plain values itself, keeping ``start_mark.line + 1`` beside them in
:class:`LMap` and :class:`LList`.

Building the values ourselves is also where hostile input is refused, with a located message
instead of a traceback or an exhausted machine:

- tags other than the standard scalar/collection ones (``!!python/object`` and friends);
- alias bombs ("billion laughs"): nodes reached through an alias are counted and refused beyond
  :data:`MAX_ALIAS_NODES`; self-referencing anchors are stopped by the depth limit;
- nesting deeper than :data:`MAX_DEPTH` (the C composer would overflow the C stack, so the
  composer used here is PyYAML's Python one with a depth counter);
- scalars longer than :data:`MAX_SCALAR_CHARS`;
- duplicate keys in one mapping (``safe_load`` silently keeps the last; we name both lines).

Timestamps stay the text the user wrote (JSON has no date type, and a provider input is JSON), and
so do YAML 1.1's base-60 numbers: ``aspect_ratio: 16:9`` means the text "16:9", not 969 (YAML 1.2
dropped base 60 for exactly this reason). Numbers are read as a CSV cell or a ``--vary`` value
reads them (:data:`jobs.digits.WHOLE`, :data:`jobs.digits.NUMBER`): ``0042`` is 42, not YAML
1.1's octal 34, ``+.5`` is 0.5, and ``0x10``, ``1_000``, ``1_0.5``, ``.inf`` and ``.nan`` stay text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from jobs.digits import NUMBER, TOO_MANY_DIGITS, WHOLE, WholeTooLong, digits_in, too_many_digits
from jobs.errors import WanbatchError
from jobs.printable import quoted, shortened

try:  # libyaml's scanner/parser is ~20x faster on big scalars; fall back when it is missing
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)


#: Longest scalar accepted: room for an inline data-URI thumbnail, far from hurting anything.
MAX_SCALAR_CHARS = 1024 * 1024
#: Most nodes that may be reached through aliases (the anchors' copies), in total.
MAX_ALIAS_NODES = 100_000
#: Deepest nesting of mappings and sequences (a manifest needs about 4).
MAX_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP = _TAG + "timestamp"
_MERGE = _TAG + "merge"
_NULL = _TAG + "null"
#: What YAML 1.1's null resolver reads as null (PyYAML's): ``~``, ``null`` in three cases, nothing.
_NULL_TEXT = re.compile(r"~|null|Null|NULL|")


class YamlProblem(WanbatchError):
    """The text is not acceptable YAML; ``line`` is 1-based when known. Its readers
    (:mod:`jobs.manifest.loading`, :mod:`jobs.dataset_export`) turn it into a located issue."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


#: Where a value sits in the document: the keys and list indexes from the root
#: (``("items", 0, "seed")``).
Where = tuple[str | int, ...]


class WholeNumbersTooLong(YamlProblem):
    """Whole numbers of more than :data:`~jobs.digits.MAX_WHOLE_DIGITS` digits, each with where
    it is (``numbers``: path and line; the first is the exception's own line).

    The document is read to its end first (each such number as a
    :class:`~jobs.digits.WholeTooLong`, ``root``; the duplicate keys as :func:`load_located`
    returns them), so the caller can name the item, the field and what the field allows (the
    endpoint is in the document), and go on to check the rest of the document: one number too
    long is one error among the others, not the only one said.
    """

    def __init__(
        self, numbers: list[tuple[Where, int]], root: Any, duplicates: list[tuple[str, int, int]]
    ) -> None:
        super().__init__(TOO_MANY_DIGITS, numbers[0][1])
        self.numbers = numbers
        self.root = root
        self.duplicates = duplicates


#: At most this many too-long numbers are listed (an alias may repeat one a hundred thousand times).
MAX_NUMBERS_LISTED = 20


class LMap(dict[str, Any]):
    """A mapping that knows its own line, the line of each key and of each key's value."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[str, int] = {}
        self.key_lines: dict[str, int] = {}


class LList(list[Any]):
    """A sequence that knows its own line and the line of each element."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: list[int] = []


def line_of(node: Node) -> int:
    """1-based line of a node's start."""
    return int(node.start_mark.line) + 1


class _DepthLimitedComposer(Composer):
    """PyYAML's composer with a nesting limit (recursion is Python's, so it cannot crash)."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise YamlProblem(f"nesting deeper than {MAX_DEPTH} levels is refused", int(mark.line) + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Loader(_DepthLimitedComposer, _Parser, Resolver):
    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        _DepthLimitedComposer.__init__(self)
        Resolver.__init__(self)


#: Numbers are what :data:`~jobs.digits.WHOLE` and :data:`~jobs.digits.NUMBER` say, as in a CSV
#: cell or a ``--vary`` value, and nothing else. YAML 1.1 (PyYAML) read ``0042`` and ``010`` as
#: octal (34 and 8, with no word said), ``0x10`` as 16, ``0b11`` as 3, ``1_000`` as 1000,
#: ``1_0.5`` as 10.5 and ``1:30`` as base 60, ``.inf`` and ``.nan`` as floats no provider input
#: takes, and ``1e2``, ``+.5`` or ``-.5`` as text, while a CSV cell ``0042`` was 42 and ``1_0.5``
#: text. Here leading zeros are decimal (``0042`` is 42), as in YAML 1.2's core schema; every other
#: spelling stays the text written, which a number field then refuses with its file, line, item
#: and field. YAML 1.2's ``0x``/``0o`` forms and ``.inf``/``.nan`` are left out on purpose: CSV,
#: JSONL and ``--vary`` have none, and the same text must be the same number everywhere. Quoted
#: (``"1e2"``) a number stays text.
_Loader.yaml_implicit_resolvers = {  # this class's own copy, without YAML 1.1's number resolvers
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_TAG + "int", _TAG + "float")]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
# The whole-number resolver first: NUMBER matches whole numbers too, and they are ints.
_Loader.add_implicit_resolver(_TAG + "int", re.compile(f"^{WHOLE.pattern}$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_TAG + "float", re.compile(f"^{NUMBER.pattern}$"), list("-+0123456789."))


def _decimal_int(_: SafeConstructor, node: ScalarNode) -> int | str:
    """A whole number written in decimal (leading zeros too); an explicit ``!!int`` of any other
    spelling (``!!int 0x10``) stays text, as it would unmarked. ``ValueError`` beyond Python's
    4,300 digits."""
    text = str(node.value)
    return int(text) if WHOLE.fullmatch(text) else text


def _decimal_float(_: SafeConstructor, node: ScalarNode) -> float | str:
    """A number written in plain decimal, as a float; an explicit ``!!float`` of any other
    spelling (``!!float .inf``, ``!!float 1_0.5``) stays text, as it would unmarked."""
    text = str(node.value)
    return float(text) if NUMBER.fullmatch(text) else text


_SCALARS = SafeConstructor()
_SCALAR_BUILDERS: dict[str, Callable[[SafeConstructor, ScalarNode], Any]] = {
    tag: SafeConstructor.yaml_constructors[tag] for tag in _SCALAR_TAGS
}
_SCALAR_BUILDERS[_TAG + "int"] = _decimal_int
_SCALAR_BUILDERS[_TAG + "float"] = _decimal_float


class _Builder:
    """Turns a node graph into plain values with lines, counting alias expansions."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.alias_nodes = 0
        self.duplicates: list[tuple[str, int, int]] = []  # (key, first line, second line)
        self.path: list[str | int] = []  # where the node being built is
        self.too_long: list[tuple[Where, int]] = []  # whole numbers of too many digits

    def build(self, node: Node, depth: int = 0, via_alias: bool = False) -> Any:
        if depth > MAX_DEPTH:
            raise YamlProblem(
                f"nesting deeper than {MAX_DEPTH} levels (or a self-referencing anchor) is refused",
                line_of(node),
            )
        if id(node) in self.seen:
            via_alias = True
        else:
            self.seen.add(id(node))
        if via_alias:
            self.alias_nodes += 1
            if self.alias_nodes > MAX_ALIAS_NODES:
                raise YamlProblem(
                    f"aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias bomb?); refused",
                    line_of(node),
                )
        if isinstance(node, ScalarNode):
            return self._scalar(node)
        if isinstance(node, SequenceNode):
            self._check_tag(node, _TAG + "seq")
            seq = LList(line_of(node))
            for i, child in enumerate(node.value):
                self.path.append(i)
                seq.append(self.build(child, depth + 1, via_alias))
                self.path.pop()
                seq.lines.append(line_of(child))
            return seq
        if isinstance(node, MappingNode):
            self._check_tag(node, _TAG + "map")
            return self._mapping(node, depth, via_alias)
        raise YamlProblem(f"unsupported YAML node {type(node).__name__}", line_of(node))  # pragma: no cover

    def _scalar(self, node: ScalarNode) -> Any:
        if len(node.value) > MAX_SCALAR_CHARS:
            raise YamlProblem(
                f"a value of {len(node.value):,} characters is refused "
                f"(at most {MAX_SCALAR_CHARS:,}; put large data in a file)",
                line_of(node),
            )
        if node.tag == _TIMESTAMP:
            return node.value  # dates stay as written (base-60 numbers, 16:9, are no numbers here)
        builder = _SCALAR_BUILDERS.get(node.tag)
        if builder is None:
            raise _tag_problem(node)
        if node.tag == _NULL and not _NULL_TEXT.fullmatch(node.value):
            # ``seed: !!null 5`` would silently drop the seed (fal then draws one): an explicit
            # tag that throws the written value away is refused, not obeyed.
            raise YamlProblem(
                f"{_named(tuple(self.path))}the YAML tag !!null would throw away {quoted(node.value)}; "
                "write null (or ~) for no value, or remove the tag",
                line_of(node),
            )
        try:
            value = builder(_SCALARS, node)
        except ValueError:  # more than Python's 4,300 digits for an int written in decimal
            if node.tag != _TAG + "int":
                raise _constructor_problem(node, tuple(self.path)) from None
            too_long = True
        except Exception:  # PyYAML's constructors raise KeyError (!!bool maybe), TypeError, …
            raise _constructor_problem(node, tuple(self.path)) from None
        else:  # 101 to 4,300 digits convert, and are refused all the same
            too_long = too_many_digits(value)
        if too_long:  # noted, and the document read on: the refusal can then name its field
            if len(self.too_long) < MAX_NUMBERS_LISTED:
                self.too_long.append((tuple(self.path), line_of(node)))
            return WholeTooLong(digits_in(node.value))
        return value

    def _check_tag(self, node: Node, expected: str) -> None:
        if node.tag != expected:
            raise _tag_problem(node)

    def _mapping(self, node: MappingNode, depth: int, via_alias: bool) -> LMap:
        out = LMap(line_of(node))
        merges: list[Node] = []
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            key = self.build(key_node, depth + 1, via_alias)
            if isinstance(key, WholeTooLong):  # the key itself: no field to name
                raise YamlProblem(TOO_MANY_DIGITS, line_of(key_node))
            if not isinstance(key, str):
                message = f"mapping keys must be text, got {quoted(key)} (quote it)"
                raise YamlProblem(message, line_of(key_node))
            if key in key_lines:
                self.duplicates.append((key, key_lines[key], line_of(key_node)))
            key_lines[key] = line_of(key_node)
            self.path.append(key)
            out[key] = self.build(value_node, depth + 1, via_alias)
            self.path.pop()
            out.lines[key] = line_of(value_node)
            out.key_lines[key] = line_of(key_node)
        for merge in merges:  # explicit keys win over merged ones, as in YAML's merge spec
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                value = self.build(source, depth + 1, True)
                if not isinstance(value, LMap):
                    raise YamlProblem("'<<' merges mappings only", line_of(source))
                for key, item in value.items():
                    if key not in out:
                        out[key] = item
                        out.lines[key] = value.lines.get(key, value.line)
                        out.key_lines[key] = value.key_lines.get(key, value.line)
        return out


def _constructor_problem(node: ScalarNode, where: Where) -> YamlProblem:
    """A value its explicit tag cannot make (``!!bool maybe``, ``!!bool "1"``): PyYAML's
    constructors raise a bare ``KeyError`` or ``ValueError`` for these, which reached the user
    as an internal error."""
    tag = node.tag.removeprefix(_TAG)
    allowed = {
        "bool": "true or false (yes/no and on/off too)",
        "int": "a whole number written in decimal",
        "float": "a number written in decimal",
    }.get(tag)
    want = f": write {allowed}, or remove the tag" if allowed else ", or remove the tag"
    return YamlProblem(
        f"{_named(where)}the YAML tag !!{tag} cannot read {quoted(node.value)}{want}", line_of(node)
    )


def _named(where: Where) -> str:
    """``items[0].seed: ``: where a refused value is, as the start of its message ("" at the top)."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{shortened(part)}" if text else shortened(part))
    return f"{text}: " if text else ""


def _tag_problem(node: Node) -> YamlProblem:
    return YamlProblem(
        f"the YAML tag {quoted(node.tag)} is refused (only plain values, lists and mappings are allowed)",
        line_of(node),
    )


def _marked_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's context and problem as one phrase. A duplicate anchor's are "found duplicate
    anchor 'a'; first occurrence" and "second occurrence", which read as one garbled sentence
    joined: said with the first occurrence's line instead."""
    if exc.problem == "second occurrence" and exc.context and exc.context.endswith("; first occurrence"):
        first = f" (first defined on line {exc.context_mark.line + 1})" if exc.context_mark else ""
        return exc.context.removesuffix("; first occurrence") + first
    return " ".join(p for p in (exc.context, exc.problem) if p)


def _reader_problem(text: str, exc: yaml.reader.ReaderError) -> str:
    """A character YAML does not allow (a control character, a NUL), with its column."""
    column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    what = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return f"not valid YAML: the character U+{what:04X} at column {column}: {exc.reason}"


def load_located(text: str) -> tuple[Any, list[tuple[str, int, int]]]:
    """Parse one YAML document into plain values with lines (:class:`LMap`/:class:`LList`).

    Returns the value (``None`` for an empty document) and the duplicate keys found, as
    ``(key, first line, second line)``. Raises :class:`YamlProblem` for anything else wrong
    (:class:`WholeNumbersTooLong` for whole numbers of too many digits, with where they are).
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except YamlProblem:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        raise YamlProblem(f"not valid YAML: {_marked_problem(exc)}", line) from None
    except yaml.reader.ReaderError as exc:
        # PyYAML's text is two lines ("… in "<unicode string>", position 7") with no line: one
        # line here, at the character's line and column.
        raise YamlProblem(_reader_problem(text, exc), text.count("\n", 0, exc.position) + 1) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}", None) from None
    except RecursionError:
        raise YamlProblem(f"nesting deeper than {MAX_DEPTH} levels is refused", None) from None
    finally:
        loader.dispose()
    if node is None:
        return None, []
    builder = _Builder()
    root = builder.build(node)
    if builder.too_long:
        raise WholeNumbersTooLong(builder.too_long, root, builder.duplicates)
    return root, builder.duplicates
