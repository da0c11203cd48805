"""``report.md``: what a compare did and what came out, for a person to read.

The report states the setup (model, data, seed, the shared budget and each arm's overrides, the
evaluation settings, the gold reward and the judge), holds the results table, embeds
``frontier.png`` and ``winrate.png`` with relative links, and notes how each number was estimated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefkit.compare.recipe import LoadedCompare


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "–"
    return str(value).replace("|", "\\|")


def _reward(cfg: Any) -> str:
    if cfg is None:
        return "–"
    params = json.dumps(cfg.params, sort_keys=True) if cfg.params else ""
    return f"`{cfg.name}` {params}".strip()


def _changed_params(row: dict[str, Any], loaded: LoadedCompare) -> dict[str, Any]:
    """Only the params the recipe set for the arm (the resolved defaults are in compare.resolved.yaml)."""
    for arm in loaded.arms:
        if arm.name == row["arm"]:
            return dict(arm.arm.params)
    return {}


def results_table(rows: list[dict[str, Any]], loaded: LoadedCompare | None = None) -> str:
    header = ["arm", "objective", "params", "T", "gold reward", "± std", "KL", "KL method", "KL (log-ratio)", "win rate",
              "length", "samples", "steps", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        params = _changed_params(row, loaded) if loaded is not None else row["params"]
        if row.get("train_overrides"):
            params = {**params, **{f"train.{k}": v for k, v in row["train_overrides"].items()}}
        if row.get("reward"):
            params = {**params, "reward": row["reward"]}
        cells = [row["arm"], row["objective"], _cell(params), _cell(row["temperature"]),
                 _cell(row["gold_reward"]), _cell(row["gold_reward_std"]), _cell(row["kl"]), row["kl_method"],
                 "–" if row.get("kl_mc") is None else _cell(row["kl_mc"]),
                 _cell(row["win_rate"]), _cell(row["length"]), str(row["n_samples"]), str(row["train_steps"]),
                 _cell(row["train_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path: Path | str, loaded: LoadedCompare, rows: list[dict[str, Any]], *,
                 training: dict[str, dict[str, Any]], prompts: dict[str, Any], device: str,
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
    budget = (f"{train.max_steps} optimizer steps" if train.max_steps else f"{train.epochs:g} epoch(s)")
    budget += (f", batch {train.batch_size} x {train.grad_accum_steps} accumulation, lr {train.lr:g} "
               f"({train.scheduler}, {train.warmup_steps} warm-up), precision {train.precision}")
    baseline = ("the reference policy's samples at the same temperature (the same prompt and sample index)"
                if ev.win_against == "reference" else "the prompts' chosen answers")
    seed = compare.seed if ev.seed is None else ev.seed

    lines = [
        "# prefkit compare report",
        "",
        f"Compare recipe `{loaded.path}`, output `{compare.output_dir}`; {len(loaded.arms)} arms; "
        f"{seconds:.0f} s on {device} for this invocation.",
        "",
        "## Setup",
        "",
        f"- **Model** (the starting policy and π_ref): {model}",
        f"- **Training data**: `{compare.data.train}` ({compare.data.train_split}), max_length "
        f"{compare.data.max_length}, max_prompt_length {compare.data.max_prompt_length}",
        f"- **Seed**: {compare.seed} (training), {seed} (evaluation sampling)",
        f"- **Shared budget**: {budget}",
        f"- **Reward for arms that need one**: {_reward(compare.reward)}",
        f"- **Evaluation prompts**: {prompts['count']} from `{prompts['source']}` ({prompts['split']})",
        f"- **Sampling**: temperatures {', '.join(f'{t:g}' for t in ev.temperatures)}; {ev.num_samples} "
        f"sample(s) per prompt; up to {ev.max_new_tokens} new tokens; top_p {ev.top_p:g}"
        + (f"; top_k {ev.top_k}" if ev.top_k else ""),
        f"- **Gold reward**: {_reward(ev.gold)}",
        f"- **Judge** (win rate): {_reward(ev.judge) if ev.judge is not None else 'the gold reward'}; "
        f"baseline: {baseline}",
        "",
        "### Arms",
        "",
        "| arm | objective | params | reward | train overrides | training |",
        "|---|---|---|---|---|---|",
    ]
    for arm in loaded.arms:
        info = training.get(arm.name, {})
        reward = _reward(arm.loaded.recipe.reward) if arm.loaded.recipe.reward is not None else "–"
        status = info.get("status", "–")
        if info.get("reference_cache") not in (None, "none"):
            status += f", reference cache {info['reference_cache']}"
        lines.append(f"| {arm.name} | {arm.loaded.objective.name} | {_cell(dict(arm.arm.params))} | {reward} | "
                     f"{_cell(dict(arm.arm.train))} | {status} |")
    lines += [
        "",
        "## Results",
        "",
        "One row per policy and temperature; `reference` is the starting policy itself. Full precision in "
        "`results.jsonl` and `results.csv`; per-sample records in `arms/<name>/eval.jsonl`.",
        "",
        results_table(rows, loaded),
        "",
        "## Gold reward vs KL",
        "",
        "![gold reward vs KL](frontier.png)",
        "",
        "## Win rate vs temperature",
        "",
        "![win rate vs temperature](winrate.png)",
        "",
        "## Notes",
        "",
        "- **KL** (`token_kl`): for each sample y of the policy, Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)), the exact "
        "KL of the two models' next-token distributions summed over the completion, averaged over samples: "
        "an estimate of the sequence-level KL(π‖π_ref) that is never negative and far less noisy than the "
        "log-ratio Σ_t [log π(y_t|·) − log π_ref(y_t|·)], shown beside it as *KL (log-ratio)*. The models' "
        "own distributions (temperature 1) are used, so at another sampling temperature the number is "
        "measured along π_T's samples rather than being the KL of π_T.",
        "- **KL of best-of-N** (`bon_analytic`): the policy's log-prob has no closed form, so the analytic "
        "bound log N − (N−1)/N is reported (Stiennon et al. 2020; Beirami et al. 2024, "
        "https://arxiv.org/abs/2401.01879, show it is an upper bound). Hollow rings on the frontier mark it.",
        "- **Win rate**: the judge compares each policy sample with the baseline of the same prompt and sample "
        "index; a tie counts ½; the A/B order is randomised per pair (the same order for every policy).",
        "- **Length**: completion tokens, the end token included.",
        "- Every policy was sampled with the same seed: sample s of prompt p uses the same random numbers for "
        "every policy, so differences come from the policies, not the draws.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
