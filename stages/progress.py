"""A fit with a progress bar on the terminal, shared by ``sdip fit`` and ``sdip optimize``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.fit import FitConfig, MemberView, fit, resolve_device
from pipeline.problem import Problem
from pipeline.results import FitResult
from pipeline.runtime import configure


def progress_callback(total: int) -> tuple[tqdm, Callable[[MemberView], None]]:
    """A tqdm bar advanced at every sync of the fit (shown only on a terminal)."""
    bar = tqdm(total=total, unit="it", disable=not sys.stderr.isatty(), leave=False)

    def update(view: MemberView) -> None:
        bar.update(view.iteration - bar.n)
        values = view.curves_numpy()
        if len(values["psnr_obs"]):
            bar.set_postfix(psnr_obs=f"{values['psnr_obs'][-1]:.2f}")

    return bar, update


def run_fit(problem: Problem, config: FitConfig, checkpoint: Checkpoint | None = None) -> FitResult:
    """Fit ``problem`` with a progress bar, after the process-wide settings of ``config``;
    resumable from ``checkpoint``. PSNR against the clean image is read on the problem's region."""
    configure(config.threads, config.precision, resolve_device(config.device))
    bar, update = progress_callback(config.iterations)
    with bar:
        return fit(
            problem.observation,
            problem.task,
            config,
            [update],
            problem.clean,
            checkpoint,
            problem.region,
        )
