"""GRPO, RLOO and KTO through the real loops: they resume exactly, and the group-baseline methods
own no value head (nothing of PPO's runs for them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prefkit.loops as loops
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe

REGISTRY = load_registry()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run(recipe: str, out: Path, *overrides: str, resume: bool = False) -> dict:
    loaded = load_recipe(RECIPES / recipe, [f"output_dir={out}", *overrides], registry=REGISTRY)
    return loops.train(loaded, resume=resume, registry=REGISTRY)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["grpo_tiny.yaml", "rloo_tiny.yaml", "kto_tiny.yaml"])
def test_resume_continues_exactly(recipe, tmp_path):
    common = ["train.save_every=2", "train.log_every=1"]
    run(recipe, tmp_path / "whole", *common, "train.max_steps=4")
    run(recipe, tmp_path / "parts", *common, "train.max_steps=2")
    run(recipe, tmp_path / "parts", *common, "train.max_steps=4", resume=True)
    keep = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731 - a timing
    assert [keep(r) for r in records(tmp_path / "parts")] == [keep(r) for r in records(tmp_path / "whole")]


@pytest.mark.parametrize("recipe", ["grpo_tiny.yaml", "rloo_tiny.yaml"])
def test_group_baselines_train_no_value_head(recipe, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    run(recipe, out, "train.max_steps=2", "train.save_every=2")
    logged = records(out)
    assert not any(key.startswith(("loss/value", "value/")) for r in logged for key in r)
    assert not list((out / "final").glob("value_head*"))
    trainable = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert all(name.startswith("policy.") for name in trainable)
