"""The Python API: prefkit.train / evaluate / export / load, with in-memory datasets."""

import json
from pathlib import Path

import pytest

import prefkit
from prefkit.api.errors import DataError, PrefkitError
from prefkit.plugins import load_registry

REGISTRY = load_registry()
ROOT = Path(__file__).resolve().parent.parent
DPO = ROOT / "recipes" / "dpo_tiny.yaml"
ROWS = [{"prompt": f"Question {i}?", "chosen": f"A good answer to {i}.", "rejected": f"No {i}."} for i in range(16)]


def test_public_names():
    assert set(prefkit.__all__) >= {"train", "evaluate", "export", "load"}
    assert callable(prefkit.train) and callable(prefkit.evaluate)
    with pytest.raises(AttributeError):
        prefkit.nothing_here


def test_train_on_an_in_memory_dataset_equals_training_on_the_same_file(tmp_path):
    from datasets import Dataset

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["data.eval=null", "train.max_steps=4", f"cache_dir={tmp_path / 'cache'}"]
    from_file = prefkit.train(DPO, [f"output_dir={tmp_path / 'file'}", f"data.train={data}", *common],
                              registry=REGISTRY)
    in_memory = prefkit.train(DPO, [f"output_dir={tmp_path / 'memory'}", *common],
                              train_dataset=Dataset.from_list(ROWS), registry=REGISTRY)
    assert in_memory["data"]["train_fingerprint"] == from_file["data"]["train_fingerprint"]
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(tmp_path / "memory") == losses(tmp_path / "file")
    # the same rows again: the same file, so the reference cache answers
    again = prefkit.train(DPO, [f"output_dir={tmp_path / 'again'}", *common], train_dataset=ROWS, registry=REGISTRY)
    assert again["reference_cache"] == "hit"


def test_a_recipe_as_a_dict_and_bad_in_memory_data(tmp_path):
    import yaml

    recipe = yaml.safe_load(DPO.read_text())
    loaded = prefkit.load(recipe, ["train.max_steps=2"], registry=REGISTRY)
    assert loaded.recipe.train.max_steps == 2 and loaded.objective.name == "dpo"
    with pytest.raises(DataError, match="list of dicts"):
        prefkit.train(recipe, [f"output_dir={tmp_path / 'x'}"], train_dataset="not rows", registry=REGISTRY)
    with pytest.raises(DataError, match="JSON cannot store"):
        prefkit.train(recipe, [f"output_dir={tmp_path / 'y'}"], train_dataset=[{"prompt": object()}],
                      registry=REGISTRY)


def test_evaluate_a_run_and_a_model(tmp_path):
    out = tmp_path / "run"
    prefkit.train(DPO, [f"output_dir={out}", "train.max_steps=12", "train.save_every=6"], registry=REGISTRY)
    trained = prefkit.evaluate(out, registry=REGISTRY)
    untrained = prefkit.evaluate(DPO, registry=REGISTRY)  # the reference judged against itself
    assert untrained["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert untrained["eval/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert trained["eval/rewards/margins"] > 0.1 and trained["eval/loss"] < untrained["eval/loss"]
    # the run's own last eval record, computed during training, is the same number
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert trained["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-5)
    # an exported checkpoint judged through model=
    halfway = prefkit.export(out, step=6, registry=REGISTRY)
    middle = prefkit.evaluate(out, model=str(halfway), registry=REGISTRY)
    assert untrained["eval/loss"] > middle["eval/loss"] > trained["eval/loss"] - 1e-6
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.resolved.yaml").write_text((out / "recipe.resolved.yaml").read_text())
    with pytest.raises(PrefkitError, match="no final/"):
        prefkit.evaluate(unfinished, registry=REGISTRY)


def test_eval_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from prefkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(DPO), f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert "eval/rewards/accuracies" in result.output and "0.693" in result.output
    result = CliRunner().invoke(app, ["eval", str(ROOT / "recipes" / "grpo_tiny.yaml")])
    assert result.exit_code == 2 and "prefkit compare" in result.output and "Traceback" not in result.output
