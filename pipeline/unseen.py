"""The CPU profile's phenomena on images it was not calibrated on.

The profile's settings were calibrated on two images (README, "Default profile"). This check
runs its denoising protocol (``data`` resize and crop, ``tasks.denoising.observe``: σ and noise
seed) on a held-out group of bundled images, with λ of the full method (``aggregate.phenomena``'s
``controlled`` method) chosen per image without the clean image by
:func:`pipeline.lambda_choice.choose_lambda` at the stop it names (the SURE window rule or the
profile's ratio rule), and every fit running its budget so that the drop after the peak is seen.
Per image it reports the chosen λ, the stop, the PSNR at the peak, the stop and the budget, the
drop (peak − budget) and the stop's gap (peak − stop); the verdicts use the profile's own
thresholds (``aggregate.phenomena``):

- the controlled method's mean drop is at most ``max_controlled_drop``;
- on at least :data:`MIN_SHARE` of the images the rule stops before the budget within
  ``max_stop_gap`` of the peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.datasets import resolve_images
from pipeline.lambda_choice import GRID, choose_lambda
from pipeline.problem import simulate
from pipeline.settings import fit_settings, section

MIN_SHARE = 0.9
"""Share of the group on which the stop must fire within ``max_stop_gap``."""


def check_unseen(
    params: dict[str, Any],
    images: Sequence[str],
    candidates: Sequence[float] = GRID,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    stop: str = "sure",
) -> dict[str, Any]:
    """Run the check on the bundled ``images`` under ``params`` (a profile); returns
    ``{"images": [row, …], "summary": {…}, "verdicts": {…}}``. ``on_image`` is called with each
    row as it is done (progress, partial results); ``stop`` is the λ choice's stop
    (:data:`pipeline.lambda_choice.STOPS`)."""
    phenomena = section(params, "aggregate", "phenomena")
    data, observe = section(params, "data"), section(params, "tasks", "denoising", "observe")
    sigma = section(observe, "sigmas")[0]
    settings = fit_settings(params, "denoising", phenomena["controlled"])
    rows = []
    for source in resolve_images(data, "denoising", list(images)):
        problem = simulate(
            "denoising",
            source.path,
            {"sigma": sigma, "seed": observe.get("seed", 0)},
            short_side=data.get("resize"),
            crop=data.get("crop"),
        )
        choice = choose_lambda(
            problem, settings, candidates, sigma / 255, halt_at_stop=False, stop=stop
        )
        summary = choice.results[choice.chosen].summary()
        peak, stop, final = summary["psnr_best"], summary["psnr_stop"], summary["psnr_final"]
        row = {
            "image": source.name,
            "lam": choice.lam,
            "stop_rule": choice.stop,
            "stop_iteration": summary["stop_iteration"],
            "psnr_peak": peak,
            "psnr_stop": stop,
            "psnr_final": final,
            "drop": peak - final,
            "stop_gap": peak - stop,
            "candidates": choice.scores(),
        }
        rows.append(row)
        if on_image is not None:
            on_image(row)
    return {"images": rows, **verdicts(rows, phenomena)}


def verdicts(rows: list[dict[str, Any]], phenomena: dict[str, Any]) -> dict[str, Any]:
    """The group's summary and verdicts under the profile's thresholds (module docstring)."""
    drops = np.array([row["drop"] for row in rows])
    good_stops = np.array(
        [
            row["stop_iteration"] is not None and row["stop_gap"] <= phenomena["max_stop_gap"]
            for row in rows
        ]
    )
    fired = np.array([row["stop_iteration"] is not None for row in rows])
    summary = {
        "images": len(rows),
        "mean_drop": float(drops.mean()),
        "worst_drop": float(drops.max()),
        "stopped": float(fired.mean()),
        "stopped_within_gap": float(good_stops.mean()),
    }
    return {
        "summary": summary,
        "verdicts": {
            "controlled_drop": summary["mean_drop"] <= phenomena["max_controlled_drop"],
            "stop_within_gap": summary["stopped_within_gap"] >= MIN_SHARE,
        },
    }
