"""Servers the cluster tests start on loopback for the session, and stop at its end.

- :func:`slurm`: a one-node SLURM cluster from Debian's packages: ``munged`` with its own key and
  socket, ``slurmctld`` and ``slurmd`` with a minimal slurm.conf (this host as ``localhost`` on
  127.0.0.1, its CPUs, no cgroups, no accounting database), all under a temporary folder on free
  ports. ``SLURM_CONF`` points the clients (sbatch, squeue, submitit) at it.
- :func:`postgres`: a PostgreSQL cluster made by ``initdb`` (as the ``postgres`` user when the
  tests run as root, since the server refuses root), password authentication on 127.0.0.1, a
  random password handed to clients only through ``PGPASSWORD``, as docs/cluster.md advises.
- :func:`mlflow_server`: ``mlflow server`` with its backend store on that PostgreSQL server and
  an artifact folder.

A missing package skips the tests that need it, with the command that installs it
(``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_PACKAGES = "apt-get install slurmctld slurmd slurm-client munge"
POSTGRES_PACKAGES = "apt-get install postgresql"
START_TIMEOUT_S = 60
MLFLOW_TIMEOUT_S = 180
"""The MLflow server migrates a fresh database's schema first: tens of seconds on 2 cores."""
STOP_TIMEOUT_S = 5
"""Test servers get SIGKILL after this: the MLflow server's graceful shutdown can wait 20 s."""
DB_USER = "sdip"
NODE = "localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, ready, process: subprocess.Popen | None, log: Path, timeout: float):
    """Poll ``ready()`` until it is true; fail with the log's tail if ``process`` dies or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.3)


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""


def stop(process: subprocess.Popen) -> None:
    """End a server this module started (its own process group) and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@dataclass(frozen=True)
class Slurm:
    conf: Path
    folder: Path


SLURM_CONF = """\
ClusterName=sdiptest
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """A one-node SLURM cluster on loopback (module docstring); sets ``SLURM_CONF``."""
    daemons = {name: _which(name) for name in ("munged", "slurmctld", "slurmd", "sbatch")}
    missing = [name for name, path in daemons.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: {SLURM_PACKAGES}")
    folder = Path(tempfile.mkdtemp(prefix="sdip-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            node=NODE,
            user=pwd.getpwuid(os.getuid()).pw_name,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            folder=folder,
            cpus=os.cpu_count(),
            memory_mb=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20 // 2,
        )
    )
    socket_path = folder / "munge.socket"
    processes = [
        start(
            [
                daemons["munged"],
                "--foreground",
                "--force",  # as root: munged refuses it without
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={folder / 'munged.pid'}",
                f"--log-file={folder / 'munged.log'}",
                f"--seed-file={folder / 'munged.seed'}",
            ],
            folder / "munged.out",
        )
    ]
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        wait_for("munged", socket_path.exists, processes[0], folder / "munged.log", START_TIMEOUT_S)
        processes.append(
            start([daemons["slurmctld"], "-D", "-i", "-f", str(conf)], folder / "slurmctld.out")
        )
        processes.append(
            start([daemons["slurmd"], "-D", "-N", NODE, "-f", str(conf)], folder / "slurmd.out")
        )

        def idle() -> bool:
            done = subprocess.run(
                ["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True
            )
            return done.returncode == 0 and done.stdout.strip() == "idle"

        wait_for("slurmd", idle, processes[2], folder / "slurmd.log", START_TIMEOUT_S)
        yield Slurm(conf, folder)
    finally:
        subprocess.run(["scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}"], check=False)
        for process in reversed(processes):
            stop(process)
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def url(self, database: str) -> str:
        """A URL without the password: clients read it from ``PGPASSWORD``."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 with databases ``optuna`` and ``mlflow``; sets
    ``PGPASSWORD`` (module docstring)."""
    tools = {name: _postgres_bin(name) for name in ("initdb", "pg_ctl")}
    if None in tools.values():
        pytest.skip(f"PostgreSQL server not installed: {POSTGRES_PACKAGES}")
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install -e '.[cluster]'")
    import psycopg

    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="sdip-postgres-"))
    if os.getuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"no postgres user to run the server as: {POSTGRES_PACKAGES}")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_hex(16)
    password_file = folder / "password"
    password_file.write_text(password)
    if as_user:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    data = folder / "data"
    subprocess.run(
        [
            *as_user,
            tools["initdb"],
            f"--pgdata={data}",
            f"--username={DB_USER}",
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    password_file.unlink()
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    ctl = [*as_user, tools["pg_ctl"], f"--pgdata={data}"]
    subprocess.run(
        [*ctl, "--wait", f"--log={folder / 'server.log'}", "-o", options, "start"],
        check=True,
        capture_output=True,
    )
    before = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = password
    try:
        server = Postgres(port, password)
        with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
            for database in ("optuna", "mlflow"):
                connection.execute(f"CREATE DATABASE {database}")
        yield server
    finally:
        subprocess.run([*ctl, "--mode=fast", "stop"], check=False, capture_output=True)
        if before is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = before
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres) -> Iterator[str]:
    """The URL of an ``mlflow server`` backed by :func:`postgres`, artifacts in a folder."""
    folder = Path(tempfile.mkdtemp(prefix="sdip-mlflow-"))
    port = free_port()
    log = folder / "server.log"
    mlflow = Path(sys.executable).parent / "mlflow"
    process = start(
        [
            str(mlflow),
            "server",
            f"--backend-store-uri={postgres.url('mlflow')}",
            f"--artifacts-destination={folder / 'artifacts'}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        wait_for("mlflow server", healthy, process, log, MLFLOW_TIMEOUT_S)
        yield url
    finally:
        stop(process)
        shutil.rmtree(folder, ignore_errors=True)
