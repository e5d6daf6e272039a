"""``sdip evaluate``: score every fit under its task's protocol and every stopping rule.

Reads every ``runs/<task>/<variant>/<image>/<method>``; writes ``results/evaluation.csv`` (the tidy
frame of fits: one row per fit, each under the stopping settings it ran with) and
``results/metrics/<task>-<variant>.json`` (each method's mean PSNR at the ratio stop, at the budget,
at the oracle peak and its mean stop iteration: one row per task variant in ``dvc metrics show``).
"""

from __future__ import annotations

import click

from pipeline.evaluation import EVALUATION_CSV, evaluation_frame
from pipeline.layout import RUNS
from pipeline.tables import METRICS, headline_metrics, write_csv, write_metrics


@click.command("evaluate")
def evaluate_command() -> None:
    """Apply the stopping rules to the logged curves and score every fit."""
    fits = evaluation_frame(RUNS)
    write_csv(EVALUATION_CSV, fits)
    write_metrics(METRICS, headline_metrics(fits))
    click.echo(f"evaluated {len(fits)} fit(s) -> {EVALUATION_CSV}")
