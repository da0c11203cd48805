"""Golden tests for the KTO objective, with the arithmetic written out by hand.

Notation: r = π − ref is a completion's log-ratio (summed log-probs), z0 the KL reference point,
β = 0.1, σ the logistic function. Per example:

    desirable:    λD · (1 − σ(β(r − z0)))
    undesirable:  λU · (1 − σ(β(z0 − r)))

and 1 − σ(u) = σ(−u) = 1 / (1 + e^u). Values used below:

    e^0.1 = 1.105170918   σ(0.1) = 1/(1 + e^−0.1) = 1/1.904837418 = 0.524979187
    e^0.15 = 1.161834243  σ(0.15) = 1/(1 + e^−0.15) = 1/1.860707976 = 0.537429845
    e^0.2 = 1.221402758   σ(−0.2) = 1/2.221402758 = 0.450166003
    e^0.4 = 1.491824698   σ(0.4) = 1/(1 + e^−0.4) = 1/1.670320046 = 0.598687660
    e^0.5 = 1.648721271   σ(0.5) = 1/(1 + e^−0.5) = 1/1.606530660 = 0.622459331
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from prefkit.api import LossInputs, Needs
from prefkit_builtins import kto as kto_module
from prefkit_builtins.kto import KTO, KTOParams, kl_reference_point, kto_loss

ROOT = Path(__file__).resolve().parent.parent


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def close(actual: torch.Tensor | float, *expected: float, tol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float32)
    torch.testing.assert_close(actual, t(*expected).reshape(actual.shape), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- kto_loss


def test_desirable_and_undesirable_losses_at_logratio_2_kl_half():
    # Both rows: π = −8, ref = −10 → r = 2; z0 = 0.5; β = 0.1.
    #   desirable:   1 − σ(0.1·(2 − 0.5)) = 1 − σ(0.15) = 1 − 0.537429845 = 0.462570155
    #   undesirable: 1 − σ(0.1·(0.5 − 2)) = 1 − σ(−0.15) = σ(0.15)        = 0.537429845
    # rewards = β·r = 0.1·2 = 0.2 for both, whatever the label.
    losses, rewards = kto_loss(t(-8, -8), t(-10, -10), t(1, 0), 0.5, beta=0.1,
                               desirable_weight=1.0, undesirable_weight=1.0)
    close(losses, 0.462570155, 0.537429845)
    close(rewards, 0.2, 0.2)
    assert losses.shape == rewards.shape == (2,)
    assert losses.dtype == rewards.dtype == torch.float32


def test_weights_scale_each_side():
    # λD = 2:   2 · 0.462570155   = 0.925140309
    # λU = 0.5: 0.5 · 0.537429845 = 0.268714923
    losses, rewards = kto_loss(t(-8, -8), t(-10, -10), t(1, 0), 0.5, beta=0.1,
                               desirable_weight=2.0, undesirable_weight=0.5)
    close(losses, 0.925140309, 0.268714923)
    close(rewards, 0.2, 0.2)  # the weights do not touch the rewards


def test_at_the_reference_every_loss_is_one_half():
    # π = ref and z0 = 0: 1 − σ(0) = 0.5 on either side.
    losses, rewards = kto_loss(t(-3, -7), t(-3, -7), t(1, 0), 0.0, beta=0.1,
                               desirable_weight=1.0, undesirable_weight=1.0)
    close(losses, 0.5, 0.5)
    close(rewards, 0.0, 0.0)


def test_beta_scales_inside_the_sigmoid_and_in_the_rewards():
    # β = 0.5, r = 1 − 0 = 1, z0 = 0.6:
    #   desirable:   1 − σ(0.5·0.4) = σ(−0.2) = 0.450166003;  reward 0.5·1 = 0.5
    #   undesirable: 1 − σ(0.5·(−0.4)) = σ(0.2) = 1 − 0.450166003 = 0.549833997
    losses, rewards = kto_loss(t(1, 1), t(0, 0), t(1, 0), 0.6, beta=0.5,
                               desirable_weight=1.0, undesirable_weight=1.0)
    close(losses, 0.450166003, 0.549833997)
    close(rewards, 0.5, 0.5)


def test_gradients_flow_to_policy_logps_only():
    # d/dπ [1 − σ(β(r − z0))] = −β·σ(u)·(1 − σ(u)) with u = 0.15:
    #   σ(0.15)·(1 − σ(0.15)) = 0.537429845 · 0.462570155 = 0.248599007, times β → 0.024859901.
    # Undesirable: 1 − σ(β(z0 − r)) = σ(β(r − z0)), whose derivative is +0.024859901.
    # Mean over the two rows halves both.
    policy, ref = t(-8, -8, grad=True), t(-10, -10, grad=True)
    kl = torch.tensor(0.5, requires_grad=True)
    losses, rewards = kto_loss(policy, ref, t(1, 0), kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    losses.mean().backward()
    close(policy.grad, -0.024859901 / 2, 0.024859901 / 2, tol=1e-8)
    assert ref.grad is None and kl.grad is None
    assert not rewards.requires_grad


def test_large_logratios_stay_finite_and_exact():
    # r = ±1000, β = 0.1 → u = ±100: σ(−100) = 3.72e−44 (a subnormal in fp32, not 1 − 1 = 0 noise).
    losses, _ = kto_loss(t(1000, -1000), t(0, 0), t(1, 1), 0.0, beta=0.1,
                         desirable_weight=1.0, undesirable_weight=1.0)
    assert torch.isfinite(losses).all()
    close(losses, 0.0, 1.0)


# ----------------------------------------------------------------------------- reference point


def test_reference_point_is_the_mean_mismatched_logratio():
    # (−5 − −6) = 1, (−5 − −8) = 3 → mean 2.
    close(kl_reference_point(t(-5, -5), t(-6, -8)), 2.0)


def test_reference_point_clamps_negative_to_zero():
    # (−8 − −6) = −2, (−9 − −6) = −3 → mean −2.5 → clamped to 0.
    close(kl_reference_point(t(-8, -9), t(-6, -6)), 0.0)
    # (−5 − −6) = 1, (−7 − −6) = −1, (−6 − −6) = 0 → mean 0 → 0.
    close(kl_reference_point(t(-5, -7, -6), t(-6, -6, -6)), 0.0)


def test_reference_point_is_detached():
    mismatched, ref_mismatched = t(-5, -5, grad=True), t(-6, -8, grad=True)
    kl = kl_reference_point(mismatched, ref_mismatched)
    assert kl.dim() == 0 and not kl.requires_grad and kl.dtype == torch.float32


# ----------------------------------------------------------------------------- the objective


def inputs_for(policy, ref, mismatched, ref_mismatched, labels) -> LossInputs:
    return LossInputs(completion_logps=policy, ref_completion_logps=ref, mismatched_logps=mismatched,
                      ref_mismatched_logps=ref_mismatched, columns={"label": labels})


# Four rows, β = 0.1 (the default), labels D, U, U, D:
#   mismatched π − ref: (−20+21, −21+21, −19+21, −20+21) = (1, 0, 2, 1) → z0 = mean = 1.0
#   completions: π = (−10, −12, −9, −15), ref = (−13, −12, −14, −11) → r = (3, 0, 5, −4)
#   row 0, D, r = 3:  1 − σ(0.1·(3 − 1))  = 1 − σ(0.2)  = σ(−0.2) = 0.450166003
#   row 1, U, r = 0:  1 − σ(0.1·(1 − 0))  = 1 − σ(0.1)  = 1 − 0.524979187 = 0.475020813
#   row 2, U, r = 5:  1 − σ(0.1·(1 − 5))  = 1 − σ(−0.4) = σ(0.4)  = 0.598687660
#   row 3, D, r = −4: 1 − σ(0.1·(−4 − 1)) = 1 − σ(−0.5) = σ(0.5)  = 0.622459331
#   rewards β·r = (0.3, 0.0, 0.5, −0.4)
#   rewards/chosen = (0.3 − 0.4)/2 = −0.05, rewards/rejected = (0 + 0.5)/2 = 0.25, margins = −0.30
#   logps/chosen = (−10 − 15)/2 = −12.5, logps/rejected = (−12 − 9)/2 = −10.5
POLICY, REF = (-10, -12, -9, -15), (-13, -12, -14, -11)
MISMATCHED, REF_MISMATCHED = (-20, -21, -19, -20), (-21, -21, -21, -21)
LABELS = (1, 0, 0, 1)


def test_kto_loss_on_hand_built_inputs():
    policy, mismatched = t(*POLICY, grad=True), t(*MISMATCHED, grad=True)
    out = KTO().loss(KTOParams(), inputs_for(policy, t(*REF), mismatched, t(*REF_MISMATCHED), t(*LABELS)))
    close(out.losses, 0.450166003, 0.475020813, 0.598687660, 0.622459331)
    m = out.metrics
    assert set(m) == {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    close(m["kl"], 1.0)
    close(m["rewards/chosen"], -0.05)
    close(m["rewards/rejected"], 0.25)
    close(m["rewards/margins"], -0.30)
    close(m["logps/chosen"], -12.5)
    close(m["logps/rejected"], -10.5)
    for name, value in m.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name

    # The engine averages: (0.450166003 + 0.475020813 + 0.598687660 + 0.622459331)/4 = 0.536583452
    loss = out.losses.mean()
    close(loss, 0.536583452)
    loss.backward()
    assert policy.grad is not None and policy.grad.abs().min() > 0
    assert mismatched.grad is None  # the reference point passes no gradient back


def test_weights_reach_the_objective():
    # λD = 2, λU = 0.5 on the rows above: 2·0.450166003, 0.5·0.475020813, 0.5·0.598687660, 2·0.622459331
    params = KTOParams(desirable_weight=2.0, undesirable_weight=0.5)
    out = KTO().loss(params, inputs_for(t(*POLICY), t(*REF), t(*MISMATCHED), t(*REF_MISMATCHED), t(*LABELS)))
    close(out.losses, 0.900332006, 0.237510407, 0.299343830, 1.244918662)


def test_negative_kl_estimate_is_clamped_in_the_objective():
    # mismatched π − ref = (−2, −4) → mean −3 → z0 = 0; r = (2, 2):
    #   D: 1 − σ(0.1·2) = σ(−0.2) = 0.450166003;  U: 1 − σ(−0.2) = σ(0.2) = 0.549833997
    out = KTO().loss(KTOParams(), inputs_for(t(-8, -8), t(-10, -10), t(-12, -14), t(-10, -10), t(1, 0)))
    close(out.metrics["kl"], 0.0)
    close(out.losses, 0.450166003, 0.549833997)


def test_metrics_with_only_desirable_rows_omit_the_rejected_side():
    # r = (3, 0), z0 = mean(1, 0) = 0.5; rewards (0.3, 0.0) → rewards/chosen 0.15; logps/chosen −11.
    out = KTO().loss(KTOParams(), inputs_for(t(-10, -12), t(-13, -12), t(-20, -21), t(-21, -21), t(1, 1)))
    assert set(out.metrics) == {"kl", "rewards/chosen", "logps/chosen"}
    close(out.metrics["kl"], 0.5)
    close(out.metrics["rewards/chosen"], 0.15)
    close(out.metrics["logps/chosen"], -11.0)


def test_metrics_with_only_undesirable_rows_omit_the_chosen_side():
    out = KTO().loss(KTOParams(), inputs_for(t(-10, -12), t(-13, -12), t(-20, -21), t(-21, -21), t(0, 0)))
    assert set(out.metrics) == {"kl", "rewards/rejected", "logps/rejected"}
    close(out.metrics["rewards/rejected"], 0.15)
    close(out.metrics["logps/rejected"], -11.0)


def test_missing_inputs_are_named():
    inputs = LossInputs(completion_logps=t(-1), ref_completion_logps=t(-1), columns={"label": t(1)})
    with pytest.raises(ValueError, match="mismatched_logps, ref_mismatched_logps"):
        KTO().loss(KTOParams(), inputs)
    inputs = inputs_for(t(-1), t(-1), t(-1), t(-1), t(1))
    inputs.columns = {}
    with pytest.raises(ValueError, match=r"columns\['label'\]"):
        KTO().loss(KTOParams(), inputs)


# ----------------------------------------------------------------------------- params, needs, registration


def test_params_defaults_and_bounds():
    params = KTOParams()
    assert (params.beta, params.desirable_weight, params.undesirable_weight) == (0.1, 1.0, 1.0)
    for bad in ({"beta": 0}, {"beta": -0.1}, {"desirable_weight": 0}, {"undesirable_weight": -1.0},
                {"unknown_key": 1}):
        with pytest.raises(ValidationError):
            KTOParams(**bad)


def test_needs_unpaired_data_a_reference_and_mismatched_pairs():
    objective = KTO()
    assert objective.name == "kto" and objective.kind == "offline" and objective.Params is KTOParams
    assert objective.needs(KTOParams()) == Needs(data="unpaired", reference=True, mismatched=True)


def test_registered_through_the_hook_and_the_entry_point():
    registered = []
    kto_module.register_objectives(registered.append)
    assert len(registered) == 1 and isinstance(registered[0], KTO)
    entry_points = (ROOT / "pyproject.toml").read_text().split("[project.entry-points.prefkit]")[1].split("\n[")[0]
    assert re.search(r'^kto = "prefkit_builtins\.kto"$', entry_points, re.M)


def test_module_imports_only_the_public_api():
    tree = ast.parse(inspect.getsource(kto_module))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules == {"__future__", "torch", "pydantic", "prefkit.api"}, modules


# ----------------------------------------------------------------------------- cross-check with TRL


def _trl_kto_loss():
    """TRL's ``KTOTrainer.kto_loss`` (TRL 0.x; 1.x inlines it in ``_compute_loss``), or a skip."""
    pytest.importorskip("trl")
    import warnings

    for path in ("trl", "trl.experimental.kto"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer_cls = getattr(importlib.import_module(path), "KTOTrainer")
        except (ImportError, AttributeError):
            continue
        if hasattr(trainer_cls, "kto_loss"):
            return trainer_cls.kto_loss
    pytest.skip("this trl's KTOTrainer has no separate kto_loss (TRL 1.x inlines it); install trl<1 to cross-check")


@pytest.mark.parametrize("mismatched_values", [MISMATCHED, (-22, -23, -24, -22)], ids=["kl=1", "kl<0 clamped"])
def test_matches_trl_kto_trainer_kto_loss(mismatched_values):
    """TRL's KTOTrainer.kto_loss, called unbound on a stand-in for the trainer, gives the same
    losses (chosen rows first, then rejected), rewards and KL on the rows above, and on the same
    rows with a negative KL estimate (π − ref = −1, −2, −3, −1: clamped to 0)."""
    trl_kto_loss = _trl_kto_loss()
    beta, dw, uw = 0.1, 2.0, 0.5
    stand_in = SimpleNamespace(
        beta=beta, desirable_weight=dw, undesirable_weight=uw, loss_type="kto", calculate_KL=True,
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=torch.device("cpu")),
    )
    policy, ref, labels = t(*POLICY), t(*REF), t(*LABELS)
    mismatched, ref_mismatched = t(*mismatched_values), t(*REF_MISMATCHED)
    chosen = labels > 0.5
    given = {
        "policy_chosen_logps": policy[chosen], "policy_rejected_logps": policy[~chosen],
        "policy_KL_logps": mismatched, "reference_chosen_logps": ref[chosen],
        "reference_rejected_logps": ref[~chosen], "reference_KL_logps": ref_mismatched,
    }
    wanted = [name for name in inspect.signature(trl_kto_loss).parameters if name != "self"]
    if not set(wanted) <= set(given):
        pytest.skip(f"unknown KTOTrainer.kto_loss signature: {wanted}")
    trl_losses, trl_chosen, trl_rejected, trl_kl = trl_kto_loss(stand_in, **{k: given[k] for k in wanted})

    out = KTO().loss(KTOParams(beta=beta, desirable_weight=dw, undesirable_weight=uw),
                     inputs_for(policy, ref, mismatched, ref_mismatched, labels))
    _, rewards = kto_loss(policy, ref, labels, out.metrics["kl"], beta=beta)
    torch.testing.assert_close(out.losses[chosen], trl_losses[: int(chosen.sum())], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.losses[~chosen], trl_losses[int(chosen.sum()):], atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards[chosen], trl_chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards[~chosen], trl_rejected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["kl"], torch.as_tensor(trl_kl).float().reshape(()), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- shipped data and recipes


def test_tiny_unpaired_rows_come_from_the_tiny_pairs():
    import json

    data = ROOT / "plugins" / "prefkit_builtins" / "data"
    for pairs_file, unpaired_file in (("tiny_train", "tiny_unpaired_train"),
                                      ("quickstart_train", "quickstart_unpaired_train"),
                                      ("quickstart_test", "quickstart_unpaired_test")):
        pairs = [json.loads(line) for line in (data / f"{pairs_file}.jsonl").read_text().splitlines()]
        rows = [json.loads(line) for line in (data / f"{unpaired_file}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * len(pairs)
        assert [r["label"] for r in rows] == [True, False] * len(pairs)  # interleaved
        desirable = {(r["prompt"], r["completion"]) for r in rows if r["label"]}
        undesirable = {(r["prompt"], r["completion"]) for r in rows if not r["label"]}
        assert desirable == {(p["prompt"], p["chosen"]) for p in pairs}
        assert undesirable == {(p["prompt"], p["rejected"]) for p in pairs}
        # The engine pairs example i's prompt with example (i + 1) mod N's completion for the KL
        # reference point: neighbours never share a prompt, so no mismatched pair is a real one.
        n = len(rows)
        assert all(rows[i]["prompt"] != rows[(i + 1) % n]["prompt"] for i in range(n))


def test_tiny_recipe_learns(tmp_path):
    """The tiny recipe runs through the engine and ends with desirable rewards above undesirable."""
    import json

    from prefkit.loops.offline import train
    from prefkit.plugins import build_registry, load_registry
    from prefkit.recipe import load_recipe
    from prefkit_builtins import data_kinds

    registry = load_registry()
    extra = {}
    if "unpaired" not in registry.data_kinds:  # an install whose entry points predate the unpaired kind
        extra["data_kinds_local"] = data_kinds
    if "kto" not in registry.objectives:
        extra["kto_local"] = kto_module
    if extra:
        registry = build_registry(extra_plugins=extra)
    loaded = load_recipe(ROOT / "recipes" / "kto_tiny.yaml", [f"output_dir={tmp_path}"], registry=registry)
    summary = train(loaded, registry=registry)
    assert summary["steps"] == 24
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["rewards/chosen"] > last["rewards/rejected"] + 1.0
    assert last["rewards/margins"] > 1.0 and last["kl"] >= 0.0
