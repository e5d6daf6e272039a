"""End to end: the real dvc.yaml in a temporary git+DVC repository, on the real profile shrunk.

One pass exercises everything a user relies on: outputs exist and are well formed, a second
``dvc repro`` runs nothing, changing one task's parameter reruns only that task's fits (and the
summaries), and the MLflow store holds one run per fit with curves of the expected length.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.skipif(
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


def run(cmd: list[str], repo: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(repo: Path, params: dict) -> Path:
    """A git+DVC repository in the empty folder ``repo``: the pipeline's code and dvc.yaml, and
    ``params`` as its params.yaml, committed."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    params = shrink(load_yaml(ROOT / "profiles" / "cpu.yaml"))
    return make_repo(tmp_path_factory.mktemp("repo"), params)


def test_repro_then_nothing_then_only_the_changed_task(repo: Path):
    first = run(["dvc", "repro"], repo)
    stages = ran_stages(first)
    assert {"prepare@denoising", "evaluate", "fbc", "aggregate"} <= stages
    fits = {s for s in stages if s.startswith("optimize_")}
    assert len(fits) == 5 * 3

    evaluation = (repo / "results" / "evaluation.csv").read_text().splitlines()
    assert len(evaluation) == 1 + 15
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert set(metrics) == {
        "denoising/sigma25",
        "deblocking/quality10",
        "inpainting/default",
        "sr/factor4",
        "enhancement/default",
    }
    for task in ("denoising", "deblocking", "inpainting", "sr", "enhancement"):
        table = (repo / "results" / "tables" / f"{task}.md").read_text()
        assert "| mean |" in table
    for figure in ("lambda_sweep", "sigma_sweep", "automatic_stop", "restorations"):
        assert (repo / "results" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert json.loads((repo / "results" / "phenomena.json").read_text())["checks"]
    curves = (repo / "runs/denoising/sigma25/astronaut/dip/curves.csv").read_text().splitlines()
    assert len(curves) == 1 + ITERATIONS
    for value in ("0.5", "2.0"):  # the λ sweep's two values, fitted in one batched pass
        swept = (repo / "runs/sweeps/lam" / value / "curves.csv").read_text().splitlines()
        assert len(swept) == 1 + ITERATIONS
    assert "psnr_ratio" in run(["dvc", "metrics", "show"], repo)

    assert ran_stages(run(["dvc", "repro"], repo)) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tasks"]["deblocking"]["fit"]["lam"] = 0.8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = ran_stages(run(["dvc", "repro"], repo))
    fits_again = {s for s in again if s.startswith(("optimize_", "sweep_", "prepare"))}
    assert fits_again == {
        f"optimize_deblocking@10-camera-{m}" for m in ("dip", "lipschitz", "gaussian")
    }
    assert {"evaluate", "fbc", "aggregate"} <= again


def test_mlflow_holds_one_run_per_fit_with_full_curves(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("denoising")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # 3 methods on one image (a parent each), the λ sweep (one parent, two fits) and the σ sweep.
    assert (len(children), len(parents)) == (6, 5)
    child = next(r for r in children if r.data.params["method"] == "dip")
    for key in ("task", "image", "lam", "upsample", "width", "lr", "iterations", "seed"):
        assert key in child.data.params
    assert child.data.tags["profile"] == "cpu" and child.data.tags["git_commit"] != ""
    for name in ("loss", "psnr", "psnr_obs", "fbc_1", "fbc_5", "blur", "sharpness", "ratio"):
        history = client.get_metric_history(child.info.run_id, name)
        assert len(history) == ITERATIONS, name
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "restored_stop.png" in artifacts
