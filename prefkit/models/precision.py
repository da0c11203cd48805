"""What ``train.precision: auto`` means on this machine: bf16 autocast where it is faster, else fp32.

- On a GPU: bf16 where the card supports it, otherwise fp16 (with loss scaling).
- On a CPU it depends on the chip, so prefkit measures instead of guessing. A CPU with native
  bf16 instructions (AVX512-BF16 or AMX) ran a SmolLM2 DPO step 1.3x faster under bf16
  autocast; one without them (AVX-512 only) 3x slower. :func:`measure_cpu` times a small
  transformer-shaped block (SmolLM2's widths: a gated MLP, forward and backward) in fp32 and
  under bf16 autocast, alternating the two, and bf16 is chosen when it is at least
  :data:`BF16_MIN_SPEEDUP` times faster. That takes a fraction of a second and happens once:
  the result is stored in ``<cache_dir>/precision/<key>.json``, keyed by the CPU model, its core
  count, the torch version and torch's CPU capability, and later runs read it.

bf16 autocast changes the numbers a little (log-softmax and losses stay fp32): a DPO loss over 12
SmolLM2 steps strays from the fp32 run's by up to 2-3.6e-2 at some step, in TRL as in prefkit, and
lags it by about 0.5e-2 on average (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.2  # bf16 must be this much faster than fp32 to be worth its rounding


@dataclass
class CpuProbe:
    """Seconds of the probe's forward and backward pass in each precision (the fastest of its repeats)."""

    fp32_seconds: float
    bf16_seconds: float

    @property
    def speedup(self) -> float:
        return self.fp32_seconds / self.bf16_seconds


def choose_cpu_precision(probe: CpuProbe, min_speedup: float = BF16_MIN_SPEEDUP) -> str:
    """``"bf16"`` when bf16 autocast measured at least ``min_speedup`` times faster, else ``"fp32"``."""
    return "bf16" if probe.speedup >= min_speedup else "fp32"


def measure_cpu(tokens: int = 128, hidden: int = 576, intermediate: int = 1536, repeats: int = 3) -> CpuProbe:
    """Time a gated MLP block (forward and backward) in fp32 and under bf16 autocast, alternated
    so that a change in the machine's load hits both; the fastest of ``repeats`` after a warm-up
    (the run least disturbed by other processes)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    shapes = [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # gate, up, down
    weights = [(torch.randn(shape, generator=generator) * 0.02).requires_grad_() for shape in shapes]

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.linear(F.silu(F.linear(x, weights[0])) * F.linear(x, weights[1]), weights[2])
        y.float().square().mean().backward()
        for tensor in (x, *weights):
            tensor.grad = None
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: first calls allocate and pick kernels
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(step(False))
        bf16.append(step(True))
    return CpuProbe(min(fp32), min(bf16))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_bf16_flags() -> list[str]:
    """The CPU flags for native bf16 that ``/proc/cpuinfo`` lists (avx512_bf16, amx_bf16, ...); for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def machine() -> dict[str, str | int]:
    """What the probe's result depends on; its hash names the cache entry."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _cache_file(cache_dir: Path | None, prefix: str = "") -> Path | None:
    """``<cache_dir>/precision/<prefix><machine hash>.json``: one entry per machine (:func:`machine`)."""
    if cache_dir is None:
        return None
    key = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "precision" / f"{prefix}{key}.json"


def _read_cached(path: Path | None, field: str) -> Any:
    """``field`` of a cache entry, or None when there is none or it cannot be read (measure again)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())[field]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def cpu_precision(cache_dir: Path | None, probe: Callable[[], CpuProbe] | None = None) -> str:
    """The CPU's ``auto`` precision: read from the cache, or measured once (``probe``, by default
    :func:`measure_cpu`) and stored there."""
    path = _cache_file(cache_dir)
    cached = _read_cached(path, "choice")
    if cached in ("fp32", "bf16"):
        return cached
    info = machine()
    measured = (probe or measure_cpu)()
    choice = choose_cpu_precision(measured)
    log.info("precision auto: %s (bf16 autocast %.2fx the speed of fp32 on %s)", choice, measured.speedup, info["cpu"])
    _write_cached(path, {"choice": choice, "speedup": round(measured.speedup, 3), **asdict(measured), "machine": info,
                         "bf16_flags": cpu_bf16_flags(), "min_speedup": BF16_MIN_SPEEDUP})
    return choice


FP32_ATTENTION_MIN_SPEEDUP = 1.1  # fp32 attention (inputs cast up, output down) must be this much faster
_cpu_attention_in_fp32: bool | None = None


def measure_cpu_attention(rows: int = 8, heads: int = 9, kv_heads: int = 3, length: int = 64, head_dim: int = 64,
                          repeats: int = 3) -> tuple[float, float]:
    """Seconds of causal SDPA, forward and backward, on bf16 inputs, computed in bf16 and computed in
    fp32 (cast up and back down, as :func:`prefkit.models.packing._attention` does); SmolLM2's head
    shapes, alternated, the fastest of ``repeats`` after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(rows, heads, length, head_dim), (rows, kv_heads, length, head_dim), (rows, kv_heads, length, head_dim)]

    def step(fp32: bool) -> float:
        q, k, v = (torch.randn(shape, generator=generator).bfloat16().requires_grad_() for shape in shapes)
        # called from inside a forward pass, perhaps under no_grad or autocast: measure outside both
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            start = time.perf_counter()
            a, b, c = (t.float() for t in (q, k, v)) if fp32 else (q, k, v)
            out = F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True).to(torch.bfloat16)
            out.float().square().mean().backward()
            return time.perf_counter() - start

    step(False), step(True)
    bf16, fp32 = [], []
    for _ in range(repeats):
        bf16.append(step(False))
        fp32.append(step(True))
    return min(bf16), min(fp32)


def cpu_attention_in_fp32(cache_dir: Path | None = None) -> bool:
    """Whether attention under bf16 autocast on this CPU runs faster in fp32: decided once per
    process, from ``cache_dir``'s entry for this machine when there is one, else measured (in about
    a tenth of a second) and, with a ``cache_dir``, stored there, so that every later run on the
    machine (a resumed one included) computes attention the same way. A run settles it at its start
    (:func:`prefkit.loops.runs.resolve_precision`); elsewhere the first attention call measures it.
    On the development machine (AVX512-BF16, no AMX) torch's bf16 CPU attention took 2.3x as long
    as fp32's, forward and backward; a CPU with AMX may differ, hence the measurement."""
    global _cpu_attention_in_fp32
    if _cpu_attention_in_fp32 is None:
        path = _cache_file(cache_dir, "attention-")
        cached = _read_cached(path, "fp32")
        if isinstance(cached, bool):
            _cpu_attention_in_fp32 = cached
        else:
            bf16, fp32 = measure_cpu_attention()
            _cpu_attention_in_fp32 = bf16 >= FP32_ATTENTION_MIN_SPEEDUP * fp32
            log.info("attention under bf16 autocast on this CPU: %s (bf16 %.4f s, fp32 %.4f s)",
                     "fp32" if _cpu_attention_in_fp32 else "bf16", bf16, fp32)
            _write_cached(path, {"fp32": _cpu_attention_in_fp32, "bf16_seconds": bf16, "fp32_seconds": fp32,
                                 "min_speedup": FP32_ATTENTION_MIN_SPEEDUP, "machine": machine()})
    return _cpu_attention_in_fp32


def auto_precision(cache_dir: Path | None, probe: Callable[[], CpuProbe] | None = None) -> str:
    """``train.precision: auto`` resolved: ``"bf16"``/``"fp16"`` on a GPU, the measured choice on a CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu_precision(cache_dir, probe)
