"""``sdip fit``: restore one image with one fit and write its images, curves and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.degradations import Denoising
from pipeline.errors import SettingError, located
from pipeline.fit import FitConfig, resolve_device
from pipeline.lambda_choice import STOPS, choose_lambda
from pipeline.model import output_grid
from pipeline.problem import FitSize, Problem, load_problem
from pipeline.results import FitResult, check_output_dir, summary_line, write_result
from pipeline.runtime import configure
from pipeline.settings import standalone_settings, task_class
from stages.options import (
    TaskCommand,
    TaskName,
    fit_options,
    fit_values,
    photo_options,
    task_params,
)
from stages.progress import progress_callback, run_fit


def tuned_fit(
    problem: Problem,
    settings: dict[str, Any],
    config: FitConfig,
    degradation: dict[str, Any],
    stop: str,
) -> tuple[FitResult, dict[str, Any]]:
    """The fit at λ chosen by MC-SURE (:func:`pipeline.lambda_choice.choose_lambda`), and the
    choice as recorded in ``summary.json`` (σ on the 0–255 scale, as ``--sigma``). σ is the one
    given (``--sigma``), the simulation's, or estimated from a photo. The candidates measure
    every iteration and each ends at its ``stop`` (:data:`pipeline.lambda_choice.STOPS`), whose
    output is ``restored_stop.png``."""
    given = degradation.get("sigma")
    if given is None and problem.clean is not None:
        given = problem.task.params()["sigma"]
    configure(config.threads, config.precision, resolve_device(config.device))
    bar, _ = progress_callback(config.iterations)
    with bar:
        choice = choose_lambda(
            problem,
            settings,
            sigma=None if given is None else given / 255,
            callbacks=[lambda view: bar.update(view.iteration - bar.n)],
            stop=stop,
        )
    for row in choice.scores():
        stop = row["stop_iteration"]
        click.echo(
            f"λ = {row['lam']:g}: SURE {row['sure']:.3g} at "
            + (
                f"iteration {stop} (ran {row['iterations_run']})"
                if stop is not None
                else "the budget"
            )
        )
    sigma = 255 * choice.sigma
    click.echo(f"chose λ = {choice.lam:g} (σ = {sigma:.3g}/255)")
    record = {
        "lam": choice.lam,
        "sigma": sigma,
        "sigma_given": given is not None,
        "ended_at_stop": True,
        "stop_rule": choice.stop,
        "candidates": choice.scores(),
    }
    return choice.results[choice.chosen], record


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
@click.option(
    "--tune",
    "choose_lam",
    is_flag=True,
    help="Denoising: choose λ for this image without its clean image (MC-SURE of the whole fit "
    "over λ = 0.35 … 2.8), then restore with it.",
)
@click.option(
    "--tune-stop",
    type=click.Choice(STOPS),
    help="With --tune, the stop each candidate is scored and ended at: the SURE window rule "
    "(sure, the default: fired within 1 dB of the peak on 83–93 % of unseen 64×64 images at "
    "lr 0.004; README) or the ratio rule of the fit settings.",
)
def fit_command(
    task: str,
    image: Path,
    out_dir: Path,
    is_observed: bool,
    mask: Path | None,
    channels: str | None,
    crop_image: bool,
    halt_at_stop: bool,
    choose_lam: bool,
    tune_stop: str | None,
    **options: Any,
) -> None:
    """Fit the deep image prior to IMAGE for TASK and write the results to OUT_DIR.

    IMAGE may have any size of at least 32 px a side (an SR photo: 32/factor): it is padded by
    reflection to the network's sizes and the outputs are cut back to it (--crop: cropped). With
    --tune, λ is chosen for this image by MC-SURE (pipeline/lambda_choice.py) and the fit at the
    chosen λ, which ends at its stop (--tune-stop: the SURE window rule by default), is the
    result.
    """
    degradation = task_params(task, options)
    given = fit_values(options)
    if tune_stop is not None and not choose_lam:
        raise click.UsageError("--tune-stop is the stop of --tune's λ choice: give --tune too")
    if choose_lam:
        if not issubclass(task_class(task), Denoising):
            raise click.UsageError("--tune chooses λ by MC-SURE, for denoising only")
        if given.keys() & {"lam", "measure_every", "log_every"}:
            raise click.UsageError(
                "--tune chooses λ and measures every iteration: leave out --lam, "
                "--measure-every and --log-every"
            )
    settings = standalone_settings(task, {**given, "halt_at_stop": halt_at_stop})
    config = FitConfig.from_dict(settings)
    check_output_dir(out_dir)
    channel_count = None if channels is None else int(channels)
    size = FitSize("crop" if crop_image else "pad", *output_grid(config.model))
    try:
        problem = load_problem(task, image, degradation, mask, channel_count, is_observed, size)
    except SettingError as err:
        raise located(err, degradation) from err
    extra: dict[str, Any] = {"image": str(image), "task_params": degradation}
    if choose_lam:
        result, extra["lambda_choice"] = tuned_fit(
            problem, settings, config, degradation, tune_stop or "sure"
        )
    else:
        result = run_fit(problem, config)
    summary = write_result(out_dir, problem, result, extra)
    click.echo(f"{task} {image.name}: {summary_line(summary)}")
    click.echo(f"wrote {out_dir}")
