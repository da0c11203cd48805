"""The engine end to end on the tiny model: run directory, reference cache, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prefkit.loops as engine
import prefkit.loops.offline as offline
from prefkit.api.errors import PrefkitError
from prefkit.models.allocator import tune_cpu_allocator
from prefkit.recipe import load_recipe

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "dpo_tiny.yaml"


def run(tmp_path, name, *overrides, resume=False):
    loaded = load_recipe(TINY, [f"output_dir={tmp_path / name}", *overrides], registry=REGISTRY)
    return engine.train(loaded, resume=resume, registry=REGISTRY), tmp_path / name


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def forbid_reference_pass(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the reference model ran although the cache should have answered")

    monkeypatch.setattr(offline, "compute_reference", boom)


def test_run_directory_layout_and_learning(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, out = run(tmp_path, "a")
    assert (out / "recipe.resolved.yaml").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lr", "tokens_per_s"]:
        assert key in records[0], key
    assert "eval/loss" in records[11] and "eval/rewards/accuracies" in records[-1]
    # the preference is learnt: margins and accuracy rise, loss falls
    first, last = records[:4], records[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.5
    assert mean(last, "rewards/accuracies") >= 0.9
    assert mean(last, "loss") < mean(first, "loss")
    # checkpoints every 6 steps, the last two kept, each complete
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-18", "step-24"]
    for name in ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "rng.json",
                 "state.json", "recipe.resolved.yaml"]:
        assert (out / "checkpoints" / "step-24" / name).exists(), name
    # the final model loads with plain transformers
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tokenizer)
    saved = json.loads((out / "run.json").read_text())
    assert saved["reference_cache"] == "miss" and saved["steps"] == 24 and saved["objective"] == "dpo"
    assert saved["tokens_per_s"] > 0 and saved["final_metrics"]["step"] == 24
    assert "dpo" in saved["plugins"] and saved["prefkit_version"]
    assert saved["cpu_allocator"] == tune_cpu_allocator().mode  # "tuned" on Linux with glibc
    assert summary["data"]["train_fingerprint"] == saved["data"]["train_fingerprint"]


def test_reference_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    short = ["train.max_steps=2", "train.save_every=null", "data.eval=null"]
    first, _ = run(tmp_path, "one", *short)
    assert first["reference_cache"] == "miss"

    with monkeypatch.context() as m:  # same inputs, another directory: no reference forward pass at all
        forbid_reference_pass(m)
        second, _ = run(tmp_path, "two", *short)
    assert second["reference_cache"] == "hit"
    # other objective parameters and training settings do not change the reference numbers
    assert run(tmp_path, "three", *short, "objective.params.beta=0.5", "train.lr=1e-4")[0]["reference_cache"] == "hit"

    # every input of the reference numbers is part of the key
    for i, change in enumerate(["data.max_length=100", "model.options.seed=1", "data.chat_template=never",
                                "train.precision=bf16", "data.max_rows=40", "data.max_prompt_length=16"]):
        assert run(tmp_path, f"changed{i}", *short, change)[0]["reference_cache"] == "miss", change

    # turning the disk cache off computes in memory and stores nothing
    cache_files = sorted((Path(os.environ["PREFKIT_CACHE"]) / "reference").glob("*.safetensors"))
    assert run(tmp_path, "nocache", *short, "train.reference_cache=false")[0]["reference_cache"] == "miss"
    assert sorted((Path(os.environ["PREFKIT_CACHE"]) / "reference").glob("*.safetensors")) == cache_files


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
    short = ["train.max_steps=1", "train.save_every=null", "data.eval=null", "seed=5", "data.max_rows=20"]
    run(tmp_path, "one", *short)
    newest = max((Path(os.environ["PREFKIT_CACHE"]) / "reference").glob("*.safetensors"),
                 key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"not a safetensors file")
    assert run(tmp_path, "two", *short)[0]["reference_cache"] == "miss"
    assert run(tmp_path, "three", *short)[0]["reference_cache"] == "hit"


def test_cached_reference_equals_the_initial_policy(tmp_path):
    from prefkit.data.batching import collate
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.logprobs import sequence_logps, token_logps
    from prefkit.models.loading import load_model
    from prefkit.models.refcache import ReferenceCache

    loaded = load_recipe(TINY, [f"output_dir={tmp_path / 'x'}", "train.max_steps=1", "data.eval=null"], registry=REGISTRY)
    engine.train(loaded, registry=REGISTRY)
    recipe = loaded.recipe
    handle = load_model(recipe.model, loaded.model_options, recipe.resolved_cache_dir(), registry=REGISTRY)
    data = prepare_dataset(recipe.data, handle.tokenizer, REGISTRY.data_kinds["pairs"], registry=REGISTRY)
    key = offline.reference_fingerprint(weights=handle.weights_fingerprint, tokenizer=handle.tokenizer_fingerprint,
                                       data=data.fingerprint(), precision="fp32", names=data.names, tokens=False)
    cached = ReferenceCache(recipe.resolved_cache_dir() / "reference").load(key, len(data.examples), data.names, False)
    batch = collate(data.examples[:3], [0, 1, 2], handle.tokenizer.pad_token_id, data.names)
    with torch.no_grad():
        sums = sequence_logps(token_logps(handle.model, batch), batch.completion_mask)
    torch.testing.assert_close(cached.sums["chosen"][:3], sums[:3], rtol=0, atol=1e-4)
    torch.testing.assert_close(cached.sums["rejected"][:3], sums[3:], rtol=0, atol=1e-4)


def test_the_reference_pass_forwards_the_loops_own_batches(tmp_path, monkeypatch):
    """In bf16 a row's log-probs depend a little on the rows batched with it (about 0.1 nats a
    sequence on SmolLM2: kernels round differently for other shapes). Here a forward whose numbers
    depend on its batch mates stands in for that: since the reference pass forwards the loop's own
    batches, the first step's log-ratios are still exactly 0 (a DPO loss of exactly log 2), and so
    are the margins of an evaluation of the reference itself."""
    import math

    import prefkit

    real = offline.token_logps

    def batch_dependent(model, batch):  # shifts every answer token by an amount set by the batch's rows
        values = real(model, batch)
        return values + 1e-3 * float(batch.indices.sum()) * batch.completion_mask

    monkeypatch.setattr(offline, "token_logps", batch_dependent)
    summary, out = run(tmp_path, "a", "train.max_steps=1", "train.save_every=null", "data.eval=null", "seed=3",
                       "train.reference_cache=false", "train.precision=bf16")
    assert summary["precision"] == "bf16"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    metrics = prefkit.evaluate(str(TINY), ["train.reference_cache=false", "train.precision=bf16",
                                           f"output_dir={tmp_path / 'e'}"], registry=REGISTRY)
    assert metrics["eval/rewards/margins"] == 0.0 and metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_a_reduced_precision_reference_is_keyed_on_its_batches():
    from prefkit.data.batching import BatchOrder

    common = dict(weights="w", tokenizer="t", data="d", names=("chosen", "rejected"), tokens=False)
    plans = [[offline.training_batches(BatchOrder(10, 4, seed), 0, 1)] for seed in (0, 1)]
    assert plans[0] != plans[1]
    assert sorted(i for batch in plans[0][0] for i in batch) == list(range(10))  # each example once
    assert len({offline.reference_fingerprint(precision="bf16", batches=plan, **common) for plan in plans}) == 2
    # two processes: each takes every other row of every micro-batch, as the loop does
    order = BatchOrder(10, 4, 0)
    shares = [offline.training_batches(order, rank, 2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*shares)] == [order.indices(k)[0::2] + order.indices(k)[1::2] for k in range(3)]
    assert offline.evaluation_batches(10, 4, 1, 2) == [[4, 5, 6, 7]]


def test_existing_run_is_never_overwritten(tmp_path):
    short = ["train.max_steps=2", "data.eval=null"]
    _, out = run(tmp_path, "a", *short)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(PrefkitError, match="--resume"):
        run(tmp_path, "a", *short)
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_refuses_a_changed_recipe(tmp_path):
    run(tmp_path, "a", "train.max_steps=6", "data.eval=null")
    with pytest.raises(PrefkitError, match="train.lr"):
        run(tmp_path, "a", "train.max_steps=6", "data.eval=null", "train.lr=0.5", resume=True)


def test_resume_accepts_a_checkpoint_from_before_a_new_setting(tmp_path):
    """A checkpoint written before a setting existed resumes when the setting is at its default
    (the run behaved that way), and refuses when it is not."""
    import yaml

    from prefkit.manifest import write_manifest

    run(tmp_path, "a", "train.max_steps=4", "train.save_every=2", "data.eval=null")
    for saved in (tmp_path / "a" / "checkpoints").glob("step-*/recipe.resolved.yaml"):
        recipe = yaml.safe_load(saved.read_text())
        del recipe["train"]["gradient_checkpointing"]
        saved.write_text(yaml.safe_dump(recipe))
        write_manifest(saved.parent)  # as the older version wrote it
    with pytest.raises(PrefkitError, match=r"train.gradient_checkpointing \(False -> True\)"):
        run(tmp_path, "a", "train.max_steps=6", "train.save_every=2", "data.eval=null",
            "train.gradient_checkpointing=true", resume=True)
    summary, _ = run(tmp_path, "a", "train.max_steps=6", "train.save_every=2", "data.eval=null", resume=True)
    assert summary["steps"] == 6


def test_resume_in_process_continues_exactly(tmp_path):
    # a constant schedule, so that stopping at step 5 and extending to 12 changes no learning rate
    common = ["data.eval=null", "train.save_every=3", "train.scheduler=constant", "train.warmup_steps=0"]
    run(tmp_path, "whole", *common, "train.max_steps=12")
    run(tmp_path, "parts", *common, "train.max_steps=5")  # checkpoints at steps 3 and 5
    summary, _ = run(tmp_path, "parts", *common, "train.max_steps=12", resume=True)
    assert summary["steps"] == 12
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def test_resume_after_sigkill_logs_identical_losses(tmp_path):
    """A CPU run killed with SIGKILL after a checkpoint and resumed logs the same loss, bit for bit."""
    common = ["data.eval=null", "train.max_steps=60", "train.save_every=5", "train.warmup_steps=0"]
    run(tmp_path, "whole", *common)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prefkit", "run", str(TINY), f"output_dir={killed}", *common]
    # the same thread count as this process: CPU kernels may sum in another order with another count
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final").exists()
    logged = losses(killed)
    assert 10 <= logged[-1][0] < 60

    summary, _ = run(tmp_path, "killed", *common, resume=True)
    assert summary["steps"] == 60
    assert losses(killed) == losses(tmp_path / "whole")  # exact float equality, every step


def test_lora_run_shares_the_reference_and_checkpoints_only_the_adapter(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    short = ["data.eval=null", "train.max_steps=4", "train.save_every=2"]
    assert run(tmp_path, "full", *short)[0]["reference_cache"] == "miss"
    # the reference of a LoRA run is the base model with the adapter disabled: same weights, same cache entry
    summary, out = run(tmp_path, "lora", *short, "model.lora={r: 4, alpha: 8}", "train.lr=1e-2")
    assert summary["reference_cache"] == "hit" and summary["model"]["lora"] is True
    saved = load_file(str(out / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    # final/ is a plain merged model; the adapter is kept beside it
    assert (out / "final" / "adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    assert merged.config.vocab_size == base.config.vocab_size
    # the LoRA run resumes exactly too
    run(tmp_path, "lora_whole", *short[:1], "train.max_steps=6", "train.save_every=2", "model.lora={r: 4, alpha: 8}",
        "train.lr=1e-2", "train.scheduler=constant")
    run(tmp_path, "lora_parts", *short[:1], "train.max_steps=3", "train.save_every=2", "model.lora={r: 4, alpha: 8}",
        "train.lr=1e-2", "train.scheduler=constant")
    run(tmp_path, "lora_parts", *short[:1], "train.max_steps=6", "train.save_every=2", "model.lora={r: 4, alpha: 8}",
        "train.lr=1e-2", "train.scheduler=constant", resume=True)
    assert losses(tmp_path / "lora_parts") == losses(tmp_path / "lora_whole")
