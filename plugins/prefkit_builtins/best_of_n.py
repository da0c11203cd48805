"""Best-of-N sampling (rejection sampling) as a prefkit plugin: an inference-time policy.

For each prompt, draw N completions from the policy, score each with a reward function or a
trained reward model, and answer with the best. Nothing is trained. It is a strong baseline that
costs N times the sampling: the DPO paper compares against it (Best of 128 in its summarization
and dialogue experiments), following WebGPT and "Learning to summarize".

Papers:

- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model", https://arxiv.org/abs/2305.18290 (section 6, the Best of N baseline)
- Nakano et al. 2021, "WebGPT: Browser-assisted question-answering with human feedback",
  https://arxiv.org/abs/2112.09332 (best-of-n rejection sampling against a reward model)
- Stiennon et al. 2020, "Learning to summarize from human feedback", https://arxiv.org/abs/2009.01325

The sampling and selection live in :func:`prefkit.models.sampling.best_of_n`; ``prefkit sample RECIPE``
runs it for a recipe whose objective is ``best_of_n``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from prefkit.api import InferenceObjective, Needs, ObjectiveParams, hookimpl


class BestOfNParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``best_of_n``."""

    n: int = Field(16, ge=1, le=128, description="Candidates sampled per prompt; the best-scored one is kept.")


def best_of_n_kl(n: int) -> float:
    """The analytic KL(pi_bon || pi_ref) bound of best-of-``n``: ``log n - (n-1)/n`` (0 for n = 1).

    Stiennon et al. 2020 (appendix G.3) give it as the KL of best-of-n; Beirami et al. 2024
    (https://arxiv.org/abs/2401.01879) prove it is an upper bound on the true KL.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    return math.log(n) - (n - 1) / n


class BestOfN(InferenceObjective):
    """Sample ``n`` completions per prompt, keep the one the recipe's reward scores highest."""

    name = "best_of_n"
    description = "Best-of-N sampling: n completions per prompt, keep the one the reward scores highest (no training)."
    Params = BestOfNParams

    def needs(self, params: BestOfNParams) -> Needs:
        return Needs(data="prompts", reward=True, generation=True)

    def sample(
        self,
        params: BestOfNParams,
        model: Any,
        tokenizer: Any,
        prompt_ids: list[list[int]],
        prompts: list[Any],
        scorer: Any,
        cfg: Any,
        *,
        seed: int,
        num_samples: int = 1,
        progress: Any = None,
    ) -> list[list[Any]]:
        """``num_samples`` best-of-``n`` completions per prompt (lists of :class:`prefkit.models.sampling.Sample`)."""
        from prefkit.models.sampling import best_of_n_groups

        return best_of_n_groups(model, tokenizer, prompt_ids, prompts, scorer, params.n, cfg, seed=seed,
                                num_outputs=num_samples, progress=progress)

    def kl(self, params: BestOfNParams) -> float:
        return best_of_n_kl(params.n)

    def kl_method(self, params: BestOfNParams) -> str:
        return "bon_analytic"

    def samples_per_output(self, params: BestOfNParams) -> int:
        return params.n


@hookimpl
def register_objectives(register):
    register(BestOfN())
