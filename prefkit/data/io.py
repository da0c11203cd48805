"""Data sources -> rows: a registered dataset name, a local JSONL/JSON/CSV/Parquet file, or a
Hugging Face hub dataset, read into plain dicts. Nothing here checks what the rows mean."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from prefkit.api import DataError, NamedDataset
from prefkit.data.rows import listing as _listing
from prefkit.data.rows import type_name as _type_name

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(
    source: str, split: str, *, registry: Any, subset: str | None = None
) -> tuple[list[dict], str]:
    """Read a source's split into plain dicts; return ``(rows, display name)``.

    ``source`` is, in this order: a registered dataset name (``registry.datasets``), a local
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file (relative to the current directory) or
    folder, or a hub dataset id for ``datasets.load_dataset(source, subset, split=split)``.
    A local file has one split, so ``split`` only labels it in messages.
    """
    named = registry.datasets.get(source)
    if named is not None:
        return _load_named(named, split), named.name

    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path, split), source
    if path.is_dir():
        return _load_hub(source, split, subset), source
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source} ({split}): file not found (looked in {path.absolute().parent})")
    return _load_hub(source, split, subset), source


def _load_named(named: NamedDataset, split: str) -> list[dict]:
    path = named.files.get(split)
    if path is None:
        splits = ", ".join(sorted(named.files)) or "none"
        raise DataError(f"{named.name} ({split}): dataset {named.name!r} has no split {split!r}; its splits: {splits}")
    if not Path(path).is_file():
        raise DataError(f"{named.name} ({split}): the dataset's file {path} is missing")
    return read_file(Path(path), split, shown_as=named.name)


def read_file(path: Path, split: str, *, shown_as: str | None = None) -> list[dict]:
    """Read a local JSONL, JSON, CSV or Parquet file into rows (dicts)."""
    where = f"{shown_as or path} ({split})"
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, where)
        if suffix == ".json":
            return _read_json(path, where)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
    except OSError as exc:
        raise DataError(f"{where}: cannot read the file: {exc}") from None
    raise DataError(f"{where}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _read_jsonl(path: Path, where: str) -> list[dict]:
    """One JSON object per line; blank lines are ignored, so row N is the N-th object."""
    rows, problems = [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {line_no}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(value, dict):
                problems.append(f"line {line_no}: expected a JSON object, got {_type_name(value)}")
                continue
            rows.append(value)
    if problems:
        raise DataError(_listing(f"{where}: the file is not valid JSON lines", problems))
    return rows


def _read_json(path: Path, where: str) -> list[dict]:
    """A JSON list of objects, or a JSON object of equally long columns; JSON lines also work."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, where)  # a .json file holding JSON lines, as `datasets` allows
    if isinstance(value, dict) and value and all(isinstance(col, list) for col in value.values()):
        columns = list(value)
        lengths = {len(value[c]) for c in columns}
        if len(lengths) != 1:
            raise DataError(f"{where}: the JSON columns have different lengths")
        return [{c: value[c][i] for c in columns} for i in range(lengths.pop())]
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a JSON list of objects, got {_type_name(value)}")
    not_objects = [
        f"row {i}: expected a JSON object, got {_type_name(item)}"
        for i, item in enumerate(value, start=1)
        if not isinstance(item, dict)
    ]
    if not_objects:
        raise DataError(_listing(f"{where}: the JSON list holds non-objects", not_objects))
    return value


def _read_csv(path: Path) -> list[dict]:
    """A CSV file with a header line. Every value is a string; empty cells read as missing."""
    with path.open(encoding="utf-8", newline="") as handle:
        return [{key: (val if val != "" else None) for key, val in row.items()} for row in csv.DictReader(handle)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _load_hub(source: str, split: str, subset: str | None) -> list[dict]:
    """The ordinary ``datasets.load_dataset`` path, with its failures turned into DataError."""
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # offline, unknown id, unknown split, bad subset, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{source} ({split}): not a registered dataset or a local file, and loading it from the "
            f"Hugging Face hub failed: {reason}"
        ) from None
    return dataset.to_list()
