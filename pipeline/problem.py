"""One restoration problem: a forward operator, its observation and, when known, the clean image.

Two ways in, sharing one rule for how an image of any size meets the network, whose outputs are
multiples of 32 = 2^depth (:class:`FitSize`):

- ``crop`` (the paper's protocol, the pipeline's ``prepare``): centre-crop the image to multiples
  of 32; the outputs are the crop.
- ``pad`` (``sdip fit``, ``sdip tune`` on a file): mirror the image into the smallest canvas the
  network can output, fit that, and cut the outputs back (:attr:`Problem.region`), so the user
  gets the whole image, at its own size.

- :func:`simulate` — research: place a clean image, degrade it with the task's seeded operator.
- :func:`observed` — a user's own degraded photo: place it so that the output size is a multiple
  of 32 and fit it directly; there is no clean image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.degradations import TASKS, Degradation, make_degradation
from pipeline.errors import UserError, check_choice, check_int, note
from pipeline.imageio import (
    Box,
    center_crop_to_multiple,
    crop,
    load_image,
    load_mask,
    pad_box,
    reflect_pad,
)

OUTPUT_MULTIPLE = 32
"""The default decoder's output multiple, 2^5 (:func:`pipeline.model.output_grid`)."""
OUTPUT_MINIMUM = 64
"""The default decoder's smallest output side, 2 · 2^5 with reflection padding
(:func:`pipeline.model.output_grid`)."""
FIT_SIZES = ("pad", "crop")


@dataclass(frozen=True)
class FitSize:
    """How an image of any size is given to a network whose output sides are multiples of
    ``multiple``, at least ``minimum`` (:func:`pipeline.model.output_grid` of its settings):
    ``crop`` centre-crops it to multiples (:func:`pipeline.imageio.crop_box`); ``pad`` mirrors it
    into the smallest such canvas (:func:`pipeline.imageio.pad_box`). Either refuses a side shorter
    than ``multiple``."""

    mode: str = "pad"
    multiple: int = OUTPUT_MULTIPLE
    minimum: int = OUTPUT_MINIMUM

    def __post_init__(self) -> None:
        check_choice("fit size", self.mode, FIT_SIZES)
        check_int("output multiple", self.multiple, 1)
        check_int("smallest output side", self.minimum, 1)

    def of_photo(self, task: Degradation) -> FitSize:
        """The same rule for a photo the task's output is a multiple of (super-resolution: a
        low-resolution photo, ``factor`` times smaller)."""
        multiple = task.photo_multiple(self.multiple)
        return FitSize(self.mode, multiple, -(-self.minimum * multiple // self.multiple))

    def place(self, image: Tensor) -> tuple[Tensor, Box | None]:
        """``image`` cropped or padded, and where it sits in the result (``None``: the whole
        result, as after a crop or when nothing was padded)."""
        height, width = image.shape[-2:]
        if self.mode == "crop":
            return center_crop_to_multiple(image, self.multiple), None
        box = pad_box(height, width, self.multiple, self.minimum)
        if box[2:] == (height, width):
            return image, None
        return reflect_pad(image, box), (box[0], box[1], height, width)


@dataclass
class Problem:
    """``observation = task.observe(clean)``; ``clean`` is None for a real degraded photo.

    ``region`` is where the user's image lies in the network's output (``(top, left, height,
    width)``, output pixels) when it was padded (:class:`FitSize`); None means the whole output.
    The clean image, like the observation, is the padded one.
    """

    task: Degradation
    observation: Tensor
    clean: Tensor | None
    region: Box | None = None

    def crop_output(self, x: Tensor) -> Tensor:
        """An image of the network's output size cut to the user's image."""
        return x if self.region is None else crop(x, self.region)

    def observed_part(self) -> Tensor:
        """The observation's pixels that cover the user's image: the region scaled to the
        observation's grid (super-resolution: ``factor`` times coarser), rounded outwards."""
        rows, cols = self._observed_box()
        return self.observation[..., rows, cols]

    def observed_mask(self) -> Tensor:
        """(1, 1, h, w) on the observation's grid: 1 on :meth:`observed_part`, 0 on padding."""
        mask = torch.zeros_like(self.observation[:, :1])
        rows, cols = self._observed_box()
        mask[..., rows, cols] = 1.0
        return mask

    def _observed_box(self) -> tuple[slice, slice]:
        if self.region is None:
            return slice(None), slice(None)
        out_h, out_w = self.task.output_shape(self.observation)
        obs_h, obs_w = self.observation.shape[-2:]
        top, left, height, width = self.region
        rows = slice(top * obs_h // out_h, -(-(top + height) * obs_h // out_h))
        cols = slice(left * obs_w // out_w, -(-(left + width) * obs_w // out_w))
        return rows, cols


def _task(
    task: str,
    params: dict[str, object],
    mask_path: str | os.PathLike[str] | None,
    image: Tensor,
    size: FitSize,
) -> Degradation:
    """The degradation of ``task``; a mask file (of the full image) is placed like the image."""
    params = dict(params)
    if mask_path is not None:
        cls = TASKS.get(task)
        if cls is None or not cls.takes_mask:
            raise UserError(f"a mask is only used by tasks that take one, not by {task!r}")
        full = load_mask(mask_path, image.shape[-2], image.shape[-1])
        if bool(full.all()):
            note(f"mask {mask_path} keeps every pixel: there is nothing to fill in")
        params["mask"] = size.place(full)[0]
        try:
            return make_degradation(task, **params)
        except UserError as err:
            raise UserError(f"mask {mask_path}: {err}") from err
    return make_degradation(task, **params)


def _placed(
    image: Tensor, path: str | os.PathLike[str], size: FitSize
) -> tuple[Tensor, Box | None]:
    """:meth:`FitSize.place` of the image read from ``path``, saying what happened to it."""
    height, width = image.shape[-2:]
    try:
        placed, region = size.place(image)
    except UserError as err:
        raise UserError(f"image {path}: {err}") from err
    new_h, new_w = placed.shape[-2:]
    name = Path(path).name
    if size.mode == "crop" and (new_h, new_w) != (height, width):
        note(f"{name} is {height}×{width} px: centre-cropped to {new_h}×{new_w} px")
    elif region is not None:
        note(
            f"{name} is {height}×{width} px: fitted at {new_h}×{new_w} px, padded by "
            f"reflection; the outputs are cut back to {height}×{width} px"
        )
    return placed, region


def shrink(image: Tensor, short_side: int | None, crop: int | None) -> Tensor:
    """Reduce an image for quick runs: resize so its short side is ``short_side`` (antialiased
    bicubic, rounded to 8 bits like a saved image), then centre-crop a ``crop`` square."""
    if short_side is not None:
        check_int("resize", short_side, 1)
        height, width = image.shape[-2:]
        scale = short_side / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
        image = (image.clamp(0, 1) * 255).round() / 255
    if crop is not None:
        check_int("crop", crop, 1)
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
    size: FitSize = FitSize("crop"),
) -> Problem:
    """Load a clean image, optionally :func:`shrink` it, place it (``size``: centre-cropped to
    multiples of 32 by default, the paper's protocol) and degrade it with ``task``. A mask file
    must have the size of the (shrunk) image."""
    image = shrink(load_image(image_path, channels), short_side, crop)
    clean, region = _placed(image, image_path, size)
    degradation = _task(task, params or {}, mask_path, image, size)
    # the observation must be whole at every size the network outputs (SR: factor | multiple)
    degradation.photo_multiple(size.multiple)
    return Problem(degradation, degradation.observe(clean), clean, region)


def observed(
    task: str,
    image_path: str | os.PathLike[str],
    params: dict[str, object] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    size: FitSize = FitSize(),
) -> Problem:
    """Use a degraded photo as the observation (no clean image, so no PSNR against it).

    The photo is placed (``size``: padded by default) so that the network's output size is a
    multiple of 32 (:meth:`FitSize.of_photo`: for super-resolution the low-resolution photo's
    multiple is ``32 / factor``).
    """
    image = load_image(image_path, channels)
    photo_size = size.of_photo(make_degradation(task, **_without_mask(params)))
    photo, region = _placed(image, image_path, photo_size)
    degradation = _task(task, params or {}, mask_path, image, photo_size)
    observation = degradation.observation_of_photo(photo)
    if region is not None:
        scale = degradation.output_shape(observation)[0] // observation.shape[-2]
        region = (region[0] * scale, region[1] * scale, region[2] * scale, region[3] * scale)
    return Problem(degradation, observation, None, region)


def _without_mask(params: dict[str, object] | None) -> dict[str, object]:
    return {k: v for k, v in (params or {}).items() if k != "mask"}


def load_problem(
    task: str,
    image_path: str | os.PathLike[str],
    params: dict[str, object] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    is_observed: bool = False,
    size: FitSize = FitSize(),
) -> Problem:
    """A problem from a user's image file: :func:`observed` for a photo, else :func:`simulate`;
    padded to the network's sizes by default (``size``), so the outputs have the file's size."""
    if is_observed:
        return observed(task, image_path, params, mask_path, channels, size)
    return simulate(task, image_path, params, mask_path, channels, size=size)
