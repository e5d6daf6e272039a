"""Image measures: frequency-band correspondence, blur, sharpness, PSNR and SSIM.

Every function takes batched ``(B, C, H, W)`` floating tensors with values in [0, 1] (C = 1 or 3),
returns one value per batch item (``(B,)``, or ``(B, bands)`` for FBC) in the input's dtype, and
runs entirely on the input's device without host synchronisation: no ``.item()``, no copies to the
host, no Python branching on tensor values. That lets the fitting loop log these measures every
iteration without stalling an accelerator. They are differentiable; when only logging, call them
under ``torch.no_grad()`` (or on a detached output) so no graph is kept.

Formulas follow the project spec (``method.md`` §4 FBC, §5 blurriness and sharpness;
``experiments.md`` protocols), which describes Shi et al., "On Measuring and Controlling the
Spectral Bias of the Deep Image Prior", IJCV 2022, including the reference code's quirks.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
"""R, G, B weights of the grayscale conversion (method.md §4 step 1)."""

FBC_EPS = 1e-8
"""Added to the reference magnitude spectrum in the FBC ratio (method.md §4 step 3)."""

BLUR_KERNEL = 9
"""Length of the Crété-Roffet re-blur box filter (method.md §5)."""

SHARPNESS_RANKS = (2, 1000)
"""First and last (inclusive, 0-based) sorted rank kept by the sharpness measure (method.md §5)."""

SHARPNESS_DECAY = 0.01
"""The value at 0-based rank k is weighted by exp(-SHARPNESS_DECAY * k) (method.md §5)."""

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise UserError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise UserError(f"{name} must have 1 or 3 channels, got {x.shape[1]}")


def _check_pair(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Both valid images of equal (C, H, W) and dtype; the reference batch is B or 1."""
    _check_image(x, name)
    _check_image(ref, ref_name)
    if x.shape[1:] != ref.shape[1:] or ref.shape[0] not in (1, x.shape[0]):
        raise UserError(
            f"{ref_name} of shape {tuple(ref.shape)} does not match {name} of shape "
            f"{tuple(x.shape)} (need equal C, H, W and a batch of {x.shape[0]} or 1)"
        )
    if ref.dtype != x.dtype:
        raise UserError(f"{ref_name} dtype {ref.dtype} differs from {name} dtype {x.dtype}")


def _check_min_size(x: torch.Tensor, name: str, min_h: int, min_w: int, measure: str) -> None:
    if x.shape[2] < min_h or x.shape[3] < min_w:
        raise UserError(
            f"{name} of size {x.shape[2]}x{x.shape[3]} (HxW) is too small for {measure}: "
            f"it needs at least {min_h}x{min_w}"
        )


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Grayscale image ``g = clip(0.2989 R + 0.5870 G + 0.1140 B, 0, 1)`` (method.md §4 step 1).

    Args:
        x: ``(B, C, H, W)`` image, C = 1 or 3.

    Returns:
        ``(B, 1, H, W)``; a 1-channel image is returned unchanged (not clipped).
    """
    _check_image(x, "image")
    if x.shape[1] == 1:
        return x
    wr, wg, wb = GRAY_WEIGHTS
    g = wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]
    return g.clamp(0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _fbc_band_matrix(
    height: int, width: int, bands: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaging matrix from the half (rfft2) spectrum to the FBC band means.

    Bands are defined on the fftshift-ed full spectrum (method.md §4 step 4). For a real image
    ``|F(u, v)| = |F(-u, -v)|``, so each full-spectrum position is mapped to the rfft2 position
    holding the same magnitude; the FFT, the ratio and the reduction then touch half the data and
    the reduction is a single matmul. Built on the host from the shape alone, cached per
    (shape, bands, device), in float64.

    Returns:
        ``matrix`` of shape ``(H * (W // 2 + 1), bands)`` whose column k holds 1/|band k| at the
        positions of band k (summed over mirror pairs), and ``empty`` of shape ``(bands,)``: NaN
        for a band that contains no frequency, 0 otherwise (added to the means).
    """
    cy, cx = height // 2, width // 2
    rows = np.arange(height, dtype=np.float64)[:, None]
    cols = np.arange(width, dtype=np.float64)[None, :]
    dist = np.sqrt((cols - cx) ** 2 + (rows - cy) ** 2)
    radii = np.array([cx * (k / bands) for k in range(1, bands + 1)], dtype=np.float64)
    # 0-based band i satisfies radii[i-1] < d <= radii[i] (d <= radii[0] for i = 0); i == bands
    # means beyond the last radius, in no band.
    band_shifted = np.searchsorted(radii, dist, side="left")
    band = np.fft.ifftshift(band_shifted)

    half = width // 2 + 1
    i = np.arange(height)[:, None].repeat(width, axis=1)
    j = np.arange(width)[None, :].repeat(height, axis=0)
    mirrored = j >= half
    ri = np.where(mirrored, (-i) % height, i)
    rj = np.where(mirrored, (-j) % width, j)
    rpos = (ri * half + rj).ravel()
    band = band.ravel()

    inside = band < bands
    counts = np.bincount(band[inside], minlength=bands).astype(np.float64)
    flat = np.bincount(
        rpos[inside] * bands + band[inside],
        weights=1.0 / np.maximum(counts, 1.0)[band[inside]],
        minlength=height * half * bands,
    )
    matrix = torch.from_numpy(flat.reshape(height * half, bands)).to(device=device)
    empty = torch.from_numpy(np.where(counts == 0, np.nan, 0.0)).to(device=device)
    return matrix, empty


def fbc(output: torch.Tensor, reference: torch.Tensor, bands: int = 5) -> torch.Tensor:
    """Frequency-band correspondence of ``output`` to ``reference`` (method.md §4).

    With ``g`` the grayscale image and ``F(g) = |fftshift(fft2(g))|``::

        R(u, v) = clip(F(g_out)(u, v) / (F(g_ref)(u, v) + 1e-8), 0, 1)
        d(u, v) = distance to the centre (int(W/2), int(H/2))    (column, row)
        r_k     = int(W/2) * k / bands,  k = 1..bands
        FBC_k   = mean of R over band k:  d <= r_1 for k = 1,  r_{k-1} < d <= r_k otherwise

    Quirks kept from the reference: the radii come from the width only, so for a tall image the
    bands are circles of the width's scale, and frequencies with ``d > int(W/2)`` (the corners)
    belong to no band. A band that contains no frequency (only for tiny widths, e.g. W = 4 with
    5 bands) is NaN, the mean of nothing.

    Args:
        output: ``(B, C, H, W)`` network output.
        reference: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference; per the spec this is the degraded
            observation (optionally the clean image for a second reading).
        bands: number of bands.

    Returns:
        ``(B, bands)``, each value in [0, 1].
    """
    _check_pair(output, reference, "output", "reference")
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise UserError(f"bands must be a positive integer, got {bands!r}")
    height, width = output.shape[2:]
    matrix, empty = _fbc_band_matrix(height, width, bands, output.device)
    mag_out = torch.fft.rfft2(grayscale(output)[:, 0]).abs()
    mag_ref = torch.fft.rfft2(grayscale(reference)[:, 0]).abs()
    ratio = (mag_out / (mag_ref + FBC_EPS)).clamp(0.0, 1.0)
    # Accumulate the band means in float64: a float32 sum over ~10^5 ratios drifts by ~1e-6.
    means = ratio.flatten(1).double() @ matrix + empty
    return means.to(output.dtype)


def _box_same(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-filled 'same' convolution of ``(B, 1, H, W)`` with a ones/9 box along ``dim``."""
    size = (BLUR_KERNEL, 1) if dim == 2 else (1, BLUR_KERNEL)
    half = BLUR_KERNEL // 2
    padding = (half, 0) if dim == 2 else (0, half)
    weight = torch.full((1, 1, *size), 1.0 / BLUR_KERNEL, dtype=g.dtype, device=g.device)
    return F.conv2d(g, weight, padding=padding)


def first_difference(a: torch.Tensor, axis: int) -> torch.Tensor:
    """``|a ∗ [1, −1]|`` along ``axis`` (1 = rows, 2 = columns) of a ``(B, H, W)`` array as the
    zero-filled 'same' convolution of the reference (``scipy.signal.convolve2d(a, [[1, −1]],
    "same")`` or its transpose), then trimmed by 1 pixel on every side (method.md §5).

    The 'same' output of an even kernel starts at the full convolution's first value, so index 0
    holds ``a[0]`` and index i ``a[i] − a[i−1]``; the trim drops index 0, which keeps the
    difference of rows (columns) 0 and 1: the result is ``(H − 2, W − 2)``.
    """
    padding = (0, 0, 1, 0) if axis == 1 else (1, 0)
    return F.pad(a, padding).diff(dim=axis).abs()[:, 1:-1, 1:-1]


def _blur_gray(g: torch.Tensor) -> torch.Tensor:
    start, end = math.ceil(BLUR_KERNEL / 2), BLUR_KERNEL // 2
    height, width = g.shape[2:]
    trimmed = g[:, 0, start : height - end, start : width - end]
    per_direction = []
    for dim in (2, 3):
        reblurred = _box_same(g, dim)[:, 0, start : height - end, start : width - end]
        d_f = first_difference(trimmed, dim - 1)
        d_b = first_difference(reblurred, dim - 1)
        d_v = (d_f - d_b).clamp_min(0.0)
        sum_f = d_f.sum(dim=(1, 2))
        per_direction.append((sum_f - d_v.sum(dim=(1, 2))) / sum_f)
    return torch.maximum(*per_direction)


BLUR_MIN_SIZE = 12
"""Smallest H and W the blur measure accepts: trims of 5 + 4, then 1 + 1 of the differences,
leave 1."""


def blur(x: torch.Tensor) -> torch.Tensor:
    """No-reference perceptual blurriness of Crété-Roffet et al. 2007 (method.md §5).

    On the grayscale image ``g`` (channel 0 of a 1-channel image), per direction (vertical = along
    H, horizontal = along W):

    1. re-blur ``g`` with a 9-tap box along that direction, normalised (ones/9), as a zero-filled
       'same' convolution (``scipy.signal.convolve2d(g, h, mode="same")``);
    2. trim ``g`` and the re-blurred image to rows and columns ``5 .. N-5`` (ceil(9/2) dropped at
       the start, floor(9/2) at the end of each axis);
    3. ``D_F = |first difference of g|``, ``D_B = |first difference of the re-blurred image|``
       along the direction, as the zero-filled 'same' convolution with ``[1, −1]``
       (:func:`first_difference`: index 0 holds the first pixel, index i the difference of
       pixels i and i − 1), both then trimmed by 1 pixel on every side;
    4. ``D_V = max(D_F - D_B, 0)``, ``b = (sum D_F - sum D_V) / sum D_F``.

    ``B = max(b_vertical, b_horizontal)`` in [0, 1]; higher is blurrier. A constant image
    (``sum D_F = 0``) gives NaN.

    Args:
        x: ``(B, C, H, W)`` image, H and W at least :data:`BLUR_MIN_SIZE`.

    Returns:
        ``(B,)``.
    """
    _check_image(x, "image")
    _check_min_size(x, "image", BLUR_MIN_SIZE, BLUR_MIN_SIZE, "the blur measure")
    return _blur_gray(grayscale(x))


_NEIGHBOUR_OFFSETS = tuple((dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1))
"""Offsets of the 8 neighbours inside a 1-pixel zero-padded array."""


def _sharpness_gray(g: torch.Tensor) -> torch.Tensor:
    height, width = g.shape[2:]
    # Quirk (method.md §5): only rows and columns 2..N-2 are kept and every neighbour outside that
    # block reads as 0, as in the reference's zero-filled shifted copies.
    kept = g[:, 0, 2 : height - 1, 2 : width - 1]
    padded = F.pad(kept, (1, 1, 1, 1))
    h, w = kept.shape[1:]
    neighbours = [padded[:, dy : dy + h, dx : dx + w] for dy, dx in _NEIGHBOUR_OFFSETS]
    neighbour_max = functools.reduce(torch.maximum, neighbours)
    variation = (neighbour_max - kept).flatten(1)

    first, last = SHARPNESS_RANKS
    top = min(last + 1, variation.shape[1])
    ranked = torch.topk(variation, top, dim=1, sorted=True).values[:, first:]
    ranks = torch.arange(first, top, dtype=g.dtype, device=g.device)
    weighted = ranked * torch.exp(-SHARPNESS_DECAY * ranks)
    return weighted.square().mean(dim=1).sqrt()


SHARPNESS_MIN_SIZE = 4
"""Smallest H and W the sharpness measure accepts (a kept block of at least 1 pixel per axis)."""


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Sharpness as the maximum local variation of Bahrami & Kot 2014 (method.md §5).

    On the grayscale image ``g`` (channel 0 of a 1-channel image):

    1. keep the block of rows ``2 .. H-2`` and columns ``2 .. W-2`` (0-based, inclusive);
    2. for each kept pixel, ``v = max over its 8 neighbours of (neighbour - centre)``, where a
       neighbour outside the kept block reads as 0 (quirk: the reference's zero-filled shifted
       copies, so on the block's border rows and columns some differences are ``-centre``);
    3. sort ``v`` descending (a top-k: only the first 1001 ranks matter), weight the value at
       0-based rank k by ``exp(-0.01 k)``;
    4. ``S = sqrt(mean of the squared weighted values at ranks 2..1000)`` (999 values; quirk: the
       reference drops the first element twice).

    An image whose kept block has fewer than 1001 pixels (N of them) uses ranks ``2 .. N-1``;
    fewer than 3 kept pixels leave no rank and raise :class:`UserError`.

    Args:
        x: ``(B, C, H, W)`` image.

    Returns:
        ``(B,)``, non-negative.
    """
    _check_image(x, "image")
    _check_min_size(x, "image", SHARPNESS_MIN_SIZE, SHARPNESS_MIN_SIZE, "the sharpness measure")
    kept_pixels = (x.shape[2] - 3) * (x.shape[3] - 3)
    if kept_pixels <= SHARPNESS_RANKS[0]:
        raise UserError(
            f"image of size {x.shape[2]}x{x.shape[3]} (HxW) is too small for the sharpness "
            f"measure: its kept block has {kept_pixels} pixels, it needs at least "
            f"{SHARPNESS_RANKS[0] + 1}"
        )
    return _sharpness_gray(grayscale(x))


def blur_sharpness_ratio(x: torch.Tensor) -> torch.Tensor:
    """Stopping statistic ``r = B(x) / S(x)`` (method.md §5), both on the grayscale image.

    Args:
        x: ``(B, C, H, W)`` image, H and W at least :data:`BLUR_MIN_SIZE`.

    Returns:
        ``(B,)``.
    """
    _check_image(x, "image")
    _check_min_size(x, "image", BLUR_MIN_SIZE, BLUR_MIN_SIZE, "the blur/sharpness ratio")
    g = grayscale(x)
    return _blur_gray(g) / _sharpness_gray(g)


def _check_data_range(data_range: float) -> None:
    if not data_range > 0:
        raise UserError(f"data_range must be positive, got {data_range!r}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` over all channels.

    The denoising/deblocking/inpainting protocol of experiments.md: all channels, no border shave.
    Identical images (MSE = 0) give ``+inf``.

    Args:
        x: ``(B, C, H, W)`` estimate.
        ref: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference.
        data_range: peak value (1 for images in [0, 1]).

    Returns:
        ``(B,)`` in dB.
    """
    _check_pair(x, ref, "image", "reference")
    _check_data_range(data_range)
    mse = (x - ref).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """Luma of the SR protocol: ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255``.

    That is the BT.601 weights 0.299/0.587/0.114 scaled to [16, 235]/255 (experiments.md,
    super-resolution protocol). No rounding to 8 bits.

    Args:
        x: ``(B, C, H, W)`` image in [0, 1].

    Returns:
        ``(B, 1, H, W)``; a 1-channel image is returned unchanged.
    """
    _check_image(x, "image")
    if x.shape[1] == 1:
        return x
    y = 65.481 * x[:, 0:1] + 128.553 * x[:, 1:2] + 24.966 * x[:, 2:3]
    return (16.0 + y) / 255.0


def psnr_y(x: torch.Tensor, ref: torch.Tensor, shave: int = 4) -> torch.Tensor:
    """PSNR on the Y channel with a ``shave``-pixel border removed (SR protocol, experiments.md).

    Both images go through :func:`rgb_to_y` (1-channel images are used as they are), ``shave``
    rows and columns are dropped on every side, and :func:`psnr` with data_range 1 is taken.

    Args:
        x: ``(B, C, H, W)`` estimate.
        ref: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference.
        shave: border width in pixels.

    Returns:
        ``(B,)`` in dB.
    """
    _check_pair(x, ref, "image", "reference")
    if isinstance(shave, bool) or not isinstance(shave, int) or shave < 0:
        raise UserError(f"shave must be a non-negative integer, got {shave!r}")
    height, width = x.shape[2:]
    if 2 * shave >= min(height, width):
        raise UserError(
            f"shave={shave} removes the whole {height}x{width} (HxW) image; "
            f"it must be below {(min(height, width) + 1) // 2}"
        )
    crop = (slice(None), slice(None), slice(shave, height - shave), slice(shave, width - shave))
    return psnr(rgb_to_y(x)[crop], rgb_to_y(ref)[crop])


def _gaussian_taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scipy.ndimage's Gaussian: radius int(3.5 * 1.5 + 0.5) = 5, i.e. 11 taps, sum 1."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * offsets.square() / SSIM_SIGMA**2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


SSIM_MIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
"""Smallest H and W for SSIM: the 11-pixel Gaussian window (as scikit-image requires)."""


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity, equal to scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` averaged over channels.

    Per channel, with ``G`` the 11-tap Gaussian filter (σ = 1.5, truncate 3.5) and
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = data_range``::

        μx = G*x, μy = G*y, σx² = G*x² - μx², σy² = G*y² - μy², σxy = G*xy - μx μy
        SSIM map = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

    averaged over the pixels at least 5 pixels from the border. scikit-image filters with
    reflected borders and then discards that 5-pixel strip; every kept pixel's window lies inside
    the image, so a 'valid' convolution gives the same values without padding.

    Args:
        x: ``(B, C, H, W)`` estimate, H and W at least :data:`SSIM_MIN_SIZE`.
        ref: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference.
        data_range: peak value (1 for images in [0, 1]).

    Returns:
        ``(B,)``, the mean over channels of each channel's mean SSIM.
    """
    _check_pair(x, ref, "image", "reference")
    _check_data_range(data_range)
    _check_min_size(x, "image", SSIM_MIN_SIZE, SSIM_MIN_SIZE, "SSIM")
    batch, channels, height, width = x.shape
    ref = ref.expand_as(x)
    stack = torch.stack([x, ref, x * x, ref * ref, x * ref]).reshape(-1, 1, height, width)
    taps = _gaussian_taps(x.dtype, x.device)
    filtered = F.conv2d(F.conv2d(stack, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))
    mu_x, mu_y, xx, yy, xy = filtered.reshape(5, batch, channels, *filtered.shape[2:])
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3))
