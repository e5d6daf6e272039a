"""Lipschitz-controlled convolution (method.md §2; Shi et al., IJCV 2022, Sec. 4.1).

The layer keeps a free weight W̄ and convolves with

    W = W̄ / max(1, σ(W̄) / λ),    σ(W̄) = ‖W̄ reshaped to (C_out, C_in·k·k)‖₂,

so the reshaped matrix of the weight actually used has spectral norm ≤ λ. σ is computed on
detached data and enters back-propagation as a constant (reference behaviour). λ ≤ 0 turns the
control off and the layer is a plain convolution (the DIP baseline).

The reference computes σ with a full SVD at every forward. Here σ² is the largest eigenvalue of
the small Gram matrix G = M Mᵀ (or MᵀM, whichever is smaller) of the reshaped weight M, found from
a warm start and then *certified*:

1. Rayleigh–Ritz on span[B, GB], B the layer's basis of p = 4 vectors from the previous call,
   gives the Ritz value ρ ≤ λ_max(G) and the next basis (the top p Ritz vectors). A basis rather
   than one vector keeps up when the top eigenvalues are close and their eigenvectors rotate
   between optimiser steps, where a warm-started power iteration stalls (measured on the decoder:
   one power step failed the certificate in 20–60% of layer-steps, this in 0–5%).
2. A successful Cholesky factorisation of τI − G with τ = ρ(1 + rtol)² proves λ_max(G) ≤ τ, with
   no eigen-gap assumption. The layer uses the certified bound σ̂ = √τ, so σ ≤ σ̂ ≤ (1 + rtol)·σ
   and the weight actually used never exceeds λ.
3. Where the certificate fails (cold start, or a fast rotation), σ² and the basis come from
   ``torch.linalg.eigh`` of G.

G is formed in the weight's dtype and factorised in float64; in float32 its rounding error (about
1e-7 relative) is far below rtol.
"""

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError

PADDINGS = ("reflection", "zeros")
DEFAULT_RTOL = 5e-5
BASIS_SIZE = 4


class _VmapInfo(Protocol):
    """What ``torch.library.register_vmap`` passes as ``info`` (only the batch size is used)."""

    batch_size: int


def _certified_top_eigenpair(G: Tensor, basis: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Certified upper bound τ of λ_max(G), τ ≤ (1 + rtol)²·λ_max, for symmetric PSD G (…, n, n).

    ``basis`` (…, n, p) spans the warm start. Rayleigh–Ritz on span[B, GB] gives the Ritz value
    ρ ≤ λ_max and the next basis (the top p Ritz vectors); τ = ρ(1 + rtol)² is certified by
    Cholesky. Returns ``(tau, next_basis)``; where the certificate fails, τ is the ``eigh`` value
    and the basis the top p eigenvectors. Leading dimensions batch.
    """
    p = basis.shape[-1]
    q, _ = torch.linalg.qr(torch.cat([basis, G @ basis], dim=-1))
    ritz_values, ritz_vectors = torch.linalg.eigh(q.mT @ (G @ q))
    tau = ritz_values[..., -1] * (1.0 + rtol) ** 2
    next_basis = q @ ritz_vectors[..., -p:]
    shifted = -G
    shifted.diagonal(dim1=-2, dim2=-1).add_(tau.unsqueeze(-1))
    ok = torch.linalg.cholesky_ex(shifted).info == 0
    # The one data-dependent branch. Under torch.func.vmap the custom op below hands this function
    # the whole batch as a plain tensor, so the branch never sees a batched tensor.
    if bool(ok.all()):
        return tau, next_basis
    evals, evecs = torch.linalg.eigh(G)
    tau = torch.where(ok, tau, evals[..., -1].clamp(min=0.0))
    return tau, torch.where(ok[..., None, None], next_basis, evecs[..., -p:])


def _gram(matrix: Tensor) -> Tensor:
    """The smaller of M Mᵀ and Mᵀ M for M (…, m, n), in float64 for the certificate."""
    m, n = matrix.shape[-2:]
    G = matrix @ matrix.mT if m <= n else matrix.mT @ matrix
    return G.to(torch.float64)


def _sigma_impl(matrix: Tensor, basis: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    tau, next_basis = _certified_top_eigenpair(_gram(matrix), basis.to(torch.float64), rtol)
    return tau.sqrt(), next_basis


@torch.library.custom_op("spectral_dip::certified_sigma", mutates_args=())
def certified_sigma(matrix: Tensor, basis: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Certified bound σ̂ of the largest singular value σ of ``matrix`` (…, m, n): σ ≤ σ̂ ≤ (1+rtol)σ.

    ``basis`` (…, min(m, n), p) spans the warm start; returns ``(sigma_hat (…), next_basis)`` in
    float64. Not differentiable: callers pass detached weights (σ is a constant in
    back-propagation, §2).
    """
    return _sigma_impl(matrix, basis, rtol)


@certified_sigma.register_fake
def _(matrix: Tensor, basis: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    return (
        matrix.new_empty(matrix.shape[:-2], dtype=torch.float64),
        basis.new_empty(basis.shape, dtype=torch.float64),
    )


def _certified_sigma_vmap(
    info: _VmapInfo,
    in_dims: tuple[int | None, ...],
    matrix: Tensor,
    basis: Tensor,
    rtol: float,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """Batch rule: the implementation already accepts leading batch dimensions."""
    matrix_dim, basis_dim = in_dims[:2]
    matrix = (
        matrix.movedim(matrix_dim, 0)
        if matrix_dim is not None
        else matrix.expand(info.batch_size, *matrix.shape)
    )
    basis = (
        basis.movedim(basis_dim, 0)
        if basis_dim is not None
        else basis.expand(info.batch_size, *basis.shape)
    )
    return _sigma_impl(matrix, basis, rtol), (0, 0)


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
            # Any orthonormal start; where it fails to certify at the first forward, eigh takes over.
            nn.init.eye_(self.basis)

    def _current_sigma(self) -> Tensor:
        """Certified σ(W̄) of the current free weight; refreshes the warm start ``basis``."""
        with torch.no_grad():
            sigma, basis = certified_sigma(self.weight.detach().flatten(1), self.basis, self.rtol)
            self.basis.copy_(basis)
        return sigma

    def sigma_max(self) -> Tensor:
        """σ̂ for the current W̄ reshaped to (C_out, C_in·k·k), computed now (float64 scalar).

        For λ > 0 this is the certified value the forward uses (σ ≤ σ̂ ≤ (1 + rtol)·σ); for λ ≤ 0
        the layer keeps no warm start and the exact value is computed.
        """
        if not self.controlled:
            with torch.no_grad():
                return torch.linalg.matrix_norm(self.weight.detach().flatten(1).double(), ord=2)
        return self._current_sigma()

    def effective_weight(self) -> Tensor:
        """W = W̄ / max(1, σ/λ), differentiable in W̄ with σ held constant."""
        if not self.controlled:
            return self.weight
        scale = (self._current_sigma() / self.lam).clamp(min=1.0).to(self.weight.dtype)
        return self.weight / scale

    def forward(self, x: Tensor) -> Tensor:
        weight = self.effective_weight()
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
