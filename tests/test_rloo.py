"""Golden tests for RLOO, with the arithmetic written out by hand.

Notation: s scores, KL_i = Σ_t (old_logp − ref_logp) the sequence-level k1 KL, R = s − β·KL the
reward, A_i = R_i − mean of the other rewards of its group, ratio = exp(logp − old_logp), ε the
clip range. Token tensors are [R, T], masks right-padded.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from prefkit.api import LossOutput, Needs, OnlineInputs, OnlineObjective, Rollout
from prefkit_builtins.rloo import (
    RLOO,
    RLOOParams,
    leave_one_out_advantages,
    normalize,
    register_objectives,
    rloo_token_loss,
    sequence_kl,
    token_mean,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def close(actual, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual).float(), expected, atol=tol, rtol=0)


def inputs(logps, mask, advantages, *, old_logps=None) -> OnlineInputs:
    rows = logps.shape[0]
    return OnlineInputs(
        logps=logps, mask=mask, old_logps=logps.detach().clone() if old_logps is None else old_logps,
        ref_logps=None, outputs={}, old_outputs={}, extras={"advantages": advantages},
        scores=torch.zeros(rows), group_ids=torch.zeros(rows, dtype=torch.long),
    )


# ----------------------------------------------------------------------------- sequence KL


def test_sequence_kl_sums_k1_over_valid_tokens():
    old = t([-1.0, -2.0, -0.5], [-1.0, 9.0, 9.0])
    ref = t([-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0])
    mask = m([1, 1, 1], [1, 0, 0])
    # row 0: (−1 + 1.5) + (−2 + 1) + (−0.5 + 0.5) = 0.5 − 1 + 0 = −0.5 (k1 can be negative)
    # row 1: −1 + 2 = 1; the 9s are padding
    close(sequence_kl(old, ref, mask), [-0.5, 1.0])


# ----------------------------------------------------------------------------- leave-one-out


def test_leave_one_out_baseline_by_hand():
    # group 0 = [1, 2, 3], group 1 = [4, 10], interleaved
    rewards = torch.tensor([1.0, 4.0, 2.0, 10.0, 3.0])
    groups = torch.tensor([0, 1, 0, 1, 0])
    # group 0: 1 − (2 + 3)/2 = −1.5;  2 − (1 + 3)/2 = 0;  3 − (1 + 2)/2 = 1.5
    #          (= 3/2 · (r − 2): the n/(n−1) times the mean-centred reward)
    # group 1: 4 − 10 = −6;  10 − 4 = 6
    close(leave_one_out_advantages(rewards, groups), [-1.5, -6.0, 0.0, 6.0, 1.5])


def test_leave_one_out_matches_trl_golden_numbers():
    # TRL's test_rloo_reward: 3 prompts × 4 samples, sample k of prompt j at index 3k + j
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    groups = torch.tensor([0, 1, 2] * 4)
    adv = leave_one_out_advantages(rewards, groups)
    # prompt 0 = [1, 2, 5, 8]: A(1) = 1 − (2 + 5 + 8)/3 = 1 − 5 = −4
    # prompt 1 = [2, 3, 6, 9]: A(6) = 6 − (2 + 3 + 9)/3 = 6 − 14/3 = 1.3333333333
    close(adv[0], -4.0)
    close(adv[7], 6.0 - 14.0 / 3.0)
    # advantages of a group sum to 0
    close(torch.stack([adv[groups == j].sum() for j in range(3)]), [0.0, 0.0, 0.0], tol=1e-5)


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_normalize_uses_the_sample_std():
    # [−1.5, 0, 1.5]: mean 0; sample std sqrt((2.25 + 0 + 2.25)/2) = 1.5 → [−1, 0, 1] (to 1e−8)
    close(normalize(torch.tensor([-1.5, 0.0, 1.5])), [-1.0, 0.0, 1.0])
    # [0, 2]: mean 1, sample std sqrt((1 + 1)/1) = 1.4142135624 → ±0.7071067812
    close(normalize(torch.tensor([0.0, 2.0])), [-0.7071067812, 0.7071067812])


# ----------------------------------------------------------------------------- the loss

LN15, LN05 = math.log(1.5), math.log(0.5)


def test_clipped_surrogate_per_token():
    # each sequence's advantage is broadcast over its tokens; old logp 0 → ratio = exp(logp)
    logps = t([LN15, LN05], [LN15, LN05]).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    losses, stats = rloo_token_loss(logps, torch.zeros(2, 2), adv, m([1, 1], [1, 1]), clip_range=0.2)
    # row 0, A = +1: ratio 1.5 → −min(1.5, 1.2) = −1.2 (clipped);  ratio 0.5 → −min(0.5, 0.8) = −0.5
    # row 1, A = −1: ratio 1.5 → −min(−1.5, −1.2) = 1.5;  ratio 0.5 → −min(−0.5, −0.8) = 0.8 (clipped)
    close(losses, [[-1.2, -0.5], [1.5, 0.8]])
    close(stats["clipped"], [[1.0, 0.0], [0.0, 1.0]])
    losses.sum().backward()
    # gradient −A·ratio where unclipped: row 0 token 1: −0.5; row 1 token 0: +1.5; clipped: 0
    close(logps.grad, [[0.0, -0.5], [1.5, 0.0]])


def test_positive_advantage_beyond_one_plus_eps_has_zero_gradient():
    logps = t([math.log(1.3), math.log(1.1)]).requires_grad_()
    losses, _ = rloo_token_loss(logps, t([0.0, 0.0]), torch.tensor([3.0]), m([1, 1]), clip_range=0.2)
    # ratio 1.3 > 1.2: −1.2·3 = −3.6, flat; ratio 1.1: −1.1·3 = −3.3, gradient −3·1.1 = −3.3
    close(losses, [[-3.6, -3.3]])
    losses.sum().backward()
    close(logps.grad, [[0.0, -3.3]])


def test_padding_is_ignored_even_when_it_holds_garbage():
    mask = m([1, 1, 0], [1, 0, 0])
    clean, old_clean = t([-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]), t([-1.2, -1.9, 0.0], [-0.4, 0.0, 0.0])
    dirty, old_dirty = t([-1.0, -2.0, 80.0], [-0.5, 1e4, -3.0]), t([-1.2, -1.9, -80.0], [-0.4, -1e4, 5.0])
    adv = torch.tensor([1.0, -2.0])
    grads, values = [], []
    for lp, old in ((clean, old_clean), (dirty, old_dirty)):
        lp = lp.clone().requires_grad_()
        losses, _ = rloo_token_loss(lp, old, adv, mask, clip_range=0.2)
        loss = token_mean(losses, mask)
        loss.backward()
        grads.append(lp.grad)
        values.append(loss.detach())
    assert torch.isfinite(grads[1]).all() and (grads[1][~mask] == 0).all()
    close(grads[1], grads[0])
    close(values[1], values[0])
    # sequence KL ignores padding too
    close(sequence_kl(dirty, old_dirty, mask), sequence_kl(clean, old_clean, mask))


# ----------------------------------------------------------------------------- the objective


def test_needs_params_and_defaults():
    rloo = RLOO()
    assert isinstance(rloo, OnlineObjective) and rloo.kind == "online" and rloo.name == "rloo"
    params = RLOOParams()
    assert (params.beta, params.clip_range, params.normalize_advantages, params.update_epochs) == (0.05, 0.2, False, 1)
    assert rloo.needs(params) == Needs(data="prompts", reference=True, reward=True, generation=True)
    assert rloo.needs(RLOOParams(beta=0.0)).reference is False
    assert rloo.min_samples_per_prompt(params) == 2
    assert rloo.loss_unit(params) == "token"
    for bad in ({"beta": -1.0}, {"clip_range": 0.0}, {"clip_range": 1.0}, {"kl_coef": 0.1}):
        with pytest.raises(ValidationError):
            RLOOParams(**bad)


def hand_rollout(scores, groups, logps, ref_logps, mask) -> Rollout:
    n = len(scores)
    return Rollout(
        step=0, prompts=["p"] * n, completions=["c"] * n, group_ids=torch.tensor(groups),
        scores=torch.tensor(scores), finished=torch.ones(n, dtype=torch.bool), mask=mask,
        logps=logps, ref_logps=ref_logps, entropy=torch.ones_like(logps),
    )


def test_prepare_kl_penalised_reward_and_loo_advantages():
    # sequence KLs by construction: row 0: 0.5 + 0.5 = 1; row 1: 0; row 2: −2 (one token); row 3: 0.25 + 0.25 = 0.5
    logps = t([-1.0, -1.0], [-1.0, -1.0], [-3.0, 7.0], [-1.0, -1.0])
    refs = t([-1.5, -1.5], [-1.0, -1.0], [-1.0, 0.0], [-1.25, -1.25])
    mask = m([1, 1], [1, 1], [1, 0], [1, 1])
    rollout = hand_rollout([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], logps, refs, mask)
    metrics = RLOO().prepare(RLOOParams(beta=0.5), rollout, None)
    # R = s − 0.5·KL = [1 − 0.5, 2 − 0, 3 + 1, 4 − 0.25] = [0.5, 2, 4, 3.75]
    # A: group 0: 0.5 − 2 = −1.5, 2 − 0.5 = 1.5; group 1: 4 − 3.75 = 0.25, 3.75 − 4 = −0.25
    close(rollout.extras["advantages"], [-1.5, 1.5, 0.25, -0.25])
    # kl = mean(1, 0, −2, 0.5) = −0.125; reward/total = (0.5 + 2 + 4 + 3.75)/4 = 10.25/4 = 2.5625
    assert metrics == pytest.approx({"kl": -0.125, "reward/total": 2.5625})
    assert all(isinstance(v, float) for v in metrics.values())


def test_prepare_without_reference_and_with_normalisation():
    mask = torch.ones(4, 1, dtype=torch.bool)
    rollout = hand_rollout([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], torch.zeros(4, 1), None, mask)
    metrics = RLOO().prepare(RLOOParams(beta=0.0), rollout, None)
    # R = s: A = [1 − 2, 2 − 1, 3 − 4, 4 − 3] = [−1, 1, −1, 1]; no kl without a reference
    close(rollout.extras["advantages"], [-1.0, 1.0, -1.0, 1.0])
    assert metrics == pytest.approx({"reward/total": 2.5})
    RLOO().prepare(RLOOParams(beta=0.0, normalize_advantages=True), rollout, None)
    # mean 0, sample std sqrt(4·1/3) = 1.1547005384 → ±1/1.1547005384 = ±0.8660254038
    close(rollout.extras["advantages"], [-0.8660254038, 0.8660254038, -0.8660254038, 0.8660254038])
    with pytest.raises(ValueError, match="reference"):
        RLOO().prepare(RLOOParams(beta=0.05), rollout, None)


def test_loss_is_a_token_mean_with_reinforce_gradient_at_ratio_one():
    # sequences of 2 and 1 tokens, advantages 3 and −1.5; logps == old_logps → ratio 1
    logps = t([-1.0, -2.0], [-0.5, 0.0]).requires_grad_()
    mask = m([1, 1], [1, 0])
    out = RLOO().loss(RLOOParams(), inputs(logps, mask, torch.tensor([3.0, -1.5])))
    assert isinstance(out, LossOutput) and out.losses.dim() == 0
    # loss = Σ −A over the 3 tokens / 3 = (−3 − 3 + 1.5)/3 = −4.5/3 = −1.5
    close(out.losses, -1.5)
    close(out.metrics["loss/policy"], -1.5)
    close(out.metrics["policy/clipfrac"], 0.0)
    out.losses.backward()
    # d/dlogp_it = −A_i/3: row 0: −1 per token; row 1: +0.5; padding 0
    close(logps.grad, [[-1.0, -1.0], [0.5, 0.0]])


def test_loss_reports_clipfrac():
    logps = t([LN15, 0.0]).requires_grad_()
    out = RLOO().loss(RLOOParams(), inputs(logps, m([1, 1]), torch.tensor([1.0]), old_logps=torch.zeros(1, 2)))
    # tokens: −min(1.5, 1.2) = −1.2 (clipped), −1; mean −1.1, clipfrac 1/2
    close(out.losses, -1.1)
    close(out.metrics["policy/clipfrac"], 0.5)


def test_loss_without_prepare_is_refused():
    bare = inputs(t([-1.0]), m([1]), torch.tensor([1.0]))
    bare.extras.clear()
    with pytest.raises(ValueError, match="prepare"):
        RLOO().loss(RLOOParams(), bare)


def test_registration():
    from prefkit.plugins import _check_objective

    assert _check_objective(RLOO()) is None
    registered = []
    register_objectives(registered.append)
    assert len(registered) == 1 and isinstance(registered[0], RLOO)
