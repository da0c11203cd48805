"""Padding-free forward passes (prefkit/models/packing.py): the plan, equality with the padded
forward (values and gradients), and the models it must leave alone."""

from __future__ import annotations

import pytest
import torch

from prefkit.data.batching import Batch
from prefkit.models import packing
from prefkit.models.logprobs import answer_outputs, token_logps
from prefkit.models.tiny import build_tiny_model

VOCAB = 97


def _batch(lengths_and_prompts, width=None, seed=0):
    """Right-padded rows: (row length, prompt length) each."""
    width = width or max(n for n, _ in lengths_and_prompts)
    rows = len(lengths_and_prompts)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    attention = torch.zeros((rows, width), dtype=torch.long)
    completion = torch.zeros((rows, width), dtype=torch.bool)
    for r, (n, p) in enumerate(lengths_and_prompts):
        attention[r, :n] = 1
        completion[r, p:n] = True
    ids[attention == 0] = 0
    return Batch(ids, attention, completion, torch.arange(rows // 2), ("chosen", "rejected"))


def _share_prompts(batch, lengths_and_prompts):
    """Row r + B begins with row r's prompt (as far as both prompts go), as a pair's rejected row
    begins with its chosen row's prompt; returns how many tokens are then shared."""
    half = len(lengths_and_prompts) // 2
    shared = 0
    for r in range(half):
        p = min(lengths_and_prompts[r][1], lengths_and_prompts[r + half][1])
        batch.input_ids[r + half, :p] = batch.input_ids[r, :p]
        batch.input_ids[r + half, p] = (batch.input_ids[r, p] + 1) % VOCAB  # and no further
        shared += p
    return shared


@pytest.fixture
def model():
    return build_tiny_model(vocab_size=VOCAB, seed=3).train()


def _packed_calls(monkeypatch) -> list:
    """A list that grows by one at every packed forward pass from now on."""
    calls = []
    real_forward = packing.forward
    monkeypatch.setattr(packing, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    return calls


def _values_and_grads(module, compute):
    """``compute()``'s values and the gradients of their sum over ``module``'s parameters (then cleared)."""
    values = compute()
    values.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return values, grads


def _padded_only(monkeypatch):
    monkeypatch.setattr(packing, "can_pack", lambda model: False)


def test_plan_positions_and_gather_indices():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    plan = packing.plan(ids, mask)
    assert plan.input_ids.tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    # positions restart at every row, a left-padded row included
    assert plan.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert plan.longest == 3
    assert plan.shared == 0
    assert plan.gather.tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 0]
    assert plan.scatter.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert plan.slots.tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [0, 5, 6, 0]]
    assert plan.positions(mask.bool()).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_rows_that_begin_alike_share_those_slots():
    # rows 1 and 2 begin with row 0's first two tokens; row 3 (left-padded) with row 1's first three
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 8, 9, 0], [5, 6, 0, 0, 0], [0, 0, 5, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    plan = packing.plan(ids, mask)
    # packed once: row 0's 3 tokens, then row 1's own 2 (8, 9); rows 2 and 3 hold nothing of their own
    assert plan.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert plan.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    assert plan.shared == 7
    assert plan.slots.tolist() == [[0, 1, 2, 0, 0], [0, 1, 3, 4, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 3]]
    assert plan.longest == 4
    # each row's attention reads its own tokens, shared or not: row r's j-th at r * 4 + j
    assert plan.gather.tolist() == [0, 1, 2, 0, 0, 1, 3, 4, 0, 1, 0, 0, 0, 1, 3, 0]
    # each packed slot's output is taken from the row that owns it
    assert plan.scatter.tolist() == [0, 1, 2, 6, 7]
    assert packing.plan(ids, mask, share_prefixes=False).input_ids.tolist() == [[5, 6, 7, 5, 6, 8, 9, 5, 6, 5, 6, 8]]


def test_plan_declines_when_it_cannot_gain_or_rows_have_holes():
    full = torch.ones((4, 10), dtype=torch.long)
    distinct = torch.arange(40).view(4, 10)  # no row begins like another
    assert packing.plan(distinct, full) is None  # no padding
    one_pad = full.clone()
    one_pad[0, -1] = 0  # 1 of 40 positions: 2.5% < MIN_SAVED_SHARE
    assert packing.plan(distinct, one_pad) is None
    assert packing.plan(distinct[:1], one_pad[:1]) is None  # a single row
    alike = distinct.clone()
    alike[1, 0] = alike[0, 0]  # one shared token of 40 is not enough either
    assert packing.plan(alike, full) is None
    alike[1:, :2] = alike[0, :2]  # but 6 of 40 are (15%), with no padding at all
    assert packing.plan(alike, full).shared == 6
    holes = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert packing.plan(holes, holes) is None  # a row's tokens must be contiguous


@pytest.mark.parametrize("share", [False, True])
def test_packed_log_probs_and_gradients_equal_the_padded_forward(model, monkeypatch, share):
    rows = [(14, 3), (6, 2), (9, 8), (3, 1)]
    batch = _batch(rows)
    shared = _share_prompts(batch, rows) if share else 0
    assert packing.plan(batch.input_ids, batch.attention_mask).shared == shared == (4 if share else 0)
    calls = _packed_calls(monkeypatch)

    packed, packed_grads = _values_and_grads(model, lambda: token_logps(model, batch))
    assert calls, "the packed forward was not used"

    _padded_only(monkeypatch)
    padded, padded_grads = _values_and_grads(model, lambda: token_logps(model, batch))
    assert (packed - padded).abs().max() < 1e-5
    assert float(padded.detach()[batch.completion_mask].abs().min()) > 0  # real log-probs, not zeros
    for got, want in zip(packed_grads, padded_grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_packed_hidden_states_equal_the_padded_forward(model, monkeypatch):
    batch = _batch([(12, 4), (5, 2), (8, 3), (12, 6)], width=12)
    keep = torch.zeros_like(batch.completion_mask)
    keep[:, :-1] = batch.completion_mask[:, 1:]
    logits, hidden = answer_outputs(model, batch.input_ids, batch.attention_mask, keep, hidden_states=True)
    _padded_only(monkeypatch)
    want_logits, want_hidden = answer_outputs(model, batch.input_ids, batch.attention_mask, keep, hidden_states=True)
    assert logits.shape == want_logits.shape == (int(keep.sum()), VOCAB)
    assert hidden.shape == want_hidden.shape
    assert (logits - want_logits).abs().max() < 1e-5
    assert (hidden - want_hidden).abs().max() < 1e-5


def test_packed_under_bf16_autocast_stays_close(model, monkeypatch):
    batch = _batch([(16, 5), (7, 2), (11, 4), (4, 1)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = token_logps(model, batch)
        _padded_only(monkeypatch)
        padded = token_logps(model, batch)
    assert (packed - padded).abs().max() < 5e-2


def test_models_it_must_leave_alone(model):
    assert packing.can_pack(model)
    eager = build_tiny_model(vocab_size=VOCAB, seed=3)
    eager.config._attn_implementation = "eager"
    assert not packing.supported(eager)  # attention other than SDPA
    windowed = build_tiny_model(vocab_size=VOCAB, seed=3)
    windowed.config.sliding_window = 4
    assert not packing.supported(windowed)
    checkpointed = build_tiny_model(vocab_size=VOCAB, seed=3)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # noqa
    assert not packing.supported(checkpointed)
    other = build_tiny_model(vocab_size=VOCAB, seed=3)
    other.config.model_type = "gpt2"
    assert not packing.supported(other)


def test_the_attention_switch_is_undone_even_on_error(model):
    with pytest.raises(RuntimeError), packing.engine_attention(model):
        assert model.config._attn_implementation == packing.ATTENTION_NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_that_disagrees_with_its_padded_forward_is_not_packed(model, monkeypatch):
    # A packed forward that mixes rows (here: attention across the whole packed sequence, as when
    # the rows' boundaries never reach the attention) must be caught by the one-time check.
    monkeypatch.setattr(packing, "_attend", lambda module, q, k, v, mask, scaling, dropout, plan, **kw:
                        packing.sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=True))
    monkeypatch.setattr(packing, "_checked", type(packing._checked)())
    assert not packing.can_pack(model)


def test_the_check_gives_the_same_verdict_under_an_autocast_wrapper(model):
    """accelerate wraps a prepared model's forward in autocast; the one-time check, taken before or
    after that, must not change its verdict (it once did: bf16 rounding failed the check, and a run
    resumed from a warm reference cache trained padded where a cold one trained packed)."""
    original = model.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args, **kwargs)

    model.forward = wrapped
    assert packing.can_pack(model)


# --------------------------------------------------------------------------- whole runs

def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(recipe, out, *overrides):
    from pathlib import Path

    import prefkit.loops as engine
    from prefkit.plugins import load_registry
    from prefkit.recipe import load_recipe

    registry = load_registry()
    path = Path(__file__).resolve().parent.parent / "recipes" / recipe
    loaded = load_recipe(path, [f"output_dir={out}", "train.save_every=null", "train.eval_every=null", *overrides],
                         registry=registry)
    engine.train(loaded, registry=registry)
    return _records(out)


@pytest.mark.parametrize("recipe, keys", [
    ("dpo_tiny.yaml", ["loss", "rewards/margins", "logps/chosen", "logps/rejected"]),
    ("ppo_kl_tiny.yaml", ["reward/mean", "loss", "kl", "loss/value"]),
])
def test_packing_and_gradient_checkpointing_leave_a_run_unchanged(tmp_path, monkeypatch, recipe, keys):
    """The same run three ways: packed (the default for these Llama models), padded, and with
    gradient checkpointing (which runs padded); the logged numbers agree to float rounding."""
    calls = _packed_calls(monkeypatch)
    packed = _run(recipe, tmp_path / "packed", "train.max_steps=4")
    assert calls, "the run never packed its rows"
    packed_calls = len(calls)
    calls.clear()
    checkpointed = _run(recipe, tmp_path / "checkpointed", "train.max_steps=4", "train.gradient_checkpointing=true")
    # the policy runs padded under checkpointing (PPO's frozen reference copy may still pack)
    assert len(calls) < packed_calls
    monkeypatch.setattr(packing, "can_pack", lambda model: False)
    padded = _run(recipe, tmp_path / "padded", "train.max_steps=4")
    assert len(packed) == len(padded) == len(checkpointed) == 4
    for a, b, c in zip(packed, padded, checkpointed):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-4), key
            assert c[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    assert packed[-1]["loss"] != packed[0]["loss"]  # the runs did train


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_packed_reward_scores_equal_the_sequence_classifier(monkeypatch, pad_is_eos, share):
    """A reward model's scores and their gradients, packed, equal transformers' own
    ``LlamaForSequenceClassification`` forward on the padded rows (pooling at the last non-pad token,
    which with pad = end token is the token before the final end token)."""
    from transformers import AutoModelForSequenceClassification

    from prefkit.models.logprobs import sequence_rewards

    lm = build_tiny_model(vocab_size=VOCAB, seed=5)
    eos = 2
    pad = eos if pad_is_eos else 0
    lm.config.num_labels = 1
    scorer = AutoModelForSequenceClassification.from_config(lm.config)
    scorer.config.pad_token_id = pad
    rows = [(12, 4), (5, 2), (9, 3), (3, 1)]
    batch = _batch(rows, seed=7)
    if share:
        _share_prompts(batch, rows)
    batch.input_ids[batch.attention_mask == 0] = pad
    batch.input_ids[batch.input_ids == pad] = 1  # no pad token inside the text...
    for r, n in enumerate(batch.attention_mask.sum(-1).tolist()):
        batch.input_ids[r, n - 1] = eos  # ...each row ends with the end token
    batch.input_ids[batch.attention_mask == 0] = pad
    calls = _packed_calls(monkeypatch)
    packed, grads = _values_and_grads(scorer, lambda: sequence_rewards(scorer, batch))
    assert calls
    assert (packing.plan(batch.input_ids, batch.attention_mask).shared > 0) == share
    want, want_grads = _values_and_grads(
        scorer, lambda: scorer(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1))
    assert packed.shape == (4,)
    assert (packed - want).abs().max() < 1e-5
    for got, expected in zip(grads, want_grads):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("fp32_faster", [True, False])
def test_attention_under_bf16_runs_in_the_precision_measured_faster(model, monkeypatch, packed, fp32_faster):
    import prefkit.models.precision as precision

    monkeypatch.setattr(precision, "_cpu_attention_in_fp32", None)
    monkeypatch.setattr(precision, "measure_cpu_attention", lambda: (2.0, 1.0) if fp32_faster else (1.0, 1.0))
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
                        or real_sdpa(q, *a, **k))
    if not packed:
        monkeypatch.setattr(packing, "can_pack", lambda model: False)
    batch = _batch([(16, 5), (7, 2), (11, 4), (4, 1)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = token_logps(model, batch)
    seen = seen[-2:]  # the two layers of the last forward (before it: the model's one-time packing check)
    if fp32_faster:  # fp32 inputs, autocast off; else autocast casts them to bf16
        assert seen == [(torch.float32, False)] * 2
    else:
        assert [on for _, on in seen] == [True, True]
    with torch.no_grad():
        exact = token_logps(model, batch)  # fp32 throughout
    assert (values.detach() - exact).abs().max() < 5e-2


def test_a_model_that_ignores_logits_to_keep_gets_the_same_packed_logits(model, monkeypatch):
    rows = [(12, 4), (5, 2), (8, 3), (12, 6)]
    batch = _batch(rows, width=12)
    _share_prompts(batch, rows)
    keep = torch.zeros_like(batch.completion_mask)
    keep[:, :-1] = batch.completion_mask[:, 1:]
    want, _ = answer_outputs(model, batch.input_ids, batch.attention_mask, keep)
    original = type(model).forward

    def every_position(self, *args, logits_to_keep=0, **kwargs):  # as a model without the argument would
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", every_position)
    calls = _packed_calls(monkeypatch)
    got, _ = answer_outputs(model, batch.input_ids, batch.attention_mask, keep)
    assert len(calls) == 1  # selected from the one pass, not run again
    assert got.shape == want.shape == (int(keep.sum()), VOCAB)
    assert (got - want).abs().max() < 1e-5
