"""What each arm of a compare consumed: labels, samples, optimizer steps, tokens, FLOPs and time.

Pure functions over what a run directory records (``run.json``, the final checkpoint's
``state.json``) and the arm's recipe; the harness calls :func:`run_budget` once per arm and seed.

Units (docs/compare.md, "Budgets"):

- **labels**: one judgment of the labeller. An offline arm consumes one per training example it
  is handed (a preference pair; an unpaired desirable/undesirable row for KTO; the chosen answer of
  a pair for Preferred-FT), repeats in later epochs counted again. An online arm makes one reward
  call per sampled completion. Best-of-N makes N reward calls per evaluation answer (at
  inference, not training).
- **FLOPs** (an estimate, with P the parameters of the starting model, embeddings included, and T
  the tokens processed, prompt and completion, padding excluded):
  offline ``6·P·T`` for the training passes, plus ``2·P·T_ref`` for the one reference pass over the
  training data when the objective uses a reference (``T_ref`` = T x rows / examples consumed: the
  mean tokens of an example times the rows, counted even when the reference cache had it);
  online ``(2 + 2 + 2·r + 6·E)·P·T`` with T the tokens of every rollout once: sampling (2, with a
  KV cache), the policy's log-prob pass (2), the reference pass (2, r = 1 when the objective uses
  a reference) and E = ``update_epochs`` forward and backward passes (6 each);
  best-of-N ``2·P·N·T_eval``, the N candidates of each evaluation answer taken as long as the kept
  one. Reward-model calls are not counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefkit.loops.checkpoint import checkpoint_steps

BUDGET_COLUMNS = ["arm", "objective", "kind", "seed", "label_unit", "labels", "data_rows", "epochs",
                  "samples_generated", "optimizer_steps", "train_steps", "tokens", "tokens_source", "params_count",
                  "flops", "train_seconds", "wall_seconds"]

LABEL_UNITS = {"pairs": "pairs", "sft": "chosen answers", "unpaired": "unpaired labels"}


def examples_consumed(rows: int, batch_size: int, micro_batches: int) -> int:
    """Examples the offline loop hands out in its first ``micro_batches`` micro-batches of
    ``batch_size`` over ``rows`` examples (each epoch a permutation cut into ceil(rows / batch_size)
    batches, the last one short)."""
    if rows < 1 or batch_size < 1 or micro_batches < 0:
        raise ValueError(f"rows and batch_size must be positive (got {rows}, {batch_size}, {micro_batches})")
    per_epoch = math.ceil(rows / batch_size)
    full, rest = divmod(micro_batches, per_epoch)
    return full * rows + min(rest * batch_size, rows)


def offline_total_steps(max_steps: int | None, epochs: float, rows: int, batch_size: int, grad_accum: int) -> int:
    """The offline loop's optimizer steps (``prefkit.loops.offline.total_steps_for``)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(rows / batch_size) / grad_accum))


def online_total_steps(max_steps: int | None, epochs: float, prompts: int, rollout_batch_size: int) -> int:
    """The online loop's rollouts."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(prompts / rollout_batch_size)))


def final_state(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The ``state.json`` of the run's checkpoint at its last step, if it is still there."""
    for step, path in checkpoint_steps(run_dir):
        if step == steps and (path / "state.json").is_file():
            try:
                return json.loads((path / "state.json").read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def tokens_processed(summary: dict[str, Any], state: dict[str, Any] | None) -> tuple[int | None, str]:
    """Tokens the loop processed, and where the number comes from: ``run.json`` (when the loop
    records ``tokens_seen``), ``checkpoint`` (the final checkpoint's state), or ``estimate``
    (``tokens_per_s`` x ``train_seconds`` of run.json, both rounded there)."""
    if summary.get("tokens_seen") is not None:
        return int(summary["tokens_seen"]), "run.json"
    if state is not None and state.get("tokens_seen") is not None:
        return int(state["tokens_seen"]), "checkpoint"
    rate, seconds = summary.get("tokens_per_s"), summary.get("train_seconds")
    if rate and seconds:
        return int(round(rate * seconds)), "estimate"
    return None, "unknown"


def run_budget(*, arm: str, seed: int, objective: Any, params: Any, recipe: Any, summary: dict[str, Any],
               state: dict[str, Any] | None, params_count: int) -> dict[str, Any]:
    """The budget row of one trained arm and seed (offline or online), from its ``run.json``
    (``summary``), its final checkpoint's ``state`` and its recipe."""
    kind = objective.kind
    needs = objective.needs(params)
    steps = int(summary.get("steps", 0))
    train = recipe.train
    tokens, source = tokens_processed(summary, state)
    row: dict[str, Any] = {"arm": arm, "objective": objective.name, "kind": kind, "seed": seed, "train_steps": steps,
                           "tokens": tokens, "tokens_source": source, "params_count": params_count,
                           "train_seconds": summary.get("train_seconds"), "wall_seconds": summary.get("wall_seconds")}
    rows = int(((summary.get("data") or {}).get("train") or {}).get("rows_kept") or 0)
    if kind == "offline":
        labels = examples_consumed(rows, train.batch_size, steps * train.grad_accum_steps) if rows else None
        flops = None
        if tokens is not None:
            flops = 6 * params_count * tokens
            if needs.reference and labels:
                flops += 2 * params_count * tokens * rows / labels
        row.update(label_unit=LABEL_UNITS.get(needs.data, f"{needs.data} rows"), labels=labels, data_rows=rows,
                   epochs=labels / rows if labels and rows else None, samples_generated=0, optimizer_steps=steps,
                   flops=flops)
        return {key: row[key] for key in BUDGET_COLUMNS}
    per_rollout = params.rollout_batch_size * recipe.sampling.num_samples
    mini_batch = params.mini_batch_size or per_rollout
    samples = steps * per_rollout
    passes = 4 + (2 if needs.reference else 0) + 6 * params.update_epochs
    row.update(label_unit=f"reward calls ({recipe.reward.name})" if recipe.reward is not None else "reward calls",
               labels=samples, data_rows=rows, epochs=None, samples_generated=samples,
               optimizer_steps=steps * params.update_epochs * math.ceil(per_rollout / mini_batch),
               flops=passes * params_count * tokens if tokens is not None else None)
    return {key: row[key] for key in BUDGET_COLUMNS}


def inference_budget(*, arm: str, seed: int, objective: Any, params: Any, recipe: Any,
                     records: list[dict[str, Any]], prompt_lengths: list[int], params_count: int) -> dict[str, Any]:
    """The budget row of an inference arm (best-of-N): what its evaluation cost, from its
    per-sample records (every step and temperature evaluated once)."""
    n = int(objective.samples_per_output(params))
    kept = sum(prompt_lengths[r["prompt_index"]] + int(r["num_tokens"]) for r in records)
    tokens = n * kept
    return {"arm": arm, "objective": objective.name, "kind": "inference", "seed": seed,
            "label_unit": f"reward calls at evaluation ({recipe.reward.name})" if recipe.reward is not None
            else "reward calls at evaluation",
            "labels": n * len(records), "data_rows": None, "epochs": None, "samples_generated": n * len(records),
            "optimizer_steps": 0, "train_steps": 0, "tokens": tokens, "tokens_source": "estimate",
            "params_count": params_count, "flops": 2 * params_count * tokens, "train_seconds": 0.0,
            "wall_seconds": None}


def unequal_budgets(rows: list[dict[str, Any]]) -> list[str]:
    """A plain sentence naming the trained arms whose labels differ from the rest's (one budget row
    per arm, e.g. the mean over seeds); empty when they are all equal. Labels that differ by less
    than one step's worth of the coarsest arm count as equal: an arm can only stop at a whole step
    (PPO after a rollout of 16 reward calls cannot match 479 pairs more closely than 480). When most
    arms share one budget, the sentence names the others against it; otherwise it names every arm.
    Best-of-N is left out: its reward calls are made at evaluation, not in training."""
    trained = [r for r in rows if r["kind"] in ("offline", "online")]
    step = max((r["labels"] / r["train_steps"] for r in trained if r["labels"] and r.get("train_steps")), default=1)
    groups: list[list[dict[str, Any]]] = []  # arms whose labels lie within one step of the group's smallest
    for row in sorted((r for r in trained if r["labels"] is not None), key=lambda r: r["labels"]):
        if groups and row["labels"] - groups[-1][0]["labels"] < max(step, 1):
            groups[-1].append(row)
        else:
            groups.append([row])
    unknown = [r for r in trained if r["labels"] is None]
    if len(groups) + len(unknown) <= 1:
        return []

    def shown(arms: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['arm']} {_number(r['labels'])} {r['label_unit']}" for r in arms)

    common = max(groups, key=len) if groups else []
    in_common = {id(r) for r in common}
    others = [r for r in trained if id(r) not in in_common]
    if len(common) <= len(others):  # no budget most arms share: name them all
        return [f"Unequal label budgets: {shown(trained)}."]
    low, high = common[0]["labels"], common[-1]["labels"]
    span = _number(low) if low == high else f"{_number(low)}–{_number(high)}"
    return [f"Unequal label budgets: {shown(others)}, against {span} for the other {len(common)} trained arms "
            f"({', '.join(r['arm'] for r in common)})."]


def _number(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"
