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
from typer.testing import CliRunner

import prefkit.models.sampling
import prefkit.loops as engine
from prefkit.cli import app
from prefkit.compare.recipe import load_compare
from prefkit.api.errors import PrefkitError
from prefkit.compare.harness import RESULT_COLUMNS, run_compare

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
    loaded, rows = compare(root / "c1", root / "cache")
    torch.set_num_threads(before)
    return loaded, rows, root / "c1", root / "cache"


def by(rows, arm, temperature):
    [row] = [r for r in rows if r["arm"] == arm and r["temperature"] == temperature]
    return row


def test_every_output_is_written(tiny_run):
    loaded, rows, out, _ = tiny_run
    arms = [a.name for a in loaded.arms]
    temperatures = loaded.compare.evaluation.temperatures
    assert [r["arm"] for r in rows] == [a for a in ["reference", *arms] for _ in temperatures]
    assert all(list(r) == RESULT_COLUMNS for r in rows)
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and list(table[0]) == RESULT_COLUMNS
    assert float(table[3]["kl"]) == rows[3]["kl"] and json.loads(table[3]["params"]) == rows[3]["params"]
    for arm in arms:
        assert (out / "arms" / arm / "eval.jsonl").is_file()
    for t in temperatures:
        assert (out / f"reference_samples_T{t:g}.jsonl").is_file()
    for row in rows:
        assert row["n_prompts"] == 8 and row["n_samples"] == 16 and 0 <= row["win_rate"] <= 1
        assert math.isfinite(row["kl"]) and row["length"] > 0


def test_trained_arms_trained_and_best_of_n_did_not(tiny_run):
    loaded, rows, out, _ = tiny_run
    for arm in loaded.arms:
        row = by(rows, arm.name, 1.0)
        if arm.kind == "inference":
            assert row["train_steps"] == 0 and not (out / "arms" / arm.name / "run.json").exists()
            assert row["kl_method"] == "bon_analytic" and row["reward"] == "keywords"
        else:
            assert row["train_steps"] == 8 and (out / "arms" / arm.name / "final" / "config.json").is_file()
            assert row["kl_method"] == "token_kl" and row["kl"] >= 0 and math.isfinite(row["kl_mc"])
    assert by(rows, "ppo-kl2", 1.0)["train_overrides"] == {"batch_size": 32}
    assert by(rows, "dpo-b0.5", 1.0)["params"]["beta"] == 0.5


def test_identical_policies_have_kl_zero_and_win_rate_one_half(tiny_run):
    _, rows, _, _ = tiny_run
    for t in (0.7, 1.0):
        reference, bon1 = by(rows, "reference", t), by(rows, "bon-1", t)
        assert reference["kl"] == 0.0 and reference["win_rate"] == 0.5
        # best-of-1 is the starting policy: the same samples, so the same numbers
        assert bon1["kl"] == 0.0 and bon1["win_rate"] == 0.5
        assert bon1["gold_reward"] == reference["gold_reward"] and bon1["length"] == reference["length"]
        bon4 = by(rows, "bon-4", t)
        assert bon4["kl"] == pytest.approx(math.log(4) - 0.75)
        assert bon4["gold_reward"] >= reference["gold_reward"] and bon4["win_rate"] >= 0.5


def test_the_reference_pass_is_shared(tiny_run):
    _, _, out, _ = tiny_run
    first = json.loads((out / "arms" / "dpo-b0.1" / "run.json").read_text())
    second = json.loads((out / "arms" / "dpo-b0.5" / "run.json").read_text())
    assert first["reference_cache"] == "miss" and second["reference_cache"] == "hit"


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


def test_the_report_states_the_setup_and_shows_everything(tiny_run):
    loaded, rows, out, _ = tiny_run
    report = (out / "report.md").read_text()
    for arm in loaded.arms:
        assert f"| {arm.name} |" in report
    for text in ["![gold reward vs KL](frontier.png)", "![win rate vs temperature](winrate.png)",
                 "tiny-llama", "tiny-prefs", "8 optimizer steps", "keywords", "temperatures 0.7, 1",
                 "log N − (N−1)/N", "reference cache hit", "## Results"]:
        assert text in report, text
    table = [line for line in report.splitlines() if line.startswith("| ") and " | 0.7 | " in line]
    assert len(table) == len(rows) // 2


def test_a_rerun_trains_nothing_samples_nothing_and_gives_identical_results(tiny_run, monkeypatch):
    _, rows, out, cache = tiny_run
    before = (out / "results.jsonl").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("nothing should be trained or sampled again")

    monkeypatch.setattr(engine, "train", fail)
    monkeypatch.setattr(prefkit.models.sampling, "generate", fail)
    _, again = compare(out, cache)
    assert again == rows and (out / "results.jsonl").read_bytes() == before


def test_an_interrupted_compare_retrains_only_the_unfinished_arm(tiny_run, tmp_path, monkeypatch):
    _, rows, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # as if killed before the end, and before its first checkpoint (the tiny compare keeps none)
    (copy / "arms" / "unlikelihood-a0.5" / "run.json").unlink()
    assert not (copy / "arms" / "unlikelihood-a0.5" / "checkpoints").exists()
    trained = []
    real_train = engine.train

    def spy(loaded, **kwargs):
        trained.append((Path(loaded.recipe.output_dir).name, kwargs["resume"]))
        return real_train(loaded, **kwargs)

    monkeypatch.setattr(engine, "train", spy)
    _, again = compare(copy, cache)
    assert trained == [("unlikelihood-a0.5", False)]  # nothing to continue from: trained from the start
    assert numbers(again) == numbers(rows)  # retrained on CPU: the same weights, the same numbers


def test_a_finished_arm_is_not_retrained_for_a_logging_or_checkpoint_change(tiny_run, tmp_path, monkeypatch):
    _, rows, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for checkpoints in (copy / "arms").glob("*/checkpoints"):
        shutil.rmtree(checkpoints)  # as after `rm -r arms/*/checkpoints` to free the disk
    before = (copy / "arms" / "dpo-b0.1" / "metrics.jsonl").read_bytes()
    trained = []
    monkeypatch.setattr(engine, "train", lambda loaded, **kwargs: trained.append(loaded.recipe.output_dir))
    _, again = compare(copy, cache, "train.keep_checkpoints=1", "train.log_every=5")
    assert trained == [] and numbers(again) == numbers(rows)
    assert (copy / "arms" / "dpo-b0.1" / "metrics.jsonl").read_bytes() == before
    with pytest.raises(PrefkitError, match=r"arm dpo-b0.1: finished, .*train.max_steps.* no checkpoint left"):
        compare(copy, cache, "train.max_steps=12")
    assert trained == []


def test_the_same_compare_twice_gives_the_same_numbers(tiny_run, tmp_path):
    _, rows, _, _ = tiny_run
    _, again = compare(tmp_path / "c2", tmp_path / "fresh-cache")
    assert numbers(again) == numbers(rows)


def test_an_arm_trained_with_another_recipe_is_refused(tiny_run, tmp_path):
    _, _, out, cache = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(PrefkitError, match=r"arm dpo-b0.1: .* objective.params.beta"):
        compare(copy, cache, "arms.dpo-b0.1.params.beta=0.2")


def test_win_rate_against_the_chosen_answers_with_another_judge(tmp_path):
    arms = "arms=[{name: bon-2, objective: best_of_n, params: {n: 2}}]"
    judge = "evaluation.judge={name: keywords, params: {targets: [e, a, o], unit: char, mode: count}}"
    _, rows = compare(tmp_path / "c", tmp_path / "cache", arms, judge, "evaluation.win_against=chosen",
                           "evaluation.include_reference=false", "evaluation.temperatures=[1.0]")
    [row] = rows
    assert row["arm"] == "bon-2" and row["win_against"] == "chosen"
    # random bytes against written English under a vowel count: the chosen answers win nearly always
    records = [json.loads(line) for line in (tmp_path / "c" / "arms" / "bon-2" / "eval.jsonl").read_text().splitlines()]
    assert all(r["baseline_judge"] > 0 for r in records)
    assert row["win_rate"] == sum(r["win"] for r in records) / len(records) < 0.5
    assert not (tmp_path / "c" / "reference_samples_T1.jsonl").exists()  # not needed


def test_the_compare_command(tmp_path):
    arms = "arms=[{name: bon-2, objective: best_of_n, params: {n: 2}}]"
    result = runner.invoke(app, ["compare", str(TINY), f"output_dir={tmp_path / 'c'}", arms,
                                 "evaluation.temperatures=[1.0]", "evaluation.max_prompts=2"])
    assert result.exit_code == 0, result.output
    assert "bon-2" in result.output and "reference" in result.output and "report.md" in result.output
    assert (tmp_path / "c" / "report.md").is_file()
    result = runner.invoke(app, ["compare", str(TINY), "arms.1.params.beta=-1"])
    assert result.exit_code == 2 and "arms.1.params.beta" in result.output and "Traceback" not in result.output


def test_the_sentiment_pipeline_end_to_end_on_the_tiny_model(tmp_path):
    """recipes/sentiment/pipeline.sh tiny: sample (train and held-out prompts) -> label -> bt_reward
    -> compare, the commands of recipes/sentiment/README.md, each stage timed."""
    env = {**os.environ, "PREFKIT": f"{sys.executable} -m prefkit"}
    done = subprocess.run(["bash", str(SENTIMENT / "pipeline.sh"), "tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("1-sample", "1-sample-heldout", "2-label", "2-label-heldout", "3-reward-model", "4-compare"):
        assert re.search(rf"== stage {stage}: \d+ s", done.stdout), stage
    runs = tmp_path / "runs" / "sentiment-tiny"
    assert json.loads((runs / "heldout" / "pairs.summary.json").read_text())["pairs"] > 0
    rm_metrics = [json.loads(line) for line in (runs / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in m for m in rm_metrics)
    out = runs / "compare"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} >= {"dpo-b0.1", "ppo-rm-kl2", "ppo-gold-kl2", "bon-4"}
    assert by(rows, "ppo-rm-kl2", 1.0)["reward"] == "reward_model"
    assert by(rows, "ppo-gold-kl2", 1.0)["reward"] == "keywords"
    assert (out / "frontier.png").is_file() and (out / "report.md").is_file()
