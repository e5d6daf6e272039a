"""Experiment "unseen", step 2: every λ criterion and every stopping rule, scored offline on the
curves ``collect.py`` recorded (no refitting: the rules and scores are pure functions of curves).

For each stopping rule R, each fit's output is the one at R's stop, or the budget's output where R
never fires (what a user gets). Per image, a λ criterion picks one of the grid's λ from what it
can see; its PSNR at its stop is compared with the oracle's pick (the best PSNR at the stop among
the grid) and with the fixed λ = 1.4 of the profile.

    python experiments/unseen/analyze.py            # writes results.json, prints the tables
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.lambda_choice import mc_sure
from pipeline.stopping import es_emv, es_wmv, ratio_rule

HERE = Path(__file__).parent
FIXED_LAM = 1.4
VARIANCE_PATIENCE = 1000
"""ES-WMV / ES-EMV patience of the CPU profile (params.yaml stopping)."""


@dataclass(frozen=True)
class Rule:
    """A stopping rule over one fit's curves; ``None`` where it never fires."""

    name: str
    stop: Callable[[dict[str, np.ndarray]], int | None]


def ratio(window: int, eps: float, scale: str) -> Rule:
    return Rule(
        f"ratio {scale} n={window} eps={eps:g}",
        lambda c: ratio_rule(c["ratio"], window, eps, scale),
    )


RULES = [
    ratio(100, 0.01, "absolute"),  # the paper's
    ratio(150, 0.1, "absolute"),  # the CPU profile's
    *[
        ratio(window, eps, scale)
        for scale in ("relative", "log")
        for window in (100, 150, 200)
        for eps in (0.005, 0.01, 0.02, 0.03, 0.05)
    ],
    Rule("es_wmv patience=1000", lambda c: es_wmv(c["wmv"], VARIANCE_PATIENCE)),
    Rule("es_emv patience=1000", lambda c: es_emv(c["emv"], VARIANCE_PATIENCE)),
    Rule("es_wmv patience=200", lambda c: es_wmv(c["wmv"], 200)),
    Rule("es_emv patience=200", lambda c: es_emv(c["emv"], 200)),
]


@dataclass
class Image:
    """The recorded curves of one validation image (collect.py)."""

    name: str
    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def lams(self) -> np.ndarray:
        return self.arrays["lam"]

    @property
    def budget(self) -> int:
        return self.arrays["grid_psnr"].shape[1]

    def grid(self, member: int) -> dict[str, np.ndarray]:
        return {
            key[len("grid_") :]: values[member].astype(np.float64)
            for key, values in self.arrays.items()
            if key.startswith("grid_")
        }

    def sure(self, member: int, sigma: float) -> np.ndarray:
        return mc_sure(
            self.arrays["grid_loss"][member],
            self.arrays["grid_projection"][member],
            self.arrays["sure_projection"][member],
            sigma,
            self.meta["eps"],
            self.meta["numel"],
        )


def load(folder: Path) -> list[Image]:
    images = []
    for meta_path in sorted(folder.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        with np.load(meta_path.with_suffix(".npz")) as npz:
            arrays = {key: npz[key] for key in npz.files}
        images.append(Image(meta["image"], meta, arrays))
    return images


def at_stop(stop: int | None, budget: int) -> int:
    """The index of the output a user gets: the stop's, or the budget's last."""
    return budget - 1 if stop is None else stop


def evaluate_image(image: Image, rule: Rule) -> dict:
    """Every criterion's λ and PSNR at its stop, the stops and gaps of every grid member."""
    lams, budget = image.lams, image.budget
    sigma, sigma_hat = image.meta["sigma"], image.meta["sigma_estimated"]
    members = range(len(lams))
    curves = [image.grid(m) for m in members]
    stops = [rule.stop(c) for c in curves]
    index = [at_stop(s, budget) for s in stops]
    psnr = np.array([c["psnr"][i] for c, i in zip(curves, index, strict=True)])
    peak = np.array([np.nanmax(c["psnr"]) for c in curves])
    final = np.array([c["psnr"][-1] for c in curves])
    sure = np.array([image.sure(m, sigma)[index[m]] for m in members])
    sure_hat = np.array([image.sure(m, sigma_hat)[index[m]] for m in members])
    sure_final = np.array([image.sure(m, sigma)[-1] for m in members])
    true_mse = 10 ** (-psnr / 10)
    loss = np.array([c["loss"][i] for c, i in zip(curves, index, strict=True)])
    fbc_gap = np.array([c["fbc_1"][i] - c["fbc_5"][i] for c, i in zip(curves, index, strict=True)])
    held = image.arrays["holdout_mse"]
    held_ratio = image.arrays["holdout_ratio"]
    folds = held.shape[0]
    fold_scores = np.array(
        [
            [
                held[f, m, at_stop(rule.stop({"ratio": held_ratio[f, m]}), budget)]
                if rule.name.startswith("ratio")
                else held[f, m, index[m]]
                for m in members
            ]
            for f in range(folds)
        ]
    )
    picks = {
        "oracle": int(np.nanargmax(psnr)),
        "fixed": int(np.argmin(np.abs(lams - FIXED_LAM))),
        "sure": int(np.nanargmin(sure)),
        "sure_sigma_hat": int(np.nanargmin(sure_hat)),
        "sure_final": int(np.nanargmin(sure_final)),
        "discrepancy": int(np.nanargmin(np.abs(loss - sigma**2))),
        "fbc_gap": int(np.nanargmax(fbc_gap)),
        **{f"holdout_{k}": int(np.nanargmin(fold_scores[:k].mean(axis=0))) for k in (1, folds)},
    }
    return {
        "image": image.name,
        "stops": stops,
        "psnr_stop": psnr.tolist(),
        "peak": peak.tolist(),
        "final": final.tolist(),
        "sure_error": (sure - true_mse).tolist(),
        "true_mse": true_mse.tolist(),
        "holdout_fold_scores": fold_scores.tolist(),
        "picks": {name: float(lams[m]) for name, m in picks.items()},
        "psnr": {name: float(psnr[m]) for name, m in picks.items()},
        "fired": {name: stops[m] is not None for name, m in picks.items()},
        "gap": {name: float(peak[m] - psnr[m]) for name, m in picks.items()},
        "drop": {name: float(peak[m] - final[m]) for name, m in picks.items()},
    }


def summarise(rows: list[dict], criterion: str) -> dict:
    """Mean and worst PSNR lost against the oracle's λ and the fixed λ; stop statistics."""
    vs_oracle = np.array([r["psnr"]["oracle"] - r["psnr"][criterion] for r in rows])
    vs_fixed = np.array([r["psnr"]["fixed"] - r["psnr"][criterion] for r in rows])
    fired = np.array([r["fired"][criterion] for r in rows])
    gap = np.array([r["gap"][criterion] for r in rows])
    drop = np.array([r["drop"][criterion] for r in rows])
    return {
        "mean_loss_vs_oracle": float(vs_oracle.mean()),
        "worst_loss_vs_oracle": float(vs_oracle.max()),
        "mean_loss_vs_fixed": float(vs_fixed.mean()),
        "worst_loss_vs_fixed": float(vs_fixed.max()),
        "mean_psnr": float(np.mean([r["psnr"][criterion] for r in rows])),
        "fired": float(fired.mean()),
        "within_1db": float((gap <= 1.0).mean()),
        "fired_within_1db": float((fired & (gap <= 1.0)).mean()),
        "mean_gap": float(gap.mean()),
        "mean_drop": float(drop.mean()),
        "drop_le_0.3": float((drop <= 0.3).mean()),
    }


def member_stop_stats(rows: list[dict]) -> dict:
    """Over every grid member of every image: fired before the budget, and within 1 dB."""
    fired = np.array([s is not None for r in rows for s in r["stops"]])
    gap = np.array([p - q for r in rows for p, q in zip(r["peak"], r["psnr_stop"], strict=True)])
    return {
        "fits": int(fired.size),
        "fired": float(fired.mean()),
        "within_1db": float((gap <= 1.0).mean()),
        "mean_gap": float(gap.mean()),
    }


def main() -> None:
    images = load(HERE / "curves")
    results: dict = {"images": [i.name for i in images], "rules": {}}
    for rule in RULES:
        rows = [evaluate_image(image, rule) for image in images]
        criteria = list(rows[0]["picks"])
        results["rules"][rule.name] = {
            "per_image": rows,
            "criteria": {c: summarise(rows, c) for c in criteria},
            "all_members": member_stop_stats(rows),
        }
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for name, entry in results["rules"].items():
        s, m = entry["criteria"]["sure"], entry["all_members"]
        print(
            f"{name:34s} SURE: loss vs oracle {s['mean_loss_vs_oracle']:.2f}/"
            f"{s['worst_loss_vs_oracle']:.2f}, vs fixed {s['mean_loss_vs_fixed']:+.2f}; "
            f"fired {s['fired']:.0%}, ≤1dB {s['within_1db']:.0%}; "
            f"all fits fired {m['fired']:.0%} ≤1dB {m['within_1db']:.0%}"
        )


if __name__ == "__main__":
    main()
