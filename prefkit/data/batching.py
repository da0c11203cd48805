"""Turning tokenized examples into padded tensors, and the order batches come in.

Every named completion of an example is one row: for pairs the first B rows of a batch are
prompt+chosen, the next B rows prompt+rejected, all in one forward pass. Rows are right-padded only to the longest row of the
batch. ``completion_mask`` marks the answer tokens, the only ones any loss looks at (where an
example carries a mask for a completion, only its learnt tokens: the assistant messages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """B examples as R = B x len(names) rows: rows ``k*B .. (k+1)*B - 1`` are prompt + completion ``names[k]``."""

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long
    completion_mask: torch.Tensor  # [R, T] bool, True on answer tokens
    indices: torch.Tensor  # [B] dataset indices of the examples
    names: tuple[str, ...]  # the completion names, in row-group order
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] float, the columns every example has

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            indices=self.indices,
            names=self.names,
            columns={name: value.to(device) for name, value in self.columns.items()},
        )

    @property
    def num_examples(self) -> int:
        return int(self.indices.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows_of(self, name: str) -> slice:
        """The rows of completion ``name``."""
        k, b = self.names.index(name), self.num_examples
        return slice(k * b, (k + 1) * b)


def collate(examples: list, indices: list[int], pad_id: int, names: tuple[str, ...]) -> Batch:
    """Pad ``examples`` (TokenizedExample) into a Batch with one row group per completion name
    (``names`` empty: the prompts alone, one row each)."""
    if names:
        rows = [(ex.prompt_ids, ex.completions[name], getattr(ex, "masks", {}).get(name))
                for name in names for ex in examples]
    else:
        rows = [(ex.prompt_ids, [], None) for ex in examples]
    width = max(len(p) + len(c) for p, c, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, completion, mask) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, :n] = 1
        if mask is None:
            completion_mask[r, len(prompt) : n] = True
        else:
            completion_mask[r, len(prompt) : n] = torch.tensor(mask, dtype=torch.bool)
    shared = set.intersection(*(set(ex.columns) for ex in examples)) if examples else set()
    columns = {name: torch.tensor([float(ex.columns[name]) for ex in examples], dtype=torch.float32)
               for name in sorted(shared)}
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        indices=torch.tensor(indices, dtype=torch.long),
        names=tuple(names),
        columns=columns,
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
