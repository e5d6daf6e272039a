"""``sdip optimize TASK IMAGE METHOD``: one fit of one prepared observation (DVC ``optimize_*``).

Reads ``fit``, ``tasks.TASK.fit`` and ``methods.METHOD`` from params.yaml, fits the prepared
observation ``data/prepared/TASK/<variant>/IMAGE`` and writes ``runs/TASK/<variant>/IMAGE/METHOD``
(:mod:`pipeline.results`). The invocation is an MLflow parent run with the fit as its child run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.fit import FitConfig, fit, resolve_device
from pipeline.layout import prepared_dir, run_dir
from pipeline.observations import read_observation
from pipeline.problem import Problem
from pipeline.results import FitResult, write_result
from pipeline.runtime import configure
from pipeline.settings import fit_settings, load_params, parse_variant, variant_name
from pipeline.tracking import git_commit, log_fit_run, stage_run
from stages.fit import progress_callback

ARTIFACTS = ("restored_stop.png", "restored_final.png", "restored_best.png", "observation.png")


@dataclass(frozen=True)
class FitRecord:
    """What one fit of a prepared observation writes to ``runs/`` and logs to MLflow (shared by
    ``sdip optimize`` and ``sdip sweep``)."""

    task: str
    variant: str
    image: str
    method: str
    meta: dict[str, Any]
    profile: str

    def tags(self, dvc_stage: str) -> dict[str, str]:
        return {
            "profile": self.profile,
            "dvc_stage": dvc_stage,
            "task": self.task,
            "image": self.image,
            "git_commit": git_commit(),
        }

    def write(self, out: Path, problem: Problem, result: FitResult) -> dict[str, Any]:
        extra = {
            "image": self.image,
            "method": self.method,
            "variant": self.variant,
            "observation": self.meta,
        }
        return write_result(out, problem, result, extra)

    def log(
        self,
        run: tuple[Any, str, str],
        out: Path,
        config: FitConfig,
        result: FitResult,
        summary: dict[str, Any],
        dvc_stage: str,
        name: str,
    ) -> None:
        """Log the fit as a child of the stage's parent ``run`` (from :func:`stage_run`)."""
        mlflow, experiment, parent = run
        fit_params = {
            "task": self.task,
            "variant": self.variant,
            "image": self.image,
            "method": self.method,
            **config.flat(),
            **{f"degradation.{k}": v for k, v in self.meta["params"].items()},
        }
        metrics = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        log_fit_run(
            mlflow,
            experiment,
            parent,
            name,
            fit_params,
            {**self.tags(dvc_stage), "method": self.method, "variant": self.variant},
            result.curves,
            metrics,
            [out / artifact for artifact in ARTIFACTS],
        )


def _overrides(values: tuple[str, ...]) -> dict[str, object]:
    parsed = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        parsed[key] = yaml.safe_load(text)
    return parsed


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
    value = parse_variant(task, variant_value)
    variant = variant_name(task, value)
    problem, meta = read_observation(prepared_dir(task, variant, image))
    settings = fit_settings(params, task, method, image, variant, _overrides(overrides))
    config = FitConfig.from_dict(settings)
    configure(config.threads, config.precision, resolve_device(config.device))
    out = out_dir or run_dir(task, variant, image, method)
    bar, update = progress_callback(config.iterations)
    with bar:
        result = fit(problem.observation, problem.task, config, [update], clean=problem.clean)
    record = FitRecord(task, variant, image, method, meta, params.get("profile", "custom"))
    summary = record.write(out, problem, result)
    if track:
        with stage_run(
            task, f"optimize {task}/{variant}/{image}/{method}", record.tags(dvc_stage)
        ) as run:
            record.log(run, out, config, result, summary, dvc_stage, f"{image}-{method}")
    click.echo(
        f"{task}/{variant}/{image}/{method}: {result.iterations_run} it, "
        f"{result.wall_time:.1f} s, stop {summary['stop_iteration']}, "
        f"PSNR stop {summary['psnr_stop']}, final {summary['psnr_final']}, "
        f"best {summary['psnr_best']}"
    )
