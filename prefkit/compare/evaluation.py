"""Measuring a policy: the estimators (pure functions) and sampling/scoring a policy on prompts.

The harness (:mod:`prefkit.compare.harness`) measures every policy the same way:

- **gold reward**: the mean (and standard deviation) of a gold reward function over the samples;
- **KL(π‖π_ref)**: from samples ``y ~ π``: for each sample, the sum over its completion tokens of
  the exact KL between the two models' next-token distributions at that position,
  ``Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t))`` (:func:`token_kl`), averaged over samples. By the chain
  rule its expectation under π is exactly the sequence-level KL(π‖π_ref) the DPO paper reports; it
  is never negative and has a far smaller variance than the plain log-ratio estimate
  ``Σ_t log π(y_t|·) − log π_ref(y_t|·)`` (:func:`sequence_kl`), which is reported beside it as
  ``kl_mc``. For best-of-N the policy's log-prob has no closed form,
  so the harness reports the analytic bound ``log N − (N−1)/N`` (``prefkit_builtins.best_of_n.best_of_n_kl``, through the objective's ``kl()``;
  Stiennon et al. 2020, Beirami et al. 2024, https://arxiv.org/abs/2401.01879);
- **win rate**: the share of pairs (policy sample, baseline) the judge prefers the policy's, a tie
  counting ½, with the A/B order randomised per pair (:func:`win_rate`);
- **length**: completion tokens, the end token included;
- **uncertainty**: percentile bootstrap intervals over prompts (and seeds) of any of these means
  (:func:`bootstrap_interval`), and the paired bootstrap of the difference between two policies
  measured on the same prompts (:func:`paired_difference`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# A judge of one pair shown in a given order: the probability that the FIRST is preferred
# (1.0, 0.0, or 0.5 for a tie). A position-biased judge (an LLM asked "A or B?") fits here.
PairJudge = Callable[[float, float], float]


# ----------------------------------------------------------------------------- estimators


def sequence_kl(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample log-ratio ``Σ_t mask·(log π(y_t|·) − log π_ref(y_t|·))``: ``[B, T]`` -> ``[B]``, fp32.

    For samples ``y ~ π`` the mean of this over samples is an unbiased Monte-Carlo estimate of the
    sequence-level KL(π‖π_ref). Identical policies give exactly 0.
    """
    if policy_token_logps.shape != ref_token_logps.shape or policy_token_logps.shape != mask.shape:
        raise ValueError(
            f"shapes differ: policy {tuple(policy_token_logps.shape)}, reference {tuple(ref_token_logps.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    diff = policy_token_logps.float() - ref_token_logps.float()
    return (diff * mask.to(diff.dtype)).sum(-1)


def token_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL(π(·)‖π_ref(·)) between next-token distributions given as full log-prob rows: ``[..., V] -> [...]``.

    ``Σ_v π(v)·(log π(v) − log π_ref(v))`` in fp32, clamped at 0 (a KL is never negative; only
    rounding makes it so). Identical rows give exactly 0.
    """
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"shapes differ: policy {tuple(policy_logps.shape)}, reference {tuple(ref_logps.shape)}")
    p, q = policy_logps.float(), ref_logps.float()
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)


def scalar_judge(first: float, second: float) -> float:
    """The judge for scalar scores: 1 if the first scores higher, 0 if lower, 0.5 for a tie."""
    if first > second:
        return 1.0
    if first < second:
        return 0.0
    return 0.5


def pair_outcomes(scores_a: Sequence[float], scores_b: Sequence[float], *, seed: int,
                  judge: PairJudge = scalar_judge) -> list[float]:
    """For each pair, A's outcome: 1 win, 0.5 tie, 0 loss (or the judge's probability).

    Each pair is shown to ``judge`` in an order drawn from ``seed`` (A first or B first, with
    probability ½ each), and the judge's verdict is mapped back to A. For a scalar judge the order
    changes nothing; a position-biased judge gets its bias averaged out.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    swap = np.random.default_rng(seed).random(len(scores_a)) < 0.5
    out = []
    for a, b, swapped in zip(scores_a, scores_b, swap):
        if swapped:
            out.append(1.0 - float(judge(b, a)))
        else:
            out.append(float(judge(a, b)))
    return out


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], *, seed: int,
             judge: PairJudge = scalar_judge) -> float:
    """Share of pairs where A beats B, a tie counting ½; the A/B order is randomised per pair.

    Identical inputs give exactly 0.5; A better in every pair gives 1.0.
    """
    outcomes = pair_outcomes(scores_a, scores_b, seed=seed, judge=judge)
    if not outcomes:
        raise ValueError("no pairs to compare")
    return float(sum(outcomes) / len(outcomes))


# ----------------------------------------------------------------------------- uncertainty


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` indices into ``n`` items, drawn with replacement from ``seed`` (and ``n``).

    The same ``(n, resamples, seed)`` always gives the same draws, so every arm is resampled over
    the same prompts (and seeds) and their intervals and differences are computed alike."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one item and one resample (got n={n}, resamples={resamples})")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, n, 0x424F4F54]).integers(0, n, size=(resamples, n))


def bootstrap_means(values: Any, *, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the mean of ``values``: ``[S, P]`` (S seeds x P prompts) or ``[P]``.

    Each replicate draws P prompts with replacement (the same drawn prompts for every seed) and S
    seeds with replacement, and takes the mean over the drawn seeds of the mean over the drawn
    prompts. With one seed this is the ordinary bootstrap over prompts. Vectorised: returns
    ``[resamples]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"values must be [seeds, prompts] or [prompts], got shape {values.shape}")
    seeds, prompts = values.shape
    prompt_idx = bootstrap_indices(prompts, resamples, seed)
    per_seed = values[:, prompt_idx].mean(-1)  # [S, B]: each seed's mean over the drawn prompts
    if seeds == 1:
        return per_seed[0]
    seed_idx = bootstrap_indices(seeds, resamples, seed + 1)  # [B, S]
    return per_seed[seed_idx, np.arange(resamples)[:, None]].mean(-1)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates: their (1-c)/2 and (1+c)/2 quantiles."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    lo, hi = np.quantile(np.asarray(replicates, dtype=np.float64), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_interval(values: Any, *, resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: the mean of ``values`` (``[S, P]`` or ``[P]``: the mean over seeds of
    the mean over prompts) and its percentile bootstrap interval (:func:`bootstrap_means`).
    A constant gives a zero-width interval at the constant."""
    values = np.asarray(values, dtype=np.float64)
    estimate = float(values.mean(-1).mean()) if values.ndim == 2 else float(values.mean())
    lo, hi = percentile_interval(bootstrap_means(values, resamples=resamples, seed=seed), confidence)
    # the quantiles of replicates of a constant are the constant up to rounding; keep lo <= estimate <= hi
    return estimate, min(lo, estimate), max(hi, estimate)


def paired_difference(a: Any, b: Any, *, resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, Any]:
    """The paired bootstrap of ``mean(a) - mean(b)`` over the same prompts (and seeds).

    ``a`` and ``b`` are ``[S, P]`` (or ``[P]``) per-prompt values of two policies measured on the
    same prompts with the same sampling seeds, so each prompt's difference is taken first and the
    differences are resampled (:func:`bootstrap_means`). Returns ``diff``, its interval ``lo``,
    ``hi``, a two-sided bootstrap ``p_value`` (twice the smaller share of replicates on either side
    of 0, each counted as (k + 1) / (B + 1), at most 1), and ``within_noise`` (the interval covers 0).
    Two identical policies give diff 0, the interval [0, 0], p 1 and within_noise True."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    diff = a - b
    estimate, lo, hi = bootstrap_interval(diff, resamples=resamples, seed=seed, confidence=confidence)
    replicates = bootstrap_means(diff, resamples=resamples, seed=seed)
    below = (int((replicates <= 0).sum()) + 1) / (resamples + 1)
    above = (int((replicates >= 0).sum()) + 1) / (resamples + 1)
    return {"diff": estimate, "lo": lo, "hi": hi, "p_value": min(1.0, 2 * min(below, above)),
            "within_noise": bool(lo <= 0.0 <= hi)}


def mean(values: Sequence[float]) -> float:
    """The mean (nan for no values)."""
    return float(np.mean(values)) if len(values) else float("nan")


def std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1 in the denominator); 0.0 for fewer than 2 values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- policies


def sample_kl(policy: torch.nn.Module, reference: torch.nn.Module, prompt_ids: Sequence[list[int]],
              completion_ids: Sequence[list[int]], *, pad_id: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Two estimates of KL(π‖π_ref) on each sample (a completion of its prompt): ``(kl, kl_mc)``.

    ``kl[i]`` is the sum over completion ``i``'s tokens of the exact next-token KL
    (:func:`token_kl`); ``kl_mc[i]`` the sum of the sampled tokens' log-ratios (:func:`sequence_kl`).
    Both are 0 when ``reference is policy``. One forward pass of each model per batch, logits only
    at the completion positions, fp32 log-softmax; the models are returned to their previous mode.
    """
    from prefkit.data.batching import collate
    from prefkit.data.prepare import TokenizedExample
    from prefkit.models.logprobs import answer_logits

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    n = len(completion_ids)
    kl, kl_mc = torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.float32)
    if reference is policy or n == 0:
        return kl.tolist(), kl_mc.tolist()
    device = next(policy.parameters()).device
    modes = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = list(range(start, min(start + batch_size, n)))
                examples = [TokenizedExample(i, list(prompt_ids[i]), {"completion": list(completion_ids[i])})
                            for i in idx]
                batch = collate(examples, idx, pad_id, ("completion",)).to(device)
                where = batch.completion_mask.to(batch.input_ids.device)
                targets = batch.input_ids[where].unsqueeze(-1)
                rows = torch.tensor(idx)[where.nonzero()[:, 0].cpu()]  # the sample each answer token belongs to
                with torch.autocast(device_type=device.type, enabled=False):
                    p = torch.log_softmax(answer_logits(policy, batch).float(), dim=-1)
                    q = torch.log_softmax(answer_logits(reference, batch).float(), dim=-1)
                    kl.index_add_(0, rows, token_kl(p, q).cpu())
                    kl_mc.index_add_(0, rows, (p.gather(-1, targets) - q.gather(-1, targets)).squeeze(-1).cpu())
                del p, q
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return kl.tolist(), kl_mc.tolist()


def score(scorer: Any, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
    """Scores from a reward function's scorer (raw prompts: strings or message lists)."""
    if not completions:
        return []
    return [float(s) for s in scorer(list(prompts), list(completions))]
