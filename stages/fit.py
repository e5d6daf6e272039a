"""``sdip fit``: restore one image with one fit and write its images, curves and summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pipeline.degradations import TASKS
from pipeline.fit import FitConfig, MemberView, fit, resolve_device
from pipeline.problem import observed, simulate
from pipeline.results import write_result
from pipeline.runtime import configure

TASK_OPTIONS = {"sigma": "denoising", "quality": "deblocking", "p": "inpainting", "factor": "sr"}


def progress_callback(total: int) -> tuple[tqdm, Any]:
    """A tqdm bar advanced at every sync of the fit (shown only on a terminal)."""
    bar = tqdm(total=total, unit="it", disable=not sys.stderr.isatty(), leave=False)

    def update(view: MemberView) -> None:
        bar.update(view.iteration - bar.n)
        values = view.curves_numpy()
        if len(values["psnr_obs"]):
            bar.set_postfix(psnr_obs=f"{values['psnr_obs'][-1]:.2f}")

    return bar, update


def pop_task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """Take the degradation options (``--sigma`` …) out of ``options``; one given for another
    task is a usage error."""
    task_params = {}
    for name, owner in TASK_OPTIONS.items():
        value = options.pop(name)
        if value is None:
            continue
        if owner != task:
            raise click.UsageError(f"--{name} applies to {owner}, not {task}")
        task_params[name] = value
    return task_params


def csv_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from err


@click.command("fit")
@click.argument("task", type=click.Choice(sorted(TASKS)))
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--observed",
    "is_observed",
    is_flag=True,
    help="IMAGE is already degraded (a real photo); otherwise it is clean and degraded here.",
)
@click.option("--sigma", type=float, help="Noise level on the 0–255 scale (denoising; default 25).")
@click.option("--quality", type=int, help="JPEG quality (deblocking; default 10).")
@click.option(
    "--p", type=float, help="Kept fraction of a Bernoulli mask (inpainting; default 0.5)."
)
@click.option(
    "--mask",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Inpainting mask (.h5 dataset 'mask' or an image, 1/white = kept).",
)
@click.option("--factor", type=int, help="Super-resolution factor (sr; default 4).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Force grey (1) or RGB (3).")
@click.option("--iterations", type=int, help="Iteration budget (task default).")
@click.option("--lr", type=float, help="Adam learning rate (default 0.001).")
@click.option("--width", type=int, help="Decoder channels (default 128).")
@click.option("--depth", type=int, help="Upsampling blocks (default 5).")
@click.option(
    "--lam", type=float, help="Lipschitz bound λ; ≤ 0 is the DIP baseline (task default)."
)
@click.option("--upsample", type=click.Choice(["bilinear", "nearest", "deconv", "gaussian"]))
@click.option("--gauss-sigma", help="Gaussian upsampling σ per block, comma-separated.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, …")
@click.option("--measure-every", type=int, help="Measure every N iterations (default 1).")
@click.option("--halt-at-stop", is_flag=True, help="End the fit when the ratio rule fires.")
def fit_command(
    task: str,
    image: Path,
    out_dir: Path,
    is_observed: bool,
    mask: Path | None,
    channels: str | None,
    gauss_sigma: str | None,
    **options: Any,
) -> None:
    """Fit the deep image prior to IMAGE for TASK and write the results to OUT_DIR."""
    task_params = pop_task_options(task, options)
    make = observed if is_observed else simulate
    problem = make(task, image, task_params, mask, None if channels is None else int(channels))
    settings = {**TASKS[task].defaults, **{k: v for k, v in options.items() if v is not None}}
    if gauss_sigma is not None:
        settings["gauss_sigma"] = csv_floats(gauss_sigma)
    config = FitConfig.from_dict(settings)
    configure(config.threads, config.precision, resolve_device(config.device))
    bar, update = progress_callback(config.iterations)
    with bar:
        result = fit(problem.observation, problem.task, config, [update], clean=problem.clean)
    summary = write_result(
        out_dir, problem, result, {"image": str(image), "task_params": task_params}
    )
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
