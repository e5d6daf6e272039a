"""``sdip aggregate``: per-task tables beside the published numbers, the phenomena check, figures.

Reads ``aggregate``, ``sweeps`` and ``methods`` from params.yaml, ``results/evaluation.csv``,
``results/fbc.csv``, the sweep runs and ``dataset/published.yaml``. Writes
``results/tables/<task>.{csv,md}``, ``results/phenomena.{json,md}`` and
``results/figures/{lambda_sweep,sigma_sweep,automatic_stop,restorations}.png`` and
``results/figures/qualitative/<name>.png`` for each entry of ``aggregate.qualitative``.
"""

from __future__ import annotations

import click

from pipeline.evaluation import EVALUATION_CSV, FBC_CSV
from pipeline.figures import qualitative, restorations, save_figure, stop_figure, sweep_figures
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import FIGURES, RESULTS, TABLES
from pipeline.phenomena import PHENOMENA_JSON, PHENOMENA_MD, phenomena, phenomena_markdown
from pipeline.results import write_json
from pipeline.settings import load_params, load_yaml, section
from pipeline.tables import PUBLISHED, markdown, read_csv, task_table, write_csv
from pipeline.tracking import log_files

SUMMARY_EXPERIMENT = "summary"
QUALITATIVE = "qualitative"
"""Folder of ``results/figures`` for image sets shown, not scored (``aggregate.qualitative``)."""


@click.command("aggregate")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def aggregate_command(params_file: str, track: bool) -> None:
    """Write the per-task tables, the phenomena check and the summary figures."""
    params = load_params(params_file)
    settings = section(params, "aggregate")
    checked = settings["phenomena"]
    methods = list(section(params, "methods"))
    fits, fbc = read_csv(EVALUATION_CSV), read_csv(FBC_CSV)
    published = load_yaml(PUBLISHED)
    report = []
    for task, rows in fits.groupby("task"):
        table = task_table(rows, methods, published.get(task, {}), checked["baseline"])
        write_csv(TABLES / f"{task}.csv", table)
        text = markdown(table)
        write_bytes_atomic(TABLES / f"{task}.md", text.encode())
        report.append(f"## {task}\n\n{text}")
    found = phenomena(fits, fbc, checked)
    write_json(PHENOMENA_JSON, found)
    verdict = phenomena_markdown(found)
    write_bytes_atomic(PHENOMENA_MD, verdict.encode())
    figures = {
        **sweep_figures(section(params, "sweeps")),
        "restorations": restorations(fits, settings["grid_method"]),
        # The stop is shown for the method whose stop the phenomena check judges.
        "automatic_stop": stop_figure(fits, checked["task"], checked["controlled"]),
    }
    for name, shown in (settings.get("qualitative") or {}).items():
        figures[f"{QUALITATIVE}/{name}"] = qualitative(
            fits, shown["task"], shown["set"], settings["grid_method"]
        )
    (FIGURES / QUALITATIVE).mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        save_figure(figure, FIGURES / f"{name}.png")
    if track:
        tags = {"profile": params.get("profile", "custom"), "dvc_stage": "aggregate"}
        files = [(p, p.parent.relative_to(RESULTS).as_posix()) for p in FIGURES.rglob("*.png")]
        files += [(path, "tables") for path in TABLES.glob("*")]
        log_files(SUMMARY_EXPERIMENT, "aggregate", tags, [*sorted(files), (PHENOMENA_MD, None)])
    click.echo("\n".join(report))
    click.echo(f"Phenomena ({found['task']}):\n{verdict}")
