"""The CPU memory allocator, set up for training once per process (Linux with glibc).

A training step on a CPU allocates and frees the same large buffers every step: the logits, the
activations kept for the backward pass, the gradients (SmolLM2-135M's embedding gradient alone is
113 MB). glibc's malloc serves a request above its mmap threshold (128 KiB, rising with use to at
most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on ``free``, so every step the
kernel maps those pages again, zeroes them and takes a page fault on each first touch. A 12-step
SmolLM2 DPO job took about 2.2 million minor page faults that way.

:func:`tune_cpu_allocator` changes two things, once, for the whole process:

- ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``: buffers up to
  1 GiB come from malloc's heap, and what is freed stays in the heap for the next step to reuse
  (as a GPU caching allocator keeps its blocks) instead of going back to the kernel;
- ``THP_MEM_ALLOC_ENABLE=1`` (unless already set): torch aligns CPU tensors of 2 MiB or more to
  2 MiB and asks the kernel for transparent huge pages for them, where the kernel allows it
  (``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or ``always``). torch reads the
  variable at its first CPU allocation, so it only counts when set before that: the engine calls
  this when it resolves a run's precision (before the precision probe's tensors; training and
  ``prefkit.evaluate``) and in ``load_model`` (every other path that loads a model).

Measured on a 2-core AMD EPYC (docs/benchmarks.md, "The CPU allocator"): the SmolLM2 DPO step of
issue 13 ran about 1.2 s instead of 1.7 s in bf16 and 1.9 s instead of 2.3 s in fp32, with a
quarter of the page faults. The price: memory freed during the run stays with the process rather
than going back to the system (peak RSS was within 5% either way).

``PREFKIT_CPU_ALLOCATOR=system`` leaves the allocator as it is. On a machine with a CUDA GPU, on
another C library or another system, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass

ENV = "PREFKIT_CPU_ALLOCATOR"
CHOICES = ("tuned", "system")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int


@dataclass(frozen=True)
class AllocatorSetup:
    """What :func:`tune_cpu_allocator` did: ``mode`` is ``"tuned"`` or ``"system"``, with why in ``reason``."""

    mode: str
    reason: str


_applied: AllocatorSetup | None = None  # set by the first call: the settings are the process's


def applied() -> AllocatorSetup | None:
    """What :func:`tune_cpu_allocator` did in this process, or None before it was called."""
    return _applied


def requested_mode() -> str:
    """``PREFKIT_CPU_ALLOCATOR`` (``tuned`` unless set); another value is a clear error."""
    from prefkit.api.errors import PrefkitError

    value = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if value not in CHOICES:
        raise PrefkitError(f"environment variable {ENV}={os.environ[ENV]!r}: use one of {', '.join(CHOICES)}")
    return value


def tune_cpu_allocator(cuda: bool | None = None) -> AllocatorSetup:
    """Set glibc's malloc and torch's CPU allocator for training, once per process (see the module's
    docstring); later calls return what the first one did. ``cuda``: whether the run is on a GPU
    (asked of torch when not given)."""
    global _applied
    mode = requested_mode()  # a bad value is reported on every call
    if _applied is not None:
        return _applied
    if mode == "system":
        _applied = AllocatorSetup("system", f"{ENV}=system")
        return _applied
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        _applied = AllocatorSetup("system", "a CUDA GPU runs the model (its own caching allocator)")
        return _applied
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        libc_name = platform.libc_ver()[0] or "another C library"
        _applied = AllocatorSetup("system", f"not Linux with glibc ({sys.platform}, {libc_name})")
        return _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        _applied = AllocatorSetup("system", "glibc refused the mallopt settings")
        return _applied
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _applied = AllocatorSetup("tuned", "glibc malloc keeps buffers up to 1 GiB for reuse; torch asks for huge pages "
                                       f"(THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']})")
    return _applied
