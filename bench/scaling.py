"""Step time of one fit against the output size, and the FLOP/s it achieves.

``FitState.step`` (forward, backward, measures, backtracking, Adam) of the paper's decoder (width
128, λ = 1.4, bilinear) at 64², 128², 256² and 512², channels-last (the default) and NCHW side by
side; the exponent b of a least-squares fit of time ∝ pixels^b from 128² to 512² (target
b ≤ 1.1); the FLOPs of a step (counted by ``torch.utils.flop_counter``) over its median time,
against this machine's float32 peaks: square matrix products and one 128 → 128 3×3 convolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import PAPER_WIDTH, best_time, fit_state, interleaved_medians, step_flops

SIZES = (64, 128, 256, 512)
EXPONENT_SIZES = (128, 256, 512)
EXPONENT_TARGET = 1.1


def exponent(pixels: list[int], seconds: list[float]) -> float:
    """b of time ∝ pixels^b: the least-squares slope of log(time) against log(pixels)."""
    return float(np.polyfit(np.log(pixels), np.log(seconds), 1)[0])


def matmul_peak(sizes: tuple[int, ...], reps: int) -> dict[str, float]:
    """Best float32 GFLOP/s of n × n matrix products (2n³ FLOPs each), per n."""
    best = {}
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        a, b = (torch.randn(n, n, generator=generator) for _ in range(2))
        best[str(n)] = 2 * n**3 / best_time(lambda a=a, b=b: torch.mm(a, b), reps, 2) / 1e9
    return best


def conv_peak(size: int, reps: int) -> float:
    """Best float32 GFLOP/s of one 128 → 128 3×3 convolution's forward at size² (direct
    convolution, 2·C_in·C_out·9 FLOPs per output pixel): the decoder's dominant kernel alone."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(1, PAPER_WIDTH, size, size, generator=generator)
    w = torch.randn(PAPER_WIDTH, PAPER_WIDTH, 3, 3, generator=generator)
    flops = 2 * PAPER_WIDTH * PAPER_WIDTH * 9 * size * size
    return flops / best_time(lambda: F.conv2d(x, w, padding=1), reps, 2) / 1e9


def scaling(quick: bool) -> dict[str, Any]:
    """Step times and achieved GFLOP/s at every size, the exponents, and the machine's peaks."""
    matmul = matmul_peak((1024, 2048) if quick else (1024, 2048, 4096), reps=5)
    conv = conv_peak(128, reps=5)
    rows = {}
    for size in SIZES:
        reps = 3 if size >= 256 else (5 if quick else 9)
        iterations = 2 * reps + 6
        states = {
            "default": fit_state(size, PAPER_WIDTH, iterations),
            "nchw": fit_state(size, PAPER_WIDTH, iterations, channels_last=False),
        }
        flops = step_flops(states["default"].step)
        steps = {name: state.step for name, state in states.items()}
        medians = interleaved_medians(steps, reps=reps, warmup=1 if size >= 256 else 2)
        rows[f"{size}x{size}"] = {
            "pixels": size * size,
            "step_ms": 1e3 * medians["default"],
            "step_ms_nchw": 1e3 * medians["nchw"],
            "gflop_per_step": flops / 1e9,
            "gflops_achieved": flops / medians["default"] / 1e9,
            "repetitions": reps,
        }
        del states, steps

    def fitted(column: str, sizes: tuple[int, ...]) -> float:
        chosen = [rows[f"{s}x{s}"] for s in sizes]
        return exponent([row["pixels"] for row in chosen], [row[column] for row in chosen])

    b = fitted("step_ms", EXPONENT_SIZES)
    return {
        "sizes": rows,
        "exponent_128_512": b,
        "exponent_128_512_nchw": fitted("step_ms_nchw", EXPONENT_SIZES),
        "exponent_64_128": fitted("step_ms", (64, 128)),
        "exponent_target": EXPONENT_TARGET,
        "exponent_met": b <= EXPONENT_TARGET,
        "matmul_peak_gflops_by_size": matmul,
        "matmul_peak_gflops": max(matmul.values()),
        "conv_peak_gflops": conv,
    }
