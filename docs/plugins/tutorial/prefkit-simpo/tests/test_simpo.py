"""Tests for the SimPO objective, with the arithmetic written out by hand."""

import math

import torch

from prefkit.api import Needs
from prefkit.testing import check_objective, check_registered, make_loss_inputs
from prefkit_simpo import SimPO, SimPOParams, simpo_loss


def test_golden_values():
    # row 0: chosen -10 over 5 tokens = -2 per token, rejected -12 over 4 tokens = -3 per token
    #        beta 2, gamma 1: x = 2*(-2) - 2*(-3) - 1 = -4 + 6 - 1 = 1
    #        loss = -log sigmoid(1) = log(1 + e^-1) = 0.313261688
    # row 1: chosen -6 over 2 tokens = -3, rejected -4 over 4 tokens = -1
    #        x = 2*(-3) - 2*(-1) - 1 = -6 + 2 - 1 = -5,  loss = log(1 + e^5) = 5.006715348
    losses, chosen, rejected = simpo_loss(
        torch.tensor([-10.0, -6.0]), torch.tensor([-12.0, -4.0]),
        torch.tensor([5, 2]), torch.tensor([4, 4]),
        beta=2.0, gamma=1.0,
    )
    torch.testing.assert_close(losses, torch.tensor([0.313261688, 5.006715348]))
    torch.testing.assert_close(chosen, torch.tensor([-4.0, -6.0]))  # beta * average log-prob
    torch.testing.assert_close(rejected, torch.tensor([-6.0, -2.0]))
    assert math.isclose(math.log1p(math.exp(-1)), 0.313261688, rel_tol=1e-8)


def test_conformance():
    # params round-trip through YAML, needs are honoured, the loss is a finite scalar, and the
    # gradients reach the model: on a tiny random Llama, through prefkit's own engine path
    check_objective(SimPO())
    check_objective(SimPO(), SimPOParams(beta=2.5, gamma=0.0))


def test_on_a_real_batch(tiny_model, tiny_pair_batch):
    # fixtures from prefkit.testing: a tiny Llama and three tokenized preference pairs
    inputs = make_loss_inputs(tiny_model, tiny_pair_batch, Needs(data="pairs"))
    out = SimPO().loss(SimPOParams(), inputs)
    assert out.losses.shape == (3,)
    # the rewards are beta times the average log-prob per answer token
    expected = 2.0 * inputs.chosen_logps.detach() / inputs.chosen_lengths
    torch.testing.assert_close(out.metrics["rewards/chosen"], expected)


def test_registered_through_its_entry_point():
    # skipped until the package is installed (pip install ./prefkit-simpo)
    check_registered("simpo", distribution="prefkit-simpo")
