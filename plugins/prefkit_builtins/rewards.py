"""Built-in reward functions, registered through the ``register_reward_functions`` hook.

- ``sentiment``: the gold scorer of the DPO paper's controlled-sentiment task, offline: the VADER
  lexicon's compound score of the completion, mapped to [0, 1].
- ``keywords``: a rule: the share (or count, or presence) of target words or characters in the
  completion.
- ``reward_model``: a trained Bradley-Terry reward model (a ``*ForSequenceClassification`` folder,
  such as a ``bt_reward`` run's ``final/``), scoring prompt + completion.

Papers: Rafailov et al. 2023, "Direct Preference Optimization" (https://arxiv.org/abs/2305.18290),
section 6.1 (controlled sentiment generation); Hutto & Gilbert 2014, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from prefkit.api import PrefkitError, hookimpl
from prefkit.api import RewardFunction, RewardParams

# --------------------------------------------------------------------------- sentiment


class SentimentParams(RewardParams):
    """No parameters."""


class SentimentScorer:
    """(compound + 1) / 2 of VADER's sentiment of each completion; the prompt is not read."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise PrefkitError(
                "reward function 'sentiment' needs the package vaderSentiment; run: pip install vaderSentiment"
            ) from None
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [(self.analyzer.polarity_scores(text)["compound"] + 1.0) / 2.0 for text in completions]


class Sentiment(RewardFunction):
    name = "sentiment"
    description = (
        "Gold sentiment of the completion (the DPO paper's controlled-sentiment task), offline: "
        "the VADER lexicon's compound score mapped to [0, 1]; 1 is most positive."
    )
    Params = SentimentParams

    def build(self, params: SentimentParams, *, cache_dir: Path, device: torch.device) -> SentimentScorer:
        return SentimentScorer()


# --------------------------------------------------------------------------- keywords


def words_of(text: str) -> list[str]:
    """Lowercased whitespace-separated words with leading and trailing punctuation stripped;
    words that were only punctuation are dropped. ``"Bee, tree!"`` -> ``["bee", "tree"]``."""
    words = (word.strip(string.punctuation) for word in text.lower().split())
    return [word for word in words if word]


def chars_of(text: str) -> list[str]:
    """Lowercased characters, whitespace excluded. ``"Bee tree"`` -> 7 characters."""
    return [ch for ch in text.lower() if not ch.isspace()]


class KeywordsParams(RewardParams):
    targets: list[str] = Field(min_length=1, description="The words (unit: word) or characters (unit: char) to reward.")
    unit: Literal["word", "char"] = Field("word", description="Count words or single characters.")
    mode: Literal["share", "count", "any"] = Field(
        "share", description="share: matches / units in the completion; count: matches; any: 1.0 if any match."
    )

    @field_validator("targets")
    @classmethod
    def _normalise(cls, targets: list[str]) -> list[str]:
        out = [t.lower() for t in targets]
        if any(not t.strip() for t in out):
            raise ValueError("a target is empty")
        return out

    @model_validator(mode="after")
    def _check_unit(self) -> KeywordsParams:
        if self.unit == "char":
            bad = [t for t in self.targets if len(t) != 1 or t.isspace()]
            if bad:
                raise ValueError(f"with unit 'char' every target is one non-space character; got {bad!r}")
        else:
            bad = [t for t in self.targets if words_of(t) != [t]]
            if bad:
                raise ValueError(f"with unit 'word' every target is one word without outer punctuation; got {bad!r}")
        return self


class KeywordsScorer:
    """Counts target units in each completion (see :class:`KeywordsParams`); the prompt is not read."""

    def __init__(self, params: KeywordsParams):
        self.targets = frozenset(params.targets)
        self.split = chars_of if params.unit == "char" else words_of
        self.mode = params.mode

    def score(self, completion: str) -> float:
        units = self.split(completion)
        matches = sum(unit in self.targets for unit in units)
        if self.mode == "count":
            return float(matches)
        if self.mode == "any":
            return 1.0 if matches else 0.0
        return matches / len(units) if units else 0.0

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [self.score(text) for text in completions]


class Keywords(RewardFunction):
    name = "keywords"
    description = (
        "A rule: the share (or count, or presence) of target words or characters in the completion; "
        "case-insensitive."
    )
    Params = KeywordsParams

    def build(self, params: KeywordsParams, *, cache_dir: Path, device: torch.device) -> KeywordsScorer:
        return KeywordsScorer(params)


# --------------------------------------------------------------------------- reward_model


class RewardModelParams(RewardParams):
    path: str = Field(
        description="A folder saved with AutoModelForSequenceClassification.save_pretrained plus its tokenizer "
        "(a bt_reward run's final/)."
    )
    batch_size: int = Field(16, gt=0, description="Sequences scored together.")
    max_length: int = Field(512, gt=1, description="Prompt plus completion, in tokens.")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="As data.chat_template when the reward model was trained."
    )


class RewardModelScorer:
    """A sequence classifier's score at the last token of prompt + completion, encoded as training data are."""

    accepts_messages = True  # a conversational prompt is rendered with the chat template, as in training

    def __init__(self, params: RewardModelParams, device: torch.device):
        from transformers import AutoModelForSequenceClassification

        from prefkit.models.loading import _user_errors, load_tokenizer
        from prefkit.recipe import ModelConfig

        folder = Path(params.path).expanduser()
        problem = folder_problem(params.path)
        if problem:
            raise PrefkitError(problem)
        self.params = params
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(ModelConfig(source=str(folder)), str(folder))
        with _user_errors("reward model", str(folder)):
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=torch.float32, trust_remote_code=False
            )
        if getattr(model.config, "num_labels", 1) != 1:
            raise PrefkitError(
                f"params.path: the model at {params.path!r} has {model.config.num_labels} labels; "
                "a reward model has one"
            )
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)

    def encode(self, prompts: list[Any], completions: list[str]) -> list[Any]:
        """TokenizedExamples (completion named ``chosen``) exactly as prefkit.data.prepare encodes training rows."""
        from prefkit.api import Example
        from prefkit.data.prepare import TokenizedExample, encode_examples, use_chat_template

        fmt = "conversational" if any(isinstance(p, list) for p in prompts) else "standard"
        where = f"reward model {self.params.path}"
        chat = use_chat_template(self.tokenizer, self.params.chat_template, fmt, where)
        examples = [Example(i + 1, prompt, {"chosen": completion}) for i, (prompt, completion) in
                    enumerate(zip(prompts, completions))]
        out = []
        for enc in encode_examples(examples, self.tokenizer, chat, where):
            prompt_ids, completion_ids = fit(enc.prompt, enc.completions["chosen"], self.params.max_length)
            out.append(TokenizedExample(enc.row, prompt_ids, {"chosen": completion_ids}))
        return out

    @torch.inference_mode()
    def __call__(self, prompts: list[Any], completions: list[str]) -> list[float]:
        from prefkit.data.batching import collate
        from prefkit.models.logprobs import sequence_rewards

        examples = self.encode(prompts, completions)
        # Longest first, so each batch pads little; the scores go back in the caller's order.
        order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].prompt_ids) + len(examples[i].completions["chosen"])))
        scores = [0.0] * len(examples)
        size = self.params.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            batch = collate([examples[i] for i in chunk], chunk, self.tokenizer.pad_token_id, ("chosen",))
            values = sequence_rewards(self.model, batch.to(self.device)).cpu().tolist()
            for i, value in zip(chunk, values):
                scores[i] = float(value)
        return scores


def fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt + completion to ``max_length`` tokens: the prompt keeps its last tokens (but never
    fewer than half the budget), the completion is cut at its end."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    prompt_room = max(max_length - len(completion), max_length // 2)
    prompt = prompt[-prompt_room:]
    return prompt, completion[: max_length - len(prompt)]


class RewardModel(RewardFunction):
    name = "reward_model"
    description = (
        "A trained Bradley-Terry reward model (a sequence classifier folder, e.g. a bt_reward run's final/): "
        "its score of prompt + completion."
    )
    Params = RewardModelParams

    def build(self, params: RewardModelParams, *, cache_dir: Path, device: torch.device) -> RewardModelScorer:
        return RewardModelScorer(params, device)

    def problems(self, params: RewardModelParams) -> list[str]:
        problem = folder_problem(params.path)
        return [problem] if problem else []


def folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be a reward model folder (a message opening with its params key), or None."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"params.path: no reward model folder at {path!r}"
    if not (folder / "config.json").is_file():
        return f"params.path: {path!r} is not a Hugging Face model folder (no config.json)"
    try:
        labels = len(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("id2label") or {0: ""})
    except (OSError, ValueError, AttributeError):
        return None  # loading it says what is wrong
    if labels != 1:
        return f"params.path: the model at {path!r} has {labels} labels; a reward model has one"
    return None


@hookimpl
def register_reward_functions(register):
    register(Sentiment())
    register(Keywords())
    register(RewardModel())
