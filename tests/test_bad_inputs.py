"""Every user mistake ends in one clear message naming the file, key, row or plugin, with exit
code 2, no traceback, before any model loads, and nothing already written lost (issue 10).

Each test runs the real command line (typer's test runner, in this process) on a tiny recipe with
one class of bad input. An exception that is not a user error would end the command with exit code
1 and ``result.exception`` set, which :func:`refused` rejects.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.testing import install_plugin  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((ROOT / "recipes" / "dpo_tiny.yaml").read_text())
TINY["data"]["eval"] = None
TINY["train"].update(max_steps=2, save_every=None, eval_every=None)
COMPARE = yaml.safe_load((ROOT / "recipes" / "compare_tiny.yaml").read_text())
ROW = {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " Go away."}

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles: str, max_lines: int = 14) -> str:
    """The command refused with a user error: exit code 2, every needle in the message, short."""
    output = result.output
    assert result.exit_code == 2, (result.exit_code, result.exception, output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output)
    assert len(output.strip().splitlines()) <= max_lines, output
    return output


def recipe(tmp_path: Path, name: str = "r", **changes) -> Path:
    """The tiny DPO recipe (2 steps, no eval) writing into tmp_path, with ``a__b=value`` changes."""
    data = copy.deepcopy(TINY)
    data["output_dir"] = str(tmp_path / f"out-{name}")
    for dotted, value in changes.items():
        node = data
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rows(n: int = 8, **extra) -> str:
    return "".join(json.dumps({**ROW, "prompt": f"Say hi {i}.", **extra}) + "\n" for i in range(n))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def unwritable_dir(path: Path) -> Path:
    """A folder this process cannot write into (chmod; for root, the immutable attribute); skip if impossible."""
    path.mkdir()
    path.chmod(0o555)
    probe = path / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return path
    probe.unlink()
    path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    pytest.skip("cannot make a folder unwritable here")


@pytest.fixture
def immutable_cleanup(tmp_path):
    yield
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)


# ----------------------------------------------------------------------------- 1. files: the recipe


@pytest.mark.parametrize("name, content, needles", [
    ("latin1.yaml", "# caf\xe9\n".encode("latin-1") + b"seed: 0\n", ["is not UTF-8 text", "line 1, column 6"]),
    ("binary.yaml", bytes(range(256)), ["is not UTF-8 text"]),
    ("garbled.yaml", "model: {source: tiny\ndata: [\n", ["line 2", "not valid YAML"]),
    ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", ["nested more than 100 levels"]),
    ("list.yaml", "- a\n- b\n", ["must be a mapping"]),
    ("dup.yaml", yaml.safe_dump(TINY) + "seed: 3\n", ["duplicate key 'seed'", "first at line"]),
    ("bomb.yaml", "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdefgh", "bcdefghi")),
     ["more than 1,000,000 values"]),
])
def test_an_unreadable_recipe_file_is_named(tmp_path, name, content, needles):
    path = write(tmp_path / name, content)
    refused(cli("validate", path), str(path), *needles)


def test_a_missing_recipe_or_a_directory(tmp_path):
    refused(cli("validate", tmp_path / "nope.yaml"), "nope.yaml", "file not found")
    refused(cli("validate", tmp_path), str(tmp_path), "is a directory, not a file")


def test_a_recipe_that_is_not_a_regular_file_or_too_big(tmp_path):
    """A FIFO or a device would block or never end; a data file passed as a recipe is refused by size."""
    os.mkfifo(tmp_path / "fifo.yaml")
    refused(cli("validate", tmp_path / "fifo.yaml"), "fifo.yaml", "is not a regular file")
    refused(cli("validate", "/dev/zero"), "/dev/zero", "is not a regular file")
    big = write(tmp_path / "big.yaml", "# " + "x" * (17 * 1024 * 1024) + "\n")
    refused(cli("validate", big), "big.yaml", "a recipe is at most")


def test_an_unreadable_recipe(tmp_path, monkeypatch):
    path = recipe(tmp_path)
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self == path else real(self))
    refused(cli("validate", path), str(path), "cannot read: Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_recipe_without_read_permission(tmp_path):
    path = recipe(tmp_path)
    path.chmod(0)
    refused(cli("validate", path), str(path), "Permission denied")


def test_duplicate_keys_in_a_compare_recipe_but_yaml_merge_keys_still_work(tmp_path):
    data = {**COMPARE, "output_dir": str(tmp_path / "cmp")}
    path = write(tmp_path / "cmp.yaml", yaml.safe_dump(data) + f"output_dir: {tmp_path / 'other'}\n")
    refused(cli("compare", "--validate", path), str(path), "duplicate key 'output_dir'")
    from prefkit.inputs import InputError, load_yaml

    # a key merged in with `<<: *anchor` may be overridden beside it (recipes/sentiment/compare.yaml does)
    assert load_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}
    with pytest.raises(InputError, match="duplicate key 'x'"):
        load_yaml("b: {x: 1, x: 3}\n")


# ----------------------------------------------------------------------------- 1. files: the data


BAD_DATA = [
    ("latin1.jsonl", rows(3).encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"), ["not UTF-8", "line 4"]),
    ("latin1.json", '[{"prompt": "caf\xe9"}]'.encode("latin-1"), ["not UTF-8", "line 1"]),
    ("latin1.csv", "prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"), ["not UTF-8", "line 2"]),
    ("corrupt.parquet", b"PAR1" + bytes(200), ["not a readable Parquet file"]),
    ("zero.parquet", b"", ["not a readable Parquet file"]),
    ("truncated.json", json.dumps([ROW] * 5)[:-30], ["not valid JSON", "line 1, column"]),
    ("deep.jsonl", '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n", ["line 1", "nested"]),
    ("deep.json", "[" * 100000 + "]" * 100000, ["not valid JSON", "nested"]),
    ("deep100.jsonl", '{"prompt": ' + "[" * 150 + "]" * 150 + "}\n", ["line 1", "more than 100 levels"]),
    ("empty.jsonl", "", ["the split has no rows"]),
    ("header.csv", "prompt,chosen,rejected\n", ["the split has no rows"]),
    ("extra.csv", "prompt,chosen,rejected\n" + "p,a,b\n" * 5 + "p,a,b,c\n", ["row 6 (line 7)", "4 cells"]),
    ("dupheader.csv", "prompt,chosen,prompt\np,a,b\n", ["header names 'prompt' more than once"]),
    ("scalar.json", "42", ["expected a JSON list of objects"]),
    ("dupkey.jsonl", rows(3) + '{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}\n',
     ["line 4", "the key 'prompt' appears twice"]),
    ("rows.txt", rows(3), ["unsupported file type '.txt'"]),
    ("roles.jsonl", "".join(json.dumps({"prompt": [{"role": "robot", "content": f"hi {i}"}],
                                        "chosen": [{"role": "assistant", "content": "a"}],
                                        "rejected": [{"role": "assistant", "content": "b"}]}) + "\n"
                            for i in range(4)), ["rows 1-4", "unknown role 'robot'"]),
    ("Roles.jsonl", json.dumps({"prompt": [{"role": "User", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}) + "\n",
     ["row 1", "'User'", "did you mean 'user'?"]),
    ("surrogate.jsonl", rows(8).replace('"Say hi 3."', '"Say hi \\ud800"'), ["row 4", "field 'prompt'", "surrogate"]),
    ("margin.jsonl", rows(8).replace('" Go away."}', '" Go away.", "margin": Infinity}'),
     ["rows 1-8", "field 'margin' is not a finite number"]),
]


@pytest.mark.parametrize("name, content, needles", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_is_named_by_validate_and_run_before_any_model(tmp_path, name, content, needles, prefkit_cache):
    data = write(tmp_path / name, content)
    path = recipe(tmp_path, data__train=str(data))
    refused(cli("validate", path), str(data), *needles)
    refused(cli("run", path), str(data), *needles)
    assert not (tmp_path / "out-r").exists()  # nothing written
    assert not (prefkit_cache / "models").exists()  # no model built


def test_a_dataset_folder_datasets_cannot_read_is_one_message(tmp_path, capfd):
    folder = tmp_path / "hub"
    write(folder / "data" / "train-00000-of-00001.parquet", b"not parquet at all" * 10)
    output = refused(cli("validate", recipe(tmp_path, data__train=str(folder))), "hub (train)", "cannot read")
    printed = output + "".join(capfd.readouterr())
    assert "Failed to read schema" not in printed  # datasets' own log line, which repeated the message


def test_a_directory_or_a_missing_file_as_data(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    refused(cli("validate", recipe(tmp_path, data__train=str(tmp_path / "folder.jsonl"))),
            "folder.jsonl", "is a directory")
    refused(cli("validate", recipe(tmp_path, data__train=str(tmp_path / "gone.jsonl"))), "gone.jsonl",
            "file not found")


def test_a_fifo_as_data_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    refused(cli("validate", recipe(tmp_path, data__train=str(tmp_path / "fifo.jsonl"))), "fifo.jsonl",
            "is not a regular file")


def test_long_csv_cells_are_fine(tmp_path):
    long = "word " * 40_000  # past the csv module's default 128 KiB field limit
    data = write(tmp_path / "long.csv", "prompt,chosen,rejected\n" + "".join(f"p{i},{long},b\n" for i in range(4)))
    result = cli("validate", recipe(tmp_path, data__train=str(data)))
    assert result.exit_code == 0, result.output


def test_unreadable_data(tmp_path, monkeypatch):
    data = write(tmp_path / "d.jsonl", rows())
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "d.jsonl" else real(self))
    refused(cli("validate", recipe(tmp_path, data__train=str(data))), str(data), "Permission denied")


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    data = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + rows().encode())
    result = cli("validate", recipe(tmp_path, data__train=str(data)))
    assert result.exit_code == 0, result.output


def test_a_tool_message_needs_a_template_that_knows_tools(tmp_path):
    row = {"prompt": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}],
           "chosen": [{"role": "assistant", "content": "Sunny."}], "rejected": [{"role": "assistant", "content": "No."}]}
    data = write(tmp_path / "tool.jsonl", "".join(json.dumps(row) + "\n" for _ in range(4)))
    output = refused(cli("run", recipe(tmp_path, data__train=str(data))), str(data), "row 1", "'tool' message")
    assert "template" in output and not (tmp_path / "out-r").exists()


# ----------------------------------------------------------------------------- 2. folders


def test_output_dir_that_is_a_file_or_inside_one(tmp_path):
    afile = write(tmp_path / "afile", "keep me")
    for command in ("validate", "run"):
        refused(cli(command, recipe(tmp_path, output_dir=str(afile))), "output_dir", "is a file, not a folder")
        refused(cli(command, recipe(tmp_path, output_dir=str(afile / "run"))), "output_dir", "afile is a file")
    assert afile.read_text() == "keep me"


def test_unwritable_output_and_cache_folders(tmp_path, monkeypatch, immutable_cleanup, prefkit_cache):
    locked = unwritable_dir(tmp_path / "locked")
    refused(cli("run", recipe(tmp_path, output_dir=str(locked / "run"))), "output_dir", "cannot write in")
    refused(cli("validate", recipe(tmp_path, cache_dir=str(locked / "cache"))), "cache_dir", "cannot write in")
    monkeypatch.setenv("PREFKIT_CACHE", str(locked / "cache"))  # chat builds a named model in the cache too
    refused(runner.invoke(app, ["chat", "tiny-llama"], input="/exit\n"), "model source 'tiny-llama'",
            "the cache folder", "cannot write in")
    monkeypatch.setenv("PREFKIT_CACHE", str(write(tmp_path / "cachefile", "x")))
    refused(cli("run", recipe(tmp_path)), "$PREFKIT_CACHE", "is a file")
    assert not (tmp_path / "out-r").exists()


def test_new_objective_into_a_file_or_an_unwritable_folder(tmp_path, immutable_cleanup):
    mine = write(tmp_path / "mine.yaml", "precious\n")
    refused(cli("new-objective", "ok_name", "-d", mine), "--directory", "mine.yaml' is a file", "nothing was written")
    assert mine.read_text() == "precious\n"
    locked = unwritable_dir(tmp_path / "locked")
    refused(cli("new-objective", "ok_name", "-d", locked), "--directory", "cannot write in")
    refused(cli("new-objective", "ok_name", "-d", locked / "sub"), "--directory", "cannot write in")
    assert not (locked / "prefkit-ok-name").exists()


def test_sample_and_label_outputs(tmp_path):
    (tmp_path / "adir").mkdir()
    refused(cli("sample", recipe(tmp_path), "-o", tmp_path / "adir"), "adir", "is a directory")
    samples = write(tmp_path / "samples.jsonl", json.dumps({"prompt": "p", "completion": "c", "score": 1}) + "\n")
    refused(cli("label", samples, "-o", tmp_path / "samples.jsonl" / "pairs.jsonl"), "cannot be written",
            "samples.jsonl' is a file")
    refused(cli("label", write(tmp_path / "latin.jsonl", '{"prompt": "\xe9"}\n'.encode("latin-1"))),
            "latin.jsonl", "not UTF-8")
    refused(cli("label", write(tmp_path / "deep.jsonl", '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n")),
            "deep.jsonl", "line 1", "nested")
    refused(cli("label", write(tmp_path / "nan.jsonl", '{"prompt": "p", "completion": "c", "score": NaN}\n')),
            "nan.jsonl", "line 1", "not a finite number")
    refused(cli("label", write(tmp_path / "huge.jsonl", '{"prompt": "p", "completion": "c", "score": 1' + "0" * 400 + '}\n')),
            "huge.jsonl", "line 1", "not a finite number", "(401 digits)")
    refused(cli("label", tmp_path / "adir"), "adir", "is a directory")


def test_an_output_never_replaces_its_input_or_an_existing_file(tmp_path):
    """`sample -o` onto the recipe's data file and `label -o` onto its samples file are refused
    even with --force; an existing output is replaced only with --force."""
    samples = write(tmp_path / "samples.jsonl", "".join(
        json.dumps({"prompt": "p", "completion": c, "score": s}) + "\n" for c, s in (("a", 1), ("b", 0))))
    before = samples.read_bytes()
    for extra in ([], ["--force"]):
        refused(cli("label", samples, "-o", samples, *extra), "samples.jsonl", "the samples file itself")
        refused(cli("label", samples, "-o", tmp_path / "." / "samples.jsonl", *extra), "the samples file itself")
    assert samples.read_bytes() == before
    kept = write(tmp_path / "pairs.jsonl", "precious\n")
    refused(cli("label", samples), "pairs.jsonl", "already exists", "--force")
    assert kept.read_text() == "precious\n"
    assert cli("label", samples, "--force").exit_code == 0
    assert json.loads(kept.read_text().splitlines()[0])["chosen"] == "a"

    data = write(tmp_path / "prompts.jsonl", rows(2))
    sampling = recipe(tmp_path, "s", data__train=str(data), data__max_rows=2, sampling__max_new_tokens=2)
    recipe_text = sampling.read_text()
    for extra in ([], ["--force"]):
        refused(cli("sample", sampling, "-o", data, *extra), "prompts.jsonl", "the recipe's data.train itself")
        refused(cli("sample", sampling, "-o", sampling, *extra), "s.yaml", "the recipe file itself")
    assert data.read_text() == rows(2) and sampling.read_text() == recipe_text
    taken = write(tmp_path / "taken.jsonl", "precious\n")
    refused(cli("sample", sampling, "-o", taken), "taken.jsonl", "already exists", "--force")
    assert taken.read_text() == "precious\n"


# ----------------------------------------------------------------------------- 3. numbers


NUMBERS = [
    ("train.adam_betas=[1.5,0.999]", ["train.adam_betas", "[0, 1)"]),
    ("train.adam_betas=[0.9,1.0]", ["train.adam_betas", "beta2 is 1.0"]),
    ("train.adam_eps=0", ["train.adam_eps"]),
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.lr=.nan", ["train.lr", "finite"]),
    ("train.lr=0", ["train.lr"]),
    ("train.lr=-1e-5", ["train.lr"]),
    ("train.weight_decay=-0.1", ["train.weight_decay"]),
    ("train.max_grad_norm=0", ["train.max_grad_norm"]),
    ("train.warmup_steps=50", []),  # a 2-step smoke run of a recipe that warms up longer is fine
    ("train.max_steps=24 ;; train.warmup_steps=50", ["train.warmup_steps", "more than train.max_steps"]),
    ("train.epochs=.inf", ["train.epochs", "finite"]),
    ("seed=-5", ["seed"]),
    ("seed=4294967296", ["seed"]),
    ("sampling.temperature=.inf", ["sampling.temperature", "finite"]),
    ("sampling.max_new_tokens=1000000000000", ["sampling.max_new_tokens"]),
    ("objective.params.beta=.inf", ["objective.params.beta", "finite"]),
    ("objective.params.beta=inf", ["objective.params.beta", "finite"]),  # a string pydantic reads as a float
    ("objective.params.label_smoothing=.nan", ["objective.params.label_smoothing"]),
    ("model.options.hidden_size=65", ["model.options", "multiple of num_heads"]),
    ("model.options.num_kv_heads=3", ["model.options", "num_kv_heads (3) must divide num_heads (4)"]),
    ("model.options.hidden_size=12", ["model.options", "must be even"]),
    ("model.options.num_layers=1000000000", ["model.options.num_layers"]),
    ("model.options={hidden_size: 8192, num_heads: 64, num_kv_heads: 64, num_layers: 200, intermediate_size: 32768}",
     ["model.options", "parameters"]),
    ("model.lora={r: 1000000000000}", ["model.lora.r"]),
    ("train.max_steps=1000000000", ["train.max_steps"]),
    ("train.batch_size=1000", ["train.batch_size", "48 training rows of tiny-prefs"]),
    ("train.max_steps=null", []),  # valid: one epoch
    # true/false are not numbers (pydantic would read them as 1 and 0), in the recipe and in plugins' params
    ("train.batch_size=true", ["train.batch_size", "true is not a number"]),
    ("train.max_grad_norm=false", ["train.max_grad_norm", "false is not a number"]),
    ("objective.params.beta=yes", ["objective.params.beta", "true is not a number"]),
    ("model.options.hidden_size=true", ["model.options.hidden_size", "true is not a number"]),
    ("sampling.min_new_tokens=10 ;; sampling.max_new_tokens=2", ["sampling", "min_new_tokens 10 is more than "
                                                                             "max_new_tokens 2"]),
    ("data.max_prompt_length=200 ;; data.max_length=128", ["data", "max_prompt_length 200 leaves no room"]),
    ("data.max_length=128", []),  # the default max_prompt_length (256) is not the user's: prompts are cut to fit
]


@pytest.mark.parametrize("override, needles", NUMBERS, ids=[case[0][:40] for case in NUMBERS])
def test_numbers_out_of_range_are_refused_at_validation(tmp_path, override, needles):
    result = cli("validate", recipe(tmp_path), *override.split(" ;; "))
    if not needles:
        assert result.exit_code == 0, result.output
        return
    refused(result, "r.yaml", *needles)


def test_a_group_objective_refuses_samples_that_cannot_differ(tmp_path):
    """GRPO and RLOO compare the completions of a prompt: one completion, or greedy decoding, gives
    them nothing to compare (every advantage 0)."""
    for name in ("grpo_tiny", "rloo_tiny"):
        path = ROOT / "recipes" / f"{name}.yaml"
        refused(cli("validate", path, "sampling.temperature=0"), "sampling.temperature", "greedy decoding")
        refused(cli("validate", path, "sampling.num_samples=1"), "sampling.num_samples", "at least 2")
    assert cli("validate", ROOT / "recipes" / "ppo_kl_tiny.yaml", "sampling.temperature=0").exit_code == 0


def test_settings_this_machine_cannot_honour_and_impossible_paths(tmp_path):
    import torch

    if not torch.cuda.is_available():
        refused(cli("validate", recipe(tmp_path), "train.precision=fp16"), "train.precision", "needs a CUDA GPU")
    refused(cli("validate", recipe(tmp_path), "output_dir=" + "a" * 300), "output_dir", "more than the 255")
    refused(cli("validate", recipe(tmp_path), "data.train=" + "b/" * 2100 + "x.jsonl"), "data.train",
            "too long for a path")
    (tmp_path / "notamodel").mkdir()
    refused(cli("validate", recipe(tmp_path), f"model.source={tmp_path / 'notamodel'}", "model.options={}"),
            "model.source", "no config.json")
    refused(cli("validate", recipe(tmp_path), f"model.source={tmp_path / 'notamodel'}", "model.options={}",
                "model.gguf_file=m.gguf"), "model.gguf_file", "GGUF files there: none")
    # a named source builds its own folder: a GGUF file inside it cannot be meant (was found only at run,
    # naming the cache folder)
    refused(cli("validate", recipe(tmp_path), "model.gguf_file=m.gguf"), "model.gguf_file",
            "'tiny-llama' is a named model source")
    refused(cli("validate", recipe(tmp_path), "model.tokenizer=./no/such/tokenizer"), "model.tokenizer",
            "no such folder")
    # a folder the tokenizer would come from that holds no tokenizer files: refused before any load
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 1024}')
    refused(cli("validate", recipe(tmp_path), f"model.source={tmp_path / 'weights-only'}", "model.options={}"),
            "model.source", "holds no tokenizer files")
    (tmp_path / "empty").mkdir()
    refused(cli("validate", recipe(tmp_path), f"model.tokenizer={tmp_path / 'empty'}"), "model.tokenizer",
            "holds no tokenizer files")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text("{not json")
    refused(cli("validate", recipe(tmp_path), f"model.tokenizer={tmp_path / 'damaged'}"), "model.tokenizer",
            "cannot load the tokenizer", "damaged")


def test_lora_target_modules_that_match_nothing_are_refused_before_any_weights_load(tmp_path, monkeypatch):
    """Found on a skeleton of the model built from its config.json on the meta device."""
    import prefkit.models.loading as loading
    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chat_template=False)
    build_tiny_model(vocab_size=len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded the model's weights")

    monkeypatch.setattr(loading, "load_model", no_weights)
    folder = [f"model.source={tmp_path / 'm'}", "model.options={}", "model.lora={}"]
    refused(cli("validate", recipe(tmp_path), *folder, "model.lora.target_modules=[qq_proj]"),
            "model.lora.target_modules", "qq_proj", "not found")
    for fine in ("[q_proj, v_proj]", "all-linear"):
        assert cli("validate", recipe(tmp_path), *folder, f"model.lora.target_modules={fine}").exit_code == 0
    # a reward model's skeleton has the scalar head: its modules are checked too
    bt = ROOT / "recipes" / "bt_reward_tiny.yaml"
    refused(cli("validate", bt, f"output_dir={tmp_path / 'bt'}", *folder, "model.lora.target_modules=[qq_proj]"),
            "model.lora.target_modules", "qq_proj")


def test_epochs_beyond_reason_and_warmup_beyond_the_epochs(tmp_path):
    refused(cli("validate", recipe(tmp_path), "train.max_steps=null", "train.epochs=1000000"),
            "train.epochs", "steps, more than 10,000,000")
    refused(cli("validate", recipe(tmp_path), "train.max_steps=null", "train.warmup_steps=100"),
            "train.warmup_steps", "more than the run's 12 steps")


def test_an_online_budget_beyond_reason(tmp_path):
    ppo = ROOT / "recipes" / "ppo_kl_tiny.yaml"
    out = f"output_dir={tmp_path / 'ppo'}"
    assert cli("validate", ppo, out).exit_code == 0
    refused(cli("validate", ppo, out, "objective.params.update_epochs=1000000000"), "objective.params.update_epochs",
            "optimizer steps, more than 10,000,000")
    refused(cli("validate", ppo, out, "objective.params.rollout_batch_size=5000"),
            "objective.params.rollout_batch_size", "prompts per rollout")


def test_max_length_beyond_the_model(tmp_path):
    refused(cli("validate", recipe(tmp_path), "data.max_length=4096"), "data.max_length",
            "more than the model's 1024 positions")
    refused(cli("validate", recipe(tmp_path), "model.source=smollm2-135m-instruct", "model.options={}",
                "data.max_length=100000"), "data.max_length", "8192 positions")
    folder = tmp_path / "model"
    write(folder / "config.json", json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    refused(cli("validate", recipe(tmp_path), f"model.source={folder}", "model.options={}", "data.max_length=512"),
            "data.max_length", "256 positions", "config.json")
    write(folder / "config.json", "{not json")
    refused(cli("validate", recipe(tmp_path), f"model.source={folder}", "model.options={}"), "config.json",
            "not valid JSON")


def test_max_length_is_checked_against_a_built_source_before_training(tmp_path):
    """A named source that declares no positions is checked once built, before the model loads."""
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer
    from prefkit.plugins import load_registry
    from prefkit.recipe import DataConfig
    from prefkit.api import PrefkitError

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), max_position_embeddings=64).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "m")
    registry = load_registry()
    with pytest.raises(PrefkitError, match="data.max_length 128 is more than the model's 64 positions"):
        prepare_dataset(DataConfig(train="tiny-prefs", max_length=128), loaded, registry.data_kinds["pairs"],
                        registry=registry)


def test_a_damaged_model_folder_is_one_message_and_the_fixed_run_reuses_its_folder(tmp_path):
    """Truncated weights, an unknown architecture, weights that do not fit the config: one message
    naming the folder (a JSON error event under --json), and the corrected command may start in
    the output_dir the failed start left (its recipe only), with no --resume and nothing deleted."""
    import shutil

    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    good = tmp_path / "good"
    build_tiny_model(len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)

    def damaged(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def config(folder: Path, **changes) -> None:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **changes}))

    weights = "model.safetensors"
    truncated = damaged("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:1000]))
    unknown = damaged("unknown", lambda f: config(f, model_type="nonsense_arch"))
    vocab = damaged("vocab", lambda f: config(f, vocab_size=10))
    out = tmp_path / "run"
    for folder, reason in ((truncated, "header"), (unknown, "nonsense_arch"), (vocab, "do not match its config.json")):
        refused(cli("run", recipe(tmp_path, output_dir=str(out)), f"model.source={folder}", "model.options={}"),
                f"directory '{folder}'", reason)
        refused(cli("sample", recipe(tmp_path, output_dir=str(tmp_path / "s")), f"model.source={folder}",
                    "model.options={}", "data.max_rows=2"), f"directory '{folder}'", reason)
    result = cli("run", recipe(tmp_path, output_dir=str(out)), f"model.source={truncated}", "model.options={}", "--json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["event"] == "error" and str(truncated) in error["text"]
    assert sorted(p.name for p in out.iterdir()) == ["recipe.resolved.yaml"]
    refused(cli("run", recipe(tmp_path, output_dir=str(out)), f"model.source={good}", "model.options={}",
                "--resume"), "stopped before its first step", "leave out --resume")
    result = cli("run", recipe(tmp_path, output_dir=str(out)), f"model.source={good}", "model.options={}")
    assert result.exit_code == 0, result.output
    assert "starting it afresh" in result.output and (out / "final" / weights).is_file()
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["model"]["source"] == str(good)


# ----------------------------------------------------------------------------- 4. plugins


HEADER = "from prefkit.api import hookimpl, ModelSource, NamedDataset, RewardFunction\n"


def plugin(install, dist: str, source: str) -> str:
    module = dist.replace("-", "_")
    install(dist, entry_points={module.removeprefix("prefkit_"): module},
            files={f"{module}.py": HEADER + textwrap.dedent(source)})
    return module.removeprefix("prefkit_")


def test_a_model_source_that_raises_names_the_plugin_and_distribution(tmp_path, install_plugin):
    plugin(install_plugin, "prefkit-boom-source", """
        class Boom(ModelSource):
            name = "boom-model"
            description = "raises"
            def materialize(self, params, cache_dir):
                raise RuntimeError("weights server down")
        @hookimpl
        def register_models(register):
            register(Boom())
    """)
    refused(cli("run", recipe(tmp_path, model__source="boom-model", model__options={})), "model source 'boom-model'",
            "plugin 'boom_source'", "prefkit-boom-source 0.1.0", "RuntimeError: weights server down")


def test_a_reward_function_that_raises_in_build_or_scoring(tmp_path, install_plugin):
    plugin(install_plugin, "prefkit-boom-reward", """
        class Build(RewardFunction):
            name = "boom-build"
            description = "raises in build"
            def build(self, params, *, cache_dir, device):
                raise RuntimeError("lexicon missing")
        class Score(RewardFunction):
            name = "boom-score"
            description = "raises while scoring"
            def build(self, params, *, cache_dir, device):
                return lambda prompts, completions: 1 / 0
        @hookimpl
        def register_reward_functions(register):
            register(Build())
            register(Score())
    """)
    common = dict(sampling={"max_new_tokens": 2, "num_samples": 1, "batch_size": 8}, data__max_rows=2)
    refused(cli("sample", recipe(tmp_path, "a", reward={"name": "boom-build"}, **common), "-o", tmp_path / "a.jsonl"),
            "reward function 'boom-build'", "prefkit-boom-reward 0.1.0", "building the scorer", "lexicon missing")
    refused(cli("sample", recipe(tmp_path, "b", reward={"name": "boom-score"}, **common), "-o", tmp_path / "b.jsonl"),
            "reward function 'boom-score'", "prefkit-boom-reward 0.1.0", "ZeroDivisionError")


def test_an_objective_reading_an_input_it_did_not_declare_is_told_which_need_gives_it(tmp_path, install_plugin):
    plugin(install_plugin, "prefkit-undeclared", """
        from prefkit.api import LossOutput, Objective, ObjectiveParams
        class Undeclared(Objective):
            name = "undeclared"
            description = "reads the reference without Needs(reference=True)"
            Params = ObjectiveParams
            def loss(self, params, inputs):
                return LossOutput(losses=inputs.chosen_logps - inputs.ref_chosen_logps)
        @hookimpl
        def register_objectives(register):
            register(Undeclared())
    """)
    text = " ".join(refused(cli("run", recipe(tmp_path, objective={"name": "undeclared"}))).split())
    assert "objective 'undeclared'" in text and "loss() raised TypeError" in text
    assert "if the loss reads an input its needs() does not declare, that input is None (ref_*_logps need " \
           "Needs(reference=True)" in text


def test_a_dataset_plugin_without_files(tmp_path, install_plugin):
    plugin(install_plugin, "prefkit-odd-data", """
        @hookimpl
        def register_datasets(register):
            register(NamedDataset(name="odd-set", description="no files", files=None))
    """)
    refused(cli("validate", recipe(tmp_path, data__train="odd-set")), "odd-set", "plugin 'odd_data'",
            "prefkit-odd-data 0.1.0")


@pytest.mark.parametrize("body, cause", [
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    ("import sys\nsys.exit(0)\n", "SystemExit: 0"),
])
@pytest.mark.parametrize("timeout", ["0", "30"])  # 0: imported in this thread, with no time limit
def test_a_plugin_that_interrupts_or_exits_at_import_does_not_stop_the_cli(tmp_path, install_plugin, monkeypatch,
                                                                          body, cause, timeout):
    monkeypatch.setenv("PREFKIT_PLUGIN_IMPORT_TIMEOUT", timeout)
    install_plugin("prefkit-rude", entry_points={"rude": "prefkit_rude"}, files={"prefkit_rude.py": body})
    result = cli("validate", recipe(tmp_path))
    assert result.exit_code == 0, (result.exception, result.output)
    assert "plugin 'rude' (prefkit-rude 0.1.0): failed to import prefkit_rude" in result.output and cause in result.output


def test_a_plugin_that_hangs_at_import_is_skipped(tmp_path, install_plugin, monkeypatch):
    monkeypatch.setenv("PREFKIT_PLUGIN_IMPORT_TIMEOUT", "0.5")
    install_plugin("prefkit-hang", entry_points={"hang": "prefkit_hang"},
                   files={"prefkit_hang.py": "import time\ntime.sleep(20)\n"})
    started = time.perf_counter()
    result = cli("validate", recipe(tmp_path))
    assert result.exit_code == 0, (result.exception, result.output)
    assert time.perf_counter() - started < 15
    assert "plugin 'hang' (prefkit-hang 0.1.0): did not finish importing within 0.5 s; skipped" in result.output
    assert "PREFKIT_PLUGIN_IMPORT_TIMEOUT" in result.output


def test_a_plugin_stuck_importing_another_module_stops_loading_cleanly(tmp_path, install_plugin, monkeypatch):
    monkeypatch.setenv("PREFKIT_PLUGIN_IMPORT_TIMEOUT", "0.5")
    install_plugin("prefkit-stuck", entry_points={"stuck": "prefkit_stuck"},
                   files={"prefkit_stuck.py": "import prefkit_slow_dependency\n",
                          "prefkit_slow_dependency.py": "import time\ntime.sleep(20)\n"})
    refused(cli("validate", recipe(tmp_path)), "plugin 'stuck' (prefkit-stuck 0.1.0)", "within 0.5 s",
            "'prefkit_slow_dependency'", "PREFKIT_PLUGINS")


def test_a_bad_import_timeout_setting_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFKIT_PLUGIN_IMPORT_TIMEOUT", "soon")
    from prefkit.plugins import load_registry

    load_registry.cache_clear()
    try:
        result = cli("validate", recipe(tmp_path))
    finally:
        load_registry.cache_clear()
    assert result.exit_code == 0 and "PREFKIT_PLUGIN_IMPORT_TIMEOUT='soon' is not a number of seconds" in result.output


def test_a_hanging_plugin_does_not_block_the_real_command(tmp_path):
    """The same, end to end in a fresh process: the command finishes and says what it skipped."""
    from prefkit.testing import write_distribution

    site = write_distribution(tmp_path / "site", "prefkit-hang", entry_points={"hang": "prefkit_hang"},
                              files={"prefkit_hang.py": "import time\ntime.sleep(600)\n"})
    env = {**os.environ, "PREFKIT_PLUGIN_IMPORT_TIMEOUT": "1",
           "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "prefkit", "validate", str(recipe(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "did not finish importing within 1 s; skipped" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- 5. names


@pytest.mark.parametrize("override, needles", [
    ("model.source=smollm2-135m-instruc", ["model.source", "did you mean 'smollm2-135m-instruct'?"]),
    ("model.source=Tiny-Llama", ["model.source", "did you mean 'tiny-llama'?"]),
    ("data.train=tiny-pref", ["data.train", "did you mean 'tiny-prefs'?"]),
    ("objective.name=dop", ["objective.name", "did you mean 'dpo'?"]),
    ("reward={name: keyword, params: {targets: [e]}}", ["reward.name", "did you mean 'keywords'?"]),
    ("trian.lr=1", ["trian", "did you mean 'train'?"]),
    ("train.learning_rate=1e-5", ["train.learning_rate", "did you mean 'lr'?"]),
    ("objective.params.beat=0.1", ["objective.params.beat", "did you mean 'beta'?"]),
    ("model.options.hiden_size=64", ["model.options.hiden_size", "did you mean 'hidden_size'?"]),
])
def test_misspelt_names_get_did_you_mean_at_once(tmp_path, override, needles):
    started = time.perf_counter()
    refused(cli("validate", recipe(tmp_path), override), *needles)
    refused(cli("run", recipe(tmp_path), override), *needles)
    assert time.perf_counter() - started < 60  # no minute lost on an unreachable hub
    assert not (tmp_path / "out-r").exists()


def test_the_listings_the_messages_point_to_exist():
    result = cli("models")
    assert result.exit_code == 0 and "tiny-llama" in result.output and "smollm2-135m-instruct" in result.output
    result = cli("datasets")
    assert result.exit_code == 0 and "tiny-prefs" in result.output and "test, train" in result.output


def test_hub_ids_and_unrelated_bare_names_still_pass_validation(tmp_path):
    for source in ("some-org/some-model", "gpt2"):
        result = cli("validate", recipe(tmp_path), f"model.source={source}", "model.options={}")
        assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- 6. other commands


def test_compare_validate_refuses_nonsense(tmp_path):
    def compare(name, change):
        data = copy.deepcopy(COMPARE)
        data["output_dir"] = str(tmp_path / "cmp")
        change(data)
        return write(tmp_path / f"{name}.yaml", yaml.safe_dump(data))

    refused(cli("compare", "--validate", compare("nan", lambda d: d["arms"][0]["params"].update(beta=float("nan")))),
            "arms.0.params.beta", "finite")
    refused(cli("compare", "--validate", compare("inf", lambda d: d["evaluation"].update(temperatures=[float("inf")]))),
            "evaluation.temperatures.0", "finite")
    refused(cli("compare", "--validate", compare("batch", lambda d: d["arms"][0].update(train={"batch_size": 500}))),
            "arms.0.train.batch_size", "arm 'dpo-b0.1'", "48 training rows")
    refused(cli("compare", "--validate", compare("typo", lambda d: d["evaluation"].update(prompts="tiny-pref"))),
            "evaluation.prompts", "did you mean 'tiny-prefs'?")
    refused(cli("compare", "--validate", compare("out", lambda d: d.update(output_dir=str(write(tmp_path / "f", "x"))))),
            "output_dir", "is a file")
    refused(cli("compare", "--validate", compare("seeds", lambda d: d["arms"][0].update(seeds=[5]))),
            "arms.0.seeds", "seeds [5] are not among the compare's seeds")
    # a reward model folder that is not there: refused at validate, by its own key (it failed only at run)
    judge = {"name": "reward_model", "params": {"path": str(tmp_path / "no-rm")}}
    refused(cli("compare", "--validate", compare("judge", lambda d: d["evaluation"].update(judge=judge))),
            "evaluation.judge.params.path: no reward model folder at")
    refused(cli("validate", ROOT / "recipes" / "ppo_kl_tiny.yaml", f"reward={json.dumps(judge)}"),
            "reward.params.path: no reward model folder at")
    # the shared reward, missing for every arm that scores with it: one line naming them
    out = " ".join(refused(cli("compare", "--validate", compare("shared", lambda d: d.update(reward=judge)))).split())
    assert out.count("no reward model folder") == 1 and "reward.params.path: arms 'ppo-kl2', 'grpo'" in out
    # the evaluation prompts are read at validate, as the compare reads them (both passed validate, then failed)
    refused(cli("compare", "--validate", compare("split", lambda d: d["evaluation"].update(prompts_split="validation"))),
            "has no split 'validation'")
    refused(cli("compare", "--validate", compare("chosen", lambda d: d["evaluation"].update(
        prompts="sentiment-prompts", win_against="chosen"))), "win_against is 'chosen', but its rows have no 'chosen'")
    # evaluation prompts from a mixture, or carved from a mixture, are read part by part (not refused)
    mixed = [{"source": "tiny-prefs", "split": "test"}, {"source": "tiny-prefs", "split": "train", "max_rows": 4}]
    assert cli("compare", "--validate", compare("mixed", lambda d: d["data"].update(eval=mixed))).exit_code == 0
    assert cli("compare", "--validate", compare("carved", lambda d: d["data"].update(
        train=mixed, eval={"from_train": 4}))).exit_code == 0
    prompts = write(tmp_path / "prompts.jsonl", '{"prompt": ""}\n{"prompt": 5}\n{"text": "no prompt"}\n')
    refused(cli("compare", "--validate", compare("prompts", lambda d: d["evaluation"].update(prompts=str(prompts)))),
            "prompts.jsonl", "row 1: field 'prompt' is empty", "row 2")


def test_every_command_exits_2_on_a_user_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    refused(cli("run", recipe(tmp_path, output_dir=str(out))), "already holds a run", "--resume")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing already written is lost
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep")  # not a run: --resume is not the fix
    refused(cli("run", recipe(tmp_path, output_dir=str(other))), "is not empty (notes.txt) and holds no run",
            "a new or empty folder")
    refused(cli("run", recipe(tmp_path, output_dir=str(other)), "--resume"), "holds no run to resume")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    refused(cli("sample", recipe(tmp_path, data__train=str(tmp_path / "none.jsonl"))), "none.jsonl", "file not found")
    refused(cli("label", tmp_path / "missing.jsonl"), "missing.jsonl", "file not found")
    refused(cli("validate", recipe(tmp_path), "=5"), "override '=5'", "dotted.key=value")
    refused(cli("validate", recipe(tmp_path), 'output_dir="a\\ud800"'), "output_dir", "surrogate")


# ----------------------------------------------------------------------------- found by a sweep (2026-12-08)


def test_a_model_source_that_is_a_file_or_cannot_be_looked_at_is_refused_by_validate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "notes.txt", "not a model")
    path = recipe(tmp_path)
    refused(cli("validate", path, "model.source=notes.txt"), "model.source: 'notes.txt' is a file, not a model directory")
    refused(cli("validate", path, "model.source=~nosuchuser9/m"), "model.source: '~nosuchuser9/m': no such directory")
    assert not (tmp_path / "out-r").exists()


def test_a_hub_id_that_fails_to_load_under_a_local_folder_of_its_name_hints_at_a_mistyped_path(tmp_path,
                                                                                               monkeypatch):
    from prefkit.api import PrefkitError
    from prefkit.models.loading import _user_errors

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(PrefkitError, match="'runs' is a folder here: if a local path was meant, it does not exist"):
        with _user_errors("model", "runs/typo"):
            raise OSError("runs/typo is not a local folder and is not a valid model identifier")
    with pytest.raises(PrefkitError) as caught:
        with _user_errors("model", "someorg/typo"):
            raise OSError("not found")
    assert "is a folder here" not in str(caught.value)


def test_pydantic_class_names_and_union_members_do_not_reach_the_message(tmp_path):
    path = recipe(tmp_path)
    out = refused(cli("validate", path, "objective=dpo", "model.lora=yes", "train=[1, 2]"),
                  "objective: must be a mapping of keys to values, not str 'dpo'",
                  "model.lora: must be a mapping of keys to values, not bool True",
                  "train: must be a mapping of keys to values, not list [1, 2]")
    assert "ObjectiveConfig" not in out and "LoraConfig" not in out and "TrainConfig" not in out
    out = refused(cli("validate", path, "model.lora={r: 8, target_modules: all-linearr}"),
                  "model.lora.target_modules: Input should be a valid list; or input should be 'all-linear'; "
                  "did you mean 'all-linear'?")
    assert "list[str]" not in out and "literal[" not in out
    refused(cli("validate", path, "train.precision=bf61"), "train.precision", "did you mean 'bf16'?")
    out = refused(cli("validate", path, "model.lora={r: 8, target_modules: [q, 5]}"),
                  "model.lora.target_modules.1: Input should be a valid string")
    assert "all-linear" not in out  # the value is a list: the other member's complaint would mislead


def test_data_whose_every_row_is_skipped_as_bad_says_so(tmp_path):
    data = write(tmp_path / "same.jsonl", "\n".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "a"})
                                                    for i in range(6)))
    path = recipe(tmp_path, data__train=str(data), data__bad_rows="skip")
    refused(cli("validate", path), "same.jsonl (train): no usable examples: 6 rows read, 6 bad",
            "rows 1-6: fields 'chosen' and 'rejected' are identical")


def test_a_recipe_copy_under_a_file_names_the_file(tmp_path):
    write(tmp_path / "afile", "x")
    refused(cli("recipes", "copy", "dpo_tiny", tmp_path / "afile" / "sub.yaml"),
            "afile is a file, not a folder", "nothing was written")


def test_an_online_recipe_with_one_sample_a_prompt_names_num_samples_first(tmp_path):
    out = refused(cli("validate", ROOT / "recipes" / "grpo_tiny.yaml", "sampling.num_samples=1"))
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(("sampling.", "objective."))]
    assert lines[0].startswith("sampling.num_samples: objective 'grpo' compares the completions of one prompt")


def test_a_compare_arm_whose_data_its_objective_cannot_read_is_named(tmp_path):
    data = copy.deepcopy(COMPARE)
    data["output_dir"] = str(tmp_path / "cmp")
    path = write(tmp_path / "compare.yaml", yaml.safe_dump(data))
    arm = next(i for i, a in enumerate(data["arms"]) if a["objective"] == "kto")
    refused(cli("validate", path, f"arms.{arm}.data.train=tiny-prefs"), "compare.yaml: invalid recipe",
            f"arms.{arm}: arm 'kto'", "objective 'kto' needs 'unpaired preference' rows")


def test_conversations_with_chat_template_never_are_refused_by_validate(tmp_path):
    path = recipe(tmp_path, data__train="tiny-prefs-chat", data__chat_template="never")
    refused(cli("validate", path), "tiny-prefs-chat (train): the data is conversational",
            "data.chat_template is 'never'")
    assert cli("validate", recipe(tmp_path, "plain", data__chat_template="never")).exit_code == 0


def test_shared_compare_data_that_several_arms_cannot_read_is_one_line_naming_them(tmp_path):
    data = copy.deepcopy(COMPARE)
    data["output_dir"] = str(tmp_path / "cmp")
    path = write(tmp_path / "compare.yaml", yaml.safe_dump(data))
    out = refused(cli("validate", path, "data.train=tiny-unpaired"), max_lines=8)
    assert out.count("objective 'dpo' needs") == 1, out
    assert "arms 'dpo-b0.1', 'dpo-b0.5': tiny-unpaired (train)" in " ".join(out.split())


# ----------------------------------------------------------------------------- found by a second sweep (2026-12-08)


def test_a_compare_recipe_given_to_run_is_named_as_one(tmp_path):
    out = " ".join(refused(cli("run", ROOT / "recipes" / "compare_tiny.yaml")).split())
    assert "arms: this is a compare recipe (it has arms:), not a run recipe; run it with `prefkit compare`" in out
    assert "seeds" not in out  # not "seeds: unknown key; did you mean 'seed'?"


def test_folders_that_are_not_model_folders_say_what_they_are(tmp_path):
    """A checkpoint, a run and a compare folder given where a model folder goes: the hint says what
    the folder is and where its model is, not 'point model.source at one'."""
    run = tmp_path / "run"
    assert cli("run", recipe(tmp_path, output_dir=str(run), train__save_every=1)).exit_code == 0
    step = run / "checkpoints" / "step-2"
    text = " ".join(refused(cli("eval", run, "--model", step)).split())
    assert "is not a Hugging Face model folder (no config.json); it is a training checkpoint" in text
    assert text.startswith("error: --model (model= in Python): ")  # named as the option, before any model loads
    assert "prefkit export RUN --step N" in text
    (tmp_path / "m.txt").write_text("x")
    text = " ".join(refused(cli("eval", run, "--model", tmp_path / "m.txt")).split())
    assert "--model (model= in Python): " in text and "m.txt' is a file, not a model directory" in text
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.resolved.yaml").write_text("arms: []\n")
    text = " ".join(refused(cli("eval", run, "--model", tmp_path / "cmp")).split())
    assert "it is a compare folder: each arm's trained model is in arms/NAME/seed-N/final" in text
    text = " ".join(refused(cli("validate", recipe(tmp_path, "v", model={"source": str(run)}))).split())
    assert f"model.source: '{run}' is not a Hugging Face model folder (no config.json); it is a run folder" in text
    shutil.rmtree(run / "final")
    text = " ".join(refused(cli("eval", run)).split())
    assert "has no final/ (the run has not finished); give a model folder (--model PATH" in text
    text = " ".join(refused(cli("validate", recipe(tmp_path, "v", model={"source": str(run)}))).split())
    assert "it is a run folder that has not finished: write a checkpoint as a model folder with `prefkit export`" in text


def test_a_model_source_that_builds_a_folder_without_config_names_the_plugin(tmp_path, install_plugin):
    plugin(install_plugin, "prefkit-hollow-source", """
        from pathlib import Path
        class Hollow(ModelSource):
            name = "hollow-model"
            description = "an empty folder"
            def materialize(self, params, cache_dir):
                folder = Path(cache_dir) / "hollow"
                folder.mkdir(parents=True, exist_ok=True)
                return folder
        @hookimpl
        def register_models(register):
            register(Hollow())
    """)
    text = " ".join(refused(cli("run", recipe(tmp_path, model__source="hollow-model", model__options={}))).split())
    assert "model source 'hollow-model'" in text and "plugin 'hollow_source'" in text
    assert "which is not a Hugging Face model folder (no config.json); report it to the plugin's authors" in text


def test_a_reward_model_is_refused_where_a_language_model_is_needed(tmp_path):
    """eval --model of a reward model's folder computed log-probs through a random LM head (exit 0)."""
    reward = tmp_path / "rm"
    assert cli("run", ROOT / "recipes" / "bt_reward_tiny.yaml", f"output_dir={reward}", "train.max_steps=2",
               "train.save_every=null", "train.eval_every=null", "data.eval=null").exit_code == 0
    run = tmp_path / "run"
    assert cli("run", recipe(tmp_path, output_dir=str(run))).exit_code == 0
    text = " ".join(refused(cli("eval", run, "--model", reward / "final")).split())
    assert "is a reward model (a sequence classifier: LlamaForSequenceClassification), not a language model" in text
    text = " ".join(refused(cli("run", recipe(tmp_path, "r2", output_dir=str(tmp_path / "r2"),
                                              model={"source": str(reward / "final")}))).split())
    assert "is a reward model" in text and not (tmp_path / "r2" / "checkpoints").exists()
    text = " ".join(refused(cli("validate", recipe(tmp_path, "r3", model={"source": str(reward / "final")}))).split())
    assert "model.source: " in text and "is a reward model" in text  # found before any model loads
    assert cli("validate", ROOT / "recipes" / "bt_reward_tiny.yaml", f"model.source={reward / 'final'}",
               "model.options={}").exit_code == 0  # a reward model may go on training as one
