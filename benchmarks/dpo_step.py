"""Time the DPO engine's pieces on a real model and print a table.

    python benchmarks/dpo_step.py                       # SmolLM2-135M-Instruct, 4 pairs per batch
    python benchmarks/dpo_step.py --model tiny-llama --pairs 8

For each precision (fp32; bf16 autocast; on a GPU also fp16) it measures, on the same batch of
quickstart pairs: a reference forward (no gradients) with logits only at answer positions, the
same forward computing logits at every position (what a naive implementation does), and a full
DPO training step (forward, loss, backward, AdamW as the engine builds it: fused where torch can).
Median of --repeats runs after one warm-up. The side-by-side comparison with TRL is vs_trl.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prefkit.api.objective import Needs
from prefkit.data.batching import collate
from prefkit.data.prepare import prepare_dataset
from prefkit.loops.offline import loss_inputs
from prefkit.loops.optim import adamw
from prefkit.models.loading import load_model
from prefkit.models.logprobs import token_logps
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe
from prefkit_builtins.dpo import DPO, DPOParams


def full_logits_logps(model, batch):
    """The naive way: logits at every position, then pick the answer tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logps = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (logps * batch.completion_mask[:, 1:]).sum(-1)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    registry = load_registry()
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    loaded = load_recipe(recipe_path, [f"model.source={args.model}", "output_dir=/tmp/unused"], registry=registry)
    recipe = loaded.recipe
    device = "cuda" if torch.cuda.is_available() else "cpu"
    handle = load_model(recipe.model, loaded.model_options, recipe.resolved_cache_dir(), registry=registry)
    model = handle.model.to(device)
    data = prepare_dataset(recipe.data, handle.tokenizer, registry.data_kinds["pairs"], registry=registry)
    batch = collate(data.examples[: args.pairs], list(range(args.pairs)), handle.tokenizer.pad_token_id,
                    data.names).to(device)
    tokens = batch.num_tokens
    answer_tokens = int(batch.completion_mask.sum())
    objective, params, needs = DPO(), DPOParams(), Needs(data="pairs", reference=True)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    ref = torch.zeros(args.pairs, device=device)

    precisions = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
    print(f"model {args.model} on {device} ({torch.get_num_threads()} threads); batch {args.pairs} pairs = "
          f"{2 * args.pairs} rows x {batch.input_ids.shape[1]} positions, {tokens} tokens, "
          f"{answer_tokens} answer tokens")
    print(f"{'precision':<10}{'ref fwd, answer logits':>24}{'ref fwd, all logits':>22}{'DPO train step':>17}"
          f"{'train tokens/s':>16}")
    for precision in precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        def autocast():
            return torch.autocast(device, dtype=dtype, enabled=dtype is not None)

        def reference_answer_logits():
            with torch.no_grad(), autocast():
                token_logps(model, batch)

        def reference_all_logits():
            with torch.no_grad(), autocast():
                full_logits_logps(model, batch)

        def train_step():
            with autocast():
                inputs = loss_inputs(model, batch, needs)
            inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref, ref
            objective.loss(params, inputs).losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        a = timed(reference_answer_logits, args.repeats)
        b = timed(reference_all_logits, args.repeats)
        c = timed(train_step, args.repeats)
        print(f"{precision:<10}{a:>22.3f} s{b:>20.3f} s{c:>15.3f} s{tokens / c:>16.0f}")


if __name__ == "__main__":
    main()
