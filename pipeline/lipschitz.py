"""Lipschitz-controlled convolution (method.md §2; Shi et al., IJCV 2022, Sec. 4.1).

The layer keeps a free weight W̄ and convolves with

    W = W̄ / max(1, σ(W̄) / λ),    σ(W̄) = ‖W̄ reshaped to (C_out, C_in·k·k)‖₂,

so the reshaped matrix of the weight actually used has spectral norm ≤ λ. σ is computed on
detached data and enters back-propagation as a constant (reference behaviour). λ ≤ 0 turns the
control off and the layer is a plain convolution (the DIP baseline).

The reference computes σ with a full SVD at every forward. Here σ² is the largest eigenvalue of
the small Gram matrix G = M Mᵀ (or MᵀM, whichever is smaller) of the reshaped weight M, found from
a warm start and then *certified*, at every forward:

1. Rayleigh–Ritz on span[B, GB], B the layer's basis of p = 4 vectors from the previous call,
   gives the Ritz value ρ ≤ λ_max(G) and the next basis (the top p Ritz vectors). A basis rather
   than one vector keeps up when the top eigenvalues are close and their eigenvectors rotate
   between optimiser steps, where a warm-started power iteration stalls.
2. A successful Cholesky factorisation of τI − G with τ = ρ(1 + rtol)² proves λ_max(G) ≤ τ, with
   no eigen-gap assumption. The layer uses the certified bound σ̂ = √τ, so σ ≤ σ̂ ≤ (1 + rtol)·σ
   and the weight actually used never exceeds λ.
3. Where the certificate fails (cold start, or a fast rotation early in a fit), σ² and the basis
   come from ``torch.linalg.eigh`` of G.

G is formed in the weight's dtype and certified in float64; in float32 its rounding error (about
1e-7 relative) is far below rtol. :func:`certified_sigmas` certifies several layers in one batched
call, which is how :class:`pipeline.model.Decoder` uses it: per-call overheads of the small linear
algebra would otherwise cost as much as the Gram matrices themselves.
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


class _VmapInfo(Protocol):
    """What ``torch.library.register_vmap`` passes as ``info`` (only the batch size is used)."""

    batch_size: int


def _gram(matrix: Tensor) -> Tensor:
    """The smaller of M Mᵀ and MᵀM for M (…, m, n), in M's dtype."""
    m, n = matrix.shape[-2:]
    return matrix @ matrix.mT if m <= n else matrix.mT @ matrix


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


def _certified_top_eigenpair(G: Tensor, basis: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Certified upper bound τ of λ_max(G), τ ≤ (1 + rtol)²·λ_max, for symmetric PSD G (b, n, n).

    ``basis`` (b, n, p) spans the warm start (steps 1–3 of the module docstring). The Ritz step
    runs in G's dtype; only the certificate needs float64, and converting G to it is exact.
    Returns ``(tau (b,) float64, next_basis (b, n, p) in G's dtype)``.
    """
    p = basis.shape[-1]
    q, _ = torch.linalg.qr(torch.cat([basis, G @ basis], dim=-1))
    ritz_values, ritz_vectors = torch.linalg.eigh(q.mT @ (G @ q))
    next_basis = q @ ritz_vectors[..., -p:]
    G = G.to(torch.float64)
    tau = ritz_values[..., -1].to(torch.float64) * (1.0 + rtol) ** 2
    shifted = -G
    shifted.diagonal(dim1=-2, dim2=-1).add_(tau.unsqueeze(-1))
    failed = ~_positive_definite(shifted)
    # The one data-dependent branch. Under torch.func.vmap the custom op below hands this function
    # the whole batch as a plain tensor, so the branch never sees a batched tensor.
    if bool(failed.any()):
        evals, evecs = torch.linalg.eigh(G[failed])
        tau[failed] = evals[:, -1].clamp(min=0.0)
        next_basis[failed] = evecs[..., -p:].to(next_basis.dtype)
    return tau, next_basis


def _sigma_impl(grams: Tensor, bases: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    batch = grams.shape[:-2]
    G = grams.reshape(-1, *grams.shape[-2:])
    basis = bases.to(grams.dtype).reshape(-1, *bases.shape[-2:])
    tau, next_basis = _certified_top_eigenpair(G, basis, rtol)
    return tau.sqrt().reshape(batch), next_basis.reshape(bases.shape)


@torch.library.custom_op("spectral_dip::certified_sigma", mutates_args=())
def certified_sigma(grams: Tensor, bases: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Certified σ̂ with σ ≤ σ̂ ≤ (1 + rtol)·σ, σ² = λ_max of each Gram matrix (…, n, n).

    ``bases`` (…, n, p) hold the warm starts; returns ``(sigma_hat (…) in float64, next_bases in
    the Gram matrices' dtype)``. Not differentiable: callers pass Gram matrices of detached
    weights (σ is a constant in back-propagation, §2).
    """
    return _sigma_impl(grams, bases, rtol)


@certified_sigma.register_fake
def _(grams: Tensor, bases: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    return (
        grams.new_empty(grams.shape[:-2], dtype=torch.float64),
        bases.new_empty(bases.shape, dtype=grams.dtype),
    )


def _certified_sigma_vmap(
    info: _VmapInfo,
    in_dims: tuple[int | None, ...],
    grams: Tensor,
    bases: Tensor,
    rtol: float,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """Batch rule: the implementation already accepts leading batch dimensions."""
    grams_dim, bases_dim = in_dims[:2]
    grams = (
        grams.movedim(grams_dim, 0)
        if grams_dim is not None
        else grams.expand(info.batch_size, *grams.shape)
    )
    bases = (
        bases.movedim(bases_dim, 0)
        if bases_dim is not None
        else bases.expand(info.batch_size, *bases.shape)
    )
    return _sigma_impl(grams, bases, rtol), (0, 0)


torch.library.register_vmap(certified_sigma, _certified_sigma_vmap)


class LipschitzConv2d(nn.Module):
    """Convolution whose reshaped weight has spectral norm ≤ λ (method.md §2).

    Output size equals input size: the input is padded by (k − 1)//2 on each side (reflection by
    default, ``padding="zeros"`` for zero padding) and then convolved without padding.

    :param in_channels: C_in.
    :param out_channels: C_out.
    :param kernel_size: k, odd.
    :param lam: λ, the bound on the spectral norm; λ ≤ 0 gives a plain convolution and computes
        no norm at all.
    :param padding: ``"reflection"`` or ``"zeros"``.
    :param bias: add a learnable bias.
    :param rtol: relative accuracy to which σ is certified at every forward.

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

    def sigma_max(self) -> Tensor:
        """σ̂ for the current W̄ reshaped to (C_out, C_in·k·k), computed now (float64 scalar).

        For λ > 0 this is the certified value a forward uses (σ ≤ σ̂ ≤ (1 + rtol)·σ), and the
        call refreshes the warm start; for λ ≤ 0 the layer keeps no warm start and the exact
        value is computed.
        """
        if not self.controlled:
            with torch.no_grad():
                return torch.linalg.matrix_norm(self.weight.detach().flatten(1).double(), ord=2)
        return certified_sigmas([self])[0]

    def effective_weight(self, sigma: Tensor | None = None) -> Tensor:
        """W = W̄ / max(1, σ/λ), differentiable in W̄ with σ held constant.

        :param sigma: σ̂ of the current W̄ from :func:`certified_sigmas`; computed here if None.
        """
        if not self.controlled:
            return self.weight
        if sigma is None:
            sigma = certified_sigmas([self])[0]
        # A 0-dim float64 divisor keeps the weight's dtype (no type promotion).
        return self.weight / (sigma / self.lam).clamp(min=1.0)

    def forward(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        """Convolve ``x`` (…, C_in, H, W) to (…, C_out, H, W).

        :param sigma: σ̂ of the current W̄ when already computed for several layers at once by
            :func:`certified_sigmas`; computed here if None. Ignored for λ ≤ 0.
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


def certified_sigmas(layers: Sequence[LipschitzConv2d]) -> list[Tensor]:
    """σ̂ of each controlled layer's current free weight, with σ ≤ σ̂ ≤ (1 + rtol)·σ.

    Layers whose Gram matrices have the same size are certified in one batched call; each
    layer's warm-start basis is updated. Returns float64 scalars in the order of ``layers``.
    """
    groups: dict[tuple[tuple[int, ...], float], list[int]] = {}
    for index, layer in enumerate(layers):
        if not layer.controlled:
            raise ValueError(f"layer {index} has lam <= 0: it has no sigma to certify")
        groups.setdefault((tuple(layer.basis.shape), layer.rtol), []).append(index)
    sigmas: list[Tensor] = [torch.empty(())] * len(layers)
    with torch.no_grad():
        for (_, rtol), members in groups.items():
            grams = torch.stack([_gram(layers[i].weight.detach().flatten(1)) for i in members])
            bases = torch.stack([layers[i].basis for i in members])
            sigma, next_bases = certified_sigma(grams, bases, rtol)
            for j, i in enumerate(members):
                layers[i].basis.copy_(next_bases[j])
                sigmas[i] = sigma[j]
    return sigmas
