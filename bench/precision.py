"""Does a lower precision change what a fit restores? (issue 9, item 1)

Denoising (σ = 25) of scikit-image's astronaut at ``size``² (512² is the whole image, nothing to
carry to a GPU machine), the fit the issue times (width 128, λ = 1.4, Gaussian upsampling; lr 0.001
and backtracking, the code's defaults), ``iterations`` per fit, seeds 0, 1, 2 as three members of
one engine pass, once per precision (fp32, tf32, bf16). Per precision: each seed's peak PSNR (the
oracle peak of its curve), their mean, the mean's difference from fp32's, and the pass's wall time.
The issue's targets: tf32 within 0.1 dB of fp32, bf16 within 0.3 dB. On a CPU tf32 is fp32 (no
tensor cores), so only bf16 can differ there::

    python -m bench.precision [--size 512] [--iterations 2000] [--device cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage import data

from pipeline.degradations import Denoising
from pipeline.fit import FitConfig, fit_many
from pipeline.results import write_json
from pipeline.runtime import PRECISIONS, configure

SEEDS = (0, 1, 2)
TARGETS_DB = {"tf32": 0.1, "bf16": 0.3}
"""Largest allowed |mean peak PSNR − fp32's| (dB)."""


def astronaut(size: int) -> torch.Tensor:
    """The astronaut (512² RGB) as (1, 3, size, size) in [0, 1], resized by block means when
    ``size`` divides 512."""
    pixels = torch.from_numpy(data.astronaut().astype(np.float32) / 255).permute(2, 0, 1)[None]
    factor = 512 // size
    if factor * size != 512:
        raise ValueError(f"size must divide 512, got {size}")
    return torch.nn.functional.avg_pool2d(pixels, factor) if factor > 1 else pixels


def peak_psnrs(precision: str, size: int, iterations: int, device: str) -> dict[str, Any]:
    """One engine pass of the three seeds under ``precision``."""
    configure(0, precision, torch.device(device))
    clean = astronaut(size)
    task = Denoising(sigma=25, seed=0)
    observation = task.observe(clean)
    configs = [
        FitConfig.from_dict(
            {
                "iterations": iterations,
                "lam": 1.4,
                "upsample": "gaussian",
                "seed": seed,
                "precision": precision,
                "device": device,
                "log_every": max(1, iterations // 4),
            }
        )
        for seed in SEEDS
    ]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = fit_many([observation] * len(SEEDS), task, configs, cleans=[clean] * len(SEEDS))
    wall = time.perf_counter() - start
    peaks = [result.summary()["psnr_best"] for result in results]
    return {"peak_psnr": peaks, "mean_peak_psnr": float(np.mean(peaks)), "wall_s": wall}


def precision_check(
    size: int = 512, iterations: int = 2000, device: str = "cuda"
) -> dict[str, Any]:
    """Every precision's peaks (fp32 first, the reference), and each one's gap to fp32."""
    rows = {p: peak_psnrs(p, size, iterations, device) for p in PRECISIONS}
    reference = rows["fp32"]["mean_peak_psnr"]
    for precision, row in rows.items():
        row["minus_fp32_db"] = row["mean_peak_psnr"] - reference
        if precision in TARGETS_DB:
            row["target_db"] = TARGETS_DB[precision]
            row["met"] = abs(row["minus_fp32_db"]) <= TARGETS_DB[precision]
    return {"size": size, "iterations": iterations, "device": device, "seeds": SEEDS, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = precision_check(args.size, args.iterations, args.device)
    for precision, row in result["rows"].items():
        peaks = ", ".join(f"{p:.2f}" for p in row["peak_psnr"])
        print(
            f"{precision}: peaks {peaks}; mean {row['mean_peak_psnr']:.3f} dB "
            f"({row['minus_fp32_db']:+.3f} vs fp32), {row['wall_s']:.1f} s",
            flush=True,
        )
    if args.out is not None:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
