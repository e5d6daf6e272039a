"""The paper's figures, redrawn from logged curves (matplotlib, headless).

- :func:`spectral_measurement` — PSNR and FBC bands vs iteration ("spectral measurement").
- :func:`sweep` — PSNR vs iteration for a λ or σ sweep (Figs. "Lipschitz/Gaussian control").
- :func:`automatic_stop` — PSNR and the blur/sharpness ratio with the rule's stop.
- :func:`restoration_grid` — observation / ours / clean, one row per task.

Each returns the matplotlib :class:`Figure` (so its drawn data can be inspected);
:func:`save_figure` writes it. :func:`sweep_figures`, :func:`restorations` and :func:`stop_figure`
pick the runs that the summary figures of ``sdip aggregate`` show.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from pipeline.errors import UserError
from pipeline.evaluation import read_run, rule_stops
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import run_dir, sweep_dir
from pipeline.results import CURVES_FILE, read_curves

SWEEP_FIGURES = {"lam": ("lambda_sweep", "λ"), "gauss_sigma": ("sigma_sweep", "σ")}
"""Swept setting → (figure name, its symbol)."""


def save_figure(figure: Figure, path: Path) -> None:
    """Write a figure as PNG atomically, then close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def spectral_measurement(curves: dict[str, np.ndarray], peak: int | None, title: str) -> Figure:
    """PSNR (top) and the FBC bands (bottom) against the iteration, with the oracle peak (a row
    of the curves) marked."""
    iterations = curves["iteration"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(iterations, curves["psnr"], color="black")
    top.set_ylabel("PSNR vs clean (dB)")
    top.set_title(title)
    bands = sorted(int(name[4:]) for name in curves if name.startswith("fbc_"))
    for band in bands:
        bottom.plot(iterations, curves[f"fbc_{band}"], label=f"band {band}")
    bottom.set_ylabel("FBC")
    bottom.set_xlabel("iteration")
    bottom.set_ylim(0, 1.02)
    bottom.legend(fontsize=8, ncol=len(bands))
    if peak is not None:
        for axis in (top, bottom):
            axis.axvline(iterations[peak], color="green", linestyle="--", linewidth=1)
    return figure


def sweep(series: dict[str, dict[str, np.ndarray]], label: str, title: str) -> Figure:
    """PSNR against the iteration, one line per swept value (``series``: value → curves)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for value, curves in series.items():
        axis.plot(curves["iteration"], curves["psnr"], label=f"{label} = {value}")
    axis.set_xlabel("iteration")
    axis.set_ylabel("PSNR vs clean (dB)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return figure


def automatic_stop(curves: dict[str, np.ndarray], stop: int | None, title: str) -> Figure:
    """PSNR (top) and the blur/sharpness ratio (bottom) against the iteration, with the ratio
    rule's stop (a row of the curves) marked."""
    iterations = curves["iteration"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(iterations, curves["psnr"], color="black")
    top.set_ylabel("PSNR (dB)")
    top.set_title(title)
    bottom.plot(iterations, curves["ratio"], color="tab:purple")
    # Log scale: the first outputs are nearly flat (sharpness ≈ 0), so the ratio starts ~1e5.
    bottom.set_yscale("log")
    bottom.set_ylabel("blur / sharpness")
    bottom.set_xlabel("iteration")
    if stop is not None:
        for axis in (top, bottom):
            axis.axvline(iterations[stop], color="green", linestyle="--", linewidth=1)
    return figure


def restoration_grid(rows: list[tuple[str, Path, Path, Path]]) -> Figure:
    """``rows``: (label, observation.png, restored.png, clean.png)."""
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for (label, *images), row in zip(rows, axes, strict=True):
        for image, axis, name in zip(
            images, row, ("observation", "ours (stop)", "clean"), strict=True
        ):
            with Image.open(image) as opened:
                pixels = np.asarray(opened)
            axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{label}: {name}", fontsize=8)
    return figure


def sweep_figures(sweeps: dict[str, Any]) -> dict[str, Figure]:
    """The λ and σ sweeps of params.yaml ``sweeps``, by figure name; a value whose run is
    missing is left out, a sweep with none is not drawn."""
    figures = {}
    for kind, (name, label) in SWEEP_FIGURES.items():
        paths = {str(value): sweep_dir(kind, value) / CURVES_FILE for value in sweeps.get(kind, [])}
        series = {value: read_curves(path) for value, path in paths.items() if path.is_file()}
        if series:
            title = f"{sweeps['task']} {sweeps['image']}: PSNR vs iteration, {label} sweep"
            figures[name] = sweep(series, label, title)
    return figures


def first_fit(evaluation: pd.DataFrame, task: str, method: str) -> pd.Series:
    """The first row of ``evaluation`` (the tidy frame of fits) for ``method`` on ``task``."""
    fits = evaluation[(evaluation["task"] == task) & (evaluation["method"] == method)]
    if fits.empty:
        raise UserError(f"no fit of method {method!r} on task {task!r} to draw")
    return fits.iloc[0]


def restorations(evaluation: pd.DataFrame, method: str) -> Figure:
    """:func:`restoration_grid` of the first fit of ``method`` in every task, at its ratio stop."""
    rows = []
    for task in sorted(set(evaluation["task"])):
        fit = first_fit(evaluation, task, method)
        folder = run_dir(task, fit["variant"], fit["image"], method)
        images = (folder / name for name in ("observation.png", "restored_stop.png", "clean.png"))
        rows.append((f"{task} {fit['variant']}", *images))
    return restoration_grid(rows)


def qualitative(evaluation: pd.DataFrame, task: str, image_set: str, method: str) -> Figure:
    """:func:`restoration_grid` of every fit of ``method`` on the images of ``image_set`` in
    ``task`` (e.g. the paper's region inpainting, whose holes have no ground truth)."""
    fits = evaluation[
        (evaluation["task"] == task)
        & (evaluation["set"] == image_set)
        & (evaluation["method"] == method)
    ]
    if fits.empty:
        raise UserError(f"no fit of method {method!r} on the {image_set!r} images of {task!r}")
    rows = []
    for _, fit in fits.sort_values("image").iterrows():
        folder = run_dir(task, fit["variant"], fit["image"], method)
        images = (folder / name for name in ("observation.png", "restored_stop.png", "clean.png"))
        rows.append((fit["image"], *images))
    return restoration_grid(rows)


def stop_figure(evaluation: pd.DataFrame, task: str, method: str) -> Figure:
    """:func:`automatic_stop` of the first fit of ``method`` on ``task``."""
    fit = first_fit(evaluation, task, method)
    curves, summary = read_run(run_dir(task, fit["variant"], fit["image"], method))
    stop = rule_stops(curves, summary)["ratio"]
    return automatic_stop(curves, stop, f"{task} {fit['image']} ({method}): ratio rule stop")
