"""The pipeline's fits as SLURM jobs (submitit), recorded by DVC as if ``dvc repro`` had run them.

DVC runs stages one after another and holds a lock on the repository, so jobs must not each run
``dvc repro``. :func:`launch` instead does, from the login node:

1. ``dvc repro`` of the stages the selected cluster stages need that are not cluster stages
   themselves (the ``prepare`` stages), here: they are cheap and every fit reads their outputs;
2. asks DVC which cluster stages (those whose command is ``sdip optimize``, ``sdip sweep`` or
   ``sdip tune``) are out of date, leaving out those that a job of an earlier launch is still
   running and those whose upstream cluster stage is out of date (``tune`` before
   ``optimize_tuned``: they go in a later wave);
3. submits each ready stage's resolved ``cmd`` through submitit, ``stages_per_job`` of them one
   after the other in a job, all jobs of a wave as one job array. A job first removes the
   stage's declared outputs (as ``dvc repro`` does), runs the command in the stage's folder and
   checks that every declared output exists;
4. collects finished jobs: a stage whose command succeeded is ``dvc commit``-ed (its outputs go
   to the cache and its dependencies, parameters and outputs to dvc.lock, exactly as a
   ``dvc repro`` run would record them), so the next ``dvc repro`` runs only what depends on
   them (``fbc``, ``evaluate``, ``aggregate``). A failed stage is reported with its job's log
   and stays out of date: the next :func:`launch` resubmits it, and only it.

Jobs are recorded in ``jobs/launch.json`` (:data:`RECORD`), so a launch that does not wait is
collected by the next one. A job cut by its time limit (or preempted) is requeued by submitit:
the stages it finished are kept, the interrupted one runs again, and its command receives
SIGTERM first so that a fit that checkpoints can save its state and resume on the rerun.

A ``tune`` stage can run as ``study_workers`` SLURM array tasks sharing one Optuna study in a
database (``study_storage``, e.g. PostgreSQL): the study's ``trials`` are split among the
workers, each with its own sampler seed and its own scratch output folder. Each worker writes
its outputs after its last trial, so the worker that read the study last saw every trial of
every worker finished; its folder, the one with most finished trials, becomes the stage's
output.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from pipeline.credentials import has_password, redact
from pipeline.errors import UserError
from pipeline.layout import JOBS
from pipeline.tracking import SQLITE_PREFIX, tracking_uri

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

KINDS = ("local", "slurm")
CLUSTER_COMMANDS = ("optimize", "sweep", "tune")
"""``sdip`` sub-commands whose stages are the cluster's work: one fit or a batch of fits each."""
TUNE = "tune"
RECORD = "launch.json"
LOCK = "launch.lock"
JOB_FOLDER = "%j"
"""Each job's submitit files (pickles, log) in ``jobs/<job id>/``."""
STUDIES = "studies"
"""Scratch outputs of study workers: ``jobs/studies/<study>/worker<i>``."""
TERMINATE_GRACE_S = 60
"""How long an interrupted command has to save its checkpoint after SIGTERM."""
POLL_CHILD_S = 0.5
NO_RESULT = "the job ended without a result (time limit, memory, node failure or scancel)"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class ExecutorConfig:
    """params.yaml ``executor``: where the optimize, sweep and tune stages run.

    ``kind``: ``local`` (``dvc repro`` here, one stage after another) or ``slurm`` (jobs through
    submitit). ``stages_per_job``: stages one job runs one after another. ``study_workers``:
    SLURM array tasks sharing each ``tune`` stage's study in ``study_storage`` (a database URL
    without password). ``poll_s``: seconds between looks at the queue while waiting. ``slurm``:
    submitit's ``SlurmExecutor`` parameters, named as sbatch names them (``partition``,
    ``time`` in minutes, ``gpus_per_node``, ``cpus_per_task``, ``mem``, ``array_parallelism``,
    ``account``, ``qos``, ``constraint``, ``setup``: shell lines run before the job, ...).
    """

    kind: str = "local"
    stages_per_job: int = 1
    study_workers: int = 1
    study_storage: str | None = None
    poll_s: float = 30.0
    slurm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"executor kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("stages_per_job", "study_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"executor {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.poll_s, int | float) or self.poll_s <= 0:
            raise UserError(f"executor poll_s must be a positive number, got {self.poll_s!r}")
        if not isinstance(self.slurm, dict):
            raise UserError(f"executor slurm must map sbatch settings, got {self.slurm!r}")
        unknown = sorted(set(self.slurm) - submitit.SlurmExecutor._valid_parameters())
        if unknown:
            raise UserError(
                f"unknown executor.slurm setting(s) {', '.join(unknown)}; valid: "
                + ", ".join(sorted(submitit.SlurmExecutor._valid_parameters()))
            )
        if self.study_storage is not None and has_password(self.study_storage):
            raise UserError(
                f"executor study_storage {redact(self.study_storage)} carries a password; "
                "give it in PGPASSWORD or ~/.pgpass, never in params.yaml"
            )
        if self.study_workers > 1 and not self.study_storage:
            raise UserError("executor study_workers > 1 needs a database in study_storage")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ExecutorConfig:
        values = values or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown executor setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class Command:
    """One stage's command as a job runs it: in ``wdir``, after removing ``outs``, which it must
    then have written (absolute paths)."""

    stage: str
    cmd: str
    wdir: str
    outs: tuple[str, ...]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _ignore_warning_signal() -> None:
    """In a command's process: ignore the signal SLURM sends every process of the job before its
    time limit (submitit's USR2), which would kill it; :meth:`CommandBatch.checkpoint` sends it
    SIGTERM instead, once the job has decided to requeue."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class CommandBatch(submitit.helpers.Checkpointable):
    """What one job runs: its commands one after another; returns ``[(stage, error or None)]``.

    A failed command does not stop the others. On a time limit or preemption submitit calls
    :meth:`checkpoint` and requeues the job with this object, which remembers the commands it
    finished; the interrupted command runs again, without its outputs being removed first (a
    resumable command finds its checkpoint there).
    """

    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands
        self.errors: dict[int, str | None] = {}
        self.started: set[int] = set()
        self._process: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}

    def __call__(self) -> list[tuple[str, str | None]]:
        for index, command in enumerate(self.commands):
            if index in self.errors:
                continue
            print(f"== {command.stage}: {command.cmd}", flush=True)
            start = time.monotonic()
            fresh = index not in self.started
            self.started.add(index)  # before it runs: a requeue keeps what it has written
            try:
                error = self._run(command, fresh)
            except OSError as err:
                error = f"{type(err).__name__}: {err}"
            self.errors[index] = error
            took = time.monotonic() - start
            print(f"== {command.stage}: {error or 'done'} ({took:.1f} s)", flush=True)
        return [(c.stage, self.errors[i]) for i, c in enumerate(self.commands)]

    def _run(self, command: Command, fresh: bool) -> str | None:
        """Run one command (after removing its outputs when ``fresh``); its error or ``None``."""
        if fresh:
            for out in command.outs:
                _remove(Path(out))
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self._process = subprocess.Popen(
            command.cmd,
            shell=True,
            cwd=command.wdir,
            env=env,
            start_new_session=True,
            preexec_fn=_ignore_warning_signal,
        )
        # Poll rather than wait: a blocking wait holds the lock that checkpoint()'s wait needs
        # when SLURM's signal interrupts it.
        while (code := self._process.poll()) is None:
            time.sleep(POLL_CHILD_S)
        self._process = None
        missing = [out for out in command.outs if not Path(out).exists()]
        if code != 0:
            return f"exit status {code}"
        if missing:
            return f"did not write its declared output(s) {', '.join(missing)}"
        return None

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Give the running command SIGTERM and up to :data:`TERMINATE_GRACE_S` to save its
        state, then hand submitit this batch to requeue."""
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self._process = None
        return submitit.helpers.DelayedSubmission(self)


@dataclass
class LaunchReport:
    """What one :func:`launch` did: stages submitted (for ``local``: run by ``dvc repro``),
    failed (with their logs), still running, and waiting for an upstream stage."""

    submitted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


def is_cluster_stage(stage: PipelineStage) -> bool:
    words = shlex.split(stage.cmd) if isinstance(stage.cmd, str) else []
    return len(words) > 1 and words[0] == "sdip" and words[1] in CLUSTER_COMMANDS


def is_tune_stage(stage: PipelineStage) -> bool:
    return shlex.split(stage.cmd)[1] == TUNE


def dvc_command() -> str:
    """The ``dvc`` next to this Python (the project's environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def _open_repo(root: Path) -> Repo:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except DvcException as err:
        raise UserError(f"{root} is not a DVC repository: {err}") from err


def selected_stages(repo: Repo, patterns: tuple[str, ...]) -> list[PipelineStage]:
    """The cluster stages whose names match one of ``patterns`` (all of them without any)."""
    stages = [s for s in repo.index.stages if is_cluster_stage(s) and not s.frozen]
    chosen = [
        s for s in stages if not patterns or any(fnmatchcase(s.addressing, p) for p in patterns)
    ]
    if patterns and not chosen:
        raise UserError(f"no optimize, sweep or tune stage matches {', '.join(patterns)}")
    return chosen


def _run_dvc(root: Path, args: list[str], what: str) -> None:
    done = subprocess.run([dvc_command(), *args], cwd=root, check=False)
    if done.returncode != 0:
        raise UserError(f"{what} failed (dvc {' '.join(args)}, exit status {done.returncode})")


def out_of_date(root: Path) -> set[str]:
    """The stages DVC would run again (``dvc status``)."""
    repo = _open_repo(root)
    try:
        return set(repo.status())
    finally:
        repo.close()


def commit(root: Path, names: list[str]) -> None:
    """Record the stages ``names`` in dvc.lock and their outputs in the cache (``dvc commit``)."""
    if names:
        _run_dvc(root, ["commit", "--force", "--quiet", *names], "recording the finished stages")


def queued_jobs() -> set[str]:
    """Ids of this user's jobs still in the SLURM queue (array tasks one by one: ``123_4``)."""
    done = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise UserError(f"squeue failed: {done.stderr.strip() or done.returncode}")
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


class Record:
    """``jobs/launch.json``: the jobs not collected yet and the study workers' scratch folders."""

    def __init__(self, root: Path) -> None:
        self.path = root / JOBS / RECORD
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.jobs: list[dict[str, Any]] = data.get("jobs", [])
        self.studies: dict[str, dict[str, Any]] = data.get("studies", {})

    def save(self) -> None:
        from pipeline.imageio import write_bytes_atomic

        data = {"jobs": self.jobs, "studies": self.studies}
        write_bytes_atomic(self.path, (json.dumps(data, indent=2) + "\n").encode())

    def running(self) -> set[str]:
        return {stage for job in self.jobs for stage in job["stages"]}


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    path = root / JOBS / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise UserError(f"another sdip launch is running in {root} ({path} is locked)") from err
        yield


def _job_log(root: Path, job_id: str) -> str:
    path = submitit.SlurmJob(root / JOBS / JOB_FOLDER, job_id).paths.stdout
    return str(path.relative_to(root))


def _exception_line(failure: Exception) -> str:
    """The exception line of the traceback submitit quotes between two rules of dashes."""
    parts = str(failure).split("-" * 22)
    lines = parts[1].strip().splitlines() if len(parts) > 2 else str(failure).splitlines()
    return lines[-1].strip() if lines else type(failure).__name__


def job_errors(root: Path, entry: dict[str, Any], queued: set[str]) -> dict[str, str | None] | None:
    """Each stage of a recorded job and its error (``None``: done), or ``None`` while the job is
    in the queue."""
    job = submitit.SlurmJob(root / JOBS / JOB_FOLDER, entry["id"])
    if job.paths.result_pickle.exists():
        failure = job.exception()
        if failure is None:
            return dict(job.result())
        return dict.fromkeys(entry["stages"], f"the job raised {_exception_line(failure)}")
    if entry["id"] in queued:
        return None
    return dict.fromkeys(entry["stages"], NO_RESULT)


def finish_study(root: Path, study: dict[str, Any]) -> None:
    """Make the most complete worker output of a shared study the ``tune`` stage's output."""
    folders = [root / f for f in study["scratch"]]
    finished = {}
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        finished[folder] = summary["trials"] - summary["running"]
    best = max(folders, key=finished.__getitem__)
    out = root / study["out"]
    _remove(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(best, out)
    shutil.rmtree(best.parent, ignore_errors=True)


def collect(root: Path, record: Record, report: LaunchReport, echo: Echo) -> None:
    """Commit the stages whose jobs all finished and succeeded, report the failed ones with their
    logs, and keep in the record the jobs of stages that are still running."""
    queued = queued_jobs() if record.jobs else set()
    outcomes = [job_errors(root, entry, queued) for entry in record.jobs]
    unfinished = {
        stage
        for entry, outcome in zip(record.jobs, outcomes, strict=True)
        if outcome is None
        for stage in entry["stages"]
    }
    errors: dict[str, list[str]] = {}
    finished: set[str] = set()
    for entry, outcome in zip(record.jobs, outcomes, strict=True):
        for stage, error in (outcome or {}).items():
            if stage in unfinished:
                continue
            finished.add(stage)
            if error is not None:
                log = _job_log(root, entry["id"])
                errors.setdefault(stage, []).append(f"{error} (job {entry['id']}, log {log})")
    record.jobs = [e for e in record.jobs if set(e["stages"]) & unfinished]
    done = sorted(finished - set(errors))
    for stage in sorted(finished):
        study = record.studies.pop(stage, None)
        if study is not None and stage in done:
            finish_study(root, study)
    commit(root, done)
    record.save()
    for stage in done:
        echo(f"done: {stage}")
    for stage, lines in sorted(errors.items()):
        report.failed[stage] = "; ".join(lines)
        echo(f"FAILED: {stage}: {report.failed[stage]}")


def make_executor(root: Path, config: ExecutorConfig) -> submitit.SlurmExecutor:
    """submitit's SLURM executor with params.yaml's resources; one log per job (stderr in it)."""
    executor = submitit.SlurmExecutor(folder=root / JOBS / JOB_FOLDER)
    chosen = {k: v for k, v in config.slurm.items() if v is not None}
    executor.update_parameters(**{"job_name": "sdip", "stderr_to_stdout": True, **chosen})
    return executor


def study_commands(
    root: Path, stage: PipelineStage, config: ExecutorConfig, params: dict[str, Any]
) -> tuple[list[Command], dict[str, Any]]:
    """The ``study_workers`` commands sharing one fresh study for a ``tune`` stage, and its
    record (scratch folders, the stage's output)."""
    from pipeline.tuning import TuneConfig

    tune = TuneConfig.from_dict((params.get("tune") or {}).get("settings") or {})
    workers = config.study_workers
    name = f"{stage.addressing}-{uuid.uuid4().hex[:8]}"
    scratch = [JOBS / STUDIES / name / f"worker{i}" for i in range(workers)]
    commands = []
    for i in range(workers):
        trials = tune.trials // workers + (i < tune.trials % workers)
        options = [
            *("--storage", str(config.study_storage)),
            *("--study-name", name),
            *("--trials", str(trials)),
            *("--sampler-seed", str(tune.sampler_seed + i)),
            *("--out", str(root / scratch[i])),
            *(["--no-baseline"] if i > 0 else []),
        ]
        cmd = f"{stage.cmd} {shlex.join(options)}"
        commands.append(Command(stage.addressing, cmd, stage.wdir, (str(root / scratch[i]),)))
    out = str(Path(stage.outs[0].fs_path).relative_to(root))
    return commands, {"out": out, "scratch": [str(s) for s in scratch]}


def stage_command(stage: PipelineStage) -> Command:
    outs = tuple(o.fs_path for o in stage.outs if not o.persist)
    return Command(stage.addressing, stage.cmd, stage.wdir, outs)


def submit(
    root: Path,
    stages: list[PipelineStage],
    config: ExecutorConfig,
    params: dict[str, Any],
    record: Record,
    echo: Echo,
) -> None:
    """Submit ``stages`` as one job array: ``stages_per_job`` stages a job, a ``tune`` stage
    with ``study_workers`` > 1 as that many jobs of one command each."""
    batches: list[list[Command]] = []
    plain = []
    for stage in stages:
        if is_tune_stage(stage) and config.study_workers > 1:
            from pipeline.storage import resolve_storage

            # Create the study tables once here: workers creating them at once can collide.
            resolve_storage(config.study_storage)
            commands, study = study_commands(root, stage, config, params)
            record.studies[stage.addressing] = study
            batches.extend([c] for c in commands)
        else:
            plain.append(stage_command(stage))
    step = config.stages_per_job
    batches.extend(plain[i : i + step] for i in range(0, len(plain), step))
    executor = make_executor(root, config)
    try:
        with executor.batch():
            jobs = [executor.submit(CommandBatch(batch)) for batch in batches]
    except submitit.core.utils.FailedJobError as err:
        reason = " ".join(str(err).split())
        raise UserError(f"sbatch refused the jobs (check executor.slurm): {reason}") from err
    for job, batch in zip(jobs, batches, strict=True):
        stages_of_job = sorted({c.stage for c in batch})
        record.jobs.append({"id": job.job_id, "stages": stages_of_job})
        echo(f"submitted job {job.job_id}: {', '.join(stages_of_job)}")
    record.save()


@dataclass(frozen=True)
class Plan:
    """The selected cluster stages, the cluster stages each waits for, and the other stages
    upstream of them (the ``prepare`` stages, reproduced here)."""

    stages: dict[str, PipelineStage]
    needs: dict[str, set[str]]
    prepare: list[str]

    @classmethod
    def of(cls, root: Path, patterns: tuple[str, ...]) -> Plan:
        import networkx as nx

        repo = _open_repo(root)
        try:
            chosen = selected_stages(repo, patterns)
            # DVC's graph points from a stage to the stages it depends on.
            above = {s.addressing: nx.descendants(repo.index.graph, s) for s in chosen}
        finally:
            repo.close()
        needs = {n: {u.addressing for u in ups if is_cluster_stage(u)} for n, ups in above.items()}
        others = {u.addressing for ups in above.values() for u in ups if not is_cluster_stage(u)}
        return cls({s.addressing: s for s in chosen}, needs, sorted(others))

    def ready(self, stale: set[str], running: set[str], failed: set[str]) -> list[str]:
        """The out-of-date stages to submit now: not running, not failed in this launch, and
        with no upstream cluster stage out of date or running."""
        return sorted(
            n
            for n in self.stages
            if n in stale and n not in running | failed and not self.needs[n] & (stale | running)
        )


def launch(
    root: Path,
    params: dict[str, Any],
    patterns: tuple[str, ...] = (),
    kind: str | None = None,
    wait: bool = True,
    dry_run: bool = False,
    echo: Echo = print,
) -> LaunchReport:
    """Bring the selected optimize, sweep and tune stages up to date (module docstring).

    ``local`` runs ``dvc repro`` of them here. ``slurm`` collects earlier jobs, reproduces the
    ``prepare`` stages, submits the ready out-of-date stages and, with ``wait``, waits, collects
    and submits the next wave until none is left.
    """
    config = ExecutorConfig.from_dict(params.get("executor"))
    kind = kind or config.kind
    if kind not in KINDS:
        raise UserError(f"executor kind {kind!r} is not one of {', '.join(KINDS)}")
    plan = Plan.of(root, patterns)
    report = LaunchReport()
    if kind == "local":
        report.submitted = list(plan.stages)
        if not dry_run:
            _run_dvc(root, ["repro", *plan.stages], "dvc repro")
        return report
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: executor slurm runs on a SLURM login node")
    if tracking_uri(root).startswith(SQLITE_PREFIX):
        echo(
            "warning: the jobs will share the SQLite store mlflow.db through the file system; "
            "set MLFLOW_TRACKING_URI to a tracking server (docs/cluster.md)"
        )
    with _exclusive(root):
        record = Record(root)
        if not dry_run:
            collect(root, record, report, echo)
            if plan.prepare:
                _run_dvc(root, ["repro", *plan.prepare], "reproducing the prepare stages")
        while True:
            stale, running = out_of_date(root), record.running()
            ready = plan.ready(stale, running, set(report.failed))
            report.running = sorted(running.intersection(plan.stages))
            report.waiting = sorted(
                n for n in plan.stages if n in stale and n not in {*running, *ready, *report.failed}
            )
            if dry_run:
                report.submitted = ready
                return report
            if ready:
                submit(root, [plan.stages[n] for n in ready], config, params, record, echo)
                report.submitted.extend(ready)
            if not wait or not record.jobs:
                return report
            while record.jobs:
                time.sleep(config.poll_s)
                collect(root, record, report, echo)
