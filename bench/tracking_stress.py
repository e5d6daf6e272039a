"""Many processes logging fits to one SQLite MLflow store at once (docs/tracking.md).

Each of ``--processes`` workers logs one run folder of ``--steps`` measured iterations ×
``--curves`` curves (``sdip relog``'s code path, :func:`pipeline.tracking.relog_folders`) into
one new store, all started together; ``--retry-s`` sets how long a worker retries a locked store
(:data:`pipeline.tracking.LOCK_RETRY_S`; 0: MLflow's own 20 s busy timeout only). Prints one
JSON line: wall time, failed workers (with their error's last line), runs FINISHED, values
expected and found, and how long all workers were logging at the same time.

    python -m bench.tracking_stress --processes 8 --steps 3000 --curves 13
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.results import CURVES_FILE, SUMMARY_FILE, write_curves, write_json

WORKER = (
    "import sys; from pathlib import Path; from pipeline import tracking; "
    "tracking.LOCK_RETRY_S = float(sys.argv[1]); "
    "tracking.relog_folders([tracking.RunFolder.read(Path(sys.argv[2]))])"
)


def run_folder(folder: Path, index: int, steps: int, curves: int) -> None:
    """A synthetic fit: seeded random curves, the summary keys a run folder needs."""
    rng = np.random.default_rng(index)
    values = {f"curve_{c}": rng.random(steps) for c in range(curves)}
    folder.mkdir(parents=True)
    write_curves(folder / CURVES_FILE, {"iteration": np.arange(steps), **values})
    summary = {
        "task": "stress",
        "variant": "default",
        "image": f"image{index}",
        "method": "dip",
        "settings": {"seed": index},
        "iterations_run": steps,
    }
    write_json(folder / SUMMARY_FILE, summary)


def log_at_once(
    command: list[str], folders: list[Path], cwd: Path, uri: str
) -> list[tuple[int, str, str]]:
    """Start ``command FOLDER`` for every folder at once (working directory ``cwd``, store
    ``uri``), wait for all; return each one's exit status, stdout and stderr."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [*command, str(folder)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    outputs = [worker.communicate() for worker in workers]
    return [(w.returncode, out, err) for w, (out, err) in zip(workers, outputs, strict=True)]


def last_error(stderr: str) -> str:
    """The last line of a traceback that names an error."""
    lines = stderr.strip().splitlines() or [""]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--curves", type=int, default=4)
    parser.add_argument("--retry-s", type=float, default=60.0)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        folders = [root / "runs" / str(i) for i in range(args.processes)]
        for index, folder in enumerate(folders):
            run_folder(folder, index, args.steps, args.curves)
        start = time.monotonic()
        command = [sys.executable, "-c", WORKER, str(args.retry_s)]
        done = log_at_once(command, folders, root, uri)
        wall = time.monotonic() - start
        failed = [last_error(err) for code, _, err in done if code]
        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name("stress")
        runs = [] if experiment is None else mlflow.search_runs([experiment.experiment_id])
        fits = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        found = sum(
            len(mlflow.get_metric_history(r.info.run_id, f"curve_{c}"))
            for r in fits
            for c in range(args.curves)
        )
        starts = [r.info.start_time for r in fits]
        ends = [r.info.end_time or r.info.start_time for r in fits]
        together = (min(ends) - max(starts)) / 1000 if fits else 0.0
    print(
        json.dumps(
            {
                **vars(args),
                "wall_s": round(wall, 1),
                "failed": failed,
                "finished": sum(r.info.status == "FINISHED" for r in fits),
                "values_expected": args.processes * args.steps * args.curves,
                "values_found": found,
                "all_logging_together_s": round(max(together, 0.0), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
