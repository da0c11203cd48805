"""The CPU allocator set up for training (prefkit.models.allocator): big buffers are reused, not
mapped afresh from the kernel each step. Each case runs in a fresh interpreter, since the settings
belong to the whole process."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="the allocator is tuned on Linux with glibc only")

# Allocate, fill and free a 64 MiB tensor six times; report the minor page faults of the last five.
PROBE = """
import json, resource, sys, torch
from prefkit.models.allocator import tune_cpu_allocator
setup = tune_cpu_allocator(cuda=False) if sys.argv[1] == "tune" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(16 * 2**20); x.fill_(1.0); del x
before = faults()
for _ in range(5):
    x = torch.empty(16 * 2**20); x.fill_(1.0); del x
import os
print(json.dumps({"faults": faults() - before, "mode": setup.mode if setup else None,
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("PREFKIT_CPU_ALLOCATOR", "THP_MEM_ALLOC_ENABLE")}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                          env={**environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_linux
def test_tuned_allocator_reuses_big_buffers_instead_of_faulting_them_in_again():
    tuned = probe("tune")
    assert tuned["mode"] == "tuned" and tuned["thp"] == "1"
    # 5 x 64 MiB are 81,920 pages of 4 KiB, each faulted in when mapped afresh; reused from malloc's heap
    # almost none are (544 to 2,720 measured, with other processes about): under a tenth of them
    assert tuned["faults"] < 8192, tuned
    default = probe("none")
    if default["faults"] > 20000:  # the kernel maps each fresh mmap page by page (no THP for it)
        assert tuned["faults"] * 10 < default["faults"], (tuned, default)


@glibc_linux
def test_system_setting_leaves_the_allocator_alone():
    left = probe("tune", PREFKIT_CPU_ALLOCATOR="system")
    assert left["mode"] == "system" and left["thp"] is None
    # a user's own THP_MEM_ALLOC_ENABLE is kept
    assert probe("tune", THP_MEM_ALLOC_ENABLE="0")["thp"] == "0"


def test_gpu_runs_leave_the_allocator_alone():
    code = ("from prefkit.models.allocator import tune_cpu_allocator; s = tune_cpu_allocator(cuda=True);"
            "import os; print(s.mode, os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.stdout.split() == ["system", "None"], proc.stderr[-2000:]


def test_a_bad_setting_is_one_clear_message_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "prefkit", "run", str(ROOT / "recipes" / "dpo_tiny.yaml"),
                           f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
                               "PREFKIT_CPU_ALLOCATOR": "jemalloc"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "PREFKIT_CPU_ALLOCATOR='jemalloc'" in text and "tuned, system" in text
    assert "Traceback" not in text and not out.exists()


def test_validate_refuses_a_bad_setting_as_run_does(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prefkit.cli import app

    monkeypatch.setenv("PREFKIT_CPU_ALLOCATOR", "jemalloc")
    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "dpo_tiny.yaml"), f"output_dir={tmp_path}/r"])
    assert result.exit_code == 2 and "PREFKIT_CPU_ALLOCATOR='jemalloc'" in result.output, result.output
