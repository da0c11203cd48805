"""``metrics.jsonl``: one JSON object per logged step, in the shared metric vocabulary."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint (they will be logged again)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class Averager:
    """Accumulates metric values (scalars or per-example tensors), weighted by example count."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, value, weight: float = 1.0) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.numel() > 1:
                self.sums[name] += float(value.sum())
                self.counts[name] += value.numel()
                return
            value = float(value)
        self.sums[name] += float(value) * weight
        self.counts[name] += weight

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


def finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
