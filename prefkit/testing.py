"""``prefkit.testing``: a pytest plugin for people who write objectives (and for prefkit itself).

Installed with prefkit and loaded by pytest automatically (the ``pytest11`` entry point), so in
any test you can use the fixtures

- ``tiny_tokenizer``: a byte-level tokenizer with a ChatML chat template (260 tokens);
- ``tiny_model``: a random-initialised 2-layer Llama (hidden size 64) for that tokenizer;
- ``tiny_reward_model``: the same backbone with a scalar head (``Needs(head="scalar")``);
- ``tiny_pair_batch`` / ``tiny_sft_batch``: a :class:`prefkit.data.batching.Batch` of three short
  preference pairs / prompt-completion examples, tokenized through the chat template exactly as
  the engine does it;
- ``install_plugin``: writes a throwaway installed distribution (``*.dist-info`` with entry
  points) on ``sys.path``, to test how prefkit loads a plugin without ``pip install``;

and the functions

- :func:`check_objective`: the conformance check every objective must pass (its params survive a
  YAML round trip and refuse unknown keys, ``needs()`` returns a valid :class:`Needs`, and for an
  offline objective: the loss runs on exactly what the engine provides for those needs, is a
  finite per-example vector whose mean is a finite scalar, is a pure function of its inputs, uses
  the reference log-probs it asks for, and its gradients reach every trainable parameter);
- :func:`check_registered`: the objective is registered through its entry point, by the
  expected distribution, without problems;
- :func:`make_loss_inputs`: the engine's :class:`LossInputs` for a model and a batch (with
  reference log-probs from the initial model when the needs ask for them).

Nothing heavy is imported until a fixture or a check runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from prefkit.data.batching import Batch
    from prefkit.api import LossInputs, LossOutput, Needs, Objective

PAIR_ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five, I am quite sure of it."},
    {"prompt": "Say hello to Ana.", "chosen": "Hello, Ana! Nice to meet you.", "rejected": "No."},
    {"prompt": "What colour is the sky on a clear day?", "chosen": "Blue.", "rejected": "Green with purple dots."},
]
UNPAIRED_ROWS = [
    {"prompt": "What is two plus two?", "completion": "Four.", "label": True},
    {"prompt": "Say hello to Ana.", "completion": "No.", "label": False},
    {"prompt": "What colour is the sky on a clear day?", "completion": "Blue.", "label": True},
]
PROMPT_ROWS = [{"prompt": "What is two plus two?"}, {"prompt": "Say hello to Ana."}, {"prompt": "Name a colour."}]
SFT_ROWS = [
    {"prompt": "What is two plus two?", "completion": "Four."},
    {"prompt": "Say hello to Ana.", "completion": "Hello, Ana! Nice to meet you."},
    {"prompt": "Name a colour.", "completion": "Blue."},
]


class ConformanceError(AssertionError):
    """An objective broke the contract; the message names the objective and what to fix."""


# ----------------------------------------------------------------------------- builders


def build_tokenizer():
    """The tiny byte-level tokenizer (pad token set, right padding), as the engine would load it."""
    from prefkit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chat_template=True)
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(tokenizer, head: str = "lm", seed: int = 0):
    """A tiny Llama for ``tokenizer``: a causal LM (``head="lm"``) or a one-label sequence
    classifier on the same backbone (``head="scalar"``). fp32, train mode, same weights per seed."""
    import torch
    from transformers import LlamaForSequenceClassification

    from prefkit.models.tiny import build_tiny_model

    model = build_tiny_model(vocab_size=len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    if head == "scalar":
        config = model.config
        config.num_labels = 1
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(config).to(torch.float32)
        finally:
            torch.random.set_rng_state(state)
    elif head != "lm":
        raise ValueError(f"head must be 'lm' or 'scalar', not {head!r}")
    model.train()
    return model


def _registry():
    from prefkit.plugins import load_registry

    return load_registry()


def build_batch(tokenizer, rows: list[dict] | None = None, kind: str = "pairs", *, max_length: int = 128,
                max_prompt_length: int = 64, mismatched: bool = False, registry: Any = None) -> Batch:
    """Rows (dicts in the standard or conversational format) -> a padded :class:`Batch`, through the
    data kind's row checks (``kind``, a registered data kind), the chat template and truncation, as
    a real dataset. ``registry`` defaults to this process's plugins."""
    from prefkit.data.batching import collate
    from prefkit.data.prepare import MISMATCHED, add_mismatched, encode_examples, fit_lengths
    from prefkit.data.rows import check_rows, detect_format

    data_kind = (registry or _registry()).data_kinds[kind]
    if rows is None:
        rows = {"pairs": PAIR_ROWS, "sft": SFT_ROWS, "unpaired": UNPAIRED_ROWS, "prompts": PROMPT_ROWS}.get(kind)
        if rows is None:
            raise ValueError(f"no default rows for data kind {kind!r}; pass rows=")
    fmt = detect_format(rows, data_kind.text_fields)
    checked = check_rows(rows, data_kind, fmt)
    if checked.problems:
        raise ValueError(f"bad test rows: {checked.problems}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    encoded = encode_examples(checked.examples, tokenizer, chat, "prefkit.testing")
    examples = [fit_lengths(enc, max_length, max_prompt_length).example for enc in encoded]
    names = tuple(data_kind.completions)
    if mismatched:
        add_mismatched(examples, names[0], max_length)
        names += (MISMATCHED,)
    return collate(examples, list(range(len(examples))), tokenizer.pad_token_id, names)


def reference_logps(model, batch: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch's answers' log-probs under ``model``, without gradients (as the engine's reference
    pass): ``(sums, per_token)``, each completion name -> ``[B]`` / ``[B, T]``."""
    import torch

    from prefkit.models.logprobs import sequence_logps, token_logps

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values = token_logps(model, batch).float()
    finally:
        model.train(was_training)
    sums = sequence_logps(values, batch.completion_mask)
    return {name: sums[batch.rows_of(name)] for name in batch.names}, {name: values[batch.rows_of(name)]
                                                                       for name in batch.names}


def make_loss_inputs(model, batch: Batch, needs: Needs, reference_model=None) -> LossInputs:
    """What the engine hands an objective's loss for this batch: the policy forward
    (:func:`prefkit.loops.offline.loss_inputs`), plus reference log-probs when ``needs.reference``
    (from ``reference_model``, by default ``model`` itself before any update, as in the engine)."""
    from prefkit.loops.offline import loss_inputs

    ref = None
    if needs.reference:
        ref = reference_logps(reference_model if reference_model is not None else model, batch)
    inputs = loss_inputs(model, batch, needs)
    if ref is not None:
        inputs.ref_logps = ref[0]
        if needs.reference_tokens:
            inputs.ref_token_logps = ref[1]
    return inputs


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_tokenizer():
    """A byte-level tokenizer with a ChatML chat template (ids 0-3 special, 4-259 bytes)."""
    return build_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A random-initialised tiny Llama causal LM (hidden 64, 2 layers), fp32, train mode."""
    return build_model(tiny_tokenizer, "lm")


@pytest.fixture
def tiny_reward_model(tiny_tokenizer):
    """The tiny Llama backbone with a scalar head (``LlamaForSequenceClassification``, 1 label)."""
    return build_model(tiny_tokenizer, "scalar")


@pytest.fixture
def tiny_pair_batch(tiny_tokenizer):
    """Three preference pairs of different lengths as one Batch (3 chosen rows, then 3 rejected)."""
    return build_batch(tiny_tokenizer, kind="pairs")


@pytest.fixture
def tiny_sft_batch(tiny_tokenizer):
    """Three prompt/completion examples as one Batch."""
    return build_batch(tiny_tokenizer, kind="sft")


# ----------------------------------------------------------------------------- conformance


@dataclass
class ConformanceResult:
    """What :func:`check_objective` saw, for further assertions."""

    params: Any
    needs: Needs
    yaml: str  # the params as YAML
    output: LossOutput | None = None  # the loss output (offline objectives)
    loss: float | None = None  # the mean loss on the tiny batch
    checked: list[str] = field(default_factory=list)  # the names of the checks that ran


def _fail(objective: Any, message: str) -> None:
    name = getattr(objective, "name", type(objective).__name__)
    raise ConformanceError(f"objective {name!r}: {message}")


def _check_params(objective: Objective, params: Any, result_checks: list[str]) -> tuple[Any, str]:
    import yaml
    from pydantic import ValidationError

    cls = objective.Params
    if params is None:
        try:
            params = cls()
        except ValidationError as exc:
            _fail(objective, f"its Params cannot be built with defaults ({exc.error_count()} required); "
                             "pass params=... to check_objective")
    elif isinstance(params, dict):
        params = cls.model_validate(params)
    if not isinstance(params, cls):
        _fail(objective, f"params is a {type(params).__name__}, not its Params ({cls.__name__})")

    dumped = params.model_dump(mode="json")
    text = yaml.safe_dump(dumped, sort_keys=False)
    loaded = yaml.safe_load(text) or {}
    try:
        again = cls.model_validate(loaded)
    except ValidationError as exc:
        _fail(objective, f"its params do not load back from YAML:\n{text}\n{exc}")
    if again != params:
        _fail(objective, f"its params change in a YAML round trip: {params!r} -> {again!r}")
    result_checks.append("params_yaml_round_trip")

    try:
        cls.model_validate({**loaded, "prefkit_conformance_unknown_key": 1})
    except ValidationError:
        pass
    else:
        _fail(objective, "its Params accept an unknown key; subclass prefkit.api.objective.ObjectiveParams")
    result_checks.append("params_refuse_unknown_keys")
    return params, text


def _check_needs(objective: Objective, params: Any, result_checks: list[str]) -> Needs:
    from typing import get_args

    from prefkit.api import ModelHead, Needs

    needs = objective.needs(params)
    if not isinstance(needs, Needs):
        _fail(objective, f"needs() returned {type(needs).__name__}, not a prefkit.api.Needs")
    kinds = _registry().data_kinds
    if needs.data not in kinds:
        _fail(objective, f"Needs.data is {needs.data!r}, which no plugin registers; data kinds: {sorted(kinds)}")
    if needs.head not in get_args(ModelHead):
        _fail(objective, f"Needs.head is {needs.head!r}; expected one of {get_args(ModelHead)}")
    if objective.kind == "offline":
        extra = [flag for flag in ("reward", "generation", "hidden_states") if getattr(needs, flag)]
        if extra:
            _fail(objective, f"it is offline but declares Needs {', '.join(extra)}, which the offline engine "
                             "never builds; such objectives are kind='online'")
        if not kinds[needs.data].completions:
            _fail(objective, f"it is offline but asks for {needs.data!r} data, which has no completions to score")
        if needs.head == "scalar" and needs.reference:
            _fail(objective, "it declares a scalar head and a reference: reference log-probs need an LM head")
    result_checks.append("needs")
    return needs


def _is_finite(value: Any) -> bool:
    import math

    import torch

    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach().float()).all())
    return math.isfinite(float(value))


def check_objective(objective: Objective, params: Any = None, *, seed: int = 0) -> ConformanceResult:
    """Run the conformance checks on ``objective`` (an instance) with ``params`` (its Params, a
    dict, or None for the defaults). Raises :class:`ConformanceError` naming what is wrong.

    Every objective: the registration checks prefkit applies when loading plugins; params survive a
    YAML round trip and refuse unknown keys; ``needs()`` returns a valid :class:`Needs`.

    Offline objectives, on a tiny random Llama and three tiny examples, through the engine's own
    forward path (:func:`make_loss_inputs`), given only what the declared needs provide:

    - ``loss()`` returns a :class:`LossOutput` whose ``losses`` is a float ``[B]`` vector of finite
      values with a gradient, and whose mean is a finite scalar;
    - metrics are finite tensors (``[B]`` or scalar) or numbers, without gradients;
    - the loss is a pure function of its inputs (two calls give the same values);
    - an objective that declares ``reference`` reads the reference log-probs (its loss changes
      when they do), so no reference pass is wasted;
    - after ``backward()``, every trainable parameter has a finite gradient, and some are non-zero.
    """
    import torch

    from prefkit.api import LossOutput
    from prefkit.plugins import _check_objective

    problem = _check_objective(objective)
    if problem:
        raise ConformanceError(problem)
    checks = ["registration"]
    params, text = _check_params(objective, params, checks)
    needs = _check_needs(objective, params, checks)
    result = ConformanceResult(params=params, needs=needs, yaml=text, checked=checks)
    if objective.kind == "online":
        return _check_online(objective, params, result, seed=seed)
    if objective.kind == "inference":
        return _check_inference(objective, params, result, seed=seed)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, needs.head, seed=seed)
    batch = build_batch(tokenizer, kind=needs.data, mismatched=needs.mismatched)
    b = batch.num_examples
    inputs = make_loss_inputs(model, batch, needs)
    try:
        out = objective.loss(params, inputs)
    except Exception as exc:
        given = inputs.given()
        raise ConformanceError(
            f"objective {objective.name!r}: loss() raised {type(exc).__name__}: {exc}\n"
            f"  it declared {needs}, for which the engine provides only: {', '.join(given)}"
        ) from exc
    if not isinstance(out, LossOutput):
        _fail(objective, f"loss() returned {type(out).__name__}, not a prefkit.api.objective.LossOutput")
    losses = out.losses
    if not isinstance(losses, torch.Tensor) or losses.shape != (b,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        _fail(objective, f"LossOutput.losses must be one value per example, shape ({b},); got {shape}")
    if not losses.is_floating_point():
        _fail(objective, f"LossOutput.losses has dtype {losses.dtype}; use a float dtype (fp32)")
    if not _is_finite(losses):
        _fail(objective, f"the losses are not finite at initialisation: {losses.tolist()}")
    if not losses.requires_grad:
        _fail(objective, "the losses carry no gradient (detached, or computed from detached inputs)")
    loss = losses.mean()
    if loss.dim() != 0 or not _is_finite(loss):
        _fail(objective, f"the mean loss is not a finite scalar: {loss}")
    checks.append("loss_finite_scalar")

    if not isinstance(out.metrics, dict):
        _fail(objective, f"LossOutput.metrics is a {type(out.metrics).__name__}, not a dict")
    for name, value in out.metrics.items():
        if not isinstance(name, str):
            _fail(objective, f"metric name {name!r} is not a string")
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != b):
                _fail(objective, f"metric {name!r} has shape {tuple(value.shape)}; expected a scalar or ({b},)")
            if value.requires_grad:
                _fail(objective, f"metric {name!r} carries gradients; detach it (or compute it under no_grad)")
        elif not isinstance(value, (int, float)):
            _fail(objective, f"metric {name!r} is a {type(value).__name__}; expected a tensor or a number")
        if not _is_finite(value):
            _fail(objective, f"metric {name!r} is not finite: {value}")
    checks.append("metrics")

    with torch.no_grad():
        repeat = objective.loss(params, inputs).losses
    if not torch.equal(repeat.detach(), losses.detach()):
        _fail(objective, "loss() is not a pure function of its inputs: two calls gave different losses")
    checks.append("pure")

    if needs.reference:
        shifted = make_loss_inputs(model, batch, needs)
        generator = torch.Generator().manual_seed(seed)
        for k, name in enumerate(batch.names):  # the first completion's up, the others' down
            sign = 1.0 if k == 0 else -1.0
            shifted.ref_logps[name] = shifted.ref_logps[name] + sign * (torch.rand(b, generator=generator) + 0.5)
        with torch.no_grad():
            moved = objective.loss(params, shifted).losses
        if torch.allclose(moved, losses.detach()):
            _fail(objective, "it declares Needs(reference=True) but its loss ignores the reference log-probs; "
                             "declare reference=False to spare the reference pass")
        checks.append("reference_used")

    model.zero_grad(set_to_none=True)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        _fail(objective, f"no gradient reaches {len(missing)} of {len(trainable)} trainable parameters, "
                         f"e.g. {', '.join(missing[:3])}")
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    if bad:
        _fail(objective, f"non-finite gradients in {', '.join(bad[:3])}")
    if not any(p.grad.abs().sum() > 0 for _, p in trainable):
        _fail(objective, "every gradient is zero: the loss does not depend on the model")
    checks.append("gradients")

    result.output, result.loss = out, float(loss.detach())
    return result


def _check_online(objective: Objective, params: Any, result: ConformanceResult, *, seed: int) -> ConformanceResult:
    """One real iteration of the online loop on the tiny model (tiny-prefs prompts, a keyword reward):
    it must validate, run prepare() and loss() through the loop, and log a finite loss, so the check
    fails wherever ``prefkit run`` would."""
    import dataclasses
    import json
    import math
    import tempfile

    from prefkit.loops import check_recipe
    from prefkit.loops.online import train
    from prefkit.recipe import validate_recipe

    registry = _registry()
    least = max(2, objective.min_samples_per_prompt(params))
    with tempfile.TemporaryDirectory(prefix="prefkit-conformance-") as tmp:
        document = {
            "output_dir": f"{tmp}/run", "seed": seed, "cache_dir": f"{tmp}/cache",
            "model": {"source": "tiny-llama", "options": {"hidden_size": 64, "num_layers": 2, "seed": seed}},
            "data": {"train": "tiny-prefs", "max_length": 96, "max_prompt_length": 64, "max_rows": 4},
            "objective": {"name": objective.name,
                          "params": {**params.model_dump(mode="json"), "rollout_batch_size": 2,
                                     "update_epochs": 1, "mini_batch_size": None}},
            "reward": {"name": "keywords", "params": {"targets": ["e"], "unit": "char", "mode": "share"}},
            "sampling": {"max_new_tokens": 6, "num_samples": least, "batch_size": 8},
            "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "scheduler": "constant", "log_every": 1},
        }
        # the objective as given, installed or not (a package's own tests run before `pip install`)
        registry = dataclasses.replace(registry, objectives={**registry.objectives, objective.name: objective})
        try:
            loaded = validate_recipe(document, f"conformance run of {objective.name}", registry)
            check_recipe(loaded)
            train(loaded, registry=registry)
        except Exception as exc:
            raise ConformanceError(f"objective {objective.name!r}: one iteration of the online loop failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        records = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
        if len(records) != 1 or not math.isfinite(records[0].get("loss", math.nan)):
            _fail(objective, f"the online loop logged no finite loss: {records}")
        result.loss = float(records[0]["loss"])
        result.checked.append("online_loop_one_iteration")
    return result


def _check_inference(objective: Objective, params: Any, result: ConformanceResult, *, seed: int) -> ConformanceResult:
    """``sample()`` on the tiny model returns ``num_samples`` outputs per prompt, and ``kl()`` and
    ``samples_per_output()`` say something a harness can use."""
    import math

    from prefkit.models.sampling import Sample
    from prefkit.recipe import SamplingConfig

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, "lm", seed=seed)
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in PROMPT_ROWS[:2]]
    prompts = [r["prompt"] for r in PROMPT_ROWS[:2]]

    def scorer(ps, cs):
        return [float(c.count("e")) for c in cs]

    cfg = SamplingConfig(max_new_tokens=4, num_samples=2, batch_size=8)
    try:
        groups = objective.sample(params, model, tokenizer, prompt_ids, prompts, scorer, cfg, seed=seed,
                                  num_samples=2)
    except Exception as exc:
        raise ConformanceError(f"objective {objective.name!r}: sample() raised {type(exc).__name__}: {exc}") from exc
    if len(groups) != 2 or any(len(g) != 2 or not all(isinstance(s, Sample) for s in g) for g in groups):
        _fail(objective, "sample() must return, for each prompt, num_samples prefkit.models.sampling.Sample objects")
    kl = objective.kl(params)
    if kl is not None and not (math.isfinite(float(kl)) and float(kl) >= 0):
        _fail(objective, f"kl() returned {kl!r}; expected None or a finite number >= 0")
    if not isinstance(objective.samples_per_output(params), int) or objective.samples_per_output(params) < 1:
        _fail(objective, "samples_per_output() must return a positive int")
    result.checked.append("inference_sample")
    return result


def check_registered(name: str, *, distribution: str | None = None, kind: str = "objectives") -> Any:
    """Assert that ``name`` is registered through the ``prefkit`` entry points (by ``distribution``,
    when given) and that its plugin reported no problem; return the registered object.

    Skips the test when ``distribution`` is not installed (run ``pip install -e .`` first).
    """
    import importlib.metadata

    from prefkit.plugins import KIND_WORDS, build_registry

    if distribution is not None:
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed; `pip install -e .` to test its entry point")
    registry = build_registry()
    table = getattr(registry, kind)
    if name not in table:
        listing = "\n  ".join(registry.problems) or "no plugin reported a problem"
        raise ConformanceError(f"no {KIND_WORDS[kind]} named {name!r} is registered; plugin problems:\n  {listing}")
    owner = registry.owner(kind, name)
    if distribution is not None and owner.distribution.replace("_", "-").lower() != distribution.replace("_", "-").lower():
        raise ConformanceError(f"{KIND_WORDS[kind]} {name!r} is registered by {owner.label}, not by {distribution}")
    if owner.problems:
        raise ConformanceError("\n".join(owner.problems))
    return table[name]


# ----------------------------------------------------------------------------- fake installs


def write_distribution(root: Path, name: str, *, entry_points: dict[str, str], files: dict[str, str] | None = None,
                       version: str = "0.1.0", group: str = "prefkit") -> Path:
    """Write what ``pip install`` would leave in a site-packages folder ``root``: the module files
    (``files``: relative path -> source) and ``NAME-VERSION.dist-info`` with ``METADATA`` and
    ``entry_points.txt`` (``entry_points``: entry point name -> ``module`` or ``module:attr``)."""
    root = Path(root)
    for relative, source in (files or {}).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{group}]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def install_plugin(tmp_path, monkeypatch, request) -> Callable[..., Path]:
    """``install_plugin(name, entry_points={...}, files={...}, version=...)`` makes a plugin
    distribution visible to ``importlib.metadata`` (and so to :func:`prefkit.plugins.build_registry`)
    for this test only, without pip. The process-wide registry cache is cleared before and after."""
    from prefkit.plugins import load_registry

    roots: list[Path] = []

    def install(name: str, *, entry_points: dict[str, str], files: dict[str, str] | None = None,
                version: str = "0.1.0") -> Path:
        root = write_distribution(tmp_path / f"site-{name}", name, entry_points=entry_points, files=files,
                                  version=version)
        roots.append(root)
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        load_registry.cache_clear()
        return root

    def cleanup() -> None:
        for module_name, module in list(sys.modules.items()):
            location = getattr(module, "__file__", None) or ""
            if any(location.startswith(str(root)) for root in roots):
                del sys.modules[module_name]
        importlib.invalidate_caches()
        load_registry.cache_clear()

    request.addfinalizer(cleanup)
    load_registry.cache_clear()
    return install
