"""The paper's figures, redrawn from logged curves (matplotlib, headless).

- :func:`spectral_measurement` — PSNR and FBC bands vs iteration ("spectral measurement").
- :func:`sweep` — PSNR vs iteration for a λ or σ sweep (Figs. "Lipschitz/Gaussian control").
- :func:`automatic_stop` — PSNR and the blur/sharpness ratio with the rule's stop.
- :func:`restoration_grid` — observation / ours / clean, one row per task.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.imageio import write_bytes_atomic


def save_figure(figure: Figure, path: Path) -> None:
    """Write a figure as PNG atomically, then close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def spectral_measurement(
    curves: dict[str, np.ndarray], peak: int | None, title: str, path: Path
) -> None:
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
    save_figure(figure, path)


def sweep(series: dict[str, dict[str, np.ndarray]], label: str, title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for value, curves in series.items():
        axis.plot(curves["iteration"], curves["psnr"], label=f"{label} = {value}")
    axis.set_xlabel("iteration")
    axis.set_ylabel("PSNR vs clean (dB)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def automatic_stop(curves: dict[str, np.ndarray], stop: int | None, title: str, path: Path) -> None:
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
    save_figure(figure, path)


def restoration_grid(rows: list[tuple[str, Path, Path, Path]], path: Path) -> None:
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
    save_figure(figure, path)
