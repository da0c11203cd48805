"""The shared harness behind ``prefkit compare``: train every arm, then measure every policy identically.

:func:`run_compare` reads top to bottom:

1. **Prompts first.** The held-out prompts are read and tokenized (a bad row fails here, before any
   model loads or any arm trains).
2. **Arms.** Each arm trains in ``<output_dir>/arms/<name>/`` with :func:`prefkit.loops.offline.train`
   (offline or online objectives), exactly as ``prefkit run`` would. An arm whose ``run.json``
   exists is finished and skipped; a half-finished arm directory is resumed. Inference objectives
   (best-of-N) train nothing. Arms on the same model, data and precision share one reference pass:
   the engine's on-disk reference cache has the same key for all of them.
3. **Evaluation**, the same for every policy (each arm's ``final/``; best-of-N: the starting model with
   the arm's ``n`` and reward; and the starting policy itself as the ``reference`` row): at each
   temperature, ``num_samples`` completions per prompt, seeded from the compare seed alone (sample
   ``s`` of prompt ``p`` uses the same random numbers for every policy); each scored by the gold
   reward and the judge; KL(π‖π_ref) per sample against the starting model; the win rate against the
   starting policy's samples (generated once per temperature, ``reference_samples_T<t>.jsonl``) or the
   prompts' chosen answers. Per-sample records are cached in ``arms/<name>/eval.jsonl`` under a
   fingerprint of everything that changes them (evaluation settings, prompts, seed, starting model,
   the policy's weights, the reward functions), so a re-run evaluates only what changed.
4. **Results**: ``results.jsonl`` and ``results.csv`` (one row per policy and temperature),
   ``frontier.png``, ``winrate.png`` and ``report.md``.

Library code returns data; the command line shows the table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
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
from prefkit.loops.checkpoint import checkpoint_steps
from prefkit.compare.recipe import REFERENCE_ARM, LoadedArm, LoadedCompare
from prefkit.api.errors import DataError, PrefkitError
from prefkit.compare.evaluation import mean, pair_outcomes, sample_kl, score, std
from prefkit.recipe import DataConfig, SamplingConfig, dump_yaml
from prefkit.loops.runs import RESUMABLE_CHANGES, QuietReporter, Reporter, _flatten

EVAL_FORMAT = 2  # bump when the evaluation records change meaning (2: exact per-token KL, kl_mc beside it)
RESULT_COLUMNS = ["arm", "objective", "params", "reward", "train_overrides", "temperature", "gold_reward",
                  "gold_reward_std", "kl", "kl_std", "kl_method", "kl_mc", "win_rate", "win_against", "length",
                  "n_prompts", "n_samples", "train_steps", "train_seconds"]
EXTENDS_TRAINING = {"train.max_steps", "train.epochs"}  # changes that make a finished arm train on
KL_SAMPLES = "token_kl"  # Σ_t exact next-token KL on the policy's own samples
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


def _answer_text(value: Any) -> str | None:
    """A chosen answer as text: a string, or the content of the last assistant (else last) message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = [m for m in value if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        picked = (assistant or messages)[-1:] if messages else []
        return str(picked[0].get("content", "")) if picked else None
    return None


# ----------------------------------------------------------------------------- prompts


@dataclass
class EvalPrompts:
    prompt_ids: list[list[int]]
    prompts: list[Any]  # raw: strings or message lists
    chosen: list[str] | None  # the prompts' chosen answers (win_against: chosen)
    source: str
    split: str
    fingerprint: str


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
            text = _answer_text(row.get("chosen", row.get("completion")))
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


# ----------------------------------------------------------------------------- training


def _recipe_changes(arm: LoadedArm, run_dir: Path) -> list[str]:
    """Keys where the arm's recipe differs from the one its directory was trained with (none if new)."""
    import yaml

    saved_file = run_dir / "recipe.resolved.yaml"
    if not saved_file.is_file():
        return []
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text()))
    except (OSError, yaml.YAMLError):
        return []
    current = _flatten(yaml.safe_load(dump_yaml(arm.loaded.resolved_dict())))
    ignored = {"output_dir", "cache_dir"}  # where things are kept does not change what was trained
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in ignored)


def train_arm(arm: LoadedArm, *, reporter: Reporter, registry: Any) -> dict[str, Any]:
    """Train one arm unless it is finished; returns ``{"status", "steps", "train_seconds", ...}``."""
    run_dir = Path(arm.loaded.recipe.output_dir)
    if arm.kind == "inference":
        return {"status": "inference", "steps": 0, "train_seconds": 0.0}
    summary_file = run_dir / "run.json"
    changed = _recipe_changes(arm, run_dir)
    if changed and not set(changed) <= RESUMABLE_CHANGES:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise PrefkitError(
            f"arm {arm.name}: {run_dir} was trained with another recipe (it differs in {shown}); "
            f"delete {run_dir} to train the arm again, or give the arm another name (nothing was changed)"
        )
    more_steps = set(changed) & EXTENDS_TRAINING
    if summary_file.is_file() and not more_steps:  # other resumable keys (logging, checkpoints) train nothing
        reporter.message(f"arm {arm.name}: finished before ({summary_file}); not trained again")
        status = "finished"
    elif summary_file.is_file() and not checkpoint_steps(run_dir):
        raise PrefkitError(
            f"arm {arm.name}: finished, and the recipe now asks for more training ({', '.join(sorted(more_steps))}), "
            f"but {run_dir} has no checkpoint left to continue from; delete {run_dir} to train the arm again "
            f"(nothing was changed)"
        )
    else:
        started = bool(checkpoint_steps(run_dir))
        if not started and run_dir.is_dir() and any(run_dir.iterdir()):
            # killed before its first checkpoint: nothing in it can be continued
            reporter.message(f"arm {arm.name}: interrupted before its first checkpoint; training it from the start")
            shutil.rmtree(run_dir)
        reporter.message(f"arm {arm.name}: {'resuming' if started else 'training'} {arm.loaded.objective.name} "
                         f"in {run_dir}")
        loops.train(arm.loaded, resume=started, reporter=reporter, registry=registry)
        status = "resumed" if started else "trained"
    summary = json.loads(summary_file.read_text())
    return {"status": status, "steps": summary.get("steps", 0),
            "train_seconds": summary.get("train_seconds", 0.0),
            "reference_cache": summary.get("reference_cache", "none")}


# ----------------------------------------------------------------------------- evaluation


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
    common_fingerprint: str
    out_dir: Path
    reporter: Reporter
    registry: Any
    _reference_samples: dict[float, list[list[Any]]] = field(default_factory=dict)
    _baselines: dict[float, list[float]] = field(default_factory=dict)
    _scorers: dict[str, Any] = field(default_factory=dict)

    @property
    def ev(self):
        return self.loaded.compare.evaluation

    @property
    def seed(self) -> int:
        return self.loaded.compare.seed if self.ev.seed is None else self.ev.seed

    def sampling(self, temperature: float) -> SamplingConfig:
        ev = self.ev
        return SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=temperature, top_p=ev.top_p,
                              top_k=ev.top_k, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=self.seed)

    def _progress(self, description: str):
        started = {"yes": False}

        def progress(done: int, total: int) -> None:
            if not started["yes"]:
                self.reporter.start(total, 0, description)
                started["yes"] = True
            self.reporter.step(done, {})

        return progress

    # -- the starting policy's samples, generated once per temperature and cached on disk

    def reference_samples(self, temperature: float) -> list[list[Any]]:
        from prefkit.models.sampling import Sample, generate

        if temperature in self._reference_samples:
            return self._reference_samples[temperature]
        path = self.out_dir / f"reference_samples_T{temperature_tag(temperature)}.jsonl"
        fingerprint = _hash([self.common_fingerprint, "reference-samples", temperature])[:16]
        n, k = len(self.prompts.prompt_ids), self.ev.num_samples
        records = _read_jsonl(path)
        if len(records) == n * k and all(r.get("fingerprint") == fingerprint for r in records):
            groups: list[list[Any]] = [[None] * k for _ in range(n)]  # type: ignore[list-item]
            for r in records:
                groups[r["prompt_index"]][r["sample_index"]] = Sample(
                    r["prompt_index"], r["sample_index"], r["completion"], r["token_ids"], r["finished"])
        else:
            self.reporter.message(f"sampling the reference policy at temperature {temperature:g}")
            groups = generate(self.reference, self.tokenizer, self.prompts.prompt_ids, self.sampling(temperature),
                              seed=self.seed, progress=self._progress(f"reference T={temperature:g}"))
            self.reporter.finish()
            records = [{"fingerprint": fingerprint, "temperature": temperature, "prompt_index": s.prompt_index,
                        "sample_index": s.sample_index, "completion": s.text, "token_ids": s.token_ids,
                        "num_tokens": s.num_tokens, "finished": s.finished}
                       for group in groups for s in group]
            _write_atomic(path, _jsonl(records))
        self._reference_samples[temperature] = groups
        return groups

    def baseline_scores(self, temperature: float) -> list[float]:
        """The judge's score of the baseline answer for each (prompt, sample), in that order."""
        if temperature not in self._baselines:
            k = self.ev.num_samples
            if self.ev.win_against == "chosen":
                assert self.prompts.chosen is not None
                scores = score(self.judge, self.prompts.prompts, self.prompts.chosen)
                self._baselines[temperature] = [s for s in scores for _ in range(k)]
            else:
                flat = [s for group in self.reference_samples(temperature) for s in group]
                self._baselines[temperature] = score(
                    self.judge, [self.prompts.prompts[s.prompt_index] for s in flat], [s.text for s in flat])
        return self._baselines[temperature]

    def scorer_for(self, cfg: Any, params: Any) -> Any:
        from prefkit.models.rewards import build_reward

        key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        if key == json.dumps(self.ev.gold.model_dump(mode="json"), sort_keys=True):
            return self.gold
        if key not in self._scorers:
            self._scorers[key] = build_reward(cfg, params, cache_dir=self.loaded.compare.resolved_cache_dir(),
                                              device=self.device, registry=self.registry)
        return self._scorers[key]

    # -- one policy

    def policy_fingerprint(self, arm: LoadedArm | None) -> dict[str, Any]:
        if arm is None:
            return {"policy": REFERENCE_ARM}
        if arm.kind == "inference":
            recipe = arm.loaded.recipe
            return {"policy": "inference", "objective": arm.loaded.objective.name,
                    "params": arm.loaded.params.model_dump(mode="json"),
                    "reward": _reward_identity(recipe.reward) if recipe.reward is not None else None}
        final = Path(arm.loaded.recipe.output_dir) / "final"
        return {"policy": "trained", "weights": _hash_files(final)}

    def evaluate(self, arm: LoadedArm | None) -> list[dict[str, Any]]:
        """Per-sample records of one policy at every temperature (from the cache when it is current)."""
        name = REFERENCE_ARM if arm is None else arm.name
        cache = (self.out_dir / f"{REFERENCE_ARM}_eval.jsonl" if arm is None
                 else Path(arm.loaded.recipe.output_dir) / "eval.jsonl")
        fingerprint = _hash([self.common_fingerprint, self.policy_fingerprint(arm)])[:16]
        expected = len(self.ev.temperatures) * len(self.prompts.prompt_ids) * self.ev.num_samples
        records = _read_jsonl(cache)
        if len(records) == expected and all(r.get("fingerprint") == fingerprint for r in records):
            self.reporter.message(f"evaluation of {name}: up to date ({cache})")
            return records
        policy = None
        if arm is not None and arm.kind != "inference":
            from prefkit.models.loading import load_model
            from prefkit.recipe import ModelConfig

            final = Path(arm.loaded.recipe.output_dir) / "final"
            handle = load_model(ModelConfig(source=str(final)), None, self.loaded.compare.resolved_cache_dir(),
                                head="lm", registry=self.registry)
            policy = handle.model.to(self.device).eval()
        records = []
        for ti, temperature in enumerate(self.ev.temperatures):
            self.reporter.message(f"evaluating {name} at temperature {temperature:g}")
            records += self._evaluate_at(arm, policy, temperature, ti, fingerprint)
        del policy
        _write_atomic(cache, _jsonl(records))
        return records

    def _evaluate_at(self, arm: LoadedArm | None, policy: torch.nn.Module | None, temperature: float,
                     ti: int, fingerprint: str) -> list[dict[str, Any]]:
        from prefkit.models.sampling import generate

        cfg = self.sampling(temperature)
        prompts, prompt_ids = self.prompts.prompts, self.prompts.prompt_ids
        name = REFERENCE_ARM if arm is None else arm.name
        progress = self._progress(f"{name} T={temperature:g}")
        analytic_kl = None  # an inference objective's own KL, when it knows it
        if arm is None:
            groups = self.reference_samples(temperature)
            policy = self.reference
        elif arm.kind == "inference":
            recipe = arm.loaded.recipe
            objective, params = arm.loaded.objective, arm.loaded.params
            scorer = self.scorer_for(recipe.reward, arm.loaded.reward_params) if recipe.reward is not None else None
            groups = objective.sample(params, self.reference, self.tokenizer, prompt_ids, prompts, scorer, cfg,
                                      seed=self.seed, num_samples=cfg.num_samples, progress=progress)
            kl_value = objective.kl(params)
            if kl_value is not None:
                analytic_kl = (float(kl_value), objective.kl_method(params))
        else:
            groups = generate(policy, self.tokenizer, prompt_ids, cfg, seed=self.seed, progress=progress)
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
                            [s.token_ids for _, _, s in flat], pad_id=self.pad_id, batch_size=self.ev.batch_size)
            method = KL_SAMPLES
        baseline = self.baseline_scores(temperature)
        outcomes = pair_outcomes(judged, baseline, seed=_win_seed(self.seed, ti))
        records = []
        for (p, k, s), g, j, b, kl, kl_mc, win in zip(flat, gold, judged, baseline, kls, kls_mc, outcomes):
            record = {"fingerprint": fingerprint, "temperature": temperature, "prompt_index": p, "sample_index": k,
                      "completion": s.text, "num_tokens": s.num_tokens, "finished": s.finished, "gold": g,
                      "judge": j, "baseline_judge": b, "win": win, "kl": kl, "kl_mc": kl_mc, "kl_method": method}
            if arm is not None and arm.kind == "inference":
                record["candidate_index"] = s.sample_index
            records.append(record)
        return records


# ----------------------------------------------------------------------------- rows


def aggregate(name: str, objective: str, params: dict, reward: str | None, train_overrides: dict,
              records: list[dict], *, win_against: str, temperatures: list[float], train_steps: int,
              train_seconds: float) -> list[dict[str, Any]]:
    rows = []
    for temperature in temperatures:
        at = [r for r in records if r["temperature"] == temperature]
        gold = [r["gold"] for r in at]
        kls = [r["kl"] for r in at]
        kls_mc = [r["kl_mc"] for r in at if r.get("kl_mc") is not None]
        rows.append({
            "arm": name,
            "objective": objective,
            "params": params,
            "reward": reward,
            "train_overrides": train_overrides,
            "temperature": temperature,
            "gold_reward": mean(gold),
            "gold_reward_std": std(gold),
            "kl": mean(kls),
            "kl_std": std(kls),
            "kl_method": at[0]["kl_method"] if at else KL_SAMPLES,
            "kl_mc": mean(kls_mc) if kls_mc else None,
            "win_rate": mean([r["win"] for r in at]),
            "win_against": win_against,
            "length": mean([r["num_tokens"] for r in at]),
            "n_prompts": len({r["prompt_index"] for r in at}),
            "n_samples": len(at),
            "train_steps": train_steps,
            "train_seconds": train_seconds,
        })
    return rows


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else
                         ("" if v is None else v) for k, v in row.items() if k in RESULT_COLUMNS})
    return buffer.getvalue()


def write_results(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(out_dir / "results.jsonl", _jsonl(rows))
    _write_atomic(out_dir / "results.csv", rows_csv(rows))


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    return _read_jsonl(Path(out_dir) / "results.jsonl")


# ----------------------------------------------------------------------------- the whole compare


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PrefkitError("prefkit compare draws its plots with matplotlib, which is not installed: "
                           "pip install 'prefkit[plots]' (or pip install matplotlib)")


def run_compare(loaded: LoadedCompare, reporter: Reporter | None = None, *, registry: Any) -> list[dict[str, Any]]:
    """Train every arm (skipping finished ones), evaluate every policy identically, write the results.

    Returns the result rows (one per policy and temperature; see ``RESULT_COLUMNS``).
    """
    from prefkit.models.loading import load_model, load_tokenizer, resolve_model_dir
    from prefkit.models.rewards import build_reward

    reporter = reporter or QuietReporter()
    compare = loaded.compare
    ev = compare.evaluation
    out_dir = Path(compare.output_dir)
    cache_dir = compare.resolved_cache_dir()
    started = time.perf_counter()

    _require_matplotlib()  # the plots come last; fail before hours of training, not after

    # 1. Prompts before any model and any training.
    model_cfg = compare.model.model_copy(update={"lora": None})
    model_dir = resolve_model_dir(model_cfg, loaded.model_options, cache_dir, registry)
    tokenizer = load_tokenizer(model_cfg, model_dir, gguf_file=model_cfg.gguf_file)
    prompts = prepare_prompts(loaded, tokenizer, registry)
    reporter.message(f"evaluation prompts: {len(prompts.prompt_ids)} from {prompts.source} ({prompts.split})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "compare.resolved.yaml", dump_yaml(loaded.resolved_dict()))

    # 2. Train the arms.
    training = {arm.name: train_arm(arm, reporter=reporter, registry=registry) for arm in loaded.arms}

    # 3. Evaluate every policy the same way.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    handle = load_model(model_cfg, loaded.model_options, cache_dir, head="lm", registry=registry)
    reference = handle.model.to(device).eval()
    gold = build_reward(ev.gold, loaded.gold_params, cache_dir=cache_dir, device=device, registry=registry)
    judge = gold if ev.judge is None else build_reward(ev.judge, loaded.judge_params, cache_dir=cache_dir,
                                                       device=device, registry=registry)
    settings = ev.model_dump(mode="json", exclude={"include_reference"})
    settings["seed"] = compare.seed if ev.seed is None else ev.seed
    common = _hash({
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
                          common_fingerprint=common, out_dir=out_dir, reporter=reporter, registry=registry)

    rows: list[dict[str, Any]] = []
    agg = {"win_against": ev.win_against, "temperatures": ev.temperatures}
    if ev.include_reference:
        records = evaluator.evaluate(None)
        rows += aggregate(REFERENCE_ARM, REFERENCE_ARM, {}, None, {}, records, train_steps=0, train_seconds=0.0,
                          **agg)
    for arm in loaded.arms:
        records = evaluator.evaluate(arm)
        recipe = arm.loaded.recipe
        info = training[arm.name]
        rows += aggregate(arm.name, arm.loaded.objective.name, arm.loaded.params.model_dump(mode="json"),
                          recipe.reward.name if recipe.reward is not None else None, dict(arm.arm.train), records,
                          train_steps=int(info["steps"]), train_seconds=float(info["train_seconds"]), **agg)

    # 4. Results, plots, report.
    from prefkit.compare.plots import plot_frontier, plot_winrate
    from prefkit.compare.report import write_report

    write_results(out_dir, rows)
    plot_frontier(rows, out_dir / "frontier.png")
    plot_winrate(rows, out_dir / "winrate.png")
    write_report(out_dir / "report.md", loaded, rows, training=training,
                 prompts={"source": prompts.source, "split": prompts.split, "count": len(prompts.prompt_ids)},
                 device=str(device), seconds=time.perf_counter() - started)
    return rows
