"""Golden tests for DPO's loss variants and weighted mixtures, with the arithmetic written out by hand.

Notation (as in test_dpo_loss.py): πc, πr policy log-probs of chosen/rejected (sums over completion
tokens), refc, refr the reference ones, β the KL strength. c = πc − refc and r = πr − refr are the
log-ratios, h = c − r the DPO margin, x = β·h, ε = label_smoothing, σ the logistic function and
sp(z) = log(1 + e^z) = −log σ(−z) the softplus.

Values used below (e^0.1 = 1.105170918, e^0.2 = 1.221402758, e^0.3 = 1.349858808):

    σ(0.1) = 1/(1 + e^−0.1) = 0.524979187    σ(−0.1) = 1 − σ(0.1) = 0.475020813
    σ(0.2) = 1/(1 + e^−0.2) = 0.549833997    σ(−0.2) = 0.450166003
    σ(0.3) = 1/(1 + e^−0.3) = 0.574442517    σ(−0.3) = 0.425557483
    sp(−0.1) = log(1.904837418) = 0.644396660   sp(0.1) = 0.1 + sp(−0.1) = 0.744396660
    sp(−0.2) = log(1.818730753) = 0.598138869   sp(0.2) = 0.2 + sp(−0.2) = 0.798138869
    sp(0.3)  = log(2.349858808) = 0.854355244

test_math_reference_values checks these literals against the math module once.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from prefkit.api.errors import RecipeError
from prefkit.api.objective import LossInputs
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe
from prefkit_builtins.dpo import DPO, LOSS_TYPES, DPOParams, dpo_loss, dpo_loss_terms

REGISTRY = load_registry()  # the installed plugins, passed explicitly
ROOT = Path(__file__).resolve().parent.parent
NEW_TYPES = ["hinge", "robust", "bco_pair", "apo_zero", "apo_down", "sppo_hard", "nca_pair"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float32)
    torch.testing.assert_close(actual, t(*expected).reshape(actual.shape), atol=tol, rtol=0)


def sigma(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


# Two rows used throughout, β = 0.1:
#   row 0: πc=−10, πr=−12, refc=−11, refr=−11 → c = 1,  r = −1, h = 2,  βc = 0.1,  βr = −0.1, x = 0.2
#   row 1: πc=−15, πr=−12, refc=−13, refr=−13 → c = −2, r = 1,  h = −3, βc = −0.2, βr = 0.1,  x = −0.3
PC, PR, RC, RR = t(-10, -15), t(-12, -12), t(-11, -13), t(-11, -13)


def losses_of(loss_type, beta=0.1, **kwargs) -> torch.Tensor:
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, **kwargs)
    return losses


def grads_of(loss_type, pc=PC, pr=PR, rc=RC, rr=RR, beta=0.1, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum of losses)/dπc and d/dπr."""
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, **kwargs)
    losses.sum().backward()
    return pc.grad, pr.grad


def test_math_reference_values():
    # the literals in the module docstring, checked once against the math module (not the code under test)
    for z, value in [(0.1, 0.524979187), (-0.1, 0.475020813), (0.2, 0.549833997), (-0.2, 0.450166003),
                     (0.3, 0.574442517), (-0.3, 0.425557483)]:
        assert sigma(z) == pytest.approx(value, abs=1e-9)
    for z, value in [(-0.1, 0.644396660), (0.1, 0.744396660), (-0.2, 0.598138869), (0.2, 0.798138869),
                     (0.3, 0.854355244)]:
        assert softplus(z) == pytest.approx(value, abs=1e-9)


# ----------------------------------------------------------------------------- one golden test per loss type


def test_hinge_slic():
    # max(0, 1 − x): row 0 → 1 − 0.2 = 0.8;  row 1 → 1 + 0.3 = 1.3
    close(losses_of("hinge"), 0.8, 1.3)
    # β = 1: x = 2 and −3 → row 0: max(0, −1) = 0 (margin met, nothing to learn); row 1: 1 + 3 = 4
    close(losses_of("hinge", beta=1.0), 0.0, 4.0)
    # d/dπc max(0, 1 − β(c − r)) = −β while the hinge is active, 0 once x ≥ 1; πr gets the opposite
    d_pc, d_pr = grads_of("hinge")
    close(d_pc, -0.1, -0.1)
    close(d_pr, 0.1, 0.1)
    d_pc, d_pr = grads_of("hinge", beta=1.0)
    close(d_pc, 0.0, -1.0)
    close(d_pr, 0.0, 1.0)


def test_robust_dpo():
    # [−(1−ε) log σ(x) + ε log σ(−x)] / (1−2ε) = [(1−ε) sp(−x) − ε sp(x)] / (1−2ε), and with
    # sp(x) = x + sp(−x) this is sp(−x) − ε·x/(1−2ε). ε = 0.1 → ε/(1−2ε) = 0.1/0.8 = 0.125:
    #   row 0: sp(−0.2) − 0.125·0.2    = 0.598138869 − 0.025  = 0.573138869
    #   row 1: sp(0.3)  − 0.125·(−0.3) = 0.854355244 + 0.0375 = 0.891855244
    close(losses_of("robust", label_smoothing=0.1), 0.573138869, 0.891855244)
    # ε = 0: plain DPO, −log σ(x) = sp(−x): 0.598138869 and sp(0.3) = 0.854355244
    close(losses_of("robust"), 0.598138869, 0.854355244)
    # d/dπc = β·(−σ(−x) − 0.125):  row 0: 0.1·(−0.450166003 − 0.125) = −0.0575166003
    #                              row 1: 0.1·(−σ(0.3) − 0.125) = 0.1·(−0.699442517) = −0.0699442517
    d_pc, d_pr = grads_of("robust", label_smoothing=0.1)
    close(d_pc, -0.0575166003, -0.0699442517)
    close(d_pr, 0.0575166003, 0.0699442517)


def test_robust_goes_below_zero_for_a_large_margin():
    # β = 1, refs 0, h = 20 → sp(−20) − 0.125·20 = 2.06e−9 − 2.5 ≈ −2.5 (the unbiased estimate is not a bound)
    losses, _, _ = dpo_loss(t(0), t(-20), t(0), t(0), beta=1.0, loss_type="robust", label_smoothing=0.1)
    close(losses, -2.5, tol=1e-5)


def test_bco_pair_with_the_batch_mean_shift():
    # rewards βc = (0.1, −0.2), βr = (−0.1, 0.1) → δ = (0.1 − 0.2 − 0.1 + 0.1)/4 = −0.025
    # loss = −log σ(βc − δ) − log σ(−(βr − δ)) = sp(−(βc − δ)) + sp(βr − δ)
    #   row 0: βc − δ = 0.125,  βr − δ = −0.075 → sp(−0.125) + sp(−0.075)
    #        = log(1 + e^−0.125) + log(1 + e^−0.075) = log(1.882496903) + log(1.927743486)
    #        = 0.632599035 + 0.656350141 = 1.288949176
    #   row 1: βc − δ = −0.175, βr − δ = 0.125  → sp(0.175) + sp(0.125)
    #        = log(2.191246217) + log(2.133148453) = 0.784470431 + 0.757599035 = 1.542069466
    assert softplus(-0.125) + softplus(-0.075) == pytest.approx(1.288949176, abs=1e-9)
    assert softplus(0.175) + softplus(0.125) == pytest.approx(1.542069466, abs=1e-9)
    close(losses_of("bco_pair"), 1.288949176, 1.542069466)
    # δ is a constant to the gradient: d/dπc = −β σ(−(βc − δ)), d/dπr = β σ(βr − δ)
    #   row 0: −0.1·σ(−0.125) = −0.1/(1 + e^0.125) = −0.1/2.133148453 = −0.0468790627
    #          +0.1·σ(−0.075) =  0.1/(1 + e^0.075) =  0.1/2.077884151 =  0.0481258784
    d_pc, d_pr = grads_of("bco_pair")
    close(d_pc[0], -0.0468790627)
    close(d_pr[0], 0.0481258784)


def test_bco_pair_without_shift_is_trl_1x():
    # δ = 0: row 0: sp(−0.1) + sp(−0.1) = 2·0.644396660 = 1.288793320
    #        row 1: sp(0.2) + sp(0.1)   = 0.798138869 + 0.744396660 = 1.542535529
    close(losses_of("bco_pair", bco_shift="none"), 1.288793320, 1.542535529)


def test_apo_zero():
    # (1 − σ(βc)) + σ(βr):
    #   row 0: (1 − σ(0.1)) + σ(−0.1) = 0.475020813 + 0.475020813 = 0.950041626
    #   row 1: (1 − σ(−0.2)) + σ(0.1) = 0.549833997 + 0.524979187 = 1.074813184
    close(losses_of("apo_zero"), 0.950041626, 1.074813184)
    # d/dπc = −β σ(βc) σ(−βc): row 0: −0.1·0.524979187·0.475020813 = −0.1·0.249376040 = −0.0249376040
    # d/dπr = +β σ(βr) σ(−βr): row 0: +0.0249376040 (σ(−0.1)·σ(0.1) is the same product)
    d_pc, d_pr = grads_of("apo_zero")
    close(d_pc[0], -0.0249376040)
    close(d_pr[0], 0.0249376040)


def test_apo_down():
    # σ(βc) + (1 − σ(x)):
    #   row 0: σ(0.1) + (1 − σ(0.2))   = 0.524979187 + 0.450166003 = 0.975145190
    #   row 1: σ(−0.2) + (1 − σ(−0.3)) = 0.450166003 + 0.574442517 = 1.024608520
    close(losses_of("apo_down"), 0.975145190, 1.024608520)


def test_apo_down_pushes_the_chosen_down_once_it_leads():
    # c = 0, r = −10, β = 0.1: d/dπc [σ(βc) + 1 − σ(β(c − r))] = β(σ'(0) − σ'(1)), σ'(z) = σ(z)σ(−z)
    #   σ'(0) = 0.25, σ'(1) = σ(1)σ(−1) = 0.731058579·0.268941421 = 0.196611933
    #   → 0.1·(0.25 − 0.196611933) = 0.0053388067 > 0: raising the chosen raises the loss
    assert sigma(1) * sigma(-1) == pytest.approx(0.196611933, abs=1e-9)
    d_pc, d_pr = grads_of("apo_down", pc=t(-10), pr=t(-20), rc=t(-10), rr=t(-10))
    close(d_pc, 0.0053388067)
    # d/dπr [1 − σ(β(c − r))] = +β σ'(β(c − r)) = 0.1·σ'(1) = 0.0196611933: lowering the rejected helps
    close(d_pr, 0.0196611933)


def test_sppo_hard():
    # (c − 1/(2β))² + (r + 1/(2β))², 1/(2β) = 5 at β = 0.1:
    #   row 0: (1 − 5)² + (−1 + 5)² = 16 + 16 = 32
    #   row 1: (−2 − 5)² + (1 + 5)² = 49 + 36 = 85
    close(losses_of("sppo_hard"), 32.0, 85.0)
    # d/dπc = 2(c − 5) = −8, −14;  d/dπr = 2(r + 5) = 8, 12
    d_pc, d_pr = grads_of("sppo_hard")
    close(d_pc, -8.0, -14.0)
    close(d_pr, 8.0, 12.0)


def test_nca_pair():
    # −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr) = sp(−βc) + ½ sp(βc) + ½ sp(βr):
    #   row 0: sp(−0.1) + ½ sp(0.1) + ½ sp(−0.1) = 0.644396660 + 0.372198330 + 0.322198330 = 1.338793320
    #   row 1: sp(0.2) + ½ sp(−0.2) + ½ sp(0.1)  = 0.798138869 + 0.299069435 + 0.372198330 = 1.469406634
    close(losses_of("nca_pair"), 1.338793320, 1.469406634)
    # d/dπc = β(−σ(−βc) + ½σ(βc)): row 0: 0.1·(−0.475020813 + 0.262489594) = −0.0212531219
    # d/dπr = ½β σ(βr):           row 0: 0.05·σ(−0.1) = 0.05·0.475020813 = 0.0237510407
    d_pc, d_pr = grads_of("nca_pair")
    close(d_pc[0], -0.0212531219)
    close(d_pr[0], 0.0237510407)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_rewards_are_the_same_for_every_loss_type(loss_type):
    # β(πc − refc) = (0.1, −0.2), β(πr − refr) = (−0.1, 0.1), whatever the loss
    _, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type)
    close(chosen, 0.1, -0.2)
    close(rejected, -0.1, 0.1)
    assert not chosen.requires_grad and not rejected.requires_grad


# ----------------------------------------------------------------------------- the direction of learning


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_falls_as_the_margin_grows_by_lowering_the_rejected(loss_type):
    """From the reference point (c = r = 0) lowering πr, which grows the margin h, lowers every loss.
    (ipo and sppo_hard regress to a target margin, 1/(2β) = 5 here: this is on the way there.)"""
    lengths = {"chosen_lengths": t(1), "rejected_lengths": t(1)}
    values = [float(dpo_loss(t(-10), t(-10 + step), t(-10), t(-10), beta=0.1, loss_type=loss_type, **lengths)[0])
              for step in (0.0, -0.5, -1.0, -2.0)]
    assert values[0] > values[1] > values[2] > values[3], values
    _, d_pr = grads_of(loss_type, pc=t(-10), pr=t(-10), rc=t(-10), rr=t(-10), **lengths)
    assert d_pr > 0


@pytest.mark.parametrize("loss_type", [name for name in LOSS_TYPES if name != "apo_down"])
def test_raising_the_chosen_lowers_the_loss_at_the_reference(loss_type):
    lengths = {"chosen_lengths": t(1), "rejected_lengths": t(1)}
    d_pc, _ = grads_of(loss_type, pc=t(-10), pr=t(-10), rc=t(-10), rr=t(-10), **lengths)
    assert d_pc < 0


def test_apo_down_is_flat_in_the_chosen_at_the_reference():
    # r = 0: σ(βc) + 1 − σ(βc) = 1 for every c, so the chosen gets no gradient there
    d_pc, _ = grads_of("apo_down", pc=t(-10), pr=t(-10), rc=t(-10), rr=t(-10))
    close(d_pc, 0.0)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_gradients_never_reach_the_reference(loss_type):
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc, rr = RC.clone().requires_grad_(), RR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None and pr.grad is not None


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_stable_for_large_log_ratios(loss_type):
    # β = 1, refs 0: row 0 h = 1000, row 1 h = −1000; no overflow to inf or NaN
    pc, pr = t(0, -1000).requires_grad_(), t(-1000, 0).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, t(0, 0), t(0, 0), beta=1.0, loss_type=loss_type, label_smoothing=0.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_low_precision_inputs_give_fp32_outputs(loss_type):
    losses, chosen, rejected = dpo_loss(*(x.bfloat16() for x in (PC, PR, RC, RR)), beta=0.1, loss_type=loss_type)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32
    torch.testing.assert_close(losses, losses_of(loss_type))  # the inputs are exact in bf16


# ----------------------------------------------------------------------------- weighted mixtures


def test_mixture_is_the_weighted_sum_of_its_losses():
    # 0.8·sigmoid + 0.2·hinge:
    #   row 0: 0.8·sp(−0.2) + 0.2·0.8 = 0.478511095 + 0.16 = 0.638511095
    #   row 1: 0.8·sp(0.3)  + 0.2·1.3 = 0.683484195 + 0.26 = 0.943484195
    mixed = losses_of(["sigmoid", "hinge"], loss_weights=[0.8, 0.2])
    close(mixed, 0.638511095, 0.943484195)
    torch.testing.assert_close(mixed, 0.8 * losses_of("sigmoid") + 0.2 * losses_of("hinge"))


def test_mixture_of_three_with_default_weights_of_one():
    # weights default to 1.0 each (TRL's default): apo_zero + sppo_hard + nca_pair
    #   row 0: 0.950041626 + 32 + 1.338793320 = 34.288834946
    #   row 1: 1.074813184 + 85 + 1.469406634 = 87.544219818
    mixed = losses_of(["apo_zero", "sppo_hard", "nca_pair"])
    close(mixed, 34.288834946, 87.544219818, tol=1e-5)
    torch.testing.assert_close(mixed, losses_of("apo_zero") + losses_of("sppo_hard") + losses_of("nca_pair"))


def test_mixture_gradient_is_the_weighted_sum_of_gradients():
    # d/dπc of 0.5·hinge + 2·sppo_hard = 0.5·(−0.1) + 2·(−8) = −16.05 (row 0), 0.5·(−0.1) + 2·(−14) = −28.05
    d_pc, _ = grads_of(["hinge", "sppo_hard"], loss_weights=[0.5, 2.0])
    close(d_pc, -16.05, -28.05, tol=1e-5)


def test_label_smoothing_reaches_only_the_losses_that_read_it():
    # [sigmoid, hinge] with ε = 0.1: sigmoid becomes cDPO, sp(−x) + ε·x (test_dpo_loss.py: 0.618138869,
    # 0.824355244); hinge ignores ε (0.8, 1.3). Sum: 1.418138869, 2.124355244
    close(losses_of(["sigmoid", "hinge"], label_smoothing=0.1), 1.418138869, 2.124355244)


def test_loss_terms_by_name():
    terms = dpo_loss_terms(PC, PR, RC, RR, beta=0.1, loss_types=["hinge", "sppo_hard"])
    assert list(terms) == ["hinge", "sppo_hard"]
    close(terms["hinge"], 0.8, 1.3)
    close(terms["sppo_hard"], 32.0, 85.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"loss_type": "hinge_squared"}, "unknown loss_type 'hinge_squared'"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, "twice"),
        ({"loss_type": []}, "empty"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "1 loss weights for 2 loss types"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust"),
    ],
)
def test_dpo_loss_refuses_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(PC, PR, RC, RR, beta=0.1, **kwargs)


# ----------------------------------------------------------------------------- the objective and its params


def inputs(**extra) -> LossInputs:
    return LossInputs(chosen_logps=PC, rejected_logps=PR, ref_chosen_logps=RC, ref_rejected_logps=RR, **extra)


STANDARD_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("loss_type", ["hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair"])
def test_objective_single_new_type_has_the_standard_metrics(loss_type):
    out = DPO().loss(DPOParams(loss_type=loss_type), inputs())
    torch.testing.assert_close(out.losses, losses_of(loss_type))
    assert set(out.metrics) == STANDARD_METRICS
    close(out.metrics["rewards/margins"], 0.2, -0.3)
    close(out.metrics["rewards/accuracies"], 1.0, 0.0)


def test_objective_bco_pair_logs_its_reward_shift():
    out = DPO().loss(DPOParams(loss_type="bco_pair"), inputs())
    close(out.losses, 1.288949176, 1.542069466)
    assert set(out.metrics) == STANDARD_METRICS | {"bco/reward_shift"}
    close(out.metrics["bco/reward_shift"], -0.025)  # (0.1 − 0.2 − 0.1 + 0.1)/4
    out = DPO().loss(DPOParams(loss_type="bco_pair", bco_reward_shift="none"), inputs())
    close(out.losses, 1.288793320, 1.542535529)
    assert set(out.metrics) == STANDARD_METRICS


def test_objective_mixture_logs_each_loss_unweighted():
    params = DPOParams(loss_type=["sigmoid", "hinge"], loss_weights=[0.8, 0.2])
    out = DPO().loss(params, inputs())
    close(out.losses, 0.638511095, 0.943484195)
    assert set(out.metrics) == STANDARD_METRICS | {"loss/sigmoid", "loss/hinge"}
    close(out.metrics["loss/sigmoid"], 0.598138869, 0.854355244)
    close(out.metrics["loss/hinge"], 0.8, 1.3)
    close(out.metrics["rewards/chosen"], 0.1, -0.2)
    for value in out.metrics.values():
        assert not value.requires_grad


def test_objective_mixture_with_ipo_counts_tokens_from_masks():
    # One row: πc=−10 (5 tokens), πr=−12 (4 tokens), refc=−12, refr=−10, β = 0.5.
    #   ipo (test_dpo_loss.py): h_avg = 0.4 − (−0.5) = 0.9 → (0.9 − 1)² = 0.01
    #   hinge: h = 2 − (−2) = 4, x = 2 → max(0, 1 − 2) = 0
    #   0.5·0.01 + 3·0 = 0.005
    given = LossInputs(chosen_logps=t(-10), chosen_mask=torch.arange(6)[None, :] < 5,
                       rejected_logps=t(-12), rejected_mask=torch.arange(6)[None, :] < 4,
                       ref_chosen_logps=t(-12), ref_rejected_logps=t(-10))
    out = DPO().loss(DPOParams(beta=0.5, loss_type=["ipo", "hinge"], loss_weights=[0.5, 3.0]), given)
    close(out.losses, 0.005)


def test_objective_reference_free_new_type():
    # refs 0: c = −10, r = −12, β = 0.1 → sppo_hard: (−10 − 5)² + (−12 + 5)² = 225 + 49 = 274
    out = DPO().loss(DPOParams(loss_type="sppo_hard", reference_free=True),
                     LossInputs(chosen_logps=t(-10), rejected_logps=t(-12)))
    close(out.losses, 274.0)


def test_params_single_string_and_list():
    p = DPOParams(loss_type="hinge")
    assert p.loss_type == "hinge" and p.loss_types == ("hinge",) and p.weights == (1.0,)
    p = DPOParams(loss_type=["sigmoid", "hinge"], loss_weights=[0.8, 0.2])
    assert p.loss_types == ("sigmoid", "hinge") and p.weights == (0.8, 0.2)
    assert DPOParams(loss_type=["apo_zero", "nca_pair"]).weights == (1.0, 1.0)
    assert DPOParams().bco_reward_shift == "batch_mean" and DPOParams().loss_weights is None
    # label_smoothing is fine as soon as one listed loss reads it
    assert DPOParams(loss_type=["ipo", "sigmoid"], label_smoothing=0.1).label_smoothing == 0.1
    assert DPOParams(loss_type="robust", label_smoothing=0.2).label_smoothing == 0.2
    assert DPOParams(loss_type=["bco_pair", "sigmoid"], bco_reward_shift="none").bco_reward_shift == "none"
    assert all(f.description for f in DPOParams.model_fields.values())


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"loss_type": "dpo"}, "unknown loss_type 'dpo'; expected one of sigmoid, ipo, hinge, robust"),
        ({"loss_type": ["sigmoid", "exo_pair"]}, "unknown loss_type 'exo_pair'"),
        ({"loss_type": []}, "loss_type is empty"),
        ({"loss_type": ["hinge", "sigmoid", "hinge"]}, "names a loss type twice"),
        ({"loss_type": 3}, "loss_type"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]},
         "loss_weights has 1 entries but loss_type names 2 (sigmoid, hinge); give one weight per loss type"),
        ({"loss_type": "sigmoid", "loss_weights": [1.0, 1.0]}, "loss_weights has 2 entries but loss_type names 1"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, -0.5]}, "loss_weights must be >= 0; got -0.5"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, float("nan")]}, "finite number"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [float("inf"), 1.0]}, "finite number"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [0.0, 0.0]}, "all 0"),
        ({"loss_type": ["ipo", "hinge"], "label_smoothing": 0.1},
         "label_smoothing applies to loss_type 'sigmoid' (conservative DPO) and 'robust' only; loss_type is ipo, hinge"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "less than 0.5"),
        ({"loss_type": "sigmoid", "bco_reward_shift": "none"}, "bco_reward_shift applies to loss_type 'bco_pair' only"),
        ({"loss_type": "bco_pair", "bco_reward_shift": "running"}, "'batch_mean' or 'none'"),
    ],
)
def test_params_refuse_nonsense_with_a_clear_message(bad, message):
    with pytest.raises(ValidationError) as caught:
        DPOParams(**bad)
    assert message in str(caught.value)


def test_unknown_loss_type_is_one_error_not_a_union_dump():
    with pytest.raises(ValidationError) as caught:
        DPOParams(loss_type=["sigmoid", "hinge2"])
    assert caught.value.error_count() == 1


def test_recipe_error_names_the_key_and_the_choices():
    with pytest.raises(RecipeError) as caught:
        load_recipe(ROOT / "recipes" / "dpo_tiny.yaml", ["objective.params.loss_type=[sigmoid, hinge2]"],
                    registry=REGISTRY)
    text = str(caught.value)
    assert "objective.params.loss_type" in text and "unknown loss_type 'hinge2'" in text and "nca_pair" in text
    with pytest.raises(RecipeError) as caught:
        load_recipe(ROOT / "recipes" / "dpo_tiny.yaml",
                    ["objective.params.loss_type=[sigmoid, hinge]", "objective.params.loss_weights=[0.8]"],
                    registry=REGISTRY)
    assert "objective.params.loss_weights: loss_weights has 1 entries" in str(caught.value)


@pytest.mark.parametrize(
    "params",
    [{"loss_type": name} for name in NEW_TYPES if name != "robust"]
    + [{"loss_type": "robust", "label_smoothing": 0.1},
       {"loss_type": ["sigmoid", "hinge"], "loss_weights": [0.8, 0.2]},
       {"loss_type": ["ipo", "bco_pair"], "beta": 0.5}],
    ids=lambda p: "+".join([p["loss_type"]] if isinstance(p["loss_type"], str) else p["loss_type"]),
)
def test_conformance_on_the_tiny_model(params):
    from prefkit.testing import check_objective

    result = check_objective(DPO(), params)
    assert result.params == DPOParams(**params)
    assert {"loss_finite_scalar", "metrics", "pure", "gradients", "reference_used"} <= set(result.checked)


# ----------------------------------------------------------------------------- a real run


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(recipe: str, tmp_path: Path, *overrides: str) -> list[dict]:
    import prefkit.loops as engine

    loaded = load_recipe(ROOT / "recipes" / recipe, [f"output_dir={tmp_path}", *overrides], registry=REGISTRY)
    engine.train(loaded, registry=REGISTRY)
    return metrics_of(tmp_path)


def test_mixture_recipe_trains(tmp_path):
    records = train("dpo_mix_tiny.yaml", tmp_path)
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:  # the logged loss is the weighted sum of the logged, unweighted losses
        assert r["loss"] == pytest.approx(0.8 * r["loss/sigmoid"] + 0.2 * r["loss/hinge"], rel=1e-5)
    first, last = records[:4], records[-4:]
    assert mean(last, "loss") < mean(first, "loss") - 0.1
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.5
    assert "eval/loss/hinge" in records[11]


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_each_new_type_trains_on_the_tiny_recipe(loss_type, tmp_path):
    overrides = [f"objective.params.loss_type={loss_type}", "train.max_steps=12", "data.eval=null",
                 "train.save_every=null"]
    if loss_type == "robust":
        overrides.append("objective.params.label_smoothing=0.1")
    records = train("dpo_tiny.yaml", tmp_path, *overrides)
    assert all(math.isfinite(r["loss"]) for r in records)
    first, last = records[:3], records[-3:]
    assert mean(last, "loss") < mean(first, "loss"), [r["loss"] for r in records]
    if loss_type == "apo_down":  # what it is for: the chosen answers lose likelihood against the reference
        assert mean(last, "rewards/chosen") < mean(first, "rewards/chosen") - 0.5
    else:  # the preference is learnt
        assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.3


# ----------------------------------------------------------------------------- cross-check with TRL


@pytest.fixture(scope="module")
def trl_dpo_loss():
    """TRL's own DPO loss code on given log-probs: ``DPOTrainer._compute_loss`` called unbound on a
    stand-in for the trainer, with a stand-in model whose per-token log-probs sum to the wanted
    sequence log-probs and precomputed reference log-probs (TRL 1.x inlines every loss type in
    ``_compute_loss``; there is no smaller function to call). Returns ``f(pc, pr, rc, rr, *, beta,
    loss_types, loss_weights, label_smoothing, lengths) -> (mean loss, TRL's logged metrics)``."""
    trl = pytest.importorskip("trl")
    import inspect
    import warnings

    from packaging.version import Version

    if Version(trl.__version__) < Version("1.16"):
        pytest.skip(f"trl {trl.__version__}: this cross-check follows TRL 1.16's DPOTrainer._compute_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.dpo_trainer import DPOTrainer
    compute = getattr(DPOTrainer, "_compute_loss", None)
    if compute is None or list(inspect.signature(compute).parameters) != ["self", "model", "inputs", "return_outputs"]:
        pytest.skip("this trl's DPOTrainer has no _compute_loss(self, model, inputs, return_outputs)")

    def run(pc, pr, rc, rr, *, beta, loss_types, loss_weights=None, label_smoothing=0.0, lengths=None):
        b = pc.shape[0]
        lengths = lengths or [1] * (2 * b)  # completion tokens of [chosen..., rejected...]
        width = max(lengths)
        log_probs = torch.zeros(2 * b, width)
        log_probs[:, 0] = torch.cat([pc, pr])  # TRL sums the per-token values over the sequence
        # TRL's completion_mask covers prompt + completion; its row sums are the completion lengths
        completion_mask = torch.tensor([[0] + [1] * n + [0] * (width - n) for n in lengths])
        zeros = torch.zeros(2 * b, width)

        def model(**kwargs):
            return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

        accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
            loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types), beta=beta,
            label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
            _total_train_tokens=0, _tp_size=1,
        )
        batch = {"input_ids": torch.zeros(2 * b, width + 1, dtype=torch.long),
                 "attention_mask": torch.ones(2 * b, width + 1, dtype=torch.long),
                 "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
        loss = compute(trainer, model, batch, False)
        return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    return run


def cross_check_rows(beta: float):
    """Six pairs with log-probs of realistic size (sums over 5 to 40 tokens)."""
    g = torch.Generator().manual_seed(11)
    pc = -torch.rand(6, generator=g) * 60 - 5
    rc = pc + torch.randn(6, generator=g) * 2
    pr = -torch.rand(6, generator=g) * 60 - 5
    rr = pr + torch.randn(6, generator=g) * 2
    return pc, pr, rc, rr


CROSS = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1), ("robust", 0.0), ("bco_pair", 0.0),
         ("apo_zero", 0.0), ("apo_down", 0.0), ("sppo_hard", 0.0), ("nca_pair", 0.0)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", CROSS, ids=[f"{n}-eps{e}" for n, e in CROSS])
def test_matches_trl_per_pair(trl_dpo_loss, loss_type, eps, beta):
    """Each pair alone through TRL 1.16 (its loss is a batch mean, so one pair gives that pair's loss)
    against prefkit's per-pair losses, and TRL's logged reward metrics against ours. bco_pair:
    TRL 1.16 uses no reward shift (δ = 0), so prefkit's 'none' is compared directly, and prefkit's
    'batch_mean' by handing TRL the policy log-probs lowered by δ/β (then TRL's βc is βc − δ)."""
    pc, pr, rc, rr = cross_check_rows(beta)
    lengths = [5, 12, 7, 30, 1, 9, 40, 3, 16, 8, 2, 25]  # chosen then rejected, for ipo
    lc, lr = t(*lengths[:6]), t(*lengths[6:])
    shifts = ["none", "batch_mean"] if loss_type == "bco_pair" else ["batch_mean"]
    for shift in shifts:
        ours, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                          chosen_lengths=lc, rejected_lengths=lr, bco_shift=shift)
        offset = 0.0
        if loss_type == "bco_pair" and shift == "batch_mean":
            offset = float(torch.cat([chosen, rejected]).mean()) / beta  # δ/β
        for i in range(6):
            theirs, logged = trl_dpo_loss(pc[i:i + 1] - offset, pr[i:i + 1] - offset, rc[i:i + 1], rr[i:i + 1],
                                          beta=beta, loss_types=[loss_type], label_smoothing=eps,
                                          lengths=[lengths[i], lengths[6 + i]])
            assert abs(float(theirs) - float(ours[i])) <= 2e-5, (loss_type, shift, i, float(theirs), float(ours[i]))
            if offset == 0.0:
                assert logged["rewards/chosen"] == pytest.approx(float(chosen[i]), abs=2e-5)
                assert logged["rewards/rejected"] == pytest.approx(float(rejected[i]), abs=2e-5)
                assert logged["rewards/accuracies"] == float(chosen[i] > rejected[i])


def test_matches_trl_on_a_weighted_mixture(trl_dpo_loss):
    """TRL's loss_type list with loss_weights: Σ_k w_k · mean(L_k) equals the batch mean of ours."""
    pc, pr, rc, rr = cross_check_rows(0.1)
    types, weights = ["sigmoid", "hinge", "apo_zero", "nca_pair"], [0.8, 0.2, 0.5, 1.5]
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=types, loss_weights=weights)
    theirs, logged = trl_dpo_loss(pc, pr, rc, rr, beta=0.1, loss_types=types, loss_weights=weights)
    assert abs(float(theirs) - float(ours.mean())) <= 2e-5
    out = DPO().loss(DPOParams(loss_type=types, loss_weights=weights),
                     LossInputs(chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr))
    assert abs(float(theirs) - float(out.losses.mean())) <= 2e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert logged[name] == pytest.approx(float(out.metrics[name].mean()), abs=2e-5), name
