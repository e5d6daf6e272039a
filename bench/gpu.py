"""The GPU suite (issue 9): the fit step at the paper's size, its options, and the plain decoder
step it is held against.

At 512², width 128, λ = 1.4, Gaussian upsampling, measures every iteration and backtracking on:

- ``fit`` rows: ``FitState.step`` of one fit (K = 1) and of K = 4, 8, 16 batched fits (and K = 8
  at 256²), under fp32 / tf32 / bf16, channels-last or NCHW, eager or ``torch.compile``;
- ``plain`` rows: the step of a plain decoder of the same shape (pipeline.model.Decoder with
  λ = 0: no Lipschitz control; no measures, no backtracking), bilinear or Gaussian, channels-last,
  with ``torch.backends.cudnn.benchmark``, eager and compiled: the reference of the issue's target,
  a full fit step ≤ 1.2× the plain compiled step of the same upsampling and precision
  (``vs_plain_compiled`` of each single-fit row).

Rows come in parts, most important first, each part with a time budget: a row starts only while
its part has budget left, so a short GPU session gets the rows that matter first; rows not started
are listed in ``skipped``. The TF32 switches (pipeline.runtime.configure) and cudnn.benchmark are
process-wide, so they are set before every row. A row that fails (out of memory, a compile error)
records its error and the suite goes on. ``device="cpu"`` runs the same code at small sizes
(tests/test_bench.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bench.common import PAPER_WIDTH, Timed, fit_state, interleaved_medians
from bench.overheads import training_step
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.runtime import configure

SIZE = 512
SMALL_SIZE = 256
TARGET = 1.2
"""The issue's target: a full fit step at most this many times the plain compiled step."""
WARMUP = 3


@dataclass(frozen=True)
class Case:
    """One row: a fit (``members`` ≥ 1) or a plain decoder step, and the options it runs with."""

    kind: str  # "fit" or "plain"
    members: int = 1
    size: int = SIZE
    precision: str = "tf32"
    channels_last: bool = True
    compile: bool = False
    upsample: str = "gaussian"
    cudnn_benchmark: bool = False

    @property
    def name(self) -> str:
        words = [
            self.kind,
            f"K={self.members}" if self.kind == "fit" else self.upsample,
            f"{self.size}²",
            self.precision,
            "channels-last" if self.channels_last else "NCHW",
            "compiled" if self.compile else "eager",
        ]
        return " ".join(words + ["cudnn.benchmark"] * self.cudnn_benchmark)


@dataclass(frozen=True)
class Part:
    """Cases in order of importance, and the seconds the part may take in all."""

    budget_s: float
    cases: tuple[Case, ...]


def default_parts(size: int = SIZE, small_size: int = SMALL_SIZE) -> dict[str, Part]:
    """The suite for a GPU session of about ten minutes: six of them in rows (a row that starts
    near the end of its part's budget may overrun it by its compilation, a minute or two)."""
    fit, plain = Case("fit", size=size), Case("plain", size=size, cudnn_benchmark=True)
    return {
        "reference": Part(
            150,
            (
                fit,
                plain,
                replace(plain, compile=True),
                replace(fit, compile=True),
                replace(fit, cudnn_benchmark=True),
                replace(plain, upsample="bilinear"),
                replace(plain, upsample="bilinear", compile=True),
            ),
        ),
        "precision": Part(
            90,
            (
                replace(fit, precision="fp32"),
                replace(fit, precision="bf16"),
                replace(fit, channels_last=False),
                replace(plain, precision="bf16", compile=True),
                replace(fit, precision="bf16", compile=True),
            ),
        ),
        "batched": Part(
            120,
            (
                replace(fit, members=4),
                replace(fit, members=8),
                replace(fit, members=16),
                replace(fit, members=8, size=small_size),
                replace(fit, members=8, precision="bf16"),
                replace(fit, members=8, precision="fp32"),
                replace(fit, members=4, compile=True),
            ),
        ),
    }


def fit_step(case: Case, width: int, iterations: int, device: str) -> Timed:
    """The fit engine's step for ``case`` (Gaussian upsampling, backtracking on)."""
    state = fit_state(
        case.size,
        width,
        iterations,
        case.members,
        device=device,
        upsample=case.upsample,
        backtrack=True,
        precision=case.precision,
        channels_last=case.channels_last,
        compile=case.compile,
    )
    return state.step


def plain_step(case: Case, width: int, device: str) -> Timed:
    """A plain decoder's training step for ``case`` (λ = 0, MSE to a random target, Adam)."""
    config = DecoderConfig(width=width, lam=0.0, upsample=case.upsample)
    model = Decoder(config, torch.Generator().manual_seed(0)).to(device)
    z = make_input(config, case.size, case.size, torch.Generator().manual_seed(1)).to(device)
    target = torch.rand(1, 3, case.size, case.size, generator=torch.Generator().manual_seed(2))
    if case.channels_last:
        model.to(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    network = torch.compile(model) if case.compile else model
    return training_step(network, z, target.to(device), bf16=case.precision == "bf16")


def time_case(case: Case, width: int, reps: int, device: str) -> dict[str, Any]:
    """Build the case's step under its process-wide settings, take a first step (compiling when
    asked), then the median of ``reps`` steps after a warm-up, each ended by a synchronisation."""
    cuda = torch.device(device).type == "cuda"
    configure(0, case.precision, torch.device(device))
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    if case.compile:
        torch._dynamo.reset()  # each compiled row starts from an empty cache
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    if case.kind == "fit":
        step = fit_step(case, width, 1 + WARMUP + reps, device)
    else:
        step = plain_step(case, width, device)

    def synchronized() -> None:
        step()
        synchronize()

    start = time.perf_counter()
    synchronized()
    first = time.perf_counter() - start
    seconds = interleaved_medians({"step": synchronized}, reps=reps, warmup=WARMUP)["step"]
    return {
        "step_ms": 1e3 * seconds,
        "fit_iterations_per_s": case.members / seconds,
        "first_step_s": first,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def against_plain(rows: dict[str, Any]) -> dict[str, Any]:
    """Each timed single-fit row over the plain compiled row of its size, upsampling and
    precision (``vs_plain_compiled``), and whether the best of them meets :data:`TARGET`."""
    compiled = {
        (row["size"], row["upsample"], row["precision"]): row["step_ms"]
        for row in rows.values()
        if row["kind"] == "plain" and row["compile"] and "step_ms" in row
    }
    ratios = {}
    for name, row in rows.items():
        key = (row["size"], row["upsample"], row["precision"])
        if row["kind"] == "fit" and row["members"] == 1 and "step_ms" in row and key in compiled:
            row["vs_plain_compiled"] = ratios[name] = row["step_ms"] / compiled[key]
    best = min(ratios, key=ratios.__getitem__, default=None)
    return {
        "max_ratio": TARGET,
        "best": best,
        "ratio": None if best is None else ratios[best],
        "met": best is not None and ratios[best] <= TARGET,
    }


def gpu_suite(
    device: str = "cuda",
    width: int = PAPER_WIDTH,
    reps: int = 10,
    parts: dict[str, Part] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every case of ``parts`` (default: :func:`default_parts`) within its part's budget;
    ``progress`` gets the results so far after every row (to save them as they come)."""
    parts = default_parts() if parts is None else parts
    results: dict[str, Any] = {"device": device, "width": width, "reps": reps, "rows": {}}
    results["skipped"] = []
    for part_name, part in parts.items():
        start = time.perf_counter()
        for case in part.cases:
            if time.perf_counter() - start >= part.budget_s:
                results["skipped"].append(case.name)
                continue
            row: dict[str, Any] = {"part": part_name, **asdict(case)}
            try:
                row |= time_case(case, width, reps, device)
            except RuntimeError as error:  # out of memory and compile errors are RuntimeErrors
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            results["rows"][case.name] = row
            summary = row.get("error") or f"{row['step_ms']:9.2f} ms"
            print(f"{case.name:60s} {summary}", flush=True)
            if progress is not None:
                progress(results)
    results["target"] = against_plain(results["rows"])
    return results
