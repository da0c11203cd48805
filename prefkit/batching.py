"""Turning tokenized examples into padded tensors, and the order batches come in.

Pairs go through the model in one forward: the first B rows of a batch are prompt+chosen,
the next B rows prompt+rejected. Rows are right-padded only to the longest row of the
batch. ``completion_mask`` marks the answer tokens, the only ones any loss looks at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T] long; R = 2B for pairs, B otherwise
    attention_mask: torch.Tensor  # [R, T] long
    completion_mask: torch.Tensor  # [R, T] bool, True on answer tokens
    indices: torch.Tensor  # [B] dataset indices of the examples
    paired: bool  # rows B..2B-1 are the rejected answers
    margin: torch.Tensor | None = None  # [B] float, when every example has one

    def to(self, device: torch.device | str) -> "Batch":
        margin = None if self.margin is None else self.margin.to(device)
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            indices=self.indices,
            paired=self.paired,
            margin=margin,
        )

    @property
    def num_examples(self) -> int:
        return int(self.indices.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: list, indices: list[int], pad_id: int, *, paired: bool) -> Batch:
    """Pad ``examples`` (TokenizedExample) into a Batch. ``paired`` adds the rejected rows."""
    rows: list[tuple[list[int], list[int]]] = [(ex.prompt_ids, ex.chosen_ids or []) for ex in examples]
    if paired:
        rows += [(ex.prompt_ids, ex.rejected_ids) for ex in examples]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, :n] = 1
        completion_mask[r, len(prompt) : n] = True
    margins = [ex.margin for ex in examples]
    margin = None if any(m is None for m in margins) else torch.tensor(margins, dtype=torch.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        indices=torch.tensor(indices, dtype=torch.long),
        paired=paired,
        margin=margin,
    )


class BatchOrder:
    """Which examples form micro-batch number ``k`` (counted from the start of training).

    Each epoch is a fresh permutation drawn from ``seed`` and the epoch number, so the order
    depends only on (seed, k): a resumed run needs nothing but the micro-batch counter.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("no examples to batch")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = math.ceil(num_examples / batch_size)
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_examples, generator=generator).tolist()
            else:
                self._perm = list(range(self.num_examples))
            self._epoch = epoch
        return self._perm

    def indices(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.batches_per_epoch)
        perm = self._permutation(epoch)
        return perm[position * self.batch_size : (position + 1) * self.batch_size]

    def epoch_of(self, k: int) -> float:
        return k / self.batches_per_epoch
