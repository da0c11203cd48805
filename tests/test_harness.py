"""`prefkit compare` end to end on the tiny recipes (prefkit/compare/harness.py, plots.py, report.py)."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import prefkit.models.sampling
import prefkit.loops as engine
from prefkit.cli import app
from prefkit.compare.recipe import load_compare
from prefkit.api.errors import PrefkitError, RecipeError
from prefkit.compare.budget import unequal_budgets
from prefkit.compare.harness import OUTPUTS, run_compare

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "compare_tiny.yaml"
SENTIMENT = ROOT / "recipes" / "sentiment"
runner = CliRunner()




def compare(out: Path, cache: Path, *overrides: str):
    loaded = load_compare(TINY, [f"output_dir={out}", f"cache_dir={cache}", *overrides], registry=REGISTRY)
    return loaded, run_compare(loaded, registry=REGISTRY)


def numbers(rows):
    """Every column but the wall-clock one."""
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    loaded, result = compare(root / "c1", root / "cache")
    torch.set_num_threads(before)
    return loaded, result, root / "c1", root / "cache"


def by(rows, arm, temperature, seed=0, step=None):
    [row] = [r for r in rows if r["arm"] == arm and r["temperature"] == temperature and r.get("seed", seed) == seed
             and (step is None and r["final"] or r["step"] == step)]
    return row


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_output_is_written(tiny_run):
    loaded, result, out, _ = tiny_run
    temperatures = loaded.compare.evaluation.temperatures
    assert loaded.compare.run_seeds == [0, 1]
    for name, columns in OUTPUTS.items():
        rows = read_jsonl(out / f"{name}.jsonl")
        assert rows == getattr(result, "rows" if name == "results" else name) and rows
        assert all(list(r) == columns for r in rows), name
        with (out / f"{name}.csv").open() as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == len(rows) and list(table[0]) == columns
    table = list(csv.DictReader((out / "results.csv").open()))
    assert float(table[5]["kl"]) == result.rows[5]["kl"] and json.loads(table[5]["params"]) == result.rows[5]["params"]
    for arm in loaded.arms:
        for seed in (0, 1):
            assert (out / "arms" / arm.name / f"seed-{seed}" / "eval.jsonl").is_file()
    for seed in (0, 1):
        for t in temperatures:
            assert (out / "reference" / f"seed-{seed}" / f"samples_T{t:g}.jsonl").is_file()
    for name in ("frontier.png", "winrate.png", "report.md", "compare.resolved.yaml"):
        assert (out / name).is_file()


def test_every_record_field_is_documented(tiny_run):
    _, _, out, _ = tiny_run
    text = (ROOT / "docs" / "compare.md").read_text().split("The fields of a per-sample record in `eval.jsonl`:")[1]
    documented = set()
    for line in text.strip().splitlines()[2:]:
        if not line.startswith("| "):
            break
        documented |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    fields = {key for path in (out / "arms").glob("*/seed-0/eval.jsonl") for r in read_jsonl(path) for key in r}
    assert fields == documented


def test_one_row_per_arm_seed_step_and_temperature(tiny_run):
    loaded, result, _, _ = tiny_run
    expected = {("reference", seed, 0, t) for seed in (0, 1) for t in (0.7, 1.0)}
    for arm in loaded.arms:
        steps = [0] if arm.kind == "inference" else [4, 8]  # evaluation.every_steps: 4 of 8
        expected |= {(arm.name, seed, step, t) for seed in (0, 1) for step in steps for t in (0.7, 1.0)}
    keys = [(r["arm"], r["seed"], r["step"], r["temperature"]) for r in result.rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    for row in result.rows:
        assert row["n_prompts"] == 16 and row["n_samples"] == 16 and 0 <= row["win_rate"] <= 1
        assert math.isfinite(row["kl"]) and row["length"] > 0
        assert row["final"] == (row["step"] in (0, 8))
    over_seeds = {(r["arm"], r["step"], r["temperature"]) for r in result.aggregate}
    assert over_seeds == {key[:1] + key[2:] for key in expected}
    assert all(r["n_seeds"] == 2 and r["seeds"] == [0, 1] for r in result.aggregate)


def test_every_interval_holds_its_estimate(tiny_run):
    _, result, _, _ = tiny_run
    for row in result.rows + result.aggregate:
        for key in ("gold_reward", "kl", "win_rate"):
            assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"], (row["arm"], key)
    for row in result.paired:
        assert row["diff_lo"] <= row["diff"] <= row["diff_hi"] and 0 < row["p_value"] <= 1


def test_the_mean_over_seeds_is_the_mean_of_the_seeds(tiny_run):
    _, result, _, _ = tiny_run
    for row in result.aggregate:
        seeds = [r for r in result.rows if (r["arm"], r["step"], r["temperature"]) ==
                 (row["arm"], row["step"], row["temperature"])]
        assert len(seeds) == 2
        for key in ("gold_reward", "kl", "win_rate", "length"):
            assert row[key] == pytest.approx(sum(r[key] for r in seeds) / 2)
    # two seeds train two different policies
    assert by(result.rows, "dpo-b0.1", 1.0, 0)["kl"] != by(result.rows, "dpo-b0.1", 1.0, 1)["kl"]


def test_trained_arms_trained_and_best_of_n_did_not(tiny_run):
    loaded, result, out, _ = tiny_run
    for arm in loaded.arms:
        for seed in (0, 1):
            row = by(result.rows, arm.name, 1.0, seed)
            run_dir = out / "arms" / arm.name / f"seed-{seed}"
            if arm.kind == "inference":
                assert row["train_steps"] == 0 and not (run_dir / "run.json").exists()
                assert row["kl_method"] == "bon_analytic" and row["reward"] == "keywords"
            else:
                assert row["train_steps"] == 8 and (run_dir / "final" / "config.json").is_file()
                assert json.loads((run_dir / "run.json").read_text())["steps"] == 8
                assert yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())["seed"] == seed
                assert row["kl_method"] == "token_kl" and row["kl"] >= 0 and math.isfinite(row["kl_mc"])
    assert by(result.rows, "ppo-kl2", 1.0)["train_overrides"] == {"batch_size": 8}
    assert by(result.rows, "dpo-b0.5", 1.0)["params"]["beta"] == 0.5


def test_the_curve_is_evaluated_from_the_checkpoints(tiny_run):
    """Each arm's checkpoint holds the weights its final/ holds at the last step (online: the policy
    without the objective's modules), and DPO moves further from the start with more steps."""
    loaded, result, out, cache = tiny_run
    from prefkit.compare.harness import PolicySource, load_policy

    for name, online in (("dpo-b0.1", False), ("ppo-kl2", True)):
        run_dir = out / "arms" / name / "seed-1"
        from_checkpoint = load_policy(PolicySource({}, "checkpoint", run_dir / "checkpoints" / "step-8"),
                                      loaded.compare.model, loaded.model_options, cache, online=online,
                                      registry=REGISTRY).state_dict()
        final = load_policy(PolicySource({}, "final", run_dir / "final"), None, None, cache, online=online,
                            registry=REGISTRY).state_dict()
        assert from_checkpoint.keys() == final.keys()
        assert all(torch.equal(from_checkpoint[k], final[k]) for k in final)
    for seed in (0, 1):
        for t in (0.7, 1.0):
            assert 0 < by(result.rows, "dpo-b0.1", t, seed, 4)["kl"] < by(result.rows, "dpo-b0.1", t, seed, 8)["kl"]


def test_identical_policies_have_kl_zero_win_rate_one_half_and_are_within_noise(tiny_run):
    _, result, _, _ = tiny_run
    for seed in (0, 1):
        for t in (0.7, 1.0):
            reference, bon1 = by(result.rows, "reference", t, seed), by(result.rows, "bon-1", t, seed)
            assert reference["kl"] == 0.0 and reference["win_rate"] == 0.5
            # best-of-1 is the starting policy: the same samples, so the same numbers
            assert bon1["kl"] == 0.0 and bon1["win_rate"] == 0.5
            assert bon1["gold_reward"] == reference["gold_reward"] and bon1["length"] == reference["length"]
            bon4 = by(result.rows, "bon-4", t, seed)
            assert bon4["kl"] == bon4["kl_lo"] == bon4["kl_hi"] == pytest.approx(math.log(4) - 0.75)
            assert bon4["gold_reward"] >= reference["gold_reward"] and bon4["win_rate"] >= 0.5
    same = [r for r in result.paired if (r["a"], r["b"]) == ("bon-1", "reference")]
    assert len(same) == 2 and all(r["verdict"] == "within noise" and r["diff"] == 0 and r["p_value"] == 1
                                  for r in same)
    # matched KL: the largest KL both reach is ppo's, and dpo's nearest step is reported with its own KL
    [pair] = [r for r in result.paired if (r["a"], r["b"], r["temperature"]) == ("dpo-b0.1", "ppo-kl2", 1.0)]
    assert pair["at"] == "matched_kl" and pair["b_step"] in (4, 8) and pair["n_seeds"] == 2


def test_the_reference_pass_is_shared(tiny_run):
    _, _, out, _ = tiny_run
    first = json.loads((out / "arms" / "dpo-b0.1" / "seed-0" / "run.json").read_text())
    second = json.loads((out / "arms" / "dpo-b0.5" / "seed-0" / "run.json").read_text())
    again = json.loads((out / "arms" / "dpo-b0.1" / "seed-1" / "run.json").read_text())
    assert first["reference_cache"] == "miss" and second["reference_cache"] == again["reference_cache"] == "hit"


def _tokens_by_hand(seed: int, cache: Path, names=("chosen", "rejected"), steps: int = 8, batch: int = 4) -> int:
    """Replay the offline loop's batch order over tiny-prefs and count the tokens of its rows."""
    from prefkit.data.batching import BatchOrder
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import load_tokenizer, resolve_model_dir
    from prefkit.recipe import DataConfig, ModelConfig

    cfg = ModelConfig(source="tiny-llama", options={"hidden_size": 64, "num_layers": 2, "seed": 0})
    options = REGISTRY.model_sources["tiny-llama"].Params(**cfg.options)
    tokenizer = load_tokenizer(cfg, resolve_model_dir(cfg, options, cache, REGISTRY))
    data = prepare_dataset(DataConfig(train="tiny-prefs", max_length=128, max_prompt_length=64), tokenizer,
                           REGISTRY.data_kinds["pairs"], registry=REGISTRY)
    order = BatchOrder(len(data.examples), batch, seed)
    return sum(len(data.examples[i].prompt_ids) + len(data.examples[i].completions[name])
               for k in range(steps) for i in order.indices(k) for name in names)


def test_the_budgets_by_hand(tiny_run):
    loaded, result, out, cache = tiny_run
    budget = {(r["arm"], r["seed"]): r for r in result.budget}
    assert len(budget) == len(loaded.arms) * 2
    params = sum(p.numel() for p in load_policy_params(cache, loaded))
    for seed in (0, 1):
        dpo = budget[("dpo-b0.1", seed)]
        # 8 steps x 4 pairs of tiny-prefs' 48: 32 labels, 2/3 of an epoch
        assert (dpo["labels"], dpo["optimizer_steps"], dpo["samples_generated"]) == (32, 8, 0)
        assert dpo["epochs"] == pytest.approx(32 / 48) and dpo["label_unit"] == "pairs"
        tokens = _tokens_by_hand(seed, cache)
        assert dpo["tokens"] == tokens and dpo["tokens_source"] == "run.json" and dpo["params_count"] == params
        assert dpo["flops"] == pytest.approx(6 * params * tokens + 2 * params * tokens * 48 / 32)
        ppo = budget[("ppo-kl2", seed)]
        # 8 rollouts x 2 prompts x 2 samples; 2 update epochs of one minibatch each
        assert (ppo["labels"], ppo["samples_generated"], ppo["optimizer_steps"]) == (32, 32, 16)
        kto = budget[("kto", seed)]
        assert kto["labels"] == 32 and kto["label_unit"] == "unpaired labels" and kto["epochs"] == pytest.approx(1 / 3)
        bon = budget[("bon-4", seed)]
        # 4 candidates for each of 16 prompts x 1 sample x 2 temperatures
        assert bon["labels"] == bon["samples_generated"] == 4 * 16 * 2 and bon["optimizer_steps"] == 0
    assert result.budget and not unequal_budgets([r for r in result.budget if r["seed"] == 0])


def load_policy_params(cache, loaded):
    from prefkit.models.loading import load_model

    return list(load_model(loaded.compare.model, loaded.model_options, cache, registry=REGISTRY).model.parameters())


def _png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_the_plots_are_real_pngs_with_content(tiny_run):
    _, _, out, _ = tiny_run
    for name in ("frontier.png", "winrate.png"):
        image = _png(out / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50  # markers, lines, text: far from a blank canvas
        assert (image[..., :3] < 0.5).mean() > 0.005  # dark ink


def test_the_frontier_split_into_panels_of_arms(tiny_run, tmp_path):
    from prefkit.compare.plots import plot_frontier

    loaded, result, _, _ = tiny_run
    panels = [("DPO, two betas", ["dpo-b0.1", "dpo-b0.5"]), ("PPO and best-of-N", ["ppo-kl2", "bon-4"])]
    image = _png(plot_frontier(result.aggregate, tmp_path / "f.png", panels=panels))
    temperatures = len(loaded.compare.evaluation.temperatures)  # a row of panels per temperature
    assert image.shape[:2] == (round(4.4 * temperatures * 120), round((4.4 * 2 + 2.6) * 120))
    assert (image[..., :3] < 0.5).mean() > 0.005


def test_panels_share_the_gold_scale_but_each_has_its_own_kl_axis(tiny_run, tmp_path, monkeypatch):
    """One arm that drifts far (here: ten times the KL) must not squeeze the other panels' curves."""
    from matplotlib.figure import Figure

    from prefkit.compare.plots import plot_frontier

    _, result, _, _ = tiny_run
    rows = [dict(r, kl=r["kl"] * 10, kl_lo=r["kl_lo"] * 10, kl_hi=r["kl_hi"] * 10) if r["arm"] == "dpo-b0.1" else r
            for r in result.aggregate]
    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or real(self, *a, **k))
    plot_frontier(rows, tmp_path / "f.png", panels=[("DPO", ["dpo-b0.1"]), ("PPO", ["ppo-kl2"])])
    first, second = figures[0].axes[:2]
    far = max(r["kl_hi"] for r in rows if r["arm"] == "dpo-b0.1")
    near = max(r["kl_hi"] for r in rows if r["arm"] in ("ppo-kl2", "reference"))
    assert first.get_xlim()[1] >= far and second.get_xlim()[1] < far / 2 and near <= second.get_xlim()[1]
    assert first.get_ylim() == second.get_ylim()


def test_panels_name_arms_of_the_recipe(tmp_path):
    with pytest.raises(RecipeError, match=r"evaluation.panels.0.arms.1: 'dpo-b9' is not an arm"):
        load_compare(TINY, ["evaluation.panels=[{title: DPO, arms: [dpo-b0.1, dpo-b9]}]"], registry=REGISTRY)
    panels = "evaluation.panels=[{title: DPO, arms: [dpo-b0.1, dpo-b0.5]}, {title: PPO, arms: [ppo-kl2]}]"
    loaded = load_compare(TINY, [panels], registry=REGISTRY, arms=["dpo-b0.5", "bon-4"])
    assert [(p.title, p.arms) for p in loaded.compare.evaluation.panels] == [("DPO", ["dpo-b0.5"])]  # --arms


def test_the_report_states_the_setup_and_shows_everything(tiny_run):
    loaded, result, out, _ = tiny_run
    report = (out / "report.md").read_text()
    for arm in loaded.arms:
        assert f"| {arm.name} |" in report
    for text in ["![gold reward vs KL](frontier.png)", "![win rate](winrate.png)", "tiny-llama", "tiny-prefs",
                 "**32 labels per arm**", "keywords", "temperatures 0.7, 1", "**Seeds**: 0, 1",
                 "every 4 training steps", "log N − (N−1)/N", "reference cache hit", "## Budgets",
                 "## Results at the final step", "## Paired comparisons", "**within noise**",
                 "Every trained arm consumed the same number of labels.", "| bon-1 − reference | 1 |",
                 "95% percentile bootstrap, 1000 resamples"]:
        assert text in report, text
    final = [line for line in report.split("## Results at the final step")[1].split("## Paired")[0].splitlines()
             if line.startswith("| ") and " | 0.7 | " in line]
    assert len(final) == len(loaded.arms) + 1
    within = sum(r["verdict"] == "within noise" for r in result.paired)
    assert f"{within} of {len(result.paired)} differences are **within noise**" in report
    flagged = [r for r in result.aggregate if r["std_ge_mean"]]
    assert ("⚠ **Noise flag**" in report) == bool(flagged)


def test_a_rerun_trains_nothing_samples_nothing_and_gives_identical_results(tiny_run, monkeypatch):
    _, result, out, cache = tiny_run
    before = {name: (out / f"{name}.jsonl").read_bytes() for name in ("results", "aggregate", "paired")}

    def fail(*args, **kwargs):
        raise AssertionError("nothing should be trained or sampled again")

    monkeypatch.setattr(engine, "train", fail)
    monkeypatch.setattr(prefkit.models.sampling, "generate", fail)
    _, again = compare(out, cache)
    assert again.rows == result.rows and again.aggregate == result.aggregate and again.paired == result.paired
    assert {name: (out / f"{name}.jsonl").read_bytes() for name in before} == before


def test_an_interrupted_compare_retrains_only_the_unfinished_arms(tiny_run, tmp_path, monkeypatch):
    _, result, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # killed before its first checkpoint: nothing to continue from
    killed_early = copy / "arms" / "unlikelihood-a0.5" / "seed-1"
    for name in ("run.json", "final", "checkpoints"):
        shutil.rmtree(killed_early / name) if (killed_early / name).is_dir() else (killed_early / name).unlink()
    # killed after its step-4 checkpoint
    killed_late = copy / "arms" / "dpo-b0.5" / "seed-0"
    for name in ("run.json", "final", "checkpoints/step-8"):
        shutil.rmtree(killed_late / name) if (killed_late / name).is_dir() else (killed_late / name).unlink()
    trained = []
    real_train = engine.train

    def spy(loaded, **kwargs):
        trained.append((str(Path(loaded.recipe.output_dir).relative_to(copy / "arms")), kwargs["resume"]))
        return real_train(loaded, **kwargs)

    monkeypatch.setattr(engine, "train", spy)
    _, again = compare(copy, cache)
    assert trained == [("dpo-b0.5/seed-0", True), ("unlikelihood-a0.5/seed-1", False)]
    assert numbers(again.rows) == numbers(result.rows)  # retrained on CPU: the same weights, the same numbers


def test_a_finished_arm_is_not_retrained_for_a_logging_or_checkpoint_change(tiny_run, tmp_path, monkeypatch):
    _, result, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for checkpoints in (copy / "arms").glob("*/*/checkpoints"):
        shutil.rmtree(checkpoints)  # as after `rm -r arms/*/*/checkpoints` to free the disk
    before = (copy / "arms" / "dpo-b0.1" / "seed-0" / "metrics.jsonl").read_bytes()
    trained = []
    monkeypatch.setattr(engine, "train", lambda loaded, **kwargs: trained.append(loaded.recipe.output_dir))
    loaded, again = compare(copy, cache, "train.keep_checkpoints=1", "train.log_every=5")
    # the step-4 evaluations come from the cache, though their checkpoints are gone
    assert trained == [] and numbers(again.rows) == numbers(result.rows) and again.notes == []
    assert (copy / "arms" / "dpo-b0.1" / "seed-0" / "metrics.jsonl").read_bytes() == before
    with pytest.raises(PrefkitError, match=r"arm dpo-b0.1 seed 0: finished, .*train.max_steps.* no checkpoint left"):
        compare(copy, cache, "budget.labels=48")
    assert trained == []


def test_a_damaged_arm_summary_or_a_folder_where_an_output_goes_is_one_message_changing_nothing(tiny_run, tmp_path):
    _, _, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = copy / "arms" / "dpo-b0.1" / "seed-0" / "run.json"
    for damage, why in (("{not json", "unreadable (JSONDecodeError)"), ("[1, 2]", "not a JSON object but list"),
                        ("", "unreadable (JSONDecodeError)"), ("{}", "no whole number of 'steps'")):
        summary.write_text(damage)
        with pytest.raises(PrefkitError) as info:
            compare(copy, cache)
        assert str(info.value) == (f"arm dpo-b0.1 seed 0: {summary} is damaged ({why}); delete {summary.parent} to "
                                   "train the arm again (nothing was changed)")
        assert summary.read_text() == damage
    shutil.copy(out / "arms" / "dpo-b0.1" / "seed-0" / "run.json", summary)
    # an unfinished arm whose only checkpoint is damaged: the harness resumed it, so no "--resume:" in the message
    arm = copy / "arms" / "dpo-b0.5" / "seed-0"
    for name in ("run.json", "final", "checkpoints/step-8"):
        shutil.rmtree(arm / name) if (arm / name).is_dir() else (arm / name).unlink()
    (arm / "checkpoints" / "step-4" / "state.json").write_text("{bad")
    with pytest.raises(PrefkitError) as info:
        compare(copy, cache)
    assert str(info.value).startswith("arm dpo-b0.5 seed 0: every checkpoint in ") and "--resume" not in str(info.value)
    assert str(info.value).endswith(f"; nothing was changed: delete {arm} to train the arm again")
    assert "output_dir" not in str(info.value)
    shutil.rmtree(arm)
    shutil.copytree(out / "arms" / "dpo-b0.5" / "seed-0", arm)
    (copy / "results.jsonl").unlink()
    (copy / "results.jsonl").mkdir()  # refused before any model loads (it failed after every evaluation)
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(PrefkitError, match=r"results.jsonl is a folder; prefkit compare writes its results.jsonl "
                                           r"there: move it away \(nothing was changed\)"):
        compare(copy, cache)
    assert sorted(p.name for p in copy.iterdir()) == before
    (copy / "results.jsonl").rmdir()
    shutil.rmtree(copy / "reference")
    (copy / "reference").write_text("x")
    with pytest.raises(PrefkitError, match=r"reference is not a folder; prefkit compare keeps its reference folder"):
        compare(copy, cache)


def test_checkpoints_kept_for_evaluation_are_deleted_after_it(tmp_path, monkeypatch):
    arms = "arms=[{name: dpo, objective: dpo, params: {beta: 0.1}}]"
    opts = [arms, "seeds=[0]", "evaluation.temperatures=[1.0]", "train.keep_checkpoints=1",
            "evaluation.every_steps=2", "evaluation.paired=null"]
    _, result = compare(tmp_path / "c", tmp_path / "cache", *opts)
    run_dir = tmp_path / "c" / "arms" / "dpo" / "seed-0"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-8"]  # the arm's own keep_checkpoints
    assert [r["step"] for r in result.rows if r["arm"] == "dpo"] == [2, 4, 6, 8]
    # the cached evaluations stand in for the deleted checkpoints; without them the steps are reported missing
    monkeypatch.setattr(prefkit.models.sampling, "generate", lambda *a, **k: pytest.fail("sampled again"))
    _, again = compare(tmp_path / "c", tmp_path / "cache", *opts)
    assert again.rows == result.rows
    (run_dir / "eval.jsonl").unlink()
    monkeypatch.undo()
    _, partial = compare(tmp_path / "c", tmp_path / "cache", *opts)
    assert [r["step"] for r in partial.rows if r["arm"] == "dpo"] == [8]
    assert partial.notes == ["arm dpo seed 0: steps 2, 4, 6 not evaluated: their checkpoints are gone and no "
                             "current evaluation of them is cached"]
    assert "## Not evaluated" in (tmp_path / "c" / "report.md").read_text()


def test_a_lora_arm_is_evaluated_from_its_adapter_checkpoints(tmp_path):
    """A LoRA checkpoint holds the adapter alone: loaded into the starting model with the compare's
    adapters, it computes what final/ (the adapter merged) computes."""
    from prefkit.compare.harness import PolicySource, load_policy

    arms = "arms=[{name: dpo, objective: dpo, params: {beta: 0.1}}]"
    loaded, result = compare(tmp_path / "c", tmp_path / "cache", arms, "model.lora={r: 4, alpha: 8}", "seeds=[0]",
                             "evaluation.temperatures=[1.0]", "evaluation.paired=null")
    run_dir = tmp_path / "c" / "arms" / "dpo" / "seed-0"
    assert set(load_file_keys(run_dir / "checkpoints" / "step-8" / "trainable.safetensors")) and all(
        "lora" in key for key in load_file_keys(run_dir / "checkpoints" / "step-8" / "trainable.safetensors"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapter = load_policy(PolicySource({}, "checkpoint", run_dir / "checkpoints" / "step-8"),
                              loaded.compare.model, loaded.model_options, tmp_path / "cache", online=False,
                              registry=REGISTRY).eval()(input_ids=ids).logits
        merged = load_policy(PolicySource({}, "final", run_dir / "final"), None, None, tmp_path / "cache",
                             online=False, registry=REGISTRY).eval()(input_ids=ids).logits
    assert torch.allclose(adapter, merged, atol=1e-4)
    steps = [r["step"] for r in result.rows if r["arm"] == "dpo"]
    kls = [r["kl"] for r in result.rows if r["arm"] == "dpo"]
    assert steps == [4, 8] and 0 < kls[0] < kls[1]


def load_file_keys(path):
    from safetensors.torch import load_file

    return list(load_file(str(path)))


def test_re_evaluating_one_step_keeps_the_cached_steps_whose_checkpoints_are_gone(tmp_path):
    arms = "arms=[{name: dpo, objective: dpo, params: {beta: 0.1}}]"
    opts = [arms, "seeds=[0]", "evaluation.temperatures=[1.0]", "train.keep_checkpoints=4",
            "evaluation.every_steps=2", "evaluation.paired=null"]
    _, result = compare(tmp_path / "c", tmp_path / "cache", *opts)
    run_dir = tmp_path / "c" / "arms" / "dpo" / "seed-0"
    for step in (4, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    records = read_jsonl(run_dir / "eval.jsonl")
    for r in records:
        if r["step"] == 2:
            r["fingerprint"] = "stale"  # step 2 is evaluated again (its checkpoint is there)
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, again = compare(tmp_path / "c", tmp_path / "cache", *opts)
    assert again.rows == result.rows and again.notes == []
    assert sorted({r["step"] for r in read_jsonl(run_dir / "eval.jsonl")}) == [2, 4, 6, 8]


def test_the_same_compare_twice_gives_the_same_numbers(tiny_run, tmp_path):
    _, result, _, _ = tiny_run
    arms = "arms=[{name: dpo-b0.1, objective: dpo, params: {beta: 0.1}}, {name: ppo-kl2, objective: ppo_kl, " \
           "params: {kl_coef: 0.05, adaptive_kl: true, target_kl: 2.0, rollout_batch_size: 2, update_epochs: 2}, " \
           "train: {batch_size: 8}}]"
    _, again = compare(tmp_path / "c2", tmp_path / "fresh-cache", arms, "evaluation.paired=null")
    kept = [r for r in result.rows if r["arm"] in ("reference", "dpo-b0.1", "ppo-kl2")]
    assert numbers(again.rows) == numbers(kept)


def test_an_arm_trained_with_another_recipe_is_refused(tiny_run, tmp_path):
    _, _, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(PrefkitError, match=r"arm dpo-b0.1 seed 0: .* objective.params.beta"):
        compare(copy, cache, "arms.dpo-b0.1.params.beta=0.2")


def test_win_rate_against_the_chosen_answers_with_another_judge(tmp_path):
    arms = "arms=[{name: bon-2, objective: best_of_n, params: {n: 2}}]"
    judge = "evaluation.judge={name: keywords, params: {targets: [e, a, o], unit: char, mode: count}}"
    _, result = compare(tmp_path / "c", tmp_path / "cache", arms, judge, "evaluation.win_against=chosen",
                        "evaluation.include_reference=false", "evaluation.temperatures=[1.0]", "seeds=[0]",
                        "evaluation.paired=null")
    [row] = result.rows
    assert row["arm"] == "bon-2" and row["win_against"] == "chosen" and result.paired == []
    # random bytes against written English under a vowel count: the chosen answers win nearly always
    records = read_jsonl(tmp_path / "c" / "arms" / "bon-2" / "seed-0" / "eval.jsonl")
    assert all(r["baseline_judge"] > 0 for r in records)
    assert row["win_rate"] == pytest.approx(sum(r["win"] for r in records) / len(records)) and row["win_rate"] < 0.5
    assert not (tmp_path / "c" / "reference").exists()  # not needed


def test_an_arm_with_its_own_seeds_runs_under_those_only(tmp_path):
    arms = ("arms=[{name: bon-2, objective: best_of_n, params: {n: 2}}, "
            "{name: bon-3, objective: best_of_n, params: {n: 3}, seeds: [1]}]")
    loaded, result = compare(tmp_path / "c", tmp_path / "cache", arms, "seeds=[0, 1]", "evaluation.temperatures=[1.0]",
                             "evaluation.max_prompts=3", "evaluation.paired=[[bon-3, bon-2], [bon-2, reference]]")
    assert sorted((r["arm"], r["seed"]) for r in result.rows) == [
        ("bon-2", 0), ("bon-2", 1), ("bon-3", 1), ("reference", 0), ("reference", 1)]
    assert not (tmp_path / "c" / "arms" / "bon-3" / "seed-0").exists()
    seeds = {r["arm"]: r["seeds"] for r in result.aggregate}
    assert seeds == {"reference": [0, 1], "bon-2": [0, 1], "bon-3": [1]}
    paired = {(r["a"], r["b"]): r["n_seeds"] for r in result.paired}
    assert paired == {("bon-3", "bon-2"): 1, ("bon-2", "reference"): 2}  # on the seeds both have
    assert [b["seed"] for b in result.budget if b["arm"] == "bon-3"] == [1]
    assert "bon-3 only under 1" in (tmp_path / "c" / "report.md").read_text()
    with pytest.raises(RecipeError, match=r"arm 'bon-3': seeds \[1\] are not among the compare's seeds \[0\]"):
        load_compare(TINY, [arms, "seeds=[0]"], registry=REGISTRY)


def test_the_compare_command(tmp_path):
    arms = "arms=[{name: bon-2, objective: best_of_n, params: {n: 2}}]"
    result = runner.invoke(app, ["compare", str(TINY), f"output_dir={tmp_path / 'c'}", arms, "evaluation.paired=null",
                                 "evaluation.temperatures=[1.0]", "evaluation.max_prompts=2", "seeds=[0]"])
    assert result.exit_code == 0, result.output
    assert "bon-2" in result.output and "reference" in result.output and "report.md" in result.output
    assert "95% intervals" in result.output
    assert (tmp_path / "c" / "report.md").is_file()
    result = runner.invoke(app, ["compare", str(TINY), "arms.1.params.beta=-1"])
    assert result.exit_code == 2 and "arms.1.params.beta" in result.output and "Traceback" not in result.output


def test_the_sentiment_pipeline_end_to_end_on_the_tiny_model(tmp_path):
    """recipes/sentiment/pipeline.sh tiny: sample (train and held-out prompts) -> label -> bt_reward
    -> compare, the commands of recipes/sentiment/README.md, each stage timed."""
    env = {**os.environ, "PREFKIT": f"{sys.executable} -m prefkit", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SENTIMENT / "pipeline.sh"), "tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("0-sft", "1-sample", "1-sample-heldout", "2-label", "2-label-heldout", "2-label-unpaired",
                  "3-reward-model", "4-compare"):
        assert re.search(rf"== stage {stage}: \d+ s", done.stdout), stage
    runs = tmp_path / "runs" / "sentiment-tiny"
    assert json.loads((runs / "heldout" / "pairs.summary.json").read_text())["pairs"] > 0
    # the pairs are sampled on IMDb openings the SFT data does not hold (24 of them, 4 samples each)
    openings = [json.loads(line)["prompt"] for line in (runs / "prompts.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (runs / "samples.jsonl").read_text().splitlines()]
    assert len(openings) == 24 and {s["prompt"] for s in samples} == set(openings) and len(samples) == 4 * 24
    rm_metrics = [json.loads(line) for line in (runs / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in m for m in rm_metrics)
    out = runs / "compare"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} >= {"dpo-b0.1", "ppo-rm-kl2", "ppo-gold-kl2", "bon-4", "kto", "grpo-rm", "rloo-rm"}
    sft = [json.loads(line) for line in (runs / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft[-1]["loss"] < sft[0]["loss"]  # the SFT stage learned the review text
    assert by(rows, "ppo-rm-kl2", 1.0)["reward"] == "reward_model"
    assert by(rows, "ppo-gold-kl2", 1.0)["reward"] == "keywords"
    assert (out / "frontier.png").is_file() and (out / "report.md").is_file()
