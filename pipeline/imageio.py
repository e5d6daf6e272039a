"""Reading and writing images and inpainting masks as ``(1, C, H, W)`` float tensors in [0, 1].

Conventions (method spec §1, experiments spec "Tasks"):

- Images are ``float32`` tensors of shape ``(1, C, H, W)`` with values in [0, 1], ``C`` = 1 (grey)
  or 3 (RGB). 8-bit files are divided by 255, 16-bit files by 65535.
- The network's output is 32 × its input size, so images are centre-cropped to multiples of 32
  (:func:`center_crop_to_multiple`). The crop starts at ``top = (H - H') // 2`` and
  ``left = (W - W') // 2``: when the surplus is odd, the extra row/column is dropped at the
  bottom/right.
- Masks are ``float32`` tensors of shape ``(1, 1, H, W)`` with 1 = pixel kept (observed) and
  0 = pixel missing (to be filled in). Both mask formats of the paper's data use this convention:
  the Bernoulli ``.h5`` masks (dataset ``mask``, ``int64`` 0/1, shape ``1 × H × W``, ≈50 % ones)
  and the region masks ``vase_mask.png`` / ``library_mask.png`` (8-bit grey, 255 = kept, 0 = the
  hole; ≈97 % and ≈81 % kept).
- A mask is checked against the FULL (uncropped) image size and then cropped with the same
  :func:`crop_box` as the image: ``center_crop_to_multiple(load_mask(p, H, W))``.
"""

import os
import secrets
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

GREY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.5870, 0.1140)
"""RGB → grey weights, the same as the spectral measures (method spec §4, step 1)."""

MIN_SIZE: int = 32
"""Smallest accepted image side in pixels: one 32 × 32 block of the decoder (method spec §1)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_EIGHT_BIT_MAX = 255.0
_SIXTEEN_BIT_MAX = 65535.0


def _read_pixels(path: Path, what: str) -> np.ndarray:
    """Decode ``path`` into a float32 array in [0, 1], ``(H, W)`` for grey or ``(H, W, 3)``."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return _pixels_of(im, path, what)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{what} is not a readable image: {path} ({exc})") from exc


def _pixels_of(im: Image.Image, path: Path, what: str) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "LA"):
        return np.asarray(im.getchannel("L"), dtype=np.float32) / _EIGHT_BIT_MAX
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(im).astype(np.float32) / _SIXTEEN_BIT_MAX
    if mode == "I":
        values = np.asarray(im)
        if values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX:
            # 32-bit integer files have no agreed white level; only the 16-bit range is unambiguous.
            raise UserError(f"{what} has 32-bit values outside 0..65535: {path}")
        return values.astype(np.float32) / _SIXTEEN_BIT_MAX
    if mode == "F":
        raise UserError(
            f"{what} has floating-point pixels (mode F), which are not supported: {path}"
        )
    # RGB, RGBA, RGBX, P, PA, CMYK, YCbCr: Pillow's conversion drops alpha and resolves palettes.
    return np.asarray(im.convert("RGB"), dtype=np.float32) / _EIGHT_BIT_MAX


def rgb_to_grey(x: torch.Tensor) -> torch.Tensor:
    """``g = 0.2989 R + 0.5870 G + 0.1140 B`` on ``(..., 3, H, W)``, keeping the channel axis.

    The weights sum to 0.9999, so ``g`` stays in [0, 1] for inputs in [0, 1].
    """
    w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(dim=-3, keepdim=True)


def load_image(path: str | os.PathLike[str], channels: int | None = None) -> torch.Tensor:
    """Read an image file as a ``(1, C, H, W)`` float32 tensor in [0, 1].

    Grey files (modes ``1``, ``L``, ``LA``, ``I;16``, ``I``) give ``C = 1``; colour files (``RGB``,
    ``RGBA``, ``P``, ...) give ``C = 3`` with alpha dropped. An RGB file stays RGB even when its
    channels are equal. ``channels=1`` converts RGB to grey with :data:`GREY_WEIGHTS`,
    ``channels=3`` replicates a grey channel; ``None`` keeps what the file has.

    Raises:
        UserError: the file is missing or not a readable image, ``channels`` is not 1, 3 or None,
            or a side is shorter than :data:`MIN_SIZE` pixels.
    """
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1, 3 or None, got {channels!r}")
    path = Path(path)
    pixels = _read_pixels(path, "image")
    height, width = pixels.shape[:2]
    if height < MIN_SIZE or width < MIN_SIZE:
        raise UserError(
            f"image {path} is {height}×{width} px (height×width); "
            f"the minimum is {MIN_SIZE} px on each side"
        )
    x = torch.from_numpy(pixels)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if channels == 1 and x.shape[0] == 3:
        x = rgb_to_grey(x)
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.unsqueeze(0).contiguous()


def crop_box(height: int, width: int, multiple: int = 32) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the centred crop of an ``height × width`` image to multiples.

    ``h = multiple · ⌊height / multiple⌋``, ``top = (height − h) // 2`` (same for the width), so
    an odd surplus drops the extra row/column at the bottom/right.

    Raises:
        UserError: ``multiple < 1`` or a side shorter than ``multiple``.
    """
    if multiple < 1:
        raise UserError(f"crop multiple must be at least 1, got {multiple}")
    if height < multiple or width < multiple:
        raise UserError(
            f"image of {height}×{width} px (height×width) is smaller than the crop multiple "
            f"{multiple}"
        )
    h = height - height % multiple
    w = width - width % multiple
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_to_multiple(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Centre-crop the last two axes of ``x`` to multiples of ``multiple`` (method spec §1).

    Offsets follow :func:`crop_box`; images and their masks cropped with this function stay aligned.
    """
    top, left, h, w = crop_box(x.shape[-2], x.shape[-1], multiple)
    return x[..., top : top + h, left : left + w]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``round(255 · clip(x, 0, 1))`` as ``uint8``: ``(H, W)`` for one channel, else ``(H, W, C)``.

    Accepts ``(1, C, H, W)`` or ``(C, H, W)`` with ``C`` = 1 or 3. Rounding is half-to-even, so an
    8-bit image read by :func:`load_image` comes back exactly.
    """
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected a batch of one image, got shape {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(
            f"expected (1, C, H, W) or (C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}"
        )
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("image has non-finite values")
    pixels = x.clamp(0.0, 1.0).mul(_EIGHT_BIT_MAX).round().to(torch.uint8).numpy()
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file; the parent folder is created if needed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open applies the umask, unlike tempfile's 0o600, so the result has ordinary permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_image(path: str | os.PathLike[str], x: torch.Tensor) -> None:
    """Save a ``(1, C, H, W)`` or ``(C, H, W)`` image in [0, 1] as an 8-bit grey or RGB PNG.

    Values are clipped to [0, 1] and rounded (:func:`to_uint8`); the write is atomic
    (:func:`write_bytes_atomic`).

    Raises:
        UserError: ``path`` does not end in ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"images are saved as PNG; the file name must end in .png: {path}")
    buffer = BytesIO()
    Image.fromarray(to_uint8(x)).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def _read_h5_mask(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as fh:
            dataset = fh.get("mask")
            if not isinstance(dataset, h5py.Dataset):
                raise UserError(f"mask file has no dataset 'mask': {path}")
            values = np.asarray(dataset[()])
    except OSError as exc:
        raise UserError(f"mask is not a readable HDF5 file: {path} ({exc})") from exc
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise UserError(f"mask dataset in {path} has shape {values.shape}; expected 1×H×W or H×W")
    if not np.isin(values, (0, 1)).all():
        raise UserError(f"mask dataset in {path} must hold only 0 and 1")
    return values.astype(np.float32)


def load_mask(path: str | os.PathLike[str], height: int, width: int) -> torch.Tensor:
    """Read an inpainting mask of the full (uncropped) ``height × width`` image, 1 = kept.

    ``.h5``/``.hdf5``: dataset ``mask`` of shape ``1 × H × W`` or ``H × W`` holding 0/1.
    Any other file is read as an image, converted to grey (:data:`GREY_WEIGHTS`) and thresholded:
    kept where the value is > 0.5 after normalising to [0, 1] (255 = kept for 8-bit masks).
    Crop the result with :func:`center_crop_to_multiple`, exactly like the image.

    Returns:
        ``(1, 1, height, width)`` float32 tensor of 0s and 1s.

    Raises:
        UserError: the file is missing or unreadable, has no dataset ``mask``, holds values other
            than 0/1 (HDF5), or its size differs from ``height × width``.
    """
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        if not path.is_file():
            raise UserError(f"mask not found: {path}")
        values = _read_h5_mask(path)
    else:
        pixels = _read_pixels(path, "mask")
        grey = pixels if pixels.ndim == 2 else pixels @ np.asarray(GREY_WEIGHTS, np.float32)
        values = (grey > 0.5).astype(np.float32)
    if values.shape != (height, width):
        raise UserError(
            f"mask {path} is {values.shape[0]}×{values.shape[1]} px but the image is "
            f"{height}×{width} px (height×width)"
        )
    return torch.from_numpy(np.ascontiguousarray(values)).view(1, 1, height, width)
