"""``sdip fit``: restore one image with one fit and write its images, curves and summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.errors import SettingError, located
from pipeline.fit import FitConfig, MemberView, fit, resolve_device
from pipeline.model import output_grid
from pipeline.problem import FitSize, Problem, load_problem
from pipeline.results import FitResult, check_output_dir, write_result
from pipeline.runtime import configure
from pipeline.settings import standalone_settings
from stages.options import (
    TaskCommand,
    TaskName,
    fit_options,
    fit_values,
    photo_options,
    task_params,
)


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


@click.command("fit", cls=TaskCommand)
@click.argument("task", type=TaskName())
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@photo_options
@click.option(
    "--crop",
    "crop_image",
    is_flag=True,
    help="Centre-crop IMAGE to multiples of 32 (the paper's protocol) instead of padding it by "
    "reflection; the outputs are then the crop, not the whole image.",
)
@fit_options
@click.option("--halt-at-stop", is_flag=True, help="End the fit when the ratio rule fires.")
def fit_command(
    task: str,
    image: Path,
    out_dir: Path,
    is_observed: bool,
    mask: Path | None,
    channels: str | None,
    crop_image: bool,
    halt_at_stop: bool,
    **options: Any,
) -> None:
    """Fit the deep image prior to IMAGE for TASK and write the results to OUT_DIR.

    IMAGE may have any size of at least 32 px a side (an SR photo: 32/factor): it is padded by
    reflection to the network's sizes and the outputs are cut back to it (``--crop``: cropped).
    """
    degradation = task_params(task, options)
    settings = standalone_settings(task, {**fit_values(options), "halt_at_stop": halt_at_stop})
    config = FitConfig.from_dict(settings)
    check_output_dir(out_dir)
    channel_count = None if channels is None else int(channels)
    size = FitSize("crop" if crop_image else "pad", *output_grid(config.model))
    try:
        problem = load_problem(task, image, degradation, mask, channel_count, is_observed, size)
    except SettingError as err:
        raise located(err, degradation) from err
    result = run_fit(problem, config)
    extra = {"image": str(image), "task_params": degradation}
    summary = write_result(out_dir, problem, result, extra)
    stop = summary["stop_iteration"]
    line = f"{task} {image.name}: {result.iterations_run} iterations in {result.wall_time:.1f} s"
    line += f", ratio rule stop at {stop}" if stop is not None else ", ratio rule did not fire"
    if summary["psnr_final"] is not None:
        line += (
            f"; PSNR stop {summary['psnr_stop']:.2f} dB, final {summary['psnr_final']:.2f} dB, "
            f"peak {summary['psnr_best']:.2f} dB at {summary['best_iteration']}"
        )
    click.echo(line)
    click.echo(f"wrote {out_dir}")
