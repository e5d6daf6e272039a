"""Experiment "unseen", step 2: every λ criterion and every stopping rule, scored offline on the
curves ``collect.py`` recorded (no refitting: the rules and scores are pure functions of curves).

For each stopping rule R, each fit's output is the one at R's stop, or the budget's output where R
never fires (what a user gets). Per image, a λ criterion picks one of the grid's λ from what it
can see; its PSNR at its stop is compared with the oracle's pick (the best PSNR at the stop among
the grid) and with the fixed λ = 1.4 of the profile.

    python experiments/unseen/analyze.py     # writes results.json and tables.md, prints a digest
    python experiments/unseen/analyze.py --curves test_curves --prefix test_   # the test group
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lambda_choice import mc_sure
from pipeline.settings import load_yaml
from pipeline.stopping import (
    es_emv,
    es_wmv,
    patience_stop,
    ratio_rule,
    sure_window_rule,
    trailing_means,
)
from pipeline.tuning import spearman
from pipeline.unseen import verdicts

HERE = Path(__file__).parent
PHENOMENA = load_yaml(HERE.parents[1] / "profiles" / "cpu.yaml")["aggregate"]["phenomena"]
FIXED_LAM = 1.4
VARIANCE_PATIENCE = 1000
"""ES-WMV / ES-EMV patience of the CPU profile (params.yaml stopping)."""
GOOD_GAP_DB = 1.0
MAX_DROP_DB = 0.3
"""The CPU profile's bound on the controlled method's drop (aggregate.phenomena)."""
TARGET_SHARE = 0.9
FEASIBILITY_WINDOW = 50
"""drop_feasibility's window for the mean of SURE at the budget."""


def sure_at(curves: dict[str, np.ndarray], index: int) -> float:
    """MC-SURE of the output at ``index``: the λ criterion's score under most rules."""
    return float(curves["sure"][index])


@dataclass(frozen=True)
class Rule:
    """A stopping rule over one fit's curves: the index of the output it keeps (``None``
    where it never fires); ``score`` is MC-SURE's score of the output at an index."""

    name: str
    stop: Callable[[dict[str, np.ndarray]], int | None]
    score: Callable[[dict[str, np.ndarray], int], float] = sure_at

    @property
    def on_ratio(self) -> bool:
        return self.name.startswith("ratio")


def ratio(window: int, eps: float, scale: str) -> Rule:
    return Rule(
        f"ratio {scale} n={window} eps={eps:g}",
        lambda c: ratio_rule(c["ratio"], window, eps, scale),
    )


def warmed(curve: np.ndarray, skip: int = 100) -> np.ndarray:
    """``curve`` with its first ``skip`` values set to NaN (ignored by the patience rules)."""
    return np.concatenate([np.full(skip, np.nan), curve[skip:]])


def emv_from(curves: dict[str, np.ndarray], patience: int, skip: int) -> int | None:
    return es_emv(warmed(curves["emv"], skip), patience)


def sure_smoothed(curves: dict[str, np.ndarray], window: int, patience: int) -> int | None:
    """The patience rule on the mean of the last ``window`` SURE values (NaN before)."""
    c = np.concatenate([[0.0], np.cumsum(curves["sure"])])
    mean = np.full(len(curves["sure"]), np.nan)
    mean[window - 1 :] = (c[window:] - c[:-window]) / window
    return patience_stop(mean, patience)


def sure_window_kept(curves: dict[str, np.ndarray], **rule: Any) -> int | None:
    stop = sure_window_rule(curves["sure"], float(curves["noise_var"]), **rule)
    return None if stop is None else stop.kept


def sure_window_score(curves: dict[str, np.ndarray], index: int, **rule: Any) -> float:
    """The least window mean of SURE up to the rule's stop (where it does not fire, the mean of
    the last w values, at the budget's ``index``), as choose_lambda scores a candidate."""
    stop = sure_window_rule(curves["sure"], float(curves["noise_var"]), **rule)
    means = trailing_means(curves["sure"], rule["window"])
    return float(means[index] if stop is None else means[stop.best])


def sure_window(window: int, delta: float, threshold: str = "noise", keep: str = "last") -> Rule:
    """The SURE window rule (pipeline.stopping.sure_window_rule) as choose_lambda runs it."""
    form = "" if (threshold, keep) == ("noise", "last") else f"{threshold} {keep} "
    rule = {"window": window, "delta": delta, "threshold": threshold, "keep": keep}
    return Rule(
        f"sure window {form}w={window} delta={delta:g}",
        partial(sure_window_kept, **rule),
        partial(sure_window_score, **rule),
    )


NOISE_RULE = sure_window(50, 0.01).name
"""The SURE window rule preregistered before the first test group (δσ², the least window's
last iterate)."""
LEVEL_RULE = sure_window(25, 0.01, "level", "centre").name
"""The relative SURE window rule preregistered before the third test group (δ|S̄|, the least
window's centre)."""


def emv_corrected(curves: dict[str, np.ndarray], patience: int, alpha: float = 0.1) -> int | None:
    """ES-EMV on the EMV divided by its start-up weight 1 − (1 − α)^m (as Adam's moments): the
    recorded EMV starts at 0 and is biased low for about 1/α measurements."""
    emv = curves["emv"]
    weight = 1 - (1 - alpha) ** np.arange(len(emv))
    with np.errstate(invalid="ignore", divide="ignore"):
        return es_emv(np.where(weight > 0, emv / weight, np.nan), patience)


def wmv_with(curves: dict[str, np.ndarray], patience: int) -> int | None:
    return es_wmv(curves["wmv"], patience)


PAPER_RULE = "ratio absolute n=100 eps=0.01"
PROFILE_RULE = "ratio absolute n=150 eps=0.1"
REPORT_RULES = [
    PROFILE_RULE,
    PAPER_RULE,
    "ratio relative n=150 eps=0.02",
    "ratio relative n=150 eps=0.03",
    "ratio log n=150 eps=0.02",
    "ratio log n=150 eps=0.03",
    "ratio log n=150 eps=0.07",
    "ratio log n=200 eps=0.03",
    "es_wmv patience=1000",
    "es_wmv patience=200",
    "es_emv patience=1000",
    "es_emv patience=200 from 10",
    "sure mean50 patience=100",
    NOISE_RULE,
    LEVEL_RULE,
]
RULES = [
    ratio(100, 0.01, "absolute"),
    ratio(150, 0.1, "absolute"),
    *[ratio(150, eps, "absolute") for eps in (0.05, 0.2, 0.3, 0.5)],
    *[
        ratio(window, eps, scale)
        for scale in ("relative", "log")
        for window in (100, 150, 200)
        for eps in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1)
    ],
    Rule("es_wmv patience=1000", lambda c: es_wmv(c["wmv"], VARIANCE_PATIENCE)),
    Rule("es_emv patience=1000", lambda c: es_emv(c["emv"], VARIANCE_PATIENCE)),
    Rule("es_wmv patience=200", lambda c: es_wmv(c["wmv"], 200)),
    Rule("es_emv patience=200", lambda c: es_emv(c["emv"], 200)),
    # The EMV curve starts at 0 (no deviation yet), so ES-EMV as recorded stops at 0 after its
    # patience; these variants skip the first 100 measurements, as ES-WMV's window does.
    Rule("es_emv patience=1000 from 100", lambda c: es_emv(warmed(c["emv"]), VARIANCE_PATIENCE)),
    *[
        Rule(f"es_emv patience={p} from {skip}", partial(emv_from, patience=p, skip=skip))
        for p in (100, 200, 300)
        for skip in (10, 100)
    ],
    *[Rule(f"es_wmv patience={p}", partial(wmv_with, patience=p)) for p in (100, 300)],
    *[
        Rule(f"es_emv patience={p} bias-corrected", partial(emv_corrected, patience=p))
        for p in (200, 1000)
    ],
    # Need MC-SURE's twin fit: the running minimum of the SURE curve (true σ), raw or averaged
    # over a trailing window; and its minimum over the whole budget (no time saved).
    Rule("sure patience=200", lambda c: patience_stop(c["sure"], 200)),
    *[
        Rule(f"sure mean{w} patience={p}", partial(sure_smoothed, window=w, patience=p))
        for w in (25, 50, 100)
        for p in (100, 200, 300)
    ],
    Rule("sure argmin", lambda c: int(np.nanargmin(c["sure"]))),
    *[sure_window(w, d) for w in (25, 50, 100) for d in (0.005, 0.01, 0.02, 0.05)],
    *[
        sure_window(w, d, "level", keep)
        for w in (20, 25, 30, 50)
        for d in (0.005, 0.01, 0.02, 0.03)
        for keep in ("last", "centre")
    ],
]


@dataclass
class Image:
    """The recorded curves of one validation image (collect.py), hold-out part if recorded."""

    name: str
    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def lams(self) -> np.ndarray:
        return self.arrays["lam"]

    @property
    def budget(self) -> int:
        return self.arrays["grid_psnr"].shape[1]

    @property
    def has_holdout(self) -> bool:
        return "holdout_mse" in self.arrays

    def sure(self, member: int, sigma: float) -> np.ndarray:
        return mc_sure(
            self.arrays["grid_loss"][member],
            self.arrays["grid_projection"][member],
            self.arrays["sure_projection"][member],
            sigma,
            self.meta["eps"],
            self.meta["numel"],
        )

    def grid(self, member: int) -> dict[str, np.ndarray]:
        """Member ``member``'s curves, with its SURE curve (true σ) as ``sure``."""
        curves = {
            key[len("grid_") :]: values[member].astype(np.float64)
            for key, values in self.arrays.items()
            if key.startswith("grid_")
        }
        return {
            **curves,
            "sure": self.sure(member, self.meta["sigma"]),
            "noise_var": np.float64(self.meta["sigma"] ** 2),
        }


def load(folder: Path) -> list[Image]:
    images = []
    for meta_path in sorted(folder.glob("*.json")):
        if meta_path.name.endswith(".holdout.json"):
            continue
        meta = json.loads(meta_path.read_text())
        arrays: dict[str, np.ndarray] = {}
        for path in (meta_path.with_suffix(".npz"), folder / f"{meta['image']}.holdout.npz"):
            if path.is_file():
                with np.load(path) as npz:
                    arrays.update({key: npz[key] for key in npz.files})
        images.append(Image(meta["image"], meta, arrays))
    return images


def as_db(mse: float) -> float:
    """PSNR of an MSE estimate; SURE can be ≤ 0, read as a perfect estimate (+inf)."""
    return 10 * np.log10(1 / mse) if mse > 0 else np.inf


def at_stop(stop: int | None, budget: int) -> int:
    """The index of the output a user gets: the stop's, or the budget's last."""
    return budget - 1 if stop is None else stop


def holdout_scores(image: Image, rule: Rule, index: list[int]) -> np.ndarray:
    """(folds, λ) held-out MSE of each hold-out fit at its own stop (its own ratio curve under a
    ratio rule; the full fit's stop under the others, whose curves were not recorded for it)."""
    held, held_ratio = image.arrays["holdout_mse"], image.arrays["holdout_ratio"]
    folds, count, _ = held.shape
    scores = np.empty((folds, count))
    for f in range(folds):
        for m in range(count):
            stop = (
                at_stop(rule.stop({"ratio": held_ratio[f, m].astype(np.float64)}), image.budget)
                if rule.on_ratio
                else index[m]
            )
            scores[f, m] = held[f, m, stop]
    return scores


def evaluate_image(image: Image, rule: Rule) -> dict:
    """Every criterion's λ and PSNR at its stop, the stops and gaps of every grid member."""
    lams, budget = image.lams, image.budget
    sigma, sigma_hat = image.meta["sigma"], image.meta["sigma_estimated"]
    members = range(len(lams))
    curves = [image.grid(m) for m in members]
    stops = [rule.stop(c) for c in curves]
    index = [at_stop(s, budget) for s in stops]

    def at(values: list[np.ndarray]) -> np.ndarray:
        return np.array([v[i] for v, i in zip(values, index, strict=True)])

    psnr = at([c["psnr"] for c in curves])
    peak = np.array([np.nanmax(c["psnr"]) for c in curves])
    final = np.array([c["psnr"][-1] for c in curves])
    sure = np.array([rule.score(c, i) for c, i in zip(curves, index, strict=True)])
    # With σ estimated from y, as for a user's photo: SURE and the rule's stop both read σ̂.
    hat_curves = [
        {**c, "sure": image.sure(m, sigma_hat), "noise_var": np.float64(sigma_hat**2)}
        for m, c in zip(members, curves, strict=True)
    ]
    hat_stops = [rule.stop(c) for c in hat_curves]
    hat_index = [at_stop(s, budget) for s in hat_stops]
    sure_hat = np.array([rule.score(c, i) for c, i in zip(hat_curves, hat_index, strict=True)])
    sure_final = np.array([c["sure"][-1] for c in curves])
    loss = at([c["loss"] for c in curves])
    # SURE's own estimate of each fit's drop: its best PSNR over the run against the budget's.
    sure_drop = np.array([as_db(np.nanmin(c["sure"])) - as_db(c["sure"][-1]) for c in curves])
    steady = np.flatnonzero(sure_drop <= MAX_DROP_DB)
    fbc_gap = at([c["fbc_1"] - c["fbc_5"] for c in curves])
    picks = {
        "oracle": int(np.nanargmax(psnr)),
        "fixed": int(np.argmin(np.abs(lams - FIXED_LAM))),
        "sure": int(np.nanargmin(sure)),
        "sure_sigma_hat": int(np.nanargmin(sure_hat)),
        "sure_final": int(np.nanargmin(sure_final)),
        # Among the fits SURE sees drop by at most 0.3 dB, the best SURE at the stop.
        "sure_steady": int(steady[np.nanargmin(sure[steady])])
        if steady.size
        else int(np.nanargmin(sure_drop)),
        "discrepancy": int(np.nanargmin(np.abs(loss - sigma**2))),
        "fbc_gap": int(np.nanargmax(fbc_gap)),
        # The fit whose ratio settles first (the budget where none does); ties: the smaller λ.
        "ratio_first": int(np.argmin(index)),
        **{f"fixed_{lam:g}": m for m, lam in enumerate(lams)},
    }
    row: dict = {}
    if image.has_holdout:
        folds = holdout_scores(image, rule, index)
        picks["holdout_1"] = int(np.argmin(folds[0]))
        picks["holdout_k"] = int(np.argmin(folds.mean(axis=0)))
        row["holdout_folds"] = folds.tolist()
        row["holdout_fold_picks"] = [float(lams[int(np.argmin(f))]) for f in folds]
    true_mse = 10 ** (-psnr / 10)
    hat = picks["sure_sigma_hat"]
    hat_psnr = float(curves[hat]["psnr"][hat_index[hat]])
    return {
        "image": image.name,
        "lams": lams.tolist(),
        "stops": stops,
        "psnr_stop": psnr.tolist(),
        "peak": peak.tolist(),
        "final": final.tolist(),
        "true_mse": true_mse.tolist(),
        "sure": sure.tolist(),
        "sure_spearman": spearman(-sure, psnr),
        **row,
        "picks": {name: float(lams[m]) for name, m in picks.items()},
        "psnr": {name: float(psnr[m]) for name, m in picks.items()} | {"sure_sigma_hat": hat_psnr},
        "fired": {name: stops[m] is not None for name, m in picks.items()}
        | {"sure_sigma_hat": hat_stops[hat] is not None},
        "gap": {name: float(peak[m] - psnr[m]) for name, m in picks.items()}
        | {"sure_sigma_hat": float(peak[hat] - hat_psnr)},
        "drop": {name: float(peak[m] - final[m]) for name, m in picks.items()},
        "dip_drop": float(np.nanmax(image.arrays["dip_psnr"]) - image.arrays["dip_psnr"][-1]),
    }


def summarise(rows: list[dict], criterion: str) -> dict:
    """Mean and worst PSNR lost against the oracle's λ and the fixed λ; stop statistics."""
    rows = [r for r in rows if criterion in r["psnr"]]
    vs_oracle = np.array([r["psnr"]["oracle"] - r["psnr"][criterion] for r in rows])
    vs_fixed = np.array([r["psnr"]["fixed"] - r["psnr"][criterion] for r in rows])
    fired = np.array([r["fired"][criterion] for r in rows])
    gap = np.array([r["gap"][criterion] for r in rows])
    drop = np.array([r["drop"][criterion] for r in rows])
    return {
        "images": len(rows),
        "mean_loss_vs_oracle": float(vs_oracle.mean()),
        "worst_loss_vs_oracle": float(vs_oracle.max()),
        "mean_loss_vs_fixed": float(vs_fixed.mean()),
        "worst_loss_vs_fixed": float(vs_fixed.max()),
        "mean_psnr": float(np.mean([r["psnr"][criterion] for r in rows])),
        "fired": float(fired.mean()),
        "within_1db": float((gap <= GOOD_GAP_DB).mean()),
        "fired_within_1db": float((fired & (gap <= GOOD_GAP_DB)).mean()),
        "mean_gap": float(gap.mean()),
        "mean_drop": float(drop.mean()),
        "worst_drop": float(drop.max()),
    }


def member_stop_stats(rows: list[dict]) -> dict:
    """Over every grid member of every image: fired before the budget, and within 1 dB."""
    fired = np.array([s is not None for r in rows for s in r["stops"]])
    gap = np.array([p - q for r in rows for p, q in zip(r["peak"], r["psnr_stop"], strict=True)])
    return {
        "fits": int(fired.size),
        "fired": float(fired.mean()),
        "within_1db": float((gap <= GOOD_GAP_DB).mean()),
        "fired_within_1db": float((fired & (gap <= GOOD_GAP_DB)).mean()),
        "mean_gap": float(gap.mean()),
    }


def sure_accuracy(rows: list[dict]) -> dict:
    """How far MC-SURE at the stops is from the true MSE, over every grid member."""
    error = np.array([s - t for r in rows for s, t in zip(r["sure"], r["true_mse"], strict=True)])
    true = np.array([t for r in rows for t in r["true_mse"]])
    rho = [r["sure_spearman"] for r in rows if r["sure_spearman"] is not None]
    return {
        "median_abs_error": float(np.median(np.abs(error))),
        "p90_abs_error": float(np.quantile(np.abs(error), 0.9)),
        "median_rel_error": float(np.median(np.abs(error) / true)),
        "mean_spearman": float(np.mean(rho)),
        "min_spearman": float(np.min(rho)),
    }


def holdout_noise(rows: list[dict]) -> dict:
    """The hold-out objective's noise: fold-to-fold std of the held-out MSE at the stop, against
    the true MSE's spread between the two best λ; and how often the folds agree."""
    rows = [r for r in rows if "holdout_folds" in r]
    if not rows:
        return {}
    fold_std = [float(np.std(r["holdout_folds"], axis=0, ddof=1).mean()) for r in rows]
    best_two = [float(np.diff(np.sort(r["true_mse"])[:2])[0]) for r in rows]
    agree = [len(set(r["holdout_fold_picks"])) == 1 for r in rows]
    return {
        "images": len(rows),
        "median_fold_std": float(np.median(fold_std)),
        "median_std_of_mean": float(np.median(fold_std) / np.sqrt(len(rows[0]["holdout_folds"]))),
        "median_true_mse_gap_best_two": float(np.median(best_two)),
        "folds_agree": float(np.mean(agree)),
    }


SMOOTH = {"moon", "microaneurysms", "retina", "cell", "hubble_deep_field", "clock_motion"}
"""Images whose 64×64 crop is mostly smooth (README)."""
CRITERIA = {
    "oracle": "oracle (PSNR against the clean image)",
    "fixed": "fixed λ = 1.4 (the profile's)",
    "sure": "MC-SURE at the stop, true σ",
    "sure_sigma_hat": "MC-SURE at the stop, σ estimated from y",
    "sure_final": "MC-SURE at the budget's output",
    "sure_steady": "MC-SURE at the stop, among fits whose SURE drops ≤ 0.3 dB",
    "holdout_1": "hold-out 10 %, one fold (sdip tune's objective)",
    "holdout_k": "hold-out 10 %, 3 disjoint folds averaged",
    "discrepancy": "discrepancy: loss at the stop closest to σ²",
    "fbc_gap": "FBC: largest FBC band 1 − band 5 at the stop",
    "ratio_first": "ratio: the fit whose ratio rule fires first",
}


def rule_tables(results: dict, rule: str) -> list[str]:
    """The λ criteria and the per-image table under the stopping rule ``rule``."""
    entry = results["rules"][rule]
    lines = [f"### λ criteria under the stop `{rule}`", ""]
    lines += [
        "| criterion | images | loss vs oracle λ: mean / worst (dB) "
        "| loss vs fixed λ = 1.4 (negative: a gain): mean / worst (dB) | mean PSNR at the stop |",
        "|---|---|---|---|---|",
    ]
    for name, label in CRITERIA.items():
        c = entry["criteria"].get(name)
        if c is None:
            continue
        lines.append(
            f"| {label} | {c['images']} | {c['mean_loss_vs_oracle']:.2f} / "
            f"{c['worst_loss_vs_oracle']:.2f} | {c['mean_loss_vs_fixed']:+.2f} / "
            f"{c['worst_loss_vs_fixed']:+.2f} | {c['mean_psnr']:.2f} |"
        )
    fixed = [(name, c) for name, c in entry["criteria"].items() if name.startswith("fixed_")]
    lines += ["", "One fixed λ for every image (same stop):", ""]
    lines += ["| λ | " + " | ".join(name[len("fixed_") :] for name, _ in fixed) + " |"]
    lines += ["|---|" + "---|" * len(fixed)]
    lines += [
        "| loss vs oracle: mean / worst (dB) | "
        + " | ".join(
            f"{c['mean_loss_vs_oracle']:.2f} / {c['worst_loss_vs_oracle']:.2f}" for _, c in fixed
        )
        + " |"
    ]
    lines += ["", f"### Per image, stop `{rule}`", ""]
    lines += [
        "| image | smooth | oracle λ → PSNR | fixed 1.4 | MC-SURE λ → PSNR (stop it.) "
        "| σ̂ λ | hold-out 3 folds λ | Gaussian drop at SURE λ | DIP drop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in entry["per_image"]:
        picks, psnr = row["picks"], row["psnr"]
        sure_index = [round(v, 3) for v in results["grid"]].index(picks["sure"])
        stop = row["stops"][sure_index]
        held = f"{picks['holdout_k']:g} → {psnr['holdout_k']:.2f}" if "holdout_k" in picks else "–"
        lines.append(
            f"| {row['image']} | {'yes' if row['image'] in SMOOTH else ''} "
            f"| {picks['oracle']:g} → {psnr['oracle']:.2f} | {psnr['fixed']:.2f} "
            f"| {picks['sure']:g} → {psnr['sure']:.2f} ({stop if stop is not None else 'budget'}) "
            f"| {picks['sure_sigma_hat']:g} | {held} | {row['drop']['sure']:.2f} "
            f"| {row['dip_drop']:.2f} |"
        )
    return [*lines, ""]


def tables(results: dict, rules: list[str], profile: dict[str, list[dict]]) -> str:
    """The README's tables (markdown) for the stopping rules ``rules`` (first: the reference);
    ``profile`` maps a rule to its stops on the profile's own Gaussian fits (profile_images.py)."""
    main_rule = results["rules"][rules[0]]
    lines = rule_tables(results, rules[0])
    lines += rule_tables(results, NOISE_RULE) + rule_tables(results, LEVEL_RULE)
    lines += ["", "### Stopping rules, at the MC-SURE λ and over every fit", ""]
    lines += [
        "| rule | at the SURE λ: fired / fired within 1 dB / mean gap (dB) "
        "| SURE λ: mean PSNR at the stop, loss vs oracle: mean / worst "
        "| all fits: fired / fired within 1 dB | profile's astronaut, coffee: stop (gap dB) |",
        "|---|---|---|---|---|",
    ]
    for name in rules:
        entry = results["rules"][name]
        c, m = entry["criteria"]["sure"], entry["all_members"]
        own = profile.get(name, [])
        cells = ", ".join(
            f"{'budget' if f['stop'] is None else f['stop']} ({f['gap']:.2f})" for f in own
        )
        lines.append(
            f"| `{name}` | {c['fired']:.0%} / {c['fired_within_1db']:.0%} / {c['mean_gap']:.2f} "
            f"| {c['mean_psnr']:.2f}, {c['mean_loss_vs_oracle']:.2f} / "
            f"{c['worst_loss_vs_oracle']:.2f} | {m['fired']:.0%} / {m['fired_within_1db']:.0%} "
            f"| {cells or '–'} |"
        )
    lines += ["", f"### The held-out phenomena check (stop `{rules[0]}`)", ""]
    lines += check_table(main_rule["held_out_check"]["sure"], "λ by MC-SURE")
    lines += check_table(main_rule["held_out_check"]["fixed"], "the profile's fixed λ = 1.4")
    for name in (NOISE_RULE, LEVEL_RULE):
        lines += ["", f"### The held-out phenomena check (stop `{name}`)", ""]
        lines += check_table(results["rules"][name]["held_out_check"]["sure"], "λ by MC-SURE")
    return "\n".join(lines) + "\n"


def held_out_check(rows: list[dict], criterion: str = "sure") -> dict:
    """Item 3 from the recorded fits: the rows and verdicts :func:`pipeline.unseen.check_unseen`
    computes (its fits are these fits), for λ chosen by ``criterion``."""
    checked = []
    for row in rows:
        m = [round(v, 3) for v in row["lams"]].index(round(row["picks"][criterion], 3))
        checked.append(
            {
                "image": row["image"],
                "lam": row["picks"][criterion],
                "stop_iteration": row["stops"][m],
                "psnr_peak": row["peak"][m],
                "psnr_stop": row["psnr_stop"][m],
                "psnr_final": row["final"][m],
                "drop": row["peak"][m] - row["final"][m],
                "stop_gap": row["peak"][m] - row["psnr_stop"][m],
                "dip_drop": row["dip_drop"],
            }
        )
    return {"images": checked, **verdicts(checked, PHENOMENA)}


def check_table(check: dict, title: str) -> list[str]:
    lines = [f"#### {title}", ""]
    lines += [
        "| image | λ | stop | PSNR peak / stop / budget | drop | stop's gap | DIP drop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in check["images"]:
        stop = "budget" if r["stop_iteration"] is None else r["stop_iteration"]
        lines.append(
            f"| {r['image']} | {r['lam']:g} | {stop} | {r['psnr_peak']:.2f} / "
            f"{r['psnr_stop']:.2f} / {r['psnr_final']:.2f} | {r['drop']:.2f} "
            f"| {r['stop_gap']:.2f} | {r['dip_drop']:.2f} |"
        )
    s, v = check["summary"], check["verdicts"]
    lines += [
        "",
        f"Mean drop {s['mean_drop']:.2f} dB (worst {s['worst_drop']:.2f}): "
        f"{'pass' if v['controlled_drop'] else 'FAIL'} (≤ {PHENOMENA['max_controlled_drop']}); "
        f"stopped before the budget {s['stopped']:.0%}, within "
        f"{PHENOMENA['max_stop_gap']:g} dB {s['stopped_within_gap']:.0%}: "
        f"{'pass' if v['stop_within_gap'] else 'FAIL'} (≥ 90 %).",
        "",
    ]
    return lines


def drop_feasibility(images: list[Image]) -> dict:
    """Can any λ choice pass the check's drop half? Per image, the λ with the least drop (peak −
    budget) among those whose budget PSNR is within ``slack`` dB of the best (an oracle), and
    among those whose window mean of SURE at the budget is within ``tol``·σ² of the least, the
    one whose SURE rose least from its minimum (no clean image); mean / worst drop and the
    budget PSNR given up."""
    out: dict = {"oracle": {}, "sure": {}}
    for slack in (0.0, 0.25, 0.5, 1.0):
        drops, costs = [], []
        for image in images:
            psnr = image.arrays["grid_psnr"].astype(np.float64)
            peak, final = psnr.max(axis=1), psnr[:, -1]
            ok = np.flatnonzero(final >= final.max() - slack)
            k = ok[np.argmin((peak - final)[ok])]
            drops.append(peak[k] - final[k])
            costs.append(final.max() - final[k])
        out["oracle"][f"slack {slack:g} dB"] = summary_of(drops, costs)
    for tol in (0.0, 0.02, 0.1):
        drops, costs = [], []
        for image in images:
            curves = [image.grid(m) for m in range(len(image.lams))]
            means = [trailing_means(c["sure"], FEASIBILITY_WINDOW) for c in curves]
            last = np.array([m[-1] for m in means])
            rise = last - np.array([np.nanmin(m) for m in means])
            ok = np.flatnonzero(last <= last.min() + tol * image.meta["sigma"] ** 2)
            k = ok[np.argmin(rise[ok])]
            psnr = image.arrays["grid_psnr"].astype(np.float64)
            peak, final = psnr.max(axis=1), psnr[:, -1]
            drops.append(peak[k] - final[k])
            costs.append(final.max() - final[k])
        out["sure"][f"tol {tol:g} sigma^2"] = summary_of(drops, costs)
    return out


def summary_of(drops: list[float], costs: list[float]) -> dict:
    return {
        "mean_drop": float(np.mean(drops)),
        "worst_drop": float(np.max(drops)),
        "mean_final_psnr_given_up": float(np.mean(costs)),
        "worst_final_psnr_given_up": float(np.max(costs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", default="curves", help="folder of collect.py's curves")
    parser.add_argument("--prefix", default="", help="of the written results.json, tables.md")
    args = parser.parse_args()
    images = load(HERE / args.curves)
    results: dict = {
        "images": [i.name for i in images],
        "holdout_images": [i.name for i in images if i.has_holdout],
        "rules": {},
    }
    for rule in RULES:
        rows = [evaluate_image(image, rule) for image in images]
        criteria = sorted({c for r in rows for c in r["picks"]})
        results["rules"][rule.name] = {
            "per_image": rows,
            "criteria": {c: summarise(rows, c) for c in criteria},
            "holdout_subset": {
                c: summarise([r for r in rows if "holdout_k" in r["picks"]], c)
                for c in criteria
                if any("holdout_k" in r["picks"] for r in rows)
            },
            "all_members": member_stop_stats(rows),
            "held_out_check": {c: held_out_check(rows, c) for c in ("sure", "fixed")},
            "sure_accuracy": sure_accuracy(rows),
            "holdout_noise": holdout_noise(rows),
        }
    results["grid"] = images[0].lams.tolist()
    results["drop_feasibility"] = drop_feasibility(images)
    own = HERE / "profile_images.json"
    profile = (
        {
            name: [f for f in entry["fits"] if f["fit"].endswith("gaussian")]
            for name, entry in json.loads(own.read_text())["rules"].items()
        }
        # A column of the validation group's tables; the test group holds those images itself.
        if own.is_file() and not args.prefix
        else {}
    )
    (HERE / f"{args.prefix}tables.md").write_text(tables(results, REPORT_RULES, profile))
    # Per-image rows only for the reported rules: the rest is regenerated in seconds.
    for name, entry in results["rules"].items():
        if name not in REPORT_RULES:
            del entry["per_image"], entry["held_out_check"]
    (HERE / f"{args.prefix}results.json").write_text(json.dumps(results, indent=1) + "\n")
    for name, entry in results["rules"].items():
        s, m = entry["criteria"]["sure"], entry["all_members"]
        print(
            f"{name:30s} SURE λ: vs oracle {s['mean_loss_vs_oracle']:.2f}/"
            f"{s['worst_loss_vs_oracle']:.2f} vs fixed {s['mean_loss_vs_fixed']:+.2f} "
            f"fired {s['fired']:.0%} fired≤1dB {s['fired_within_1db']:.0%} "
            f"drop {s['mean_drop']:.2f} | all fits fired {m['fired']:.0%} "
            f"fired≤1dB {m['fired_within_1db']:.0%}"
        )


if __name__ == "__main__":
    main()
