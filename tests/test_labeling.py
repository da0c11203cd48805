"""`prefkit label`: pairs from hand-made samples (prefkit/compare/labeling.py)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.api.errors import DataError, PrefkitError
from prefkit.compare.labeling import (
    label_samples,
    make_pairs,
    read_samples,
    reward_from_options,
)
from prefkit.recipe import DataConfig, RewardConfig

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

runner = CliRunner()


def write_samples(path: Path, rows: list[dict], summary: dict | None = None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        path.with_name(f"{path.stem}.summary.json").write_text(json.dumps(summary))
    return path


def rows_for(prompt, index, scored):
    """scored: list of (completion, score or None)."""
    out = []
    for k, (text, score) in enumerate(scored):
        row = {"prompt_index": index, "sample_index": k, "prompt": prompt, "completion": text,
               "finished": True, "num_tokens": len(text)}
        if score is not None:
            row["score"] = score
        out.append(row)
    return out


SAMPLES = (
    rows_for("Review A:", 0, [("fine", 0.5), ("great", 0.9), ("awful", 0.1), ("okay", 0.5)])
    + rows_for("Review B:", 1, [("same", 0.4), ("same too", 0.4)])  # a tie: no pair
    + rows_for("Review C:", 2, [("good", 0.7), ("", 0.9), ("bad", 0.2)])  # the empty one is dropped
)


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_worst_pairs_by_hand(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    report = label_samples(samples, tmp_path / "pairs.jsonl", reward=None, mode="best-worst", registry=REGISTRY)
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert pairs == [
        {"prompt": "Review A:", "chosen": "great", "rejected": "awful", "margin": pytest.approx(0.8)},
        {"prompt": "Review C:", "chosen": "good", "rejected": "bad", "margin": pytest.approx(0.5)},
    ]
    assert (report.samples_read, report.prompts, report.pairs) == (9, 3, 2)
    assert (report.ties_dropped, report.empty_dropped, report.prompts_without_pair) == (1, 1, 1)
    assert not report.rescored
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["pairs"] == 2 and summary["mode"] == "best-worst"


def test_all_pairs_drops_ties_and_orders_each_pair(tmp_path):
    completions = read_samples(write_samples(tmp_path / "s.jsonl", SAMPLES))
    pairs, counts = make_pairs(completions, "all-pairs")
    # Review A: 4 completions -> 6 pairs, one tie (fine/okay at 0.5) -> 5; B: 1 tie; C: good vs bad -> 1
    assert len(pairs) == 6 and counts["ties_dropped"] == 2 and counts["empty_dropped"] == 1
    assert all(p["margin"] > 0 for p in pairs)
    a_pairs = {(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == "Review A:"}
    assert a_pairs == {("great", "fine"), ("fine", "awful"), ("great", "awful"), ("great", "okay"),
                       ("okay", "awful")}


def test_the_same_text_is_a_tie_whatever_its_scores(tmp_path):
    rows = rows_for("P", 0, [("twin", 0.1), ("twin", 0.9)])
    pairs, counts = make_pairs(read_samples(write_samples(tmp_path / "s.jsonl", rows)), "best-worst")
    assert pairs == [] and counts["ties_dropped"] == 1


def test_rescoring_with_a_gold_reward(tmp_path):
    rows = rows_for("P", 0, [("eee", 0.0), ("abc", 0.9), ("xyz", 0.5)])  # scores the reward will replace
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    reward, params = reward_from_options("keywords", ["targets=[e]", "unit=char"], registry=REGISTRY)
    report = label_samples(samples, tmp_path / "pairs.jsonl", reward=reward, reward_params=params, rescore=True, registry=REGISTRY)
    assert report.rescored
    # keywords share of "e": eee 1.0, abc 0.0, xyz 0.0 -> best eee, worst abc (first of the tied worst)
    assert read_pairs(tmp_path / "pairs.jsonl") == [{"prompt": "P", "chosen": "eee", "rejected": "abc", "margin": 1.0}]


def test_scores_without_a_column_need_a_reward(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", rows_for("P", 0, [("a", None), ("b", None)]))
    with pytest.raises(PrefkitError, match="--reward"):
        label_samples(samples, tmp_path / "pairs.jsonl", reward=None, registry=REGISTRY)


def test_a_different_reward_than_the_samples_were_scored_with_rescores(tmp_path):
    rows = rows_for("P", 0, [("eee", 0.0), ("abc", 0.9)])
    samples = write_samples(tmp_path / "samples.jsonl", rows, summary={"reward": "sentiment"})
    reward, params = reward_from_options("keywords", ["targets=[e]", "unit=char"], registry=REGISTRY)
    report = label_samples(samples, tmp_path / "pairs.jsonl", reward=reward, reward_params=params, registry=REGISTRY)
    assert report.rescored and read_pairs(tmp_path / "pairs.jsonl")[0]["chosen"] == "eee"
    # the same reward as the summary records: the column is reused
    samples = write_samples(tmp_path / "samples.jsonl", rows, summary={"reward": "keywords"})
    report = label_samples(samples, tmp_path / "pairs.jsonl", reward=reward, reward_params=params, registry=REGISTRY)
    assert not report.rescored and read_pairs(tmp_path / "pairs.jsonl")[0]["chosen"] == "abc"


def test_conversational_prompts_give_conversational_pairs(tmp_path):
    prompt = [{"role": "user", "content": "Tell me about the film."}]
    samples = write_samples(tmp_path / "s.jsonl", rows_for(prompt, 0, [("Loved it.", 0.9), ("Hated it.", 0.1)]))
    label_samples(samples, tmp_path / "pairs.jsonl", reward=None, margin=False, registry=REGISTRY)
    assert read_pairs(tmp_path / "pairs.jsonl") == [{
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Loved it."}],
        "rejected": [{"role": "assistant", "content": "Hated it."}],
    }]


def test_the_pairs_file_is_valid_preference_data(tmp_path):
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.tiny import build_tiny_tokenizer

    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    label_samples(samples, tmp_path / "pairs.jsonl", reward=None, mode="all-pairs", registry=REGISTRY)
    data = prepare_dataset(DataConfig(train=str(tmp_path / "pairs.jsonl")), build_tiny_tokenizer(), REGISTRY.data_kinds["pairs"],
                           registry=REGISTRY)
    assert data.report.rows_kept == 6 and data.report.rows_skipped_bad == 0
    assert all(ex.columns.get("margin", 0) > 0 for ex in data.examples)


def test_bad_sample_rows_are_named_by_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "P", "completion": "a"}\nnot json\n{"prompt": "P"}\n{"prompt": "P", "completion": "b", "score": "high"}\n')
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert "line 2" in message and "line 3" in message and "'completion'" in message and "line 4" in message
    with pytest.raises(DataError, match="file not found"):
        read_samples(tmp_path / "missing.jsonl")


def test_reward_options_are_checked():
    with pytest.raises(PrefkitError, match="unknown reward function"):
        reward_from_options("nope", [], registry=REGISTRY)
    with pytest.raises(PrefkitError, match="unit"):
        reward_from_options("keywords", ["targets=[e]", "unit=letter"], registry=REGISTRY)
    with pytest.raises(PrefkitError, match="bogus: unknown parameter"):
        reward_from_options("keywords", ["targets=[e]", "bogus=1"], registry=REGISTRY)
    cfg, params = reward_from_options("keywords", ["targets=[e, a]", "mode=count"], registry=REGISTRY)
    assert cfg == RewardConfig(name="keywords", params={"targets": ["e", "a"], "mode": "count"})
    assert params.targets == ["e", "a"]


def test_the_label_command(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "out" / "pairs.jsonl"
    result = runner.invoke(app, ["label", str(samples), "--mode", "all-pairs", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert len(read_pairs(out)) == 6 and "ties_dropped" in result.output
    result = runner.invoke(app, ["label", str(samples), "--reward", "keywords", "--reward-param", "targets=[e]",
                                 "--reward-param", "unit=char", "--rescore"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pairs.jsonl").is_file()  # the default output: beside the samples
    result = runner.invoke(app, ["label", str(samples), "--mode", "sideways"])
    assert result.exit_code == 2 and "best-worst" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["label", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "file not found" in result.output


def test_zero_pairs_is_refused_and_writes_nothing(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", rows_for("Review B:", 1, [("same", 0.4), ("same too", 0.4)]))
    result = runner.invoke(app, ["label", str(samples)])
    assert result.exit_code == 2 and "no preference pairs" in result.output and "1 ties dropped" in result.output
    assert not (tmp_path / "pairs.jsonl").exists() and "Traceback" not in result.output


def test_unpaired_rows_for_kto_by_hand(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    report = label_samples(samples, tmp_path / "kto.jsonl", reward=None, mode="unpaired", registry=REGISTRY)
    rows = read_pairs(tmp_path / "kto.jsonl")
    # Review A: mean of 0.5, 0.9, 0.1, 0.5 is 0.5 -> great desirable, awful undesirable, fine/okay ties;
    # Review B: both at the mean (ties, no rows); Review C: the empty one dropped, mean 0.45 of good/bad
    assert rows == [
        {"prompt": "Review A:", "completion": "great", "label": True, "score": 0.9},
        {"prompt": "Review A:", "completion": "awful", "label": False, "score": 0.1},
        {"prompt": "Review C:", "completion": "good", "label": True, "score": 0.7},
        {"prompt": "Review C:", "completion": "bad", "label": False, "score": 0.2},
    ]
    assert (report.pairs, report.ties_dropped, report.empty_dropped, report.prompts_without_pair) == (4, 4, 1, 1)


def test_unpaired_rows_read_as_kto_data(tmp_path):
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.tiny import build_tiny_tokenizer

    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    label_samples(samples, tmp_path / "kto.jsonl", reward=None, mode="unpaired", registry=REGISTRY)
    cfg = DataConfig(train=str(tmp_path / "kto.jsonl"), chat_template="never")
    prepared = prepare_dataset(cfg, build_tiny_tokenizer(), REGISTRY.data_kinds["unpaired"], registry=REGISTRY)
    assert [e.columns["label"] for e in prepared.examples] == [1.0, 0.0, 1.0, 0.0]
