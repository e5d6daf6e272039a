"""Scoring finished fits: one tidy frame of fits (one row per fit) and one of FBC milestones.

Every number names its protocol (docs/experiments.md, "Protocols"): ``rgb`` is PSNR on [0,1]
floats over all channels of the 32-cropped image with no border shave (denoising, deblocking,
inpainting, enhancement); ``y`` is PSNR on the Y channel with a 4-pixel border removed
(super-resolution, DIP's script). PSNR values come from the float outputs logged during the fit
(``curves.csv``, measured under the fit's ``psnr_protocol``); SSIM is computed on the saved 8-bit
images.

Stops are row indices of the curves; the iteration columns are the curves' ``iteration`` at that
row (row × ``measure_every``). The ratio rule's stop is the fit's own online rule
(``summary.json["stop_iteration"]``, the iteration whose output is ``restored_stop.png``), so every
ratio column — iteration, PSNR, SSIM, iterations saved — comes from that one stop; ES-WMV, ES-EMV
and the oracle are offline rules on the logged curves (docs/method.md §5), under the settings the
fit recorded in ``summary.json["settings"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.imageio import load_image
from pipeline.layout import RESULTS, SWEEPS
from pipeline.measures import ssim
from pipeline.results import CURVES_FILE, SUMMARY_FILE, read_curves, read_summary
from pipeline.stopping import StoppingConfig, es_emv, es_wmv, oracle_peak

EVALUATION_CSV = RESULTS / "evaluation.csv"
FBC_CSV = RESULTS / "fbc.csv"
RULES = ("ratio", "es_wmv", "es_emv", "oracle")
KEYS = ("task", "variant", "image", "method")
"""The columns that name a fit: its folder ``runs/<task>/<variant>/<image>/<method>``."""


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
        if parts[0] == SWEEPS.name:
            continue
        found.append((RunKey(*parts), folder))
    return found


def stopping_of(summary: dict[str, Any]) -> StoppingConfig:
    """The stopping settings a fit ran with, from its summary's recorded settings."""
    names = {f.name for f in fields(StoppingConfig)}
    return StoppingConfig(**{k: v for k, v in summary["settings"].items() if k in names})


def row_of(curves: dict[str, np.ndarray], iteration: int | None) -> int | None:
    """The curves' row measured at ``iteration`` (None stays None)."""
    if iteration is None:
        return None
    rows = np.flatnonzero(curves["iteration"] == iteration)
    if not rows.size:
        raise UserError(f"iteration {iteration} was not measured (not in curves.csv)")
    return int(rows[0])


def rule_stops(curves: dict[str, np.ndarray], summary: dict[str, Any]) -> dict[str, int | None]:
    """Row of the curves at which each rule stops (None: never fired): the ratio rule's is the
    fit's online stop from its summary, the others are applied to the curves with the fit's
    recorded settings."""
    rules = stopping_of(summary)
    return {
        "ratio": row_of(curves, summary["stop_iteration"]),
        "es_wmv": es_wmv(curves["wmv"], rules.wmv_patience),
        "es_emv": es_emv(curves["emv"], rules.emv_patience),
        "oracle": oracle_peak(curves["psnr"]),
    }


def read_run(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A fit's logged curves and its summary."""
    return read_curves(folder / CURVES_FILE), read_summary(folder)


def _ssim_of(folder: Path, name: str, clean: Any) -> float | None:
    path = folder / name
    if clean is None or not path.is_file():
        return None
    return float(ssim(load_image(path), clean)[0])


def evaluate_run(key: RunKey, folder: Path) -> dict[str, Any]:
    """One row of the evaluation table for the fit in ``folder``: per rule the stop iteration,
    the PSNR there and (but for the oracle) the iterations saved against the budget, a rule that
    never fired counting as the budget; SSIM of the saved images at the ratio stop, the budget and
    the oracle peak; ``drop_from_peak`` = PSNR at the oracle peak − at the budget, ``stop_gap`` =
    at the oracle peak − at the ratio stop."""
    curves, summary = read_run(folder)
    iterations = curves["iteration"]
    budget = int(summary["settings"]["iterations"])
    psnr = curves["psnr"]
    last = len(iterations) - 1
    row: dict[str, Any] = {
        **{name: getattr(key, name) for name in KEYS},
        "set": summary.get("observation", {}).get("set", ""),
        "protocol": summary["settings"].get("psnr_protocol", "rgb"),
        "budget": budget,
        "psnr_final": float(psnr[last]),
        "wall_time_s": summary["wall_time_s"],
    }
    for rule, index in rule_stops(curves, summary).items():
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
    curves, summary = read_run(folder)
    iterations = curves["iteration"]
    bands = sorted(int(name[4:]) for name in curves if name.startswith("fbc_"))
    stops = rule_stops(curves, summary)
    row: dict[str, Any] = {name: getattr(key, name) for name in KEYS}
    points = {"peak": stops["oracle"], "stop": stops["ratio"], "final": len(iterations) - 1}
    for band in bands:
        values = curves[f"fbc_{band}"]
        for threshold in thresholds:
            row[f"band{band}_reaches_{threshold:g}"] = first_reaching(values, iterations, threshold)
        for name, index in points.items():
            row[f"band{band}_at_{name}"] = None if index is None else float(values[index])
    return row


def iteration_columns(frame: pd.DataFrame) -> list[str]:
    """Columns holding iterations (stops, savings, milestones, budget): integers with gaps."""
    return [
        c
        for c in frame.columns
        if c.endswith(("_iteration", "_saved")) or "_reaches_" in c or c == "budget"
    ]


def as_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows of dicts as a frame whose iteration columns are integers (``Int64``, gaps allowed)."""
    frame = pd.DataFrame(rows)
    return frame.astype({c: "Int64" for c in iteration_columns(frame)})


def evaluation_frame(root: Path) -> pd.DataFrame:
    """The tidy frame of fits: one :func:`evaluate_run` row per fit under ``root``."""
    rows = [evaluate_run(key, folder) for key, folder in find_runs(root)]
    if not rows:
        raise UserError(f"no finished fits under {root}")
    return as_frame(rows)


def fbc_frame(root: Path, thresholds: tuple[float, ...]) -> pd.DataFrame:
    """One :func:`fbc_summary` row per fit under ``root``."""
    rows = [fbc_summary(key, folder, thresholds) for key, folder in find_runs(root)]
    if not rows:
        raise UserError(f"no finished fits under {root}")
    return as_frame(rows)
