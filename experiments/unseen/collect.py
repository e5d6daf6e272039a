"""Experiment "unseen", step 1: fit one validation image and record every curve the λ choice and
the stopping rules are judged on (``analyze.py`` computes all scores from them offline).

Protocol: the CPU profile's denoising (profiles/cpu.yaml: resize to 128, centre crop 64, σ = 25
with noise seed 0, the ``gaussian`` method's fit settings: width 32, lr 0.004, 1,500 iterations,
fit seed 0), every fit running its whole budget. Two parts, each one pass of the engine
(``fit_many``):

- ``--part grid``: the Gaussian method at each λ of :data:`GRID` on y (oracle PSNR, ratio, loss,
  FBC, …, and ⟨b, x_t⟩), the same λ on y + εb (ε = σ/2, Rademacher probe b, same seed: MC-SURE's
  second fit), then one single fit of the ``dip`` method on y (the baseline's drop). Writes
  ``curves/<image>.npz`` and ``curves/<image>.json`` (settings, σ estimate, wall time). With
  ``--probes P`` (> 1) the same pass also fits each λ on y + εb_p for P − 1 further probes
  (seeds 1, …, P − 1; ``probe_projection``, ``probe_sure_projection``: (P − 1, λ, iterations)):
  the first probe's members come first, as without the option.
- ``--part holdout``: the same λ with fold f ∈ {0, …, FOLDS−1} of a 10 % hold-out (disjoint
  folds of one seeded permutation) left out of the loss; the held-out MSE of every iteration.
  Writes ``curves/<image>.holdout.npz`` and ``.holdout.json``. (A separate part because it costs
  1.5× the grid part, and the shared CPU did not leave time for it on every image.)

    python experiments/unseen/collect.py moon --part grid [--out experiments/unseen/curves]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.datasets import resolve_images
from pipeline.fit import FitConfig, MemberView, fit, fit_many
from pipeline.lambda_choice import (
    EPS_OVER_SIGMA,
    ProjectionRecorder,
    estimate_noise_sigma,
    rademacher,
)
from pipeline.problem import Problem, simulate
from pipeline.results import FitResult
from pipeline.settings import fit_settings, load_yaml
from pipeline.tuning import HoldoutDegradation

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "cpu.yaml"
GRID = tuple(round(1.4 * 2 ** (k / 2), 3) for k in range(-4, 3))
"""λ candidates: 0.35, 0.495, 0.7, 0.99, 1.4, 1.98, 2.8 (log-spaced by √2 around the profile's
1.4; seven, not more, to fit the study into the shared CPU's hours)."""
FOLDS = 3
HOLDOUT = 0.1
CURVES = ("psnr", "loss", "ratio", "wmv", "emv", "fbc_1", "fbc_2", "fbc_3", "fbc_4", "fbc_5")


class HeldOutRecorder:
    """Held-out MSE of every hold-out member at every iteration (``holdout_psnr`` as an MSE)."""

    def __init__(self, holdouts: dict[int, HoldoutDegradation], iterations: int) -> None:
        self.holdouts = holdouts
        self.values = {member: np.full(iterations, np.nan) for member in holdouts}

    def __call__(self, view: MemberView) -> None:
        wrapped = self.holdouts.get(view.member)
        if wrapped is not None:
            psnr = wrapped.holdout_psnr(view.last_out)
            self.values[view.member][view.iteration - 1] = 10 ** (-psnr / 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--part", choices=("grid", "holdout"), required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "curves")
    parser.add_argument("--iterations", type=int, help="another budget than the profile's")
    parser.add_argument("--lr", type=float, help="another learning rate than the profile's")
    parser.add_argument(
        "--lams", type=lambda v: tuple(float(x) for x in v.split(",")), help="another λ grid"
    )
    parser.add_argument("--name", help="of the written files and the record (default: IMAGE)")
    parser.add_argument(
        "--probes", type=int, default=1, help="probes of the divergence (grid part; default 1)"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        help="take IMAGE from the paper's data sets under this folder (the manifest's 'paper' "
        "part), not from the bundled images",
    )
    parser.add_argument(
        "--set",
        default="denoising",
        help="with --data-root, the manifest's folder IMAGE is in (e.g. deblocking/LIVE1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_yaml(PROFILE)
    data, observe = params["data"], params["tasks"]["denoising"]["observe"]
    if args.data_root is not None:
        data = {**data, "source": "folder", "root": str(args.data_root)}
    (source,) = resolve_images(data, args.set, [args.image])
    sigma_255 = observe["sigmas"][0]
    problem = simulate(
        "denoising",
        source.path,
        {"sigma": sigma_255, "seed": observe["seed"]},
        short_side=data["resize"],
        crop=data["crop"],
    )
    base = {
        **fit_settings(params, "denoising", "gaussian"),
        "log_every": 1,
        "measure_every": 1,
        "device": "cpu",
    }
    if args.iterations:
        base["iterations"] = args.iterations
    if args.lr:
        base["lr"] = args.lr
    grid = args.lams or GRID
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.part == "grid":
        arrays, meta = collect_grid(problem, sigma_255 / 255, base, params, grid, args.probes)
    else:
        arrays, meta = collect_holdout(problem, sigma_255 / 255, base, params, grid)
    suffix = "" if args.part == "grid" else ".holdout"
    name = args.name or args.image
    np.savez_compressed(args.out / f"{name}{suffix}.npz", lam=np.array(grid), **arrays)
    meta = {
        "image": name,
        "file": source.path.name,
        "sha256": source.sha256,
        "part": args.part,
        "shape": list(problem.observation.shape),
        "numel": problem.observation.numel(),
        "sigma": sigma_255 / 255,
        "grid": list(grid),
        "settings": base,
        **meta,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (args.out / f"{name}{suffix}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("image", "part", "wall_s")}))


def curve_rows(results: list[FitResult], name: str) -> np.ndarray:
    return np.stack([result.curves[name] for result in results]).astype(np.float32)


def collect_grid(
    problem: Problem,
    sigma: float,
    base: dict[str, Any],
    params: dict[str, Any],
    grid: tuple[float, ...],
    probes: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    y, clean, task = problem.observation, problem.clean, problem.task
    eps = EPS_OVER_SIGMA * sigma
    vectors = [rademacher(tuple(y.shape), seed=p) for p in range(probes)]
    observations = [y] * len(grid) + [y + eps * b for b in vectors for _ in grid]
    configs = [FitConfig.from_dict({**base, "lam": lam}) for lam in grid * (probes + 1)]
    recorders = [
        ProjectionRecorder(b, y, torch.ones_like(y), len(configs), base["iterations"])
        for b in vectors
    ]
    results = fit_many(observations, task, configs, recorders, cleans=[clean] * len(configs))
    projections = recorders[0]
    dip_settings = {
        **fit_settings(params, "denoising", "dip"),
        "device": "cpu",
        "iterations": base["iterations"],
        "measure_every": 1,
    }
    dip = fit(y, task, FitConfig.from_dict(dip_settings), clean=clean)
    count = len(grid)
    arrays = {f"grid_{name}": curve_rows(results[:count], name) for name in CURVES}
    arrays["grid_projection"] = projections.values[:count].numpy()
    arrays["sure_projection"] = projections.values[count : 2 * count].numpy()
    arrays["sure_psnr"] = curve_rows(results[count : 2 * count], "psnr")
    if probes > 1:
        arrays["probe_projection"] = np.stack([r.values[:count].numpy() for r in recorders[1:]])
        arrays["probe_sure_projection"] = np.stack(
            [r.values[(p + 1) * count : (p + 2) * count].numpy() for p, r in enumerate(recorders)]
        )[1:]
    for name in ("psnr", "loss", "ratio", "wmv", "emv"):
        arrays[f"dip_{name}"] = dip.curves[name].astype(np.float32)
    meta = {
        "eps": eps,
        "sigma_estimated": estimate_noise_sigma(y),
        "dip_settings": dip_settings,
        "clean_std": float(clean.std()),
        "noisy_psnr": float(-10 * math.log10(float((y - clean).square().mean()))),
    }
    return arrays, meta


def collect_holdout(
    problem: Problem,
    sigma: float,
    base: dict[str, Any],
    params: dict[str, Any],
    grid: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    y, task = problem.observation, problem.task
    folds = [HoldoutDegradation(task, y, HOLDOUT, seed=0, fold=f) for f in range(FOLDS)]
    members = [(wrapped, lam) for wrapped in folds for lam in grid]
    holdouts = {m: wrapped for m, (wrapped, _) in enumerate(members)}
    held_out = HeldOutRecorder(holdouts, base["iterations"])
    results = fit_many(
        [wrapped.observation for wrapped, _ in members],
        [wrapped for wrapped, _ in members],
        [FitConfig.from_dict({**base, "lam": lam}) for _, lam in members],
        [held_out],
        cleans=[problem.clean] * len(members),
    )
    shape = (FOLDS, len(grid), base["iterations"])
    arrays = {
        "holdout_mse": np.stack([held_out.values[m] for m in range(len(members))]).reshape(shape),
        "holdout_ratio": curve_rows(results, "ratio").reshape(shape),
        "holdout_psnr": curve_rows(results, "psnr").reshape(shape),
    }
    meta = {"folds": FOLDS, "holdout": HOLDOUT, "holdout_pixels": int(folds[0].held.sum())}
    return arrays, meta


if __name__ == "__main__":
    main()
