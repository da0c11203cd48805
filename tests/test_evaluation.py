"""The harness's estimators against cases computed by hand (prefkit/compare/evaluation.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prefkit_builtins.best_of_n import best_of_n_kl
from prefkit.compare.evaluation import (
    bootstrap_indices,
    bootstrap_interval,
    bootstrap_means,
    mean,
    paired_difference,
    pair_outcomes,
    sample_kl,
    scalar_judge,
    sequence_kl,
    std,
    token_kl,
    win_rate,
)

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly




# ----------------------------------------------------------------------------- KL


def test_sequence_kl_by_hand():
    # (-1 - -1.5) + (-2 - -2.5) = 0.5 + 0.5 = 1.0
    kl = sequence_kl(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.5]]), torch.tensor([[True, True]]))
    assert kl.tolist() == [1.0]


def test_sequence_kl_of_identical_policies_is_zero():
    logps = torch.tensor([[-0.3, -1.7, -2.2], [-0.9, -0.1, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert sequence_kl(logps, logps.clone(), mask).tolist() == [0.0, 0.0]


def test_sequence_kl_reads_only_masked_tokens_and_may_be_negative():
    policy = torch.tensor([[-2.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.0, -0.5, -0.1]])
    # only the first two tokens count: (-2 + 1) + (-1 + 0.5) = -1.5
    assert sequence_kl(policy, ref, torch.tensor([[True, True, False]])).tolist() == [-1.5]


def test_sequence_kl_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        sequence_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_token_kl_by_hand():
    """KL([0.5, 0.3, 0.2] || [0.2, 0.3, 0.5]) = 0.5 ln 2.5 + 0.3 ln 1 + 0.2 ln 0.4
                                            = 0.5 * 0.9162907 - 0.2 * 0.9162907 = 0.2748872,
    and the reverse, 0.2 ln 0.4 + 0.5 ln 2.5, is the same number (the pair is a mirror image);
    KL([0.9, 0.1] || [0.5, 0.5]) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.5290080 - 0.1609438 = 0.3680642."""
    p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.2, 0.3, 0.5]]).log()
    assert token_kl(p, q).tolist() == pytest.approx([0.2748872], abs=1e-6)
    assert token_kl(q, p).tolist() == pytest.approx([0.2748872], abs=1e-6)
    two = token_kl(torch.tensor([[0.9, 0.1], [0.5, 0.5]]).log(), torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log())
    assert two.tolist() == pytest.approx([0.3680642, 0.0], abs=1e-6)


def test_token_kl_of_identical_rows_is_exactly_zero_and_never_negative():
    logps = torch.log_softmax(torch.randn(4, 7, 11, generator=torch.Generator().manual_seed(0)), -1)
    assert token_kl(logps, logps.clone()).abs().sum().item() == 0.0
    other = torch.log_softmax(torch.randn(4, 7, 11, generator=torch.Generator().manual_seed(1)), -1)
    assert (token_kl(logps, other) >= 0).all()
    with pytest.raises(ValueError, match="shapes differ"):
        token_kl(logps, other[:, :3])


def test_the_sample_mean_estimates_the_kl_of_two_distributions():
    """One-token 'sequences' drawn from p: the mean log-ratio approaches KL(p||q) computed exactly."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.2749...
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4))
    draws = torch.from_numpy(np.random.default_rng(0).choice(3, size=200_000, p=p.numpy()))
    per_sample = sequence_kl(p.log()[draws][:, None], q.log()[draws][:, None], torch.ones(len(draws), 1, dtype=torch.bool))
    assert float(per_sample.mean()) == pytest.approx(exact, abs=0.01)


def test_best_of_n_kl_is_the_analytic_bound():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 3 / 4)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    assert best_of_n_kl(16) > best_of_n_kl(4) > best_of_n_kl(2) > 0
    with pytest.raises(ValueError):
        best_of_n_kl(0)


# ----------------------------------------------------------------------------- win rate


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_identical_inputs_give_exactly_one_half(seed):
    scores = [0.1, 0.9, 0.5, 0.5, 0.3, 2.0, -1.0]
    assert win_rate(scores, list(scores), seed=seed) == 0.5


def test_win_rate_by_hand():
    assert win_rate([3, 1], [2, 2], seed=0) == 0.5  # one win, one loss
    assert win_rate([3, 3, 3], [1, 2, 0], seed=0) == 1.0
    assert win_rate([0, 0], [1, 1], seed=0) == 0.0
    assert win_rate([1, 2, 3, 4], [1, 0, 5, 4], seed=3) == (0.5 + 1 + 0 + 0.5) / 4


def test_the_order_does_not_matter_for_a_scalar_judge_but_is_randomised():
    a, b = [1.0, 2.0, 0.0, 5.0] * 10, [0.0, 2.0, 1.0, 1.0] * 10
    assert pair_outcomes(a, b, seed=0) == pair_outcomes(a, b, seed=99) == [scalar_judge(x, y) for x, y in zip(a, b)]


def test_a_position_biased_judge_has_its_bias_averaged_out():
    def first_always_wins(first, second):
        return 1.0

    outcomes = pair_outcomes([0.0] * 2000, [0.0] * 2000, seed=0, judge=first_always_wins)
    assert set(outcomes) == {0.0, 1.0}  # shown first: win; shown second: loss
    assert abs(sum(outcomes) / len(outcomes) - 0.5) < 0.05
    # the same seed shows every pair in the same order
    assert outcomes == pair_outcomes([1.0] * 2000, [2.0] * 2000, seed=0, judge=first_always_wins)


def test_win_rate_refuses_unequal_or_empty_inputs():
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0], seed=0)
    with pytest.raises(ValueError):
        win_rate([], [], seed=0)


def test_mean_and_std_helpers():
    assert mean([1.0, 2.0, 3.0]) == 2.0
    assert math.isnan(mean([]))
    assert std([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # sample std (n - 1)
    assert std([5.0]) == 0.0


# ----------------------------------------------------------------------------- bootstrap intervals


def test_the_interval_of_a_constant_is_zero_wide_at_the_constant():
    assert bootstrap_interval([0.3] * 17) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    estimate, lo, hi = bootstrap_interval(np.full((3, 9), -2.0))  # three seeds, nine prompts
    assert estimate == lo == hi == -2.0


def test_two_prompts_by_hand():
    """Values [0, 1]: a resample of two prompts has mean 0 (1/4), 1/2 (1/2) or 1 (1/4), so with
    1000 resamples the 2.5% and 97.5% quantiles are 0 and 1, and the estimate is 1/2."""
    assert bootstrap_interval([0.0, 1.0], resamples=1000, seed=0) == (0.5, 0.0, 1.0)


def test_the_vectorised_replicates_equal_a_plain_loop():
    values = np.random.default_rng(3).normal(size=(3, 7))
    got = bootstrap_means(values, resamples=200, seed=5)
    prompt_idx = bootstrap_indices(7, 200, 5)
    seed_idx = bootstrap_indices(3, 200, 6)
    for b in range(200):
        expected = np.mean([values[s][prompt_idx[b]].mean() for s in seed_idx[b]])
        assert got[b] == pytest.approx(expected)
    one = bootstrap_means(values[0], resamples=200, seed=5)  # one seed: prompts only
    assert one == pytest.approx(values[0][prompt_idx].mean(1))


def test_the_draws_are_fixed_by_the_seed():
    values = np.random.default_rng(0).normal(size=30)
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)
    with pytest.raises(ValueError):
        bootstrap_interval(values, confidence=1.0)


def test_95_percent_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(300):
        sample = rng.normal(loc=1.0, scale=2.0, size=40)
        _, lo, hi = bootstrap_interval(sample, resamples=1000, seed=int(rng.integers(1 << 30)))
        covered += lo <= 1.0 <= hi
    # the percentile bootstrap under-covers slightly at n = 40 (about 93%); a broken interval is far off
    assert 0.89 <= covered / 300 <= 0.98


def test_intervals_shrink_like_one_over_the_square_root_of_the_prompts():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (100, 400, 1600):
        sample = rng.normal(size=n)
        _, lo, hi = bootstrap_interval(sample, resamples=2000, seed=0)
        widths[n] = hi - lo
        assert widths[n] == pytest.approx(2 * 1.96 * sample.std() / math.sqrt(n), rel=0.1)  # the normal interval
    assert 0.4 < widths[400] / widths[100] < 0.6 and 0.4 < widths[1600] / widths[400] < 0.6


def test_seed_to_seed_variation_widens_the_interval():
    """Three seeds whose means differ by 1 and prompts that vary by 0.1: resampling the seeds gives
    an interval as wide as the seeds' spread; the prompts alone would give a tenth of it."""
    rng = np.random.default_rng(2)
    values = np.array([[-1.0], [0.0], [1.0]]) + 0.1 * rng.normal(size=(3, 50))
    _, lo, hi = bootstrap_interval(values)
    _, plo, phi = bootstrap_interval(values.mean(0))  # the mean over seeds, prompts resampled only
    assert hi - lo > 1.0 and (phi - plo) < 0.1 * (hi - lo)


def test_the_paired_test_of_two_identical_policies_is_within_noise():
    a = np.random.default_rng(4).normal(size=(2, 30))
    result = paired_difference(a, a.copy())
    assert result == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0, "within_noise": True}


def test_the_paired_test_detects_a_planted_difference():
    rng = np.random.default_rng(5)
    base = rng.normal(size=200)
    a, b = base + 0.5 + rng.normal(size=200), base + rng.normal(size=200)  # s.e. of the difference: 0.1
    result = paired_difference(a, b, resamples=2000)
    assert result["diff"] == pytest.approx(float((a - b).mean()))
    assert 0 < result["lo"] < result["diff"] < result["hi"] and not result["within_noise"]
    assert result["p_value"] < 0.01
    flipped = paired_difference(b, a, resamples=2000)
    assert flipped["diff"] == pytest.approx(-result["diff"]) and flipped["hi"] < 0


def test_pairing_removes_the_prompts_own_variation():
    """b is a plus 0.05 on every prompt, while the prompts themselves vary by 5: unpaired intervals
    overlap almost entirely, the paired difference is exactly 0.05, outside noise, and p is the
    smallest the resamples can give, 2 / (B + 1)."""
    a = 5 * np.random.default_rng(6).normal(size=60)
    b = a + 0.05
    _, alo, ahi = bootstrap_interval(a)
    _, blo, bhi = bootstrap_interval(b)
    assert alo < blo < ahi  # overlapping
    result = paired_difference(b, a, resamples=999)
    assert result["diff"] == pytest.approx(0.05) and result["lo"] == pytest.approx(0.05)
    assert not result["within_noise"] and result["p_value"] == pytest.approx(2 / 1000)


def test_a_difference_of_pure_noise_is_within_noise():
    rng = np.random.default_rng(7)
    result = paired_difference(rng.normal(size=(2, 80)), rng.normal(size=(2, 80)))
    assert result["within_noise"] and result["p_value"] > 0.05
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from prefkit.models.loading import load_model
    from prefkit.recipe import ModelConfig

    handle = load_model(ModelConfig(source="tiny-llama", options={"seed": 0}), None,
                        Path(tmp_path_factory.mktemp("cache")), registry=REGISTRY)
    return handle.model.eval(), handle.tokenizer


def _manual_logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, -1)
    return [float(logps[len(prompt) + i - 1, token]) for i, token in enumerate(completion)]


def test_sample_kl_of_a_policy_with_itself_is_zero_and_otherwise_token_kl_and_the_log_ratio(tiny):
    model, _ = tiny
    prompts, completions = [[5, 6], [7, 8, 9]], [[30, 31, 32], [33, 34]]
    assert sample_kl(model, model, prompts, completions, pad_id=0, batch_size=4) == ([0.0, 0.0], [0.0, 0.0])
    other = type(model)(model.config)
    other.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()})
    other.eval()
    kls, kls_mc = sample_kl(other, model, prompts, completions, pad_id=0, batch_size=1)
    for kl, kl_mc, p, c in zip(kls, kls_mc, prompts, completions):
        expected_mc = sum(_manual_logps(other, p, c)) - sum(_manual_logps(model, p, c))
        assert kl_mc == pytest.approx(expected_mc, abs=1e-4)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(other(input_ids=ids).logits[0].float(), -1)[len(p) - 1 : len(p) + len(c) - 1]
            lq = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(p) - 1 : len(p) + len(c) - 1]
        expected = float((lp.exp() * (lp - lq)).sum())
        assert kl > 0 and kl == pytest.approx(expected, rel=1e-4, abs=1e-6)
    batched = sample_kl(other, model, prompts, completions, pad_id=0, batch_size=4)  # padding: rounding only
    assert batched[0] == pytest.approx(kls, abs=1e-5) and batched[1] == pytest.approx(kls_mc, abs=1e-4)