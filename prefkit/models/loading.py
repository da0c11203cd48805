"""Models: named sources, loading (fp32, optional LoRA), fingerprints and saving.

``model.source`` in a recipe is resolved in this order:

1. a **named source** registered through the ``register_models`` hook (``smollm2-135m-instruct``,
   ``tiny-llama``, ...): :meth:`ModelSource.materialize` builds a Hugging Face folder once, in
   the cache, and later runs reuse it;
2. an existing **local directory**;
3. otherwise a **hub id** (``org/name``), handed to ``from_pretrained`` as is.

:func:`load_model` returns a :class:`LoadedModel`: the trainable model (a ``PeftModel`` when LoRA
is on), its tokenizer, and content fingerprints of the base weights and the tokenizer that the
engine uses to key its reference log-prob cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from prefkit.api import PrefkitError
from prefkit.inputs import is_dir, is_file
from prefkit.manifest import verify_manifest, write_manifest
from prefkit.models.allocator import tune_cpu_allocator
from prefkit.models.packing import unwrap
from prefkit.recipe import LoraConfig, ModelConfig

log = logging.getLogger("prefkit")

Head = Literal["lm", "scalar"]


# --------------------------------------------------------------------------- named sources


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success rename it to ``final``.

    On an error the temporary directory is removed and ``final`` is untouched. If another
    process created ``final`` meanwhile, its folder is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_verified: dict[Path, tuple] = {}  # folders whose manifest this process checked, with their files' state then


def _files_state(folder: Path) -> tuple:
    """Every file's path, size, modification time and inode: what changes when a file is touched."""
    return tuple((path.as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ino)
                 for path in sorted(folder.rglob("*")) if path.is_file() for stat in [path.stat()])


def materialize_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final`` if it exists and is intact; otherwise ``build(tmp_dir)``, write its
    manifest, and rename it into place. A cached folder that fails its manifest (a flipped byte,
    a truncated file, a folder from before manifests) is moved aside and built again. A folder
    this process already verified is not hashed again while none of its files has changed."""
    final = Path(final)
    if final.is_dir():
        key = final.resolve()
        state = _files_state(final)
        if _verified.get(key) == state:
            return final
        problem = verify_manifest(final)
        if problem is None:
            _verified[key] = state
            return final
        log.warning("cached model %s is damaged (%s); building it again", final, problem)
        aside = final.with_name(f".{final.name}.damaged-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    with atomic_directory(final) as tmp:
        build(tmp)
        write_manifest(tmp)
    return final


def params_hash(params: BaseModel, salt: str = "") -> str:
    """A short stable hash of a params model, for cache folder names."""
    text = salt + json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def clear_quantization_marks(model: torch.nn.Module) -> torch.nn.Module:
    """Make a model loaded from a GGUF file (already de-quantized to fp32 by transformers) a
    plain model again, so it can be trained and saved: drop ``config.quantization_config``,
    ``hf_quantizer``, ``quantization_method`` and the ``is_quantized`` flags."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            if hasattr(config, "quantization_config"):
                with contextlib.suppress(AttributeError):
                    del config.quantization_config
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    return model


# --------------------------------------------------------------------------- fingerprints


# Config keys that name where a model came from, not what it computes.
_CONFIG_PROVENANCE = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"}


def config_fingerprint_text(model: torch.nn.Module) -> str:
    """The model's whole config (every value that can change its outputs, e.g. ``rms_norm_eps``,
    rope scaling, the attention implementation) as canonical JSON, provenance keys left out."""
    config = getattr(model, "config", None)
    if config is None:
        return "{}"
    values = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_PROVENANCE}
    values["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(values, sort_keys=True, default=str)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of what a model computes: its whole config (:func:`config_fingerprint_text`) and
    its state dict (every tensor's name, dtype, shape and bytes).

    Identical weights and config give an identical fingerprint, whatever the folder they came from.
    """
    digest = hashlib.sha256()
    digest.update(config_fingerprint_text(model).encode())
    digest.update(b"\0")
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex of what changes token ids: vocabulary, merges, normalisation, special and
    added tokens, post-processing, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec: Any = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime state that calls to the tokenizer change
        spec.pop("padding", None)
    else:  # a tokenizer without a `tokenizers` backend: hash its saved files
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            spec = {
                path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(Path(tmp).iterdir())
                if path.is_file()
            }
    payload = {
        "tokenizer": spec,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- resolving


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_model_dir(cfg: ModelConfig, options: Any, cache_dir: Path, registry: Any) -> str:
    """Where to load ``cfg.source`` from: a named source's materialized folder, a local
    directory, or a hub id (returned as is). Raises PrefkitError for a path that cannot be one."""
    from prefkit.plugins import PluginError, plugin_errors, plugin_label

    source = registry.model_sources.get(cfg.source)
    if source is not None:
        if options is None:
            try:
                options = source.Params.model_validate(cfg.options)
            except ValidationError as exc:
                raise PrefkitError(f"model.options for {cfg.source!r}: {_first_line(exc)}") from None
        try:
            with plugin_errors(registry, "model_sources", cfg.source, "building the model (materialize)"):
                folder = source.materialize(options, Path(cache_dir))
        except PluginError:
            _check_cache_for(cfg.source, cache_dir)  # an unwritable cache is the user's to fix, not the plugin's
            raise
        if not isinstance(folder, (str, os.PathLike)) or not Path(folder).is_dir():
            raise PluginError(f"{plugin_label(registry, 'model_sources', cfg.source)}: materialize returned "
                              f"{folder!r}, not an existing folder; report it to the plugin's authors")
        if not (Path(folder) / "config.json").is_file():
            raise PluginError(f"{plugin_label(registry, 'model_sources', cfg.source)}: materialize returned "
                              f"{str(folder)!r}, which is not a Hugging Face model folder (no config.json); "
                              "report it to the plugin's authors")
        return str(folder)

    problem = source_path_problem(cfg.source, registry)
    if problem:
        raise PrefkitError(f"model.source {problem}")
    return str(Path(cfg.source).expanduser()) if is_dir(cfg.source) else cfg.source


def source_path_problem(source: str, registry: Any) -> str | None:
    """Why ``model.source`` (not a named source) can be neither a local model folder nor a hub id,
    found without loading anything or asking the hub (the message opens with the quoted source);
    None when it may be either."""
    if is_dir(source):
        return None
    if is_file(source):
        path = Path(source).expanduser()
        hint = ""
        if path.suffix == ".gguf":
            hint = f"; for a GGUF file set model.source: {str(path.parent)!r} and model.gguf_file: {path.name!r}"
        return f"{source!r} is a file, not a model directory{hint}"
    if not _is_hub_id(source):
        known = ", ".join(sorted(registry.model_sources)) or "none"
        return (f"{source!r}: no such directory, and it is neither a named model source (known: {known}) nor a hub id "
                "(org/name); fix the path or pick a named source")
    meant = _closest_source(source, registry)
    if meant is not None:
        return (f"{source!r} is not a named model source, a local folder or a hub id (org/name); "
                f"did you mean {meant!r}? (`prefkit models` lists them)")
    return None


def _check_cache_for(source: str, cache_dir: Path) -> None:
    """Refuse, naming the cache folder, a cache that a named model source cannot build in."""
    from prefkit.inputs import InputError, check_writable_dir

    try:
        check_writable_dir(cache_dir, "the cache folder")
    except InputError as exc:
        raise PrefkitError(f"model source {source!r} is built in the cache folder, which cannot be used: {exc} "
                           "($PREFKIT_CACHE, or the recipe's cache_dir)") from None


def _closest_source(source: str, registry: Any) -> str | None:
    """A bare name close to a named source's is a typo: refuse it at once rather than try the hub."""
    from prefkit.inputs import closest

    if "/" in source or source.startswith((".", "~")):
        return None
    return closest(source, registry.model_sources, cutoff=0.75)


def _is_local(model_dir: str) -> bool:
    return is_dir(model_dir)


@contextlib.contextmanager
def _user_errors(what: str, source: str) -> Iterator[None]:
    """Turn transformers' errors for a missing or unreachable model into one clear PrefkitError.
    A hub id is loaded only after :func:`prefkit.hub.prepare_hub` has checked the hub can be reached."""
    from prefkit.hub import is_unreachable_error, offline_reason, prepare_hub

    if not _is_local(source):
        prepare_hub()
    try:
        yield
    except OSError as exc:
        if _is_local(source):
            raise PrefkitError(f"cannot load the {what} from the directory {source!r}: {_first_line(exc)}") from exc
        first = Path(source).parts[0] if source else ""
        local = f"; {first!r} is a folder here: if a local path was meant, it does not exist" if is_dir(first) else ""
        offline = offline_reason() if is_unreachable_error(exc) else None
        why = (f"{offline}, and it is not in the Hugging Face cache" if offline else
               f"{_first_line(exc)} (a hub id needs network access or a copy in the Hugging Face cache)")
        raise PrefkitError(
            f"cannot load the {what} from {source!r}: it is not a local directory or a named model source "
            f"(`prefkit models` lists those), and as a hub id: {why}{local}"
        ) from exc
    except PrefkitError:
        raise
    except Exception as exc:
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
            raise PrefkitError(
                f"the {what} at {source!r} needs its own Python code to load; read that code, then set "
                "model.trust_remote_code: true if you trust it"
            ) from exc
        if not _is_local(source) or isinstance(exc, MemoryError):
            raise
        # A local folder that transformers cannot read: damaged or truncated weights, a config.json
        # naming an unknown architecture, weights that do not fit the config.
        hint = ("a package it needs is missing" if isinstance(exc, ImportError)
                else "its files may be damaged, incomplete or from another model")
        raise PrefkitError(
            f"cannot load the {what} from the directory {source!r}: {type(exc).__name__}: {_load_reason(exc)}; "
            f"{hint} (nothing was changed)"
        ) from exc


def _load_reason(exc: BaseException) -> str:
    """The line of a loading error that says what is wrong (a state dict's size mismatch may sit
    below a generic first line)."""
    if "ignore_mismatched_sizes" in str(exc):  # transformers logs the shapes and raises this line
        return "the weights' shapes do not match its config.json (vocab_size, hidden_size, ...)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line:
            return line[:300]
    return lines[0][:300] if lines else "no message"


def _check_gguf(model_dir: str, gguf_file: str | None) -> None:
    if gguf_file and _is_local(model_dir) and not (Path(model_dir).expanduser() / gguf_file).is_file():
        found = sorted(p.name for p in Path(model_dir).expanduser().glob("*.gguf"))
        listing = ", ".join(found) if found else "none"
        raise PrefkitError(
            f"model.gguf_file {gguf_file!r} not found in {model_dir!r} (GGUF files there: {listing})"
        )


def _refuse_a_classifier(folder: str) -> None:
    problem = classifier_problem(folder)
    if problem:
        raise PrefkitError(problem)


def classifier_architecture(folder: str | Path) -> str | None:
    """The architecture of a local folder whose config.json names only sequence classifiers (a
    reward model), else None."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    if architectures and all(str(a).endswith("ForSequenceClassification") for a in architectures):
        return str(architectures[0])
    return None


def classifier_problem(folder: str) -> str | None:
    """A local sequence classifier (a reward model) where a causal LM is needed: its LM head would be
    random, and every log-prob made up."""
    architecture = classifier_architecture(folder)
    if architecture is None:
        return None
    return (f"{folder!r} is a reward model (a sequence classifier: {architecture}), not a language model: it "
            "has no LM head to give log-probs or sample with; give a causal LM")


def model_folder_problem(folder: str) -> str | None:
    """Why a local folder is not a Hugging Face model folder (no config.json), saying what it is
    when prefkit wrote it (a checkpoint, a run, a compare); None when it has a config.json."""
    path = Path(folder).expanduser()
    if (path / "config.json").is_file():
        return None
    if (path / "trainable.safetensors").is_file():
        hint = "it is a training checkpoint: write it as a model folder with `prefkit export RUN --step N` first"
    elif (path / "recipe.resolved.yaml").is_file():
        hint = (f"it is a run folder: its trained model is {str(path / 'final')!r}" if (path / "final").is_dir() else
                "it is a run folder that has not finished: write a checkpoint as a model folder with `prefkit export` "
                "first")
    elif (path / "compare.resolved.yaml").is_file():
        hint = "it is a compare folder: each arm's trained model is in arms/NAME/seed-N/final"
    else:
        hint = "give a folder with config.json and weights, or set model.gguf_file for a GGUF file inside it"
    return f"{folder!r} is not a Hugging Face model folder (no config.json); {hint}"


def _check_local_folder(folder: str, what: Literal["model", "tokenizer"]) -> None:
    """A clear error for a local folder that lacks the files ``from_pretrained`` needs."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return
    problem = model_folder_problem(folder) if what == "model" else None
    if problem:
        raise PrefkitError(problem)
    patterns = ("tokenizer*", "vocab*", "merges*", "*.model", "special_tokens_map.json")
    if what == "tokenizer" and not any(any(path.glob(pattern)) for pattern in patterns):
        raise PrefkitError(
            f"{folder!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab...); "
            "set model.tokenizer to a folder or hub id that has them"
        )


def load_tokenizer(cfg: ModelConfig, model_dir: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer from ``cfg.tokenizer`` if set, else from ``model_dir`` (and its GGUF file),
    with a pad token (eos if it has none) and right padding."""
    if cfg.tokenizer:
        source = cfg.tokenizer
        if not _is_local(source) and not _is_hub_id(source):
            raise PrefkitError(f"model.tokenizer {source!r}: no such directory, and not a hub id (org/name)")
        _check_local_folder(source, "tokenizer")
        kwargs: dict[str, Any] = {}
    else:
        source = model_dir
        _check_gguf(model_dir, gguf_file)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if not gguf_file:
            _check_local_folder(model_dir, "tokenizer")
        if cfg.revision and not _is_local(model_dir):
            kwargs["revision"] = cfg.revision
    if _is_local(source):
        source = str(Path(source).expanduser())
    with _user_errors("tokenizer", source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefkitError(
                f"the tokenizer from {source!r} has neither a pad nor an eos token; "
                "set model.tokenizer to one that has"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the trainable model (a PeftModel when LoRA is on), fp32, train mode
    tokenizer: PreTrainedTokenizerBase  # pad token set, padding_side="right"
    path: str  # the directory or hub id it was loaded from
    weights_fingerprint: str  # of the base weights, computed before LoRA wrapping
    tokenizer_fingerprint: str
    is_lora: bool

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``self.model`` computes the reference policy: with LoRA the adapter
        is disabled; without LoRA a no-op (the engine then uses the model before its first
        update, or its own frozen copy)."""
        if self.is_lora:
            return self.model.disable_adapter()
        return contextlib.nullcontext()


# Module attributes that hold a dropout probability used functionally (e.g. Llama's attention).
_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout_p", "dropout_rate")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability inside ``model`` to 0: ``nn.Dropout`` modules and the float
    attributes attention layers read at run time. The saved config keeps its values."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr in _DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute activations layer by layer in the backward pass (``train.gradient_checkpointing``);
    the non-reentrant form, which works with LoRA and frozen inputs."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise PrefkitError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it; set it to false")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable({"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _wrap_lora(model: torch.nn.Module, lora: LoraConfig, head: Head) -> tuple[torch.nn.Module | None, str | None]:
    """``model`` wrapped in peft LoRA adapters, or None and peft's reason for refusing the config."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=TaskType.SEQ_CLS if head == "scalar" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config), None
    except ValueError as exc:
        return None, _first_line(exc)


def apply_lora(model: torch.nn.Module, lora: LoraConfig, head: Head = "lm") -> torch.nn.Module:
    """Wrap ``model`` in peft LoRA adapters; only adapter weights (and a scalar head) train."""
    wrapped, reason = _wrap_lora(model, lora, head)
    if reason is not None:
        raise PrefkitError(f"model.lora.target_modules {lora.target_modules!r}: {reason}")
    return wrapped


def lora_target_problem(folder: str, lora: LoraConfig, head: Head = "lm") -> str | None:
    """Why :func:`apply_lora` would refuse ``lora.target_modules`` for the model whose
    ``config.json`` is in ``folder``, found on a skeleton of it built on the meta device (no weights,
    no memory; a fraction of a second); None when nothing is wrong or the skeleton cannot be built
    (loading reports that itself)."""
    if lora.target_modules == "all-linear":
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(folder).expanduser()))
        if head == "scalar":
            config.num_labels = 1
        with torch.device("meta"):
            family = AutoModelForSequenceClassification if head == "scalar" else AutoModelForCausalLM
            skeleton = family.from_config(config)
    except Exception:  # an unknown architecture, a damaged config: the run's loading names it
        return None
    with torch.device("meta"):
        return _wrap_lora(skeleton, lora, head)[1]


def load_model(
    cfg: ModelConfig,
    options: Any,
    cache_dir: Path,
    *,
    head: Head = "lm",
    registry: Any,
) -> LoadedModel:
    """Resolve ``cfg.source``, load tokenizer and fp32 weights (causal LM, or a one-label
    sequence classifier on the same backbone for ``head="scalar"``), fingerprint the base
    weights, then add LoRA adapters if ``cfg.lora`` is set. The CPU allocator is set up first
    (:mod:`prefkit.models.allocator`; once per process)."""
    tune_cpu_allocator()
    model_dir = resolve_model_dir(cfg, options, cache_dir, registry)
    gguf_file = cfg.gguf_file
    _check_gguf(model_dir, gguf_file)
    if not gguf_file:
        _check_local_folder(model_dir, "model")
        if head == "lm":
            _refuse_a_classifier(model_dir)
    tokenizer = load_tokenizer(cfg, model_dir, gguf_file=gguf_file)

    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if cfg.revision and not _is_local(model_dir):
        kwargs["revision"] = cfg.revision
    if head == "scalar":
        loader: Any = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    elif head == "lm":
        loader = AutoModelForCausalLM
    else:
        raise ValueError(f"head must be 'lm' or 'scalar', not {head!r}")
    with _user_errors("model", model_dir):
        model = loader.from_pretrained(model_dir, **kwargs)

    clear_quantization_marks(model)
    model.to(torch.float32)
    if not cfg.dropout:
        disable_dropout(model)
    # The scalar head reads the reward at the last non-pad token, so it must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.train()

    fingerprint = weights_fingerprint(model)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, head)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=model_dir,
        weights_fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        is_lora=cfg.lora is not None,
    )


# --------------------------------------------------------------------------- saving


def _move_into(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir`` (atomic); if ``out_dir`` exists, replace its entries."""
    try:
        os.rename(staging, out_dir)
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    for entry in sorted(staging.iterdir()):
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.rename(entry, target)
    staging.rmdir()


def save_pretrained(
    loaded_or_model: LoadedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    base_name: str | None = None,
) -> None:
    """Save a final model in Hugging Face format (safetensors) with its tokenizer, its weights
    in ``dtype`` (the model in memory is not changed).

    With LoRA the adapter is merged into a copy, so ``out_dir`` holds a plain model that loads
    with ``AutoModelForCausalLM.from_pretrained``; the adapter alone goes to ``out_dir/adapter``,
    naming ``base_name`` (a hub id or source name that resolves on another machine) as its base.
    Everything is written to a temporary folder first, then moved into place.
    """
    from peft import PeftModel

    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if isinstance(model, PeftModel):
            model.save_pretrained(str(staging / "adapter"), safe_serialization=True)
            if base_name:
                adapter_config = staging / "adapter" / "adapter_config.json"
                config = json.loads(adapter_config.read_text())
                config["base_model_name_or_path"] = base_name
                adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))
            merged = copy.deepcopy(model).merge_and_unload()
        else:
            merged = model
        if dtype != torch.float32:
            merged = copy.deepcopy(merged).to(dtype)
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _move_into(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
