"""TRL's dataset types: detection, the data kinds that read each one, tokenization of
language-modeling rows (``text``, ``messages``) and implicit-prompt preference rows, and the one
message a row of the wrong type gets.

The tiny tokenizer is byte-level (one token per ASCII character, no BOS); its end token is
``<|endoftext|>`` without a chat template and ``<|im_end|>`` with one (ChatML).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefkit.api import TRL_TYPES
from prefkit.api.errors import DataError
from prefkit.data.batching import collate
from prefkit.data.prepare import prepare_dataset
from prefkit.data.rows import row_type
from prefkit.models.tiny import build_tiny_tokenizer
from prefkit.plugins import Registry, load_registry
from prefkit.recipe import DataConfig

KINDS = load_registry().data_kinds
REGISTRY = Registry(data_kinds=dict(KINDS))

TEXT = {"text": "Hi there"}
CHAT = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
PAIR = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}
IMPLICIT = {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}
UNPAIRED = {"prompt": "Say hi.", "completion": " Hi!", "label": True}
PROMPT_COMPLETION = {"prompt": "Say hi.", "completion": " Hi!"}
PROMPT_ONLY = {"prompt": "Say hi."}
STEPWISE = {"prompt": "2+2?", "completions": ["2+2 is 4."], "labels": [True]}


@pytest.fixture(scope="module")
def chat_tok():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    return build_tiny_tokenizer(chat_template=False)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare(tmp_path: Path, rows: list[dict], tokenizer, kind: str = "sft", **overrides):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return prepare_dataset(DataConfig(train=str(path), **overrides), tokenizer, KINDS[kind], registry=REGISTRY,
                           needed_by="objective 'x'")


def error_of(tmp_path: Path, rows: list[dict], tokenizer, kind: str = "sft", **overrides) -> str:
    with pytest.raises(DataError) as info:
        prepare(tmp_path, rows, tokenizer, kind, **overrides)
    return str(info.value).removeprefix(f"{tmp_path / 'rows.jsonl'} (train): ")


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("row, name", [
    (TEXT, "language modeling"), (CHAT, "language modeling"), (PAIR, "preference"), (IMPLICIT, "preference"),
    (UNPAIRED, "unpaired preference"), (PROMPT_COMPLETION, "prompt-completion"), (PROMPT_ONLY, "prompt-only"),
    (STEPWISE, "stepwise supervision"), ({"question": "?"}, "unknown"),
    ({"prompt": "Say hi.", "chosen": " Hi!"}, "preference"),  # incomplete: the data kind names the missing field
    ({**PROMPT_COMPLETION, "label": None}, "prompt-completion"),  # a null (an empty CSV cell) is absent
])
def test_each_row_gets_its_trl_type(row, name):
    assert row_type(row).name == name
    assert name == "unknown" or name in TRL_TYPES


def test_every_builtin_kind_declares_the_types_it_reads():
    assert KINDS["pairs"].trl_types == ("preference",)
    assert KINDS["sft"].trl_types == ("prompt-completion", "preference", "language modeling")
    assert KINDS["prompts"].trl_types == ("prompt-only", "prompt-completion", "preference", "unpaired preference")
    assert KINDS["unpaired"].trl_types == ("unpaired preference",)


# ----------------------------------------------------------------------------- the found/needed message


SFT_NEEDS = ("'prompt-completion' rows (prompt, completion), 'preference' rows (prompt, chosen, rejected) or "
             "'language modeling' rows (text or messages)")


@pytest.mark.parametrize("row, kind, message", [
    (TEXT, "pairs", "rows are TRL 'language modeling' (field 'text'); objective 'x' needs 'preference' rows "
                    "(prompt, chosen, rejected)"),
    (CHAT, "pairs", "rows are TRL 'language modeling' (field 'messages'); objective 'x' needs 'preference' rows"),
    (UNPAIRED, "pairs", "rows are TRL 'unpaired preference' (prompt, completion, label); objective 'x' needs "
                        "'preference' rows"),
    (PROMPT_ONLY, "pairs", "rows are TRL 'prompt-only' (field 'prompt'); objective 'x' needs 'preference' rows"),
    (PROMPT_COMPLETION, "pairs", "rows are TRL 'prompt-completion' (prompt, completion); objective 'x' needs "
                                 "'preference' rows"),
    (UNPAIRED, "sft", f"rows are TRL 'unpaired preference' (prompt, completion, label); objective 'x' needs "
                      f"{SFT_NEEDS}"),
    (STEPWISE, "sft", "rows are TRL 'stepwise supervision' (prompt, completions, labels); objective 'x' needs"),
    (PROMPT_ONLY, "sft", f"rows are TRL 'prompt-only' (field 'prompt'); objective 'x' needs {SFT_NEEDS}"),
    (PAIR, "unpaired", "rows are TRL 'preference' (prompt, chosen, rejected); objective 'x' needs 'unpaired "
                       "preference' rows (prompt, completion, label)"),
    (IMPLICIT, "unpaired", "rows are TRL 'preference' (chosen, rejected, implicit prompt); objective 'x' needs"),
    (TEXT, "prompts", "rows are TRL 'language modeling' (field 'text'); objective 'x' needs 'prompt-only' rows "
                      "(prompt), 'prompt-completion' rows (prompt, completion), 'preference' rows (prompt, chosen, "
                      "rejected) or 'unpaired preference' rows (prompt, completion, label)"),
    ({"question": "?", "answer": "!"}, "pairs", "rows are in none of TRL's dataset types (fields: 'answer', "
                                                "'question'); objective 'x' needs 'preference' rows"),
])
def test_a_row_of_the_wrong_type_gets_one_message_naming_found_and_needed(tmp_path, plain_tok, row, kind, message):
    found = error_of(tmp_path, [row] * 3, plain_tok, kind)
    assert found.startswith(message), found
    assert "\n" not in found


def test_the_type_is_what_most_rows_have_so_an_incomplete_first_row_names_its_field(tmp_path, plain_tok):
    message = error_of(tmp_path, [{"prompt": "Say hi.", "chosen": " Hi!"}, PAIR, PAIR], plain_tok, "pairs")
    assert message.startswith("row 1: field 'rejected' is missing")


def test_language_modeling_rows_mixed_with_other_rows_are_bad_rows(tmp_path, plain_tok):
    message = error_of(tmp_path, [TEXT, PROMPT_COMPLETION, TEXT], plain_tok)
    assert message.startswith("row 2: a TRL 'prompt-completion' row (prompt, completion) among 'language modeling' "
                              "rows; keep one type per source")
    data = prepare(tmp_path, [TEXT, PROMPT_COMPLETION, TEXT], plain_tok, bad_rows="skip")
    assert [ex.row for ex in data.examples] == [1, 3]


# ----------------------------------------------------------------------------- language modeling: text


def test_text_rows_are_the_whole_completion_after_an_empty_prompt(tmp_path, plain_tok):
    data = prepare(tmp_path, [TEXT], plain_tok)
    ex = data.examples[0]
    # no BOS: the first token, which nothing predicts, is the prompt; every other token and the end token are learnt
    assert ex.prompt_ids == ids(plain_tok, "H") == [43]
    assert ex.completions["chosen"] == ids(plain_tok, "i there") + [plain_tok.eos_token_id]
    assert ex.masks == {}
    assert (data.report.format, data.report.chat_template) == ("standard", False)
    batch = collate(data.examples, [0], plain_tok.pad_token_id, data.names)
    assert batch.input_ids[0].tolist() == ids(plain_tok, "Hi there") + [plain_tok.eos_token_id]
    assert batch.completion_mask[0].tolist() == [False] + [True] * 8


def test_text_rows_skip_the_chat_template_even_when_the_tokenizer_has_one(tmp_path, chat_tok):
    ex = prepare(tmp_path, [TEXT], chat_tok).examples[0]
    assert ex.prompt_ids == [43]
    assert chat_tok.decode(ex.completions["chosen"]) == "i there<|im_end|>"  # the tokenizer's own end token
    message = error_of(tmp_path, [TEXT], chat_tok, chat_template="always")
    assert message.startswith("the rows are TRL 'language modeling' text (field 'text'), which is trained on as "
                              "plain text, but data.chat_template is 'always'")


def test_text_rows_are_cut_at_the_end(tmp_path, plain_tok):
    data = prepare(tmp_path, [TEXT], plain_tok, max_length=5)
    assert data.examples[0].prompt_ids + data.examples[0].completions["chosen"] == ids(plain_tok, "Hi th")
    assert data.report.rows_truncated == 1


# ----------------------------------------------------------------------------- language modeling: messages


def test_messages_learn_every_assistant_turn_and_no_user_turn(tmp_path, chat_tok):
    data = prepare(tmp_path, [CHAT], chat_tok)
    ex = data.examples[0]
    assert chat_tok.decode(ex.prompt_ids) == "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
    first, between, second = "A1<|im_end|>\n", "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", \
        "A2<|im_end|>\n"
    assert ex.completions["chosen"] == ids(chat_tok, first) + ids(chat_tok, between) + ids(chat_tok, second)
    assert ex.masks["chosen"] == ([True] * len(ids(chat_tok, first)) + [False] * len(ids(chat_tok, between))
                                  + [True] * len(ids(chat_tok, second)))
    assert len(ids(chat_tok, first)) == 4  # A, 1, <|im_end|>, \n
    batch = collate(data.examples, [0], chat_tok.pad_token_id, data.names)
    learnt = batch.input_ids[0][batch.completion_mask[0]].tolist()
    assert chat_tok.decode(learnt) == first + second
    assert data.report.format == "conversational" and data.report.chat_template


def test_a_single_answer_conversation_needs_no_mask(tmp_path, chat_tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]}]
    ex = prepare(tmp_path, rows, chat_tok).examples[0]
    assert chat_tok.decode(ex.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert chat_tok.decode(ex.completions["chosen"]) == "A<|im_end|>\n" and ex.masks == {}


def test_a_cut_conversation_cuts_its_mask(tmp_path, chat_tok):
    full = prepare(tmp_path, [CHAT], chat_tok).examples[0]
    room = 10
    cut = prepare(tmp_path, [CHAT], chat_tok, max_length=len(full.prompt_ids) + room).examples[0]
    assert cut.completions["chosen"] == full.completions["chosen"][:room]
    assert cut.masks["chosen"] == full.masks["chosen"][:room] == [True] * 4 + [False] * 6


def test_the_mask_is_part_of_the_fingerprint(tmp_path, chat_tok):
    data = prepare(tmp_path, [CHAT], chat_tok)
    before = data.fingerprint()
    data.examples[0].masks["chosen"][-1] = False
    assert data.fingerprint() != before


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "Q"}], "field 'messages' has no assistant message to learn"),
    ([{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}],
     "field 'messages' starts with an assistant message"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}],
     "field 'messages' message 2 has empty content"),
])
def test_bad_conversations_are_bad_rows(tmp_path, chat_tok, messages, problem):
    assert error_of(tmp_path, [CHAT, {"messages": messages}], chat_tok).startswith(f"row 2: {problem}")


# ----------------------------------------------------------------------------- preference with an implicit prompt


def test_plain_text_pairs_without_a_prompt_share_it_up_to_a_word_boundary(tmp_path, plain_tok):
    rows = [IMPLICIT, {"chosen": "Name a color. Yes", "rejected": "Name a color. Yellow"}]
    data = prepare(tmp_path, rows, plain_tok, kind="pairs")
    eos = plain_tok.eos_token_id
    first, second = data.examples
    assert first.prompt_ids == ids(plain_tok, "Q: 2+2? A:")
    assert first.completions == {"chosen": ids(plain_tok, " 4") + [eos], "rejected": ids(plain_tok, " 5") + [eos]}
    # TRL's extract_prompt would cut inside the word ("... Ye" + "s" / "llow"); the answers keep whole words
    assert second.prompt_ids == ids(plain_tok, "Name a color.")
    assert second.completions["rejected"] == ids(plain_tok, " Yellow") + [eos]


def test_implicit_prompt_pairs_feed_sft_and_prompts_too(tmp_path, plain_tok):
    sft = prepare(tmp_path, [IMPLICIT], plain_tok, kind="sft").examples[0]
    assert sft.prompt_ids == ids(plain_tok, "Q: 2+2? A:")
    assert sft.completions == {"chosen": ids(plain_tok, " 4") + [plain_tok.eos_token_id]}
    prompts = prepare(tmp_path, [IMPLICIT], plain_tok, kind="prompts").examples[0]
    assert prompts.prompt_ids == ids(plain_tok, "Q: 2+2? A:") and prompts.completions == {}


def test_plain_pairs_that_share_no_text_are_bad_rows(tmp_path, plain_tok):
    message = error_of(tmp_path, [IMPLICIT, {"chosen": "Yes.", "rejected": "No."}], plain_tok, "pairs")
    assert message.startswith("row 2: field 'prompt' is missing, and 'chosen' and 'rejected' share no leading text")


# ----------------------------------------------------------------------------- local dataset folders


ROWS = [{"prompt": f"Say hi {i}.", "chosen": " Hi!", "rejected": " No."} for i in range(3)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' own cache (load_dataset on a folder writes Arrow files there), per test."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import datasets

    datasets.disable_progress_bars()
    return tmp_path


def load(source: Path, split: str = "train", subset: str | None = None) -> list[dict]:
    from prefkit.data.io import load_rows

    rows, shown = load_rows(str(source), split, registry=REGISTRY, subset=subset)
    assert shown == str(source)
    return rows


def load_error(source: Path, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        load(source, split)
    return str(info.value)


def test_a_saved_dataset_folder_loads_with_load_from_disk(hf_cache, plain_tok):
    from datasets import Dataset

    folder = hf_cache / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert load(folder) == ROWS
    assert load(folder, "whatever") == ROWS  # one split: the name only labels it
    data = prepare_dataset(DataConfig(train=str(folder)), plain_tok, KINDS["pairs"], registry=REGISTRY)
    assert [ex.prompt_ids for ex in data.examples] == [ids(plain_tok, f"Say hi {i}.") for i in range(3)]
    with pytest.raises(DataError, match="data.train has a single split"):
        prepare_dataset(DataConfig(train=str(folder)), plain_tok, KINDS["pairs"], registry=REGISTRY, split="eval")


def test_a_saved_dataset_dict_folder_picks_the_split_and_lists_them(hf_cache):
    from datasets import Dataset, DatasetDict

    folder = hf_cache / "saved-dict"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    assert load(folder) == ROWS and load(folder, "test") == ROWS[:1]
    assert load_error(folder, "validation") == (f"{folder} (validation): the saved DatasetDict has no split "
                                                "'validation'; its splits: test, train")


def test_a_hub_layout_folder_loads_with_load_dataset(hf_cache):
    from datasets import Dataset

    folder = hf_cache / "snapshot"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(ROWS).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(ROWS[:2]).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    assert load(folder) == ROWS and load(folder, "test") == ROWS[:2]
    message = load_error(folder, "dev")
    assert message.startswith(f"{folder} (dev): a dataset folder that `datasets` cannot read: Unknown split")
    assert "Hugging Face hub" not in message

    plain = hf_cache / "plain"
    plain.mkdir()
    (plain / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert load(plain) == ROWS


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "a dataset folder that `datasets` cannot read: The directory at"),
    (lambda folder: (folder / "dataset_dict.json").write_text("{not json"),
     "a folder written by save_to_disk that `datasets` cannot read"),
])
def test_an_unreadable_folder_is_one_line_naming_it(hf_cache, make, expected):
    folder = hf_cache / "bad"
    folder.mkdir()
    make(folder)
    message = load_error(folder)
    assert message.startswith(f"{folder} (train): {expected}") and "\n" not in message


# ----------------------------------------------------------------------------- mixtures


from prefkit.data.mixture import carve, mixture_counts, pick  # noqa: E402


@pytest.mark.parametrize("available, weights, total, cap, counts", [
    ([10, 30], [0.7, 0.3], None, None, [10, 4]),  # total min(10/0.7, 30/0.3) = 14: 9.8 -> 9 (+1 remainder), 4.2 -> 4
    ([10, 30], [0.7, 0.3], 20, None, [14, 6]),  # a given size: 14 of a's 10 examples, so they repeat
    ([10, 30], [7, 3], None, 5, [4, 1]),  # 3.5 and 1.5: the tied remainder goes to the first source
    ([10, 30], [1, 1], None, None, [10, 10]),
    ([10, 30], [0.0, 1.0], None, None, [0, 30]),
    ([10, 30], None, None, None, [10, 30]),  # no weights: the concatenation
    ([10, 30], None, None, 15, [10, 5]),  # ... and max_rows takes its first rows
])
def test_mixture_counts_by_hand(available, weights, total, cap, counts):
    assert mixture_counts(available, weights, total=total, cap=cap) == counts


def test_mixture_counts_refuse_weights_that_sum_to_zero():
    with pytest.raises(ValueError):
        mixture_counts([3, 3], [0.0, 0.0])


def test_pick_repeats_only_when_it_must_and_is_seeded():
    assert pick(3, 3, seed=0, index=0) == [0, 1, 2]
    chosen = pick(10, 4, seed=0, index=0)
    assert len(set(chosen)) == 4 and chosen == sorted(chosen) == pick(10, 4, seed=0, index=0)
    assert pick(10, 4, seed=1, index=0) != chosen or pick(10, 4, seed=2, index=0) != chosen
    assert pick(3, 7, seed=0, index=0)[:6] == [0, 1, 2, 0, 1, 2]


def write_prompts(path: Path, letter: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{letter}{i}", "chosen": " y", "rejected": " n"}) + "\n"
                            for i in range(n)))
    return path


def prompts_of(tokenizer, data) -> list[str]:
    return [tokenizer.decode(ex.prompt_ids) for ex in data.examples]


def mixed(tmp_path, plain_tok, split="train", **data):
    a, b = write_prompts(tmp_path / "a.jsonl", "A", 10), write_prompts(tmp_path / "b.jsonl", "B", 30)
    train = [{"source": str(a), "weight": 0.7}, {"source": str(b), "weight": 0.3}]
    cfg = DataConfig(**{"train": train, "seed": 0, **data})
    return prepare_dataset(cfg, plain_tok, KINDS["pairs"], registry=REGISTRY, split=split)


def test_a_weighted_mixture_takes_its_proportions_and_reports_each_source(tmp_path, plain_tok):
    data = mixed(tmp_path, plain_tok)
    names = prompts_of(plain_tok, data)
    assert names[:10] == [f"A{i}" for i in range(10)] and len(names) == 14
    assert len({n for n in names[10:] if n.startswith("B")}) == 4
    assert [(s["examples"], s["used"], s["weight"]) for s in data.report.sources] == [(10, 10, 0.7), (30, 4, 0.3)]
    assert data.report.rows_kept == 14 and data.report.rows_read == 40
    assert data.report.source == f"{tmp_path / 'a.jsonl'} + {tmp_path / 'b.jsonl'}"


def test_a_mixture_is_deterministic_given_the_seed_and_its_fingerprint_covers_it(tmp_path, plain_tok):
    first = mixed(tmp_path, plain_tok)
    assert mixed(tmp_path, plain_tok).fingerprint() == first.fingerprint()
    assert prompts_of(plain_tok, mixed(tmp_path, plain_tok)) == prompts_of(plain_tok, first)
    others = {mixed(tmp_path, plain_tok, seed=seed).fingerprint() for seed in (1, 2, 3)}
    assert first.fingerprint() not in others  # another seed picks other B rows
    assert mixed(tmp_path, plain_tok, mix_rows=20).fingerprint() != first.fingerprint()


def test_a_mixture_of_a_given_size_repeats_the_small_source(tmp_path, plain_tok):
    data = mixed(tmp_path, plain_tok, mix_rows=20)
    names = prompts_of(plain_tok, data)
    assert sum(n.startswith("A") for n in names) == 14 and sum(n.startswith("B") for n in names) == 6
    assert set(names[:10]) == {f"A{i}" for i in range(10)}  # every A once, then 4 of them again
    assert [s["used"] for s in data.report.sources] == [14, 6]


def test_a_mixture_without_weights_is_the_concatenation(tmp_path, plain_tok):
    a, b = write_prompts(tmp_path / "a.jsonl", "A", 2), write_prompts(tmp_path / "b.jsonl", "B", 3)
    cfg = DataConfig(train=[{"source": str(a)}, {"source": str(b), "max_rows": 2}], max_rows=3)
    data = prepare_dataset(cfg, plain_tok, KINDS["pairs"], registry=REGISTRY)
    assert prompts_of(plain_tok, data) == ["A0", "A1", "B0"]  # b's first 2 rows; the first 3 of the concatenation


def test_a_bad_row_in_a_mixture_names_its_source(tmp_path, plain_tok):
    a = write_prompts(tmp_path / "a.jsonl", "A", 2)
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"prompt": "B", "chosen": "", "rejected": " n"}) + "\n")
    with pytest.raises(DataError) as info:
        prepare_dataset(DataConfig(train=[{"source": str(a)}, {"source": str(b)}]), plain_tok, KINDS["pairs"],
                        registry=REGISTRY)
    assert str(info.value).startswith(f"{b} (train): row 1: field 'chosen' is empty")


# ----------------------------------------------------------------------------- an evaluation split carved from train


def test_a_carved_split_is_seeded_sized_and_disjoint_from_training(tmp_path, plain_tok):
    path = write_prompts(tmp_path / "a.jsonl", "A", 10)
    cfg = DataConfig(train=str(path), eval={"from_train": 3}, seed=1)
    train = prepare_dataset(cfg, plain_tok, KINDS["pairs"], registry=REGISTRY, split="train")
    held = prepare_dataset(cfg, plain_tok, KINDS["pairs"], registry=REGISTRY, split="eval")
    assert len(held) == 3 and len(train) == 7
    assert set(prompts_of(plain_tok, train)) | set(prompts_of(plain_tok, held)) == {f"A{i}" for i in range(10)}
    assert not set(prompts_of(plain_tok, train)) & set(prompts_of(plain_tok, held))
    assert train.report.carved_for_eval == 3 and held.report.split == "train, carved for eval"
    again = prepare_dataset(cfg, plain_tok, KINDS["pairs"], registry=REGISTRY, split="eval")
    assert prompts_of(plain_tok, again) == prompts_of(plain_tok, held)
    fraction = DataConfig(train=str(path), eval={"from_train": 0.25}, seed=1)  # ceil(0.25 * 10) = 3, as datasets does
    assert len(prepare_dataset(fraction, plain_tok, KINDS["pairs"], registry=REGISTRY, split="eval")) == 3


def test_a_carved_split_of_a_repeating_mixture_never_shares_an_example(tmp_path, plain_tok):
    train = mixed(tmp_path, plain_tok, mix_rows=20, eval={"from_train": 0.5})
    held = mixed(tmp_path, plain_tok, split="eval", mix_rows=20, eval={"from_train": 0.5})
    assert not set(prompts_of(plain_tok, train)) & set(prompts_of(plain_tok, held))
    assert len(held) == 8  # ceil(0.5 x 16 distinct examples: 10 A and 6 B)
    assert len(prompts_of(plain_tok, held)) == len(set(prompts_of(plain_tok, held)))


def test_carving_every_example_is_refused(tmp_path, plain_tok):
    path = write_prompts(tmp_path / "a.jsonl", "A", 3)
    with pytest.raises(DataError) as info:
        prepare_dataset(DataConfig(train=str(path), eval={"from_train": 3}), plain_tok, KINDS["pairs"],
                        registry=REGISTRY)
    assert str(info.value) == (f"{path} (train): data.eval.from_train: carving 3 of 3 example(s) takes 3, leaving "
                               "none for training")


# ----------------------------------------------------------------------------- bad inputs through the real CLI


import copy  # noqa: E402

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY_DPO = yaml.safe_load((ROOT / "recipes" / "dpo_tiny.yaml").read_text())


def validate(tmp_path: Path, **data) -> tuple[int, str]:
    from prefkit.cli import app

    doc = copy.deepcopy(TINY_DPO)
    doc["output_dir"] = str(tmp_path / "out")
    doc["data"].update({"eval": None, **data})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("data, needle", [
    ({"train": [{"source": "tiny-prefs", "weight": -1}]}, "data.train.0.weight: Input should be greater than or equal "
                                                          "to 0"),
    ({"train": [{"source": "tiny-prefs", "weight": 0}, {"source": "tiny-prefs", "weight": 0.0}]},
     "data.train: the weights are all 0"),
    ({"train": [{"source": "tiny-prefs", "weight": float("nan")}]}, "data.train.0.weight: must be a finite number"),
    ({"train": [{"source": "tiny-prefs", "weight": 1}, {"source": "tiny-prefs"}]}, "source(s) 1 have no weight"),
    ({"train": []}, "data.train: is an empty list"),
    ({"train": [{"source": "tiny-prefs", "wieght": 1}]}, "data.train.0.wieght: unknown key; did you mean 'weight'?"),
    ({"mix_rows": 10}, "data.mix_rows sets the size of a weighted mixture"),
    ({"eval": {"from_train": 1.5}}, "data.eval.from_train: is 1.5; a fraction must lie strictly between 0 and 1"),
    ({"eval": {"from_train": 0}}, "data.eval.from_train: is 0; carve at least 1 example"),
    ({"eval": {"from_train": 48}}, "data.eval.from_train: carving 48 of the 48 training examples of tiny-prefs"),
    ({"train": "tiny-sft"}, "rows are TRL 'prompt-completion' (prompt, completion); objective 'dpo' needs "
                            "'preference' rows (prompt, chosen, rejected)"),
])
def test_bad_data_settings_are_one_message_with_exit_2(tmp_path, data, needle):
    code, output = validate(tmp_path, **data)
    assert code == 2, output
    assert needle in " ".join(output.split()), output
    assert len(output.strip().splitlines()) <= 4, output


def test_text_rows_for_dpo_name_the_type_through_the_cli(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps(TEXT) + "\n")
    code, output = validate(tmp_path, train=str(path))
    assert code == 2
    assert (f"{path} (train): rows are TRL 'language modeling' (field 'text'); objective 'dpo' needs 'preference' "
            "rows (prompt, chosen, rejected)") in " ".join(output.split())


def test_an_unreadable_folder_through_the_cli(tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = validate(tmp_path, train=str(tmp_path / "empty"))
    assert code == 2 and "a dataset folder that `datasets` cannot read" in " ".join(output.split())


def test_a_good_mixture_with_a_carved_split_validates(tmp_path):
    code, output = validate(tmp_path, train=[{"source": "tiny-prefs", "weight": 0.5},
                                             {"source": "quickstart-prefs", "weight": 0.5}],
                            eval={"from_train": 0.1})
    assert code == 0, output


# ----------------------------------------------------------------------------- a run on language-modeling text


def test_preferred_ft_on_text_rows_lowers_its_loss(tmp_path):
    """Preferred-FT learns plain ``text`` rows handed over as an in-memory DatasetDict."""
    from datasets import Dataset, DatasetDict

    import prefkit

    texts = [{"text": f"The cat sat on mat number {i}."} for i in range(16)]
    dataset = DatasetDict({"train": Dataset.from_list(texts)})
    summary = prefkit.train(ROOT / "recipes" / "preferred_ft_tiny.yaml",
                            [f"output_dir={tmp_path / 'run'}", "data.eval=null", "train.max_steps=16",
                             "train.save_every=null", "train.eval_every=null"], train_dataset=dataset)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[:3], records[-3:]
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    assert mean(first) > 4.5  # about ln(260): the untrained byte model
    assert mean(last) < mean(first) - 1.0
    report = summary["data"]["train"]
    assert report["rows_kept"] == 16 and report["format"] == "standard" and report["chat_template"] is False


def test_the_data_seed_follows_the_recipe_seed_only_where_the_data_draws():
    from prefkit.recipe import validate_recipe

    def data_of(**data):
        doc = copy.deepcopy(TINY_DPO)
        doc["seed"] = 7
        doc["data"].update(data)
        return validate_recipe(doc, "r.yaml", registry=load_registry()).recipe.data

    assert data_of().seed is None  # nothing is drawn: the resolved recipe (and a resume's check) is unchanged
    assert data_of(eval={"from_train": 0.1}).seed == 7
    assert data_of(train=[{"source": "tiny-prefs", "weight": 1}]).seed == 7
    assert data_of(train=[{"source": "tiny-prefs", "weight": 1}], seed=3).seed == 3
    assert data_of(train=[{"source": "tiny-prefs", "weight": 1}], eval=None).label() == "tiny-prefs (1)"
