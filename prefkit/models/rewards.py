"""Reward functions: texts in, scores out.

A reward function is registered by a plugin through the ``register_reward_functions`` hook (the
built-in ``sentiment``, ``keywords`` and ``reward_model`` are registered by
``prefkit_builtins.rewards`` exactly like a third-party one). In a recipe it is named under
``reward:`` with its parameters, which its own :class:`RewardParams` model validates::

    reward:
      name: keywords
      params: {targets: ["e"], unit: char}

:meth:`RewardFunction.build` turns validated parameters into a :class:`Scorer`: a callable that
takes a batch of prompts and completions and returns one float per completion, deterministically.
PPO, best-of-N, pair labelling and the evaluators all call scorers the same way, through
:func:`build_reward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from prefkit.api import PrefkitError, RewardParams, Scorer

if TYPE_CHECKING:
    from prefkit.recipe import RewardConfig


def prompt_text(prompt: Any) -> str:
    """A raw prompt as plain text for a scorer.

    A string is returned as is. A list of role/content messages gives the content of its last
    ``user`` message (the question the completion answers; for a single-turn prompt, the whole
    prompt), or of its last message when no message has the role ``user``. Scorers that need the
    whole conversation set ``accepts_messages = True`` and get the messages themselves.
    """
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        messages = [m for m in prompt if isinstance(m, dict)]
        if not messages:
            return ""
        users = [m for m in messages if m.get("role") == "user"]
        return str((users or messages)[-1].get("content", ""))
    raise TypeError(f"a prompt is a string or a list of messages, not {type(prompt).__name__}")


class CheckedScorer:
    """What :func:`build_reward` returns: the plugin's scorer, with its inputs and outputs checked.

    It takes raw prompts (strings or lists of messages) as well as plain strings: they are turned
    into text with :func:`prompt_text` unless the inner scorer ``accepts_messages``. Its answer is
    checked to hold one finite number per completion, and returned as a list of floats.
    """

    def __init__(self, name: str, inner: Scorer, label: str | None = None):
        self.name = name
        self.inner = inner
        self.label = label or f"reward function {name!r}"  # with its plugin and distribution, for messages
        self.accepts_messages = True

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not completions:
            return []
        if getattr(self.inner, "accepts_messages", False):
            shown = list(prompts)
        else:
            shown = [prompt_text(p) for p in prompts]
        from prefkit.plugins import PluginError, _describe, _where

        try:
            scores = self.inner(shown, list(completions))
            if isinstance(scores, torch.Tensor):
                scores = scores.detach().float().cpu().reshape(-1).tolist()
            scores = [float(s) for s in scores]
        except PrefkitError:
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{self.label}: scoring {len(completions)} completion(s) failed: "
                              f"{_describe(exc)}{_where(exc)}; report it to the plugin's authors") from exc
        if len(scores) != len(completions):
            raise PluginError(f"{self.label} returned {len(scores)} scores for {len(completions)} completions")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise PluginError(f"{self.label} returned a non-finite score for completion {bad[0]} ({scores[bad[0]]})")
        return scores


def build_reward(
    cfg: RewardConfig,
    params: RewardParams | None,
    *,
    cache_dir: Path,
    device: torch.device | str = "cpu",
    registry: Any,
    key: str = "reward",
) -> CheckedScorer:
    """Build the scorer a recipe's ``reward:`` block names.

    ``params`` is the already validated ``Params`` instance (``LoadedRecipe.reward_params``);
    with ``None`` the block's raw ``params`` are validated here. An unknown reward function or
    bad parameters raise :class:`~prefkit.api.errors.PrefkitError`, named by ``key`` (the block's key
    path: ``reward``, ``evaluation.gold``, ...), as is a problem the reward function's ``build`` reports
    in a message starting ``params.``.
    """
    from prefkit.inputs import did_you_mean
    from prefkit.plugins import plugin_errors, plugin_label

    function = registry.reward_functions.get(cfg.name)
    if function is None:
        known = ", ".join(sorted(registry.reward_functions)) or "none"
        raise PrefkitError(f"{key}.name: unknown reward function {cfg.name!r}"
                           f"{did_you_mean(cfg.name, registry.reward_functions)}; registered: {known}")
    if params is None:
        try:
            params = function.Params.model_validate(cfg.params)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PrefkitError(f"{key}.params{'.' + where if where else ''}: {first['msg']}") from None
    try:
        with plugin_errors(registry, "reward_functions", cfg.name, "building the scorer"):
            scorer = function.build(params, cache_dir=Path(cache_dir), device=torch.device(device))
    except PrefkitError as exc:
        if not str(exc).startswith("params."):
            raise
        if key.startswith("--"):  # a command-line option: --reward's --reward-param
            raise PrefkitError(f"{key}-param {str(exc).removeprefix('params.')}") from None
        raise PrefkitError(f"{key}.{exc}") from None
    if not callable(scorer):
        raise PrefkitError(f"{plugin_label(registry, 'reward_functions', cfg.name)}: build() returned "
                           f"{type(scorer).__name__}, not a scorer (a callable); report it to the plugin's authors")
    return CheckedScorer(cfg.name, scorer, plugin_label(registry, "reward_functions", cfg.name))
