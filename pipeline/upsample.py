"""×2 upsamplers of the decoder, including Gaussian-controlled upsampling (docs/method.md §1, §3).

Gaussian upsampling (Shi et al., IJCV 2022; docs/method.md §3) is a fixed depthwise transposed
convolution with a 5×5 kernel, stride 2, padding 2 and output padding 1, so an H×W map becomes
exactly 2H×2W:

    y[o, p] = Σ_{i,j} x[i, j] · K[o + 2 − 2i, p + 2 − 2j]   (0-based kernel index, x = 0 outside),

    K(i, j) ∝ exp(−(((i − 3)/2)² + ((j − 3)/2)²) / (2σ²)),  i, j ∈ 1..5,  Σ K = 1.

*Quirk* (reference behaviour): the offsets are halved and the kernel sums to 1, not 4, under
stride 2; the following mean-only batch norm absorbs the scale. K is the outer product of the
normalised 1-D kernel k(i) ∝ exp(−((i − 3)/2)² / (2σ²)), which is how it is built here.

σ = 0 is not covered by the formula; it is defined as its limit σ → 0⁺, where k tends to the
unit impulse at the centre. The transposed convolution with that kernel places x[i, j] at
(2i, 2j) and leaves every other output pixel 0: exact zero insertion.

How it is computed: one depthwise ``conv_transpose2d`` with the full 5×5 kernel, a single fused
oneDNN kernel, on groups of 16 channels once a map has 96×96 pixels or more (smaller groups stay
in cache; one call over all channels was 1.3–1.9× slower than bilinear on 128² and 256² maps).
Every output value is the same sum of the same products either way. On the 2-core reference CPU
this is faster than bilinear interpolation on maps of 16×16 and more (0.2–0.8×) and slower only
on the smallest maps (1.1–3× on 2×2 to 8×8, under 0.2 ms), so a decoder step with Gaussian
upsampling costs no more than with bilinear. The separable and polyphase forms tried (two 1-D
transposed convolutions; the four output phases as a 3×3 convolution + pixel shuffle; 1-D phase
filters by slicing) were slower at every size. ``bench/upsamplers.py`` measures all of this.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.lipschitz import LipschitzConv2d

UPSAMPLE_KINDS = ("bilinear", "nearest", "deconv", "gaussian")
KERNEL_SIZE = 5
# Maps with at least this many pixels are upsampled CHUNK_CHANNELS channels at a time (measured
# faster on CPU, see module docstring); smaller ones in one call.
CHUNK_MIN_PIXELS = 96 * 96
CHUNK_CHANNELS = 16


def _check_sigma(sigma: float) -> float:
    if not math.isfinite(sigma) or sigma < 0.0:
        raise UserError(f"Gaussian upsampling sigma must be finite and >= 0, got {sigma}")
    return float(sigma)


def gaussian_kernel_1d(sigma: float) -> Tensor:
    """Normalised 1-D taps k(i) ∝ exp(−((i − 3)/2)² / (2σ²)), i = 1..5 (float64; §3).

    σ = 0 gives the unit impulse [0, 0, 1, 0, 0], the limit σ → 0⁺.
    """
    sigma = _check_sigma(sigma)
    if sigma == 0.0:
        taps = torch.zeros(KERNEL_SIZE, dtype=torch.float64)
        taps[KERNEL_SIZE // 2] = 1.0
        return taps
    offsets = (torch.arange(KERNEL_SIZE, dtype=torch.float64) - KERNEL_SIZE // 2) / 2.0
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def gaussian_kernel_2d(sigma: float) -> Tensor:
    """The 5×5 kernel K of docs/method.md §3, normalised to sum 1 (float64)."""
    taps = gaussian_kernel_1d(sigma)
    return torch.outer(taps, taps)


def _depthwise_up(x: Tensor, weight: Tensor) -> Tensor:
    """Depthwise transposed convolution of §3 with ``weight`` (C, 1, 5, 5): (…, C, H, W) → 2H×2W."""
    return F.conv_transpose2d(
        x, weight, stride=2, padding=2, output_padding=1, groups=weight.shape[0]
    )


def gaussian_upsample_naive(x: Tensor, sigma: float) -> Tensor:
    """Reference: one depthwise ``conv_transpose2d`` of (N, C, H, W) with K → (N, C, 2H, 2W)."""
    kernel = gaussian_kernel_2d(sigma).to(dtype=x.dtype, device=x.device)
    return _depthwise_up(x, kernel.expand(x.shape[1], 1, KERNEL_SIZE, KERNEL_SIZE))


class GaussianUpsample(nn.Module):
    """Fixed ×2 Gaussian-controlled upsampling of ``channels`` maps (docs/method.md §3).

    :param channels: number of channels C (the transposed convolution is depthwise).
    :param sigma: σ ≥ 0 of the kernel; 0 means exact zero insertion.

    The kernel is a buffer (``weight``, shape (C, 1, 5, 5)), never a parameter.
    """

    def __init__(self, channels: int, sigma: float) -> None:
        super().__init__()
        if channels < 1:
            raise UserError(f"upsampler channels must be >= 1, got {channels}")
        self.channels = channels
        self.sigma = _check_sigma(sigma)
        kernel = gaussian_kernel_2d(self.sigma).to(torch.get_default_dtype())
        self.register_buffer(
            "weight", kernel.expand(channels, 1, KERNEL_SIZE, KERNEL_SIZE).contiguous()
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] * x.shape[-1] < CHUNK_MIN_PIXELS:
            return _depthwise_up(x, self.weight)
        chunks = zip(
            x.split(CHUNK_CHANNELS, dim=-3), self.weight.split(CHUNK_CHANNELS), strict=True
        )
        return torch.cat([_depthwise_up(part, weight) for part, weight in chunks], dim=-3)

    def extra_repr(self) -> str:
        return f"{self.channels}, sigma={self.sigma}"


def make_upsampler(
    kind: str, channels: int, sigma: float, padding: str = "reflection"
) -> nn.Module:
    """One ×2 upsampler of the decoder (docs/method.md §1).

    :param kind: ``"bilinear"`` (align_corners=False, the reference default), ``"nearest"``,
        ``"deconv"`` (ConvTranspose2d 4×4, stride 2, padding 1, then one plain 3×3 convolution
        with ``padding``; neither is Lipschitz-controlled, §2) or ``"gaussian"`` (§3).
    :param channels: number of channels, kept unchanged.
    :param sigma: σ of the Gaussian kernel; used by ``"gaussian"`` only.
    :param padding: padding of the convolution after the deconvolution.
    """
    if kind not in UPSAMPLE_KINDS:
        raise UserError(
            f"unknown upsample kind {kind!r}; choose one of {', '.join(UPSAMPLE_KINDS)}"
        )
    if channels < 1:
        raise UserError(f"upsampler channels must be >= 1, got {channels}")
    if kind == "bilinear":
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    if kind == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    if kind == "deconv":
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1),
            LipschitzConv2d(channels, channels, 3, lam=0.0, padding=padding),
        )
    return GaussianUpsample(channels, sigma)
