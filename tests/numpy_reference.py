"""Plain NumPy/SciPy transcriptions of the spec's measures, used only to test pipeline.measures.

Written for clarity, not speed, and independently of the torch code: full FFT with fftshift and
one boolean mask per band, scipy.signal.convolve2d for the re-blur, full-size shifted copies and
a full sort for the sharpness. All functions take one 2-D (H, W) or 3-D (H, W, 3) float64 image.
Spec: /work/shared/spec/method.md §4-§5 and experiments.md (protocols).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import convolve2d


def gray(img: np.ndarray) -> np.ndarray:
    """method.md §4 step 1: weighted sum of R, G, B clipped to [0, 1]; a 2-D image as it is."""
    if img.ndim == 2:
        return img
    g = 0.2989 * img[..., 0] + 0.5870 * img[..., 1] + 0.1140 * img[..., 2]
    return np.clip(g, 0.0, 1.0)


def fbc(output: np.ndarray, reference: np.ndarray, bands: int = 5) -> np.ndarray:
    """method.md §4: mean clipped magnitude ratio over rings of radius int(W/2) * k / bands."""
    spec_out = np.abs(np.fft.fftshift(np.fft.fft2(gray(output))))
    spec_ref = np.abs(np.fft.fftshift(np.fft.fft2(gray(reference))))
    ratio = np.clip(spec_out / (spec_ref + 1e-8), 0.0, 1.0)

    height, width = ratio.shape
    centre_x, centre_y = int(width / 2), int(height / 2)
    yy, xx = np.mgrid[0:height, 0:width]
    dist = np.sqrt((xx - centre_x) ** 2 + (yy - centre_y) ** 2)

    result = np.empty(bands)
    inner = -1.0
    for k in range(1, bands + 1):
        outer = int(width / 2) * (k / bands)
        mask = (dist <= outer) if k == 1 else ((dist > inner) & (dist <= outer))
        result[k - 1] = ratio[mask].mean() if mask.any() else np.nan
        inner = outer
    return result


def first_difference(a: np.ndarray, axis: int) -> np.ndarray:
    """method.md §5: |a convolved with [1, -1]| along ``axis`` (0 = rows), zero-filled 'same' as
    the reference computes it, then trimmed by 1 pixel on every side."""
    kernel = np.array([[1.0, -1.0]])
    same = convolve2d(a, kernel.T if axis == 0 else kernel, mode="same")
    return np.abs(same)[1:-1, 1:-1]


def blur(img: np.ndarray) -> float:
    """method.md §5: Crété-Roffet blurriness with ones/9 box re-blur."""
    g = gray(img)
    box = np.ones(9) / 9.0
    reblur_vertical = convolve2d(g, box.reshape(9, 1), mode="same")
    reblur_horizontal = convolve2d(g, box.reshape(1, 9), mode="same")

    start, end = math.ceil(9 / 2), math.floor(9 / 2)

    def trim(a: np.ndarray) -> np.ndarray:
        return a[start : a.shape[0] - end, start : a.shape[1] - end]

    g, reblur_vertical, reblur_horizontal = trim(g), trim(reblur_vertical), trim(reblur_horizontal)

    values = []
    for axis, reblurred in ((0, reblur_vertical), (1, reblur_horizontal)):
        d_f = first_difference(g, axis)
        d_b = first_difference(reblurred, axis)
        d_v = np.maximum(d_f - d_b, 0.0)
        values.append((d_f.sum() - d_v.sum()) / d_f.sum())
    return max(values)


def sharpness(img: np.ndarray) -> float:
    """method.md §5: maximum local variation, ranks 2..1000 weighted exp(-0.01 k), RMS."""
    g = gray(img)
    height, width = g.shape
    # Zero everywhere except the kept block rows/cols 2..N-2; the block is at least one zero pixel
    # away from every edge, so np.roll brings in zeros for neighbours outside it.
    block = np.zeros_like(g)
    block[2 : height - 1, 2 : width - 1] = g[2 : height - 1, 2 : width - 1]
    diffs = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            diffs.append(np.roll(block, (dy, dx), axis=(0, 1)) - block)
    variation = np.max(np.stack(diffs), axis=0)[2 : height - 1, 2 : width - 1].ravel()

    ordered = np.sort(variation)[::-1]
    weighted = ordered * np.exp(-0.01 * np.arange(ordered.size))
    kept = weighted[2:1001]
    return float(np.sqrt(np.mean(kept**2)))


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    mse = np.mean((x - ref) ** 2)
    return float(10.0 * np.log10(data_range**2 / mse))


def y_channel(img: np.ndarray) -> np.ndarray:
    """experiments.md SR protocol: Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    if img.ndim == 2:
        return img
    return (16.0 + 65.481 * img[..., 0] + 128.553 * img[..., 1] + 24.966 * img[..., 2]) / 255.0


def psnr_y(x: np.ndarray, ref: np.ndarray, shave: int = 4) -> float:
    yx, yr = y_channel(x), y_channel(ref)
    if shave:
        yx, yr = yx[shave:-shave, shave:-shave], yr[shave:-shave, shave:-shave]
    return psnr(yx, yr)
