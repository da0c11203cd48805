"""The reference log-prob cache: computed once, stored on disk, reused by every later run.

An entry is keyed by a fingerprint of everything that changes the numbers: the reference
weights, the tokenizer and chat template, the tokenized data (which already reflects the
data, template and truncation), the precision, and in bf16 or fp16 the batches the rows are
computed in (there the rows batched together change the rounding visibly). The weights fingerprint
covers the whole model config as well (an edited ``rms_norm_eps`` is another key). Any change
is a different key, so a stale entry can never be used.

Entries are written atomically and carry a sha256 of their tensors' bytes, verified on every
read: an entry that is unreadable, does not match its data, or fails its checksum (a flipped
byte) is reported, recomputed and rewritten. A cache that cannot be written (full disk,
read-only folder) only costs the reuse: the run goes on with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 2


def reference_fingerprint(
    *, weights: str, tokenizer: str, data: str, precision: str, names: tuple[str, ...], tokens: bool,
    batches: list[list[list[int]]] | None = None,
) -> str:
    """One key for all inputs that change the reference log-probs (``names``: the completions
    computed; ``tokens``: whether per-token values are stored too; ``batches``: each process's
    batches of example indices, where they are part of the key)."""
    fields = {
        "format": CACHE_FORMAT,
        "weights": weights,
        "tokenizer": tokenizer,
        "data": data,
        "precision": precision,
        "names": list(names),
        "tokens": tokens,
    }
    if batches is not None:
        fields["batches"] = batches
    payload = json.dumps(fields, sort_keys=True)
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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class DamagedEntry(Exception):
    """A cache entry exists but cannot be trusted (the message says why)."""


class ReferenceCache:
    """A folder of ``<fingerprint>.safetensors`` files (plus a readable ``.json`` beside each)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, num_examples: int, names: Iterable[str], tokens: bool) -> ReferenceLogps | None:
        """The entry, or ``None`` if there is none; raises :class:`DamagedEntry` for one that
        cannot be trusted."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:
            raise DamagedEntry(f"unreadable ({type(exc).__name__})") from exc
        if metadata.get("sha256") != tensors_sha256(tensors):
            raise DamagedEntry("its checksum does not match its contents")
        found = ReferenceLogps(sums={})
        for name in names:
            sums = tensors.get(f"sum.{name}")
            if sums is None or sums.shape != (num_examples,):
                raise DamagedEntry(f"it does not hold {num_examples} values for {name!r}")
            found.sums[name] = sums
            if tokens:
                flat, offsets = tensors.get(f"tokens.{name}"), tensors.get(f"offsets.{name}")
                if flat is None or offsets is None or offsets.shape != (num_examples + 1,) or int(offsets[-1]) != flat.numel():
                    raise DamagedEntry(f"its per-token values for {name!r} do not match the data")
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
            save_file(tensors, tmp, metadata={"prefkit_cache_format": str(CACHE_FORMAT),
                                              "sha256": tensors_sha256(tensors)})
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
    warn: Callable[[str], None] = lambda text: None,
    store: bool = True,
) -> tuple[ReferenceLogps, str]:
    """Return (log-probs, "hit" | "miss"). ``cache=None`` computes without storing; ``store=False``
    reads but leaves the writing to another process. A damaged entry is recomputed and replaced;
    a failed write is a warning, never an error."""
    if cache is not None:
        try:
            found = cache.load(key, num_examples, names, tokens)
        except DamagedEntry as exc:
            warn(f"reference cache entry {cache.path(key)} is damaged ({exc}); computing it again")
            found = None
        if found is not None:
            return found, "hit"
    logps = compute()
    if cache is not None and store:
        try:
            cache.save(key, logps, meta)
        except OSError as exc:
            warn(f"could not store the reference log-probs in {cache.root} ({exc.strerror or exc}); "
                 "the run goes on, and the next one will compute them again")
    return logps, "miss"
