"""``sdip prepare TASK``: freeze the observations of one task (DVC stage ``prepare``).

Reads ``data``, ``tasks.TASK.images`` and ``tasks.TASK.observe`` from params.yaml: the task's
degradation parameters (those of its :class:`~pipeline.degradations.Degradation`), the values of
its variant (σ, JPEG quality, SR factor), the image ``set`` folders and ``masks`` folders (the mask
of image ``x`` is ``x_mask.*`` or ``x.*`` there), ``channels``, and
``resize``/``crop`` winning over ``data``'s. Writes ``data/prepared/TASK/<variant>/<image>/`` for
every variant and image (:mod:`pipeline.observations`).
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.datasets import resolve_images
from pipeline.layout import PREPARED, prepared_dir
from pipeline.observations import write_observation
from pipeline.problem import simulate
from pipeline.settings import load_params, section, task_class, task_variants, variant_name
from stages.options import TaskName


@click.command("prepare")
@click.argument("task", type=TaskName())
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--out", "out_root", default=str(PREPARED), show_default=True)
def prepare_command(task: str, params_file: str, out_root: str) -> None:
    """Make and store the frozen observations of TASK for every image and variant."""
    params = load_params(params_file)
    data = section(params, "data")
    cls = task_class(task)
    names = list(section(params, "tasks", task, "images"))
    observe = dict(section(params, "tasks", task).get("observe") or {})
    images = resolve_images(data, observe.get("set", task), names)
    masks = None
    if cls.takes_mask and observe.get("masks"):
        found = resolve_images(data, observe["masks"], names, suffixes=("_mask", ""))
        masks = {mask.name: mask for mask in found}
    base = {k: observe[k] for k in cls.parameters() if k in observe and k not in cls.files}
    count = 0
    for value in task_variants(params, task):
        degradation = dict(base) if value is None else {**base, cls.variant: value}
        variant = variant_name(task, value)
        for image in images:
            problem = simulate(
                task,
                image.path,
                degradation,
                mask_path=None if masks is None else masks[image.name].path,
                channels=observe.get("channels"),
                short_side=observe.get("resize", data.get("resize")),
                crop=observe.get("crop", data.get("crop")),
            )
            meta = {
                "variant": variant,
                "image": image.name,
                "set": image.set,
                "source": str(image.path),
                "source_sha256": image.sha256,
                "clean_shape": list(problem.clean.shape) if problem.clean is not None else None,
            }
            write_observation(
                prepared_dir(task, variant, image.name, Path(out_root)), problem, meta
            )
            count += 1
    click.echo(f"prepared {count} {task} observation(s) in {Path(out_root) / task}")
