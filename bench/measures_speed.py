"""Time the per-iteration measures against one DIP-sized convolution step on this machine.

Compares, as medians over interleaved repetitions:

(a) ``fbc + blur + sharpness + psnr`` of pipeline.measures on a 512x512 RGB float32 image,
(b) one forward + backward of a 128 -> 128 channel 3x3 ``nn.Conv2d`` at 512x512, batch 1 (the
    input requires grad, as for a layer inside the network, so both input and weight gradients
    are computed),
(c) the same four measures through the NumPy/SciPy reference of tests/numpy_reference.py
    (float64, full sort).

Target: (a) <= 10% of (b), so that logging the measures every iteration costs little next to the
network's fine-scale layers. Run from the repository root::

    python -m bench.measures_speed [--reps 15] [--size 512] [--threads N]

On a shared machine, small multi-threaded ops stall whenever another process holds a core, so
compare runs with ``--threads 1`` and the default and note the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline import measures
from tests import numpy_reference

TARGET_FRACTION = 0.10


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (>= 15)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.reps < 15:
        parser.error("--reps must be at least 15")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    size = args.size
    output = torch.rand(1, 3, size, size, generator=generator)
    reference = torch.rand(1, 3, size, size, generator=generator)
    output_np = output[0].permute(1, 2, 0).double().numpy()
    reference_np = reference[0].permute(1, 2, 0).double().numpy()

    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1)
    features = torch.rand(1, 128, size, size, generator=generator, requires_grad=True)

    def run_measures() -> None:
        measures.fbc(output, reference)
        measures.blur(output)
        measures.sharpness(output)
        measures.psnr(output, reference)

    def run_conv_step() -> None:
        conv.zero_grad(set_to_none=True)
        features.grad = None
        conv(features).sum().backward()

    def run_reference() -> None:
        numpy_reference.fbc(output_np, reference_np)
        numpy_reference.blur(output_np)
        numpy_reference.sharpness(output_np)
        numpy_reference.psnr(output_np, reference_np)

    cases = {
        "(a) torch measures": run_measures,
        "(b) conv fwd+bwd": run_conv_step,
        "(c) numpy measures": run_reference,
    }
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            times[name].append(_timed(fn))

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads, "
        f"{size}x{size}, median of {args.reps} interleaved repetitions, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        spread = f"min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f}"
        print(f"{name:<22} {value * 1e3:10.2f} ms  ({spread})")
    ratio = medians["(a) torch measures"] / medians["(b) conv fwd+bwd"]
    verdict = "within" if ratio <= TARGET_FRACTION else "OVER"
    print(f"(a)/(b) = {ratio:.2%}  ({verdict} the {TARGET_FRACTION:.0%} target)")
    speedup = medians["(c) numpy measures"] / medians["(a) torch measures"]
    print(f"(c)/(a) = {speedup:.1f}x")


if __name__ == "__main__":
    main()
