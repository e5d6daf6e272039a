"""``dvc exp run --queue`` with two workers on the default profile, shrunk: two experiments that
differ in one parameter run at the same time in DVC's temporary workspaces, each keeps its own
results, and both log to the main repository's MLflow store (pipeline.tracking.repo_root)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from pipeline.results import CURVES_FILE, SUMMARY_FILE
from tests.dvc_repo import make_repo, needs_dvc, run, shrunk_params, tool_env
from tests.mlflow_view import ARTIFACTS, assert_run_equals_folder, fit_runs, folder_digest

pytestmark = needs_dvc

TARGET = "optimize_denoising@25-astronaut-dip"
"""One fit, with the prepare stage it depends on."""
FOLDER = "runs/denoising/sigma25/astronaut/dip"
SEEDS = {1, 2}
WAIT_S = 300


def queue_status(repo: Path) -> dict[str, str]:
    """Experiment name → status (Queued, Running, Success, Failed) from ``dvc queue status``."""
    table = run(["dvc", "queue", "status"], repo)
    return dict(re.findall(r"^[0-9a-f]{7}\s+(\S+)\s.*\s(\w+)\s*$", table, flags=re.MULTILINE))


def read_at(repo: Path, rev: str, path: str) -> bytes:
    """A file of DVC's outputs as the experiment commit ``rev`` recorded it."""
    import dvc.api

    return dvc.api.read(path, repo=str(repo), rev=rev, mode="rb")


def test_two_queued_experiments_run_at_once_and_both_log_to_the_repositorys_store(tmp_path):
    repo = make_repo(tmp_path, shrunk_params())
    for seed in sorted(SEEDS):
        run(["dvc", "exp", "run", "--queue", "-S", f"fit.seed={seed}", TARGET], repo)
    # Its workers outlive it, holding its output open: a file, not a pipe to wait on.
    with open(tmp_path / "queue-start.log", "w") as log:
        start = ["dvc", "queue", "start", "-j", "2"]
        subprocess.run(start, cwd=repo, env=tool_env(), stdout=log, stderr=log, check=True)
    most_running, deadline = 0, time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            statuses = queue_status(repo)
            most_running = max(most_running, list(statuses.values()).count("Running"))
            if not {"Queued", "Running"} & set(statuses.values()):
                break
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], repo)
    logs = {name: run(["dvc", "queue", "logs", name], repo) for name in statuses}
    assert sorted(statuses.values()) == ["Success", "Success"], logs
    assert most_running == 2

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo))
    experiments = {
        rev["name"]: (rev["rev"], rev["data"]["params"]["params.yaml"]["data"]["fit"]["seed"])
        for commit in shown
        for experiment in commit.get("experiments") or []
        for rev in experiment["revs"]
    }
    assert set(experiments) == set(statuses)
    assert {seed for _, seed in experiments.values()} == SEEDS

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    runs = {r.data.tags["content_sha256"]: r for r in fit_runs(uri)}
    assert len(runs) == len(SEEDS)
    for name, (rev, seed) in experiments.items():
        folder = tmp_path / "checked" / name  # the experiment's fit, as its commit holds it
        folder.mkdir(parents=True)
        for file in (SUMMARY_FILE, CURVES_FILE, *ARTIFACTS):
            (folder / file).write_bytes(read_at(repo, rev, f"{FOLDER}/{file}"))
        assert json.loads((folder / SUMMARY_FILE).read_text())["settings"]["seed"] == seed
        logged = runs[folder_digest(folder)]
        assert logged.data.tags["run_folder"] == FOLDER and logged.data.tags["dvc_stage"] == TARGET
        assert logged.info.status == "FINISHED"
        assert_run_equals_folder(uri, logged, folder)
