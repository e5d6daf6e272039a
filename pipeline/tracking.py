"""MLflow tracking: one experiment per task, a parent run per stage invocation, a run per fit.

The default store is ``sqlite:///<repo>/mlflow.db`` with artifacts under ``<repo>/mlartifacts``,
both absolute so that DVC's temporary experiment workspaces (``.dvc/tmp/exps/...``) log to the
main repository's database; ``MLFLOW_TRACKING_URI`` overrides the store (e.g. a tracking server).
Curves go in as step metrics through ``log_batch`` (at most 1,000 values a call), never one call
per value. MLflow is imported lazily: it is slow to import and only the stages need it.

Nothing is lost in tracking (docs/tracking.md): a fit's run folder, which DVC tracks, is the
record and MLflow a view of it. Every MLflow call of a stage goes through :func:`guarded`, so a
store that is down, locked or full costs the stage one ``warning:`` line, never its outputs;
``sdip relog`` logs the folders again, and a folder already logged with the same content (tag
``content_sha256``) is never logged twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.credentials import redact
from pipeline.errors import UserError
from pipeline.layout import SWEEPS
from pipeline.results import CURVES_FILE, SUMMARY_FILE, read_curves

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

T = TypeVar("T")

BATCH_LIMIT = 1000
RUN_ARTIFACTS = ("restored_stop.png", "restored_final.png", "restored_best.png", "observation.png")
SQLITE_PREFIX = "sqlite:///"
SERVER_PREFIXES = ("http://", "https://")
DVC_EXPERIMENT_WORKSPACES = os.path.join(".dvc", "tmp", "exps")
CONTENT_TAG = "content_sha256"
"""Tag of a fit's run: the sha256 of its run folder's content (:func:`content_sha256`)."""
FOLDER_TAG = "run_folder"
"""Tag of a fit's run: the run folder it was logged from."""
DESCRIBED = ("task", "variant", "image", "method")
"""Keys of a fit's ``summary.json`` that are both params and tags of its run."""
LOCK_RETRY_S = 60.0
"""How long a call that finds the SQLite store locked is retried (beyond MLflow's own 20 s busy
timeout per transaction) before the logging gives up."""
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
"""A tracking server that does not answer is retried after 2, 4, 8 and 16 s (MLflow's default, 7
retries, waits about 4 minutes). Set in the environment, they win."""


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


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's errors (an unreachable server among them), the
    database's, and the operating system's (a full or read-only disk)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, sqlite3.Error, OSError


def is_locked(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is SQLite's ``database is locked``."""
    seen: BaseException | None = err
    while seen is not None:
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, called again after 0.1, 0.2, 0.4, … (at most 5) s while the
    SQLite store is locked, for up to :data:`LOCK_RETRY_S`. A locked write transaction is rolled
    back whole, so calling again never writes anything twice."""
    deadline = time.monotonic() + LOCK_RETRY_S
    delay = 0.1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not is_locked(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 5.0)


class RetryingClient:
    """An ``MlflowClient`` whose every call goes through :func:`retry_locked`."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: retry_locked(attribute, *args, **kwargs)


def client(root: Path | None = None) -> MlflowClient:
    """A client of the tracking store whose calls retry a locked SQLite store. A new SQLite
    store is created under a file lock: two processes creating the same database at once would
    both run its schema migrations."""
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    uri = tracking_uri(root)
    if uri.startswith(SQLITE_PREFIX):
        from sqlalchemy.engine import make_url

        database = Path(str(make_url(uri).database).removeprefix("file:"))
        with open(database.parent / f"{database.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            retry_locked(lambda: MlflowClient(uri).search_experiments(max_results=1))
    return RetryingClient(MlflowClient(uri))  # type: ignore[return-value]


def failure_line(what: str, err: BaseException, relog: str) -> str:
    """One line for a failed logging: what failed, the store, the error it was raised from
    first (``ConnectionRefusedError``, ``sqlite3.OperationalError: database is locked``), the
    command that logs it again."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return (
        f"MLflow logging of {what} to {redact(tracking_uri())} failed "
        f"({type(err).__name__}: {first}); re-log with: {relog}"
    )


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Silence MLflow's own log lines (a failing SQLite store logs its traceback at ERROR): the
    caller reports a failure in one line."""
    import mlflow  # noqa: F401  (importing it sets its loggers' levels: first)

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def guarded(what: str, relog: str, log: Callable[[], object]) -> bool:
    """Run ``log`` (MLflow calls, :func:`quiet_mlflow`); return whether it succeeded.

    A failing store (:func:`tracking_errors`) ends the logging with one ``warning:`` line on
    stderr (:func:`failure_line`): the command that logs has written its outputs already, so it
    goes on and exits 0. Any other exception is a bug and propagates.
    """
    try:
        with quiet_mlflow():
            log()
    except tracking_errors() as err:
        print(f"warning: {failure_line(what, err, relog)}", file=sys.stderr, flush=True)
        return False
    return True


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


@contextmanager
def stage_run(
    experiment: str, stage: str, tags: dict[str, Any], params: dict[str, Any] | None = None
) -> Iterator[tuple[MlflowClient, str, str]]:
    """A parent run for one stage invocation; yields ``(client, experiment_id, run_id)``.

    The run ends FINISHED, or FAILED if the body raises (if the store still answers).
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
        with suppress(*tracking_errors()):
            mlflow.set_terminated(run_id, "FAILED")
        raise
    mlflow.set_terminated(run_id, "FINISHED")


def content_sha256(folder: Path) -> str:
    """The sha256 of a run folder's ``summary.json`` and ``curves.csv``, read in that order: two
    folders with equal digests hold the same fit."""
    digest = hashlib.sha256()
    for name in (SUMMARY_FILE, CURVES_FILE):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RunFolder:
    """One fit's outputs (:mod:`pipeline.results`) as an MLflow run: ``summary.json`` gives the
    params (task, image, method, variant, settings, degradation), the tags and the final
    scalars, ``curves.csv`` the step metrics, the images the artifacts."""

    folder: Path
    summary: dict[str, Any]
    digest: str

    @classmethod
    def read(cls, folder: Path) -> RunFolder:
        """The fit in ``folder``; a folder that is not a fit's is a :class:`UserError`."""
        missing = [name for name in (SUMMARY_FILE, CURVES_FILE) if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} is not a run folder: it has no {' or '.join(missing)}")
        try:
            summary = json.loads((folder / SUMMARY_FILE).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{folder / SUMMARY_FILE} is not JSON: {err}") from err
        absent = [key for key in (*DESCRIBED, "settings") if key not in summary]
        if absent:
            raise UserError(f"{folder / SUMMARY_FILE} lacks {', '.join(absent)}")
        return cls(folder, summary, content_sha256(folder))

    @property
    def experiment(self) -> str:
        return self.summary["task"]

    @property
    def name(self) -> str:
        """``<image>-<method>``; a sweep member ``<image>-<kind>=<value>``
        (``runs/sweeps/<kind>/<value>``)."""
        where = self.folder.resolve()
        sweeps = (Path.cwd() / SWEEPS).resolve()
        if where.parent.parent == sweeps:
            return f"{self.summary['image']}-{where.parent.name}={where.name}"
        return f"{self.summary['image']}-{self.summary['method']}"

    def tags(self) -> dict[str, Any]:
        described = {key: self.summary[key] for key in DESCRIBED}
        return {**described, CONTENT_TAG: self.digest, FOLDER_TAG: self.folder.as_posix()}

    def params(self) -> dict[str, Any]:
        observation = self.summary.get("observation") or {}
        return {
            **{key: self.summary[key] for key in DESCRIBED},
            **self.summary["settings"],
            **{f"degradation.{k}": v for k, v in (observation.get("params") or {}).items()},
        }

    def log(self, mlflow: MlflowClient, experiment: str, parent: str, tags: dict) -> str:
        """Log this fit as a child run of ``parent``, with ``tags`` beside its own."""
        metrics = {k: v for k, v in self.summary.items() if isinstance(v, int | float)}
        artifacts = [self.folder / artifact for artifact in RUN_ARTIFACTS]
        curves = read_curves(self.folder / CURVES_FILE)
        tags = {**tags, **self.tags()}
        return log_fit_run(
            mlflow, experiment, parent, self.name, self.params(), tags, curves, metrics, artifacts
        )


def already_logged(mlflow: MlflowClient, experiment: str, fit: RunFolder) -> bool:
    """Whether ``fit``'s content is logged already as a FINISHED run. Runs of that content whose
    logging stopped half-way (any other status) are deleted, so that the fit is logged again
    whole, never twice."""
    found = mlflow.search_runs([experiment], filter_string=f"tags.{CONTENT_TAG} = '{fit.digest}'")
    finished = False
    for run in found:
        if run.info.status == "FINISHED":
            finished = True
        else:
            mlflow.delete_run(run.info.run_id)
    return finished


def relog_hint(folders: list[Path]) -> str:
    """The command that logs ``folders`` again."""
    return " ".join(["sdip relog", *(folder.as_posix() for folder in folders)])


def log_fits(experiment: str, stage: str, tags: dict[str, Any], folders: list[Path]) -> bool:
    """Log one stage invocation: a parent run (``tags``, ``stage`` as its name) with a child run
    per fit in ``folders`` (:class:`RunFolder`, tagged ``tags`` and the commit) whose content is
    not logged yet. Guarded (:func:`guarded`): returns whether everything was logged."""

    def log() -> None:
        fits = [RunFolder.read(folder) for folder in folders]
        with stage_run(experiment, stage, tags) as (mlflow, exp, parent):
            fit_tags = {**tags, "git_commit": git_commit()}
            for fit in fits:
                if not already_logged(mlflow, exp, fit):
                    fit.log(mlflow, exp, parent, fit_tags)

    return guarded(stage, relog_hint(folders), log)


def relog_folders(fits: list[RunFolder]) -> list[bool]:
    """Log the ``fits`` whose content is not logged yet (a run whose logging stopped half-way is
    replaced, :func:`already_logged`; fits of equal content are one), under one parent run
    ``relog`` per experiment. Returns, per fit, whether it was logged now."""
    mlflow = client()
    todo: dict[str, dict[str, int]] = {}  # experiment id → content digest → index of its fit
    for index, fit in enumerate(fits):
        exp = experiment_id(mlflow, fit.experiment)
        group = todo.setdefault(exp, {})
        if fit.digest not in group and not already_logged(mlflow, exp, fit):
            group[fit.digest] = index
    logged = [False] * len(fits)
    for exp, group in todo.items():
        if not group:
            continue
        experiment = fits[next(iter(group.values()))].experiment
        with stage_run(experiment, "relog", {}) as (mlflow, _, parent):
            for index in group.values():
                fits[index].log(mlflow, exp, parent, {})
                logged[index] = True
    return logged


def log_files(
    experiment: str, stage: str, tags: dict[str, Any], files: list[tuple[Path, str | None]]
) -> bool:
    """Log one stage invocation as a run (``tags``) holding ``files``, each (path, folder in the
    run's artifacts). Guarded (:func:`guarded`; ``sdip <stage>`` logs them again): returns
    whether everything was logged."""

    def log() -> None:
        with stage_run(experiment, stage, tags) as (mlflow, _, run_id):
            for path, folder in files:
                mlflow.log_artifact(run_id, str(path), folder)

    return guarded(stage, f"sdip {stage}", log)


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
