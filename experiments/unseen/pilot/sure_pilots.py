"""Two pilots of MC-SURE on moon (the CPU profile's denoising protocol, Gaussian method); their
outputs are ``sure_chaos.log`` and ``sure_epsilon.log`` (curves: ``sure_epsilon.npz``).

- ``chaos``: how small may the probe step ε be? Six members in one batched pass: y twice (ε = 0:
  a batched member is deterministic) and y + εb for ε = 1e-4, 3e-3, 1e-2, 3e-2 (b ~ N(0, 1),
  seed 123), λ = 1.4. Prints bᵀ(f_t(y + εb) − f_t(y)) / (ε·N) at five iterations: ε = 1e-4
  measures float32 chaos (≈ 3e-4·N whatever ε), ε ≥ 3e-3 the fit's response.
- ``epsilon``: which ε? At λ = 0.7 and 1.4, six members each: y, and y + εb for ε = 0.01, 0.03,
  0.05, −0.03 (probe b as above), and y + 0.03·b2 (seed 456). Prints, at six iterations, the
  true MSE against the clean image and, per ε, the divergence per pixel and SURE − MSE (1e-4
  units); "central" is the two-sided estimate from ε = ±0.03.

    python experiments/unseen/pilot/sure_pilots.py chaos moon.png
    python experiments/unseen/pilot/sure_pilots.py epsilon moon.png
"""

import sys
import time

import numpy as np
import torch

from pipeline.datasets import bundled_folder
from pipeline.fit import FitConfig, fit_many
from pipeline.problem import simulate
from pipeline.settings import fit_settings, load_yaml


def chaos(settings, problem, y) -> None:
    b = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
    eps = [0, 0, 1e-4, 3e-3, 1e-2, 3e-2]
    configs = [FitConfig.from_dict({**settings, "log_every": 1, "measure_every": 1}) for _ in eps]
    projections: dict[int, list[float]] = {i: [] for i in range(len(eps))}

    def record(view) -> None:
        projections[view.member].append(float((b * view.last_out).sum()))

    start = time.perf_counter()
    results = fit_many(
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
    print(
        "diff img member0 vs 1 (eps=0):", float((results[0].final - results[1].final).abs().max())
    )


def epsilon(settings, problem, y) -> None:
    N = y.numel()
    sig2 = (25 / 255) ** 2
    b = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
    b2 = torch.randn(y.shape, generator=torch.Generator().manual_seed(456))
    perturbations = [(0, b), (0.01, b), (0.03, b), (0.05, b), (-0.03, b), (0.03, b2)]
    members = [(lam, e, probe) for lam in (0.7, 1.4) for e, probe in perturbations]
    configs = [
        FitConfig.from_dict({**settings, "log_every": 1, "measure_every": 1, "lam": lam})
        for lam, _, _ in members
    ]
    proj: dict[int, list[float]] = {i: [] for i in range(len(members))}
    proj2: dict[int, list[float]] = {i: [] for i in range(len(members))}

    def record(view) -> None:
        proj[view.member].append(float((b * view.last_out).sum()))
        proj2[view.member].append(float((b2 * view.last_out).sum()))

    start = time.perf_counter()
    results = fit_many(
        [y + e * probe for _, e, probe in members],
        problem.task,
        configs,
        [record],
        cleans=[problem.clean] * len(members),
    )
    print("time", time.perf_counter() - start)
    P = np.array([proj[i] for i in range(len(members))])
    P2 = np.array([proj2[i] for i in range(len(members))])
    np.savez(
        "experiments/unseen/pilot/sure_epsilon.npz",
        P=P,
        psnr=np.array([r.curves["psnr"] for r in results]),
        loss=np.array([r.curves["loss"] for r in results]),
        ratio=np.array([r.curves["ratio"] for r in results]),
    )
    its = [99, 299, 599, 899, 1199, 1498]
    for li, lam in enumerate((0.7, 1.4)):
        base = li * 6
        mse = 10 ** (-np.array(results[base].curves["psnr"]) / 10)
        print(
            "lam",
            lam,
            "true mse",
            np.round(mse[its] * 1e4, 2),
            "psnr",
            np.round(results[base].curves["psnr"][its], 2),
        )
        for j in range(1, 6):
            e, probe = perturbations[j]
            projection = P if probe is b else P2
            d = (projection[base + j] - projection[base]) / e / N
            sure = results[base].curves["loss"] - sig2 + 2 * sig2 * d
            print(
                f"  eps {e:+.2f}: div/N",
                np.round(d[its], 3),
                "SURE-MSE (1e-4)",
                np.round((sure - mse)[its] * 1e4, 2),
            )
        d = (P[base + 2] - P[base + 4]) / (0.06) / N
        sure = results[base].curves["loss"] - sig2 + 2 * sig2 * d
        print(
            "  central 0.03: div/N",
            np.round(d[its], 3),
            "SURE-MSE",
            np.round((sure - mse)[its] * 1e4, 2),
        )


pilot, name = sys.argv[1], sys.argv[2]
params = load_yaml("profiles/cpu.yaml")
settings = fit_settings(params, "denoising", "gaussian", name)
problem = simulate(
    "denoising", bundled_folder() / name, {"sigma": 25, "seed": 0}, short_side=128, crop=64
)
{"chaos": chaos, "epsilon": epsilon}[pilot](settings, problem, problem.observation)
