"""pipeline.lambda_choice: MC-SURE of a fit, its probe and recorder, the noise estimate, the
choice at the ratio rule's stop and at the SURE window rule's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter
from skimage import data

from pipeline.degradations import Denoising, Inpainting
from pipeline.errors import UserError
from pipeline.fit import FitConfig, MemberView, fit_many
from pipeline.lambda_choice import (
    EPS_OVER_SIGMA,
    MAD_TO_SIGMA,
    ProjectionRecorder,
    choose_lambda,
    estimate_noise_sigma,
    mc_sure,
    rademacher,
)
from pipeline.problem import Problem
from pipeline.settings import fit_settings
from tests.test_stopping import sure_window_loop

SIGMA = 25 / 255


@pytest.fixture
def tiny(cpu_profile: dict, astronaut_64: torch.Tensor) -> tuple[Problem, dict]:
    """The profile's Gaussian method shrunk to 12 iterations of a width-8 decoder whose ratio
    rule fires at the first measurement it may (5)."""
    settings = fit_settings(cpu_profile, "denoising", "gaussian")
    settings.update(iterations=12, width=8, lr=1e-3, device="cpu", ratio_window=2, ratio_eps=1e9)
    task = Denoising(sigma=25)
    return Problem(task, task.observe(astronaut_64), astronaut_64), settings


def test_mc_sure_hand_computed():
    # div = (12 − 10) / 0.05 = 40;  0.02 − 0.01 + 2·0.01·40/100 = 0.018
    got = mc_sure(np.array([0.02]), np.array([10.0]), np.array([12.0]), 0.1, 0.05, 100)
    assert got == pytest.approx([0.018], abs=1e-15)


def test_mc_sure_is_unbiased_for_a_linear_smoother():
    """f = 3×3 box filter (zero border): MC-SURE's mean over noise draws and probes equals the
    mean squared error against x, to its standard error."""
    x = data.camera()[200:232, 220:252].astype(np.float64) / 255
    sigma, eps, draws = 0.1, 1e-3, 300
    rng = np.random.default_rng(0)
    sure, mse = [], []
    for _ in range(draws):
        y = x + sigma * rng.standard_normal(x.shape)
        b = rng.choice([-1.0, 1.0], size=x.shape)
        f, f_eps = (uniform_filter(v, 3, mode="constant") for v in (y, y + eps * b))
        loss = np.mean((y - f) ** 2)
        sure.append(mc_sure(np.array([loss]), np.sum(b * f), np.sum(b * f_eps), sigma, eps, x.size))
        mse.append(np.mean((f - x) ** 2))
    difference = np.array(sure).ravel() - np.array(mse)
    assert abs(difference.mean()) < 4 * difference.std() / np.sqrt(draws)
    assert abs(difference.mean()) < 0.02 * np.mean(mse)


def test_estimate_noise_sigma_hand_computed():
    # 2×2 blocks [[1, 2], [4, 8]], [[3, 5], [9, 6]], [[7, 7], [1, 0]] (×0.1): details
    # (a − b − c + d)/2 = 1.5, −2.5, −0.5 → median |·| = 1.5 → σ̂ = 0.15 / 0.6745.
    y = 0.1 * torch.tensor([[[[1.0, 2, 3, 5, 7, 7], [4, 8, 9, 6, 1, 0]]]])
    assert estimate_noise_sigma(y) == pytest.approx(0.15 / MAD_TO_SIGMA, rel=1e-6)


def test_estimate_noise_sigma_of_white_noise():
    generator = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.1):
        y = 0.5 + sigma * torch.randn(1, 3, 256, 256, generator=generator)
        assert estimate_noise_sigma(y) == pytest.approx(sigma, rel=0.03)


def test_rademacher_is_a_seeded_sign_pattern():
    a, b, c = rademacher((1, 3, 8, 8), 4), rademacher((1, 3, 8, 8), 4), rademacher((1, 3, 8, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {-1.0, 1.0} and a.dtype == torch.float32


def test_projection_recorder_reads_every_members_output_at_every_iteration(
    cpu_profile, astronaut_64
):
    """⟨b, x_t⟩ of each member at each iteration, against the outputs a second callback keeps."""
    settings = fit_settings(cpu_profile, "denoising", "gaussian")
    settings.update(iterations=6, width=8, log_every=1, device="cpu")
    y = Denoising(sigma=25).observe(astronaut_64)
    probe = rademacher(tuple(y.shape))
    configs = [FitConfig.from_dict({**settings, "lam": lam}) for lam in (1.4, 0.5)]
    kept: dict[tuple[int, int], np.ndarray] = {}

    def keep(view: MemberView) -> None:
        kept[view.member, view.iteration - 1] = view.last_out.double().numpy().copy()

    scored = torch.zeros_like(y)
    scored[..., 5:60, 3:50] = 1.0  # a padded photo's place: residuals on it only
    recorder = ProjectionRecorder(probe, y, scored, 2, 6)
    results = fit_many([y, y], Denoising(sigma=25), configs, [recorder, keep])
    b, m, yy = probe.double().numpy(), scored.double().numpy(), y.double().numpy()
    for (member, t), out in kept.items():
        assert recorder.values[member, t].item() == pytest.approx(np.sum(b * out), rel=1e-12)
        residual = np.sum((m * (yy - out)) ** 2)
        assert recorder.residuals[member, t].item() == pytest.approx(residual, rel=1e-9)
    for member, result in enumerate(results):
        final = np.sum(b * result.final.double().numpy())
        assert recorder.values[member, -1].item() == pytest.approx(final, rel=1e-12)
    assert len(kept) == 12 and recorder.values[0, 0] != recorder.values[1, 0]


def test_choose_lambda_scores_each_candidate_by_sure_at_its_stop(tiny):
    """SURE at each candidate's stop recomputed in NumPy from the outputs of the candidate and
    its twin on y + εb, kept by a callback; the choice is the argmin."""
    problem, settings = tiny
    settings.update(iterations=24, lr=0.01, ratio_window=10)  # fires at 21; responds to y there
    candidates = (0.5, 1.4)
    outputs: dict[tuple[int, int], np.ndarray] = {}

    def keep(view: MemberView) -> None:
        outputs[view.member, view.iteration - 1] = view.last_out.double().numpy().copy()

    choice = choose_lambda(
        problem, settings, candidates, sigma=SIGMA, callbacks=[keep], stop="ratio"
    )
    y = problem.observation.double().numpy()
    b = rademacher(tuple(problem.observation.shape)).double().numpy()
    eps = EPS_OVER_SIGMA * SIGMA
    expected, divergence = [], []
    for k in range(2):
        f, f_eps = outputs[k, 21], outputs[2 + k, 21]
        divergence.append(np.sum(b * (f_eps - f)) / eps / y.size)
        expected.append(np.mean((y - f) ** 2) - SIGMA**2 + 2 * SIGMA**2 * divergence[-1])
    assert choice.stops == (21, 21) and choice.eps == eps and choice.sigma == SIGMA
    assert max(abs(d) for d in divergence) > 0.005  # the divergence term counts here
    np.testing.assert_allclose(choice.sure, expected, rtol=1e-6)
    assert choice.chosen == int(np.argmin(expected)) and choice.lam == candidates[choice.chosen]
    assert choice.scores()[0] == {
        "lam": 0.5,
        "sure": choice.sure[0],
        "sure_psnr": pytest.approx(10 * np.log10(1 / choice.sure[0])),
        "stop_iteration": 21,
        "iterations_run": 22,
    }
    chosen = choice.results[choice.chosen]
    assert chosen.stop_iteration == 21 and chosen.config.model.lam == choice.lam
    assert chosen.stop_rule == "ratio" and choice.stop == "ratio"
    assert max(t for _, t in outputs) == 21  # candidate and twin ended at the stop


def test_choose_lambda_halting_at_the_stop_changes_no_score(tiny):
    problem, settings = tiny
    halted = choose_lambda(problem, settings, (0.5, 1.4), sigma=SIGMA, stop="ratio")
    full = choose_lambda(
        problem, settings, (0.5, 1.4), sigma=SIGMA, halt_at_stop=False, stop="ratio"
    )
    assert halted.sure == full.sure and halted.stops == full.stops
    assert [r.iterations_run for r in halted.results] == [6, 6]
    assert [r.iterations_run for r in full.results] == [12, 12]


def test_choose_lambda_estimates_sigma_and_refuses_other_tasks(tiny):
    problem, settings = tiny
    settings = {**settings, "iterations": 6}
    choice = choose_lambda(problem, settings, (1.0,), stop="ratio")
    assert choice.sigma == estimate_noise_sigma(problem.observation)
    assert choice.stops == (5,) and choice.lam == 1.0
    inpainting = Problem(Inpainting(p=0.5), problem.observation, None)
    with pytest.raises(UserError, match="denoising only"):
        choose_lambda(inpainting, settings)
    with pytest.raises(UserError, match="positive"):
        choose_lambda(problem, settings, (0.0, 1.0))
    with pytest.raises(UserError, match="stop must be one of sure, ratio"):
        choose_lambda(problem, settings, stop="es_wmv")


@pytest.mark.parametrize(
    ("delta", "threshold", "output"), [(0.3, "noise", "last"), (0.2, "level", "centre")]
)
def test_choose_lambda_at_the_sure_window_rule_against_numpy(tiny, delta, threshold, output):
    """Every candidate's SURE curve recomputed in NumPy from the outputs of the candidate and its
    twin; the literal rule on it gives each stop, the kept output and the score (its window
    mean); halting at the stop changes none of them and ends each pair just after it fires."""
    problem, settings = tiny
    settings.update(iterations=40, lr=0.05)
    candidates, window = (0.5, 1.4), 5
    rule = {"window": window, "delta": delta, "threshold": threshold, "keep": output}
    outputs: dict[tuple[int, int], np.ndarray] = {}

    def keep(view: MemberView) -> None:
        outputs[view.member, view.iteration - 1] = view.last_out.double().numpy().copy()

    args = (problem, settings, candidates, SIGMA)
    full = choose_lambda(*args, False, callbacks=[keep], **rule)
    y = problem.observation.double().numpy()
    b = rademacher(tuple(problem.observation.shape)).double().numpy()
    eps = EPS_OVER_SIGMA * SIGMA
    fired, scores = [], []
    for k in range(2):
        sure = [
            np.mean((y - outputs[k, t]) ** 2)
            - SIGMA**2
            + 2 * SIGMA**2 * np.sum(b * (outputs[2 + k, t] - outputs[k, t])) / eps / y.size
            for t in range(40)
        ]
        stop = sure_window_loop(sure, SIGMA**2, window, delta, threshold, output)
        assert stop is not None and stop.fired < 39
        fired.append(stop.fired)
        scores.append(np.mean(sure[stop.best - window + 1 : stop.best + 1]))
        result = full.results[k]
        assert stop.kept == stop.best - (2 if output == "centre" else 0)
        assert full.stops[k] == result.stop_iteration == stop.kept
        assert result.stop_rule == "sure" and result.iterations_run == 40
        np.testing.assert_allclose(result.at_stop.double().numpy(), outputs[k, stop.kept])
    np.testing.assert_allclose(full.sure, scores, rtol=1e-9)
    assert full.chosen == int(np.argmin(scores)) and full.stop == "sure"
    halted = choose_lambda(*args, callbacks=[keep], **rule)
    assert halted.sure == full.sure and halted.stops == full.stops
    assert list(halted.ended) == [f + 2 for f in fired]  # the candidate ends at its next sync
    for k in range(2):
        assert torch.equal(halted.results[k].at_stop, full.results[k].at_stop)
        assert halted.results[k].summary()["psnr_stop"] == full.results[k].summary()["psnr_stop"]
