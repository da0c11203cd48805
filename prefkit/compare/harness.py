"""The shared harness behind ``prefkit compare``: train every arm, then measure every policy identically.

:func:`run_compare` reads top to bottom:

1. **Prompts first.** The held-out prompts are read and tokenized (a bad row fails here, before any
   model loads or any arm trains); then the starting model, the gold reward and the judge load.
2. **For each seed, each arm**: its run recipe for that seed (the compare's budget and the
   checkpoints evaluation needs written in, :func:`plan_arm`); training in
   ``<output_dir>/arms/<name>/seed-<seed>/`` with the engine, exactly as ``prefkit run`` would (a
   finished arm is skipped, a half-finished one resumed; best-of-N trains nothing); then its
   evaluation at every step asked for (its checkpoints, its ``final/``); then the checkpoints
   kept only for evaluation are deleted again.
3. **Evaluation**, the same for every policy: at each temperature, ``num_samples`` completions per
   prompt, seeded from the seed's evaluation seed alone (sample ``s`` of prompt ``p`` uses the same
   random numbers for every policy of that seed); each scored by the gold reward and the judge;
   KL(π‖π_ref) per sample against the starting model; the win rate against the starting policy's
   samples or the prompts' chosen answers. Per-sample records are cached in each run directory's
   ``eval.jsonl`` under a fingerprint of everything that changes them, so a re-run evaluates only
   what changed.
4. **Results** (:mod:`prefkit.compare.results`): a row per (arm, seed, step, temperature) with
   bootstrap intervals, their mean over seeds, paired tests, the budget of every arm; the plots and
   the report.

Library code returns data; the command line shows the table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefkit import loops
from prefkit.api.errors import DataError, PrefkitError
from prefkit.compare.budget import BUDGET_COLUMNS, final_state, inference_budget, run_budget
from prefkit.compare.evaluation import pair_outcomes, sample_kl, score
from prefkit.compare.recipe import (
    ARM_SETS_BUDGET,
    REFERENCE_ARM,
    LoadedArm,
    LoadedCompare,
    answer_text,
    arm_run_recipe,
    budget_train_keys,
    eval_data_config,
)
from prefkit.compare.results import (
    AGGREGATE_COLUMNS,
    KL_SAMPLES,
    PAIRED_COLUMNS,
    RESULT_COLUMNS,
    Bootstrap,
    Measured,
    aggregate_rows,
    paired_rows,
    rows_csv,
    seed_rows,
)
from prefkit.loops.checkpoint import checkpoint_steps, older_than_kept
from prefkit.api.reporting import Reporter, SilentReporter
from prefkit.loops.runs import RESUMABLE_CHANGES, _flatten
from prefkit.manifest import MANIFEST
from prefkit.recipe import DataConfig, LoadedRecipe, SamplingConfig, dump_yaml

EVAL_FORMAT = 3  # bump when the evaluation records change meaning (3: records carry their training step)
EXTENDS_TRAINING = {"train.max_steps", "train.epochs"}  # changes that make a finished arm train on
_UMASK = os.umask(0)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- small helpers


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _hash_files(folder: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "config.json")) -> str:
    """sha256 over the weight and config files of a model folder (names and bytes)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _reward_identity(cfg: Any) -> dict[str, Any]:
    """A reward config, plus the content hash of a model folder it points at (a trained reward model)."""
    identity: dict[str, Any] = cfg.model_dump(mode="json")
    path = identity.get("params", {}).get("path")
    if isinstance(path, str) and Path(path).expanduser().is_dir():
        identity["folder_sha256"] = _hash_files(Path(path).expanduser())
    return identity


def temperature_tag(temperature: float) -> str:
    return f"{temperature:g}"


def reference_dir(out_dir: Path, seed: int) -> Path:
    """Where the starting policy's samples and records of one seed are kept."""
    return Path(out_dir) / REFERENCE_ARM / f"seed-{seed}"


def _win_seed(seed: int, temperature_index: int) -> int:
    """The A/B order seed: the same for every policy at one temperature, so they are judged alike."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x57494E, temperature_index]).generate_state(1)[0])


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ----------------------------------------------------------------------------- prompts


@dataclass
class EvalPrompts:
    prompt_ids: list[list[int]]
    prompts: list[Any]  # raw: strings or message lists
    chosen: list[str] | None  # the prompts' chosen answers (win_against: chosen)
    source: str
    split: str
    fingerprint: str


def prepare_prompts(loaded: LoadedCompare, tokenizer: Any, registry: Any) -> EvalPrompts:
    """The held-out prompts (and, for ``win_against: chosen``, their chosen answers)."""
    from prefkit.data.io import load_rows
    from prefkit.data.prepare import _choose_split, prepare_dataset

    cfg = eval_data_config(loaded)
    dataset = prepare_dataset(cfg, tokenizer, registry.data_kinds["prompts"], split="eval", registry=registry)
    chosen = None
    if loaded.compare.evaluation.win_against == "chosen":
        source, split, limit = _choose_split(cfg, "eval")
        rows, shown = load_rows(source, split, subset=cfg.subset, registry=registry)
        rows = rows[:limit] if limit else rows
        chosen = []
        for ex in dataset.examples:
            row = rows[ex.row - 1]
            text = answer_text(row.get("chosen", row.get("completion")))
            if not text or not text.strip():
                raise DataError(
                    f"{shown} ({split}): row {ex.row}: evaluation.win_against is 'chosen', but the row has no "
                    "'chosen' (or 'completion') answer; use win_against: reference or prompts with answers"
                )
            chosen.append(text)
    prompt_ids = [ex.prompt_ids for ex in dataset.examples]
    fingerprint = _hash({"ids": prompt_ids, "chosen": chosen})
    return EvalPrompts(prompt_ids, [ex.prompt for ex in dataset.examples], chosen, dataset.report.source,
                       dataset.report.split, fingerprint)


# ----------------------------------------------------------------------------- planning


class DataCounts:
    """Rows of a training dataset after its checks (what a loop's epoch counts), read once each."""

    def __init__(self, loaded: LoadedCompare, tokenizer: Any, registry: Any):
        self.loaded, self.tokenizer, self.registry = loaded, tokenizer, registry
        self._rows: dict[str, int] = {}

    def rows(self, data: DataConfig, kind: str, *, mismatched: bool = False) -> int:
        from prefkit.data.prepare import prepare_dataset

        key = json.dumps([data.model_dump(mode="json"), kind, mismatched], sort_keys=True)
        if key not in self._rows:
            dataset = prepare_dataset(data, self.tokenizer, self.registry.data_kinds[kind], split="train",
                                      registry=self.registry, mismatched=mismatched)
            self._rows[key] = len(dataset.examples)
        return self._rows[key]

    def pairs(self) -> int:
        """Training pairs in the compare's shared ``data`` (an epochs budget for online arms)."""
        try:
            return self.rows(self.loaded.compare.data, "pairs")
        except PrefkitError as exc:
            raise PrefkitError(f"budget.epochs: online arms get as many reward calls as the pairs in "
                               f"{self.loaded.compare.budget.epochs:g} epoch(s) of data.train, which could not "
                               f"be read as preference pairs ({exc}); use budget.labels instead") from exc


@dataclass
class ArmPlan:
    """One arm and seed, ready to train and evaluate."""

    arm: LoadedArm
    seed: int
    eval_seed: int
    loaded: LoadedRecipe  # the run recipe of this seed: budget and checkpoints written in
    run_dir: Path
    total_steps: int  # training steps (offline: optimizer steps; online: rollouts); 0 for inference
    eval_steps: list[int]  # the steps evaluated ([0] for inference)
    keep: int  # the checkpoints the arm itself keeps (the rest, kept for evaluation, go afterwards)
    prune: bool  # whether checkpoints were kept only for evaluation

    @property
    def name(self) -> str:
        return self.arm.name

    @property
    def kind(self) -> str:
        return self.arm.kind


def evaluation_steps(total: int, every: int | None) -> list[int]:
    """Every ``every``-th step and the last one; only the last without ``every``."""
    if not every:
        return [total]
    return sorted(set(range(every, total + 1, every)) | {total})


def plan_arm(loaded: LoadedCompare, arm: LoadedArm, seed: int, counts: DataCounts) -> ArmPlan:
    """The run recipe of ``arm`` for ``seed`` with everything the harness sets written in:

    - the budget (an epochs budget of an online arm needs the pair count of ``data``);
    - checkpoints at every step evaluation needs (``train.save_every``: the arm's evaluation spacing,
      which its own ``evaluation_points``, ``evaluation.points`` or ``evaluation.every_steps`` gives,
      or its greatest common divisor with the arm's own ``save_every``; without a spacing, the arm's
      ``save_every`` or only the last step, whose checkpoint holds the tokens processed), and a
      ``keep_checkpoints`` that keeps them all until they are evaluated."""
    compare = loaded.compare
    eval_seed = compare.evaluation.seed if compare.evaluation.seed is not None else seed
    budget_train = arm.budget_train
    if compare.budget is not None and compare.budget.epochs is not None and arm.kind == "online" and \
            not any(key in arm.arm.train for key in ARM_SETS_BUDGET):
        budget_train = budget_train_keys(compare, arm.arm, arm.loaded, pairs=counts.pairs()) or {}
    base = arm_run_recipe(loaded, arm, seed, budget_train=budget_train)
    run_dir = Path(base.recipe.output_dir)
    if arm.kind == "inference":
        return ArmPlan(arm, seed, eval_seed, base, run_dir, 0, [0], 0, False)
    train = base.recipe.train
    needs = base.objective.needs(base.params)
    if arm.kind == "offline":
        rows = 0 if train.max_steps else counts.rows(base.recipe.data, needs.data, mismatched=needs.mismatched)
        total = _offline_total(train, rows)
    else:
        prompts = 0 if train.max_steps else counts.rows(base.recipe.data, needs.data)
        total = train.max_steps or max(1, math.ceil(train.epochs * math.ceil(prompts / base.params.rollout_batch_size)))
    every = compare.evaluation.every_for(total, arm.arm.evaluation_points)
    if every and every >= total:  # a spacing past the arm's last step: evaluated at its last step only
        every = None
    if every:
        save = math.gcd(train.save_every, every) if train.save_every else every
        keep = max(train.keep_checkpoints, math.ceil(total / save) + 1)
    else:
        save, keep = train.save_every or total, train.keep_checkpoints
    planned = arm_run_recipe(loaded, arm, seed, budget_train=budget_train,
                             harness_train={"save_every": save, "keep_checkpoints": keep})
    return ArmPlan(arm, seed, eval_seed, planned, run_dir, total, evaluation_steps(total, every),
                   train.keep_checkpoints, keep > train.keep_checkpoints)


def _offline_total(train: Any, rows: int) -> int:
    from prefkit.compare.budget import offline_total_steps

    return offline_total_steps(train.max_steps, train.epochs, rows, train.batch_size, train.grad_accum_steps)


# ----------------------------------------------------------------------------- training


def _recipe_changes(loaded: LoadedRecipe, run_dir: Path) -> list[str]:
    """Keys where the arm's recipe differs from the one its directory was trained with (none if new)."""
    import yaml

    saved_file = run_dir / "recipe.resolved.yaml"
    if not saved_file.is_file():
        return []
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text()))
    except (OSError, yaml.YAMLError):
        return []
    current = _flatten(yaml.safe_load(dump_yaml(loaded.resolved_dict())))
    ignored = {"output_dir", "cache_dir"}  # where things are kept does not change what was trained
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in ignored)


def train_arm(plan: ArmPlan, *, reporter: Reporter, registry: Any) -> dict[str, Any]:
    """Train one arm and seed unless it is finished; returns ``{"status", "steps", "train_seconds", ...}``."""
    run_dir, label = plan.run_dir, f"arm {plan.name} seed {plan.seed}"
    if plan.kind == "inference":
        return {"status": "inference", "steps": 0, "train_seconds": 0.0}
    summary_file = run_dir / "run.json"
    changed = _recipe_changes(plan.loaded, run_dir)
    if changed and not set(changed) <= RESUMABLE_CHANGES:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise PrefkitError(
            f"{label}: {run_dir} was trained with another recipe (it differs in {shown}); "
            f"delete {run_dir} to train the arm again, or give the arm another name (nothing was changed)"
        )
    more_steps = set(changed) & EXTENDS_TRAINING
    if summary_file.is_file() and not more_steps:  # other resumable keys (logging, checkpoints) train nothing
        reporter.message(f"{label}: finished before ({summary_file}); not trained again")
        status = "finished"
    elif summary_file.is_file() and not checkpoint_steps(run_dir):
        raise PrefkitError(
            f"{label}: finished, and the recipe now asks for more training ({', '.join(sorted(more_steps))}), "
            f"but {run_dir} has no checkpoint left to continue from; delete {run_dir} to train the arm again "
            f"(nothing was changed)"
        )
    else:
        started = bool(checkpoint_steps(run_dir))
        if not started and run_dir.is_dir() and any(run_dir.iterdir()):
            # killed before its first checkpoint: nothing in it can be continued
            reporter.message(f"{label}: interrupted before its first checkpoint; training it from the start")
            shutil.rmtree(run_dir)
        reporter.message(f"{label}: {'resuming' if started else 'training'} {plan.loaded.objective.name} "
                         f"in {run_dir}")
        try:
            loops.train(plan.loaded, resume=started, reporter=reporter, registry=registry)
        except PrefkitError as exc:  # the harness resumed the arm, not the user: no "--resume:" in its messages
            if not str(exc).startswith("--resume: "):
                raise
            what = str(exc).removeprefix("--resume: ").split("; nothing was changed")[0].split(" (nothing was changed)")[0]
            raise PrefkitError(f"{label}: {what}; nothing was changed: delete {run_dir} to train the arm again") \
                from None
        status = "resumed" if started else "trained"
    summary = _arm_summary(summary_file, label, run_dir)
    return {"status": status, "steps": summary.get("steps", 0),
            "train_seconds": summary.get("train_seconds", 0.0),
            "reference_cache": summary.get("reference_cache", "none"), "summary": summary}


def _arm_summary(path: Path, label: str, run_dir: Path) -> dict[str, Any]:
    """A trained arm's ``run.json``, refused in one message when it is damaged."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if isinstance(summary, dict) and isinstance(summary.get("steps"), int) and not isinstance(summary["steps"], bool):
            return summary
        problem = (f"not a JSON object but {type(summary).__name__}" if not isinstance(summary, dict) else
                   "no whole number of 'steps'")
    raise PrefkitError(f"{label}: {path} is damaged ({problem}); delete {run_dir} to train the arm again "
                       "(nothing was changed)")


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints (each renamed aside first, so a kill never
    leaves a half-deleted one in the list); return the steps deleted."""
    removed = []
    for step, path in older_than_kept(run_dir, keep):
        trash = path.parent / f".trash-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(step)
    return removed


# ----------------------------------------------------------------------------- evaluation


@dataclass
class PolicySource:
    """What is evaluated at one step: its identity (for the cache) and where its weights are."""

    identity: dict[str, Any] | None  # None: the weights are gone (a deleted checkpoint)
    kind: str  # "reference" | "inference" | "final" | "checkpoint"
    path: Path | None = None


def load_policy(source: PolicySource, model_cfg: Any, model_options: Any, cache_dir: Path, *, online: bool,
                registry: Any) -> torch.nn.Module:
    """The policy at one step: ``final/`` as saved, or the starting model (with the compare's LoRA
    adapters, if any) with a checkpoint's trainable weights loaded into it (an online run's
    checkpoint holds ``policy.*`` and the objective's modules, ``extra.*``: only the policy is kept)."""
    from safetensors.torch import load_file

    from prefkit.loops.checkpoint import load_trainable_state
    from prefkit.models.loading import load_model
    from prefkit.recipe import ModelConfig

    if source.kind == "final":
        return load_model(ModelConfig(source=str(source.path)), None, cache_dir, head="lm", registry=registry).model
    model = load_model(model_cfg, model_options, cache_dir, head="lm", registry=registry).model
    tensors = load_file(str(Path(source.path) / "trainable.safetensors"))
    if online:
        tensors = {name[len("policy."):]: value for name, value in tensors.items() if name.startswith("policy.")}
    load_trainable_state(model, tensors)
    return model


@dataclass
class Evaluator:
    """Samples and measures policies; holds the starting model, the scorers and the baselines."""

    loaded: LoadedCompare
    prompts: EvalPrompts
    reference: torch.nn.Module
    tokenizer: Any
    pad_id: int
    device: torch.device
    gold: Any
    judge: Any
    base_fingerprint: str
    out_dir: Path
    reporter: Reporter
    registry: Any
    _reference_samples: dict[tuple[int, float], list[list[Any]]] = field(default_factory=dict)
    _baselines: dict[tuple[int, float], list[float]] = field(default_factory=dict)
    _scorers: dict[str, Any] = field(default_factory=dict)
    _memo: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def ev(self):
        return self.loaded.compare.evaluation

    def common(self, eval_seed: int) -> str:
        """The fingerprint of everything but the policy that changes a record."""
        return _hash([self.base_fingerprint, eval_seed])[:16]

    def sampling(self, temperature: float, eval_seed: int) -> SamplingConfig:
        ev = self.ev
        return SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=temperature, top_p=ev.top_p,
                              top_k=ev.top_k, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=eval_seed)

    def _progress(self, description: str):
        started = {"yes": False}

        def progress(done: int, total: int) -> None:
            if not started["yes"]:
                self.reporter.start(total, 0, description)
                started["yes"] = True
            self.reporter.step(done, {})

        return progress

    # -- the starting policy's samples, generated once per evaluation seed and temperature, kept on disk

    def reference_samples(self, temperature: float, eval_seed: int, seed: int) -> list[list[Any]]:
        from prefkit.models.sampling import Sample, generate

        key = (eval_seed, temperature)
        if key in self._reference_samples:
            return self._reference_samples[key]
        path = reference_dir(self.out_dir, seed) / f"samples_T{temperature_tag(temperature)}.jsonl"
        fingerprint = _hash([self.common(eval_seed), "reference-samples", temperature])[:16]
        n, k = len(self.prompts.prompt_ids), self.ev.num_samples
        records = _read_jsonl(path)
        if len(records) == n * k and all(r.get("fingerprint") == fingerprint for r in records):
            groups: list[list[Any]] = [[None] * k for _ in range(n)]  # type: ignore[list-item]
            for r in records:
                groups[r["prompt_index"]][r["sample_index"]] = Sample(
                    r["prompt_index"], r["sample_index"], r["completion"], r["token_ids"], r["finished"])
        else:
            self.reporter.message(f"sampling the reference policy at temperature {temperature:g} "
                                  f"(evaluation seed {eval_seed})")
            groups = generate(self.reference, self.tokenizer, self.prompts.prompt_ids,
                              self.sampling(temperature, eval_seed), seed=eval_seed,
                              progress=self._progress(f"reference T={temperature:g}"))
            self.reporter.finish()
            records = [{"fingerprint": fingerprint, "temperature": temperature, "prompt_index": s.prompt_index,
                        "sample_index": s.sample_index, "completion": s.text, "token_ids": s.token_ids,
                        "num_tokens": s.num_tokens, "finished": s.finished}
                       for group in groups for s in group]
            _write_atomic(path, _jsonl(records))
        self._reference_samples[key] = groups
        return groups

    def baseline_scores(self, temperature: float, eval_seed: int, seed: int) -> list[float]:
        """The judge's score of the baseline answer for each (prompt, sample), in that order."""
        key = (eval_seed, temperature)
        if key not in self._baselines:
            k = self.ev.num_samples
            if self.ev.win_against == "chosen":
                assert self.prompts.chosen is not None
                scores = score(self.judge, self.prompts.prompts, self.prompts.chosen)
                self._baselines[key] = [s for s in scores for _ in range(k)]
            else:
                flat = [s for group in self.reference_samples(temperature, eval_seed, seed) for s in group]
                self._baselines[key] = score(
                    self.judge, [self.prompts.prompts[s.prompt_index] for s in flat], [s.text for s in flat])
        return self._baselines[key]

    def scorer_for(self, cfg: Any, params: Any, where: str = "reward") -> Any:
        from prefkit.models.rewards import build_reward

        key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        if key == json.dumps(self.ev.gold.model_dump(mode="json"), sort_keys=True):
            return self.gold
        if key not in self._scorers:
            self._scorers[key] = build_reward(cfg, params, cache_dir=self.loaded.compare.resolved_cache_dir(),
                                              device=self.device, registry=self.registry, key=where)
        return self._scorers[key]

    # -- one policy at one step

    def source(self, plan: ArmPlan | None, step: int) -> PolicySource:
        if plan is None:
            return PolicySource({"policy": REFERENCE_ARM}, "reference")
        if plan.kind == "inference":
            recipe = plan.loaded.recipe
            return PolicySource({"policy": "inference", "objective": plan.loaded.objective.name,
                                 "params": plan.loaded.params.model_dump(mode="json"),
                                 "reward": _reward_identity(recipe.reward) if recipe.reward is not None else None},
                                "inference")
        if step == plan.total_steps:
            final = plan.run_dir / "final"
            if (final / "config.json").is_file():
                return PolicySource({"policy": "trained", "weights": _hash_files(final)}, "final", final)
        folder = plan.run_dir / "checkpoints" / f"step-{step}"
        try:
            sha = json.loads((folder / MANIFEST).read_text())["files"]["trainable.safetensors"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return PolicySource(None, "checkpoint", folder)
        return PolicySource({"policy": "checkpoint", "trainable_sha256": sha}, "checkpoint", folder)

    def load_policy(self, plan: ArmPlan, source: PolicySource) -> torch.nn.Module:
        compare = self.loaded.compare
        try:
            model = load_policy(source, compare.model, self.loaded.model_options, compare.resolved_cache_dir(),
                                online=plan.kind == "online", registry=self.registry)
        except ValueError as exc:
            raise PrefkitError(f"arm {plan.name} seed {plan.seed}: {source.path}: {exc}") from exc
        return model.to(self.device).eval()

    def evaluate(self, plan: ArmPlan | None, seed: int, eval_seed: int,
                 steps: list[int]) -> tuple[dict[int, list[dict[str, Any]]], list[int]]:
        """Per-sample records of one arm and seed (``plan``; ``None``: the starting policy) at each of
        ``steps`` and every temperature, from the cache when it is current; and the steps that
        could not be evaluated (their checkpoint is gone and no current records are cached)."""
        name = REFERENCE_ARM if plan is None else plan.name
        folder = reference_dir(self.out_dir, seed) if plan is None else plan.run_dir
        cache = folder / "eval.jsonl"
        common = self.common(eval_seed)
        expected = len(self.ev.temperatures) * len(self.prompts.prompt_ids) * self.ev.num_samples
        cached: dict[int, list[dict[str, Any]]] = {}
        for record in _read_jsonl(cache):
            cached.setdefault(int(record.get("step", -1)), []).append(record)
        found: dict[int, list[dict[str, Any]]] = {}
        missing: list[int] = []
        for step in steps:
            source = self.source(plan, step)
            have = cached.get(step, [])
            fingerprint = None if source.identity is None else _hash([common, source.identity])[:16]
            current = len(have) == expected and all(
                (r.get("fingerprint") == fingerprint) if fingerprint else (r.get("common") == common) for r in have)
            if current:
                found[step] = have
                continue
            if fingerprint is None:
                missing.append(step)
                continue
            if fingerprint in self._memo:  # the same policy and evaluation seed under another seed
                found[step] = [dict(r, step=step) for r in self._memo[fingerprint]]
            else:
                where = f"{name}" + ("" if plan is None or plan.kind == "inference" else f" step {step}")
                self.reporter.message(f"evaluating {where} (seed {seed})")
                policy = None if plan is None or plan.kind == "inference" else self.load_policy(plan, source)
                records = []
                for ti, temperature in enumerate(self.ev.temperatures):
                    records += self._evaluate_at(plan, policy, temperature, ti, seed, eval_seed)
                del policy
                for r in records:
                    r.update(fingerprint=fingerprint, common=common, step=step)
                found[step] = self._memo[fingerprint] = records
            # written after every step, keeping the cached records of the steps still to come (their
            # checkpoints may be gone), so an interruption loses at most the step in progress
            kept = {s: cached[s] for s in steps if s in cached and s not in found and s not in missing}
            merged = {**kept, **found}
            _write_atomic(cache, _jsonl([r for s in sorted(merged) for r in merged[s]]))
        return found, missing

    def _evaluate_at(self, plan: ArmPlan | None, policy: torch.nn.Module | None, temperature: float,
                     ti: int, seed: int, eval_seed: int) -> list[dict[str, Any]]:
        from prefkit.models.sampling import generate

        cfg = self.sampling(temperature, eval_seed)
        prompts, prompt_ids = self.prompts.prompts, self.prompts.prompt_ids
        name = REFERENCE_ARM if plan is None else plan.name
        progress = self._progress(f"{name} T={temperature:g}")
        analytic_kl = None  # an inference objective's own KL, when it knows it
        if plan is None:
            groups = self.reference_samples(temperature, eval_seed, seed)
            policy = self.reference
        elif plan.kind == "inference":
            recipe = plan.loaded.recipe
            objective, params = plan.loaded.objective, plan.loaded.params
            where = f"arms.{plan.arm.index}.reward" if plan.arm.arm.reward is not None else "reward"
            scorer = self.scorer_for(recipe.reward, plan.loaded.reward_params, where) if recipe.reward is not None \
                else None
            groups = objective.sample(params, self.reference, self.tokenizer, prompt_ids, prompts, scorer, cfg,
                                      seed=eval_seed, num_samples=cfg.num_samples, progress=progress)
            kl_value = objective.kl(params)
            if kl_value is None:
                raise PrefkitError(f"arm {name}: objective {objective.name!r} gives no KL (its kl() is None), and "
                                   "the KL of an inference-time policy cannot be measured on its samples: its "
                                   "probabilities are unknown; return an analytic value or bound from kl()")
            analytic_kl = (float(kl_value), objective.kl_method(params))
        else:
            groups = generate(policy, self.tokenizer, prompt_ids, cfg, seed=eval_seed, progress=progress)
        self.reporter.finish()
        flat = [(p, k, s) for p, group in enumerate(groups) for k, s in enumerate(group)]
        shown = [prompts[p] for p, _, _ in flat]
        texts = [s.text for _, _, s in flat]
        gold = score(self.gold, shown, texts)
        judged = gold if self.judge is self.gold else score(self.judge, shown, texts)
        if analytic_kl is not None:
            kls, kls_mc, method = [analytic_kl[0]] * len(flat), [None] * len(flat), analytic_kl[1]
        else:
            kls, kls_mc = sample_kl(policy, self.reference, [prompt_ids[p] for p, _, _ in flat],
                                    [s.token_ids for _, _, s in flat], pad_id=self.pad_id,
                                    batch_size=self.ev.batch_size)
            method = KL_SAMPLES
        baseline = self.baseline_scores(temperature, eval_seed, seed)
        outcomes = pair_outcomes(judged, baseline, seed=_win_seed(eval_seed, ti))
        records = []
        for (p, k, s), g, j, b, kl, kl_mc, win in zip(flat, gold, judged, baseline, kls, kls_mc, outcomes):
            record = {"temperature": temperature, "prompt_index": p, "sample_index": k,
                      "completion": s.text, "num_tokens": s.num_tokens, "finished": s.finished, "gold": g,
                      "judge": j, "baseline_judge": b, "win": win, "kl": kl, "kl_mc": kl_mc, "kl_method": method}
            if plan is not None and plan.kind == "inference":
                record["candidate_index"] = s.sample_index
            records.append(record)
        return records


# ----------------------------------------------------------------------------- outputs


@dataclass
class CompareResult:
    """What a compare produced (also written to the compare directory)."""

    rows: list[dict[str, Any]]  # one per (arm, seed, step, temperature): results.jsonl
    aggregate: list[dict[str, Any]]  # one per (arm, step, temperature), over seeds: aggregate.jsonl
    paired: list[dict[str, Any]]  # paired tests: paired.jsonl
    budget: list[dict[str, Any]]  # one per (arm, seed): budget.jsonl
    training: dict[str, dict[int, dict[str, Any]]]  # arm -> seed -> training status
    notes: list[str]  # what could not be done (steps without weights or cached records)


OUTPUTS = {"results": RESULT_COLUMNS, "aggregate": AGGREGATE_COLUMNS, "paired": PAIRED_COLUMNS,
           "budget": BUDGET_COLUMNS}


OUTPUT_FILES = (*(f"{name}.{ext}" for name in OUTPUTS for ext in ("jsonl", "csv")), "frontier.png", "winrate.png",
                "report.md", "compare.resolved.yaml")


def _check_output_files(out_dir: Path) -> None:
    """Refuse, before any work, a folder (or other non-file) where the compare writes one of its files."""
    for name in OUTPUT_FILES:
        path = Path(out_dir) / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise PrefkitError(f"{path} is {what}; prefkit compare writes its {name} there: move it away "
                               "(nothing was changed)")
    for name in ("arms", REFERENCE_ARM):
        path = Path(out_dir) / name
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise PrefkitError(f"{path} is not a folder; prefkit compare keeps its {name} folder there: move it "
                               "away (nothing was changed)")


def write_results(out_dir: Path, result: CompareResult) -> None:
    for name, columns in OUTPUTS.items():
        rows = getattr(result, "rows" if name == "results" else name)
        _write_atomic(out_dir / f"{name}.jsonl", _jsonl(rows))
        _write_atomic(out_dir / f"{name}.csv", rows_csv(rows, columns))


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    return _read_jsonl(Path(out_dir) / "results.jsonl")


# ----------------------------------------------------------------------------- the whole compare


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PrefkitError("prefkit compare draws its plots with matplotlib, which is not installed: "
                           "pip install matplotlib")


def _measured(plan: ArmPlan | None, seed: int, eval_seed: int, step: int, records: list[dict[str, Any]],
              info: dict[str, Any]) -> Measured:
    if plan is None:
        return Measured(REFERENCE_ARM, REFERENCE_ARM, "reference", seed, eval_seed, 0, True, records)
    recipe, objective, params = plan.loaded.recipe, plan.loaded.objective, plan.loaded.params
    return Measured(plan.name, objective.name, plan.kind, seed, eval_seed, step,
                    plan.kind == "inference" or step == plan.total_steps, records,
                    params=params.model_dump(mode="json"),
                    reward=recipe.reward.name if recipe.reward is not None else None,
                    train_overrides=dict(plan.arm.arm.train), train_steps=int(info["steps"]),
                    train_seconds=float(info["train_seconds"]),
                    samples_per_output=int(objective.samples_per_output(params)) if plan.kind == "inference" else 1)


def run_compare(loaded: LoadedCompare, reporter: Reporter | None = None, *, registry: Any) -> CompareResult:
    """Train every arm for every seed (skipping finished ones), evaluate every policy identically at
    every step asked for, write the results, the plots and the report; return what was written."""
    from prefkit.models.loading import load_model, load_tokenizer, resolve_model_dir
    from prefkit.models.rewards import build_reward

    reporter = reporter or SilentReporter()
    compare = loaded.compare
    ev = compare.evaluation
    out_dir = Path(compare.output_dir)
    cache_dir = compare.resolved_cache_dir()
    started = time.perf_counter()

    _require_matplotlib()  # the plots come last; fail before hours of training, not after
    _check_output_files(out_dir)

    # 1. Prompts before any model and any training; then the starting model and the rewards.
    model_cfg = compare.model.model_copy(update={"lora": None})
    model_dir = resolve_model_dir(model_cfg, loaded.model_options, cache_dir, registry)
    tokenizer = load_tokenizer(model_cfg, model_dir, gguf_file=model_cfg.gguf_file)
    prompts = prepare_prompts(loaded, tokenizer, registry)
    reporter.message(f"evaluation prompts: {len(prompts.prompt_ids)} from {prompts.source} ({prompts.split})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "compare.resolved.yaml", dump_yaml(loaded.resolved_dict()))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    handle = load_model(model_cfg, loaded.model_options, cache_dir, head="lm", registry=registry)
    reference = handle.model.to(device).eval()
    params_count = sum(p.numel() for p in reference.parameters())
    gold = build_reward(ev.gold, loaded.gold_params, cache_dir=cache_dir, device=device, registry=registry,
                        key="evaluation.gold")
    judge = gold if ev.judge is None else build_reward(ev.judge, loaded.judge_params, cache_dir=cache_dir,
                                                       device=device, registry=registry, key="evaluation.judge")
    settings = ev.model_dump(mode="json", include={"prompts", "prompts_split", "max_prompts", "temperatures",
                                                   "max_new_tokens", "top_p", "top_k", "num_samples", "batch_size",
                                                   "gold", "judge", "win_against"})
    base_fingerprint = _hash({
        "format": EVAL_FORMAT,
        "evaluation": settings,
        "gold": _reward_identity(ev.gold),
        "judge": _reward_identity(ev.judge) if ev.judge is not None else None,
        "prompts": prompts.fingerprint,
        "reference_weights": handle.weights_fingerprint,
        "tokenizer": handle.tokenizer_fingerprint,
    })
    evaluator = Evaluator(loaded=loaded, prompts=prompts, reference=reference, tokenizer=handle.tokenizer,
                          pad_id=handle.tokenizer.pad_token_id, device=device, gold=gold, judge=judge,
                          base_fingerprint=base_fingerprint, out_dir=out_dir, reporter=reporter, registry=registry)
    counts = DataCounts(loaded, tokenizer, registry)
    prompt_lengths = [len(ids) for ids in prompts.prompt_ids]

    # 2-3. Each seed: the starting policy, then each arm trained and evaluated at its steps.
    measured: list[Measured] = []
    budget: list[dict[str, Any]] = []
    training: dict[str, dict[int, dict[str, Any]]] = {}
    notes: list[str] = []
    for seed in compare.run_seeds:
        eval_seed = ev.seed if ev.seed is not None else seed
        if ev.include_reference:
            found, _ = evaluator.evaluate(None, seed, eval_seed, [0])
            measured.append(_measured(None, seed, eval_seed, 0, found[0], {}))
        for arm in loaded.arms:
            if seed not in compare.arm_seeds(arm.arm):
                continue
            plan = plan_arm(loaded, arm, seed, counts)
            info = train_arm(plan, reporter=reporter, registry=registry)
            training.setdefault(arm.name, {})[seed] = {k: v for k, v in info.items() if k != "summary"}
            found, missing = evaluator.evaluate(plan, seed, eval_seed, plan.eval_steps)
            if missing:
                note = (f"arm {arm.name} seed {seed}: steps {', '.join(map(str, missing))} not evaluated: their "
                        f"checkpoints are gone and no current evaluation of them is cached")
                notes.append(note)
                reporter.message(note)
            if plan.prune:
                prune_checkpoints(plan.run_dir, plan.keep)
            measured += [_measured(plan, seed, eval_seed, step, found[step], info) for step in sorted(found)]
            if plan.kind == "inference":
                budget.append(inference_budget(
                    arm=arm.name, seed=seed, objective=plan.loaded.objective, params=plan.loaded.params,
                    recipe=plan.loaded.recipe, records=[r for records in found.values() for r in records],
                    prompt_lengths=prompt_lengths, params_count=params_count))
            else:
                budget.append(run_budget(arm=arm.name, seed=seed, objective=plan.loaded.objective,
                                         params=plan.loaded.params, recipe=plan.loaded.recipe,
                                         summary=info["summary"], state=final_state(plan.run_dir, int(info["steps"])),
                                         params_count=params_count))

    # 4. Results, plots, report.
    from prefkit.compare.plots import plot_frontier, plot_winrate
    from prefkit.compare.report import write_report

    boot = Bootstrap(ev.bootstrap_resamples, ev.bootstrap_seed, ev.confidence)
    common = {"temperatures": ev.temperatures, "n_prompts": len(prompts.prompt_ids)}
    rows = [row for m in measured for row in seed_rows(m, win_against=ev.win_against, boot=boot, **common)]
    order = {name: i for i, name in enumerate([REFERENCE_ARM] + [a.name for a in loaded.arms])}
    rows.sort(key=lambda r: (order[r["arm"]], r["seed"], r["step"]))
    aggregate = aggregate_rows(sorted(measured, key=lambda m: order[m.arm]), win_against=ev.win_against, boot=boot,
                               **common)
    pairs = ev.paired if ev.paired is not None else (
        [(a.name, REFERENCE_ARM) for a in loaded.arms] if ev.include_reference else [])
    paired = paired_rows(measured, [tuple(p) for p in pairs], at=ev.paired_at, boot=boot, **common)
    result = CompareResult(rows, aggregate, paired, budget, training, notes)
    write_results(out_dir, result)
    plot_frontier(aggregate, out_dir / "frontier.png",
                  panels=[(p.title, p.arms) for p in ev.panels] if ev.panels else None)
    plot_winrate(aggregate, out_dir / "winrate.png")
    write_report(out_dir / "report.md", loaded, result,
                 prompts={"source": prompts.source, "split": prompts.split, "count": len(prompts.prompt_ids)},
                 device=str(device), seconds=time.perf_counter() - started)
    return result
