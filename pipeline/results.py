"""Writing and reading one fit's outputs: restored images, measured curves (CSV), summary (JSON).

Layout of a result folder::

    observation.png  clean.png (when known)
    restored_stop.png  restored_final.png  restored_best.png (when the clean image is known)
    curves.csv       one row per measured iteration
    summary.json     stop/peak/final scalars and the settings

Every file is written to a temporary name and renamed, so a crash leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from pipeline.imageio import save_image, write_bytes_atomic
from pipeline.problem import Problem

if TYPE_CHECKING:
    from pipeline.fit import FitConfig

CURVES_FILE = "curves.csv"
SUMMARY_FILE = "summary.json"


@dataclass
class FitResult:
    """What one fit produced. Images are restored images (1,C,H,W) on the CPU in [0,1]."""

    final: Tensor
    at_stop: Tensor
    best: Tensor | None
    stop_iteration: int | None
    best_iteration: int | None
    iterations_run: int
    curves: dict[str, np.ndarray]
    wall_time: float
    config: FitConfig

    def summary(self) -> dict[str, Any]:
        """Scalars of the fit: stop, peak and final values of the curves."""

        def at(name: str, iteration: int | None) -> float | None:
            if iteration is None:
                return None
            index = int(np.searchsorted(self.curves["iteration"], iteration))
            value = float(self.curves[name][index])
            return None if np.isnan(value) else value

        last = int(self.curves["iteration"][-1])
        return {
            "iterations_run": self.iterations_run,
            "stop_iteration": self.stop_iteration,
            "best_iteration": self.best_iteration,
            "psnr_final": at("psnr", last),
            "psnr_stop": at(
                "psnr", self.stop_iteration if self.stop_iteration is not None else last
            ),
            "psnr_best": at("psnr", self.best_iteration),
            "psnr_obs_final": at("psnr_obs", last),
            "wall_time_s": round(self.wall_time, 3),
        }


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_curves(path: str | os.PathLike[str], curves: dict[str, np.ndarray]) -> None:
    """Atomically write the curves as CSV, ``iteration`` first; NaN (not measured) as empty."""
    names = ["iteration"] + [name for name in curves if name != "iteration"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    columns = [np.asarray(curves[name]) for name in names]
    for row in zip(*columns, strict=True):
        writer.writerow(
            [
                int(v) if i == 0 else ("" if np.isnan(v) else f"{float(v):.7g}")
                for i, v in enumerate(row)
            ]
        )
    write_bytes_atomic(Path(path), buffer.getvalue().encode())


def read_curves(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a curves CSV back into float arrays (``iteration`` as int)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    names, body = rows[0], rows[1:]
    curves = {
        name: np.array([float(r[i]) if r[i] else np.nan for r in body], dtype=np.float64)
        for i, name in enumerate(names)
    }
    curves["iteration"] = curves["iteration"].astype(np.int64)
    return curves


def write_result(
    out_dir: str | os.PathLike[str],
    problem: Problem,
    result: FitResult,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a fit's images, curves and summary to ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "observation.png", problem.observation)
    if problem.clean is not None:
        save_image(out / "clean.png", problem.clean)
    save_image(out / "restored_stop.png", result.at_stop)
    save_image(out / "restored_final.png", result.final)
    if result.best is not None:
        save_image(out / "restored_best.png", result.best)
    write_curves(out / CURVES_FILE, result.curves)
    summary = {
        "task": problem.task.name,
        **result.summary(),
        "settings": result.config.flat(),
        **(extra or {}),
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary
