"""Frozen observations on disk: what the prepare stage writes and the optimize stage reads.

One folder per (task, variant, image)::

    clean.png         the clean image, cropped to multiples of 32 (8-bit)
    observation.npy   the observation y = A(x) in float32 (a noisy image is not 8-bit)
    observation.png   an 8-bit preview of it
    mask.png          inpainting only (the task's files, Degradation.save): 255 = kept
    meta.json         task, degradation parameters (Degradation.params), source, sha256s

Storing the draw (noise, mask) rather than re-drawing it makes every method see the same y.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.degradations import MASK_FILE, TASKS
from pipeline.errors import UserError
from pipeline.imageio import load_image, save_image, write_bytes_atomic
from pipeline.layout import prepared_dir
from pipeline.problem import Problem
from pipeline.results import read_json, staged_folder, write_json
from pipeline.settings import parse_variant, task_class, task_variants, variant_name

META_FILE = "meta.json"
OBSERVATION_FILE = "observation.npy"
PREPARED_FILES = (META_FILE, OBSERVATION_FILE, "observation.png", "clean.png", MASK_FILE)
"""Every file a prepared observation may hold: a rewrite removes the ones it does not make."""


def _sha256(array: np.ndarray) -> str:
    """sha256 of the observation's float32 values (C order), as stored in ``meta.json``."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def write_observation(folder: Path, problem: Problem, meta: dict[str, Any]) -> dict[str, Any]:
    """Write one prepared observation, all files or none (a staged folder renamed at the end);
    returns the meta data written."""
    array = problem.observation[0].cpu().numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    full = {
        **meta,
        "task": problem.task.name,
        "params": problem.task.params(),
        "observation_sha256": _sha256(array),
    }
    with staged_folder(folder, replaces=PREPARED_FILES) as staging:
        write_bytes_atomic(staging / OBSERVATION_FILE, buffer.getvalue())
        save_image(staging / "observation.png", problem.observation)
        if problem.clean is not None:
            save_image(staging / "clean.png", problem.clean)
        problem.task.save(staging)
        write_json(staging / META_FILE, full)
    return full


def read_observation(folder: Path) -> tuple[Problem, dict[str, Any]]:
    """Read a prepared observation back into a :class:`Problem` (with its clean image), checked
    against the sha256 recorded when it was written."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"no prepared observation in {folder} (run the prepare stage first)")
    meta = read_json(meta_path, "params", "rerun prepare")
    array_path = folder / OBSERVATION_FILE
    try:
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{array_path} is not a readable observation ({err})") from err
    if _sha256(array) != meta.get("observation_sha256"):
        raise UserError(
            f"{array_path} does not match the observation_sha256 of {meta_path}: it changed after "
            "it was prepared; rerun the prepare stage"
        )
    observation = torch.from_numpy(array)[None]
    cls = TASKS.get(str(meta.get("task")))
    if cls is None:
        raise UserError(f"{meta_path} names an unknown task {meta.get('task')!r}")
    task = cls.load(dict(meta["params"]), folder)
    clean_path = folder / "clean.png"
    clean = load_image(clean_path) if clean_path.is_file() else None
    return Problem(task, observation, clean), meta


def read_prepared(
    params: dict[str, Any], task: str, image: str, variant: str | None = None
) -> tuple[Problem, dict[str, Any], str]:
    """The prepared observation of ``image`` under params.yaml's ``params``: its problem, meta
    data and variant folder. ``variant`` is a value (``25``) or a folder name (``sigma25``); None
    means the task's first variant."""
    if variant is None and task_class(task).variant is not None:
        variant = str(task_variants(params, task)[0])
    name = variant_name(task, parse_variant(task, variant))
    folder = prepared_dir(task, name, image)
    if not folder.is_dir():
        raise UserError(f"no prepared observation of {image!r} in {folder} (run prepare first)")
    problem, meta = read_observation(folder)
    return problem, meta, name
