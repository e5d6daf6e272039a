"""The fit loop on tiny problems: it restores, is deterministic, and records what it claims."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.degradations import Denoising, Inpainting, SuperResolution
from pipeline.errors import UserError
from pipeline.fit import FitConfig, FitState, fit
from pipeline.measures import psnr
from pipeline.model import DecoderConfig
from pipeline.settings import fit_settings


def tiny(**overrides) -> FitConfig:
    values = {
        "iterations": 60,
        "width": 16,
        "lr": 0.01,
        "device": "cpu",
        "log_every": 20,
        "ratio_window": 5,
        "wmv_window": 10,
        **overrides,
    }
    return FitConfig.from_dict(values)


def test_short_denoising_fit_beats_the_noisy_input(astronaut_64):
    task = Denoising(sigma=50, seed=1)
    y = task.observe(astronaut_64)
    result = fit(y, task, tiny(iterations=150), clean=astronaut_64)
    noisy = float(psnr(y, astronaut_64)[0])
    assert result.best is not None and result.best_iteration is not None
    assert float(psnr(result.best, astronaut_64)[0]) > noisy + 3
    assert result.curves["psnr"][result.best_iteration] == pytest.approx(
        np.nanmax(result.curves["psnr"])
    )


def test_same_seed_same_output_other_seed_differs(astronaut_64):
    task = Denoising(sigma=25, seed=0)
    y = task.observe(astronaut_64)
    a = fit(y, task, tiny(iterations=20, seed=3))
    b = fit(y, task, tiny(iterations=20, seed=3))
    c = fit(y, task, tiny(iterations=20, seed=4))
    assert torch.equal(a.final, b.final)
    assert np.array_equal(a.curves["loss"], b.curves["loss"])
    assert not torch.equal(a.final, c.final)


def test_curves_have_one_row_per_measured_iteration(astronaut_64):
    task = Denoising(sigma=25)
    y = task.observe(astronaut_64)
    result = fit(y, task, tiny(iterations=45, measure_every=4), clean=astronaut_64)
    assert list(result.curves["iteration"]) == list(range(0, 45, 4))
    for name in (
        "loss",
        "psnr",
        "psnr_obs",
        "blur",
        "sharpness",
        "ratio",
        *(f"fbc_{b}" for b in range(1, 6)),
    ):
        assert result.curves[name].shape == (12,)
        assert np.isfinite(result.curves[name]).all(), name
    assert np.isnan(result.curves["wmv"][:9]).all() and np.isfinite(result.curves["wmv"][9:]).all()
    assert np.isnan(result.curves["emv"][0]) and np.isfinite(result.curves["emv"][1:]).all()
    assert ((result.curves["fbc_1"] >= 0) & (result.curves["fbc_1"] <= 1)).all()


def test_stop_output_is_the_output_at_the_stop_iteration(astronaut_64):
    task = Denoising(sigma=25)
    y = task.observe(astronaut_64)
    config = tiny(iterations=80, ratio_window=3, ratio_eps=1e9)  # fires as soon as allowed
    result = fit(y, task, config, clean=astronaut_64)
    assert result.stop_iteration == 7  # first i > 2n
    replay = FitState([y], [task], [config], [astronaut_64])
    for _ in range(result.stop_iteration):
        replay.step()
    with torch.no_grad():
        expected = replay.network.model(replay.network.z).clamp(0, 1)
    assert torch.allclose(result.at_stop, expected, atol=1e-6)


def test_halt_at_stop_ends_the_fit_early(astronaut_64):
    task = Denoising(sigma=25)
    y = task.observe(astronaut_64)
    result = fit(y, task, tiny(iterations=200, ratio_eps=1e9, halt_at_stop=True, log_every=10))
    assert result.stop_iteration is not None
    assert result.iterations_run < 200


def test_lipschitz_bound_holds_during_a_fit(astronaut_64):
    from pipeline.lipschitz import LipschitzConv2d

    task = Denoising(sigma=25)
    y = task.observe(astronaut_64)
    state = FitState([y], [task], [tiny(lam=0.7)])
    for _ in range(10):
        state.step()
        for layer in state.network.model.modules():
            if isinstance(layer, LipschitzConv2d):
                w = layer.effective_weight().detach().flatten(1).double()
                assert torch.linalg.matrix_norm(w, 2) <= 0.7 + 1e-5


def test_inpainting_and_sr_fit_shapes():
    x = torch.rand(1, 1, 64, 96)
    inpaint = Inpainting(p=0.5, seed=2)
    result = fit(inpaint.observe(x), inpaint, tiny(iterations=5), clean=x)
    assert result.final.shape == x.shape
    sr = SuperResolution(factor=4)
    y = sr.observe(x)
    result = fit(y, sr, tiny(iterations=5, psnr_protocol="y"), clean=x)
    assert result.final.shape == x.shape and np.isfinite(result.curves["psnr"]).all()


def test_backtracking_restores_parameters_after_a_collapse(astronaut_64):
    task = Denoising(sigma=25)
    y = task.observe(astronaut_64)
    state = FitState([y], [task], [tiny(backtrack=True)])
    model = state.network.model
    for _ in range(3):
        state.step()
    saved = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        model.tail.bias.fill_(-30.0)  # output collapses to 0: PSNR vs y falls far
    state.step()
    for before, after in zip(saved, model.parameters(), strict=True):
        assert torch.allclose(before, after, atol=0.05)


@pytest.mark.parametrize(
    "bad",
    [
        {"iterations": 0},
        {"iterations": 2.5},
        {"lr": -1.0},
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"input_noise": float("inf")},
        {"ratio_eps": float("nan")},
        {"psnr_protocol": "lab"},
        {"nonsense": 1},
    ],
)
def test_bad_fit_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        FitConfig.from_dict(bad)


def test_profile_settings_compose_into_a_fit_config(cpu_profile):
    for method in cpu_profile["methods"]:
        config = FitConfig.from_dict(fit_settings(cpu_profile, "denoising", method))
        assert isinstance(config.model, DecoderConfig)
    dip = FitConfig.from_dict(fit_settings(cpu_profile, "denoising", "dip"))
    assert dip.model.lam == 0
