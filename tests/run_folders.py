"""Real run folders for the evaluation tests, written by :func:`pipeline.results.write_result`.

A run folder's curves are written by hand (so every stop, milestone and mean is known to the test);
its images are the clean image plus seeded noise, its settings those of the default profile
(profiles/cpu.yaml) shrunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.fit import FitConfig, FitResult
from pipeline.imageio import save_image
from pipeline.problem import Problem, simulate
from pipeline.results import write_result
from pipeline.settings import load_yaml
from pipeline.stopping import StoppingConfig

ROOT = Path(__file__).resolve().parents[1]
BANDS = 5
NOISE = {"final": 0.08, "at_stop": 0.04, "best": 0.02}
"""Noise (std) on the clean image of each saved restoration, so their SSIMs differ."""


def profile_settings(**overrides: Any) -> dict[str, Any]:
    """Flat fit settings of the default profile's DIP method (stopping < fit < methods.dip),
    at width 8, then ``overrides``."""
    profile = load_yaml(ROOT / "profiles" / "cpu.yaml")
    return {
        **StoppingConfig.flatten(profile["stopping"]),
        **profile["fit"],
        **profile["methods"]["dip"],
        "width": 8,
        **overrides,
    }


def denoising_problem(folder: Path, image: torch.Tensor, task: str = "denoising") -> Problem:
    """``task`` (denoising σ = 25 unless told) of ``image`` (64×64 or more), through
    :func:`pipeline.problem.simulate`."""
    path = folder / "source.png"
    folder.mkdir(parents=True, exist_ok=True)
    save_image(path, image)
    params = {"denoising": {"sigma": 25, "seed": 0}, "sr": {"factor": 4}}[task]
    return simulate(task, path, params)


def hand_curves(
    psnr: list[float],
    every: int = 1,
    ratio: list[float] | None = None,
    wmv: list[float] | None = None,
    emv: list[float] | None = None,
    fbc: dict[int, list[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Curves of ``len(psnr)`` measurements, one every ``every`` iterations; a curve not given
    is a ramp that no rule of these tests reads."""
    n = len(psnr)
    ramp = np.linspace(1.0, 2.0, n)
    given = {"ratio": ratio, "wmv": wmv, "emv": emv}
    curves = {
        "iteration": np.arange(n) * every,
        "loss": ramp / 100,
        "psnr": np.asarray(psnr, dtype=np.float64),
        "psnr_obs": ramp + 20,
        "blur": ramp,
        "sharpness": ramp,
        **{
            name: ramp if values is None else np.asarray(values, float)
            for name, values in given.items()
        },
    }
    for band in range(1, BANDS + 1):
        values = (fbc or {}).get(band)
        curves[f"fbc_{band}"] = ramp / 4 if values is None else np.asarray(values, float)
    return curves


def noisy(clean: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return (clean + std * noise).clamp(0, 1)


def write_run(
    runs: Path,
    key: tuple[str, str, str, str],
    problem: Problem,
    curves: dict[str, np.ndarray],
    stop_iteration: int | None,
    image_set: str = "bundled",
    wall_time: float = 1.5,
    **settings: Any,
) -> Path:
    """``runs/<task>/<variant>/<image>/<method>`` holding a fit with ``curves`` whose online ratio
    rule stopped at ``stop_iteration``; the budget is the curves' length × their spacing."""
    task, variant, image, method = key
    iterations = curves["iteration"]
    every = int(iterations[1] - iterations[0])
    config = FitConfig.from_dict(
        profile_settings(iterations=len(iterations) * every, measure_every=every, **settings)
    )
    clean = problem.clean
    result = FitResult(
        final=noisy(clean, NOISE["final"], 1),
        at_stop=noisy(clean, NOISE["at_stop"], 2),
        best=noisy(clean, NOISE["best"], 3),
        stop_iteration=stop_iteration,
        best_iteration=int(iterations[np.nanargmax(curves["psnr"])]),
        iterations_run=config.iterations,
        curves=curves,
        wall_time=wall_time,
        config=config,
    )
    folder = runs / task / variant / image / method
    extra = {
        "image": image,
        "method": method,
        "variant": variant,
        "observation": {"set": image_set},
    }
    write_result(folder, problem, result, extra)
    return folder
