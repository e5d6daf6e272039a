"""``sdip optimize TASK IMAGE METHOD``: one fit of one prepared observation (DVC ``optimize_*``).

Reads ``fit``, ``stopping``, ``tasks.TASK.fit`` and ``methods.METHOD`` from params.yaml
(:func:`pipeline.settings.fit_settings`), fits the prepared observation
``data/prepared/TASK/<variant>/IMAGE`` and writes ``runs/TASK/<variant>/IMAGE/METHOD``
(:mod:`pipeline.results`). The invocation is an MLflow parent run with the fit as its child run.
The fit checkpoints every ``checkpoints.every`` iterations and on SIGTERM/SIGINT; running the
same command again resumes it (:mod:`pipeline.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.checkpoint import checkpoint_for
from pipeline.fit import FitConfig
from pipeline.layout import checkpoint_path, run_dir
from pipeline.observations import read_prepared
from pipeline.results import summary_line, write_result
from pipeline.runtime import handle_termination
from pipeline.settings import checkpoint_every, fit_settings, load_params
from pipeline.tracking import log_fits
from stages.options import key_values
from stages.progress import run_fit


@click.command("optimize")
@click.argument("task")
@click.argument("image")
@click.argument("method")
@click.option("--variant", "variant_value", help="The variant: its value (25) or folder (sigma25).")
@click.option("--set", "overrides", multiple=True, help="Override a fit setting: KEY=VALUE.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--dvc-stage", default="", help="The DVC stage name, recorded as a tag.")
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def optimize_command(
    task: str,
    image: str,
    method: str,
    variant_value: str | None,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    params_file: str,
    dvc_stage: str,
    track: bool,
) -> None:
    """Fit METHOD to the prepared observation of IMAGE for TASK."""
    params = load_params(params_file)
    problem, meta, variant = read_prepared(params, task, image, variant_value)
    settings = fit_settings(params, task, method, image, variant, key_values(overrides))
    config = FitConfig.from_dict(settings)
    out = out_dir or run_dir(task, variant, image, method)
    handle_termination()
    every = checkpoint_every(params)
    checkpoint = checkpoint_for(checkpoint_path(out), [config], [problem.observation], every)
    result = run_fit(problem, config, checkpoint)
    extra = {"image": image, "method": method, "variant": variant, "observation": meta}
    summary = write_result(out, problem, result, extra)
    if track:
        tags = {"profile": params.get("profile", "custom"), "dvc_stage": dvc_stage, "task": task}
        log_fits(
            task, f"optimize {task}/{variant}/{image}/{method}", {**tags, "image": image}, [out]
        )
    click.echo(f"{task}/{variant}/{image}/{method}: {summary_line(summary)}")
