"""Golden tests for Preferred-FT (SFT on the answer tokens), with the arithmetic written out by hand.

Notation: logp_t is the policy's log-prob of answer token t; n the number of answer tokens of a row.
"token" loss = −Σ logp_t / n (per-row mean NLL), "sequence" loss = −Σ logp_t.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from prefkit.api.objective import LossInputs, Needs
from prefkit_builtins.preferred_ft import PreferredFT, PreferredFTParams, sft_loss

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "preferred_ft_tiny.yaml"
NAN, INF = float("nan"), float("inf")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(*expected), atol=tol, rtol=0)


def mask(*lengths: int, width: int = 4) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# Two rows used throughout (width 4; positions past the length are padding, zero here as the engine gives):
#   row 0: logp = [−1, −2]             n = 2, Σ = −3   → mean NLL 3/2   = 1.5
#   row 1: logp = [−0.5, −0.25, −0.75] n = 3, Σ = −1.5 → mean NLL 1.5/3 = 0.5
LOGPS = torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-0.5, -0.25, -0.75, 0.0]])
MASK = mask(2, 3)


def test_token_average_is_the_per_row_mean_nll():
    losses = sft_loss(LOGPS, MASK)
    close(losses, 1.5, 0.5)
    assert losses.dtype == torch.float32 and losses.shape == (2,)
    # the engine's batch mean weighs rows equally: (1.5 + 0.5) / 2 = 1.0, not the token-weighted
    # 4.5 / 5 = 0.9 (Σ of all NLLs over all 5 answer tokens)
    close(losses.mean().reshape(1), 1.0)


def test_sequence_average_is_the_summed_nll():
    # row 0: −(−1 − 2) = 3;  row 1: −(−0.5 − 0.25 − 0.75) = 1.5
    close(sft_loss(LOGPS, MASK, average="sequence"), 3.0, 1.5)


def test_batch_token_average_weighs_every_token_of_the_batch_the_same():
    # TRL's SFT loss: Σ of all NLLs over all answer tokens = 4.5 / 5 = 0.9, as the engine's batch mean
    losses = sft_loss(LOGPS, MASK, average="batch_token")
    close(losses, 3.0 * 2 / 5, 1.5 * 2 / 5)
    close(losses.mean().reshape(1), 0.9)
    close(sft_loss(LOGPS, torch.zeros_like(MASK), average="batch_token"), 0.0, 0.0)  # no answer token: 0, not NaN


def test_unknown_average_is_refused():
    with pytest.raises(ValueError, match="average"):
        sft_loss(LOGPS, MASK, average="mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("average", ["token", "sequence", "batch_token"])
def test_padding_is_ignored_even_if_garbage(average):
    # the same rows, with NaN / ±inf / huge values where the mask is False (prompt or padding)
    garbage = torch.tensor([[-1.0, -2.0, NAN, 1e9], [-0.5, -0.25, -0.75, -INF]], requires_grad=True)
    losses = sft_loss(garbage, MASK, average=average)
    torch.testing.assert_close(losses, sft_loss(LOGPS, MASK, average=average))
    losses.sum().backward()
    assert torch.isfinite(garbage.grad).all()
    assert torch.all(garbage.grad[~MASK] == 0)


def test_a_row_without_answer_tokens_gives_zero_not_nan():
    losses = sft_loss(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    close(losses, 0.0)


def test_gradients_reach_policy_values():
    logps = LOGPS.clone().requires_grad_()
    sft_loss(logps, MASK).sum().backward()
    # d/dlogp_t (−Σ logp / n) = −1/n: row 0 → −1/2 on 2 tokens, row 1 → −1/3 on 3 tokens, padding 0
    third = 1 / 3
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5, 0, 0], [-third, -third, -third, 0]]))
    logps.grad = None
    sft_loss(logps, MASK, average="sequence").sum().backward()
    torch.testing.assert_close(logps.grad, -MASK.float())  # −1 on every answer token


def test_low_precision_inputs_give_fp32_outputs():
    losses = sft_loss(LOGPS.bfloat16(), MASK)  # every value above is exact in bf16
    assert losses.dtype == torch.float32
    close(losses, 1.5, 0.5)


def inputs(logps: torch.Tensor = LOGPS) -> LossInputs:
    # "sft" data: the engine fills only the chosen_* fields (the completion); sums as the engine computes them
    return LossInputs(chosen_logps=(logps * MASK).sum(-1), chosen_token_logps=logps, chosen_mask=MASK)


def test_objective_loss_and_metrics():
    out = PreferredFT().loss(PreferredFTParams(), inputs())
    close(out.losses, 1.5, 0.5)
    assert set(out.metrics) == {"logps/chosen", "nll/token", "ppl"}
    close(out.metrics["logps/chosen"], -3.0, -1.5)  # summed log-probs of the answers
    close(out.metrics["nll/token"], 1.5, 0.5)
    # ppl = exp(batch mean of the per-row NLL per token) = exp((1.5 + 0.5) / 2) = e^1 = 2.718281828
    torch.testing.assert_close(out.metrics["ppl"], torch.tensor(2.718281828), atol=1e-6, rtol=0)
    for value in out.metrics.values():
        assert not value.requires_grad
    # with average="sequence" only the loss changes, not the metrics
    out = PreferredFT().loss(PreferredFTParams(average="sequence"), inputs())
    close(out.losses, 3.0, 1.5)
    close(out.metrics["nll/token"], 1.5, 0.5)


def test_objective_gradients_reach_policy_values():
    logps = LOGPS.clone().requires_grad_()
    PreferredFT().loss(PreferredFTParams(), inputs(logps)).losses.mean().backward()
    # batch mean over 2 rows: −1/(2n) per token → row 0: −0.25, row 1: −1/6
    assert torch.all(logps.grad[MASK] < 0) and torch.all(logps.grad[~MASK] == 0)
    torch.testing.assert_close(logps.grad[0, :2], t(-0.25, -0.25))


def test_objective_without_token_logps_is_a_clear_error():
    with pytest.raises(ValueError, match="per-token"):
        PreferredFT().loss(PreferredFTParams(), LossInputs(chosen_logps=t(-3.0)))


def test_needs_sft_data_and_nothing_else():
    needs = PreferredFT().needs(PreferredFTParams())
    assert needs == Needs(data="sft")
    assert not needs.reference and not needs.reward and not needs.generation and needs.head == "lm"


def test_params_defaults_and_descriptions():
    assert PreferredFTParams().average == "token"
    assert all(f.description for f in PreferredFTParams.model_fields.values())


@pytest.mark.parametrize("bad", [{"average": "mean"}, {"avg": "token"}, {"alpha": 1.0}, {"beta": 0.1}])
def test_params_refuse_bad_values_and_unknown_keys(bad):
    with pytest.raises(ValidationError):
        PreferredFTParams(**bad)


def test_registered_through_entry_point():
    from prefkit.plugins import build_registry

    reg = build_registry()
    assert reg.owners[("objectives", "preferred_ft")] == "preferred_ft"
    assert isinstance(reg.objectives["preferred_ft"], PreferredFT)
    assert not [p for p in reg.problems if "preferred_ft" in p]


def test_math_reference_values():
    assert math.exp(1.0) == pytest.approx(2.718281828)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_on_the_tiny_model(tmp_path):
    import prefkit.loops as engine
    from prefkit.recipe import load_recipe

    out = tmp_path / "run"
    summary = engine.train(load_recipe(TINY, [f"output_dir={out}"], registry=REGISTRY), registry=REGISTRY)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ["loss", "logps/chosen", "nll/token", "ppl", "lr", "tokens_per_s"]:
        assert key in records[0], key
    assert not [k for k in records[0] if k.startswith("rewards/")]  # no reference, no implicit reward
    assert "eval/loss" in records[11] and "eval/ppl" in records[-1]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = records[:4], records[-4:]
    # the answers are learnt: per-token NLL falls (≈ ln 260 = 5.56 at the start, a uniform byte model)
    assert mean(first, "loss") > 5.0
    assert mean(last, "loss") < mean(first, "loss") - 1.0
    assert mean(last, "logps/chosen") > mean(first, "logps/chosen")
    assert records[-1]["eval/loss"] < records[11]["eval/loss"]
    saved = json.loads((out / "run.json").read_text())
    assert saved["reference_cache"] == "none" == summary["reference_cache"]
    assert saved["objective"] == "preferred_ft" and saved["steps"] == 24
    assert saved["objective_params"] == {"average": "token"}


def test_end_to_end_on_prompt_completion_data(tmp_path):
    """The same objective reads prompt/completion rows (the shipped tiny-sft set)."""
    import prefkit.loops as engine
    from prefkit.recipe import load_recipe

    out = tmp_path / "sft"
    overrides = [f"output_dir={out}", "data.train=tiny-sft", "data.eval=null", "train.max_steps=3",
                 "train.save_every=null"]
    summary = engine.train(load_recipe(TINY, overrides, registry=REGISTRY), registry=REGISTRY)
    assert summary["steps"] == 3 and summary["reference_cache"] == "none"
    assert summary["data"]["train"]["rows_kept"] == 24
    assert math.isfinite(summary["final_metrics"]["loss"])
