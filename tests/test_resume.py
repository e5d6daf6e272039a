"""Killed fits resume: a real ``sdip optimize`` process killed with SIGKILL at a random moment, or
stopped by SIGTERM as a cluster's time limit does, then run again, ends with the images and curves
of a run that was never interrupted; so does a batched engine restored in-process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from skimage import data

from pipeline import checkpoint as checkpoint_module
from pipeline import runtime
from pipeline.checkpoint import checkpoint_for
from pipeline.degradations import Denoising
from pipeline.errors import FitInterruptedError, UserError
from pipeline.fit import FitConfig, FitState, MemberView, fit_many
from pipeline.layout import checkpoint_path, run_dir
from pipeline.observations import write_observation
from pipeline.problem import Problem, simulate
from pipeline.storage import resolve_storage
from pipeline.tuning import Objective, TuneConfig, open_study, run_trials

ROOT = Path(__file__).resolve().parents[1]
FIT = {"width": 8, "iterations": 400, "log_every": 25, "device": "cpu", "threads": 1}
EVERY = 40
OUTPUTS = ("restored_stop.png", "restored_final.png", "restored_best.png", "curves.csv")


@pytest.fixture
def repo(tmp_path: Path, cpu_profile: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the shrunk CPU profile and one prepared denoising observation."""
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "astronaut.png"
    from PIL import Image

    Image.fromarray(data.astronaut()[::8, ::8][:64, :64]).save(image)
    problem = simulate("denoising", image, {"sigma": 25, "seed": 0})
    write_observation(tmp_path / "data/prepared/denoising/sigma25/astronaut", problem, {})
    params = {**cpu_profile, "fit": {**cpu_profile["fit"], **FIT}, "checkpoints": {"every": EVERY}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def optimize(repo: Path, method: str, out: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages", "optimize", "denoising", "astronaut", method]
    command += ["--variant", "25", "--out", out, "--no-track"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> int:
    _, stderr = process.communicate(timeout=600)
    assert "Traceback" not in stderr, stderr
    return process.returncode


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not path.is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method", ["lipschitz", "dip"])  # dip: backtracking, no σ state
def test_a_fit_killed_at_a_random_iteration_resumes_bit_identically(repo: Path, method: str):
    assert finish(optimize(repo, method, "whole")) == 0
    process = optimize(repo, method, "killed")
    checkpoint = repo / checkpoint_path(Path("killed"))
    wait_for(checkpoint, process)
    time.sleep(random.Random(method).uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (repo / "killed" / "summary.json").exists()
    assert checkpoint.is_file()  # atomic writes: the last whole checkpoint survives the kill
    assert finish(optimize(repo, method, "killed")) == 0
    assert_same_outputs(repo / "whole", repo / "killed")
    assert not checkpoint.exists()  # removed once the fit has ended


def test_sigterm_saves_and_exits_with_128_plus_the_signal_then_resumes(repo: Path):
    """A cluster's time limit: SIGTERM (then SIGKILL after a grace period, never reached here)."""
    assert finish(optimize(repo, "gaussian", "whole")) == 0
    process = optimize(repo, "gaussian", "stopped")
    checkpoint = repo / checkpoint_path(Path("stopped"))
    wait_for(checkpoint, process)  # the fit is running: its first scheduled checkpoint is there
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    saved = torch.load(checkpoint, weights_only=False)
    assert EVERY <= saved["state"]["iteration"] < FIT["iterations"]
    assert finish(optimize(repo, "gaussian", "stopped")) == 0
    assert_same_outputs(repo / "whole", repo / "stopped")


def test_a_termination_request_saves_the_state_now(tmp_path: Path, monkeypatch):
    problem, configs = members()
    ys = [problem.observation]
    checkpoint = checkpoint_for(tmp_path / "fit.pt", [configs[1]], ys, every=1000)
    state = FitState(ys, [problem.task], [configs[1]])
    for _ in range(3):
        state.step()
        checkpoint.after_step(state, 0.0)
    assert not checkpoint.path.exists()  # not on schedule before iteration 1000
    monkeypatch.setattr(runtime, "_requested", [signal.SIGTERM])
    state.step()
    with pytest.raises(FitInterruptedError) as raised:
        checkpoint.after_step(state, 0.0)
    assert raised.value.iteration == 4 and raised.value.signal_number == signal.SIGTERM
    assert torch.load(checkpoint.path, weights_only=False)["state"]["iteration"] == 4


def members() -> tuple[Problem, list[FitConfig]]:
    x = torch.from_numpy(data.coffee()[::4, ::4][:64, :64].astype(np.float32) / 255)
    x = x.permute(2, 0, 1)[None].contiguous()
    task = Denoising(sigma=25, seed=3)
    problem = Problem(task, task.observe(x), x)
    values = {**FIT, "iterations": 40, "log_every": 5, "ratio_window": 2}
    configs = [
        FitConfig.from_dict({**values, "lam": lam, "seed": seed})
        for lam, seed in ((1.0, 0), (0.7, 1), (0.0, 2))
    ]
    return problem, configs


def end_member_0_at_10(view: MemberView) -> bool:
    return view.member == 0 and view.iteration == 10


def test_a_batched_engine_resumes_after_a_member_has_ended(tmp_path: Path):
    """Member 0 is ended at iteration 10 and leaves the stacks; a state saved after that and
    loaded into a fresh engine ends as the uninterrupted one does."""
    problem, configs = members()
    ys, cleans = [problem.observation] * 3, [problem.clean] * 3
    whole = fit_many(ys, problem.task, configs, [end_member_0_at_10], cleans=cleans)
    assert [r.iterations_run for r in whole] == [10, 40, 40]
    state = FitState(ys, [problem.task] * 3, configs, cleans)
    for _ in range(15):
        state.step()
        if state.iteration % 5 == 0:
            state.sync([end_member_0_at_10], lambda: 0.0)
    assert state.members == [1, 2]
    saved = state.state_dict()
    path = tmp_path / "state.pt"
    torch.save(saved, path)
    fresh = FitState(ys, [problem.task] * 3, configs, cleans)
    fresh.load_state_dict(torch.load(path, weights_only=False))
    while fresh.running:
        fresh.step()
        if fresh.iteration % 5 == 0 or fresh.done:
            fresh.sync([end_member_0_at_10], lambda: 0.0)
    for member, result in enumerate(whole):
        resumed = fresh.results[member]
        assert torch.equal(resumed.final, result.final) and torch.equal(
            resumed.at_stop, result.at_stop
        )
        for name, values in result.curves.items():
            assert np.array_equal(resumed.curves[name], values, equal_nan=True), name


def test_a_checkpoint_of_other_settings_is_not_resumed_and_a_corrupt_one_is_named(tmp_path):
    problem, configs = members()
    path = tmp_path / "fit.pt"
    ys = [problem.observation]
    other = checkpoint_for(path, [configs[1]], ys, every=5)
    state = FitState(ys, [problem.task], [configs[1]])
    state.step()
    other.save(state, 1.0)
    mine = checkpoint_for(path, [configs[2]], ys, every=5)
    assert mine.restore(FitState(ys, [problem.task], [configs[2]])) == 0.0
    assert not path.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"fit\.pt is unreadable"):
        mine.restore(FitState(ys, [problem.task], [configs[2]]))
    assert run_dir("a", "b", "c", "d") == Path("runs/a/b/c/d")


def test_an_interrupted_round_of_trials_resumes_as_new_trials_with_the_same_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    problem, _ = members()
    settings = {**FIT, "iterations": 30, "log_every": 5}
    config = TuneConfig.from_dict(
        {"objective": "oracle", "prune": False, "trials": 2, "baseline": False}
    )
    storage = resolve_storage("memory")
    study, _ = open_study("s", storage, config, 30, {})
    for lam in (0.8, 1.6):
        study.enqueue_trial({"lam": lam})
    objective = Objective(problem, settings, config)
    objective.checkpoint, objective.checkpoint_every = tmp_path / "round.pt", 7
    calls = iter(range(100))
    monkeypatch.setattr(
        checkpoint_module,
        "termination_requested",
        lambda: signal.SIGINT if next(calls) == 11 else None,
    )
    with pytest.raises(FitInterruptedError):
        run_trials(study, objective, trials=2, batch=2)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert torch.load(tmp_path / "round.pt", weights_only=False)["state"]["iteration"] == 12
    monkeypatch.setattr(checkpoint_module, "termination_requested", lambda: None)
    run_trials(study, objective, trials=2, batch=2)
    resumed = study.trials[2:]
    assert [t.params["lam"] for t in resumed] == [0.8, 1.6]
    assert not (tmp_path / "round.pt").exists()
    uninterrupted = fit_many(
        [problem.observation] * 2,
        problem.task,
        [FitConfig.from_dict({**settings, "lam": lam, "halt_at_stop": True}) for lam in (0.8, 1.6)],
        cleans=[problem.clean] * 2,
    )
    for trial, result in zip(resumed, uninterrupted, strict=True):
        assert trial.state.name == "COMPLETE"
        assert trial.value == result.summary()["psnr_stop"]
