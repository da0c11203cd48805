"""The hub is probed once before its first use: unreachable, the process goes offline at once
(cached hub models load, missing ones fail with the reason) instead of retrying for a minute.

The tests point HF_ENDPOINT at a local port that nothing listens on (connection refused at once),
so they do not depend on this machine's network."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import prefkit.hub as hub

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def fresh_hub(monkeypatch):
    """prefkit.hub undecided, the hub client online, no offline variables: restored afterwards."""
    monkeypatch.setattr(hub, "_decided", False)
    monkeypatch.setattr(hub, "_unreachable", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "PREFKIT_HUB_UNREACHABLE",
                 "PREFKIT_HUB_PROBE", *hub._PROXY_VARIABLES):
        monkeypatch.setenv(name, "")  # recorded, so the teardown restores what was there
        monkeypatch.delenv(name)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    return monkeypatch


def test_probe_names_what_failed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.probe(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    assert "refused" in hub.probe(f"http://127.0.0.1:{closed_port()}").lower()
    assert hub.probe("https://no-such-host.invalid") == "the name no-such-host.invalid does not resolve"
    assert "names no host" in hub.probe("not a url")


def test_an_unreachable_hub_switches_every_client_offline_once(fresh_hub):
    import datasets.config

    fresh_hub.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    hub.prepare_hub()
    assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # for the processes this one starts
    reason = hub.offline_reason()
    assert reason.startswith(f"the hub at {constants.ENDPOINT} cannot be reached from this machine (")
    assert os.environ["PREFKIT_HUB_UNREACHABLE"] == reason

    fresh_hub.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed twice"))
    hub.prepare_hub()


def test_a_reachable_hub_stays_online(fresh_hub):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        fresh_hub.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        hub.prepare_hub()
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    assert hub.offline_reason() is None


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "all_proxy"])
def test_no_probe_through_a_proxy(fresh_hub, variable):
    fresh_hub.setenv(variable, "http://proxy.example:3128")
    fresh_hub.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed past a proxy"))
    hub.prepare_hub()
    assert constants.HF_HUB_OFFLINE is False and hub.offline_reason() is None


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_no_probe_when_the_user_chose_offline(fresh_hub, variable):
    fresh_hub.setenv(variable, "1")
    fresh_hub.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed although offline was chosen"))
    hub.prepare_hub()
    assert hub.offline_reason() == f"{variable} is set"


def test_no_probe_when_turned_off(fresh_hub):
    fresh_hub.setenv("PREFKIT_HUB_PROBE", "0")
    fresh_hub.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed although PREFKIT_HUB_PROBE=0"))
    hub.prepare_hub()
    assert constants.HF_HUB_OFFLINE is False and hub.offline_reason() is None


def test_only_a_fetch_failure_is_blamed_on_the_hub():
    assert hub.is_unreachable_error(ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)"))
    assert hub.is_unreachable_error(OSError("We couldn't connect to 'https://huggingface.co' to load the files, and "
                                            "couldn't find them in the cached files."))
    assert not hub.is_unreachable_error(ValueError("Unknown split \"validation\". Should be one of ['train']."))


# ----------------------------------------------------------------------------- through the CLI


def run_offline(tmp_path, *overrides):
    """`prefkit run` of the tiny DPO recipe with the hub unreachable and its own Hugging Face cache."""
    cleared = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFKIT_HUB_UNREACHABLE",
               "PREFKIT_HUB_PROBE", *hub._PROXY_VARIABLES)  # CI sets TRANSFORMERS_OFFLINE
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), COLUMNS="10000")
    done = subprocess.run(
        [sys.executable, "-m", "prefkit", "run", str(ROOT / "recipes/dpo_tiny.yaml"), f"output_dir={tmp_path / 'run'}",
         "train.max_steps=2", *overrides],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    return done.returncode, done.stdout + done.stderr


def test_a_hub_model_that_is_not_cached_fails_at_once_saying_the_hub_cannot_be_reached(tmp_path):
    code, out = run_offline(tmp_path, "model.source=someorg/not-cached")
    assert code == 2, out
    assert "Traceback" not in out and "Retry" not in out
    assert "cannot load the tokenizer from 'someorg/not-cached'" in out
    assert "cannot be reached from this machine (connection refused)" in out.lower().replace("[errno 111] ", "")
    assert "it is not in the Hugging Face cache" in out


def test_a_hub_dataset_that_is_not_cached_fails_at_once_saying_the_hub_cannot_be_reached(tmp_path):
    code, out = run_offline(tmp_path, "data.train=someorg/no-data")
    assert code == 2, out
    assert "Traceback" not in out
    assert "someorg/no-data (train)" in out and "cannot be reached from this machine" in out
    assert "it is not in the Hugging Face cache" in out


def test_a_cached_hub_model_trains_with_the_hub_unreachable(tmp_path):
    """A model in the Hugging Face cache, laid out as the hub client writes it, loads offline."""
    from prefkit.testing import build_model, build_tokenizer

    snapshot = tmp_path / "hf" / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)

    code, out = run_offline(tmp_path, "model.source=someorg/tiny", "model.options={}")
    assert code == 0, out
    assert (tmp_path / "run" / "final").is_dir(), out
