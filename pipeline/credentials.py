"""Credentials never leave the environment: a database or tracking URL is shown, logged and
recorded with its password replaced (Optuna storages, MLflow stores, SLURM jobs).

Passwords come from the environment or a file (``PGPASSWORD``, ``~/.pgpass``, ``PGPASSFILE``,
``MLFLOW_TRACKING_PASSWORD``), never from params.yaml; a URL that carries one anyway is redacted
wherever this project prints it.
"""

from __future__ import annotations


def redact(url: str) -> str:
    """``url`` without its password (``postgresql://user:***@host/db``); other URLs as they are."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (``user:password@host``)."""
    return redact(url) != url
