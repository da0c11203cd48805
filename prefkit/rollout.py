"""The rollout loop for online objectives: PPO with a KL penalty (``ppo_kl``).

Read it top to bottom like ``prefkit.engine.train``: ``train_online`` prepares the run directory,
reads the prompts (before any model loads), builds the reward function, the policy with its value
head and the reference, then runs one PPO step per rollout:

1. take ``rollout_batch_size`` prompts (a seeded order over the prompts, like the offline loop's);
2. sample ``sampling.num_samples`` completions for each (``prefkit.sampling.generate``, seeded from
   the recipe's seed and the step, so a resumed run samples exactly what the uninterrupted one did);
3. score the texts with the reward function;
4. one forward pass of the policy (log-probs, values, entropy) and one of the reference (log-probs)
   over prompt + completion; the per-token KL; the per-token rewards; GAE advantages;
5. ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` sequences, each one
   optimizer step on the clipped policy loss + ``vf_coef`` * clipped value loss.

The math is in ``prefkit_builtins.ppo_kl`` (pure functions); this module only runs models.

Tensors of a rollout are aligned with the completion tokens: ``[N, T]`` with ``N`` sequences and
``T`` the longest completion, right-padded, ``mask`` true on completion tokens.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from prefkit.batching import Batch, BatchOrder, collate
from prefkit.checkpoint import save_checkpoint
from prefkit.data import TokenizedExample
from prefkit.errors import PrefkitError
from prefkit.logprobs import token_logps
from prefkit.metrics import Averager
from prefkit.optim import build_optimizer
from prefkit.recipe import LoadedRecipe
from prefkit.runs import (
    QuietReporter,
    Reporter,
    begin_run,
    describe_data,
    last_logged,
    make_accelerator,
    open_run_dir,
    restore,
    start_run_trackers,
    summary_head,
    write_summary,
)

VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------- the value head


class PolicyWithValueHead(torch.nn.Module):
    """The policy and a value head on its last hidden state, in one module (a shared backbone).

    The value head is one ``Linear(hidden, 1)``, zero-initialised: every value starts at 0, so the
    first advantages are the plain discounted rewards and no random numbers are drawn. Both parts
    are trainable parameters of this module, so checkpoints hold both and a resume restores both.
    """

    def __init__(self, policy: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[K, V]`` and values ``[K]`` at the ``K`` positions where ``keep`` is true (the
        positions that predict a completion token), row-major."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                          output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][keep]
        logits = out.logits
        if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # the model ignored logits_to_keep
            logits = logits[keep]
        elif logits.dim() != 2 or logits.shape[0] != hidden.shape[0]:
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[keep]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


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


def policy_forward(model: torch.nn.Module, batch: Batch, *, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The policy's log-probs of the completion tokens, the values before each of them and
    (optionally) the policy's entropy there: each ``[R, T]`` completion-aligned, fp32, with the mask."""
    from prefkit_builtins.ppo_kl import entropy_from_logits

    keep = keep_positions(batch.completion_mask)
    targets = batch.input_ids[batch.completion_mask]
    lengths = batch.completion_mask.sum(-1)
    logits, values = model(batch.input_ids, batch.attention_mask, keep)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = pack(entropy_from_logits(logits.detach()), lengths)[0] if with_entropy else None
        logps, mask = pack(logps, lengths)
        values = pack(values.float(), lengths)[0]
    return logps, values, entropy, mask


def reference_logps(reference: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference's log-probs of the completion tokens, ``[R, T]`` completion-aligned, fp32."""
    full = token_logps(reference, batch)
    return pack(full[batch.completion_mask], batch.completion_mask.sum(-1))[0]


@dataclass
class Rollout:
    """One rollout: N sampled sequences and what PPO needs from them (tensors ``[N, T]``)."""

    examples: list[TokenizedExample]  # prompt_ids + completion tokens (as chosen_ids), one per sequence
    mask: torch.Tensor
    logps: torch.Tensor  # the policy's at sampling time (PPO's "old" log-probs)
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def sub_seed(*numbers: int) -> int:
    """A 63-bit seed derived from several integers (for per-step, per-epoch generators)."""
    return int(np.random.SeedSequence([int(n) & 0xFFFFFFFFFFFFFFFF for n in numbers]).generate_state(1, np.uint64)[0]
               >> 1)


# ----------------------------------------------------------------------------- the loop


def train_online(loaded: LoadedRecipe, *, resume: bool = False, reporter: Reporter | None = None,
                 registry=None) -> dict[str, Any]:
    """Train with an online objective (``ppo_kl``); returns the run summary also written to ``run.json``."""
    from prefkit.data import prepare_dataset
    from prefkit.models import load_model
    from prefkit.rewards import build_reward
    from prefkit.sampling import generate
    from prefkit_builtins.ppo_kl import (
        AdaptiveKLController,
        FixedKLController,
        RunningMoments,
        gae,
        kl_penalty,
        policy_loss,
        shape_scores,
        token_rewards,
        value_loss,
        whiten,
    )

    reporter = reporter or QuietReporter()
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    if needs.data != "prompts" or not needs.generation:
        raise PrefkitError(f"objective {objective.name!r} is online but does not sample from prompts")
    if recipe.reward is None:
        raise PrefkitError(f"objective {objective.name!r} needs a reward source (the recipe's `reward:`)")
    cfg, sampling = recipe.train, recipe.sampling
    if cfg.grad_accum_steps != 1:
        raise PrefkitError(
            f"train.grad_accum_steps: {objective.name} takes one optimizer step per minibatch of "
            "objective.params.mini_batch_size sequences (run train.batch_size at a time); leave it at 1"
        )
    per_rollout = params.rollout_batch_size * sampling.num_samples
    mini_batch = params.mini_batch_size or per_rollout
    if mini_batch > per_rollout:
        raise PrefkitError(
            f"objective.params.mini_batch_size ({mini_batch}) is larger than a rollout "
            f"(rollout_batch_size {params.rollout_batch_size} x sampling.num_samples {sampling.num_samples} "
            f"= {per_rollout} sequences)"
        )
    setup = begin_run(loaded, resume, registry)

    # Prompts first: a bad row fails here, before any model is loaded.
    prompts = prepare_dataset(recipe.data, setup.tokenizer, "prompts", split="train", registry=registry)
    reporter.message(describe_data("prompts", prompts.report))
    if recipe.data.eval:
        reporter.message(f"{objective.name} does not evaluate on data.eval during training; use `prefkit compare`")

    accelerator = make_accelerator(setup)
    if accelerator.num_processes > 1:
        raise PrefkitError(f"{objective.name} runs in a single process for now; start it without `accelerate launch`")
    device = accelerator.device
    # The reward function next: a missing package or reward model fails before anything is written.
    scorer = build_reward(recipe.reward, loaded.reward_params, cache_dir=setup.cache_dir, device=device,
                          registry=registry)
    metrics_log = open_run_dir(setup)
    trackers = start_run_trackers(setup, accelerator)

    handle = load_model(recipe.model, loaded.model_options, setup.cache_dir, head="lm", registry=registry)
    policy = handle.model.to(device)
    # The reference: with LoRA, the same model with its adapter disabled; otherwise a frozen copy
    # of the initial weights (taken before any checkpoint is loaded).
    reference = None if handle.is_lora else frozen_copy(policy)
    model = PolicyWithValueHead(policy, hidden_size_of(policy)).to(device)
    pad_id = handle.tokenizer.pad_token_id

    order = BatchOrder(len(prompts.examples), params.rollout_batch_size, recipe.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.batches_per_epoch))
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)  # the schedule advances once per rollout
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (AdaptiveKLController(params.kl_coef, params.target_kl, params.kl_horizon) if params.adaptive_kl
              else FixedKLController(params.kl_coef))
    normaliser = RunningMoments() if params.normalize_reward else None
    sample_seed = recipe.seed if sampling.seed is None else sampling.seed

    state = restore(setup, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                    metrics_log=metrics_log, reporter=reporter, resume=resume)
    step, tokens_seen, trained_seconds = 0, 0, 0.0
    if state is not None:
        step, tokens_seen, trained_seconds = state["step"], state["tokens_seen"], state["trained_seconds"]
        kl_ctl.load_state_dict(state["kl_controller"])
        if normaliser is not None:
            normaliser.load_state_dict(state["reward_normaliser"])

    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = Averager()
    last_metrics: dict[str, float] = {}
    # Dropout stays off for sampling and updates alike (as in TRL), so the first update's ratio is 1.
    model.eval()
    reporter.start(total_steps, step, "ppo")
    while step < total_steps:
        step_start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        kl_coef = kl_ctl.value

        # 1-3. Prompts, samples, scores.
        batch_prompts = [prompts.examples[i] for i in order.indices(step)]
        with accelerator.autocast():
            samples = generate(unwrapped.policy, handle.tokenizer, [ex.prompt_ids for ex in batch_prompts],
                               sampling, seed=sub_seed(sample_seed, step))
        flat = [(ex, s) for ex, per_prompt in zip(batch_prompts, samples) for s in per_prompt]
        examples = [TokenizedExample(ex.row, ex.prompt_ids, list(s.token_ids), None, prompt=ex.prompt)
                    for ex, s in flat]
        raw_scores = torch.tensor(scorer([ex.prompt for ex, _ in flat], [s.text for _, s in flat]),
                                  dtype=torch.float32)
        finished = torch.tensor([s.finished for _, s in flat], dtype=torch.bool)
        scores = shape_scores(raw_scores, finished, normaliser=normaliser,
                              missing_eos_penalty=params.missing_eos_penalty)

        # 4. Log-probs, values and entropy of the policy; log-probs of the reference; advantages.
        n = len(examples)
        width = max(len(ex.chosen_ids) for ex in examples)
        old_logps, ref_logps, values, entropy = (torch.zeros(n, width, device=device) for _ in range(4))
        mask = torch.zeros(n, width, dtype=torch.bool, device=device)
        step_tokens = 0
        with torch.no_grad():
            for idx in chunks(n, cfg.batch_size):
                batch = collate([examples[i] for i in idx], idx, pad_id, paired=False).to(device)
                step_tokens += batch.num_tokens
                with accelerator.autocast():
                    lp, v, ent, m = policy_forward(model, batch, with_entropy=True)
                    if reference is None:
                        with handle.reference():
                            ref = reference_logps(unwrapped.policy, batch)
                    else:
                        ref = reference_logps(reference, batch)
                cols = m.shape[1]
                old_logps[idx, :cols], values[idx, :cols], entropy[idx, :cols] = lp, v, ent
                ref_logps[idx, :cols], mask[idx, :cols] = ref, m
        kl = kl_penalty(old_logps, ref_logps, params.kl_estimator) * mask
        rewards = token_rewards(scores.to(device), kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, params.gamma, params.lam)
        if params.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout = Rollout(examples, mask, old_logps, values, advantages, returns)

        # 5. PPO epochs over shuffled minibatches; one optimizer step per minibatch.
        for epoch in range(params.ppo_epochs):
            generator = torch.Generator().manual_seed(sub_seed(recipe.seed, step, epoch))
            permutation = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n, mini_batch):
                minibatch = permutation[start : start + mini_batch]
                minibatch_tokens = int(rollout.mask[minibatch].sum())
                for idx in chunks(len(minibatch), cfg.batch_size):
                    idx = [minibatch[i] for i in idx]
                    batch = collate([rollout.examples[i] for i in idx], idx, pad_id, paired=False).to(device)
                    with accelerator.autocast():
                        new_logps, new_values, _, m = policy_forward(model, batch)
                    cols = m.shape[1]
                    pl, p_stats = policy_loss(new_logps, rollout.logps[idx, :cols], rollout.advantages[idx, :cols],
                                              m, params.clip_range)
                    vl, v_stats = value_loss(new_values, rollout.values[idx, :cols], rollout.returns[idx, :cols],
                                             m, params.clip_range_value)
                    loss = pl + params.vf_coef * vl
                    # each chunk's token mean, weighted by its share of the minibatch's tokens
                    tokens = int(m.sum())
                    accelerator.backward(loss * (tokens / max(minibatch_tokens, 1)))
                    for name, value in [("loss", loss), ("loss/policy", pl), ("loss/value", vl),
                                        ("policy/clipfrac", p_stats["clipfrac"]),
                                        ("policy/approxkl", p_stats["approxkl"]),
                                        ("value/clipfrac", v_stats["clipfrac"])]:
                        window.add(name, float(value.detach()), weight=tokens)
                if cfg.max_grad_norm is not None:
                    window.add("grad_norm", accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seq_kl = kl.sum(-1)
        kl_ctl.update(float(seq_kl.mean()), n)
        step += 1
        seconds = time.perf_counter() - step_start
        trained_seconds += seconds
        tokens_seen += step_tokens

        lengths = mask.sum(-1).float()
        window.add("reward/mean", float(raw_scores.mean()))
        window.add("reward/std", float(raw_scores.std(unbiased=False)))
        window.add("reward/total", float(rewards.sum(-1).mean()))
        window.add("kl", float(seq_kl.mean()))
        window.add("kl_coef", kl_coef)
        window.add("entropy", float(entropy.sum() / lengths.sum().clamp(min=1)))
        window.add("completion/length", float(lengths.mean()))
        window.add("completion/eos_rate", float(finished.float().mean()))
        window.add("tokens_per_s", step_tokens / max(seconds, 1e-9))
        if step % cfg.log_every == 0 or step == total_steps:
            record = {"step": step, "epoch": round(order.epoch_of(step), 4), **window.result(), "lr": lr}
            metrics_log.write(record)
            trackers.log(record, step)
            reporter.step(step, record)
            last_metrics = record
            window = Averager()
            if not (math.isfinite(record["loss"]) and math.isfinite(record["kl"])):
                raise PrefkitError(f"loss or KL became non-finite at step {step}; lower train.lr or raise kl_coef")
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            save_checkpoint(setup.run_dir, step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                            keep=cfg.keep_checkpoints, recipe_yaml=setup.resolved_yaml,
                            state={"tokens_seen": tokens_seen, "trained_seconds": trained_seconds,
                                   "kl_controller": kl_ctl.state_dict(),
                                   "reward_normaliser": normaliser.state_dict() if normaliser else None})
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
        "examples_per_step": per_rollout,
        "kl_coef": kl_ctl.value,
        "train_seconds": round(trained_seconds, 3),
        "wall_seconds": round(time.perf_counter() - setup.started, 3),
        "tokens_per_s": round(tokens_seen / trained_seconds, 1) if trained_seconds else None,
        "final_metrics": last_logged(metrics_log, last_metrics),
    }
    save_final(unwrapped, handle.tokenizer, setup.run_dir / "final")
    write_summary(setup.run_dir, summary)
    return summary


def save_final(model: PolicyWithValueHead, tokenizer, out_dir: Path) -> None:
    """``final/``: the policy in Hugging Face format (a LoRA adapter merged) and the value head
    beside it as ``value_head.safetensors`` (tensors ``weight`` [1, hidden] and ``bias`` [1])."""
    from safetensors.torch import save_file

    from prefkit.models import save_pretrained

    save_pretrained(model.policy, tokenizer, out_dir)
    head = {name: t.detach().cpu().contiguous().clone() for name, t in model.value_head.state_dict().items()}
    tmp = out_dir / f".{VALUE_HEAD_FILE}.tmp"
    save_file(head, str(tmp))
    tmp.rename(out_dir / VALUE_HEAD_FILE)
