"""Reading and writing images and inpainting masks as ``(1, C, H, W)`` float tensors in [0, 1].

Conventions (method spec §1, experiments spec "Tasks"):

- Images are ``float32`` tensors of shape ``(1, C, H, W)`` with values in [0, 1], ``C`` = 1 (grey)
  or 3 (RGB). 8-bit files are divided by 255, 16-bit files by 65535.
- The network's output is 32 × its input size, so an image is either centre-cropped to multiples
  of 32 (:func:`center_crop_to_multiple`, the paper's protocol) or padded to them by reflection
  (:func:`pad_box`, :func:`reflect_pad`) and the outputs cropped back (:func:`crop`). The crop
  starts at ``top = (H - H') // 2`` and ``left = (W - W') // 2``: when the surplus is odd, the
  extra row/column is dropped at the bottom/right; padding puts the extra row/column there too.
- A file whose pixels are converted on reading (alpha dropped, a palette looked up, 16 bits,
  CMYK, an EXIF rotation) gets a one-line note on stderr (:func:`pipeline.errors.note`).
- Masks are ``float32`` tensors of shape ``(1, 1, H, W)`` with 1 = pixel kept (observed) and
  0 = pixel missing (to be filled in). Both mask formats of the paper's data use this convention:
  the Bernoulli ``.h5`` masks (dataset ``mask``, ``int64`` 0/1, shape ``1 × H × W``, ≈50 % ones)
  and the region masks ``vase_mask.png`` / ``library_mask.png`` (8-bit grey, 255 = kept, 0 = the
  hole; ≈97 % and ≈81 % kept).
- A mask is checked against the FULL (uncropped) image size and then cropped or padded with the
  same box as the image: ``center_crop_to_multiple(load_mask(p, H, W))``.
"""

import os
import secrets
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import UserError, note, write_failure

GREY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.5870, 0.1140)
"""RGB → grey weights, the same as the spectral measures (method spec §4, step 1)."""

EXIF_ORIENTATION = 0x0112
"""The EXIF tag saying how a camera photo must be turned to stand upright (values 2..8)."""

Box = tuple[int, int, int, int]
"""``(top, left, height, width)`` of a rectangle of pixels."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_EIGHT_BIT_MAX = 255.0
_SIXTEEN_BIT_MAX = 65535.0


def _read_pixels(path: Path, what: str) -> np.ndarray:
    """Decode ``path`` into a float32 array in [0, 1], ``(H, W)`` for grey or ``(H, W, 3)``; a
    conversion that drops or changes information gets a note."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        with Image.open(path) as im:
            sixteen = any(";16" in str(tile.args) for tile in im.tile)
            frames = getattr(im, "n_frames", 1)
            im.load()
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
            pixels, changes = _pixels_of(ImageOps.exif_transpose(im) if turned else im, path, what)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{what} is not a readable image: {path} ({exc})") from exc
    if sixteen and im.mode in ("RGB", "RGBA"):
        changes.append("16-bit colour read at 8 bits per channel")
    if frames > 1:
        changes.append(f"the first of its {frames} frames used")
    if turned:
        changes.append("turned upright as its EXIF orientation says")
    if changes:
        note(f"{what} {path} is mode {im.mode}: {'; '.join(changes)}")
    return pixels


_MODE_CHANGES = {
    "1": "bilevel, read as grey 0/1",
    "LA": "alpha dropped, read as grey",
    "I": "32-bit integers read as 16-bit grey (0..65535 = black..white)",
    "RGBA": "alpha dropped, read as RGB",
    "RGBa": "alpha dropped, read as RGB",
    "P": "palette looked up, read as RGB",
    "PA": "palette looked up and alpha dropped, read as RGB",
    "CMYK": "converted to RGB without a colour profile",
    "YCbCr": "converted to RGB",
}
"""What reading a file of each mode changes (modes absent here are read unchanged: L, RGB,
RGBX), as said in the note."""


def _pixels_of(im: Image.Image, path: Path, what: str) -> tuple[np.ndarray, list[str]]:
    """The pixels of ``im`` in [0, 1] and what reading them changed (for the note)."""
    mode = im.mode
    changes = [_MODE_CHANGES[mode]] if mode in _MODE_CHANGES else []
    if mode == "P" and "transparency" in im.info:
        changes = ["palette looked up and transparency dropped, read as RGB"]
    if mode == "1":
        return np.asarray(im, dtype=np.float32), changes
    if mode in ("L", "LA"):
        return np.asarray(im.getchannel("L"), dtype=np.float32) / _EIGHT_BIT_MAX, changes
    if mode in _SIXTEEN_BIT_MODES:
        # Full precision in the fit; the restored images are written with 8 bits.
        changes.append("16-bit grey; the restored images are saved with 8 bits")
        return np.asarray(im).astype(np.float32) / _SIXTEEN_BIT_MAX, changes
    if mode == "I":
        values = np.asarray(im)
        if values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX:
            # 32-bit integer files have no agreed white level; only the 16-bit range is unambiguous.
            raise UserError(f"{what} has 32-bit values outside 0..65535: {path}")
        return values.astype(np.float32) / _SIXTEEN_BIT_MAX, changes
    if mode == "F":
        raise UserError(
            f"{what} has floating-point pixels (mode F), which are not supported: {path}"
        )
    # RGB, RGBA, RGBX, P, PA, CMYK, YCbCr: Pillow's conversion drops alpha and resolves palettes.
    return np.asarray(im.convert("RGB"), dtype=np.float32) / _EIGHT_BIT_MAX, changes


def rgb_to_grey(x: torch.Tensor) -> torch.Tensor:
    """``g = 0.2989 R + 0.5870 G + 0.1140 B`` on ``(..., 3, H, W)``, keeping the channel axis.

    The weights sum to 0.9999, so ``g`` stays in [0, 1] for inputs in [0, 1].
    """
    w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(dim=-3, keepdim=True)


def load_image(path: str | os.PathLike[str], channels: int | None = None) -> torch.Tensor:
    """Read an image file as a ``(1, C, H, W)`` float32 tensor in [0, 1].

    Grey files (modes ``1``, ``L``, ``LA``, ``I;16``, ``I``) give ``C = 1``; colour files (``RGB``,
    ``RGBA``, ``P``, ...) give ``C = 3`` with alpha dropped; a file with an EXIF orientation is
    turned upright. An RGB file stays RGB even when its channels are equal. ``channels=1``
    converts RGB to grey with :data:`GREY_WEIGHTS`, ``channels=3`` replicates a grey channel;
    ``None`` keeps what the file has. Sizes are checked where the image meets the network
    (:mod:`pipeline.problem`).

    Raises:
        UserError: the file is missing or not a readable image, or ``channels`` is not 1, 3 or
            None.
    """
    if isinstance(channels, bool) or channels not in (None, 1, 3):
        raise UserError(f"channels must be 1, 3 or None, got {channels!r}")
    path = Path(path)
    pixels = _read_pixels(path, "image")
    x = torch.from_numpy(pixels)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if channels == 1 and x.shape[0] == 3:
        x = rgb_to_grey(x)
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.unsqueeze(0).contiguous()


def crop_box(height: int, width: int, multiple: int = 32) -> Box:
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


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    """The pixels of ``box`` = ``(top, left, h, w)`` of the last two axes of ``x``."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]


def center_crop_to_multiple(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Centre-crop the last two axes of ``x`` to multiples of ``multiple`` (method spec §1).

    Offsets follow :func:`crop_box`; images and their masks cropped with this function stay aligned.
    """
    return crop(x, crop_box(x.shape[-2], x.shape[-1], multiple))


def pad_box(height: int, width: int, multiple: int, minimum: int) -> Box:
    """``(top, left, H, W)``: the smallest ``H × W`` canvas of multiples of ``multiple``, at least
    ``minimum`` a side, that holds an ``height × width`` image, and where the image sits in it.

    ``H = max(minimum, multiple · ⌈height / multiple⌉)``, ``top = (H − height) // 2`` (same for the
    width), so an odd surplus puts the extra row/column at the bottom/right, as :func:`crop_box`.

    Raises:
        UserError: a side is shorter than ``multiple``: a reflection (:func:`reflect_pad`) is at
            most the image's own size, and a smaller image would be mostly invented pixels.
    """
    if height < multiple or width < multiple:
        raise UserError(
            f"image of {height}×{width} px (height×width) is smaller than {multiple} px, the "
            "network's multiple; padding it by reflection would invent most of the fit"
        )
    padded_h = max(minimum, -(-height // multiple) * multiple)
    padded_w = max(minimum, -(-width // multiple) * multiple)
    return (padded_h - height) // 2, (padded_w - width) // 2, padded_h, padded_w


def reflect_pad(x: torch.Tensor, box: Box) -> torch.Tensor:
    """``x`` mirrored (without repeating its edge pixels) into the canvas of :func:`pad_box`:
    ``box = (top, left, H, W)`` puts ``x`` at ``(top, left)`` of an ``H × W`` result."""
    top, left, padded_h, padded_w = box
    height, width = x.shape[-2:]
    pads = (left, padded_w - width - left, top, padded_h - height - top)
    if not any(pads):
        return x
    # reflection padding is defined for float maps of 3 or 4 axes
    flat = x.reshape(-1, 1, height, width).float()
    padded = torch.nn.functional.pad(flat, pads, mode="reflect")
    return padded.reshape(*x.shape[:-2], padded_h, padded_w).to(x.dtype)


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


class WriteError(UserError):
    """A file that could not be written: :attr:`path` and the system's :attr:`reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
        self.reason = reason


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file; the parent folder is created if needed. A failed
    write (disk full, no permission) leaves nothing behind and is a :class:`WriteError`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open applies the umask, unlike tempfile's 0o600: the result has ordinary permissions.
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
    except OSError as err:
        raise WriteError(path, write_failure(err)) from err


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
    kept where the value is > 0.5 after normalising to [0, 1] (255 = kept for 8-bit masks); a
    mask with grey levels between black and white gets a note saying so.
    Crop the result with :func:`center_crop_to_multiple`, exactly like the image.

    Returns:
        ``(1, 1, height, width)`` float32 tensor of 0s and 1s.

    Raises:
        UserError: the file is missing or unreadable, has no dataset ``mask``, holds values other
            than 0/1 (HDF5), is dark but not black (an image mask saved as 0/1 instead of
            0/255), or its size differs from ``height × width``.
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
        brightest = float(grey.max())
        if 0 < brightest <= 0.5:
            raise UserError(
                f"mask {path} has no pixel brighter than half white (its brightest is "
                f"{brightest * 255:.0f} of 255), so it would keep nothing: white = kept, black = "
                "missing; a 0/1 mask must be saved as 0/255"
            )
        # on the 8-bit scale, where the grey of white RGB (weights summing to 0.9999) is white
        levels = np.unique(np.round(grey * _EIGHT_BIT_MAX))
        if not np.isin(levels, (0, _EIGHT_BIT_MAX)).all():
            note(f"mask {path} has {levels.size} grey levels; brighter than half white = kept")
    if values.shape != (height, width):
        raise UserError(
            f"mask {path} is {values.shape[0]}×{values.shape[1]} px but the image is "
            f"{height}×{width} px (height×width)"
        )
    return torch.from_numpy(np.ascontiguousarray(values)).view(1, 1, height, width)
