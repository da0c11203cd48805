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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 2


def reference_fingerprint(
    *, weights: str, tokenizer: str, data: str, precision: str, names: tuple[str, ...], tokens: bool
) -> str:
    """One key for all inputs that change the reference log-probs (``names``: the completions
    computed; ``tokens``: whether per-token values are stored too)."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "weights": weights,
            "tokenizer": tokenizer,
            "data": data,
            "precision": precision,
            "names": list(names),
            "tokens": tokens,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ReferenceLogps:
    """Reference log-probs of every example, by completion name.

    ``sums[name]`` is ``[N]`` (summed over the completion's tokens). With per-token values,
    ``tokens[name]`` holds all examples' per-token log-probs concatenated ``[sum of lengths]`` and
    ``offsets[name]`` ``[N + 1]`` where each example's run starts.
    """

    sums: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: values[indices] for name, values in self.sums.items()}

    def select_tokens(self, indices: torch.Tensor, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-token values of ``indices`` laid out like ``mask[name]`` ``[B, T]`` (zero off the mask)."""
        out = {}
        for name, flat in self.tokens.items():
            offsets = self.offsets[name]
            runs = [flat[offsets[i]: offsets[i + 1]] for i in indices.tolist()]
            out[name] = torch.zeros(mask[name].shape, dtype=torch.float32).masked_scatter(
                mask[name].cpu(), torch.cat(runs) if runs else flat[:0])
        return out


class ReferenceCache:
    """A folder of ``<fingerprint>.safetensors`` files (plus a readable ``.json`` beside each)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, num_examples: int, names: tuple[str, ...], tokens: bool) -> ReferenceLogps | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:
            return None  # unreadable (e.g. a partial copy): recompute
        found = ReferenceLogps(sums={})
        for name in names:
            sums = tensors.get(f"sum.{name}")
            if sums is None or sums.shape != (num_examples,):
                return None
            found.sums[name] = sums
            if tokens:
                flat, offsets = tensors.get(f"tokens.{name}"), tensors.get(f"offsets.{name}")
                if flat is None or offsets is None or offsets.shape != (num_examples + 1,) or int(offsets[-1]) != flat.numel():
                    return None
                found.tokens[name], found.offsets[name] = flat, offsets
        return found

    def save(self, key: str, logps: ReferenceLogps, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {f"sum.{name}": values.contiguous() for name, values in logps.sums.items()}
        for name in logps.tokens:
            tensors[f"tokens.{name}"] = logps.tokens[name].contiguous()
            tensors[f"offsets.{name}"] = logps.offsets[name].contiguous()
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
    names: tuple[str, ...],
    tokens: bool,
    compute: Callable[[], ReferenceLogps],
    meta: dict,
) -> tuple[ReferenceLogps, str]:
    """Return (log-probs, "hit" | "miss"). ``cache=None`` computes without storing."""
    if cache is not None:
        found = cache.load(key, num_examples, names, tokens)
        if found is not None:
            return found, "hit"
    logps = compute()
    if cache is not None:
        cache.save(key, logps, meta)
    return logps, "miss"
