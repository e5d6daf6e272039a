"""Where Optuna studies live: a storage from its URL, and heartbeats for studies that are shared.

URLs (:func:`resolve_storage`): none for ``sqlite:///<repo>/optuna.db``; ``memory`` for a
throw-away study; ``journal:PATH`` for a journal file that worker processes on one machine share
(file locks, no server); any other URL (``sqlite:///…``, ``postgresql://user@host/db``) is a
relational database, the storage for workers on several machines (docs/cluster.md).

A relational storage records a heartbeat of every running trial every
:data:`HEARTBEAT_INTERVAL_S` seconds. A trial whose heartbeat is older than
:data:`GRACE_PERIOD_S` belongs to a worker that died (killed by SLURM, out of memory, node lost):
:func:`fail_stale` marks it FAIL, so it is neither left RUNNING forever nor counted as a result.
``study.optimize`` does both by itself; a loop of ``study.ask``/``study.tell`` calls
:func:`fail_stale` before it asks and runs each fit inside :func:`heartbeat`.

Credentials never go into a URL that is written anywhere: PostgreSQL's client library reads the
password from ``PGPASSWORD``, the file ``PGPASSFILE`` or ``~/.pgpass``, so the URL names only the
user, host and database. :func:`redact` hides a password that a URL does carry wherever it is
shown.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from sqlalchemy.exc import SQLAlchemyError

from pipeline.credentials import redact
from pipeline.errors import UserError
from pipeline.tracking import repo_root

STORAGE_FILE = "optuna.db"
JOURNAL_PREFIX = "journal:"
MEMORY = "memory"
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180
"""Optuna's advice: a grace period of a few heartbeat intervals, so that a busy database or a
long garbage collection does not fail a live trial."""


class HeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's relational storage with heartbeats; printed as its URL without the password
    (the stages record ``str(storage)`` in their outputs and MLflow tags)."""

    def __str__(self) -> str:
        return redact(self.url)


def default_storage(root: Path | None = None) -> str:
    """``sqlite:///<repo>/optuna.db``, absolute so that DVC experiment workspaces share it."""
    return f"sqlite:///{(root or repo_root()) / STORAGE_FILE}"


def resolve_storage(
    url: str | None,
    root: Path | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    grace_period: int = GRACE_PERIOD_S,
) -> BaseStorage:
    """A storage for :func:`pipeline.tuning.open_study` from its URL (module docstring).

    A relational URL gives a :class:`HeartbeatStorage` (tables created on first use); a
    database that cannot be reached, or a missing driver, is a :class:`UserError` that shows
    the URL without its password.
    """
    if url == MEMORY:
        return optuna.storages.InMemoryStorage()
    if url is not None and url.startswith(JOURNAL_PREFIX):
        path_text = url[len(JOURNAL_PREFIX) :]
        path_text = path_text[2:] if path_text.startswith("//") else path_text
        if not path_text:
            raise UserError(f"journal storage {url!r} names no file (journal:PATH)")
        path = Path(path_text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.journal.JournalStorage(backend)
    url = url or default_storage(root)
    try:
        with _quiet_experimental():
            return HeartbeatStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period
            )
    except (ImportError, ValueError, SQLAlchemyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot open Optuna storage {redact(url)}: {redact(reason)}") from err


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Optuna labels heartbeats experimental (since 2.9); a warning on every study would tell
    the user nothing they could act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def fail_stale(study: optuna.Study) -> None:
    """Mark FAIL the running trials of ``study`` whose heartbeat is older than the grace period
    (their worker died); a no-op for storages without heartbeats."""
    with _quiet_experimental():
        optuna.storages.fail_stale_trials(study)


@contextmanager
def heartbeat(study: optuna.Study, trials: list[optuna.Trial]) -> Iterator[None]:
    """Record the heartbeat of each of ``trials`` every interval, from a daemon thread, while
    the body runs (one fit, or one batched pass of several); a no-op without heartbeats.

    The thread is a daemon so that a worker that dies takes it along: its trials' heartbeats
    stop, and after the grace period :func:`fail_stale` fails them.
    """
    storage = study._storage  # Optuna wraps a HeartbeatStorage in a cache that forwards heartbeats
    interval_of = getattr(storage, "get_heartbeat_interval", None)
    interval = interval_of() if interval_of is not None else None
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
