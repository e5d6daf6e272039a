"""pipeline.unseen: the profile's phenomena check on a held-out group of images."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from pipeline.datasets import bundled_folder
from pipeline.lambda_choice import choose_lambda
from pipeline.problem import simulate
from pipeline.settings import fit_settings
from pipeline.unseen import check_unseen, verdicts

PHENOMENA = {"max_controlled_drop": 0.3, "max_stop_gap": 1.0}


def row(drop: float, gap: float, stop: int | None) -> dict:
    return {"drop": drop, "stop_gap": gap, "stop_iteration": stop}


def test_verdicts_hand_computed():
    rows = [row(0.1, 0.5, 900), row(0.2, 0.9, 1000), row(0.6, 0.2, None), row(0.0, 1.5, 700)]
    got = verdicts(rows, PHENOMENA)
    assert got["summary"] == {
        "images": 4,
        "mean_drop": pytest.approx(0.225),
        "worst_drop": 0.6,
        "stopped": 0.75,
        "stopped_within_gap": 0.5,  # the budget's output and the 1.5 dB gap do not count
    }
    assert got["verdicts"] == {"controlled_drop": True, "stop_within_gap": False}
    ten = [row(0.0, 0.1, 500)] * 9 + [row(3.3, 0.1, 500)]
    assert verdicts(ten, PHENOMENA)["verdicts"] == {
        "controlled_drop": False,  # mean 0.33
        "stop_within_gap": True,  # 10 of 10
    }


def test_check_runs_the_profiles_protocol_on_a_held_out_image(cpu_profile):
    """The real profile shrunk (width 8, 24 iterations, a rule that fires at 5): every number
    of the row read back from the chosen candidate's PSNR curve."""
    params = copy.deepcopy(cpu_profile)
    params["fit"].update(width=8, iterations=24, device="cpu")
    params["tasks"]["denoising"]["fit"]["lam_gaussian"] = 1.4
    params["stopping"]["ratio"] = {"window": 2, "eps": 1e9}
    rows = []
    result = check_unseen(
        params, ["moon"], candidates=(0.5, 1.4), on_image=rows.append, stop="ratio"
    )
    (got,) = result["images"]
    assert rows == [got] and got["image"] == "moon" and got["lam"] in (0.5, 1.4)
    assert [c["lam"] for c in got["candidates"]] == [0.5, 1.4]
    sure = [c["sure"] for c in got["candidates"]]
    assert got["lam"] == (0.5, 1.4)[int(np.argmin(sure))]
    assert got["stop_iteration"] == 5
    # The same fits by hand: moon resized to 128, cropped to 64, σ = 25 with seed 0 (CPU: a
    # fit is deterministic).
    problem = simulate(
        "denoising",
        bundled_folder() / "moon.png",
        {"sigma": 25, "seed": 0},
        short_side=128,
        crop=64,
    )
    settings = fit_settings(params, "denoising", "gaussian")
    choice = choose_lambda(
        problem, settings, (0.5, 1.4), 25 / 255, halt_at_stop=False, stop="ratio"
    )
    assert [c["sure"] for c in got["candidates"]] == list(choice.sure)
    psnr = choice.results[choice.chosen].curves["psnr"].astype(np.float64)
    assert len(psnr) == 24
    assert got["psnr_peak"] == pytest.approx(psnr.max(), abs=1e-5)
    assert got["psnr_stop"] == pytest.approx(psnr[5], abs=1e-5)
    assert got["psnr_final"] == pytest.approx(psnr[-1], abs=1e-5)
    assert got["drop"] == pytest.approx(psnr.max() - psnr[-1], abs=1e-5)
    assert got["stop_gap"] == pytest.approx(psnr.max() - psnr[5], abs=1e-5)
    assert result["summary"]["images"] == 1
    assert result["verdicts"]["stop_within_gap"] == (got["stop_gap"] <= 1.0)


def test_check_scores_the_budgets_output_where_the_sure_rule_does_not_fire(cpu_profile):
    """24 iterations are too few for the SURE window rule (it needs 2w − 1 = 99): the row's stop
    is the budget's, so its gap is the drop."""
    params = copy.deepcopy(cpu_profile)
    params["fit"].update(width=8, iterations=24, device="cpu")
    (got,) = check_unseen(params, ["moon"], candidates=(0.5, 1.4))["images"]
    assert got["stop_rule"] == "sure" and got["stop_iteration"] is None
    assert got["psnr_stop"] == got["psnr_final"] and got["stop_gap"] == got["drop"]
