"""From per-sample records to result rows: one per (arm, seed, step, temperature), their mean over
seeds with intervals, and paired tests between arms. Pure functions; the harness writes the files.

Every interval is a percentile bootstrap (:mod:`prefkit.compare.evaluation`) over the evaluation
prompts — and, for a mean over seeds, over the seeds too — with the same draws for every arm.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefkit.compare.evaluation import bootstrap_interval, mean, paired_difference, std

KL_SAMPLES = "token_kl"  # Σ_t exact next-token KL on the policy's own samples
INTERVAL_KEYS = {"gold_reward": "gold", "kl": "kl", "win_rate": "win"}  # result column -> record field

RESULT_COLUMNS = ["arm", "objective", "params", "reward", "train_overrides", "seed", "eval_seed", "step", "final",
                  "temperature", "gold_reward", "gold_reward_lo", "gold_reward_hi", "gold_reward_std", "kl", "kl_lo",
                  "kl_hi", "kl_std", "kl_method", "kl_mc", "win_rate", "win_rate_lo", "win_rate_hi", "win_against",
                  "length", "n_prompts", "n_samples", "train_steps", "train_seconds", "std_ge_mean"]
AGGREGATE_COLUMNS = ["arm", "objective", "params", "reward", "train_overrides", "step", "final", "temperature",
                     "n_seeds", "seeds", "gold_reward", "gold_reward_lo", "gold_reward_hi", "gold_reward_std",
                     "gold_reward_seed_std", "kl", "kl_lo", "kl_hi", "kl_method", "win_rate", "win_rate_lo",
                     "win_rate_hi", "win_against", "length", "n_prompts", "n_samples", "train_steps",
                     "samples_per_output", "std_ge_mean"]
PAIRED_COLUMNS = ["a", "b", "temperature", "at", "a_step", "b_step", "a_kl", "b_kl", "kl_matched", "a_gold_reward",
                  "b_gold_reward", "diff", "diff_lo", "diff_hi", "p_value", "verdict", "n_seeds", "n_prompts"]


@dataclass
class Bootstrap:
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def interval(self, values: Any) -> tuple[float, float, float]:
        return bootstrap_interval(values, resamples=self.resamples, seed=self.seed, confidence=self.confidence)

    def paired(self, a: Any, b: Any) -> dict[str, Any]:
        return paired_difference(a, b, resamples=self.resamples, seed=self.seed, confidence=self.confidence)


@dataclass
class Measured:
    """One policy measured once: an arm (or the reference) at one seed and training step, with its
    per-sample records at every temperature."""

    arm: str
    objective: str
    kind: str  # "reference" | "offline" | "online" | "inference"
    seed: int
    eval_seed: int
    step: int
    final: bool
    records: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    train_steps: int = 0
    train_seconds: float = 0.0
    samples_per_output: int = 1  # best-of-N: N


def per_prompt(records: list[dict[str, Any]], key: str, n_prompts: int) -> np.ndarray:
    """``[n_prompts]``: the mean of ``key`` over each prompt's samples (records of one temperature)."""
    sums, counts = np.zeros(n_prompts), np.zeros(n_prompts)
    for r in records:
        sums[r["prompt_index"]] += float(r[key])
        counts[r["prompt_index"]] += 1
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)[:3]]
        raise ValueError(f"no samples for prompts {missing}")
    return sums / counts


def _at(records: list[dict[str, Any]], temperature: float) -> list[dict[str, Any]]:
    return [r for r in records if r["temperature"] == temperature]


def _std_ge_mean(mean_value: float, std_value: float) -> bool:
    return bool(std_value > 0 and std_value >= abs(mean_value))


def seed_rows(m: Measured, *, temperatures: list[float], n_prompts: int, win_against: str,
              boot: Bootstrap) -> list[dict[str, Any]]:
    """The rows of one measured policy, one per temperature, with intervals over prompts."""
    rows = []
    for temperature in temperatures:
        at = _at(m.records, temperature)
        gold = [r["gold"] for r in at]
        kls = [r["kl"] for r in at]
        kls_mc = [r["kl_mc"] for r in at if r.get("kl_mc") is not None]
        row: dict[str, Any] = {
            "arm": m.arm, "objective": m.objective, "params": m.params, "reward": m.reward,
            "train_overrides": m.train_overrides, "seed": m.seed, "eval_seed": m.eval_seed, "step": m.step,
            "final": m.final, "temperature": temperature}
        for column, key in INTERVAL_KEYS.items():
            estimate, lo, hi = boot.interval(per_prompt(at, key, n_prompts))
            row.update({column: estimate, f"{column}_lo": lo, f"{column}_hi": hi})
            if column == "gold_reward":
                row["gold_reward_std"] = std(gold)
            if column == "kl":
                row.update(kl_std=std(kls), kl_method=at[0]["kl_method"] if at else KL_SAMPLES,
                           kl_mc=mean(kls_mc) if kls_mc else None)
        row.update(win_against=win_against, length=mean([r["num_tokens"] for r in at]),
                   n_prompts=len({r["prompt_index"] for r in at}), n_samples=len(at), train_steps=m.train_steps,
                   train_seconds=m.train_seconds, std_ge_mean=_std_ge_mean(row["gold_reward"], row["gold_reward_std"]))
        rows.append({k: row[k] for k in RESULT_COLUMNS})
    return rows


def _groups(measured: list[Measured]) -> dict[tuple[str, int], list[Measured]]:
    """Measured policies by (arm, step), in order of first appearance, each group ordered by seed."""
    groups: dict[tuple[str, int], list[Measured]] = {}
    for m in measured:
        groups.setdefault((m.arm, m.step), []).append(m)
    return {key: sorted(group, key=lambda m: m.seed) for key, group in groups.items()}


def matrix(group: list[Measured], key: str, temperature: float, n_prompts: int) -> np.ndarray:
    """``[seeds, prompts]`` per-prompt means of ``key`` at one temperature."""
    return np.stack([per_prompt(_at(m.records, temperature), key, n_prompts) for m in group])


def aggregate_rows(measured: list[Measured], *, temperatures: list[float], n_prompts: int, win_against: str,
                   boot: Bootstrap) -> list[dict[str, Any]]:
    """One row per (arm, step, temperature): the mean over seeds, with the two-level bootstrap
    interval (seeds and prompts resampled), ordered by arm (first appearance), step, temperature."""
    rows = []
    groups = _groups(measured)
    order = sorted(groups, key=lambda key: ([k[0] for k in groups].index(key[0]), key[1]))
    for arm, step in order:
        group = groups[(arm, step)]
        first = group[0]
        for temperature in temperatures:
            at = [r for m in group for r in _at(m.records, temperature)]
            row: dict[str, Any] = {
                "arm": arm, "objective": first.objective, "params": first.params, "reward": first.reward,
                "train_overrides": first.train_overrides, "step": step, "final": all(m.final for m in group),
                "temperature": temperature, "n_seeds": len(group), "seeds": [m.seed for m in group]}
            for column, key in INTERVAL_KEYS.items():
                values = matrix(group, key, temperature, n_prompts)
                estimate, lo, hi = boot.interval(values)
                row.update({column: estimate, f"{column}_lo": lo, f"{column}_hi": hi})
                if column == "gold_reward":
                    seed_means = values.mean(-1)
                    row.update(gold_reward_std=std([r["gold"] for r in at]),
                               gold_reward_seed_std=std(seed_means.tolist()) if len(group) > 1 else None)
                if column == "kl":
                    row["kl_method"] = at[0]["kl_method"] if at else KL_SAMPLES
            row.update(win_against=win_against, length=mean([r["num_tokens"] for r in at]), n_prompts=n_prompts,
                       n_samples=len(at), train_steps=first.train_steps, samples_per_output=first.samples_per_output,
                       std_ge_mean=_std_ge_mean(row["gold_reward"], row["gold_reward_std"]))
            rows.append({k: row[k] for k in AGGREGATE_COLUMNS})
    return rows


# Two evaluated points count as at matched KL when their KLs differ by at most this many nats, or by
# at most this share of the larger KL, whichever is more.
KL_MATCH_NATS = 0.25
KL_MATCH_SHARE = 0.2


def kl_matched(kl_a: float, kl_b: float) -> bool:
    """Whether two points' KLs are close enough to compare their gold rewards as at the same KL."""
    return abs(kl_a - kl_b) <= max(KL_MATCH_NATS, KL_MATCH_SHARE * max(kl_a, kl_b))


def _pick_steps(curves: list[dict[str, Any]], a: str, b: str, temperature: float, at: str,
                reference: str) -> tuple[int, int] | None:
    """The steps of ``a`` and ``b`` to compare: their final steps, or (``matched_kl``) the pair of
    evaluated steps, one of each arm, at the highest KL where the two are matched (:func:`kl_matched`;
    the smaller of the two KLs is what counts); where no pair is matched, the pair whose KLs are
    nearest (the paired row then says so). A pair with the reference is always compared at the other
    arm's final step. ``curves``: rows with ``arm``, ``step``, ``temperature``, ``kl`` and ``final``
    (``aggregate.jsonl``'s, or :func:`_curves`)."""
    by_arm = {name: [r for r in curves if r["arm"] == name and r["temperature"] == temperature] for name in (a, b)}
    if not by_arm[a] or not by_arm[b]:
        return None
    if at == "final" or reference in (a, b):
        finals = {name: [r for r in curve if r["final"]] or curve for name, curve in by_arm.items()}
        return max(r["step"] for r in finals[a]), max(r["step"] for r in finals[b])
    candidates = [(ra, rb) for ra in by_arm[a] for rb in by_arm[b]]
    matched = [(ra, rb) for ra, rb in candidates if kl_matched(ra["kl"], rb["kl"])]
    if matched:
        ra, rb = max(matched, key=lambda p: (min(p[0]["kl"], p[1]["kl"]), -abs(p[0]["kl"] - p[1]["kl"]),
                                              p[0]["step"], p[1]["step"]))
    else:
        ra, rb = min(candidates, key=lambda p: (abs(p[0]["kl"] - p[1]["kl"]), -min(p[0]["kl"], p[1]["kl"]),
                                               -p[0]["step"], -p[1]["step"]))
    return ra["step"], rb["step"]


def _curves(groups: dict[tuple[str, int], list[Measured]], arms: tuple[str, ...], seeds: list[int],
            temperature: float, n_prompts: int) -> list[dict[str, Any]]:
    """Each arm's mean KL and gold reward at each evaluated step, over ``seeds`` only (rows shaped
    like ``aggregate.jsonl``'s, for :func:`_pick_steps`)."""
    rows = []
    for (arm, step), group in groups.items():
        kept = [m for m in group if m.seed in seeds]
        if arm in arms and kept:
            rows.append({"arm": arm, "step": step, "temperature": temperature, "final": kept[0].final,
                         "kl": float(matrix(kept, "kl", temperature, n_prompts).mean()),
                         "gold_reward": float(matrix(kept, "gold", temperature, n_prompts).mean())})
    return rows


def paired_rows(measured: list[Measured], pairs: list[tuple[str, str]], *, temperatures: list[float],
                n_prompts: int, at: str, boot: Bootstrap, reference: str = "reference") -> list[dict[str, Any]]:
    """For each pair and temperature, the paired bootstrap of the difference in gold reward
    (a − b) over the same prompts and the seeds both have, at the steps :func:`_pick_steps` picks
    on the two arms' curves over those seeds (the KL and gold reward it reports are theirs too)."""
    groups = _groups(measured)
    seeds_of: dict[str, set[int]] = {}
    for m in measured:
        seeds_of.setdefault(m.arm, set()).add(m.seed)
    rows = []
    for a, b in pairs:
        for temperature in temperatures:
            # the seeds both arms have (an arm may run under fewer); curves and points over those alone
            seeds = sorted(seeds_of.get(a, set()) & seeds_of.get(b, set()))
            if not seeds:
                continue
            curves = _curves(groups, (a, b), seeds, temperature, n_prompts)
            steps = _pick_steps(curves, a, b, temperature, at, reference)
            if steps is None:
                continue
            at_steps = {m.seed for m in groups[(a, steps[0])]} & {m.seed for m in groups[(b, steps[1])]}
            seeds = [seed for seed in seeds if seed in at_steps]  # both measured at these very steps
            if not seeds:
                continue
            ga = [m for m in groups[(a, steps[0])] if m.seed in seeds]
            gb = [m for m in groups[(b, steps[1])] if m.seed in seeds]
            test = boot.paired(matrix(ga, "gold", temperature, n_prompts), matrix(gb, "gold", temperature, n_prompts))
            point = {name: next(r for r in curves if r["arm"] == name and r["step"] == step)
                     for name, step in ((a, steps[0]), (b, steps[1]))}
            verdict = "within noise" if test["within_noise"] else (f"{a} higher" if test["diff"] > 0 else f"{b} higher")
            where = "final" if (at == "final" or reference in (a, b)) else "matched_kl"
            rows.append({"a": a, "b": b, "temperature": temperature, "at": where,
                         "a_step": steps[0], "b_step": steps[1], "a_kl": point[a]["kl"], "b_kl": point[b]["kl"],
                         "kl_matched": kl_matched(point[a]["kl"], point[b]["kl"]) if where == "matched_kl" else None,
                         "a_gold_reward": point[a]["gold_reward"], "b_gold_reward": point[b]["gold_reward"],
                         "diff": test["diff"], "diff_lo": test["lo"], "diff_hi": test["hi"],
                         "p_value": test["p_value"], "verdict": verdict, "n_seeds": len(seeds),
                         "n_prompts": n_prompts})
    return rows


def rows_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """CSV with the given columns; lists and mappings as JSON, ``None`` as an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else
                         ("" if v is None else v) for k, v in row.items() if k in columns})
    return buffer.getvalue()
