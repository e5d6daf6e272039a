"""Experiment "unseen", step 1: fit one validation image and record every curve the λ choice and
the stopping rules are judged on (``analyze.py`` computes all scores from them offline).

Protocol: the CPU profile's denoising (profiles/cpu.yaml: resize to 128, centre crop 64, σ = 25
with noise seed 0, the ``gaussian`` method's fit settings: width 32, lr 0.004, 1,500 iterations,
fit seed 0), every fit running its whole budget. One batched pass (``fit_batched``) holds

- ``grid``: the Gaussian method at each λ of :data:`GRID` on y (oracle PSNR, ratio, loss, FBC, …);
- ``sure``: the same λ on y + εb (ε = σ/2, Rademacher probe b, same seed): MC-SURE's second fit;
- ``holdout``: the same λ with fold f ∈ {0, …, FOLDS−1} of a 10 % hold-out (disjoint folds of
  one seeded permutation) left out of the loss; its held-out MSE is recorded every iteration;

and one single fit of the ``dip`` method on y (the baseline's drop). Writes
``curves/<image>.npz`` (float32 curves, members × 1,500) and ``curves/<image>.json`` (settings,
σ estimate, wall time).

    python experiments/unseen/collect.py moon [--out experiments/unseen/curves]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.batched import MemberView, fit_batched
from pipeline.datasets import resolve_images
from pipeline.fit import FitConfig, fit
from pipeline.lambda_choice import (
    EPS_OVER_SIGMA,
    ProjectionRecorder,
    estimate_noise_sigma,
    rademacher,
)
from pipeline.problem import simulate
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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "curves")
    parser.add_argument("--iterations", type=int, help="a shorter budget (smoke runs only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_yaml(PROFILE)
    data, observe = params["data"], params["tasks"]["denoising"]["observe"]
    (source,) = resolve_images(data, "denoising", [args.image])
    sigma_255 = observe["sigmas"][0]
    problem = simulate(
        "denoising",
        source.path,
        {"sigma": sigma_255, "seed": observe["seed"]},
        short_side=data["resize"],
        crop=data["crop"],
    )
    y, clean, task = problem.observation, problem.clean, problem.task
    sigma = sigma_255 / 255
    eps = EPS_OVER_SIGMA * sigma
    probe = rademacher(tuple(y.shape))
    base = {**fit_settings(params, "denoising", "gaussian"), "log_every": 1, "device": "cpu"}
    if args.iterations:
        base["iterations"] = args.iterations
    iterations = base["iterations"]

    observations, tasks, configs, kinds = [], [], [], []
    holdouts: dict[int, HoldoutDegradation] = {}
    for lam in GRID:
        observations.append(y)
        tasks.append(task)
        kinds.append(("grid", lam, -1))
    for lam in GRID:
        observations.append(y + eps * probe)
        tasks.append(task)
        kinds.append(("sure", lam, -1))
    for fold in range(FOLDS):
        wrapped = HoldoutDegradation(task, y, HOLDOUT, seed=0, fold=fold)
        for lam in GRID:
            holdouts[len(kinds)] = wrapped
            observations.append(wrapped.observation)
            tasks.append(wrapped)
            kinds.append(("holdout", lam, fold))
    configs = [FitConfig.from_dict({**base, "lam": lam}) for _, lam, _ in kinds]
    projections = ProjectionRecorder(probe, len(kinds), iterations)
    held_out = HeldOutRecorder(holdouts, iterations)
    start = time.perf_counter()
    results = fit_batched(
        observations, tasks, configs, [projections, held_out], cleans=[clean] * len(kinds)
    )
    batch_s = time.perf_counter() - start
    dip_settings = {**fit_settings(params, "denoising", "dip"), "device": "cpu"}
    dip_settings["iterations"] = iterations
    start = time.perf_counter()
    dip = fit(y, task, FitConfig.from_dict(dip_settings), clean=clean)
    dip_s = time.perf_counter() - start

    def rows(kind: str, name: str) -> np.ndarray:
        return np.stack(
            [results[m].curves[name] for m, (k, _, _) in enumerate(kinds) if k == kind]
        ).astype(np.float32)

    def member_rows(kind: str, values: np.ndarray) -> np.ndarray:
        return np.stack([values[m] for m, (k, _, _) in enumerate(kinds) if k == kind])

    proj = projections.values.numpy()
    arrays = {f"grid_{name}": rows("grid", name) for name in CURVES}
    arrays["grid_projection"] = member_rows("grid", proj)
    arrays["sure_projection"] = member_rows("sure", proj)
    shape = (FOLDS, len(GRID), iterations)
    arrays["holdout_mse"] = np.stack([held_out.values[m] for m in sorted(holdouts)]).reshape(shape)
    arrays["holdout_ratio"] = rows("holdout", "ratio").reshape(shape)
    arrays["holdout_psnr"] = rows("holdout", "psnr").reshape(shape)
    for name in ("psnr", "loss", "ratio", "wmv", "emv"):
        arrays[f"dip_{name}"] = dip.curves[name].astype(np.float32)
    arrays["lam"] = np.array(GRID)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / f"{args.image}.npz", **arrays)
    meta = {
        "image": args.image,
        "file": source.path.name,
        "sha256": source.sha256,
        "shape": list(y.shape),
        "numel": y.numel(),
        "sigma": sigma,
        "sigma_estimated": estimate_noise_sigma(y),
        "eps": eps,
        "grid": list(GRID),
        "folds": FOLDS,
        "holdout": HOLDOUT,
        "holdout_pixels": int(holdouts[len(GRID) * 2].held.sum()),
        "settings": base,
        "dip_settings": dip_settings,
        "batch_members": len(kinds),
        "batch_wall_s": round(batch_s, 1),
        "dip_wall_s": round(dip_s, 1),
        "clean_std": float(clean.std()),
        "noisy_psnr": float(-10 * math.log10(float((y - clean).square().mean()))),
    }
    (args.out / f"{args.image}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("image", "batch_wall_s", "dip_wall_s")}))


if __name__ == "__main__":
    main()
