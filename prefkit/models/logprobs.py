"""Log-probabilities of completion tokens, computing logits only where they are needed.

The LM head over a large vocabulary dominates small models, so the policy is asked for
logits only at the positions that predict an answer token (transformers' boolean
``logits_to_keep``). Where the model allows it, the batch's rows are packed into one sequence
without padding, each prompt shared by the rows that begin with it (:mod:`prefkit.models.packing`).
Log-softmax runs in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefkit.data.batching import Batch
from prefkit.models import packing


def _position_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: keep t where token t+1 is an answer token."""
    keep = torch.zeros_like(completion_mask)
    keep[:, :-1] = completion_mask[:, 1:]
    return keep


def answer_outputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   keep: torch.Tensor, *, hidden_states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``[K, V]`` (and, with ``hidden_states``, the last hidden states ``[K, H]``) at the K
    positions where ``keep`` ``[R, T]`` is true, row-major; only those positions go through the LM
    head. The rows are packed into one sequence without padding where the model allows it."""
    packed = packing.plan(input_ids, attention_mask) if packing.can_pack(model) else None
    if packed is not None:
        # The packed sequence's slots for those positions (one slot where rows share a prefix).
        at = packed.positions(keep)
        out = packing.forward(model, packed, logits_to_keep=at.unsqueeze(0), output_hidden_states=hidden_states)
        logits = out.logits
        if logits.dim() == 3 and logits.shape[:2] == (1, at.numel()):
            logits = logits[0]
        elif logits.dim() == 3 and logits.shape[:2] == packed.input_ids.shape:  # it ignored logits_to_keep
            logits = logits[0, at]
        else:  # a model without tensor logits_to_keep support: select here
            logits = packing.forward(model, packed).logits[0, at]
        hidden = out.hidden_states[-1][0, at] if hidden_states else None
        return logits, hidden

    def run(**kwargs):
        with packing.attention(model):
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    out = run(logits_to_keep=keep, output_hidden_states=hidden_states)
    logits = out.logits
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # the model ignored logits_to_keep
        logits = logits[keep]
    elif logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        logits = run().logits[keep]  # a model without boolean logits_to_keep support: select here
    hidden = out.hidden_states[-1][keep] if hidden_states else None
    return logits, hidden


def answer_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The logits that predict each completion token, ``[K, V]`` for the K completion tokens of the
    batch in row-major order (the order of ``input_ids[completion_mask]``)."""
    keep = _position_mask(batch.completion_mask).to(batch.input_ids.device)
    return answer_outputs(model, batch.input_ids, batch.attention_mask, keep)[0]


def token_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token log p(token) on completion tokens, fp32, shape [R, T]; zero elsewhere.

    Entry ``[r, t]`` is the log-prob of ``input_ids[r, t]`` given the tokens before it, so it is
    aligned with ``batch.completion_mask``.
    """
    targets = batch.input_ids[batch.completion_mask.to(batch.input_ids.device)]
    logits = answer_logits(model, batch)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logps = F.log_softmax(logits.float(), dim=-1)
        picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    result = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=picked.device)
    return result.masked_scatter(batch.completion_mask.to(picked.device), picked)


def sequence_logps(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over the answer tokens of each row: [R, T] -> [R]."""
    return (token_values * mask).sum(-1)


def sequence_rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The scalar head's score of each row, fp32, shape [R]: exactly what the model's own
    ``*ForSequenceClassification`` forward returns, so a saved reward model scores the same text
    the same way in transformers, TRL or prefkit.

    transformers pools at the last token that is not the pad token (``config.pad_token_id``). When
    the pad token is also the end-of-text token (SmolLM2 and many chat models), that is the token
    *before* the final end-of-text, for training and for every later use alike.
    """
    inner = packing.unwrap(model)
    if getattr(inner, "score", None) is None:
        raise ValueError(f"{type(inner).__name__} has no `score` head; use a *ForSequenceClassification model")
    packed = _packed_scores(model, inner, batch)
    if packed is not None:
        return packed
    with packing.attention(model):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"the reward model must have one label; its logits have shape {list(logits.shape)}")
    return logits.squeeze(-1).float()


def _packed_scores(model: torch.nn.Module, inner: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
    """The scores of :func:`sequence_rewards` from a packed pass of the backbone, pooled at the same
    token transformers pools at, then the head; None where the rows cannot be packed (a model under
    DDP too: the backbone is called past the wrapper, whose forward must run for gradients to sync)."""
    backbone = getattr(inner, "base_model", None)
    pad_id = getattr(inner.config, "pad_token_id", None)
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    if backbone is None or backbone is inner or pad_id is None or distributed or not packing.can_pack(backbone):
        return None
    packed = packing.plan(batch.input_ids, batch.attention_mask)
    if packed is None:
        return None
    # transformers' pooling: the last position whose token is not the pad token, on the padded rows.
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    last = (positions * (batch.input_ids != pad_id)).argmax(-1)
    hidden = packing.forward(backbone, packed).last_hidden_state[0]  # [N, H]
    return inner.score(hidden[packed.slots.gather(1, last[:, None]).squeeze(1)]).squeeze(-1).float()
