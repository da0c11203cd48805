"""Sampling completions from a policy: batched, left-padded, reproducible; best-of-N; ``prefkit sample``.

:func:`generate` draws ``num_samples`` completions for each prompt. Sequences go through
``model.generate`` ``batch_size`` at a time, left-padded (so every row's last prompt token sits at
the same position and the KV cache serves the whole batch), grouped by prompt length to pad little.

**Reproducibility.** Sample ``s`` of prompt ``p`` gets its own stream of random numbers, seeded
from ``(seed, p, s)`` alone: at decoding step ``t`` one uniform number ``u[t]`` picks the token by
inverse transform sampling over the (temperature-, top-k- and top-p-warped) distribution. So a
completion depends on the seed, the prompt and its indices, not on ``batch_size``, on which other
sequences share its batch, or on ``num_samples``: the first 4 of 16 samples are the 4 samples
drawn with ``num_samples=4``. (Only floating-point noise can differ between batch shapes, which
flips a token only where two candidates are within rounding of each other.) Temperature 0 is
greedy decoding.

:func:`best_of_n` samples ``n`` candidates per prompt, scores them all with a reward function and
keeps the best. :func:`sample_recipe` is the library function behind ``prefkit sample RECIPE``.

**What the sampling policy thought** (``record=True``, the online loop's use). While it samples,
:func:`generate` can keep, for every completion token, the model's log-probability of that token at
temperature 1 (the log-softmax of the raw logits, before temperature, top-k or top-p), the entropy of
that distribution and, with ``hidden_states=True``, the last hidden state that predicted it (the LM
head's input). These are the numbers a second forward pass over prompt + completion would compute
(``tests/test_sampling.py`` checks them against one to 1e-5), so the online loop takes the old
policy's log-probs from here instead of running that pass.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from prefkit.recipe import LoadedRecipe, SamplingConfig
    from prefkit.api import Scorer

Progress = Callable[[int, int], None]  # (sequences done, sequences in all)


@dataclass
class Sample:
    prompt_index: int  # position of the prompt in the list handed in
    sample_index: int  # 0 .. num_samples-1 (for best-of-N: the winning candidate's index)
    text: str  # the completion, decoded without special tokens
    token_ids: list[int]  # completion tokens only, up to and including the first end token
    finished: bool  # ended with an end token within max_new_tokens
    score: float | None = None
    # with generate(record=True): per completion token, fp32 [num_tokens] (hidden: [num_tokens, H])
    logps: torch.Tensor | None = None  # the model's log-prob of the token at temperature 1
    entropy: torch.Tensor | None = None  # the entropy of the model's temperature-1 distribution there
    hidden: torch.Tensor | None = None  # the last hidden state that predicted the token (hidden_states=True)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------- seeding


def sample_uniforms(seed: int, prompt_index: int, sample_index: int, steps: int) -> np.ndarray:
    """The uniform numbers in [0, 1) that decode sample ``sample_index`` of prompt ``prompt_index``:
    a stream of its own, seeded from the three numbers alone (numpy's SeedSequence + PCG64)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(prompt_index), int(sample_index)]
    return np.random.default_rng(np.random.SeedSequence(entropy)).random(steps)


class _InverseTransformSampler:
    """A logits processor for ``model.generate`` that does the sampling itself.

    It warps the scores (temperature, top-k, top-p: transformers' own warpers, so the semantics
    are theirs), then chooses each row's token with that row's uniform number for this step, and
    returns scores that are 0 at the chosen token and -inf elsewhere; ``generate`` then runs
    greedy (``do_sample=False``) and takes exactly that token.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, warpers: list):
        self.uniforms = uniforms  # [B, max_new_tokens] float64, on the model's device
        self.prompt_width = prompt_width
        self.warpers = warpers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        scores = scores.float()
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.double().cumsum(-1)
        target = self.uniforms[:, step : step + 1] * cdf[:, -1:]
        chosen = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, chosen, 0.0)


class _Recorder:
    """A logits processor, first in the list, that keeps what the model thought at every step.

    It sees the raw logits (prefkit's generation config adds none of transformers' own processors
    before it) and keeps their log-softmax until the next call, when the token that was chosen
    (the last column of ``input_ids``) is known; :meth:`result` collects the last step's. It
    returns the scores unchanged. With ``hidden``, a hook on the LM head keeps the hidden state
    at the last position of every forward pass (the one that predicts the next token).
    """

    def __init__(self, prompt_width: int):
        self.prompt_width = prompt_width
        self.pending: torch.Tensor | None = None  # [B, V] the previous step's log-probs
        self.logps: list[torch.Tensor] = []  # one [B] per step
        self.entropy: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []  # one [B, H] per forward pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.logps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        with torch.autocast(device_type=scores.device.type, enabled=False):
            logp = torch.log_softmax(scores.float(), dim=-1)
            self.entropy.append(-(logp.exp() * logp).sum(-1))
        self.pending = logp
        return scores

    def keep_hidden(self, module: torch.nn.Module, inputs: tuple) -> None:
        self.hidden.append(inputs[0][:, -1, :].detach())

    def result(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``[B, steps]`` log-probs and entropies (and ``[B, steps, H]`` hidden states)."""
        steps = len(self.entropy)
        if self.pending is not None:
            chosen = sequences[:, self.prompt_width + steps - 1 : self.prompt_width + steps]
            self.logps.append(self.pending.gather(-1, chosen).squeeze(-1))
            self.pending = None
        hidden = torch.stack(self.hidden[:steps], dim=1) if self.hidden else None
        return torch.stack(self.logps, dim=1), torch.stack(self.entropy, dim=1), hidden


def _warpers(cfg: SamplingConfig) -> list:
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list = []
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


# --------------------------------------------------------------------------- generation


def end_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's eos and the model's generation eos ids."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut(tokens: list[int], ends: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Completion tokens up to and including the first end token, or the first max_new_tokens."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in ends:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], False


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    cfg: SamplingConfig,
    *,
    seed: int,
    num_samples: int | None = None,
    progress: Progress | None = None,
    record: bool = False,
    hidden_states: bool = False,
) -> list[list[Sample]]:
    """``num_samples`` (default ``cfg.num_samples``) completions for each prompt.

    Returns one list per prompt, in order, of its samples in order (``sample_index`` 0, 1, ...).
    Rows go ``cfg.batch_size`` at a time through ``model.generate`` with left padding and the KV
    cache. ``cfg.temperature == 0`` is greedy decoding (every sample of a prompt is then the same);
    otherwise sample ``s`` of prompt ``p`` is drawn with random numbers seeded from ``(seed, p, s)``
    (see the module docstring), so results do not depend on ``batch_size``. The model is put in
    eval mode for the call and returned to its previous mode.

    With ``record`` every Sample also holds ``logps`` and ``entropy`` (and, with ``hidden_states``,
    ``hidden``) of its completion tokens, as the model computed them while sampling (see the
    module docstring).
    """
    from transformers import GenerationConfig
    from transformers.generation import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    n = cfg.num_samples if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError("num_samples must be at least 1")
    for p, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {p} has no tokens")
    results: list[list[Sample | None]] = [[None] * n for _ in prompt_ids]
    if not prompt_ids:
        return []

    device = _model_device(model)
    ends = end_token_ids(model, tokenizer)
    if tokenizer.pad_token_id is None and not ends:
        raise ValueError("the tokenizer has neither a pad token nor an end token to pad with")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    greedy = cfg.temperature == 0
    warpers = [] if greedy else _warpers(cfg)
    # Explicit neutral values, so a model's own generation_config (which transformers merges in
    # for every unset field) cannot add a repetition penalty or a minimum length behind our back.
    generation_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        min_length=0,
        do_sample=False,  # sampling happens in _InverseTransformSampler; generate takes its one choice
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        renormalize_logits=False,
        pad_token_id=pad_id,
        eos_token_id=ends or None,
    )

    # Every (prompt, sample) pair is one row; longest prompts first so a batch pads little.
    rows = [(p, s) for p in range(len(prompt_ids)) for s in range(n)]
    rows.sort(key=lambda ps: -len(prompt_ids[ps[0]]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start : start + cfg.batch_size]
            input_ids, attention_mask = _left_pad([list(prompt_ids[p]) for p, _ in chunk], pad_id, device)
            processors = LogitsProcessorList()
            recorder = _Recorder(input_ids.shape[1]) if record else None
            if recorder is not None:
                processors.append(recorder)  # first: it must see the raw logits
            if cfg.min_new_tokens:  # after the recorder, which must see the unconstrained distribution
                processors.append(MinNewTokensLengthLogitsProcessor(input_ids.shape[1], cfg.min_new_tokens, ends,
                                                                    device=device))
            if not greedy:
                uniforms = np.stack([sample_uniforms(seed, p, s, cfg.max_new_tokens) for p, s in chunk])
                uniforms_t = torch.from_numpy(uniforms).to(device)
                processors.append(_InverseTransformSampler(uniforms_t, input_ids.shape[1], warpers))
            hook = None
            if recorder is not None and hidden_states:
                hook = model.get_output_embeddings().register_forward_pre_hook(recorder.keep_hidden)
            try:
                with torch.no_grad():
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=generation_config,
                        logits_processor=processors,
                    )
            finally:
                if hook is not None:
                    hook.remove()
            recorded = recorder.result(output) if recorder is not None else None
            completions = output[:, input_ids.shape[1] :].tolist()
            for row, ((p, s), tokens) in enumerate(zip(chunk, completions)):
                token_ids, finished = _cut(tokens, set(ends), cfg.max_new_tokens)
                text = tokenizer.decode(token_ids, skip_special_tokens=True)
                sample = Sample(p, s, text, token_ids, finished)
                if recorded is not None:
                    n_tokens = len(token_ids)
                    logps, entropy, hidden = recorded
                    sample.logps, sample.entropy = logps[row, :n_tokens], entropy[row, :n_tokens]
                    sample.hidden = hidden[row, :n_tokens] if hidden is not None else None
                results[p][s] = sample
            if progress is not None:
                progress(min(start + cfg.batch_size, len(rows)), len(rows))
    finally:
        model.train(was_training)
    return [list(samples) for samples in results]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- best-of-N


def score_samples(samples: Sequence[Sample], prompts: Sequence[Any], scorer: Scorer) -> None:
    """Set ``.score`` on every sample, in one call of the scorer; ``prompts`` are indexed by
    ``sample.prompt_index`` (raw prompts: strings or message lists, or plain text)."""
    if not samples:
        return
    scores = scorer([prompts[s.prompt_index] for s in samples], [s.text for s in samples])
    if len(scores) != len(samples):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(samples)} completions")
    for sample, score in zip(samples, scores):
        sample.score = float(score)


def _best(candidates: Sequence[Sample]) -> Sample:
    """The highest score; ties go to the lowest sample_index."""
    return max(candidates, key=lambda s: (s.score, -s.sample_index))


def best_of_n_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    prompts: Sequence[Any],
    scorer: Scorer,
    n: int,
    cfg: SamplingConfig,
    *,
    seed: int,
    num_outputs: int = 1,
    progress: Progress | None = None,
) -> list[list[Sample]]:
    """``num_outputs`` best-of-``n`` completions per prompt: ``num_outputs * n`` candidates, in
    groups of ``n`` (output ``k`` chooses among candidates ``k*n .. k*n+n-1``). Each returned
    Sample keeps its candidate index as ``sample_index`` and its score."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} tokenized prompts but {len(prompts)} prompts")
    candidates = generate(model, tokenizer, prompt_ids, cfg, seed=seed, num_samples=n * num_outputs,
                          progress=progress)
    score_samples([s for per_prompt in candidates for s in per_prompt], prompts, scorer)
    return [[_best(per_prompt[k * n : (k + 1) * n]) for k in range(num_outputs)] for per_prompt in candidates]


def best_of_n(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    prompts: Sequence[Any],
    scorer: Scorer,
    n: int,
    cfg: SamplingConfig,
    *,
    seed: int,
    progress: Progress | None = None,
) -> list[Sample]:
    """Best-of-N (rejection sampling): ``n`` candidates per prompt, scored, the best kept.

    Candidates are drawn with :func:`generate` (batched ``cfg.batch_size`` at a time; ``n`` up to
    128 and beyond), all scored with ``scorer``; returns, per prompt, the candidate with the
    highest score (ties: the lowest ``sample_index``), with ``.score`` set. Since candidate ``s``
    of a prompt depends only on ``(seed, prompt, s)``, best-of-16 sees best-of-4's candidates
    and more: with one seed, the best score can only grow with ``n``.
    """
    groups = best_of_n_groups(model, tokenizer, prompt_ids, prompts, scorer, n, cfg, seed=seed,
                              progress=progress)
    return [per_prompt[0] for per_prompt in groups]


# --------------------------------------------------------------------------- prefkit sample


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary_path(output: Path) -> Path:
    """``samples.jsonl`` -> ``samples.summary.json``, beside it."""
    return output.with_name(f"{output.stem}.summary.json" if output.suffix else f"{output.name}.summary.json")


def sample_recipe(
    loaded: LoadedRecipe,
    output: Path | str | None = None,
    *,
    registry: Any,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Sample a recipe's policy on its prompts; the library function behind ``prefkit sample``.

    - policy: ``model`` (a named source, a local folder such as a run's ``final/``, or a hub id;
      ``model.lora`` is ignored), on the GPU when there is one;
    - prompts: ``data.eval`` (its ``eval_split``) if set, else ``data.train`` (``train_split``),
      prepared as ``prompts`` data (chat template, ``max_prompt_length``);
    - sampling: ``sampling`` (its ``seed``, default the recipe's ``seed``);
    - an inference objective with a ``sample`` method (``best_of_n``) chooses the completions
      (best of ``n`` by the recipe's ``reward``); otherwise plain sampling, and when ``reward`` is
      set every sample is scored.

    Writes one JSON object per sample to ``output`` (default ``<output_dir>/samples.jsonl``):
    ``prompt_index``, ``sample_index``, ``prompt`` (raw: a string or messages), ``completion``,
    ``finished``, ``num_tokens``, ``score`` (when scored) and, for best-of-N, ``candidate_index``;
    and a summary to ``samples.summary.json`` beside it. Returns the summary.
    """
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import load_model, load_tokenizer, resolve_model_dir
    from prefkit.models.rewards import build_reward

    started = time.perf_counter()
    recipe = loaded.recipe
    cfg = recipe.sampling
    seed = recipe.seed if cfg.seed is None else cfg.seed
    cache_dir = recipe.resolved_cache_dir()
    output = Path(output) if output is not None else Path(recipe.output_dir) / "samples.jsonl"
    model_cfg = recipe.model.model_copy(update={"lora": None})

    # Data before models: a bad row stops here, before any weights load.
    model_dir = resolve_model_dir(model_cfg, loaded.model_options, cache_dir, registry)
    tokenizer = load_tokenizer(model_cfg, model_dir, gguf_file=model_cfg.gguf_file)
    split = "eval" if recipe.data.eval is not None else "train"
    dataset = prepare_dataset(recipe.data, tokenizer, registry.data_kinds["prompts"], split=split, registry=registry)
    prompt_ids = [ex.prompt_ids for ex in dataset.examples]
    prompts = [ex.prompt for ex in dataset.examples]

    device = _device()
    scorer = None
    if recipe.reward is not None:
        scorer = build_reward(recipe.reward, loaded.reward_params, cache_dir=cache_dir, device=device,
                              registry=registry)
    policy = load_model(model_cfg, loaded.model_options, cache_dir, head="lm", registry=registry)
    model = policy.model.to(device).eval()

    objective = loaded.objective
    inference = objective is not None and objective.kind == "inference"  # a recipe may have no objective
    if inference:
        if scorer is None and objective.needs(loaded.params).reward:
            from prefkit.api import PrefkitError

            raise PrefkitError(f"objective {objective.name!r} needs a reward source (the recipe's `reward:`)")
        per_prompt = objective.sample(loaded.params, model, policy.tokenizer, prompt_ids, prompts, scorer, cfg,
                             seed=seed, num_samples=cfg.num_samples, progress=progress)
    else:
        per_prompt = generate(model, policy.tokenizer, prompt_ids, cfg, seed=seed, progress=progress)
        if scorer is not None:
            score_samples([s for samples in per_prompt for s in samples], prompts, scorer)

    lines, scores, lengths, finished = [], [], [], []
    for p, samples in enumerate(per_prompt):
        for k, sample in enumerate(samples):
            row: dict[str, Any] = {
                "prompt_index": p,
                "sample_index": k,
                "prompt": prompts[p],
                "completion": sample.text,
                "finished": sample.finished,
                "num_tokens": sample.num_tokens,
            }
            if inference:
                row["candidate_index"] = sample.sample_index
            if sample.score is not None:
                row["score"] = sample.score
                scores.append(sample.score)
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            lengths.append(sample.num_tokens)
            finished.append(sample.finished)
    _write_atomic(output, "".join(lines))

    summary: dict[str, Any] = {
        "recipe": loaded.path,
        "objective": objective.name if objective is not None else None,
        "model": policy.path,
        "data": f"{dataset.report.source} ({dataset.report.split})",
        "reward": recipe.reward.name if recipe.reward is not None else None,
        "seed": seed,
        "sampling": cfg.model_dump(mode="json"),
        "prompts": len(per_prompt),
        "samples": len(lines),
        "mean_score": float(np.mean(scores)) if scores else None,
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "finished_fraction": float(np.mean(finished)) if finished else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "output": str(output),
        "summary": str(summary_path(output)),
    }
    if inference:
        summary["objective_params"] = loaded.params.model_dump(mode="json")
    _write_atomic(summary_path(output), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
