"""Compare recipes: every shipped one validates; bad ones name the arm's path; docs/compare.md matches."""

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.compare.recipe import (
    Arm,
    Budget,
    CompareRecipe,
    EvaluationConfig,
    is_compare_document,
    load_compare,
)
from prefkit.api.errors import RecipeError
from prefkit.recipe import load_recipe, read_yaml

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
COMPARES = [p for p in RECIPES if is_compare_document(read_yaml(p))]
SENTIMENT_RUNS = [p for p in sorted((ROOT / "recipes" / "sentiment").glob("*.yaml")) if p not in COMPARES]
DOCS = ROOT / "docs" / "compare.md"
runner = CliRunner()


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


def test_the_compare_recipes_are_found():
    assert {rel(p) for p in COMPARES} >= {"compare_tiny.yaml", "sentiment/compare.yaml", "sentiment/compare_tiny.yaml"}
    assert {p.name for p in SENTIMENT_RUNS} >= {"sample.yaml", "bt_reward.yaml", "sample_tiny.yaml", "bt_reward_tiny.yaml"}


@pytest.mark.parametrize("path", COMPARES, ids=rel)
def test_compare_recipe_validates(path):
    loaded = load_compare(path, registry=REGISTRY)
    assert loaded.arms and loaded.compare.output_dir
    first = loaded.compare.run_seeds[0]
    for arm in loaded.arms:
        assert Path(arm.loaded.recipe.output_dir) == Path(loaded.compare.output_dir) / "arms" / arm.name / f"seed-{first}"
        assert arm.loaded.recipe.seed == first


@pytest.mark.parametrize("path", SENTIMENT_RUNS, ids=rel)
def test_sentiment_run_recipe_validates(path):
    assert load_recipe(path, registry=REGISTRY).recipe.output_dir


def test_the_sentiment_compare_has_every_arm_of_the_flagship():
    loaded = load_compare(ROOT / "recipes" / "sentiment" / "compare.yaml", registry=REGISTRY)
    objectives = {a.loaded.objective.name for a in loaded.arms}
    assert objectives == {"dpo", "kto", "ppo_kl", "grpo", "rloo", "unlikelihood", "preferred_ft", "best_of_n"}
    assert sorted(a.loaded.params.beta for a in loaded.arms if a.loaded.objective.name == "dpo") == [0.05, 0.1, 0.1, 0.5]
    assert loaded.compare.budget.epochs == 1  # DPO for a whole epoch of the pairs (issue 12) ...
    epochs = {a.name: a.loaded.recipe.train.epochs for a in loaded.arms if a.loaded.objective.name == "dpo"}
    assert epochs == {"dpo-b0.1": 1, "dpo-b0.5": 1, "dpo-b0.05": 1, "dpo-b0.1-e3": 3}  # ... and one arm for three
    assert sorted(a.loaded.params.n for a in loaded.arms if a.loaded.objective.name == "best_of_n") == [1, 4, 16, 64]
    ppo_rewards = {a.loaded.recipe.reward.name for a in loaded.arms if a.loaded.objective.name == "ppo_kl"}
    assert ppo_rewards == {"reward_model", "sentiment"}
    assert loaded.compare.evaluation.gold.name == "sentiment"
    grpo = next(a for a in loaded.arms if a.loaded.objective.name == "grpo")
    assert grpo.loaded.recipe.sampling.num_samples == 4  # the arm's own group size
    rloo = next(a for a in loaded.arms if a.loaded.objective.name == "rloo")
    assert rloo.loaded.recipe.sampling.num_samples == 4 and rloo.loaded.params.rollout_batch_size == 4  # GRPO's rollouts
    assert all(a.loaded.recipe.model.source == "runs/sentiment/sft/final" for a in loaded.arms)  # from the SFT model


def test_the_sentiment_prompts_dataset():
    from prefkit.data.prepare import prepare_dataset
    from prefkit.plugins import load_registry
    from prefkit.recipe import DataConfig
    from prefkit.models.tiny import build_tiny_tokenizer

    dataset = load_registry().datasets["sentiment-prompts"]
    prompts = {}
    for split, size in (("train", 100), ("test", 20)):
        data = prepare_dataset(DataConfig(train="sentiment-prompts", train_split=split), build_tiny_tokenizer(),
                               REGISTRY.data_kinds["prompts"], registry=REGISTRY)
        assert data.report.rows_kept == size and data.report.rows_skipped_bad == 0
        prompts[split] = {ex.prompt for ex in data.examples}
    assert len(prompts["train"]) == 100 and len(prompts["test"]) == 20
    assert not prompts["train"] & prompts["test"]  # held out
    assert set(dataset.files) == {"train", "test"}


def bad(tmp_path, change) -> str:
    data = yaml.safe_load((ROOT / "recipes" / "compare_tiny.yaml").read_text())
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_compare(path, registry=REGISTRY)
    assert str(path) in str(info.value)
    return str(info.value)


def test_errors_name_the_arm_path(tmp_path):
    def change(data):
        data["arms"][1]["params"]["beta"] = -1
        data["arms"][2]["train"]["bogus"] = 1
        data["arms"][8]["params"]["n"] = 0
        data["arms"][0]["params"]["betta"] = 0.1

    message = bad(tmp_path, change)
    assert "arms.1.params.beta" in message and "arms.2.train.bogus: unknown key" in message
    assert "arms.8.params.n" in message and "arms.0.params.betta: unknown key" in message


def test_errors_in_shared_blocks_and_evaluation(tmp_path):
    def change(data):
        data["model"]["options"]["bogus"] = 1
        data["evaluation"]["gold"]["params"]["unit"] = "letter"
        data["arms"][3]["objective"] = "nope"

    message = bad(tmp_path, change)
    assert message.count("model.options.bogus") == 1  # once, not once per arm
    assert "evaluation.gold.params.unit" in message and "arms.3.objective: unknown objective 'nope'" in message


def test_names_rewards_and_objectives_are_checked(tmp_path):
    message = bad(tmp_path, lambda d: d["arms"][1].update(name="dpo-b0.1"))
    assert "arms.1.name: 'dpo-b0.1' is already the name of arms.0" in message
    message = bad(tmp_path, lambda d: d["arms"][1].update(name="reference"))
    assert "arms.1.name" in message
    message = bad(tmp_path, lambda d: d.pop("reward"))
    assert "arms.2.reward: objective 'ppo_kl' needs a reward source" in message and "arms.8.reward" in message
    message = bad(tmp_path, lambda d: d["arms"].append({"name": "rm", "objective": "bt_reward"}))
    assert "arms.10.objective" in message and "reward model" in message
    message = bad(tmp_path, lambda d: d["evaluation"].pop("gold"))
    assert "evaluation.gold: required key is missing" in message
    message = bad(tmp_path, lambda d: d["evaluation"].update(temperatures=[1.0, -1.0]))
    assert "evaluation.temperatures" in message


def test_a_shared_reward_goes_only_to_arms_that_need_one():
    loaded = load_compare(ROOT / "recipes" / "compare_tiny.yaml", registry=REGISTRY)
    rewards = {a.name: a.loaded.recipe.reward for a in loaded.arms}
    assert rewards["dpo-b0.1"] is None and rewards["bon-4"].name == "keywords"


def test_the_validate_option_of_the_command(tmp_path):
    result = runner.invoke(app, ["compare", "--validate", str(ROOT / "recipes" / "compare_tiny.yaml")])
    assert result.exit_code == 0 and "valid compare recipe" in result.output and "bon-4" in result.output
    result = runner.invoke(app, ["compare", "--validate", str(ROOT / "recipes" / "compare_tiny.yaml"),
                                 "arms.dpo-b0.5.params.beta=0"])
    assert result.exit_code == 2 and "arms.1.params.beta" in result.output and "Traceback" not in result.output


def test_seeds_pairs_and_budgets_are_checked(tmp_path):
    message = bad(tmp_path, lambda d: d["evaluation"].update(paired=[["dpo-b0.1", "nope"], ["kto", "kto"]]))
    assert "evaluation.paired.0.1: 'nope' is not an arm" in message and "evaluation.paired.1: pairs 'kto' with itself" in message

    def no_reference(data):
        data["evaluation"].update(include_reference=False, paired=[["bon-1", "reference"]])

    assert "evaluation.paired.0.1: 'reference' is not evaluated" in bad(tmp_path, no_reference)

    def disjoint(data):  # was dropped silently: paired.jsonl empty, nothing said
        data["arms"][0]["seeds"], data["arms"][1]["seeds"] = data["seeds"][:1], data["seeds"][1:2]
        data["evaluation"].update(paired=[[data["arms"][0]["name"], data["arms"][1]["name"]]])

    assert "evaluation.paired.0: 'dpo-b0.1' (seeds [0]) and 'dpo-b0.5' (seeds [1]) share no seed" in bad(tmp_path, disjoint)
    assert "seeds: seed is set too" in bad(tmp_path, lambda d: d.update(seed=3))
    message = bad(tmp_path, lambda d: d.update(seeds=[0, 0]))
    assert "seeds:" in message and "seeds must not repeat" in message
    message = bad(tmp_path, lambda d: d["arms"][0].update(seeds=[d["seeds"][0]] * 2))
    assert "arms.0.seeds" in message and "seeds must not repeat" in message
    assert "budget: train.epochs is set too" in bad(tmp_path, lambda d: d["train"].update(epochs=2))
    assert "budget.labels" in bad(tmp_path, lambda d: d.update(budget={"labels": 0}))
    assert "budget.bogus: unknown key" in bad(tmp_path, lambda d: d.update(budget={"bogus": 1}))
    assert "evaluation.every_steps" in bad(tmp_path, lambda d: d["evaluation"].update(every_steps=0))
    assert "evaluation.paired_at" in bad(tmp_path, lambda d: d["evaluation"].update(paired_at="middle"))
    assert "evaluation.confidence" in bad(tmp_path, lambda d: d["evaluation"].update(confidence=1.0))


def test_one_seed_by_default(tmp_path):
    data = yaml.safe_load((ROOT / "recipes" / "compare_tiny.yaml").read_text())
    del data["seeds"]
    data["seed"] = 7
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_compare(path, registry=REGISTRY)
    assert loaded.compare.run_seeds == [7] and loaded.arms[0].loaded.recipe.seed == 7


# ----------------------------------------------------------------------------- docs/compare.md


SECTIONS = {"Top level": CompareRecipe, "`budget`": Budget, "`arms`": Arm, "`evaluation`": EvaluationConfig}


def section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_every_compare_key_is_documented_with_its_default():
    text = DOCS.read_text()
    for heading, model in SECTIONS.items():
        part = section(text, heading)
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", part, re.M))
        assert set(rows) == set(model.model_fields), heading
        for name, field in model.model_fields.items():
            documented = rows[name].strip()
            if field.is_required():
                assert documented == "required", name
            elif field.default_factory is not None:
                default = field.default_factory()
                if isinstance(default, list):
                    assert documented == "`[" + ", ".join(str(v) for v in default) + "]`", name
                elif isinstance(default, dict):
                    assert documented == "`{}`", name
                else:
                    assert documented == "all defaults", name
            else:
                value = documented.strip("`")
                default = field.default
                if isinstance(default, bool) or default is None:
                    assert value == {None: "null", True: "true", False: "false"}[default], name
                elif isinstance(default, (int, float)):
                    assert float(value) == default, name
                else:
                    assert value == str(default), name


def _table_after(text: str, marker: str) -> set[str]:
    """The backticked names in the first cell of each row of the table that follows ``marker``."""
    lines = text.split(marker, 1)[1].strip().splitlines()
    names: set[str] = set()
    for line in lines[2:]:  # header and rule
        if not line.startswith("| "):
            break
        names |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return names


def test_every_output_column_is_documented():
    from prefkit.compare.harness import OUTPUTS

    text = DOCS.read_text()
    for name, columns in OUTPUTS.items():
        assert _table_after(text, f"The columns of `{name}.jsonl`") == set(columns), name
    outputs = section(text, "Outputs")
    for name in OUTPUTS:
        assert f"`{name}.jsonl`, `{name}.csv`" in outputs


def test_arms_selects_a_subset_and_drops_paired_tests_naming_others():
    from prefkit.compare.recipe import load_compare

    path = ROOT / "recipes" / "sentiment" / "compare_tiny.yaml"
    loaded = load_compare(path, registry=REGISTRY, arms=["bon-4", "dpo-b0.1", "bon-1"])
    assert [a.name for a in loaded.arms] == ["dpo-b0.1", "bon-1", "bon-4"]  # the recipe's order
    # of [dpo-b0.1, ppo-rm-kl2], [dpo-b0.1, ppo-gold-kl2], [bon-4, bon-1] only the last names chosen arms
    assert [list(p) for p in loaded.compare.evaluation.paired] == [["bon-4", "bon-1"]]


def test_arms_with_an_unknown_name_is_one_message(tmp_path):
    result = runner.invoke(app, ["compare", str(ROOT / "recipes" / "compare_tiny.yaml"), "--arms", "dpo-b0.1,bon-5",
                                 "--validate"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no arm named 'bon-5'" in result.output and "did you mean 'bon-" in result.output


def _imdb_sft_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("imdb_sft", ROOT / "recipes" / "sentiment" / "imdb_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pair_prompts_are_openings_of_reviews_the_sft_data_does_not_use():
    imdb = _imdb_sft_module()
    reviews = [(f"review {i} " + " ".join(f"w{i}x{j}" for j in range(20)), i % 2) for i in range(40)]
    sft = imdb.sft_rows(reviews, 10, seed=3, max_words=60)
    openings = imdb.opening_rows(reviews, 12, seed=3, sft_reviews=10)
    assert len(sft) == 10 and len(openings) == 12 and all(set(r) == {"prompt"} for r in openings)
    used = {r["prompt"].split()[1] for r in sft}  # the review number of each SFT row
    picked = {r["prompt"].split()[1] for r in openings}
    assert not used & picked  # disjoint reviews
    assert all(2 <= len(r["prompt"].split()) <= 8 for r in openings)
    assert sum(int(n) % 2 for n in picked) == 6  # half positive
    assert openings == imdb.opening_rows(reviews, 12, seed=3, sft_reviews=10)  # reproducible
    with pytest.raises(SystemExit, match="need 21 reviews"):
        imdb.opening_rows(reviews, 22, seed=3, sft_reviews=20)
