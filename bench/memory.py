"""Peak memory of a fit on the CPU: how far the peak resident set of a fresh process rises while
it builds a fit and takes two steps.

Each case runs in its own child process (``python -m bench.memory SIZE,WIDTH,K``), which sets up
the process as every entry point does (pipeline.runtime.configure), runs a tiny fit first so that
what any first fit loads (kernels, thread pools) is not counted, resets the peak (Linux:
/proc/self/clear_refs) and prints the rise in KiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from bench.common import PAPER_WIDTH, ROOT, fit_state
from pipeline.runtime import configure

SIZES = (64, 128, 256, 512)


def _proc_status(key: str) -> int:
    """A KiB field of /proc/self/status (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_rise_kib(size: int, width: int, members: int) -> int:
    """In this process: the rise of the peak resident set (KiB) over building a fit of K =
    ``members`` at size², width ``width``, and taking two steps, after a tiny warm-up fit."""
    fit_state(64, 8, iterations=2).step()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    before = _proc_status("VmRSS")
    state = fit_state(size, width, 4, members)
    state.step()
    state.step()
    return _proc_status("VmHWM") - before


def memory(quick: bool) -> dict[str, Any]:
    """Peak MiB, in all and per fit, of single fits at every size (width 128) and of batched
    fits at 64² (width 32, and 128 without ``quick``), each in a child process."""
    cases = [(size, PAPER_WIDTH, 1) for size in SIZES] + [(64, 32, 1), (64, 32, 4)]
    if not quick:
        cases.append((64, PAPER_WIDTH, 4))
    threads = str(torch.get_num_threads())
    rows = {}
    for size, width, members in cases:
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory", f"{size},{width},{members}", threads],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        peak = int(json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"])
        rows[f"{size}x{size} width {width} K={members}"] = {
            "peak_mib": peak / 1024,
            "per_fit_mib": peak / 1024 / members,
        }
    return {
        "method": "peak RSS rise of a child process while it builds and steps the fit",
        "cases": rows,
    }


def main() -> None:
    """The child process: ``SIZE,WIDTH,K THREADS``; prints ``{"peak_kib": ...}``."""
    spec, threads = sys.argv[1:]
    configure(int(threads), "fp32", torch.device("cpu"))
    size, width, members = (int(v) for v in spec.split(","))
    print(json.dumps({"peak_kib": peak_rise_kib(size, width, members)}))


if __name__ == "__main__":
    main()
