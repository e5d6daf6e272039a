"""Throughput of K fits batched in one engine against K single fits one after the other.

At 64², for K = 1, 2, 4, 8 at width 32 (the CPU profile's) and 128: fit-iterations per second of
``FitState`` with K members (pipeline.networks.StackedNetwork for K > 1) against those of one
single fit (SingleNetwork), all interleaved in one run. Target: K = 4 at width 32 ≥ 1.5× the
sequential throughput.

The stacked network runs ``torch.func.vmap`` over the members, which turns every convolution into
one grouped convolution over them. A hand-written forward of the same grouped convolutions was
measured against it while choosing the formulation (23.0 against 23.8 ms a network step at K = 4,
width 32; README.md, "Speed"): the same kernels, less than the run-to-run noise apart, so it is not
timed any more.
"""

from __future__ import annotations

from typing import Any

from bench.common import PAPER_WIDTH, fit_state, interleaved_medians

SIZE = 64
BATCH_SIZES = (1, 2, 4, 8)
TARGET = 1.5
TARGET_MEMBERS = 4
TARGET_WIDTH = 32


def batching(quick: bool) -> dict[str, Any]:
    """Per width: the single fit's step time and, per K, the batched step time, throughput and
    speedup over sequential single fits; then the target."""
    reps = 7 if quick else 15
    iterations = 2 + reps
    results: dict[str, Any] = {}
    for width in (TARGET_WIDTH, PAPER_WIDTH):
        steps = {"single": fit_state(SIZE, width, iterations).step}
        steps |= {f"K={k}": fit_state(SIZE, width, iterations, k).step for k in BATCH_SIZES}
        medians = interleaved_medians(steps, reps=reps, warmup=2)
        single = medians["single"]
        results[str(width)] = {
            "single_step_ms": 1e3 * single,
            "batched": {
                str(k): {
                    "step_ms": 1e3 * medians[f"K={k}"],
                    "fit_iterations_per_s": k / medians[f"K={k}"],
                    "sequential_fit_iterations_per_s": 1 / single,
                    "speedup_vs_sequential": k * single / medians[f"K={k}"],
                }
                for k in BATCH_SIZES
            },
        }
    speedup = results[str(TARGET_WIDTH)]["batched"][str(TARGET_MEMBERS)]["speedup_vs_sequential"]
    results["target"] = {
        "k": TARGET_MEMBERS,
        "width": TARGET_WIDTH,
        "min_speedup": TARGET,
        "speedup": speedup,
        "met": speedup >= TARGET,
    }
    return results
