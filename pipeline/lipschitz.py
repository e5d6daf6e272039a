"""Lipschitz-controlled convolution (docs/method.md §2; Shi et al., IJCV 2022).

The layer keeps a free weight W̄ and convolves with

    W = W̄ / max(1, σ(W̄) / λ),    σ(W̄) = ‖W̄ reshaped to (C_out, C_in·k·k)‖₂,

so the reshaped matrix of the weight actually used has spectral norm ≤ λ. σ is computed on
detached data and enters back-propagation as a constant (reference behaviour). λ ≤ 0 turns the
control off and the layer is a plain convolution (the DIP baseline).

The reference computes σ with a full SVD at every forward. Here σ² is the largest eigenvalue of
G = R Rᵀ, R the reshaped weight M or Mᵀ (whichever has fewer rows), tracked from a warm start:

1. Every forward: Rayleigh–Ritz on the block Krylov space span[B, GB, G²B], B the layer's basis of
   p = 4 vectors from the previous forward, gives the Ritz value ρ ≤ λ_max(G) and the next basis
   (the top p Ritz vectors). G is never formed: G·X = (XᵀR)Rᵀ, so a forward reads R five times
   in products with p or 3p rows, about a third of the cost of forming the Gram matrix. A basis
   rather than one vector keeps up when the top eigenvalues are close and their eigenvectors
   rotate between optimiser steps, where a warm-started power iteration stalls; the layer uses
   σ̂ = √ρ·(1 + rtol).
2. On each of the first :data:`CERTIFY_WARMUP` forwards, then every :data:`CERTIFY_EVERY`-th
   (and whenever asked), σ̂ is also *certified*: a
   successful Cholesky factorisation of τI − G with τ = σ̂² proves λ_max(G) ≤ τ, with no
   eigen-gap assumption, so σ ≤ σ̂ ≤ (1 + rtol)·σ. G is formed for this (its lower block triangle
   only) in the weight's dtype and factorised in float64; its float32 rounding (about 1e-7
   relative) is far below rtol.
3. Where the certificate fails (a cold start, or a fast rotation early in a fit), σ² and the basis
   come from ``torch.linalg.eigh`` of G.

Between certificates σ̂ rests on the Krylov step. From a cold start it underestimated σ by up to
5% in the first ten Adam steps of a width-128 decoder (hence the warm-up); once warm, never by more
than 1e-5 in 190 further steps at lr 0.004 (width 128) and 0.01 (width 32), and the certificate
failed in none of 600 warm layer-steps (2% with span[B, GB] alone). ``tests/test_layers.py``
checks σ̂ against the exact value after every optimiser step.

:func:`sigma_estimates` treats several layers in one batched call per weight shape, which is how
:class:`pipeline.model.Decoder` uses it: per-call overheads of the small linear algebra would
otherwise cost as much as the products themselves.
"""

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError

PADDINGS = ("reflection", "zeros")
DEFAULT_RTOL = 5e-5
BASIS_SIZE = 4
# Cholesky of matrices at least twice this size runs as a 2×2 block factorisation (two half-size
# LAPACK calls + one triangular solve): about 40% faster than one call at n = 128 on CPU.
_CHOLESKY_BLOCK = 32
_GRAM_BLOCK = 32
KRYLOV_DEPTH = 2
CERTIFY_WARMUP = 32
"""Forwards certified one after the other from a (re)initialised weight, while the warm start is
cold and an uncertified Krylov step can still be off by up to 5% (measured)."""
CERTIFY_EVERY = 16
"""Forwards between two Cholesky certificates of σ̂ after the warm-up."""


def certified_at(forward: int) -> bool:
    """Whether the forward with this 0-based index certifies σ̂ (module docstring, step 2)."""
    return forward < CERTIFY_WARMUP or forward % CERTIFY_EVERY == 0


class _VmapInfo(Protocol):
    """What ``torch.library.register_vmap`` passes as ``info`` (only the batch size is used)."""

    batch_size: int


def _rows(matrix: Tensor) -> Tensor:
    """M (…, m, n) or Mᵀ, whichever has fewer rows: R with R Rᵀ the smaller Gram matrix."""
    m, n = matrix.shape[-2:]
    return matrix if m <= n else matrix.mT


def _gram(rows: Tensor) -> Tensor:
    """G = R Rᵀ for R (…, n, k), in R's dtype.

    G is symmetric, so only its lower block triangle is multiplied out (block columns of
    :data:`_GRAM_BLOCK`, each mirrored into the upper triangle): 5/8 of the products of a full
    ``R @ R.mT`` for n = 128, about 30% faster on CPU.
    """
    size = rows.shape[-2]
    if size < 2 * _GRAM_BLOCK:
        return rows @ rows.mT
    gram = rows.new_empty(*rows.shape[:-2], size, size)
    for start in range(0, size, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, size)
        column = rows[..., start:, :] @ rows[..., start:stop, :].mT
        gram[..., start:, start:stop] = column
        gram[..., start:stop, stop:] = column[..., stop - start :, :].mT
    return gram


def _positive_definite(S: Tensor) -> Tensor:
    """Whether each symmetric S (…, n, n) is positive definite (Cholesky succeeds).

    S ≻ 0 ⟺ S₁₁ ≻ 0 and its Schur complement S₂₂ − S₂₁S₁₁⁻¹S₁₂ ≻ 0.
    """
    n = S.shape[-1]
    if n < 2 * _CHOLESKY_BLOCK:
        return torch.linalg.cholesky_ex(S).info == 0
    h = n // 2
    factor, info = torch.linalg.cholesky_ex(S[..., :h, :h])
    half = torch.linalg.solve_triangular(factor, S[..., :h, h:], upper=False)
    schur_info = torch.linalg.cholesky_ex(S[..., h:, h:] - half.mT @ half).info
    return (info == 0) & (schur_info == 0)


def _ritz(rows: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Top Ritz value ρ ≤ λ_max(R Rᵀ) on span[B, GB, G²B] and the next basis (step 1 of the
    module docstring), for R (b, n, k) and B (b, n, p); products keep R's rows contiguous."""
    krylov = [basis]
    for _ in range(KRYLOV_DEPTH):
        krylov.append(((krylov[-1].mT @ rows) @ rows.mT).mT)
    q, _ = torch.linalg.qr(torch.cat(krylov, dim=-1))
    projected = q.mT @ rows
    ritz_values, ritz_vectors = torch.linalg.eigh(projected @ projected.mT)
    return ritz_values[..., -1], q @ ritz_vectors[..., -basis.shape[-1] :]


def _certify(
    rows: Tensor, tau: Tensor, basis: Tensor, sync_free: bool | None = None
) -> tuple[Tensor, Tensor]:
    """τ where τI − G ≻ 0 proves λ_max(G) ≤ τ; elsewhere λ_max(G) and the basis from ``eigh``
    (steps 2–3 of the module docstring). ``tau`` (b,) float64; returns ``(tau, basis)``.

    On the CPU only the failed matrices go to ``eigh``, which needs the host to read which failed.
    On an accelerator (``sync_free``, the default there) every matrix goes to one batched
    ``eigh`` and the results are chosen on the device: no host synchronisation, at the cost of
    an ``eigh`` per certificate, which runs every :data:`CERTIFY_EVERY` forwards only.
    """
    G = _gram(rows).to(torch.float64)
    shifted = -G
    shifted.diagonal(dim1=-2, dim2=-1).add_(tau.unsqueeze(-1))
    failed = ~_positive_definite(shifted)
    if sync_free is None:
        sync_free = rows.device.type != "cpu"
    if sync_free:
        evals, evecs = torch.linalg.eigh(G)
        tau = torch.where(failed, evals[:, -1].clamp(min=0.0), tau)
        top = evecs[..., -basis.shape[-1] :].to(basis.dtype)
        return tau, torch.where(failed.view(-1, 1, 1), top, basis)
    # The one data-dependent branch. Under torch.func.vmap the custom op below hands this function
    # the whole batch as a plain tensor, so the branch never sees a batched tensor.
    if bool(failed.any()):
        tau, basis = tau.clone(), basis.clone()
        evals, evecs = torch.linalg.eigh(G[failed])
        tau[failed] = evals[:, -1].clamp(min=0.0)
        basis[failed] = evecs[..., -basis.shape[-1] :].to(basis.dtype)
    return tau, basis


def _sigma_impl(rows: Tensor, bases: Tensor, rtol: float, certify: bool) -> tuple[Tensor, Tensor]:
    batch = rows.shape[:-2]
    R = rows.reshape(-1, *rows.shape[-2:])
    basis = bases.to(rows.dtype).reshape(-1, *bases.shape[-2:])
    rho, next_basis = _ritz(R, basis)
    tau = rho.to(torch.float64).clamp(min=0.0) * (1.0 + rtol) ** 2
    if certify:
        tau, next_basis = _certify(R, tau, next_basis)
    return tau.sqrt().reshape(batch), next_basis.reshape(bases.shape)


@torch.library.custom_op("spectral_dip::top_singular_value", mutates_args=())
def top_singular_value(
    rows: Tensor, bases: Tensor, rtol: float, certify: bool
) -> tuple[Tensor, Tensor]:
    """σ̂ ≈ (1 + rtol)·σ, σ the largest singular value of each R (…, n, k), n ≤ k.

    ``bases`` (…, n, p) hold the warm starts; returns ``(sigma_hat (…) in float64, next_bases in
    R's dtype)``. With ``certify``, σ ≤ σ̂ ≤ (1 + rtol)·σ is proven (module docstring). Not
    differentiable: callers pass detached weights (σ is a constant in back-propagation, §2).
    """
    return _sigma_impl(rows, bases, rtol, certify)


@top_singular_value.register_fake
def _(rows: Tensor, bases: Tensor, rtol: float, certify: bool) -> tuple[Tensor, Tensor]:
    return (
        rows.new_empty(rows.shape[:-2], dtype=torch.float64),
        bases.new_empty(bases.shape, dtype=rows.dtype),
    )


def _top_singular_value_vmap(
    info: _VmapInfo,
    in_dims: tuple[int | None, ...],
    rows: Tensor,
    bases: Tensor,
    rtol: float,
    certify: bool,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """Batch rule: the implementation already accepts leading batch dimensions."""
    rows_dim, bases_dim = in_dims[:2]
    rows = (
        rows.movedim(rows_dim, 0)
        if rows_dim is not None
        else rows.expand(info.batch_size, *rows.shape)
    )
    bases = (
        bases.movedim(bases_dim, 0)
        if bases_dim is not None
        else bases.expand(info.batch_size, *bases.shape)
    )
    return _sigma_impl(rows, bases, rtol, certify), (0, 0)


torch.library.register_vmap(top_singular_value, _top_singular_value_vmap)


class LipschitzConv2d(nn.Module):
    """Convolution whose reshaped weight has spectral norm ≤ λ (docs/method.md §2).

    Output size equals input size: the input is padded by (k − 1)//2 on each side (reflection by
    default, ``padding="zeros"`` for zero padding) and then convolved without padding.

    :param in_channels: C_in.
    :param out_channels: C_out.
    :param kernel_size: k, odd.
    :param lam: λ, the bound on the spectral norm; λ ≤ 0 gives a plain convolution and computes
        no norm at all.
    :param padding: ``"reflection"`` or ``"zeros"``.
    :param bias: add a learnable bias.
    :param rtol: σ̂ = (1 + rtol)·(Ritz estimate of σ): the relative margin that the certificate
        (every :data:`CERTIFY_EVERY` forwards) proves σ̂ ≥ σ with.

    State: ``weight`` (W̄) and ``bias`` are parameters; for λ > 0 the buffer ``basis``
    (n × min(4, n), n = min(C_out, C_in·k·k)) holds the warm start, so that ``state_dict``
    round-trips and ``torch.func.functional_call`` can stack it across models.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        lam: float,
        padding: str = "reflection",
        bias: bool = True,
        rtol: float = DEFAULT_RTOL,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise UserError(
                f"channel counts must be >= 1, got in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if padding not in PADDINGS:
            raise UserError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
        if not 0.0 < rtol < 1e-2:
            raise UserError(f"rtol must be in (0, 0.01), got {rtol}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.lam = float(lam)
        self.padding = padding
        self.rtol = rtol
        self._pad = (kernel_size - 1) // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if self.controlled:
            n = min(out_channels, in_channels * kernel_size * kernel_size)
            self.register_buffer("basis", torch.empty(n, min(BASIS_SIZE, n)))
        self.reset_parameters()

    @property
    def controlled(self) -> bool:
        """Whether the spectral norm is controlled (λ > 0)."""
        return self.lam > 0.0

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform weight (a = 0, fan_in; §1) and PyTorch's default bias init.

        Draws from ``generator``, or from the global RNG when None (as PyTorch's own layers do at
        construction).
        """
        nn.init.kaiming_uniform_(self.weight, a=0.0, mode="fan_in", generator=generator)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound, generator=generator)
        if self.controlled:
            # Any orthonormal start; if it fails to certify, the first forward falls back to eigh.
            nn.init.eye_(self.basis)
            self.forwards = 0

    def sigma_max(self) -> Tensor:
        """σ̂ for the current W̄ reshaped to (C_out, C_in·k·k), computed now (float64 scalar).

        For λ > 0 this is the estimate a forward uses, certified now (σ ≤ σ̂ ≤ (1 + rtol)·σ);
        the call refreshes the warm start. For λ ≤ 0 the layer keeps no warm start and the exact
        value is computed.
        """
        if not self.controlled:
            with torch.no_grad():
                return torch.linalg.matrix_norm(self.weight.detach().flatten(1).double(), ord=2)
        return sigma_estimates([self], certify=True)[0]

    def effective_weight(self, sigma: Tensor | None = None) -> Tensor:
        """W = W̄ / max(1, σ/λ), differentiable in W̄ with σ held constant.

        :param sigma: σ̂ of the current W̄ from :func:`sigma_estimates`; computed here if None.
        """
        if not self.controlled:
            return self.weight
        if sigma is None:
            sigma = sigma_estimates([self])[0]
        # A 0-dim float64 divisor keeps the weight's dtype (no type promotion).
        return self.weight / (sigma / self.lam).clamp(min=1.0)

    def forward(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        """Convolve ``x`` (…, C_in, H, W) to (…, C_out, H, W).

        :param sigma: σ̂ of the current W̄ when already computed for several layers at once by
            :func:`sigma_estimates`; computed here if None. Ignored for λ ≤ 0.
        """
        weight = self.effective_weight(sigma)
        if self.padding == "reflection":
            if self._pad:
                x = F.pad(x, (self._pad,) * 4, mode="reflect")
            return F.conv2d(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, padding=self._pad)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"lam={self.lam}, padding={self.padding!r}, bias={self.bias is not None}"
        )


def spectral_norms(
    weights: Sequence[Tensor],
    bases: Sequence[Tensor],
    rtols: Sequence[float],
    certify: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """σ̂ of free weights W̄ (…, C_out, C_in, k, k), each reshaped to (C_out, C_in·k·k) — leading
    dimensions are independent members, e.g. K batched fits — from their warm starts ``bases``
    (…, n, p); with ``certify``, σ ≤ σ̂ ≤ (1 + rtol)·σ is proven (module docstring).

    Weights of one shape and rtol go through one batched call: the small linear algebra costs
    about as much per call as per layer. The estimate runs in float32 or wider whatever an
    enclosing autocast says (``eigh`` has no bfloat16 kernel, and σ̂ must be exact to 1e-4).
    Returns ``(sigmas (…) float64, next bases)`` in the order of ``weights``.
    """
    groups: dict[tuple[tuple[int, ...], float], list[int]] = {}
    for index, (weight, rtol) in enumerate(zip(weights, rtols, strict=True)):
        groups.setdefault((tuple(weight.shape), rtol), []).append(index)
    sigmas: list[Tensor] = [torch.empty(())] * len(weights)
    next_bases: list[Tensor] = [torch.empty(())] * len(weights)
    device_type = weights[0].device.type if weights else "cpu"
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        for (_, rtol), members in groups.items():
            rows = torch.stack([_rows(_as_float32(weights[i]).flatten(-3)) for i in members])
            stacked = torch.stack([bases[i] for i in members])
            sigma, basis = top_singular_value(rows, stacked, rtol, certify)
            for j, i in enumerate(members):
                sigmas[i], next_bases[i] = sigma[j], basis[j]
    return sigmas, next_bases


def _as_float32(weight: Tensor) -> Tensor:
    """The weight detached, in float32 unless it is wider."""
    weight = weight.detach()
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


def sigma_estimates(layers: Sequence[LipschitzConv2d], certify: bool | None = None) -> list[Tensor]:
    """σ̂ of each controlled layer's current free weight (module docstring), as float64 scalars
    in the order of ``layers``; each layer's warm-start basis is updated.

    ``certify``: True proves σ ≤ σ̂ ≤ (1 + rtol)·σ now, False never, None on the layers'
    schedule (:func:`certified_at` of their count of estimates; certified when any layer is due).
    """
    for index, layer in enumerate(layers):
        if not layer.controlled:
            raise ValueError(f"layer {index} has lam <= 0: it has no sigma to estimate")
    if certify is None:
        certify = any(certified_at(layer.forwards) for layer in layers)
    sigmas, bases = spectral_norms(
        [layer.weight for layer in layers],
        [layer.basis for layer in layers],
        [layer.rtol for layer in layers],
        certify,
    )
    for layer, basis in zip(layers, bases, strict=True):
        layer.basis.copy_(basis)
        layer.forwards += 1
    return sigmas
