"""Reward functions: the hook, build_reward, and the built-in sentiment, keywords and reward_model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefkit.data.prepare import prepare_dataset
from prefkit.api.errors import PrefkitError
from prefkit.plugins import Registry, load_registry
from prefkit.recipe import DataConfig, RewardConfig
from prefkit.api import RewardFunction, RewardParams, Scorer
from prefkit.models.rewards import CheckedScorer, build_reward, prompt_text
from prefkit.models.tiny import build_tiny_tokenizer
from prefkit_builtins.rewards import chars_of, fit, words_of

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly




def build(name: str, **params) -> CheckedScorer:
    return build_reward(RewardConfig(name=name, params=params), None, cache_dir="unused", device="cpu", registry=REGISTRY)


# --------------------------------------------------------------------------- the hook


def test_builtins_are_registered_through_the_entry_point():
    registry = load_registry()
    assert {"sentiment", "keywords", "reward_model"} <= set(registry.reward_functions)
    for name in ("sentiment", "keywords", "reward_model"):
        function = registry.reward_functions[name]
        assert isinstance(function, RewardFunction) and function.description
        assert issubclass(function.Params, RewardParams)
        assert registry.owners[("reward_functions", name)] == "rewards"


def test_build_reward_refuses_unknown_names_and_bad_params():
    with pytest.raises(PrefkitError, match="unknown reward function 'nope'; registered: .*keywords"):
        build("nope")
    with pytest.raises(PrefkitError, match="reward.params.targets"):
        build("keywords")
    with pytest.raises(PrefkitError, match="reward.params.colour"):
        build("sentiment", colour="red")


class Echo:
    def __init__(self, answer):
        self.answer = answer
        self.seen = None

    def __call__(self, prompts, completions):
        self.seen = prompts
        return self.answer(completions)


def test_the_checked_scorer_checks_what_a_plugin_returns():
    assert CheckedScorer("echo", Echo(lambda c: torch.tensor([1.0, 2.0])))(["a", "b"], ["x", "y"]) == [1.0, 2.0]
    with pytest.raises(PrefkitError, match="'short' returned 1 scores for 2 completions"):
        CheckedScorer("short", Echo(lambda c: [1.0]))(["a", "b"], ["x", "y"])
    with pytest.raises(PrefkitError, match="non-finite score for completion 1"):
        CheckedScorer("nan", Echo(lambda c: [0.0, math.nan]))(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        CheckedScorer("x", Echo(lambda c: [0.0]))(["a", "b"], ["x"])
    assert CheckedScorer("empty", Echo(lambda c: 1 / 0))([], []) == []


def test_scorers_get_plain_text_unless_they_accept_messages():
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    plain = Echo(lambda c: [0.0] * len(c))
    CheckedScorer("plain", plain)([messages, "Hello"], ["a", "b"])
    assert plain.seen == ["Hi?", "Hello"]
    raw = Echo(lambda c: [0.0] * len(c))
    raw.accepts_messages = True
    CheckedScorer("raw", raw)([messages, "Hello"], ["a", "b"])
    assert raw.seen == [messages, "Hello"]
    assert isinstance(raw, Scorer)


def test_prompt_text():
    assert prompt_text("What is 2+2?") == "What is 2+2?"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
    ]
    assert prompt_text(conversation) == "Second question"  # the last user message
    assert prompt_text([{"role": "system", "content": "Only a system turn"}]) == "Only a system turn"
    assert prompt_text(None) == "" and prompt_text([]) == ""
    with pytest.raises(TypeError):
        prompt_text(3)


def test_prepared_prompts_keep_their_raw_prompt(tmp_path):
    rows = [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
            {"prompt": "Count.", "chosen": " 1 2 3", "rejected": " no"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = build_tiny_tokenizer()
    for kind in ("prompts", "pairs", "sft"):
        data = prepare_dataset(DataConfig(train=str(path)), tokenizer, REGISTRY.data_kinds[kind],
                               registry=Registry(data_kinds=REGISTRY.data_kinds))
        assert [ex.prompt for ex in data.examples] == ["Say hi.", "Count."]
    chat = prepare_dataset(DataConfig(train="tiny-prefs-chat"), tokenizer, REGISTRY.data_kinds["prompts"], registry=REGISTRY)
    first = chat.examples[0].prompt
    assert isinstance(first, list) and first[-1]["role"] == "user"


# --------------------------------------------------------------------------- sentiment


def test_sentiment_scores_positive_above_negative_in_0_1():
    scorer = build("sentiment")
    texts = ["great movie, I loved it", "terrible, boring film", "The film is ninety minutes long.", ""]
    scores = scorer(["Review:"] * 4, texts)
    assert scores[0] > 0.85 and scores[1] < 0.2  # VADER compound +0.84 and -0.66, mapped to [0, 1]
    assert scores[0] > scores[2] > scores[1]
    assert scores[2] == scores[3] == 0.5  # neutral text and no text: compound 0
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert [scorer(["x"], [t])[0] for t in texts] == scores  # a batch scores like single calls
    assert scorer(["a different prompt"] * 4, texts) == scores  # the prompt is not read


# --------------------------------------------------------------------------- keywords


def test_keywords_words_share_count_any():
    text = "The bee, the TREE!"  # words: the, bee, the, tree -> 2 of 4 are "the"
    assert words_of(text) == ["the", "bee", "the", "tree"]
    assert build("keywords", targets=["The"])([""], [text]) == [2 / 4]
    assert build("keywords", targets=["the"], mode="count")([""], [text]) == [2.0]
    assert build("keywords", targets=["the"], mode="any")([""], [text]) == [1.0]
    assert build("keywords", targets=["bee", "tree"])([""], [text]) == [2 / 4]
    # "thee" is not "the"; punctuation-only words do not count as words
    assert words_of("thee -- the ...") == ["thee", "the"]
    assert build("keywords", targets=["the"])([""], ["thee -- the ..."]) == [1 / 2]
    assert build("keywords", targets=["the"], mode="any")([""], ["nothing here"]) == [0.0]


def test_keywords_chars_share_count_any():
    # "bee tree": 7 characters that are not whitespace (b e e t r e e), 4 of them "e"
    assert chars_of("bee tree") == list("beetree")
    assert build("keywords", targets=["e"], unit="char")([""], ["bee tree"]) == [4 / 7]
    assert build("keywords", targets=["E"], unit="char", mode="count")([""], ["bee tree"]) == [4.0]
    assert build("keywords", targets=["e", "b"], unit="char")([""], ["Bee tree"]) == [5 / 7]
    assert build("keywords", targets=["z"], unit="char", mode="any")([""], ["bee tree"]) == [0.0]
    assert build("keywords", targets=["e"], unit="char")(["", ""], ["", "   "]) == [0.0, 0.0]  # no characters


def test_keywords_params_are_checked():
    function = load_registry().reward_functions["keywords"]
    for bad in ({"targets": []}, {"targets": [""]}, {"targets": ["ee"], "unit": "char"},
                {"targets": ["two words"]}, {"targets": ["e"], "mode": "most"}, {"targets": ["e"], "x": 1}):
        with pytest.raises(ValueError):
            function.Params.model_validate(bad)


# --------------------------------------------------------------------------- reward_model


def save_reward_model(folder, chat_template=True, seed=0):
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def manual_score(model, ids: list[int]) -> float:
    """One unpadded row: the classifier's own pooled score (its last token)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_reward_model_scores_like_a_manual_forward_with_the_chat_template(tmp_path):
    model, tokenizer = save_reward_model(tmp_path / "rm")
    scorer = build("reward_model", path=str(tmp_path / "rm"))
    prompts, completions = ["What is two plus two?", "Hi"], ["Four.", "Hello there, how are you today?"]
    scores = scorer(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>\n"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert score == pytest.approx(manual_score(model, ids), abs=1e-5)


def test_reward_model_without_a_chat_template_appends_the_end_token(tmp_path):
    model, tokenizer = save_reward_model(tmp_path / "rm", chat_template=False)
    score = build("reward_model", path=str(tmp_path / "rm"))(["Q:"], [" yes"])[0]
    ids = tokenizer("Q:")["input_ids"] + tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert score == pytest.approx(manual_score(model, ids + [tokenizer.eos_token_id]), abs=1e-5)


def test_reward_model_padding_and_batching_do_not_change_a_score(tmp_path):
    save_reward_model(tmp_path / "rm")
    alone = build("reward_model", path=str(tmp_path / "rm"))
    short, long = ("Hi", "Yo"), ("Please tell me a long story about bees and trees.", "Once upon a time " * 4)
    single = alone([short[0]], [short[1]])[0]
    together = alone([short[0], long[0]], [short[1], long[1]])  # the short row is right-padded here
    assert together[0] == pytest.approx(single, abs=1e-5)
    one_at_a_time = build("reward_model", path=str(tmp_path / "rm"), batch_size=1)
    assert one_at_a_time([short[0], long[0]], [short[1], long[1]]) == pytest.approx(together, abs=1e-5)
    assert together[1] != pytest.approx(together[0])


def test_reward_model_takes_conversational_prompts(tmp_path):
    save_reward_model(tmp_path / "rm")
    scorer = build("reward_model", path=str(tmp_path / "rm"))
    as_text = scorer(["Hi"], ["Hello!"])
    as_messages = scorer([[{"role": "user", "content": "Hi"}]], ["Hello!"])
    assert as_messages == pytest.approx(as_text, abs=1e-6)


def test_reward_model_truncates_to_max_length(tmp_path):
    assert fit([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8], 6) == ([3, 4, 5, 6], [7, 8])  # the prompt keeps its end
    assert fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 6) == ([2, 3, 4], [5, 6, 7])  # half the budget at least
    save_reward_model(tmp_path / "rm")
    scorer = build("reward_model", path=str(tmp_path / "rm"), max_length=16)
    assert len(scorer(["A prompt far longer than sixteen bytes"], ["and a long answer too"])) == 1


def test_reward_model_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PrefkitError, match=f"^reward.params.path: no reward model folder at '{missing}'$"):
        build("reward_model", path=str(missing))
    # the key is the block's own: a compare's gold, judge or arm reward, or the label command's option
    config = RewardConfig(name="reward_model", params={"path": str(missing)})
    for key, start in (("evaluation.judge", "evaluation.judge.params.path: "), ("--reward", "--reward-param path: ")):
        with pytest.raises(PrefkitError) as info:
            build_reward(config, None, cache_dir="unused", registry=REGISTRY, key=key)
        assert str(info.value) == f"{start}no reward model folder at '{missing}'"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrefkitError, match="not a Hugging Face model folder"):
        build("reward_model", path=str(tmp_path / "empty"))
    # the same, found without building anything (validate and the checks before a run use it)
    function = REGISTRY.reward_functions["reward_model"]
    assert function.problems(function.Params(path=str(missing))) == [f"params.path: no reward model folder at '{missing}'"]
    save_reward_model(tmp_path / "rm")
    assert function.problems(function.Params(path=str(tmp_path / "rm"))) == []
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}  # a two-class classifier is not a reward model
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    assert function.problems(function.Params(path=str(tmp_path / "rm"))) == [
        f"params.path: the model at '{tmp_path / 'rm'}' has 2 labels; a reward model has one"]
    assert REGISTRY.reward_functions["sentiment"].problems(REGISTRY.reward_functions["sentiment"].Params()) == []


# --------------------------------------------------------------------------- docs/rewards.md


def test_the_documented_plugin_example_runs():
    import re
    import types
    from pathlib import Path

    from prefkit.plugins import build_registry

    text = (Path(__file__).resolve().parent.parent / "docs" / "rewards.md").read_text()
    section = text[text.index("## Writing your own"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("brevity_example")
    exec(compile(code, "docs/rewards.md", "exec"), module.__dict__)
    registry = build_registry(extra_plugins={"brevity": module})
    assert registry.owners[("reward_functions", "brevity")] == "brevity"
    scorer = build_reward(RewardConfig(name="brevity", params={"target_words": 2}), None, cache_dir="unused",
                          device="cpu", registry=registry)
    assert scorer(["q", "q"], ["one two", "one two three four"]) == [1.0, 0.5]
    with pytest.raises(PrefkitError, match="reward.params.words"):
        build_reward(RewardConfig(name="brevity", params={"words": 2}), None, cache_dir="unused", registry=registry)
