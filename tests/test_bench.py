"""The benchmarks' own arithmetic, and the prepared GPU suite (`python -m bench.run --gpu`), whose
whole code path runs here on the CPU, so that the first lent GPU does not spend its time on a
broken script. Timings themselves are measured by running bench/run.py, not tested."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest
import yaml

from bench.gpu import Case, Part, against_plain, default_parts, gpu_suite
from bench.paper import paper_workload
from bench.precision import TARGETS_DB, precision_check
from bench.report import markdown_table
from bench.scaling import exponent


def test_gpu_suite_runs_every_eager_case_on_cpu():
    # Small sizes; compiled cases are left out (compiling takes minutes on this CPU).
    parts = {
        name: Part(part.budget_s, tuple(case for case in part.cases if not case.compile))
        for name, part in default_parts(size=64, small_size=128).items()
    }
    results = gpu_suite(device="cpu", width=8, reps=1, parts=parts)
    names = [case.name for part in parts.values() for case in part.cases]
    assert len(names) == 13 and len(set(names)) == 13
    assert list(results["rows"]) == names and results["skipped"] == []
    for name, row in results["rows"].items():
        assert "error" not in row, name
        assert row["step_ms"] > 0 and row["first_step_s"] > 0 and row["peak_gib"] is None
        # fit-iterations per second: members over the median step time.
        assert row["fit_iterations_per_s"] == pytest.approx(1e3 * row["members"] / row["step_ms"])
    assert results["rows"]["fit K=16 64² tf32 channels-last eager"]["members"] == 16
    assert results["rows"]["fit K=8 128² tf32 channels-last eager"]["size"] == 128
    # No plain compiled row ran, so no fit was compared with one.
    assert results["target"] == {"max_ratio": 1.2, "best": None, "ratio": None, "met": False}


def test_gpu_suite_starts_no_case_once_its_part_is_out_of_budget():
    fit = Case("fit", size=64)
    parts = {"spent": Part(0.0, (fit, replace(fit, members=2)))}
    results = gpu_suite(device="cpu", width=8, reps=1, parts=parts)
    assert results["rows"] == {}
    assert results["skipped"] == [
        "fit K=1 64² tf32 channels-last eager",
        "fit K=2 64² tf32 channels-last eager",
    ]


def test_fit_rows_are_held_against_the_plain_compiled_row_of_their_precision():
    def row(case: Case, step_ms: float) -> tuple[str, dict]:
        return case.name, {**asdict(case), "step_ms": step_ms}

    fit, plain = Case("fit"), Case("plain", compile=True, cudnn_benchmark=True)
    rows = dict(
        [
            row(fit, 13.0),
            row(replace(fit, compile=True), 11.5),
            row(replace(fit, precision="bf16"), 9.0),
            row(replace(fit, members=4), 40.0),  # batched: not compared
            row(plain, 10.0),
            row(replace(plain, precision="bf16"), 6.0),
            row(replace(plain, compile=False), 12.0),  # eager: not the reference
        ]
    )
    target = against_plain(rows)
    assert rows[fit.name]["vs_plain_compiled"] == pytest.approx(1.3)
    assert rows[replace(fit, compile=True).name]["vs_plain_compiled"] == pytest.approx(1.15)
    assert rows[replace(fit, precision="bf16").name]["vs_plain_compiled"] == pytest.approx(1.5)
    assert "vs_plain_compiled" not in rows[replace(fit, members=4).name]
    assert target["best"] == replace(fit, compile=True).name
    assert target["ratio"] == pytest.approx(1.15) and target["met"] is True


def test_precision_check_runs_on_cpu_where_tf32_is_the_fp32_fit():
    result = precision_check(size=64, iterations=6, device="cpu")
    rows = result["rows"]
    assert list(rows) == ["fp32", "tf32", "bf16"]
    # No TF32 tensor cores on a CPU: the same float32 fit, bit for bit.
    assert rows["tf32"]["peak_psnr"] == rows["fp32"]["peak_psnr"]
    assert rows["tf32"]["minus_fp32_db"] == 0.0 and rows["tf32"]["met"] is True
    for row in rows.values():
        assert len(set(row["peak_psnr"])) == 3 and row["wall_s"] > 0  # three seeds, three fits
        assert row["mean_peak_psnr"] == pytest.approx(sum(row["peak_psnr"]) / 3)
    gap = rows["bf16"]["mean_peak_psnr"] - rows["fp32"]["mean_peak_psnr"]
    assert rows["bf16"]["minus_fp32_db"] == pytest.approx(gap)
    assert rows["bf16"]["met"] == (abs(gap) <= TARGETS_DB["bf16"])
    assert "met" not in rows["fp32"]


def test_exponent_of_a_power_law():
    pixels = [128**2, 256**2, 512**2]
    assert exponent(pixels, [3e-6 * p**1.3 for p in pixels]) == pytest.approx(1.3)
    assert exponent(pixels, [2.0, 2.0, 2.0]) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(exponent([1, 4], [1.0, 2.0]), 0.5)


def test_markdown_table():
    table = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"


def test_paper_workload_counts_every_fit_and_iteration_of_a_profile(cpu_profile, tmp_path):
    profile = {**cpu_profile, "tune": {**cpu_profile["tune"], "images": ["astronaut"]}}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    work = paper_workload(path)
    # Counted by hand from profiles/cpu.yaml: images × variants × 3 methods at each task's budget,
    # 3 + 3 sweep fits of 1000, and 12 tune trials of denoising's 1500 iterations.
    fits = {
        "denoising": (2 * 1, 1500),
        "deblocking": (1 * 3, 800),
        "inpainting": (1 * 1, 1500),
        "sr": (1 * 2, 500),
        "enhancement": (1 * 1, 100),
    }
    expected = [
        {"what": f"{task}/{method}", "fits": count, "iterations": iterations}
        for task, (count, iterations) in fits.items()
        for method in ("dip", "lipschitz", "gaussian")
    ]
    expected += [
        {"what": "sweep lam", "fits": 3, "iterations": 1000},
        {"what": "sweep gauss_sigma", "fits": 3, "iterations": 1000},
        {"what": "tune", "fits": 12, "iterations": 1500},
    ]
    assert work["groups"] == expected
    assert work["fits"] == 45
    assert work["fit_iterations"] == 3 * (3000 + 2400 + 1500 + 1000 + 100) + 6000 + 18000
