"""``train.precision: auto``: the decision, from timings injected here (no test times anything), and
its cache."""

import json
from pathlib import Path

import pytest
import torch

import prefkit.loops as engine
import prefkit.models.precision as precision
from prefkit.loops.runs import resolve_precision
from prefkit.models.precision import CpuProbe, auto_precision, choose_cpu_precision, cpu_precision
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe

REGISTRY = load_registry()
TINY = Path(__file__).resolve().parent.parent / "recipes" / "dpo_tiny.yaml"


class Probe:
    """A stand-in for the measurement: returns fixed timings and counts its calls."""

    def __init__(self, fp32: float, bf16: float):
        self.result, self.calls = CpuProbe(fp32, bf16), 0

    def __call__(self) -> CpuProbe:
        self.calls += 1
        return self.result


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    "fp32, bf16, expected",
    [
        (1.0, 0.5, "bf16"),  # native bf16 (AVX512-BF16, AMX): about twice as fast
        (1.0, 1 / 1.2, "bf16"),  # exactly the minimum speed-up
        (1.0, 0.9, "fp32"),  # 1.11x: not worth bf16's rounding
        (1.0, 1.0, "fp32"),
        (1.0, 3.0, "fp32"),  # no native bf16: emulated, three times slower
    ],
)
def test_bf16_only_where_it_measures_clearly_faster(fp32, bf16, expected):
    assert choose_cpu_precision(CpuProbe(fp32, bf16)) == expected


def test_measured_once_per_machine_then_read_from_the_cache(tmp_path, cpu_only):
    probe = Probe(1.0, 0.5)
    assert cpu_precision(tmp_path, probe) == "bf16"
    assert cpu_precision(tmp_path, probe) == "bf16"
    assert probe.calls == 1
    (entry,) = (tmp_path / "precision").glob("*.json")
    record = json.loads(entry.read_text())
    assert record["choice"] == "bf16" and record["speedup"] == 2.0
    assert set(record["machine"]) == {"cpu", "cores", "torch", "capability"}


def test_another_machine_or_torch_measures_again(tmp_path, monkeypatch, cpu_only):
    probe = Probe(1.0, 3.0)
    assert cpu_precision(tmp_path, probe) == "fp32"
    monkeypatch.setattr(precision, "machine", lambda: {"cpu": "another", "cores": 2, "torch": "x", "capability": "y"})
    assert cpu_precision(tmp_path, Probe(1.0, 0.5)) == "bf16"
    assert len(list((tmp_path / "precision").glob("*.json"))) == 2


def test_an_unreadable_entry_is_measured_again(tmp_path, cpu_only):
    cpu_precision(tmp_path, Probe(1.0, 0.5))
    (entry,) = (tmp_path / "precision").glob("*.json")
    entry.write_text("{not json")
    probe = Probe(1.0, 3.0)
    assert cpu_precision(tmp_path, probe) == "fp32" and probe.calls == 1
    assert json.loads(entry.read_text())["choice"] == "fp32"


def test_no_cache_dir_measures_every_time(cpu_only):
    probe = Probe(1.0, 0.5)
    cpu_precision(None, probe), cpu_precision(None, probe)
    assert probe.calls == 2


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_a_gpu_is_never_probed(tmp_path, monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    probe = Probe(1.0, 0.5)
    assert auto_precision(tmp_path, probe) == expected
    assert probe.calls == 0 and not (tmp_path / "precision").exists()


def test_the_probe_runs_and_returns_timings():
    measured = precision.measure_cpu(tokens=4, hidden=8, intermediate=16, repeats=1)
    assert measured.fp32_seconds > 0 and measured.bf16_seconds > 0


@pytest.mark.parametrize("fp32, bf16, expected", [(1.0, 0.5, "bf16"), (1.0, 3.0, "fp32")])
def test_a_run_with_precision_auto_uses_the_measured_choice(tmp_path, prefkit_cache, monkeypatch, cpu_only, fp32,
                                                            bf16, expected):
    probe = Probe(fp32, bf16)
    monkeypatch.setattr(precision, "measure_cpu", probe)
    assert resolve_precision("auto", prefkit_cache).name == expected
    overrides = [f"output_dir={tmp_path / 'run'}", "train.precision=auto", "train.max_steps=2", "data.eval=null"]
    summary = engine.train(load_recipe(TINY, overrides, registry=REGISTRY), registry=REGISTRY)
    assert summary["precision"] == expected
    assert probe.calls == 1  # the run read the entry resolve_precision stored in the same cache ($PREFKIT_CACHE)


def test_the_attention_choice_is_measured_once_per_machine_and_settled_by_a_bf16_run(tmp_path, monkeypatch,
                                                                                     cpu_only):
    """A resumed run must compute attention as the interrupted one did: the choice comes from the
    machine's cache entry, not from a new measurement that could land on the other side."""
    calls = []

    def measure(timings):
        return lambda: calls.append(timings) or timings

    monkeypatch.setattr(precision, "_cpu_attention_in_fp32", None)
    monkeypatch.setattr(precision, "measure_cpu_attention", measure((2.0, 1.0)))  # fp32 twice as fast
    assert resolve_precision("bf16", tmp_path).name == "bf16"
    assert precision._cpu_attention_in_fp32 is True and len(calls) == 1
    (entry,) = (tmp_path / "precision").glob("attention-*.json")
    assert json.loads(entry.read_text())["fp32"] is True

    monkeypatch.setattr(precision, "_cpu_attention_in_fp32", None)  # a new process ...
    monkeypatch.setattr(precision, "measure_cpu_attention", measure((1.0, 1.0)))  # ... that would measure otherwise
    resolve_precision("bf16", tmp_path)
    assert precision._cpu_attention_in_fp32 is True and len(calls) == 1  # read, not measured

    monkeypatch.setattr(precision, "_cpu_attention_in_fp32", None)
    resolve_precision("fp32", tmp_path)  # fp32 runs have no bf16 attention to decide
    assert precision._cpu_attention_in_fp32 is None
    entry.write_text("{not json")
    resolve_precision("bf16", tmp_path)  # an unreadable entry: measured again and rewritten
    assert precision._cpu_attention_in_fp32 is False and len(calls) == 2
    assert json.loads(entry.read_text())["fp32"] is False
