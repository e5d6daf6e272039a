"""``sdip aggregate``: per-task tables beside the published numbers, the phenomena check, figures.

Reads ``aggregate``, ``sweeps`` and ``evaluate`` from params.yaml, ``results/evaluation.csv``,
``results/fbc.csv``, the sweep runs and ``dataset/published.yaml``. Writes
``results/tables/<task>.{csv,md}``, ``results/phenomena.{json,md}`` and
``results/figures/{lambda_sweep,sigma_sweep,automatic_stop-*,restorations}.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.evaluation import rule_stops, stopping_of
from pipeline.figures import automatic_stop, restoration_grid, sweep
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import FIGURES, RESULTS, TABLES, run_dir, sweep_dir
from pipeline.results import CURVES_FILE, SUMMARY_FILE, read_curves, write_json
from pipeline.settings import load_params, load_yaml, section
from pipeline.tables import markdown, read_csv, write_csv
from pipeline.tracking import stage_run

PUBLISHED = Path("dataset") / "published.yaml"
SUMMARY_EXPERIMENT = "summary"
TABLE_METRICS = ("psnr_ratio", "psnr_final", "psnr_oracle", "ratio_iteration")


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def task_table(
    rows: list[dict[str, str]], methods: list[str], published: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per (variant, set, image) and a mean row per (variant, set): each method's PSNR at
    the ratio stop, at the budget and at the oracle peak, its stop iteration, and the published
    DIP number with our DIP baseline's oracle PSNR minus it."""
    table: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[str, dict[str, dict[str, str]]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["set"]), {}).setdefault(row["image"], {})[
            row["method"]
        ] = row
    for (variant, image_set), images in sorted(groups.items()):
        ref = published.get(variant, {}).get(image_set, {})
        for image, by_method in sorted(images.items()):
            line: dict[str, Any] = {"variant": variant, "set": image_set, "image": image}
            for method in methods:
                for metric in TABLE_METRICS:
                    value = _float(by_method.get(method, {}).get(metric, ""))
                    if metric.endswith("_iteration") and value is not None:
                        value = int(value)
                    line[f"{method}.{metric}"] = value
            line["protocol"] = next(iter(by_method.values()))["protocol"]
            line["published_DIP"] = ref.get("images", {}).get(image)
            table.append(line)
        mine = [line for line in table if (line["variant"], line["set"]) == (variant, image_set)]
        mean: dict[str, Any] = {
            "variant": variant,
            "set": image_set,
            "image": "mean",
            "protocol": mine[0]["protocol"],
        }
        for key in mine[0]:
            if "." in key:
                values = [line[key] for line in mine if line[key] is not None]
                mean[key] = float(np.mean(values)) if values else None
                if key.endswith("_iteration") and mean[key] is not None:
                    mean[key] = round(mean[key])
        mean["published_DIP"] = ref.get("mean", {}).get("DIP")
        mean["published_other"] = (
            ", ".join(
                f"{name} {value}" for name, value in ref.get("mean", {}).items() if name != "DIP"
            )
            or None
        )
        table.append(mean)
    for line in table:
        ours = line.get("dip.psnr_oracle")
        line["dip_oracle_minus_published"] = (
            None
            if ours is None or line.get("published_DIP") is None
            else ours - line["published_DIP"]
        )
    return table


def phenomena(
    evaluation: list[dict[str, str]], fbc: list[dict[str, str]], settings: dict[str, Any]
) -> dict[str, Any]:
    """The paper's phenomena, measured on ``settings['task']``: the baseline decays from its peak,
    the Lipschitz method does not, the ratio rule stops early near the peak, and FBC band 1 reaches
    0.9 before the highest band."""
    task, base, controlled = settings["task"], settings["baseline"], settings["controlled"]
    rows = [r for r in evaluation if r["task"] == task]
    drop = {
        m: [float(r["drop_from_peak"]) for r in rows if r["method"] == m]
        for m in (base, controlled)
    }
    stops = [r for r in rows if r["method"] == controlled]
    early = [
        r["ratio_iteration"] != "" and int(r["ratio_iteration"]) < int(r["budget"]) for r in stops
    ]
    gaps = [float(r["stop_gap"]) for r in stops]
    bands = (
        sorted({int(k[4 : k.index("_")]) for k in fbc[0] if k.startswith("band")}) if fbc else [1]
    )
    order = []
    for r in (r for r in fbc if r["task"] == task and r["method"] == base):
        low, high = _float(r["band1_reaches_0.9"]), _float(f"{r[f'band{bands[-1]}_reaches_0.9']}")
        order.append(low is not None and (high is None or low < high))
    result = {
        "task": task,
        "controlled": controlled,
        "drop_db_by_method": {
            m: float(np.mean([float(r["drop_from_peak"]) for r in rows if r["method"] == m]))
            for m in sorted({r["method"] for r in rows})
        },
        "baseline_drop_db": float(np.mean(drop[base])) if drop[base] else None,
        "controlled_drop_db": float(np.mean(drop[controlled])) if drop[controlled] else None,
        "ratio_stops_before_budget": f"{sum(early)}/{len(early)}",
        "ratio_stop_gap_db": float(np.mean(gaps)) if gaps else None,
        "fbc_low_band_first": f"{sum(order)}/{len(order)}",
    }
    result["checks"] = {
        f"baseline falls >= {settings['min_baseline_drop']} dB below its peak": bool(
            result["baseline_drop_db"] is not None
            and result["baseline_drop_db"] >= settings["min_baseline_drop"]
        ),
        f"{controlled} falls <= {settings['max_controlled_drop']} dB below its peak": bool(
            result["controlled_drop_db"] is not None
            and result["controlled_drop_db"] <= settings["max_controlled_drop"]
        ),
        "ratio rule stops before the budget": bool(early) and all(early),
        f"ratio stop within {settings['max_stop_gap']} dB of the oracle peak": bool(gaps)
        and max(gaps) <= settings["max_stop_gap"],
        "FBC band 1 reaches 0.9 before the highest band": bool(order) and all(order),
    }
    return result


def _sweep_figures(params: dict[str, Any]) -> None:
    sweeps = section(params, "sweeps")
    for kind, label in (("lam", "λ"), ("gauss_sigma", "σ")):
        series = {}
        for value in sweeps.get(kind, []):
            path = sweep_dir(kind, value) / CURVES_FILE
            if path.is_file():
                series[str(value)] = read_curves(path)
        if series:
            name = "lambda_sweep" if kind == "lam" else "sigma_sweep"
            title = f"{sweeps['task']} {sweeps['image']}: PSNR vs iteration, {label} sweep"
            sweep(series, label, title, FIGURES / f"{name}.png")


@click.command("aggregate")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def aggregate_command(params_file: str, track: bool) -> None:
    """Write the per-task tables, the phenomena check and the summary figures."""
    params = load_params(params_file)
    settings = section(params, "aggregate")
    methods = list(section(params, "methods"))
    evaluation = read_csv(RESULTS / "evaluation.csv")
    fbc = read_csv(RESULTS / "fbc.csv")
    published = load_yaml(PUBLISHED)
    report = []
    for task in sorted({r["task"] for r in evaluation}):
        table = task_table(
            [r for r in evaluation if r["task"] == task], methods, published.get(task, {})
        )
        write_csv(TABLES / f"{task}.csv", table)
        text = markdown(table, list(table[0]))
        write_bytes_atomic(TABLES / f"{task}.md", text.encode())
        report.append(f"## {task}\n\n{text}")
    found = phenomena(evaluation, fbc, settings["phenomena"])
    write_json(RESULTS / "phenomena.json", found)
    lines = [f"- [{'x' if ok else ' '}] {name}" for name, ok in found["checks"].items()]
    summary = {k: v for k, v in found.items() if k != "checks"}
    phenomena_text = (
        "\n".join(lines) + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) + "\n"
    )
    write_bytes_atomic(RESULTS / "phenomena.md", phenomena_text.encode())
    _sweep_figures(params)
    grid = []
    for task in sorted({r["task"] for r in evaluation}):
        row = next(
            r for r in evaluation if r["task"] == task and r["method"] == settings["grid_method"]
        )
        folder = run_dir(task, row["variant"], row["image"], row["method"])
        grid.append(
            (
                f"{task} {row['variant']}",
                folder / "observation.png",
                folder / "restored_stop.png",
                folder / "clean.png",
            )
        )
        if task == settings["phenomena"]["task"]:
            # The stop is shown for the method whose stop the phenomena check judges.
            stopped = next(
                r
                for r in evaluation
                if r["task"] == task and r["method"] == settings["phenomena"]["controlled"]
            )
            run = run_dir(task, stopped["variant"], stopped["image"], stopped["method"])
            curves = read_curves(run / CURVES_FILE)
            summary = json.loads((run / SUMMARY_FILE).read_text())
            automatic_stop(
                curves,
                rule_stops(curves, stopping_of(summary))["ratio"],
                f"{task} {stopped['image']} ({stopped['method']}): ratio rule stop",
                FIGURES / "automatic_stop.png",
            )
    restoration_grid(grid, FIGURES / "restorations.png")
    if track:
        tags = {"profile": params.get("profile", "custom"), "dvc_stage": "aggregate"}
        with stage_run(SUMMARY_EXPERIMENT, "aggregate", tags) as (mlflow, _, run_id):
            for path in sorted(FIGURES.rglob("*.png")):
                folder = path.parent.relative_to(RESULTS).as_posix()
                mlflow.log_artifact(run_id, str(path), folder)
            for path in sorted(TABLES.glob("*")):
                mlflow.log_artifact(run_id, str(path), "tables")
            mlflow.log_artifact(run_id, str(RESULTS / "phenomena.md"))
    click.echo("\n".join(report))
    click.echo("Phenomena (" + found["task"] + "):\n" + phenomena_text)
