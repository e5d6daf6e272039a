"""The phenomena check: each verdict true on one constructed set of runs and false on another, and
each measured value against a mean or count computed here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluation import evaluation_frame, fbc_frame
from pipeline.phenomena import phenomena, phenomena_markdown
from pipeline.settings import load_yaml
from pipeline.tables import read_csv, write_csv
from tests.run_folders import ROOT, denoising_problem, hand_curves, write_run

ROWS = 12
PEAK_ROW = 2


@dataclass(frozen=True)
class Fit:
    """A hand-made fit: PSNR ``peak`` at row 2, ``drop`` below it at the end, ``gap`` below it
    at the ratio stop (row ``stop``; None: the rule never fired, the stop is the end), and the
    first rows at which FBC bands 1 and 5 reach 0.9 (None: never)."""

    drop: float
    gap: float = 0.0
    stop: int | None = 7
    band1: int | None = 3
    band5: int | None = None
    peak: float = 25.0

    def curves(self, every: int) -> dict:
        psnr = [self.peak - 5.0] * ROWS
        psnr[PEAK_ROW] = self.peak
        psnr[-1] = self.peak - self.drop
        if self.stop is not None:
            psnr[self.stop] = self.peak - self.gap
        bands = {
            band: [0.5 if row is None or i < row else 0.95 for i in range(ROWS)]
            for band, row in ((1, self.band1), (5, self.band5))
        }
        return hand_curves(psnr, every, fbc=bands)


# All five phenomena hold: DIP drops 2.5 and 3.0 dB (mean 2.75 ≥ 1); the controlled method drops
# 0.1 and 0.2 dB (mean 0.15 ≤ 0.3), its rule fires on both, 0.4 and 0.6 dB below the peak (≤ 1);
# DIP's band 1 reaches 0.9 at row 3, band 5 never.
HOLDS = {
    ("astronaut", "dip"): Fit(drop=2.5, gap=1.5),
    ("coffee", "dip"): Fit(drop=3.0, gap=2.0, band5=9),
    ("astronaut", "gaussian"): Fit(drop=0.1, gap=0.4),
    ("coffee", "gaussian"): Fit(drop=0.2, gap=0.6, stop=5),
}
EVERY = 2
BUDGET = ROWS * EVERY


def measured(runs: Path, tmp_path: Path, settings: dict) -> dict:
    """The phenomena of the runs, read back from the CSV files as the aggregate stage reads them."""
    write_csv(tmp_path / "evaluation.csv", evaluation_frame(runs))
    write_csv(tmp_path / "fbc.csv", fbc_frame(runs, (0.5, 0.9)))
    return phenomena(
        read_csv(tmp_path / "evaluation.csv"), read_csv(tmp_path / "fbc.csv"), settings
    )


@pytest.fixture
def settings() -> dict:
    """The default profile's phenomena settings: denoising, dip against gaussian, 1 / 0.3 / 1 dB."""
    return load_yaml(ROOT / "profiles" / "cpu.yaml")["aggregate"]["phenomena"]


@pytest.fixture
def check(tmp_path, astronaut_64, settings):
    """Measure the phenomena of ``HOLDS`` with some fits replaced."""
    problem = denoising_problem(tmp_path / "source", astronaut_64)

    def run(changes: dict[tuple[str, str], Fit], name: str) -> dict:
        fits = {**HOLDS, **changes}
        runs = tmp_path / name / "runs"
        for (image, method), fit in fits.items():
            key = ("denoising", "sigma25", image, method)
            stop = None if fit.stop is None else fit.stop * EVERY
            write_run(runs, key, problem, fit.curves(EVERY), stop)
        # A fit of another task never counts.
        other = ("inpainting", "default", "chelsea", "dip")
        write_run(runs, other, problem, Fit(drop=0.0, band1=None, band5=0).curves(EVERY), None)
        return measured(runs, tmp_path / name, settings)

    return run


CHECKS = [
    "baseline falls >= 1.0 dB below its peak",
    "gaussian falls <= 0.3 dB below its peak",
    "ratio rule stops before the budget",
    "ratio stop within 1.0 dB of the oracle peak",
    "FBC band 1 reaches 0.9 before the highest band",
]


def test_all_hold_and_the_measured_values(check):
    found = check({}, "holds")
    assert found["checks"] == dict.fromkeys(CHECKS, True)
    dip = [HOLDS[(image, "dip")].drop for image in ("astronaut", "coffee")]
    gaussian = [HOLDS[(image, "gaussian")] for image in ("astronaut", "coffee")]
    assert found["task"] == "denoising" and found["controlled"] == "gaussian"
    assert found["baseline_drop_db"] == pytest.approx(sum(dip) / 2)
    assert found["controlled_drop_db"] == pytest.approx(sum(f.drop for f in gaussian) / 2)
    assert found["drop_db_by_method"] == pytest.approx({"dip": 2.75, "gaussian": (0.1 + 0.2) / 2})
    assert found["ratio_stop_gap_db"] == pytest.approx((0.4 + 0.6) / 2)
    assert found["ratio_stops_before_budget"] == "2/2"
    assert found["fbc_low_band_first"] == "2/2"
    assert phenomena_markdown(found) == (
        "- [x] baseline falls >= 1.0 dB below its peak\n"
        "- [x] gaussian falls <= 0.3 dB below its peak\n"
        "- [x] ratio rule stops before the budget\n"
        "- [x] ratio stop within 1.0 dB of the oracle peak\n"
        "- [x] FBC band 1 reaches 0.9 before the highest band\n"
        "\n"
        "- task: denoising\n"
        "- controlled: gaussian\n"
        "- drop_db_by_method: dip 2.75, gaussian 0.15\n"
        "- baseline_drop_db: 2.75\n"
        "- controlled_drop_db: 0.15\n"
        "- ratio_stops_before_budget: 2/2\n"
        "- ratio_stop_gap_db: 0.50\n"
        "- fbc_low_band_first: 2/2\n"
    )


FAILS = {
    # DIP's mean drop (0.5 + 1.4) / 2 = 0.95 dB is below 1 dB, though one image drops 1.4.
    "baseline": (
        {("astronaut", "dip"): Fit(drop=0.5), ("coffee", "dip"): Fit(drop=1.4)},
        {"baseline_drop_db": 0.95},
    ),
    # The controlled mean drop (0.1 + 0.6) / 2 = 0.35 dB is above 0.3 dB.
    "controlled": (
        {("coffee", "gaussian"): Fit(drop=0.6, gap=0.6)},
        {"controlled_drop_db": 0.35},
    ),
    # One controlled fit's rule never fired: its stop is the budget, 0.1 dB below the peak.
    "stops": (
        {("coffee", "gaussian"): Fit(drop=0.1, stop=None)},
        {"ratio_stops_before_budget": "1/2", "ratio_stop_gap_db": (0.4 + 0.1) / 2},
    ),
    # The largest gap, 1.2 dB, is above 1 dB though the mean (0.4 + 1.2) / 2 = 0.8 dB is not.
    "gap": ({("coffee", "gaussian"): Fit(drop=0.2, gap=1.2)}, {"ratio_stop_gap_db": 0.8}),
    # On one DIP fit band 5 reaches 0.9 first (row 2, band 1 at row 3).
    "fbc_order": (
        {("coffee", "dip"): replace(HOLDS[("coffee", "dip")], band5=2)},
        {"fbc_low_band_first": "1/2"},
    ),
    # On one DIP fit band 1 never reaches 0.9 (band 5 neither).
    "fbc_never": (
        {("astronaut", "dip"): replace(HOLDS[("astronaut", "dip")], band1=None)},
        {"fbc_low_band_first": "1/2"},
    ),
}
FAILED_CHECK = {
    "baseline": CHECKS[0],
    "controlled": CHECKS[1],
    "stops": CHECKS[2],
    "gap": CHECKS[3],
    "fbc_order": CHECKS[4],
    "fbc_never": CHECKS[4],
}


@pytest.mark.parametrize("case", list(FAILS))
def test_each_check_fails_alone(check, case):
    changes, values = FAILS[case]
    found = check(changes, case)
    expected = dict.fromkeys(CHECKS, True) | {FAILED_CHECK[case]: False}
    assert found["checks"] == expected
    for name, value in values.items():
        assert found[name] == (pytest.approx(value) if isinstance(value, float) else value)


def test_no_fits_of_the_methods_fail_every_check(settings):
    columns = ["task", "method", "drop_from_peak", "ratio_iteration", "budget", "stop_gap"]
    evaluation = pd.DataFrame(
        [["denoising", "lipschitz", 0.5, 10, BUDGET, 0.1]], columns=columns
    ).astype({"ratio_iteration": "Int64", "budget": "Int64"})
    fbc = pd.DataFrame(columns=["task", "method", "band1_reaches_0.9", "band5_reaches_0.9"])
    found = phenomena(evaluation, fbc, settings)
    assert found["checks"] == dict.fromkeys(CHECKS, False)
    assert (found["baseline_drop_db"], found["controlled_drop_db"]) == (None, None)
    assert found["ratio_stops_before_budget"] == "0/0" and found["fbc_low_band_first"] == "0/0"
