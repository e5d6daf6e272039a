"""Frozen observations on disk: what the prepare stage writes and the optimize stage reads.

One folder per (task, variant, image)::

    clean.png         the clean image, cropped to multiples of 32 (8-bit)
    observation.npy   the observation y = A(x) in float32 (a noisy image is not 8-bit)
    observation.png   an 8-bit preview of it
    mask.png          inpainting only: 255 = kept
    meta.json         task, degradation parameters, source and observation sha256

Storing the draw (noise, mask) rather than re-drawing it makes every method see the same y.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.degradations import Degradation, Inpainting, make_degradation
from pipeline.errors import UserError
from pipeline.imageio import load_image, save_image, write_bytes_atomic
from pipeline.problem import Problem
from pipeline.results import write_json

META_FILE = "meta.json"


def write_observation(folder: Path, problem: Problem, meta: dict[str, Any]) -> dict[str, Any]:
    """Write one prepared observation; returns the meta data written."""
    folder.mkdir(parents=True, exist_ok=True)
    array = problem.observation[0].cpu().numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(folder / "observation.npy", buffer.getvalue())
    save_image(folder / "observation.png", problem.observation)
    if problem.clean is not None:
        save_image(folder / "clean.png", problem.clean)
    if isinstance(problem.task, Inpainting):
        save_image(folder / "mask.png", problem.task.mask)
    full = {**meta, "observation_sha256": hashlib.sha256(array.tobytes()).hexdigest()}
    write_json(folder / META_FILE, full)
    return full


def read_observation(folder: Path) -> tuple[Problem, dict[str, Any]]:
    """Read a prepared observation back into a :class:`Problem` (with its clean image)."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"no prepared observation in {folder} (run the prepare stage first)")
    meta = json.loads(meta_path.read_text())
    observation = torch.from_numpy(np.load(folder / "observation.npy"))[None]
    params = dict(meta["params"])
    if meta["task"] == "inpainting":
        mask = load_image(folder / "mask.png")
        params = {"mask": (mask > 0.5).float()}
    task: Degradation = make_degradation(meta["task"], **params)
    clean_path = folder / "clean.png"
    clean = load_image(clean_path) if clean_path.is_file() else None
    return Problem(task, observation, clean), meta
