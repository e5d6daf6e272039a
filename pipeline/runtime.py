"""Process-wide settings, made once where a process starts (the ``sdip`` commands, the benchmarks).

Nothing in the library changes process state behind a caller's back: a fit's constructor sets no
threads, allocator or precision switch. Whoever owns the process calls :func:`configure`.
"""

from __future__ import annotations

import ctypes
import functools
import signal
from types import FrameType

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
"""Float precisions of a fit: strict float32, CUDA's TF32 tensor cores, bfloat16 autocast."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_RETAIN_BYTES = 1 << 31
"""Freed memory the process keeps for reuse on CPU (glibc's trim threshold)."""


def configure(
    threads: int = 0, precision: str = "tf32", device: torch.device | None = None
) -> None:
    """Set PyTorch's CPU threads (``threads`` > 0; 0 keeps its default), CUDA's TF32 switches for
    convolutions and matrix products (on for ``tf32``, the default; off for ``fp32``; ``bf16``
    keeps float32 products strict outside its autocast), cuDNN's algorithm search on a CUDA
    device, and, for CPU fits with glibc, an allocator that keeps freed memory.

    glibc hands blocks over 32 MiB back to the kernel on free, so a 512² fit, whose activation
    maps are 128 MiB each, re-faults them at every step: 4.9 M page faults and 7.6 of 20 s in the
    kernel for 7 steps of the width-128 decoder, measured. Raising the mmap and trim thresholds
    keeps them on the heap: 2.42 → 1.80 s a step. Smaller maps never reach the threshold.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device is not None and device.type == "cuda":
        # A fit runs one convolution shape thousands of times: worth cuDNN's one-off search.
        torch.backends.cudnn.benchmark = True
    if device is not None and device.type == "cpu":
        _keep_freed_memory()


@functools.cache
def _keep_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): its allocator is left alone
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, HEAP_RETAIN_BYTES)


_requested: list[int] = []


def handle_termination() -> None:
    """Turn SIGTERM and SIGINT into a request that resumable fits honour at their next step
    (they save their state and stop, :mod:`pipeline.checkpoint`); a second signal stops the
    process at once."""
    _requested.clear()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _request)


def _request(number: int, frame: FrameType | None) -> None:
    if _requested:
        raise KeyboardInterrupt
    _requested.append(number)


def termination_requested() -> int | None:
    """The signal that asked this process to terminate, if one did since
    :func:`handle_termination`."""
    return _requested[0] if _requested else None
