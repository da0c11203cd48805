"""Golden tests for the PPO-with-KL-penalty math, with the arithmetic written out by hand.

Notation: d = logp − ref_logp (per token), ratio = exp(logp − old_logp), ε the clip range,
A advantages, V values, R returns, γ the discount, λ the GAE parameter. Tensors are [B, T],
aligned with completion tokens, masks right-padded.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from prefkit.api.objective import Needs
from prefkit.loops.online import entropy_from_logits
from prefkit_builtins.ppo_kl import (
    PPOKL,
    AdaptiveKLController,
    FixedKLController,
    PPOParams,
    RunningMoments,
    gae,
    kl_penalty,
    masked_mean,
    policy_loss,
    shape_scores,
    token_rewards,
    value_loss,
    whiten,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=tol, rtol=0)


# ----------------------------------------------------------------------------- KL estimators

LOGPS, REFS = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])  # d = [0.5, −1.0, 0.0]


def test_kl_k1_abs_mse():
    close(kl_penalty(LOGPS, REFS, "k1"), [[0.5, -1.0, 0.0]])  # d itself
    close(kl_penalty(LOGPS, REFS, "abs"), [[0.5, 1.0, 0.0]])  # |d|
    close(kl_penalty(LOGPS, REFS, "mse"), [[0.125, 0.5, 0.0]])  # ½d²: ½·0.25, ½·1
    close(kl_penalty(LOGPS, REFS), kl_penalty(LOGPS, REFS, "k1"))  # k1 is the default


def test_kl_k3():
    # r = exp(ref − logp) = exp(−d); k3 = (r − 1) − log r
    # d = 0.5:  r = e^−0.5 = 0.6065306597 → 0.6065306597 − 1 + 0.5 = 0.1065306597
    # d = −1:   r = e^1    = 2.7182818285 → 2.7182818285 − 1 − 1   = 0.7182818285
    # d = 0:    r = 1 → 0
    close(kl_penalty(LOGPS, REFS, "k3"), [[0.1065306597, 0.7182818285, 0.0]])
    # never negative, and fp32 out of bf16 in
    assert (kl_penalty(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    assert kl_penalty(LOGPS.bfloat16(), REFS.bfloat16(), "k3").dtype == torch.float32


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(LOGPS, REFS, "k2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- token rewards


def test_token_rewards_kl_penalty_plus_score_at_last_token():
    scores = torch.tensor([1.0, -2.0])
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mask = m([1, 1, 0], [1, 1, 1])
    # kl_coef 0.5 → −0.5·kl per token; the score is added at the last valid token
    # row 0: −0.05, −0.1 + 1.0 = 0.9, pad 0 (its kl 0.3 is ignored)
    # row 1: −0.2, −0.25, −0.3 − 2.0 = −2.3
    close(token_rewards(scores, kl, mask, 0.5), [[-0.05, 0.9, 0.0], [-0.2, -0.25, -2.3]])


def test_token_rewards_empty_row_gets_nothing():
    out = token_rewards(torch.tensor([3.0, 1.0]), t([1.0, 1.0], [0.0, 0.0]), m([0, 0], [1, 0]), 0.1)
    close(out, [[0.0, 0.0], [1.0, 0.0]])


# ----------------------------------------------------------------------------- GAE


def test_gae_three_tokens_gamma_1_lambda_095():
    rewards, values = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    advantages, returns = gae(rewards, values, m([1, 1, 1]), gamma=1.0, lam=0.95)
    # δ_t = r_t + γ·V_{t+1} − V_t, with V after the last token = 0;  A_t = δ_t + γλ·A_{t+1}
    # t=2: δ2 = 1 + 0 − 0.7 = 0.3                A2 = 0.3
    # t=1: δ1 = 0 + 0.7 − 0.6 = 0.1              A1 = 0.1 + 0.95·0.3   = 0.385
    # t=0: δ0 = 0 + 0.6 − 0.5 = 0.1              A0 = 0.1 + 0.95·0.385 = 0.1 + 0.36575 = 0.46575
    close(advantages, [[0.46575, 0.385, 0.3]])
    # R = A + V: 0.46575 + 0.5, 0.385 + 0.6, 0.3 + 0.7
    close(returns, [[0.96575, 0.985, 1.0]])


def test_gae_discount_and_lambda():
    rewards, values = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    advantages, _ = gae(rewards, values, m([1, 1, 1]), gamma=0.9, lam=0.5)
    # γλ = 0.45
    # t=2: δ2 = 1 − 0.7 = 0.3                     A2 = 0.3
    # t=1: δ1 = 0.9·0.7 − 0.6 = 0.63 − 0.6 = 0.03 A1 = 0.03 + 0.45·0.3   = 0.165
    # t=0: δ0 = 0.9·0.6 − 0.5 = 0.54 − 0.5 = 0.04 A0 = 0.04 + 0.45·0.165 = 0.11425
    close(advantages, [[0.11425, 0.165, 0.3]])
    # γ = λ = 1 is Monte Carlo: A_t = (sum of rewards from t) − V_t = 1 − V_t
    advantages, returns = gae(rewards, values, m([1, 1, 1]), gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.3]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_gae_respects_right_padding():
    # row 1 is the 3-token row above; row 2 ends after 2 tokens: its third entries must be ignored
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, 99.0])
    values = t([0.5, 0.6, 0.7], [1.0, 0.5, 99.0])
    advantages, returns = gae(rewards, values, m([1, 1, 1], [1, 1, 0]), gamma=1.0, lam=0.95)
    # row 2, t=1 (last): δ = 2 + 0 − 0.5 = 1.5                A1 = 1.5
    #        t=0:        δ = 0 + 0.5 − 1.0 = −0.5             A0 = −0.5 + 0.95·1.5 = 0.925
    close(advantages, [[0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]])
    close(returns, [[0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]])
    assert not advantages.requires_grad


# ----------------------------------------------------------------------------- whitening


def test_whiten_masked():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), m([1, 1, 1, 0])
    # over 1, 2, 3: mean 2, population variance (1 + 0 + 1)/3 = 2/3, std 0.8164965809
    # (1 − 2)/0.8164965809 = −1.2247448714; the padded 100 is ignored and set to 0
    close(whiten(x, mask), [[-1.2247448714, 0.0, 1.2247448714, 0.0]])
    out = whiten(torch.randn(3, 5) * 7 + 3, torch.ones(3, 5, dtype=torch.bool))
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.var(unbiased=False)) - 1) < 1e-4


def test_masked_mean_of_nothing_is_zero():
    assert float(masked_mean(t([5.0]), m([0]))) == 0.0


# ----------------------------------------------------------------------------- policy loss


def test_policy_loss_clipped_surrogate():
    ln15, ln05 = math.log(1.5), math.log(0.5)
    old = t([0.0, 0.0, 0.0, 0.0, 0.0])
    logps = t([ln15, ln15, ln05, ln05, 9.0]).requires_grad_()
    adv = t([1.0, -1.0, 1.0, -1.0, 50.0])
    mask = m([1, 1, 1, 1, 0])  # the 5th token is padding
    loss, stats = policy_loss(logps, old, adv, mask, clip_range=0.2)
    # per token max(−A·ratio, −A·clip(ratio, 0.8, 1.2)):
    #   ratio 1.5 > 1.2, A = +1: max(−1.5, −1.2) = −1.2  (clipped)
    #   ratio 1.5 > 1.2, A = −1: max( 1.5,  1.2) =  1.5  (unclipped: no limit on getting worse)
    #   ratio 0.5 < 0.8, A = +1: max(−0.5, −0.8) = −0.5  (unclipped)
    #   ratio 0.5 < 0.8, A = −1: max( 0.5,  0.8) =  0.8  (clipped)
    # mean = (−1.2 + 1.5 − 0.5 + 0.8)/4 = 0.6/4 = 0.15
    close(loss, 0.15)
    # the clipped term was chosen for tokens 1 and 4: 2/4
    close(stats["clipfrac"], 0.5)
    # approxkl = ½·mean(Δ²): Δ² = ln(1.5)² = 0.1644019539, ln(0.5)² = 0.4804530139
    # ½·(2·0.1644019539 + 2·0.4804530139)/4 = ½·0.3224274839 = 0.1612137420
    close(stats["approxkl"], 0.1612137420)
    loss.backward()
    # gradient only through unclipped tokens: d(−A·ratio)/dlogp = −A·ratio, over 4 tokens
    #   token 2: −(−1)·1.5/4 = 0.375;  token 3: −(1)·0.5/4 = −0.125;  clipped and padded: 0
    close(logps.grad, [[0.0, 0.375, -0.125, 0.0, 0.0]])


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logps = t([-1.0, -2.0, -3.0])
    loss, stats = policy_loss(logps, logps.clone(), t([1.0, 2.0, -6.0]), m([1, 1, 1]), 0.2)
    # ratio 1 everywhere: −(1 + 2 − 6)/3 = 1.0; nothing clipped, no KL
    close(loss, 1.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)


# ----------------------------------------------------------------------------- value loss


def test_value_loss_clipped():
    values = t([0.5, 0.5, 0.1, 7.0]).requires_grad_()
    old = t([0.0, 0.0, 0.0, 0.0])
    returns = t([1.0, 0.0, 1.0, 0.0])
    mask = m([1, 1, 1, 0])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # v_clip = old + clip(v − old, −0.2, 0.2)
    #   v 0.5 → 0.2, R 1: (0.5 − 1)² = 0.25, (0.2 − 1)² = 0.64 → 0.64 (clipped is larger)
    #   v 0.5 → 0.2, R 0: 0.25 vs 0.04 → 0.25
    #   v 0.1 → 0.1, R 1: 0.81 vs 0.81 → 0.81 (equal: not counted as clipped)
    # loss = ½·(0.64 + 0.25 + 0.81)/3 = ½·1.7/3 = 0.2833333333
    close(loss, 0.2833333333)
    close(stats["clipfrac"], 1 / 3)
    loss.backward()
    # d/dv of ½·(v − R)²/3 where the unclipped term won: token 2: 0.5/3, token 3: (0.1 − 1)/3 = −0.3
    close(values.grad, [[0.0, 0.5 / 3, -0.3, 0.0]])


def test_value_loss_counts_no_clipping_inside_the_range():
    # v 0.03 is within 0.2 of old −0.04, so v_clip is v and nothing is clipped. In fp32
    # −0.04 + (0.03 − (−0.04)) is 0.030000001, not 0.03, so the form old + clip(v − old, −c, c)
    # made the "clipped" error (0.030000001 − 0.01)² larger than (0.03 − 0.01)² and counted the token
    values = t([0.03, 0.5, 0.5]).requires_grad_()
    old = t([-0.04, 0.0, 0.0])
    returns = t([0.01, 1.0, 0.0])
    mask = m([1, 1, 1])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 1: within the range, (0.03 − 0.01)² = 0.0004, not clipped
    # token 2: v 0.5 → 0.2, R 1: 0.25 vs 0.64 → 0.64, clipped error larger: counted
    # token 3: v 0.5 → 0.2, R 0: 0.25 vs 0.04 → 0.25, not counted
    # loss = ½·(0.0004 + 0.64 + 0.25)/3 = 0.1484
    close(loss, 0.1484)
    close(stats["clipfrac"], 1 / 3)
    old_form = old + torch.clamp(values.detach() - old, -0.2, 0.2)
    assert (old_form[0, 0] - 0.01) ** 2 > (values[0, 0].detach() - 0.01) ** 2  # the rounding the test guards


# ----------------------------------------------------------------------------- entropy


def test_entropy_from_logits():
    # uniform over 4 → ln 4 = 1.3862943611
    # p = [0.25, 0.75] (logits 0, ln 3) → −(0.25·ln 0.25 + 0.75·ln 0.75)
    #   = 0.3465735903 + 0.2157615544 = 0.5623351446
    close(entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0]])), [1.3862943611])
    close(entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]])), [0.5623351446])


# ----------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    # error = clip(9/6 − 1, −0.2, 0.2) = clip(0.5) = 0.2; coef·(1 + 0.2·256/10000) = 0.1·1.00512
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl.update(3.0, 256)
    # clip(3/6 − 1 = −0.5) = −0.2 → ·(1 − 0.00512): 0.100512·0.99488
    #   = 0.100512 − 0.000514621 = 0.0999973786
    assert ctl.value == pytest.approx(0.0999973786, abs=1e-10)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(6.6, 100)
    # 6.6/6 − 1 = 0.1 (inside the clip) → ·(1 + 0.1·100/1000) = ·1.01 → 0.101
    assert ctl.value == pytest.approx(0.101, abs=1e-12)


def test_kl_controller_state_round_trips_through_json():
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    for kl in [9.0, 1.0, 7.3]:
        ctl.update(kl, 32)
    again = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    again.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert again.value == ctl.value  # exact
    ctl.update(12.0, 32)
    again.update(12.0, 32)
    assert again.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10_000)
    assert ctl.value == 0.05 and ctl.state_dict() == {"value": 0.05}


# ----------------------------------------------------------------------------- reward shaping


def test_running_moments_match_numpy():
    batches = [[1.0, 2.0, 3.0], [4.0, 10.0], [-1.0]]
    moments = RunningMoments()
    for b in batches:
        moments.update(torch.tensor(b))
    everything = np.array([x for b in batches for x in b])
    # mean = 19/6 = 3.1666667; population variance = 131/6 − (19/6)² = 21.8333333 − 10.0277778 = 11.8055556
    assert moments.mean == pytest.approx(19 / 6, abs=1e-12)
    assert moments.std == pytest.approx(math.sqrt(11.8055556), abs=1e-6)
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-12)
    assert moments.std == pytest.approx(float(everything.std()), abs=1e-12)  # numpy's default ddof=0
    close(moments.normalise(torch.tensor([10.0])), [(10 - everything.mean()) / everything.std()])
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    assert restored.state_dict() == moments.state_dict()


def test_shape_scores_penalty_and_normalisation():
    scores, finished = torch.tensor([1.0, 0.5]), torch.tensor([True, False])
    # the unfinished completion loses the penalty: [1.0, 0.5 − 2.0]
    close(shape_scores(scores, finished, normaliser=None, missing_eos_penalty=2.0), [1.0, -1.5])
    close(shape_scores(scores, finished, normaliser=None, missing_eos_penalty=None), [1.0, 0.5])
    # normalised first (mean 0.75, std 0.25 → [1, −1]), then penalised → [1, −3]
    moments = RunningMoments()
    close(shape_scores(scores, finished, normaliser=moments, missing_eos_penalty=2.0), [1.0, -3.0])
    assert moments.count == 2


# ----------------------------------------------------------------------------- the objective


def test_needs_and_kind():
    objective = PPOKL()
    assert objective.kind == "online" and objective.name == "ppo_kl"
    assert objective.needs(PPOParams()) == Needs(
        data="prompts", reference=True, reward=True, generation=True, hidden_states=True
    )
    assert set(objective.modules(PPOParams(), 8)) == {"value_head"}  # the value head is PPO's own


def test_params_defaults():
    p = PPOParams()
    assert (p.kl_coef, p.adaptive_kl, p.target_kl, p.kl_horizon, p.kl_estimator) == (0.05, False, 6.0, 10000, "k1")
    assert (p.update_epochs, p.mini_batch_size, p.rollout_batch_size) == (4, None, 8)
    assert (p.clip_range, p.clip_range_value, p.vf_coef, p.gamma, p.lam) == (0.2, 0.2, 0.1, 1.0, 0.95)
    assert (p.whiten_advantages, p.normalize_reward, p.missing_eos_penalty) == (True, False, None)
    assert all(f.description for f in PPOParams.model_fields.values())


@pytest.mark.parametrize(
    "bad",
    [{"kl_cof": 0.1}, {"kl_coef": -0.1}, {"target_kl": 0}, {"kl_horizon": 0}, {"kl_estimator": "k2"},
     {"update_epochs": 0}, {"mini_batch_size": 0}, {"rollout_batch_size": 0}, {"clip_range": 0},
     {"gamma": 1.5}, {"lam": -0.1}, {"missing_eos_penalty": -1.0}, {"max_new_tokens": 10}],
)
def test_params_refuse_bad_values(bad):
    with pytest.raises(ValidationError):
        PPOParams(**bad)


def test_registered_through_entry_point():
    from prefkit.plugins import build_registry

    reg = build_registry()
    assert "ppo_kl" in reg.objectives and reg.owners[("objectives", "ppo_kl")] == "ppo_kl"
    assert isinstance(reg.objectives["ppo_kl"], PPOKL)
    assert not [p for p in reg.problems if "ppo_kl" in p]


def test_math_reference_values():
    # the literals above, checked once against the math module (not the code under test)
    assert math.exp(-0.5) - 1 + 0.5 == pytest.approx(0.1065306597)
    assert math.e - 2 == pytest.approx(0.7182818285)
    assert 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2 == pytest.approx(0.1612137420)
    assert -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) == pytest.approx(0.5623351446)
    assert 0.100512 * 0.99488 == pytest.approx(0.0999973786)
