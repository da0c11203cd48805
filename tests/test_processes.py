"""Several processes through accelerate, on CPU: the documented launch command, a 2-process run
that logs what a 1-process run logs, its exact resume, and workers that die with their launcher.

Each test starts `accelerate launch --multi_gpu --num_processes 2` (two CPU processes talking over
gloo); they take about 15 s each on a 2-core machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DPO = ROOT / "recipes" / "dpo_tiny.yaml"
GRPO = ROOT / "recipes" / "grpo_tiny.yaml"
COMMON = ["data.eval=tiny-prefs", "train.eval_every=3", "train.scheduler=constant", "train.warmup_steps=0",
          "train.save_every=3"]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"


def launch(*args, processes=2, cache=None, **kwargs):
    """``accelerate launch --multi_gpu --num_processes N -m prefkit run ...`` (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PREFKIT_CACHE": str(cache)} if cache else {})}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefkit", "run", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def single(*args, cache=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PREFKIT_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "prefkit", "run", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_rate(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("processes")
    # One reference cache for these runs and the resume below: an fp32 entry serves every process
    # count, and the runs compared bit for bit must read the same one (one process and two batch
    # the reference pass differently, which moves its sums by about 1e-7).
    one = single(DPO, f"output_dir={base / 'one'}", *COMMON, "train.max_steps=6", cache=base / "cache")
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(DPO, f"output_dir={base / 'two'}", *COMMON, "train.max_steps=6", cache=base / "cache")
    assert two.returncode == 0, two.stderr[-3000:]
    return base


def test_a_two_process_run_logs_what_a_one_process_run_logs(two_runs):
    one, two = log(two_runs / "one"), log(two_runs / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "lr", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    summary = json.loads((two_runs / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["examples_per_step"] == 4  # train.batch_size is the global batch
    # one reference pass, split over the processes, stored once in the shared cache
    assert summary["reference_cache"] in ("hit", "miss")


def test_a_two_process_run_resumes_exactly(two_runs, tmp_path):
    parts = tmp_path / "parts"
    first = launch(DPO, f"output_dir={parts}", *COMMON, "train.max_steps=3", cache=two_runs / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = launch(DPO, f"output_dir={parts}", *COMMON, "train.max_steps=6", "--resume", cache=two_runs / "cache")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert without_rate(log(parts)) == without_rate(log(two_runs / "two"))


def test_a_user_mistake_under_two_processes_is_one_message(tmp_path):
    done = launch(DPO, f"output_dir={tmp_path / 'r'}", "train.batch_size=3", "data.eval=null")
    assert done.returncode != 0
    assert "train.batch_size: 3 examples do not split evenly over 2 processes" in done.stdout + done.stderr


def test_the_online_loop_runs_under_two_processes(tmp_path):
    out = tmp_path / "grpo"
    done = launch(GRPO, f"output_dir={out}", "train.max_steps=4", "train.save_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    records = log(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    summary = json.loads((out / "run.json").read_text())
    assert summary["processes"] == 2 and summary["examples_per_step"] == 32
    # the whole rollout of 8 prompts x 4 samples was scored: a reward in [0, 1] and a finite loss
    assert all(0.0 <= r["reward/mean"] <= 1.0 and abs(r["loss"]) < 10 for r in records)
    assert (out / "checkpoints" / "step-4" / "rng-rank1.json").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_stops_the_workers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "long"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "prefkit", "run", str(DPO), f"output_dir={out}", "data.eval=null",
           "train.max_steps=100000", "train.save_every=null"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    assert launcher.poll() is None, "the launcher stopped by itself"
    workers = _children(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"


def test_python_m_prefkit_cli_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "prefkit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "run" in done.stdout and "compare" in done.stdout
