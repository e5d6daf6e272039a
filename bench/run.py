"""Benchmark suite of the fit loop (issue 5): scaling, overheads, batching, FLOP/s, memory.

Measures, on this machine, medians of interleaved repetitions where variants are compared:

1. Step time of one fit (``FitState.step``: forward, backward, measures, backtracking, Adam; the
   paper's decoder: width 128, λ = 1.4, bilinear) at 64², 128², 256², 512², channels-last (the
   default) and NCHW side by side, and the exponent b of a least-squares fit of time ∝ pixels^b from
   128² to 512² (target b ≤ 1.1).
2. Overheads, each beside its naive formulation, at 64² (and 128² without ``--quick``):
   Lipschitz vs none vs a full SVD per forward, Gaussian vs bilinear vs a plain depthwise
   ``conv_transpose2d`` with its kernel rebuilt per call (both from ``bench/layers_speed.py``),
   and, at 256², measures every iteration vs none vs the NumPy reference measures
   (``tests/numpy_reference.py``) with a host copy per iteration.
3. Batched throughput at 64² for K = 1, 2, 4, 8 against K sequential single fits, at width 32
   (the CPU profile's) and 128, in fit-iterations per second (target: K = 4 at width 32 ≥ 1.5×);
   and the choice of formulation: ``torch.func.vmap`` (pipeline.batched) against hand-written
   grouped convolutions and against running the K networks one after the other.
4. Achieved FLOP/s of a step (FLOPs counted by ``torch.utils.flop_counter``) against the
   machine's measured float32 matmul peak (and that of one 3×3 convolution alone).
5. Peak memory per fit: how far the peak resident set of a child process rises while it builds
   a fit and takes two steps, after a tiny warm-up fit (CPU); ``torch.cuda.max_memory_allocated``
   (GPU).
6. Estimated wall time of the ``paper`` profile (profiles/paper.yaml): its fits × iterations ×
   the FLOPs of one iteration at 512² (every image taken as 512²), over an *assumed* sustained GPU
   throughput (``--gpu-tflops``) unless a GPU was measured, and over the measured CPU step time.

``--gpu`` (on a CUDA machine) instead times 512², width 128: one fit and K = 1, 4, 8, 16 batched
fits, with and without each option (TF32, bf16, NCHW instead of channels-last, torch.compile),
with peak GPU memory, and writes ``bench/results_gpu.json``.

Run from the repository root, on an otherwise idle machine (the load average is recorded)::

    python bench/run.py [--quick] [--gpu] [--threads N] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bench.layers_speed import (
    build_networks,
    interleaved_medians,
    markdown_table,
    training_step,
)
from pipeline.degradations import Denoising
from pipeline.fit import FitConfig, FitState
from pipeline.lipschitz import CERTIFY_WARMUP
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.results import write_json
from pipeline.runtime import configure
from pipeline.settings import fit_settings, load_yaml, task_variants
from pipeline.upsample import GaussianUpsample
from tests import numpy_reference

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 128, 256, 512)
EXPONENT_SIZES = (128, 256, 512)
EXPONENT_TARGET = 1.1
BATCH_SIZES = (1, 2, 4, 8)
BATCH_TARGET = 1.5
BATCH_TARGET_WIDTH = 32
GPU_BATCH_SIZES = (1, 4, 8, 16)
PAPER_SIZE = 512
DEFAULT_GPU_TFLOPS = 30.0
"""Assumed sustained float32 throughput of one H100/H200-class GPU on these convolutions: about
45 % of its 67 TFLOP/s float32 peak. Only used when no GPU was measured; say so when quoting."""
GPU_COUNTS = (1, 4, 8)


def fit_config(width: int, iterations: int, **overrides: Any) -> FitConfig:
    """The paper's fit (FitConfig defaults: λ = 1.4, bilinear, measures every iteration)."""
    return FitConfig.from_dict(
        {"width": width, "iterations": iterations, "log_every": 10**9, **overrides}
    )


def problem(size: int, seed: int = 0) -> tuple[Denoising, Tensor, Tensor]:
    """A denoising problem (σ = 25) on a seeded random RGB image of size × size."""
    clean = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    task = Denoising(sigma=25, seed=seed)
    return task, task.observe(clean), clean


def single_state(size: int, width: int, iterations: int, **overrides: Any) -> FitState:
    task, y, clean = problem(size)
    return FitState([y], [task], [fit_config(width, iterations, **overrides)], [clean])


def batched_state(
    size: int, width: int, members: int, iterations: int, **overrides: Any
) -> FitState:
    """K members: different images, seeds and λ, as a batch of the tune stage or a sweep."""
    problems = [problem(size, seed) for seed in range(members)]
    configs = [
        fit_config(width, iterations, seed=seed, lam=1.0 + 0.1 * seed, **overrides)
        for seed in range(members)
    ]
    return FitState(
        [y for _, y, _ in problems],
        [task for task, _, _ in problems],
        configs,
        [clean for _, _, clean in problems],
    )


def call_times(step: Callable[[], object], reps: int, warmup: int) -> list[float]:
    """Seconds of each of ``reps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def timed_medians(step: Callable[[], object], reps: int, warmup: int) -> float:
    return statistics.median(call_times(step, reps, warmup))


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call (convolutions, matrix products; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def best_time(step: Callable[[], object], reps: int, warmup: int) -> float:
    return min(call_times(step, reps, warmup))


def matmul_peak(sizes: tuple[int, ...], reps: int) -> dict[str, float]:
    """Best float32 GFLOP/s of square matrix products (2n³ FLOPs each), per size."""
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
    x = torch.randn(1, 128, size, size, generator=generator)
    w = torch.randn(128, 128, 3, 3, generator=generator)
    flops = 2 * 128 * 128 * 9 * size * size
    return flops / best_time(lambda: F.conv2d(x, w, padding=1), reps, 2) / 1e9


def exponent(pixels: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) against log(pixels)."""
    return float(np.polyfit(np.log(pixels), np.log(seconds), 1)[0])


# --- 1. and 4.: scaling and FLOP/s --------------------------------------------------------------


def scaling(quick: bool) -> dict[str, Any]:
    """Step times at every size, channels-last (the default) and NCHW side by side."""
    rows = {}
    for size in SIZES:
        reps = 3 if size >= 256 else (5 if quick else 9)
        states = {
            "default": single_state(size, 128, iterations=2 * reps + 6),
            "nchw": single_state(size, 128, 2 * reps + 6, channels_last=False),
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
    pixels = [rows[f"{s}x{s}"]["pixels"] for s in EXPONENT_SIZES]
    b = exponent(pixels, [rows[f"{s}x{s}"]["step_ms"] for s in EXPONENT_SIZES])
    b_nchw = exponent(pixels, [rows[f"{s}x{s}"]["step_ms_nchw"] for s in EXPONENT_SIZES])
    small = [64 * 64, 128 * 128]
    return {
        "sizes": rows,
        "exponent_128_512": b,
        "exponent_128_512_nchw": b_nchw,
        "exponent_target": EXPONENT_TARGET,
        "exponent_met": b <= EXPONENT_TARGET,
        "exponent_64_128": exponent(small, [rows[f"{s}x{s}"]["step_ms"] for s in (64, 128)]),
    }


# --- 2.: overheads -------------------------------------------------------------------------------


def network_overheads(size: int, reps: int) -> dict[str, Any]:
    """Network steps (forward, backward, Adam) of bench/layers_speed's variants."""
    networks = build_networks(seed=0)
    z = make_input(DecoderConfig(), size, size, torch.Generator().manual_seed(1))
    target = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    steps = {name: training_step(net, z, target) for name, net in networks.items()}
    # Past the Lipschitz layers' certified warm-up: a fit is thousands of steps.
    medians = interleaved_medians(steps, reps=reps, warmup=CERTIFY_WARMUP + 3)
    return {name: 1e3 * t for name, t in medians.items()}


def numpy_measures_step(state: FitState) -> Callable[[], None]:
    """The naive per-iteration measures: copy the output to the host and run the NumPy
    reference (float64, full sort) of FBC, blur, sharpness and PSNR on it."""
    y = state.y[0].permute(1, 2, 0).double().cpu().numpy()

    def step() -> None:
        state.step()
        out = state.last_out[0].permute(1, 2, 0).double().cpu().numpy()
        numpy_reference.fbc(out, y)
        numpy_reference.blur(out)
        numpy_reference.sharpness(out)
        numpy_reference.psnr(out, y)

    return step


def measure_overheads(size: int, reps: int) -> dict[str, Any]:
    """Fit steps measuring every iteration, never (after the first), or through NumPy."""
    iterations = 3 * (reps + 3) + 1
    # Without backtracking, which acts on measured iterations only.
    every = single_state(size, 128, iterations, backtrack=False)
    never = single_state(size, 128, iterations, measure_every=10**9, backtrack=False)
    naive = single_state(size, 128, iterations, measure_every=10**9, backtrack=False)
    medians = interleaved_medians(
        {"measured": every.step, "unmeasured": never.step, "numpy": numpy_measures_step(naive)},
        reps=reps,
        warmup=3,
    )
    return {name: 1e3 * t for name, t in medians.items()}


def overheads(quick: bool) -> dict[str, Any]:
    """Network variants at 64² (and 128²); the measures at 256², where they weigh more."""
    network = {}
    for size in (64,) if quick else (64, 128):
        ms = network_overheads(size, reps=7 if quick else 15)
        network[f"{size}x{size}"] = {
            "step_ms": ms,
            "lipschitz_vs_plain": ms["lipschitz"] / ms["plain"],
            "svd_vs_plain": ms["svd"] / ms["plain"],
            "gaussian_vs_bilinear": ms["gaussian"] / ms["plain"],
            "gaussian_naive_vs_bilinear": ms["gaussian_naive"] / ms["plain"],
        }
    size = 256
    ms = measure_overheads(size, reps=5 if quick else 9)
    measures = {
        f"{size}x{size}": {
            "step_ms": ms,
            "measures_vs_none": ms["measured"] / ms["unmeasured"],
            "numpy_measures_vs_none": ms["numpy"] / ms["unmeasured"],
        }
    }
    return {"network": network, "measures": measures}


# --- 3.: batched throughput and the choice of formulation ----------------------------------------


def grouped_forward(
    template: Decoder, weights: dict[str, Tensor], buffers: dict[str, Tensor], z: Tensor
) -> Tensor:
    """The alternative to vmap, written by hand after ``Decoder.forward``: the K members as K
    channel groups of one (1, K·C, H, W) map, every convolution grouped (bilinear or Gaussian
    upsampling only). :func:`formulations` checks it against the vmapped forward."""
    members = z.shape[0]
    tensors = {**weights, **buffers}

    def conv(name: str, module: nn.Module, x: Tensor) -> Tensor:
        weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
        pad = (weight.shape[-1] - 1) // 2
        if pad and getattr(module, "padding", None) == "reflection":
            x, pad = F.pad(x, (pad,) * 4, mode="reflect"), 0
        return F.conv2d(x, weight.flatten(0, 1), bias.flatten(), padding=pad, groups=members)

    def norm(name: str, x: Tensor) -> Tensor:
        grouped = x.view(members, -1, *x.shape[-2:])
        bias = tensors[f"{name}.bias"][..., None, None]
        return (grouped - grouped.mean(dim=(-2, -1), keepdim=True) + bias).view(x.shape)

    def double(index: int, x: Tensor) -> Tensor:
        block, name = template.convs[index], f"convs.{index}"
        slope = block.act.negative_slope
        x = F.leaky_relu(norm(f"{name}.norm1", conv(f"{name}.conv1", block.conv1, x)), slope)
        return F.leaky_relu(norm(f"{name}.norm2", conv(f"{name}.conv2", block.conv2, x)), slope)

    x = double(0, z.reshape(1, -1, *z.shape[-2:]))
    for index, upsampler in enumerate(template.upsamplers, start=1):
        if isinstance(upsampler, GaussianUpsample):
            kernel = tensors[f"upsamplers.{index - 1}.weight"].flatten(0, 1)
            x = F.conv_transpose2d(
                x, kernel, stride=2, padding=2, output_padding=1, groups=kernel.shape[0]
            )
        else:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = double(index, x)
    return torch.sigmoid(conv("tail", template.tail, x)).view(members, -1, *x.shape[-2:])


def network_step(state: FitState, forward: Callable[[], Tensor]) -> Callable[[], None]:
    """Forward, summed losses, backward and Adam on the batch's parameters (no measures)."""
    y = state.monitor.observations.y

    def step() -> None:
        loss = F.mse_loss(forward(), y, reduction="none").mean(dim=(1, 2, 3)).sum()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()

    return step


def formulations(width: int, members: int, reps: int) -> dict[str, Any]:
    """vmap against hand-written grouped convolutions and K sequential networks (ms/step)."""
    state = batched_state(64, width, members, iterations=10)
    net = state.network
    with torch.no_grad():
        vmapped = net.forward()
        grouped = grouped_forward(net.template, net.weights(), net.buffers, net.z)
    error = float((vmapped - grouped).abs().max())
    if error > 1e-5:
        raise RuntimeError(f"grouped forward differs from the vmapped one by {error:.2e}")
    singles = [single_state(64, width, 10, seed=k, measure_every=10**9) for k in range(members)]

    def sequential() -> None:
        for single in singles:
            single.step()

    steps = {
        "vmap": network_step(state, net.forward),
        "grouped": network_step(
            state, lambda: grouped_forward(net.template, net.weights(), net.buffers, net.z)
        ),
        "sequential": sequential,
    }
    medians = interleaved_medians(steps, reps=reps, warmup=2)
    return {"members": members, "width": width, **{k: 1e3 * v for k, v in medians.items()}}


def batched_throughput(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for width in (BATCH_TARGET_WIDTH, 128):
        reps = 7 if quick else 15
        single = single_state(64, width, iterations=4 * (reps + 2) + 1)
        states = {k: batched_state(64, width, k, 4 * (reps + 2) + 1) for k in BATCH_SIZES}
        steps = {"single": single.step, **{f"K={k}": s.step for k, s in states.items()}}
        medians = interleaved_medians(steps, reps=reps, warmup=2)
        base = medians["single"]
        rows = {}
        for k in BATCH_SIZES:
            seconds = medians[f"K={k}"]
            rows[str(k)] = {
                "step_ms": 1e3 * seconds,
                "fit_iterations_per_s": k / seconds,
                "sequential_fit_iterations_per_s": 1 / base,
                "speedup_vs_sequential": k * base / seconds,
            }
        results[str(width)] = {"single_step_ms": 1e3 * base, "batched": rows}
    target_speedup = results[str(BATCH_TARGET_WIDTH)]["batched"]["4"]["speedup_vs_sequential"]
    results["target"] = {
        "k": 4,
        "width": BATCH_TARGET_WIDTH,
        "min_speedup": BATCH_TARGET,
        "speedup": target_speedup,
        "met": target_speedup >= BATCH_TARGET,
    }
    results["formulation"] = formulations(BATCH_TARGET_WIDTH, 4, 7 if quick else 15)
    return results


# --- 5.: memory ----------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    """A KiB field of /proc/self/status (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_probe(spec: str) -> None:
    """Child process: reset the peak RSS, build SIZE,WIDTH,K, take two steps, print how far the
    peak rose above the resident set at the reset (KiB)."""
    size, width, members = (int(v) for v in spec.split(","))
    # A tiny fit first, so that what any first fit loads (kernels, thread pools) is not counted.
    single_state(64, 8, iterations=2).step()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    before = _proc_status("VmRSS")
    if members == 1:
        state: FitState = single_state(size, width, iterations=4)
    else:
        state = batched_state(size, width, members, iterations=4)
    state.step()
    state.step()
    print(json.dumps({"peak_kib": _proc_status("VmHWM") - before}))


def memory(quick: bool, threads: int) -> dict[str, Any]:
    cases = [(size, 128, 1) for size in SIZES] + [(64, BATCH_TARGET_WIDTH, 1), (64, 32, 4)]
    if not quick:
        cases.append((64, 128, 4))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = {}
    for size, width, members in cases:
        done = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-probe",
                f"{size},{width},{members}",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
        )
        peak = int(json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"])
        rows[f"{size}x{size} width {width} K={members}"] = {
            "peak_mib": peak / 1024,
            "per_fit_mib": peak / 1024 / members,
        }
    return {
        "method": "peak RSS rise of a child process while it builds and steps the fit",
        "cases": rows,
    }


# --- 6.: the paper profile -----------------------------------------------------------------------


def paper_workload(path: Path = ROOT / "profiles" / "paper.yaml") -> dict[str, Any]:
    """Fits and iterations of the paper profile: every (task, variant, image, method), the λ and
    σ sweeps, and the tune stage's trials (an upper bound: trials end at their stop)."""
    params = load_yaml(path)
    groups = []
    for task, spec in params["tasks"].items():
        fits = len(spec["images"]) * len(task_variants(params, task))
        for method in params["methods"]:
            iterations = int(fit_settings(params, task, method)["iterations"])
            groups.append({"what": f"{task}/{method}", "fits": fits, "iterations": iterations})
    sweeps = params.get("sweeps") or {}
    if sweeps:
        for key, method in (("lam", "lipschitz"), ("gauss_sigma", "gaussian")):
            own = sweeps.get("iterations")
            iterations = int(own or fit_settings(params, sweeps["task"], method)["iterations"])
            groups.append(
                {"what": f"sweep {key}", "fits": len(sweeps[key]), "iterations": iterations}
            )
    tune = params.get("tune") or {}
    if tune.get("images"):
        trials = int((tune.get("settings") or {}).get("trials", 20))
        iterations = int(fit_settings(params, tune["task"], tune["method"])["iterations"])
        groups.append(
            {"what": "tune", "fits": len(tune["images"]) * trials, "iterations": iterations}
        )
    return {
        "groups": groups,
        "fits": sum(g["fits"] for g in groups),
        "fit_iterations": sum(g["fits"] * g["iterations"] for g in groups),
    }


def paper_estimate(
    gflop_per_iteration: float,
    cpu_step_s: float | None,
    gpu_tflops: float,
    gpu_step_s: float | None,
) -> dict[str, Any]:
    work = paper_workload()
    iterations = work["fit_iterations"]
    per_gpu_step = (
        gpu_step_s if gpu_step_s is not None else gflop_per_iteration / (1e3 * gpu_tflops)
    )
    one_gpu_h = iterations * per_gpu_step / 3600
    return {
        **work,
        "image_size_assumed": f"{PAPER_SIZE}x{PAPER_SIZE}",
        "gflop_per_iteration": gflop_per_iteration,
        "basis": (
            f"measured GPU step time at {PAPER_SIZE}²"
            if gpu_step_s is not None
            else f"ESTIMATE: CPU-counted FLOPs over an assumed {gpu_tflops:g} TFLOP/s per GPU"
        ),
        "gpu_step_ms": 1e3 * per_gpu_step,
        "gpu_hours": {str(n): one_gpu_h / n for n in GPU_COUNTS},
        "this_cpu_days": None if cpu_step_s is None else iterations * cpu_step_s / 86400,
    }


# --- the GPU script ------------------------------------------------------------------------------


GPU_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "tf32": {"precision": "tf32"},
    "bf16": {"precision": "bf16"},
    "nchw": {"channels_last": False},
    "compile": {"compile": True},
}


def gpu_suite(
    reps: int,
    device: str = "cuda",
    size: int = PAPER_SIZE,
    options: tuple[str, ...] = tuple(GPU_OPTIONS),
    batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES,
) -> dict[str, Any]:
    """Width 128 at size²: one fit and K batched fits, with and without each option (batched
    fits ignore channels-last; compile is timed for one fit and K = 4 only, its compilation
    taking minutes). ``device="cpu"`` runs the same code for a smoke test."""
    cuda = device.startswith("cuda")

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows: dict[str, Any] = {}
    for option in options:
        values = GPU_OPTIONS[option]
        cases: list[tuple[int, Callable[[], FitState]]] = [
            (0, lambda v=values: single_state(size, 128, 64, device=device, **v))
        ]
        if option != "nchw":
            members = batch_sizes if option != "compile" else (4,)
            cases += [
                (k, lambda k=k, v=values: batched_state(size, 128, k, 64, device=device, **v))
                for k in members
            ]
        # TF32 is a process-wide switch (pipeline.runtime): set for each row.
        configure(0, values.get("precision", "tf32"), torch.device(device))
        for members_count, build in cases:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            state = build()
            state.step()  # compiles when asked
            synchronize()

            def step(state: FitState = state) -> None:
                state.step()
                synchronize()

            seconds = timed_medians(step, reps, warmup=3)
            label = f"K={members_count}" if members_count else "single"
            rows[f"{option} {label}"] = {
                "step_ms": 1e3 * seconds,
                "fit_iterations_per_s": max(members_count, 1) / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
            print(f"{option:14s} {label:7s} {1e3 * seconds:9.2f} ms", flush=True)
            del state
    return rows


# --- report --------------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min_start": os.getloadavg()[0],
    }


def report(results: dict[str, Any]) -> str:
    env, scale = results["environment"], results["scaling"]
    lines = [
        f"# bench/run.py — {env['date']}, torch {env['torch']}, {env['threads']} threads, "
        f"load average {env['load_average_1min_start']:.2f} → {env['load_average_1min_end']:.2f}",
        "",
        "## Step time of one fit (width 128, λ = 1.4, measures every iteration)",
        "",
        markdown_table(
            ["output", "ms / step", "NCHW", "GFLOP / step", "GFLOP/s", "of matmul peak"],
            [
                [
                    name,
                    f"{row['step_ms']:.1f}",
                    f"{row['step_ms_nchw']:.1f}",
                    f"{row['gflop_per_step']:.2f}",
                    f"{row['gflops_achieved']:.1f}",
                    f"{row['gflops_achieved'] / results['matmul_peak_gflops']:.0%}",
                ]
                for name, row in scale["sizes"].items()
            ],
        ),
        "",
        f"time ∝ pixels^{scale['exponent_128_512']:.3f} from 128² to 512² (target ≤ "
        f"{EXPONENT_TARGET}: {'met' if scale['exponent_met'] else 'NOT met'}; NCHW "
        f"^{scale['exponent_128_512_nchw']:.3f}); 64² → 128²: "
        f"^{scale['exponent_64_128']:.3f}. Measured float32 peaks: matmul (torch.mm) "
        f"{results['matmul_peak_gflops']:.1f} GFLOP/s, one 128-channel 3×3 convolution at 128² "
        f"{results['conv_peak_gflops']:.1f} GFLOP/s.",
        "",
        "## Overheads (ms / step, width 128)",
        "",
    ]
    rows = []
    for size, o in results["overheads"]["network"].items():
        ms = o["step_ms"]
        rows += [
            [
                size,
                "Lipschitz vs none",
                f"{ms['lipschitz']:.1f} / {ms['plain']:.1f}",
                f"{o['lipschitz_vs_plain']:.3f}",
                f"SVD per forward: {o['svd_vs_plain']:.3f}",
            ],
            [
                size,
                "Gaussian vs bilinear",
                f"{ms['gaussian']:.1f} / {ms['plain']:.1f}",
                f"{o['gaussian_vs_bilinear']:.3f}",
                f"plain ConvTranspose2d: {o['gaussian_naive_vs_bilinear']:.3f}",
            ],
        ]
    for size, o in results["overheads"]["measures"].items():
        ms = o["step_ms"]
        rows.append(
            [
                size,
                "measures vs none",
                f"{ms['measured']:.1f} / {ms['unmeasured']:.1f}",
                f"{o['measures_vs_none']:.3f}",
                f"NumPy: {o['numpy_measures_vs_none']:.3f}",
            ]
        )
    lines += [markdown_table(["output", "overhead", "ms", "ratio", "naive ratio"], rows), ""]
    batch = results["batched"]
    lines += ["## Batched fits at 64² (fit-iterations per second)", ""]
    rows = []
    for width in (str(BATCH_TARGET_WIDTH), "128"):
        for k, row in batch[width]["batched"].items():
            rows.append(
                [
                    width,
                    k,
                    f"{row['step_ms']:.1f}",
                    f"{row['fit_iterations_per_s']:.1f}",
                    f"{row['sequential_fit_iterations_per_s']:.1f}",
                    f"{row['speedup_vs_sequential']:.2f}×",
                ]
            )
    lines.append(
        markdown_table(
            ["width", "K", "ms / step", "batched it/s", "sequential it/s", "speedup"], rows
        )
    )
    target, form = batch["target"], batch["formulation"]
    lines += [
        "",
        f"Target K = 4 at width {target['width']} ≥ {target['min_speedup']}×: "
        f"{target['speedup']:.2f}× ({'met' if target['met'] else 'NOT met'}). Formulation, K = "
        f"{form['members']}, width {form['width']}, network step only: vmap {form['vmap']:.1f} ms,"
        f" hand-written grouped convolutions {form['grouped']:.1f} ms, sequential "
        f"{form['sequential']:.1f} ms.",
        "",
        "## Peak memory (CPU: rise of the peak RSS while a fit is built and stepped)",
        "",
        markdown_table(
            ["case", "peak MiB", "per fit MiB"],
            [
                [name, f"{row['peak_mib']:.0f}", f"{row['per_fit_mib']:.0f}"]
                for name, row in results["memory"]["cases"].items()
            ],
        ),
        "",
    ]
    paper = results["paper"]
    lines += [
        "## The paper profile",
        "",
        f"{paper['fits']} fits, {paper['fit_iterations']:,} fit-iterations, images taken as "
        f"{paper['image_size_assumed']}; {paper['gflop_per_iteration']:.0f} GFLOP per iteration "
        f"(counted). {paper['basis']}: {paper['gpu_step_ms']:.1f} ms per iteration → "
        + ", ".join(f"{h:.1f} h on {n} GPU(s)" for n, h in paper["gpu_hours"].items())
        + f". On this CPU (measured step time): {paper['this_cpu_days']:.0f} days.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (needs CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    configure(args.threads or 0, "fp32", device)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    threads = torch.get_num_threads()
    results: dict[str, Any] = {"environment": environment(threads)}
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        results["gpu"] = gpu_suite(reps=10)
        single = results["gpu"]["fp32 single"]["step_ms"] / 1e3
        state = single_state(PAPER_SIZE, 128, iterations=4, device="cuda")
        flops = step_flops(state.step)
        results["paper"] = paper_estimate(flops / 1e9, None, args.gpu_tflops, single)
        results["environment"]["load_average_1min_end"] = os.getloadavg()[0]
        out = args.out or ROOT / "bench" / "results_gpu.json"
        write_json(out, results)
        env = results["environment"]
        print(f"\n# bench/run.py --gpu — {env['date']}, {env['cuda']}, torch {env['torch']}\n")
        rows = [
            [case, f"{row['step_ms']:.1f}", f"{row['fit_iterations_per_s']:.1f}",
             f"{row['peak_gib']:.2f}"]
            for case, row in results["gpu"].items()
        ]  # fmt: skip
        print(markdown_table(["512², width 128", "ms / step", "fit it/s", "peak GiB"], rows))
        paper = results["paper"]
        print(
            f"\npaper profile ({paper['basis']}): "
            + ", ".join(f"{h:.1f} h on {n} GPU(s)" for n, h in paper["gpu_hours"].items())
        )
        print(f"wrote {out}")
        return
    sizes = (1024, 2048) if args.quick else (1024, 2048, 4096)
    results["matmul_peak_gflops_by_size"] = matmul_peak(sizes, reps=5)
    results["matmul_peak_gflops"] = max(results["matmul_peak_gflops_by_size"].values())
    results["conv_peak_gflops"] = conv_peak(128, reps=5)
    results["scaling"] = scaling(args.quick)
    results["overheads"] = overheads(args.quick)
    results["batched"] = batched_throughput(args.quick)
    results["memory"] = memory(args.quick, threads)
    largest = results["scaling"]["sizes"][f"{PAPER_SIZE}x{PAPER_SIZE}"]
    results["paper"] = paper_estimate(
        largest["gflop_per_step"], largest["step_ms"] / 1e3, args.gpu_tflops, None
    )
    results["environment"]["load_average_1min_end"] = os.getloadavg()[0]
    results["quick"] = args.quick
    out = args.out or ROOT / "bench" / "results.json"
    write_json(out, results)
    print(report(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
