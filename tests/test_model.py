"""The decoder, its input and mean-only batch norm (docs/method.md §1)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from pipeline.errors import UserError
from pipeline.lipschitz import LipschitzConv2d
from pipeline.model import (
    Decoder,
    DecoderConfig,
    MeanOnlyBatchNorm,
    make_input,
    param_count,
)
from pipeline.upsample import GaussianUpsample


def small_config(**overrides: object) -> DecoderConfig:
    values: dict = {"width": 8, "depth": 2, "gauss_sigma": (0.1, 0.5)} | overrides
    return DecoderConfig(**values)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("depth", "width", "out_channels", "upsample"),
    [
        (0, 4, 1, "bilinear"),
        (1, 8, 3, "gaussian"),
        (2, 5, 1, ("nearest", "deconv")),
        (3, 6, 3, ("bilinear", "gaussian", "nearest")),
    ],
)
def test_output_shape(depth: int, width: int, out_channels: int, upsample: object) -> None:
    config = DecoderConfig(
        width=width,
        depth=depth,
        out_channels=out_channels,
        upsample=upsample,
        gauss_sigma=(0.5,) * depth,
    )
    height, width_px = 3 * 2**depth, 5 * 2**depth  # odd network input 3×5
    z = make_input(config, height, width_px, seeded(0))
    assert z.shape == (1, 32, 3, 5)
    out = Decoder(config, seeded(1))(z)
    assert out.shape == (1, out_channels, height, width_px)
    assert out.min() > 0 and out.max() < 1  # sigmoid


def test_default_parameter_count() -> None:
    # conv2x(32→128): 2 Lipschitz convs with bias + 2 BN biases; 5 × conv2x(128→128); 1×1 conv.
    first = (32 * 9 * 128 + 128) + 128 + (128 * 9 * 128 + 128) + 128
    block = 2 * ((128 * 9 * 128 + 128) + 128)
    expected = first + 5 * block + (128 * 3 + 3)
    assert expected == 1_662_339
    assert param_count(Decoder(DecoderConfig(), seeded(0))) == 1_662_339
    grey = Decoder(DecoderConfig(out_channels=1, upsample="gaussian"), seeded(0))
    assert param_count(grey) == 1_662_339 - 2 * 128 - 2


def test_twelve_controlled_convolutions() -> None:
    model = Decoder(DecoderConfig(width=8, upsample="deconv"), seeded(0))
    convs = [m for m in model.modules() if isinstance(m, LipschitzConv2d)]
    assert sum(m.controlled for m in convs) == 12
    assert sum(not m.controlled for m in convs) == 5  # the conv after each deconvolution


def test_decoder_sigmas_stay_exact_while_training() -> None:
    config = small_config(lam=0.8)
    model = Decoder(config, seeded(0))
    z = make_input(config, 12, 20, seeded(1))
    target = torch.rand(1, 3, 12, 20, generator=seeded(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    layers = [conv for block in model.convs for conv in (block.conv1, block.conv2)]
    for _ in range(10):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(z), target).backward()
        optimizer.step()
        for layer, sigma in zip(layers, model.sigmas(), strict=True):
            exact = torch.linalg.matrix_norm(layer.weight.detach().flatten(1).double(), ord=2)
            assert exact * (1 - 1e-6) <= sigma <= exact * (1 + 1e-4)
    assert Decoder(small_config(lam=0.0), seeded(0)).sigmas() == [None] * 6


def test_per_block_gaussian_sigma() -> None:
    config = small_config(depth=3, upsample="gaussian", gauss_sigma=(0.1, 0.3, 0.7))
    model = Decoder(config, seeded(0))
    sigmas = [m.sigma for m in model.modules() if isinstance(m, GaussianUpsample)]
    assert sigmas == [0.1, 0.3, 0.7]


def test_make_input_is_deterministic() -> None:
    config = small_config()
    a = make_input(config, 12, 20, seeded(7))
    b = make_input(config, 12, 20, seeded(7))
    c = make_input(config, 12, 20, seeded(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fourier_input_is_sin_cos_of_uniform() -> None:
    z = make_input(small_config(), 12, 20, seeded(7))
    sin, cos = z[:, :16], z[:, 16:]
    torch.testing.assert_close(sin**2 + cos**2, torch.ones_like(sin))
    u = torch.rand(1, 16, 3, 5, generator=seeded(7))
    torch.testing.assert_close(sin, torch.sin(2 * math.pi * u))


def test_noise_and_meshgrid_inputs() -> None:
    noise = make_input(small_config(input="noise", input_channels=5), 12, 20, seeded(1))
    assert noise.shape == (1, 5, 3, 5)
    assert noise.min() >= 0 and noise.max() <= 0.1
    grid = make_input(small_config(input="meshgrid"), 12, 20, seeded(1))
    assert grid.shape == (1, 2, 3, 5)
    torch.testing.assert_close(grid[0, 0, 0], torch.linspace(0, 1, 5))
    torch.testing.assert_close(grid[0, 1, :, 0], torch.linspace(0, 1, 3))
    out = Decoder(small_config(input="meshgrid"), seeded(0))(grid)
    assert out.shape == (1, 3, 12, 20)


def test_mean_only_batch_norm() -> None:
    norm = MeanOnlyBatchNorm(4)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = 3.0 * torch.randn(2, 4, 7, 9, generator=seeded(0)) + 5.0
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), norm.bias.detach(), atol=1e-5, rtol=0)
    # Only a per-channel shift: no variance scaling.
    torch.testing.assert_close((y - x).std(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert torch.equal(norm.eval()(x), y)  # no running statistics
    assert list(norm.buffers()) == []


def test_mean_only_batch_norm_gradient_is_that_of_its_formula() -> None:
    # The hand-written backward against autograd's, in float64, also per member under vmap.
    bias = torch.randn(3, dtype=torch.float64, generator=seeded(1), requires_grad=True)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=seeded(0), requires_grad=True)
    norm = MeanOnlyBatchNorm(3).double()
    with torch.no_grad():
        norm.bias.copy_(bias)

    def normalise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(norm, {"bias": b}, (a,))

    assert torch.autograd.gradcheck(normalise, (x, bias))
    weights = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=seeded(2))
    (norm(x) * weights).sum().backward()
    grad_x, grad_b = x.grad.clone(), norm.bias.grad.clone()
    x.grad = None
    formula = x - x.mean(dim=(0, 2, 3), keepdim=True) + bias[:, None, None]
    (formula * weights).sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_b, bias.grad)
    members = torch.randn(4, 1, 3, 5, 7, dtype=torch.float64, generator=seeded(3))
    biases = torch.randn(4, 3, dtype=torch.float64, generator=seeded(4))
    batched = vmap(lambda m, b: functional_call(norm, {"bias": b}, (m,)))(members, biases)
    for member, b, out in zip(members, biases, batched, strict=True):
        expected = member - member.mean(dim=(0, 2, 3), keepdim=True) + b[:, None, None]
        torch.testing.assert_close(out, expected)


def test_init_is_kaiming_uniform_and_seeded() -> None:
    state = torch.random.get_rng_state()
    a = Decoder(small_config(), seeded(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = Decoder(small_config(), seeded(3))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    tail = a.tail.weight
    assert tail.abs().max() <= math.sqrt(6.0 / 8)
    torch.manual_seed(5)
    c = Decoder(small_config())
    torch.manual_seed(5)
    d = Decoder(small_config())
    assert torch.equal(c.tail.weight, d.tail.weight)


def test_eval_equals_train() -> None:
    model = Decoder(small_config(), seeded(0))
    z = make_input(small_config(), 12, 20, seeded(1))
    # Same computation in both modes; σ̂ may differ within its certified 5e-5 between two calls.
    torch.testing.assert_close(model.train()(z), model.eval()(z), rtol=1e-4, atol=1e-6)


def test_batched_fits_with_functional_call_and_vmap() -> None:
    config = small_config(upsample=("bilinear", "gaussian"))
    models = [Decoder(config, seeded(s)) for s in range(3)]
    z = make_input(config, 12, 20, seeded(9))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p: dict, b: dict) -> torch.Tensor:
        return functional_call(base, (p, b), (z,))

    batched = vmap(run)(params, buffers)
    torch.testing.assert_close(batched, torch.stack([m(z) for m in models]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 0}, "width"),
        ({"depth": -1}, "depth"),
        ({"out_channels": 0}, "out_channels"),
        ({"upsample": "bicubic"}, "bicubic"),
        ({"upsample": ("bilinear",)}, "upsample has 1"),
        ({"input": "image"}, "image"),
        ({"gauss_sigma": (0.1, 0.1, 0.5)}, "gauss_sigma has 3"),
        ({"gauss_sigma": (0.1, -0.5)}, "gauss_sigma"),
        ({"input_channels": 7}, "even"),
        ({"padding": "circular"}, "circular"),
        ({"lam": float("nan")}, "lam"),
    ],
)
def test_config_user_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        small_config(**overrides)


def test_default_gauss_sigma_needs_depth_five() -> None:
    with pytest.raises(UserError, match="depth is 3"):
        DecoderConfig(depth=3)


@pytest.mark.parametrize(("height", "width", "message"), [(13, 20, "multiples"), (4, 8, "small")])
def test_input_size_user_errors(height: int, width: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_input(small_config(), height, width, seeded(0))
