"""Where the pipeline keeps its files, relative to the repository root (the DVC outputs).

The data flow in one direction, one folder per step::

    data/prepared/<task>/<variant>/<image>/          prepare: frozen observation (observations.py)
    runs/<task>/<variant>/<image>/<method>/         optimize: one fit (results.py)
    runs/sweeps/<kind>/<value>/                     sweep: one member of a λ or σ sweep
    tuned/<task>/<variant>/<image>/                 tune: values.yaml, trials.csv, summary.json
    results/                                        fbc, evaluate, aggregate: tables and figures
    .checkpoints/<output>.pt                        a running fit's state (pipeline.checkpoint)
    jobs/                                           sdip launch: SLURM job logs, the launch record

Every stage and library function that names one of these folders asks this module for it.
"""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data") / "prepared"
RUNS = Path("runs")
SWEEPS = RUNS / "sweeps"
TUNED = Path("tuned")
RESULTS = Path("results")
FIGURES = RESULTS / "figures"
TABLES = RESULTS / "tables"
TUNED_VALUES = "values.yaml"
CHECKPOINTS = Path(".checkpoints")
CHECKPOINT_EVERY = 500
"""Iterations between two checkpoints unless params.yaml's ``checkpoints.every`` says otherwise."""
JOBS = Path("jobs")


def prepared_dir(task: str, variant: str, image: str, root: Path = PREPARED) -> Path:
    """The frozen observation of one image: ``data/prepared/<task>/<variant>/<image>``."""
    return root / task / variant / image


def run_dir(task: str, variant: str, image: str, method: str) -> Path:
    """One fit of the pipeline: ``runs/<task>/<variant>/<image>/<method>``."""
    return RUNS / task / variant / image / method


def sweep_dir(kind: str, value: object) -> Path:
    """One member of a sweep: ``runs/sweeps/<kind>/<value>`` (kind ``lam`` or ``gauss_sigma``)."""
    return SWEEPS / kind / str(value)


def tuned_dir(task: str, variant: str, image: str, root: Path = TUNED) -> Path:
    """One image's study outputs: ``tuned/<task>/<variant>/<image>``."""
    return root / task / variant / image


def tuned_values_path(task: str, variant: str, image: str, root: Path = TUNED) -> Path:
    """Where ``sdip tune`` writes, and a ``tuned`` setting reads, one image's tuned values."""
    return tuned_dir(task, variant, image, root) / TUNED_VALUES


def checkpoint_path(output: Path) -> Path:
    """Where the fits that write ``output`` keep their state while they run: beside the DVC
    outputs, never inside them (DVC empties a stage's outputs before it runs)."""
    return CHECKPOINTS / f"{output.as_posix().strip('/')}.pt"
