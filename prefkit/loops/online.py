"""The online loop: sample -> score -> update, driven by an :class:`~prefkit.api.OnlineObjective`.

Read it top to bottom like :func:`prefkit.loops.offline.train`. ``train`` prepares the run
directory, reads the prompts (before any model loads), builds the reward function, the policy,
the objective's own modules (e.g. PPO's value head) and, when declared, the reference; then one
iteration per rollout:

1. take ``rollout_batch_size`` prompts (a seeded order over the prompts, like the offline loop's);
2. sample ``sampling.num_samples`` (G) completions for each (:func:`prefkit.models.sampling.generate`,
   seeded from the recipe's seed and the step, so a resumed run samples exactly what the
   uninterrupted one did), keeping what the policy computed while sampling: each token's log-prob
   at temperature 1, the entropy and, for objectives with token outputs (PPO's values), the last
   hidden states. These are the old policy's numbers (the policy has not changed since), equal to a
   second forward pass's to float rounding, so none is run;
3. score the texts with the reward function;
4. the objective's token outputs from those hidden states, and one forward pass of the reference
   over prompt + completion: a :class:`~prefkit.api.Rollout`;
5. ``objective.prepare``: the objective's advantages (and its controllers, normalisers);
6. ``update_epochs`` passes over shuffled minibatches of ``mini_batch_size`` sequences: the
   objective's ``loss`` on chunks of ``train.batch_size`` sequences, one optimizer step per minibatch.

Checkpoints, exact resume, trackers and metrics work as in the offline loop; the objective's
state (``init_state``) is saved in every checkpoint. Nothing here knows any objective by name.

Token tensors of a rollout are aligned with the completion tokens: ``[N, T]`` with ``N`` sequences
and ``T`` the longest completion, right-padded, ``mask`` true on completion tokens.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefkit.api import OnlineInputs, PrefkitError, Rollout
from prefkit.data.batching import Batch, BatchOrder, collate
from prefkit.data.prepare import TokenizedExample
from prefkit.loops.metrics import Averager, PhaseClock
from prefkit.loops.optim import build_optimizer
from prefkit.api.reporting import Reporter, SilentReporter
from prefkit.loops.runs import (
    begin_run,
    check_loss_output,
    check_metrics,
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
from prefkit.models.logprobs import answer_outputs, token_logps
from prefkit.recipe import LoadedRecipe

COMPLETION = "completion"  # the name of the sampled completion in a rollout's batches
# The old policy's log-probs, entropy and value-head inputs are the ones sampling computed (step 2 of
# the module docstring). False: a second forward pass over the rollout (old_policy_pass), the loop's
# way before; it agrees to float rounding and is kept for tests pinned to those exact bits.
OLD_POLICY_FROM_SAMPLING = True


# ----------------------------------------------------------------------------- the policy and its modules


class PolicyWithModules(torch.nn.Module):
    """The policy and the objective's extra modules (``OnlineObjective.modules``) as one module,
    so one optimizer trains both and checkpoints hold both. With ``hidden_states`` the forward
    also returns the policy's last hidden states at the completion positions."""

    def __init__(self, policy: torch.nn.Module, extra: dict[str, torch.nn.Module], hidden_states: bool):
        super().__init__()
        self.policy = policy
        self.extra = torch.nn.ModuleDict(extra)
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[K, V]`` (and hidden states ``[K, H]``) at the ``K`` positions where ``keep`` is
        true (the positions that predict a completion token), row-major."""
        return answer_outputs(self.policy, input_ids, attention_mask, keep, hidden_states=self.hidden_states)


def hidden_size_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if not size:
        size = model.get_input_embeddings().embedding_dim
    return int(size)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (eval mode, no gradients): the reference policy without LoRA."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


# ----------------------------------------------------------------------------- forward passes


def keep_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: keep t where token t + 1 is a completion token."""
    keep = torch.zeros_like(completion_mask)
    keep[:, :-1] = completion_mask[:, 1:]
    return keep


def pack(flat: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of all completions, row-major ``[K]`` -> right-padded ``[R, max length]``
    and its mask. Gradients flow through."""
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat), mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row of ``logits`` ``[..., V]``, in nats, fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def policy_forward(model: PolicyWithModules, objective, params, batch: Batch, *, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], torch.Tensor]:
    """The policy's log-probs of the completion tokens, (optionally) its entropy there, and the
    objective's token outputs: each ``[R, T]`` completion-aligned, fp32, with the mask."""
    keep = keep_positions(batch.completion_mask)
    targets = batch.input_ids[batch.completion_mask]
    lengths = batch.completion_mask.sum(-1)
    logits, hidden = model(batch.input_ids, batch.attention_mask, keep)
    extra = getattr(model, "module", model).extra  # through a DDP wrapper
    outputs = objective.token_outputs(params, dict(extra), hidden) if hidden is not None else {}
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = pack(entropy_from_logits(logits.detach()), lengths)[0] if with_entropy else None
        logps, mask = pack(logps, lengths)
        outputs = {name: pack(value.float(), lengths)[0] for name, value in outputs.items()}
    return logps, entropy, outputs, mask


def reference_logps(reference: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference's log-probs of the completion tokens, ``[R, T]`` completion-aligned, fp32."""
    full = token_logps(reference, batch)
    return pack(full[batch.completion_mask], batch.completion_mask.sum(-1))[0]


def old_policy_pass(model: PolicyWithModules, objective, params, examples: list, batch_size: int, pad_id: int,
                    device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The old policy's log-probs, entropy and token outputs by a forward pass over the rollout,
    ``batch_size`` sequences at a time: ``[N, T]`` each, and the mask. The loop takes these numbers
    from sampling instead (:data:`OLD_POLICY_FROM_SAMPLING`); they agree to float rounding."""
    n = len(examples)
    width = max(len(ex.completions[COMPLETION]) for ex in examples)
    logps, entropy = torch.zeros(n, width, device=device), torch.zeros(n, width, device=device)
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for idx in chunks(n, batch_size):
            batch = collate([examples[i] for i in idx], idx, pad_id, (COMPLETION,)).to(device)
            lp, ent, out, m = policy_forward(model, objective, params, batch, with_entropy=True)
            cols = m.shape[1]
            logps[idx, :cols], entropy[idx, :cols], mask[idx, :cols] = lp, ent, m
            for name, value in out.items():
                outputs.setdefault(name, torch.zeros(n, width, device=device))[idx, :cols] = value
    return logps, entropy, outputs, mask


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def sub_seed(*numbers: int) -> int:
    """A 63-bit seed derived from several integers (for per-step, per-epoch generators)."""
    return int(np.random.SeedSequence([int(n) & 0xFFFFFFFFFFFFFFFF for n in numbers]).generate_state(1, np.uint64)[0]
               >> 1)


def rows_of(values: dict[str, torch.Tensor], idx: list[int], cols: int) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of each ``[N]`` or ``[N, T]`` tensor, token tensors cut to ``cols`` columns."""
    return {name: value[idx, :cols] if value.dim() == 2 else value[idx] for name, value in values.items()}


# ----------------------------------------------------------------------------- checks before any work


def check_online_recipe(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    """What this loop refuses in a recipe, as (key path, message); empty when it can run it."""
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    problems: list[tuple[str, str]] = []
    for field in ("rollout_batch_size", "update_epochs", "mini_batch_size"):
        if not hasattr(params, field):
            problems.append((f"objective.params.{field}",
                             f"objective {objective.name!r} is online but its Params has no {field!r}; "
                             "subclass prefkit.api.OnlineParams"))
    if problems:
        return problems
    if not needs.generation:
        problems.append(("objective.name", f"objective {objective.name!r} is online but does not declare "
                                           "Needs(generation=True)"))
    if recipe.reward is None:
        problems.append(("reward", f"objective {objective.name!r} needs a reward source"))
    if recipe.train.grad_accum_steps != 1:
        problems.append(("train.grad_accum_steps", "the online loop takes one optimizer step per minibatch of "
                                                   "objective.params.mini_batch_size sequences; leave it at 1"))
    least = objective.min_samples_per_prompt(params)
    if recipe.sampling.num_samples < least:
        problems.append(("sampling.num_samples", f"objective {objective.name!r} compares the completions of one "
                                                 f"prompt; it needs at least {least} per prompt, got "
                                                 f"{recipe.sampling.num_samples}"))
    per_rollout = params.rollout_batch_size * recipe.sampling.num_samples
    if params.mini_batch_size is not None and params.mini_batch_size > per_rollout:
        problems.append(("objective.params.mini_batch_size",
                         f"{params.mini_batch_size} is larger than a rollout (rollout_batch_size "
                         f"{params.rollout_batch_size} x sampling.num_samples {recipe.sampling.num_samples} = "
                         f"{per_rollout} sequences)"))
    if least > 1 and recipe.sampling.temperature == 0:
        problems.append(("sampling.temperature", f"objective {objective.name!r} compares the completions of one "
                                                 "prompt, and temperature 0 (greedy decoding) makes them all the "
                                                 "same, so nothing would be learnt; use a temperature above 0"))
    return problems


def gather_rollout(rollout: Rollout, examples: list, device) -> tuple[Rollout, list]:
    """Every process's rollout put together, rows in process order, on every process (token
    tensors right-padded to the widest; each process's group ids shifted past the previous ones)."""
    from accelerate.utils import gather_object

    def local(t):
        return None if t is None else t.detach().cpu()

    mine = {"prompts": rollout.prompts, "completions": rollout.completions, "group_ids": local(rollout.group_ids),
            "scores": local(rollout.scores), "finished": local(rollout.finished), "mask": local(rollout.mask),
            "logps": local(rollout.logps), "ref_logps": local(rollout.ref_logps), "entropy": local(rollout.entropy),
            "outputs": {k: local(v) for k, v in rollout.outputs.items()}, "examples": examples}
    parts = gather_object([mine])
    width = max(part["mask"].shape[1] for part in parts)

    def cat(get):
        values = [get(part) for part in parts]
        if values[0] is None:
            return None
        if values[0].dim() == 2:
            values = [F.pad(v, (0, width - v.shape[1])) for v in values]
        return torch.cat(values).to(device)

    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += int(part["group_ids"].max()) + 1 if part["group_ids"].numel() else 0
    group_ids = torch.cat([part["group_ids"] + offset for part, offset in zip(parts, offsets)])
    whole = Rollout(step=rollout.step, prompts=[p for part in parts for p in part["prompts"]],
                    completions=[c for part in parts for c in part["completions"]], group_ids=group_ids,
                    scores=cat(lambda part: part["scores"]), finished=cat(lambda part: part["finished"]),
                    mask=cat(lambda part: part["mask"]), logps=cat(lambda part: part["logps"]),
                    ref_logps=cat(lambda part: part["ref_logps"]), entropy=cat(lambda part: part["entropy"]),
                    outputs={k: cat(lambda part, k=k: part["outputs"][k]) for k in rollout.outputs})
    return whole, [ex for part in parts for ex in part["examples"]]


# ----------------------------------------------------------------------------- the loop


def train(loaded: LoadedRecipe, *, resume: bool = False, reporter: Reporter | None = None,
          registry: Any) -> dict[str, Any]:
    """Train with an online objective; returns the run summary also written to ``run.json``."""
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import enable_gradient_checkpointing, load_model
    from prefkit.models.rewards import build_reward
    from prefkit.models.sampling import generate

    reporter = reporter or SilentReporter()
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    cfg, sampling = recipe.train, recipe.sampling
    per_rollout = params.rollout_batch_size * sampling.num_samples
    mini_batch = params.mini_batch_size or per_rollout
    unit = objective.loss_unit(params)
    setup = begin_run(loaded, resume, registry)

    # Prompts first: a bad row fails here, before any model is loaded.
    prompts = prepare_dataset(recipe.data, setup.tokenizer, registry.data_kinds[needs.data], split="train",
                              registry=registry)
    reporter.message(describe_data("prompts", prompts.report))
    if recipe.data.eval:
        reporter.message(f"{objective.name} does not evaluate on data.eval during training; use `prefkit compare`")

    accelerator = make_accelerator(setup)
    rank, world = accelerator.process_index, accelerator.num_processes
    if params.rollout_batch_size % world:
        raise PrefkitError(f"objective.params.rollout_batch_size: {params.rollout_batch_size} prompts do not split "
                           f"evenly over {world} processes; use a multiple of {world}")
    device = accelerator.device
    order = BatchOrder(len(prompts.examples), params.rollout_batch_size, recipe.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.batches_per_epoch))
    check_resumable(setup, total_steps=total_steps, data_fingerprint=prompts.fingerprint())
    # The reward function next: a missing package or reward model fails before anything is written.
    scorer = build_reward(recipe.reward, loaded.reward_params, cache_dir=setup.cache_dir, device=device,
                          registry=registry)
    metrics_log = open_run_dir(setup, reporter, accelerator)
    trackers = start_run_trackers(setup, accelerator)

    handle = load_model(recipe.model, loaded.model_options, setup.cache_dir, head="lm", registry=registry)
    policy = handle.model.to(device)
    # The reference: with LoRA, the same model with its adapter disabled; otherwise a frozen copy
    # of the initial weights (taken before any checkpoint is loaded).
    reference = frozen_copy(policy) if needs.reference and not handle.is_lora else None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)  # after the frozen copy: the reference never trains
    extra = plugin_call(objective, "modules()", lambda: objective.modules(params, hidden_size_of(policy)))
    model = PolicyWithModules(policy, extra, needs.hidden_states).to(device)
    pad_id = handle.tokenizer.pad_token_id

    optimizer, scheduler = build_optimizer(model, cfg, total_steps)  # the schedule advances once per rollout
    model, optimizer = accelerator.prepare(model, optimizer)
    state = plugin_call(objective, "init_state()", lambda: objective.init_state(params))
    sample_seed = recipe.seed if sampling.seed is None else sampling.seed

    restored = restore(setup, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                       metrics_log=metrics_log, reporter=reporter, total_steps=total_steps, accelerator=accelerator)
    step, tokens_seen, trained_seconds = 0, 0, 0.0
    if restored.state is not None:
        saved = restored.state
        step, tokens_seen, trained_seconds = saved["step"], saved["tokens_seen"], saved["trained_seconds"]
        if state is not None:
            plugin_call(objective, "state load_state_dict()", lambda: state.load_state_dict(saved["objective_state"]))

    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = restored.window
    clock = PhaseClock((restored.state or {}).get("seconds_by_phase"))
    last_metrics: dict[str, float] = {}
    # Dropout stays off for sampling and updates alike (as in TRL), so the first update's ratio is 1.
    model.eval()
    reporter.start(total_steps, step, objective.name)
    while step < total_steps:
        step_start = time.perf_counter()
        clock.restart()
        lr = scheduler.get_last_lr()[0]

        # 1-3. Prompts, samples, scores (each process samples and scores its share of the prompts).
        # Sampling also keeps the policy's log-probs (at temperature 1), entropy and, when the objective
        # has token outputs, last hidden states of the sampled tokens: the old policy's numbers, as a
        # second forward pass over the same tokens would compute them (the policy has not changed since).
        batch_prompts = [prompts.examples[i] for i in order.indices(step)[rank::world]]
        with accelerator.autocast():
            samples = generate(unwrapped.policy, handle.tokenizer, [ex.prompt_ids for ex in batch_prompts],
                               sampling, seed=sub_seed(sample_seed, step) if world == 1 else
                               sub_seed(sample_seed, step, rank), record=OLD_POLICY_FROM_SAMPLING,
                               hidden_states=needs.hidden_states)
        clock.lap("generate")
        flat = [(p, ex, s) for p, (ex, per_prompt) in enumerate(zip(batch_prompts, samples)) for s in per_prompt]
        examples = [TokenizedExample(ex.row, ex.prompt_ids, {COMPLETION: list(s.token_ids)}, prompt=ex.prompt)
                    for _, ex, s in flat]
        scores = torch.tensor(plugin_call(objective, f"reward function {recipe.reward.name!r}",
                                     lambda: scorer([ex.prompt for _, ex, _ in flat], [s.text for _, _, s in flat])),
                              dtype=torch.float32)
        clock.lap("score")

        # 4. The old policy's log-probs, entropy and token outputs (from sampling); the reference's log-probs.
        n = len(examples)
        step_tokens = sum(len(ex.prompt_ids) + len(ex.completions[COMPLETION]) for ex in examples)
        if OLD_POLICY_FROM_SAMPLING:
            lengths = torch.tensor([s.num_tokens for _, _, s in flat], device=device)
            old_logps, mask = pack(torch.cat([s.logps for _, _, s in flat]).float(), lengths)
            entropy = pack(torch.cat([s.entropy for _, _, s in flat]).float(), lengths)[0]
            old_outputs: dict[str, torch.Tensor] = {}
            if needs.hidden_states:
                with torch.no_grad(), accelerator.autocast():
                    outputs = objective.token_outputs(params, dict(unwrapped.extra),
                                                      torch.cat([s.hidden for _, _, s in flat]))
                old_outputs = {name: pack(value.float(), lengths)[0] for name, value in outputs.items()}
        else:
            with accelerator.autocast():
                old_logps, entropy, old_outputs, mask = old_policy_pass(unwrapped, objective, params, examples,
                                                                        cfg.batch_size, pad_id, device)
        clock.lap("old_logprobs")
        ref_logps = torch.zeros_like(old_logps) if needs.reference else None
        if needs.reference:
            with torch.no_grad():
                for idx in chunks(n, cfg.batch_size):
                    batch = collate([examples[i] for i in idx], idx, pad_id, (COMPLETION,)).to(device)
                    clock.lap("collate")
                    with accelerator.autocast():
                        if reference is None:
                            with handle.reference():
                                ref = reference_logps(unwrapped.policy, batch)
                        else:
                            ref = reference_logps(reference, batch)
                    ref_logps[idx, :ref.shape[1]] = ref
                    clock.lap("reference_logprobs")
        rollout = Rollout(step=step, prompts=[ex.prompt for _, ex, _ in flat], completions=[s.text for _, _, s in flat],
                          group_ids=torch.tensor([p for p, _, _ in flat], dtype=torch.long),
                          scores=scores, finished=torch.tensor([s.finished for _, _, s in flat], dtype=torch.bool),
                          mask=mask, logps=old_logps, ref_logps=ref_logps, entropy=entropy, outputs=old_outputs)
        if world > 1:  # every process sees the whole rollout, so prepare() and its state agree everywhere
            step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=device), reduction="sum"))
            rollout, examples = gather_rollout(rollout, examples, device)
            n, scores, mask, old_logps = rollout.num_sequences, rollout.scores, rollout.mask, rollout.logps
            ref_logps, entropy = rollout.ref_logps, rollout.entropy
            clock.lap("gather_rollout")
        # 5. The objective's advantages (and its controllers).
        with torch.no_grad():
            rollout_metrics = check_metrics(objective, "prepare()", plugin_call(
                objective, "prepare()", lambda: objective.prepare(params, rollout, state)), scalars=True)
        clock.lap("prepare")

        # 6. Update epochs over shuffled minibatches; one optimizer step per minibatch.
        reported = set(rollout_metrics)  # names the objective reports itself: the loop's own are left out
        for epoch in range(params.update_epochs):
            generator = torch.Generator().manual_seed(sub_seed(recipe.seed, step, epoch))
            permutation = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n, mini_batch):
                minibatch = permutation[start : start + mini_batch]
                loss_finite = True
                minibatch_units = int(rollout.mask[minibatch].sum()) if unit == "token" else len(minibatch)
                # each process trains on its share of the minibatch; one left without rows runs one row
                # at weight 0, since every process must take part in every backward pass
                mine, weight = minibatch[rank::world] or minibatch[:1], float(bool(minibatch[rank::world]))
                parts = [([mine[i] for i in idx], weight) for idx in chunks(len(mine), cfg.batch_size)]
                # the same number of forward and backward passes on every process (DDP needs it)
                most = math.ceil(math.ceil(len(minibatch) / world) / cfg.batch_size)
                parts += [(minibatch[:1], 0.0)] * (most - len(parts))
                for idx, weight in parts:
                    batch = collate([examples[i] for i in idx], idx, pad_id, (COMPLETION,)).to(device)
                    clock.lap("collate")
                    with accelerator.autocast():
                        new_logps, _, new_outputs, m = policy_forward(model, objective, params, batch)
                    clock.lap("update_forward")
                    cols = m.shape[1]
                    inputs = OnlineInputs(
                        logps=new_logps, mask=m, old_logps=rollout.logps[idx, :cols],
                        ref_logps=None if rollout.ref_logps is None else rollout.ref_logps[idx, :cols],
                        outputs=new_outputs, old_outputs=rows_of(rollout.outputs, idx, cols),
                        extras=rows_of(rollout.extras, idx, cols), scores=rollout.scores[idx],
                        group_ids=rollout.group_ids[idx])
                    out = check_loss_output(
                        objective, plugin_call(objective, "loss()", lambda: objective.loss(params, inputs)),
                        rows=None, needs_grad=bool(trainable))
                    loss_finite = loss_finite and bool(torch.isfinite(out.losses.detach()))
                    units = int(m.sum()) if unit == "token" else len(idx)
                    # each chunk's mean, weighted by its share of the minibatch's units (times the
                    # number of processes, as their gradients are averaged)
                    clock.lap("update_loss")
                    accelerator.backward(out.losses * (weight * world * units / max(minibatch_units, 1)))
                    clock.lap("update_backward")
                    reported.update(out.metrics)
                    if weight:
                        window.add("loss", float(out.losses.detach()), weight=units)
                        for name, value in out.metrics.items():
                            window.add(name, float(value.detach()) if isinstance(value, torch.Tensor)
                                       else float(value), weight=units)
                # Nothing non-finite reaches the weights: loss and gradient are checked before each step.
                grad_norm = gradient_norm(accelerator, trainable, cfg.max_grad_norm, setup.precision.name)
                check_step(objective, step + 1, loss_finite=loss_finite, grad_norm=grad_norm,
                           precision=setup.precision.name)
                if cfg.max_grad_norm is not None:
                    window.add("grad_norm", grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                clock.lap("optimizer")
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - step_start
        trained_seconds += seconds
        tokens_seen += step_tokens

        lengths = mask.sum(-1).float()
        generic = {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std(unbiased=False)),
            "kl": float(((old_logps - ref_logps) * mask).sum(-1).mean()) if ref_logps is not None else None,
            "entropy": float(entropy.sum() / lengths.sum().clamp(min=1)),
            "completion/length": float(lengths.mean()),
            "completion/eos_rate": float(rollout.finished.float().mean()),
            "tokens_per_s": step_tokens / max(seconds, 1e-9),
        }
        for name, value in generic.items():
            if value is not None and name not in reported:
                window.add(name, float(value))
        for name, value in rollout_metrics.items():
            window.add(name, float(value))
        if step % cfg.log_every == 0 or step == total_steps:
            window = reduce_window(accelerator, window)
            record = {"step": step, "epoch": round(order.epoch_of(step), 4), **window.result(), "lr": lr}
            if accelerator.is_main_process:
                metrics_log.write(record)
                trackers.log(record, step)
            reporter.step(step, record)
            last_metrics = record
            window = Averager()
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            write_checkpoint(setup, step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                             objective=objective, accelerator=accelerator,
                             state={"tokens_seen": tokens_seen, "trained_seconds": trained_seconds,
                                    "total_steps": total_steps, "data_fingerprint": prompts.fingerprint(),
                                    "window": window.state_dict(), "seconds_by_phase": dict(clock.seconds),
                                    "objective_state": state.state_dict() if state is not None else None})
        clock.lap("log_and_checkpoint")
    reporter.finish()
    trackers.finish()

    summary = {
        **summary_head(setup, handle, objective, registry),
        "data": {"train": prompts.report.__dict__, "train_fingerprint": prompts.fingerprint(), "eval": None},
        "reward": setup.resolved["reward"],
        "sampling": setup.resolved["sampling"],
        "device": str(device),
        "reference_cache": "none",  # the online reference is run live on every rollout
        "steps": step,
        "examples_per_step": per_rollout,  # over all processes
        "processes": world,
        "objective_state": state.state_dict() if state is not None else None,
        "train_seconds": round(trained_seconds, 3),
        "wall_seconds": round(time.perf_counter() - setup.started, 3),
        "tokens_seen": tokens_seen,  # every token of every forward-backward pass of training, over the run
        "tokens_per_s": round(tokens_seen / trained_seconds, 1) if trained_seconds else None,
        "seconds_by_phase": clock.totals(),  # process 0's rollouts; see PhaseClock
        "final_metrics": last_logged(metrics_log, last_metrics),
    }
    def finish():
        save_final_model(setup, unwrapped, handle.tokenizer, objective, summary, save=save_final)
        write_summary(setup.run_dir, summary)

    everyone_or_nobody(accelerator, finish)
    return summary


def save_final(model: PolicyWithModules, tokenizer, out_dir: Path, **options) -> None:
    """``final/``: the policy in Hugging Face format (a LoRA adapter merged; ``options`` as
    :func:`prefkit.models.loading.save_pretrained`'s) and each of the objective's modules beside
    it as ``NAME.safetensors`` (fp32)."""
    from safetensors.torch import save_file

    from prefkit.models.loading import save_pretrained

    save_pretrained(model.policy, tokenizer, out_dir, **options)
    for name, module in model.extra.items():
        tensors = {key: t.detach().cpu().contiguous().clone() for key, t in module.state_dict().items()}
        tmp = out_dir / f".{name}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.rename(out_dir / f"{name}.safetensors")
