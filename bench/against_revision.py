"""This checkout's fit engine against another revision's, side by side in one run.

Each revision runs in its own worker process (``PYTHONPATH`` = its checkout) that builds the same
fits: denoising σ = 25 on seeded random images, λ = 1.4 for one fit and 1.0 + 0.1 k for member k of
a batch, measures every iteration. The worker's code is a copy of bench/common.py's problem and
fit_state, kept in step with them by hand, since older revisions have no bench/common.py. It times
``steps`` calls of ``step()`` when asked. The parent asks the two workers in turns, every case in a
seeded shuffled order each round, so load from elsewhere hits both alike. The result is each case's
median step and the ratio this / other. Revisions up to b5f53ba (before the one-engine redesign)
build a batch with ``pipeline.batched.BatchedFitState``, later ones with ``FitState`` of K
members::

    git worktree add /tmp/base b5f53ba
    python -m bench.against_revision /tmp/base [--rounds 15] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.results import write_json

CASES: dict[str, tuple[int, int, int]] = {
    "K=1 64² w32": (64, 32, 1),
    "K=1 64² w128": (64, 128, 1),
    "K=1 256² w128": (256, 128, 1),
    "K=4 64² w32": (64, 32, 4),
    "K=8 64² w32": (64, 32, 8),
    "K=4 64² w128": (64, 128, 4),
}
"""name → (size, width, members)."""

WORKER = r"""
import json, sys, time
import torch
from pipeline.degradations import Denoising
from pipeline import fit as engine

threads, capacity = int(sys.argv[1]), int(sys.argv[2])
cases = json.loads(sys.argv[3])

def config(width, **extra):
    return engine.FitConfig.from_dict(
        {"width": width, "iterations": capacity, "log_every": 10**9, "threads": threads, **extra}
    )

def problem(size, seed):
    clean = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    task = Denoising(sigma=25, seed=seed)
    return task, task.observe(clean), clean

def state(size, width, members):
    problems = [problem(size, seed) for seed in range(members)]
    ys, tasks, cleans = [p[1] for p in problems], [p[0] for p in problems], [p[2] for p in problems]
    if members == 1:
        configs = [config(width)]
    else:
        configs = [config(width, seed=k, lam=1.0 + 0.1 * k) for k in range(members)]
    if hasattr(engine, "fit_many"):
        return engine.FitState(ys, tasks, configs, cleans)
    if members == 1:
        return engine.FitState(ys[0], tasks[0], configs[0], clean=cleans[0])
    from pipeline.batched import BatchedFitState
    return BatchedFitState(ys, tasks, configs, cleans)

try:
    from pipeline.runtime import configure
    configure(threads, "fp32", torch.device("cpu"))
except ImportError:
    pass
states = {name: state(*spec) for name, spec in cases.items()}
torch.set_num_threads(threads)
for s in states.values():
    s.step()
print("ready", flush=True)
for line in sys.stdin:
    name, steps = json.loads(line)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        states[name].step()
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)
"""


class Worker:
    """One revision's process, holding every case's fit state between requests."""

    def __init__(self, checkout: Path, threads: int, capacity: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(threads), str(capacity), json.dumps(CASES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=checkout,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker of {checkout} did not start")

    def times(self, case: str, steps: int) -> list[float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([case, steps]) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def compare(other: Path, rounds: int, steps: int, threads: int) -> dict[str, Any]:
    """Median step per case and revision, and this / other."""
    here = Path(__file__).resolve().parents[1]
    capacity = 2 + rounds * steps
    workers: dict[str, Worker] = {}
    times: dict[tuple[str, str], list[float]] = {
        (revision, case): [] for revision in ("this", "other") for case in CASES
    }
    order = random.Random(0)
    pairs = list(times)
    try:
        workers["this"] = Worker(here, threads, capacity)
        workers["other"] = Worker(other, threads, capacity)
        for _ in range(rounds):
            for revision, case in order.sample(pairs, len(pairs)):
                times[revision, case] += workers[revision].times(case, steps)
    finally:
        for worker in workers.values():
            worker.close()
    rows = {}
    for case in CASES:
        this = statistics.median(times["this", case])
        before = statistics.median(times["other", case])
        rows[case] = {"this_ms": 1e3 * this, "other_ms": 1e3 * before, "ratio": this / before}
    return {
        "other": str(other),
        "other_commit": _commit(other),
        "this_commit": _commit(here),
        "rounds": rounds,
        "steps_per_round": steps,
        "threads": threads,
        "load_average": os.getloadavg(),
        "cases": rows,
    }


def _commit(checkout: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="a checkout of the other revision")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per case and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args.other.resolve(), args.rounds, args.steps, args.threads)
    load = result["load_average"]
    print(f"this {result['this_commit']} against {result['other_commit']}, load {load}")
    print("| case | this (ms) | other (ms) | this / other |\n|---|---|---|---|")
    for case, row in result["cases"].items():
        print(f"| {case} | {row['this_ms']:.1f} | {row['other_ms']:.1f} | {row['ratio']:.3f} |")
    if args.out is not None:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
