"""Per-image tuning: the holdout objective, studies end to end, pruning, shared and resumed
studies, MLflow runs, and the tuned map read back by the optimize stage."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from skimage import data

from pipeline.degradations import Denoising, Inpainting
from pipeline.errors import UserError
from pipeline.fit import FitConfig, fit
from pipeline.layout import tuned_values_path
from pipeline.observations import write_observation
from pipeline.problem import Problem, simulate
from pipeline.settings import fit_settings, load_yaml
from pipeline.storage import resolve_storage
from pipeline.tuning import (
    HoldoutDegradation,
    Objective,
    TuneConfig,
    best_values,
    mean_psnr,
    open_study,
    run_trials,
    spearman,
    study_report,
)
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = {"iterations": 40, "width": 8, "lr": 0.01, "lam": 1.4, "device": "cpu", "log_every": 10}
TINY_OPTIONS = ["--iterations", "40", "--width", "8", "--lr", "0.01", "--log-every", "10"]
HOPELESS_PRUNING = {
    "objective": "oracle",
    "ranges": {"lam": [0.01, 3.0]},
    "prune_startup": 1,
    "prune_warmup": 20,
    "baseline": False,
}
"""A study whose pruner may end a trial from iteration 20, once one trial has finished."""


def tune_args(image: Path, storage: str, out: Path) -> list[str]:
    """``sdip tune`` of two tiny trials of ``image`` in ``storage``, untracked, written to out."""
    return [
        *("tune", "denoising", str(image), "--trials", "2", "--storage", storage),
        *("--no-track", "--out", str(out), *TINY_OPTIONS),
    ]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny fits gain nothing from a second thread and lose much when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    """An odd-sized (67×71) grey crop of a real photo; the fits crop it to 64×64."""
    path = tmp_path / "cam.png"
    Image.fromarray(data.camera()[::4, ::4][20:87, 30:101]).save(path)
    return path


def study_of(config: TuneConfig, settings: dict, name: str = "s") -> optuna.Study:
    study, created = open_study(name, resolve_storage("memory"), config, settings["iterations"], {})
    assert created
    return study


def test_holdout_mask_is_seeded_exact_disjoint_and_left_out_of_the_loss():
    y = torch.rand(1, 3, 45, 37, generator=torch.Generator().manual_seed(1))
    a = HoldoutDegradation(Denoising(), y, fraction=0.1, seed=3)
    b = HoldoutDegradation(Denoising(), y, fraction=0.1, seed=3)
    c = HoldoutDegradation(Denoising(), y, fraction=0.1, seed=4)
    assert int(a.held.sum()) == round(0.1 * 45 * 37)
    assert torch.equal(a.held, b.held) and not torch.equal(a.held, c.held)
    assert torch.equal(a.held + a.keep, torch.ones_like(a.held))
    out = torch.rand(1, 3, 45, 37, generator=torch.Generator().manual_seed(2))
    changed = y + 0.5 * a.held  # only held-out pixels differ
    assert torch.equal(a.loss(out, a.observation), a.loss(out, changed * a.keep))
    assert torch.equal(a.observation * a.held, torch.zeros_like(y))


def test_holdout_folds_are_disjoint_blocks_of_one_permutation():
    y = torch.rand(1, 1, 20, 15, generator=torch.Generator().manual_seed(1))
    folds = [HoldoutDegradation(Denoising(), y, fraction=0.25, seed=3, fold=f) for f in range(4)]
    assert torch.equal(folds[0].held, HoldoutDegradation(Denoising(), y, 0.25, seed=3).held)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    for f, wrapped in enumerate(folds):
        expected = torch.zeros(300)
        expected[order[75 * f : 75 * (f + 1)]] = 1.0
        assert torch.equal(wrapped.held.flatten(), expected)
    assert torch.equal(sum(w.held for w in folds), torch.ones_like(y))
    with pytest.raises(UserError, match=r"folds 0\.\.3 exist"):
        HoldoutDegradation(Denoising(), y, fraction=0.25, seed=3, fold=4)


def test_holdout_of_inpainting_draws_only_among_kept_pixels():
    x = torch.rand(1, 1, 41, 39, generator=torch.Generator().manual_seed(5))
    task = Inpainting(p=0.5, seed=2)
    y = task.observe(x)
    wrapped = HoldoutDegradation(task, y, fraction=0.2, seed=0)
    assert torch.equal(wrapped.held * (1 - task.mask), torch.zeros_like(wrapped.held))
    assert int(wrapped.held.sum()) == round(0.2 * int(task.mask.sum()))
    assert torch.equal(wrapped.keep, task.mask * (1 - wrapped.held))


def test_holdout_of_a_padded_photo_draws_and_fits_only_the_photo():
    """Padding mirrors the photo: held-out pixels come from the photo, and the padding is out
    of the loss (else the fit would see a held-out value at its mirror image)."""
    y = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(5))
    problem = Problem(Denoising(), y, None, region=(3, 5, 20, 50))
    observed = problem.observed_mask()
    assert observed.sum() == 20 * 50 and observed[0, 0, 3:23, 5:55].min() == 1
    wrapped = HoldoutDegradation(Denoising(), y, fraction=0.1, seed=0, observed=observed)
    assert int(wrapped.held.sum()) == round(0.1 * 20 * 50)
    assert torch.equal(wrapped.held * (1 - observed), torch.zeros_like(wrapped.held))
    assert torch.equal(wrapped.keep, observed * (1 - wrapped.held))


def test_holdout_psnr_matches_a_numpy_transcription():
    y = torch.rand(1, 3, 33, 35, generator=torch.Generator().manual_seed(7))
    out = torch.rand(1, 3, 33, 35, generator=torch.Generator().manual_seed(8))
    wrapped = HoldoutDegradation(Denoising(), y, fraction=0.07, seed=1)
    yn, on, h = y[0].numpy().astype(np.float64), out[0].numpy(), wrapped.held[0, 0].numpy()
    rows, cols = np.nonzero(h)
    mse = np.mean((on[:, rows, cols] - yn[:, rows, cols]) ** 2)
    assert wrapped.holdout_psnr(out) == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)


def test_holdout_error_of_the_clean_image_is_the_noise_power():
    """For white noise the held-out error of x itself is σ² (what makes it an oracle proxy)."""
    x = torch.full((1, 1, 63, 61), 0.5)
    task = Denoising(sigma=25, seed=3)
    wrapped = HoldoutDegradation(task, task.observe(x), fraction=0.1, seed=0)
    mse = 10 ** (-wrapped.holdout_psnr(x) / 10)
    assert mse == pytest.approx((25 / 255) ** 2, rel=0.2)


@pytest.mark.parametrize(
    "bad",
    [
        {"objective": "psnr"},
        {"search": "lam,width"},
        {"ranges": {"lam": [2, 1]}},
        {"holdout": 1.0},
        {"trials": 0},
        {"pruner": "median"},
    ],
)
def test_bad_tune_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        TuneConfig.from_dict(bad)


def test_in_memory_study_end_to_end(image_file):
    problem = simulate("denoising", image_file, {"sigma": 25, "seed": 0})
    config = TuneConfig.from_dict({"objective": "oracle", "prune": False, "startup_trials": 2})
    objective = Objective(problem, TINY, config)
    study = study_of(config, TINY)
    run_trials(study, objective, 4)
    report = study_report(study)
    assert (report["trials"], report["complete"], report["pruned"]) == (4, 4, 0)
    assert report["baseline"]["params"] == {"lam": 1.4} and report["baseline"]["trial"] == 0
    lams = [t.params["lam"] for t in study.trials]
    assert len(set(lams)) == 4 and all(0.3 <= v <= 3.0 for v in lams)
    # The best value is what an independent fit with the best λ scores at its stop.
    best = best_values(study, depth=5)
    again = fit(
        problem.observation,
        problem.task,
        FitConfig.from_dict({**TINY, "lam": best["lam"], "halt_at_stop": True}),
        clean=problem.clean,
    )
    assert again.summary()["psnr_stop"] == study.best_value
    assert study.best_value >= report["baseline"]["value"]


def test_pruning_really_prunes_hopeless_trials(image_file):
    problem = simulate("denoising", image_file, {"sigma": 25, "seed": 0})
    settings = {**TINY, "iterations": 60}
    config = TuneConfig.from_dict(HOPELESS_PRUNING)
    objective = Objective(problem, settings, config)
    study = study_of(config, settings)
    for lam in (1.4, 0.02, 0.03):  # λ ≈ 0 flattens the output: hopeless
        study.enqueue_trial({"lam": lam})
    run_trials(study, objective, 3)
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[1:] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials[1:]:
        assert 20 <= trial.user_attrs["pruned_at"] < 60
    report = study_report(study)
    assert (report["complete"], report["pruned"]) == (1, 2)


def test_cli_study_with_mlflow_parent_and_trial_runs(image_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = [
        "tune",
        "denoising",
        str(image_file),
        "--trials",
        "3",
        "--storage",
        "memory",
        "--objective",
        "holdout",
        "--study-name",
        "demo",
        "--out",
        "out",
        *TINY_OPTIONS,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    values = load_yaml(tmp_path / "out" / "values.yaml")
    assert values == {"lam": summary["best"]["params"]["lam"]}
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").read_text().splitlines()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert all(float(r["psnr_stop"]) > 0 and float(r["holdout_psnr_stop"]) > 0 for r in rows)
    assert summary["agreement"]["pairs"] == 3

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("tune-denoising").experiment_id
    runs = mlflow.search_runs([experiment])
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.data.tags["optuna_study"] == "demo" and parent.info.status == "FINISHED"
    assert parent.data.metrics["complete"] == 3
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["image"] == "cam" and child.data.tags["optuna_study"] == "demo"
        history = mlflow.get_metric_history(child.info.run_id, "psnr")
        assert [m.step for m in history] == list(range(40))


def test_two_worker_processes_share_a_journal_study_without_losing_trials(image_file, tmp_path):
    journal = tmp_path / "study.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [
                *(sys.executable, "-c", "from stages.cli import main; main()"),
                *tune_args(image_file, f"journal:{journal}", tmp_path / f"out{seed}"),
                *("--study-name", "shared", "--sampler-seed", str(seed), "--iterations", "20"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=resolve_storage(f"journal:{journal}"))
    assert sorted(t.number for t in study.trials) == list(range(4))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in study.trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1


def test_resumed_study_continues_its_trial_count_and_refuses_other_settings(image_file, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = tune_args(image_file, storage, tmp_path / "out")
    runner = CliRunner()
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "resumed, 2 trial(s)" in second.output
    study = optuna.load_study(study_name="denoising-sigma25-cam-holdout", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [bool(t.user_attrs.get("baseline")) for t in study.trials] == [True, False, False, False]
    other = runner.invoke(cli, [*args, "--iterations", "30"])
    assert other.exit_code == 1
    assert "other settings (fit)" in other.output


def test_tuned_map_is_what_the_optimize_stage_reads(image_file, tmp_path, monkeypatch, cpu_profile):
    monkeypatch.chdir(tmp_path)
    problem = simulate("denoising", image_file, {"sigma": 25, "seed": 0})
    meta = {
        "task": "denoising",
        "variant": "sigma25",
        "image": "cam",
        "params": {"sigma": 25, "seed": 0},
    }
    write_observation(Path("data/prepared/denoising/sigma25/cam"), problem, meta)
    params = {**cpu_profile, "fit": {**cpu_profile["fit"], **TINY}}
    params["tune"] = {**cpu_profile["tune"], "images": ["cam"]}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    tuned = runner.invoke(
        cli,
        [
            "tune",
            "denoising",
            "cam",
            "--variant",
            "sigma25",
            "--trials",
            "2",
            "--storage",
            "memory",
            "--no-track",
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    path = tuned_values_path("denoising", "sigma25", "cam")
    lam = load_yaml(path)["lam"]
    settings = fit_settings(params, "denoising", "lipschitz", "cam", "sigma25", {"lam": "tuned"})
    assert settings["lam"] == lam and settings["width"] == 8
    optimized = runner.invoke(
        cli,
        [
            "optimize",
            "denoising",
            "cam",
            "lipschitz",
            "--variant",
            "sigma25",
            "--set",
            "lam=tuned",
            "--out",
            "runs/tuned",
            "--no-track",
        ],
    )
    assert optimized.exit_code == 0, optimized.output
    assert json.loads(Path("runs/tuned/summary.json").read_text())["settings"]["lam"] == lam
    with pytest.raises(UserError, match="does not exist"):
        fit_settings(params, "denoising", "lipschitz", "moon", "sigma25", {"lam": "tuned"})


def test_spearman():
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 30.0, 20.0, 40.0])) == (
        pytest.approx(0.8)
    )
    assert spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None


def test_mean_psnr_averages_the_errors_not_the_decibels():
    # errors 0.1 and 0.01: their mean 0.055 is 12.596 dB, not the 15 dB of the mean PSNR
    assert mean_psnr([10.0, 20.0]) == pytest.approx(-10 * np.log10(0.055))
    assert mean_psnr([23.4]) == pytest.approx(23.4)


def test_folds_score_a_trial_by_the_mean_error_of_its_disjoint_hold_outs(image_file):
    problem = simulate("denoising", image_file, {"sigma": 25, "seed": 0})
    # 4 iterations: a fold, fitted beside the others, still equals its fit alone (float32 fits
    # are chaotic; at lr 0.01 with backtracking they part by 0.1 dB within 15 iterations).
    settings = {**TINY, "iterations": 4}
    config = TuneConfig.from_dict(
        {"objective": "holdout", "folds": 3, "holdout": 0.1, "prune": False, "baseline": True}
    )
    objective = Objective(problem, settings, config)
    study = study_of(config, settings)
    run_trials(study, objective, 2)
    for trial in study.trials:
        folds = trial.user_attrs["holdout_psnr_folds"]
        assert len(folds) == 3 and len(set(folds)) == 3
        errors = [10 ** (-p / 10) for p in folds]
        assert trial.value == pytest.approx(-10 * np.log10(sum(errors) / 3))
        assert trial.user_attrs["holdout_psnr_fold_std"] == pytest.approx(np.std(folds))
    # Each fold of the baseline (the fixed λ) is the fit of that fold's hold-out alone.
    baseline = study.trials[0].user_attrs["holdout_psnr_folds"]
    config_alone = FitConfig.from_dict({**settings, "halt_at_stop": True})
    for fold in range(3):
        holdout = HoldoutDegradation(problem.task, problem.observation, 0.1, 0, fold=fold)
        alone = fit(holdout.observation, holdout, config_alone)
        assert baseline[fold] == pytest.approx(holdout.holdout_psnr(alone.at_stop), abs=1e-4)


def test_a_study_with_folds_does_not_resume_one_without(image_file, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = tune_args(image_file, storage, tmp_path / "out")
    first = CliRunner().invoke(cli, [*args, "--folds", "2"])
    assert first.exit_code == 0, first.output
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [row["holdout_psnr_fold_std"] != "" for row in rows] == [True, True]
    other = CliRunner().invoke(cli, args)
    assert other.exit_code == 1 and "other settings" in other.output
