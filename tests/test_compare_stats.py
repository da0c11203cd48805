"""Result rows, seeds, paired tests, budgets and the harness's plan, on synthetic data with answers
computed by hand (prefkit/compare/results.py, budget.py, harness.plan_arm)."""

import math
from pathlib import Path

import numpy as np
import pytest

from prefkit.api.errors import RecipeError
from prefkit.compare.budget import (
    examples_consumed,
    offline_total_steps,
    online_total_steps,
    run_budget,
    tokens_processed,
    unequal_budgets,
)
from prefkit.compare.harness import DataCounts, evaluation_steps, plan_arm
from prefkit.compare.recipe import load_compare
from prefkit.compare.results import (
    AGGREGATE_COLUMNS,
    RESULT_COLUMNS,
    Bootstrap,
    Measured,
    _pick_steps,
    kl_matched,
    aggregate_rows,
    paired_rows,
    seed_rows,
)
from prefkit.data.batching import BatchOrder
from prefkit.plugins import load_registry

REGISTRY = load_registry()
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "compare_tiny.yaml"
BOOT = Bootstrap(resamples=1000, seed=0, confidence=0.95)


def records(gold: list[float], kl: float = 0.0, *, temperature: float = 1.0, per_prompt: int = 1,
            win: float = 0.5) -> list[dict]:
    """Records of len(gold) / per_prompt prompts, ``per_prompt`` samples each, in prompt order."""
    return [{"temperature": temperature, "prompt_index": i // per_prompt, "sample_index": i % per_prompt, "gold": g,
             "kl": kl, "kl_mc": kl, "kl_method": "token_kl", "win": win, "num_tokens": 5}
            for i, g in enumerate(gold)]


def measured(arm, seed, step, gold, kl=0.0, final=True, **kwargs) -> Measured:
    return Measured(arm, "dpo", "offline", seed, seed, step, final, records(gold, kl, **kwargs), train_steps=8)


# ----------------------------------------------------------------------------- rows


def test_a_seed_row_by_hand():
    # prompts 0..3 with two samples each: per-prompt means 0.1, 0.2, 0.3, 0.4; overall mean 0.25
    m = measured("a", 0, 8, [0.0, 0.2, 0.2, 0.2, 0.3, 0.3, 0.5, 0.3], kl=1.5, per_prompt=2)
    [row] = seed_rows(m, temperatures=[1.0], n_prompts=4, win_against="reference", boot=BOOT)
    assert list(row) == RESULT_COLUMNS
    assert row["gold_reward"] == pytest.approx(0.25) and row["n_prompts"] == 4 and row["n_samples"] == 8
    assert row["gold_reward_lo"] <= 0.25 <= row["gold_reward_hi"] and row["gold_reward_lo"] >= 0.1
    assert row["kl"] == row["kl_lo"] == row["kl_hi"] == 1.5  # a constant: zero width
    assert row["win_rate"] == 0.5 and row["step"] == 8 and row["seed"] == 0
    assert row["gold_reward_std"] == pytest.approx(np.std([0.0, 0.2, 0.2, 0.2, 0.3, 0.3, 0.5, 0.3], ddof=1))
    assert row["std_ge_mean"] is False


def test_std_at_least_the_mean_is_flagged():
    [row] = seed_rows(measured("a", 0, 8, [0.0, 0.0, 0.0, 0.4]), temperatures=[1.0], n_prompts=4,
                      win_against="reference", boot=BOOT)
    assert row["gold_reward"] == pytest.approx(0.1) and row["gold_reward_std"] == pytest.approx(0.2)
    assert row["std_ge_mean"] is True


def test_the_mean_over_seeds_by_hand():
    group = [measured("a", 0, 8, [0.1, 0.3]), measured("a", 1, 8, [0.3, 0.5]),  # seed means 0.2 and 0.4
             measured("a", 0, 4, [0.0, 0.0], final=False), measured("a", 1, 4, [0.0, 0.2], final=False)]
    rows = aggregate_rows(group, temperatures=[1.0], n_prompts=2, win_against="reference", boot=BOOT)
    assert [r["step"] for r in rows] == [4, 8] and all(list(r) == AGGREGATE_COLUMNS for r in rows)
    last = rows[1]
    assert last["gold_reward"] == pytest.approx(0.3) and last["n_seeds"] == 2 and last["seeds"] == [0, 1]
    assert last["gold_reward_seed_std"] == pytest.approx(math.sqrt(0.02))  # std of 0.2 and 0.4
    assert last["gold_reward_lo"] <= 0.3 <= last["gold_reward_hi"] and last["final"] and not rows[0]["final"]
    assert last["n_samples"] == 4


def test_matched_kl_picks_the_highest_kl_at_which_both_arms_have_a_point():
    aggregate = [
        {"arm": "a", "step": 4, "temperature": 1.0, "kl": 0.5, "final": False},
        {"arm": "a", "step": 8, "temperature": 1.0, "kl": 1.0, "final": True},
        {"arm": "b", "step": 4, "temperature": 1.0, "kl": 0.3, "final": False},
        {"arm": "b", "step": 8, "temperature": 1.0, "kl": 0.6, "final": True},
        {"arm": "reference", "step": 0, "temperature": 1.0, "kl": 0.0, "final": True},
    ]
    # matched (within 0.25 nat, or 20% of the larger): a4-b8 (0.5, 0.6) and a4-b4 (0.5, 0.3); not
    # a8-b8 (1.0, 0.6): a4-b8 is the higher
    assert _pick_steps(aggregate, "a", "b", 1.0, "matched_kl", "reference") == (4, 8)
    assert _pick_steps(aggregate, "a", "b", 1.0, "final", "reference") == (8, 8)
    assert _pick_steps(aggregate, "a", "reference", 1.0, "matched_kl", "reference") == (8, 0)
    assert _pick_steps(aggregate, "a", "nope", 1.0, "final", "reference") is None


def test_matched_kl_pairs_points_that_are_close_not_the_nearest_to_a_common_bound():
    """The sentiment compare's case: a's points jump past b's largest KL. The old rule took each arm's
    point nearest min(largest KLs) = 3.6, i.e. a at 2.2 against b at 3.6, more than a nat apart."""
    def curve(arm, kls):
        return [{"arm": arm, "step": 10 * (i + 1), "temperature": 1.0, "kl": kl, "final": i == len(kls) - 1}
                for i, kl in enumerate(kls)]
    aggregate = curve("a", [0.3, 2.2, 6.8, 11.3]) + curve("b", [0.9, 2.0, 2.9, 3.6])
    assert _pick_steps(aggregate, "a", "b", 1.0, "matched_kl", "reference") == (20, 20)  # 2.2 vs 2.0
    assert kl_matched(2.2, 2.0) and not kl_matched(2.2, 3.6) and kl_matched(10.0, 8.0) and kl_matched(0.1, 0.35)
    # no two points close: the nearest pair, and the row says the KLs are not matched
    far = curve("a", [0.3, 6.8]) + curve("b", [2.0, 3.6])
    assert _pick_steps(far, "a", "b", 1.0, "matched_kl", "reference") == (10, 10)  # 0.3 vs 2.0 (gap 1.7 < 3.2)
    assert not kl_matched(0.3, 2.0)


def _two_arms(shift: float, noise: float = 0.0):
    rng = np.random.default_rng(0)
    out = []
    for seed in (0, 1):
        base = rng.normal(size=40)
        out.append(Measured("a", "dpo", "offline", seed, seed, 8, True,
                            records(list(base + shift + noise * rng.normal(size=40)), 0.5)))
        out.append(Measured("b", "dpo", "offline", seed, seed, 8, True,
                            records(list(base + noise * rng.normal(size=40)), 0.5)))
    return out


def test_paired_rows_say_within_noise_for_identical_arms_and_find_a_planted_difference():
    common = {"temperatures": [1.0], "n_prompts": 40}
    same = _two_arms(0.0)
    [row] = paired_rows(same, [("a", "b")], at="final", boot=BOOT, **common)
    assert row["verdict"] == "within noise" and row["diff"] == 0.0 and row["p_value"] == 1.0
    assert row["n_seeds"] == 2 and row["a_step"] == row["b_step"] == 8

    planted = _two_arms(0.5, noise=0.5)
    [row] = paired_rows(planted, [("a", "b")], at="matched_kl", boot=BOOT, **common)
    assert row["verdict"] == "a higher" and 0 < row["diff_lo"] < row["diff"] < row["diff_hi"]
    assert row["diff"] == pytest.approx(row["a_gold_reward"] - row["b_gold_reward"]) and row["p_value"] < 0.01
    [back] = paired_rows(planted, [("b", "a")], at="final", boot=BOOT, **common)
    assert back["verdict"] == "a higher" and back["diff"] == pytest.approx(-row["diff"])


def test_an_arm_under_fewer_seeds_is_matched_on_the_curves_of_its_seeds():
    """b ran under seed 0 only; a's seed 1 drifted far. Steps, KL and gold of the test are seed 0's."""
    gold = [0.1, 0.2, 0.3, 0.4]
    group = [measured("a", 0, 4, gold, kl=0.5, final=False), measured("a", 0, 8, gold, kl=1.0),
             measured("a", 1, 4, gold, kl=3.0, final=False), measured("a", 1, 8, [0.9] * 4, kl=5.0),
             measured("b", 0, 4, gold, kl=0.4, final=False), measured("b", 0, 8, gold, kl=0.8)]
    [row] = paired_rows(group, [("a", "b")], at="matched_kl", boot=BOOT, temperatures=[1.0], n_prompts=4)
    # over seed 0 the largest KL both reach is 0.8: a's nearest step is 8 (KL 1.0), not 4; over both
    # of a's seeds (KL 1.75 and 3.0) it would have been step 4
    assert (row["a_step"], row["b_step"]) == (8, 8) and row["n_seeds"] == 1 and row["kl_matched"] is True
    assert row["a_kl"] == pytest.approx(1.0) and row["a_gold_reward"] == pytest.approx(0.25)
    assert row["diff"] == 0.0 and row["verdict"] == "within noise"


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("rows,batch,micro", [(48, 4, 8), (48, 5, 12), (10, 4, 3), (10, 4, 5), (7, 7, 3), (96, 4, 8)])
def test_examples_consumed_is_what_the_batch_order_hands_out(rows, batch, micro):
    order = BatchOrder(rows, batch, seed=0)
    assert examples_consumed(rows, batch, micro) == sum(len(order.indices(k)) for k in range(micro))


def test_examples_consumed_by_hand():
    assert examples_consumed(48, 4, 8) == 32  # 8 steps x 4 pairs
    assert examples_consumed(48, 5, 12) == 48 + 10  # an epoch is 10 batches (the last of 3), then 2 more
    assert examples_consumed(10, 4, 5) == 10 + 8


def test_total_steps_by_hand():
    assert offline_total_steps(None, 0.5, 48, 4, 1) == 6
    assert offline_total_steps(None, 1.0, 10, 4, 2) == 2  # 3 micro-batches, 2 per step
    assert offline_total_steps(8, 3.0, 48, 4, 1) == 8
    assert online_total_steps(None, 1.0, 48, 8) == 6 and online_total_steps(5, 1.0, 48, 8) == 5
    assert evaluation_steps(10, 4) == [4, 8, 10] and evaluation_steps(8, 4) == [4, 8] and evaluation_steps(8, None) == [8]


@pytest.fixture(scope="module")
def tiny():
    return load_compare(TINY, registry=REGISTRY)


def _arm(loaded, name):
    return next(a for a in loaded.arms if a.name == name)


def test_an_offline_budget_by_hand(tiny):
    arm = _arm(tiny, "dpo-b0.1")
    summary = {"steps": 8, "data": {"train": {"rows_kept": 48}}, "train_seconds": 2.0, "wall_seconds": 3.0}
    row = run_budget(arm="dpo-b0.1", seed=0, objective=arm.loaded.objective, params=arm.loaded.params,
                     recipe=arm.loaded.recipe, summary=summary, state={"tokens_seen": 5000}, params_count=1000)
    assert row["labels"] == 32 and row["label_unit"] == "pairs" and row["epochs"] == pytest.approx(32 / 48)
    assert row["optimizer_steps"] == 8 and row["samples_generated"] == 0
    assert row["tokens"] == 5000 and row["tokens_source"] == "checkpoint"
    # training 6 P T, plus DPO's reference pass over all 48 rows: 2 P T x 48 / 32
    assert row["flops"] == pytest.approx(6 * 1000 * 5000 + 2 * 1000 * 5000 * 48 / 32)
    unlikelihood = _arm(tiny, "unlikelihood-a0.5")  # no reference
    row = run_budget(arm="ul", seed=0, objective=unlikelihood.loaded.objective, params=unlikelihood.loaded.params,
                     recipe=unlikelihood.loaded.recipe, summary=summary, state={"tokens_seen": 5000}, params_count=1000)
    assert row["flops"] == 6 * 1000 * 5000
    kto = _arm(tiny, "kto")
    row = run_budget(arm="kto", seed=0, objective=kto.loaded.objective, params=kto.loaded.params,
                     recipe=kto.loaded.recipe, summary={**summary, "data": {"train": {"rows_kept": 96}}},
                     state=None, params_count=1000)
    assert row["labels"] == 32 and row["label_unit"] == "unpaired labels" and row["epochs"] == pytest.approx(1 / 3)
    assert row["tokens"] is None and row["flops"] is None


def test_an_online_budget_by_hand(tiny):
    arm = _arm(tiny, "ppo-kl2")  # 2 prompts x 2 samples per rollout, 2 update epochs, one minibatch
    summary = {"steps": 8, "data": {"train": {"rows_kept": 48}}, "tokens_per_s": 100.0, "train_seconds": 2.5}
    row = run_budget(arm="ppo-kl2", seed=1, objective=arm.loaded.objective, params=arm.loaded.params,
                     recipe=arm.loaded.recipe, summary=summary, state=None, params_count=1000)
    assert row["labels"] == row["samples_generated"] == 8 * 2 * 2
    assert row["label_unit"] == "reward calls (keywords)" and row["optimizer_steps"] == 8 * 2 * 1
    assert row["tokens"] == 250 and row["tokens_source"] == "estimate"  # 100 tokens/s x 2.5 s
    assert row["flops"] == (2 + 2 + 2 + 6 * 2) * 1000 * 250  # sampling, log-probs, reference, 2 updates


def test_tokens_come_from_run_json_first():
    assert tokens_processed({"tokens_seen": 7, "tokens_per_s": 1, "train_seconds": 1}, {"tokens_seen": 9}) == \
        (7, "run.json")
    assert tokens_processed({}, None) == (None, "unknown")


def test_unequal_budgets_are_named():
    rows = [{"arm": "dpo", "kind": "offline", "labels": 32, "label_unit": "pairs"},
            {"arm": "ppo", "kind": "online", "labels": 64, "label_unit": "reward calls"},
            {"arm": "bon", "kind": "inference", "labels": 999, "label_unit": "reward calls at evaluation"}]
    [note] = unequal_budgets(rows)
    assert "dpo 32 pairs" in note and "ppo 64 reward calls" in note and "bon" not in note
    rows[1]["labels"] = 32
    assert unequal_budgets(rows) == []
    # as close as whole steps allow: 479 pairs against 30 rollouts of 16 reward calls
    rows[0].update(labels=479, train_steps=60)
    rows[1].update(labels=480, train_steps=30)
    assert unequal_budgets(rows) == []
    rows[1].update(labels=496, train_steps=31)  # a rollout more: 17 apart, more than one step's 16
    assert "dpo 479 pairs" in unequal_budgets(rows)[0]
    # most arms on one budget: the odd ones out are named against it
    rows[1].update(labels=480, train_steps=30)
    rows += [{"arm": "dpo-3ep", "kind": "offline", "labels": 1437, "label_unit": "pairs", "train_steps": 180},
             {"arm": "kto", "kind": "offline", "labels": 958, "label_unit": "unpaired labels", "train_steps": 120},
             {"arm": "ipo", "kind": "offline", "labels": 479, "label_unit": "pairs", "train_steps": 60}]
    [note] = unequal_budgets(rows)
    assert note == ("Unequal label budgets: dpo-3ep 1,437 pairs, kto 958 unpaired labels, against 479–480 for the "
                    "other 3 trained arms (dpo, ipo, ppo).")
    rows[4]["labels"] = None  # a budget that could not be read is never taken as equal
    assert "kto ? unpaired labels" in unequal_budgets(rows)[0]


# ----------------------------------------------------------------------------- the budget in a recipe


def test_a_label_budget_sets_every_trained_arm_at_load_time(tiny):
    steps = {a.name: a.loaded.recipe.train.max_steps for a in tiny.arms if a.kind != "inference"}
    # 32 labels: offline 32 / 4 pairs per step; online 32 / (2 prompts x 2 samples) rollouts
    assert steps == {"dpo-b0.1": 8, "dpo-b0.5": 8, "ppo-kl2": 8, "grpo": 8, "rloo": 8, "kto": 8,
                     "unlikelihood-a0.5": 8, "preferred-ft": 8}
    own = load_compare(TINY, ["arms.dpo-b0.5.train.max_steps=3", "budget.labels=48"], registry=REGISTRY)
    assert _arm(own, "dpo-b0.5").loaded.recipe.train.max_steps == 3  # an arm's own budget wins
    assert _arm(own, "dpo-b0.1").loaded.recipe.train.max_steps == 12


def test_the_budget_in_one_place(tmp_path):
    with pytest.raises(RecipeError, match="budget: train.max_steps is set too"):
        load_compare(TINY, ["train.max_steps=8"], registry=REGISTRY)
    with pytest.raises(RecipeError, match="exactly one of budget.epochs and budget.labels"):
        load_compare(TINY, ["budget={epochs: 1, labels: 3}"], registry=REGISTRY)


def test_the_plan_of_an_epoch_budget_with_curves(tmp_path):
    from prefkit.models.tiny import build_tiny_tokenizer

    loaded = load_compare(TINY, ["budget={epochs: 0.5}", "evaluation.every_steps=2", "seeds=[3]",
                                 f"output_dir={tmp_path}"], registry=REGISTRY)
    counts = DataCounts(loaded, build_tiny_tokenizer(), REGISTRY)
    plans = {arm.name: plan_arm(loaded, arm, 3, counts) for arm in loaded.arms}
    dpo = plans["dpo-b0.1"]
    # half an epoch of 48 pairs in batches of 4: ceil(0.5 x 12) = 6 steps, evaluated at 2, 4, 6
    assert dpo.total_steps == 6 and dpo.eval_steps == [2, 4, 6]
    train = dpo.loaded.recipe.train
    assert train.epochs == 0.5 and train.max_steps is None and train.save_every == 2
    assert train.keep_checkpoints == 4 and dpo.keep == 2 and dpo.prune  # all kept until evaluated, then 2
    assert dpo.loaded.recipe.seed == 3 and dpo.run_dir == tmp_path / "arms" / "dpo-b0.1" / "seed-3"
    assert plans["kto"].total_steps == 12  # half of its own 96 unpaired rows
    # online: reward calls = the pairs of half an epoch (24), 4 per rollout: 6 rollouts
    assert plans["ppo-kl2"].total_steps == 6 and plans["ppo-kl2"].loaded.recipe.train.max_steps == 6
    assert plans["bon-4"].total_steps == 0 and plans["bon-4"].eval_steps == [0]


def test_points_give_every_arm_a_curve_of_the_same_resolution(tmp_path):
    from prefkit.models.tiny import build_tiny_tokenizer

    loaded = load_compare(TINY, ["budget={epochs: 1}", "evaluation.every_steps=null", "evaluation.points=3",
                                 "train.save_every=null", f"output_dir={tmp_path}"], registry=REGISTRY)
    counts = DataCounts(loaded, build_tiny_tokenizer(), REGISTRY)
    plans = {arm.name: plan_arm(loaded, arm, 0, counts) for arm in loaded.arms}
    # DPO: 48 pairs in batches of 4, 12 steps: every ceil(12 / 3) = 4th step
    assert plans["dpo-b0.1"].total_steps == 12 and plans["dpo-b0.1"].eval_steps == [4, 8, 12]
    assert plans["dpo-b0.1"].loaded.recipe.train.save_every == 4
    # KTO: its own 96 unpaired rows, 24 steps: every 8th
    assert plans["kto"].total_steps == 24 and plans["kto"].eval_steps == [8, 16, 24]
    # PPO: 48 reward calls, 4 per rollout, 12 rollouts: every 4th
    assert plans["ppo-kl2"].eval_steps == [4, 8, 12]
    with pytest.raises(RecipeError, match="at most one of evaluation.every_steps and evaluation.points"):
        load_compare(TINY, ["evaluation.every_steps=2", "evaluation.points=3"], registry=REGISTRY)


def test_an_arm_can_be_evaluated_at_more_points_than_the_others(tmp_path):
    from prefkit.models.tiny import build_tiny_tokenizer

    loaded = load_compare(TINY, ["budget={epochs: 1}", "evaluation.every_steps=null", "evaluation.points=3",
                                 "arms.dpo-b0.1.evaluation_points=6", "train.save_every=null",
                                 f"output_dir={tmp_path}"], registry=REGISTRY)
    counts = DataCounts(loaded, build_tiny_tokenizer(), REGISTRY)
    plans = {arm.name: plan_arm(loaded, arm, 0, counts) for arm in loaded.arms}
    # its 12 steps at every ceil(12 / 6) = 2nd step, checkpointed there; the other arms keep 3 points
    assert plans["dpo-b0.1"].eval_steps == [2, 4, 6, 8, 10, 12]
    assert plans["dpo-b0.1"].loaded.recipe.train.save_every == 2
    assert plans["dpo-b0.5"].eval_steps == [4, 8, 12] and plans["kto"].eval_steps == [8, 16, 24]
    # without a global spacing, only that arm gets a curve
    loaded = load_compare(TINY, ["budget={epochs: 1}", "evaluation.every_steps=null", "train.save_every=null",
                                 "arms.kto.evaluation_points=4", f"output_dir={tmp_path}"], registry=REGISTRY)
    plans = {arm.name: plan_arm(loaded, arm, 0, counts) for arm in loaded.arms}
    assert plans["kto"].eval_steps == [6, 12, 18, 24] and plans["dpo-b0.1"].eval_steps == [12]
    from prefkit.compare.report import evaluated_at

    assert evaluated_at(loaded) == ("the last training step only; by their own `evaluation_points`: kto at about 4 "
                                    "evenly spaced points")
    with pytest.raises(RecipeError, match="evaluation_points"):
        load_compare(TINY, ["arms.kto.evaluation_points=0"], registry=REGISTRY)


def test_without_curves_only_the_last_step_is_checkpointed(tmp_path):
    from prefkit.models.tiny import build_tiny_tokenizer

    loaded = load_compare(TINY, ["evaluation.every_steps=null", "train.save_every=3", f"output_dir={tmp_path}"],
                          registry=REGISTRY)
    counts = DataCounts(loaded, build_tiny_tokenizer(), REGISTRY)
    plan = plan_arm(loaded, _arm(loaded, "dpo-b0.1"), 0, counts)
    assert plan.eval_steps == [8] and plan.loaded.recipe.train.save_every == 3 and not plan.prune
    loaded = load_compare(TINY, ["evaluation.every_steps=4", "train.save_every=6", f"output_dir={tmp_path}"],
                          registry=REGISTRY)
    plan = plan_arm(loaded, _arm(loaded, "dpo-b0.1"), 0, counts)
    assert plan.loaded.recipe.train.save_every == 2  # gcd(6, 4): both the arm's and evaluation's steps


def test_a_spacing_past_the_last_step_and_budgets_past_the_limits_are_named_by_the_key_written(tmp_path):
    """every_steps beyond an arm's steps evaluates its last step (it used to ask for a save_every over
    the limit, named as train.save_every); a budget or spacing that gives a train value past its limit
    is named by the budget or evaluation key, not by the train key the user never wrote."""
    from prefkit.compare.recipe import preflight_compare
    from prefkit.models.tiny import build_tiny_tokenizer

    loaded = load_compare(TINY, ["evaluation.every_steps=1000000000000", "train.save_every=null",
                                 f"output_dir={tmp_path}"], registry=REGISTRY)
    counts = DataCounts(loaded, build_tiny_tokenizer(), REGISTRY)
    plan = plan_arm(loaded, _arm(loaded, "dpo-b0.1"), 0, counts)
    assert plan.eval_steps == [8] and plan.loaded.recipe.train.save_every == 8 and not plan.prune

    with pytest.raises(RecipeError) as info:
        load_compare(TINY, ["budget={labels: 1000000000000000}", f"output_dir={tmp_path}"], registry=REGISTRY)
    text = str(info.value)
    assert "'preferred-ft' train.max_steps = 250000000000000: Input should be less than or equal to 10000000" in text
    assert "\n  train.max_steps" not in text
    assert "budget.labels: gives arms 'dpo-b0.1', 'dpo-b0.5'," in text  # one line for the arms it is the same for
    with pytest.raises(RecipeError) as info:
        preflight_compare(load_compare(TINY, ["budget={epochs: 1000000}", f"output_dir={tmp_path}"],
                                       registry=REGISTRY), REGISTRY)
    assert "budget.epochs: arms 'dpo-b0.1', 'dpo-b0.5', 'unlikelihood-a0.5', 'preferred-ft': 1e+06 epochs over 48 rows " \
           "is 12,000,000 steps" in str(info.value)

    # 10,000 steps evaluated at every one would keep 10,001 checkpoints (at most 10,000)
    loaded = load_compare(TINY, ["evaluation.every_steps=1", "train.save_every=null", "budget={labels: 40000}",
                                 f"output_dir={tmp_path}"], registry=REGISTRY)
    with pytest.raises(RecipeError) as info:
        plan_arm(loaded, _arm(loaded, "dpo-b0.1"), 0, counts)
    text = str(info.value)
    assert "evaluation.every_steps: the evaluation steps of arm 'dpo-b0.1' need train.keep_checkpoints = 10001" in text
    assert "evaluate fewer steps" in text


def test_a_step_one_seed_lacks_is_tested_on_the_seeds_measured_there():
    gold = [0.1, 0.2, 0.3, 0.4]
    group = [measured("a", 0, 4, gold, kl=0.5, final=False), measured("a", 0, 8, gold, kl=2.0),
             measured("a", 1, 8, gold, kl=2.0),  # seed 1 was not evaluated at step 4
             measured("b", 0, 8, gold, kl=0.6), measured("b", 1, 8, gold, kl=0.6)]
    [row] = paired_rows(group, [("a", "b")], at="matched_kl", boot=BOOT, temperatures=[1.0], n_prompts=4)
    assert (row["a_step"], row["b_step"]) == (4, 8) and row["n_seeds"] == 1 and row["diff"] == 0.0


def test_the_report_marks_pairs_whose_kls_are_not_matched():
    from prefkit.compare.report import paired_sentences, paired_table

    base = {"temperature": 1.0, "at": "matched_kl", "a_gold_reward": 0.7, "b_gold_reward": 0.6, "diff": 0.1,
            "diff_lo": 0.05, "diff_hi": 0.15, "p_value": 0.002, "verdict": "a higher", "n_seeds": 2, "n_prompts": 20}
    rows = [{**base, "a": "a", "b": "b", "a_step": 20, "b_step": 20, "a_kl": 2.2, "b_kl": 2.0, "kl_matched": True},
            {**base, "a": "a", "b": "c", "a_step": 10, "b_step": 10, "a_kl": 0.3, "b_kl": 2.0, "kl_matched": False}]
    table = paired_table(rows, 1000).splitlines()
    assert "KL not matched" not in table[2] and "step 10 (KL 0.3) vs step 10 (KL 2): **KL not matched**" in table[3]
    text = "\n".join(paired_sentences(rows, 0.95))
    assert "1 of 2 pairs have no evaluated points at matched KL (a − c)" in text
