"""The results of bench/run.py as markdown: one section per benchmark that ran."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.batching import TARGET_WIDTH
from bench.overheads import GAUSSIAN_TARGET, LIPSCHITZ_TARGET


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def section(title: str, header: list[str], rows: list[list[str]], *notes: str) -> list[str]:
    """A section: its title, a table, then each note, every block after an empty line."""
    lines = [f"## {title}", "", markdown_table(header, rows)]
    for note in notes:
        lines += ["", note]
    return lines


def scaling_section(scale: dict[str, Any]) -> list[str]:
    peak = scale["matmul_peak_gflops"]
    rows = [
        [
            name,
            f"{row['step_ms']:.1f}",
            f"{row['step_ms_nchw']:.1f}",
            f"{row['gflop_per_step']:.2f}",
            f"{row['gflops_achieved']:.1f}",
            f"{row['gflops_achieved'] / peak:.0%}",
        ]
        for name, row in scale["sizes"].items()
    ]
    return section(
        "Step time of one fit (width 128, λ = 1.4, measures every iteration)",
        ["output", "ms / step", "NCHW", "GFLOP / step", "GFLOP/s", "of matmul peak"],
        rows,
        f"time ∝ pixels^{scale['exponent_128_512']:.3f} from 128² to 512² (target ≤ "
        f"{scale['exponent_target']}: {met(scale['exponent_met'])}; NCHW "
        f"^{scale['exponent_128_512_nchw']:.3f}); 64² → 128²: ^{scale['exponent_64_128']:.3f}. "
        f"Measured float32 peaks: matmul (torch.mm) {peak:.1f} GFLOP/s, one 128-channel 3×3 "
        f"convolution at 128² {scale['conv_peak_gflops']:.1f} GFLOP/s.",
    )


def overheads_section(over: dict[str, Any]) -> list[str]:
    rows = []
    for size, windows in over["network"].items():
        for window in ("early", "steady"):
            o = windows[window]
            ms = o["step_ms"]
            rows += [
                [
                    f"{size} {window}",
                    "Lipschitz vs none",
                    f"{ms['lipschitz']:.1f} / {ms['plain']:.1f}",
                    f"{o['lipschitz_vs_plain']:.3f}",
                    f"SVD per forward: {o['svd_vs_plain']:.3f}",
                ],
                [
                    f"{size} {window}",
                    "Gaussian vs bilinear",
                    f"{ms['gaussian']:.1f} / {ms['plain']:.1f}",
                    f"{o['gaussian_vs_bilinear']:.3f}",
                    f"plain ConvTranspose2d: {o['gaussian_naive_vs_bilinear']:.3f}",
                ],
            ]
    alone, fitted = over["measures_alone"], over["measured_fit"]
    ms = alone["step_ms"]
    rows.append(
        [
            f"{alone['size']}x{alone['size']}",
            "measures vs one conv step",
            f"{ms['measures']:.1f} / {ms['conv_step']:.1f}",
            f"{alone['measures_vs_conv_step']:.3f}",
            f"on the host: {ms['host_measures']:.1f} ms",
        ]
    )
    ms = fitted["step_ms"]
    rows.append(
        [
            f"{fitted['size']}x{fitted['size']}",
            "fit step, measures vs none",
            f"{ms['measured']:.1f} / {ms['unmeasured']:.1f}",
            f"{fitted['measures_vs_none']:.3f}",
            f"on the host: {fitted['host_measures_vs_none']:.3f}",
        ]
    )
    steady = all(windows["targets_met"] for windows in over["network"].values())
    return section(
        "Overheads (ms / step, width 128)",
        ["output", "overhead", "ms", "ratio", "naive"],
        rows,
        f"Targets (steady window): Lipschitz ≤ {LIPSCHITZ_TARGET}×, Gaussian ≤ "
        f"{GAUSSIAN_TARGET}×: {met(steady)}; measures ≤ {alone['target']:.0%} of a conv step: "
        f"{met(alone['met'])}.",
    )


def upsamplers_section(forms: dict[str, Any]) -> list[str]:
    names = [name for name in next(iter(forms.values())) if name != "bilinear"]
    rows = [
        [size, f"{row['bilinear']['median_ms']:.3f}"]
        + [f"{row[name]['ratio_vs_bilinear']:.2f}" for name in names]
        for size, row in forms.items()
    ]
    return section(
        "Upsamplers alone (128 channels, forward + backward; ratio to bilinear)",
        ["input", "bilinear ms", *names],
        rows,
    )


def batching_section(batch: dict[str, Any]) -> list[str]:
    rows = [
        [
            width,
            k,
            f"{row['step_ms']:.1f}",
            f"{row['fit_iterations_per_s']:.1f}",
            f"{row['sequential_fit_iterations_per_s']:.1f}",
            f"{row['speedup_vs_sequential']:.2f}×",
        ]
        for width in (str(TARGET_WIDTH), "128")
        for k, row in batch[width]["batched"].items()
    ]
    target = batch["target"]
    return section(
        "Batched fits at 64² (fit-iterations per second)",
        ["width", "K", "ms / step", "batched it/s", "sequential it/s", "speedup"],
        rows,
        f"Target K = {target['k']} at width {target['width']} ≥ {target['min_speedup']}×: "
        f"{target['speedup']:.2f}× ({met(target['met'])}).",
    )


def memory_section(memory: dict[str, Any]) -> list[str]:
    rows = [
        [name, f"{row['peak_mib']:.0f}", f"{row['per_fit_mib']:.0f}"]
        for name, row in memory["cases"].items()
    ]
    return section(
        "Peak memory (CPU: rise of the peak RSS while a fit is built and stepped)",
        ["case", "peak MiB", "per fit MiB"],
        rows,
    )


def paper_section(paper: dict[str, Any]) -> list[str]:
    hours = ", ".join(f"{h:.1f} h on {n} GPU(s)" for n, h in paper["gpu_hours"].items())
    cpu = paper["this_cpu_days"]
    return [
        "## The paper profile",
        "",
        f"{paper['fits']} fits, {paper['fit_iterations']:,} fit-iterations, images taken as "
        f"{paper['image_size_assumed']}; {paper['gflop_per_iteration']:.0f} GFLOP per iteration "
        f"(counted). {paper['basis']}: {paper['gpu_step_ms']:.1f} ms per iteration → {hours}."
        + ("" if cpu is None else f" On this CPU (measured step time): {cpu:.0f} days."),
    ]


def gpu_section(gpu: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            row.get("error", f"{row['step_ms']:.2f}" if "step_ms" in row else ""),
            f"{row['fit_iterations_per_s']:.1f}" if "step_ms" in row else "",
            f"{row['vs_plain_compiled']:.2f}×" if "vs_plain_compiled" in row else "",
            f"{row['first_step_s']:.1f}" if "step_ms" in row else "",
            f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "",
        ]
        for name, row in gpu["rows"].items()
    ]
    target = gpu["target"]
    best = (
        "no single fit was compared"
        if target["best"] is None
        else f"best {target['best']}: {target['ratio']:.2f}×"
    )
    skipped = [f"Skipped (out of budget): {', '.join(gpu['skipped'])}."] if gpu["skipped"] else []
    return section(
        f"GPU suite (width {gpu['width']}, median of {gpu['reps']} steps)",
        ["case", "ms / step", "fit it/s", "vs plain compiled", "first step s", "peak GiB"],
        rows,
        f"Target: a fit step ≤ {target['max_ratio']}× the plain compiled step: {best} "
        f"({met(target['met'])}).",
        *skipped,
    )


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "scaling": scaling_section,
    "overheads": overheads_section,
    "upsamplers": upsamplers_section,
    "batching": batching_section,
    "memory": memory_section,
    "paper": paper_section,
    "gpu": gpu_section,
}


def report(results: dict[str, Any]) -> str:
    """A title line with the environment, then a section per benchmark in ``results``."""
    env = results["environment"]
    lines = [
        f"# bench/run.py — {env['date']}, torch {env['torch']}, {env['threads']} threads"
        + (f", {env['cuda']}" if env["cuda"] else "")
        + f", load average {env['load_average_1min_start']:.2f} → "
        f"{env['load_average_1min_end']:.2f}"
    ]
    for name, section in SECTIONS.items():
        if name in results:
            lines += ["", *section(results[name])]
    return "\n".join(lines)
