"""The paper's phenomena, checked on the evaluation of one task (the headline verdict).

Shi et al. 2022 (§3–§5) report that (1) the DIP baseline's PSNR decays from its peak as it fits the
noise, (2) Lipschitz-controlled convolutions (with Gaussian upsampling, the full method) do not,
(3) the blur/sharpness ratio rule stops before the budget (4) close to the oracle peak, and (5) the
low frequencies are fitted first: FBC band 1 reaches 0.9 before the highest band. Each is measured
on the rows of ``evaluation.csv`` and ``fbc.csv`` for ``settings["task"]`` (params.yaml
``aggregate.phenomena``) and judged against its threshold there.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.layout import RESULTS

PHENOMENA_JSON = RESULTS / "phenomena.json"
PHENOMENA_MD = RESULTS / "phenomena.md"
FBC_LEVEL = 0.9
"""The FBC value whose first crossing orders the bands (one of params.yaml ``fbc.thresholds``)."""


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def low_band_first(fbc: pd.DataFrame) -> pd.Series:
    """Per fit, whether FBC band 1 reaches :data:`FBC_LEVEL` and does so before the highest band
    (which may never reach it)."""
    bands = sorted({int(c[4 : c.index("_")]) for c in fbc.columns if c.startswith("band")})
    low = fbc[f"band1_reaches_{FBC_LEVEL:g}"]
    high = fbc[f"band{bands[-1]}_reaches_{FBC_LEVEL:g}"]
    return (low.notna() & (high.isna() | (low < high))).fillna(False).astype(bool)


def phenomena(
    evaluation: pd.DataFrame, fbc: pd.DataFrame, settings: dict[str, Any]
) -> dict[str, Any]:
    """The measured phenomena on ``settings['task']`` and their verdicts (``checks``).

    ``drop`` is ``drop_from_peak`` (PSNR at the oracle peak − at the budget), averaged per method;
    a ratio stop is early when it fired before the ``budget``; ``ratio_stop_gap_db`` averages, and
    the gap check bounds the largest, ``stop_gap`` (PSNR at the oracle peak − at the ratio stop) of
    the controlled method; the FBC order is judged on the baseline's fits.
    """
    task, base, controlled = settings["task"], settings["baseline"], settings["controlled"]
    rows = evaluation[evaluation["task"] == task]
    drops = rows.groupby("method")["drop_from_peak"].mean()
    stops = rows[rows["method"] == controlled]
    early = (stops["ratio_iteration"] < stops["budget"]).fillna(False).astype(bool)
    gaps = stops["stop_gap"]
    order = low_band_first(fbc[(fbc["task"] == task) & (fbc["method"] == base)])
    result: dict[str, Any] = {
        "task": task,
        "controlled": controlled,
        "drop_db_by_method": {method: float(drop) for method, drop in drops.items()},
        "baseline_drop_db": _mean(rows.loc[rows["method"] == base, "drop_from_peak"]),
        "controlled_drop_db": _mean(stops["drop_from_peak"]),
        "ratio_stops_before_budget": f"{int(early.sum())}/{len(early)}",
        "ratio_stop_gap_db": _mean(gaps),
        "fbc_low_band_first": f"{int(order.sum())}/{len(order)}",
    }
    baseline_drop, controlled_drop = result["baseline_drop_db"], result["controlled_drop_db"]
    least_drop, most_drop = settings["min_baseline_drop"], settings["max_controlled_drop"]
    most_gap = settings["max_stop_gap"]
    result["checks"] = {
        f"baseline falls >= {least_drop} dB below its peak": (
            baseline_drop is not None and baseline_drop >= least_drop
        ),
        f"{controlled} falls <= {most_drop} dB below its peak": (
            controlled_drop is not None and controlled_drop <= most_drop
        ),
        "ratio rule stops before the budget": len(early) > 0 and bool(early.all()),
        f"ratio stop within {most_gap} dB of the oracle peak": (
            len(gaps) > 0 and bool(gaps.max() <= most_gap)
        ),
        f"FBC band 1 reaches {FBC_LEVEL:g} before the highest band": (
            len(order) > 0 and bool(order.all())
        ),
    }
    return result


def _shown(value: object) -> str:
    """A measured value as read in a report: dB to 2 decimals, per method as ``name value``."""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{name} {_shown(item)}" for name, item in value.items())
    return str(value)


def phenomena_markdown(found: dict[str, Any]) -> str:
    """The verdicts as a checklist, then the measured values (phenomena.json has them unrounded)."""
    checks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in found["checks"].items()]
    values = [f"- {name}: {_shown(value)}" for name, value in found.items() if name != "checks"]
    return "\n".join(checks) + "\n\n" + "\n".join(values) + "\n"
