"""The quickstart recipe on the real SmolLM2-135M-Instruct (minutes on a CPU): `pytest -m slow`."""

import json
from pathlib import Path

import pytest

from prefkit.loops import train
from prefkit.recipe import load_recipe

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture()
def prefkit_cache(tmp_path_factory, monkeypatch):
    """One cache for the slow tests, so SmolLM2 is converted once."""
    root = tmp_path_factory.getbasetemp() / "slow-cache"
    monkeypatch.setenv("PREFKIT_CACHE", str(root))
    return root


def test_quickstart_short_run_learns_and_second_run_hits_the_cache(tmp_path):
    short = ["train.max_steps=12", "data.max_rows=48", "data.max_eval_rows=8", "train.eval_every=12",
             "train.save_every=6", "train.lr=2e-5"]
    first = train(load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'a'}", *short]), registry=REGISTRY)
    assert first["reference_cache"] == "miss"
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    second = train(load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'b'}", *short]), registry=REGISTRY)
    assert second["reference_cache"] == "hit"
    assert (tmp_path / "b" / "final" / "model.safetensors").exists()
