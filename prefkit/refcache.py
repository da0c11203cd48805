"""The reference log-prob cache: computed once, stored on disk, reused by every later run.

An entry is keyed by a fingerprint of everything that changes the numbers: the reference
weights, the tokenizer and chat template, the tokenized data (which already reflects the
data, template and truncation), and the precision. Any change is a different key, so a
stale entry can never be used. Entries are written atomically and checked on load; an
entry that does not match its data is treated as a miss and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 1


def reference_fingerprint(
    *, weights: str, tokenizer: str, data: str, precision: str, paired: bool
) -> str:
    """One key for all inputs that change the reference log-probs."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "weights": weights,
            "tokenizer": tokenizer,
            "data": data,
            "precision": precision,
            "paired": paired,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ReferenceLogps:
    """Summed reference log-probs per example; ``rejected`` is None for unpaired data."""

    chosen: torch.Tensor  # [N] fp32
    rejected: torch.Tensor | None

    def select(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rejected = None if self.rejected is None else self.rejected[indices]
        return self.chosen[indices], rejected


class ReferenceCache:
    """A folder of ``<fingerprint>.safetensors`` files (plus a readable ``.json`` beside each)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, num_examples: int) -> ReferenceLogps | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:
            return None  # unreadable (e.g. a partial copy): recompute
        chosen = tensors.get("chosen")
        rejected = tensors.get("rejected")
        if chosen is None or chosen.shape != (num_examples,):
            return None
        if rejected is not None and rejected.shape != (num_examples,):
            return None
        return ReferenceLogps(chosen=chosen, rejected=rejected)

    def save(self, key: str, logps: ReferenceLogps, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {"chosen": logps.chosen.contiguous()}
        if logps.rejected is not None:
            tensors["rejected"] = logps.rejected.contiguous()
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"prefkit_cache_format": str(CACHE_FORMAT)})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        (self.root / f"{key}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def get_or_compute(
    cache: ReferenceCache | None,
    key: str,
    num_examples: int,
    compute: Callable[[], ReferenceLogps],
    meta: dict,
) -> tuple[ReferenceLogps, str]:
    """Return (log-probs, "hit" | "miss"). ``cache=None`` computes without storing."""
    if cache is not None:
        found = cache.load(key, num_examples)
        if found is not None:
            return found, "hit"
    logps = compute()
    if cache is not None:
        cache.save(key, logps, meta)
    return logps, "miss"
