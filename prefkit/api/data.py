"""Data contracts: a data kind (row schema, row checks, columns) and a named dataset.

A data kind turns one raw row (a dict read from JSONL, CSV, Parquet or the hub) into an
:class:`Example`: a prompt, named completions and extra columns, or says what is wrong with the
row. The engine does the rest the same way for every kind: chat template, tokenization,
truncation, collation (each named completion is one row of the batch, prompt + completion), and
the extra columns reach the objective as ``[B]`` tensors in ``LossInputs.columns``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

Format = Literal["standard", "conversational"]
Messages = list[dict[str, Any]]
Text = Union[str, Messages]  # a standard string or a conversational list of messages

# TRL's dataset types (https://huggingface.co/docs/trl/dataset_formats): name -> the fields a row of
# that type has. A data kind lists the types it reads in ``DataKind.trl_types``; rows of another
# type are refused with one message naming the type found and the types needed.
TRL_TYPES: dict[str, str] = {
    "language modeling": "text or messages",
    "prompt-only": "prompt",
    "prompt-completion": "prompt, completion",
    "preference": "prompt, chosen, rejected",
    "unpaired preference": "prompt, completion, label",
    "stepwise supervision": "prompt, completions, labels",
}


@dataclass
class Example:
    """One checked row, before tokenization. Texts are strings or lists of messages."""

    row: int  # 1-based row number in the source split (for messages)
    prompt: Text
    completions: dict[str, Text] = field(default_factory=dict)  # name -> answer, in the kind's order
    columns: dict[str, float | int | bool] = field(default_factory=dict)  # extra numeric columns


class DataKind(ABC):
    """A kind of data; subclass it and register an instance through ``register_data_kinds``.

    ``completions`` names the answers every example carries, in the order their rows appear in a
    batch. ``text_fields`` lists the row fields that hold text (used to tell the standard format
    from the conversational one). ``columns`` documents the extra columns, name -> meaning.
    ``trl_types`` names the :data:`TRL_TYPES` the kind reads (empty: not declared, rows of any
    type go to ``check_row``).

    In a conversational completion (a list of messages), only the ``assistant`` messages are
    learnt: the tokens of any other message inside it (a user turn between two answers) carry no loss.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    completions: ClassVar[tuple[str, ...]] = ()
    text_fields: ClassVar[tuple[str, ...]] = ("prompt",)
    columns: ClassVar[dict[str, str]] = {}
    trl_types: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def check_row(self, row_no: int, row: dict[str, Any], fmt: Format) -> tuple[Example | None, list[str]]:
        """One raw row -> ``(Example, [])``, or ``(None, problems)`` where each problem names the
        field (``"field 'label' should be true or false, got a string"``). Never raises for bad data.
        ``prefkit.data.rows`` has helpers for text fields, messages and numbers."""


@dataclass(frozen=True)
class NamedDataset:
    """A dataset registered by a plugin through the ``register_datasets`` hook."""

    name: str
    description: str
    files: dict[str, Path]  # split name -> local file
