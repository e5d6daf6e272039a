"""The per-task tables and the headline metrics: every cell against the numbers the hand-made runs
were built with (per image) and means taken here by a plain loop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluation import evaluation_frame
from pipeline.tables import (
    headline_metrics,
    markdown,
    read_csv,
    task_table,
    write_csv,
    write_metrics,
)
from tests.run_folders import denoising_problem, hand_curves, write_run

EVERY, ROWS = 3, 10
METHODS = ["dip", "lipschitz", "gaussian"]
# (variant, image, method) → (PSNR at the peak, at the ratio stop, at the end, stop row or None).
# Two variants; sigma25 has two images, of which the second has no lipschitz fit.
FITS = {
    ("sigma25", "astronaut", "dip"): (25.0, 24.5, 22.5, 4),
    ("sigma25", "astronaut", "lipschitz"): (25.5, 25.25, 25.0, 7),
    ("sigma25", "astronaut", "gaussian"): (25.25, 25.0, 24.75, None),
    ("sigma25", "coffee", "dip"): (27.0, 26.0, 23.5, 5),
    ("sigma25", "coffee", "gaussian"): (26.5, 26.25, 26.4, 6),
    ("sigma50", "astronaut", "dip"): (21.0, 20.75, 18.0, 8),
}
PUBLISHED = {
    "sigma25": {
        "bundled": {"mean": {"DIP": 31.29, "BM3D": 31.42}, "images": {"astronaut": 30.0}},
    },
}


def expected_cells(variant: str, image: str, method: str) -> dict[str, float | int | None]:
    peak, stop, final, row = FITS[(variant, image, method)]
    return {
        "psnr_ratio": final if row is None else stop,
        "psnr_final": final,
        "psnr_oracle": peak,
        "ratio_iteration": None if row is None else row * EVERY,
    }


def mean_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@pytest.fixture
def fits(tmp_path, astronaut_64):
    """The tidy frame of ``FITS`` as the aggregate stage reads it (through evaluation.csv)."""
    problem = denoising_problem(tmp_path / "source", astronaut_64)
    for (variant, image, method), (peak, stop, final, row) in FITS.items():
        psnr = [peak - 3.0] * ROWS
        psnr[2], psnr[-1] = peak, final
        if row is not None:
            psnr[row] = stop
        key = ("denoising", variant, image, method)
        stop_at = None if row is None else row * EVERY
        write_run(tmp_path / "runs", key, problem, hand_curves(psnr, EVERY), stop_at)
    write_csv(tmp_path / "evaluation.csv", evaluation_frame(tmp_path / "runs"))
    return read_csv(tmp_path / "evaluation.csv")


def test_task_table_rows_and_means(fits):
    table = task_table(fits, METHODS, PUBLISHED, "dip")
    rows = [(r["variant"], r["set"], r["image"]) for _, r in table.iterrows()]
    assert rows == [
        ("sigma25", "bundled", "astronaut"),
        ("sigma25", "bundled", "coffee"),
        ("sigma25", "bundled", "mean"),
        ("sigma50", "bundled", "astronaut"),
        ("sigma50", "bundled", "mean"),
    ]
    metrics = ["psnr_ratio", "psnr_final", "psnr_oracle", "ratio_iteration"]
    assert list(table.columns) == [
        "variant",
        "set",
        "image",
        *(f"{m}.{metric}" for m in METHODS for metric in metrics),
        "protocol",
        "published_DIP",
        "dip_oracle_minus_published",
        "published_other",
    ]
    for _, line in table.iterrows():
        variant, image = line["variant"], line["image"]
        images = sorted({i for v, i, _ in FITS if v == variant}) if image == "mean" else [image]
        for method in METHODS:
            cells = [
                expected_cells(variant, i, method) for i in images if (variant, i, method) in FITS
            ]
            for metric in metrics:
                value = line[f"{method}.{metric}"]
                expected = mean_of([c[metric] for c in cells])
                if metric == "ratio_iteration" and expected is not None:
                    expected = round(expected)  # half to even, as Python rounds
                if expected is None:
                    assert pd.isna(value), (variant, image, method, metric)
                else:
                    assert value == pytest.approx(expected), (variant, image, method, metric)
        assert line["protocol"] == "rgb"
    # The means that the literal data make: the dip stops at 12 and 15 → 13.5 → 14 (half to even),
    # the lipschitz mean is its one fit, the gaussian stop mean skips the fit that never stopped.
    mean = table.iloc[2]
    assert mean["dip.ratio_iteration"] == 14 and mean["dip.psnr_ratio"] == pytest.approx(25.25)
    assert mean["lipschitz.psnr_final"] == 25.0 and mean["gaussian.ratio_iteration"] == 18
    assert mean["gaussian.psnr_ratio"] == pytest.approx((24.75 + 26.25) / 2)
    assert table.loc[0, "published_DIP"] == 30.0
    assert table.loc[0, "dip_oracle_minus_published"] == pytest.approx(25.0 - 30.0)
    assert table.loc[2, "published_DIP"] == 31.29
    assert table.loc[2, "dip_oracle_minus_published"] == pytest.approx(26.0 - 31.29)
    assert table.loc[2, "published_other"] == "BM3D 31.42"
    for row in (1, 3, 4):  # coffee and sigma50 have no published number
        assert pd.isna(table.loc[row, "published_DIP"])
        assert pd.isna(table.loc[row, "published_other"])
    assert pd.isna(table.loc[0, "published_other"])


def test_table_files(fits, tmp_path):
    table = task_table(fits, METHODS, PUBLISHED, "dip")
    write_csv(tmp_path / "denoising.csv", table)
    with open(tmp_path / "denoising.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    mean = lines[2]
    # 4 decimals; an iteration as a whole number; a missing value empty.
    assert mean["dip.psnr_ratio"] == "25.2500" and mean["dip.ratio_iteration"] == "14"
    assert mean["published_DIP"] == "31.2900" and mean["published_other"] == "BM3D 31.42"
    assert lines[0]["gaussian.ratio_iteration"] == "" and lines[0]["published_other"] == ""
    assert lines[1]["lipschitz.psnr_oracle"] == ""
    text = markdown(table)
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    header = [cell.strip() for cell in text.splitlines()[0].strip("|").split("|")]
    cells = dict(zip(header, body[2], strict=True))
    # 2 decimals; an iteration as a whole number; a missing value "—".
    assert cells["dip.psnr_ratio"] == "25.25" and cells["dip.ratio_iteration"] == "14"
    assert cells["dip_oracle_minus_published"] == f"{26.0 - 31.29:.2f}" == "-5.29"
    assert dict(zip(header, body[1], strict=True))["lipschitz.psnr_final"] == "—"


def test_headline_metrics(fits, tmp_path):
    metrics = headline_metrics(fits)
    expected: dict = {}
    for variant, image, method in FITS:
        expected.setdefault(f"denoising-{variant}", {}).setdefault(method, []).append(
            expected_cells(variant, image, method)
        )
    for group in expected.values():
        for method, cells in group.items():
            means = {name: mean_of([c[name] for c in cells]) for name in cells[0]}
            it = means["ratio_iteration"]
            group[method] = {
                **{k: round(v, 4) for k, v in means.items() if k != "ratio_iteration"},
                "ratio_iteration": None if it is None else round(it),
            }
    assert metrics == expected
    assert metrics["denoising-sigma25"]["dip"] == {
        "psnr_ratio": 25.25,
        "psnr_final": 23.0,
        "psnr_oracle": 26.0,
        "ratio_iteration": 14,
    }
    assert metrics["denoising-sigma25"]["gaussian"]["ratio_iteration"] == 18
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "denoising-sigma15.json").write_text("{}")  # a variant no longer fitted
    write_metrics(folder, metrics)
    assert sorted(p.name for p in folder.iterdir()) == [
        "denoising-sigma25.json",
        "denoising-sigma50.json",
    ]
    assert json.loads(Path(folder / "denoising-sigma50.json").read_text()) == {
        "dip": {"psnr_ratio": 20.75, "psnr_final": 18.0, "psnr_oracle": 21.0, "ratio_iteration": 24}
    }
