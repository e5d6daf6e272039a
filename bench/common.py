"""What the benchmarks share: the problems and fits they time, the one timing loop, FLOP counts
and the description of the machine.

Every comparison is timed by :func:`interleaved_times`: each round calls every variant once, in a
seeded shuffled order, so load from other processes hits all variants alike, and a variant does
not always follow the same predecessor (what one leaves behind, caches or a thread pool spinning
down, biased ratios by a few per cent when the order was fixed).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from pipeline.degradations import Denoising
from pipeline.fit import FitConfig, FitState

ROOT = Path(__file__).resolve().parents[1]
PAPER_WIDTH = 128
"""Hidden channels of the paper's decoder (method.md §1)."""

Timed = Callable[[], object]


def fit_config(width: int, iterations: int, **overrides: Any) -> FitConfig:
    """The paper's fit (FitConfig's defaults: λ = 1.4, bilinear, measures every iteration) at
    ``width``; ``iterations`` sizes the curves, so it must cover every step a benchmark takes."""
    return FitConfig.from_dict(
        {"width": width, "iterations": iterations, "log_every": 10**9, **overrides}
    )


def problem(size: int, seed: int = 0) -> tuple[Denoising, Tensor, Tensor]:
    """A denoising problem (σ = 25) on a seeded random RGB image of size × size: the task, the
    observation and the clean image."""
    clean = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    task = Denoising(sigma=25, seed=seed)
    return task, task.observe(clean), clean


def fit_state(
    size: int, width: int, iterations: int, members: int = 1, **overrides: Any
) -> FitState:
    """The fit engine with K = ``members`` fits of size² outputs. One member is the paper's fit
    (seed 0, λ = 1.4); K > 1 members differ in image, seed and λ (1.0 + 0.1 k), as the members of
    a sweep or of a batch of the tune stage do."""
    problems = [problem(size, seed) for seed in range(members)]
    configs = [
        fit_config(width, iterations, **overrides)
        if members == 1
        else fit_config(width, iterations, seed=k, lam=1.0 + 0.1 * k, **overrides)
        for k in range(members)
    ]
    return FitState(
        [y for _, y, _ in problems],
        [task for task, _, _ in problems],
        configs,
        [clean for _, _, clean in problems],
    )


def interleaved_times(functions: dict[str, Timed], calls: int) -> dict[str, list[float]]:
    """Seconds of each call; every round calls every function once, in a shuffled order
    (seeded: the same order in every run)."""
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(calls):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(functions: dict[str, Timed], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function over ``reps`` interleaved rounds, after
    ``warmup`` untimed ones."""
    interleaved_times(functions, warmup)
    times = interleaved_times(functions, reps)
    return {name: statistics.median(values) for name, values in times.items()}


def best_time(function: Timed, reps: int, warmup: int) -> float:
    """The fastest of ``reps`` calls after ``warmup`` (a peak, not a typical time)."""
    interleaved_times({"call": function}, warmup)
    return min(interleaved_times({"call": function}, reps)["call"])


def step_flops(function: Timed) -> int:
    """FLOPs of one call (convolutions, matrix products; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def environment() -> dict[str, Any]:
    """The machine, the software and the load when a run starts."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min_start": os.getloadavg()[0],
    }
