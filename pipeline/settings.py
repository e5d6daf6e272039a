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
from pipeline.errors import (
    LocatedSettings,
    SettingError,
    UserError,
    check_int,
    check_number,
    located,
)
from pipeline.layout import CHECKPOINT_EVERY, TUNED, tuned_values_path
from pipeline.stopping import SECTION_RULES, StoppingConfig

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
TUNED_VALUE = "tuned"
"""A setting whose value is ``tuned`` takes the image's tuned value (``sdip tune``)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the
    last one silently, and DVC's reader (ruamel) refuses the file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first at line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or malformed file (a key given twice too) is a
    :class:`UserError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)
    except FileNotFoundError as err:
        raise UserError(f"settings file not found: {path}") from err
    except OSError as err:
        raise UserError(f"settings file {path} is not readable: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"settings file {path} is not UTF-8 text ({err.reason})") from err
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"settings file {path} is not valid YAML{where}: {first}") from err
    if not isinstance(data, dict):
        raise UserError(f"settings file {path} must hold a mapping, not {type(data).__name__}")
    return data


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml, checked (:func:`check_params`)."""
    params = load_yaml(path)
    check_params(params)
    return params


def check_params(params: dict[str, Any]) -> None:
    """Refuse a params.yaml value that a stage would trip over, naming its path
    (``params.yaml data.resize``): the image sizes, every task's degradation parameters and
    variants, the stopping rules, the sweeps, the checkpoint interval, the tuning batch, the FBC
    thresholds and the phenomena's margins. Fit settings are checked where a fit's are composed
    (:func:`fit_settings`), so that each names its own place."""
    _check_sizes(_mapping(params.get("data"), "data"), "data")
    for task, entry in _mapping(params.get("tasks"), "tasks").items():
        _check_task(params, task, _mapping(entry, f"tasks.{task}"))
    _check_stopping(params.get("stopping"))
    sweeps = _mapping(params.get("sweeps"), "sweeps")
    for key in ("iterations", "batch"):
        if key in sweeps:
            check_int(f"params.yaml sweeps.{key}", sweeps[key], 1)
    for key, minimum in (("lam", None), ("gauss_sigma", 0)):
        for index, value in enumerate(_list(sweeps.get(key), f"sweeps.{key}")):
            check_number(f"params.yaml sweeps.{key}[{index}]", value, minimum)
    checkpoint_every(params)
    tune = _mapping(params.get("tune"), "tune")
    if "batch" in tune:
        check_int("params.yaml tune.batch", tune["batch"], 1)
    fbc = _mapping(params.get("fbc"), "fbc")
    for index, value in enumerate(_list(fbc.get("thresholds"), "fbc.thresholds")):
        check_number(f"params.yaml fbc.thresholds[{index}]", value, maximum=1, above=0)
    checked = _mapping(_mapping(params.get("aggregate"), "aggregate").get("phenomena"), "")
    for key in PHENOMENA_MARGINS:
        if key in checked:
            check_number(f"params.yaml aggregate.phenomena.{key}", checked[key], 0)


PHENOMENA_MARGINS = ("min_baseline_drop", "max_controlled_drop", "max_stop_gap")
"""The numeric margins of params.yaml ``aggregate.phenomena`` (dB)."""


def _mapping(value: object, where: str) -> dict[str, Any]:
    """``value`` when it is a mapping, ``{}`` when absent; anything else names ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"params.yaml {where} must be a mapping, got {value!r}")
    return value


def _list(value: object, where: str) -> list[Any]:
    """``value`` when it is a list, ``[]`` when absent; anything else names ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"params.yaml {where} must be a list, got {value!r}")
    return value


def _check_sizes(section: dict[str, Any], where: str) -> None:
    """``resize`` (short side) and ``crop`` (square side): null or an integer >= 1."""
    for key in ("resize", "crop"):
        if section.get(key) is not None:
            check_int(f"params.yaml {where}.{key}", section[key], 1)


def _check_task(params: dict[str, Any], task: str, entry: dict[str, Any]) -> None:
    """One ``tasks.<task>`` entry: a known task whose observation settings make a degradation
    for every value of its variant."""
    if task not in TASKS:
        raise UserError(f"params.yaml tasks.{task}: unknown task; valid: {', '.join(TASKS)}")
    cls = TASKS[task]
    where = f"tasks.{task}.observe"
    observe = _mapping(entry.get("observe"), where)
    _check_sizes(observe, where)
    if observe.get("channels") not in (None, 1, 3):
        raise UserError(f"params.yaml {where}.channels must be 1, 3 or null")
    base = {k: observe[k] for k in cls.parameters() if k in observe and k not in cls.files}
    for index, value in enumerate(task_variants(params, task)):
        values = base if value is None else {**base, cls.variant: value}
        try:
            cls(**values)
        except SettingError as err:
            key = err.setting
            path = f"{cls.variant_list}[{index}]" if key == cls.variant else key
            raise UserError(f"params.yaml {where}.{path}: {err}") from err


def _check_stopping(section: object) -> None:
    try:
        StoppingConfig(**StoppingConfig.flatten(section))  # type: ignore[arg-type]
    except SettingError as err:
        raise located(err, _stopping_origins(section)) from err


def _stopping_origins(section: object) -> LocatedSettings:
    """Where params.yaml's ``stopping`` section wrote each flat setting (``ratio_eps`` →
    ``params.yaml stopping.ratio.eps``)."""
    flat = StoppingConfig.flatten(section)  # type: ignore[arg-type]
    origins = {}
    for rule, prefix in SECTION_RULES.items():
        for name in flat:
            if name.startswith(f"{prefix}_"):
                origins[name] = f"params.yaml stopping.{rule}.{name[len(prefix) + 1 :]}"
    return LocatedSettings(flat, origins)


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


def standalone_settings(task: str, options: dict[str, Any]) -> LocatedSettings:
    """The flat fit settings of a fit outside the pipeline (``sdip fit``, ``sdip tune`` on a
    file): the task's defaults (:attr:`Degradation.defaults`) < the given ``options``, each
    located at its option (``--lr``)."""
    given = {k: v for k, v in options.items() if v is not None}
    values = {**task_lam(task_class(task).defaults, given.get("upsample")), **given}
    return LocatedSettings(values, {k: f"--{k.replace('_', '-')}" for k in given})


def fit_settings(
    params: dict[str, Any],
    task: str,
    method: str,
    image: str | None = None,
    variant: str = "default",
    overrides: dict[str, Any] | None = None,
    tuned_root: Path = TUNED,
) -> LocatedSettings:
    """The flat fit settings of one (task, method, image), later winning: the flattened
    ``stopping`` section < the task's defaults (:attr:`Degradation.defaults`) < ``fit`` < the
    task's ``fit`` < the image's entry of the task's ``per_image`` < method < ``overrides``.

    A method's ``lam: task`` takes the task's λ for the method's upsampler (:func:`task_lam`);
    a value ``tuned`` of any setting takes the image's tuned value (:func:`tuned_values_path`).
    Each setting remembers where it was written, so that a bad value names its place
    (``params.yaml tasks.sr.fit.lr``) when :meth:`pipeline.fit.FitConfig.from_dict` refuses it.
    """
    where = f"params.yaml tasks.{task}.fit"
    task_fit = dict(_mapping(section(params, "tasks", task).get("fit"), f"tasks.{task}.fit"))
    task_origins = {key: f"{where}.{key}" for key in task_fit}
    own = _per_image(params, task, task_fit.pop("per_image", None), image)
    task_fit.update(own)
    task_origins.update({key: f"{where}.per_image.{image}.{key}" for key in own})
    task_values = {**task_class(task).defaults, **task_fit}
    methods = _mapping(section(params, "methods", method), f"methods.{method}")
    method_values = {**methods, **(overrides or {})}
    method_origins = {key: f"params.yaml methods.{method}.{key}" for key in methods}
    method_origins.update({key: f"command line {key}" for key in overrides or {}})
    if method_values.get("lam") == "task":
        upsample = method_values.get("upsample")
        method_values["lam"] = task_lam(task_values, upsample)["lam"]
        gaussian = upsample == "gaussian" and task_values.get("lam_gaussian") is not None
        lam_key = "lam_gaussian" if gaussian else "lam"
        method_origins["lam"] = task_origins.get(lam_key, f"the task's default {lam_key}")
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
            method_origins[key] = f"{path} {key}"
    fit = _mapping(section(params, "fit"), "fit")
    stopping = _stopping_origins(params.get("stopping"))
    return _merged(
        (stopping, stopping.origins),
        (task_lam(task_class(task).defaults, None), {}),
        (fit, {key: f"params.yaml fit.{key}" for key in fit}),
        (task_lam(task_fit, None), task_origins),
        (method_values, method_origins),
    )


def _merged(*layers: tuple[dict[str, Any], dict[str, str]]) -> LocatedSettings:
    """``(values, origins)`` layers merged, later winning, each value keeping its own origin."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer, where in layers:
        values.update(layer)
        for key in layer:
            if key in where:
                origins[key] = where[key]
            else:
                origins.pop(key, None)
    return LocatedSettings(values, origins)


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
    every = _mapping(params.get("checkpoints"), "checkpoints").get("every", CHECKPOINT_EVERY)
    return check_int("params.yaml checkpoints.every", every, 1)
