"""The prepared GPU benchmark (`python bench/run.py --gpu`) runs its whole code path on the CPU, so
the first lent GPU does not spend its time on a broken script."""

from __future__ import annotations

import math

from bench.run import gpu_suite


def test_gpu_suite_runs_every_option_and_batch_on_cpu():
    rows = gpu_suite(
        reps=1, device="cpu", size=64, options=("fp32", "bf16", "nchw"), batch_sizes=(2,)
    )
    # NCHW is a single-fit option only: batched fits lay members out as channel groups.
    assert set(rows) == {"fp32 single", "fp32 K=2", "bf16 single", "bf16 K=2", "nchw single"}
    for row in rows.values():
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
