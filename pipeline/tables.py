"""Tables from the tidy frame of fits (:func:`pipeline.evaluation.evaluation_frame`): the per-task
tables beside the published numbers and the headline metrics of ``dvc metrics show``.

CSV files carry 4 decimals, Markdown tables 2; a missing value is an empty CSV cell and "—" in
Markdown. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.evaluation import KEYS, iteration_columns
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import RESULTS
from pipeline.results import write_json

PUBLISHED = Path("dataset") / "published.yaml"
METRICS = RESULTS / "metrics"
"""One ``<task>-<variant>.json`` per task variant, so ``dvc metrics show`` has a row for each."""
TABLE_METRICS = ("psnr_ratio", "psnr_final", "psnr_oracle", "ratio_iteration")
"""Per method in the tables and the metrics: PSNR at the ratio stop, at the budget, at the oracle
peak, and the ratio stop's iteration."""
TEXT_COLUMNS = (*KEYS, "set", "protocol")
MEAN = "mean"
"""The image name of a table's mean rows."""


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    text = frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")
    write_bytes_atomic(path, text.encode())


def read_csv(path: Path) -> pd.DataFrame:
    """A frame written by :func:`write_csv`: text columns as text ("" where empty), iteration
    columns as integers."""
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    text = [c for c in TEXT_COLUMNS if c in frame.columns]
    frame[text] = frame[text].astype(object).fillna("").astype(str)
    return frame.astype({c: "Int64" for c in iteration_columns(frame)})


def markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    cells = frame.astype(object).where(frame.notna(), None)
    return cells.to_markdown(index=False, floatfmt=f".{digits}f", missingval="—") + "\n"


def group_means(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean of ``columns`` per group, over the values present; iteration columns rounded to
    whole iterations (half to even)."""
    means = frame.groupby(by, sort=True)[columns].mean()
    for column in iteration_columns(means):
        means[column] = means[column].round().astype("Int64")
    return means


def _published(reference: dict[str, Any], image: str) -> tuple[float | None, str | None]:
    """The published DIP number of an image (or, for the mean row, of the set) and, for the mean
    row, the other published methods as text."""
    if image != MEAN:
        return reference.get("images", {}).get(image), None
    means = reference.get("mean", {})
    others = ", ".join(f"{name} {value}" for name, value in means.items() if name != "DIP")
    return means.get("DIP"), others or None


def task_table(
    fits: pd.DataFrame, methods: list[str], published: dict[str, Any], baseline: str
) -> pd.DataFrame:
    """One task's table: a row per (variant, set, image) and, after them, a mean row per
    (variant, set) with each method's :data:`TABLE_METRICS` (columns ``<method>.<metric>``), the
    protocol, the published DIP number (docs/experiments.md) and our ``baseline``'s oracle PSNR
    minus it."""
    index = ["variant", "set", "image"]
    wide = fits.pivot(index=index, columns="method", values=list(TABLE_METRICS))
    order = [(metric, method) for method in methods for metric in TABLE_METRICS]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(order))
    wide.columns = [f"{method}.{metric}" for metric, method in order]
    # The pivot of float and integer columns holds objects: back to numbers.
    iterations = iteration_columns(wide)
    wide = wide.astype({c: "Int64" if c in iterations else float for c in wide.columns})
    wide = wide.reset_index()
    means = group_means(wide, ["variant", "set"], list(wide.columns[len(index) :])).reset_index()
    means["image"] = MEAN
    table = pd.concat([wide, means], ignore_index=True)
    table = table.sort_values(["variant", "set"], kind="stable", ignore_index=True)
    groups = fits.groupby(["variant", "set"])["protocol"].first()
    table["protocol"] = [groups[key] for key in zip(table.variant, table.set, strict=True)]
    found = [
        _published(published.get(variant, {}).get(image_set, {}), image)
        for variant, image_set, image in zip(table.variant, table.set, table.image, strict=True)
    ]
    table["published_DIP"] = pd.Series([dip for dip, _ in found], dtype=float)
    ours = table[f"{baseline}.psnr_oracle"] if baseline in methods else float("nan")
    table["dip_oracle_minus_published"] = ours - table["published_DIP"]
    table["published_other"] = [others for _, others in found]
    return table


def headline_metrics(fits: pd.DataFrame) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per ``<task>-<variant>``, per method, the mean of each of :data:`TABLE_METRICS` over the
    task variant's fits (PSNR to 4 decimals; the stop iteration over the fits whose rule fired,
    None if none did)."""
    means = group_means(fits, ["task", "variant", "method"], list(TABLE_METRICS))
    metrics: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for (task, variant, method), values in means.to_dict("index").items():
        metrics.setdefault(f"{task}-{variant}", {})[method] = {
            name: None if pd.isna(value) else round(value, 4) for name, value in values.items()
        }
    return metrics


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """One JSON file per entry of ``metrics``; files of entries no longer present are removed."""
    for name, values in metrics.items():
        write_json(folder / f"{name}.json", values)
    for stale in set(folder.glob("*.json")) - {folder / f"{name}.json" for name in metrics}:
        stale.unlink()
