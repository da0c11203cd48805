"""From a data source to tokenized examples, with row-level checks.

The path a dataset takes, top to bottom:

1. **Source -> rows** (:func:`prefkit.data.io.load_rows`): a registered dataset name, a local
   JSONL/JSON/CSV/Parquet file, or a Hugging Face hub dataset id, read into plain dicts.
2. **Rows -> checked examples** (:func:`prefkit.data.rows.check_rows`): the format is detected
   (*standard*: strings; *conversational*: lists of ``{"role", "content"}`` messages) and the
   objective's data kind (a :class:`prefkit.api.DataKind` plugin: pairs, sft, prompts, unpaired,
   ...) checks every row. Bad rows are collected, not stopped at.
3. **Examples -> token ids** (:func:`encode_examples`): through the tokenizer's chat template,
   or as plain text with an end token after each completion.
4. **Lengths** (:func:`fit_lengths`): the truncation policy (truncate, drop or error).

:func:`prepare_dataset` runs the four steps for a recipe's ``data:`` block and returns a
:class:`TokenizedDataset` with a :class:`DataReport` of what happened to every row.
Every user mistake raises :class:`~prefkit.api.DataError` naming the source, the split,
the row number(s) and the field. Nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from prefkit.api import DataError, DataKind, Example, Format, Messages, Text
from prefkit.data.io import has_one_split, load_rows
from prefkit.data.mixture import Part, carve, mixture_counts, pick, source_parts
from prefkit.data.rows import (
    CheckedRows,
    RowType,
    check_rows,
    dataset_type,
    detect_format,
    group_rows,
    listing,
    type_mismatch,
)

if TYPE_CHECKING:
    from prefkit.recipe import DataConfig

log = logging.getLogger(__name__)

MISMATCHED = "mismatched"  # the extra completion of Needs.mismatched


@dataclass
class TokenizedExample:
    row: int  # 1-based row number in the source split (for messages)
    prompt_ids: list[int]
    completions: dict[str, list[int]]  # name -> completion tokens only, ending with the end token
    columns: dict[str, float] = field(default_factory=dict)  # the data kind's extra numeric columns
    prompt: Any = None  # the raw prompt (a string or a list of messages), before tokenization and truncation
    masks: dict[str, list[bool]] = field(default_factory=dict)  # name -> learnt tokens, where not all are


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
    chat_template: bool  # whether the chat template was applied (a mixture: by any source)
    kind: str = ""  # the data kind the rows were checked as
    sources: list[dict] = field(default_factory=list)  # a mixture: each source's examples and how many it gave
    carved_for_eval: int = 0  # distinct training examples carved out as the evaluation split


@dataclass
class TokenizedDataset:
    examples: list[TokenizedExample]
    report: DataReport
    names: tuple[str, ...] = ()  # the completion names of every example, in batch-row order

    def fingerprint(self) -> str:
        """sha256 over every example's ids and columns, in order.

        Identical data, tokenizer, chat template and truncation give the identical
        fingerprint; any change to the ids gives a different one. The reference cache keys on it.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(list(self.names)).encode())
        for ex in self.examples:
            record = [ex.prompt_ids, [ex.completions[name] for name in self.names], sorted(ex.columns.items())]
            if ex.masks:
                record.append(sorted(ex.masks.items()))
            digest.update(json.dumps(record, separators=(",", ":")).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------
# 3. Examples -> token ids
# --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of one example, before truncation."""

    row: int
    prompt: list[int]
    completions: dict[str, list[int]]  # name -> ids; empty for prompts data
    columns: dict[str, float]
    masks: dict[str, list[bool]] = field(default_factory=dict)  # name -> learnt tokens, where not all are


def use_chat_template(tokenizer: Any, setting: str, fmt: Format, where: str, *, plain_text: bool = False) -> bool:
    """Apply the rule of ``data.chat_template`` ("auto" | "always" | "never"). ``plain_text``
    (TRL language-modeling ``text`` rows) is never put through a template: it has no turns."""
    if plain_text:
        if setting == "always":
            raise DataError(f"{where}: the rows are TRL 'language modeling' text (field 'text'), which is trained "
                            "on as plain text, but data.chat_template is 'always'; use auto or never, or give "
                            "conversations as 'messages' rows")
        return False
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
    """Tokenize all examples in batches; prompt and completion ids are kept apart.

    A conversational completion with a non-assistant message inside it (a user turn between two
    answers) gets a mask that is False on that message's tokens (and on the header of the next
    answer), so only the assistant messages are learnt. Without the chat template, an empty prompt
    (language-modeling text, with a tokenizer that adds no BOS) takes the text's first token, which
    no position can predict, so the loss covers every other token of the text.
    """
    keys = list(dict.fromkeys(key for ex in examples for key in ex.completions))
    rows = [ex.row for ex in examples]
    masks: dict[str, list[list[bool] | None]] = {key: [None] * len(examples) for key in keys}
    if chat_template:
        prompts, segments = _render_chat(examples, keys, tokenizer, where)
        prompt_ids = _tokenize(tokenizer, prompts, special=False, rows=rows, where=f"{where}: field 'prompt'")
        completion_ids = {}
        for key in keys:
            completion_ids[key], masks[key] = _tokenize_segments(tokenizer, segments[key], rows, f"{where}: field {key!r}")
    else:
        prompt_ids = _tokenize(tokenizer, [ex.prompt for ex in examples], special=True, rows=rows,
                               where=f"{where}: field 'prompt'")
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion_ids = {
            key: [ids + end for ids in _tokenize(tokenizer, [ex.completions[key] for ex in examples], special=False,
                                                 rows=rows, where=f"{where}: field {key!r}")]
            for key in keys
        }
        if len(keys) == 1:
            for i, ids in enumerate(prompt_ids):
                answer = completion_ids[keys[0]][i]
                if not ids and len(answer) > 1:
                    prompt_ids[i], completion_ids[keys[0]][i] = answer[:1], answer[1:]
    return [
        Encoded(ex.row, prompt_ids[i], {key: completion_ids[key][i] for key in keys}, dict(ex.columns),
                {key: masks[key][i] for key in keys if masks[key][i] is not None})
        for i, ex in enumerate(examples)
    ]


Segments = list[tuple[str, bool]]  # a completion's text in pieces: (text, learnt)


def _render_chat(
    examples: list[Example], keys: list[str], tokenizer: Any, where: str
) -> tuple[list[str], dict[str, list[Segments]]]:
    """Prompt text = template with the generation prompt; completion = full text minus prompt text,
    in pieces that are learnt (assistant messages) or not (any other message inside the completion)."""
    prompts: list[str] = []
    completions: dict[str, list[Segments]] = {key: [] for key in keys}
    for ex in examples:
        messages = _as_messages(ex.prompt, "user")
        prompt_text = _apply_template(tokenizer, messages, True, f"{where}: row {ex.row}: field 'prompt'")
        prompts.append(prompt_text)
        for key in keys:
            answer = _as_messages(ex.completions[key], "assistant")
            place = f"{where}: row {ex.row}: field {key!r}"
            full = _apply_template(tokenizer, messages + answer, False, place)
            _check_prefix(full, prompt_text, place)
            if all(isinstance(m, dict) and m.get("role") == "assistant" for m in answer):
                completions[key].append([(full[len(prompt_text):], True)])
            else:
                completions[key].append(_assistant_segments(tokenizer, messages, answer, prompt_text, full, place))
    return prompts, completions


def _check_prefix(full: str, head: str, place: str) -> None:
    if not full.startswith(head):
        raise DataError(
            f"{place}: the tokenizer's chat template does not render the conversation as its earlier turns "
            "(with a generation prompt) followed by the answer, so the answer tokens cannot be separated; use "
            "another template or data.chat_template: never with standard-format data"
        )


def _assistant_segments(tokenizer: Any, prompt: Messages, answer: Messages, prompt_text: str, full: str,
                        place: str) -> Segments:
    """Split ``full[len(prompt_text):]`` at the assistant messages of ``answer``: each one's text
    (from after its generation prompt to the end of its turn) is learnt, the rest is not."""
    pieces: Segments = []
    pos = len(prompt_text)
    for j, message in enumerate(answer):
        if message.get("role") != "assistant":
            continue
        before = prompt_text if j == 0 else _apply_template(tokenizer, prompt + answer[:j], True, place)
        through = full if j == len(answer) - 1 else _apply_template(tokenizer, prompt + answer[: j + 1], False, place)
        _check_prefix(full, before, place)
        _check_prefix(full, through, place)
        start = max(len(before), pos)
        pieces += [(full[pos:start], False), (full[start:len(through)], True)]
        pos = max(pos, len(through))
    pieces.append((full[pos:], False))
    return [(text, learnt) for text, learnt in pieces if text]


def _tokenize_segments(tokenizer: Any, segments: list[Segments], rows: list[int],
                       where: str) -> tuple[list[list[int]], list[list[bool] | None]]:
    """Token ids of each example's pieces, joined; a mask only where some piece is not learnt."""
    texts = [text for pieces in segments for text, _ in pieces]
    owners = [rows[i] for i, pieces in enumerate(segments) for _ in pieces]
    flat = iter(_tokenize(tokenizer, texts, special=False, rows=owners, where=where))
    ids_out: list[list[int]] = []
    masks_out: list[list[bool] | None] = []
    for pieces in segments:
        ids: list[int] = []
        mask: list[bool] = []
        for _, learnt in pieces:
            piece = next(flat)
            ids += piece
            mask += [learnt] * len(piece)
        ids_out.append(ids)
        masks_out.append(None if all(mask) else mask)
    return ids_out, masks_out


def _apply_template(tokenizer: Any, messages: Messages, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template may refuse a conversation (e.g. roles that do not alternate)
        raise DataError(f"{where}: the tokenizer's chat template refused the messages: {exc}") from None


def _as_messages(text: Text, role: str) -> Messages:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def _tokenize(tokenizer: Any, texts: list[str], *, special: bool, rows: list[int] | None = None,
              where: str = "") -> list[list[int]]:
    """Token ids of ``texts``; a text the tokenizer refuses raises DataError naming its row."""
    if not texts:
        return []
    try:
        return list(tokenizer(texts, add_special_tokens=special)["input_ids"])
    except Exception:  # find the row the tokenizer refuses, one text at a time
        for i, text in enumerate(texts):
            try:
                tokenizer([text], add_special_tokens=special)
            except Exception as exc:
                row = rows[i] if rows else i + 1
                place = where.split(": ", 1)
                raise DataError(f"{place[0]}: row {row}: {place[1] if len(place) > 1 else 'text'}: "
                                f"the tokenizer cannot encode it ({type(exc).__name__}: {exc})") from None
        raise


def _check_roles(examples: list[Example], tokenizer: Any, where: str) -> None:
    """A ``tool`` message needs a chat template that knows tool messages."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tool" in template:
        return
    for ex in examples:
        for name, text in [("prompt", ex.prompt), *ex.completions.items()]:
            if isinstance(text, list) and any(isinstance(m, dict) and m.get("role") == "tool" for m in text):
                raise DataError(f"{where}: row {ex.row}: field {name!r} has a 'tool' message, but the tokenizer's "
                                "chat template does not render tool messages; use a model whose template does, "
                                "or drop the row")


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
    masks = {key: mask[: max(room, 0)] for key, mask in enc.masks.items()}
    example = TokenizedExample(enc.row, prompt, cut, dict(enc.columns), masks=masks)
    return Fitted(example, reasons, overlong)


# --------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------


def prepare_dataset(
    cfg: DataConfig,
    tokenizer: Any,
    kind: DataKind,
    *,
    registry: Any,
    split: Literal["train", "eval"] = "train",
    mismatched: bool = False,
    needed_by: str | None = None,
) -> TokenizedDataset:
    """Load, check, tokenize and fit one split of the recipe's data for an objective's data kind.

    ``split="eval"`` reads ``data.eval`` (or, when that is unset, the ``data.eval_split`` split
    of ``data.train``, which must then be a named or hub dataset, not a single file). A mixture
    (a list of sources) is prepared source by source, then mixed (:mod:`prefkit.data.mixture`).
    With ``data.eval: {from_train: F}`` both splits come from the training examples: the carved
    ones are the evaluation split and are left out of the training split.
    ``mismatched`` adds a ``mismatched`` completion to every example (see :func:`add_mismatched`).
    ``needed_by`` names the reader in a message about rows of the wrong TRL type (``"objective 'dpo'"``).
    """
    seed = cfg.seed or 0
    amount = getattr(cfg.eval, "from_train", None)  # data.eval: {from_train: ...}
    if amount is not None:
        examples, identities, report = _pool(cfg, tokenizer, kind, registry, "train", needed_by, seed)
        try:
            carved = carve(identities, amount, seed)
        except ValueError as exc:
            raise DataError(f"{report.source} ({report.split}): data.eval.from_train: {exc}") from None
        if split == "train":
            kept = [ex for ex, key in zip(examples, identities) if key not in carved]
            report = replace(report, rows_kept=len(kept), carved_for_eval=len(carved))
        else:
            first = {key: ex for key, ex in reversed(list(zip(identities, examples)))}
            kept = [first[key] for key in dict.fromkeys(identities) if key in carved]
            kept = kept[: cfg.max_eval_rows] if cfg.max_eval_rows else kept
            kept = [replace(ex, completions=dict(ex.completions), masks=dict(ex.masks)) for ex in kept]
            report = replace(report, split=f"{report.split}, carved for eval", rows_kept=len(kept),
                             carved_for_eval=len(carved), sources=[])
    else:
        kept, _, report = _pool(cfg, tokenizer, kind, registry, split, needed_by, seed)
    names = tuple(kind.completions)
    if mismatched:
        add_mismatched(kept, names[0], cfg.max_length)
        names += (MISMATCHED,)
    return TokenizedDataset(kept, report, names)


def _pool(cfg: DataConfig, tokenizer: Any, kind: DataKind, registry: Any, which: str, needed_by: str | None,
          seed: int) -> tuple[list[TokenizedExample], list[tuple[int, int]], DataReport]:
    """The examples of ``data.train`` or ``data.eval`` (one source, or the mixture of several), each
    with its identity ``(source index, row)``, and the report."""
    parts, is_mixture = _choose_parts(cfg, which)
    if not is_mixture:
        dataset = _prepare_part(parts[0], cfg, tokenizer, kind, registry, which, needed_by)
        return dataset.examples, [(0, ex.row) for ex in dataset.examples], dataset.report
    used = [(i, part) for i, part in enumerate(parts) if part.weight is None or part.weight > 0]
    prepared = [_prepare_part(part, cfg, tokenizer, kind, registry, which, needed_by) for _, part in used]
    weights = None if used[0][1].weight is None else [part.weight for _, part in used]
    limit = cfg.max_rows if which == "train" else cfg.max_eval_rows
    counts = mixture_counts([len(d) for d in prepared], weights, total=cfg.mix_rows if which == "train" else None,
                            cap=limit)
    examples: list[TokenizedExample] = []
    identities: list[tuple[int, int]] = []
    sources = []
    for (index, part), dataset, count in zip(used, prepared, counts):
        chosen = list(range(count)) if weights is None else pick(len(dataset), count, seed, index)
        # a repeated example is its own copy: the mismatched completion and the loop may change it
        examples += [replace(dataset.examples[j], completions=dict(dataset.examples[j].completions),
                             masks=dict(dataset.examples[j].masks)) for j in chosen]
        identities += [(index, dataset.examples[j].row) for j in chosen]
        sources.append({"source": dataset.report.source, "split": dataset.report.split, "weight": part.weight,
                        "examples": len(dataset), "used": count})
    if not examples:
        raise DataError(f"{cfg.label(which)}: the mixture has no examples (data.max_rows / data.mix_rows)")
    reports = [d.report for d in prepared]
    formats = sorted({r.format for r in reports})
    report = DataReport(
        source=" + ".join(r.source for r in reports),
        split=", ".join(dict.fromkeys(r.split for r in reports)),
        rows_read=sum(r.rows_read for r in reports),
        rows_kept=len(examples),
        rows_truncated=sum(r.rows_truncated for r in reports),
        rows_dropped_overlong=sum(r.rows_dropped_overlong for r in reports),
        rows_skipped_bad=sum(r.rows_skipped_bad for r in reports),
        format=formats[0] if len(formats) == 1 else "mixed",
        chat_template=any(r.chat_template for r in reports),
        kind=kind.name,
        sources=sources,
    )
    return examples, identities, report


def _prepare_part(part: Part, cfg: DataConfig, tokenizer: Any, kind: DataKind, registry: Any, which: str,
                  needed_by: str | None) -> TokenizedDataset:
    """Steps 1-4 for one source."""
    rows, shown = load_rows(part.source, part.split, subset=part.subset, registry=registry)
    rows = rows[: part.limit] if part.limit else rows
    where = f"{shown} ({part.split})"
    if not rows:
        raise DataError(f"{where}: the split has no rows")

    checked, fmt, found = check_source_rows(rows, kind, cfg.format, where, needed_by)
    chat = use_chat_template(tokenizer, cfg.chat_template, fmt, where,
                             plain_text=found.is_language_modeling and fmt == "standard")
    if checked.problems and cfg.bad_rows == "error":
        raise DataError(_bad_rows_message(where, checked.problems, kind.name))
    if checked.problems:
        log.warning("%s", _bad_rows_message(where, checked.problems, kind.name, skipped=True))

    if chat:
        _check_roles(checked.examples, tokenizer, where)
    if which == "train":
        from prefkit.data.positions import check_max_length

        check_max_length(cfg.max_length, tokenizer)
    encoded = encode_examples(checked.examples, tokenizer, chat, where)
    kept, truncated, dropped = _apply_truncation(encoded, cfg, where)
    raw_prompts = {ex.row: ex.prompt for ex in checked.examples}
    for example in kept:
        example.prompt = raw_prompts[example.row]  # so reward functions and samplers can see the text
    report = DataReport(
        source=shown,
        split=part.split,
        rows_read=len(rows),
        rows_kept=len(kept),
        rows_truncated=truncated,
        rows_dropped_overlong=dropped,
        rows_skipped_bad=checked.bad_rows,
        format=fmt,
        chat_template=chat,
        kind=kind.name,
    )
    if not kept:
        raise DataError(nothing_left_message(where, report.rows_read, report.rows_skipped_bad,
                                             report.rows_dropped_overlong, checked.problems))
    return TokenizedDataset(kept, report, tuple(kind.completions))


def check_source_rows(rows: list[dict], kind: DataKind, fmt_setting: str, where: str,
                      needed_by: str | None = None) -> tuple[CheckedRows, Format, RowType]:
    """Steps 2 of one source: its TRL type (rows of a type ``kind`` does not read are refused in
    one message), its format, and every row checked by ``kind``."""
    found = dataset_type(rows)
    mismatch = type_mismatch(found, kind, needed_by)
    if mismatch:
        raise DataError(f"{where}: {mismatch}")
    fmt: Format = detect_format(rows, kind.text_fields) if fmt_setting == "auto" else fmt_setting  # type: ignore[assignment]
    declared = bool(getattr(kind, "trl_types", ()))
    return check_rows(rows, kind, fmt, expected=found if declared else None), fmt, found


def add_mismatched(examples: list[TokenizedExample], source: str, max_length: int) -> None:
    """Give example ``i`` a ``mismatched`` completion: the ``source`` completion of example
    ``(i + 1) mod N``, cut to fit ``max_length`` after example ``i``'s prompt.

    KTO (Ethayarajh et al. 2024) estimates its reference point KL(pi || pi_ref) from such
    mismatched prompt/completion pairs. The pairing is fixed by the data, so the reference
    log-probs of these pairs are cached like any others.
    """
    n = len(examples)
    for i, example in enumerate(examples):
        other = examples[(i + 1) % n]
        room = max(max_length - len(example.prompt_ids), 1)
        example.completions[MISMATCHED] = list(other.completions[source][:room])
        if source in other.masks:
            example.masks[MISMATCHED] = list(other.masks[source][:room])


def _choose_parts(cfg: DataConfig, which: str) -> tuple[list[Part], bool]:
    """The sources of the train or the eval data, and whether they form a mixture."""
    if which == "train" or cfg.eval is not None:
        return source_parts(cfg, which)
    if not isinstance(cfg.train, str):
        raise DataError(f"{cfg.label()} ({cfg.eval_split}): no evaluation data: data.train is a mixture, so set "
                        "data.eval to an evaluation file, dataset or mixture, or carve one: data.eval: {from_train: 0.1}")
    if has_one_split(cfg.train):
        raise DataError(
            f"{cfg.train} ({cfg.eval_split}): no evaluation data: data.train has a single split (a file or a "
            "saved Dataset), so set data.eval to an evaluation file or dataset, or carve one: data.eval: "
            "{from_train: 0.1}"
        )
    return [Part(cfg.train, cfg.eval_split, cfg.subset, cfg.max_eval_rows, None)], False


def _choose_split(cfg: DataConfig, split: str) -> tuple[str, str, int | None]:
    """(source, split name, row limit) of a split read from one source, whose examples' ``row``
    numbers are that source's rows (a carved split's are its training source's)."""
    if split == "eval" and getattr(cfg.eval, "from_train", None) is not None:
        split = "train"
    parts, is_mixture = _choose_parts(cfg, split)
    if is_mixture:
        raise DataError(f"{cfg.label(split)}: a mixture of sources, where a single source is needed")
    return parts[0].source, parts[0].split, parts[0].limit


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
        raise DataError(listing(header, [f"row {row}: {reason}" for row, reason in too_long]))
    return kept, truncated, dropped


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _bad_rows_message(where: str, problems: list[tuple[int, str]], kind: str, *, skipped: bool = False) -> str:
    rows = len({row for row, _ in problems})
    lines = group_rows(problems)
    if not skipped and len(lines) == 1:
        return f"{where}: {lines[0]} (set data.bad_rows: skip to skip bad rows)"
    action = "skipped" if skipped else "found (set data.bad_rows: skip to skip them)"
    header = f"{where}: {rows} bad row(s) for {kind!r} data {action}"
    return listing(header, lines)


def nothing_left_message(where: str, rows_read: int, bad: int, overlong: int, problems: list[tuple[int, str]]) -> str:
    """Why a source left no examples: how many of its rows were bad or too long, and the bad rows."""
    header = f"{where}: no usable examples: {rows_read} rows read, {bad} bad, {overlong} too long"
    if overlong:
        header += " (see data.max_length, data.max_prompt_length and data.truncation)"
    return listing(header, group_rows(problems)) if problems else header


