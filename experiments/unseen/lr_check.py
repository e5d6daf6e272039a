"""Experiment "unseen", section 6: the SURE window rule at the paper's learning rate.

Reads ``lr_curves/`` (``run_lr_collect.sh``: lr = 0.001, 6,000 iterations) and prints, per image
and λ, where the rule keeps its output and how far below the fit's peak that is, for the rule as
fixed (w = 50), with its window scaled by the learning rate (w = 50 · 0.004 / lr = 200), and for
the relative SURE window rule (section 8); then MC-SURE's λ choice under each. Writes
``lr_check.json``.

    python -m experiments.unseen.lr_check
"""

from __future__ import annotations

import json

import numpy as np

from experiments.unseen.analyze import HERE, load, sure_window

PROFILE_LR = 0.004
FIXED_WINDOW = 50


def main() -> None:
    images = load(HERE / "lr_curves")
    lr = images[0].meta["settings"]["lr"]
    windows = {
        "fixed": FIXED_WINDOW,
        "scaled by lr": round(FIXED_WINDOW * PROFILE_LR / lr),
        "relative": 25,
    }
    rules = {
        "fixed": sure_window(windows["fixed"], 0.01),
        "scaled by lr": sure_window(windows["scaled by lr"], 0.01),
        "relative": sure_window(windows["relative"], 0.01, "level", "centre"),
    }
    report: dict = {"lr": lr, "windows": windows, "images": {}}
    for image in images:
        rows = []
        for m, lam in enumerate(image.lams):
            curves = image.grid(m)
            psnr = curves["psnr"]
            row = {
                "lam": float(lam),
                "peak": float(np.nanmax(psnr)),
                "peak_at": int(np.nanargmax(psnr)),
            }
            row["final"] = float(psnr[-1])
            for name, rule in rules.items():
                kept = rule.stop(curves)
                index = len(psnr) - 1 if kept is None else kept
                row[name] = {
                    "kept": kept,
                    "psnr": float(psnr[index]),
                    "gap": float(np.nanmax(psnr) - psnr[index]),
                    "score": rule.score(curves, index),
                }
            rows.append(row)
        choice = {}
        for name in windows:
            k = int(np.argmin([r[name]["score"] for r in rows]))
            choice[name] = {"lam": rows[k]["lam"], **rows[k][name], "peak": rows[k]["peak"]}
        report["images"][image.name] = {"rows": rows, "choice": choice}
        print(f"{image.name} (lr {lr:g}, budget {image.budget})")
        for r in rows:
            cells = "  ".join(
                f"{name} w={windows[name]}: kept {r[name]['kept']} {r[name]['psnr']:.2f} "
                f"(gap {r[name]['gap']:.2f})"
                for name in windows
            )
            print(
                f"  λ {r['lam']:.3g}: peak {r['peak']:.2f} at {r['peak_at']}, "
                f"final {r['final']:.2f} | {cells}"
            )
        for name, c in choice.items():
            print(
                f"  MC-SURE choice, {name}: λ {c['lam']:.3g}, kept {c['kept']}, "
                f"{c['psnr']:.2f} dB, gap {c['gap']:.2f}"
            )
    (HERE / "lr_check.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
