"""FAL_KEY in a manifest: refused wherever it is written, and never quoted by a message.

A manifest's values are stored with its batch (its text too, as provenance), sent to fal and
exported with the dataset; FAL_KEY belongs in the FAL_KEY variable only, sent as a header. So a
manifest holding the key, in any of the forms :mod:`jobs.key_forms` knows (as it is,
percent-encoded, base64 or hex, its secret half alone), is an error before anything is stored
or sent: one issue per place, naming its file, line, item and field, never the key.

- :func:`tree_key_issues`: every string of the manifest (values and mapping keys: a prompt, a
  URL, a default, a matrix value, the name, ``items_from``'s path…), at the line it is written;
- :func:`text_key_issues`: a line of the text holding it outside any value (a comment, which the
  batch stores too), when no value does;
- :func:`row_key_issues`: an ``items_from`` row's own values, read as the jobs are expanded
  (each pass reads the file again, so the pass that stores them checks them too);
- :func:`keyless`: every other issue with the key masked, should one quote a value holding it.

The keys are the ones the caller passes (the settings' FAL_KEY) and the ones this process
remembered (:func:`jobs.key_forms.remember_key`: the CLI does at start-up). Whatever key is known,
none included, a value of a fal key's shape (``<uuid>:<32+ hex digits>``,
:func:`jobs.key_forms.holds_key_shape`) is refused too: a ``submit`` run without
FAL_KEY (it sends nothing) stored one, which the dashboard and ``diff`` then showed. Its message
says that it is the shape that was matched (:data:`SHAPE_MESSAGE`), not FAL_KEY: "holds FAL_KEY"
for a value that merely looks like a key sent the user looking for how their key got there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from jobs.errors import Issue
from jobs.key_forms import BARE_KEY, MIN_KEY_LENGTH, contains_key, hide_keys, holds_key_shape, remembered_keys
from jobs.manifest.model import RawItem
from jobs.url_secrets import MASK
from jobs.yaml_lines import LList, LMap

#: What a value holding the key is told (the key itself is never shown).
KEY_MESSAGE = (
    "the value holds FAL_KEY (the fal API key): refused, as a manifest's values are stored with "
    "the batch, sent to fal and exported with the dataset; the key belongs in the FAL_KEY "
    "variable only"
)
#: What a mapping key (a field's name) holding the key is told.
KEY_NAME_MESSAGE = "a field name here holds FAL_KEY (the fal API key): refused, as for a value"
#: What a line holding the key outside any value (a comment) is told.
KEY_LINE_MESSAGE = (
    "this line holds FAL_KEY (the fal API key): refused, as the manifest's text is stored with "
    "the batch and exported with the dataset; the key belongs in the FAL_KEY variable only"
)
#: What a value of a fal key's shape is told, when it holds none of the keys this process knows.
SHAPE_HELD = (
    "holds a value shaped like a fal API key (`<key id>:<secret>`, a UUID, a colon and 32 hex "
    "digits): refused, so that no fal key is stored or sent"
)
#: What a value of a fal key's shape (:data:`SHAPE_HELD`) is told.
SHAPE_MESSAGE = (
    f"{SHAPE_HELD}, whoever's key it is, as a manifest's values are stored with the batch, sent to "
    "fal and exported with the dataset; write it otherwise if it is no key"
)
#: What a mapping key (a field's name) of a fal key's shape is told.
SHAPE_NAME_MESSAGE = f"a field name here {SHAPE_HELD}, as for a value"
#: What a line of a fal key's shape outside any value (a comment) is told.
SHAPE_LINE_MESSAGE = (
    f"this line {SHAPE_HELD}, whoever's key it is, as the manifest's text is stored with the batch "
    "and exported with the dataset; write it otherwise if it is no key"
)
#: Deepest nesting walked (the YAML loader refuses more than 64 levels; a JSONL row is bounded too).
_MAX_DEPTH = 100


def known_keys(keys: Iterable[str] = ()) -> frozenset[str]:
    """``keys`` and the keys this process remembered, those long enough to be looked for."""
    return frozenset(k for k in (*keys, *remembered_keys()) if k and len(k) >= MIN_KEY_LENGTH)


def holds_key(value: object, keys: frozenset[str], depth: int = 0, *, shape: bool = True) -> bool:
    """Whether any text in ``value`` (nested lists and mappings, their keys included) holds one
    of ``keys`` in any of its forms (:func:`jobs.key_forms.contains_key`), or (``shape``)
    anything of a fal key's shape (:func:`jobs.key_forms.holds_key_shape`), whatever ``keys``
    are (none too)."""
    if isinstance(value, str):  # (no form of a key is shorter than the shortest key looked for)
        return len(value) >= MIN_KEY_LENGTH and (
            any(contains_key(value, k) for k in keys) or (shape and holds_key_shape(value))
        )
    if value is None or isinstance(value, int | float) or depth > _MAX_DEPTH:
        return False
    if isinstance(value, Mapping):
        return any(
            holds_key(k, keys, depth + 1, shape=shape) or holds_key(v, keys, depth + 1, shape=shape)
            for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return any(holds_key(v, keys, depth + 1, shape=shape) for v in value)
    return False


def refusal(value: object, keys: frozenset[str], known: str, shaped: str) -> str:
    """The message for ``value``, which :func:`holds_key` found: ``known`` when it holds one of
    ``keys`` (FAL_KEY, in some form), ``shaped`` when it is only of a fal key's shape."""
    return known if holds_key(value, keys, shape=False) else shaped


Where = tuple[str | int, ...]


def tree_key_issues(root: object, display: str, keys: frozenset[str]) -> list[Issue]:
    """An error at each value (and mapping key) of the manifest's tree holding one of ``keys``:
    ``items[2].prompt`` is item 2's field ``prompt``, elsewhere the dotted path
    (``defaults.image_url``, ``matrix.prompt[1]``, ``name``)."""
    found: list[tuple[Where, int | None, bool, str]] = []
    _walk(root, (), getattr(root, "line", 1), keys, found, 0)
    issues = []
    for where, line, is_name, text in found:
        item = where[1] if len(where) > 2 and where[0] == "items" and isinstance(where[1], int) else None
        rest = where[2:] if item is not None else where
        issues.append(
            Issue(
                file=display,
                line=line,
                item=item,
                field=_dotted(rest) or None,
                message=(
                    refusal(text, keys, KEY_NAME_MESSAGE, SHAPE_NAME_MESSAGE)
                    if is_name
                    else refusal(text, keys, KEY_MESSAGE, SHAPE_MESSAGE)
                ),
            )
        )
    return issues


def _walk(
    node: object,
    where: Where,
    line: int | None,
    keys: frozenset[str],
    found: list[tuple[Where, int | None, bool, str]],
    depth: int,
) -> None:
    if isinstance(node, str):
        if holds_key(node, keys):
            found.append((where, line, False, node))
        return
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        lines = node.lines if isinstance(node, LMap) else {}
        key_lines = node.key_lines if isinstance(node, LMap) else {}
        for k, v in node.items():
            if holds_key(str(k), keys):
                found.append((where, key_lines.get(k, line), True, str(k)))
                continue  # the key is the field: its value is not located apart
            _walk(v, (*where, str(k)), lines.get(k, line), keys, found, depth + 1)
    elif isinstance(node, list):
        item_lines = node.lines if isinstance(node, LList) else []
        for i, v in enumerate(node):
            _walk(v, (*where, i), item_lines[i] if i < len(item_lines) else line, keys, found, depth + 1)


def _dotted(where: Where) -> str:
    """``("loras", 0, "path")`` → ``loras[0].path``."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def text_key_issues(text: str, display: str, keys: frozenset[str]) -> list[Issue]:
    """An error at each line of ``text`` holding one of ``keys`` (for a key outside every value:
    a comment); one for the whole file when the text holds it but no single line does."""
    if not holds_key(text, keys):
        return []
    issues = [
        Issue(
            file=display,
            line=n,
            item=None,
            field=None,
            message=refusal(line, keys, KEY_LINE_MESSAGE, SHAPE_LINE_MESSAGE),
        )
        for n, line in enumerate(text.splitlines(), start=1)
        if holds_key(line, keys)
    ]
    whole = refusal(text, keys, KEY_LINE_MESSAGE, SHAPE_LINE_MESSAGE)
    return issues or [Issue(file=display, line=None, item=None, field=None, message=whole)]


def row_key_issues(raw: RawItem, keys: frozenset[str]) -> list[Issue]:
    """An error at each field of an ``items_from`` row (or any item) holding one of ``keys``."""
    issues = []
    for name, value in raw.fields.items():
        if holds_key(str(name), keys):
            message = refusal(str(name), keys, KEY_NAME_MESSAGE, SHAPE_NAME_MESSAGE)
            issues.append(Issue(file=raw.source, line=raw.line, item=raw.index, field=None, message=message))
        elif holds_key(value, keys):
            line = raw.lines.get(name, raw.line) if raw.lines else raw.line
            message = refusal(value, keys, KEY_MESSAGE, SHAPE_MESSAGE)
            issues.append(Issue(file=raw.source, line=line, item=raw.index, field=name, message=message))
    return issues


def keyless(issue: Issue, keys: frozenset[str]) -> Issue:
    """``issue`` with every form of ``keys`` masked in what it shows (its message, field, value,
    what is allowed): another check's message may quote a value holding the key (an enum's, a
    too-long prompt's), and anything of a fal key's shape. As it is when it holds none."""
    shown = (issue.message, issue.field, issue.allowed, issue.file)
    if not any(holds_key(t, keys) for t in shown if t is not None) and not holds_key(issue.value, keys):
        return issue
    return dataclasses.replace(
        issue,
        message=_masked(issue.message, keys),
        field=None if issue.field is None else _masked(issue.field, keys),
        allowed=None if issue.allowed is None else _masked(issue.allowed, keys),
        file=_masked(issue.file, keys),
        value=_masked_value(issue.value, keys),
    )


def _masked(text: str, keys: frozenset[str]) -> str:
    shown = BARE_KEY.sub(MASK, hide_keys(text, keys, mask=MASK))
    return MASK if holds_key(shown, keys) else shown


def _masked_value(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, str):
        return _masked(value, keys)
    return None if holds_key(value, keys) else value
