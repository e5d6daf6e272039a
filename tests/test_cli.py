"""The ``sdip`` command line: a real fit writes its outputs; user mistakes get one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.lambda_choice import GRID
from pipeline.results import summary_line
from stages.cli import cli

TINY = ["--iterations", "12", "--width", "8", "--device", "cpu"]


@pytest.fixture
def rgb_png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 256, (70, 97, 3), dtype=np.uint8)).save(path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fit_writes_images_curves_and_summary(rgb_png: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke("fit", "denoising", rgb_png, "-o", out, "--sigma", "25", *TINY)
    assert result.exit_code == 0, result.output
    for name in (
        "observation.png",
        "clean.png",
        "restored_stop.png",
        "restored_final.png",
        "restored_best.png",
        "curves.csv",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    for name in ("observation.png", "clean.png", "restored_final.png"):
        with Image.open(out / name) as written:
            assert written.size == (97, 70), name  # padded to 128×96, cut back to the image
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations_run"] == 12 and summary["settings"]["lam"] == 1.4
    assert summary["region"] == [13, 15, 70, 97]  # (128 − 97) // 2 = 15, (96 − 70) // 2 = 13
    assert len((out / "curves.csv").read_text().splitlines()) == 13
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))


def test_fit_with_crop_keeps_the_papers_centre_crop(rgb_png: Path, tmp_path: Path):
    out = tmp_path / "cropped"
    result = invoke("fit", "denoising", rgb_png, "-o", out, "--crop", *TINY)
    assert result.exit_code == 0, result.output
    with Image.open(out / "restored_final.png") as restored:
        assert restored.size == (96, 64)  # centre-cropped to multiples of 32
    assert json.loads((out / "summary.json").read_text())["region"] is None


def test_fit_on_an_observed_photo_has_no_clean_outputs(rgb_png: Path, tmp_path: Path):
    out = tmp_path / "obs"
    result = invoke("fit", "denoising", rgb_png, "-o", out, "--observed", *TINY)
    assert result.exit_code == 0, result.output
    assert not (out / "clean.png").exists() and not (out / "restored_best.png").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fit", "denoising", "missing.png", "-o", "x"], "missing.png"),
        (["fit", "denoising", "{bad}", "-o", "x"], "not a readable image"),
        (["fit", "denoising", "{small}", "-o", "x"], "32"),
        (["fit", "denoising", "{rgb}", "-o", "x", "--sigma", "-3"], "sigma"),
        (["fit", "inpainting", "{rgb}", "-o", "x", "--mask", "{mask}"], "mask"),
        (["fit", "teleport", "{rgb}", "-o", "x"], "teleport"),
        (["fit", "denoising", "{rgb}", "-o", "x", "--quality", "10"], "deblocking"),
    ],
)
def test_user_mistakes_get_one_error_line(args, needle, rgb_png: Path, tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(small)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((50, 50), 255, np.uint8)).save(mask)
    names = {"{bad}": bad, "{small}": small, "{rgb}": rgb_png, "{mask}": mask}
    argv = [str(names.get(a, a)) for a in args]
    argv[argv.index("-o") + 1] = str(tmp_path / "never")
    done = subprocess.run(
        [sys.executable, "-m", "stages", *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert any(needle in line for line in lines), done.stderr
    assert len([line for line in lines if line.startswith(("error", "Error"))]) == 1
    assert not (tmp_path / "never").exists()


def test_fit_tune_restores_a_photo_with_the_lambda_mc_sure_chooses(rgb_png: Path, tmp_path: Path):
    out = tmp_path / "tuned"
    result = invoke("fit", "denoising", rgb_png, "-o", out, "--observed", "--tune", *TINY)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    choice = summary["lambda_choice"]
    candidates = choice["candidates"]
    assert [row["lam"] for row in candidates] == list(GRID)
    best = min(candidates, key=lambda row: row["sure"])
    assert choice["lam"] == best["lam"] == summary["settings"]["lam"]
    assert choice["sigma_given"] is False and 5 < choice["sigma"] < 100  # estimated, 0–255 scale
    assert choice["stop_rule"] == summary["stop_rule"] == "sure"
    assert f"chose λ = {best['lam']:g}" in result.output
    with Image.open(out / "restored_stop.png") as restored:
        assert restored.size == (97, 70)  # the whole photo, padded for the fit and cut back


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["deblocking", "--observed"], "denoising only"),
        (["inpainting"], "denoising only"),  # a simulation: refused before any image is read
        (["denoising", "--observed", "--lam", "1"], "leave out --lam"),
        (["denoising", "--observed", "--measure-every", "5"], "--measure-every"),
        (["denoising", "--observed", "--tune-stop", "es_wmv"], "'es_wmv' is not one of"),
    ],
)
def test_fit_tune_refuses_other_tasks_and_a_given_lambda(rgb_png, tmp_path, args, needle):
    task, *extra = args
    result = invoke("fit", task, rgb_png, "-o", tmp_path / "x", "--tune", *extra, *TINY)
    assert result.exit_code == 2 and needle in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_the_line_printed_after_a_fit_reads_its_summary():
    summary = {
        "iterations_run": 1500,
        "wall_time_s": 61.234,
        "stop_iteration": 928,
        "psnr_stop": 25.56,
        "psnr_final": 26.4,
        "psnr_best": 26.431,
        "best_iteration": 1400,
    }
    assert summary_line(summary) == (
        "1500 iterations in 61.2 s, ratio rule stop at 928; "
        "PSNR stop 25.56 dB, final 26.40 dB, peak 26.43 dB at 1400"
    )
    photo = {**summary, "stop_iteration": None, "psnr_final": None}
    assert summary_line(photo) == "1500 iterations in 61.2 s, ratio rule did not fire"


def test_fit_tune_stop_ratio_scores_the_candidates_at_the_ratio_rule(rgb_png, tmp_path):
    out = tmp_path / "ratio"
    argv = ["fit", "denoising", rgb_png, "-o", out, "--observed", "--tune", *TINY]
    result = invoke(*argv, "--tune-stop", "ratio")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lambda_choice"]["stop_rule"] == summary["stop_rule"] == "ratio"
    alone = invoke("fit", "denoising", rgb_png, "-o", tmp_path / "y", "--tune-stop", "ratio")
    assert alone.exit_code == 2 and "give --tune too" in alone.output
