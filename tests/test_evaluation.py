"""Evaluation of run folders: every column of evaluation.csv and fbc.csv against an independent
computation (plain loops, literals, scikit-image's SSIM), and the fit's online ratio stop against
the offline rule on its logged curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from pipeline.evaluation import (
    RunKey,
    evaluate_run,
    evaluation_frame,
    fbc_frame,
    fbc_summary,
    find_runs,
    read_run,
    rule_stops,
    stopping_of,
)
from pipeline.fit import FitConfig, fit
from pipeline.imageio import load_image
from pipeline.results import write_result
from pipeline.stopping import ratio_rule
from pipeline.tables import read_csv, write_csv
from tests.run_folders import denoising_problem, hand_curves, profile_settings, write_run
from tests.test_stopping import ratio_rule_loop


def patience_loop(values: list[float], patience: int) -> int | None:
    """ES-WMV / ES-EMV as the spec words it: the index of the running minimum once it has not
    improved for ``patience`` measurements."""
    best, best_at = math.inf, None
    for i, value in enumerate(values):
        if math.isnan(value):
            continue
        if value < best:
            best, best_at = value, i
        elif best_at is not None and i - best_at >= patience:
            return best_at
    return None


def ssim_of_files(path: Path, clean: Path) -> float:
    """scikit-image's SSIM of two saved 8-bit images (Gaussian window σ = 1.5, population
    covariance), averaged over channels."""
    x, ref = (np.asarray(load_image(p)[0].permute(1, 2, 0), np.float64) for p in (path, clean))
    return structural_similarity(
        x,
        ref,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )


def rgb_to_y_numpy(x: np.ndarray) -> np.ndarray:
    """The SR protocol's luma (docs/experiments.md): 16/255 + (65.481 R + 128.553 G + 24.966 B)/255
    (no rounding)."""
    return (16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def psnr_numpy(x: np.ndarray, ref: np.ndarray) -> float:
    return 10 * math.log10(1.0 / np.mean((x - ref) ** 2))


def as_numpy(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).double().numpy()


# A fit of 20 measurements, one every 2 iterations (budget 40): PSNR peaks at row 6; the ratio
# rule fired at row 15 (window 3, ε 0.1: the ratio is flat from row 9); the WMV falls to its
# minimum at row 8 and rises after, the EMV has its minimum at row 4 and then one lower value at
# row 17, too late for a patience of 5.
PSNR = [
    20.0,
    22,
    24,
    25,
    26,
    27,
    28.5,
    28,
    27.5,
    27,
    26.5,
    26,
    25.5,
    25,
    24.8,
    24.6,
    24.4,
    24.2,
    24,
    23.9,
]
RATIO = [9.0, 8, 7, 6, 5, 4, 3, 2, 1.5] + [1.0] * 11
WMV = [math.nan] * 3 + [
    0.9,
    0.7,
    0.5,
    0.3,
    0.2,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.1,
]
EMV = [
    0.6,
    0.5,
    0.4,
    0.3,
    0.05,
    0.1,
    0.2,
    0.3,
    0.2,
    0.3,
    0.4,
    0.5,
    0.4,
    0.3,
    0.2,
    0.1,
    0.07,
    0.01,
    0.02,
    0.03,
]
EVERY, WINDOW, EPS, PATIENCE = 2, 3, 0.1, 5
STOPPING = {
    "ratio_window": WINDOW,
    "ratio_eps": EPS,
    "wmv_patience": PATIENCE,
    "emv_patience": PATIENCE,
}


@pytest.fixture
def hand_run(tmp_path, astronaut_64) -> Path:
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    stop = ratio_rule_loop(RATIO, WINDOW, EPS)
    curves = hand_curves(PSNR, EVERY, RATIO, WMV, EMV)
    key = ("denoising", "sigma25", "astronaut", "dip")
    return write_run(tmp_path / "runs", key, problem, curves, stop * EVERY, **STOPPING)


def test_every_column_of_a_hand_made_run(hand_run: Path):
    stops = {
        "ratio": ratio_rule_loop(RATIO, WINDOW, EPS),
        "es_wmv": patience_loop(WMV, PATIENCE),
        "es_emv": patience_loop(EMV, PATIENCE),
        "oracle": PSNR.index(max(PSNR)),
    }
    assert stops == {"ratio": 15, "es_wmv": 8, "es_emv": 4, "oracle": 6}
    row = evaluate_run(RunKey("denoising", "sigma25", "astronaut", "dip"), hand_run)
    budget = len(PSNR) * EVERY
    assert row["budget"] == budget == 40
    assert (row["set"], row["protocol"], row["wall_time_s"]) == ("bundled", "rgb", 1.5)
    for rule, index in stops.items():
        # Iteration columns are iterations (row × measure_every), not rows.
        assert row[f"{rule}_iteration"] == index * EVERY
        assert row[f"psnr_{rule}"] == PSNR[index]
        if rule != "oracle":
            assert row[f"{rule}_saved"] == budget - index * EVERY
    assert row["psnr_final"] == PSNR[-1]
    assert row["drop_from_peak"] == pytest.approx(28.5 - 23.9)
    assert row["stop_gap"] == pytest.approx(28.5 - 24.6)
    clean = hand_run / "clean.png"
    for column, name in (
        ("ssim_stop", "restored_stop.png"),
        ("ssim_final", "restored_final.png"),
        ("ssim_oracle", "restored_best.png"),
    ):
        assert row[column] == pytest.approx(ssim_of_files(hand_run / name, clean), abs=1e-5)
    assert row["ssim_oracle"] > row["ssim_stop"] > row["ssim_final"]


def test_rules_that_never_fire_count_as_the_budget(tmp_path, astronaut_64):
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    falling = list(np.linspace(9, 1, 20))  # falls by 1.26 per 3 rows: never within ε = 0.1
    assert ratio_rule_loop(falling, WINDOW, EPS) is None
    rising = list(np.linspace(0.1, 1, 20))  # its minimum is its first value, ...
    curves = hand_curves(PSNR, EVERY, falling, WMV, rising)
    key = ("denoising", "sigma25", "astronaut", "dip")
    # ... and with a patience of 30 no rule on 20 rows stops.
    folder = write_run(
        tmp_path / "runs", key, problem, curves, None, **{**STOPPING, "emv_patience": 30}
    )
    row = evaluate_run(RunKey(*key), folder)
    assert (row["ratio_iteration"], row["ratio_saved"], row["psnr_ratio"]) == (None, 0, PSNR[-1])
    assert (row["es_emv_iteration"], row["es_emv_saved"], row["psnr_es_emv"]) == (None, 0, PSNR[-1])
    assert row["stop_gap"] == pytest.approx(row["drop_from_peak"])
    # The saved output at a stop that never came is the final one.
    assert row["ssim_stop"] == pytest.approx(
        ssim_of_files(folder / "restored_stop.png", folder / "clean.png"), abs=1e-5
    )


def test_online_ratio_stop_is_the_offline_rule_on_the_logged_curves(tmp_path, astronaut_64):
    """A real fit (default profile, shrunk; one measurement every 2 iterations): the stop its
    online rule recorded, and that every ratio column reads, is where the offline rule on its
    curves.csv stops with the settings in its summary."""
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    settings = profile_settings(iterations=60, measure_every=2, ratio_window=3, ratio_eps=1e-9)
    first = fit(
        problem.observation, problem.task, FitConfig.from_dict(settings), clean=problem.clean
    )
    assert first.stop_iteration is None
    ratio = [float(v) for v in first.curves["ratio"]]
    n = settings["ratio_window"]
    gaps = {
        i: abs(np.mean(ratio[i - 2 * n : i - n]) - np.mean(ratio[i - n + 1 : i]))
        for i in range(2 * n + 1, len(ratio))
    }
    # ε between the last new low of |m1 − m2| and the low before it: the rule fires there.
    lows = [i for i in gaps if all(gaps[i] < gaps[j] for j in gaps if j < i)]
    last, before = lows[-1], min(gaps[j] for j in gaps if j < lows[-1])
    assert last > 2 * n + 1 and before > 1.5 * gaps[last]
    eps = math.sqrt(before * gaps[last])
    settings["ratio_eps"] = eps
    result = fit(
        problem.observation, problem.task, FitConfig.from_dict(settings), clean=problem.clean
    )
    assert result.stop_iteration == last * 2
    folder = tmp_path / "runs" / "denoising" / "sigma25" / "astronaut" / "dip"
    write_result(folder, problem, result)
    curves, summary = read_run(folder)
    rules = stopping_of(summary)
    assert (rules.ratio_window, rules.ratio_eps) == (n, eps)
    assert ratio_rule(curves["ratio"], rules.ratio_window, rules.ratio_eps) == last
    assert rule_stops(curves, summary)["ratio"] == last
    row = evaluate_run(RunKey("denoising", "sigma25", "astronaut", "dip"), folder)
    assert row["ratio_iteration"] == last * 2 == summary["stop_iteration"]
    assert row["ratio_saved"] == 60 - last * 2
    assert row["psnr_ratio"] == pytest.approx(summary["psnr_stop"], abs=1e-4)
    assert row["psnr_ratio"] == pytest.approx(
        psnr_numpy(as_numpy(result.at_stop), as_numpy(problem.clean)), abs=1e-4
    )


def test_sr_psnr_is_the_y_channel_with_a_4_pixel_shave(tmp_path, astronaut_64):
    """The PSNR that reaches the tables for SR is the DIP script's: Y channel, 4-pixel border."""
    problem = denoising_problem(tmp_path / "source", astronaut_64, task="sr")
    settings = profile_settings(iterations=12, psnr_protocol="y")
    result = fit(
        problem.observation, problem.task, FitConfig.from_dict(settings), clean=problem.clean
    )
    folder = tmp_path / "runs" / "sr" / "factor4" / "astronaut" / "dip"
    write_result(folder, problem, result)
    row = evaluate_run(RunKey("sr", "factor4", "astronaut", "dip"), folder)
    out, clean = as_numpy(result.final), as_numpy(problem.clean)
    inner = (slice(4, -4), slice(4, -4))
    expected = psnr_numpy(rgb_to_y_numpy(out)[inner], rgb_to_y_numpy(clean)[inner])
    assert row["protocol"] == "y"
    assert row["psnr_final"] == pytest.approx(expected, abs=1e-4)
    assert abs(psnr_numpy(out, clean) - expected) > 0.1  # the protocol is what is checked


def test_fbc_milestones_of_a_hand_made_run(tmp_path, astronaut_64):
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    band1 = [0.1, 0.3, 0.5, 0.7, 0.92, 0.95, 0.96, 0.97, 0.98, 0.99]
    band5 = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8, 0.85]  # never reaches 0.9
    psnr = [20.0, 22, 25, 24, 23, 22, 21, 20, 19, 18]  # peak at row 2
    curves = hand_curves(psnr, 3, fbc={1: band1, 5: band5})
    key = ("denoising", "sigma25", "astronaut", "dip")
    folder = write_run(tmp_path / "runs", key, problem, curves, 7 * 3)
    row = fbc_summary(RunKey(*key), folder, (0.5, 0.9))
    assert row["band1_reaches_0.5"] == 2 * 3 and row["band1_reaches_0.9"] == 4 * 3
    assert row["band5_reaches_0.5"] == 6 * 3 and row["band5_reaches_0.9"] is None
    assert (row["band1_at_peak"], row["band1_at_stop"], row["band1_at_final"]) == (0.5, 0.97, 0.99)
    assert (row["band5_at_peak"], row["band5_at_stop"], row["band5_at_final"]) == (0.1, 0.7, 0.85)
    assert {k: row[k] for k in ("task", "variant", "image", "method")} == dict(
        zip(("task", "variant", "image", "method"), key, strict=True)
    )


def test_frames_round_trip_through_csv(hand_run: Path, tmp_path):
    runs = tmp_path / "runs"
    sweep = runs / "sweeps" / "lam" / "0.5" / "x"  # sweeps are not fits of the tables
    sweep.mkdir(parents=True)
    (sweep / "summary.json").write_text("{}")
    assert [key.label for key, _ in find_runs(runs)] == ["denoising/sigma25/astronaut/dip"]
    for frame in (evaluation_frame(runs), fbc_frame(runs, (0.5, 0.9))):
        write_csv(tmp_path / "frame.csv", frame)
        back = read_csv(tmp_path / "frame.csv")
        assert list(back.columns) == list(frame.columns)
        for column in frame.columns:
            if frame[column].dtype == "Int64":
                assert back[column].dtype == "Int64"
                assert back[column].tolist() == frame[column].tolist()
            elif frame[column].dtype.kind == "f":
                assert np.allclose(back[column], frame[column], atol=5e-5, equal_nan=True)
            else:
                assert back[column].tolist() == frame[column].tolist()
    text = (tmp_path / "frame.csv").read_text().splitlines()
    assert text[1].startswith("denoising,sigma25,astronaut,dip,")
