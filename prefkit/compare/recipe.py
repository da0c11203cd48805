"""The compare recipe: several arms (objective + params) over one model, data, seed and budget.

A compare recipe is the shared part of a run recipe (``model``, ``data``, ``train``, ``sampling``,
``reward``, ``seed``, ``cache_dir``) plus a list of ``arms`` and an ``evaluation`` block::

    output_dir: runs/compare
    model: {source: tiny-llama}
    data: {train: tiny-prefs, eval: tiny-prefs, eval_split: test}
    train: {max_steps: 8, batch_size: 4, lr: 1.0e-3}
    reward: {name: keywords, params: {targets: ["e"], unit: char}}
    arms:
      - {name: dpo-b0.1, objective: dpo, params: {beta: 0.1}}
      - {name: bon-4, objective: best_of_n, params: {n: 4}}
    evaluation:
      temperatures: [0.7, 1.0]
      gold: {name: keywords, params: {targets: ["e"], unit: char}}

:func:`load_compare` reads the YAML safely, applies ``dotted.key=value`` overrides (list items by
index or, for arms, by name: ``arms.dpo-b0.1.params.beta=0.2``), validates the document, then builds
every arm's own run recipe (the shared blocks, the arm's objective, params and reward, its ``train``
overrides, and ``output_dir: <output_dir>/arms/<name>``) and validates it exactly as ``prefkit run``
would. Problems are reported with key paths into the compare recipe (``arms.2.params.beta``), all
before any model loads.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prefkit.api.errors import DataError, PrefkitError, RecipeError
from prefkit.inputs import InputError, check_writable_dir, did_you_mean
from prefkit.loops.online import check_online_recipe
from prefkit.loops.preflight import local_rows, preflight, reward_problems
from prefkit.recipe import (
    MAX_BATCH,
    MAX_TOKENS,
    SEED_LIMIT,
    DataConfig,
    LoadedRecipe,
    ModelConfig,
    RewardConfig,
    SamplingConfig,
    Strict,
    TrainConfig,
    _plugin_block,
    cache_dir_of,
    cache_dir_origin,
    check_paths,
    misspelt_name,
    parse_override,
    read_yaml,
    validate_document,
    validate_recipe,
)

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
REFERENCE_ARM = "reference"  # the name of the starting policy's row in the results


def _distinct_seeds(value: list[int] | None) -> list[int] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError("seeds must not repeat")
    return value


class Arm(Strict):
    """One arm: an objective with its params, trained (or, for inference objectives, sampled) alone."""

    name: str = Field(description="Unique; the arm's subdirectory `arms/<name>/` and its label in the results.")
    objective: str = Field(description="A registered objective (see `prefkit objectives`).")
    params: dict[str, Any] = Field(default_factory=dict, description="The objective's params.")
    reward: RewardConfig | None = Field(
        None, description="This arm's reward source, instead of the recipe's `reward` (PPO, best-of-N)."
    )
    train: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of `train` keys for this arm only (reported in the results)."
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of `data` keys for this arm only: the same preferences in the layout its data kind "
                    "reads (e.g. `train: tiny-unpaired` for KTO, the unpaired form of tiny-prefs).",
    )
    sampling: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of `sampling` keys for this arm's rollouts only (e.g. `num_samples: 4`, GRPO's "
                    "group size).",
    )
    seeds: list[int] | None = Field(
        None, min_length=1, description="Run this arm under only these of the compare's `seeds` (e.g. an expensive "
        "arm once); its rows and intervals then rest on fewer seeds, which the report shows. Default: all of them.")
    evaluation_points: int | None = Field(
        None, gt=0, le=1000, description="Evaluate this arm at about this many evenly spaced points of its training "
        "(as `evaluation.points`, for this arm only), e.g. a finer curve for a long arm whose KL grows fast early. "
        "Default: the compare's `evaluation.points` or `evaluation.every_steps`.")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        return _distinct_seeds(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ARM_NAME.match(value):
            raise ValueError("an arm name is letters, digits, '.', '_' or '-', starting with a letter or digit")
        if value == REFERENCE_ARM:
            raise ValueError(f"{REFERENCE_ARM!r} is the starting policy's row in the results; pick another name")
        return value


class Panel(Strict):
    """One panel of the frontier plot: a title and the arms it draws (the starting policy is in every panel)."""

    title: str = Field(min_length=1, max_length=80, description="The panel's title: its one message.")
    arms: list[str] = Field(min_length=1, description="Names of the recipe's arms drawn in this panel.")


class EvaluationConfig(Strict):
    """How every policy is sampled and measured, identically for all arms."""

    prompts: str | None = Field(
        None, description="Held-out prompts: a named dataset or a file. Default: `data.eval` (or `data.train`'s "
        "`eval_split`)."
    )
    prompts_split: str | None = Field(None, description="The split of `prompts`. Default: `data.eval_split`.")
    max_prompts: int | None = Field(None, gt=0, description="Use only the first prompts.")
    temperatures: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                      description="Sample every policy at each of these temperatures.")
    max_new_tokens: int = Field(64, gt=0, le=MAX_TOKENS)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    num_samples: int = Field(1, gt=0, le=MAX_BATCH, description="Completions per prompt and temperature.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Sequences generated or scored together.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT,
                             description="Sampling seed, the same for every arm and seed. Default: each seed itself.")
    gold: RewardConfig = Field(description="The gold reward function every sample is scored with.")
    judge: RewardConfig | None = Field(None, description="Decides win rates. Default: `gold`.")
    win_against: Literal["reference", "chosen"] = Field(
        "reference", description="The baseline of the win rate: the starting policy's samples, or the prompts' "
        "chosen answers."
    )
    include_reference: bool = Field(True, description="Also evaluate the starting policy (a `reference` row).")
    every_steps: int | None = Field(
        None, gt=0, description="Also evaluate each trained arm at every N-th training step, from its checkpoints "
        "(a curve over training). Default: only the final policy.")
    points: int | None = Field(
        None, gt=0, le=1000, description="Instead of `every_steps`: evaluate each trained arm at about this many "
        "evenly spaced points of its own training (every ceil(last step / points)-th step and the last), so arms "
        "of different lengths (offline steps, online rollouts) get curves of the same resolution.")
    paired: list[tuple[str, str]] | None = Field(
        None, description="Pairs of arms (or `reference`) to test against each other. Default: every arm against "
        "`reference`.")
    panels: list[Panel] | None = Field(
        None, min_length=1, description="Split frontier.png into panels side by side, each a group of arms with "
        "one message (e.g. DPO against PPO; best-of-N). Default: every arm in one panel per temperature.")
    paired_at: Literal["final", "matched_kl"] = Field(
        "final", description="Where a pair is compared: both arms' final steps, or the steps nearest the largest "
        "KL both reach.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Bootstrap resamples of every interval and test.")
    bootstrap_seed: int = Field(0, description="The seed of the bootstrap draws (the same draws for every arm).")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="The coverage of every interval.")

    @model_validator(mode="after")
    def _one_spacing(self) -> "EvaluationConfig":
        if self.every_steps is not None and self.points is not None:
            raise ValueError("set at most one of evaluation.every_steps and evaluation.points")
        return self

    def every_for(self, total: int, points: int | None = None) -> int | None:
        """The evaluation spacing of an arm whose last step is ``total`` (None: the last step only);
        ``points``: the arm's own ``evaluation_points``, which takes precedence."""
        points = points if points is not None else self.points
        if points is not None:
            return max(1, math.ceil(total / points))
        return self.every_steps

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, value: list[float]) -> list[float]:
        if any(t < 0 or t > 100 for t in value):
            raise ValueError("temperatures must lie in [0, 100] (0 is greedy decoding)")
        if len(set(value)) != len(value):
            raise ValueError("temperatures must not repeat")
        return value


class Budget(Strict):
    """One training budget for every trained arm, in one unit (exactly one key)."""

    epochs: float | None = Field(
        None, gt=0, description="Offline arms: this many epochs of their own training data (`train.epochs`). "
        "Online arms: as many rollouts as make their reward calls equal the pairs in that many epochs of `data`.")
    labels: int | None = Field(
        None, gt=0, description="Labels per arm: offline arms train ceil(labels / examples per step) steps; online "
        "arms ceil(labels / (rollout_batch_size x sampling.num_samples)) rollouts.")

    @model_validator(mode="after")
    def _one_unit(self) -> "Budget":
        if (self.epochs is None) == (self.labels is None):
            raise ValueError("set exactly one of budget.epochs and budget.labels")
        return self


class CompareRecipe(Strict):
    output_dir: str = Field(description="The compare directory: arms/, results, plots and report.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="The seed when `seeds` is not set.")
    seeds: list[int] | None = Field(
        None, min_length=1, description="Train and evaluate every arm once per seed. Default: `[seed]`.")
    budget: Budget | None = Field(None, description="One budget for every trained arm (epochs or labels).")
    cache_dir: str | None = Field(None, description="Default: $PREFKIT_CACHE or ~/.cache/prefkit.")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training budget.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig,
                                     description="Sampling during training (PPO rollouts).")
    reward: RewardConfig | None = Field(None, description="The reward source of arms that need one.")
    arms: list[Arm] = Field(min_length=1)
    evaluation: EvaluationConfig

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        return _distinct_seeds(value)

    def arm_seeds(self, arm: Arm) -> list[int]:
        """The seeds ``arm`` is trained and evaluated with: its own ``seeds``, else all of them."""
        return [s for s in self.run_seeds if arm.seeds is None or s in arm.seeds]

    @property
    def run_seeds(self) -> list[int]:
        """The seeds every arm is trained and evaluated with."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def resolved_cache_dir(self) -> Path:
        return cache_dir_of(self.cache_dir)

    def cache_dir_origin(self) -> str:
        return cache_dir_origin(self.cache_dir)

    def arm_dir(self, name: str, seed: int) -> Path:
        """An arm's run directory for one seed: ``<output_dir>/arms/<name>/seed-<seed>``."""
        return Path(self.output_dir) / "arms" / name / f"seed-{seed}"


@dataclass
class LoadedArm:
    arm: Arm
    index: int
    loaded: LoadedRecipe  # the arm's validated run recipe (for the first seed)
    budget_train: dict[str, Any] = field(default_factory=dict)  # `train` keys the compare's budget sets
    with_reward: bool = True  # whether the arm's run recipe carries a reward source

    @property
    def name(self) -> str:
        return self.arm.name

    @property
    def kind(self) -> str:
        return self.loaded.objective.kind


@dataclass
class LoadedCompare:
    compare: CompareRecipe
    path: str
    arms: list[LoadedArm]
    gold_params: Any  # the gold reward function's validated Params
    judge_params: Any = None  # the judge's validated Params (None: the judge is the gold reward)
    model_options: Any = None
    data: dict[str, Any] = field(default_factory=dict)  # the document after overrides
    registry: Any = None  # the plugins the recipe was validated against

    def resolved_dict(self) -> dict[str, Any]:
        out = self.compare.model_dump(mode="json")
        for i, arm in enumerate(self.arms):
            resolved = arm.loaded.resolved_dict()
            out["arms"][i]["params"] = resolved["objective"]["params"]
        out["evaluation"]["gold"]["params"] = self.gold_params.model_dump(mode="json")
        if self.judge_params is not None:
            out["evaluation"]["judge"]["params"] = self.judge_params.model_dump(mode="json")
        return out


# ----------------------------------------------------------------------------- overrides


def apply_compare_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``dotted.key=value`` overrides; a list item is named by its index, an arm also by its name
    (a name with dots in it, such as ``dpo-b0.1``, is matched whole: ``arms.dpo-b0.1.params.beta``)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        i = 0
        while i < len(parts):
            if isinstance(node, list):
                index, used = _list_index(node, parts, i)
                i += used
                key: Any = index
            elif isinstance(node, dict):
                key = parts[i]
                i += 1
            else:
                raise RecipeError("override", [(".".join(parts[:i]), "is not a mapping or a list")])
            if i == len(parts):
                node[key] = value
                break
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, (dict, list)):
                raise RecipeError("override", [(".".join(parts[:i]), "is not a mapping or a list")])
            node = child
    return data


def _list_index(items: list, parts: list[str], start: int) -> tuple[int, int]:
    """The list index that ``parts[start:]`` begin with, and how many parts name it."""
    part = parts[start]
    where = ".".join(parts[: start + 1])
    if re.fullmatch(r"-?\d+", part):
        index = int(part)
        if not -len(items) <= index < len(items):
            raise RecipeError("override", [(where, f"no item {index} (the list has {len(items)})")])
        return index, 1
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    for used in range(len(parts) - start, 0, -1):  # the longest dotted name first
        name = ".".join(parts[start : start + used])
        if name in names:
            return names.index(name), used
    raise RecipeError("override", [(where, f"no item named {part!r}")])


# ----------------------------------------------------------------------------- validation


def arm_recipe_dict(compare: CompareRecipe, arm: Arm, *, seed: int | None = None, with_reward: bool = True,
                    budget_train: dict[str, Any] | None = None,
                    harness_train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run recipe of one arm and seed: the shared blocks plus the arm's objective, params, reward
    and ``train`` keys, written to ``<output_dir>/arms/<name>/seed-<seed>``.

    ``train`` is the shared ``train``, then the budget's keys (``budget_train``), then the arm's own
    overrides (which win: an arm may set its own budget), then the keys the harness needs
    (``harness_train``: checkpoints for evaluation during training)."""
    seed = compare.run_seeds[0] if seed is None else seed
    train = compare.train.model_dump(mode="json")
    train.update(copy.deepcopy(budget_train or {}))
    train.update(copy.deepcopy(arm.train))
    train.update(copy.deepcopy(harness_train or {}))
    reward = arm.reward or compare.reward
    data: dict[str, Any] = {
        "output_dir": str(compare.arm_dir(arm.name, seed)),
        "seed": seed,
        "cache_dir": compare.cache_dir,
        "model": compare.model.model_dump(mode="json", exclude_unset=True),
        "data": {**compare.data.model_dump(mode="json", exclude_unset=True), **copy.deepcopy(arm.data)},
        "objective": {"name": arm.objective, "params": copy.deepcopy(arm.params)},
        "train": train,
        "sampling": {**compare.sampling.model_dump(mode="json"), **copy.deepcopy(arm.sampling)},
    }
    if with_reward and reward is not None:
        data["reward"] = reward.model_dump(mode="json")
    return data


def _arm_path(path: str, i: int, arm: Arm) -> str:
    """A problem path in an arm's run recipe -> the path in the compare recipe."""
    head, _, rest = path.partition(".")
    if path.startswith("objective.params"):
        return f"arms.{i}.params" + path[len("objective.params"):]
    if head == "objective":
        return f"arms.{i}.objective"
    if head == "reward":
        if arm.reward is not None or not rest:
            return f"arms.{i}.{path}"
        return path
    if head in ("train", "sampling", "data") and rest.split(".")[0] in getattr(arm, head):
        return f"arms.{i}.{path}"
    return path


def _reward_params(cfg: RewardConfig, registry, path: str) -> tuple[Any, list[tuple[str, str]]]:
    """The reward function's validated params, or the problems (at ``path.name`` / ``path.params``)."""
    try:
        _, params = _plugin_block(registry.reward_functions, cfg.name, cfg.params, "", kind="reward function",
                                  name_path=f"{path}.name", params_path=f"{path}.params")
    except RecipeError as exc:
        return None, exc.problems
    return params, []


ARM_SETS_BUDGET = ("max_steps", "epochs")  # an arm overriding either keeps its own budget


def budget_train_keys(compare: CompareRecipe, arm: Arm, loaded: LoadedRecipe, *,
                      pairs: int | None = None) -> dict[str, Any] | None:
    """The ``train`` keys the compare's ``budget`` gives one arm (``{}``: none apply).

    ``labels: L``: an offline arm trains ceil(L / examples per step) optimizer steps (examples per
    step = ``batch_size`` x ``grad_accum_steps``); an online arm ceil(L / (``rollout_batch_size`` x
    ``sampling.num_samples``)) rollouts, so its reward calls equal L. ``epochs: E``: an offline arm
    trains E epochs of its own data; an online arm ceil(E x ``pairs`` / (``rollout_batch_size`` x
    ``sampling.num_samples``)) rollouts, where ``pairs`` is the number of training pairs in ``data``
    (known only once the data is read: without it, ``None``). Inference arms, and arms whose own
    ``train`` sets ``max_steps`` or ``epochs``, get nothing."""
    budget = compare.budget
    kind = loaded.objective.kind
    if budget is None or kind not in ("offline", "online") or any(k in arm.train for k in ARM_SETS_BUDGET):
        return {}
    train = loaded.recipe.train
    if kind == "offline":
        if budget.labels is not None:
            return {"max_steps": math.ceil(budget.labels / (train.batch_size * train.grad_accum_steps))}
        return {"epochs": float(budget.epochs), "max_steps": None}
    per_rollout = loaded.params.rollout_batch_size * loaded.recipe.sampling.num_samples
    labels = budget.labels if budget.labels is not None else (
        None if pairs is None else math.ceil(budget.epochs * pairs))
    if labels is None:
        return None
    return {"max_steps": math.ceil(labels / per_rollout)}


def arm_run_recipe(loaded: "LoadedCompare", arm: LoadedArm, seed: int, *, budget_train: dict[str, Any] | None = None,
                   harness_train: dict[str, Any] | None = None) -> LoadedRecipe:
    """The validated run recipe of ``arm`` for ``seed`` (problems named by their compare path; a
    ``train`` value the budget or the evaluation spacing gave is named by the key that gave it)."""
    budget_train = arm.budget_train if budget_train is None else budget_train
    data = arm_recipe_dict(loaded.compare, arm.arm, seed=seed, with_reward=arm.with_reward,
                           budget_train=budget_train, harness_train=harness_train)
    try:
        return validate_recipe(data, loaded.path, registry=loaded.registry)
    except RecipeError as exc:
        raise RecipeError(loaded.path, [_given_by(path, message, loaded.compare, arm.arm, arm.index,
                                                  budget_train or {}, harness_train or {})
                                        for path, message in exc.problems]) from None


def _given_by(path: str, message: str, compare: CompareRecipe, arm: Arm, index: int, budget_train: dict[str, Any],
              harness_train: dict[str, Any] | None = None) -> tuple[str, str]:
    """A problem of the arm's run recipe, at the compare key the user wrote: ``budget.*`` for the
    budget's steps, the evaluation spacing for the harness's checkpoint keys, else :func:`_arm_path`."""
    key = path.removeprefix("train.")
    budget = _budget_path(path, compare, budget_train)
    if budget:
        return budget, f"gives arm {arm.name!r} train.{key} = {budget_train[key]}: {message}"
    if path.startswith("train.") and harness_train and key in harness_train and key not in arm.train:
        where = (f"arms.{index}.evaluation_points" if arm.evaluation_points is not None else
                 "evaluation.points" if compare.evaluation.points is not None else "evaluation.every_steps")
        return where, (f"the evaluation steps of arm {arm.name!r} need train.{key} = {harness_train[key]}: {message}; "
                       "evaluate fewer steps")
    return _arm_path(path, index, arm), message


def _compare_problems(compare: CompareRecipe) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    evaluation = compare.evaluation
    names = {arm.name for arm in compare.arms} | {REFERENCE_ARM}
    for i, (a, b) in enumerate(evaluation.paired or []):
        for j, name in enumerate((a, b)):
            if name not in names:
                problems.append((f"evaluation.paired.{i}.{j}", f"{name!r} is not an arm (nor {REFERENCE_ARM!r})"))
            elif name == REFERENCE_ARM and not evaluation.include_reference:
                problems.append((f"evaluation.paired.{i}.{j}", f"{REFERENCE_ARM!r} is not evaluated "
                                 "(evaluation.include_reference is false)"))
        if a == b:
            problems.append((f"evaluation.paired.{i}", f"pairs {a!r} with itself"))
        arms = {arm.name: arm for arm in compare.arms}
        if a in arms and b in arms and not set(compare.arm_seeds(arms[a])) & set(compare.arm_seeds(arms[b])):
            problems.append((f"evaluation.paired.{i}", f"{a!r} (seeds {compare.arm_seeds(arms[a])}) and {b!r} (seeds "
                                                       f"{compare.arm_seeds(arms[b])}) share no seed; a paired test "
                                                       "compares the seeds both arms ran"))
    for i, panel in enumerate(evaluation.panels or []):
        for j, name in enumerate(panel.arms):
            if name not in names - {REFERENCE_ARM}:
                problems.append((f"evaluation.panels.{i}.arms.{j}", f"{name!r} is not an arm (the starting policy "
                                                                    "is in every panel by itself)"))
    if compare.seeds is not None and "seed" in compare.model_fields_set:
        problems.append(("seeds", "seed is set too; give the seeds in one place (seeds: [...], or seed: N)"))
    if compare.budget is not None:
        for key in ARM_SETS_BUDGET:
            if key in compare.train.model_fields_set:
                problems.append(("budget", f"train.{key} is set too; give the shared budget in one place "
                                 f"(budget, or train.max_steps / train.epochs)"))
    return problems


def validate_compare(data: dict[str, Any], where: str, *, registry: Any) -> LoadedCompare:
    """Validate a compare document and every arm's run recipe. Raises RecipeError with compare paths."""

    compare = validate_document(data, where, CompareRecipe)

    check_paths(where, {"output_dir": compare.output_dir, "evaluation.prompts": compare.evaluation.prompts})
    problems: list[tuple[str, str]] = []
    if compare.evaluation.prompts is not None:
        typo = misspelt_name(compare.evaluation.prompts, registry.datasets, "dataset", "evaluation.prompts")
        problems += [typo] if typo else []
    first_use: dict[str, int] = {}
    for i, arm in enumerate(compare.arms):
        if arm.name in first_use:
            problems.append((f"arms.{i}.name", f"{arm.name!r} is already the name of arms.{first_use[arm.name]}"))
        first_use.setdefault(arm.name, i)
        extra = [s for s in arm.seeds or [] if s not in compare.run_seeds]
        if extra:
            problems.append((f"arms.{i}.seeds", f"arm {arm.name!r}: seeds {extra} are not among the compare's seeds "
                                                f"{compare.run_seeds}; an arm's `seeds` picks some of them"))
    evaluation = compare.evaluation
    gold_params, found = _reward_params(evaluation.gold, registry, "evaluation.gold")
    problems += found
    judge_params = None
    if evaluation.judge is not None:
        judge_params, found = _reward_params(evaluation.judge, registry, "evaluation.judge")
        problems += found
    if compare.reward is not None:
        problems += _reward_params(compare.reward, registry, "reward")[1]
    problems += _compare_problems(compare)

    arms: list[LoadedArm] = []
    model_options = None
    for i, arm in enumerate(compare.arms):
        with_reward, budget_train = True, {}
        try:
            loaded = validate_recipe(arm_recipe_dict(compare, arm), where, registry=registry)
            # The shared reward goes only to arms that need one (PPO, best-of-N); an arm's own always stays.
            if arm.reward is None and loaded.recipe.reward is not None and \
                    not loaded.objective.needs(loaded.params).reward:
                with_reward = False
                loaded = validate_recipe(arm_recipe_dict(compare, arm, with_reward=False), where, registry=registry)
            budget_train = budget_train_keys(compare, arm, loaded) or {}  # online arms on epochs: at run time
            if budget_train:
                loaded = validate_recipe(arm_recipe_dict(compare, arm, with_reward=with_reward,
                                                         budget_train=budget_train), where, registry=registry)
        except RecipeError as exc:
            problems += [_given_by(path, message, compare, arm, i, budget_train) for path, message in exc.problems]
            continue
        needs = loaded.objective.needs(loaded.params)
        if needs.head != "lm":
            problems.append((f"arms.{i}.objective", f"{arm.objective!r} trains a reward model, not a policy; "
                             "train it with `prefkit run` and use it as a reward (reward_model)"))
            continue
        if loaded.objective.kind == "online":
            problems += [(_arm_path(path, i, arm), message) for path, message in check_online_recipe(loaded)]
        model_options = loaded.model_options
        arms.append(LoadedArm(arm=arm, index=i, loaded=loaded, budget_train=budget_train, with_reward=with_reward))

    if problems:
        merged = _merge_arms(problems, "gives arm", " ", lambda path: path.startswith("budget."))
        unique = list(dict.fromkeys(merged))  # the shared blocks' problems would repeat once per arm
        raise RecipeError(where, unique)
    return LoadedCompare(compare=compare, path=where, arms=arms, gold_params=gold_params,
                         judge_params=judge_params, model_options=model_options, data=data, registry=registry)


def _budget_path(path: str, compare: CompareRecipe, budget_train: dict[str, Any]) -> str | None:
    """``budget.labels`` or ``budget.epochs`` when the run recipe's ``path`` holds a value the budget gave."""
    if compare.budget is None or not path.startswith("train.") or path.removeprefix("train.") not in budget_train:
        return None
    return "budget.labels" if compare.budget.labels is not None else "budget.epochs"


def _merge_arms(problems: list[tuple[str, str]], lead: str, sep: str, shared: Any) -> list[tuple[str, str]]:
    """Problems that differ only in the arm they name (``{lead} 'a'{sep}rest``, at a path ``shared``
    accepts) as one line naming the arms; the others as they are."""
    import re

    pattern = re.compile(rf"{lead} ('.*?'){sep}(.*)$", re.S)
    groups: dict[tuple[str, str], list[str]] = {}
    for path, message in problems:
        found = pattern.match(message)
        if found and shared(path):
            groups.setdefault((path, found.group(2)), []).append(found.group(1))
    merged = []
    for path, message in problems:
        found = pattern.match(message)
        if found and shared(path):
            names = groups.pop((path, found.group(2)), None)
            if names:
                merged.append((path, f"{lead}{'s' if len(names) > 1 else ''} {', '.join(names)}{sep}{found.group(2)}"))
        else:
            merged.append((path, message))
    return merged

def is_compare_document(data: dict[str, Any]) -> bool:
    """A compare recipe has a top-level ``arms`` key; a run recipe does not."""
    return isinstance(data, dict) and "arms" in data


def load_compare(path: str | os.PathLike, overrides: list[str] | None = None, *, registry: Any,
                 arms: list[str] | None = None) -> LoadedCompare:
    """Read, override and validate a compare recipe file. Raises RecipeError naming file and key paths.

    ``arms``: run only these arms (by name, in the recipe's order); paired tests naming another arm
    are dropped."""
    data = read_yaml(path)
    try:
        data = apply_compare_overrides(data, overrides or [])
        if arms is not None:
            data = select_arms(data, arms)
    except RecipeError as exc:
        raise RecipeError(str(path), exc.problems) from None
    return validate_compare(data, str(path), registry=registry)


def select_arms(data: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The compare recipe ``data`` with only the arms named in ``names`` (``--arms``)."""
    listed = data.get("arms")
    if not isinstance(listed, list):
        raise RecipeError("", [("arms", "the recipe has no list of arms to choose from")])
    known = [a.get("name") for a in listed if isinstance(a, dict)]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        problems = [("--arms", f"no arm named {n!r}{did_you_mean(n, [k for k in known if isinstance(k, str)])}; "
                     f"the recipe's arms: {', '.join(map(str, known))}") for n in unknown]
        raise RecipeError("", problems or [("--arms", "name at least one arm")])
    data = copy.deepcopy(data)
    data["arms"] = [a for a in listed if isinstance(a, dict) and a.get("name") in names]
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("paired"), list):
        keep = set(names) | {REFERENCE_ARM}
        evaluation["paired"] = [p for p in evaluation["paired"]
                                if not isinstance(p, list) or all(x in keep for x in p)] or None
    if isinstance(evaluation, dict) and isinstance(evaluation.get("panels"), list):
        panels = []
        for panel in evaluation["panels"]:
            if isinstance(panel, dict) and isinstance(panel.get("arms"), list):
                panel = dict(panel, arms=[a for a in panel["arms"] if a in names])
                if not panel["arms"]:
                    continue
            panels.append(panel)
        evaluation["panels"] = panels or None
    return data


def eval_data_config(loaded: LoadedCompare) -> DataConfig:
    """``data`` with the evaluation's prompt source, split and row limit."""
    compare = loaded.compare
    ev, data = compare.evaluation, compare.data
    update: dict[str, Any] = {}
    if ev.prompts is not None:
        update["eval"] = ev.prompts
    if ev.prompts_split is not None:
        update["eval_split"] = ev.prompts_split
    if ev.max_prompts is not None:
        update["max_eval_rows"] = ev.max_prompts
    return data.model_copy(update=update)


def answer_text(value: Any) -> str | None:
    """A chosen answer as text: a string, or the content of the last assistant (else last) message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = [m for m in value if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        picked = (assistant or messages)[-1:] if messages else []
        return str(picked[0].get("content", "")) if picked else None
    return None


def preflight_compare(loaded: LoadedCompare, registry: Any) -> None:
    """:func:`prefkit.loops.preflight.preflight` for a compare recipe: its folder, then every arm's run
    recipe (problems named by their key paths in the compare recipe), then the evaluation prompts."""
    compare, where = loaded.compare, loaded.path
    try:
        check_writable_dir(compare.output_dir, "output_dir")
    except InputError as exc:
        raise PrefkitError(f"{where}: {exc}") from None
    problems: list[tuple[str, str]] = []
    data_errors: dict[str, list] = {}  # one message per bad data source, naming every arm that reads it
    for arm in loaded.arms:
        try:
            preflight(arm.loaded, registry, command="compare", check_output_dir=False)
        except RecipeError as exc:
            problems += [(_budget_path(path, compare, arm.budget_train) or _arm_path(path, arm.index, arm.arm),
                          f"arm {arm.name!r}: {message}") for path, message in exc.problems]
        except DataError as exc:  # the arm's data, read as its objective reads them
            data_errors.setdefault(str(exc), []).append(arm)
    problems = _merge_arms(problems, "arm", ": ", lambda path: not path.startswith("arms."))
    for message, arms in data_errors.items():
        path = f"arms.{arms[0].index}" if len(arms) == 1 else "data"
        problems.append((path, f"arm{'s' if len(arms) > 1 else ''} {', '.join(repr(a.name) for a in arms)}: {message}"))
    evaluation = compare.evaluation
    problems += reward_problems(evaluation.gold, loaded.gold_params, registry, "evaluation.gold")
    if evaluation.judge is not None:
        problems += reward_problems(evaluation.judge, loaded.judge_params, registry, "evaluation.judge")
    prompts = eval_data_config(loaded)
    if prompts.eval is not None:  # the evaluation prompts, read as the compare will read them
        from prefkit.data.io import is_local_source, load_rows
        from prefkit.data.mixture import source_parts

        carved = getattr(prompts.eval, "from_train", None) is not None
        parts, mixture = source_parts(prompts, "train" if carved else "eval")
        for part in parts:
            local_rows(part.source, part.split, prompts, registry, None if carved else part.limit,
                       kind=registry.data_kinds.get("prompts"), needed_by="the evaluation (evaluation.prompts)",
                       subset=part.subset)
        if evaluation.win_against == "chosen" and not mixture and is_local_source(parts[0].source, registry):
            # the run checks each prompt it keeps; here, only a source with no answer at all (prompts only)
            rows, shown = load_rows(parts[0].source, parts[0].split, subset=parts[0].subset, registry=registry)
            if rows and not any(answer_text(row.get("chosen", row.get("completion"))) for row in rows):
                raise DataError(f"{shown} ({parts[0].split}): evaluation.win_against is 'chosen', but its rows have no "
                                "'chosen' (or 'completion') answers; use win_against: reference or prompts with "
                                "answers")
    if problems:
        raise RecipeError(where, list(dict.fromkeys(problems)))
