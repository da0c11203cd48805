"""Golden tests for the unlikelihood objective, with the arithmetic written out by hand.

Notation: logp is a per-token log-prob, p = e^logp, UL(logp) = −log(1 − p) the unlikelihood penalty of
one rejected token; α the weight of the unlikelihood term.
loss = mean over chosen tokens of −logp + α · mean over rejected tokens of UL(logp)   ("token")
     = sum  over chosen tokens of −logp + α · sum  over rejected tokens of UL(logp)   ("sequence")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from prefkit.api.objective import LossInputs, Needs
from prefkit_builtins.preferred_ft import sft_loss
from prefkit_builtins.unlikelihood import (
    MAX_LOGP,
    Unlikelihood,
    UnlikelihoodParams,
    capped_logp,
    log1mexp,
    unlikelihood_loss,
)

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "unlikelihood_tiny.yaml"
NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(*expected), atol=tol, rtol=0)


def mask(*lengths: int, width: int = 4) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# Two pairs used throughout (width 4, padding zero as the engine gives):
#   chosen   row 0: [−1, −2]              n=2  mean NLL 1.5,  Σ logp −3
#   chosen   row 1: [−0.5, −0.25, −0.75]  n=3  mean NLL 0.5,  Σ logp −1.5
#   rejected row 0: [−0.5, −2]            p = e^−0.5 = 0.60653066 → UL = −log(0.39346934) = 0.93275213
#                                         p = e^−2   = 0.13533528 → UL = −log(0.86466472) = 0.14541346
#                                         mean UL (0.93275213 + 0.14541346)/2 = 0.53908279,  Σ logp −2.5
#   rejected row 1: [−ln 2, −2]           p = 0.5 → UL = ln 2 = 0.69314718;  0.14541346 as above
#                                         mean UL (0.69314718 + 0.14541346)/2 = 0.41928032,  Σ logp −2.69314718
CHOSEN = torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-0.5, -0.25, -0.75, 0.0]])
CHOSEN_MASK = mask(2, 3)
REJECTED = torch.tensor([[-0.5, -2.0, 0.0, 0.0], [-LN2, -2.0, 0.0, 0.0]])
REJECTED_MASK = mask(2, 2)
ARGS = (CHOSEN, CHOSEN_MASK, REJECTED, REJECTED_MASK)


def test_token_average_loss_and_term():
    losses, term = unlikelihood_loss(*ARGS, alpha=1.0)
    # row 0: 1.5 + 0.53908279 = 2.03908279;  row 1: 0.5 + 0.41928032 = 0.91928032
    close(losses, 2.03908279, 0.91928032)
    close(term, 0.53908279, 0.41928032)
    assert losses.dtype == term.dtype == torch.float32 and not term.requires_grad


def test_alpha_weights_the_unlikelihood_term():
    losses, term = unlikelihood_loss(*ARGS, alpha=0.5)
    # row 0: 1.5 + 0.5·0.53908279 = 1.76954140;  row 1: 0.5 + 0.5·0.41928032 = 0.70964016
    close(losses, 1.76954140, 0.70964016)
    close(term, 0.53908279, 0.41928032)  # the term is logged before α


def test_sequence_average_sums_each_term():
    losses, term = unlikelihood_loss(*ARGS, alpha=1.0, average="sequence")
    # row 0: 3 + (0.93275213 + 0.14541346) = 4.07816559;  row 1: 1.5 + (0.69314718 + 0.14541346) = 2.33856064
    close(losses, 4.07816559, 2.33856064)
    close(term, 1.07816559, 0.83856064)


def test_alpha_zero_is_sft_on_chosen_and_ignores_rejected():
    rejected = REJECTED.clone().requires_grad_()
    for average in ["token", "sequence"]:
        losses, _ = unlikelihood_loss(CHOSEN, CHOSEN_MASK, rejected, REJECTED_MASK, alpha=0.0, average=average)
        torch.testing.assert_close(losses, sft_loss(CHOSEN, CHOSEN_MASK, average=average))
        losses.sum().backward()
        assert torch.all(rejected.grad == 0)


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_alpha_out_of_range_is_refused_by_the_function(alpha):
    with pytest.raises(ValueError, match="alpha"):
        unlikelihood_loss(*ARGS, alpha=alpha)


def test_log1mexp_matches_math_on_both_branches():
    # −ln 2 = −0.693147 is where the branches meet; near 0 the naive log(1 − exp(x)) in fp32 loses
    # every digit (1 − e^−1e−5 cancels), log1mexp does not: log(1 − e^−1e−5) = −11.51293046
    xs = [-1e-5, -1e-3, -0.1, -0.5, -0.69, -0.6932, -0.7, -1.0, -5.0, -20.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32))
    want = torch.tensor([math.log(-math.expm1(x)) for x in xs], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_cap_keeps_value_bounded_and_gradient_flowing():
    x = torch.tensor([0.0, -1e-12, -1e-6, -0.5], requires_grad=True)
    y = capped_logp(x)
    close(y.detach(), MAX_LOGP, MAX_LOGP, MAX_LOGP, -0.5, tol=0)
    y.sum().backward()
    close(x.grad, 1.0, 1.0, 1.0, 1.0, tol=0)  # straight-through: the gradient of the identity


def test_stable_when_rejected_tokens_are_certain_or_impossible():
    # rejected logps 0 (p = 1 exactly), −1e−12 (p = 1 in fp32), −100 (p ≈ 3.7e−44): all three tokens counted.
    # The first two are capped at −1e−6: UL = −log(1 − e^−1e−6) = −log(9.999995e−7) = 13.81551106 each;
    # −100 gives −log(1 − 3.7e−44) ≈ 0. Mean UL = (2 · 13.81551106 + 0) / 3 = 9.21034071.
    rejected = torch.tensor([[0.0, -1e-12, -100.0]], requires_grad=True)
    chosen = torch.tensor([[-1.0, 0.0, 0.0]], requires_grad=True)
    losses, term = unlikelihood_loss(chosen, mask(1, width=3), rejected, mask(3, width=3), alpha=1.0)
    close(term, 9.21034071, tol=1e-4)
    close(losses, 1.0 + 9.21034071, tol=1e-4)
    losses.sum().backward()
    assert torch.isfinite(rejected.grad).all() and torch.isfinite(chosen.grad).all()
    # the gradient pushes the certain tokens down (positive d loss / d logp, descent lowers logp):
    # (1/3) · e^x/(1 − e^x) at the cap x = −1e−6 = (1/3) · 999999.5 = 333333.2; at −100 it is ≈ 0
    torch.testing.assert_close(rejected.grad[0, :2], t(333333.2, 333333.2), rtol=1e-4, atol=0)
    assert 0 <= rejected.grad[0, 2] < 1e-30


def test_penalty_grows_with_the_probability_of_a_rejected_token():
    logps = torch.linspace(-10.0, -1e-9, 200)[:, None]  # one rejected token per row
    _, term = unlikelihood_loss(torch.full_like(logps, -1.0), torch.ones_like(logps, dtype=torch.bool),
                                logps, torch.ones_like(logps, dtype=torch.bool))
    assert torch.isfinite(term).all()
    assert torch.all(term[1:] >= term[:-1]) and term[0] < 1e-4 and term[-1] == term.max()


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_padding_is_ignored_even_if_garbage(average):
    chosen = torch.tensor([[-1.0, -2.0, NAN, INF], [-0.5, -0.25, -0.75, -INF]], requires_grad=True)
    rejected = torch.tensor([[-0.5, -2.0, 0.0, NAN], [-LN2, -2.0, 1e9, -INF]], requires_grad=True)
    losses, term = unlikelihood_loss(chosen, CHOSEN_MASK, rejected, REJECTED_MASK, average=average)
    clean_losses, clean_term = unlikelihood_loss(*ARGS, average=average)
    torch.testing.assert_close(losses, clean_losses)
    torch.testing.assert_close(term, clean_term)
    losses.sum().backward()
    for value, m in [(chosen, CHOSEN_MASK), (rejected, REJECTED_MASK)]:
        assert torch.isfinite(value.grad).all() and torch.all(value.grad[~m] == 0)


def test_gradients_reach_policy_values():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    losses, _ = unlikelihood_loss(chosen, CHOSEN_MASK, rejected, REJECTED_MASK, alpha=1.0)
    losses.sum().backward()
    # chosen: d/dlogp (−Σ logp / n) = −1/n → row 0: −0.5 on its 2 tokens
    torch.testing.assert_close(chosen.grad[0], t(-0.5, -0.5, 0.0, 0.0))
    # rejected: d/dlogp (−log(1 − e^logp) / n) = (1/n) · p/(1 − p)
    #   row 0, logp −0.5: 0.5 · 0.60653066/0.39346934 = 0.5 · 1.54149408 = 0.77074704
    #   row 0, logp −2:   0.5 · 0.13533528/0.86466472 = 0.5 · 0.15651764 = 0.07825882
    #   row 1, logp −ln 2: 0.5 · 0.5/0.5 = 0.5
    torch.testing.assert_close(rejected.grad[0], t(0.77074704, 0.07825882, 0.0, 0.0))
    torch.testing.assert_close(rejected.grad[1, 0], torch.tensor(0.5))


def inputs(chosen: torch.Tensor = CHOSEN, rejected: torch.Tensor = REJECTED) -> LossInputs:
    # as the engine fills them for pair data (sums over the answer tokens)
    return LossInputs(
        chosen_logps=(chosen * CHOSEN_MASK).sum(-1),
        chosen_token_logps=chosen,
        chosen_mask=CHOSEN_MASK,
        rejected_logps=(rejected * REJECTED_MASK).sum(-1),
        rejected_token_logps=rejected,
        rejected_mask=REJECTED_MASK,
    )


def test_objective_loss_and_metrics():
    out = Unlikelihood().loss(UnlikelihoodParams(), inputs())
    close(out.losses, 2.03908279, 0.91928032)
    assert set(out.metrics) == {"logps/chosen", "logps/rejected", "logps/margins", "accuracy/logps",
                                "nll/token", "unlikelihood/term"}
    assert not [k for k in out.metrics if k.startswith("rewards/")]  # no reference, no implicit reward
    close(out.metrics["logps/chosen"], -3.0, -1.5)
    close(out.metrics["logps/rejected"], -2.5, -2.69314718)
    # margins = chosen − rejected: −3 + 2.5 = −0.5;  −1.5 + 2.69314718 = 1.19314718
    close(out.metrics["logps/margins"], -0.5, 1.19314718)
    close(out.metrics["accuracy/logps"], 0.0, 1.0)  # [chosen > rejected]: row 0 no, row 1 yes
    close(out.metrics["nll/token"], 1.5, 0.5)
    close(out.metrics["unlikelihood/term"], 0.53908279, 0.41928032)
    for value in out.metrics.values():
        assert value.shape == (2,) and not value.requires_grad


def test_objective_passes_alpha_and_average():
    out = Unlikelihood().loss(UnlikelihoodParams(alpha=0.5), inputs())
    close(out.losses, 1.76954140, 0.70964016)
    out = Unlikelihood().loss(UnlikelihoodParams(average="sequence"), inputs())
    close(out.losses, 4.07816559, 2.33856064)


def test_objective_gradients_reach_policy_values():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    Unlikelihood().loss(UnlikelihoodParams(), inputs(chosen, rejected)).losses.mean().backward()
    assert torch.all(chosen.grad[CHOSEN_MASK] < 0) and torch.all(rejected.grad[REJECTED_MASK] > 0)


def test_objective_without_rejected_token_logps_is_a_clear_error():
    partial = LossInputs(chosen_token_logps=CHOSEN, chosen_mask=CHOSEN_MASK)
    with pytest.raises(ValueError, match="rejected"):
        Unlikelihood().loss(UnlikelihoodParams(), partial)


def test_needs_pairs_and_no_reference():
    needs = Unlikelihood().needs(UnlikelihoodParams())
    assert needs == Needs(data="pairs")
    assert not needs.reference and not needs.reward and not needs.generation


def test_params_defaults_and_descriptions():
    p = UnlikelihoodParams()
    assert (p.alpha, p.average) == (1.0, "token")
    assert all(f.description for f in UnlikelihoodParams.model_fields.values())
    assert UnlikelihoodParams(alpha=0.0).alpha == 0.0 and UnlikelihoodParams(alpha=1).alpha == 1.0


@pytest.mark.parametrize(
    "bad",
    [{"alpha": -0.1}, {"alpha": 1.5}, {"alpha": "lots"}, {"average": "mean"}, {"alfa": 0.5}, {"beta": 0.1}],
)
def test_params_refuse_bad_values_and_unknown_keys(bad):
    with pytest.raises(ValidationError):
        UnlikelihoodParams(**bad)


def test_registered_through_entry_point():
    from prefkit.plugins import build_registry

    reg = build_registry()
    assert reg.owners[("objectives", "unlikelihood")] == "unlikelihood"
    assert isinstance(reg.objectives["unlikelihood"], Unlikelihood)
    assert not [p for p in reg.problems if "unlikelihood" in p]


def test_math_reference_values():
    # the literals above, checked once against the math module (not the code under test)
    ul = lambda x: -math.log(1 - math.exp(x))  # noqa: E731
    assert ul(-0.5) == pytest.approx(0.93275213) and ul(-2.0) == pytest.approx(0.14541346)
    assert ul(-LN2) == pytest.approx(0.69314718)
    assert (ul(-0.5) + ul(-2.0)) / 2 == pytest.approx(0.53908279)
    assert (ul(-LN2) + ul(-2.0)) / 2 == pytest.approx(0.41928032)
    assert -math.log(-math.expm1(-1e-6)) == pytest.approx(13.81551106)
    assert math.log(-math.expm1(-1e-5)) == pytest.approx(-11.51293046)
    p = math.exp(-0.5)
    assert 0.5 * p / (1 - p) == pytest.approx(0.77074704)
    p = math.exp(-2.0)
    assert 0.5 * p / (1 - p) == pytest.approx(0.07825882)
    assert math.exp(-1e-6) / -math.expm1(-1e-6) / 3 == pytest.approx(333333.2)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_on_the_tiny_model(tmp_path):
    import prefkit.loops as engine
    from prefkit.recipe import load_recipe

    out = tmp_path / "run"
    summary = engine.train(load_recipe(TINY, [f"output_dir={out}"], registry=REGISTRY), registry=REGISTRY)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ["loss", "logps/chosen", "logps/rejected", "logps/margins", "accuracy/logps", "nll/token",
                "unlikelihood/term", "lr", "tokens_per_s"]:
        assert key in records[0], key
    assert not [k for k in records[0] if k.startswith("rewards/")]
    assert "eval/loss" in records[11] and "eval/logps/margins" in records[-1]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = records[:6], records[-6:]
    assert mean(last, "loss") < mean(first, "loss") - 1.0
    # the chosen answers gain log-prob faster than the rejected ones: the summed-log-prob margin rises
    # (it starts negative: chosen answers are longer, and a random byte model gives ≈ −5.56 per token)
    assert mean(last, "logps/margins") > mean(first, "logps/margins") + 10.0
    assert records[-1]["eval/logps/margins"] > records[11]["eval/logps/margins"]
    saved = json.loads((out / "run.json").read_text())
    assert saved["reference_cache"] == "none" == summary["reference_cache"]
    assert saved["objective"] == "unlikelihood" and saved["steps"] == 24
    assert saved["objective_params"] == {"alpha": 1.0, "average": "token"}
