"""Tests for REINFORCE with a leave-one-out baseline, with the arithmetic written out by hand."""

import pytest
import torch

from prefkit.api import OnlineInputs, Rollout
from prefkit.testing import check_objective, check_registered
from prefkit_reinforce import ReinforceLOO, ReinforceParams, loo_advantages, reinforce_loss


def test_loo_advantages_golden_values():
    # prompt 0 has four samples (rows 0, 2, 4, 5) scoring 1, 2, 3, 6: they sum to 12, so
    #   row 0: 1 - (12 - 1)/3 = -8/3    row 2: 2 - (12 - 2)/3 = -4/3
    #   row 4: 3 - (12 - 3)/3 = 0       row 5: 6 - (12 - 6)/3 = 4
    # prompt 1 has two (rows 1, 3) scoring 0 and 1:  row 1: 0 - 1 = -1,  row 3: 1 - 0 = 1
    scores = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0, 6.0])
    group_ids = torch.tensor([0, 1, 0, 1, 0, 0])
    advantages = loo_advantages(scores, group_ids)
    torch.testing.assert_close(advantages, torch.tensor([-8 / 3, -1.0, -4 / 3, 1.0, 0.0, 4.0]))
    # the advantages of each prompt sum to zero: G/(G-1) * (score - the prompt's mean score)
    torch.testing.assert_close(advantages[group_ids == 0], 4 / 3 * (scores[group_ids == 0] - 3.0))


def test_loo_advantages_need_two_samples_per_prompt():
    with pytest.raises(ValueError, match="at least 2 samples"):
        loo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_loss_golden_values():
    # row 0: advantage 2, two tokens with log-probs -1 and -2: -2*(-1) + -2*(-2) = 2 + 4 = 6
    # row 1: advantage -1, one token with log-prob -3:        -(-1)*(-3)         = -3
    # three tokens: loss = (6 - 3) / 3 = 1; the padding (zeros here) counts for nothing
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = reinforce_loss(logps, torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()  # d loss / d logp = -advantage / 3 on each token, 0 on padding
    torch.testing.assert_close(logps.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def make_rollout(scores, group_ids, logps, ref_logps, mask):
    n = len(scores)
    return Rollout(step=0, prompts=["a"] * n, completions=["b"] * n, group_ids=torch.tensor(group_ids),
                   scores=torch.tensor(scores), finished=torch.ones(n, dtype=torch.bool), mask=torch.tensor(mask),
                   logps=torch.tensor(logps), ref_logps=None if ref_logps is None else torch.tensor(ref_logps),
                   entropy=torch.zeros(len(mask), len(mask[0])))


MASK = [[True, True, False], [True, False, False], [True, True, True], [True, True, False]]
LOGPS = [[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]]
REF_LOGPS = [[-1.5, -2.5, -9.0], [-1.0, 0.0, -9.0], [-0.5, -1.0, -1.0], [-2.0, -3.0, -9.0]]  # -9: padding


def test_prepare_with_a_kl_penalty():
    # sequence KL (old - ref over each completion's tokens): 0.5 + 0.5 = 1, 0, -0.5 + 0 + 0 = -0.5, 0 + 1 = 1
    # scores 1, 0 (prompt 0) and 0.5, 0.5 (prompt 1), minus 0.5 * KL: 0.5, 0, 0.75, 0
    # leave-one-out: 0.5 - 0 = 0.5, 0 - 0.5 = -0.5, 0.75 - 0 = 0.75, 0 - 0.75 = -0.75
    rollout = make_rollout([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1], LOGPS, REF_LOGPS, MASK)
    metrics = ReinforceLOO().prepare(ReinforceParams(kl_coef=0.5), rollout, None)
    torch.testing.assert_close(rollout.extras["advantages"], torch.tensor([0.5, -0.5, 0.75, -0.75]))
    assert metrics["reward/total"] == pytest.approx((0.5 + 0 + 0.75 + 0) / 4)  # 0.3125


def test_prepare_normalized_without_a_reference():
    # no KL: advantages 1 - 0 = 1, 0 - 1 = -1, 0.5 - 0.5 = 0, 0; their std over the rollout is
    # sqrt((1 + 1 + 0 + 0) / 4) = sqrt(0.5), so normalised: +-1/sqrt(0.5) = +-sqrt(2), 0, 0
    rollout = make_rollout([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1], LOGPS, None, MASK)
    metrics = ReinforceLOO().prepare(ReinforceParams(normalize=True), rollout, None)
    torch.testing.assert_close(rollout.extras["advantages"], torch.tensor([2**0.5, -(2**0.5), 0.0, 0.0]))
    assert metrics["advantages/std"] == pytest.approx(0.5**0.5)
    assert "reward/total" not in metrics


def test_loss_on_online_inputs():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    inputs = OnlineInputs(logps=logps, mask=mask, old_logps=logps.detach().clone(), ref_logps=None, outputs={},
                          old_outputs={}, extras={"advantages": torch.tensor([2.0, -1.0])},
                          scores=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]))
    out = ReinforceLOO().loss(ReinforceParams(), inputs)
    assert out.losses.dim() == 0 and out.losses.requires_grad  # the chunk's token mean, as in the golden test
    torch.testing.assert_close(out.losses, torch.tensor(1.0))
    torch.testing.assert_close(out.metrics["logps/mean"], torch.tensor(-2.0))  # (-1 - 2 - 3) / 3
    torch.testing.assert_close(out.metrics["policy/approxkl"], torch.tensor(0.0))  # the sampling policy itself


def test_needs():
    objective = ReinforceLOO()
    assert objective.needs(ReinforceParams()).reference is False  # no KL penalty: no reference pass
    assert objective.needs(ReinforceParams(kl_coef=0.05)).reference is True
    assert objective.min_samples_per_prompt(ReinforceParams()) == 2
    assert objective.loss_unit(ReinforceParams()) == "token"


def test_conformance():
    # registration, params through YAML, unknown keys refused, valid needs; for an online
    # objective also a real rollout and update of prefkit's online loop on a tiny model
    check_objective(ReinforceLOO())
    check_objective(ReinforceLOO(), {"kl_coef": 0.05, "normalize": True})


def test_registered_through_its_entry_point():
    # skipped until the package is installed (pip install ./prefkit-reinforce)
    check_registered("reinforce_loo", distribution="prefkit-reinforce")
