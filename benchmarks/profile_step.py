"""Where a DPO training step's time goes, phase by phase, next to the machine's measured matmul rate.

    python benchmarks/profile_step.py                               # SmolLM2-135M-Instruct, fp32
    python benchmarks/profile_step.py --precision bf16 --steps 6
    python benchmarks/profile_step.py --model tiny-llama            # seconds, for a smoke check

The job is issue 13's: the first quickstart pairs without a chat template, 4 pairs a step,
max_length 192. Each step is split into the phases the engine runs, timed with a wall clock (a CPU
runs them synchronously): collation; the backbone's forward; the LM head and log-softmax at the
answer positions only (what ``prefkit.models.logprobs.token_logps`` does, split in two here); the
DPO loss; the backward pass; the optimizer (AdamW as the engine builds it, fused where torch has
the kernel). Medians over ``--steps`` after one warm-up.

It also measures the machine's matmul rate on this model's largest shapes (fp32 and bf16) and
reports the step's work (6 x parameters x tokens for the forward and backward passes, plus the LM
head over the answer positions) as a fraction of that rate: the share of the machine's limit the
step reaches. The online loop's breakdown is in every run's run.json (``seconds_by_phase``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from prefkit.data.batching import collate
from prefkit.data.prepare import prepare_dataset
from prefkit.loops.optim import adamw
from prefkit.models.loading import load_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

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
    tokens = answer_tokens = 0
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
        with autocast:
            states = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 use_cache=False).last_hidden_state
        times["backbone forward"] = time.perf_counter() - t
        t = time.perf_counter()
        with autocast:
            logits = model.lm_head(states[keep])
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
    print(f"{'phase':42} {'seconds':>8} {'share':>6}")
    for name, value in medians.items():
        print(f"{name:42} {value:8.3f} {value / total:6.1%}")
    print(f"{'step':42} {total:8.3f}")
    print(f"matmul rate ({tokens // steps}x{hidden} @ {hidden}x{inter}, {args.precision}): {rate:.1f} GFLOP/s; "
          f"the step's work {work / 1e9:.1f} GFLOP takes {work / rate / 1e9:.2f} s at that rate, "
          f"so the step runs at {work / rate / 1e9 / total:.0%} of it")


if __name__ == "__main__":
    main()
