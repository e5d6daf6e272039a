"""Estimated wall time of the ``paper`` profile (profiles/paper.yaml).

Its fits × iterations (:func:`paper_workload`) × the time of one iteration at 512² (every image
taken as 512²): a measured GPU step time when there is one, otherwise the FLOPs of one iteration
(counted on the CPU) over an *assumed* sustained GPU throughput, and the measured CPU step time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import PAPER_WIDTH, ROOT, fit_state, step_flops
from pipeline.fit import FitConfig
from pipeline.settings import fit_settings, load_yaml, task_variants

SIZE = 512
DEFAULT_GPU_TFLOPS = 30.0
"""Assumed sustained float32 throughput of one H100/H200-class GPU on these convolutions: about
45 % of its 67 TFLOP/s float32 peak. Only used when no GPU was measured; say so when quoting."""
GPU_COUNTS = (1, 4, 8)


def paper_workload(path: Path = ROOT / "profiles" / "paper.yaml") -> dict[str, Any]:
    """Fits and iterations of the profile: every (task, variant, image, method), the λ and σ
    sweeps, and the tune stage's trials (an upper bound: trials end at their stop)."""
    params = load_yaml(path)

    def iterations(task: str, method: str) -> int:
        return FitConfig.from_dict(fit_settings(params, task, method)).iterations

    groups = []
    for task, spec in params["tasks"].items():
        fits = len(spec["images"]) * len(task_variants(params, task))
        for method in params["methods"]:
            groups.append(
                {"what": f"{task}/{method}", "fits": fits, "iterations": iterations(task, method)}
            )
    sweeps = params.get("sweeps") or {}
    if sweeps:
        for key, method in (("lam", "lipschitz"), ("gauss_sigma", "gaussian")):
            own = sweeps.get("iterations")
            groups.append(
                {
                    "what": f"sweep {key}",
                    "fits": len(sweeps[key]),
                    "iterations": int(own or iterations(sweeps["task"], method)),
                }
            )
    tune = params.get("tune") or {}
    if tune.get("images"):
        trials = int((tune.get("settings") or {}).get("trials", 20))
        groups.append(
            {
                "what": "tune",
                "fits": len(tune["images"]) * trials,
                "iterations": iterations(tune["task"], tune["method"]),
            }
        )
    return {
        "groups": groups,
        "fits": sum(g["fits"] for g in groups),
        "fit_iterations": sum(g["fits"] * g["iterations"] for g in groups),
    }


def iteration_gflop(device: str = "cpu") -> float:
    """GFLOP of one iteration of the paper's fit at 512² (counted)."""
    return step_flops(fit_state(SIZE, PAPER_WIDTH, 1, device=device).step) / 1e9


def paper_estimate(
    gflop_per_iteration: float,
    gpu_tflops: float = DEFAULT_GPU_TFLOPS,
    cpu_step_s: float | None = None,
    gpu_step_s: float | None = None,
) -> dict[str, Any]:
    """GPU hours on 1, 4 and 8 GPUs (from ``gpu_step_s`` when measured, else from the FLOPs over
    ``gpu_tflops``) and, given ``cpu_step_s``, days on this CPU."""
    work = paper_workload()
    iterations = work["fit_iterations"]
    per_gpu_step = (
        gpu_step_s if gpu_step_s is not None else gflop_per_iteration / (1e3 * gpu_tflops)
    )
    one_gpu_h = iterations * per_gpu_step / 3600
    return {
        **work,
        "image_size_assumed": f"{SIZE}x{SIZE}",
        "gflop_per_iteration": gflop_per_iteration,
        "basis": (
            f"measured GPU step time at {SIZE}²"
            if gpu_step_s is not None
            else f"ESTIMATE: CPU-counted FLOPs over an assumed {gpu_tflops:g} TFLOP/s per GPU"
        ),
        "gpu_step_ms": 1e3 * per_gpu_step,
        "gpu_hours": {str(n): one_gpu_h / n for n in GPU_COUNTS},
        "this_cpu_days": None if cpu_step_s is None else iterations * cpu_step_s / 86400,
    }
