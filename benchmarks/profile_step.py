"""Where a training step's time goes, phase by phase: a DPO step, or one iteration of the online loop.

    python benchmarks/profile_step.py                               # DPO on SmolLM2-135M-Instruct, fp32
    python benchmarks/profile_step.py --precision bf16 --steps 6
    python benchmarks/profile_step.py --model tiny-llama            # seconds, for a smoke check
    python benchmarks/profile_step.py --job ppo --precision bf16    # one PPO-KL iteration, phase by phase
    python benchmarks/profile_step.py --job grpo --precision bf16   # one GRPO iteration

**DPO** (``--job dpo``, the default). The job is issue 13's: the first quickstart pairs without a chat
template, 4 pairs a step, max_length 192. Each step is split into the phases the engine runs, timed
with a wall clock (a CPU runs them synchronously): collation; the backbone's forward; the LM head and
log-softmax at the answer positions only (what ``prefkit.models.logprobs.token_logps`` does, split in
two here); the DPO loss; the backward pass; the optimizer (AdamW as the engine builds it, fused where
torch has the kernel). Medians over ``--steps`` after one warm-up.

It also measures the machine's matmul rate on this model's largest shapes (fp32 and bf16) and
reports the step's work (6 x parameters x tokens for the forward and backward passes, plus the LM
head over the answer positions) as a fraction of that rate: the share of the machine's limit the
step reaches.

**Online** (``--job ppo`` / ``--job grpo``). The real online loop (``prefkit.loops.online.train``)
runs ``--steps`` iterations after one warm-up iteration, and each iteration's time is split by the
loop's own phase clock (the ``seconds_by_phase`` of ``run.json``), with the update's forward split
further into the backbone and "LM head + log-softmax" (from the LM head's start to the end of
``policy_forward``: the head at completion positions, the log-softmax, the entropy and the
objective's token outputs) by a forward hook on the policy's LM head. Medians per phase over the
iterations. The settings:

- ``ppo``: the sentiment recipe's PPO arms (``recipes/sentiment/compare.yaml``): ``ppo_kl`` with the
  adaptive KL controller, 8 prompts x 2 samples a rollout, 32 new tokens at temperature 1, max_length
  96 (prompts up to 32 tokens), minibatches of 8, 2 update epochs, ``train.batch_size`` 16, lr 2e-5
  constant, the gold ``sentiment`` reward (VADER), no chat template;
- ``grpo``: ``recipes/grpo_tiny.yaml``'s shape on SmolLM2: 8 prompts x 4 samples (32 sequences), 2
  update epochs in minibatches of 16, beta 0.04, 32 new tokens, max_length 96, ``train.batch_size``
  16, the same reward and prompts;

both over the ``sentiment-prompts`` training prompts, full fine-tuning, no checkpoints.
``--min-new-tokens`` forces that many tokens (the end token suppressed until then, through the
recipe's ``sampling.min_new_tokens``) so that runs compare the same work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prefkit.data.batching import collate
from prefkit.data.prepare import prepare_dataset
from prefkit.loops.optim import adamw
from prefkit.models.loading import load_model
from prefkit.models import packing
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe
from prefkit_builtins.dpo import dpo_loss


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of an [m, k] x [k, n] matmul in ``dtype``, repeated for about ``seconds``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def online_recipe(job: str, model: str, precision: str, steps: int, out: str, min_new_tokens: int) -> dict:
    """The recipe of ``--job ppo`` / ``--job grpo`` (see the module docstring)."""
    options = {"hidden_size": 64, "num_layers": 2, "seed": 0} if model == "tiny-llama" else {}
    if job == "ppo":
        objective = {"name": "ppo_kl", "params": {
            "kl_coef": 0.1, "adaptive_kl": True, "target_kl": 3.0, "kl_horizon": 200, "rollout_batch_size": 8,
            "mini_batch_size": 8, "update_epochs": 2, "clip_range": 0.2, "vf_coef": 0.1, "normalize_reward": True}}
        samples = 2
    else:
        objective = {"name": "grpo", "params": {
            "beta": 0.04, "epsilon": 0.2, "scale_rewards": True, "loss_aggregation": "sequence",
            "rollout_batch_size": 8, "update_epochs": 2, "mini_batch_size": 16}}
        samples = 4
    sampling = {"max_new_tokens": 32, "temperature": 1.0, "num_samples": samples, "batch_size": 32}
    if min_new_tokens:
        sampling["min_new_tokens"] = min_new_tokens
    return {
        "output_dir": out, "seed": 0,
        "model": {"source": model, "options": options},
        "data": {"train": "sentiment-prompts", "chat_template": "never", "max_length": 96, "max_prompt_length": 32},
        "objective": objective,
        "reward": {"name": "sentiment"},
        "sampling": sampling,
        "train": {"max_steps": steps, "batch_size": 16, "lr": 2e-5, "scheduler": "constant", "warmup_steps": 0,
                  "precision": precision, "log_every": 1, "save_every": None},
    }


def profile_online(args) -> None:
    """One online iteration (PPO or GRPO) phase by phase: the real loop, its phase clock per iteration."""
    import shutil
    import tempfile

    from prefkit.loops import online
    from prefkit.loops.metrics import PhaseClock
    from prefkit.recipe import validate_recipe

    snapshots: list[dict[str, float]] = []
    clocks: list[PhaseClock] = []
    head = {"start": None, "seconds": 0.0}

    class IterationClock(PhaseClock):
        """The loop's phase clock, remembering its totals at the start of every iteration; it also
        counts the process's CPU seconds per phase (all threads), which another process on the
        machine disturbs much less than the wall clock."""

        def __init__(self, seconds=None):
            super().__init__(seconds)
            clocks.append(self)
            self.cpu: dict[str, float] = {}
            self._cpu_last = time.process_time()

        def restart(self) -> None:
            snapshots.append({**self.seconds, "update head": head["seconds"],
                              **{f"cpu {k}": v for k, v in self.cpu.items()}})
            super().restart()
            self._cpu_last = time.process_time()

        def lap(self, name: str) -> None:
            super().lap(name)
            now = time.process_time()
            self.cpu[name] = self.cpu.get(name, 0.0) + now - self._cpu_last
            self._cpu_last = now

    forward = online.policy_forward

    def timed_forward(model, *a, **k):
        head["start"] = None
        result = forward(model, *a, **k)
        if head["start"] is not None and torch.is_grad_enabled():  # the update's forward, not the rollout's
            head["seconds"] += time.perf_counter() - head["start"]
        return result

    def head_starts(module, inputs):
        head["start"] = time.perf_counter()

    from prefkit.models import loading

    original_load = loading.load_model

    def load_and_hook(*a, **k):
        handle = original_load(*a, **k)
        handle.model.get_output_embeddings().register_forward_pre_hook(head_starts)
        return handle

    out = tempfile.mkdtemp(prefix=f"prefkit-profile-{args.job}-")
    registry = load_registry()
    loaded = validate_recipe(online_recipe(args.job, args.model, args.precision, args.steps + 1, out,
                                           args.min_new_tokens), "benchmarks/profile_step.py", registry=registry)
    online.PhaseClock, online.policy_forward, loading.load_model = IterationClock, timed_forward, load_and_hook
    try:
        summary = online.train(loaded, registry=registry)
    finally:
        online.PhaseClock, online.policy_forward, loading.load_model = PhaseClock, forward, original_load
    final = summary["seconds_by_phase"]
    snapshots.append({**final, "update head": head["seconds"], **{f"cpu {k}": v for k, v in clocks[-1].cpu.items()}})
    names = ["generate", "score", "collate", "old_logprobs", "reference_logprobs", "prepare", "update backbone",
             "update head", "update_loss", "update_backward", "optimizer", "log_and_checkpoint"]
    labels = {"generate": "generation", "score": "scoring (reward)", "collate": "collation",
              "old_logprobs": "old-policy log-probs (+ values, entropy)", "reference_logprobs": "reference log-probs",
              "prepare": "prepare (advantages)", "update backbone": "update: backbone forward",
              "update head": "update: LM head + log-softmax", "update_loss": "update: loss",
              "update_backward": "update: backward", "optimizer": "optimizer (clip + fused AdamW)",
              "log_and_checkpoint": "logging"}
    per_iteration: list[dict[str, float]] = []
    for before, after in zip(snapshots[1:], snapshots[2:]):  # the first iteration warms up
        delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in set(after) | set(before)}
        delta["update backbone"] = delta.get("update_forward", 0.0) - delta["update head"]
        per_iteration.append(delta)
    cpu_names = [f"cpu {name}" for name in names if not name.startswith("update ")]
    cpu_names.insert(cpu_names.index("cpu update_loss"), "cpu update_forward")
    medians = {name: statistics.median(d.get(name, 0.0) for d in per_iteration) for name in names + cpu_names}
    totals = [sum(d.get(name, 0.0) for name in names) for d in per_iteration]
    cpu_totals = [sum(d.get(name, 0.0) for name in cpu_names) for d in per_iteration]
    total, cpu_total = statistics.median(totals), statistics.median(cpu_totals)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    print(f"{args.job} iteration, model {args.model}, precision {summary['precision']}, "
          f"{summary['examples_per_step']} sequences a rollout, {torch.get_num_threads()} threads, "
          f"median of {len(per_iteration)} iterations after a warm-up")
    print(f"{'phase':44} {'seconds':>8} {'share':>6} {'CPU s':>7}")
    for name in names:
        cpu = medians.get(f"cpu {name}")
        if name == "update backbone":
            cpu = medians["cpu update_forward"]
        print(f"{labels[name]:44} {medians[name]:8.3f} {medians[name] / total:6.1%} "
              f"{'' if cpu is None else f'{cpu:7.3f}'}{' (backbone + head)' if name == 'update backbone' else ''}")
    print(f"{'iteration (median of the sums)':44} {total:8.3f} {'':6} {cpu_total:7.3f}")
    print("iterations: " + " ".join(f"{t:.3f}" for t in totals))
    print("CPU seconds per iteration: " + " ".join(f"{t:.3f}" for t in cpu_totals))
    print("completion/length per iteration: " + " ".join(f"{m.get('completion/length', 0):.1f}" for m in metrics))
    print("loss per iteration: " + " ".join(f"{m['loss']:.6f}" for m in metrics))
    print("reward/mean per iteration: " + " ".join(f"{m['reward/mean']:.6f}" for m in metrics))
    if args.json:
        Path(args.json).write_text(json.dumps({"job": args.job, "precision": summary["precision"],
                                               "per_iteration": per_iteration, "medians": medians,
                                               "totals": totals, "metrics": metrics}, indent=1))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["dpo", "ppo", "grpo"], default="dpo")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="auto (online jobs only): what train.precision: auto picks on this machine")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--min-new-tokens", type=int, default=0, help="online jobs: force this many new tokens")
    parser.add_argument("--json", default=None, help="online jobs: write every iteration's phases here")
    parser.add_argument("--padded", action="store_true",
                        help="dpo: the padded forward instead of the engine's packed rows (before/after)")
    args = parser.parse_args()
    if args.job != "dpo":
        profile_online(args)
        return
    if args.precision == "auto":
        parser.error("--precision auto is for the online jobs")

    registry = load_registry()
    options = "{hidden_size: 64, num_layers: 2}" if args.model == "tiny-llama" else "{}"
    loaded = load_recipe("recipes/quickstart.yaml", [
        f"model.source={args.model}", f"model.options={options}", "data.chat_template=never", "data.max_length=192",
        "data.eval=null", "output_dir=/tmp/prefkit-profile"], registry=registry)
    handle = load_model(loaded.recipe.model, loaded.model_options, loaded.recipe.resolved_cache_dir(), registry=registry)
    model, tok = handle.model, handle.tokenizer
    data = prepare_dataset(loaded.recipe.data, tok, registry.data_kinds["pairs"], split="train", registry=registry)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    params = sum(p.numel() for p in model.parameters())
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    inter = getattr(model.config, "intermediate_size", 4 * hidden)

    phases: dict[str, list[float]] = {}
    tokens = answer_tokens = positions = 0
    used_packing = False
    for step in range(args.steps + 1):
        idx = list(range(step * args.pairs, (step + 1) * args.pairs))
        times = {}
        t = time.perf_counter()
        batch = collate([data.examples[i % len(data.examples)] for i in idx], idx, tok.pad_token_id, data.names)
        times["collate"] = time.perf_counter() - t
        keep = torch.zeros_like(batch.completion_mask)
        keep[:, :-1] = batch.completion_mask[:, 1:]
        targets = batch.input_ids[batch.completion_mask]
        t = time.perf_counter()
        packed = None if args.padded or not packing.can_pack(model) else packing.plan(batch.input_ids,
                                                                                   batch.attention_mask)
        with autocast:
            if packed is not None:  # as the engine runs it: the rows packed, no padding
                states = packing.forward(model.model, packed).last_hidden_state[0]
                kept = packed.positions(keep)
            else:
                states = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     use_cache=False).last_hidden_state
                kept = keep
        times["backbone forward"] = time.perf_counter() - t
        t = time.perf_counter()
        with autocast:
            logits = model.lm_head(states[kept])
        picked = F.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        times["LM head + log-softmax (answer positions)"] = time.perf_counter() - t
        t = time.perf_counter()
        flat = torch.zeros(batch.input_ids.shape).masked_scatter(batch.completion_mask, picked)
        sums = (flat * batch.completion_mask).sum(-1)
        chosen, rejected = sums[batch.rows_of("chosen")], sums[batch.rows_of("rejected")]
        losses, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
        loss = losses.mean()
        times["DPO loss"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer (AdamW)"] = time.perf_counter() - t
        if step:  # the first step warms up
            for name, value in times.items():
                phases.setdefault(name, []).append(value)
            tokens += int(batch.attention_mask.sum())
            answer_tokens += int(batch.completion_mask.sum())
            positions += batch.input_ids.numel()
            used_packing = packed is not None

    steps = args.steps
    medians = {name: statistics.median(values) for name, values in phases.items()}
    total = sum(medians.values())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rate = matmul_rate(tokens // steps, hidden, inter, dtype)
    # forward + backward of every weight (6 x params x tokens) minus the LM head, which runs only at answer positions
    head = hidden * vocab
    work = 6 * (params - head) * tokens / steps + 6 * head * answer_tokens / steps
    print(f"model {args.model}, {params / 1e6:.1f}M parameters, precision {args.precision}, "
          f"{args.pairs} pairs a step, {tokens // steps} tokens a step ({answer_tokens // steps} answer tokens), "
          f"{torch.get_num_threads()} threads, median of {steps} steps")
    print(f"padded layout: {positions // steps} positions a step ({1 - tokens / positions:.0%} padding); "
          f"forward {'packed (no padding), as the engine runs it' if used_packing else 'padded'}")
    print(f"{'phase':42} {'seconds':>8} {'share':>6}")
    for name, value in medians.items():
        print(f"{name:42} {value:8.3f} {value / total:6.1%}")
    print(f"{'step':42} {total:8.3f}")
    print(f"matmul rate ({tokens // steps}x{hidden} @ {hidden}x{inter}, {args.precision}): {rate:.1f} GFLOP/s; "
          f"the step's work {work / 1e9:.1f} GFLOP takes {work / rate / 1e9:.2f} s at that rate, "
          f"so the step runs at {work / rate / 1e9 / total:.0%} of it")


if __name__ == "__main__":
    main()
