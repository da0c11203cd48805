"""Rows -> checked examples: the format, the checks every data kind shares, and the listing of
bad rows. A data kind (:class:`prefkit.api.DataKind`) checks one row with the helpers here;
:func:`check_rows` runs it over a split and collects every problem instead of stopping at the first.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefkit.api import TRL_TYPES, DataKind, Example, Format, Messages
from prefkit.inputs import did_you_mean, short_repr

MAX_SHOWN = 10  # bad rows listed in an error message before "... and N more"
# The roles a conversational row may use: those chat templates render. "tool" is kept only where
# the template mentions it (checked when the template is applied).
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class CheckedRows:
    examples: list[Example]
    problems: list[tuple[int, str]]  # (row, "field 'chosen' is empty")

    @property
    def bad_rows(self) -> int:
        return len({row for row, _ in self.problems})


def detect_format(rows: list[dict], fields: tuple[str, ...] = ("prompt", "chosen", "completion", "rejected")) -> Format:
    """The format of the first row whose text fields tell: a list of messages or a string."""
    for row in rows:
        for key in fields:
            value = row.get(key)
            if isinstance(value, list):
                return "conversational"
            if isinstance(value, str):
                return "standard"
    return "standard"


@dataclass(frozen=True)
class RowType:
    """The TRL dataset type of a row (a :data:`prefkit.api.TRL_TYPES` name, or ``"unknown"``)
    and the fields that told, as a message shows them."""

    name: str
    fields: str

    @property
    def is_language_modeling(self) -> bool:
        return self.name == "language modeling"


TRL_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "completions", "labels", "text", "messages")


def row_type(row: dict) -> RowType:
    """A row's TRL type, from the fields it gives (a ``None`` value counts as absent).

    ``chosen`` or ``rejected``: preference (explicit or implicit prompt); ``completions``:
    stepwise supervision; ``completion`` with ``label``: unpaired preference; ``completion``:
    prompt-completion; ``text`` or ``messages`` without the fields above and without ``prompt``:
    language modeling; ``prompt`` alone: prompt-only. A row missing a field of its type still gets
    the type (its data kind then names the missing field).
    """
    has = {key for key in TRL_FIELDS if row.get(key) is not None}
    if has & {"chosen", "rejected"}:
        if "prompt" in has:
            return RowType("preference", "prompt, chosen, rejected")
        return RowType("preference", "chosen, rejected, implicit prompt")
    if "completions" in has:
        return RowType("stepwise supervision", "prompt, completions, labels")
    if "completion" in has:
        if "label" in has:
            return RowType("unpaired preference", "prompt, completion, label")
        return RowType("prompt-completion", "prompt, completion")
    if "prompt" in has:
        return RowType("prompt-only", "field 'prompt'")
    for key in ("messages", "text"):
        if key in has:
            return RowType("language modeling", f"field {key!r}")
    names = sorted(map(str, row))
    fields = ", ".join(repr(name) for name in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return RowType("unknown", f"fields: {fields or 'none'}")


def dataset_type(rows: list[dict]) -> RowType:
    """The TRL type most rows have (the first row's on a tie)."""
    types = [row_type(row) for row in rows]
    counts = Counter(t.name for t in types)
    best = max(counts.values(), default=0)
    return next((t for t in types if counts[t.name] == best), RowType("unknown", "fields: none"))


def type_mismatch(found: RowType, kind: DataKind, needed_by: str | None = None) -> str | None:
    """``rows are TRL 'language modeling' (field 'text'); objective 'dpo' needs 'preference' rows
    (prompt, chosen, rejected)``, or None when ``kind`` reads ``found`` (or declares no types)."""
    accepted = tuple(getattr(kind, "trl_types", ()) or ())
    if not accepted or found.name in accepted:
        return None
    who = needed_by or f"data kind {kind.name!r}"
    needed = [f"{name!r} rows ({TRL_TYPES.get(name, '?')})" for name in accepted]
    wanted = needed[0] if len(needed) == 1 else ", ".join(needed[:-1]) + " or " + needed[-1]
    if found.name == "unknown":
        return f"rows are in none of TRL's dataset types ({found.fields}); {who} needs {wanted}"
    return f"rows are TRL {found.name!r} ({found.fields}); {who} needs {wanted}"


def check_rows(rows: list[dict], kind: DataKind, fmt: Format, expected: RowType | None = None) -> CheckedRows:
    """Check every row with ``kind``; collect the problems of all bad rows.

    A column the kind declares that some rows give must be given by every row (a margin on half
    the pairs is a mistake, not a choice). With ``expected`` (the rows' type), a language-modeling
    row among rows of another type, or the other way round, is a bad row: the two are tokenized
    differently (plain text, no prompt).
    """
    present = [c for c in kind.columns if any(row.get(c) is not None for row in rows)]
    examples, problems = [], []
    for row_no, row in enumerate(rows, start=1):
        if expected is not None and row_type(row).is_language_modeling != expected.is_language_modeling:
            found = row_type(row)
            problems.append((row_no, f"a TRL {found.name!r} row ({found.fields}) among {expected.name!r} rows; "
                                     "keep one type per source"))
            continue
        try:
            example, row_problems = kind.check_row(row_no, row, fmt)
        except Exception as exc:  # a data kind must not raise for bad data; name it rather than crash
            example, row_problems = None, [f"data kind {kind.name!r} failed to check the row: "
                                           f"{type(exc).__name__}: {short_repr(str(exc), 200)}"]
        if example is not None:
            row_problems = [f"field {c!r} is missing (other rows have one)" for c in present if c not in example.columns]
        if row_problems:
            problems += [(row_no, message) for message in row_problems]
        else:
            examples.append(example)
    return CheckedRows(examples, problems)


def check_text(row: dict, key: str, fmt: Format) -> str | None:
    """What is wrong with a text field (a string, or a list of messages), or None."""
    if row.get(key) is None:
        return f"field {key!r} is missing"
    value = row[key]
    if fmt == "standard":
        if isinstance(value, list):
            return f"field {key!r} is a list of messages, but the data is in standard format (strings)"
        if not isinstance(value, str):
            return f"field {key!r} should be a string, got {type_name(value)}"
        if value == "":
            return f"field {key!r} is empty"
        if not value.strip():
            return f"field {key!r} is only whitespace"
        problem = _bad_characters(value)
        return f"field {key!r} {problem}" if problem else None
    if isinstance(value, str):
        return f"field {key!r} is a string, but the data is conversational (lists of role/content messages)"
    if not isinstance(value, list):
        return f"field {key!r} should be a list of role/content messages, got {type_name(value)}"
    if not value:
        return f"field {key!r} is an empty list of messages"
    for i, message in enumerate(value, start=1):
        problem = check_message(message)
        if problem:
            return f"field {key!r} message {i} {problem}"
    return None


def check_message(message: Any) -> str | None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        return "needs 'role' and 'content'"
    role = message["role"]
    if not isinstance(role, str) or not role.strip():
        return "has no role"
    if role not in ROLES:
        return (f"has the unknown role {short_repr(role)}{did_you_mean(role, ROLES)} "
                f"(roles: {', '.join(ROLES)})")
    content = message["content"]
    if not isinstance(content, str):
        return f"content should be a string, got {type_name(content)}"
    if not content.strip():
        return "has empty content"
    problem = _bad_characters(content)
    return f"content {problem}" if problem else None


def _bad_characters(text: str) -> str | None:
    """Text no tokenizer can encode: an unpaired surrogate (JSON's "\\ud800" escapes make them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds an unpaired surrogate ({text[exc.start]!r}) at character {exc.start + 1}; fix the text's encoding"
    return None


def split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[dict[str, Messages], list[str]]:
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


def split_implicit_text(chosen: str, rejected: str) -> tuple[dict[str, str], list[str]]:
    """Standard pairs without a prompt column: the text ``chosen`` and ``rejected`` share at the
    start is the prompt, as TRL's ``extract_prompt`` does, but cut at a word boundary: the prompt
    ends before the whitespace that precedes the first word the two differ in, and that whitespace
    starts each answer (``"Q: 2+2? A: 4"`` / ``"Q: 2+2? A: 5"`` -> ``"Q: 2+2? A:"``, ``" 4"``, ``" 5"``).
    Shared text without whitespace is the prompt as it is."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = shared
    if shared < max(len(chosen), len(rejected)):  # the answers differ after the shared text
        space = max((i for i in range(shared) if chosen[i].isspace()), default=-1)
        if space >= 0:
            cut = space
            while cut > 0 and chosen[cut - 1].isspace():
                cut -= 1
    prompt = chosen[:cut]
    if not prompt.strip():
        return {}, ["field 'prompt' is missing, and 'chosen' and 'rejected' share no leading text to use as the prompt"]
    rest = {"chosen": chosen[cut:], "rejected": rejected[cut:]}
    empty = [key for key, text in rest.items() if not text.strip()]
    if empty:
        return {}, [f"field {key!r} has no text after the prompt it shares with the other answer" for key in empty]
    return {"prompt": prompt, **rest}, []


def check_number(value: Any, key: str) -> tuple[float | None, str | None]:
    """A finite number (a numeric string, as CSV gives, is fine) -> ``(number, None)`` or ``(None, problem)``."""
    if value is None:
        return None, f"field {key!r} is missing"
    if isinstance(value, bool):
        return None, f"field {key!r} is not a number: {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None, f"field {key!r} is not a number: {short_repr(value)}"
    if not math.isfinite(number):
        return None, f"field {key!r} is not a finite number: {short_repr(value)}"
    return number, None


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def check_bool(value: Any, key: str) -> tuple[bool | None, str | None]:
    """True or false (JSON booleans, 0/1, or CSV's "true"/"false"/"1"/"0") -> ``(flag, None)`` or ``(None, problem)``."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value), None
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE, None
    if value is None:
        return None, f"field {key!r} is missing"
    return None, f"field {key!r} should be true or false, got {short_repr(value)}"


# ----------------------------------------------------------------------------- messages


def group_rows(problems: list[tuple[int, str]]) -> list[str]:
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


def listing(header: str, lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_SHOWN]]
    if len(lines) > MAX_SHOWN:
        shown.append(f"  ... and {len(lines) - MAX_SHOWN} more")
    return "\n".join([header, *shown])


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")
