"""``sdip evaluate``: score every fit under its task's protocol and every stopping rule.

Reads every ``runs/<task>/<variant>/<image>/<method>``; writes
``results/evaluation.csv`` (one row per fit, each under the stopping settings it ran with) and
``results/metrics.json`` (``dvc metrics show``).
"""

from __future__ import annotations

import click
import numpy as np

from pipeline.evaluation import evaluate_run, find_runs
from pipeline.layout import RESULTS, RUNS
from pipeline.results import write_json
from pipeline.tables import write_csv


@click.command("evaluate")
def evaluate_command() -> None:
    """Apply the stopping rules to the logged curves and score every fit."""
    rows = [evaluate_run(key, folder) for key, folder in find_runs(RUNS)]
    if not rows:
        raise click.ClickException(f"no finished fits under {RUNS}")
    write_csv(RESULTS / "evaluation.csv", rows)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        group = metrics.setdefault(f"{row['task']}/{row['variant']}", {})
        group.setdefault(row["method"], {"n": 0})["n"] += 1
    for name, methods in metrics.items():
        task, variant = name.split("/")
        for method, values in methods.items():
            mine = [
                r for r in rows if (r["task"], r["variant"], r["method"]) == (task, variant, method)
            ]
            for key in ("psnr_ratio", "psnr_final", "psnr_oracle", "ratio_saved", "wall_time_s"):
                values[key] = round(float(np.mean([r[key] for r in mine])), 4)
    write_json(RESULTS / "metrics.json", metrics)
    click.echo(f"evaluated {len(rows)} fit(s) -> {RESULTS / 'evaluation.csv'}")
