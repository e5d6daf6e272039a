"""Benchmarks of the fit engine: run the chosen ones, save their results, print the report.

CPU (the default; ``bench/results.json``): ``scaling`` (step time against size, FLOP/s),
``overheads`` (Lipschitz, Gaussian, measures, each beside its naive form), ``upsamplers`` (the
Gaussian upsampler's forms alone), ``batching`` (K fits in one engine against K single fits),
``memory`` (peak resident set per fit) and ``paper`` (the paper profile's estimated wall time).
``--gpu`` (``bench/results_gpu.json``): the GPU suite of bench/gpu.py, saved after every row, and
the paper estimate from its measured step. Each benchmark is a module of ``bench/``; medians of
interleaved repetitions (bench/common.py). Run from the repository root, on an otherwise idle
machine (the load average is recorded)::

    python -m bench.run [--quick] [--only scaling,overheads] [--threads N] [--out PATH]
    python -m bench.run --gpu [--parts reference,batched] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.batching import batching
from bench.common import ROOT, environment
from bench.gpu import Case, default_parts, gpu_suite
from bench.memory import memory
from bench.overheads import overheads
from bench.paper import DEFAULT_GPU_TFLOPS, iteration_gflop, paper_estimate
from bench.report import report
from bench.scaling import scaling
from bench.upsamplers import upsamplers
from pipeline.results import write_json
from pipeline.runtime import configure

CPU_BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "scaling": scaling,
    "overheads": overheads,
    "upsamplers": upsamplers,
    "batching": batching,
    "memory": memory,
}
"""Each takes ``quick`` and returns its results; ``paper`` comes last, from scaling's 512² row."""


def cpu_paper(results: dict[str, Any], gpu_tflops: float) -> dict[str, Any]:
    """The paper estimate from this run's 512² step (FLOPs and CPU time), or from a FLOP count
    alone when scaling did not run."""
    largest = results.get("scaling", {}).get("sizes", {}).get("512x512")
    if largest is None:
        return paper_estimate(iteration_gflop(), gpu_tflops)
    return paper_estimate(largest["gflop_per_step"], gpu_tflops, largest["step_ms"] / 1e3)


def names(text: str, known: list[str]) -> list[str]:
    chosen = [name for name in text.split(",") if name]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"error: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu = [*CPU_BENCHMARKS, "paper"]
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    parser.add_argument("--only", default=",".join(cpu), help=f"of {','.join(cpu)} (all)")
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (needs CUDA)")
    parser.add_argument("--parts", default=",".join(default_parts()), help="GPU suite parts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device")
    device = torch.device("cuda" if args.gpu else "cpu")
    configure(args.threads, "fp32", device)
    results: dict[str, Any] = {"environment": environment()}
    out = args.out or ROOT / "bench" / ("results_gpu.json" if args.gpu else "results.json")

    def save(partial: dict[str, Any] | None = None) -> None:
        if partial is not None:
            results["gpu"] = partial
        results["environment"]["load_average_1min_end"] = os.getloadavg()[0]
        write_json(out, results)

    if args.gpu:
        parts = default_parts()
        chosen = {name: parts[name] for name in names(args.parts, list(parts))}
        save(gpu_suite(parts=chosen, progress=save))
        step_ms = results["gpu"]["rows"].get(Case("fit").name, {}).get("step_ms")
        results["paper"] = paper_estimate(
            iteration_gflop("cuda"),
            args.gpu_tflops,
            gpu_step_s=None if step_ms is None else step_ms / 1e3,
        )
    else:
        chosen_cpu = names(args.only, cpu)
        for name, benchmark in CPU_BENCHMARKS.items():
            if name in chosen_cpu:
                results[name] = benchmark(args.quick)
        if "paper" in chosen_cpu:
            results["paper"] = cpu_paper(results, args.gpu_tflops)
        results["quick"] = args.quick
    save()
    print(report(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
