"""``prefkit chat``: talk to a model through its chat template, turn by turn, with the conversation kept.

:func:`open_chat` finds the model (a run folder's ``final/`` or a checkpoint, a recipe's model, a
named model source, a local Hugging Face folder or a hub id) and returns a :class:`ChatSession`;
``session.send(text)`` returns the reply. The command line is a loop over ``send`` that reads stdin,
so everything here is testable without a terminal.

A model whose tokenizer has a chat template gets the whole conversation (system prompt, every user
message and every reply) through the template at every turn. A model without one is continued as
plain text: the conversation is one running text, each message appended to it on a new line and
continued by the model.

Replies are sampled with :func:`prefkit.models.sampling.generate`, so turn ``t`` with seed ``s`` is
drawn from the random numbers of ``(s + t, 0, 0)``: the same seed and messages give the same replies.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from prefkit.api.errors import PrefkitError
from prefkit.recipe import SEED_LIMIT, SamplingConfig

OPTION_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                "top_k": "--top-k", "seed": "--seed"}


@dataclass
class ChatModel:
    """What :func:`open_chat` talks to."""

    model: torch.nn.Module
    tokenizer: Any
    label: str  # where it came from, in words ("runs/x/final", "runs/x checkpoint step-12", ...)


@dataclass
class ChatSession:
    """One conversation with a model. ``send(text)`` adds a user message and returns the reply;
    ``reset()`` forgets every message but the system prompt."""

    model: torch.nn.Module
    tokenizer: Any
    sampling: SamplingConfig
    seed: int
    system: str | None = None
    label: str = "model"
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation, system prompt first
    transcript: str = ""  # without a chat template: the running text
    turns: int = 0  # replies given since the start (not reset: each turn draws fresh random numbers)
    last_prompt_ids: list[int] = field(default_factory=list)  # what the model saw at the last turn
    notes: list[str] = field(default_factory=list)  # what the user should know about the last turn

    def __post_init__(self) -> None:
        self.reset()

    @property
    def templated(self) -> bool:
        """The tokenizer has a chat template (else the conversation is continued as plain text)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def max_prompt_tokens(self) -> int | None:
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return positions - self.sampling.max_new_tokens if isinstance(positions, int) else None

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript = self.system if self.system and not self.templated else ""
        self.last_prompt_ids = []

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids the model continues for a new user message ``text`` (history included),
        dropping the oldest turns (then the message's start) when they would not fit."""
        self.notes = []
        limit = self.max_prompt_tokens
        if self.templated:
            messages = [*self.messages, {"role": "user", "content": text}]
            ids = self._ids(messages)
            dropped = 0
            first = 1 if self.system else 0
            while limit is not None and len(ids) > limit and len(messages) - first > 1:
                del messages[first:first + 2]  # the oldest user message and its reply
                dropped += 1
                ids = self._ids(messages)
            if dropped:
                self.notes.append(f"the conversation is longer than the model's context: the {dropped} oldest "
                                  "turn(s) were left out")
                self.messages = messages[:-1]
        else:
            ids = self.tokenizer((self.transcript + "\n" if self.transcript else "") + text,
                                 add_special_tokens=False).input_ids
        if limit is not None and len(ids) > limit:
            self.notes.append(f"the prompt is longer than the model's context: only its last {limit} tokens were used")
            ids = ids[-limit:]
        return ids

    def send(self, text: str) -> str:
        """The model's reply to the user message ``text``; both join the conversation."""
        from prefkit.models.sampling import generate

        ids = self.prompt_ids(text)
        if not ids:
            raise PrefkitError("the message has no tokens")
        self.last_prompt_ids = ids
        sample = generate(self.model, self.tokenizer, [ids], self.sampling, seed=(self.seed + self.turns) % SEED_LIMIT,
                          num_samples=1)[0][0]
        self.turns += 1
        reply = sample.text
        if self.templated:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        else:
            self.transcript = (self.transcript + "\n" if self.transcript else "") + text + reply
        return reply


def sampling_settings(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> SamplingConfig:
    """The sampling block of a chat, checked as a recipe's would be (errors name the option)."""
    try:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    except ValidationError as exc:
        item = exc.errors()[0]
        name = OPTION_NAMES.get(str(item["loc"][0]), str(item["loc"][0]))
        raise PrefkitError(f"{name}: {item['msg']}") from None


def _looks_like_a_path(source: str) -> bool:
    path = Path(source).expanduser()
    return source.startswith((".", "/", "~")) or path.suffix in (".yaml", ".yml") or \
        (len(path.parts) > 1 and path.parent.is_dir())


def _refuse_a_reward_model(folder: Path, label: str) -> None:
    from prefkit.models.loading import classifier_architecture

    architecture = classifier_architecture(folder)
    if architecture is not None:
        raise PrefkitError(f"{label} is a reward model (a sequence classifier: {architecture}); it scores "
                           "texts and cannot chat")


def find_chat_model(source: str, *, step: int | None = None, registry: Any, cache_dir: Path | None = None) -> ChatModel:
    """Load what ``source`` names for chatting:

    - a run folder (it holds ``recipe.resolved.yaml``): its ``final/``, else its newest checkpoint
      (``step`` picks a checkpoint);
    - a recipe file: its model (``model`` block, with its options);
    - a named model source (``prefkit models``), a local Hugging Face folder or a hub id.
    """
    from prefkit.models.loading import load_model
    from prefkit.recipe import ModelConfig, cache_dir_of

    cache = Path(cache_dir) if cache_dir is not None else cache_dir_of(None)
    path = Path(source).expanduser()
    if (path / "recipe.resolved.yaml").is_file():
        if step is None and (path / "final" / "config.json").is_file():
            _refuse_a_reward_model(path / "final", f"{source}/final")
            handle = load_model(ModelConfig(source=str(path / "final")), None, cache, head="lm", registry=registry)
            return ChatModel(handle.model, handle.tokenizer, str(Path(source) / "final"))
        from prefkit.loops.checkpoint import step_folders
        from prefkit.loops.export import load_checkpoint_model

        if step is None and not step_folders(path):  # a damaged one is named by load_checkpoint_model
            raise PrefkitError(f"{source} is a run folder with neither a final/ model nor a checkpoint to chat with "
                               "(the run has not finished, and it keeps checkpoints only with train.save_every)")
        found = load_checkpoint_model(path, step, registry=registry)
        if found.handle.model is found.model and found.loaded.objective.needs(found.loaded.params).head == "scalar":
            raise PrefkitError(f"{source} trains a reward model ({found.loaded.objective.name}); it scores texts "
                               "and cannot chat")
        return ChatModel(found.policy, found.handle.tokenizer, f"{source} checkpoint step-{found.step}")
    if step is not None:
        raise PrefkitError(f"--step {step}: {source} is not a run folder (no recipe.resolved.yaml); --step picks "
                           "a checkpoint of a run")
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from prefkit.recipe import load_recipe

        loaded = load_recipe(path, registry=registry)
        recipe = loaded.recipe
        handle = load_model(recipe.model.model_copy(update={"lora": None}), loaded.model_options,
                            recipe.resolved_cache_dir(), head="lm", registry=registry)
        return ChatModel(handle.model, handle.tokenizer, f"{source}'s model {recipe.model.source}")
    if path.is_dir():
        if (path / "config.json").is_file():
            _refuse_a_reward_model(path, source)
        elif (path / "final").is_dir() or (path / "checkpoints").is_dir():
            raise PrefkitError(f"{source} looks like a run folder but has no recipe.resolved.yaml; point at its "
                               "final/ (or an exported checkpoint) instead")
    elif path.exists():
        raise PrefkitError(f"{source} is a file: pass a run folder, a recipe (.yaml), a model folder, a named "
                           "model source (`prefkit models`) or a hub id")
    elif source not in registry.model_sources and _looks_like_a_path(source):
        raise PrefkitError(f"{source}: no such run or model folder (see `prefkit models` for named sources)")
    elif source not in registry.model_sources and "/" not in source:
        from prefkit.inputs import closest

        meant = closest(source, registry.model_sources, cutoff=0.75)
        if meant is not None:
            raise PrefkitError(f"{source!r} is not a named model source, a folder or a hub id (org/name); did you "
                               f"mean {meant!r}? (`prefkit models` lists them)")
    handle = load_model(ModelConfig(source=source), None, cache, head="lm", registry=registry)
    return ChatModel(handle.model, handle.tokenizer, source)


def open_chat(source: str, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
              top_p: float = 0.9, top_k: int = 0, seed: int | None = None, step: int | None = None,
              registry: Any = None, cache_dir: Path | None = None) -> ChatSession:
    """A :class:`ChatSession` with the model ``source`` names (see :func:`find_chat_model`), on the GPU
    when there is one. ``seed=None`` draws one (``session.seed`` says which)."""
    if registry is None:
        from prefkit.plugins import load_registry

        registry = load_registry()
    sampling = sampling_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise PrefkitError(f"--seed {seed}: use a number in [0, {SEED_LIMIT})")
    found = find_chat_model(source, step=step, registry=registry, cache_dir=cache_dir)
    positions = getattr(found.model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_new_tokens >= positions:
        raise PrefkitError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in the model's "
                           f"{positions} positions")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = found.model.to(device).eval()
    return ChatSession(model, found.tokenizer, sampling, secrets.randbelow(SEED_LIMIT) if seed is None else seed,
                       system=system, label=found.label)
