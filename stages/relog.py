"""``sdip relog [FOLDER ...]``: log finished fits to MLflow again from their run folders.

A run folder (:mod:`pipeline.results`), which DVC tracks, is the record of a fit and MLflow a
view of it (:mod:`pipeline.tracking`). This logs each FOLDER (default: every run folder under
``runs/``, sweeps included) whose content is not in MLflow yet, under one parent run ``relog``
per experiment; a folder already logged with the same content is skipped, and a run whose
logging stopped half-way is replaced, so running it twice logs nothing twice.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.layout import RUNS
from pipeline.results import SUMMARY_FILE
from pipeline.tracking import (
    RunFolder,
    failure_line,
    quiet_mlflow,
    relog_folders,
    relog_hint,
    tracking_errors,
)


@click.command("relog")
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
def relog_command(folders: tuple[Path, ...]) -> None:
    """Log the fits of FOLDERS (default: every run under runs/) to MLflow, once."""
    chosen = list(folders) or sorted(path.parent for path in RUNS.rglob(SUMMARY_FILE))
    if not chosen:
        raise UserError(f"no run folder (with {SUMMARY_FILE}) under {RUNS}/ to re-log")
    fits = [RunFolder.read(folder) for folder in chosen]
    try:
        with quiet_mlflow():
            logged = relog_folders(fits)
    except tracking_errors() as err:
        raise UserError(failure_line("relog", err, relog_hint(chosen))) from err
    for folder, now in zip(chosen, logged, strict=True):
        click.echo(f"{'logged' if now else 'already logged'}: {folder.as_posix()}")
    count = sum(logged)
    click.echo(f"logged {count} fit(s); {len(logged) - count} were logged already")
