"""Golden tests for the DPO objective, with the arithmetic written out by hand.

Notation: πc, πr are policy log-probs of chosen/rejected (sums over completion tokens), refc, refr
the reference ones, β the KL strength, x = β·logits, softplus(z) = log(1 + e^z) = −log σ(−z).
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from prefkit.api.objective import LossInputs, Needs
from prefkit_builtins.dpo import DPO, DPOParams, dpo_loss

METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(*expected), atol=tol, rtol=0)


def mask(*lengths: int, width: int = 6) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# Two rows used throughout, β = 0.1:
#   row 0: πc=−10, πr=−12, refc=−11, refr=−11 → logits = (−10+12) − (−11+11) = 2 − 0 = 2,  x = 0.2
#   row 1: πc=−15, πr=−12, refc=−13, refr=−13 → logits = (−15+12) − 0 = −3,             x = −0.3
PC, PR, RC, RR = t(-10, -15), t(-12, -12), t(-11, -13), t(-11, -13)


def test_sigmoid_dpo_loss_and_rewards():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # row 0: −log σ(0.2)  = log(1 + e^−0.2) = log(1.818730753) = 0.598138869
    # row 1: −log σ(−0.3) = log(1 + e^0.3)  = log(2.349858808) = 0.854355244
    close(losses, 0.598138869, 0.854355244)
    # chosen = β(πc − refc): 0.1·(−10+11) = 0.1,   0.1·(−15+13) = −0.2
    # rejected = β(πr − refr): 0.1·(−12+11) = −0.1, 0.1·(−12+13) = 0.1
    close(chosen, 0.1, -0.2)
    close(rejected, -0.1, 0.1)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32


def test_conservative_dpo_label_smoothing():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    # loss = 0.9·softplus(−x) + 0.1·softplus(x), and softplus(x) = x + softplus(−x), so
    # loss = softplus(−x) + 0.1·x
    # row 0: 0.598138869 + 0.1·0.2    = 0.618138869
    # row 1: softplus(0.3) + 0.1·(−0.3) = 0.854355244 − 0.03 = 0.824355244
    close(losses, 0.618138869, 0.824355244)


def test_label_smoothing_zero_is_plain_dpo():
    plain, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    smoothed, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.0)
    torch.testing.assert_close(plain, smoothed)


def test_ipo_uses_length_averaged_logps():
    # πc=−10 over |yc|=5 tokens → −2;  refc=−12 / 5 → −2.4
    # πr=−12 over |yr|=4 tokens → −3;  refr=−10 / 4 → −2.5
    # h = (−2 − (−2.4)) − (−3 − (−2.5)) = 0.4 − (−0.5) = 0.9
    pc, pr, rc, rr = t(-10), t(-12), t(-12), t(-10)
    lengths = {"chosen_lengths": t(5), "rejected_lengths": t(4)}
    # β = 0.5 → target 1/(2β) = 1 → loss = (0.9 − 1)² = 0.01
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", **lengths)
    close(losses, 0.01)
    # rewards stay on summed log-probs: 0.5·(−10+12) = 1.0, 0.5·(−12+10) = −1.0
    close(chosen, 1.0)
    close(rejected, -1.0)
    # β = 0.1 → target 5 → loss = (0.9 − 5)² = 4.1² = 16.81
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", **lengths)
    close(losses, 16.81, tol=1e-4)


def test_ipo_requires_lengths():
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge_squared")  # type: ignore[arg-type]


def test_objective_loss_and_metrics():
    out = DPO().loss(DPOParams(beta=0.1), LossInputs(chosen_logps=PC, rejected_logps=PR, ref_chosen_logps=RC, ref_rejected_logps=RR))
    close(out.losses, 0.598138869, 0.854355244)
    assert set(out.metrics) == METRICS
    close(out.metrics["rewards/chosen"], 0.1, -0.2)
    close(out.metrics["rewards/rejected"], -0.1, 0.1)
    # margins = chosen − rejected: 0.1 − (−0.1) = 0.2,  −0.2 − 0.1 = −0.3
    close(out.metrics["rewards/margins"], 0.2, -0.3)
    # accuracies = [chosen > rejected]: row 0 yes, row 1 no
    close(out.metrics["rewards/accuracies"], 1.0, 0.0)
    close(out.metrics["logps/chosen"], -10, -15)
    close(out.metrics["logps/rejected"], -12, -12)
    for value in out.metrics.values():
        assert value.shape == (2,) and not value.requires_grad


def test_objective_reference_free_passes_zeros():
    params = DPOParams(beta=0.1, reference_free=True)
    inputs = LossInputs(chosen_logps=t(-10), rejected_logps=t(-12))  # no reference log-probs at all
    out = DPO().loss(params, inputs)
    # refs are 0 → logits = −10 − (−12) = 2, x = 0.2 → loss = softplus(−0.2) = 0.598138869
    close(out.losses, 0.598138869)
    # rewards = β·πc = 0.1·(−10) = −1.0, β·πr = 0.1·(−12) = −1.2, margin 0.2
    close(out.metrics["rewards/chosen"], -1.0)
    close(out.metrics["rewards/rejected"], -1.2)
    close(out.metrics["rewards/margins"], 0.2)


def test_objective_without_reference_logps_is_a_clear_error():
    with pytest.raises(ValueError, match="reference"):
        DPO().loss(DPOParams(), LossInputs(chosen_logps=t(-10), rejected_logps=t(-12)))


def test_objective_ipo_counts_tokens_from_masks():
    # same numbers as test_ipo_uses_length_averaged_logps: |yc| = 5, |yr| = 4 → loss 0.01
    inputs = LossInputs(
        chosen_logps=t(-10),
        chosen_mask=mask(5),
        rejected_logps=t(-12),
        rejected_mask=mask(4),
        ref_chosen_logps=t(-12),
        ref_rejected_logps=t(-10),
    )
    out = DPO().loss(DPOParams(beta=0.5, loss_type="ipo"), inputs)
    close(out.losses, 0.01)


def test_needs():
    assert DPO().needs(DPOParams()) == Needs(data="pairs", reference=True)
    assert DPO().needs(DPOParams(reference_free=True)) == Needs(data="pairs", reference=False)


def test_params_defaults():
    p = DPOParams()
    assert (p.beta, p.loss_type, p.label_smoothing, p.reference_free) == (0.1, "sigmoid", 0.0, False)
    assert all(f.description for f in DPOParams.model_fields.values())


@pytest.mark.parametrize(
    "bad",
    [
        {"betta": 0.1},
        {"beta": 0.0},
        {"beta": -1.0},
        {"label_smoothing": 0.5},
        {"label_smoothing": -0.1},
        {"loss_type": "hinge_squared"},
        {"loss_type": "ipo", "label_smoothing": 0.1},
    ],
)
def test_params_refuse_bad_values(bad):
    with pytest.raises(ValidationError):
        DPOParams(**bad)


def test_gradients_reach_policy_not_reference():
    pc, pr = t(-10).requires_grad_(), t(-12).requires_grad_()
    rc, rr = t(-11).requires_grad_(), t(-11).requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    # d/dπc −log σ(β·logits) = −β·σ(−x) = −0.1·σ(−0.2) = −0.1·0.450166003 = −0.0450166003; πr gets +
    close(pc.grad, -0.0450166003)
    close(pr.grad, 0.0450166003)
    assert rc.grad is None and rr.grad is None
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gradients_reach_policy_through_objective(loss_type):
    pc, pr = t(-10, -15).requires_grad_(), t(-12, -12).requires_grad_()
    rc, rr = t(-11, -13).requires_grad_(), t(-11, -13).requires_grad_()
    inputs = LossInputs(
        chosen_logps=pc,
        chosen_mask=mask(5, 3),
        rejected_logps=pr,
        rejected_mask=mask(4, 2),
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
    )
    DPO().loss(DPOParams(loss_type=loss_type), inputs).losses.mean().backward()
    assert torch.all(pc.grad != 0) and torch.all(pr.grad != 0)
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_stable_for_large_logits(smoothing):
    # β = 1, refs 0: row 0 logits = 0 − (−1000) = 1000, row 1 logits = −1000 − 0 = −1000
    pc, pr = t(0, -1000).requires_grad_(), t(-1000, 0).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, t(0, 0), t(0, 0), beta=1.0, label_smoothing=smoothing)
    losses.sum().backward()
    # loss = softplus(−x) + ε·x: row 0 → e^−1000 ≈ 0 + 1000ε, row 1 → 1000 − 1000ε
    close(losses, 1000 * smoothing, 1000 - 1000 * smoothing, tol=1e-3)
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_low_precision_inputs_give_fp32_outputs():
    losses, chosen, rejected = dpo_loss(*(x.bfloat16() for x in (PC, PR, RC, RR)), beta=0.1)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32
    close(losses, 0.598138869, 0.854355244)  # the inputs are exact in bf16


def test_registered_through_entry_point():
    from prefkit.plugins import build_registry

    reg = build_registry()  # other built-in plugins may still be missing: their problems are ignored
    assert "dpo" in reg.objectives and reg.owners[("objectives", "dpo")] == "dpo"
    assert isinstance(reg.objectives["dpo"], DPO)
    assert not [p for p in reg.problems if "'dpo'" in p]


def test_math_reference_values():
    # the literals above, checked once against the math module (not the code under test)
    assert math.log1p(math.exp(-0.2)) == pytest.approx(0.598138869)
    assert math.log1p(math.exp(0.3)) == pytest.approx(0.854355244)
    assert 0.1 / (1 + math.exp(0.2)) == pytest.approx(0.0450166003)
