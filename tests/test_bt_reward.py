"""Bradley-Terry reward model: the loss by hand, and a learning run on the tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch

from prefkit.api.objective import LossInputs
from prefkit_builtins.bt_reward import BTReward, BTRewardParams, bt_loss

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

ROOT = Path(__file__).resolve().parent.parent
T = torch.tensor


def test_bt_loss_by_hand():
    # r_w - r_l = 2 - 1 = 1 -> -log sigma(1) = log(1 + e^-1) = log(1.3678794) = 0.3132617
    # r_w - r_l = 0         -> log 2 = 0.6931472
    # r_w - r_l = -1        -> log(1 + e^1) = log(3.7182818) = 1.3132617
    losses = bt_loss(T([2.0, 0.5, 0.0]), T([1.0, 0.5, 1.0]))
    torch.testing.assert_close(losses, T([0.3132617, 0.6931472, 1.3132617]))


def test_margin_and_centering_by_hand():
    # margin 0.5: -log sigma(1 - 0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770
    assert bt_loss(T([2.0]), T([1.0]), margin=T([0.5])).item() == pytest.approx(0.4740770, abs=1e-6)
    # centering c = 0.01: 0.3132617 + 0.01 * (2 + 1)^2 = 0.3132617 + 0.09 = 0.4032617
    assert bt_loss(T([2.0]), T([1.0]), center_coef=0.01).item() == pytest.approx(0.4032617, abs=1e-6)


def test_stable_for_large_differences():
    losses = bt_loss(T([-500.0, 500.0]), T([500.0, -500.0]))
    # -log sigma(-1000) = 1000 (softplus), -log sigma(1000) = 0
    torch.testing.assert_close(losses, T([1000.0, 0.0]))


def test_objective_metrics_and_needs():
    objective, params = BTReward(), BTRewardParams()
    assert objective.needs(params).head == "scalar" and not objective.needs(params).reference
    chosen = T([2.0, 0.0], requires_grad=True)
    rejected = T([1.0, 1.0], requires_grad=True)
    out = objective.loss(params, LossInputs(chosen_rewards=chosen, rejected_rewards=rejected, margin=T([0.0, 0.0])))
    torch.testing.assert_close(out.losses, T([0.3132617, 1.3132617]))
    assert out.metrics["accuracy"].tolist() == [1.0, 0.0]
    assert out.metrics["margin"].tolist() == [1.0, -1.0]
    # the four rewards 2, 0, 1, 1: mean 1, population std sqrt((1 + 1 + 0 + 0) / 4) = 0.7071068
    assert out.metrics["reward/mean"].item() == pytest.approx(1.0)
    assert out.metrics["reward/std"].item() == pytest.approx(math.sqrt(0.5))
    out.losses.mean().backward()
    # d/dr_w of -log sigma(r_w - r_l) = -sigma(r_l - r_w); averaged over 2 rows
    assert chosen.grad.tolist() == pytest.approx([-0.5 * 0.2689414, -0.5 * 0.7310586], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.5 * 0.2689414, 0.5 * 0.7310586], abs=1e-6)


def test_margin_column_can_be_ignored():
    objective = BTReward()
    inputs = LossInputs(chosen_rewards=T([2.0]), rejected_rewards=T([1.0]), margin=T([0.5]))
    assert objective.loss(BTRewardParams(), inputs).losses.item() == pytest.approx(0.4740770, abs=1e-6)
    assert objective.loss(BTRewardParams(use_margin=False), inputs).losses.item() == pytest.approx(0.3132617, abs=1e-6)


def test_params_refuse_unknown_keys_and_negative_centering():
    with pytest.raises(ValueError):
        BTRewardParams(center_coef=-1)
    with pytest.raises(ValueError):
        BTRewardParams(beta=0.1)


def test_tiny_reward_model_learns_the_preference(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from prefkit.data.batching import collate
    from prefkit.data.prepare import prepare_dataset
    from prefkit.loops import train
    from prefkit.models.logprobs import sequence_rewards
    from prefkit.models.loading import load_tokenizer
    from prefkit.recipe import load_recipe

    loaded = load_recipe(ROOT / "recipes" / "bt_reward_tiny.yaml", [f"output_dir={tmp_path / 'rm'}"], registry=REGISTRY)
    summary = train(loaded, registry=REGISTRY)
    assert summary["reference_cache"] == "none"
    assert summary["final_metrics"]["eval/accuracy"] >= 0.9
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["margin"] > records[0]["margin"]

    # final/ is a sequence-classification model that ranks held-out pairs the same way
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").eval()
    tokenizer = load_tokenizer(loaded.recipe.model, str(tmp_path / "rm" / "final"))
    test = prepare_dataset(loaded.recipe.data, tokenizer, REGISTRY.data_kinds["pairs"], split="eval", registry=REGISTRY)
    batch = collate(test.examples, list(range(len(test.examples))), tokenizer.pad_token_id, test.names)
    with torch.no_grad():
        rewards = sequence_rewards(model, batch)
    n = len(test.examples)
    assert (rewards[:n] > rewards[n:]).float().mean().item() >= 0.9


def test_a_saved_reward_model_scores_like_transformers_when_pad_is_eos(tmp_path):
    """The reward is read where transformers' *ForSequenceClassification reads it (the last token that
    is not the pad token), so final/ scores the same text the same way outside prefkit, even for a
    model whose pad token is its end-of-text token (as SmolLM2's)."""
    from transformers import AutoModelForSequenceClassification

    import prefkit.loops as engine
    from prefkit.data.batching import collate
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.logprobs import sequence_rewards
    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer
    from prefkit.recipe import load_recipe

    folder = tmp_path / "pad-is-eos"
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    build_tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "bt_reward_tiny.yaml"
    loaded = load_recipe(recipe, [f"output_dir={tmp_path / 'rm'}", f"model.source={folder}", "model.options={}",
                                  "data.eval=null", "train.max_steps=6", "train.save_every=null"], registry=REGISTRY)
    engine.train(loaded, registry=REGISTRY)

    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").eval()
    assert final.config.pad_token_id == tokenizer.eos_token_id
    data = prepare_dataset(loaded.recipe.data, tokenizer, REGISTRY.data_kinds["pairs"], split="train",
                           registry=REGISTRY)
    idx = list(range(6))
    batch = collate([data.examples[i] for i in idx], idx, tokenizer.pad_token_id, data.names)
    assert (batch.input_ids[batch.attention_mask.bool()] == tokenizer.eos_token_id).any()  # answers end in EOS
    with torch.no_grad():
        ours = sequence_rewards(final, batch)
        theirs = torch.stack([final(input_ids=row[mask.bool()][None]).logits[0, 0]
                              for row, mask in zip(batch.input_ids, batch.attention_mask)])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert ours.std() > 0  # trained: the scores differ between answers
