"""The commands a TRL or torchtune user expects (issue 11): `prefkit chat`, `prefkit recipes`, sampling
recipes without an objective, and `--quiet` / `--json` output for scripts. Each runs the real command
line (typer's test runner, in this process) on the tiny model; bad inputs end in one message with exit
code 2 and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefkit.chat import ChatSession, open_chat
from prefkit.cli import app
from prefkit.plugins import load_registry

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "dpo_tiny.yaml"
REGISTRY = load_registry()
runner = CliRunner()


def cli(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def flat(result) -> str:
    """The output with its line breaks as spaces (rich wraps long lines at the terminal's width)."""
    return " ".join(result.output.split())


def refused(result, *needles: str) -> str:
    output = result.output
    assert result.exit_code == 2, (result.exit_code, result.exception, output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output)
    assert output.count("error:") == 1 and len(output.strip().splitlines()) <= 6, output
    return output


def tiny_recipe(tmp_path: Path, name: str = "r", **options) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["output_dir"] = str(tmp_path / f"out-{name}")
    data["model"]["options"].update(options)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- chat: the library


def test_a_chat_keeps_its_history_through_the_chat_template():
    session = open_chat("tiny-llama", seed=0, max_new_tokens=6, system="Be brief.", registry=REGISTRY)
    assert session.templated
    first = session.send("hello")
    first_ids = session.last_prompt_ids
    assert session.tokenizer.decode(first_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                   "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    second = session.send("again")
    second_ids = session.last_prompt_ids
    assert second_ids[:len(first_ids)] == first_ids  # the second turn's prompt holds the first turn
    assert len(second_ids) > len(first_ids) + len(session.tokenizer("again").input_ids)
    assert session.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": second}]
    text = session.tokenizer.decode(second_ids)
    assert "user\nhello<|im_end|>" in text and text.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    session.reset()  # forgets the conversation, keeps the system prompt
    session.send("new")
    assert session.last_prompt_ids == session.tokenizer(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nnew<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False).input_ids


def test_the_same_seed_gives_the_same_replies_and_another_seed_others():
    def replies(seed):
        session = open_chat("tiny-llama", seed=seed, max_new_tokens=12, temperature=1.0, top_p=1.0, registry=REGISTRY)
        return [session.send("hi"), session.send("more")]

    assert replies(5) == replies(5)
    assert replies(5) != replies(6)


def test_a_model_without_a_chat_template_is_continued_as_plain_text(tmp_path):
    session = open_chat(str(tiny_recipe(tmp_path, chat_template=False)), seed=0, max_new_tokens=4, registry=REGISTRY)
    assert not session.templated
    first = session.send("abc")
    assert session.last_prompt_ids == session.tokenizer("abc", add_special_tokens=False).input_ids
    session.send("def")
    assert session.transcript.startswith(f"abc{first}\ndef")
    assert session.last_prompt_ids == session.tokenizer(f"abc{first}\ndef", add_special_tokens=False).input_ids


def test_a_long_conversation_drops_its_oldest_turns_to_fit_the_context(tmp_path):
    session = open_chat(str(tiny_recipe(tmp_path, max_position_embeddings=160)), seed=0, max_new_tokens=8,
                        registry=REGISTRY)
    for i in range(6):
        session.send(f"message number {i}, " + "x" * 30)
        assert len(session.last_prompt_ids) <= 160 - 8
    assert any("oldest" in note for note in session.notes)
    assert session.messages[-2]["content"].startswith("message number 5")
    assert "message number 0" not in session.tokenizer.decode(session.last_prompt_ids)


# --------------------------------------------------------------------------- chat: the command line


@pytest.fixture
def sent(monkeypatch):
    """What the CLI sent to the model: (message, prompt ids) per turn."""
    calls = []
    original = ChatSession.send

    def send(self, text):
        reply = original(self, text)
        calls.append((text, list(self.last_prompt_ids), self.tokenizer.decode(self.last_prompt_ids)))
        return reply

    monkeypatch.setattr(ChatSession, "send", send)
    return calls


def test_chat_reads_messages_from_stdin_and_keeps_history(sent):
    result = cli("chat", "tiny-llama", "--seed", "0", "--max-new-tokens", "4", input="hello\n\nagain\n")
    assert result.exit_code == 0, result.output  # the end of input ends the chat cleanly
    assert [text for text, _, _ in sent] == ["hello", "again"]
    assert sent[1][1][:len(sent[0][1])] == sent[0][1]
    assert "user\nhello" in sent[1][2] and "chat template" in flat(result)


def test_chat_reset_and_exit(sent):
    result = cli("chat", "tiny-llama", "--max-new-tokens", "4", "--system", "S.",
                 input="hello\n/reset\nhi\n/help\n/bogus\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output
    assert [text for text, _, _ in sent] == ["hello", "hi"]
    assert "hello" not in sent[1][2] and sent[1][2].startswith("<|im_start|>system\nS.")
    assert "forgotten" in flat(result) and "unknown command /bogus" in flat(result)


def test_a_chat_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(sent):
    result = cli("chat", "tiny-llama", "--max-new-tokens", "4", input=b"\xff\xfe hi\nhello\n")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert [text for text, _, _ in sent] == ["hello"]
    assert "not sent: it is not valid UTF-8 text (byte 0xff at column 1)" in flat(result)


def test_chat_ends_cleanly_on_ctrl_c(monkeypatch):
    def interrupted(self, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(ChatSession, "send", interrupted)
    result = cli("chat", "tiny-llama", input="hello\n")
    assert result.exit_code == 0 and "Traceback" not in result.output


def test_chat_with_a_run_uses_its_final_model_or_a_checkpoint(tmp_path, sent):
    out = tmp_path / "run"
    assert cli("run", TINY, f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "data.eval=null",
               "-q").exit_code == 0
    result = cli("chat", out, "--max-new-tokens", "4", input="hi\n")
    assert result.exit_code == 0, result.output
    assert f"chatting with {out / 'final'}" in flat(result)
    result = cli("chat", out, "--step", "2", "--max-new-tokens", "4", input="hi\n")
    assert result.exit_code == 0, result.output
    assert "checkpoint step-2" in flat(result)
    # without final/ the newest checkpoint is used
    import shutil

    shutil.rmtree(out / "final")
    result = cli("chat", out, "--max-new-tokens", "4", input="hi\n")
    assert result.exit_code == 0 and "checkpoint step-4" in flat(result), result.output
    refused(cli("chat", out, "--step", "3", input="hi\n"), "--step 3", "it has: 2, 4")
    assert len(sent) == 3


def test_chat_refuses_bad_sources_with_one_message(tmp_path):
    refused(cli("chat", tmp_path / "missing-run", input="hi\n"), "missing-run", "no such run or model folder")
    refused(cli("chat", "tiny-lama", input="hi\n"), "'tiny-lama'", "did you mean 'tiny-llama'")
    refused(cli("chat", "tiny-llama", "--temperature", "-1", input="hi\n"), "--temperature")
    refused(cli("chat", "tiny-llama", "--max-new-tokens", "5000", input="hi\n"), "--max-new-tokens 5000", "1024")
    refused(cli("chat", "tiny-llama", "--step", "2", input="hi\n"), "--step 2", "not a run folder")
    (tmp_path / "notes.txt").write_text("x")
    refused(cli("chat", tmp_path / "notes.txt", input="hi\n"), "notes.txt", "is a file")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.resolved.yaml").write_text(TINY.read_text())
    refused(cli("chat", unfinished, input="hi\n"), "neither a final/ model nor a checkpoint")
    scorer = tmp_path / "rm"
    scorer.mkdir()
    (scorer / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    refused(cli("chat", scorer, input="hi\n"), "reward model", "cannot chat")


# --------------------------------------------------------------------------- recipes


def test_recipes_lists_every_shipped_recipe_with_its_description_and_needs():
    from prefkit.catalog import list_recipes

    items = {item.name: item for item in list_recipes(REGISTRY)}
    on_disk = {str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert set(items) == on_disk
    assert items["dpo_tiny"].description == "DPO on a tiny random-initialised Llama over the shipped tiny preference set."
    assert (items["dpo_tiny"].command, items["dpo_tiny"].objective) == ("run", "dpo")
    assert items["best_of_n_tiny"].command == "sample" and items["compare_tiny"].command == "compare"
    assert items["sentiment/sample_tiny"].objective is None and items["sentiment/sample_tiny"].command == "sample"
    assert not items["dpo_tiny"].needs
    assert "runs/sentiment-tiny/pairs.jsonl" in items["sentiment/bt_reward_tiny"].needs
    assert items["sentiment/bt_reward_tiny"].guide == "sentiment/README.md"
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    assert "dpo_tiny" in result.output and "sentiment/bt_reward_tiny" in result.output
    import re

    flat = re.sub(r"[\s│]+", " ", result.output)  # a table cell wrapped over lines, read as one line
    assert "needs earlier steps" in flat and "see sentiment/README.md" in flat and "prefkit recipes copy" in flat


def test_recipes_copy_writes_a_file_and_never_overwrites_without_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("recipes", "copy", "dpo_tiny")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dpo_tiny.yaml").read_text() == TINY.read_text()
    (tmp_path / "dpo_tiny.yaml").write_text("# mine\n")
    refused(cli("recipes", "copy", "dpo_tiny"), "dpo_tiny.yaml already exists", "--force")
    assert (tmp_path / "dpo_tiny.yaml").read_text() == "# mine\n"
    assert cli("recipes", "copy", "dpo_tiny", "--force").exit_code == 0
    assert (tmp_path / "dpo_tiny.yaml").read_text() == TINY.read_text()
    # into a folder, under another name, and a whole folder with its README and script
    (tmp_path / "mine").mkdir()
    assert cli("recipes", "copy", "sentiment/sample_tiny", "mine").exit_code == 0
    assert (tmp_path / "mine" / "sample_tiny.yaml").is_file()
    result = cli("recipes", "copy", "sentiment/bt_reward_tiny", "rm.yaml")
    assert result.exit_code == 0 and "needs earlier steps" in flat(result)
    assert cli("recipes", "copy", "sentiment", "pipeline").exit_code == 0
    assert (tmp_path / "pipeline" / "pipeline.sh").is_file() and (tmp_path / "pipeline" / "README.md").is_file()
    # a copied recipe is a recipe
    assert cli("validate", "dpo_tiny.yaml").exit_code == 0
    assert "output_dir: runs/dpo_tiny" in cli("recipes", "show", "dpo_tiny").output


def test_recipes_refuses_unknown_names(tmp_path):
    refused(cli("recipes", "copy", "dpo_tiy", tmp_path / "x.yaml"), "'dpo_tiy'", "did you mean 'dpo_tiny'")
    refused(cli("recipes", "copy", "../pyproject.toml", tmp_path / "x.yaml"), "no shipped recipe")
    refused(cli("recipes", "show", "sentiment"), "is a folder")
    assert not (tmp_path / "x.yaml").exists()


# --------------------------------------------------------------------------- sampling without an objective


def test_a_sampling_recipe_needs_no_objective_and_run_says_it_needs_one(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    del data["objective"], data["train"]
    data.update(output_dir=str(tmp_path / "s"), sampling={"max_new_tokens": 4, "num_samples": 2})
    path = tmp_path / "sample.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("validate", path)
    assert result.exit_code == 0 and "no objective" in flat(result), result.output
    result = cli("sample", path, "-q")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and "candidate_index" not in rows[0]  # the 16 test prompts, 2 samples each
    assert json.loads((tmp_path / "s" / "samples.summary.json").read_text())["objective"] is None
    for command in ("run", "eval"):
        refused(cli(command, path), str(path), "objective", f"`prefkit {command}` needs objective.name")
    assert not (tmp_path / "s" / "run.json").exists()


# --------------------------------------------------------------------------- --quiet and --json


def test_json_output_is_one_event_per_line_and_equals_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(TINY), f"output_dir={out}", "train.max_steps=4", "train.eval_every=2",
                                 "train.save_every=2", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every line parses: nothing else there
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "result" and kinds.count("start") >= 1 and "message" in kinds
    steps = {e["step"]: e["metrics"] for e in events if e["event"] == "step"}
    evals = {e["step"]: e["metrics"] for e in events if e["event"] == "eval"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    for record in logged:
        shown = {**steps[record["step"]], **evals.get(record["step"], {})}
        assert shown == {k: v for k, v in record.items() if k != "step"}
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    assert all(e["path"].endswith(f"checkpoints/step-{e['step']}") for e in events if e["event"] == "checkpoint")
    final = events[-1]
    assert final["command"] == "run" and final["run_dir"] == str(out)
    assert final["summary"] == json.loads((out / "run.json").read_text())
    # a user error in JSON mode is a JSON line too (and the exit code 2)
    result = runner.invoke(app, ["run", str(TINY), f"output_dir={out}", "train.max_steps=4", "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["event"] == "error" and "--resume" in error["text"]


def test_quiet_prints_only_the_result_line(tmp_path):
    result = runner.invoke(app, ["run", str(TINY), f"output_dir={tmp_path / 'r'}", "train.max_steps=3", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo: 3 steps") and str(tmp_path / "r") in lines[0]
    result = runner.invoke(app, ["sample", str(ROOT / "recipes" / "best_of_n_tiny.yaml"), f"output_dir={tmp_path / 's'}",
                                 "sampling.max_new_tokens=4", "--quiet"])
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "16 samples of 16 prompts" in result.output
    refused(runner.invoke(app, ["run", str(TINY), "-q", "--json"]), "--quiet and --json")


def test_json_sample_reports_progress_and_its_summary(tmp_path):
    result = runner.invoke(app, ["sample", str(ROOT / "recipes" / "best_of_n_tiny.yaml"), f"output_dir={tmp_path}",
                                 "sampling.max_new_tokens=4", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0] == {**events[0], "event": "start", "task": "sample"}
    assert any(e["event"] == "progress" for e in events)
    assert events[-1]["command"] == "sample" and events[-1] == {
        "event": "result", "time": events[-1]["time"], "command": "sample",
        **json.loads((tmp_path / "samples.summary.json").read_text())}
