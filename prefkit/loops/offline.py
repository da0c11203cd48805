"""The offline loop: one explicit training loop for offline objectives (a loss over fixed data).

Read it top to bottom: ``train`` prepares the run directory, validates and tokenizes the
data (before any model loads), loads the policy, gets the reference log-probs from the
cache or computes them once, then loops over optimizer steps. Everything an objective did
not declare in its ``Needs`` is never built.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from accelerate import Accelerator

import prefkit
from prefkit.data.batching import Batch, BatchOrder, collate
from prefkit.models.logprobs import sequence_logps, sequence_rewards, token_logps
from prefkit.loops.metrics import Averager, PhaseClock
from prefkit.api import LossInputs, Needs
from prefkit.loops.optim import build_optimizer
from prefkit.recipe import LoadedRecipe
from prefkit.models.refcache import ReferenceCache, ReferenceLogps, get_or_compute, reference_fingerprint
from prefkit.api.reporting import Reporter, SilentReporter
from prefkit.loops.runs import (
    Precision,
    begin_run,
    check_loss_output,
    check_resumable,
    check_step,
    describe_data,
    everyone_or_nobody,
    gradient_norm,
    last_logged,
    make_accelerator,
    open_run_dir,
    plugin_call,
    reduce_window,
    restore,
    save_final_model,
    start_run_trackers,
    summary_head,
    write_checkpoint,
    write_summary,
)

# ----------------------------------------------------------------------------- forward passes


def loss_inputs(model: torch.nn.Module, batch: Batch, needs: Needs) -> LossInputs:
    """Run the policy (or reward model) on a batch and package what the objective's loss reads."""
    inputs = LossInputs(columns=batch.columns)
    for name in batch.names:
        inputs.masks[name] = batch.completion_mask[batch.rows_of(name)]
    if needs.head == "scalar":
        rewards = sequence_rewards(model, batch)
        inputs.rewards = {name: rewards[batch.rows_of(name)] for name in batch.names}
        return inputs
    values = token_logps(model, batch)
    sums = sequence_logps(values, batch.completion_mask)
    for name in batch.names:
        rows = batch.rows_of(name)
        inputs.logps[name], inputs.token_logps[name] = sums[rows], values[rows]
    return inputs


def training_batches(order: BatchOrder, rank: int, world: int) -> list[list[int]]:
    """This process's rows of every micro-batch of the first epoch, as the loop forwards them."""
    return [share for k in range(order.batches_per_epoch) if (share := order.indices(k)[rank::world])]


def evaluation_batches(num_examples: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of an evaluation: consecutive examples, every ``world``-th batch."""
    return [list(range(start, min(start + batch_size, num_examples)))
            for start in range(0, num_examples, batch_size)[rank::world]]


# fp32 reference passes batch this many times each process's training micro-batch: a forward pass
# without gradients over 2B rows holds less memory than a training step over B rows (which keeps
# every layer's activations for the backward pass), and the larger matmuls run faster (SmolLM2 on 2
# CPU cores: the quickstart's reference pass took 13% less time at 8 pairs than at 4, docs/benchmarks.md).
REFERENCE_BATCH_FACTOR = 2


def length_batches(dataset, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of the examples sorted by length (least padding): every ``world``-th."""
    examples, first = dataset.examples, dataset.names[0]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].completions[first]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)[rank::world]]


def compute_reference(model_handle, dataset, *, batches: list[list[int]], pad_id: int, tokens: bool,
                      accelerator: Accelerator, reporter: Reporter) -> ReferenceLogps:
    """Reference log-probs of every example and completion, computed in ``batches`` (this process's
    share; every example in one batch of one process)."""
    model, examples, names = model_handle.model, dataset.examples, dataset.names
    sums = {name: torch.zeros(len(examples), dtype=torch.float32) for name in names}
    runs: dict[str, list] = {name: [None] * len(examples) for name in names}
    was_training = model.training
    model.eval()
    reporter.start(len(batches), 0, "reference log-probs")
    with torch.no_grad(), model_handle.reference(), accelerator.autocast():
        for done, idx in enumerate(batches, start=1):
            batch = collate([examples[i] for i in idx], idx, pad_id, names).to(accelerator.device)
            values = token_logps(model, batch).float()
            batch_sums = sequence_logps(values, batch.completion_mask).cpu()
            for name in names:
                rows = batch.rows_of(name)
                sums[name][idx] = batch_sums[rows]
                if tokens:
                    mask, name_values = batch.completion_mask[rows], values[rows].cpu()
                    for j, i in enumerate(idx):
                        runs[name][i] = name_values[j][mask[j].cpu()]
            reporter.step(done, {})
    reporter.finish()
    model.train(was_training)
    if accelerator.num_processes > 1:  # each process computed its share of the batches: put them together
        from accelerate.utils import gather_object

        for name in names:
            sums[name] = accelerator.reduce(sums[name].to(accelerator.device), reduction="sum").cpu()
            if tokens:
                for shard in gather_object([{i: run for i, run in enumerate(runs[name]) if run is not None}]):
                    for i, run in shard.items():
                        runs[name][i] = run
    found = ReferenceLogps(sums=sums)
    if tokens:
        for name in names:
            lengths = torch.tensor([0] + [len(run) for run in runs[name]])
            found.tokens[name] = torch.cat(runs[name]) if runs[name] else torch.zeros(0)
            found.offsets[name] = torch.cumsum(lengths, 0)
    return found


def reference_for(dataset, *, batches: list[list[list[int]]], model_handle, recipe, precision: Precision,
                  tokens: bool, accelerator: Accelerator, pad_id: int, reporter: Reporter) -> tuple[ReferenceLogps, str]:
    """The reference log-probs of ``dataset``, from the cache or computed once.

    A row's log-probs depend a little on the rows batched with it: matrix kernels round differently
    for other shapes. In bf16 or fp16 that is about 0.1 nats a sequence (SmolLM2), so there the
    rows are computed in ``batches[rank]``, the very batches each process's loop will forward
    (:func:`training_batches`, :func:`evaluation_batches`), and the entry is keyed on them: the
    initial policy's log-probs then equal the reference's bit for bit, and a DPO run starts at
    exactly log 2. In fp32 it is below 1e-4 nats, so there the rows are batched by length (least
    padding) into one entry that every seed, batch order and process count shares, in batches of
    :data:`REFERENCE_BATCH_FACTOR` times a process's share of the training batch."""
    world = accelerator.num_processes
    if precision.name == "fp32":
        size = max(1, REFERENCE_BATCH_FACTOR * recipe.train.batch_size // world)  # batch_size is the global batch
        batches = [length_batches(dataset, size, rank, world) for rank in range(world)]
        keyed_on = None
    else:
        keyed_on = batches
    key = reference_fingerprint(
        weights=model_handle.weights_fingerprint,
        tokenizer=model_handle.tokenizer_fingerprint,
        data=dataset.fingerprint(),
        precision=precision.name,
        names=dataset.names,
        tokens=tokens,
        batches=keyed_on,
    )
    cache = ReferenceCache(recipe.resolved_cache_dir() / "reference") if recipe.train.reference_cache else None
    meta = {"model": model_handle.path, "data": dataset.report.source, "split": dataset.report.split,
            "examples": len(dataset.examples), "completions": list(dataset.names), "tokens": tokens,
            "precision": precision.name, "prefkit": prefkit.__version__}
    return get_or_compute(
        cache, key, len(dataset.examples), dataset.names, tokens,
        lambda: compute_reference(model_handle, dataset, batches=batches[accelerator.process_index], pad_id=pad_id,
                                  tokens=tokens, accelerator=accelerator, reporter=reporter),
        meta, warn=reporter.message, store=accelerator.is_main_process,
    )


def add_reference(inputs: LossInputs, ref: ReferenceLogps | None, indices: torch.Tensor, device) -> None:
    if ref is None:
        return
    inputs.ref_logps = {name: values.to(device) for name, values in ref.select(indices).items()}
    if ref.tokens:
        inputs.ref_token_logps = {name: values.to(device)
                                  for name, values in ref.select_tokens(indices, inputs.masks).items()}


def evaluate(model, objective, params, needs: Needs, dataset, ref: ReferenceLogps | None, *,
             batch_size: int, pad_id: int, accelerator: Accelerator) -> dict[str, float]:
    """Loss and metrics over a whole dataset, without gradients; keys prefixed ``eval/``. Each
    process evaluates every ``num_processes``-th batch; the sums are added over processes."""
    averager = Averager()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in evaluation_batches(len(dataset.examples), batch_size, accelerator.process_index,
                                      accelerator.num_processes):
            batch = collate([dataset.examples[i] for i in idx], idx, pad_id, dataset.names).to(accelerator.device)
            with accelerator.autocast():
                inputs = loss_inputs(model, batch, needs)
            add_reference(inputs, ref, batch.indices, accelerator.device)
            out = check_loss_output(objective, plugin_call(objective, "loss()", lambda: objective.loss(params, inputs)),
                                    rows=len(idx), needs_grad=False)
            averager.add("loss", out.losses)
            for name, value in out.metrics.items():
                averager.add(name, value)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in reduce_window(accelerator, averager).result().items()}


# ----------------------------------------------------------------------------- the loop


def total_steps_for(train_cfg, batches_per_epoch: int) -> int:
    if train_cfg.max_steps:
        return train_cfg.max_steps
    return max(1, math.ceil(train_cfg.epochs * batches_per_epoch / train_cfg.grad_accum_steps))


def train(loaded: LoadedRecipe, *, resume: bool = False, reporter: Reporter | None = None,
          registry: Any) -> dict[str, Any]:
    """Train with the recipe's objective; returns the run summary also written to ``run.json``."""
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import enable_gradient_checkpointing, load_model

    reporter = reporter or SilentReporter()
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    cfg = recipe.train
    setup = begin_run(loaded, resume, registry)

    # Data first: a bad row fails here, before any model is loaded.
    kind = registry.data_kinds[needs.data]
    reader = f"objective {objective.name!r}"
    train_data = prepare_dataset(recipe.data, setup.tokenizer, kind, split="train", registry=registry,
                                 mismatched=needs.mismatched, needed_by=reader)
    eval_data = (prepare_dataset(recipe.data, setup.tokenizer, kind, split="eval", registry=registry,
                                 mismatched=needs.mismatched, needed_by=reader) if recipe.data.eval else None)
    for data in filter(None, [train_data, eval_data]):
        reporter.message(describe_data("data", data.report))

    accelerator = make_accelerator(setup)
    order = BatchOrder(len(train_data.examples), cfg.batch_size, recipe.seed)  # the global batch
    total_steps = total_steps_for(cfg, order.batches_per_epoch)
    check_resumable(setup, total_steps=total_steps, data_fingerprint=train_data.fingerprint())
    metrics_log = open_run_dir(setup, reporter, accelerator)
    trackers = start_run_trackers(setup, accelerator)
    handle = load_model(recipe.model, loaded.model_options, setup.cache_dir, head=needs.head, registry=registry)
    model = handle.model.to(accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pad_id = handle.tokenizer.pad_token_id

    # Reference log-probs, from the initial weights (before any checkpoint is loaded).
    ref_train = ref_eval = None
    cache_status = "none"
    reference_started = time.perf_counter()
    if needs.reference:
        common = dict(model_handle=handle, recipe=recipe, precision=setup.precision, tokens=needs.reference_tokens,
                      accelerator=accelerator, pad_id=pad_id, reporter=reporter)
        world = accelerator.num_processes
        ref_train, cache_status = reference_for(
            train_data, batches=[training_batches(order, rank, world) for rank in range(world)], **common)
        if eval_data is not None:
            ref_eval, _ = reference_for(eval_data, batches=[
                evaluation_batches(len(eval_data.examples), cfg.batch_size, rank, world) for rank in range(world)],
                **common)
        reporter.message(f"reference log-probs: cache {cache_status}")
    reference_seconds = time.perf_counter() - reference_started

    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    restored = restore(setup, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                       metrics_log=metrics_log, reporter=reporter, total_steps=total_steps, accelerator=accelerator)
    state = restored.state or {}
    step, micro = restored.step, state.get("micro_batches", 0)
    tokens_seen, trained_seconds = state.get("tokens_seen", 0), state.get("trained_seconds", 0.0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    rank, world = accelerator.process_index, accelerator.num_processes
    window = restored.window
    clock = PhaseClock(state.get("seconds_by_phase"))
    last_metrics: dict[str, float] = {}
    model.train()
    reporter.start(total_steps, step)
    while step < total_steps:
        step_start = time.perf_counter()
        clock.restart()
        step_tokens = 0
        loss_finite = True
        lr = scheduler.get_last_lr()[0]
        for k in range(cfg.grad_accum_steps):
            # every process takes its share of the global micro-batch; one left without rows runs one
            # row at weight 0, since every process must take part in every backward pass
            whole = order.indices(micro)
            idx, weight = whole[rank::world] or whole[:1], float(bool(whole[rank::world]))
            micro += 1
            batch = collate([train_data.examples[i] for i in idx], idx, pad_id, train_data.names)
            batch = batch.to(accelerator.device)
            clock.lap("batch")
            sync = k == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    inputs = loss_inputs(model, batch, needs)
                add_reference(inputs, ref_train, batch.indices, accelerator.device)
                out = check_loss_output(objective, plugin_call(objective, "loss()", lambda: objective.loss(params, inputs)),
                                        rows=len(idx), needs_grad=bool(trainable))
                loss = out.losses.mean()
                loss_finite = loss_finite and bool(torch.isfinite(loss.detach()))
                # each process's share of the global mean (gradients are averaged over processes)
                share = loss if world == 1 else out.losses.sum() * (weight * world / len(whole))
                clock.lap("forward_and_loss")
                accelerator.backward(share / cfg.grad_accum_steps)
                clock.lap("backward")
            if weight:
                window.add("loss", loss, weight=len(idx))
                for name, value in out.metrics.items():
                    window.add(name, value)
                step_tokens += batch.num_tokens
        # Nothing non-finite reaches the weights: the loss and the gradient are checked before the step.
        grad_norm = gradient_norm(accelerator, trainable, cfg.max_grad_norm, setup.precision.name)
        if world > 1:  # every process stops on a bad loss anywhere; tokens count over all processes
            bad, step_tokens = accelerator.reduce(torch.tensor([float(not loss_finite), float(step_tokens)],
                                                               device=accelerator.device), reduction="sum").tolist()
            loss_finite, step_tokens = bad == 0, int(step_tokens)
        check_step(objective, step + 1, loss_finite=loss_finite, grad_norm=grad_norm, precision=setup.precision.name)
        if cfg.max_grad_norm is not None:
            window.add("grad_norm", grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        step += 1
        seconds = time.perf_counter() - step_start
        trained_seconds += seconds
        tokens_seen += step_tokens
        window.add("tokens_per_s", step_tokens / max(seconds, 1e-9))

        do_eval = eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps)
        if step % cfg.log_every == 0 or step == total_steps or do_eval:
            window = reduce_window(accelerator, window)
            record = {"step": step, "epoch": round(order.epoch_of(micro), 4), **window.result(), "lr": lr}
            if do_eval:
                record.update(evaluate(accelerator.unwrap_model(model), objective, params, needs, eval_data, ref_eval,
                                       batch_size=cfg.batch_size, pad_id=pad_id, accelerator=accelerator))
            if accelerator.is_main_process:
                metrics_log.write(record)
                trackers.log(record, step)
            reporter.step(step, record)
            last_metrics = record
            window = Averager()
            clock.lap("log_and_eval")
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            write_checkpoint(setup, step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                             scheduler=scheduler, objective=objective, accelerator=accelerator,
                             state={"micro_batches": micro, "tokens_seen": tokens_seen,
                                    "trained_seconds": trained_seconds, "total_steps": total_steps,
                                    "data_fingerprint": train_data.fingerprint(), "window": window.state_dict(),
                                    "seconds_by_phase": dict(clock.seconds)})
            clock.lap("checkpoint")
    reporter.finish()
    trackers.finish()

    accelerator.wait_for_everyone()
    summary = {
        **summary_head(setup, handle, objective, registry),
        "data": {"train": train_data.report.__dict__, "train_fingerprint": train_data.fingerprint(),
                 "eval": eval_data.report.__dict__ if eval_data else None},
        "device": str(accelerator.device),
        "reference_cache": cache_status,
        "steps": step,
        "examples_per_step": cfg.batch_size * cfg.grad_accum_steps,  # the global batch, over all processes
        "processes": accelerator.num_processes,
        "train_seconds": round(trained_seconds, 3),
        "wall_seconds": round(time.perf_counter() - setup.started, 3),
        "tokens_seen": tokens_seen,  # every token of every forward-backward pass of training, over the run
        "tokens_per_s": round(tokens_seen / trained_seconds, 1) if trained_seconds else None,
        "reference_seconds": round(reference_seconds, 3),  # this invocation's lookup or pass
        "seconds_by_phase": clock.totals(),  # process 0's training steps; see PhaseClock
        "final_metrics": last_logged(metrics_log, last_metrics),
    }

    def finish():
        save_final_model(setup, accelerator.unwrap_model(model), handle.tokenizer, objective, summary)
        write_summary(setup.run_dir, summary)

    everyone_or_nobody(accelerator, finish)
    return summary
