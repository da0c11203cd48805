"""The benchmark scripts run, so they cannot rot. Correctness only: nothing here looks at a timing.

``benchmarks/vs_trl.py --smoke`` trains a tiny random model with prefkit and with TRL on every job
(DPO, reward model, Preferred-FT) and fails unless both saw the same token ids and their losses agree;
for GRPO (sampled, so losses are not compared) unless both generated exactly the same number of tokens.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: int) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path})


def test_vs_trl_smoke_trains_both_libraries_to_the_same_losses(tmp_path):
    pytest.importorskip("trl")
    proc = run_script("benchmarks/vs_trl.py", "--smoke", "--workdir", str(tmp_path / "work"), timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    for where in ("dpo fp32, prefkit cold", "dpo fp32, prefkit warm", "reward fp32, prefkit", "sft fp32, prefkit"):
        line = next((l for l in out.splitlines() if l.startswith(f"loss agreement ({where} vs TRL)")), None)
        assert line is not None and line.endswith(": OK"), (where, out[-4000:])
    assert out.count("token ids: identical") == 3 and "DIFFERENT" not in out
    assert "GRPO: prefkit grpo vs TRL GRPOTrainer" in out
    assert "generated tokens: the same (every completion 8 tokens on both sides)" in out
    assert "all checks passed" in out


def test_vs_trl_can_give_trl_the_allocator_prefkit_sets_for_itself(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "numbers.json"
    proc = run_script("benchmarks/vs_trl.py", "--smoke", "--job", "dpo", "--trl-allocator", "tuned",
                      "--workdir", str(tmp_path / "work"), "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TRL's is tuned the same way (--trl-allocator tuned)" in proc.stdout
    runs = json.loads(out.read_text())["jobs"]["dpo-fp32"]["runs"]
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert {run["cpu_allocator"] for run in runs["TRL"]} == {"tuned" if glibc else "system"}
    assert {run["cpu_allocator"] for variant in ("prefkit cold", "prefkit warm") for run in runs[variant]} == \
        {run["cpu_allocator"] for run in runs["TRL"]}


def test_profile_step_script_profiles_an_online_iteration_on_the_tiny_model():
    proc = run_script("benchmarks/profile_step.py", "--job", "grpo", "--model", "tiny-llama", "--steps", "1",
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("generation", "scoring (reward)", "reference log-probs", "update: backward", "optimizer"):
        assert phase in proc.stdout


def test_dpo_step_script_runs_on_the_tiny_model():
    proc = run_script("benchmarks/dpo_step.py", "--model", "tiny-llama", "--pairs", "2", "--repeats", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DPO train step" in proc.stdout and "fp32" in proc.stdout


def test_profile_step_script_profiles_a_packed_dpo_step_on_the_tiny_model():
    proc = run_script("benchmarks/profile_step.py", "--model", "tiny-llama", "--steps", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "forward packed (no padding)" in proc.stdout
    for phase in ("backbone forward", "LM head + log-softmax", "DPO loss", "backward", "optimizer (AdamW)"):
        assert phase in proc.stdout
