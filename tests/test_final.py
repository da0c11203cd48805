"""What a run leaves for others: final/ in the chosen dtype with a model card, LoRA adapters that name
a base model that resolves elsewhere, and any checkpoint exported as a Hugging Face folder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prefkit.loops as engine
from prefkit.api.errors import PrefkitError
from prefkit.loops.export import export_checkpoint
from prefkit.plugins import load_registry
from prefkit.recipe import load_recipe

REGISTRY = load_registry()
ROOT = Path(__file__).resolve().parent.parent
DPO = ROOT / "recipes" / "dpo_tiny.yaml"
PPO = ROOT / "recipes" / "ppo_kl_tiny.yaml"
SHORT = ["data.eval=null", "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2"]


def train(out, *overrides, recipe=DPO):
    loaded = load_recipe(recipe, [f"output_dir={out}", *overrides], registry=REGISTRY)
    return engine.train(loaded, registry=REGISTRY)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("final") / "dpo"
    train(out, *SHORT)
    return out


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_final_is_fp32_by_default_with_a_model_card(dpo_run):
    assert all(t.dtype == torch.float32 for t in weights(dpo_run / "final").values())
    card = (dpo_run / "final" / "README.md").read_text()
    assert "base_model: tiny-llama" in card and "`dpo`" in card and "for 4 steps" in card
    summary = json.loads((dpo_run / "run.json").read_text())
    assert summary["data"]["train_fingerprint"] in card
    assert f"| loss | {summary['final_metrics']['loss']:.6g} |" in card
    assert "```yaml" in card and "objective:" in card


def test_final_dtype_is_selectable(tmp_path):
    train(tmp_path / "bf16", *SHORT, "train.final_dtype=bf16")
    saved = weights(tmp_path / "bf16" / "final")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final")
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size


def test_a_lora_adapter_names_a_base_that_resolves_elsewhere(tmp_path):
    train(tmp_path / "lora", *SHORT, "model.lora={r: 4, alpha: 8}")
    config = json.loads((tmp_path / "lora" / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"  # the recipe's source, not a cache path
    assert REGISTRY.model_sources["smollm2-135m-instruct"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_writes_any_checkpoint_as_a_loadable_folder(dpo_run):
    last = export_checkpoint(dpo_run, registry=REGISTRY)
    assert last == dpo_run / "export" / "step-4"
    exported, final = weights(last), weights(dpo_run / "final")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    earlier = export_checkpoint(dpo_run, step=2, out_dir=dpo_run / "step2", registry=REGISTRY)
    model = AutoModelForCausalLM.from_pretrained(earlier)
    assert any(not torch.equal(weights(earlier)[k], final[k]) for k in final)  # two steps less trained
    assert model.config.vocab_size > 0 and "step 2" in (earlier / "README.md").read_text()


def test_export_refuses_a_missing_step_a_damaged_checkpoint_and_an_existing_folder(dpo_run, tmp_path):
    with pytest.raises(PrefkitError, match=r"--step 3: .* no checkpoint of that step \(it has: 2, 4\)"):
        export_checkpoint(dpo_run, step=3, registry=REGISTRY)
    with pytest.raises(PrefkitError, match="already exists"):
        export_checkpoint(dpo_run, step=4, out_dir=dpo_run / "final", registry=REGISTRY)
    damaged = tmp_path / "copy"
    import shutil

    shutil.copytree(dpo_run, damaged)
    target = damaged / "checkpoints" / "step-2" / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(PrefkitError, match="damaged"):
        export_checkpoint(damaged, step=2, registry=REGISTRY)
    # an --output that cannot be a folder is refused before the checkpoint loads (it was a traceback)
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(PrefkitError, match=r"^--output '.*afile/x': .*afile is a file, so no folder can be made "
                                           r"inside it \(nothing was changed\)$"):
        export_checkpoint(dpo_run, step=4, out_dir=tmp_path / "afile" / "x", registry=REGISTRY)
    assert (tmp_path / "afile").read_text() == "keep"
    with pytest.raises(PrefkitError, match="inside the run's checkpoints/ folder"):
        export_checkpoint(dpo_run, step=4, out_dir=dpo_run / "checkpoints" / "step-99", registry=REGISTRY)
    assert not (dpo_run / "checkpoints" / "step-99").exists()


def test_export_of_an_online_run_keeps_its_modules(tmp_path):
    train(tmp_path / "ppo", "train.max_steps=2", "train.save_every=1", recipe=PPO)
    out = export_checkpoint(tmp_path / "ppo", step=1, registry=REGISTRY)
    assert (out / "value_head.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_export_through_the_cli(dpo_run, tmp_path):
    from typer.testing import CliRunner

    from prefkit.cli import app

    result = CliRunner().invoke(app, ["export", str(dpo_run), "--step", "2", "--output", str(tmp_path / "e"),
                                      "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "e").values())
    result = CliRunner().invoke(app, ["export", str(dpo_run), "--step", "7"])
    assert result.exit_code == 2 and "it has: 2, 4" in result.output and "Traceback" not in result.output
