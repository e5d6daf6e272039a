"""Batched fits: each member is the single fit it stands for, up to rounding (pipeline.networks).

These fits are chaotic in float32: a one-ulp change of one weight grows about tenfold every few
Adam steps (bench/run.py and the module docstring of pipeline.networks), so a batched member and
its single fit — which round differently in the grouped convolutions — can only be compared over
a short horizon. The members below (width 8, lr 1e-3, 12 iterations) stay within 1e-5 of their
single fits; the tolerances leave a margin of 10× and are far below what a wrong λ, σ, seed or
optimiser state would give (checked by :func:`test_a_wrong_member_setting_would_be_caught`).
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from skimage import data

from pipeline.degradations import Denoising, Inpainting
from pipeline.errors import UserError
from pipeline.fit import FitConfig, FitResult, MemberView, fit, fit_many
from pipeline.problem import Problem
from pipeline.storage import resolve_storage
from pipeline.tuning import (
    Objective,
    TrialOutcome,
    TuneConfig,
    open_study,
    run_trials,
    study_report,
)
from tests.test_tuning import HOPELESS_PRUNING

IMAGE_ATOL = 1e-4
CURVE_RTOL = 1e-4
FBC_ATOL = 1e-3
MEMBERS = (("astronaut", 1.0, 0), ("chelsea", 0.7, 5), ("coffee", 0.0, 4))
"""(image, λ, seed): a controlled, a strongly controlled and an uncontrolled (DIP) member."""


def image(name: str) -> torch.Tensor:
    pixels = getattr(data, name)()[::4, ::4][:64, :64].astype(np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def config(**overrides: object) -> FitConfig:
    values = {
        "iterations": 12,
        "width": 8,
        "lr": 1e-3,
        "device": "cpu",
        "log_every": 2,
        "ratio_window": 2,
        "ratio_eps": 1e9,  # fires at the first measurement the rule allows (5)
        "wmv_window": 4,
        # A batched pass lays the members out as channel groups (NCHW), so solo fits compare to
        # it to rounding in that layout; test_speed_options_give_close_results covers NHWC.
        "channels_last": False,
        **overrides,
    }
    return FitConfig.from_dict(values)


@pytest.fixture(scope="module")
def problems() -> tuple[Denoising, list[torch.Tensor], list[torch.Tensor]]:
    task = Denoising(sigma=25, seed=1)
    cleans = [image(name) for name, _, _ in MEMBERS]
    return task, [task.observe(x) for x in cleans], cleans


def changed(cfg: FitConfig, **values: object) -> FitConfig:
    return FitConfig.from_dict({**cfg.flat(), **values})


def member_configs(**overrides: object) -> list[FitConfig]:
    return [config(lam=lam, seed=seed, **overrides) for _, lam, seed in MEMBERS]


def assert_same_fit(solo: FitResult, member: FitResult) -> None:
    assert member.iterations_run == solo.iterations_run
    assert member.stop_iteration == solo.stop_iteration
    assert member.best_iteration == solo.best_iteration
    torch.testing.assert_close(member.final, solo.final, atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(member.at_stop, solo.at_stop, atol=IMAGE_ATOL, rtol=0)
    if solo.best is not None:
        torch.testing.assert_close(member.best, solo.best, atol=IMAGE_ATOL, rtol=0)
    for name in ("loss", "psnr", "psnr_obs"):
        np.testing.assert_allclose(member.curves[name], solo.curves[name], rtol=CURVE_RTOL)
    # Variances and sharpness of nearly flat outputs are small differences of larger numbers.
    for name in ("wmv", "emv"):
        np.testing.assert_allclose(member.curves[name], solo.curves[name], rtol=10 * CURVE_RTOL)
    np.testing.assert_allclose(member.curves["sharpness"], solo.curves["sharpness"], atol=1e-6)
    for band in range(1, 6):
        np.testing.assert_allclose(
            member.curves[f"fbc_{band}"], solo.curves[f"fbc_{band}"], rtol=0, atol=FBC_ATOL
        )
    # Blur and the ratio are left out: while the output is still nearly flat they are ratios of
    # near-zero quantities, and rounding-level differences of the output move them by O(1).
    assert np.array_equal(member.curves["iteration"], solo.curves["iteration"])


def test_each_member_equals_its_single_fit(problems):
    task, ys, cleans = problems
    configs = member_configs()
    batch = fit_many(ys, task, configs, cleans=cleans)
    for y, clean, cfg, member in zip(ys, cleans, configs, batch, strict=True):
        assert_same_fit(fit(y, task, cfg, clean=clean), member)
    assert batch[0].stop_iteration == 5 * 1 and batch[0].config == configs[0]


def test_a_wrong_member_setting_would_be_caught(problems):
    task, ys, cleans = problems
    right = fit(ys[0], task, member_configs()[0], clean=cleans[0])
    for wrong in ({"lam": MEMBERS[1][1]}, {"seed": MEMBERS[1][2]}, {"lr": 1.1e-3}):
        other = fit(ys[0], task, changed(member_configs()[0], **wrong), clean=cleans[0])
        assert (other.final - right.final).abs().max() > 10 * IMAGE_ATOL, wrong


def test_ended_members_stop_changing_while_the_others_go_on(problems):
    task, ys, cleans = problems
    configs = member_configs(halt_at_stop=True)
    seen: list[tuple[int, int]] = []

    def end_first_at_4(view: MemberView) -> bool:
        seen.append((view.member, view.iteration))
        assert len(view.curves_numpy()["loss"]) == view.measured == view.iteration
        return view.member == 0 and view.iteration == 4

    batch = fit_many(ys, task, configs, [end_first_at_4], cleans=cleans)
    # Member 0 was ended by its callback at 4; the rule fired at 5 for the others, which halt at
    # the next sync (6). Member 0 is no longer called after it ended.
    assert [r.iterations_run for r in batch] == [4, 6, 6]
    assert seen == [(0, 2), (1, 2), (2, 2), (0, 4), (1, 4), (2, 4), (1, 6), (2, 6)]
    first = fit(ys[0], task, changed(configs[0], iterations=4), clean=cleans[0])
    assert_same_fit(first, batch[0])
    later = fit(ys[0], task, changed(configs[0], iterations=6), clean=cleans[0])
    assert (later.final - batch[0].final).abs().max() > 10 * IMAGE_ATOL
    # The others ran on after member 0 left the stacks (parameters, Adam moments, curves).
    for k in (1, 2):
        assert_same_fit(fit(ys[k], task, configs[k], clean=cleans[k]), batch[k])


def test_gaussian_sigma_and_inpainting_mask_per_member():
    x = image("astronaut")
    tasks = [Inpainting(p=0.5, seed=1), Inpainting(p=0.5, seed=2)]
    ys = [task.observe(x) for task in tasks]
    configs = [
        config(iterations=8, upsample="gaussian", gauss_sigma=[sigma] * 5, lam=2.0)
        for sigma in (0.1, 1.5)
    ]
    batch = fit_many(ys, tasks, configs, cleans=[x, x])
    for y, task, cfg, member in zip(ys, tasks, configs, batch, strict=True):
        assert_same_fit(fit(y, task, cfg, clean=x), member)
    assert (batch[0].final - batch[1].final).abs().max() > 10 * IMAGE_ATOL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 16}, "width"),
        ({"iterations": 13}, "iterations"),
        ({"upsample": "nearest"}, "upsample"),
        ("shape", "shape"),
        ("clean", "clean image"),
    ],
)
def test_mismatched_members_are_user_errors(problems, change, message):
    task, ys, cleans = problems
    configs = member_configs()[:2]
    ys, cleans_given = list(ys[:2]), list(cleans[:2])
    if change == "shape":
        ys[1] = ys[1][..., :32]
    elif change == "clean":
        cleans_given[1] = None
    else:
        configs[1] = changed(configs[1], **change)
    with pytest.raises(UserError, match=message):
        fit_many(ys, task, configs, cleans=cleans_given)


def test_stacked_adam_is_one_adam_per_member():
    generator = torch.Generator().manual_seed(0)
    members = [torch.randn(4, 3, generator=generator) for _ in range(3)]
    grads = [[torch.randn(4, 3, generator=generator) for _ in range(3)] for _ in range(5)]
    alone = [m.clone().requires_grad_() for m in members]
    optimizers = [torch.optim.Adam([p], lr=0.1) for p in alone]
    stacked = torch.stack(members).requires_grad_()
    together = torch.optim.Adam([stacked], lr=0.1)
    for step in grads:
        for p, optimizer, g in zip(alone, optimizers, step, strict=True):
            p.grad = g.clone()
            optimizer.step()
        stacked.grad = torch.stack(step)
        together.step()
    assert torch.equal(stacked.detach(), torch.stack([p.detach() for p in alone]))


@pytest.mark.parametrize(
    ("option", "atol"),
    [({"precision": "tf32"}, 0.0), ({"channels_last": True}, 1e-4), ({"precision": "bf16"}, 0.02)],
)
def test_speed_options_give_close_results(problems, option, atol):
    task, ys, cleans = problems
    configs = member_configs(iterations=6)[:2]
    fast = [changed(cfg, **option) for cfg in configs]
    single, single_fast = (fit(ys[0], task, c, clean=cleans[0]) for c in (configs[0], fast[0]))
    batch, batch_fast = (fit_many(ys[:2], task, c, cleans=cleans[:2]) for c in (configs, fast))
    torch.testing.assert_close(single_fast.final, single.final, atol=atol, rtol=0)
    for plain, quick in zip(batch, batch_fast, strict=True):
        torch.testing.assert_close(quick.final, plain.final, atol=atol, rtol=0)
    if option.get("precision") == "bf16":
        # bfloat16 really was used: the results move, by far more than rounding in float32.
        assert (single_fast.final - single.final).abs().max() > IMAGE_ATOL
        assert (batch_fast[0].final - batch[0].final).abs().max() > IMAGE_ATOL


@pytest.mark.skip(
    reason="torch.compile of the decoder takes about 90 s on the 2-core CPU (Inductor's C++ "
    "build); checked by hand: single and batched fits run and agree to 1.4e-4 after 6 "
    "iterations. bench/run.py --gpu times it on a GPU."
)
def test_compile_gives_close_results(problems):
    task, ys, cleans = problems
    configs = member_configs(iterations=6)[:2]
    compiled = [changed(cfg, compile=True) for cfg in configs]
    plain = fit_many(ys[:2], task, configs, cleans=cleans[:2])
    fast = fit_many(ys[:2], task, compiled, cleans=cleans[:2])
    for a, b in zip(plain, fast, strict=True):
        torch.testing.assert_close(b.final, a.final, atol=1e-3, rtol=0)


TUNE_FIT = {"iterations": 60, "width": 8, "lr": 0.01, "lam": 1.4, "device": "cpu", "log_every": 10}


def tune_study(config: TuneConfig) -> optuna.Study:
    study, _ = open_study("s", resolve_storage("memory"), config, TUNE_FIT["iterations"], {})
    return study


@pytest.fixture(scope="module")
def denoising_problem() -> Problem:
    task = Denoising(sigma=25, seed=0)
    clean = image("astronaut")
    return Problem(task, task.observe(clean), clean)


def test_batched_trials_complete_and_record_their_scores(denoising_problem):
    config = TuneConfig.from_dict({"objective": "holdout", "prune": False, "startup_trials": 2})
    outcomes: list[TrialOutcome] = []
    objective = Objective(denoising_problem, TUNE_FIT, config, on_trial=outcomes.append)
    study = tune_study(config)
    run_trials(study, objective, trials=5, batch=2)
    report = study_report(study)
    assert (report["trials"], report["complete"]) == (5, 5)
    assert report["baseline"]["trial"] == 0 and report["baseline"]["params"] == {"lam": 1.4}
    assert len({t.params["lam"] for t in study.trials}) == 5
    for trial, outcome in zip(study.trials, outcomes, strict=True):
        assert outcome.number == trial.number and outcome.value == trial.value
        assert trial.value == trial.user_attrs["holdout_psnr_stop"]
        assert trial.user_attrs["iterations_run"] <= TUNE_FIT["iterations"]


def test_batched_trials_are_pruned_one_by_one(denoising_problem):
    config = TuneConfig.from_dict(HOPELESS_PRUNING)
    objective = Objective(denoising_problem, TUNE_FIT, config)
    study = tune_study(config)
    for lam in (1.4, 0.02, 0.02, 1.4):  # λ ≈ 0 flattens the output: hopeless
        study.enqueue_trial({"lam": lam})
    run_trials(study, objective, trials=4, batch=2)
    states = [t.state for t in study.trials]
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    # The first round has no finished trial to compare with, so both complete; in the second
    # the hopeless trial leaves the batch early and its partner runs on to the end.
    assert states == [complete, complete, pruned, complete]
    assert 20 <= study.trials[2].user_attrs["pruned_at"] < TUNE_FIT["iterations"]
    assert study.trials[3].user_attrs["iterations_run"] == TUNE_FIT["iterations"]
    assert study.trials[3].value == pytest.approx(study.trials[0].value, abs=0.5)


def test_batched_trials_cannot_search_the_learning_rate(denoising_problem):
    config = TuneConfig.from_dict({"objective": "oracle", "search": ["lam", "lr"]})
    objective = Objective(denoising_problem, TUNE_FIT, config)
    with pytest.raises(UserError, match="learning rate"):
        run_trials(tune_study(config), objective, trials=2, batch=2)
