"""Command-line options shared by the commands that fit: declared once, used by ``sdip fit`` and
``sdip tune`` (and ``--set`` by every pipeline command that fits a prepared observation)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from pipeline.degradations import TASKS
from pipeline.errors import LocatedSettings
from pipeline.runtime import PRECISIONS
from pipeline.upsample import UPSAMPLE_KINDS

F = TypeVar("F", bound=Callable[..., Any])

FIT_OPTIONS: list[tuple[str, Any, str]] = [
    ("iterations", int, "Iteration budget (task default)."),
    ("lr", float, "Adam learning rate (default 0.001)."),
    ("width", int, "Decoder channels (default 128)."),
    ("depth", int, "Upsampling blocks (default 5)."),
    ("lam", float, "Lipschitz bound λ; ≤ 0 is the DIP baseline (task default)."),
    ("upsample", click.Choice(UPSAMPLE_KINDS), "Upsampler of every block (default bilinear)."),
    ("gauss_sigma", str, "Gaussian upsampling σ per block, comma-separated."),
    ("seed", int, "Seed of the network's weights and input (default 0)."),
    ("device", str, "auto (default), cpu, cuda, cuda:1, …"),
    ("precision", click.Choice(PRECISIONS), "tf32 (default; CUDA only), fp32 or bf16."),
    ("measure_every", int, "Measure every N iterations (default 1)."),
    ("log_every", int, "Sync (progress, pruning, halting) every N iterations (default 100)."),
]
"""Fit settings offered as options: (name, type, help); unset options keep the settings' own."""


def fit_options(function: F) -> F:
    """Declare :data:`FIT_OPTIONS` (``--gauss-sigma`` etc.) on a command."""
    for name, kind, text in reversed(FIT_OPTIONS):
        function = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)(function)
    return function


def photo_options(function: F) -> F:
    """``--observed``, ``--mask`` and ``--channels``: how IMAGE becomes a problem."""
    function = click.option(
        "--channels", type=click.Choice(["1", "3"]), help="Force grey (1) or RGB (3)."
    )(function)
    function = click.option(
        "--mask",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Mask file of a task that takes one (inpainting: .h5 dataset 'mask' or an image, "
        "1/white = kept).",
    )(function)
    return click.option(
        "--observed",
        "is_observed",
        is_flag=True,
        help="IMAGE is already degraded (a real photo); otherwise it is clean and degraded here.",
    )(function)


def fit_values(options: dict[str, Any]) -> dict[str, Any]:
    """Take the :data:`FIT_OPTIONS` given out of a command's ``options`` as fit settings."""
    values = {name: options.pop(name) for name, _, _ in FIT_OPTIONS}
    values = {name: value for name, value in values.items() if value is not None}
    if "gauss_sigma" in values:
        values["gauss_sigma"] = csv_floats(values["gauss_sigma"])
    return values


def csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from err


def key_values(values: tuple[str, ...], option: str = "--set") -> dict[str, object]:
    """``KEY=VALUE`` items (VALUE read as YAML: numbers, lists, ``tuned``) as a mapping."""
    parsed = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        parsed[key] = yaml.safe_load(text)
    return parsed


class TaskName(click.ParamType):
    """A task of :data:`pipeline.degradations.TASKS`, looked up when the command runs."""

    name = "task"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value not in TASKS:
            self.fail(f"unknown task {value!r}; valid tasks: {', '.join(sorted(TASKS))}")
        return str(value)


class TaskCommand(click.Command):
    """A command that also takes every registered task's degradation options
    (:attr:`~pipeline.degradations.Degradation.options`), read when it runs, so a task class
    defined anywhere gets its ``--<parameter>`` without touching the CLI."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        known = {param.name for param in params}
        extra: list[click.Parameter] = []
        for cls in TASKS.values():
            # the constructor's annotations, not its defaults: sigma = 25 is a float
            kinds = typing.get_type_hints(cls.__init__)
            for name, text in cls.options.items():
                if name in known:
                    continue
                known.add(name)
                extra.append(
                    click.Option([f"--{name.replace('_', '-')}", name], type=kinds[name], help=text)
                )
        return params[:-1] + extra + params[-1:]


def task_params(task: str, options: dict[str, Any]) -> LocatedSettings:
    """Take every task's degradation options out of ``options``; the ones given must belong to
    ``task`` (a usage error names the tasks they apply to). Each is located at its option, for
    error messages (:func:`pipeline.errors.located`)."""
    given = {}
    for cls in TASKS.values():
        for name in cls.options:
            value = options.pop(name, None)
            if value is None:
                continue
            owners = [other.name for other in TASKS.values() if name in other.options]
            if task not in owners:
                raise click.UsageError(f"--{name} applies to {', '.join(owners)}, not {task}")
            given[name] = value
    return LocatedSettings(given, {name: f"--{name.replace('_', '-')}" for name in given})


TUNE_OPTIONS: list[tuple[str, Any, str]] = [
    ("trials", int, "Trials to run in this process (default 20)."),
    ("objective", click.Choice(["oracle", "holdout"]), "Default: holdout."),
    ("search", str, "Settings to search, comma-separated: lam, lr, gauss_sigma."),
    ("holdout", float, "Fraction of observed pixels held out (0.1)."),
    ("holdout_seed", int, "Seed of the held-out pixels (0)."),
    ("folds", int, "Disjoint hold-outs fitted and averaged per trial (1)."),
    ("sampler_seed", int, "TPE seed (0); give each worker its own."),
    ("startup_trials", int, "Random trials before TPE (5)."),
    ("prune_startup", int, "Trials finished before pruning starts (4)."),
    ("prune_warmup", int, "First iteration that may be pruned (budget/4)."),
]


def tune_options(function: Any) -> Any:
    """Declare :data:`TUNE_OPTIONS`, ``--prune/--no-prune`` and ``--baseline/--no-baseline``."""
    for name, kind, text in reversed(TUNE_OPTIONS):
        function = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)(function)
    function = click.option("--prune/--no-prune", default=None, help="Median pruning (on).")(
        function
    )
    return click.option("--baseline/--no-baseline", default=None, help="Fixed λ first (on).")(
        function
    )


def tune_values(options: dict[str, Any]) -> dict[str, Any]:
    """Take the tuning options (:data:`TUNE_OPTIONS`, ``prune``, ``baseline``) out of a command's
    ``options``; unset ones are None."""
    names = (*(name for name, _, _ in TUNE_OPTIONS), "prune", "baseline")
    return {name: options.pop(name) for name in names}
