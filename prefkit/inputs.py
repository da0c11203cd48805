"""Reading what users hand prefkit, safely: files, YAML, JSON, names and folders.

Every helper here turns a whole class of bad input into one :class:`InputError` (a
:class:`~prefkit.api.errors.PrefkitError`) whose ``reason`` says what is wrong in plain words;
callers put the file (and the row or key) in front of it. Nothing here knows what a recipe or a
row means.

- :func:`read_text`: a file's text, refusing a missing file, a directory, an unreadable file
  and bytes that are not UTF-8 (the line and column of the first bad byte are named). A UTF-8
  byte-order mark is accepted.
- :func:`load_yaml`: YAML read safely, refusing duplicate keys, nesting deeper than
  :data:`MAX_DEPTH` and alias "bombs" that expand to more than :data:`MAX_NODES` values.
- :func:`json_value`: ``json.loads`` that refuses a key written twice in one object and reports
  nesting too deep as a problem, not a crash.
- :func:`value_problems`: the key paths of every infinite or NaN number, and of every string
  holding a NUL or an unpaired surrogate, in a document.
- :func:`path_problem`, :func:`is_file`, :func:`is_dir`, :func:`exists`: paths too long for the
  file system are named, not raised from ``stat``.
- :func:`check_writable_dir`: a folder prefkit will write into can be created and written.
- :func:`did_you_mean`: the closest known name, for messages.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from prefkit.api.errors import PrefkitError

MAX_DEPTH = 100  # nesting levels of lists and mappings a recipe or a data row may have
MAX_NODES = 1_000_000  # values a YAML document may expand to (aliases counted every time they are used)


class InputError(PrefkitError):
    """A file or value that cannot be read. ``reason`` is the message without the file name."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


# ----------------------------------------------------------------------------- files


def check_readable_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is an existing file; InputError (missing, a directory, ...) otherwise."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise InputError(path, "is a directory, not a file")
        if not path.exists():
            parent = path.parent if str(path.parent) else Path(".")
            where = f" (no such file in {parent.absolute()})" if parent.is_dir() else f" ({parent} does not exist)"
            raise InputError(path, f"file not found{where}")
        if not path.is_file():
            raise InputError(path, "is not a regular file")
    except OSError as exc:  # e.g. a path component that is a file, a path too long
        raise InputError(path, f"cannot read: {os_reason(exc)}") from None
    return path


def read_bytes(path: str | os.PathLike) -> bytes:
    path = check_readable_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read: {os_reason(exc)}") from None


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); InputError otherwise."""
    return decode_utf8(read_bytes(path), path)


def decode_utf8(data: bytes, path: str | os.PathLike | None) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # the codec counts after the mark
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise InputError(
            path, f"is not UTF-8 text: byte 0x{data[start]:02x} at line {line}, column {column} cannot be decoded; "
                  "save the file as UTF-8"
        ) from None


def os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# ----------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (the second would silently win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:  # the keys written here; keys merged in with `<<: *anchor` may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the constructor below reports it
            continue
        if duplicate:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first}); keep one of them", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, path: str | os.PathLike | None = None) -> Any:
    """Parse YAML safely; InputError (with the line and column) for invalid YAML, a duplicate
    key, nesting deeper than MAX_DEPTH, or aliases that expand to more than MAX_NODES values."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(path, f"{at}not valid YAML: {problem}") from None
    except RecursionError:
        raise InputError(path, f"not valid YAML: nested more than {MAX_DEPTH} levels deep") from None
    check_shape(value, path)
    return value


def check_shape(value: Any, path: str | os.PathLike | None = None, *, max_depth: int = MAX_DEPTH,
                max_nodes: int = MAX_NODES, what: str = "the document") -> None:
    """Refuse a value nested deeper than ``max_depth`` or holding more than ``max_nodes`` values
    (shared sub-values, as YAML aliases make, count once per use). Iterative: never recurses."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InputError(path, f"{what} holds more than {max_nodes:,} values (YAML aliases repeated many times?)")
        if isinstance(item, dict):
            children: Iterable[Any] = list(item.keys()) + list(item.values())
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= max_depth:
            raise InputError(path, f"{what} is nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children)


# ----------------------------------------------------------------------------- JSON


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {short_repr(twice)} appears twice in one object; keep one")
    return dict(pairs)


def json_value(text: str | bytes) -> Any:
    """``json.loads`` that refuses a key written twice in one object; nesting too deep for Python
    raises ValueError (like any other bad JSON)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except RecursionError:
        raise ValueError(f"nested more than the JSON reader's limit of about {MAX_DEPTH * 10} levels") from None


# ----------------------------------------------------------------------------- values


NOT_FINITE = "must be a finite number (not inf or nan)"


def text_problem(text: str) -> str | None:
    """What makes a string unusable as a name, path or setting: a NUL or an unpaired surrogate."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds an invalid character ({text[exc.start]!r}, an unpaired surrogate) at position {exc.start}"
    return None


def value_problems(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(key path, problem)`` for every infinite or NaN float and every unusable string (key or
    value) in a document. Iterative: never recurses."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            found.append((path or "<top level>", NOT_FINITE))
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                found.append((path or "<top level>", problem))
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                shown = key if isinstance(key, str) and not text_problem(key) else short_repr(key)
                if isinstance(key, str) and text_problem(key):
                    found.append((f"{path}.{shown}" if path else str(shown), f"the key {text_problem(key)}"))
                stack.append((f"{path}.{shown}" if path else str(shown), child))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in reversed(list(enumerate(item))))
    return found


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about huge values."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(name: Any, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'dpo'?"`` for the closest choice, or ``""`` when none is close."""
    if not isinstance(name, str):
        return ""
    choices = [c for c in choices if isinstance(c, str)]
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered and lowered[name.lower()] != name:
        return f"; did you mean {lowered[name.lower()]!r}?"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
    if not close:
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)]
    return f"; did you mean {close[0]!r}?" if close else ""


def closest(name: str, choices: Iterable[str], *, cutoff: float = 0.8) -> str | None:
    """The choice ``name`` is most likely a misspelling of, or None."""
    choices = list(choices)
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1, cutoff=cutoff)
    if not close:
        return None
    return next(c for c in choices if c.lower() == close[0])


# ----------------------------------------------------------------------------- paths

MAX_NAME = 255  # bytes in one file name (most file systems)
MAX_PATH = 4095  # bytes in a whole path (Linux)


def path_problem(text: str) -> str | None:
    """What makes ``text`` impossible as a path on this machine (too long), or None."""
    if len(os.fsencode(text)) > MAX_PATH:
        return f"is too long for a path ({len(text)} characters)"
    longest = max((part for part in Path(text).parts), key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(longest)) > MAX_NAME:
        return f"has a path part {len(longest)} characters long, more than the {MAX_NAME} a file name may have"
    return None


def _safely(test, path: str | os.PathLike) -> bool:
    try:
        return test(Path(path).expanduser())
    except (OSError, ValueError, RuntimeError):  # too long, a NUL, no permission, ~nosuchuser: not usable, so "no"
        return False


def is_file(path: str | os.PathLike) -> bool:
    """``Path(path).expanduser().is_file()``, False instead of an error for an impossible path."""
    return _safely(Path.is_file, path)


def is_dir(path: str | os.PathLike) -> bool:
    return _safely(Path.is_dir, path)


def exists(path: str | os.PathLike) -> bool:
    return _safely(Path.exists, path)


# ----------------------------------------------------------------------------- folders


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a folder prefkit must create or write into that it cannot:
    a file where the folder should be, a file among its parents, or a place it may not write.
    Writes (and removes) one empty temporary file in the nearest existing folder; creates nothing."""
    target = Path(path).expanduser()
    probe = target
    try:
        while not probe.exists():
            if probe.is_symlink():  # a dangling link
                raise InputError(None, f"{what} {str(path)!r}: {probe} is a broken symbolic link")
            parent = probe.parent
            if parent == probe:
                break
            probe = parent
        if probe.exists() and not probe.is_dir():
            if probe == target:
                raise InputError(None, f"{what} {str(path)!r} is a file, not a folder; choose a folder")
            raise InputError(None, f"{what} {str(path)!r}: {probe} is a file, so no folder can be made inside it")
        handle, name = tempfile.mkstemp(prefix=".prefkit-write-test-", dir=probe)
    except InputError:
        raise
    except ValueError as exc:  # a NUL in the path
        raise InputError(None, f"{what} {str(path)!r} cannot be a path: {exc}") from None
    except OSError as exc:
        raise InputError(None, f"{what} {str(path)!r}: cannot write in {probe}: {os_reason(exc)}; "
                               "choose a folder you can write to") from None
    os.close(handle)
    os.unlink(name)
