"""The recipe file: one typed YAML document that says everything about a run.

``load_recipe`` reads the YAML safely, applies ``dotted.key=value`` overrides, validates the
document with pydantic models that refuse unknown keys, then looks the objective (and a
named model source) up in the plugin registry and validates their own parameter blocks.
Every problem is reported with the file and the key path; no model is loaded here.

Numbers are bounded (a learning rate is positive and finite, Adam's betas lie in [0, 1), a
seed fits every random generator, ...), infinite and NaN values are refused anywhere in the
document, a key written twice is refused, and an unknown key or name gets a "did you mean".
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from prefkit.api.errors import RecipeError
from prefkit.api.params import NumbersAreNumbers, annotation_members
from prefkit.inputs import (
    InputError,
    check_readable_file,
    check_shape,
    closest,
    did_you_mean,
    exists,
    load_yaml,
    path_problem,
    read_text,
    value_problems,
)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


# Bounds far beyond any sensible run, that stop a typo (an extra zero, a wrong unit) from hanging a machine.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_TOKENS = 1_048_576
SEED_LIMIT = 2**32  # numpy's generators take seeds in [0, 2**32)
MAX_RECIPE_BYTES = 16 * 1024 * 1024


class Strict(NumbersAreNumbers):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraConfig(Strict):
    """LoRA adapters through peft. The reference model is the base with the adapter disabled."""

    r: int = Field(8, gt=0, le=4096)
    alpha: int = Field(16, gt=0, le=1_000_000)
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

    @field_validator("source", "gguf_file", "tokenizer", "revision")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value


class MixSource(Strict):
    """One source of a mixture (``data.train`` or ``data.eval`` as a list of these)."""

    source: str = Field(description="A named dataset, a local file or folder, or a hub dataset.")
    weight: float | None = Field(None, ge=0, description="Its share of the mixture's examples (weights are "
                                 "normalised by their sum); give every source a weight, or none (concatenation).")
    split: str | None = Field(None, description="Default: data.train_split (data.eval_split in data.eval).")
    subset: str | None = Field(None, description="Hub dataset configuration name. Default: data.subset.")
    max_rows: int | None = Field(None, gt=0, description="Read only the first N rows of this source.")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name a dataset or a file")
        return value


class FromTrain(Strict):
    """An evaluation split carved from the training examples: ``data.eval: {from_train: 0.1}``."""

    from_train: int | float = Field(description="A fraction in (0, 1) of the training examples, or a number of them "
                                    "(an integer >= 1); seeded by data.seed, and never trained on.")

    @field_validator("from_train", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"should be a fraction in (0, 1) or a number of examples, got {value!r}")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"is {value}; carve at least 1 example (or give a fraction in (0, 1))")
        elif not 0.0 < value < 1.0:
            raise ValueError(f"is {value}; a fraction must lie strictly between 0 and 1 (or give a whole number "
                             "of examples, e.g. 50)")
        return value


def _source_kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "<mixture>"
    if isinstance(value, (dict, FromTrain)):
        return "<from_train>"
    return "<name>"


def _check_mixture(value: Any) -> Any:
    """A list of sources: not empty, weights for every source or for none, weights not all 0."""
    if not isinstance(value, list):
        return value
    if not value:
        raise ValueError("is an empty list; name at least one source")
    weighted = [entry.weight is not None for entry in value]
    if any(weighted) and not all(weighted):
        missing = ", ".join(str(i) for i, given in enumerate(weighted) if not given)
        raise ValueError(f"source(s) {missing} have no weight; give every source a weight (the mixture's "
                         "proportions), or none (every example of every source, concatenated)")
    if all(weighted) and sum(entry.weight for entry in value) <= 0:
        raise ValueError("the weights are all 0; give at least one source a weight above 0")
    return value


# A data source: a name or path, or a mixture (a list of sources). Tags name the union's members
# in pydantic's error paths; _problems drops them (they are not keys a user writes).
Sources = Annotated[typing.Union[Annotated[str, Tag("<name>")], Annotated[list[MixSource], Tag("<mixture>")]],
                    Discriminator(_source_kind)]
EvalSources = Annotated[typing.Union[Annotated[str, Tag("<name>")], Annotated[list[MixSource], Tag("<mixture>")],
                                     Annotated[FromTrain, Tag("<from_train>")]], Discriminator(_source_kind)]


class DataConfig(Strict):
    train: Sources = Field(description="A named dataset, a local JSONL/JSON/CSV/Parquet file or dataset folder, a "
                           "hub dataset, or a mixture: a list of {source, weight, split, subset, max_rows}.")
    train_split: str = "train"
    eval: EvalSources | None = Field(None, description="Resolved like train; or {from_train: F} to carve F "
                                     "(a fraction, or a number of examples) of the training examples.")
    eval_split: str = "test"
    mix_rows: int | None = Field(None, gt=0, le=100_000_000, description="Examples in a weighted training "
                                 "mixture; default: the most the weights allow without repeating an example.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Seeds the mixture's and the carved "
                             "split's choices; default: the recipe's seed.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    format: Literal["auto", "standard", "conversational"] = "auto"
    chat_template: Literal["auto", "always", "never"] = "auto"
    max_length: int = Field(512, gt=1, le=MAX_TOKENS, description="Prompt plus completion, in tokens.")
    max_prompt_length: int | None = Field(256, gt=0, le=MAX_TOKENS)
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    max_rows: int | None = Field(None, gt=0)
    max_eval_rows: int | None = Field(None, gt=0)

    @field_validator("train", "eval")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name a dataset or a file")
        return _check_mixture(value)

    @model_validator(mode="after")
    def _prompt_room(self) -> "DataConfig":
        explicit = "max_prompt_length" in self.model_fields_set and self.max_prompt_length is not None
        if explicit and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length {self.max_prompt_length} leaves no room for the completion within "
                             f"max_length {self.max_length}; make it smaller than max_length")
        return self

    @model_validator(mode="after")
    def _mix_rows(self) -> "DataConfig":
        if self.mix_rows is not None and not (isinstance(self.train, list) and self.train[0].weight is not None):
            raise ValueError("data.mix_rows sets the size of a weighted mixture, but data.train is not one "
                             "(a list of sources, each with a weight)")
        return self

    def draws(self) -> bool:
        """Whether the data makes seeded choices: a weighted mixture, or an evaluation split carved from train."""
        weighted = any(isinstance(v, list) and v[0].weight is not None for v in (self.train, self.eval))
        return weighted or isinstance(self.eval, FromTrain)

    def label(self, which: str = "train") -> str:
        """``data.train`` (or ``data.eval``) as messages show it: the source, or the mixture's sources."""
        value = self.train if which == "train" else self.eval
        if isinstance(value, FromTrain):
            return f"{value.from_train} of {self.label('train')}"
        if isinstance(value, list):
            return " + ".join(entry.source if entry.weight is None else f"{entry.source} ({entry.weight:g})"
                              for entry in value)
        return str(value)

    def source_names(self) -> list[tuple[str, str]]:
        """Every source named in train and eval: ``(key path, source)``."""
        out: list[tuple[str, str]] = []
        for key in ("train", "eval"):
            value = getattr(self, key)
            if isinstance(value, str):
                out.append((f"data.{key}", value))
            elif isinstance(value, list):
                out += [(f"data.{key}.{i}.source", entry.source) for i, entry in enumerate(value)]
        return out


class ObjectiveConfig(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RewardConfig(Strict):
    """A reward source: a registered reward function (see `prefkit rewards`) and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class SamplingConfig(Strict):
    """How completions are sampled from a policy (generation, best-of-N, evaluation)."""

    max_new_tokens: int = Field(64, gt=0, le=MAX_TOKENS)
    min_new_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="No end token before this many new tokens "
                                "(benchmarks use it to make every completion the same length).")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 means no top-k filtering.")
    num_samples: int = Field(1, gt=0, le=MAX_BATCH, description="Completions per prompt.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Sequences generated together.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Default: the recipe's seed.")

    @model_validator(mode="after")
    def _lengths(self) -> "SamplingConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} is more than max_new_tokens "
                             f"{self.max_new_tokens}")
        return self


class TrainConfig(Strict):
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0, le=1_000_000)
    batch_size: int = Field(4, gt=0, le=MAX_BATCH, description="Examples per micro-batch, over all processes (the "
                            "global batch; each of N processes takes batch_size / N).")
    grad_accum_steps: int = Field(1, gt=0, le=MAX_BATCH)
    lr: float = Field(5e-6, gt=0, le=10.0)
    weight_decay: float = Field(0.0, ge=0, le=100.0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, le=1.0)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass: less memory, about a third "
        "more compute; turns off padding-free packing.")
    log_every: int = Field(1, gt=0, le=MAX_STEPS)
    eval_every: int | None = Field(None, gt=0, le=MAX_STEPS)
    save_every: int | None = Field(None, gt=0, le=MAX_STEPS)
    keep_checkpoints: int = Field(2, gt=0, le=10_000)
    final_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="The dtype of final/'s weights; auto: bf16 when training ran in bf16, else fp32."
    )
    reference_cache: bool = Field(True, description="Store reference log-probs on disk and reuse them.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers besides metrics.jsonl; off by default."
    )
    project: str = Field("prefkit", description="The trackers' project (wandb project, MLflow experiment).")

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        for name, beta in zip(("beta1", "beta2"), value):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} is {beta}; Adam's betas must lie in [0, 1), e.g. [0.9, 0.999]")
        return value


class Recipe(Strict):
    output_dir: str
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    cache_dir: str | None = Field(None, description="Default: $PREFKIT_CACHE or ~/.cache/prefkit.")
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig | None = Field(
        None, description="What to train; `prefkit run` needs it, `prefkit sample` and `prefkit chat` do not.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    reward: RewardConfig | None = Field(None, description="The reward source, for objectives that need one.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _data_seed(self) -> "Recipe":
        if self.data.seed is None and self.data.draws():
            self.data.seed = self.seed  # the mixture's and the carved split's choices follow the recipe's seed
        return self

    def resolved_cache_dir(self) -> Path:
        return cache_dir_of(self.cache_dir)

    def cache_dir_origin(self) -> str:
        return cache_dir_origin(self.cache_dir)


def cache_dir_of(configured: str | None) -> Path:
    """The prefkit cache: the recipe's ``cache_dir``, else $PREFKIT_CACHE, else ~/.cache/prefkit."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("PREFKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefkit"


def cache_dir_origin(configured: str | None) -> str:
    """Where the cache folder was chosen, in the words a message uses."""
    if configured:
        return "cache_dir"
    return "the cache folder $PREFKIT_CACHE" if os.environ.get("PREFKIT_CACHE") else "the cache folder ~/.cache/prefkit"


@dataclass
class LoadedRecipe:
    """A validated recipe with its objective and its objective's validated params."""

    recipe: Recipe
    path: str
    objective: Any  # prefkit.api.objective.Objective, or None for a recipe without one (sampling only)
    params: Any  # the objective's Params instance (None without an objective)
    model_options: Any  # the named model source's Params instance, or None
    reward_params: Any = None  # the reward function's Params instance, or None

    def resolved_dict(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json")
        if self.params is not None:
            data["objective"]["params"] = self.params.model_dump(mode="json")
        if self.model_options is not None:
            data["model"]["options"] = self.model_options.model_dump(mode="json")
        if self.reward_params is not None:
            data["reward"]["params"] = self.reward_params.model_dump(mode="json")
        return data


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _problems(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """pydantic's errors as (key path, message); an unknown key gets a "did you mean" from ``model``'s keys."""
    out: dict[str, list[str]] = {}
    for item in error.errors():
        item["loc"] = tuple(part for part in item["loc"] if not _union_tag(part))
        path = _loc(item["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            if model is not None:
                message += _suggest_key(item["loc"][-1], keys_at(model, item["loc"][:-1]))
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "finite_number":
            message = "must be a finite number (not inf or nan)"
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):  # not "instance of ObjectiveConfig"
            message = f"must be a mapping of keys to values, not {_shown(item.get('input'))}"
        elif item["type"] == "literal_error" and isinstance(item.get("input"), str):
            expected = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
            message += did_you_mean(item["input"], expected)
        out.setdefault(path, []).append(message)
    # A union's members each report (``list[str]``, then ``literal['all-linear']``): one line per key,
    # and none for a key where one member found its error deeper inside (``target_modules.1``: the
    # value was a list, so "should be 'all-linear'" would mislead).
    deeper = {path for path in out if any(other.startswith(f"{path}.") for other in out)}
    return [(path, messages[0] + "".join(f"; or {_lower_first(m)}" for m in messages[1:]))
            for path, messages in out.items() if path not in deeper]


def _lower_first(text: str) -> str:
    """``Input should ...`` -> ``input should ...``; ``JSON ...`` stays."""
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _union_tag(part: Any) -> bool:
    """pydantic's name for a member of a union or a validator in an error's location (``list[str]``,
    ``literal['all-linear']``, ``function-after[...]``, ``<lambda>``), which is no key of the recipe."""
    return isinstance(part, str) and (part.startswith("<") or bool(re.fullmatch(r"[\w-]+\[.*\]", part))
                                      or part in ("str", "int", "float", "bool", "none"))


def _shown(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# Names other trainers (transformers' TrainingArguments, TRL) use for keys a recipe spells otherwise.
KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "epoch": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "logging_steps": "log_every", "save_steps": "save_every",
    "eval_steps": "eval_every", "lr_scheduler_type": "scheduler", "adam_beta1": "adam_betas",
    "adam_beta2": "adam_betas", "adam_epsilon": "adam_eps", "warmup": "warmup_steps", "clip_grad_norm": "max_grad_norm",
    "save_total_limit": "keep_checkpoints", "report_to": "trackers", "model_name_or_path": "source",
    "max_seq_length": "max_length", "max_len": "max_length", "dataset": "train", "train_file": "train",
    "eval_file": "eval", "max_prompt_len": "max_prompt_length", "bf16": "precision", "fp16": "precision",
}


def _suggest_key(key: Any, known: list[str]) -> str:
    """``"; did you mean 'lr'?"`` for an unknown key: a near spelling of a known key, or another
    trainer's name for one (``learning_rate``, or a near spelling of it)."""
    hint = did_you_mean(key, known)
    if hint or not isinstance(key, str):
        return hint
    aliases = {alias: target for alias, target in KEY_ALIASES.items() if target in known}
    alias = aliases.get(key.lower()) and key.lower() or closest(key, aliases, cutoff=0.8)
    return f"; did you mean {aliases[alias]!r}?" if alias else ""


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in annotation_members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the pydantic ``model`` accepts at ``loc`` (a pydantic error location), or []."""
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            items = [typing.get_args(m)[0] for m in annotation_members(node)
                     if typing.get_origin(m) is list and typing.get_args(m)]
            if not items:
                return []
            node = items[0]
        else:
            owners = [m for m in _models(node) if part in m.model_fields]
            if not owners:
                return []
            node = owners[0].model_fields[part].annotation
    models = _models(node)
    return list(models[0].model_fields) if models else []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-5`` -> (["train", "lr"], 1e-05). The value is read as YAML."""
    if "=" not in text:
        raise RecipeError("override", [(f"override {text!r}", "expected dotted.key=value, e.g. train.lr=1e-5")])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise RecipeError("override", [(f"override {text!r}", "expected dotted.key=value, e.g. train.lr=1e-5")])
    parts = [part.strip() for part in parts]
    try:
        value = load_yaml(raw) if raw.strip() else None
    except InputError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value``. A new ``model.source`` without a new ``model.options`` also
    drops the file's options: they were the old source's (``model.source=runs/x/final`` just works)."""
    keys = [parse_override(text)[0] for text in overrides]
    if ["model", "source"] in keys and not any(k[:2] == ["model", "options"] for k in keys):
        if isinstance(data.get("model"), dict):
            data["model"].pop("options", None)
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


def file_error(where: str, reason: str) -> RecipeError:
    """A RecipeError about the file as a whole: ``FILE: reason`` (no key path)."""
    error = RecipeError(where, [("", reason)])
    error.args = (f"{where}: {reason}",)
    return error


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file's document: UTF-8 YAML, read safely, no key written twice, a mapping."""
    where = str(path)
    try:
        size = check_readable_file(path).stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise InputError(path, f"is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} (is this a data file?)")
        data = load_yaml(read_text(path), where)
    except OSError as exc:
        raise file_error(where, f"cannot read: {exc.strerror or type(exc).__name__}") from None
    except InputError as exc:
        raise file_error(where, exc.reason) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise file_error(where, "the recipe must be a mapping of keys to values (key: value lines)")
    return data


def check_finite(data: Any, where: str, prefix: str = "") -> None:
    """Refuse infinite and NaN numbers (and strings holding a NUL or an unpaired surrogate) anywhere
    in ``data``, naming their key paths."""
    bad = value_problems(data, prefix)
    if bad:
        raise RecipeError(where, bad)


SMOKE_STEPS = 10  # runs shorter than this are smoke tests: a recipe's warmup may outlast them


def warmup_beyond_run(warmup_steps: int, steps: int) -> bool:
    """A warmup longer than a real run (one of at least SMOKE_STEPS steps) never reaches the
    learning rate: a mistake. A smoke test (``train.max_steps=2`` on a recipe warming up for 5) is not."""
    return steps >= SMOKE_STEPS and warmup_steps > steps


def check_paths(where: str, values: dict[str, str | None]) -> None:
    """Refuse settings that cannot be paths on this machine (too long), naming their keys."""
    problems = [(key, problem) for key, value in values.items() if value and (problem := path_problem(value))]
    if problems:
        raise RecipeError(where, problems)


def looks_like_path(text: str) -> bool:
    """Written as a path (or a hub id): a separator, a leading ``.`` or ``~``, or a file suffix."""
    return "/" in text or "\\" in text or text.startswith((".", "~")) or bool(Path(text).suffix)


def misspelt_name(value: str, table: dict, kind: str, path: str) -> tuple[str, str] | None:
    """A bare name (not a path, not an existing file) close to a registered name is a typo; say
    which name was meant rather than trying the hub. Hub ids (org/name) and paths pass."""
    if value in table or looks_like_path(value) or exists(value):
        return None
    meant = closest(value, table, cutoff=0.75)
    if meant is None:
        return None
    return path, (f"{value!r} is not a registered {kind}, a local path or a hub id (org/name); "
                  f"did you mean {meant!r}?")


def _plugin_block(table: dict, name: str, raw: dict, where: str, *, kind: str, name_path: str,
                  params_path: str) -> tuple[Any, Any]:
    """Look ``name`` up among registered plugins and validate ``raw`` with its ``Params`` model.

    An unknown name is reported at ``name_path``, bad parameters under ``params_path``.
    """
    plugin = table.get(name)
    if plugin is None:
        known = ", ".join(sorted(table)) or "none"
        raise RecipeError(where, [(name_path, f"unknown {kind} {name!r}{did_you_mean(name, table)} "
                                              f"(registered: {known})")])
    if not isinstance(raw, dict):
        raise RecipeError(where, [(params_path, f"should be a mapping of parameters, got {type(raw).__name__}")])
    try:
        params = plugin.Params.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(where, _problems(exc, params_path, plugin.Params)) from None
    except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as exc:  # a plugin's own validator
        raise RecipeError(where, [(params_path, f"{kind} {name!r} could not check its parameters: "
                                                f"{type(exc).__name__}: {exc}")]) from None
    check_finite(params.model_dump(), where, params_path)
    return plugin, params


def validate_document(data: Any, where: str, model: type[BaseModel]) -> Any:
    """A YAML document as ``model`` (Recipe, CompareRecipe): its shape (nesting, size), finite
    numbers, then pydantic. Raises RecipeError naming ``where`` and the key paths."""
    try:
        check_shape(data, where)
    except InputError as exc:
        raise file_error(where, exc.reason) from None
    check_finite(data, where)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(where, _problems(exc, model=model)) from None


def validate_recipe(data: dict[str, Any], where: str, registry: Any) -> LoadedRecipe:
    """Validate a recipe document and its plugin parameter blocks against ``registry`` (a
    :class:`prefkit.plugins.Registry`). Raises RecipeError."""
    recipe = validate_document(data, where, Recipe)
    check_paths(where, {"output_dir": recipe.output_dir, "cache_dir": recipe.cache_dir,
                        "model.source": recipe.model.source, "model.tokenizer": recipe.model.tokenizer,
                        "model.gguf_file": recipe.model.gguf_file, **dict(recipe.data.source_names())})
    train = recipe.train
    if train.max_steps is not None and warmup_beyond_run(train.warmup_steps, train.max_steps):
        raise RecipeError(where, [("train.warmup_steps", f"{train.warmup_steps} is more than train.max_steps "
                                                         f"({train.max_steps}), so the learning rate would never "
                                                         "reach train.lr; lower it")])
    typos = [misspelt_name(recipe.model.source, registry.model_sources, "model source", "model.source"),
             *(misspelt_name(source, registry.datasets, "dataset", key) for key, source in recipe.data.source_names())]
    if any(typos):
        raise RecipeError(where, [typo for typo in typos if typo])

    objective = params = None
    if recipe.objective is not None:
        objective, params = _plugin_block(registry.objectives, recipe.objective.name, recipe.objective.params, where,
                                          kind="objective", name_path="objective.name",
                                          params_path="objective.params")

    model_options = None
    if recipe.model.source in registry.model_sources:
        _, model_options = _plugin_block(registry.model_sources, recipe.model.source, recipe.model.options, where,
                                         kind="model source", name_path="model.source", params_path="model.options")
    elif recipe.model.options:
        hint = did_you_mean(recipe.model.source, registry.model_sources)
        raise RecipeError(
            where,
            [("model.options", f"only a named model source takes options; {recipe.model.source!r} is not one"
                               f"{hint or ' (see `prefkit models`)'}")],
        )
    reward_params = None
    if recipe.reward is not None:
        _, reward_params = _plugin_block(registry.reward_functions, recipe.reward.name, recipe.reward.params, where,
                                         kind="reward function", name_path="reward.name", params_path="reward.params")
    if objective is None:  # a sampling recipe: nothing to train, so no needs to check
        return LoadedRecipe(recipe=recipe, path=where, objective=None, params=None,
                            model_options=model_options, reward_params=reward_params)
    from prefkit.plugins import plugin_errors

    with plugin_errors(registry, "objectives", objective.name, "needs()"):
        needs = objective.needs(params)
    if recipe.reward is None and needs.reward:
        raise RecipeError(where, [("reward", f"objective {objective.name!r} needs a reward source")])
    if needs.data not in registry.data_kinds:
        known = ", ".join(sorted(registry.data_kinds)) or "none"
        raise RecipeError(where, [("objective.name", f"objective {objective.name!r} needs data kind {needs.data!r}"
                                                     f"{did_you_mean(needs.data, registry.data_kinds)}, "
                                                     f"which no plugin registers (data kinds: {known})")])
    return LoadedRecipe(recipe=recipe, path=where, objective=objective, params=params,
                        model_options=model_options, reward_params=reward_params)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *, registry: Any) -> LoadedRecipe:
    """Read, override and validate a recipe file. Raises RecipeError naming file and key paths."""
    data = read_yaml(path)
    if isinstance(data, dict) and "arms" in data and "objective" not in data:
        raise RecipeError(str(path), [("arms", "this is a compare recipe (it has arms:), not a run recipe; run it "
                                               "with `prefkit compare`")])
    try:
        data = apply_overrides(data, overrides or [])
    except RecipeError as exc:
        raise RecipeError(str(path), exc.problems) from None
    return validate_recipe(data, str(path), registry=registry)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
