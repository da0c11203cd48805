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

    def _lines(self) -> tuple[list[tuple[str, dict]], int]:
        """Readable records with their text, and how many lines could not be read (a kill during a
        write leaves a half-written last line)."""
        if not self.path.exists():
            return [], 0
        found, bad = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                found.append((line, record))
            else:
                bad += 1
        return found, bad

    def truncate_after(self, step: int) -> int:
        """On resume: forget lines logged after the checkpoint (they will be logged again) and
        unreadable ones; returns how many unreadable lines were dropped."""
        if not self.path.exists():
            return 0
        found, bad = self._lines()
        kept = [line for line, record in found if record.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        return bad

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [record for _, record in self._lines()[0]]


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

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running sums, for a checkpoint (JSON floats round-trip exactly)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict | None) -> "Averager":
        averager = cls()
        if state:
            averager.sums.update(state["sums"])
            averager.counts.update(state["counts"])
        return averager

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


def finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
