"""End to end: the real dvc.yaml in a temporary git+DVC repository, on the real profile shrunk.

One pass exercises everything a user relies on: outputs exist and are well formed, a second
``dvc repro`` runs nothing, changing one task's parameter reruns only that task's fits (and the
summaries), and the MLflow store holds one run per fit with curves of the expected length.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import (
    ITERATIONS,
    make_repo,
    needs_dvc,
    params_of,
    ran_stages,
    run,
    shrunk_params,
)

pytestmark = needs_dvc


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def headline_means(evaluation: list[dict[str, str]]) -> dict:
    """Per task variant and method, the means of evaluation.csv's columns that make the headline
    metrics (the stop iteration over the fits whose rule fired, rounded half to even)."""
    groups: dict = {}
    for row in evaluation:
        group = groups.setdefault(f"{row['task']}-{row['variant']}", {})
        group.setdefault(row["method"], []).append(row)
    for group in groups.values():
        for method, rows in group.items():
            values = {
                name: round(mean([float(r[name]) for r in rows]), 4)
                for name in ("psnr_ratio", "psnr_final", "psnr_oracle")
            }
            stops = mean([int(r["ratio_iteration"]) for r in rows if r["ratio_iteration"]])
            group[method] = {**values, "ratio_iteration": None if stops is None else round(stops)}
    return groups


def phenomena_by_loops(
    evaluation: list[dict[str, str]], fbc: list[dict[str, str]], settings: dict
) -> dict:
    """The phenomena check of the run, recomputed from its CSV files by plain loops."""
    task, base, controlled = settings["task"], settings["baseline"], settings["controlled"]
    rows = [r for r in evaluation if r["task"] == task]
    drops: dict[str, list[float]] = {}
    for r in rows:
        drops.setdefault(r["method"], []).append(float(r["drop_from_peak"]))
    stops = [r for r in rows if r["method"] == controlled]
    early = [
        r["ratio_iteration"] != "" and int(r["ratio_iteration"]) < int(r["budget"]) for r in stops
    ]
    gaps = [float(r["stop_gap"]) for r in stops]
    highest = max(int(name[4 : name.index("_")]) for name in fbc[0] if name.startswith("band"))
    order = []
    for r in fbc:
        if r["task"] == task and r["method"] == base:
            low, high = r["band1_reaches_0.9"], r[f"band{highest}_reaches_0.9"]
            order.append(low != "" and (high == "" or int(low) < int(high)))
    base_drop, controlled_drop = mean(drops.get(base, [])), mean(drops.get(controlled, []))
    return {
        "task": task,
        "controlled": controlled,
        "drop_db_by_method": {m: mean(v) for m, v in sorted(drops.items())},
        "baseline_drop_db": base_drop,
        "controlled_drop_db": controlled_drop,
        "ratio_stops_before_budget": f"{sum(early)}/{len(early)}",
        "ratio_stop_gap_db": mean(gaps),
        "fbc_low_band_first": f"{sum(order)}/{len(order)}",
        "checks": {
            f"baseline falls >= {settings['min_baseline_drop']} dB below its peak": base_drop
            is not None
            and base_drop >= settings["min_baseline_drop"],
            f"{controlled} falls <= {settings['max_controlled_drop']} dB below its peak": (
                controlled_drop is not None and controlled_drop <= settings["max_controlled_drop"]
            ),
            "ratio rule stops before the budget": bool(early) and all(early),
            f"ratio stop within {settings['max_stop_gap']} dB of the oracle peak": bool(gaps)
            and max(gaps) <= settings["max_stop_gap"],
            "FBC band 1 reaches 0.9 before the highest band": bool(order) and all(order),
        },
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"), shrunk_params())


def test_repro_then_nothing_then_only_the_changed_task(repo: Path):
    first = run(["dvc", "repro"], repo)
    stages = ran_stages(first)
    assert {"prepare@denoising", "evaluate", "fbc", "aggregate"} <= stages
    fits = {s for s in stages if s.startswith("optimize_")}
    assert len(fits) == 5 * 3

    evaluation = read_rows(repo / "results" / "evaluation.csv")
    assert len(evaluation) == 15
    metrics = {
        path.stem: json.loads(path.read_text())
        for path in (repo / "results" / "metrics").glob("*.json")
    }
    assert metrics == headline_means(evaluation)
    assert set(metrics) == {
        "denoising-sigma25",
        "deblocking-quality10",
        "inpainting-default",
        "sr-factor4",
        "enhancement-default",
    }
    for task in ("denoising", "deblocking", "inpainting", "sr", "enhancement"):
        table = (repo / "results" / "tables" / f"{task}.md").read_text()
        assert re.search(r"\| mean +\|", table)
    for figure in ("lambda_sweep", "sigma_sweep", "automatic_stop", "restorations"):
        assert (repo / "results" / "figures" / f"{figure}.png").stat().st_size > 1000
    found = json.loads((repo / "results" / "phenomena.json").read_text())
    fbc = read_rows(repo / "results" / "fbc.csv")
    expected = phenomena_by_loops(evaluation, fbc, params_of(repo)["aggregate"]["phenomena"])
    assert found["checks"] == expected["checks"]
    assert found["drop_db_by_method"] == pytest.approx(expected["drop_db_by_method"])
    for name, value in expected.items():
        if isinstance(value, float):
            assert found[name] == pytest.approx(value), name
        elif not isinstance(value, dict):
            assert found[name] == value, name
    curves = (repo / "runs/denoising/sigma25/astronaut/dip/curves.csv").read_text().splitlines()
    assert len(curves) == 1 + ITERATIONS
    for value in ("0.5", "2.0"):  # the λ sweep's two values, fitted in one batched pass
        swept = (repo / "runs/sweeps/lam" / value / "curves.csv").read_text().splitlines()
        assert len(swept) == 1 + ITERATIONS
    assert "psnr_ratio" in run(["dvc", "metrics", "show"], repo)

    assert ran_stages(run(["dvc", "repro"], repo)) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tasks"]["deblocking"]["fit"]["lam"] = 0.8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = ran_stages(run(["dvc", "repro"], repo))
    fits_again = {s for s in again if s.startswith(("optimize_", "sweep_", "prepare"))}
    assert fits_again == {
        f"optimize_deblocking@10-camera-{m}" for m in ("dip", "lipschitz", "gaussian")
    }
    assert {"evaluate", "fbc", "aggregate"} <= again


def test_mlflow_holds_one_run_per_fit_with_full_curves(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("denoising")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # 3 methods on one image (a parent each), the λ sweep (one parent, two fits) and the σ sweep.
    assert (len(children), len(parents)) == (6, 5)
    child = next(r for r in children if r.data.params["method"] == "dip")
    for key in ("task", "image", "lam", "upsample", "width", "lr", "iterations", "seed"):
        assert key in child.data.params
    assert child.data.tags["profile"] == "cpu" and child.data.tags["git_commit"] != ""
    for name in ("loss", "psnr", "psnr_obs", "fbc_1", "fbc_5", "blur", "sharpness", "ratio"):
        history = client.get_metric_history(child.info.run_id, name)
        assert len(history) == ITERATIONS, name
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "restored_stop.png" in artifacts
