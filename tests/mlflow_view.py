"""What MLflow holds of a fit, read back for the tests: its runs, and the check that a run equals
the run folder it was logged from (every curve value, params, scalars, tag, images)."""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path

from pipeline.results import CURVES_FILE, SUMMARY_FILE

ARTIFACTS = {"observation.png", "restored_stop.png", "restored_final.png", "restored_best.png"}


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs_of(uri: str, experiment: str, deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    mlflow = mlflow_client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return list(mlflow.search_runs([found.experiment_id], run_view_type=view))


def fit_runs(uri: str, experiment: str = "denoising") -> list:
    return [r for r in runs_of(uri, experiment) if "mlflow.parentRunId" in r.data.tags]


def file_values(folder: Path) -> dict[str, dict[int, float]]:
    """Every measured value of ``curves.csv``, read with the csv module: name → step → value."""
    with open(folder / CURVES_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = [name for name in rows[0] if name != "iteration"]
    return {
        name: {int(row["iteration"]): float(row[name]) for row in rows if row[name] != ""}
        for name in names
    }


def artifact_paths(uri: str, run_id: str, folder: str | None = None) -> set[str]:
    """Every artifact file of a run (under ``folder``), by its path."""
    found: set[str] = set()
    for artifact in mlflow_client(uri).list_artifacts(run_id, folder):
        found |= artifact_paths(uri, run_id, artifact.path) if artifact.is_dir else {artifact.path}
    return found


def folder_digest(folder: Path) -> str:
    """The sha256 of the folder's summary.json followed by its curves.csv."""
    summary, curves = ((folder / name).read_bytes() for name in (SUMMARY_FILE, CURVES_FILE))
    return hashlib.sha256(summary + curves).hexdigest()


def assert_run_equals_folder(uri: str, run, folder: Path) -> None:
    """The run holds every value of the folder's curves.csv at its step, the summary's settings
    as params and its scalars as metrics, and byte-equal images."""
    mlflow = mlflow_client(uri)
    for name, expected in file_values(folder).items():
        history = mlflow.get_metric_history(run.info.run_id, name)
        assert {m.step: m.value for m in history} == expected, name
        assert len(history) == len(expected), name
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    degradation = (summary.get("observation") or {}).get("params") or {}
    expected_params = {key: str(value) for key, value in summary["settings"].items()}
    expected_params.update({f"degradation.{k}": str(v) for k, v in degradation.items()})
    expected_params.update({key: summary[key] for key in ("task", "variant", "image", "method")})
    assert run.data.params == expected_params
    scalars = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    assert {k: run.data.metrics[k] for k in scalars} == scalars
    assert run.data.tags["content_sha256"] == folder_digest(folder)
    present = artifact_paths(uri, run.info.run_id)
    assert present == {name for name in ARTIFACTS if (folder / name).exists()}
    with tempfile.TemporaryDirectory() as downloads:
        for name in present:
            copy = mlflow.download_artifacts(run.info.run_id, name, downloads)
            assert Path(copy).read_bytes() == (folder / name).read_bytes(), name
