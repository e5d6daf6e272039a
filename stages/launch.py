"""``sdip launch``: bring the optimize, sweep and tune stages up to date, here or on SLURM.

With params.yaml's ``executor.kind: local`` (the default) this is ``dvc repro`` of those stages.
With ``slurm`` (or ``--executor slurm``) their out-of-date stages go to SLURM as jobs through
submitit and are recorded in dvc.lock when they succeed (:mod:`pipeline.cluster`); ``dvc repro``
then runs only the summaries. A failed stage is reported with its job's log; running
``sdip launch`` again resubmits only it. docs/cluster.md has the whole recipe.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cluster import KINDS, launch
from pipeline.errors import UserError
from pipeline.settings import load_params
from pipeline.tracking import repo_root


@click.command("launch")
@click.option("--executor", "kind", type=click.Choice(KINDS), help="Default: executor.kind.")
@click.option("--stages", "patterns", multiple=True, help="Only stages matching this glob.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the jobs.")
@click.option("--dry-run", is_flag=True, help="Show what would be submitted; submit nothing.")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
def launch_command(
    kind: str | None, patterns: tuple[str, ...], wait: bool, dry_run: bool, params_file: str
) -> None:
    """Run the out-of-date optimize, sweep and tune stages (locally or as SLURM jobs)."""
    root = repo_root()
    report = launch(
        root, load_params(Path(params_file)), patterns, kind, wait, dry_run, echo=click.echo
    )
    if dry_run:
        click.echo(f"would submit {len(report.submitted)}: {', '.join(report.submitted)}")
    if report.running:
        click.echo(f"still running: {', '.join(report.running)} (sdip launch collects them)")
    if report.waiting:
        click.echo(f"waiting for an upstream stage: {', '.join(report.waiting)}")
    if report.failed:
        raise UserError(
            f"{len(report.failed)} stage(s) failed (logs above); fix the cause and run "
            "`sdip launch` again to resubmit only them"
        )
    if not dry_run and not (report.running or report.waiting):
        click.echo("the selected stages are up to date; `dvc repro` runs the rest")
