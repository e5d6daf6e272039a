"""``sdip evaluate``, ``sdip fbc`` and ``sdip aggregate`` on hand-made run folders: each writes what
the library computes from the same runs, to the files dvc.yaml names."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline.evaluation import evaluation_frame, fbc_frame
from pipeline.phenomena import phenomena, phenomena_markdown
from pipeline.settings import load_yaml
from pipeline.tables import headline_metrics, markdown, read_csv, task_table
from stages.cli import cli
from tests.run_folders import ROOT, denoising_problem, hand_curves, write_run

PSNR = [20.0, 23, 25, 24.5, 24, 23.5, 23, 22.5]


@pytest.fixture
def project(tmp_path, astronaut_64, monkeypatch):
    """A project folder: the default profile as params.yaml, the published numbers, and runs of
    denoising (three methods) and inpainting (the grid's method)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "profiles" / "cpu.yaml", tmp_path / "params.yaml")
    (tmp_path / "dataset").mkdir()
    shutil.copy(ROOT / "dataset" / "published.yaml", tmp_path / "dataset" / "published.yaml")
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    for index, method in enumerate(("dip", "lipschitz", "gaussian")):
        curves = hand_curves([p - index for p in PSNR], 2)
        write_run(
            tmp_path / "runs", ("denoising", "sigma25", "astronaut", method), problem, curves, 10
        )
    key = ("inpainting", "default", "chelsea", "lipschitz")
    write_run(tmp_path / "runs", key, problem, hand_curves(PSNR), None)
    return tmp_path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_the_three_stages_write_what_the_library_computes(project):
    params = load_yaml(project / "params.yaml")
    invoke("evaluate")
    fits = read_csv(project / "results" / "evaluation.csv")
    expected = evaluation_frame(project / "runs")
    assert fits[["task", "variant", "image", "method"]].values.tolist() == (
        expected[["task", "variant", "image", "method"]].values.tolist()
    )
    assert fits["psnr_ratio"].tolist() == expected["psnr_ratio"].round(4).tolist()
    metrics = {
        path.stem: json.loads(path.read_text())
        for path in (project / "results" / "metrics").glob("*.json")
    }
    assert metrics == headline_metrics(fits)
    assert set(metrics) == {"denoising-sigma25", "inpainting-default"}

    invoke("fbc")
    fbc = read_csv(project / "results" / "fbc.csv")
    assert len(fbc) == len(fbc_frame(project / "runs", (0.5, 0.9))) == 4
    figures = project / "results" / "figures"
    # figure_methods: [dip] in the default profile.
    assert [p.name for p in (figures / "fbc").iterdir()] == ["denoising-sigma25-astronaut-dip.png"]

    output = invoke("aggregate", "--no-track")
    settings = params["aggregate"]["phenomena"]
    found = phenomena(fits, fbc, settings)
    assert json.loads((project / "results" / "phenomena.json").read_text()) == found
    assert (project / "results" / "phenomena.md").read_text() == phenomena_markdown(found)
    published = load_yaml(project / "dataset" / "published.yaml")
    for task in ("denoising", "inpainting"):
        table = task_table(
            fits[fits["task"] == task], list(params["methods"]), published[task], "dip"
        )
        assert (project / "results" / "tables" / f"{task}.md").read_text() == markdown(table)
        assert f"## {task}" in output
    for name in ("automatic_stop", "restorations"):
        assert (figures / f"{name}.png").stat().st_size > 1000


def test_no_runs_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: no finished fits under runs"
