"""A throw-away copy of this project as a git + DVC repository, on the default profile shrunk:
what the end-to-end tests (tests/test_pipeline_e2e.py, tests/test_dvc_queue.py) run DVC in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.settings import load_yaml

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 24
COPIED = ("dvc.yaml", "pipeline", "stages", "dataset", "profiles", "pyproject.toml")

needs_dvc = pytest.mark.skipif(
    shutil.which("dvc", path=str(Path(sys.executable).parent)) is None,
    reason="dvc is not installed in this environment",
)


def shrink(params: dict) -> dict:
    """The default profile at the smallest size that still runs every stage."""
    params["tasks"]["denoising"]["images"] = ["astronaut"]
    params["tasks"]["deblocking"]["observe"]["qualities"] = [10]
    params["tasks"]["sr"]["observe"]["factors"] = [4]
    for task in params["tasks"].values():
        task["images"] = task["images"][:1]
        task["fit"]["iterations"] = ITERATIONS
    params["fit"].update(width=8, iterations=ITERATIONS, log_every=8)
    params["sweeps"].update(lam=[0.5, 2.0], gauss_sigma=[0.5], iterations=ITERATIONS, batch=2)
    for rule in ("es_wmv", "es_emv"):
        params["stopping"][rule]["patience"] = 5
    params["stopping"]["ratio"]["window"] = 4
    return params


def shrunk_params() -> dict:
    """The default profile (profiles/cpu.yaml), shrunk."""
    return shrink(load_yaml(ROOT / "profiles" / "cpu.yaml"))


def params_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def tool_env() -> dict[str, str]:
    """This environment with its tools first on the PATH and the default MLflow store (the
    repository's ``mlflow.db``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(cmd: list[str], repo: Path) -> str:
    """Run ``cmd`` in ``repo`` (:func:`tool_env`); it must succeed. Returns its output."""
    env = tool_env()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(repo: Path, params: dict) -> Path:
    """``repo``: a copy of the project's code, dvc.yaml and data manifests with ``params`` as
    params.yaml, committed to a new git repository with DVC initialised."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/mlflow.db\n/mlflow.db.lock\n/mlartifacts/\n")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo
