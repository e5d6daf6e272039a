"""Experiment "unseen", step 3: the stopping rules of ``analyze.py`` on the default profile's own
denoising fits (astronaut, coffee), so that a rule proposed for the CPU profile keeps its
phenomena there. Reads the ``curves.csv`` of every fit in a ``runs/`` folder (of a ``dvc repro``,
or ``profile_runs/``: the Gaussian method's two fits made by ``sdip prepare denoising`` and
``sdip optimize denoising IMAGE gaussian --variant 25`` with this branch's params.yaml, i.e. with
item 4's blur) and writes ``profile_images.json``.

    python -m experiments.unseen.profile_images [RUNS]      # default: profile_runs/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.unseen.analyze import GOOD_GAP_DB, HERE, RULES, at_stop
from pipeline.results import read_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="?", default=HERE / "profile_runs")
    args = parser.parse_args()
    fits = sorted(args.runs.glob("denoising/*/*/*/curves.csv"))
    table: dict = {"rules": {}}
    for rule in RULES:
        if rule.name.startswith("sure"):
            continue  # these fits have no MC-SURE twin
        rows = []
        for path in fits:
            curves = {k: np.asarray(v, dtype=np.float64) for k, v in read_curves(path).items()}
            stop = rule.stop(curves)
            psnr = curves["psnr"]
            at = psnr[at_stop(stop, len(psnr))]
            rows.append(
                {
                    "fit": "/".join(path.parent.parts[-3:]),
                    "stop": stop,
                    "psnr_stop": float(at),
                    "gap": float(np.nanmax(psnr) - at),
                }
            )
        good = [r["stop"] is not None and r["gap"] <= GOOD_GAP_DB for r in rows]
        table["rules"][rule.name] = {"fits": rows, "fired_within_1db": float(np.mean(good))}
    (HERE / "profile_images.json").write_text(json.dumps(table, indent=1) + "\n")
    for name, entry in table["rules"].items():
        cells = "  ".join(
            f"{r['fit']}: {r['stop']} ({r['gap']:.2f})"
            for r in entry["fits"]
            if "gaussian" in r["fit"]
        )
        print(f"{name:30s} {cells}")


if __name__ == "__main__":
    main()
