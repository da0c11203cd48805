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
    assert "user\nhello" in sent[1][2] and "chat template" in result.output


def test_chat_reset_and_exit(sent):
    result = cli("chat", "tiny-llama", "--max-new-tokens", "4", "--system", "S.",
                 input="hello\n/reset\nhi\n/help\n/bogus\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output
    assert [text for text, _, _ in sent] == ["hello", "hi"]
    assert "hello" not in sent[1][2] and sent[1][2].startswith("<|im_start|>system\nS.")
    assert "forgotten" in result.output and "unknown command /bogus" in result.output


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
    assert f"chatting with {out / 'final'}" in result.output
    result = cli("chat", out, "--step", "2", "--max-new-tokens", "4", input="hi\n")
    assert result.exit_code == 0, result.output
    assert "checkpoint step-2" in result.output
    # without final/ the newest checkpoint is used
    import shutil

    shutil.rmtree(out / "final")
    result = cli("chat", out, "--max-new-tokens", "4", input="hi\n")
    assert result.exit_code == 0 and "checkpoint step-4" in result.output, result.output
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
