"""``sdip prepare TASK``: freeze the observations of one task (DVC stage ``prepare``).

Reads ``data``, ``tasks.TASK.images`` and ``tasks.TASK.observe`` from params.yaml (the
degradation, its variants, the image ``set`` folders, ``channels``, and ``resize``/``crop``
winning over ``data``'s); for every variant (σ, JPEG quality, SR factor)
and image writes ``data/prepared/TASK/<variant>/<image>/`` (see :mod:`pipeline.observations`).
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.datasets import resolve_images
from pipeline.degradations import TASKS
from pipeline.layout import PREPARED, prepared_dir
from pipeline.observations import write_observation
from pipeline.problem import simulate
from pipeline.settings import TASK_VARIANTS, load_params, section, task_variants, variant_name

DEGRADATION_KEYS = {
    "denoising": ("seed",),
    "deblocking": (),
    "inpainting": ("p", "seed"),
    "sr": ("phase",),
    "enhancement": ("gain", "signed"),
}
"""The keys of ``tasks.<task>.observe`` passed to the task's degradation (besides its variant)."""


@click.command("prepare")
@click.argument("task", type=click.Choice(sorted(TASKS)))
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--out", "out_root", default=str(PREPARED), show_default=True)
def prepare_command(task: str, params_file: str, out_root: str) -> None:
    """Make and store the frozen observations of TASK for every image and variant."""
    params = load_params(params_file)
    data = section(params, "data")
    names = list(section(params, "tasks", task, "images"))
    observe = dict(section(params, "tasks", task).get("observe") or {})
    images = resolve_images(data, observe.get("set", task), names)
    masks = None
    if task == "inpainting" and observe.get("masks"):
        masks = {m.name: m for m in resolve_images(data, observe["masks"], names)}
    base = {k: observe[k] for k in DEGRADATION_KEYS[task] if k in observe}
    count = 0
    for value in task_variants(params, task):
        degradation = dict(base)
        if value is not None:
            degradation[TASK_VARIANTS[task]] = value
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
            folder = prepared_dir(task, variant_name(task, value), image.name, Path(out_root))
            meta = {
                "task": task,
                "variant": variant_name(task, value),
                "image": image.name,
                "set": image.set,
                "source": str(image.path),
                "source_sha256": image.sha256,
                "params": degradation,
                "clean_shape": list(problem.clean.shape) if problem.clean is not None else None,
            }
            write_observation(folder, problem, meta)
            count += 1
    click.echo(f"prepared {count} {task} observation(s) in {Path(out_root) / task}")
