"""Scoring finished fits: stopping rules on the logged curves, PSNR/SSIM under each task's protocol.

Every number names its protocol (experiments.md, "Protocols"): ``rgb`` is PSNR on [0,1] floats over
all channels of the 32-cropped image with no border shave (denoising, deblocking, inpainting,
enhancement); ``y`` is PSNR on the Y channel with a 4-pixel border removed (super-resolution, DIP's
script). PSNR values come from the float outputs logged during the fit; SSIM is computed on the
saved 8-bit images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.imageio import load_image
from pipeline.measures import ssim
from pipeline.results import CURVES_FILE, SUMMARY_FILE, read_curves
from pipeline.stopping import StoppingConfig, es_emv, es_wmv, oracle_peak, ratio_rule

RULES = ("ratio", "es_wmv", "es_emv", "oracle")


@dataclass(frozen=True)
class RunKey:
    """Where a run sits: ``runs/<task>/<variant>/<image>/<method>``."""

    task: str
    variant: str
    image: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.task}/{self.variant}/{self.image}/{self.method}"


def find_runs(root: Path) -> list[tuple[RunKey, Path]]:
    """Every finished fit under ``root`` (folders holding a summary), sweeps excluded."""
    found = []
    for summary in sorted(root.glob(f"*/*/*/*/{SUMMARY_FILE}")):
        folder = summary.parent
        parts = folder.relative_to(root).parts
        if parts[0] == "sweeps":
            continue
        found.append((RunKey(*parts), folder))
    return found


def stopping_of(summary: dict[str, Any]) -> StoppingConfig:
    """The stopping settings a fit ran with, from its summary's recorded settings."""
    names = {f.name for f in fields(StoppingConfig)}
    return StoppingConfig(**{k: v for k, v in summary["settings"].items() if k in names})


def rule_stops(curves: dict[str, np.ndarray], rules: StoppingConfig) -> dict[str, int | None]:
    """Measurement index at which each rule stops (None: never fired)."""
    return {
        "ratio": ratio_rule(
            curves["ratio"], rules.ratio_window, rules.ratio_eps, rules.ratio_scale
        ),
        "es_wmv": es_wmv(curves["wmv"], rules.wmv_patience),
        "es_emv": es_emv(curves["emv"], rules.emv_patience),
        "oracle": oracle_peak(curves["psnr"]),
    }


def _ssim_of(folder: Path, name: str, clean: Any) -> float | None:
    path = folder / name
    if clean is None or not path.is_file():
        return None
    return float(ssim(load_image(path), clean)[0])


def evaluate_run(key: RunKey, folder: Path) -> dict[str, Any]:
    """One row of the evaluation table for the fit in ``folder``, under the stopping settings
    the fit ran with."""
    curves = read_curves(folder / CURVES_FILE)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    rules = stopping_of(summary)
    iterations = curves["iteration"]
    budget = int(summary["settings"]["iterations"])
    psnr = curves["psnr"]
    last = len(iterations) - 1
    row: dict[str, Any] = {
        "task": key.task,
        "variant": key.variant,
        "image": key.image,
        "method": key.method,
        "set": summary.get("observation", {}).get("set", ""),
        "protocol": summary["settings"].get("psnr_protocol", "rgb"),
        "budget": budget,
        "psnr_final": float(psnr[last]),
        "wall_time_s": summary["wall_time_s"],
    }
    for rule, index in rule_stops(curves, rules).items():
        at = last if index is None else index
        row[f"{rule}_iteration"] = None if index is None else int(iterations[index])
        row[f"psnr_{rule}"] = float(psnr[at])
        if rule != "oracle":
            row[f"{rule}_saved"] = 0 if index is None else budget - int(iterations[index])
    clean_path = folder / "clean.png"
    clean = load_image(clean_path) if clean_path.is_file() else None
    row["ssim_stop"] = _ssim_of(folder, "restored_stop.png", clean)
    row["ssim_final"] = _ssim_of(folder, "restored_final.png", clean)
    row["ssim_oracle"] = _ssim_of(folder, "restored_best.png", clean)
    row["drop_from_peak"] = row["psnr_oracle"] - row["psnr_final"]
    row["stop_gap"] = row["psnr_oracle"] - row["psnr_ratio"]
    return row


def first_reaching(values: np.ndarray, iterations: np.ndarray, threshold: float) -> int | None:
    """First iteration at which ``values`` reaches ``threshold`` (None: never)."""
    hits = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= threshold)
    return int(iterations[hits[0]]) if hits.size else None


def fbc_summary(key: RunKey, folder: Path, thresholds: tuple[float, ...]) -> dict[str, Any]:
    """FBC milestones of one fit: per band the first iteration reaching each threshold, and the
    band values at the oracle peak, at the ratio-rule stop and at the end."""
    curves = read_curves(folder / CURVES_FILE)
    rules = stopping_of(json.loads((folder / SUMMARY_FILE).read_text()))
    iterations = curves["iteration"]
    bands = sorted(int(name[4:]) for name in curves if name.startswith("fbc_"))
    stops = rule_stops(curves, rules)
    row: dict[str, Any] = {
        "task": key.task,
        "variant": key.variant,
        "image": key.image,
        "method": key.method,
    }
    last = len(iterations) - 1
    points = {"peak": stops["oracle"], "stop": stops["ratio"], "final": last}
    for band in bands:
        values = curves[f"fbc_{band}"]
        for threshold in thresholds:
            row[f"band{band}_reaches_{threshold:g}"] = first_reaching(values, iterations, threshold)
        for name, index in points.items():
            row[f"band{band}_at_{name}"] = None if index is None else float(values[index])
    return row
