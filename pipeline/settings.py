"""The pipeline's settings (``params.yaml``): loading, profiles, and what one fit is given.

Layout of ``params.yaml`` (each stage reads its own section)::

    profile: cpu                  # which file of profiles/ params.yaml was made from
    data:    {source, root, resize, crop}        # prepare
    tasks:   {<task>: {images, observe, fit}}    # prepare (images, observe), optimize (fit)
    fit:     {...}                # optimize: pipeline.fit.FitConfig + pipeline.model.DecoderConfig
    stopping: {ratio, es_wmv, es_emv}   # optimize (and, through each fit's summary, evaluate)
    methods: {<method>: {...}}    # optimize: the three compared methods
    sweeps:  {...}                # optimize (λ and σ sweeps for the figures)

The paper's settings live in the code: :class:`pipeline.fit.FitConfig`'s defaults, and each task's
own in its :class:`pipeline.degradations.Degradation` (``defaults``). A profile overrides them.
The fit of one (task, method, image) merges, later winning: ``stopping`` (flattened, see
:class:`pipeline.stopping.StoppingConfig`) < the task's defaults < ``fit`` < ``tasks.<task>.fit``
< ``tasks.<task>.fit.per_image.<image>`` < ``methods.<method>``, where a method's ``lam: task``
takes the task's (or the image's) λ for that upsampler and a setting ``tuned`` the image's value
from ``tuned/<task>/<variant>/<image>/values.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.degradations import TASKS, Degradation
from pipeline.errors import UserError
from pipeline.layout import CHECKPOINT_EVERY, TUNED, tuned_values_path
from pipeline.stopping import StoppingConfig

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
TUNED_VALUE = "tuned"
"""A setting whose value is ``tuned`` takes the image's tuned value (``sdip tune``)."""


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a :class:`UserError`."""
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError as err:
        raise UserError(f"settings file not found: {path}") from err
    except yaml.YAMLError as err:
        raise UserError(f"settings file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"settings file {path} must hold a mapping")
    return data


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    return load_yaml(path)


def section(params: dict[str, Any], *keys: str) -> Any:
    """``params[k1][k2]...``; a missing key is a :class:`UserError` naming its path."""
    value: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"params.yaml has no {'.'.join(keys[: depth + 1])}")
        value = value[key]
    return value


def task_class(task: str) -> type[Degradation]:
    """The degradation class of ``task`` (:data:`pipeline.degradations.TASKS`)."""
    cls = TASKS.get(task)
    if cls is None:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return cls


def variant_name(task: str, value: object | None) -> str:
    """Folder of one observation variant: ``sigma25``, ``quality10``, ``factor4``, ``default``."""
    key = task_class(task).variant
    if key is None or value is None:
        return "default"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{key}{text}"


def parse_variant(task: str, text: str | None) -> object | None:
    """A variant named on the command line by its value (``25``) or its folder (``sigma25``)."""
    if text is None or text == "default":
        return None
    key = task_class(task).variant
    if key is not None and text.startswith(key):
        text = text[len(key) :]
    return yaml.safe_load(text)


def task_variants(params: dict[str, Any], task: str) -> list[object | None]:
    """The values of the task's variant parameter (``[None]`` for tasks with one variant)."""
    listed = task_class(task).variant_list
    if listed is None:
        return [None]
    values = (section(params, "tasks", task).get("observe") or {}).get(listed)
    if not isinstance(values, list) or not values:
        raise UserError(f"params.yaml tasks.{task}.observe.{listed} must be a non-empty list")
    return values


def task_lam(values: dict[str, Any], upsample: object) -> dict[str, Any]:
    """``values`` (a task's fit settings) with its ``lam_gaussian`` taken as λ for Gaussian
    upsampling and dropped: the one rule for "the task's λ for this upsampler"."""
    values = dict(values)
    lam_gaussian = values.pop("lam_gaussian", None)
    if upsample == "gaussian" and lam_gaussian is not None:
        values["lam"] = lam_gaussian
    return values


def standalone_settings(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The flat fit settings of a fit outside the pipeline (``sdip fit``, ``sdip tune`` on a
    file): the task's defaults (:attr:`Degradation.defaults`) < the given ``options``."""
    given = {k: v for k, v in options.items() if v is not None}
    return {**task_lam(task_class(task).defaults, given.get("upsample")), **given}


def fit_settings(
    params: dict[str, Any],
    task: str,
    method: str,
    image: str | None = None,
    variant: str = "default",
    overrides: dict[str, Any] | None = None,
    tuned_root: Path = TUNED,
) -> dict[str, Any]:
    """The flat fit settings of one (task, method, image), later winning: the flattened
    ``stopping`` section < the task's defaults (:attr:`Degradation.defaults`) < ``fit`` < the
    task's ``fit`` < the image's entry of the task's ``per_image`` < method < ``overrides``.

    A method's ``lam: task`` takes the task's λ for the method's upsampler (:func:`task_lam`);
    a value ``tuned`` of any setting takes the image's tuned value (:func:`tuned_values_path`).
    """
    task_fit = dict(section(params, "tasks", task).get("fit") or {})
    task_fit.update(_per_image(params, task, task_fit.pop("per_image", None), image))
    task_values = {**task_class(task).defaults, **task_fit}
    method_values = {**dict(section(params, "methods", method)), **(overrides or {})}
    if method_values.get("lam") == "task":
        method_values["lam"] = task_lam(task_values, method_values.get("upsample"))["lam"]
    wanted = [key for key, value in method_values.items() if value == TUNED_VALUE]
    if wanted:
        if image is None:
            raise UserError(f"method {method} uses tuned {', '.join(wanted)}: name the image")
        path = tuned_values_path(task, variant, image, tuned_root)
        if not path.is_file():
            raise UserError(
                f"method {method} uses tuned {', '.join(wanted)} but {path} does not exist "
                f"(run: sdip tune {task} {image} --variant {variant})"
            )
        tuned = load_yaml(path)
        for key in wanted:
            if key not in tuned:
                raise UserError(f"{path} has no tuned {key} (tuned: {', '.join(tuned)})")
            method_values[key] = tuned[key]
    stopping = StoppingConfig.flatten(params.get("stopping"))
    defaults = task_lam(task_class(task).defaults, None)
    return {
        **stopping,
        **defaults,
        **dict(section(params, "fit")),
        **task_lam(task_fit, None),
        **method_values,
    }


def _per_image(
    params: dict[str, Any], task: str, per_image: object, image: str | None
) -> dict[str, Any]:
    """The image's entry of ``tasks.<task>.fit.per_image`` (settings that differ per image, such as
    λ, which the paper tunes per image); every entry must name one of the task's images."""
    if per_image is None:
        return {}
    where = f"params.yaml tasks.{task}.fit.per_image"
    if not isinstance(per_image, dict) or not all(isinstance(v, dict) for v in per_image.values()):
        raise UserError(f"{where} must map image names to settings, e.g. {{coffee: {{lam: 0.95}}}}")
    images = section(params, "tasks", task).get("images") or []
    unknown = sorted(set(per_image) - set(images))
    if unknown:
        raise UserError(f"{where} names {', '.join(unknown)}, not in tasks.{task}.images")
    return dict(per_image.get(image) or {}) if image is not None else {}


def write_params_atomic(path: Path, params: dict[str, Any], header: str = "") -> None:
    from pipeline.imageio import write_bytes_atomic

    text = header + yaml.safe_dump(params, sort_keys=False, width=100)
    write_bytes_atomic(path, text.encode())


def checkpoint_every(params: dict[str, Any]) -> int:
    """Iterations between two checkpoints of a running fit: params.yaml's ``checkpoints.every``
    (:data:`pipeline.layout.CHECKPOINT_EVERY` when absent). It changes no result, so no stage
    declares it as a parameter."""
    every = (params.get("checkpoints") or {}).get("every", CHECKPOINT_EVERY)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(f"params.yaml checkpoints.every must be an integer >= 1, got {every!r}")
    return every
