"""The recipe file: one typed YAML document that says everything about a run.

``load_recipe`` reads the YAML safely, applies ``dotted.key=value`` overrides, validates the
document with pydantic models that refuse unknown keys, then looks the objective (and a
named model source) up in the plugin registry and validates their own parameter blocks.
Every problem is reported with the file and the key path; no model is loaded here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefkit.api.errors import RecipeError


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(Strict):
    """LoRA adapters through peft. The reference model is the base with the adapter disabled."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelConfig(Strict):
    source: str = Field(
        description="A named model source (see `prefkit models`), a local directory, or a hub id."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of a named model source."
    )
    gguf_file: str | None = Field(None, description="A GGUF file inside `source` to load.")
    tokenizer: str | None = Field(None, description="Load the tokenizer from here instead.")
    revision: str | None = None
    trust_remote_code: bool = False
    dropout: bool = Field(
        False,
        description="Keep the model's own dropout while training. Off by default (as TRL does for DPO and "
        "reward models), so the policy, its reference and its rollouts compute the same function; "
        "LoRA's own dropout is model.lora.dropout.",
    )
    lora: LoraConfig | None = None


class DataConfig(Strict):
    train: str = Field(description="A named dataset, a local JSONL/JSON/CSV/Parquet file, or a hub dataset.")
    train_split: str = "train"
    eval: str | None = None
    eval_split: str = "test"
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    format: Literal["auto", "standard", "conversational"] = "auto"
    chat_template: Literal["auto", "always", "never"] = "auto"
    max_length: int = Field(512, gt=1, description="Prompt plus completion, in tokens.")
    max_prompt_length: int | None = Field(256, gt=0)
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    max_rows: int | None = Field(None, gt=0)
    max_eval_rows: int | None = Field(None, gt=0)


class ObjectiveConfig(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RewardConfig(Strict):
    """A reward source: a registered reward function (see `prefkit rewards`) and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class SamplingConfig(Strict):
    """How completions are sampled from a policy (generation, best-of-N, evaluation)."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 means no top-k filtering.")
    num_samples: int = Field(1, gt=0, description="Completions per prompt.")
    batch_size: int = Field(16, gt=0, description="Sequences generated together.")
    seed: int | None = Field(None, description="Default: the recipe's seed.")


class TrainConfig(Strict):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch, over all processes (the global "
                            "batch; each of N processes takes batch_size / N).")
    grad_accum_steps: int = Field(1, gt=0)
    lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    final_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="The dtype of final/'s weights; auto: bf16 when training ran in bf16, else fp32."
    )
    reference_cache: bool = Field(True, description="Store reference log-probs on disk and reuse them.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers besides metrics.jsonl; off by default."
    )
    project: str = Field("prefkit", description="The trackers' project (wandb project, MLflow experiment).")


class Recipe(Strict):
    output_dir: str
    seed: int = 0
    cache_dir: str | None = Field(None, description="Default: $PREFKIT_CACHE or ~/.cache/prefkit.")
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    reward: RewardConfig | None = Field(None, description="The reward source, for objectives that need one.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("PREFKIT_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "prefkit"


@dataclass
class LoadedRecipe:
    """A validated recipe with its objective and its objective's validated params."""

    recipe: Recipe
    path: str
    objective: Any  # prefkit.api.objective.Objective
    params: Any  # the objective's Params instance
    model_options: Any  # the named model source's Params instance, or None
    reward_params: Any = None  # the reward function's Params instance, or None

    def resolved_dict(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json")
        data["objective"]["params"] = self.params.model_dump(mode="json")
        if self.model_options is not None:
            data["model"]["options"] = self.model_options.model_dump(mode="json")
        if self.reward_params is not None:
            data["reward"]["params"] = self.reward_params.model_dump(mode="json")
        return data


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for item in error.errors():
        path = _loc(item["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        out.append((path, message))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-5`` -> (["train", "lr"], 1e-05). The value is read as YAML."""
    if "=" not in text:
        raise RecipeError("override", [(text, "expected dotted.key=value")])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError("override", [(key, "expected dotted.key=value")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError("override", [(".".join(parts[: i + 1]), "is not a mapping")])
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    where = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(where, [("", "file not found")]) from None
    except OSError as exc:
        raise RecipeError(where, [("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(where, [(at, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(where, [("", "the recipe must be a mapping of keys to values")])
    return data


def _plugin_block(table: dict, name: str, raw: dict, where: str, *, kind: str, name_path: str,
                  params_path: str) -> tuple[Any, Any]:
    """Look ``name`` up among registered plugins and validate ``raw`` with its ``Params`` model.

    An unknown name is reported at ``name_path``, bad parameters under ``params_path``.
    """
    plugin = table.get(name)
    if plugin is None:
        known = ", ".join(sorted(table)) or "none"
        raise RecipeError(where, [(name_path, f"unknown {kind} {name!r}; registered: {known}")])
    try:
        return plugin, plugin.Params.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(where, _problems(exc, params_path)) from None


def validate_recipe(data: dict[str, Any], where: str, registry: Any) -> LoadedRecipe:
    """Validate a recipe document and its plugin parameter blocks against ``registry`` (a
    :class:`prefkit.plugins.Registry`). Raises RecipeError."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(where, _problems(exc)) from None

    objective, params = _plugin_block(registry.objectives, recipe.objective.name, recipe.objective.params, where,
                                      kind="objective", name_path="objective.name", params_path="objective.params")

    model_options = None
    if recipe.model.source in registry.model_sources:
        _, model_options = _plugin_block(registry.model_sources, recipe.model.source, recipe.model.options, where,
                                         kind="model source", name_path="model.source", params_path="model.options")
    elif recipe.model.options:
        raise RecipeError(
            where,
            [("model.options", f"only a named model source takes options; {recipe.model.source!r} is not one")],
        )
    reward_params = None
    if recipe.reward is not None:
        _, reward_params = _plugin_block(registry.reward_functions, recipe.reward.name, recipe.reward.params, where,
                                         kind="reward function", name_path="reward.name", params_path="reward.params")
    needs = objective.needs(params)
    if recipe.reward is None and needs.reward:
        raise RecipeError(where, [("reward", f"objective {objective.name!r} needs a reward source")])
    if needs.data not in registry.data_kinds:
        known = ", ".join(sorted(registry.data_kinds)) or "none"
        raise RecipeError(where, [("objective.name", f"objective {objective.name!r} needs data kind {needs.data!r}, "
                                                     f"which no plugin registers (data kinds: {known})")])
    return LoadedRecipe(recipe=recipe, path=where, objective=objective, params=params,
                        model_options=model_options, reward_params=reward_params)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *, registry: Any) -> LoadedRecipe:
    """Read, override and validate a recipe file. Raises RecipeError naming file and key paths."""
    data = read_yaml(path)
    try:
        data = apply_overrides(data, overrides or [])
    except RecipeError as exc:
        raise RecipeError(str(path), exc.problems) from None
    return validate_recipe(data, str(path), registry=registry)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
