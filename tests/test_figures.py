"""The figures' drawn data, read from the matplotlib Figure before it is saved: which curves are
plotted, and where the stop and peak lines stand (at iterations, not rows)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.evaluation import evaluation_frame
from pipeline.figures import (
    automatic_stop,
    qualitative,
    restoration_grid,
    restorations,
    save_figure,
    spectral_measurement,
    stop_figure,
    sweep,
    sweep_figures,
)
from pipeline.layout import sweep_dir
from pipeline.results import CURVES_FILE, write_curves
from tests.run_folders import BANDS, denoising_problem, hand_curves, write_run

EVERY = 4
PSNR = [20.0, 23, 25, 24.5, 24, 23.5, 23, 22.5]
RATIO = [100.0, 40, 20, 10, 8, 7, 6.5, 6.4]


def xy(line) -> tuple[list[float], list[float]]:
    return list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))


def test_automatic_stop_marks_the_stop_iteration():
    curves = hand_curves(PSNR, EVERY, RATIO)
    figure = automatic_stop(curves, 5, "title")
    top, bottom = figure.axes
    iterations = [i * EVERY for i in range(len(PSNR))]
    assert xy(top.lines[0]) == (iterations, PSNR)
    assert xy(bottom.lines[0]) == (iterations, RATIO)
    for axis in (top, bottom):
        assert axis.lines[1].get_xdata() == [20, 20]  # row 5 × 4 iterations
    assert bottom.get_yscale() == "log" and top.get_title() == "title"
    assert len(automatic_stop(curves, None, "never stopped").axes[0].lines) == 1


def test_spectral_measurement_plots_every_band_and_the_peak():
    bands = {band: list(np.linspace(0.1 * band, 1, len(PSNR))) for band in range(1, BANDS + 1)}
    curves = hand_curves(PSNR, EVERY, fbc=bands)
    figure = spectral_measurement(curves, 2, "title")
    top, bottom = figure.axes
    iterations = [i * EVERY for i in range(len(PSNR))]
    assert xy(top.lines[0]) == (iterations, PSNR)
    for band in range(1, BANDS + 1):
        line = bottom.lines[band - 1]
        assert line.get_label() == f"band {band}"
        assert xy(line)[0] == iterations
        assert xy(line)[1] == pytest.approx(bands[band])
    for axis in (top, bottom):
        assert axis.lines[-1].get_xdata() == [8, 8]  # the peak at row 2


def test_sweep_plots_one_psnr_curve_per_value():
    series = {
        "0.5": hand_curves(PSNR, EVERY),
        "2.0": hand_curves([p - 1 for p in PSNR], EVERY),
    }
    (axis,) = sweep(series, "λ", "title").axes
    assert [line.get_label() for line in axis.lines] == ["λ = 0.5", "λ = 2.0"]
    assert xy(axis.lines[1])[1] == [p - 1 for p in PSNR]


@pytest.fixture
def runs(tmp_path, astronaut_64, monkeypatch):
    """Run folders under ``tmp_path/runs`` (the current folder is ``tmp_path``): denoising on
    two images with a stop at row 5, and one inpainting fit."""
    monkeypatch.chdir(tmp_path)
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    curves = hand_curves(PSNR, EVERY, RATIO)
    for image in ("astronaut", "coffee"):
        for method in ("dip", "gaussian"):
            key = ("denoising", "sigma25", image, method)
            write_run(tmp_path / "runs", key, problem, curves, 5 * EVERY)
    key = ("inpainting", "default", "chelsea", "gaussian")
    write_run(tmp_path / "runs", key, problem, curves, None)
    return tmp_path / "runs"


def test_stop_figure_shows_the_first_fit_at_its_recorded_stop(runs):
    figure = stop_figure(evaluation_frame(runs), "denoising", "gaussian")
    top, _ = figure.axes
    assert top.get_title() == "denoising astronaut (gaussian): ratio rule stop"
    assert top.lines[1].get_xdata() == [20, 20]
    assert len(stop_figure(evaluation_frame(runs), "inpainting", "gaussian").axes[0].lines) == 1


def test_restorations_show_each_task_first_fit_of_the_method(runs):
    figure = restorations(evaluation_frame(runs), "gaussian")
    axes = figure.axes
    assert [axis.get_title() for axis in axes] == [
        f"{label}: {name}"
        for label in ("denoising sigma25", "inpainting default")
        for name in ("observation", "ours (stop)", "clean")
    ]
    folder = runs / "denoising" / "sigma25" / "astronaut" / "gaussian"
    for axis, name in zip(axes[:3], ("observation", "restored_stop", "clean"), strict=True):
        with Image.open(folder / f"{name}.png") as image:
            assert np.array_equal(axis.images[0].get_array(), np.asarray(image))


def test_qualitative_figure_shows_every_image_of_its_set(runs, astronaut_64, tmp_path):
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    curves = hand_curves(PSNR, EVERY, RATIO)
    for image in ("vase", "library"):
        key = ("inpainting", "default", image, "gaussian")
        write_run(runs, key, problem, curves, None, image_set="inpainting")
    figure = qualitative(evaluation_frame(runs), "inpainting", "inpainting", "gaussian")
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == [
        f"{image}: {name}"
        for image in ("library", "vase")  # sorted; chelsea (set "bundled") is not shown
        for name in ("observation", "ours (stop)", "clean")
    ]
    with pytest.raises(UserError, match="'region'"):
        qualitative(evaluation_frame(runs), "inpainting", "region", "gaussian")


def test_restoration_grid_of_given_files(runs, tmp_path):
    folder = runs / "inpainting" / "default" / "chelsea" / "gaussian"
    files = (folder / "observation.png", folder / "restored_final.png", folder / "clean.png")
    figure = restoration_grid([("row", *files)])
    for axis, path in zip(figure.axes, files, strict=True):
        with Image.open(path) as image:
            assert np.array_equal(axis.images[0].get_array(), np.asarray(image))
    save_figure(figure, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.format == "PNG"


def test_sweep_figures_read_the_sweep_runs(runs):
    for value, shift in ((0.5, 0.0), (2.0, -1.0)):
        sweep_dir("lam", value).mkdir(parents=True)
        write_curves(sweep_dir("lam", value) / CURVES_FILE, hand_curves([p + shift for p in PSNR]))
    settings = {
        "task": "denoising",
        "image": "astronaut",
        "lam": [0.5, 1.0, 2.0],
        "gauss_sigma": [0],
    }
    figures = sweep_figures(settings)
    assert list(figures) == ["lambda_sweep"]  # no σ sweep run: not drawn
    (axis,) = figures["lambda_sweep"].axes
    assert axis.get_title() == "denoising astronaut: PSNR vs iteration, λ sweep"
    # λ = 1.0 has no run: left out.
    assert [line.get_label() for line in axis.lines] == ["λ = 0.5", "λ = 2.0"]
    assert xy(axis.lines[1])[1] == [p - 1 for p in PSNR]


def test_a_missing_fit_to_draw_is_a_user_error(runs):
    with pytest.raises(UserError, match="no fit of method 'lipschitz' on task 'denoising'"):
        stop_figure(evaluation_frame(runs), "denoising", "lipschitz")
