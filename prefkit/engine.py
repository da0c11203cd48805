"""The engine: one explicit training loop for offline objectives.

Read it top to bottom: ``train`` prepares the run directory, validates and tokenizes the
data (before any model loads), loads the policy, gets the reference log-probs from the
cache or computes them once, then loops over optimizer steps. Everything an objective did
not declare in its ``Needs`` is never built.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

import prefkit
from prefkit.batching import Batch, BatchOrder, collate
from prefkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from prefkit.errors import PrefkitError
from prefkit.logprobs import sequence_logps, sequence_rewards, token_logps
from prefkit.metrics import Averager, MetricsLog
from prefkit.objectives import LossInputs, Needs
from prefkit.optim import build_optimizer
from prefkit.recipe import LoadedRecipe, dump_yaml
from prefkit.refcache import ReferenceCache, ReferenceLogps, get_or_compute, reference_fingerprint

# Keys that may differ between a checkpoint's recipe and the recipe used to resume it.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.save_every", "train.log_every",
                     "train.eval_every", "train.keep_checkpoints"}


class Reporter(Protocol):
    """What the engine tells a user interface. Library code never prints."""

    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, first_step: int, description: str = "train") -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class QuietReporter:
    def message(self, text: str) -> None:
        pass

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        pass

    def step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Precision:
    name: str  # "fp32" | "bf16" | "fp16": what the forward passes run in
    accelerate: str  # accelerate's mixed_precision: "no" | "bf16" | "fp16"


def resolve_precision(requested: str) -> Precision:
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp16" and not cuda:
        raise PrefkitError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return Precision(requested, "no" if requested == "fp32" else requested)


# ----------------------------------------------------------------------------- run directory


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


def prepare_run_dir(run_dir: Path, resolved: dict, resume: bool) -> Path | None:
    """Check the run directory before any heavy work; return the checkpoint to resume, if any."""
    checkpoint = latest_checkpoint(run_dir)
    started = (run_dir / "metrics.jsonl").exists() or checkpoint is not None or (run_dir / "final").exists()
    if not resume:
        if started:
            raise PrefkitError(
                f"output_dir {run_dir} already holds a run; pass --resume to continue it, "
                "or set output_dir=... to start a new one (nothing was changed)"
            )
        return None
    if checkpoint is None:
        return None
    import yaml

    saved = _flatten(yaml.safe_load((checkpoint / "recipe.resolved.yaml").read_text()))
    current = _flatten(resolved)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if changed:
        raise PrefkitError(
            f"cannot resume {checkpoint}: the recipe differs from the one it was trained with in "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed[:5])
        )
    return checkpoint


# ----------------------------------------------------------------------------- forward passes


def loss_inputs(model: torch.nn.Module, batch: Batch, needs: Needs) -> LossInputs:
    """Run the policy (or reward model) on a batch and package what the objective's loss reads."""
    b = batch.num_examples
    mask = batch.completion_mask
    if needs.head == "scalar":
        rewards = sequence_rewards(model, batch)
        inputs = LossInputs(chosen_rewards=rewards[:b], chosen_mask=mask[:b], margin=batch.margin)
        if batch.paired:
            inputs.rejected_rewards, inputs.rejected_mask = rewards[b:], mask[b:]
        return inputs
    values = token_logps(model, batch)
    sums = sequence_logps(values, mask)
    inputs = LossInputs(
        chosen_logps=sums[:b], chosen_token_logps=values[:b], chosen_mask=mask[:b], margin=batch.margin
    )
    if batch.paired:
        inputs.rejected_logps = sums[b:]
        inputs.rejected_token_logps = values[b:]
        inputs.rejected_mask = mask[b:]
    return inputs


def compute_reference(model_handle, examples: list, *, batch_size: int, pad_id: int, paired: bool,
                      accelerator: Accelerator, reporter: Reporter) -> ReferenceLogps:
    """Summed log-probs of every example under the reference policy, in batches sorted by length."""
    model = model_handle.model
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].chosen_ids))
    chosen = torch.zeros(len(examples), dtype=torch.float32)
    rejected = torch.zeros(len(examples), dtype=torch.float32) if paired else None
    was_training = model.training
    model.eval()
    reporter.start(math.ceil(len(order) / batch_size), 0, "reference")
    with torch.no_grad(), model_handle.reference(), accelerator.autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([examples[i] for i in idx], idx, pad_id, paired=paired).to(accelerator.device)
            sums = sequence_logps(token_logps(model, batch), batch.completion_mask).float().cpu()
            chosen[idx] = sums[: len(idx)]
            if paired:
                rejected[idx] = sums[len(idx):]
            reporter.step(start // batch_size + 1, {})
    reporter.finish()
    model.train(was_training)
    return ReferenceLogps(chosen=chosen, rejected=rejected)


def reference_for(dataset, *, model_handle, recipe, precision: Precision, paired: bool,
                  accelerator: Accelerator, pad_id: int, reporter: Reporter) -> tuple[ReferenceLogps, str]:
    key = reference_fingerprint(
        weights=model_handle.weights_fingerprint,
        tokenizer=model_handle.tokenizer_fingerprint,
        data=dataset.fingerprint(),
        precision=precision.name,
        paired=paired,
    )
    cache = ReferenceCache(recipe.resolved_cache_dir() / "reference") if recipe.train.reference_cache else None
    meta = {"model": model_handle.path, "data": dataset.report.source, "split": dataset.report.split,
            "examples": len(dataset.examples), "precision": precision.name, "prefkit": prefkit.__version__}
    return get_or_compute(
        cache, key, len(dataset.examples),
        lambda: compute_reference(model_handle, dataset.examples, batch_size=recipe.train.batch_size,
                                  pad_id=pad_id, paired=paired, accelerator=accelerator, reporter=reporter),
        meta,
    )


def add_reference(inputs: LossInputs, ref: ReferenceLogps | None, indices: torch.Tensor, device) -> None:
    if ref is None:
        return
    chosen, rejected = ref.select(indices)
    inputs.ref_chosen_logps = chosen.to(device)
    inputs.ref_rejected_logps = None if rejected is None else rejected.to(device)


def evaluate(model, objective, params, needs: Needs, dataset, ref: ReferenceLogps | None, *,
             batch_size: int, pad_id: int, accelerator: Accelerator) -> dict[str, float]:
    """Loss and metrics over a whole dataset, without gradients; keys prefixed ``eval/``."""
    averager = Averager()
    was_training = model.training
    model.eval()
    paired = needs.data == "pairs"
    with torch.no_grad():
        for start in range(0, len(dataset.examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(dataset.examples))))
            batch = collate([dataset.examples[i] for i in idx], idx, pad_id, paired=paired).to(accelerator.device)
            with accelerator.autocast():
                inputs = loss_inputs(model, batch, needs)
            add_reference(inputs, ref, batch.indices, accelerator.device)
            out = objective.loss(params, inputs)
            averager.add("loss", out.losses)
            for name, value in out.metrics.items():
                averager.add(name, value)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in averager.result().items()}


# ----------------------------------------------------------------------------- the loop


def total_steps_for(train_cfg, batches_per_epoch: int) -> int:
    if train_cfg.max_steps:
        return train_cfg.max_steps
    return max(1, math.ceil(train_cfg.epochs * batches_per_epoch / train_cfg.grad_accum_steps))


def train(loaded: LoadedRecipe, *, resume: bool = False, reporter: Reporter | None = None,
          registry=None) -> dict[str, Any]:
    """Train with an offline objective; returns the run summary also written to ``run.json``."""
    from prefkit.data import prepare_dataset
    from prefkit.models import load_model, load_tokenizer, resolve_model_dir, save_pretrained

    reporter = reporter or QuietReporter()
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    if objective.kind == "online":
        from prefkit.rollout import train_online

        return train_online(loaded, resume=resume, reporter=reporter, registry=registry)
    if objective.kind != "offline":
        raise PrefkitError(f"objective {objective.name!r} is {objective.kind}; it trains nothing (use `prefkit sample`)")
    cfg = recipe.train
    resolved = loaded.resolved_dict()
    resolved_yaml = dump_yaml(resolved)
    run_dir = Path(recipe.output_dir)
    checkpoint = prepare_run_dir(run_dir, resolved, resume)
    precision = resolve_precision(cfg.precision)
    wall_start = time.perf_counter()

    # Data first: a bad row fails here, before any model is loaded.
    cache_dir = recipe.resolved_cache_dir()
    model_dir = resolve_model_dir(recipe.model, loaded.model_options, cache_dir, registry=registry)
    tokenizer = load_tokenizer(recipe.model, model_dir, gguf_file=recipe.model.gguf_file)
    paired = needs.data == "pairs"
    train_data = prepare_dataset(recipe.data, tokenizer, needs.data, split="train", registry=registry)
    eval_data = (prepare_dataset(recipe.data, tokenizer, needs.data, split="eval", registry=registry)
                 if recipe.data.eval else None)
    for data in filter(None, [train_data, eval_data]):
        r = data.report
        reporter.message(
            f"data {r.source} ({r.split}): {r.rows_kept} of {r.rows_read} rows kept; "
            f"{r.rows_truncated} truncated, {r.rows_dropped_overlong} dropped as too long, "
            f"{r.rows_skipped_bad} bad rows skipped; format {r.format}, chat template {'on' if r.chat_template else 'off'}"
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.resolved.yaml").write_text(resolved_yaml)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")

    set_seed(recipe.seed)
    AcceleratorState._reset_state()  # runs in one process may differ in precision
    accelerator = Accelerator(mixed_precision=precision.accelerate, cpu=not torch.cuda.is_available())
    handle = load_model(recipe.model, loaded.model_options, cache_dir, head=needs.head, registry=registry)
    model = handle.model.to(accelerator.device)
    pad_id = handle.tokenizer.pad_token_id

    # Reference log-probs, from the initial weights (before any checkpoint is loaded).
    ref_train = ref_eval = None
    cache_status = "none"
    if needs.reference:
        reporter.message("reference log-probs: looking up the cache")
        common = dict(model_handle=handle, recipe=recipe, precision=precision, paired=paired,
                      accelerator=accelerator, pad_id=pad_id, reporter=reporter)
        ref_train, cache_status = reference_for(train_data, **common)
        if eval_data is not None:
            ref_eval, _ = reference_for(eval_data, **common)
        reporter.message(f"reference log-probs: cache {cache_status}")

    order = BatchOrder(len(train_data.examples), cfg.batch_size * accelerator.num_processes, recipe.seed)
    total_steps = total_steps_for(cfg, order.batches_per_epoch)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    step, micro, tokens_seen, trained_seconds = 0, 0, 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                scheduler=scheduler)
        step, micro = state["step"], state["micro_batches"]
        tokens_seen, trained_seconds = state["tokens_seen"], state["trained_seconds"]
        metrics_log.truncate_after(step)
        reporter.message(f"resumed from {checkpoint} (step {step})")
    elif resume:
        metrics_log.truncate_after(0)
        reporter.message("no checkpoint to resume from; starting at step 0")

    trainable = [p for p in model.parameters() if p.requires_grad]
    rank, world = accelerator.process_index, accelerator.num_processes
    window = Averager()
    last_metrics: dict[str, float] = {}
    model.train()
    reporter.start(total_steps, step)
    while step < total_steps:
        step_start = time.perf_counter()
        step_tokens = 0
        lr = scheduler.get_last_lr()[0]
        for k in range(cfg.grad_accum_steps):
            idx = order.indices(micro)[rank::world]
            micro += 1
            batch = collate([train_data.examples[i] for i in idx], idx, pad_id, paired=paired)
            batch = batch.to(accelerator.device)
            sync = k == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    inputs = loss_inputs(model, batch, needs)
                add_reference(inputs, ref_train, batch.indices, accelerator.device)
                out = objective.loss(params, inputs)
                loss = out.losses.mean()
                accelerator.backward(loss / cfg.grad_accum_steps)
            window.add("loss", loss)
            for name, value in out.metrics.items():
                window.add(name, value)
            step_tokens += batch.num_tokens
        if cfg.max_grad_norm is not None:
            window.add("grad_norm", accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - step_start
        trained_seconds += seconds
        tokens_seen += step_tokens
        window.add("tokens_per_s", step_tokens / max(seconds, 1e-9))

        do_eval = eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps)
        if step % cfg.log_every == 0 or step == total_steps or do_eval:
            record = {"step": step, "epoch": round(order.epoch_of(micro), 4), **window.result(), "lr": lr}
            if do_eval:
                record.update(evaluate(model, objective, params, needs, eval_data, ref_eval,
                                       batch_size=cfg.batch_size, pad_id=pad_id, accelerator=accelerator))
            if accelerator.is_main_process:
                metrics_log.write(record)
            reporter.step(step, record)
            last_metrics = record
            window = Averager()
            if not math.isfinite(record["loss"]):
                raise PrefkitError(f"loss became {record['loss']} at step {step}; lower train.lr or check the data")
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps) and accelerator.is_main_process:
            save_checkpoint(run_dir, step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                            scheduler=scheduler, keep=cfg.keep_checkpoints, recipe_yaml=resolved_yaml,
                            state={"micro_batches": micro, "tokens_seen": tokens_seen,
                                   "trained_seconds": trained_seconds})
    reporter.finish()

    accelerator.wait_for_everyone()
    if not last_metrics:
        previous = metrics_log.read()
        last_metrics = previous[-1] if previous else {}
    summary = {
        "prefkit_version": prefkit.__version__,
        "plugins": plugin_versions(registry),
        "objective": objective.name,
        "objective_params": resolved["objective"]["params"],
        "model": {"source": recipe.model.source, "path": handle.path, "lora": recipe.model.lora is not None,
                  "weights_fingerprint": handle.weights_fingerprint},
        "data": {"train": train_data.report.__dict__, "train_fingerprint": train_data.fingerprint(),
                 "eval": eval_data.report.__dict__ if eval_data else None},
        "precision": precision.name,
        "device": str(accelerator.device),
        "reference_cache": cache_status,
        "steps": step,
        "examples_per_step": cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes,
        "train_seconds": round(trained_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "tokens_per_s": round(tokens_seen / trained_seconds, 1) if trained_seconds else None,
        "final_metrics": last_metrics,
    }
    if accelerator.is_main_process:
        save_pretrained(accelerator.unwrap_model(model), handle.tokenizer, run_dir / "final")
        (run_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def plugin_versions(registry) -> dict[str, str]:
    from prefkit.plugins import load_registry

    registry = registry or load_registry()
    return {name: f"{info.distribution} {info.version}" for name, info in sorted(registry.plugins.items())}
