"""Lipschitz-controlled convolution (docs/method.md §2) and the ×2 upsamplers (§1, §3)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from pipeline import lipschitz
from pipeline.errors import UserError
from pipeline.lipschitz import (
    CERTIFY_EVERY,
    CERTIFY_WARMUP,
    LipschitzConv2d,
    sigma_estimates,
    top_singular_value,
)
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.upsample import (
    CHUNK_MIN_PIXELS,
    UPSAMPLE_KINDS,
    GaussianUpsample,
    gaussian_kernel_2d,
    gaussian_upsample_naive,
    make_upsampler,
)


def exact_sigma(weight: torch.Tensor) -> float:
    """Largest singular value of the reshaped weight, float64."""
    return torch.linalg.matrix_norm(weight.detach().flatten(1).double(), ord=2).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """‖actual − expected‖ ≤ rtol·‖expected‖ (σ̂ may exceed σ by 5e-5 relative, by design)."""
    assert (actual - expected).norm() <= rtol * expected.norm()


def reference_conv(layer: LipschitzConv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    pad = (layer.kernel_size - 1) // 2
    return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), weight, layer.bias)


# --- Lipschitz convolution -------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.4, 3.0])
def test_sigma_exact_and_bound_at_every_adam_step(lam: float) -> None:
    # Past the certified warm-up: most of these steps use the uncertified Krylov estimate.
    torch.manual_seed(0)
    layer = LipschitzConv2d(6, 10, 3, lam=lam)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 6, 13, 17)
    target = 3.0 * torch.randn(2, 10, 13, 17)
    sigmas = []
    for _ in range(CERTIFY_WARMUP + 3 * CERTIFY_EVERY):
        exact = exact_sigma(layer.weight)
        sigmas.append(exact)
        expected = reference_conv(layer, x, layer.weight / max(1.0, exact / lam))
        out = layer(x)
        # The forward used σ of the current weights: output matches W̄ / max(1, σ_exact/λ).
        assert_rel_close(out, expected, 1e-4)
        sigma_hat = sigma_estimates([layer], certify=False)[0].item()
        assert abs(sigma_hat - exact) <= 1e-4 * exact
        assert sigma_hat >= exact * (1 - 1e-6)  # an upper bound, up to float32 rounding
        optimizer.zero_grad()
        F.mse_loss(out, target).backward()
        optimizer.step()
        assert exact_sigma(layer.effective_weight()) <= lam + 1e-5
    # The weights really moved, through and across the bound.
    assert max(sigmas) - min(sigmas) > 0.1


def test_decoder_sigmas_stay_exact_between_certificates() -> None:
    # A whole decoder under a fast Adam: its layers' top singular vectors rotate and cluster.
    config = DecoderConfig(lam=1.0, width=16, depth=3, gauss_sigma=(0.1, 0.1, 0.5))
    generator = torch.Generator().manual_seed(0)
    model = Decoder(config, generator)
    z = make_input(config, 24, 24, generator)
    target = torch.rand(1, 3, 24, 24, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    layers = [conv for block in model.convs for conv in (block.conv1, block.conv2)]
    for _ in range(CERTIFY_WARMUP + 4 * CERTIFY_EVERY):
        exact = torch.tensor([exact_sigma(layer.weight) for layer in layers], dtype=torch.float64)
        estimates = torch.stack(model.sigmas())
        assert torch.all(estimates >= exact * (1 - 1e-6))
        assert torch.all(estimates <= exact * (1 + 1e-4))
        optimizer.zero_grad()
        F.mse_loss(model(z), target).backward()
        optimizer.step()


def test_certificate_falls_back_when_warm_start_misses_the_top() -> None:
    # G = diag(d) with the top eigenvalue on e19 and the basis on e0..e3: the Krylov space stays
    # in span{e0..e3}, whose Ritz value 0.999 is the second eigenvalue. The certificate must
    # reject it and fall back to the exact value.
    d = torch.linspace(0.1, 0.6, 20, dtype=torch.float64)
    d[0], d[19] = 0.999, 1.0
    basis = torch.eye(20, 4, dtype=torch.float64)
    rows = torch.diag(d.sqrt())[None]
    sigma, next_basis = top_singular_value(rows, basis[None], 5e-5, True)
    assert sigma.item() == pytest.approx(1.0, abs=1e-12)
    assert abs(next_basis[0, 19, -1].item()) == 1.0


@pytest.mark.parametrize("size", [20, 80])  # one Cholesky call / the 2×2 block form
def test_positive_definite_test_is_exact_at_the_boundary(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    a = torch.randn(3, size, 2 * size, generator=generator, dtype=torch.float64)
    G = a @ a.mT
    top = torch.linalg.eigvalsh(G)[:, -1]
    for factor, expected in [(1 - 1e-7, False), (1 + 1e-7, True)]:
        shifted = -G
        shifted.diagonal(dim1=-2, dim2=-1).add_((factor * top)[:, None])
        assert lipschitz._positive_definite(shifted).tolist() == [expected] * 3


def test_the_sync_free_certificate_gives_the_host_branch_results() -> None:
    """The accelerator's form (every matrix through eigh, chosen on the device) equals the CPU's
    (only the failed ones), for a batch where some certificates pass and some fail."""
    torch.manual_seed(3)
    rows = torch.randn(4, 6, 20)
    exact = torch.linalg.matrix_norm(rows.double(), ord=2) ** 2
    tau = exact * torch.tensor(
        [1.001, 0.9, 1.2, 0.5], dtype=torch.float64
    )  # pass, fail, pass, fail
    basis = torch.linalg.qr(torch.randn(4, 6, 2))[0]
    host = lipschitz._certify(rows, tau, basis, sync_free=False)
    device = lipschitz._certify(rows, tau, basis, sync_free=True)
    torch.testing.assert_close(device[0], host[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(device[1], host[1], rtol=0, atol=1e-6)
    assert torch.equal(host[0][[0, 2]], tau[[0, 2]])  # passed: kept
    torch.testing.assert_close(host[0][[1, 3]], exact[[1, 3]], rtol=1e-6, atol=0)  # failed: exact


def test_sigma_is_estimated_in_float32_or_wider_under_bfloat16_autocast() -> None:
    """A bfloat16 autocast (``precision: bf16``) must not reach σ̂: eigh has no bfloat16 kernel on
    CUDA, and bfloat16's 3 significant digits would break the 1e-4 bound."""
    torch.manual_seed(0)
    layer = LipschitzConv2d(8, 12, 3, lam=0.5)
    x = torch.randn(1, 8, 9, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            layer(x)
        (sigma,) = sigma_estimates([layer], certify=True)
    assert sigma.dtype == torch.float64 and layer.basis.dtype == torch.float32
    exact = exact_sigma(layer.weight)
    assert exact <= sigma.item() <= exact * (1 + 5e-5 + 1e-6)
    bf16_weight = [layer.weight.detach().to(torch.bfloat16)]
    sigmas, bases = lipschitz.spectral_norms(bf16_weight, [layer.basis], [5e-5], True)
    assert sigmas[0].dtype == torch.float64 and bases[0].dtype == torch.float32


def test_top_singular_value_batches_under_vmap() -> None:
    generator = torch.Generator().manual_seed(2)
    matrices = torch.randn(4, 3, 5, 12, generator=generator)
    bases = torch.linalg.qr(torch.randn(4, 3, 5, 2, generator=generator))[0]
    batched, _ = vmap(top_singular_value, in_dims=(0, 0, None, None))(matrices, bases, 5e-5, True)
    exact = torch.linalg.matrix_norm(matrices.double(), ord=2)
    assert torch.all(batched >= exact * (1 - 1e-6))
    assert torch.all(batched <= exact * (1 + 5e-5 + 1e-6))


def test_sigma_estimates_of_several_layers_match_each_alone() -> None:
    torch.manual_seed(0)
    layers = [LipschitzConv2d(4, 6, 3, lam=1.0) for _ in range(3)] + [LipschitzConv2d(1, 6, 1, 1.0)]
    together = sigma_estimates(layers)  # the last one has a 1×1 Gram: its own group
    for layer, sigma in zip(layers, together, strict=True):
        exact = exact_sigma(layer.weight)
        assert exact * (1 - 1e-6) <= sigma.item() <= exact * (1 + 5e-5 + 1e-6)
    with pytest.raises(ValueError, match="lam <= 0"):
        sigma_estimates([LipschitzConv2d(2, 2, 3, lam=0.0)])


def test_certificate_runs_through_the_warm_up_then_on_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    certify = lipschitz._certify

    def counting(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(calls))
        return certify(*args)

    monkeypatch.setattr(lipschitz, "_certify", counting)
    layer = LipschitzConv2d(4, 6, 3, lam=1.0)
    x = torch.randn(1, 4, 9, 11)
    for _ in range(CERTIFY_WARMUP + 2 * CERTIFY_EVERY):
        layer(x)
    assert len(calls) == CERTIFY_WARMUP + 2
    layer.sigma_max()  # asked for: certified now
    assert len(calls) == CERTIFY_WARMUP + 3


def test_plain_layer_is_nn_conv2d_and_computes_no_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = LipschitzConv2d(4, 7, 3, lam=0.0)

    def forbidden(*args: object) -> None:
        raise AssertionError("a norm was computed for lam <= 0")

    monkeypatch.setattr(lipschitz, "top_singular_value", forbidden)
    conv = nn.Conv2d(4, 7, 3)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 13, 17)
    torch.testing.assert_close(layer(x), conv(F.pad(x, (1, 1, 1, 1), mode="reflect")))
    assert "basis" not in layer.state_dict()


def test_gradient_treats_sigma_as_constant() -> None:
    torch.manual_seed(0)
    lam = 0.7
    layer = LipschitzConv2d(3, 5, 3, lam=lam)
    x = torch.randn(1, 3, 13, 17)
    target = torch.randn(1, 5, 13, 17)
    F.mse_loss(layer(x), target).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    sigma = exact_sigma(weight)
    assert sigma > lam  # the control is active
    F.mse_loss(reference_conv(layer, x, weight / (sigma / lam)), target).backward()
    assert_rel_close(layer.weight.grad, weight.grad, 2e-4)

    # Differentiating through σ gives a clearly different gradient, so the check above can fail.
    through = layer.weight.detach().clone().requires_grad_()
    norm = torch.linalg.matrix_norm(through.flatten(1), ord=2)
    F.mse_loss(reference_conv(layer, x, through * lam / norm), target).backward()
    assert (through.grad - weight.grad).norm() > 0.05 * weight.grad.norm()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("padding", ["reflection", "zeros"])
def test_output_keeps_odd_spatial_size(kernel_size: int, padding: str) -> None:
    layer = LipschitzConv2d(2, 3, kernel_size, lam=1.0, padding=padding)
    assert layer(torch.randn(1, 2, 13, 17)).shape == (1, 3, 13, 17)


def test_zeros_padding_matches_conv_with_zero_padding() -> None:
    torch.manual_seed(0)
    layer = LipschitzConv2d(2, 3, 3, lam=0.0, padding="zeros")
    x = torch.randn(1, 2, 13, 17)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))


def test_kaiming_uniform_init() -> None:
    layer = LipschitzConv2d(16, 32, 3, lam=1.0)
    bound = math.sqrt(6.0 / (16 * 9))
    assert layer.weight.abs().max() <= bound
    assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
    assert layer.bias.abs().max() <= 1.0 / math.sqrt(16 * 9)


def test_state_dict_round_trip_and_eval_equals_train() -> None:
    torch.manual_seed(0)
    layer = LipschitzConv2d(3, 4, 3, lam=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(1, 3, 13, 17)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    clone = LipschitzConv2d(3, 4, 3, lam=0.5)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.basis, layer.basis)
    torch.testing.assert_close(clone.eval()(x), layer.train()(x), rtol=1e-4, atol=1e-6)


def test_layer_batches_with_functional_call_and_vmap() -> None:
    layers = []
    for seed in range(3):
        torch.manual_seed(seed)
        layers.append(LipschitzConv2d(3, 4, 3, lam=0.6))
    params, buffers = stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    x = torch.randn(1, 3, 13, 17)

    def run(p: dict, b: dict) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(run)(params, buffers)
    torch.testing.assert_close(batched, torch.stack([layer(x) for layer in layers]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 2}, "kernel_size"),
        ({"padding": "circular"}, "circular"),
        ({"in_channels": 0}, "channel"),
    ],
)
def test_layer_user_errors(kwargs: dict, message: str) -> None:
    args = {"in_channels": 2, "out_channels": 2, "kernel_size": 3, "lam": 1.0} | kwargs
    with pytest.raises(UserError, match=message):
        LipschitzConv2d(**args)


# --- Gaussian upsampling ---------------------------------------------------------------------


def numpy_kernel(sigma: float) -> np.ndarray:
    """Direct transcription of docs/method.md §3: 1-based i, j in 1..5, c = 3, then normalise."""
    kernel = np.zeros((5, 5))
    c = 3
    for i in range(1, 6):
        for j in range(1, 6):
            kernel[i - 1, j - 1] = np.exp(
                -(((i - c) / 2) ** 2 + ((j - c) / 2) ** 2) / (2 * sigma**2)
            )
    return kernel / kernel.sum()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.3])
def test_kernel_matches_spec_formula(sigma: float) -> None:
    kernel = gaussian_kernel_2d(sigma)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kernel.numpy(), numpy_kernel(sigma), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 7), (13, 17), (97, 101)])
def test_gaussian_upsample_equals_naive_transposed_conv(
    sigma: float, height: int, width: int
) -> None:
    # 97×101 takes the channel-chunked path (20 channels: a 16 + 4 split).
    channels = 20 if height * width >= CHUNK_MIN_PIXELS else 3
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, height, width, generator=generator, requires_grad=True)
    up = GaussianUpsample(channels, sigma)
    out = up(x)
    assert out.shape == (2, channels, 2 * height, 2 * width)
    reference = gaussian_upsample_naive(x, sigma)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    grad = torch.randn(out.shape, generator=generator)
    (mine,) = torch.autograd.grad(out, x, grad)
    (naive,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(mine, naive, rtol=0, atol=1e-5)


def test_naive_matches_numpy_scatter() -> None:
    # Independent transcription of the transposed convolution: each input pixel adds K, centred
    # at (2i, 2j), into the output; padding 2 and output padding 1 crop to exactly 2H×2W.
    sigma = 0.5
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 3, 5, generator=generator, dtype=torch.float64)
    kernel = numpy_kernel(sigma)
    big = np.zeros((2 * 3 + 4, 2 * 5 + 4))
    for i in range(3):
        for j in range(5):
            big[2 * i : 2 * i + 5, 2 * j : 2 * j + 5] += x[0, 0, i, j].item() * kernel
    expected = big[2 : 2 + 6, 2 : 2 + 10]
    np.testing.assert_allclose(
        gaussian_upsample_naive(x, sigma)[0, 0].numpy(), expected, atol=1e-14
    )


def test_sigma_zero_is_exact_zero_insertion() -> None:
    x = torch.randn(1, 4, 13, 17, generator=torch.Generator().manual_seed(4))
    out = GaussianUpsample(4, 0.0)(x)
    assert torch.equal(out[..., ::2, ::2], x)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[..., ::2, ::2] = False
    assert torch.count_nonzero(out[mask]) == 0
    # σ = 0.1 is practically zero insertion (off-centre weights ≈ 4e-6), but not exactly.
    near = GaussianUpsample(4, 0.1)(x)
    assert 0 < (near - out).abs().max() < 1e-4


def test_gaussian_kernel_is_a_buffer() -> None:
    up = GaussianUpsample(3, 0.5)
    assert list(up.parameters()) == []
    assert "weight" in up.state_dict()


@pytest.mark.parametrize("kind", UPSAMPLE_KINDS)
def test_make_upsampler_doubles_size(kind: str) -> None:
    up = make_upsampler(kind, 6, 0.5)
    assert up(torch.randn(1, 6, 5, 7)).shape == (1, 6, 10, 14)


def test_make_upsampler_rejects_unknown_kind() -> None:
    with pytest.raises(UserError, match=r"'bicubic'.*bilinear, nearest, deconv, gaussian"):
        make_upsampler("bicubic", 4, 0.5)
    with pytest.raises(UserError, match="sigma"):
        make_upsampler("gaussian", 4, -0.1)
