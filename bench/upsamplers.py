"""The Gaussian upsampler alone against bilinear and the forms that were considered for it.

Forward + backward of one ×2 upsampling of a (1, 128, n, n) map, per input size n: bilinear,
pipeline.upsample.GaussianUpsample, the naive form (``gaussian_upsample_naive``: its 5×5 kernel
built per call, one depthwise transposed convolution), and three forms considered for
GaussianUpsample: two 1-D transposed convolutions, 1-D polyphase filters by slicing, and the four
output phases as one depthwise 3×3 convolution interleaved by pixel shuffle. Each form is first
checked equal to the naive one (to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import PAPER_WIDTH, Timed, interleaved_medians
from pipeline.upsample import GaussianUpsample, gaussian_kernel_1d, gaussian_upsample_naive

SIGMA = 0.5
TOLERANCE = 1e-5


def separable_transposed(x: Tensor, taps: Tensor) -> Tensor:
    """Two depthwise 1-D transposed convolutions (5×1 then 1×5)."""
    c = x.shape[1]
    rows = taps.view(1, 1, 5, 1).expand(c, 1, 5, 1)
    y = F.conv_transpose2d(x, rows, stride=(2, 1), padding=(2, 0), output_padding=(1, 0), groups=c)
    cols = taps.view(1, 1, 1, 5).expand(c, 1, 1, 5)
    return F.conv_transpose2d(
        y, cols, stride=(1, 2), padding=(0, 2), output_padding=(0, 1), groups=c
    )


def _phase_pass(x: Tensor, taps: Tensor, dim: int) -> Tensor:
    # Output 2m: k0·x[m+1] + k2·x[m] + k4·x[m−1]; output 2m+1: k1·x[m+1] + k3·x[m] (0 outside).
    n = x.shape[dim]
    pad = [0, 0] * (x.dim() - 1 - dim) + [1, 1]
    padded = F.pad(x, pad)
    prev, nxt = padded.narrow(dim, 0, n), padded.narrow(dim, 2, n)
    even = taps[4] * prev + taps[2] * x + taps[0] * nxt
    odd = taps[3] * x + taps[1] * nxt
    shape = list(x.shape)
    shape[dim] *= 2
    return torch.stack([even, odd], dim=dim + 1).reshape(shape)


def polyphase_slices(x: Tensor, taps: Tensor) -> Tensor:
    """1-D polyphase filters by slicing, rows then columns."""
    return _phase_pass(_phase_pass(x, taps, x.dim() - 2), taps, x.dim() - 1)


def phases_pixel_shuffle(x: Tensor, taps: Tensor) -> Tensor:
    """The four output phases as one depthwise 3×3 convolution, interleaved by pixel shuffle."""
    c = x.shape[1]
    zero = taps.new_zeros(())
    even = torch.stack([taps[4], taps[2], taps[0]])
    odd = torch.stack([zero, taps[3], taps[1]])
    phases = torch.stack([torch.outer(a, b) for a in (even, odd) for b in (even, odd)])
    weight = phases.unsqueeze(1).repeat(c, 1, 1, 1)
    return F.pixel_shuffle(F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, groups=c), 2)


def upsampler_steps(size: int) -> dict[str, Timed]:
    """Forward + backward of every form on a (1, 128, size, size) input, each checked first."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(1, PAPER_WIDTH, size, size, generator=generator, requires_grad=True)
    grad = torch.randn(1, PAPER_WIDTH, 2 * size, 2 * size, generator=generator)
    taps = gaussian_kernel_1d(SIGMA).float()
    forms: dict[str, Callable[[Tensor], Tensor]] = {
        "bilinear": lambda t: F.interpolate(
            t, scale_factor=2, mode="bilinear", align_corners=False
        ),
        "gaussian": GaussianUpsample(PAPER_WIDTH, SIGMA),
        "gaussian_naive": lambda t: gaussian_upsample_naive(t, SIGMA),
        "separable_transposed": lambda t: separable_transposed(t, taps),
        "polyphase_slices": lambda t: polyphase_slices(t, taps),
        "phases_pixel_shuffle": lambda t: phases_pixel_shuffle(t, taps),
    }
    reference = gaussian_upsample_naive(x, SIGMA)
    for name, form in forms.items():
        if name != "bilinear":
            error = (form(x) - reference).abs().max().item()
            if error > TOLERANCE:
                raise RuntimeError(f"{name} differs from the naive form by {error:.2e}")

    def timed(form: Callable[[Tensor], Tensor]) -> Timed:
        return lambda: torch.autograd.grad(form(x), x, grad)

    return {name: timed(form) for name, form in forms.items()}


def upsamplers(quick: bool) -> dict[str, Any]:
    """Median ms of every form and its ratio to bilinear, per input size."""
    reps = 7 if quick else 21
    results = {}
    for size in (2, 4, 8, 16, 32, 64) if quick else (2, 4, 8, 16, 32, 64, 128, 256):
        medians = interleaved_medians(
            upsampler_steps(size), reps=reps if size <= 64 else max(5, reps // 3), warmup=2
        )
        results[f"{size}x{size}"] = {
            name: {"median_ms": 1e3 * t, "ratio_vs_bilinear": t / medians["bilinear"]}
            for name, t in medians.items()
        }
    return results
