"""The pipeline's settings (``params.yaml``): loading, profiles, and what one fit is given.

Layout of ``params.yaml`` (each stage reads its own section)::

    profile: cpu                  # which file of profiles/ params.yaml was made from
    data:    {source, root, resize, crop}        # prepare
    tasks:   {<task>: {images, <degradation>, fit}}   # prepare (degradation), optimize (fit)
    fit:     {...}                # optimize: pipeline.fit.FitConfig + pipeline.model.DecoderConfig
    methods: {<method>: {...}}    # optimize: the three compared methods
    sweeps:  {...}                # optimize (λ and σ sweeps for the figures)
    evaluate: {...}               # evaluate: stopping rules applied to the logged curves

The fit of one (task, method) merges, later winning: ``fit`` < ``tasks.<task>.fit`` <
``methods.<method>``, where a method's ``lam: task`` takes the task's λ for that upsampler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
TASK_VARIANTS = {"denoising": "sigma", "deblocking": "quality", "sr": "factor"}
"""The degradation parameter a task is swept over (one observation per value)."""


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


def variant_name(task: str, value: object | None) -> str:
    """Folder name of one observation variant: ``sigma25``, ``quality10``, ``factor4``, ``default``."""
    key = TASK_VARIANTS.get(task)
    if key is None or value is None:
        return "default"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{key}{text}"


def task_variants(params: dict[str, Any], task: str) -> list[object | None]:
    """The values of the task's variant parameter (``[None]`` for tasks with one variant)."""
    key = TASK_VARIANTS.get(task)
    if key is None:
        return [None]
    values = section(params, "tasks", task).get(f"{key}s")
    if not isinstance(values, list) or not values:
        raise UserError(f"params.yaml tasks.{task}.{key}s must be a non-empty list")
    return values


def fit_settings(params: dict[str, Any], task: str, method: str) -> dict[str, Any]:
    """The flat fit settings of one (task, method): ``fit`` < task's ``fit`` < method."""
    task_fit = dict(section(params, "tasks", task).get("fit") or {})
    method_values = dict(section(params, "methods", method))
    lam_key = "lam_gaussian" if method_values.get("upsample") == "gaussian" else "lam"
    lam_gaussian = task_fit.pop("lam_gaussian", None)
    if method_values.get("lam") == "task":
        method_values["lam"] = lam_gaussian if lam_key == "lam_gaussian" else task_fit.get("lam")
        if method_values["lam"] is None:
            raise UserError(f"params.yaml tasks.{task}.fit has no {lam_key} for method {method}")
    return {**dict(section(params, "fit")), **task_fit, **method_values}


def write_params_atomic(path: Path, params: dict[str, Any], header: str = "") -> None:
    from pipeline.imageio import write_bytes_atomic

    text = header + yaml.safe_dump(params, sort_keys=False, width=100)
    write_bytes_atomic(path, text.encode())
