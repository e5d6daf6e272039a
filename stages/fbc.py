"""``sdip fbc``: frequency-band correspondence summaries and the spectral-measurement figures.

Reads ``evaluate`` (rule settings) and ``fbc`` from params.yaml; writes ``results/fbc.csv`` (per
fit: first iteration each band reaches each threshold; band values at the oracle peak, the
ratio-rule stop and the end) and ``results/figures/fbc/<task>-<variant>-<image>-<method>.png``.
"""

from __future__ import annotations

import click

from pipeline.evaluation import fbc_summary, find_runs
from pipeline.figures import spectral_measurement
from pipeline.layout import FIGURES, RESULTS, RUNS
from pipeline.results import CURVES_FILE, read_curves
from pipeline.settings import load_params, section
from pipeline.stopping import oracle_peak
from pipeline.tables import write_csv


@click.command("fbc")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
def fbc_command(params_file: str) -> None:
    """Summarise the FBC curves of every fit and draw the figures for the chosen methods."""
    params = load_params(params_file)
    settings = section(params, "fbc")
    thresholds = tuple(float(t) for t in settings["thresholds"])
    rows = []
    for key, folder in find_runs(RUNS):
        rows.append(fbc_summary(key, folder, thresholds))
        if key.method in settings["figure_methods"]:
            curves = read_curves(folder / CURVES_FILE)
            spectral_measurement(
                curves,
                oracle_peak(curves["psnr"]),
                f"{key.label}: PSNR and FBC vs iteration",
                FIGURES / "fbc" / f"{key.label.replace('/', '-')}.png",
            )
    if not rows:
        raise click.ClickException(f"no finished fits under {RUNS}")
    write_csv(RESULTS / "fbc.csv", rows)
    click.echo(f"summarised FBC of {len(rows)} fit(s) -> {RESULTS / 'fbc.csv'}")
