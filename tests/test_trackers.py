"""Trackers through accelerate: off by default, offline-safe, a clear error for a missing package."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from prefkit.loops import trackers as trackers_module
from prefkit.api.errors import PrefkitError
from prefkit.loops.trackers import Trackers, check_trackers, flat_config, scalars, start_trackers

RECORD = {"step": 3, "epoch": 0.5, "loss": 0.69, "rewards/margins": 0.1, "lr": 1e-3}
CONFIG = {"output_dir": "runs/x", "train": {"lr": 0.001, "adam_betas": [0.9, 0.999], "save_every": None},
          "objective": {"name": "dpo", "params": {"beta": 0.1, "reference_free": False}}}


def test_off_by_default(tmp_path):
    trackers = start_trackers([], run_dir=tmp_path / "run")
    assert not trackers and trackers.names == []
    trackers.log(RECORD, 1)
    trackers.finish()
    assert not (tmp_path / "run").exists()
    assert not start_trackers(["tensorboard"], run_dir=tmp_path / "run", main_process=False)


def test_flat_config_and_scalars():
    assert flat_config(CONFIG) == {"output_dir": "runs/x", "train.lr": 0.001, "train.adam_betas": "[0.9, 0.999]",
                                   "train.save_every": "null", "objective.name": "dpo",
                                   "objective.params.beta": 0.1, "objective.params.reference_free": False}
    assert scalars({**RECORD, "flag": True, "note": "x"}) == {"epoch": 0.5, "loss": 0.69, "rewards/margins": 0.1,
                                                               "lr": 1e-3}


def test_missing_package_and_unknown_name_are_clear_errors(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in {"wandb", "mlflow", "tensorboard", "tensorboardX"}
                        else real(name, *a))
    for name in ("wandb", "mlflow", "tensorboard", "tensorboardX"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(PrefkitError) as info:
        check_trackers(["wandb", "mlflow", "tensorboard", "comet"])
    message = str(info.value)
    assert message.startswith("train.trackers: ")
    assert "tracker 'wandb' needs the package wandb, which is not installed; run: pip install wandb" in message
    assert "run: pip install mlflow" in message and "run: pip install tensorboard" in message
    assert "unknown tracker 'comet'; choose from tensorboard, wandb, mlflow" in message


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trackers = start_trackers(["tensorboard"], run_dir=run, config=CONFIG)
    assert trackers.names == ["tensorboard"]
    for step in (1, 2, 3):
        trackers.log({**RECORD, "step": step, "loss": 1.0 / step}, step)
    trackers.finish()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert loss[-1].value == pytest.approx(1 / 3)
    assert "rewards/margins" in events.Tags()["scalars"] and "step" not in events.Tags()["scalars"]


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_is_offline_unless_asked(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step=None):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    config = types.SimpleNamespace(update=lambda values, allow_val_change: calls.append(("config", values)))
    fake_module(monkeypatch, "wandb", init=init, config=config)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers = start_trackers(["wandb"], run_dir=tmp_path / "run-1", project="sweep", config=CONFIG)
    trackers.log(RECORD, 3)
    trackers.finish()
    assert calls[0] == ("init", {"project": "sweep", "name": "run-1", "dir": str(tmp_path / "run-1"),
                                 "mode": "offline"})
    assert calls[1] == ("config", flat_config(CONFIG))
    assert calls[2] == ("log", scalars(RECORD), 3) and calls[3] == ("finish",)

    calls.clear()
    monkeypatch.setenv("WANDB_MODE", "online")
    start_trackers(["wandb"], run_dir=tmp_path / "run-2").finish()
    assert "mode" not in calls[0][1]


def test_mlflow_logs_to_a_local_store_unless_asked(tmp_path, monkeypatch):
    calls = []
    fake_module(
        monkeypatch, "mlflow",
        set_tracking_uri=lambda uri: calls.append(("uri", uri)),
        search_experiments=lambda filter_string: [],
        create_experiment=lambda name, artifact_location, tags: calls.append(("experiment", name)) or "7",
        start_run=lambda **kwargs: calls.append(("run", kwargs["experiment_id"], kwargs["run_name"])),
        log_metrics=lambda metrics, step=None, **kw: calls.append(("log", metrics, step)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    trackers = start_trackers(["mlflow"], run_dir=tmp_path / "run", project="sweep")
    trackers.log(RECORD, 3)
    trackers.finish()
    assert calls[0] == ("uri", (tmp_path / "run" / "mlruns").as_uri())
    assert calls[1:3] == [("experiment", "sweep"), ("run", "7", "run")]
    assert calls[3] == ("log", scalars(RECORD), 3) and calls[-1] == ("end",)

    calls.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    start_trackers(["mlflow"], run_dir=tmp_path / "run2").finish()
    assert not [c for c in calls if c[0] == "uri"]


def test_a_tracker_that_fails_to_start_is_a_clear_error(tmp_path, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("no API key")

    fake_module(monkeypatch, "wandb", init=init)
    with pytest.raises(PrefkitError, match="train.trackers: starting 'wandb' failed: RuntimeError: no API key"):
        start_trackers(["wandb"], run_dir=tmp_path / "run")


def test_empty_trackers_object():
    assert Trackers().names == [] and not Trackers()


# ----------------------------------------------------------------------------- through a run

from pathlib import Path

from prefkit.recipe import TrainConfig

TINY = str(Path(__file__).resolve().parent.parent / "recipes" / "dpo_tiny.yaml")
needs_field = pytest.mark.skipif("trackers" not in TrainConfig.model_fields,
                                 reason="the recipe has no train.trackers yet")


@needs_field
def test_trackers_are_off_by_default_in_a_recipe():
    assert TrainConfig().trackers == [] and TrainConfig().project == "prefkit"


@needs_field
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_a_run_logs_the_same_numbers_to_tensorboard_and_metrics_jsonl(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from prefkit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", TINY, f"output_dir={out}", "train.max_steps=3", "data.eval=null",
                                      "train.save_every=null", "train.trackers=[tensorboard]"])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged)


@needs_field
def test_a_missing_tracker_package_fails_before_anything_is_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prefkit.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", TINY, f"output_dir={out}", "train.trackers=[mlflow]"])
    assert result.exit_code == 2
    assert "tracker 'mlflow' needs the package mlflow, which is not installed; run: pip install mlflow" in result.output
    assert not out.exists() and "Traceback" not in result.output
