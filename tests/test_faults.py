"""Runs keep what they have: faults during a run, damaged files, and resumes that must not lie.

Each test injects one fault into a tiny DPO (or GRPO) run and checks what is on disk afterwards:
no NaN in any checkpoint, the last good checkpoint kept, no stale or damaged cache entry used,
no finished run retrained, and a resumed run equal, bit for bit, to an uninterrupted one.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefkit.loops as engine
import prefkit.loops.checkpoint as checkpoint_module
from prefkit.api.errors import PrefkitError
from prefkit.loops.checkpoint import checkpoint_steps, save_checkpoint
from prefkit.loops.metrics import MetricsLog
from prefkit.loops.optim import lr_factor
from prefkit.manifest import verify_manifest
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe

REGISTRY = load_registry()
ROOT = Path(__file__).resolve().parent.parent
DPO = ROOT / "recipes" / "dpo_tiny.yaml"
GRPO = ROOT / "recipes" / "grpo_tiny.yaml"
SHORT = ["data.eval=null", "train.warmup_steps=0"]


class Messages:
    """A reporter that keeps what the engine tells the user."""

    def __init__(self):
        self.lines: list[str] = []

    def message(self, text):
        self.lines.append(text)

    def start(self, *args, **kwargs):
        pass

    def step(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def load(out, *overrides, recipe=DPO):
    return load_recipe(recipe, [f"output_dir={out}", *overrides], registry=REGISTRY)


def train(out, *overrides, resume=False, recipe=DPO, reporter=None, objective_loss=None):
    loaded = load(out, *overrides, recipe=recipe)
    if objective_loss is not None:
        loaded.objective.loss = objective_loss(loaded.objective.loss)  # this instance only
    return engine.train(loaded, resume=resume, registry=REGISTRY, reporter=reporter)


def records(run_dir):
    """metrics.jsonl without the wall-clock throughput (the only field that depends on timing)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in MetricsLog(run_dir / "metrics.jsonl").read()]


def fail_at_call(n, make_bad):
    """Wrap an objective's loss so that its ``n``-th call returns ``make_bad(output)``."""
    def wrap(loss):
        calls = {"n": 0}

        def patched(params, inputs):
            calls["n"] += 1
            out = loss(params, inputs)
            return make_bad(out) if calls["n"] == n else out

        return patched

    return wrap


def crash(out):
    raise RuntimeError("the machine went away")


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def all_checkpoints_finite(run_dir):
    for _, path in checkpoint_steps(run_dir):
        assert verify_manifest(path) is None
        for name, tensor in load_file(str(path / "trainable.safetensors")).items():
            assert torch.isfinite(tensor).all(), (path, name)


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("poison, what", [
    (lambda out: type(out)(out.losses * float("nan"), out.metrics), "the loss"),
    (lambda out: type(out)(NanGradient.apply(out.losses), out.metrics), "the gradient norm"),
])
def test_a_non_finite_step_stops_the_run_and_never_reaches_a_checkpoint(tmp_path, poison, what):
    out = tmp_path / "run"
    with pytest.raises(PrefkitError) as info:
        train(out, *SHORT, "train.max_steps=10", "train.save_every=2", objective_loss=fail_at_call(5, poison))
    message = str(info.value)
    assert "objective 'dpo'" in message and "step 5" in message and what in message and "train.lr" in message
    assert [s for s, _ in checkpoint_steps(out)] == [2, 4]  # nothing written after the bad step
    all_checkpoints_finite(out)
    assert not (out / "final").exists()


def test_non_finite_weights_are_never_written_and_never_push_out_a_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    common = dict(model=model, optimizer=optimizer, scheduler=scheduler, state={}, recipe_yaml="", keep=1)
    save_checkpoint(tmp_path, 1, **common)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(PrefkitError, match="NaN or inf.*weight"):
        save_checkpoint(tmp_path, 2, **common)
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [1]  # keep=1, yet step-1 survives
    assert verify_manifest(tmp_path / "checkpoints" / "step-1") is None


# ----------------------------------------------------------------------------- checkpoints


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    common = [*SHORT, "train.save_every=2", "train.keep_checkpoints=3", "train.scheduler=constant"]
    train(tmp_path / "whole", *common, "train.max_steps=8")
    parts = tmp_path / "parts"
    with pytest.raises(PrefkitError):  # killed during step 7: checkpoints 2, 4, 6
        train(parts, *common, "train.max_steps=8", objective_loss=fail_at_call(7, crash))
    weights = parts / "checkpoints" / "step-6" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in a float
    weights.write_bytes(bytes(data))
    messages = Messages()
    train(parts, *common, "train.max_steps=8", resume=True, reporter=messages)
    assert any("step-6 is damaged" in line and "checksum" in line for line in messages.lines), messages.lines
    assert any("step-4" in line and "resumed" in line for line in messages.lines), messages.lines
    assert records(parts) == records(tmp_path / "whole")


def test_half_deleted_checkpoints_are_never_listed_and_leftovers_are_removed(tmp_path):
    common = [*SHORT, "train.save_every=2", "train.keep_checkpoints=3", "train.scheduler=constant"]
    train(tmp_path / "whole", *common, "train.max_steps=8")
    parts = tmp_path / "parts"
    with pytest.raises(PrefkitError):
        train(parts, *common, "train.max_steps=8", objective_loss=fail_at_call(5, crash))  # checkpoints 2, 4
    root = parts / "checkpoints"
    # what kills leave behind: a half-written temporary folder and a rotation caught half-way; and a
    # step folder whose manifest is gone (not a leftover: a damaged checkpoint, skipped and written again)
    (root / ".tmp-step-6-abc").mkdir()
    (root / ".trash-step-2").mkdir()
    shutil.copytree(root / "step-4", root / "step-6")
    (root / "step-6" / "manifest.json").unlink()
    assert [s for s, _ in checkpoint_steps(parts)] == [2, 4]
    train(parts, *common, "train.max_steps=8", resume=True)
    assert not list(root.glob(".*"))
    assert records(parts) == records(tmp_path / "whole")


def test_the_logging_window_is_checkpointed_so_any_log_and_save_cadence_resumes_exactly(tmp_path):
    # log every 3 steps, save every 2: the checkpoint at step 4 holds step 4's values, unlogged yet
    common = [*SHORT, "train.log_every=3", "train.save_every=2", "train.max_steps=9"]
    train(tmp_path / "whole", *common)
    with pytest.raises(PrefkitError):
        train(tmp_path / "parts", *common, objective_loss=fail_at_call(6, crash))
    train(tmp_path / "parts", *common, resume=True)
    assert [r["step"] for r in records(tmp_path / "whole")] == [3, 6, 9]
    assert records(tmp_path / "parts") == records(tmp_path / "whole")


def test_a_half_written_metrics_line_does_not_block_a_resume(tmp_path):
    common = [*SHORT, "train.save_every=2", "train.max_steps=6", "train.scheduler=constant"]
    train(tmp_path / "whole", *common)
    parts = tmp_path / "parts"
    with pytest.raises(PrefkitError):
        train(parts, *common, objective_loss=fail_at_call(4, crash))
    with (parts / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.69')  # what a kill during a write leaves
    messages = Messages()
    train(parts, *common, resume=True, reporter=messages)
    assert any("unreadable line" in line for line in messages.lines)
    assert records(parts) == records(tmp_path / "whole")


def test_a_moved_run_folder_resumes(tmp_path):
    common = [*SHORT, "train.save_every=2", "train.max_steps=6", "train.scheduler=constant"]
    train(tmp_path / "whole", *common)
    with pytest.raises(PrefkitError):
        train(tmp_path / "here", *common, objective_loss=fail_at_call(5, crash))
    shutil.move(tmp_path / "here", tmp_path / "there")
    train(tmp_path / "there", *common, resume=True)
    assert records(tmp_path / "there") == records(tmp_path / "whole")


# ----------------------------------------------------------------------------- resumes that must refuse


def test_a_finished_run_is_never_retrained(tmp_path):
    out = tmp_path / "run"
    train(out, *SHORT, "train.max_steps=4", "train.save_every=2")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrefkitError, match="already finished at step 4"):
        train(out, *SHORT, "train.max_steps=4", "train.save_every=2", resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_without_a_checkpoint_refuses_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    train(out, *SHORT, "train.max_steps=3", "train.save_every=null")  # no checkpoint
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrefkitError, match="no checkpoint to continue from"):
        train(out, *SHORT, "train.max_steps=6", "train.save_every=null", resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(PrefkitError, match="holds no run"):
        train(tmp_path / "empty", *SHORT, resume=True)


def cli(*args):
    """``prefkit ARGS``: its exit status and its output, each message on one line."""
    done = subprocess.run([sys.executable, "-m", "prefkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "10000"})
    return done.returncode, done.stdout + done.stderr


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def remove_manifest(folder):
    (folder / "manifest.json").unlink()


def truncate_weights(folder):
    weights = folder / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


FOUR_STEPS = [*SHORT, "train.max_steps=4", "train.save_every=1"]  # keep_checkpoints=2: step-3 and step-4


def test_a_checkpoint_without_its_manifest_is_reported_and_skipped_like_other_damage(tmp_path):
    out = tmp_path / "run"
    train(out, *FOUR_STEPS)
    assert [s for s, _ in checkpoint_steps(out)] == [3, 4]
    remove_manifest(out / "checkpoints" / "step-4")
    code, text = cli("run", DPO, f"output_dir={out}", *FOUR_STEPS, "--resume")
    assert code == 0, text
    assert "step-4 is damaged (manifest.json is missing); skipped" in text, text
    assert "resumed from" in text and "step-3" in text, text
    assert [s for s, _ in checkpoint_steps(out)] == [3, 4]  # step 4 written again, whole
    all_checkpoints_finite(out)


@pytest.mark.parametrize("damage, why", [
    (remove_manifest, "manifest.json is missing"),
    (truncate_weights, "trainable.safetensors has 100 bytes, the manifest says"),
])
def test_a_resume_with_only_damaged_checkpoints_names_each_and_changes_nothing(tmp_path, damage, why):
    out = tmp_path / "run"
    train(out, *FOUR_STEPS)
    for _, path in checkpoint_steps(out):
        damage(path)
    before = snapshot(out)
    code, text = cli("run", DPO, f"output_dir={out}", *FOUR_STEPS, "--resume")
    assert code == 2, text
    assert "Traceback" not in text
    assert "damaged" in text and "nothing was changed" in text, text
    assert f"checkpoints/step-3: {why}" in text and f"checkpoints/step-4: {why}" in text, text
    assert "save_every" not in text, text  # checkpoints were kept; they are damaged
    assert snapshot(out) == before


def test_export_of_a_damaged_step_lists_only_the_intact_ones(tmp_path):
    from prefkit.loops.export import export_checkpoint

    out = tmp_path / "run"
    train(out, *FOUR_STEPS)
    truncate_weights(out / "checkpoints" / "step-4")
    with pytest.raises(PrefkitError, match=r"step-4 is damaged \(trainable.safetensors .*\); export another step "
                                           r"\(intact: 3\)"):
        export_checkpoint(out, step=4, registry=REGISTRY)
    remove_manifest(out / "checkpoints" / "step-3")
    before = snapshot(out)
    code, text = cli("export", out, "--step", 4)
    assert code == 2 and "Traceback" not in text, text
    assert "step-4 is damaged" in text and " ".join(text.split()).endswith("no other checkpoint is intact"), text
    code, text = cli("export", out, "--step", 3)
    assert code == 2 and "step-3 is damaged (manifest.json is missing)" in text, text
    code, text = cli("export", out)  # the newest step folder, damaged: named, not passed over
    assert code == 2 and "step-4 is damaged" in text, text
    assert snapshot(out) == before


def test_resume_after_the_data_changed_refuses(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [*SHORT, f"data.train={data}", "train.save_every=2", "train.max_steps=6"]
    with pytest.raises(PrefkitError):
        train(tmp_path / "run", *common, objective_loss=fail_at_call(3, crash))
    rows[5]["chosen"] = "An edited answer."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrefkitError, match="training data changed"):
        train(tmp_path / "run", *common, resume=True)


# ----------------------------------------------------------------------------- learning-rate schedule


def test_an_extended_resume_follows_the_longer_plan(tmp_path):
    common = [*SHORT, "train.save_every=2", "train.scheduler=linear", "train.warmup_steps=2"]
    train(tmp_path / "short", *common, "train.max_steps=4")
    messages = Messages()
    train(tmp_path / "short", *common, "train.max_steps=8", resume=True, reporter=messages)
    assert any("re-planned for 8 steps" in line for line in messages.lines), messages.lines
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "short")}
    peak = 1e-3
    # from the resumed step on, every rate is the 8-step plan's (step s logs the rate of optimizer step s-1)
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(peak * lr_factor(step - 1, total=8, warmup=2, kind="linear"), rel=1e-12)
    # and the first four are the 4-step plan's, as they were trained
    assert lrs[4] == pytest.approx(peak * lr_factor(3, total=4, warmup=2, kind="linear"), rel=1e-12)


# ----------------------------------------------------------------------------- plugin output checks


@pytest.mark.parametrize("bad, match", [
    (lambda out: type(out)(out.losses.mean(), out.metrics), r"shape \[\]"),
    (lambda out: type(out)(out.losses.detach(), out.metrics), "no gradient"),
    (lambda out: type(out)(out.losses.long(), out.metrics), "dtype torch.int64"),
    (lambda out: out.losses, "returned Tensor"),
    (lambda out: type(out)(out.losses, {**out.metrics, "note": "text"}), "metric 'note' = 'text' \\(str\\)"),
    (lambda out: type(out)(out.losses, {**out.metrics, "none": None}), "metric 'none' = None"),
    (lambda out: type(out)(out.losses, {"empty": out.losses[:0]}), "metric 'empty' as a torch.float32 tensor of shape \\[0\\]"),
    (lambda out: type(out)(out.losses, [1.0]), "metrics of type list"),
])
def test_a_loss_of_the_wrong_shape_dtype_or_without_gradient_is_refused_at_the_first_step(tmp_path, bad, match):
    with pytest.raises(PrefkitError, match=f"objective 'dpo': loss\\(\\).*{match}"):
        train(tmp_path / "run", *SHORT, "train.max_steps=3", "train.save_every=1",
              objective_loss=fail_at_call(1, bad))
    assert not (tmp_path / "run" / "checkpoints").exists() or not checkpoint_steps(tmp_path / "run")


def test_an_online_objectives_metrics_must_be_numbers_or_one_element_tensors():
    """prepare() and the online loss() log one number per metric (checked before logging)."""
    from types import SimpleNamespace

    from prefkit.loops.runs import check_metrics

    grpo = SimpleNamespace(name="grpo")
    fine = {"a": 1, "b": 0.5, "c": True, "d": torch.tensor(2.0), "e": torch.ones(1)}
    assert check_metrics(grpo, "prepare()", fine, scalars=True) is fine
    for bad, match in (({"a": torch.ones(2)}, r"metric 'a' as a torch.float32 tensor of shape \[2\]; it must be a "
                                              r"number or a one-element tensor"),
                       ({"a": "x"}, r"metric 'a' = 'x' \(str\)"), ({1: 2.0}, "a metric named 1"),
                       (None, "metrics of type NoneType; it must be a dict")):
        with pytest.raises(PrefkitError, match=r"objective 'grpo': prepare\(\) returned " + match):
            check_metrics(grpo, "prepare()", bad, scalars=True)
    check_metrics(grpo, "loss()", {"a": torch.ones(3)}, scalars=False)  # offline: averaged over its elements


# ----------------------------------------------------------------------------- a full disk


def _small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    """On a small tmpfs where one can be mounted (root); otherwise the same fault injected into
    the checkpoint writer (its third file write fails with ENOSPC after writing half)."""
    disk = tmp_path / "disk"
    mounted = _small_tmpfs(disk, "500k")  # room for one checkpoint (about 330 kB), not two
    try:
        out = disk / "run"
        if not mounted:
            real = checkpoint_module.save_file
            calls = {"n": 0}

            def full(tensors, filename, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 3:  # the second checkpoint's weights
                    Path(filename).write_bytes(b"\0" * 100)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(tensors, filename, *args, **kwargs)

            monkeypatch.setattr(checkpoint_module, "save_file", full)
        # a model of about 25k parameters: weights + AdamW moments + final make about 330 kB a checkpoint
        with pytest.raises(PrefkitError) as info:
            train(out, *SHORT, "train.max_steps=40", "train.save_every=1", "train.keep_checkpoints=1",
                  "model.options={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 32}",
                  "train.reference_cache=false")
        message = str(info.value)
        assert "No space left on device" in message and "last good checkpoint" in message, message
        assert "--resume" in message
        steps = checkpoint_steps(out)
        assert steps, "the last good checkpoint was lost"
        all_checkpoints_finite(out)
        assert not list((out / "checkpoints").glob(".tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: mmapped tensors may linger


def test_a_reference_cache_that_cannot_be_written_only_warns(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "reference").write_text("a file where the cache folder should be")
    messages = Messages()
    summary = train(tmp_path / "run", *SHORT, "train.max_steps=2", f"cache_dir={cache}", reporter=messages)
    assert summary["steps"] == 2
    assert any("could not store the reference log-probs" in line for line in messages.lines), messages.lines


# ----------------------------------------------------------------------------- the online loop


def test_the_online_loop_keeps_its_window_and_refuses_to_retrain(tmp_path):
    common = ["train.max_steps=5", "train.save_every=2", "train.log_every=3"]
    train(tmp_path / "whole", *common, recipe=GRPO)
    with pytest.raises(PrefkitError):  # GRPO makes 4 optimizer steps (loss calls: 4 per minibatch pass) a rollout
        train(tmp_path / "parts", *common, recipe=GRPO, objective_loss=fail_at_call(4 * 4 + 1, crash))
    assert [s for s, _ in checkpoint_steps(tmp_path / "parts")] == [2, 4]
    train(tmp_path / "parts", *common, recipe=GRPO, resume=True)
    assert records(tmp_path / "parts") == records(tmp_path / "whole")
    with pytest.raises(PrefkitError, match="already finished"):
        train(tmp_path / "parts", *common, recipe=GRPO, resume=True)


def test_resume_through_the_cli_exits_2_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    train(out, *SHORT, "train.max_steps=2", "train.save_every=1")
    done = subprocess.run([sys.executable, "-m", "prefkit", "run", str(DPO), f"output_dir={out}", *SHORT,
                           "train.max_steps=2", "train.save_every=1", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "already finished" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# ----------------------------------------------------------------------------- caches


def test_the_reference_cache_key_covers_the_whole_model_config(tmp_path):
    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "model"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    common = [*SHORT, f"model.source={folder}", "model.options={}", "train.max_steps=1", f"cache_dir={tmp_path / 'cache'}"]
    assert train(tmp_path / "a", *common)["reference_cache"] == "miss"
    assert train(tmp_path / "b", *common)["reference_cache"] == "hit"
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10  # same weights, other numbers
    (folder / "config.json").write_text(json.dumps(config))
    assert train(tmp_path / "c", *common)["reference_cache"] == "miss"


def test_a_damaged_reference_cache_entry_is_detected_and_recomputed(tmp_path):
    cache = tmp_path / "cache"
    common = [*SHORT, "train.max_steps=2", f"cache_dir={cache}"]
    train(tmp_path / "a", *common)
    [entry] = (cache / "reference").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-2] ^= 0x01  # one flipped bit in the last float
    entry.write_bytes(bytes(data))
    messages = Messages()
    summary = train(tmp_path / "b", *common, reporter=messages)
    assert summary["reference_cache"] == "miss"
    assert any("is damaged" in line and "checksum" in line for line in messages.lines), messages.lines
    assert records(tmp_path / "b") == records(tmp_path / "a")
    assert train(tmp_path / "c", *common)["reference_cache"] == "hit"  # rewritten whole


def test_a_damaged_converted_model_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / "cache"
    common = [*SHORT, "train.max_steps=2", f"cache_dir={cache}", "train.reference_cache=false"]
    train(tmp_path / "a", *common)
    [weights] = (cache / "models").glob("tiny-llama-*/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="prefkit"):
        train(tmp_path / "b", *common)
    assert "is damaged" in caplog.text and "checksum" in caplog.text
    assert verify_manifest(weights.parent) is None  # built again
    assert records(tmp_path / "b") == records(tmp_path / "a")


def test_a_converted_model_is_hashed_once_a_process_until_a_file_changes(tmp_path, monkeypatch):
    import os

    from prefkit.models import loading

    def build(folder):
        (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)

    calls = []
    real = loading.verify_manifest
    monkeypatch.setattr(loading, "verify_manifest", lambda folder: calls.append(folder) or real(folder))
    final = tmp_path / "model"
    loading.materialize_once(final, build)  # built: nothing to verify
    loading.materialize_once(final, build)
    loading.materialize_once(final, build)
    assert len(calls) == 1  # verified once, then trusted while its files are as they were
    data = bytearray((final / "weights.bin").read_bytes())
    data[7] ^= 0x01
    (final / "weights.bin").write_bytes(bytes(data))
    stat = (final / "weights.bin").stat()
    # a rewrite within the filesystem's clock tick could keep the old time; make sure this one differs
    os.utime(final / "weights.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    loading.materialize_once(final, build)  # the change is seen: hashed again, found damaged, rebuilt
    assert len(calls) == 2 and (final / "weights.bin").read_bytes() == bytes(range(256)) * 64


# ----------------------------------------------------------------------------- random kills


KILLED = [  # (recipe, overrides): offline pairs, unpaired with a mismatched reference, a scalar head, online
    ("kto_tiny.yaml", ["train.max_steps=60", "train.save_every=4", "train.log_every=3"]),
    ("bt_reward_tiny.yaml", ["data.eval=null", "train.max_steps=60", "train.save_every=5", "train.log_every=2"]),
    ("unlikelihood_tiny.yaml", ["data.eval=null", "train.max_steps=60", "train.save_every=3", "train.log_every=4"]),
    ("grpo_tiny.yaml", ["train.max_steps=14", "train.save_every=2", "train.log_every=3"]),
]


@pytest.mark.parametrize("recipe, overrides", KILLED, ids=[r for r, _ in KILLED])
def test_a_run_killed_at_a_random_moment_resumes_bit_identically(tmp_path, recipe, overrides):
    """SIGKILL at a seeded random moment after a random checkpoint, then --resume: every logged
    value equals the uninterrupted run's, whatever log_every and save_every are."""
    import random
    import signal
    import time

    rng = random.Random(recipe)  # a fixed draw per recipe, so CI is reproducible
    path = ROOT / "recipes" / recipe
    train(tmp_path / "whole", *overrides, recipe=path)
    saves = [s for s, _ in checkpoint_steps(tmp_path / "whole")]
    save_every = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.save_every"))
    first = save_every * rng.randint(1, 3)  # after the first, second or third checkpoint
    delay = rng.uniform(0.0, 0.05)

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "prefkit", "run", str(path), f"output_dir={killed}", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / f"step-{first}").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "run.json").exists()

    train(killed, *overrides, recipe=path, resume=True)
    assert records(killed) == records(tmp_path / "whole")
    assert [s for s, _ in checkpoint_steps(killed)] == saves


def test_an_exception_inside_a_plugin_loss_names_the_objective_and_its_package(tmp_path):
    with pytest.raises(PrefkitError) as info:
        train(tmp_path / "run", *SHORT, "train.max_steps=3", objective_loss=fail_at_call(2, crash))
    message = str(info.value)
    assert message.startswith("objective 'dpo' (from package prefkit ") and "RuntimeError: the machine went away" in message


def test_run_json_breaks_the_time_down_by_phase(tmp_path):
    offline = train(tmp_path / "dpo", *SHORT, "train.max_steps=3")
    assert {"batch", "forward_and_loss", "backward", "optimizer"} <= set(offline["seconds_by_phase"])
    assert sum(offline["seconds_by_phase"].values()) <= offline["wall_seconds"]
    online = train(tmp_path / "grpo", "train.max_steps=2", recipe=GRPO)
    phases = online["seconds_by_phase"]
    assert {"generate", "score", "collate", "old_logprobs", "reference_logprobs", "prepare", "update_forward",
            "update_backward", "optimizer"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= online["wall_seconds"]


def test_rotation_removes_a_damaged_step_folder_older_than_the_kept_checkpoints(tmp_path):
    from prefkit.loops.checkpoint import older_than_kept, step_folders

    out = tmp_path / "run"
    train(out, *FOUR_STEPS)
    old = out / "checkpoints" / "step-1"  # a damaged folder no resume would ever read again
    shutil.copytree(out / "checkpoints" / "step-3", old)
    remove_manifest(old)
    assert [s for s, _ in older_than_kept(out, 2)] == [1] and [s for s, _ in older_than_kept(out, 0)] == [1, 3, 4]
    train(out, *SHORT, "train.max_steps=6", "train.save_every=1", resume=True)
    assert [s for s, _ in step_folders(out)] == [5, 6]
