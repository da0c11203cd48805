"""Golden tests for GRPO, with the arithmetic written out by hand.

Notation: r scores, A advantages, G samples per prompt, ratio = exp(logp − old_logp), ε the clip
range, β the KL coefficient, k3 = exp(x) − x − 1 with x = ref_logp − logp, |o_i| the number of
completion tokens of sequence i. Token tensors are [R, T], masks right-padded.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from prefkit.api import LossOutput, Needs, OnlineInputs, OnlineObjective, Rollout
from prefkit_builtins.grpo import (
    GRPO,
    GRPOParams,
    aggregate_loss,
    group_advantages,
    group_statistics,
    grpo_token_loss,
    k3_kl,
    register_objectives,
)

EPS = 1e-4  # the default eps added to the group's std


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def close(actual, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual).float(), expected, atol=tol, rtol=0)


def inputs(logps, mask, advantages, *, old_logps=None, ref_logps=None) -> OnlineInputs:
    rows = logps.shape[0]
    return OnlineInputs(
        logps=logps, mask=mask, old_logps=logps.detach().clone() if old_logps is None else old_logps,
        ref_logps=ref_logps, outputs={}, old_outputs={}, extras={"advantages": advantages},
        scores=torch.zeros(rows), group_ids=torch.zeros(rows, dtype=torch.long),
    )


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_scaled_by_the_sample_std():
    # groups interleaved on purpose: group 0 = [1, 2, 3], group 1 = [4, 8], group 2 = [5, 5]
    scores = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 8.0, 5.0])
    groups = torch.tensor([0, 1, 0, 2, 0, 1, 2])
    # group 0: mean 2, sample std sqrt(((−1)² + 0² + 1²)/(3 − 1)) = sqrt(1) = 1
    #          A = [−1, 0, 1]/(1 + 1e−4) = [−0.9999000100, 0, 0.9999000100]
    # group 1: mean 6, sample std sqrt(((−2)² + 2²)/(2 − 1)) = sqrt(8) = 2.8284271247
    #          A = ±2/(2.8284271247 + 0.0001) = ±2/2.8285271247 = ±0.7070817821
    # group 2: all equal: mean 5, std 0 → A = 0/(0 + 1e−4) = 0
    close(
        group_advantages(scores, groups, scale=True),
        [-0.9999000100, -0.7070817821, 0.0, 0.0, 0.9999000100, 0.7070817821, 0.0],
    )
    inverse, mean, std = group_statistics(scores, groups)
    close(mean, [2.0, 6.0, 5.0])
    close(std, [1.0, 2.8284271247, 0.0])
    assert inverse.tolist() == [0, 1, 0, 2, 0, 1, 2]


def test_group_std_is_the_sample_std_not_the_population_std():
    # [1, 3]: mean 2; sample std sqrt((1 + 1)/1) = 1.4142135624 (population std would be 1)
    # A = ±1/(1.4142135624 + 0.0001) = ±1/1.4143135624 = ±0.7070567847 (population: ±1/1.0001 = ±0.9999)
    close(group_advantages(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), scale=True), [-0.7070567847, 0.7070567847])
    # the same as torch.std (Bessel-corrected) and TRL's GRPOTrainer
    close(group_statistics(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]))[2], [torch.tensor([1.0, 3.0]).std()])


def test_group_advantages_unscaled_only_subtract_the_mean():
    scores = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 8.0, 5.0])
    groups = torch.tensor([0, 1, 0, 2, 0, 1, 2])
    # r − mean: group 0 [1, 2, 3] − 2; group 1 [4, 8] − 6; group 2 [5, 5] − 5
    close(group_advantages(scores, groups, scale=False), [-1.0, -2.0, 0.0, 0.0, 1.0, 2.0, 0.0])


def test_group_advantages_custom_eps_fp32_and_no_gradient():
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = group_advantages(scores, torch.tensor([7, 7, 7]), scale=True, eps=1.0)
    # std 1: [−1, 0, 1]/(1 + 1) = [−0.5, 0, 0.5]; a group id need not start at 0
    close(out, [-0.5, 0.0, 0.5])
    assert out.dtype == torch.float32 and not out.requires_grad


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), scale=True)
    with pytest.raises(ValueError, match="num_samples"):
        group_advantages(torch.tensor([1.0]), torch.tensor([0]), scale=False)


# ----------------------------------------------------------------------------- k3


def test_k3_values_and_gradient():
    logps = t([-1.0, -2.0, -0.5]).requires_grad_()
    refs = t([-1.5, -1.0, -0.5])
    # x = ref − logp = [−0.5, 1, 0]; k3 = e^x − x − 1
    #   x = −0.5: 0.6065306597 + 0.5 − 1 = 0.1065306597
    #   x =  1:   2.7182818285 − 1 − 1   = 0.7182818285
    #   x =  0:   1 − 0 − 1              = 0
    kl = k3_kl(logps, refs)
    close(kl, [[0.1065306597, 0.7182818285, 0.0]])
    # d k3 / d logp = −e^x + 1:  1 − 0.6065306597 = 0.3934693403;  1 − 2.7182818285 = −1.7182818285;  0
    kl.sum().backward()
    close(logps.grad, [[0.3934693403, -1.7182818285, 0.0]])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    assert k3_kl(logps.detach().bfloat16(), refs.bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------- the per-token loss

LN15, LN05 = math.log(1.5), math.log(0.5)


def test_clipped_surrogate_per_token():
    # four one-token sequences (plus a padded position each), old logp 0 → ratio = exp(logp)
    logps = t([LN15, 0.0], [LN15, 0.0], [LN05, 0.0], [LN05, 0.0]).requires_grad_()
    old = torch.zeros(4, 2)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = m([1, 0], [1, 0], [1, 0], [1, 0])
    losses, stats = grpo_token_loss(logps, old, None, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.0)
    # −min(ratio·A, clip(ratio, 0.8, 1.2)·A):
    #   ratio 1.5, A = +1: −min(1.5, 1.2)   = −1.2  clipped (no gain beyond 1 + ε)
    #   ratio 1.5, A = −1: −min(−1.5, −1.2) =  1.5  unclipped (no limit on getting worse)
    #   ratio 0.5, A = +1: −min(0.5, 0.8)   = −0.5  unclipped
    #   ratio 0.5, A = −1: −min(−0.5, −0.8) =  0.8  clipped
    close(losses, [[-1.2, 0.0], [1.5, 0.0], [-0.5, 0.0], [0.8, 0.0]])
    close(stats["clipped"], [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    close(stats["policy"], losses)
    assert "kl" not in stats
    losses.sum().backward()
    # clipped tokens get no gradient; unclipped: d(−A·ratio)/dlogp = −A·ratio: +1.5 and −0.5
    close(logps.grad, [[0.0, 0.0], [1.5, 0.0], [-0.5, 0.0], [0.0, 0.0]])


def test_positive_advantage_beyond_one_plus_eps_has_zero_gradient():
    # ratio 1.25: beyond 1.2 (ε 0.2) but within 1.28 (DAPO's clip-higher ε_high 0.28)
    logps = t([math.log(1.25)]).requires_grad_()
    adv = torch.tensor([2.0])
    losses, _ = grpo_token_loss(logps, t([0.0]), None, adv, m([1]), clip_low=0.2, clip_high=0.2, beta=0.0)
    # −min(1.25·2, 1.2·2) = −2.4, flat in logp
    close(losses, [[-2.4]])
    losses.sum().backward()
    close(logps.grad, [[0.0]])
    logps.grad = None
    losses, stats = grpo_token_loss(logps, t([0.0]), None, adv, m([1]), clip_low=0.2, clip_high=0.28, beta=0.0)
    # within 1.28: −1.25·2 = −2.5, gradient −A·ratio = −2·1.25 = −2.5
    close(losses, [[-2.5]])
    close(stats["clipped"], [[0.0]])
    losses.sum().backward()
    close(logps.grad, [[-2.5]])


def test_kl_penalty_is_added_per_token():
    logps = t([-1.0, -2.0]).requires_grad_()
    refs = t([-1.5, -1.0])
    losses, stats = grpo_token_loss(logps, logps.detach(), refs, torch.tensor([1.0]), m([1, 1]),
                                    clip_low=0.2, clip_high=0.2, beta=0.1)
    # ratio 1 → policy term −A = −1 per token; k3 = [0.1065306597, 0.7182818285] (test above)
    # loss_t = −1 + 0.1·k3 = [−0.9893469340, −0.9281718172]
    close(losses, [[-0.9893469340, -0.9281718172]])
    close(stats["kl"], [[0.1065306597, 0.7182818285]])
    close(stats["policy"], [[-1.0, -1.0]])
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(logps, logps.detach(), None, torch.tensor([1.0]), m([1, 1]),
                        clip_low=0.2, clip_high=0.2, beta=0.1)


def test_padding_is_ignored_even_when_it_holds_garbage():
    mask = m([1, 1, 0], [1, 0, 0])
    clean = t([-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0])
    dirty = t([-1.0, -2.0, 80.0], [-0.5, -90.0, 1e4])  # exp(80 − (−80)) overflows fp32
    old_clean, old_dirty = clean - 0.1, t([-1.1, -2.1, -80.0], [-0.6, 90.0, -1e4])
    ref_clean, ref_dirty = clean + 0.2, t([-0.8, -1.8, 500.0], [-0.3, -500.0, 7.0])
    adv = torch.tensor([1.0, -2.0])
    out = {}
    cases = {"clean": (clean, old_clean, ref_clean), "dirty": (dirty, old_dirty, ref_dirty)}
    for name, (lp, old, ref) in cases.items():
        lp = lp.clone().requires_grad_()
        losses, stats = grpo_token_loss(lp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.04)
        loss = aggregate_loss(losses, mask, "sequence")
        loss.backward()
        out[name] = (losses.detach(), stats["kl"], loss.detach(), lp.grad)
    for a, b in zip(out["clean"], out["dirty"]):
        assert torch.isfinite(b).all()
        close(b, a)
    losses, kl, _, grad = out["dirty"]
    assert (losses[~mask] == 0).all() and (kl[~mask] == 0).all() and (grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- aggregation


def test_sequence_and_token_aggregation_differ_on_unequal_lengths():
    x = t([1.0, 2.0, 3.0], [4.0, 100.0, 100.0])  # the 100s are padding
    mask = m([1, 1, 1], [1, 0, 0])
    # sequence: mean of per-sequence means = (mean(1, 2, 3) + 4)/2 = (2 + 4)/2 = 3
    close(aggregate_loss(x, mask, "sequence"), 3.0)
    # token: mean over all valid tokens = (1 + 2 + 3 + 4)/4 = 2.5
    close(aggregate_loss(x, mask, "token"), 2.5)
    # equal lengths: both are the plain mean, (1 + 2 + 4 + 5)/4 = 3
    same = m([1, 1, 0], [1, 1, 0])
    close(aggregate_loss(t([1.0, 2.0, 9.0], [4.0, 5.0, 9.0]), same, "sequence"), 3.0)
    close(aggregate_loss(t([1.0, 2.0, 9.0], [4.0, 5.0, 9.0]), same, "token"), 3.0)
    # a sequence with no token counts as 0 in sequence mode: (2 + 0)/2 = 1; nothing at all → 0
    close(aggregate_loss(x, m([1, 1, 1], [0, 0, 0]), "sequence"), 1.0)
    close(aggregate_loss(x, m([0, 0, 0], [0, 0, 0]), "token"), 0.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_loss(x, mask, "batch")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the objective


def test_needs_params_and_defaults():
    grpo = GRPO()
    assert isinstance(grpo, OnlineObjective) and grpo.kind == "online" and grpo.name == "grpo"
    params = GRPOParams()
    assert (params.beta, params.epsilon, params.epsilon_high) == (0.04, 0.2, None)
    assert (params.scale_rewards, params.loss_aggregation, params.update_epochs) == (True, "sequence", 1)
    assert grpo.needs(params) == Needs(data="prompts", reference=True, reward=True, generation=True)
    assert grpo.needs(GRPOParams(beta=0.0)) == Needs(data="prompts", reference=False, reward=True, generation=True)
    assert grpo.min_samples_per_prompt(params) == 2
    assert grpo.loss_unit(params) == "sequence"
    assert grpo.loss_unit(GRPOParams(loss_aggregation="token")) == "token"
    for bad in ({"beta": -0.1}, {"epsilon": 0.0}, {"epsilon": 1.0}, {"epsilon_high": 0.0},
                {"loss_aggregation": "batch"}, {"ppo_epochs": 2}):
        with pytest.raises(ValidationError):
            GRPOParams(**bad)


def hand_rollout(scores, groups, *, width: int = 2) -> Rollout:
    n = len(scores)
    return Rollout(
        step=0, prompts=["p"] * n, completions=["c"] * n, group_ids=torch.tensor(groups),
        scores=torch.tensor(scores), finished=torch.ones(n, dtype=torch.bool),
        mask=torch.ones(n, width, dtype=torch.bool), logps=torch.full((n, width), -1.0),
        ref_logps=torch.full((n, width), -1.0), entropy=torch.ones(n, width),
    )


def test_prepare_fills_advantages_and_returns_group_metrics():
    rollout = hand_rollout([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], [0, 0, 0, 1, 1, 1])
    metrics = GRPO().prepare(GRPOParams(), rollout, None)
    # group 0 [1, 2, 3]: std 1 → [−1, 0, 1]/1.0001; group 1 [4, 4, 4]: std 0 → 0
    close(rollout.extras["advantages"], [-0.9999000100, 0.0, 0.9999000100, 0.0, 0.0, 0.0])
    assert rollout.extras["advantages"].shape == (6,)
    # reward/group_std = mean(1, 0) = 0.5; one of two groups has zero std → zero_frac 0.5
    assert metrics == pytest.approx({"reward/group_std": 0.5, "advantages/zero_frac": 0.5})
    assert all(isinstance(v, float) for v in metrics.values())
    GRPO().prepare(GRPOParams(scale_rewards=False), rollout, None)
    close(rollout.extras["advantages"], [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_loss_gradient_at_ratio_one_is_minus_advantage_over_length_sequence_mode():
    # two sequences of 2 and 4 tokens, advantages +1 and −2; logps == old_logps → ratio 1
    logps = t([-1.0, -2.0, 0.0, 0.0], [-0.5, -0.7, -0.9, -1.1]).requires_grad_()
    mask = m([1, 1, 0, 0], [1, 1, 1, 1])
    out = GRPO().loss(GRPOParams(beta=0.0), inputs(logps, mask, torch.tensor([1.0, -2.0])))
    assert isinstance(out, LossOutput) and out.losses.dim() == 0
    # loss = 1/R Σ_i 1/|o_i| Σ_t −A_i·1 = ((−1·2)/2 + (2·4)/4)/2 = (−1 + 2)/2 = 0.5
    close(out.losses, 0.5)
    out.losses.backward()
    # d loss / d logp_it = −A_i·ratio/(R·|o_i|): row 0: −1/(2·2) = −0.25; row 1: 2/(2·4) = +0.25
    close(logps.grad, [[-0.25, -0.25, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # per sequence, the gradient sums to −A_i/R whatever its length: −0.5 and +1.0
    close(logps.grad.sum(-1), [-0.5, 1.0])
    close(out.metrics["loss/policy"], 0.5)
    close(out.metrics["policy/clipfrac"], 0.0)
    assert "kl" not in out.metrics


def test_loss_gradient_at_ratio_one_token_mode():
    logps = t([-1.0, -2.0, 0.0, 0.0], [-0.5, -0.7, -0.9, -1.1]).requires_grad_()
    mask = m([1, 1, 0, 0], [1, 1, 1, 1])
    out = GRPO().loss(GRPOParams(beta=0.0, loss_aggregation="token"), inputs(logps, mask, torch.tensor([1.0, -2.0])))
    # loss = Σ −A_i over the 6 tokens / 6 = (2·(−1) + 4·2)/6 = 6/6 = 1.0
    close(out.losses, 1.0)
    out.losses.backward()
    # every token weighs 1/6: row 0: −1/6 = −0.1666666667; row 1: 2/6 = 0.3333333333
    close(logps.grad, [[-1 / 6, -1 / 6, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3, 1 / 3]])


def test_loss_with_kl_splits_into_policy_plus_beta_kl():
    logps = t([-1.0, -2.0]).requires_grad_()
    refs = t([-1.5, -1.0])
    out = GRPO().loss(GRPOParams(beta=0.1), inputs(logps, m([1, 1]), torch.tensor([1.0]), ref_logps=refs))
    # policy: mean(−1, −1) = −1;  kl: mean(0.1065306597, 0.7182818285) = 0.4124062441
    # loss = −1 + 0.1·0.4124062441 = −0.9587593756
    close(out.losses, -0.9587593756)
    close(out.metrics["loss/policy"], -1.0)
    close(out.metrics["kl"], 0.4124062441)
    out.losses.backward()
    # per token (−A·ratio + β(1 − e^x))/|o|:
    #   (−1 + 0.1·0.3934693403)/2 = −0.4803265330;  (−1 − 0.1·1.7182818285)/2 = −0.5859140914
    close(logps.grad, [[-0.4803265330, -0.5859140914]])
    with pytest.raises(ValueError, match="reference"):
        GRPO().loss(GRPOParams(beta=0.1), inputs(logps, m([1, 1]), torch.tensor([1.0])))


def test_loss_uses_epsilon_high_and_reports_clipfrac():
    # ratio 1.5 with A = +1: clipped at 1.2 (ε 0.2) or at 1.3 (ε_high 0.3); ratio 1 with A = +1 is not clipped
    logps = t([LN15, 0.0]).requires_grad_()
    inp = inputs(logps, m([1, 1]), torch.tensor([1.0]), old_logps=torch.zeros(1, 2))
    out = GRPO().loss(GRPOParams(beta=0.0), inp)
    # mean(−1.2, −1.0) = −1.1; one of two tokens clipped
    close(out.losses, -1.1)
    close(out.metrics["policy/clipfrac"], 0.5)
    out = GRPO().loss(GRPOParams(beta=0.0, epsilon_high=0.3), inp)
    # mean(−1.3, −1.0) = −1.15
    close(out.losses, -1.15)


def test_chunks_weighted_by_unit_count_give_the_minibatch_loss():
    # the loop splits a minibatch into chunks and weights each chunk's loss by its unit count
    torch.manual_seed(0)
    logps = -torch.rand(3, 4)
    old = logps + 0.1 * torch.randn(3, 4)
    ref = logps + 0.1 * torch.randn(3, 4)
    mask = m([1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0])
    adv = torch.tensor([0.5, -1.0, 2.0])
    for mode in ("sequence", "token"):
        params = GRPOParams(loss_aggregation=mode)
        whole = GRPO().loss(params, inputs(logps, mask, adv, old_logps=old, ref_logps=ref)).losses
        total, units = 0.0, 0.0
        for rows in ([0], [1, 2]):
            chunk = inputs(logps[rows], mask[rows], adv[rows], old_logps=old[rows], ref_logps=ref[rows])
            out = GRPO().loss(params, chunk)
            n = len(rows) if mode == "sequence" else float(mask[rows].sum())
            total, units = total + float(out.losses) * n, units + n
        close(total / units, whole, tol=1e-6)


def test_loss_without_prepare_is_refused():
    with pytest.raises(ValueError, match="prepare"):
        bare = inputs(t([-1.0]), m([1]), torch.tensor([1.0]))
        bare.extras.clear()
        GRPO().loss(GRPOParams(beta=0.0), bare)


def test_registration():
    from prefkit.plugins import _check_objective

    assert _check_objective(GRPO()) is None
    registered = []
    register_objectives(registered.append)
    assert len(registered) == 1 and isinstance(registered[0], GRPO)
