"""Pilot 1 of MC-SURE (output: sure_chaos.log): how small may the probe step ε be?

moon (the CPU profile's denoising protocol, Gaussian method, λ = 1.4), six members in one batched
pass: y twice (ε = 0: a batched member is deterministic), and y + εb for ε = 1e-4, 3e-3, 1e-2,
3e-2 (b ~ N(0, 1), seed 123). Prints bᵀ(f_t(y + εb) − f_t(y)) / (ε·N) at five iterations: ε = 1e-4
measures float32 chaos (≈ 3e-4·N whatever ε), ε ≥ 3e-3 the fit's response.

    python experiments/unseen/pilot/sure_chaos.py moon.png
"""

import sys
import time

import numpy as np
import torch

from pipeline.batched import fit_batched
from pipeline.datasets import bundled_folder
from pipeline.fit import FitConfig
from pipeline.problem import simulate
from pipeline.settings import fit_settings, load_yaml

name = sys.argv[1]
params = load_yaml("profiles/cpu.yaml")
settings = fit_settings(params, "denoising", "gaussian", name)
problem = simulate(
    "denoising", bundled_folder() / name, {"sigma": 25, "seed": 0}, short_side=128, crop=64
)
y = problem.observation
b = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
eps = [0, 0, 1e-4, 3e-3, 1e-2, 3e-2]
configs = [FitConfig.from_dict({**settings, "log_every": 1}) for _ in eps]
projections: dict[int, list[float]] = {i: [] for i in range(len(eps))}


def record(view) -> None:
    projections[view.member].append(float((b * view.last_out).sum()))


start = time.perf_counter()
results = fit_batched(
    [y + e * b for e in eps], problem.task, configs, [record], cleans=[problem.clean] * len(eps)
)
print("time", time.perf_counter() - start)
P = np.array([projections[i] for i in range(len(eps))])
N = y.numel()
for i, e in enumerate(eps):
    summary = results[i].summary()
    print(
        i,
        e,
        "stop",
        results[i].stop_iteration,
        "best",
        summary["psnr_best"],
        "final",
        summary["psnr_final"],
    )
for i in range(1, len(eps)):
    d = (P[i] - P[0]) / max(eps[i], 1e-12) / N
    print(eps[i], "div/N at 100,300,600,1000,1499:", np.round(d[[99, 299, 599, 999, 1498]], 4))
print("diff img member0 vs 1 (eps=0):", float((results[0].final - results[1].final).abs().max()))
