"""MLflow tracking: one experiment per task, a parent run per stage invocation, a run per fit.

The default store is ``sqlite:///<repo>/mlflow.db`` with artifacts under ``<repo>/mlartifacts``,
both absolute so that DVC's temporary experiment workspaces (``.dvc/tmp/exps/...``) log to the
main repository's database; ``MLFLOW_TRACKING_URI`` overrides the store (e.g. a tracking server).
Curves go in as step metrics through ``log_batch`` (at most 1,000 values a call), never one call
per value. MLflow is imported lazily: it is slow to import and only the stages need it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.results import CURVES_FILE, SUMMARY_FILE, read_curves

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

BATCH_LIMIT = 1000
RUN_ARTIFACTS = ("restored_stop.png", "restored_final.png", "restored_best.png", "observation.png")
SQLITE_PREFIX = "sqlite:///"
SERVER_PREFIXES = ("http://", "https://")
DVC_EXPERIMENT_WORKSPACES = os.path.join(".dvc", "tmp", "exps")


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The main repository's root: the nearest folder holding ``.dvc`` or ``.git``, stepping out
    of a DVC temporary experiment workspace to the repository that owns it."""
    path = Path(start or os.getcwd()).resolve()
    text = str(path)
    if DVC_EXPERIMENT_WORKSPACES in text:
        return Path(text.split(os.sep + DVC_EXPERIMENT_WORKSPACES)[0])
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return path


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the repository's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, or ``unknown`` outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or os.getcwd(),
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def client(root: Path | None = None) -> MlflowClient:
    """A client of the tracking store. A new SQLite store is created under a file lock: two
    processes creating the same database at once would both run its schema migrations."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    if uri.startswith(SQLITE_PREFIX):
        database = Path(uri[len(SQLITE_PREFIX) :])
        with open(database.parent / f"{database.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            MlflowClient(uri).search_experiments(max_results=1)
    return MlflowClient(uri)


def experiment_id(mlflow: MlflowClient, name: str, root: Path | None = None) -> str:
    """Get or create the experiment ``name``, its artifacts under ``<repo>/mlartifacts``; with a
    tracking server (``http(s)://``) in the server's artifact store, which clients reach through
    the server (docs/cluster.md)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    served = tracking_uri(root).startswith(SERVER_PREFIXES)
    location = None if served else ((root or repo_root()) / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:
        # Another stage process may have created it in the meantime.
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def log_curves(mlflow: MlflowClient, run_id: str, curves: dict[str, np.ndarray]) -> int:
    """Log every curve as a step metric (step = iteration), in batches; NaNs are skipped.

    Returns the number of values logged.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    steps = np.asarray(curves["iteration"], dtype=np.int64)
    metrics = [
        Metric(name, float(value), now, int(step))
        for name, values in curves.items()
        if name != "iteration"
        for step, value in zip(steps, np.asarray(values, dtype=np.float64), strict=True)
        if not np.isnan(value)
    ]
    for start in range(0, len(metrics), BATCH_LIMIT):
        mlflow.log_batch(run_id, metrics=metrics[start : start + BATCH_LIMIT])
    return len(metrics)


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in sorted(values.items())]


def _tags(values: dict[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in sorted(values.items())]


@contextmanager
def stage_run(
    experiment: str, stage: str, tags: dict[str, Any], params: dict[str, Any] | None = None
) -> Iterator[tuple[MlflowClient, str, str]]:
    """A parent run for one stage invocation; yields ``(client, experiment_id, run_id)``.

    The run ends FINISHED, or FAILED if the body raises.
    """
    root = repo_root()
    mlflow = client(root)
    exp = experiment_id(mlflow, experiment, root)
    all_tags = {"stage": stage, "git_commit": git_commit(root), **tags}
    run = mlflow.create_run(exp, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    if params:
        mlflow.log_batch(run_id, params=_params(params))
    try:
        yield mlflow, exp, run_id
    except BaseException:
        mlflow.set_terminated(run_id, "FAILED")
        raise
    mlflow.set_terminated(run_id, "FINISHED")


def log_run_folder(run: tuple[MlflowClient, str, str], folder: Path, name: str, tags: dict) -> str:
    """Log one fit's outputs — ``summary.json`` (settings, degradation, scalars), ``curves.csv``
    and the images — as a child run of the stage's parent ``run`` (from :func:`stage_run`).

    The run folder, which DVC tracks, is the record; MLflow is a view of it, so a run can be
    logged again from its folder alone."""
    mlflow, experiment, parent = run
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    observation = summary.get("observation") or {}
    params = {
        **{key: summary[key] for key in ("task", "variant", "image", "method") if key in summary},
        **summary["settings"],
        **{f"degradation.{k}": v for k, v in (observation.get("params") or {}).items()},
    }
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    artifacts = [folder / artifact for artifact in RUN_ARTIFACTS]
    curves = read_curves(folder / CURVES_FILE)
    return log_fit_run(mlflow, experiment, parent, name, params, tags, curves, metrics, artifacts)


def log_fits(
    experiment: str, stage: str, tags: dict[str, Any], fits: list[tuple[Path, str, dict]]
) -> None:
    """A parent run for one stage invocation with a child run per fit: ``fits`` holds each fit's
    (run folder, run name, extra tags)."""
    commit = git_commit()
    with stage_run(experiment, stage, tags) as run:
        for folder, name, extra in fits:
            log_run_folder(run, folder, name, {**tags, "git_commit": commit, **extra})


def log_fit_run(
    mlflow: MlflowClient,
    experiment: str,
    parent_run_id: str,
    name: str,
    params: dict[str, Any],
    tags: dict[str, Any],
    curves: dict[str, np.ndarray],
    metrics: dict[str, float | None],
    artifacts: list[Path],
) -> str:
    """One child run for one fit: params, tags, step curves, final metrics, artifact files."""
    from mlflow.entities import Metric

    run = mlflow.create_run(
        experiment,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, **{k: str(v) for k, v in tags.items()}},
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    finals = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if v is not None]
    mlflow.log_batch(run_id, params=_params(params), metrics=finals)
    log_curves(mlflow, run_id, curves)
    for path in artifacts:
        if path.exists():
            mlflow.log_artifact(run_id, str(path))
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id
