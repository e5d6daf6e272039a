"""Choosing λ per image without the clean image (issue 10): Monte-Carlo SURE of the whole fit.

The paper says λ "should be tuned for each input image" (method.md §2); a user has no clean image
to tune it with. For white Gaussian noise of known σ, Stein's unbiased risk estimate of an
estimator ``f`` of ``x`` from ``y = x + n`` (N values) is

    SURE(f) = ||y − f(y)||² / N − σ² + 2σ² · div f(y) / N,    E[SURE] = E[||f(y) − x||² / N],

and the divergence is estimated with one random probe ``b`` (Ramani, Blu, Unser 2008, "Monte-Carlo
SURE"; as in the DIP-SURE literature): ``div f(y) ≈ bᵀ(f(y + εb) − f(y)) / ε``.

Here the network's input is fixed noise z, not y, so the estimator is the whole fit: ``f_t(y)``
is the output after t iterations of fitting y. Its divergence comes from a second fit of
``y + εb`` with the same seed, run in lockstep as a member of the same batched pass
(:func:`pipeline.batched.fit_batched`), read at the same iteration. float32 fits are chaotic
(a one-ulp change grows about tenfold every few steps), so a small ε measures rounding, not the
fit's response: ``bᵀ(f(y + εb) − f(y))`` has a floor of ≈ 3·10⁻⁴·N whatever ε; ε = σ/2 keeps that
floor below the response (``experiments/unseen/README.md``, "MC-SURE"). ``b`` is Rademacher
(±1): the lowest-variance probe for the trace (Hutchinson).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.batched import MemberView

EPS_OVER_SIGMA = 0.5
"""Probe step ε of the divergence estimate, relative to the noise level σ (module docstring)."""

PROBE_SEED = 0
"""Seed of the Rademacher probe b."""


MAD_TO_SIGMA = 0.6745
"""Median of |N(0, 1)|: a median absolute value over it estimates σ (Donoho & Johnstone 1994)."""


def estimate_noise_sigma(y: Tensor) -> float:
    """σ of white noise in an image ``y`` (1, C, H, W) from its finest diagonal Haar details.

    Over the 2×2 blocks ``[[a, b], [c, d]]`` of every channel, ``(a − b − c + d)/2`` is the
    noise's N(0, σ²) plus a little of the image's diagonal detail, so
    ``σ̂ = median |(a − b − c + d)/2| / 0.6745`` (Donoho & Johnstone 1994's estimate on the
    Haar wavelet's HH band). For a user's photo, whose σ is not given.
    """
    height, width = (y.shape[-2] // 2) * 2, (y.shape[-1] // 2) * 2
    x = y[0, :, :height, :width].double()
    detail = (x[:, 0::2, 0::2] - x[:, 0::2, 1::2] - x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 2
    return float(detail.abs().median()) / MAD_TO_SIGMA


def rademacher(shape: tuple[int, ...], seed: int = PROBE_SEED) -> Tensor:
    """A ±1 probe of ``shape`` (float32), drawn on the CPU from a generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, shape, generator=generator)
    return (2 * bits - 1).to(torch.float32)


class ProjectionRecorder:
    """A callback of :func:`pipeline.batched.fit_batched` (run with ``log_every = 1`` and
    ``measure_every = 1``) recording ``⟨b, x_t⟩`` of every member at every iteration t, on the
    device (no host synchronisation): :attr:`values` is (members, iterations), NaN where a
    member had ended."""

    def __init__(self, probe: Tensor, members: int, iterations: int) -> None:
        self.probe = probe
        self.values = torch.full((members, iterations), float("nan"), dtype=torch.float64)

    def __call__(self, view: MemberView) -> None:
        # At iteration count i the member's last output is that of measured iteration i − 1.
        probe = self.probe.to(view.last_out.device)
        self.values[view.member, view.iteration - 1] = (probe * view.last_out).sum(
            dtype=torch.float64
        )


def mc_sure(
    loss: np.ndarray,
    projection: np.ndarray,
    perturbed_projection: np.ndarray,
    sigma: float,
    eps: float,
    numel: int,
) -> np.ndarray:
    """SURE of the fit at every iteration (module docstring), in MSE units:
    ``loss − σ² + 2σ²·(⟨b, f(y + εb)⟩ − ⟨b, f(y)⟩) / (ε·N)``, where ``loss = ||y − f(y)||²/N``
    is the fit's own loss curve and the projections are :class:`ProjectionRecorder`'s."""
    divergence = (np.asarray(perturbed_projection) - np.asarray(projection)) / eps
    return np.asarray(loss, dtype=np.float64) - sigma**2 + 2 * sigma**2 * divergence / numel
