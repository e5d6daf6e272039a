"""``sdip tune TASK IMAGE``: tune λ (optionally lr, Gaussian σ) for one image (DVC stage ``tune``).

IMAGE is an image file (like ``sdip fit``: degraded here with the task options, or with
``--observed`` a degraded photo, which allows only the holdout objective; settings: the task's
defaults and the fit options) or the name of a prepared observation
``data/prepared/TASK/<variant>/IMAGE`` (the pipeline: settings from params.yaml's ``fit``,
``stopping``, ``tasks.TASK.fit`` and ``methods.<--method>``, tuning defaults from its ``tune``
section). A file path wins when both exist. Every invocation runs ``--trials`` more trials of the
study, created or resumed, ``--batch`` at a time in one engine pass (:mod:`pipeline.study`), and
writes the best values so far to ``tuned/TASK/<variant>/<name>/`` (``--out``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import optuna

from pipeline.errors import UserError
from pipeline.fit import FitConfig, resolve_device
from pipeline.layout import CHECKPOINT_EVERY, TUNED_VALUES, tuned_dir
from pipeline.observations import read_prepared
from pipeline.problem import Problem, load_problem
from pipeline.results import check_output_dir
from pipeline.runtime import configure, handle_termination
from pipeline.settings import (
    checkpoint_every,
    fit_settings,
    load_params,
    standalone_settings,
    task_class,
    variant_name,
)
from pipeline.study import run_study
from pipeline.tuning import TuneConfig
from stages.options import (
    TaskCommand,
    TaskName,
    fit_options,
    fit_values,
    key_values,
    photo_options,
    task_params,
    tune_options,
    tune_values,
)

PIPELINE_KEYS = ("task", "variant", "images", "method", "settings", "batch")
"""Keys of params.yaml's ``tune`` section: the DVC stage's, ``settings`` (a
:class:`~pipeline.tuning.TuneConfig`) and ``batch`` (trials per engine pass)."""


@click.command("tune", cls=TaskCommand)
@click.argument("task", type=TaskName())
@click.argument("image")
@tune_options
@click.option("--range", "ranges", multiple=True, help="Search range: NAME=LOW:HIGH (log scale).")
@click.option("--batch", type=int, help="Trials fitted together in one engine pass (1).")
@click.option("--storage", help="sqlite:///… (<repo>/optuna.db), journal:PATH, memory, URL.")
@click.option("--study-name", help="Default: TASK-<variant>-<image>-<objective>.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--variant", "variant_value", help="Prepared observation's variant (25 or sigma25).")
@click.option("--method", help="Prepared: the params.yaml method whose settings are tuned.")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--set", "overrides", multiple=True, help="Prepared: override a fit setting.")
@photo_options
@fit_options
@click.option("--dvc-stage", default="", help="The DVC stage name, recorded as a tag.")
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def tune_command(task: str, image: str, **options: Any) -> None:
    """Tune λ (and optionally lr, Gaussian σ) of TASK for IMAGE with an Optuna study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    degradation, fit = task_params(task, options), fit_values(options)
    tune = {name: value for name, value in tune_values(options).items() if value is not None}
    if options["ranges"]:
        tune["ranges"] = {k: _bounds(k, v) for k, v in key_values(options["ranges"]).items()}
    path, section, every = Path(image), {}, CHECKPOINT_EVERY
    if path.is_file():
        problem, variant = _from_file(task, path, degradation, options)
        settings, name, tracking = standalone_settings(task, fit), path.stem, "standalone"
    else:
        params = load_params(options["params_file"])
        section, every = _tune_section(params), checkpoint_every(params)
        problem, _, variant = read_prepared(params, task, image, options["variant_value"])
        method = options["method"] or section.get("method") or "lipschitz"
        overrides = {**key_values(options["overrides"]), **fit}
        settings = fit_settings(params, task, method, image, variant, overrides)
        name, tracking = image, params.get("profile", "custom")
    config = TuneConfig.from_dict({**(section.get("settings") or {}), **tune})
    batch = options["batch"] or section.get("batch", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"tune batch must be an integer >= 1, got {batch!r}")
    base = FitConfig.from_dict(settings)
    configure(base.threads, base.precision, resolve_device(base.device))
    handle_termination()
    where = {"task": task, "variant": variant, "image": name}
    out = options["out_dir"] or tuned_dir(task, variant, name)
    check_output_dir(out)
    tags = {"profile": tracking, "dvc_stage": options["dvc_stage"]}
    run_study(
        problem,
        settings,
        config,
        where,
        out,
        storage=options["storage"],
        study_name=options["study_name"],
        batch=batch,
        checkpoint_every=every,
        tracking=tags if options["track"] else None,
        echo=click.echo,
    )
    click.echo(f"wrote {out / TUNED_VALUES}")


def _bounds(name: str, value: object) -> list[float]:
    """``LOW:HIGH`` of ``--range NAME=LOW:HIGH`` as two numbers."""
    try:
        low, high = str(value).split(":")
        return [float(low), float(high)]
    except ValueError as err:
        hint = "--range"
        raise click.BadParameter(
            f"expected {name}=LOW:HIGH, got {value!r}", param_hint=hint
        ) from err


def _from_file(
    task: str, path: Path, degradation: dict[str, Any], options: dict[str, Any]
) -> tuple[Problem, str]:
    """The problem of an image file and its variant: a photo's is what the user says it is, a
    simulated one's the operator's."""
    if options["method"] or options["overrides"] or options["variant_value"] is not None:
        raise click.UsageError("--method, --set and --variant apply to prepared observations")
    channels = None if options["channels"] is None else int(options["channels"])
    observed = options["is_observed"]
    problem = load_problem(task, path, degradation, options["mask"], channels, observed)
    key = task_class(task).variant
    value = (
        None if key is None else (degradation.get(key) if observed else getattr(problem.task, key))
    )
    return problem, variant_name(task, value)


def _tune_section(params: dict[str, Any]) -> dict[str, Any]:
    section = dict(params.get("tune") or {})
    unknown = set(section) - set(PIPELINE_KEYS)
    if unknown:
        raise UserError(f"params.yaml tune has unknown key(s): {', '.join(sorted(unknown))}")
    return section
