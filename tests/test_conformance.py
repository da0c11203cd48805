"""Every built-in objective passes prefkit.testing's conformance check, and the check catches
objectives that break the contract."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel

from prefkit.api.objective import LossOutput, Needs, Objective, ObjectiveParams
from prefkit.plugins import build_registry
from prefkit.testing import (  # noqa: F401  (the tiny_* are fixtures)
    ConformanceError,
    check_objective,
    check_registered,
    make_loss_inputs,
    tiny_model,
    tiny_pair_batch,
    tiny_reward_model,
    tiny_sft_batch,
    tiny_tokenizer,
)

REGISTRY = build_registry()
BUILTINS = sorted(
    name for (kind, name), plugin in REGISTRY.owners.items() if kind == "objectives" and REGISTRY.plugins[plugin].builtin
)

# The variants a built-in's params select, beyond its defaults.
VARIANTS = {
    "dpo": [{"loss_type": "ipo", "beta": 0.5}, {"label_smoothing": 0.1}, {"reference_free": True}],
    "bt_reward": [{"center_coef": 0.01}, {"use_margin": False}],
    "preferred_ft": [{"average": "sequence"}],
    "unlikelihood": [{"average": "sequence"}, {"alpha": 0.0}],
}


def test_the_builtins_are_all_found():
    assert {"dpo", "bt_reward", "preferred_ft", "unlikelihood", "best_of_n"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_objective_conforms(name):
    objective = REGISTRY.objectives[name]
    result = check_objective(objective)
    if objective.kind == "offline":
        assert {"loss_finite_scalar", "metrics", "pure", "gradients"} <= set(result.checked)
        assert result.loss is not None
    elif objective.kind == "online":  # one real iteration of the online loop ran
        assert result.checked[-1] == "online_loop_one_iteration" and result.loss is not None
    else:
        assert result.checked[-1] == "inference_sample"
    assert type(check_registered(name, distribution="prefkit")) is type(objective)


@pytest.mark.parametrize("name,params", [(n, p) for n, ps in VARIANTS.items() for p in ps])
def test_builtin_objective_variants_conform(name, params):
    result = check_objective(REGISTRY.objectives[name], params)
    assert result.params == REGISTRY.objectives[name].Params(**params)
    if REGISTRY.objectives[name].needs(result.params).reference:
        assert "reference_used" in result.checked


# ----------------------------------------------------------------------------- fixtures


def test_fixtures(tiny_tokenizer, tiny_model, tiny_reward_model, tiny_pair_batch, tiny_sft_batch):
    assert len(tiny_tokenizer) == 260 and tiny_tokenizer.chat_template
    assert tiny_model.config.vocab_size == 260 and tiny_model.training
    assert tiny_reward_model.config.num_labels == 1
    assert tiny_pair_batch.names == ("chosen", "rejected") and tiny_pair_batch.input_ids.shape[0] == 6
    assert tiny_sft_batch.names == ("chosen",) and tiny_sft_batch.input_ids.shape[0] == 3
    lengths = tiny_pair_batch.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2  # answers of different lengths

    inputs = make_loss_inputs(tiny_model, tiny_pair_batch, Needs(data="pairs", reference=True))
    # the reference is the initial policy, so it equals the policy's own log-probs
    torch.testing.assert_close(inputs.ref_chosen_logps, inputs.chosen_logps.detach())
    assert inputs.chosen_logps.requires_grad and not inputs.ref_chosen_logps.requires_grad
    rewards = make_loss_inputs(tiny_reward_model, tiny_pair_batch, Needs(head="scalar"))
    assert rewards.chosen_rewards.shape == (3,) and rewards.chosen_logps is None


# ----------------------------------------------------------------------------- the check catches


class Base(Objective):
    name = "probe"
    description = "a test objective"

    def loss(self, params, inputs):
        return LossOutput(losses=-inputs.chosen_logps / inputs.chosen_lengths)


def make(**attributes) -> Objective:
    return type("Probe", (Base,), attributes)()


def loss_from(function):
    return lambda self, params, inputs: function(inputs)


CATCHES = {
    "a scalar loss": (
        loss_from(lambda i: LossOutput(losses=-i.chosen_logps.mean())),
        "must be one value per example, shape (3,)",
    ),
    "a detached loss": (
        loss_from(lambda i: LossOutput(losses=-i.chosen_logps.detach())),
        "the losses carry no gradient",
    ),
    "a non-finite loss": (
        loss_from(lambda i: LossOutput(losses=i.chosen_logps * float("inf"))),
        "the losses are not finite",
    ),
    "a metric with a gradient": (
        loss_from(lambda i: LossOutput(losses=-i.chosen_logps, metrics={"logps/chosen": i.chosen_logps})),
        "metric 'logps/chosen' carries gradients",
    ),
    "a metric of the wrong shape": (
        loss_from(lambda i: LossOutput(losses=-i.chosen_logps, metrics={"m": torch.zeros(2, 2)})),
        "metric 'm' has shape (2, 2)",
    ),
    "a random loss": (
        loss_from(lambda i: LossOutput(losses=-i.chosen_logps * torch.rand(1))),
        "not a pure function",
    ),
    "reading what was not declared": (
        loss_from(lambda i: LossOutput(losses=i.ref_chosen_logps - i.chosen_logps)),
        "for which the engine provides only: chosen_logps, chosen_mask, chosen_token_logps, rejected_logps",
    ),
    "no gradient to the model": (
        loss_from(lambda i: LossOutput(losses=torch.zeros(3, requires_grad=True) * 1.0)),
        "no gradient reaches 21 of 21 trainable parameters, e.g. model.embed_tokens.weight",
    ),
    "zero gradients": (
        loss_from(lambda i: LossOutput(losses=i.chosen_logps * 0.0)),
        "every gradient is zero",
    ),
}


@pytest.mark.parametrize("case", sorted(CATCHES))
def test_check_catches(case):
    loss, expected = CATCHES[case]
    with pytest.raises(ConformanceError, match="objective 'probe': ") as info:
        check_objective(make(loss=loss))
    assert expected in str(info.value)


def test_check_catches_an_unused_reference():
    probe = make(needs=lambda self, params: Needs(reference=True))
    with pytest.raises(ConformanceError, match="declares Needs\\(reference=True\\) but its loss ignores"):
        check_objective(probe)


def test_check_catches_needs_the_offline_engine_never_builds():
    probe = make(needs=lambda self, params: Needs(generation=True))
    with pytest.raises(ConformanceError, match="declares Needs generation, which the offline engine never builds"):
        check_objective(probe)


def test_check_catches_params_that_accept_unknown_keys_or_do_not_round_trip():
    class Loose(BaseModel):
        beta: float = 0.1

    with pytest.raises(ConformanceError, match="accepts unknown keys"):
        check_objective(make(Params=Loose))

    class Odd(ObjectiveParams):
        when: object = float("nan")  # nan != nan: the round trip cannot give back an equal value

    with pytest.raises(ConformanceError, match="change in a YAML round trip"):
        check_objective(make(Params=Odd))


def test_check_asks_for_params_when_some_are_required():
    class Required(ObjectiveParams):
        beta: float

    with pytest.raises(ConformanceError, match="pass params=... to check_objective"):
        check_objective(make(Params=Required))
    assert check_objective(make(Params=Required), {"beta": 0.5}).params.beta == 0.5


def test_check_registered_reports_a_missing_objective():
    with pytest.raises(ConformanceError, match="no objective named 'nope' is registered"):
        check_registered("nope")
    # a distribution that is installed (pytest) but does not register the objective
    with pytest.raises(ConformanceError, match="registered by prefkit 0.1.0 \\(dpo\\), not by pytest"):
        check_registered("dpo", distribution="pytest")
