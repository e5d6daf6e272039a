"""Nothing lost in tracking: MLflow holds exactly what a run folder holds, a failing store (down,
locked, read-only, full) costs a stage one warning line and never its outputs, ``sdip relog``
logs every fit once, and four processes logging to one SQLite store at once lose nothing."""

from __future__ import annotations

import csv
import json
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from PIL import Image

from bench.tracking_stress import log_at_once
from pipeline import tracking
from pipeline.results import CURVES_FILE, SUMMARY_FILE
from stages.cli import cli
from tests.dvc_repo import ITERATIONS, ROOT, shrunk_params
from tests.mlflow_view import (
    artifact_paths,
    assert_run_equals_folder,
    file_values,
    fit_runs,
    mlflow_client,
    runs_of,
)
from tests.run_folders import denoising_problem, hand_curves, write_run

FIT = ("denoising", "sigma25", "astronaut", "dip")
FIT_FOLDER = Path("runs", *FIT)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The default profile shrunk (params.yaml) and its prepared denoising observation."""
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "params.yaml").write_text(yaml.safe_dump(shrunk_params(), sort_keys=False))
    shutil.copytree(ROOT / "dataset", folder / "dataset")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(folder))
        result = CliRunner().invoke(cli, ["prepare", "denoising"])
        tracking.client()  # an empty store, which each test copies
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def project(prepared: Path, tmp_path: Path, monkeypatch) -> Path:
    """A project folder holding the prepared observation and its own empty MLflow store (SQLite,
    new to this process: MLflow opens it afresh)."""
    for name in ("params.yaml", "dataset", "data"):
        (tmp_path / name).symlink_to(prepared / name)
    shutil.copy(prepared / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    return tmp_path


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def sdip(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def warning_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_outputs_written(folder: Path) -> None:
    rows = (folder / CURVES_FILE).read_text().splitlines()
    assert len(rows) == 1 + ITERATIONS
    assert json.loads((folder / SUMMARY_FILE).read_text())["iterations_run"] == ITERATIONS
    assert {p.name for p in folder.glob("restored_*.png")} == {
        "restored_stop.png",
        "restored_final.png",
        "restored_best.png",
    }


def long_run(runs: Path, key: tuple[str, str, str, str], steps: int, seed: int) -> Path:
    """A run folder of ``steps`` measured iterations with seeded curves; WMV unmeasured (empty)
    over its first 100 iterations, as the rule's window fills."""
    rng = np.random.default_rng(seed)
    psnr = list(20 + np.cumsum(rng.normal(0, 0.01, steps)))
    wmv = np.concatenate([np.full(100, np.nan), rng.random(steps - 100)])
    curves = hand_curves(psnr, wmv=list(wmv))
    curves["loss"] = rng.random(steps)
    image = torch.from_numpy(rng.random((1, 3, 64, 64)).astype(np.float32))
    problem = denoising_problem(runs.parent / "source", image)
    return write_run(runs, key, problem, curves, stop_iteration=steps // 2)


def test_a_fit_of_1500_steps_in_mlflow_equals_its_run_folder(project: Path):
    folder = long_run(project / "runs", FIT, 1500, seed=0)
    assert tracking.log_fits("denoising", "optimize test", {"profile": "cpu"}, [FIT_FOLDER])
    uri = sqlite_uri(project)
    [run] = fit_runs(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "astronaut-dip"
    assert run.data.tags["profile"] == "cpu" and run.data.tags["run_folder"] == str(FIT_FOLDER)
    assert len(mlflow_client(uri).get_metric_history(run.info.run_id, "psnr")) == 1500
    assert len(mlflow_client(uri).get_metric_history(run.info.run_id, "wmv")) == 1400
    assert_run_equals_folder(uri, run, folder)


def test_a_down_server_costs_one_warning_line_and_relog_logs_the_fit_once(project, monkeypatch):
    down = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = sdip("optimize", "denoising", "astronaut", "dip", "--variant", "25")
    assert result.exit_code == 0, result.output
    assert_outputs_written(project / FIT_FOLDER)
    [line] = warning_lines(result)
    assert line.startswith("warning: MLflow logging of optimize denoising/sigma25/astronaut/dip")
    assert f"to {down} failed (ConnectionRefusedError" in line
    relog = line.split("re-log with: ")[1].split()
    assert relog == ["sdip", "relog", str(FIT_FOLDER)]

    uri = sqlite_uri(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    first = sdip(*relog[1:])
    assert first.exit_code == 0 and first.stderr == "", first.output
    assert first.stdout.splitlines() == [
        f"logged: {FIT_FOLDER}",
        "logged 1 fit(s); 0 were logged already",
    ]
    again = sdip("relog")  # every run folder under runs/
    assert again.stdout.splitlines()[-1] == "logged 0 fit(s); 1 were logged already"
    [run] = fit_runs(uri)
    assert run.data.tags["mlflow.parentRunId"] in {
        r.info.run_id for r in runs_of(uri, "denoising") if r.data.tags.get("stage") == "relog"
    }
    assert_run_equals_folder(uri, run, project / FIT_FOLDER)


def test_a_store_locked_beyond_the_retries_costs_one_warning_line(project, monkeypatch):
    holder = sqlite3.connect(project / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(tracking, "LOCK_RETRY_S", 0.0)
    try:
        result = sdip("optimize", "denoising", "astronaut", "dip", "--variant", "25")
    finally:
        holder.close()
    assert result.exit_code == 0, result.output
    assert_outputs_written(project / FIT_FOLDER)
    [line] = warning_lines(result)
    assert "(OperationalError: database is locked); re-log with: sdip relog runs/" in line


def test_retry_locked_waits_for_a_lock_to_be_released(tmp_path):
    database = tmp_path / "locked.db"
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    writer = sqlite3.connect(database, timeout=0.05, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        writer.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(1.0, holder.execute, ["COMMIT"])
    release.start()
    start = time.monotonic()
    tracking.retry_locked(writer.execute, "INSERT INTO t VALUES (2)")
    assert time.monotonic() - start >= 0.9
    release.join()
    assert writer.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_a_read_only_store_costs_one_warning_line(project, monkeypatch):
    read_only = f"sqlite:///file:{project / 'mlflow.db'}?mode=ro&uri=true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", read_only)
    result = sdip("optimize", "denoising", "astronaut", "dip", "--variant", "25")
    assert result.exit_code == 0, result.output
    assert_outputs_written(project / FIT_FOLDER)
    [line] = warning_lines(result)
    assert "(OperationalError: attempt to write a readonly database)" in line


def test_a_full_disk_half_way_then_relog_replaces_the_partial_run(project: Path):
    """The store may grow by no byte (RLIMIT_FSIZE, as on a full disk): the run is created, its
    params logged, its curves are not. ``sdip relog`` deletes that run and logs the fit whole."""
    uri = sqlite_uri(project)
    limit = (project / "mlflow.db").stat().st_size

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    command = [sys.executable, "-c", "from stages.cli import main; main()"]
    args = ["optimize", "denoising", "astronaut", "dip", "--variant", "25"]
    done = subprocess.run(
        command + args, capture_output=True, text=True, preexec_fn=full_disk, check=False
    )
    assert done.returncode == 0, done.stderr
    assert_outputs_written(project / FIT_FOLDER)
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("warning: ") and "(OperationalError: disk I/O error)" in line
    [partial] = fit_runs(uri)
    assert partial.info.status == "RUNNING"
    assert partial.data.params  # created, and its params logged, before the disk was full
    assert mlflow_client(uri).get_metric_history(partial.info.run_id, "psnr") == []

    assert sdip("relog").stdout.splitlines()[0] == f"logged: {FIT_FOLDER}"
    [run] = fit_runs(uri)
    assert run.info.run_id != partial.info.run_id and run.info.status == "FINISHED"
    deleted = [
        r for r in runs_of(uri, "denoising", deleted=True) if r.info.lifecycle_stage == "deleted"
    ]
    assert [r.info.run_id for r in deleted] == [partial.info.run_id]
    assert_run_equals_folder(uri, run, project / FIT_FOLDER)


def test_a_study_with_a_down_server_warns_once_and_writes_its_outputs(
    project, astronaut_64, monkeypatch
):
    image = project / "photo.png"
    pixels = (astronaut_64[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(image)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = sdip(
        "tune", "denoising", str(image), "--trials", "2", "--storage", "memory",
        "--out", "tuned", "--iterations", "20", "--width", "8", "--log-every", "10",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [line] = warning_lines(result)
    assert line.startswith("warning: MLflow logging of the study of denoising-")
    assert "re-log with: none: a study's trials keep no run folder" in line
    rows = list(csv.DictReader((project / "tuned" / "trials.csv").read_text().splitlines()))
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE"]


def test_four_processes_log_to_one_sqlite_store_and_lose_no_step(tmp_path: Path):
    """Four ``sdip relog`` processes at once, each a fit of 3,000 steps × 4 curves, into one new
    SQLite store: every process succeeds, every run is FINISHED with every value."""
    steps, keys = 3000, [("denoising", "sigma25", f"image{i}", "dip") for i in range(4)]
    folders = [long_run(tmp_path / "runs", key, steps, seed) for seed, key in enumerate(keys)]
    for folder in folders:  # 4 curves: drop the others from curves.csv
        with open(folder / CURVES_FILE, newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = ["iteration", "loss", "psnr", "psnr_obs", "wmv"]
        lines = [",".join(kept)] + [",".join(row[k] for k in kept) for row in rows]
        (folder / CURVES_FILE).write_text("\n".join(lines) + "\n")
    uri = sqlite_uri(tmp_path)
    command = [sys.executable, "-c", "from stages.cli import main; main()", "relog"]
    start = time.monotonic()
    done = log_at_once(command, [f.relative_to(tmp_path) for f in folders], tmp_path, uri)
    print(f"4 processes logged {4 * steps * 4} values in {time.monotonic() - start:.1f} s")
    for code, out, err in done:
        assert code == 0, err
        assert out.splitlines()[-1] == "logged 1 fit(s); 0 were logged already"
        assert "warning" not in err and "Traceback" not in err, err
    runs = {r.data.tags["image"]: r for r in fit_runs(uri)}
    assert sorted(runs) == [key[2] for key in keys]
    for key, folder in zip(keys, folders, strict=True):
        run = runs[key[2]]
        assert run.info.status == "FINISHED"
        values = file_values(folder)
        assert [len(v) for v in values.values()] == [steps, steps, steps, steps - 100]
        assert_run_equals_folder(uri, run, folder)


def test_aggregate_with_a_down_server_warns_then_logs_its_files(project, astronaut_64, monkeypatch):
    problem = denoising_problem(project / "source", astronaut_64)
    for index, method in enumerate(("dip", "lipschitz", "gaussian")):
        curves = hand_curves([20.0 + index, 23, 25, 24.5, 24, 23.5, 23, 22.5], 2)
        write_run(project / "runs", (*FIT[:3], method), problem, curves, 10)
    assert sdip("evaluate").exit_code == sdip("fbc").exit_code == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = sdip("aggregate")
    assert down.exit_code == 0, down.output
    [line] = warning_lines(down)
    assert line.startswith("warning: MLflow logging of aggregate to http://127.0.0.1:")
    assert line.endswith("re-log with: sdip aggregate")
    results = project / "results"
    files = {
        p.relative_to(results).as_posix()
        for p in [*(results / "figures").rglob("*.png"), *(results / "tables").iterdir()]
    }
    assert "tables/denoising.md" in files and "figures/restorations.png" in files

    uri = sqlite_uri(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert sdip("aggregate").exit_code == 0
    [run] = runs_of(uri, "summary")
    assert artifact_paths(uri, run.info.run_id) == files | {"phenomena.md"}


def test_relog_logs_a_content_once_and_names_a_folder_that_is_not_a_run(project: Path):
    folder = long_run(project / "runs", FIT, 200, seed=3)
    copy = project / "copy"
    shutil.copytree(folder, copy)
    result = sdip("relog", str(FIT_FOLDER), "copy")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"logged: {FIT_FOLDER}",
        "already logged: copy",
        "logged 1 fit(s); 1 were logged already",
    ]
    [run] = fit_runs(sqlite_uri(project))
    assert run.data.tags["run_folder"] == str(FIT_FOLDER)

    (copy / CURVES_FILE).unlink()
    missing = sdip("relog", "copy")
    assert (missing.exit_code, missing.output) == (
        1,
        "error: copy is not a run folder: it has no curves.csv\n",
    )
    shutil.rmtree(project / "runs")
    none = sdip("relog")
    assert (none.exit_code, none.output) == (
        1,
        "error: no run folder (with summary.json) under runs/ to re-log\n",
    )
