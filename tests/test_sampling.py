"""prefkit.models.sampling.generate: batched, left-padded, reproducible sampling on the tiny Llama.

The tiny model is random-initialised and its tokenizer byte-level, so completions are noise;
what is tested is the machinery: counts, greedy decoding, seeding, end tokens, padding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from prefkit.models.loading import load_model
from prefkit.plugins import load_registry
from prefkit.recipe import ModelConfig, SamplingConfig
from prefkit.models.sampling import Sample, _cut, end_token_ids, generate, sample_uniforms



PROMPTS = ["Hi", "What is the capital of France, please?", "Tell me a story about a bee."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    loaded = load_model(ModelConfig(source="tiny-llama"), None, tmp_path_factory.mktemp("cache"),
                        registry=load_registry())
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    _, tokenizer = tiny
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def cfg(**kw) -> SamplingConfig:
    kw.setdefault("max_new_tokens", 10)
    return SamplingConfig(**kw)


def token_ids(result: list[list[Sample]]) -> list[list[list[int]]]:
    return [[s.token_ids for s in samples] for samples in result]


def manual_greedy(model, ids: list[int], steps: int, ends: set[int]) -> list[int]:
    """Full forward pass per step (no cache, no padding), argmax, stop after an end token."""
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=x).logits[0, -1].argmax())
            out.append(token)
            if token in ends:
                break
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


def test_counts_indices_and_texts(tiny, prompt_ids):
    model, tokenizer = tiny
    result = generate(model, tokenizer, prompt_ids, cfg(num_samples=5, batch_size=4), seed=0)
    assert len(result) == len(PROMPTS)
    for p, samples in enumerate(result):
        assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, s) for s in range(5)]
        for sample in samples:
            assert 1 <= len(sample.token_ids) <= 10 and sample.num_tokens == len(sample.token_ids)
            assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            assert sample.score is None
    # num_samples given to the call overrides the config's
    fewer = generate(model, tokenizer, prompt_ids, cfg(num_samples=5), seed=0, num_samples=2)
    assert [len(samples) for samples in fewer] == [2] * 3
    assert generate(model, tokenizer, [], cfg(), seed=0) == []


def test_greedy_equals_a_manual_greedy_loop_and_is_deterministic(tiny, prompt_ids):
    model, tokenizer = tiny
    ends = set(end_token_ids(model, tokenizer))
    greedy = cfg(temperature=0.0, max_new_tokens=12, num_samples=3)
    first = generate(model, tokenizer, prompt_ids, greedy, seed=0)
    again = generate(model, tokenizer, prompt_ids, greedy, seed=123)  # the seed plays no part
    assert token_ids(first) == token_ids(again)
    for p, samples in enumerate(first):
        assert all(s.token_ids == samples[0].token_ids for s in samples)  # every greedy sample is the same
        assert samples[0].token_ids == manual_greedy(model, prompt_ids[p], 12, ends)


def test_same_seed_same_samples_whatever_the_batch_size(tiny, prompt_ids):
    model, tokenizer = tiny
    one_by_one = generate(model, tokenizer, prompt_ids, cfg(num_samples=4, batch_size=1), seed=3)
    batched = generate(model, tokenizer, prompt_ids, cfg(num_samples=4, batch_size=5), seed=3)
    all_at_once = generate(model, tokenizer, prompt_ids, cfg(num_samples=4, batch_size=64), seed=3)
    assert token_ids(one_by_one) == token_ids(batched) == token_ids(all_at_once)
    # sample s of prompt p depends on (seed, p, s) only: fewer samples are a prefix of more
    two = generate(model, tokenizer, prompt_ids, cfg(num_samples=2, batch_size=16), seed=3)
    assert token_ids(two) == [ids[:2] for ids in token_ids(batched)]
    # and the samples of one prompt differ from each other
    assert len({tuple(ids) for ids in token_ids(batched)[1]}) == 4


def test_different_seed_gives_different_samples(tiny, prompt_ids):
    model, tokenizer = tiny
    a = generate(model, tokenizer, prompt_ids, cfg(num_samples=2), seed=0)
    b = generate(model, tokenizer, prompt_ids, cfg(num_samples=2), seed=1)
    assert token_ids(a) != token_ids(b)
    assert not np.array_equal(sample_uniforms(0, 0, 0, 8), sample_uniforms(1, 0, 0, 8))
    assert not np.array_equal(sample_uniforms(0, 0, 0, 8), sample_uniforms(0, 0, 1, 8))
    assert np.array_equal(sample_uniforms(0, 2, 1, 8)[:4], sample_uniforms(0, 2, 1, 4))


def test_top_k_1_is_greedy(tiny, prompt_ids):
    model, tokenizer = tiny
    greedy = generate(model, tokenizer, prompt_ids, cfg(temperature=0.0), seed=0)
    top1 = generate(model, tokenizer, prompt_ids, cfg(temperature=1.3, top_k=1, num_samples=2), seed=5)
    assert [[ids[0]] * 2 for ids in token_ids(greedy)] == token_ids(top1)


def test_end_token_cuts_the_completion_and_marks_it_finished(tiny, prompt_ids):
    model, tokenizer = tiny
    greedy = cfg(temperature=0.0, max_new_tokens=12)
    free_run = generate(model, tokenizer, prompt_ids, greedy, seed=0)
    tokens = free_run[1][0].token_ids
    assert not free_run[1][0].finished and len(tokens) == 12
    # Make the 4th greedy token of prompt 1 an end token of a copy of the model.
    stop = tokens[3]
    stopper = copy.deepcopy(model)
    stopper.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    result = generate(stopper, tokenizer, prompt_ids, greedy, seed=0)
    cut_at = tokens.index(stop)
    assert result[1][0].token_ids == tokens[: cut_at + 1] and result[1][0].finished
    for p in (0, 2):  # a row that does not hit an end token runs to max_new_tokens, unchanged
        sample = result[p][0]
        if stop in free_run[p][0].token_ids:
            assert sample.finished and sample.token_ids[-1] == stop
        else:
            assert sample.token_ids == free_run[p][0].token_ids and not sample.finished


def test_cut_keeps_the_first_end_token_only():
    assert _cut([5, 6, 2, 7, 2], {2}, 10) == ([5, 6, 2], True)
    assert _cut([5, 6, 7, 0, 0], {2}, 3) == ([5, 6, 7], False)
    assert _cut([2], {2}, 1) == ([2], True)


def test_special_tokens_are_left_out_of_the_text(tiny):
    _, tokenizer = tiny
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("ok")["input_ids"] + [end]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ok"


def test_left_padding_gives_each_prompt_its_own_completion(tiny, prompt_ids):
    model, tokenizer = tiny
    greedy = cfg(temperature=0.0, max_new_tokens=10, batch_size=8)
    together = generate(model, tokenizer, prompt_ids, greedy, seed=0)
    for p, ids in enumerate(prompt_ids):
        alone = generate(model, tokenizer, [ids], greedy, seed=0)
        assert alone[0][0].token_ids == together[p][0].token_ids
    # sampled, too: one row per batch (no padding) or the short and the long prompt padded together
    unpadded = generate(model, tokenizer, prompt_ids[:2], cfg(num_samples=3, batch_size=1), seed=7)
    padded = generate(model, tokenizer, prompt_ids[:2], cfg(num_samples=3, batch_size=8), seed=7)
    assert token_ids(unpadded) == token_ids(padded)


def test_the_model_mode_is_restored(tiny, prompt_ids):
    model, tokenizer = tiny
    model.train()
    generate(model, tokenizer, prompt_ids[:1], cfg(max_new_tokens=2), seed=0)
    assert model.training
    model.eval()
    generate(model, tokenizer, prompt_ids[:1], cfg(max_new_tokens=2), seed=0)
    assert not model.training


def test_an_empty_prompt_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(model, tokenizer, [[5], []], cfg(), seed=0)


def test_docs_sampling_table_matches_the_recipe_model():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "sampling.md").read_text()
    table = text[: text.index("## How completions are generated")]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.M))
    assert set(rows) == set(SamplingConfig.model_fields)
    for name, field in SamplingConfig.model_fields.items():
        default = field.default
        shown = "null" if default is None else str(default)
        assert rows[name] == shown, name


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.9),
                                      dict(temperature=0.0)])
def test_recorded_logps_entropy_and_hidden_states_equal_a_fresh_forward_pass(tiny, prompt_ids, settings):
    """What generate(record=True) keeps while sampling (left-padded, with the KV cache, under any
    temperature / top-k / top-p) is what one forward pass over prompt + completion computes: the
    log-probs at temperature 1 of the sampled tokens, the entropy there, and the LM head's input.
    The online loop relies on it to skip the old policy's forward pass."""
    from prefkit.data.batching import collate
    from prefkit.data.prepare import TokenizedExample
    from prefkit.loops.online import PolicyWithModules, keep_positions, policy_forward
    from prefkit_builtins.ppo_kl import PPOKL, PPOParams

    model, tokenizer = tiny
    plain = generate(model, tokenizer, prompt_ids, cfg(num_samples=3, batch_size=4, **settings), seed=4)
    recorded = generate(model, tokenizer, prompt_ids, cfg(num_samples=3, batch_size=4, **settings), seed=4,
                        record=True, hidden_states=True)
    assert token_ids(recorded) == token_ids(plain) and plain[0][0].logps is None  # recording changes nothing
    flat = [s for samples in recorded for s in samples]
    examples = [TokenizedExample(i, prompt_ids[s.prompt_index], {"completion": s.token_ids}) for i, s in enumerate(flat)]
    batch = collate(examples, list(range(len(flat))), tokenizer.pad_token_id, ("completion",))
    objective, params = PPOKL(), PPOParams()
    heads = objective.modules(params, model.config.hidden_size)
    torch.nn.init.normal_(heads["value_head"].weight, generator=torch.Generator().manual_seed(0))
    wrapped = PolicyWithModules(model, heads, hidden_states=True).eval()
    with torch.no_grad():
        logps, entropy, outputs, mask = policy_forward(wrapped, objective, params, batch, with_entropy=True)
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                       use_cache=False).hidden_states[-1][keep_positions(batch.completion_mask)]
        values = objective.token_outputs(params, dict(heads), torch.cat([s.hidden for s in flat]))["values"]
    for row, sample in enumerate(flat):
        n = sample.num_tokens
        assert sample.logps.shape == sample.entropy.shape == (n,) and sample.hidden.shape == (n, model.config.hidden_size)
        torch.testing.assert_close(sample.logps, logps[row, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(sample.entropy, entropy[row, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([s.hidden for s in flat]), hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, outputs["values"][mask], rtol=0, atol=1e-5)
    assert float(outputs["values"][mask].abs().max()) > 0  # a head that is not all zeros was compared


def test_min_new_tokens_suppresses_the_end_token_until_then(tiny, prompt_ids):
    model, tokenizer = tiny
    ends = set(end_token_ids(model, tokenizer))
    fixed = generate(model, tokenizer, prompt_ids, cfg(num_samples=4, temperature=1.5, min_new_tokens=10), seed=2,
                     record=True)
    assert all(s.num_tokens == 10 and not s.finished and not ends & set(s.token_ids)
               for samples in fixed for s in samples)
    # the recorded log-probs are the model's own (the end token kept its probability there)
    assert all(bool(torch.all(s.logps < 0)) for samples in fixed for s in samples)
