"""prefkit.data.prepare: sources -> rows -> checked examples -> token ids, with clear errors.

The tiny tokenizer is byte-level (one token per ASCII character, no BOS), so token counts
below are character counts: without a chat template a completion gets one extra end token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prefkit.api import NamedDataset
from prefkit.data.io import load_rows
from prefkit.data.prepare import (
    DataReport,
    TokenizedDataset,
    TokenizedExample,
    prepare_dataset,
)
from prefkit.api.errors import DataError
from prefkit.plugins import Registry, load_registry
from prefkit.recipe import DataConfig
from prefkit.models.tiny import build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "data"
KINDS = load_registry().data_kinds  # the built-in data kinds: pairs, sft, prompts, unpaired
EMPTY_REGISTRY = Registry(data_kinds=dict(KINDS))


@pytest.fixture(scope="module")
def chat_tok():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    return build_tiny_tokenizer(chat_template=False)


def config(train: str | Path, **overrides) -> DataConfig:
    return DataConfig(train=str(train), **overrides)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(path, tokenizer, kind="pairs", **overrides) -> TokenizedDataset:
    return prepare_dataset(config(path, **overrides), tokenizer, KINDS[kind], registry=EMPTY_REGISTRY)


def error_of(path, tokenizer, kind="pairs", **overrides) -> str:
    with pytest.raises(DataError) as info:
        prepare(path, tokenizer, kind, **overrides)
    return str(info.value)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


GOOD = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}


# --------------------------------------------------------------------------------------
# Row checks
# --------------------------------------------------------------------------------------


def test_every_bad_row_is_named_with_its_field(plain_tok):
    message = error_of(FIXTURES / "bad_pairs.jsonl", plain_tok)
    assert message.startswith(f"{FIXTURES / 'bad_pairs.jsonl'} (train): 5 bad row(s)")
    assert "row 2: field 'chosen' is empty" in message
    assert "row 3: field 'prompt' is only whitespace" in message
    assert "row 4: fields 'chosen' and 'rejected' are identical" in message
    assert "row 5: field 'rejected' is missing" in message
    assert "row 7: field 'chosen' should be a string, got a number" in message
    assert "row 1:" not in message and "row 6:" not in message
    assert "data.bad_rows: skip" in message


def test_skip_mode_counts_bad_rows(plain_tok):
    data = prepare(FIXTURES / "bad_pairs.jsonl", plain_tok, bad_rows="skip")
    assert [ex.row for ex in data.examples] == [1, 6]
    r = data.report
    assert (r.rows_read, r.rows_kept, r.rows_skipped_bad, r.rows_dropped_overlong) == (7, 2, 5, 0)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"prompt": "Say hi.", "chosen": " Hi!"}, "row 2: field 'rejected' is missing"),
        ({**GOOD, "chosen": ""}, "row 2: field 'chosen' is empty"),
        ({**GOOD, "rejected": " \n\t"}, "row 2: field 'rejected' is only whitespace"),
        ({**GOOD, "rejected": " Hi!"}, "row 2: fields 'chosen' and 'rejected' are identical"),
        ({**GOOD, "prompt": ["Say hi."]}, "row 2: field 'prompt' is a list of messages, but the data is in standard"),
        ({**GOOD, "prompt": None}, "row 2: field 'prompt' is missing"),
    ],
)
def test_single_bad_row_message(tmp_path, plain_tok, bad, expected):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, bad, GOOD])
    message = error_of(path, plain_tok)
    assert message.startswith(f"{path} (train): {expected}")


def test_non_numeric_margin(plain_tok):
    path = FIXTURES / "margins.jsonl"
    message = error_of(path, plain_tok)
    assert message.startswith(f"{path} (train): row 2: field 'margin' is not a number: 'a lot'")
    data = prepare(path, plain_tok, bad_rows="skip")
    assert [ex.columns.get("margin") for ex in data.examples] == [2.5, 1.0]
    assert data.report.rows_skipped_bad == 1


def test_margin_is_none_without_a_margin_column(plain_tok):
    data = prepare(FIXTURES / "bad_pairs.jsonl", plain_tok, bad_rows="skip")
    assert all("margin" not in ex.columns for ex in data.examples)


def test_wrong_format_rows_in_conversational_data(chat_tok):
    path = FIXTURES / "mixed_format.jsonl"
    message = error_of(path, chat_tok)
    assert f"{path} (train): 3 bad row(s)" in message
    assert "row 2: field 'prompt' is a string, but the data is conversational" in message
    assert "row 3: field 'chosen' message 1 has empty content" in message
    assert "row 4: field 'prompt' message 1 needs 'role' and 'content'" in message
    data = prepare(path, chat_tok, bad_rows="skip")
    assert data.report.format == "conversational"
    assert (data.report.rows_kept, data.report.rows_skipped_bad) == (1, 3)


def test_explicit_format_overrides_detection(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    message = error_of(path, chat_tok, format="conversational")
    assert "row 1: field 'prompt' is a string, but the data is conversational" in message


def test_many_bad_rows_are_grouped_and_capped(tmp_path, plain_tok):
    rows = [{"prompt": "p", "chosen": "a"}] * 30  # rejected missing everywhere
    rows += [{**GOOD, "chosen": "", "rejected": f" r{i}"} if i % 2 else GOOD for i in range(30)]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    message = error_of(path, plain_tok)
    lines = message.splitlines()
    assert lines[0] == f"{path} (train): 45 bad row(s) for 'pairs' data found (set data.bad_rows: skip to skip them)"
    assert lines[1] == "  rows 1-30: field 'rejected' is missing"
    assert lines[2] == "  row 32: field 'chosen' is empty"
    assert lines[-1] == "  ... and 6 more"
    assert len(lines) == 12


def test_all_rows_bad_in_skip_mode_says_why(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "a"}] * 3)
    message = error_of(path, plain_tok, bad_rows="skip")
    assert message.startswith(f"{path} (train): no usable examples: 3 rows read, 3 bad, 0 too long")
    assert "rows 1-3: field 'rejected' is missing" in message


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def test_missing_file(tmp_path, plain_tok):
    path = tmp_path / "nope.jsonl"
    message = error_of(path, plain_tok)
    assert message.startswith(f"{path} (train): file not found")


def test_relative_missing_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^data/x\.csv \(train\): file not found"):
        load_rows("data/x.csv", "train", registry=EMPTY_REGISTRY)


def test_relative_path_is_read_from_the_current_directory(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", [GOOD])
    monkeypatch.chdir(tmp_path)
    rows, shown = load_rows("rel.jsonl", "train", registry=EMPTY_REGISTRY)
    assert rows == [GOOD] and shown == "rel.jsonl"


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(str(path), "train", registry=EMPTY_REGISTRY)


def test_broken_json_lines_are_named():
    path = FIXTURES / "broken.jsonl"
    with pytest.raises(DataError) as info:
        load_rows(str(path), "train", registry=EMPTY_REGISTRY)
    message = str(info.value)
    assert message.startswith(f"{path} (train): the file is not valid JSON lines")
    assert "line 2: not valid JSON" in message
    assert "line 4: expected a JSON object, got a list" in message


def test_unknown_hub_id_offline_is_a_data_error(monkeypatch, plain_tok):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = error_of("someone/no-such-dataset", plain_tok)
    assert message.startswith("someone/no-such-dataset (train): not a registered dataset or a local file")
    assert "hub" in message


def test_csv_json_and_parquet_files(tmp_path, plain_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**GOOD, "margin": 0.5}, {"prompt": "Hey.", "chosen": " Yo.", "rejected": " Meh.", "margin": 2.0}]
    csv_path = tmp_path / "x.csv"
    csv_path.write_text('prompt,chosen,rejected,margin\nSay hi., Hi!, No.,0.5\n"Hey."," Yo."," Meh.",2\n')
    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(rows))
    json_columns = tmp_path / "columns.json"
    json_columns.write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}))
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)

    expected = prepare(write_jsonl(tmp_path / "x.jsonl", rows), plain_tok)
    for path in (csv_path, json_list, json_columns, parquet):
        data = prepare(path, plain_tok)
        assert data.examples == expected.examples, path
        assert data.report.source == str(path)


def test_a_json_file_of_one_row_is_read_as_that_row(tmp_path, plain_tok, chat_tok):
    """One JSON-lines line in a .json file (or one object) is one row; it was refused as 'expected a
    JSON list of objects', though a .json may hold JSON lines. A conversation whose lists hold
    messages is one row too, not a table of columns."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD) + "\n")
    assert prepare(one, plain_tok).examples == prepare(write_jsonl(tmp_path / "one.jsonl", [GOOD]), plain_tok).examples
    conversation = {"prompt": [{"role": "user", "content": "Say hi."}],
                    "chosen": [{"role": "assistant", "content": "Hi!"}],
                    "rejected": [{"role": "assistant", "content": "No."}]}
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(conversation))
    data = prepare(chat, chat_tok)
    assert data.examples == prepare(write_jsonl(tmp_path / "chat.jsonl", [conversation]), chat_tok).examples
    assert data.report.rows_kept == 1 and data.report.format == "conversational"
    # equally long lists of one role each stay a table of columns (whose cells, single messages, are refused)
    table = {"prompt": conversation["prompt"] * 2, "chosen": conversation["chosen"] * 2,
             "rejected": conversation["rejected"] * 2}
    chat.write_text(json.dumps(table))
    with pytest.raises(DataError, match="row 1"):
        prepare(chat, chat_tok)


def test_conversational_parquet(tmp_path, chat_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "chat_implicit.jsonl").read_text().splitlines()]
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet = prepare(parquet, chat_tok, bad_rows="skip")
    assert from_parquet.examples == prepare(FIXTURES / "chat_implicit.jsonl", chat_tok, bad_rows="skip").examples
    assert from_parquet.report.format == "conversational"


def named_registry() -> Registry:
    registry = Registry()
    registry.datasets["mine"] = NamedDataset(
        "mine", "test pairs", {"train": FIXTURES / "margins.jsonl", "test": FIXTURES / "sft.jsonl"}
    )
    return registry


def test_named_dataset_lookup_through_the_registry(plain_tok):
    rows, shown = load_rows("mine", "test", registry=named_registry())
    assert shown == "mine" and rows[0]["completion"] == " Hello, friend!"
    data = prepare_dataset(config("mine", bad_rows="skip"), plain_tok, KINDS["pairs"], registry=named_registry())
    assert data.report.source == "mine" and data.report.rows_kept == 2


def test_named_dataset_unknown_split(plain_tok):
    expected = r"^mine \(validation\): dataset 'mine' has no split 'validation'; its splits: test, train"
    with pytest.raises(DataError, match=expected):
        load_rows("mine", "validation", registry=named_registry())


def test_eval_split_of_a_named_dataset(plain_tok):
    cfg = config("mine", eval_split="test", max_eval_rows=1)
    data = prepare_dataset(cfg, plain_tok, KINDS["sft"], split="eval", registry=named_registry())
    assert data.report.split == "test" and data.report.rows_read == 1


def test_eval_needs_data_eval_when_train_is_a_file(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(DataError, match="set data.eval"):
        prepare_dataset(config(path), plain_tok, KINDS["pairs"], split="eval", registry=EMPTY_REGISTRY)
    cfg = config(path, eval=str(FIXTURES / "margins.jsonl"), bad_rows="skip")
    data = prepare_dataset(cfg, plain_tok, KINDS["pairs"], split="eval", registry=EMPTY_REGISTRY)
    assert data.report.source == str(FIXTURES / "margins.jsonl") and data.report.split == "test"


def test_builtin_datasets_are_registered():
    registry = load_registry()
    for name in ("quickstart-prefs", "tiny-prefs", "tiny-prefs-chat", "tiny-sft"):
        dataset = registry.datasets[name]
        assert isinstance(dataset, NamedDataset) and dataset.description
        assert registry.owners[("datasets", name)] == "datasets"
    assert set(registry.datasets["tiny-prefs"].files) == {"train", "test"}


SHIPPED_KINDS = {"quickstart-prefs": "pairs", "tiny-prefs": "pairs", "tiny-prefs-chat": "pairs", "tiny-sft": "sft",
                 "tiny-unpaired": "unpaired", "quickstart-unpaired": "unpaired"}


@pytest.mark.parametrize("name", sorted(SHIPPED_KINDS))
def test_shipped_datasets_prepare_cleanly(name, chat_tok):
    dataset = load_registry().datasets[name]
    present = {split: path for split, path in dataset.files.items() if path.is_file()}
    if not present:
        pytest.skip(f"{name}: data files not written yet")
    for split in present:
        cfg = config(name, train_split=split)
        for kind in (SHIPPED_KINDS[name], "prompts"):
            data = prepare_dataset(cfg, chat_tok, KINDS[kind], registry=load_registry())
            r = data.report
            assert r.rows_skipped_bad == 0 and r.rows_kept > 0, r
            assert r.rows_read == r.rows_kept + r.rows_dropped_overlong


# --------------------------------------------------------------------------------------
# Tokenization and the chat template
# --------------------------------------------------------------------------------------


def test_plain_text_ids(tmp_path, plain_tok):
    data = prepare(write_jsonl(tmp_path / "x.jsonl", [GOOD]), plain_tok)
    ex = data.examples[0]
    assert decode(plain_tok, ex.prompt_ids) == "Say hi."
    assert decode(plain_tok, ex.completions["chosen"]) == " Hi!<|endoftext|>"
    assert ex.completions["rejected"][-1] == plain_tok.eos_token_id
    assert data.report.chat_template is False and data.report.format == "standard"


def test_chat_template_ids(tmp_path, chat_tok):
    data = prepare(write_jsonl(tmp_path / "x.jsonl", [GOOD]), chat_tok)
    ex = data.examples[0]
    generation_prompt = chat_tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    assert generation_prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert decode(chat_tok, ex.prompt_ids) == generation_prompt
    assert decode(chat_tok, ex.completions["chosen"]) == " Hi!<|im_end|>\n"
    assert decode(chat_tok, ex.completions["rejected"]) == " No.<|im_end|>\n"
    assert data.report.chat_template is True


def test_chat_template_never_uses_plain_text(tmp_path, chat_tok):
    data = prepare(write_jsonl(tmp_path / "x.jsonl", [GOOD]), chat_tok, chat_template="never")
    assert decode(chat_tok, data.examples[0].prompt_ids) == "Say hi."
    assert decode(chat_tok, data.examples[0].completions["chosen"]) == " Hi!<|im_end|>"  # the tokenizer's end token


def test_chat_template_always_needs_a_template(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    assert "data.chat_template is 'always', but the tokenizer has no chat template" in error_of(
        path, plain_tok, chat_template="always"
    )


@pytest.mark.parametrize("setting", ["auto", "never"])
def test_conversational_data_needs_a_chat_template(plain_tok, chat_tok, setting):
    path = FIXTURES / "chat_implicit.jsonl"
    tokenizer = chat_tok if setting == "never" else plain_tok
    message = error_of(path, tokenizer, chat_template=setting)
    assert message.startswith(f"{path} (train): the data is conversational")
    assert "tokenizer with a chat template" in message


def test_a_template_that_breaks_the_prompt_prefix_is_refused(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: <think>{% endif %}"
    )
    message = error_of(write_jsonl(tmp_path / "x.jsonl", [GOOD]), tokenizer)
    assert "row 1: field 'chosen': the tokenizer's chat template does not render" in message


def test_explicit_conversational_prompt(tmp_path, chat_tok):
    row = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go."}],
    }
    ex = prepare(write_jsonl(tmp_path / "x.jsonl", [row]), chat_tok).examples[0]
    assert decode(chat_tok, ex.prompt_ids) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert decode(chat_tok, ex.completions["chosen"]) == "Hello!<|im_end|>\n"


def test_implicit_prompt_is_the_shared_message_prefix(chat_tok):
    path = FIXTURES / "chat_implicit.jsonl"
    message = error_of(path, chat_tok)
    assert "row 2: field 'prompt' is missing, and 'chosen' and 'rejected' share no first message" in message
    data = prepare(path, chat_tok, bad_rows="skip")
    [ex] = data.examples
    assert decode(chat_tok, ex.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert decode(chat_tok, ex.completions["chosen"]) == "Paris.<|im_end|>\n"
    assert decode(chat_tok, ex.completions["rejected"]) == "London.<|im_end|>\n"


def test_sft_from_prompt_completion_and_from_pairs(chat_tok):
    sft = prepare(FIXTURES / "sft.jsonl", chat_tok, kind="sft")
    assert decode(chat_tok, sft.examples[1].completions["chosen"]) == " Goodbye!<|im_end|>\n"
    assert all("rejected" not in ex.completions for ex in sft.examples)

    pairs = prepare(FIXTURES / "bad_pairs.jsonl", chat_tok, kind="sft", bad_rows="skip")
    # rows 4 (identical answers) and 5 (no rejected) are fine sft rows: only the chosen answer is used
    assert [ex.row for ex in pairs.examples] == [1, 4, 5, 6]
    assert decode(chat_tok, pairs.examples[0].completions["chosen"]) == " You are great.<|im_end|>\n"

    implicit = prepare(FIXTURES / "chat_implicit.jsonl", chat_tok, kind="sft", bad_rows="skip")
    assert decode(chat_tok, implicit.examples[0].completions["chosen"]) == "Paris.<|im_end|>\n"


def test_sft_needs_a_completion(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Hi", "completion": "Yo"}, {"prompt": "Hi"}])
    assert error_of(path, plain_tok, kind="sft").startswith(f"{path} (train): row 2: field 'completion' is missing")


def test_prompts_ignore_extra_columns(plain_tok):
    data = prepare(FIXTURES / "bad_pairs.jsonl", plain_tok, kind="prompts", bad_rows="skip")
    assert [ex.row for ex in data.examples] == [1, 2, 4, 5, 6, 7]  # only row 3's prompt is bad
    assert all(not ex.completions for ex in data.examples)


# --------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------

LONG = {"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "xyz"}  # 10 / 10+1 / 3+1 tokens


def test_truncate_keeps_the_prompt_end_and_cuts_completions_at_the_end(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [LONG, GOOD])
    data = prepare(path, plain_tok, max_length=8, max_prompt_length=4)
    ex = data.examples[0]
    assert decode(plain_tok, ex.prompt_ids) == "ghij"
    assert decode(plain_tok, ex.completions["chosen"]) == "0123"  # cut at the end: no end token left
    assert decode(plain_tok, ex.completions["rejected"]) == "xyz<|endoftext|>"  # exactly fits: 4 + 4 = 8
    assert decode(plain_tok, data.examples[1].prompt_ids) == " hi."  # from "Say hi."
    assert decode(plain_tok, data.examples[1].completions["chosen"]) == " Hi!"  # " Hi!" + end token = 5 > 4
    r = data.report
    assert (r.rows_read, r.rows_kept, r.rows_truncated, r.rows_dropped_overlong) == (2, 2, 2, 0)


def test_rows_that_fit_exactly_are_not_cut(tmp_path, plain_tok):
    data = prepare(write_jsonl(tmp_path / "x.jsonl", [LONG]), plain_tok, max_length=21, max_prompt_length=10)
    ex = data.examples[0]
    assert (len(ex.prompt_ids), len(ex.completions["chosen"]), len(ex.completions["rejected"])) == (10, 11, 4)
    assert data.report.rows_truncated == 0


def test_truncate_drops_a_prompt_that_leaves_no_room(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [LONG, GOOD])
    data = prepare(path, plain_tok, max_length=10, max_prompt_length=None)
    assert [ex.row for ex in data.examples] == [2]
    assert len(data.examples[0].prompt_ids) + len(data.examples[0].completions["chosen"]) == 10  # 7 + 5 cut to 7 + 3
    r = data.report
    assert (r.rows_kept, r.rows_truncated, r.rows_dropped_overlong) == (1, 1, 1)


def test_drop_policy(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [LONG, GOOD])
    data = prepare(path, plain_tok, truncation="drop", max_length=12, max_prompt_length=None)
    assert [ex.row for ex in data.examples] == [2]
    assert (data.report.rows_truncated, data.report.rows_dropped_overlong) == (0, 1)


def test_error_policy_names_rows_and_lengths(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, LONG])
    message = error_of(path, plain_tok, truncation="error", max_length=12, max_prompt_length=8)
    assert message.startswith(f"{path} (train): 1 row(s) too long (data.truncation is 'error'")
    assert "row 2: prompt is 10 tokens > max_prompt_length 8" in message
    assert "row 2: prompt+chosen is 21 tokens > max_length 12" in message
    assert "rejected" not in message  # 8 + 4 fits


def test_prompts_kind_needs_room_for_one_new_token(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "abcd"}, {"prompt": "abc"}])
    data = prepare(path, plain_tok, kind="prompts", max_length=4, max_prompt_length=None)
    assert [ex.row for ex in data.examples] == [2]
    assert data.report.rows_dropped_overlong == 1


def test_nothing_left_after_truncation(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [LONG])
    message = error_of(path, plain_tok, max_length=10, max_prompt_length=None)
    assert message.startswith(f"{path} (train): no usable examples: 1 rows read, 0 bad, 1 too long")


def test_max_rows_takes_the_first_rows(tmp_path, plain_tok):
    rows = [{**GOOD, "chosen": f" Hi {i}!"} for i in range(5)]
    data = prepare(write_jsonl(tmp_path / "x.jsonl", rows), plain_tok, max_rows=3)
    assert [ex.row for ex in data.examples] == [1, 2, 3] and data.report.rows_read == 3


# --------------------------------------------------------------------------------------
# Fingerprint and speed
# --------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_every_change(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [LONG, GOOD])
    base = prepare(path, chat_tok).fingerprint()
    assert prepare(path, chat_tok).fingerprint() == base
    assert len(base) == 64

    changed = write_jsonl(tmp_path / "y.jsonl", [LONG, {**GOOD, "chosen": " Hi!!"}])
    assert prepare(changed, chat_tok).fingerprint() != base
    assert prepare(path, chat_tok, max_length=40).fingerprint() != base
    assert prepare(path, chat_tok, chat_template="never").fingerprint() != base

    margins = TokenizedDataset([TokenizedExample(1, [1], {"chosen": [2], "rejected": [3]}, {"margin": 1.0})], report=None)
    other = TokenizedDataset([TokenizedExample(1, [1], {"chosen": [2], "rejected": [3]}, {"margin": 2.0})], report=None)
    assert margins.fingerprint() != other.fingerprint()


def test_thousands_of_rows_take_seconds(tmp_path, chat_tok):
    rows = [
        {"prompt": f"Question {i}: what is up? " * 3, "chosen": f" Good answer {i}. " * 4, "rejected": f" Bad {i}"}
        for i in range(5000)
    ]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    start = time.perf_counter()
    data = prepare(path, chat_tok)
    assert time.perf_counter() - start < 10
    assert isinstance(data.report, DataReport) and data.report.rows_kept == 5000


def test_docs_list_every_data_key_with_its_default():
    text = (Path(__file__).parent.parent / "docs" / "data.md").read_text()
    table = text.split("## Recipe keys: `data:`", 1)[1]
    documented = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            documented[cells[0].strip("`")] = cells[1].strip("`")
    expected = {}
    for name, info in DataConfig.model_fields.items():
        default = "required" if info.is_required() else ("null" if info.default is None else str(info.default))
        expected[name] = default
    assert documented == expected


def test_a_template_that_refuses_a_conversation_names_the_row(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    row = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go."}]}
    message = error_of(write_jsonl(tmp_path / "x.jsonl", [row]), tokenizer)
    expected = "row 1: field 'prompt': the tokenizer's chat template refused the messages: System role not supported"
    assert expected in message
