"""Data sources -> rows: a registered dataset name, a local JSONL/JSON/CSV/Parquet file, a local
dataset folder (written by ``save_to_disk``, or laid out as a hub repository), or a Hugging Face
hub dataset, read into plain dicts. Nothing here checks what the rows mean."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

from prefkit.api import DataError, NamedDataset
from prefkit.inputs import (
    MAX_DEPTH,
    InputError,
    check_readable_file,
    check_shape,
    closest,
    decode_utf8,
    exists,
    is_dir,
    is_file,
    json_value,
    read_bytes,
)
from prefkit.data.rows import listing as _listing
from prefkit.data.rows import type_name as _type_name

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_CACHE_SIZE = 4  # files whose rows are kept (by content), so the checks before a run and the run parse once
_cache: dict[tuple, list[dict]] = {}


def load_rows(
    source: str, split: str, *, registry: Any, subset: str | None = None
) -> tuple[list[dict], str]:
    """Read a source's split into plain dicts; return ``(rows, display name)``.

    ``source`` is, in this order: a registered dataset name (``registry.datasets``), a local
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file (relative to the current directory), a local
    folder (see :func:`read_folder`), or a hub dataset id for
    ``datasets.load_dataset(source, subset, split=split)``. A local file has one split, so
    ``split`` only labels it in messages. A bare name that is not a file but close to a
    registered dataset's name is refused with "did you mean".
    """
    named = registry.datasets.get(source)
    if named is not None:
        return _load_named(named, split, registry), named.name

    path = Path(source).expanduser()
    if is_file(path) or (exists(path) and not is_dir(path)):  # a FIFO or a device is refused by read_file
        return read_file(path, split), source
    if is_dir(path):
        if path.suffix.lower() in FILE_SUFFIXES:
            raise DataError(f"{source} ({split}): is a directory, not a {path.suffix} file")
        return read_folder(path, split, subset, shown_as=source), source
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source} ({split}): file not found (looked in {path.absolute().parent})")
    meant = closest(source, registry.datasets, cutoff=0.75) if "/" not in source else None
    if meant is not None:
        raise DataError(f"{source} ({split}): not a registered dataset, a local file or a hub id (org/name); "
                        f"did you mean {meant!r}? (`prefkit datasets` lists them)")
    return _load_hub(source, split, subset), source


def is_local_source(source: str, registry: Any) -> bool:
    """Whether :func:`load_rows` reads ``source`` from this machine (or refuses it) without the hub."""
    if source in registry.datasets:
        return True
    path = Path(source).expanduser()
    if is_file(path) or (exists(path) and not is_dir(path)):
        return True
    if is_dir(path):
        return True
    return path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")) or (
        "/" not in source and closest(source, registry.datasets, cutoff=0.75) is not None)


def folder_layout(path: Path) -> str:
    """What a local dataset folder holds: ``"dataset"`` (``Dataset.save_to_disk``), ``"dataset_dict"``
    (``DatasetDict.save_to_disk``) or ``"files"`` (data files, as a hub repository's snapshot)."""
    if is_file(path / "dataset_dict.json"):
        return "dataset_dict"
    if is_file(path / "state.json") and is_file(path / "dataset_info.json"):
        return "dataset"
    return "files"


def has_one_split(source: str) -> bool:
    """A local file or a saved ``Dataset`` folder: one split, which ``data.train_split`` only labels."""
    path = Path(source).expanduser()
    return is_file(path) or (is_dir(path) and folder_layout(path) == "dataset")


@contextlib.contextmanager
def _datasets_silent() -> Iterator[None]:
    """``datasets``' logger held at CRITICAL: a failure is reported once, by the DataError raised."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_folder(path: Path, split: str, subset: str | None = None, *, shown_as: str | None = None) -> list[dict]:
    """Rows of a local dataset folder: one written by ``Dataset.save_to_disk`` (one split, which
    ``split`` only labels) or ``DatasetDict.save_to_disk`` (its ``split``), read with
    ``datasets.load_from_disk``; any other folder (data files such as ``data/train-*.parquet`` or
    ``train.jsonl``, as a hub repository's snapshot looks) with ``datasets.load_dataset(folder)``.
    Every failure is a DataError naming the folder."""
    import datasets

    where = f"{shown_as or path} ({split})"
    layout = folder_layout(path)
    try:
        with _datasets_silent():  # its own log line would repeat the one message below
            if layout == "files":
                dataset = datasets.load_dataset(str(path), subset, split=split)
            else:
                dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt arrow files, no data files, an unknown split or subset, ...
        what = "a folder written by save_to_disk" if layout != "files" else "a dataset folder"
        raise DataError(f"{where}: {what} that `datasets` cannot read: {_first_line(exc)}") from None
    if layout == "dataset_dict":
        if split not in dataset:
            raise DataError(f"{where}: the saved DatasetDict has no split {split!r}; its splits: "
                            f"{', '.join(sorted(dataset)) or 'none'}")
        dataset = dataset[split]
    if not hasattr(dataset, "to_list"):
        raise DataError(f"{where}: `datasets` read a {type(dataset).__name__}, not a dataset of rows")
    return dataset.to_list()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_named(named: NamedDataset, split: str, registry: Any) -> list[dict]:
    files = getattr(named, "files", None)
    if not isinstance(files, Mapping):
        raise DataError(f"{named.name} ({split}): {_owner(registry, named.name)} gives no files for it "
                        f"(`files` is {type(files).__name__}, not a mapping of split -> file); report it to the "
                        "plugin's authors")
    path = files.get(split)
    if path is None:
        splits = ", ".join(sorted(map(str, files))) or "none"
        raise DataError(f"{named.name} ({split}): dataset {named.name!r} has no split {split!r}; its splits: {splits}")
    if not isinstance(path, (str, PathLike)):
        raise DataError(f"{named.name} ({split}): {_owner(registry, named.name)} gives {type(path).__name__} as the "
                        "file of this split, not a path")
    if not is_file(path):
        raise DataError(f"{named.name} ({split}): the dataset's file {path} is missing "
                        f"({_owner(registry, named.name)}; reinstall it)")
    return read_file(Path(path), split, shown_as=named.name)


def _owner(registry: Any, name: str) -> str:
    """``dataset 'x' of plugin 'ep' (dist version)``, as far as the registry knows."""
    try:
        info = registry.owner("datasets", name)
    except (AttributeError, KeyError):
        return f"dataset {name!r}"
    return f"dataset {name!r} of plugin {info.name!r} ({info.source})"


def read_file(path: Path, split: str, *, shown_as: str | None = None) -> list[dict]:
    """Read a local JSONL, JSON, CSV or Parquet file into rows (dicts).

    Every way a file can be unreadable (missing, a directory, no permission, not UTF-8, corrupt,
    nested too deeply, ...) raises a DataError naming the file and, where there is one, the line.
    """
    where = f"{shown_as or path} ({split})"
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{where}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        checked = check_readable_file(path)
        data = read_bytes(checked)
    except InputError as exc:
        raise DataError(f"{where}: {exc.reason}") from None
    key = (suffix, hashlib.blake2b(data, digest_size=16).digest())  # the same bytes parse to the same rows
    if key in _cache:
        return list(_cache[key])
    try:
        if suffix == ".parquet":
            rows = _read_parquet(data, where)
        else:
            text = decode_utf8(data, path)
            rows = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix](text, where)
    except InputError as exc:
        raise DataError(f"{where}: {exc.reason}") from None
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = rows
    return list(rows)


def json_object_lines(text: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line number, object, None)`` for each JSON object line of ``text``, ``(line number, None,
    problem)`` for a line that is not one; blank lines are skipped. Lines split at line ends only."""
    for line_no, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            value = json_value(line)
        except ValueError as exc:
            yield line_no, None, f"not valid JSON ({getattr(exc, 'msg', exc)})"
            continue
        if not isinstance(value, dict):
            yield line_no, None, f"expected a JSON object, got {_type_name(value)}"
            continue
        yield line_no, value, None


def _read_jsonl(text: str, where: str) -> list[dict]:
    """One JSON object per line; blank lines are ignored, so row N is the N-th object."""
    rows, problems = [], []
    for line_no, value, problem in json_object_lines(text):
        if problem is not None:
            problems.append(f"line {line_no}: {problem}")
            continue
        problem = _shape_problem(value)
        if problem:
            problems.append(f"line {line_no}: {problem}")
            continue
        rows.append(value)
    if problems:
        raise DataError(_listing(f"{where}: the file is not valid JSON lines", problems))
    return rows


def _read_json(text: str, where: str) -> list[dict]:
    """A JSON list of objects, or a JSON object of equally long columns; JSON lines also work."""
    try:
        value = json_value(text)
    except json.JSONDecodeError as exc:
        if _looks_like_json_lines(text):
            return _read_jsonl(text, where)  # a .json file holding JSON lines, as `datasets` allows
        raise DataError(f"{where}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON: {exc}") from None
    if isinstance(value, dict) and value and all(isinstance(col, list) for col in value.values()) and \
            not _one_conversation(value):
        columns = list(value)
        lengths = {len(value[c]) for c in columns}
        if len(lengths) != 1:
            raise DataError(f"{where}: the JSON columns have different lengths")
        rows = [{c: value[c][i] for c in columns} for i in range(lengths.pop())]
    elif isinstance(value, dict) and value:
        rows = [value]  # one object that is not a table of columns: the one row of a JSON-lines file
    elif not isinstance(value, list):
        raise DataError(f"{where}: expected a JSON list of objects, got {_type_name(value)}")
    else:
        rows = value
    problems = [
        f"row {i}: expected a JSON object, got {_type_name(item)}" if not isinstance(item, dict)
        else f"row {i}: {problem}"
        for i, item in enumerate(rows, start=1)
        if not isinstance(item, dict) or (problem := _shape_problem(item))
    ]
    if problems:
        raise DataError(_listing(f"{where}: the JSON list holds rows that cannot be used", problems))
    return rows


def _one_conversation(value: dict) -> bool:
    """An object whose lists all hold role/content messages, and cannot be a table of columns (its
    lists differ in length, are one message each, or one mixes roles, as a conversation does), is
    one conversational row."""
    items = [item for col in value.values() for item in col]
    if not items or not all(isinstance(item, dict) and "role" in item for item in items):
        return False
    lengths = {len(col) for col in value.values()}
    mixed = any(len({item.get("role") for item in col}) > 1 for col in value.values())
    return len(lengths) > 1 or lengths == {1} or mixed


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in io.StringIO(text, newline=None) if line.strip()), "")
    try:
        return isinstance(json_value(first), dict)
    except ValueError:
        return False


def _shape_problem(row: dict) -> str | None:
    """A row nested deeper than any data kind reads (checked without recursion)."""
    try:
        check_shape(row, max_depth=MAX_DEPTH, max_nodes=10_000_000, what="the row")
    except InputError as exc:
        return exc.reason
    return None


def _read_csv(text: str, where: str) -> list[dict]:
    """A CSV file with a header line. Every value is a string; empty cells read as missing.
    A row with more cells than the header is refused (its cells would be silently dropped)."""
    rows, problems = [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # a long text cell is fine (the default stops at 128 KiB)
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header):
            twice = sorted({name for name in header if header.count(name) > 1})
            raise DataError(f"{where}: the header names {', '.join(map(repr, twice))} more than once")
        for row_no, cells in enumerate(reader, start=1):
            if not cells:
                continue
            if len(cells) > len(header):
                problems.append(f"row {row_no} (line {reader.line_num}): {len(cells)} cells, but the header has "
                                f"{len(header)}")
                continue
            rows.append({key: (cells[i] if i < len(cells) and cells[i] != "" else None)
                         for i, key in enumerate(header)})
    except csv.Error as exc:
        raise DataError(f"{where}: line {reader.line_num}: not valid CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)
    if problems:
        raise DataError(_listing(f"{where}: rows with more cells than the header (quote cells that hold commas)",
                                 problems))
    return rows


def _read_parquet(data: bytes, where: str) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pyarrow.BufferReader(data)).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: not a readable Parquet file: {reason}") from None
    problems = [f"row {i}: {problem}" for i, row in enumerate(rows, start=1) if (problem := _shape_problem(row))]
    if problems:
        raise DataError(_listing(f"{where}: rows that cannot be used", problems))
    return rows


def _load_hub(source: str, split: str, subset: str | None) -> list[dict]:
    """The ordinary ``datasets.load_dataset`` path, with its failures turned into DataError."""
    import datasets

    from prefkit.hub import is_unreachable_error, offline_reason, prepare_hub

    prepare_hub()
    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # offline, unknown id, unknown split, bad subset, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline_reason() and is_unreachable_error(exc):
            reason = f"{offline_reason()}, and it is not in the Hugging Face cache"
        raise DataError(
            f"{source} ({split}): not a registered dataset or a local file, and loading it from the "
            f"Hugging Face hub failed: {reason}"
        ) from None
    return dataset.to_list()
