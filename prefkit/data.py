"""From a data source to tokenized examples, with row-level checks.

The path a dataset takes, top to bottom in this module:

1. **Source -> rows** (:func:`load_rows`): a registered dataset name, a local
   JSONL/JSON/CSV/Parquet file, or a Hugging Face hub dataset id, read into plain dicts.
2. **Rows -> checked examples** (:func:`check_rows`): the format is detected (*standard*:
   strings; *conversational*: lists of ``{"role", "content"}`` messages), every row is checked
   (missing, mistyped or empty fields, chosen identical to rejected, a bad margin, ...) and an
   implicit conversational prompt is split off. Bad rows are collected, not stopped at.
3. **Examples -> token ids** (:func:`encode_examples`): through the tokenizer's chat template,
   or as plain text with an end token after each completion.
4. **Lengths** (:func:`fit_lengths`): the truncation policy (truncate, drop or error).

:func:`prepare_dataset` runs the four steps for a recipe's ``data:`` block and returns a
:class:`TokenizedDataset` with a :class:`DataReport` of what happened to every row.
Every user mistake raises :class:`~prefkit.errors.DataError` naming the source, the split,
the row number(s) and the field. Nothing here loads a model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from prefkit.errors import DataError

if TYPE_CHECKING:
    from prefkit.recipe import DataConfig

log = logging.getLogger(__name__)

Kind = Literal["pairs", "sft", "prompts"]
Format = Literal["standard", "conversational"]
Messages = list[dict[str, Any]]
Text = Union[str, Messages]  # a standard string or a conversational list of messages

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_SHOWN = 10  # bad rows listed in an error message before "... and N more"


# --------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedDataset:
    """A dataset registered by a plugin through the ``register_datasets`` hook."""

    name: str
    description: str
    files: dict[str, Path]  # split name -> local file


@dataclass
class TokenizedExample:
    row: int  # 1-based row number in the source split (for messages)
    prompt_ids: list[int]
    chosen_ids: list[int] | None  # completion tokens only (for "sft" data: the completion); ends with the end token
    rejected_ids: list[int] | None  # None for sft and prompts data
    margin: float | None = None  # the optional per-row "margin" column (Bradley-Terry), else None
    prompt: Any = None  # the raw prompt (a string or a list of messages), before tokenization and truncation


@dataclass
class DataReport:
    source: str  # the file path or hub id as shown to users
    split: str
    rows_read: int  # rows considered (after max_rows) = kept + dropped_overlong + skipped_bad
    rows_kept: int
    rows_truncated: int  # kept rows where something was cut
    rows_dropped_overlong: int
    rows_skipped_bad: int
    format: str  # "standard" | "conversational"
    chat_template: bool  # whether the chat template was applied


@dataclass
class TokenizedDataset:
    examples: list[TokenizedExample]
    report: DataReport

    def fingerprint(self) -> str:
        """sha256 over every example's ids and margin, in order.

        Identical data, tokenizer, chat template and truncation give the identical
        fingerprint; any change to the ids gives a different one. The reference cache keys on it.
        """
        digest = hashlib.sha256()
        for ex in self.examples:
            record = [ex.prompt_ids, ex.chosen_ids, ex.rejected_ids, ex.margin]
            digest.update(json.dumps(record, separators=(",", ":")).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------
# 1. Source -> rows
# --------------------------------------------------------------------------------------


def load_rows(
    source: str, split: str, *, subset: str | None = None, registry: Any = None
) -> tuple[list[dict], str]:
    """Read a source's split into plain dicts; return ``(rows, display name)``.

    ``source`` is, in this order: a registered dataset name (``registry.datasets``), a local
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file (relative to the current directory) or
    folder, or a hub dataset id for ``datasets.load_dataset(source, subset, split=split)``.
    A local file has one split, so ``split`` only labels it in messages.
    """
    if registry is None:
        from prefkit.plugins import load_registry

        registry = load_registry()

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


# --------------------------------------------------------------------------------------
# 2. Rows -> checked examples
# --------------------------------------------------------------------------------------


@dataclass
class Example:
    """One checked row, before tokenization. Texts are strings or lists of messages."""

    row: int
    prompt: Text
    chosen: Text | None = None  # the completion for sft data
    rejected: Text | None = None
    margin: float | None = None


@dataclass
class CheckedRows:
    examples: list[Example]
    problems: list[tuple[int, str]]  # (row, "field 'chosen' is empty")

    @property
    def bad_rows(self) -> int:
        return len({row for row, _ in self.problems})


def detect_format(rows: list[dict]) -> Format:
    """The format of the first row whose text fields tell: a list of messages or a string."""
    for row in rows:
        for key in ("prompt", "chosen", "completion", "rejected"):
            value = row.get(key)
            if isinstance(value, list):
                return "conversational"
            if isinstance(value, str):
                return "standard"
    return "standard"


def check_rows(rows: list[dict], kind: Kind, fmt: Format) -> CheckedRows:
    """Check every row for ``kind`` in format ``fmt``; collect the problems of all bad rows."""
    has_margin = kind == "pairs" and any(row.get("margin") is not None for row in rows)
    examples, problems = [], []
    for row_no, row in enumerate(rows, start=1):
        example, row_problems = _check_row(row_no, row, kind, fmt, has_margin)
        if row_problems:
            problems += [(row_no, message) for message in row_problems]
        else:
            examples.append(example)
    return CheckedRows(examples, problems)


def _check_row(row_no: int, row: dict, kind: Kind, fmt: Format, has_margin: bool) -> tuple[Example | None, list[str]]:
    """One row -> an Example, or the list of what is wrong with it."""
    answer_key = _answer_key(row, kind)
    implicit = (
        fmt == "conversational"
        and row.get("prompt") is None
        and answer_key != "completion"
        and "chosen" in row
        and "rejected" in row
    )
    if implicit:
        needed = ["chosen", "rejected"]
    else:
        needed = ["prompt", *{"pairs": ["chosen", "rejected"], "sft": [answer_key], "prompts": []}[kind]]

    problems = [p for key in needed if (p := _check_text(row, key, fmt))]
    margin, margin_problem = _check_margin(row.get("margin")) if has_margin else (None, None)
    if margin_problem:
        problems.append(margin_problem)
    if problems:
        return None, problems

    texts = {key: row[key] for key in needed}
    if "chosen" in texts and "rejected" in texts and texts["chosen"] == texts["rejected"]:
        return None, ["fields 'chosen' and 'rejected' are identical"]
    if implicit:
        texts, problems = _split_implicit_prompt(texts["chosen"], texts["rejected"])
        if problems:
            return None, problems

    chosen = texts[answer_key] if answer_key else None
    rejected = texts.get("rejected") if kind == "pairs" else None
    return Example(row_no, texts["prompt"], chosen, rejected, margin), []


def _answer_key(row: dict, kind: Kind) -> str | None:
    """The field holding the (preferred) answer: sft data may give `completion` or pair data's `chosen`."""
    if kind == "pairs":
        return "chosen"
    if kind == "sft":
        return "chosen" if "completion" not in row and "chosen" in row else "completion"
    return None


def _check_text(row: dict, key: str, fmt: Format) -> str | None:
    """What is wrong with a text field (a string, or a list of messages), or None."""
    if row.get(key) is None:
        return f"field {key!r} is missing"
    value = row[key]
    if fmt == "standard":
        if isinstance(value, list):
            return f"field {key!r} is a list of messages, but the data is in standard format (strings)"
        if not isinstance(value, str):
            return f"field {key!r} should be a string, got {_type_name(value)}"
        if value == "":
            return f"field {key!r} is empty"
        if not value.strip():
            return f"field {key!r} is only whitespace"
        return None
    if isinstance(value, str):
        return f"field {key!r} is a string, but the data is conversational (lists of role/content messages)"
    if not isinstance(value, list):
        return f"field {key!r} should be a list of role/content messages, got {_type_name(value)}"
    if not value:
        return f"field {key!r} is an empty list of messages"
    for i, message in enumerate(value, start=1):
        problem = _check_message(message)
        if problem:
            return f"field {key!r} message {i} {problem}"
    return None


def _check_message(message: Any) -> str | None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        return "needs 'role' and 'content'"
    if not isinstance(message["role"], str) or not message["role"].strip():
        return "has no role"
    content = message["content"]
    if not isinstance(content, str):
        return f"content should be a string, got {_type_name(content)}"
    if not content.strip():
        return "has empty content"
    return None


def _split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[dict[str, Messages], list[str]]:
    """Conversational pairs without a prompt column: the shared leading messages are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        problem = "field 'prompt' is missing, and 'chosen' and 'rejected' share no first message to use as the prompt"
        return {}, [problem]
    rest = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    empty = [key for key, messages in rest.items() if not messages]
    if empty:
        return {}, [f"field {key!r} has no messages after the prompt it shares with the other answer" for key in empty]
    return {"prompt": chosen[:shared], **rest}, []


def _check_margin(value: Any) -> tuple[float | None, str | None]:
    """A margin must be a finite number (a numeric string, as CSV gives, is fine)."""
    if value is None:
        return None, "field 'margin' is missing (other rows have one)"
    if isinstance(value, bool):
        return None, f"field 'margin' is not a number: {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"field 'margin' is not a number: {value!r}"
    if not math.isfinite(number):
        return None, f"field 'margin' is not a finite number: {value!r}"
    return number, None


# --------------------------------------------------------------------------------------
# 3. Examples -> token ids
# --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of one example, before truncation."""

    row: int
    prompt: list[int]
    completions: dict[str, list[int]]  # "chosen" (and "rejected"); empty for prompts data
    margin: float | None


def use_chat_template(tokenizer: Any, setting: str, fmt: Format, where: str) -> bool:
    """Apply the rule of ``data.chat_template`` ("auto" | "always" | "never")."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "always" and not has_template:
        raise DataError(f"{where}: data.chat_template is 'always', but the tokenizer has no chat template")
    use = setting == "always" or (setting == "auto" and has_template)
    if fmt == "conversational" and not use:
        why = "data.chat_template is 'never'" if setting == "never" else "the tokenizer has no chat template"
        raise DataError(
            f"{where}: the data is conversational (lists of messages), but {why}; "
            "use a tokenizer with a chat template (model.tokenizer) and data.chat_template: auto"
        )
    return use


def encode_examples(examples: list[Example], tokenizer: Any, chat_template: bool, where: str) -> list[Encoded]:
    """Tokenize all examples in batches; prompt and completion ids are kept apart."""
    keys = [key for key in ("chosen", "rejected") if any(getattr(ex, key) is not None for ex in examples)]
    if chat_template:
        prompts, completions = _render_chat(examples, keys, tokenizer, where)
        prompt_ids = _tokenize(tokenizer, prompts, special=False)
        completion_ids = {key: _tokenize(tokenizer, texts, special=False) for key, texts in completions.items()}
    else:
        prompt_ids = _tokenize(tokenizer, [ex.prompt for ex in examples], special=True)
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion_ids = {
            key: [ids + end for ids in _tokenize(tokenizer, [getattr(ex, key) for ex in examples], special=False)]
            for key in keys
        }
    return [
        Encoded(ex.row, prompt_ids[i], {key: completion_ids[key][i] for key in keys}, ex.margin)
        for i, ex in enumerate(examples)
    ]


def _render_chat(
    examples: list[Example], keys: list[str], tokenizer: Any, where: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Prompt text = template with the generation prompt; completion = full text minus prompt text."""
    prompts: list[str] = []
    completions: dict[str, list[str]] = {key: [] for key in keys}
    for ex in examples:
        messages = _as_messages(ex.prompt, "user")
        prompt_text = _apply_template(tokenizer, messages, True, f"{where}: row {ex.row}: field 'prompt'")
        prompts.append(prompt_text)
        for key in keys:
            conversation = messages + _as_messages(getattr(ex, key), "assistant")
            full = _apply_template(tokenizer, conversation, False, f"{where}: row {ex.row}: field {key!r}")
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{where}: row {ex.row}: field {key!r}: the tokenizer's chat template does not render "
                    "prompt+answer as the prompt (with its generation prompt) followed by the answer, so the "
                    "answer tokens cannot be separated; use another template or data.chat_template: never "
                    "with standard-format data"
                )
            completions[key].append(full[len(prompt_text) :])
    return prompts, completions


def _apply_template(tokenizer: Any, messages: Messages, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template may refuse a conversation (e.g. roles that do not alternate)
        raise DataError(f"{where}: the tokenizer's chat template refused the messages: {exc}") from None


def _as_messages(text: Text, role: str) -> Messages:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def _tokenize(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=special)["input_ids"])


# --------------------------------------------------------------------------------------
# 4. Lengths
# --------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """An example cut to the length limits, the reasons a cut was needed, and whether it must go."""

    example: TokenizedExample
    reasons: list[str]
    overlong: bool  # the prompt leaves no room for one completion token

    @property
    def was_cut(self) -> bool:
        return bool(self.reasons)


def fit_lengths(enc: Encoded, max_length: int, max_prompt_length: int | None) -> Fitted:
    """Apply the "truncate" rule: keep the prompt's last tokens, cut completions at the end."""
    reasons: list[str] = []
    prompt = enc.prompt
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        reasons.append(f"prompt is {len(prompt)} tokens > max_prompt_length {max_prompt_length}")
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    overlong = room < 1
    if overlong:
        reasons.append(
            f"prompt is {len(prompt)} tokens, leaving no room for a completion within max_length {max_length}"
        )
    cut: dict[str, list[int]] = {}
    for key, ids in enc.completions.items():
        if not overlong and len(ids) > room:
            reasons.append(f"prompt+{key} is {len(enc.prompt) + len(ids)} tokens > max_length {max_length}")
        cut[key] = ids[: max(room, 0)]
    example = TokenizedExample(enc.row, prompt, cut.get("chosen"), cut.get("rejected"), enc.margin)
    return Fitted(example, reasons, overlong)


# --------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------


def prepare_dataset(
    cfg: DataConfig,
    tokenizer: Any,
    kind: Kind,
    *,
    split: Literal["train", "eval"] = "train",
    registry: Any = None,
) -> TokenizedDataset:
    """Load, check, tokenize and fit one split of the recipe's data for an objective's data kind.

    ``split="eval"`` reads ``data.eval`` (or, when that is unset, the ``data.eval_split`` split
    of ``data.train``, which must then be a named or hub dataset, not a single file).
    """
    source, split_name, limit = _choose_split(cfg, split)
    rows, shown = load_rows(source, split_name, subset=cfg.subset, registry=registry)
    rows = rows[:limit] if limit else rows
    where = f"{shown} ({split_name})"
    if not rows:
        raise DataError(f"{where}: the split has no rows")

    fmt: Format = detect_format(rows) if cfg.format == "auto" else cfg.format
    chat = use_chat_template(tokenizer, cfg.chat_template, fmt, where)
    checked = check_rows(rows, kind, fmt)
    if checked.problems and cfg.bad_rows == "error":
        raise DataError(_bad_rows_message(where, checked.problems, kind))
    if checked.problems:
        log.warning("%s", _bad_rows_message(where, checked.problems, kind, skipped=True))

    encoded = encode_examples(checked.examples, tokenizer, chat, where)
    kept, truncated, dropped = _apply_truncation(encoded, cfg, where)
    raw_prompts = {ex.row: ex.prompt for ex in checked.examples}
    for example in kept:
        example.prompt = raw_prompts[example.row]  # so reward functions and samplers can see the text
    report = DataReport(
        source=shown,
        split=split_name,
        rows_read=len(rows),
        rows_kept=len(kept),
        rows_truncated=truncated,
        rows_dropped_overlong=dropped,
        rows_skipped_bad=checked.bad_rows,
        format=fmt,
        chat_template=chat,
    )
    if not kept:
        raise DataError(_nothing_left_message(where, report, checked.problems))
    return TokenizedDataset(kept, report)


def _choose_split(cfg: DataConfig, split: str) -> tuple[str, str, int | None]:
    """(source, split name, row limit) for the train or the eval data."""
    if split == "train":
        return cfg.train, cfg.train_split, cfg.max_rows
    if cfg.eval is not None:
        return cfg.eval, cfg.eval_split, cfg.max_eval_rows
    if Path(cfg.train).expanduser().is_file():
        raise DataError(
            f"{cfg.train} ({cfg.eval_split}): no evaluation data: data.train is a single file, "
            "so set data.eval to an evaluation file or dataset"
        )
    return cfg.train, cfg.eval_split, cfg.max_eval_rows


def _apply_truncation(
    encoded: list[Encoded], cfg: DataConfig, where: str
) -> tuple[list[TokenizedExample], int, int]:
    """Fit every example under ``cfg.truncation``; return (kept examples, rows truncated, rows dropped)."""
    kept: list[TokenizedExample] = []
    truncated = dropped = 0
    too_long: list[tuple[int, str]] = []
    for enc in encoded:
        fitted = fit_lengths(enc, cfg.max_length, cfg.max_prompt_length)
        if not fitted.was_cut:
            kept.append(fitted.example)
        elif cfg.truncation == "error":
            too_long += [(enc.row, reason) for reason in fitted.reasons]
        elif cfg.truncation == "drop" or fitted.overlong:
            dropped += 1
        else:
            kept.append(fitted.example)
            truncated += 1
    if too_long:
        rows = len({row for row, _ in too_long})
        header = (
            f"{where}: {rows} row(s) too long (data.truncation is 'error'; "
            "use 'truncate' or 'drop', or raise data.max_length / data.max_prompt_length)"
        )
        raise DataError(_listing(header, [f"row {row}: {reason}" for row, reason in too_long]))
    return kept, truncated, dropped


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _bad_rows_message(where: str, problems: list[tuple[int, str]], kind: Kind, *, skipped: bool = False) -> str:
    rows = len({row for row, _ in problems})
    lines = _group_rows(problems)
    if not skipped and len(lines) == 1:
        return f"{where}: {lines[0]} (set data.bad_rows: skip to skip bad rows)"
    action = "skipped" if skipped else "found (set data.bad_rows: skip to skip them)"
    header = f"{where}: {rows} bad row(s) for {kind!r} data {action}"
    return _listing(header, lines)


def _nothing_left_message(where: str, report: DataReport, problems: list[tuple[int, str]]) -> str:
    header = (
        f"{where}: no usable examples: {report.rows_read} rows read, {report.rows_skipped_bad} bad, "
        f"{report.rows_dropped_overlong} too long"
    )
    if report.rows_dropped_overlong:
        header += " (see data.max_length, data.max_prompt_length and data.truncation)"
    return _listing(header, _group_rows(problems)) if problems else header


def _group_rows(problems: list[tuple[int, str]]) -> list[str]:
    """Merge runs of consecutive rows with the same problem: ``rows 1-40: field 'x' is missing``."""
    lines: list[str] = []
    runs: list[tuple[int, int, str]] = []
    for row, message in sorted(problems, key=lambda p: p[0]):
        if runs and runs[-1][2] == message and runs[-1][1] == row - 1:
            runs[-1] = (runs[-1][0], row, message)
        else:
            runs.append((row, row, message))
    for first, last, message in runs:
        rows = f"row {first}" if first == last else f"rows {first}-{last}"
        lines.append(f"{rows}: {message}")
    return lines


def _listing(header: str, lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_SHOWN]]
    if len(lines) > MAX_SHOWN:
        shown.append(f"  ... and {len(lines) - MAX_SHOWN} more")
    return "\n".join([header, *shown])


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")
