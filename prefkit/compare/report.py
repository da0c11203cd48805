"""``report.md``: what a compare did and what came out, for a person to read.

The report states the setup (model, data, seeds, the budget and each arm's overrides, the
evaluation settings, the gold reward and the judge), what every arm consumed (labels, samples,
optimizer steps, tokens, FLOPs, time) and whether that was equal, the results at the final step
with their intervals, the paired tests in plain words (which differences are within noise), both
plots, the curves over training, and how each number was estimated. :func:`console_table` gives
the command line its table (the CLI draws it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefkit.compare.budget import unequal_budgets
from prefkit.compare.recipe import LoadedCompare
from prefkit.compare.results import KL_MATCH_NATS, KL_MATCH_SHARE

FLAG = "⚠"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "–"
    return str(value).replace("|", "\\|")


def _big(value: Any) -> str:
    """Counts with thousands separators (past a billion, in scientific notation)."""
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.4g}" if value < 1e6 else f"{value:.3g}"
    value = int(value)
    return f"{value:,}" if value < 1e9 else f"{value:.3g}"


def interval(row: dict[str, Any], key: str) -> str:
    """``estimate [lo, hi]``, three significant digits."""
    if row.get(key) is None:
        return "–"
    return f"{row[key]:.3g} [{row[f'{key}_lo']:.3g}, {row[f'{key}_hi']:.3g}]"


def _reward(cfg: Any) -> str:
    if cfg is None:
        return "–"
    params = json.dumps(cfg.params, sort_keys=True) if cfg.params else ""
    return f"`{cfg.name}` {params}".strip()


def _set_params(loaded: LoadedCompare) -> dict[str, dict[str, Any]]:
    """Only the params the recipe set for each arm (the resolved defaults are in compare.resolved.yaml)."""
    return {arm.name: dict(arm.arm.params) for arm in loaded.arms}


def final_rows(aggregate: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows over seeds at each arm's final step (the reference and best-of-N: their only step)."""
    last: dict[tuple[str, float], dict[str, Any]] = {}
    for row in aggregate:
        key = (row["arm"], row["temperature"])
        if row["final"] and (key not in last or row["step"] > last[key]["step"]):
            last[key] = row
    return [row for row in aggregate if last.get((row["arm"], row["temperature"])) is row]


def results_table(aggregate: list[dict[str, Any]], confidence: float) -> str:
    pct = f"{confidence * 100:g}%"
    header = ["arm", "objective", "T", "step", f"gold reward [{pct}]", "± std", "KL [" + pct + "]", "KL method",
              f"win rate [{pct}]", "length", "seeds", "samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in final_rows(aggregate):
        flag = f" {FLAG}" if row["std_ge_mean"] else ""
        lines.append("| " + " | ".join([
            row["arm"], row["objective"], _cell(row["temperature"]), str(row["step"]),
            interval(row, "gold_reward") + flag, _cell(row["gold_reward_std"]), interval(row, "kl"), row["kl_method"],
            interval(row, "win_rate"), _cell(row["length"]), str(row["n_seeds"]), str(row["n_samples"])]) + " |")
    return "\n".join(lines)


def curves_table(aggregate: list[dict[str, Any]]) -> str:
    header = ["arm", "T", "step", "gold reward", "KL", "win rate", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in aggregate:
        lines.append("| " + " | ".join([row["arm"], _cell(row["temperature"]), str(row["step"]),
                                        interval(row, "gold_reward"), interval(row, "kl"),
                                        interval(row, "win_rate"), str(row["n_seeds"])]) + " |")
    return "\n".join(lines)


def budget_summary(budget: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One budget row per arm: the mean over its seeds of every number (counts stay integers when
    every seed had the same)."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for row in budget:
        arms.setdefault(row["arm"], []).append(row)
    out = []
    for arm, rows in arms.items():
        merged = dict(rows[0])
        merged["seeds"] = len(rows)
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
                values = [r[key] for r in rows if r.get(key) is not None]
                if len(values) == len(rows):
                    total = sum(values) / len(values)
                    merged[key] = int(total) if all(v == values[0] for v in values) and isinstance(value, int) \
                        else total
        out.append(merged)
    return out


def budget_table(summary: list[dict[str, Any]]) -> str:
    header = ["arm", "kind", "labels", "unit", "epochs", "samples generated", "optimizer steps", "tokens",
              "FLOPs (est.)", "train s", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        tokens = _big(row["tokens"]) + (" (est.)" if row["tokens_source"] == "estimate" else "")
        lines.append("| " + " | ".join([
            row["arm"], row["kind"], _big(row["labels"]), row["label_unit"],
            "–" if row["epochs"] is None else f"{row['epochs']:.3g}", _big(row["samples_generated"]),
            _big(row["optimizer_steps"]), tokens, "–" if row["flops"] is None else f"{row['flops']:.3g}",
            _cell(row["train_seconds"]),
            str(row["seeds"])]) + " |")
    return "\n".join(lines)


def _p(value: float, resamples: int) -> str:
    floor = 2 / (resamples + 1)
    return f"< {floor:.2g}" if value <= floor else f"{value:.2g}"


def paired_table(paired: list[dict[str, Any]], resamples: int) -> str:
    header = ["a − b", "T", "compared at", "Δ gold reward [interval]", "p", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in paired:
        where = (f"step {row['a_step']} (KL {row['a_kl']:.3g}) vs step {row['b_step']} (KL {row['b_kl']:.3g})"
                 + (": **KL not matched**" if row.get("kl_matched") is False else ""))
        lines.append("| " + " | ".join([
            f"{row['a']} − {row['b']}", _cell(row["temperature"]), where,
            f"{row['diff']:+.3g} [{row['diff_lo']:+.3g}, {row['diff_hi']:+.3g}]", _p(row["p_value"], resamples),
            f"**{row['verdict']}**"]) + " |")
    return "\n".join(lines)


def paired_sentences(paired: list[dict[str, Any]], confidence: float) -> list[str]:
    if not paired:
        return ["No pairs were compared."]
    within = [r for r in paired if r["verdict"] == "within noise"]
    pct = f"{confidence * 100:g}%"
    lines = [f"{len(within)} of {len(paired)} differences are **within noise**: their {pct} interval covers 0, "
             "so these data cannot tell the two apart."]
    unmatched = [f"{r['a']} − {r['b']}" for r in paired if r.get("kl_matched") is False]
    if unmatched:
        lines.append(f"{len(unmatched)} of {len(paired)} pairs have no evaluated points at matched KL "
                     f"({', '.join(unmatched)}): they are compared at the nearest KLs they have, which differ, so a "
                     "difference there is not a difference at the same KL.")
    for row in paired:
        if row["verdict"] != "within noise":
            better, worse = (row["a"], row["b"]) if row["diff"] > 0 else (row["b"], row["a"])
            lines.append(f"- At T = {row['temperature']:g}, **{better}** has a higher gold reward than {worse} "
                         f"(by {abs(row['diff']):.3g}, interval [{row['diff_lo']:+.3g}, {row['diff_hi']:+.3g}]).")
    return lines


def evaluated_at(loaded: LoadedCompare) -> str:
    """Which training steps of each arm are evaluated, in words (the report's setup)."""
    ev = loaded.compare.evaluation
    if ev.points:
        steps = f"about {ev.points} evenly spaced points of its training and the last (from the arm's checkpoints)"
    elif ev.every_steps:
        steps = f"every {ev.every_steps} training steps and the last (from the arm's checkpoints)"
    else:
        steps = "the last training step only"
    own = [f"{a.name} at about {a.arm.evaluation_points}" for a in loaded.arms if a.arm.evaluation_points]
    if own:
        steps += "; by their own `evaluation_points`: " + ", ".join(own) + " evenly spaced points"
    return steps


def write_report(path: Path | str, loaded: LoadedCompare, result: Any, *, prompts: dict[str, Any], device: str,
                 seconds: float) -> Path:
    path = Path(path)
    compare = loaded.compare
    ev = compare.evaluation
    train = compare.train
    model = compare.model.source + (f" ({compare.model.gguf_file})" if compare.model.gguf_file else "")
    if compare.model.options:
        model += " " + json.dumps(compare.model.options, sort_keys=True)
    if compare.model.lora is not None:
        model += f", LoRA r={compare.model.lora.r}"
    if compare.budget is not None and compare.budget.labels is not None:
        shared = (f"**{compare.budget.labels} labels per arm** (`budget.labels`): offline arms "
                  "ceil(labels / examples per step) optimizer steps; online arms ceil(labels / (prompts per rollout "
                  "x samples per prompt)) rollouts, one reward call per sample")
    elif compare.budget is not None:
        shared = (f"**{compare.budget.epochs:g} epoch(s)** (`budget.epochs`): offline arms over their own data; "
                  "online arms as many reward calls as the pairs in that many epochs of `data`")
    else:
        shared = f"{train.max_steps} optimizer steps" if train.max_steps else f"{train.epochs:g} epoch(s)"
    shared += (f"; batch {train.batch_size} x {train.grad_accum_steps} accumulation, lr {train.lr:g} "
               f"({train.scheduler}, {train.warmup_steps} warm-up), precision {train.precision}")
    baseline = ("the reference policy's samples at the same temperature (the same prompt, sample index and seed)"
                if ev.win_against == "reference" else "the prompts' chosen answers")
    seeds = compare.run_seeds
    eval_seeds = "the seed itself" if ev.seed is None else f"{ev.seed} for every seed"
    pct = f"{ev.confidence * 100:g}%"
    steps = evaluated_at(loaded)

    lines = [
        "# prefkit compare report",
        "",
        f"Compare recipe `{loaded.path}`, output `{compare.output_dir}`; {len(loaded.arms)} arms x {len(seeds)} "
        f"seed(s); {seconds:.0f} s on {device} for this invocation.",
        "",
        "## Setup",
        "",
        f"- **Model** (the starting policy and π_ref): {model}",
        f"- **Training data**: `{compare.data.label()}` ({compare.data.train_split}), max_length "
        f"{compare.data.max_length}, max_prompt_length {compare.data.max_prompt_length}",
        f"- **Seeds**: {', '.join(map(str, seeds))} (each arm is trained once per seed"
        + "".join(f"; {a.name} only under {', '.join(map(str, compare.arm_seeds(a.arm)))}" for a in loaded.arms
                  if compare.arm_seeds(a.arm) != seeds)
        + f"); evaluation sampling seed: {eval_seeds}",
        f"- **Budget**: {shared}",
        f"- **Reward for arms that need one**: {_reward(compare.reward)}",
        f"- **Evaluation prompts**: {prompts['count']} from `{prompts['source']}` ({prompts['split']})",
        f"- **Evaluated at**: {steps}",
        f"- **Sampling**: temperatures {', '.join(f'{t:g}' for t in ev.temperatures)}; {ev.num_samples} "
        f"sample(s) per prompt; up to {ev.max_new_tokens} new tokens; top_p {ev.top_p:g}"
        + (f"; top_k {ev.top_k}" if ev.top_k else ""),
        f"- **Gold reward**: {_reward(ev.gold)}",
        f"- **Judge** (win rate): {_reward(ev.judge) if ev.judge is not None else 'the gold reward'}; "
        f"baseline: {baseline}",
        f"- **Intervals**: {pct} percentile bootstrap, {ev.bootstrap_resamples} resamples (seed "
        f"{ev.bootstrap_seed}) of the prompts and, over several seeds, of the seeds (see Notes)",
        "",
        "### Arms",
        "",
        "| arm | objective | params | reward | train overrides | training |",
        "|---|---|---|---|---|---|",
    ]
    for arm in loaded.arms:
        info = result.training.get(arm.name, {})
        reward = _reward(arm.loaded.recipe.reward) if arm.loaded.recipe.reward is not None else "–"
        statuses = []
        for seed, item in info.items():
            status = f"seed {seed}: {item.get('status', '–')}"
            if item.get("reference_cache") not in (None, "none"):
                status += f", reference cache {item['reference_cache']}"
            statuses.append(status)
        lines.append(f"| {arm.name} | {arm.loaded.objective.name} | {_cell(dict(arm.arm.params))} | {reward} | "
                     f"{_cell(dict(arm.arm.train))} | {'; '.join(statuses) or '–'} |")

    summary = budget_summary(result.budget)
    unequal = unequal_budgets(summary)
    lines += [
        "",
        "## Budgets",
        "",
        "What each arm consumed, per seed (the mean over seeds). *Labels*: preference pairs (or unpaired labels) "
        "handed to an offline arm, repeats counted; reward calls of an online arm (one per sampled completion); "
        "reward calls of best-of-N at evaluation (N per answer). *Optimizer steps*: online arms take "
        "update_epochs x minibatches per rollout. *FLOPs*: an estimate, P = parameters of the starting model, "
        "T = tokens processed: 6·P·T training (+ 2·P·T_ref for one reference pass over the data), online "
        "(4 + 2·[reference] + 6·update_epochs)·P·T, best-of-N 2·P·N·T_eval; reward-model calls not counted.",
        "",
        budget_table(summary),
        "",
    ]
    if unequal:
        lines += [f"{FLAG} **Budgets differ.** " + " ".join(unequal) + " Differences between these arms may come from "
                  "the budget, not the method.", ""]
    elif any(r["kind"] in ("offline", "online") for r in summary):
        lines += ["Every trained arm consumed the same number of labels.", ""]

    flagged = [r for r in final_rows(result.aggregate) if r["std_ge_mean"]]
    lines += [
        "## Results at the final step",
        "",
        f"Means over seeds and samples, with {pct} bootstrap intervals; `reference` is the starting policy. "
        "Every step is in `aggregate.jsonl`, every seed in `results.jsonl`, every sample in "
        "`arms/<name>/seed-<seed>/eval.jsonl`.",
        "",
        results_table(result.aggregate, ev.confidence),
        "",
    ]
    if flagged:
        shown = ", ".join(sorted({f"{r['arm']} (T={r['temperature']:g})" for r in flagged}))
        lines += [f"{FLAG} **Noise flag**: the gold reward's standard deviation over samples is at least its mean "
                  f"for {shown}: single samples say little there; read the intervals and the paired tests.", ""]
    lines += [
        "## Paired comparisons",
        "",
        "The difference in gold reward between two policies on the same prompts, with the same sampling seeds "
        f"(paired bootstrap; {pct} interval; two-sided p). "
        + ("Pairs are compared at their final steps." if ev.paired_at == "final" else
           "Pairs are compared at matched KL: the evaluated steps, one of each arm, at the highest KL where the two "
           f"arms' KLs differ by at most {KL_MATCH_NATS:g} nat or {KL_MATCH_SHARE:.0%} of the larger, whichever is "
           "more (where no two points are that close, the nearest pair, marked *KL not matched*; a pair with "
           "`reference` at the arm's final step)."),
        "",
        paired_table(result.paired, ev.bootstrap_resamples) if result.paired else "",
        "",
        *paired_sentences(result.paired, ev.confidence),
        "",
        "## Gold reward vs KL",
        "",
        "![gold reward vs KL](frontier.png)",
        "",
        "## Win rate at the final step",
        "",
        "![win rate](winrate.png)",
        "",
        "## Over training",
        "",
        "<details><summary>Every evaluated step (means over seeds, intervals)</summary>",
        "",
        curves_table(result.aggregate),
        "",
        "</details>",
        "",
    ]
    if result.notes:
        lines += ["## Not evaluated", ""] + [f"- {note}" for note in result.notes] + [""]
    lines += [
        "## Notes",
        "",
        "- **Intervals**: percentile bootstrap. For one seed: the evaluation prompts are resampled with "
        "replacement (each prompt's samples stay together). Over several seeds: each resample draws the seeds "
        "with replacement and the prompts with replacement (the same prompts for every seed), and takes the mean "
        "over the drawn seeds of the mean over the drawn prompts, so the interval reflects both the prompts "
        "and the training seed. With few seeds the seed part is crude (two or three values). The same draws "
        "are used for every arm.",
        "- **Paired test**: the per-prompt difference of the two policies' mean gold reward (per seed, for the "
        "seeds both have), resampled as above; p is twice the smaller share of resamples on either side of 0. "
        "*Within noise* means the interval covers 0.",
        "- **KL** (`token_kl`): for each sample y of the policy, Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)), the exact "
        "KL of the two models' next-token distributions summed over the completion, averaged over samples: "
        "an estimate of the sequence-level KL(π‖π_ref) that is never negative and far less noisy than the "
        "log-ratio Σ_t [log π(y_t|·) − log π_ref(y_t|·)] (`kl_mc` in the results). The models' own "
        "distributions (temperature 1) are used, so at another sampling temperature the number is measured "
        "along π_T's samples rather than being the KL of π_T.",
        "- **KL of best-of-N** (`bon_analytic`): the policy's log-prob has no closed form, so the analytic "
        "bound log N − (N−1)/N is reported (Stiennon et al. 2020; Beirami et al. 2024, "
        "https://arxiv.org/abs/2401.01879, show it is an upper bound); it has no interval.",
        "- **Win rate**: the judge compares each policy sample with the baseline of the same prompt and sample "
        "index; a tie counts ½; the A/B order is randomised per pair (the same order for every policy).",
        "- **Length**: completion tokens, the end token included.",
        "- Every policy of one seed was sampled with the same evaluation seed: sample s of prompt p uses the same "
        "random numbers for every policy, so differences come from the policies, not the draws.",
        f"- {FLAG} marks a result whose gold-reward standard deviation over samples is at least its mean.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def console_table(result: Any, loaded: LoadedCompare) -> tuple[str, list[str], list[list[str]]]:
    """The command line's table: every arm at its final step, over seeds, with intervals."""
    ev = loaded.compare.evaluation
    set_params = _set_params(loaded)
    rows = []
    for row in final_rows(result.aggregate):
        params = ", ".join(f"{k}={_cell(v)}" for k, v in set_params.get(row["arm"], {}).items())
        kl = interval(row, "kl") if row["kl_method"] == "token_kl" else f"{row['kl']:.3g} (analytic)"
        gold = interval(row, "gold_reward") + (f" {FLAG}" if row["std_ge_mean"] else "")
        rows.append([row["arm"], row["objective"], params, f"{row['temperature']:g}", gold, kl,
                     interval(row, "win_rate"), str(row["step"]), str(row["n_seeds"])])
    pct = f"{ev.confidence * 100:g}%"
    title = f"compare: gold {ev.gold.name}, win rate vs {ev.win_against}, final step, {pct} intervals"
    if any(row["std_ge_mean"] for row in final_rows(result.aggregate)):
        title += f" ({FLAG}: gold reward std ≥ mean)"
    columns = ["arm", "objective", "params", "T", "gold reward", "KL", "win rate", "step", "seeds"]
    return title, columns, rows

