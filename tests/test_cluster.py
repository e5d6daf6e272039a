"""``sdip launch`` on a real one-node SLURM cluster, Optuna workers sharing a PostgreSQL study, and
MLflow on a tracking server backed by PostgreSQL (tests/services.py starts them on loopback).

The repository is the real dvc.yaml on the default profile shrunk as in the end-to-end test, its
fits sent to SLURM through submitit. The tests run in order on one repository: fits as jobs and
recorded by DVC; a failed stage reported and resubmitted alone, then ``dvc repro`` running only
the summaries; a tune stage as two workers of one study; what MLflow and the files hold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from pipeline.cluster import Command, CommandBatch, ExecutorConfig, make_executor
from pipeline.errors import UserError
from pipeline.settings import load_yaml
from pipeline.storage import resolve_storage
from tests.dvc_repo import ITERATIONS, make_repo, ran_stages, run, shrink

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
FIRST = (
    "optimize_denoising@25-astronaut-dip",
    "optimize_denoising@25-astronaut-lipschitz",
    "optimize_denoising@25-astronaut-gaussian",
    "optimize_inpainting@chelsea-dip",
)
SR = {f"optimize_sr@4-rocket-{m}" for m in ("dip", "lipschitz", "gaussian")}
SUMMARIES = {"fbc", "evaluate", "aggregate"}
TRIALS = 4

pytestmark = pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed")


def sdip(repo: Path, *args: str, fails: bool = False) -> str:
    """``sdip ARGS`` in ``repo`` as a user runs it: this environment, MLflow on the server."""
    env = {**os.environ, "PATH": f"{DVC.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["sdip", *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    assert (done.returncode != 0) == fails, f"sdip {' '.join(args)}:\n{output}"
    return output


def submitted(output: str) -> dict[str, list[str]]:
    """Job id → the stages ``sdip launch`` said it submitted in it."""
    return {
        job: stages.split(", ")
        for job, stages in re.findall(r"^submitted job (\S+): (.+)$", output, re.MULTILINE)
    }


def out_of_date(repo: Path) -> set[str]:
    return set(json.loads(run([str(DVC), "status", "--json"], repo)))


def edit_params(repo: Path, change) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def cluster_repo(tmp_path_factory, slurm, postgres, mlflow_server, monkeypatch_module) -> Path:
    params = shrink(load_yaml(ROOT / "profiles" / "cpu.yaml"))
    params["executor"].update(
        kind="slurm",
        poll_s=1,
        study_workers=2,
        study_storage=postgres.url("optuna"),
        slurm={"time": 10, "cpus_per_task": 1, "mem": "1G"},
    )
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return make_repo(tmp_path_factory.mktemp("cluster"), params)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_executor_settings_are_checked():
    with pytest.raises(UserError, match=r"unknown executor\.slurm setting"):
        ExecutorConfig.from_dict({"slurm": {"gpus": 1}})
    with pytest.raises(UserError, match="carries a password"):
        ExecutorConfig.from_dict({"study_storage": "postgresql://u:pw@db/optuna"})
    with pytest.raises(UserError, match="needs a database"):
        ExecutorConfig.from_dict({"study_workers": 2})
    with pytest.raises(UserError, match="kind 'cloud'"):
        ExecutorConfig.from_dict({"kind": "cloud"})
    config = ExecutorConfig.from_dict(load_yaml(ROOT / "params.yaml")["executor"])
    assert (config.kind, config.stages_per_job, config.study_workers) == ("local", 1, 1)


def test_local_executor_is_dvc_repro_and_a_pattern_must_match(tmp_path: Path):
    repo = make_repo(tmp_path, shrink(load_yaml(ROOT / "profiles" / "cpu.yaml")))
    output = sdip(repo, "launch", "--dry-run", "--stages=sweep_*", "--stages=*@25-astronaut-dip")
    assert (
        "would submit 3: optimize_denoising@25-astronaut-dip, sweep_lambda, sweep_sigma" in output
    )
    output = sdip(repo, "launch", "--stages=optimise_*", fails=True)
    assert output == "error: no optimize, sweep or tune stage matches optimise_*\n"


def test_four_fits_run_as_slurm_jobs_and_dvc_records_them(cluster_repo: Path):
    output = sdip(cluster_repo, "launch", *(f"--stages={s}" for s in FIRST))
    jobs = submitted(output)
    assert sorted(s for stages in jobs.values() for s in stages) == sorted(FIRST)
    assert len(jobs) == 4 and all(re.fullmatch(r"\d+_[0-3]", job) for job in jobs)
    assert {"prepare@denoising", "prepare@inpainting"} <= ran_stages(output)
    assert set(re.findall(r"^done: (\S+)$", output, re.MULTILINE)) == set(FIRST)
    assert not out_of_date(cluster_repo) & set(FIRST)
    lock = yaml.safe_load((cluster_repo / "dvc.lock").read_text())["stages"]
    for stage in FIRST:
        assert lock[stage]["outs"][0]["md5"].endswith(".dir")
    curves = cluster_repo / "runs/denoising/sigma25/astronaut/dip/curves.csv"
    assert len(curves.read_text().splitlines()) == 1 + ITERATIONS
    for job, stages in jobs.items():
        log = (cluster_repo / "jobs" / job / f"{job}_0_log.out").read_text()
        assert f"== {stages[0]}: done" in log
    assert json.loads((cluster_repo / "jobs" / "launch.json").read_text())["jobs"] == []


def test_a_failed_stage_is_reported_with_its_log_and_resubmitted_alone(cluster_repo: Path):
    def typo(params: dict) -> None:
        params["tasks"]["sr"]["fit"]["device"] = "gpu"
        params["executor"]["stages_per_job"] = 4

    edit_params(cluster_repo, typo)
    output = sdip(cluster_repo, "launch", fails=True)
    jobs = submitted(output)
    launched = {s for stages in jobs.values() for s in stages}
    assert not launched & set(FIRST) and launched >= SR and len(launched) == 13
    assert max(len(stages) for stages in jobs.values()) == 4
    failed = dict(re.findall(r"^FAILED: (\S+): (.+)$", output, re.MULTILINE))
    assert set(failed) == SR
    log = re.search(r"log (\S+)\)", failed["optimize_sr@4-rocket-dip"]).group(1)
    assert failed["optimize_sr@4-rocket-dip"].startswith("exit status 1 (job ")
    assert "error: unknown device 'gpu'" in (cluster_repo / log).read_text()
    assert "3 stage(s) failed" in output
    assert out_of_date(cluster_repo) & launched == SR

    edit_params(cluster_repo, lambda params: params["tasks"]["sr"]["fit"].pop("device"))
    again = submitted(sdip(cluster_repo, "launch"))
    assert {s for stages in again.values() for s in stages} == SR
    assert out_of_date(cluster_repo) == SUMMARIES
    assert ran_stages(run([str(DVC), "repro"], cluster_repo)) == SUMMARIES
    assert out_of_date(cluster_repo) == set()


def test_two_optuna_workers_share_one_postgresql_study_and_lose_no_trial(
    cluster_repo: Path, postgres
):
    def tune_one_image(params: dict) -> None:
        params["tune"]["images"] = ["astronaut"]
        params["tune"]["settings"].update(trials=TRIALS, startup_trials=2)

    edit_params(cluster_repo, tune_one_image)
    output = sdip(cluster_repo, "launch", "--stages=tune@*", "--stages=optimize_tuned@*")
    jobs = submitted(output)
    assert sorted(map(tuple, jobs.values())) == [("optimize_tuned@astronaut",)] + 2 * [
        ("tune@astronaut",)
    ]
    first_wave = [job for job, stages in jobs.items() if stages == ["tune@astronaut"]]
    assert len({job.split("_")[0] for job in first_wave}) == 1  # one job array of two workers
    assert not out_of_date(cluster_repo) & {"tune@astronaut", "optimize_tuned@astronaut"}

    summary = json.loads(
        (cluster_repo / "tuned/denoising/sigma25/astronaut/summary.json").read_text()
    )
    assert summary["trials"] == TRIALS and summary["complete"] + summary["pruned"] == TRIALS
    assert summary["storage"] == postgres.url("optuna")
    study = optuna.load_study(
        study_name=summary["study"], storage=resolve_storage(postgres.url("optuna"))
    )
    assert sorted(t.number for t in study.trials) == list(range(TRIALS))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in study.trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    seeds = set()
    for job in first_wave:
        log = (cluster_repo / "jobs" / job / f"{job}_0_log.out").read_text()
        seeds.update(re.findall(r"--sampler-seed (\d+)", log))
        assert len(re.findall(r"^trial \d+: ", log, re.MULTILINE)) == TRIALS // 2
    assert seeds == {"0", "1"}


def test_runs_log_to_the_mlflow_server_and_no_password_is_written(
    cluster_repo: Path, mlflow_server: str, postgres
):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("denoising")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # 3 methods and the tuned refit (a parent each), the λ sweep (two fits), the σ sweep (one).
    assert (len(children), len(parents)) == (7, 6)
    child = next(r for r in children if r.data.tags["dvc_stage"] == FIRST[0])
    assert child.data.params["method"] == "dip" and child.data.params["width"] == "8"
    history = client.get_metric_history(child.info.run_id, "psnr")
    assert [m.step for m in history] == list(range(ITERATIONS))
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "restored_stop.png" in artifacts

    secret = postgres.password
    every_run = [
        found
        for experiment in client.search_experiments()
        for found in client.search_runs([experiment.experiment_id])
    ]
    assert len(every_run) > len(runs)  # the study's runs (tune-denoising) are checked too
    for found in every_run:
        values = [*found.data.params.values(), *found.data.tags.values()]
        assert not [v for v in values if secret in v], found.info.run_name
    storage = resolve_storage(postgres.url("optuna"))
    names = optuna.get_all_study_names(storage)
    studies = [optuna.load_study(study_name=name, storage=storage) for name in names]
    assert studies
    for study in studies:
        attrs = [study.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study.trials]
        assert secret not in json.dumps(attrs, default=str), study.study_name
    for path in cluster_repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path


def test_a_job_cut_by_its_time_limit_is_requeued_and_keeps_its_finished_stages(
    slurm, tmp_path: Path
):
    first = Command("first", "echo run >> runs.txt && touch one", str(tmp_path), ())
    interrupted = Command(
        "second",
        "trap 'echo SIGTERM > signalled; exit 143' TERM; "
        "if [ -e started ]; then touch two; else touch started; sleep 120 & wait; fi",
        str(tmp_path),
        (str(tmp_path / "two"),),
    )
    config = ExecutorConfig(kind="slurm", slurm={"time": 10, "cpus_per_task": 1, "mem": "100M"})
    job = make_executor(tmp_path, config).submit(CommandBatch([first, interrupted]))
    wait_until(lambda: (tmp_path / "started").exists())
    job._interrupt(timeout=True)  # what SLURM sends before the time limit: submitit's USR2

    def requeued() -> bool:
        state = subprocess.run(
            ["squeue", "--noheader", "--format=%T", f"--jobs={job.job_id}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return state == "PENDING"

    wait_until(requeued)
    # SLURM holds a requeued job back for a while; let it start at once.
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    wait_until(job.paths.result_pickle.exists)
    assert job.result() == [("first", None), ("second", None)]
    assert (tmp_path / "runs.txt").read_text() == "run\n"  # the finished stage did not rerun
    assert (tmp_path / "signalled").read_text() == "SIGTERM\n"
    log = job.paths.stdout.read_text()
    assert "Requeued job" in log and log.count("== second: trap") == 2


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
