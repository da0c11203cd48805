"""Best-of-N: the objective plugin, prefkit.models.sampling.best_of_n, and sample_recipe end to end."""

from __future__ import annotations

import math

import json
import string
from pathlib import Path

import pytest

from prefkit.api.errors import RecipeError
from prefkit.models.loading import load_model
from prefkit.api.objective import LossInputs, Needs
from prefkit.plugins import load_registry
from prefkit.recipe import ModelConfig, RewardConfig, SamplingConfig, load_recipe
from prefkit.models.rewards import build_reward
from prefkit.models.sampling import best_of_n, generate, sample_recipe, score_samples

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly



RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROMPTS = ["Hi", "What is the capital of France?", "Tell me about bees.", "Count to three."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    loaded = load_model(ModelConfig(source="tiny-llama"), None, tmp_path_factory.mktemp("cache"),
                        registry=load_registry())
    ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    return loaded.model, loaded.tokenizer, ids


@pytest.fixture(scope="module")
def letters():
    """The share of lowercase letters among a completion's characters (the tiny model emits random bytes)."""
    config = RewardConfig(name="keywords", params={"targets": list(string.ascii_lowercase), "unit": "char"})
    return build_reward(config, None, cache_dir="unused", device="cpu", registry=REGISTRY)


SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=32)


# --------------------------------------------------------------------------- the objective


def test_best_of_n_is_a_registered_inference_objective():
    registry = load_registry()
    objective = registry.objectives["best_of_n"]
    assert registry.owners[("objectives", "best_of_n")] == "best_of_n"
    assert objective.kind == "inference" and objective.description
    params = objective.Params()
    assert params.n == 16
    assert objective.needs(params) == Needs(data="prompts", reward=True, generation=True)
    for bad in ({"n": 0}, {"n": 129}, {"n": 4, "beta": 0.1}):
        with pytest.raises(ValueError):
            objective.Params.model_validate(bad)
    assert objective.kl(params) == pytest.approx(math.log(16) - 15 / 16) and objective.samples_per_output(params) == 16
    with pytest.raises(TypeError, match="defines no loss"):
        objective.loss(params, LossInputs())


def test_a_best_of_n_recipe_needs_a_reward():
    with pytest.raises(RecipeError, match="objective 'best_of_n' needs a reward source"):
        load_recipe(RECIPES / "best_of_n_tiny.yaml", ["reward=null"], registry=REGISTRY)
    with pytest.raises(RecipeError, match="objective.params.n"):
        load_recipe(RECIPES / "best_of_n_tiny.yaml", ["objective.params.n=500"], registry=REGISTRY)


# --------------------------------------------------------------------------- selection


def test_best_of_n_picks_the_highest_scored_candidate(tiny, letters):
    model, tokenizer, ids = tiny
    candidates = generate(model, tokenizer, ids, SAMPLING, seed=11, num_samples=6)
    score_samples([s for per in candidates for s in per], PROMPTS, letters)
    best = best_of_n(model, tokenizer, ids, PROMPTS, letters, 6, SAMPLING, seed=11)
    assert len(best) == len(PROMPTS)
    for p, (winner, per) in enumerate(zip(best, candidates)):
        top = max(s.score for s in per)
        first_top = min(s.sample_index for s in per if s.score == top)
        assert winner.prompt_index == p and winner.score == top and winner.sample_index == first_top
        assert winner.token_ids == per[first_top].token_ids


def test_ties_go_to_the_lowest_sample_index(tiny):
    model, tokenizer, ids = tiny
    constant = lambda prompts, completions: [0.5] * len(completions)  # noqa: E731
    best = best_of_n(model, tokenizer, ids, PROMPTS, constant, 5, SAMPLING, seed=0)
    assert [s.sample_index for s in best] == [0] * len(PROMPTS)
    assert all(s.score == 0.5 for s in best)


def test_the_best_score_only_grows_with_n(tiny, letters):
    # Candidate s of prompt p is seeded from (seed, p, s) alone, so with one seed best-of-16 sees
    # best-of-4's candidates (and 12 more), which saw best-of-1's: monotone by construction.
    model, tokenizer, ids = tiny
    results = {n: best_of_n(model, tokenizer, ids, PROMPTS, letters, n, SAMPLING, seed=0) for n in (1, 4, 16)}
    for small, large in ((1, 4), (4, 16)):
        for a, b in zip(results[small], results[large]):
            assert b.score >= a.score
    means = [sum(s.score for s in results[n]) / len(PROMPTS) for n in (1, 4, 16)]
    assert means[0] <= means[1] <= means[2] and means[2] > means[0]


def test_n_128_runs_in_batches(tiny, letters):
    model, tokenizer, ids = tiny
    calls = []
    cfg = SamplingConfig(max_new_tokens=4, batch_size=64)
    best = best_of_n(model, tokenizer, ids[:2], PROMPTS[:2], letters, 128, cfg, seed=0,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(64, 256), (128, 256), (192, 256), (256, 256)]
    assert [s.prompt_index for s in best] == [0, 1]
    assert all(0 <= s.sample_index < 128 and len(s.token_ids) <= 4 for s in best)


# --------------------------------------------------------------------------- sample_recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_recipe_best_of_n_end_to_end(tmp_path):
    loaded = load_recipe(RECIPES / "best_of_n_tiny.yaml", [f"output_dir={tmp_path / 'run'}"], registry=REGISTRY)
    summary = sample_recipe(loaded, registry=REGISTRY)
    output = tmp_path / "run" / "samples.jsonl"
    rows = read_jsonl(output)
    assert len(rows) == 16 == summary["prompts"] == summary["samples"]  # tiny-prefs test split: 16 prompts
    assert [r["prompt_index"] for r in rows] == list(range(16))
    first = rows[0]
    assert set(first) == {"prompt_index", "sample_index", "prompt", "completion", "finished", "score",
                          "num_tokens", "candidate_index"}
    shipped = Path(__file__).resolve().parent.parent / "plugins" / "prefkit_builtins" / "data" / "tiny_test.jsonl"
    assert first["prompt"] == json.loads(shipped.read_text().splitlines()[0])["prompt"]
    assert all(0 <= r["candidate_index"] < 4 and 1 <= r["num_tokens"] <= 16 for r in rows)
    assert summary["mean_score"] == pytest.approx(sum(r["score"] for r in rows) / 16)
    assert summary["objective"] == "best_of_n" and summary["reward"] == "keywords"
    assert summary["output"] == str(output)
    on_disk = json.loads((tmp_path / "run" / "samples.summary.json").read_text())
    assert on_disk == summary
    # the same recipe samples the same completions
    again = sample_recipe(loaded, tmp_path / "again.jsonl", registry=REGISTRY)
    assert [r["completion"] for r in read_jsonl(tmp_path / "again.jsonl")] == [r["completion"] for r in rows]
    assert again["output"] == str(tmp_path / "again.jsonl")


def test_sample_recipe_plain_sampling_scores_every_sample(tmp_path):
    overrides = ["objective.name=dpo", "objective.params={}", "sampling.num_samples=2", "sampling.max_new_tokens=4",
                 "data.eval=null", "data.max_rows=3"]
    loaded = load_recipe(RECIPES / "best_of_n_tiny.yaml", overrides, registry=REGISTRY)
    summary = sample_recipe(loaded, tmp_path / "out.jsonl", registry=REGISTRY)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    assert all("score" in r and "candidate_index" not in r for r in rows)
    assert summary["samples"] == 6 and summary["data"] == "tiny-prefs (train)"
    unscored = sample_recipe(load_recipe(RECIPES / "best_of_n_tiny.yaml", [*overrides, "reward=null"], registry=REGISTRY),
                             tmp_path / "plain.jsonl", registry=REGISTRY)
    assert unscored["mean_score"] is None and all("score" not in r for r in read_jsonl(tmp_path / "plain.jsonl"))
