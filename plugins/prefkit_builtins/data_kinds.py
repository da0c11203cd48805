"""The built-in data kinds: ``pairs``, ``sft``, ``prompts`` and ``unpaired``.

Each reads TRL's column names, in the standard (strings) or conversational (lists of
role/content messages) format:

- ``pairs``: ``prompt``, ``chosen``, ``rejected`` and an optional numeric ``margin``. A row
  may leave ``prompt`` out: the messages (or, in standard rows, the text up to a word boundary)
  ``chosen`` and ``rejected`` share at the start are the prompt (TRL's implicit prompt).
- ``sft``: ``prompt`` and ``completion`` (or pair data's ``chosen``); the answer is named
  ``chosen``. Also TRL's language-modeling rows: ``text`` (the whole text is the answer, after
  an empty prompt; never put through a chat template) or ``messages`` (a conversation: the
  messages before the first assistant message are the prompt, the rest is the answer, of which
  only the assistant messages are learnt).
- ``prompts``: ``prompt`` (or pair data's implicit prompt); online objectives and sampling.
- ``unpaired``: ``prompt``, ``completion`` and ``label`` (true: desirable, false: undesirable), as
  TRL's unpaired preference type; the label reaches the objective as the ``label`` column (1.0 / 0.0).
"""

from __future__ import annotations

from typing import Any

from prefkit.api import DataKind, Example, Format, hookimpl
from prefkit.data.rows import check_bool, check_number, check_text, split_implicit_prompt, split_implicit_text


def _texts(row: dict[str, Any], keys: list[str], fmt: Format) -> tuple[dict[str, Any], list[str]]:
    problems = [p for key in keys if (p := check_text(row, key, fmt))]
    return ({key: row[key] for key in keys} if not problems else {}), problems


class Pairs(DataKind):
    name = "pairs"
    description = "Preference pairs: prompt, chosen, rejected (explicit or implicit prompt)."
    completions = ("chosen", "rejected")
    text_fields = ("prompt", "chosen", "rejected")
    columns = {"margin": "How much more chosen is preferred (Bradley-Terry margin); optional, numeric."}
    trl_types = ("preference",)

    def check_row(self, row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        implicit = row.get("prompt") is None and row.get("chosen") is not None and row.get("rejected") is not None
        texts, problems = _texts(row, ["chosen", "rejected"] if implicit else ["prompt", "chosen", "rejected"], fmt)
        columns: dict[str, float] = {}
        if row.get("margin") is not None:
            margin, problem = check_number(row["margin"], "margin")
            if problem:
                problems.append(problem)
            else:
                columns["margin"] = margin
        if problems:
            return None, problems
        if texts["chosen"] == texts["rejected"]:
            return None, ["fields 'chosen' and 'rejected' are identical"]
        if implicit:
            split = split_implicit_prompt if fmt == "conversational" else split_implicit_text
            texts, problems = split(texts["chosen"], texts["rejected"])
            if problems:
                return None, problems
        return Example(row_no, texts["prompt"], {"chosen": texts["chosen"], "rejected": texts["rejected"]},
                       columns), []


class SFT(DataKind):
    name = "sft"
    description = ("Prompt and completion (or pair data's chosen answer, or language-modeling text or messages): "
                   "supervised fine-tuning.")
    completions = ("chosen",)
    text_fields = ("prompt", "completion", "chosen", "text", "messages")
    trl_types = ("prompt-completion", "preference", "language modeling")

    def check_row(self, row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        if all(row.get(key) is None for key in ("prompt", "completion", "chosen", "rejected")):
            if row.get("messages") is not None:
                return self._conversation(row_no, row, fmt)
            if row.get("text") is not None:
                problem = check_text(row, "text", fmt)
                return (None, [problem]) if problem else (Example(row_no, "", {"chosen": row["text"]}), [])
        answer = "chosen" if "completion" not in row and "chosen" in row else "completion"
        if answer == "chosen" and row.get("prompt") is None and "rejected" in row:
            pair, problems = Pairs().check_row(row_no, row, fmt)  # pair data with an implicit prompt
            return (None, problems) if pair is None else (Example(row_no, pair.prompt,
                                                                  {"chosen": pair.completions["chosen"]}), [])
        texts, problems = _texts(row, ["prompt", answer], fmt)
        if problems:
            return None, problems
        return Example(row_no, texts["prompt"], {"chosen": texts[answer]}), []

    @staticmethod
    def _conversation(row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        """A ``messages`` row: the messages before the first assistant message are the prompt."""
        problem = check_text(row, "messages", fmt)
        if problem:
            return None, [problem]
        messages = row["messages"]
        first = next((i for i, message in enumerate(messages) if message["role"] == "assistant"), None)
        if first is None:
            return None, ["field 'messages' has no assistant message to learn"]
        if first == 0:
            return None, ["field 'messages' starts with an assistant message; the conversation needs a system or "
                          "user message before the first answer"]
        return Example(row_no, messages[:first], {"chosen": messages[first:]}), []


class Prompts(DataKind):
    name = "prompts"
    description = "Prompts only (online objectives, sampling, evaluation)."
    completions = ()
    text_fields = ("prompt", "chosen", "rejected")
    trl_types = ("prompt-only", "prompt-completion", "preference", "unpaired preference")

    def check_row(self, row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        if row.get("prompt") is None and row.get("chosen") is not None and row.get("rejected") is not None:
            pair, problems = Pairs().check_row(row_no, row, fmt)  # pair data with an implicit prompt
            return (None, problems) if pair is None else (Example(row_no, pair.prompt), [])
        texts, problems = _texts(row, ["prompt"], fmt)
        if problems:
            return None, problems
        return Example(row_no, texts["prompt"]), []


class Unpaired(DataKind):
    name = "unpaired"
    description = "Unpaired preferences: prompt, completion and a desirable (true) / undesirable (false) label."
    completions = ("completion",)
    text_fields = ("prompt", "completion")
    columns = {"label": "1.0 for a desirable completion, 0.0 for an undesirable one (TRL's boolean `label`)."}
    trl_types = ("unpaired preference",)

    def check_row(self, row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        texts, problems = _texts(row, ["prompt", "completion"], fmt)
        label, problem = check_bool(row.get("label"), "label")
        if problem:
            problems.append(problem)
        if problems:
            return None, problems
        return Example(row_no, texts["prompt"], {"completion": texts["completion"]}, {"label": float(label)}), []


@hookimpl
def register_data_kinds(register):
    for kind in (Pairs(), SFT(), Prompts(), Unpaired()):
        register(kind)
