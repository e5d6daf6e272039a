"""``sdip fbc``: frequency-band correspondence summaries and the spectral-measurement figures.

Reads ``fbc`` from params.yaml; writes ``results/fbc.csv`` (per fit: first iteration each band
reaches each threshold; band values at the oracle peak, the ratio-rule stop and the end) and
``results/figures/fbc/<task>-<variant>-<image>-<method>.png``.
"""

from __future__ import annotations

import click

from pipeline.evaluation import FBC_CSV, fbc_frame, find_runs, read_run, rule_stops
from pipeline.figures import save_figure, spectral_measurement
from pipeline.layout import FIGURES, RUNS
from pipeline.settings import load_params, section
from pipeline.tables import write_csv


@click.command("fbc")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
def fbc_command(params_file: str) -> None:
    """Summarise the FBC curves of every fit and draw the figures for the chosen methods."""
    settings = section(load_params(params_file), "fbc")
    frame = fbc_frame(RUNS, tuple(float(t) for t in settings["thresholds"]))
    for key, folder in find_runs(RUNS):
        if key.method in settings["figure_methods"]:
            curves, summary = read_run(folder)
            figure = spectral_measurement(
                curves,
                rule_stops(curves, summary)["oracle"],
                f"{key.label}: PSNR and FBC vs iteration",
            )
            save_figure(figure, FIGURES / "fbc" / f"{key.label.replace('/', '-')}.png")
    write_csv(FBC_CSV, frame)
    click.echo(f"summarised FBC of {len(frame)} fit(s) -> {FBC_CSV}")
