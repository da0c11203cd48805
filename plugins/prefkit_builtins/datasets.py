"""The small datasets shipped with prefkit, registered through the ``register_datasets`` hook.

Their JSONL files live next to this module in ``data/``; use them by name in a recipe
(``data: {train: tiny-prefs}``) or list them with ``prefkit datasets``.
"""

from __future__ import annotations

from pathlib import Path

from prefkit.api import NamedDataset, hookimpl

DATA_DIR = Path(__file__).parent / "data"

SHIPPED = [
    NamedDataset(
        name="quickstart-prefs",
        description="Everyday questions with a helpful (chosen) and an unhelpful or rude (rejected) answer.",
        files={"train": DATA_DIR / "quickstart_train.jsonl", "test": DATA_DIR / "quickstart_test.jsonl"},
    ),
    NamedDataset(
        name="quickstart-unpaired",
        description="The quickstart preference set unpaired for KTO (prompt/completion/label): each pair gives a "
        "desirable and an undesirable row (train 520, test 80).",
        files={"train": DATA_DIR / "quickstart_unpaired_train.jsonl",
               "test": DATA_DIR / "quickstart_unpaired_test.jsonl"},
    ),
    NamedDataset(
        name="tiny-prefs",
        description="A tiny standard-format preference set (prompt/chosen/rejected strings), for tests and CI.",
        files={"train": DATA_DIR / "tiny_train.jsonl", "test": DATA_DIR / "tiny_test.jsonl"},
    ),
    NamedDataset(
        name="tiny-unpaired",
        description="The tiny preference set unpaired for KTO (prompt/completion/label): each pair gives a "
        "desirable and an undesirable row, 96 in all, alternating, no two neighbours sharing a prompt.",
        files={"train": DATA_DIR / "tiny_unpaired_train.jsonl"},
    ),
    NamedDataset(
        name="tiny-prefs-chat",
        description="The tiny preference set in conversational format (lists of role/content messages).",
        files={"train": DATA_DIR / "tiny_chat_train.jsonl"},
    ),
    NamedDataset(
        name="sentiment-prompts",
        description="120 hand-written movie-review openings (prompt only) for the controlled-sentiment "
        "experiment: train 100, test 20.",
        files={"train": DATA_DIR / "sentiment_prompts_train.jsonl", "test": DATA_DIR / "sentiment_prompts_test.jsonl"},
    ),
    NamedDataset(
        name="tiny-sft",
        description="A tiny prompt/completion set for supervised fine-tuning.",
        files={"train": DATA_DIR / "tiny_sft_train.jsonl"},
    ),
]


@hookimpl
def register_datasets(register):
    for dataset in SHIPPED:
        register(dataset)
