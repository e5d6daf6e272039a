"""The fit loop's bookkeeping against independent computations: the moving variances, the
iteration of every measured row, the stop and peak outputs, SR's scoring protocol and DIP's input
perturbation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.degradations import Denoising, SuperResolution
from pipeline.fit import FitConfig, FitState, fit
from pipeline.monitor import VarianceTracker
from pipeline.networks import perturbed
from pipeline.stopping import StoppingConfig
from tests import numpy_reference


def tiny(**overrides: object) -> FitConfig:
    values = {"iterations": 30, "width": 8, "lr": 0.01, "device": "cpu", "log_every": 10}
    return FitConfig.from_dict({**values, **overrides})


def wmv_loop(outputs: np.ndarray, window: int) -> list[float]:
    """ES-WMV's windowed variance, literally: NaN until W outputs exist, then the mean over
    pixels of the population variance of the last W outputs."""
    return [
        float("nan")
        if t + 1 < window
        else float(outputs[t + 1 - window : t + 1].var(axis=0).mean())
        for t in range(len(outputs))
    ]


def emv_loop(outputs: np.ndarray, alpha: float) -> list[float]:
    """ES-EMV's exponential variance, literally, bias-corrected (NaN for the first output)."""
    mean, var, values = outputs[0], 0.0, [float("nan")]
    for t, x in enumerate(outputs[1:], start=1):
        var = (1 - alpha) * var + alpha * (1 - alpha) * float(((x - mean) ** 2).mean())
        mean = (1 - alpha) * mean + alpha * x
        values.append(var / (1 - (1 - alpha) ** t))
    return values


def test_moving_variances_equal_their_literal_definitions() -> None:
    rng = np.random.default_rng(0)
    outputs = rng.uniform(0, 1, size=(12, 2, 3, 5, 7)).astype(np.float32)  # (time, K, C, H, W)
    tracker = VarianceTracker(StoppingConfig(wmv_window=4, emv_alpha=0.3), (2, 3, 5, 7), "cpu")
    wmv, emv = [], []
    for t, x in enumerate(outputs):
        w, e = tracker.update(torch.from_numpy(x), t)
        wmv.append([float("nan")] * 2 if w is None else w.tolist())
        emv.append(e.tolist())
    for k in range(2):
        np.testing.assert_allclose(
            np.array(wmv)[:, k], wmv_loop(outputs[:, k].astype(np.float64), 4), rtol=1e-5
        )
        np.testing.assert_allclose(
            np.array(emv)[:, k], emv_loop(outputs[:, k].astype(np.float64), 0.3), rtol=1e-5
        )


def test_measured_rows_carry_the_iteration_their_output_had(astronaut_64) -> None:
    task = Denoising(sigma=25, seed=0)
    y = task.observe(astronaut_64)
    # λ = 0: the replay's extra forwards must not move a σ estimate's warm start.
    config = tiny(iterations=10, measure_every=3, ratio_window=2, ratio_eps=1e9, lam=0.0)
    result = fit(y, task, config, clean=astronaut_64)
    assert result.curves["iteration"].tolist() == [0, 3, 6, 9]
    # The rule may fire at the first row i > 2n = 4: never within 4 rows; wmv of window 100 never.
    assert result.stop_iteration is None and np.isnan(result.curves["wmv"]).all()
    replay = FitState([y], [task], [config], [astronaut_64])
    losses = []
    for iteration in range(10):
        with torch.no_grad():
            out = replay.network.model(replay.network.z)
        if iteration % 3 == 0:
            losses.append(float(((out - y) ** 2).mean()))
        replay.step()
    np.testing.assert_allclose(result.curves["loss"], losses, rtol=1e-5)
    stop = fit(y, task, tiny(iterations=30, measure_every=3, ratio_window=2, ratio_eps=1e9))
    assert stop.stop_iteration == 5 * 3  # row 5 = iteration 15


def test_sr_curves_and_peak_use_the_y_channel_with_a_four_pixel_border() -> None:
    rng = np.random.default_rng(1)
    clean = torch.from_numpy(rng.uniform(0, 1, (1, 3, 64, 96)).astype(np.float32))
    task = SuperResolution(factor=4)
    result = fit(task.observe(clean), task, tiny(iterations=6, psnr_protocol="y"), clean=clean)
    final = result.final[0].permute(1, 2, 0).double().numpy()
    expected = numpy_reference.psnr_y(final, clean[0].permute(1, 2, 0).double().numpy(), shave=4)
    assert result.curves["psnr"][-1] == pytest.approx(expected, abs=1e-4)
    rgb = numpy_reference.psnr(final, clean[0].permute(1, 2, 0).double().numpy())
    assert abs(expected - rgb) > 0.05  # the protocols differ: the check above can fail
    best = result.best[0].permute(1, 2, 0).double().numpy()
    peak = numpy_reference.psnr_y(best, clean[0].permute(1, 2, 0).double().numpy(), shave=4)
    assert peak == pytest.approx(float(np.nanmax(result.curves["psnr"])), abs=1e-4)


def test_input_perturbation_is_seeded_gaussian_noise_on_z(astronaut_64) -> None:
    task = Denoising(sigma=25, seed=0)
    y = task.observe(astronaut_64)
    config = tiny(iterations=1, input_noise=0.05, seed=7, channels_last=False)
    state = FitState([y], [task], [config])
    z = state.network.z.clone()
    drawn = torch.randn(z.shape, generator=torch.Generator().manual_seed(7 + 2))
    with torch.no_grad():
        expected = state.network.model(z + 0.05 * drawn)
        out = state.network.forward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert perturbed(z, 0.0, torch.Generator()).equal(z)
    with torch.no_grad():
        unperturbed = state.network.model(z)
    assert (unperturbed - expected).abs().max() > 1e-4
