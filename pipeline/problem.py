"""One restoration problem: a forward operator, its observation and, when known, the clean image.

Two ways in, sharing the cropping rules (every network output is a multiple of 32 = 2^depth):

- :func:`simulate` — research: crop a clean image, degrade it with the task's seeded operator.
- :func:`observed` — a user's own degraded photo: crop it so that the output size is a multiple
  of 32 and fit it directly; there is no clean image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from pipeline.degradations import TASKS, Degradation, make_degradation
from pipeline.errors import UserError
from pipeline.imageio import center_crop_to_multiple, load_image, load_mask

OUTPUT_MULTIPLE = 32


@dataclass
class Problem:
    """``observation = task.observe(clean)``; ``clean`` is None for a real degraded photo."""

    task: Degradation
    observation: Tensor
    clean: Tensor | None


def _task(
    task: str,
    params: dict[str, object],
    mask_path: str | os.PathLike[str] | None,
    image: Tensor,
    multiple: int,
) -> Degradation:
    """The degradation of ``task``; a mask file (of the full image) is cropped like the image."""
    params = dict(params)
    if mask_path is not None:
        cls = TASKS.get(task)
        if cls is None or not cls.takes_mask:
            raise UserError(f"a mask is only used by tasks that take one, not by {task!r}")
        full = load_mask(mask_path, image.shape[-2], image.shape[-1])
        params["mask"] = center_crop_to_multiple(full, multiple)
    return make_degradation(task, **params)


def shrink(image: Tensor, short_side: int | None, crop: int | None) -> Tensor:
    """Reduce an image for quick runs: resize so its short side is ``short_side`` (antialiased
    bicubic, rounded to 8 bits like a saved image), then centre-crop a ``crop`` square."""
    if short_side is not None:
        height, width = image.shape[-2:]
        scale = short_side / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
        image = (image.clamp(0, 1) * 255).round() / 255
    if crop is not None:
        height, width = image.shape[-2:]
        if crop > min(height, width):
            raise UserError(f"crop {crop} is larger than the image ({height}×{width})")
        top, left = (height - crop) // 2, (width - crop) // 2
        image = image[..., top : top + crop, left : left + crop]
    return image


def simulate(
    task: str,
    image_path: str | os.PathLike[str],
    params: dict[str, object] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    short_side: int | None = None,
    crop: int | None = None,
) -> Problem:
    """Load a clean image, optionally :func:`shrink` it, centre-crop it to multiples of 32, and
    degrade it with ``task``. A mask file must have the size of the (shrunk) image."""
    image = shrink(load_image(image_path, channels), short_side, crop)
    degradation = _task(task, params or {}, mask_path, image, OUTPUT_MULTIPLE)
    clean = center_crop_to_multiple(image, OUTPUT_MULTIPLE)
    return Problem(degradation, degradation.observe(clean), clean)


def observed(
    task: str,
    image_path: str | os.PathLike[str],
    params: dict[str, object] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    channels: int | None = None,
) -> Problem:
    """Use a degraded photo as the observation (no clean image, so no PSNR against it).

    The photo is centre-cropped so that the network's output size is a multiple of 32
    (:meth:`~pipeline.degradations.Degradation.photo_multiple`: for super-resolution the
    low-resolution photo is cropped to multiples of ``32 / factor``).
    """
    image = load_image(image_path, channels)
    multiple = make_degradation(task, **_without_mask(params)).photo_multiple(OUTPUT_MULTIPLE)
    degradation = _task(task, params or {}, mask_path, image, multiple)
    photo = center_crop_to_multiple(image, multiple)
    return Problem(degradation, degradation.observation_of_photo(photo), None)


def _without_mask(params: dict[str, object] | None) -> dict[str, object]:
    return {k: v for k, v in (params or {}).items() if k != "mask"}


def load_problem(
    task: str,
    image_path: str | os.PathLike[str],
    params: dict[str, object] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    is_observed: bool = False,
) -> Problem:
    """A problem from an image file: :func:`observed` for a photo, else :func:`simulate`."""
    make = observed if is_observed else simulate
    return make(task, image_path, params, mask_path, channels)
