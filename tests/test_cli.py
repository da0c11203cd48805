"""The command line through typer's test runner: exit codes and messages, never a traceback."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

import prefkit
from prefkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "dpo_tiny.yaml")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"prefkit {prefkit.__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ["run", "validate", "objectives"]:
        assert command in result.output


def test_validate_accepts_a_good_recipe():
    result = invoke("validate", TINY)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_validate_names_file_and_unknown_key(tmp_path):
    data = yaml.safe_load(Path(TINY).read_text())
    data["bogus_key"] = 1
    data["objective"]["params"]["beta"] = "high"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert str(path) in result.output and "bogus_key" in result.output and "unknown key" in result.output
    assert "Traceback" not in result.output
    # the objective's own params are checked too (after fixing the unknown key)
    del data["bogus_key"]
    path.write_text(yaml.safe_dump(data))
    result = invoke("validate", str(path))
    assert result.exit_code == 2 and "objective.params.beta" in result.output


def test_validate_with_overrides():
    assert invoke("validate", TINY, "train.lr=1e-4").exit_code == 0
    result = invoke("validate", TINY, "train.bogus=1")
    assert result.exit_code == 2 and "train.bogus" in result.output


def test_objectives_lists_dpo_with_its_plugin():
    result = invoke("objectives")
    assert result.exit_code == 0
    assert "dpo" in result.output and "prefkit" in result.output


def test_run_and_resume_through_the_cli(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", TINY, f"output_dir={out}", "train.max_steps=4", "data.eval=null", "train.save_every=2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["steps"] == 4
    # a second run into the same directory is refused, with the way out named
    result = invoke("run", TINY, f"output_dir={out}", "train.max_steps=4", "data.eval=null", "train.save_every=2")
    assert result.exit_code == 2 and "--resume" in result.output and "Traceback" not in result.output
    result = invoke("run", TINY, f"output_dir={out}", "train.max_steps=6", "data.eval=null", "train.save_every=2",
                    "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["steps"] == 6


def test_run_with_bad_data_fails_before_loading_a_model(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "", "rejected": "no"}) + "\n")
    result = invoke("run", TINY, f"output_dir={tmp_path / 'r'}", f"data.train={data}", "data.eval=null")
    assert result.exit_code == 2
    assert str(data) in result.output and "row 1" in result.output and "chosen" in result.output
    assert not (tmp_path / "r").exists()


def test_validate_recognises_a_compare_recipe():
    result = invoke("validate", str(ROOT / "recipes" / "compare_tiny.yaml"))
    assert result.exit_code == 0, result.output
    assert "a valid compare recipe" in result.output and "prefkit compare" in result.output and "dpo-b0.1" in result.output


def test_objectives_name_shows_the_parameter_table():
    result = invoke("objectives", "dpo")
    assert result.exit_code == 0, result.output
    for text in ("beta", "0.1", "loss_type", "label_smoothing", "offline"):
        assert text in result.output, text
    result = invoke("objectives", "dpp")
    assert result.exit_code == 2 and "did you mean 'dpo'" in result.output


def test_one_terminal_style_library_bars_and_warnings_are_silenced(tmp_path):
    """rich is the only output: no transformers/hub tqdm bars ("Loading weights", "Writing model shards")
    and no FutureWarnings, unless PREFKIT_LIBRARY_OUTPUT=1 asks for them."""
    import os
    import subprocess
    import sys

    def run(out, **env):
        return subprocess.run([sys.executable, "-m", "prefkit", "run", TINY, f"output_dir={out}", "train.max_steps=2",
                               "data.eval=null", f"cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True,
                              timeout=300, env={**clean, **env})

    # other tests' in-process CLI calls may have set the hub's switch in this process: start clean
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                                "TRANSFORMERS_NO_ADVISORY_WARNINGS")}

    quiet = run(tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    both = quiet.stdout + quiet.stderr
    for noise in ("Loading weights", "Writing model shards", "it/s]", "FutureWarning", "Warning:"):
        assert noise not in both, noise
    assert "train" in both and "run directory" in both
    loud = run(tmp_path / "loud", PREFKIT_LIBRARY_OUTPUT="1")
    assert loud.returncode == 0 and "Loading weights" in loud.stdout + loud.stderr  # the test can fail


def test_eval_results_show_during_a_run_and_the_summary_shows_throughput_once(tmp_path):
    result = invoke("run", TINY, f"output_dir={tmp_path / 'r'}", "train.max_steps=4", "train.eval_every=2")
    assert result.exit_code == 0, result.output
    assert "eval at step 2: loss" in result.output and "eval at step 4: loss" in result.output
    assert result.output.count("tokens/s") == 1 and "tokens_per_s" not in result.output


def test_a_usage_error_is_readable_in_a_terminal_one_column_wide(tmp_path):
    """At COLUMNS=1 the usage error's box held its borders and none of its words."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "prefkit", "export", str(tmp_path), "--step", "abc"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "1"})
    assert done.returncode == 2
    text = " ".join(part.strip("│ ") for part in (done.stdout + done.stderr).split())
    assert "Invalid value for '--step'" in " ".join(text.split()), done.stderr
