"""Optuna storages: URLs, redaction, and heartbeats that fail the trial of a killed worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from pipeline.credentials import has_password, redact
from pipeline.errors import UserError
from pipeline.storage import HeartbeatStorage, fail_stale, heartbeat, resolve_storage

ROOT = Path(__file__).resolve().parents[1]
INTERVAL_S, GRACE_S = 1, 3
WORKER = """
import sys, time, optuna
from pipeline.storage import heartbeat, resolve_storage
storage = resolve_storage(sys.argv[1], heartbeat_interval=int(sys.argv[2]), grace_period=99)
study = optuna.load_study(study_name=sys.argv[3], storage=storage)
trial = study.ask()
with heartbeat(study, [trial]):
    print(trial.number, flush=True)
    time.sleep(600)
"""


def test_storage_urls(tmp_path: Path):
    default = resolve_storage(None, root=tmp_path)
    assert isinstance(default, HeartbeatStorage)
    assert str(default) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert default.get_heartbeat_interval() == 60 and default.grace_period == 180
    assert isinstance(resolve_storage("memory"), optuna.storages.InMemoryStorage)
    journal = resolve_storage(f"journal:{tmp_path / 'studies' / 'a.log'}")
    assert isinstance(journal, optuna.storages.JournalStorage)
    with pytest.raises(UserError, match="names no file"):
        resolve_storage("journal:")


def test_a_password_is_never_shown():
    url = "postgresql://sdip:s3cret@db.example:5432/optuna"
    assert redact(url) == "postgresql://sdip:***@db.example:5432/optuna"
    assert redact("postgresql://sdip@db/optuna") == "postgresql://sdip@db/optuna"
    assert redact("sqlite:////tmp/o.db") == "sqlite:////tmp/o.db"
    assert has_password(url) and not has_password("postgresql://sdip@db/optuna")
    with pytest.raises(UserError) as caught:
        resolve_storage("postgresql://sdip:s3cret@127.0.0.1:1/optuna")
    assert "postgresql://sdip:***@127.0.0.1:1/optuna" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_heartbeat_is_a_no_op_without_heartbeats():
    study = optuna.create_study(storage=resolve_storage("memory"))
    trial = study.ask()
    with heartbeat(study, [trial]):
        pass
    fail_stale(study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres").url("optuna")


def test_the_trial_of_a_killed_worker_fails_after_the_grace_period(shared_url: str):
    storage = resolve_storage(shared_url, heartbeat_interval=INTERVAL_S, grace_period=GRACE_S)
    name = f"killed-{uuid.uuid4().hex}"  # the PostgreSQL database lives for the whole session
    study = optuna.create_study(study_name=name, storage=storage)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, shared_url, str(INTERVAL_S), name],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        number = int(worker.stdout.readline())
        time.sleep(GRACE_S + 2 * INTERVAL_S)
        fail_stale(study)  # alive: its heartbeats keep the trial running past the grace period
        assert study.trials[number].state == optuna.trial.TrialState.RUNNING
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    time.sleep(GRACE_S + INTERVAL_S)
    fail_stale(study)
    assert study.trials[number].state == optuna.trial.TrialState.FAIL
