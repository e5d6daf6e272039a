"""The deep-image-prior decoder of Shi et al. (IJCV 2022) and its fixed input (docs/method.md §1).

    z (1 × C_in × H/2^d × W/2^d)
    → conv2x(C_in → width)
    → d × [upsample ×2 → conv2x(width → width)]
    → conv 1×1 (width → C_out, bias, not Lipschitz-controlled) → sigmoid,

    conv2x(a → b) = [pad → LipschitzConv2d 3×3 → mean-only BN → LeakyReLU(0.01)] × 2,

with d = depth = 5 and width = 128 by default, so the output is 32 × the input size. Conv weights
are kaiming-uniform (a = 0, fan_in), biases PyTorch's default. At the defaults an RGB decoder has
1,662,339 parameters (≈1.66 M, as in §1).

The forward estimates σ of all twelve Lipschitz-controlled convolutions in one batched call per
weight shape (pipeline.lipschitz) and has no Python branching on tensor values outside that call,
whose one data-dependent branch is vmap-safe; all per-layer state (the warm-start bases) lives in
buffers. So K independent fits can be batched with ``torch.func.functional_call`` +
``torch.func.vmap`` over stacked parameters and buffers.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.errors import SettingError, UserError, check_choice, check_int, check_number
from pipeline.lipschitz import PADDINGS, LipschitzConv2d, sigma_estimates
from pipeline.upsample import UPSAMPLE_KINDS, make_upsampler

INPUT_KINDS = ("fourier", "noise", "meshgrid")


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder hyper-parameters; the defaults are the paper's (docs/method.md §1–§3).

    :param input: ``"fourier"`` (z = [sin 2πu, cos 2πu], u ~ U(0, 1)), ``"noise"`` (u·noise_scale)
        or ``"meshgrid"`` (2 channels: x and y coordinates in [0, 1]).
    :param input_channels: channels of z for ``"fourier"`` (even: half sin, half cos) and
        ``"noise"``; ``"meshgrid"`` always has 2.
    :param noise_scale: scale of the uniform ``"noise"`` input.
    :param width: channels of every hidden layer.
    :param depth: number of ×2 upsampling blocks; the output is 2^depth × the input size.
    :param out_channels: image channels (3 RGB, 1 grey).
    :param upsample: ``bilinear``, ``nearest``, ``deconv`` or ``gaussian`` for every block, or a
        tuple with one per block (coarse → fine).
    :param gauss_sigma: σ of the Gaussian upsampler per block (coarse → fine), one per block.
    :param lam: Lipschitz bound λ of the 3×3 convolutions; λ ≤ 0 turns the control off (plain DIP).
    :param padding: ``"reflection"`` or ``"zeros"`` for the 3×3 convolutions.
    :param negative_slope: slope of the LeakyReLU for negative inputs.
    """

    input: str = "fourier"
    input_channels: int = 32
    noise_scale: float = 0.1
    width: int = 128
    depth: int = 5
    out_channels: int = 3
    upsample: str | tuple[str, ...] = "bilinear"
    gauss_sigma: tuple[float, ...] = (0.1, 0.1, 0.1, 0.5, 0.5)
    lam: float = 1.4
    padding: str = "reflection"
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        check_choice("input", self.input, INPUT_KINDS)
        if self.input != "meshgrid":
            check_int("input_channels", self.input_channels, 1)
        if self.input == "fourier" and self.input_channels % 2:
            raise SettingError(
                "input_channels",
                f"input_channels must be even for the fourier input (half sin, half cos), "
                f"got {self.input_channels}",
            )
        check_number("noise_scale", self.noise_scale, above=0)
        check_int("width", self.width, 1)
        check_int("depth", self.depth, 0)
        check_int("out_channels", self.out_channels, 1)
        for kind in self.block_upsamplers:
            check_choice("upsample", kind, UPSAMPLE_KINDS)
        if not isinstance(self.gauss_sigma, tuple) or len(self.gauss_sigma) != self.depth:
            count = len(self.gauss_sigma) if isinstance(self.gauss_sigma, tuple) else "no list of"
            raise SettingError(
                "gauss_sigma",
                f"gauss_sigma has {count} values but depth is {self.depth}; "
                f"give one sigma per upsampling block",
            )
        for sigma in self.gauss_sigma:
            check_number("gauss_sigma", sigma, 0)
        check_number("lam", self.lam)
        check_choice("padding", self.padding, PADDINGS)
        check_number("negative_slope", self.negative_slope, 0)

    @property
    def block_upsamplers(self) -> tuple[str, ...]:
        """The upsampler kind of each block, coarse → fine."""
        if isinstance(self.upsample, str):
            return (self.upsample,) * self.depth
        if not isinstance(self.upsample, tuple) or len(self.upsample) != self.depth:
            count = len(self.upsample) if isinstance(self.upsample, tuple) else "no list of"
            raise SettingError(
                "upsample",
                f"upsample has {count} entries but depth is {self.depth}; "
                "give one kind, or one per block",
            )
        return tuple(self.upsample)

    @property
    def in_channels(self) -> int:
        """Channels of the network input z."""
        return 2 if self.input == "meshgrid" else self.input_channels


class _MeanOnlyBatchNormFunction(torch.autograd.Function):
    """y = x − (mean_{n,h,w}(x) − b) with the hand-written backward dx = g − mean_{n,h,w}(g),
    db = Σ_{n,h,w} g: one full-size pass each way, where autograd's graph of the same formula
    makes four (negate, expand, divide, accumulate). At 512² these maps are far larger than the
    caches, so passes over them, not arithmetic, set the cost."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, bias: Tensor) -> Tensor:
        return x - (x.mean(dim=_BN_DIMS, keepdim=True) - bias[:, None, None])

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        """Nothing to save: the backward needs only the incoming gradient."""

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad - grad.mean(dim=_BN_DIMS, keepdim=True), grad.sum(dim=_BN_DIMS)


_BN_DIMS = (-4, -2, -1)


class MeanOnlyBatchNorm(nn.Module):
    """y = x − mean_{n,h,w}(x) + b, per channel (docs/method.md §1).

    No variance scaling and no running statistics: training and eval mode compute the same thing.
    ``fused`` (default) uses the one-pass backward of :class:`_MeanOnlyBatchNormFunction`; under
    ``torch.func.vmap`` its generated batching rule measured slower than autograd's graph of the
    formula (34.8 against 28.6 ms a step for 4 members at 64², width 32), so batched fits turn it
    off (pipeline.networks).
    """

    def __init__(self, num_features: int, fused: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.fused = fused
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return _MeanOnlyBatchNormFunction.apply(x, self.bias)
        return x - (x.mean(dim=_BN_DIMS, keepdim=True) - self.bias[:, None, None])

    def extra_repr(self) -> str:
        return str(self.num_features)


class DoubleConv(nn.Module):
    """conv2x(a → b) = [pad → LipschitzConv2d 3×3 → mean-only BN → LeakyReLU] × 2 (§1)."""

    def __init__(self, cin: int, cout: int, config: DecoderConfig) -> None:
        super().__init__()
        self.conv1 = LipschitzConv2d(cin, cout, 3, lam=config.lam, padding=config.padding)
        self.norm1 = MeanOnlyBatchNorm(cout)
        self.conv2 = LipschitzConv2d(cout, cout, 3, lam=config.lam, padding=config.padding)
        self.norm2 = MeanOnlyBatchNorm(cout)
        # In place: the normalised map it overwrites is needed by no backward.
        self.act = nn.LeakyReLU(config.negative_slope, inplace=True)

    def forward(self, x: Tensor, sigmas: Sequence[Tensor | None] = (None, None)) -> Tensor:
        """``sigmas``: σ̂ of the two convolutions if already estimated (see Decoder.forward)."""
        x = self.act(self.norm1(self.conv1(x, sigmas[0])))
        return self.act(self.norm2(self.conv2(x, sigmas[1])))


class Decoder(nn.Module):
    """The decoder of docs/method.md §1, built from ``config``.

    :param config: hyper-parameters.
    :param generator: the random source of the initial weights (kaiming-uniform, a = 0, fan_in,
        for every convolution; PyTorch's default for biases). None draws them from the global RNG,
        so ``torch.manual_seed`` fixes them; with a generator the global RNG is left untouched.

    Modules: ``convs`` (depth + 1 DoubleConv, coarse → fine), ``upsamplers`` (depth), ``tail``.
    """

    def __init__(self, config: DecoderConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        # Layers draw a default init from the global RNG at construction; fork it so those draws
        # are discarded, and draw the real init below in a fixed module order.
        with torch.random.fork_rng(devices=[]):
            self.convs = nn.ModuleList(
                [DoubleConv(config.in_channels, config.width, config)]
                + [DoubleConv(config.width, config.width, config) for _ in range(config.depth)]
            )
            self.upsamplers = nn.ModuleList(
                make_upsampler(kind, config.width, sigma, padding=config.padding)
                for kind, sigma in zip(config.block_upsamplers, config.gauss_sigma, strict=True)
            )
            self.tail = nn.Conv2d(config.width, config.out_channels, kernel_size=1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw every learnable weight and bias from ``generator`` (global RNG if None)."""
        for module in self.modules():
            if isinstance(module, LipschitzConv2d):
                module.reset_parameters(generator)
            elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(module.weight, a=0.0, mode="fan_in", generator=generator)
                if module.bias is not None:
                    # PyTorch's default: U(±1/√fan_in), fan_in = weight.shape[1]·k·k.
                    bound = 1.0 / math.sqrt(module.weight[0].numel())
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, MeanOnlyBatchNorm):
                nn.init.zeros_(module.bias)

    def sigmas(self) -> list[Tensor | None]:
        """σ̂ of every 3×3 convolution's current weight (coarse → fine); None where λ ≤ 0.

        Estimated together, one batched call per weight shape (see pipeline.lipschitz), which
        updates the convolutions' warm starts and certifies σ ≤ σ̂ ≤ (1 + rtol)·σ on schedule.
        """
        layers = [conv for block in self.convs for conv in (block.conv1, block.conv2)]
        return sigma_estimates(layers) if self.config.lam > 0 else [None] * len(layers)

    def forward(self, z: Tensor) -> Tensor:
        # σ̂ of all controlled convolutions is estimated up front, for the weights as they are
        # now; each convolution then uses its own.
        sigmas = self.sigmas()
        x = self.convs[0](z, sigmas[0:2])
        for i, upsample in enumerate(self.upsamplers, start=1):
            x = self.convs[i](upsample(x), sigmas[2 * i : 2 * i + 2])
        return torch.sigmoid(self.tail(x))


def output_grid(config: DecoderConfig) -> tuple[int, int]:
    """``(multiple, minimum)``: the decoder outputs sides that are multiples of ``2^depth`` and at
    least ``minimum``: ``2 · 2^depth`` with reflection padding, whose coarsest map must be 2 pixels
    to be mirrored, else ``2^depth``."""
    factor = 2**config.depth
    return factor, factor * (2 if config.padding == "reflection" else 1)


def input_size(config: DecoderConfig, height: int, width: int) -> tuple[int, int]:
    """Spatial size of z for an output of ``height`` × ``width``, checked (:func:`output_grid`)."""
    factor, minimum = output_grid(config)
    if height < 1 or width < 1 or height % factor or width % factor:
        raise UserError(
            f"output size {height}x{width} must be positive multiples of 2**depth = {factor} "
            f"(crop the image to a multiple of {factor})"
        )
    if min(height, width) < minimum:
        raise UserError(
            f"output size {height}x{width} gives a {height // factor}x{width // factor} network "
            f"input, too small for reflection padding; use an image of at least "
            f"{minimum}x{minimum}"
        )
    return height // factor, width // factor


def make_input(
    config: DecoderConfig, height: int, width: int, generator: torch.Generator
) -> Tensor:
    """The fixed network input z, shape (1, C_in, height / 2^depth, width / 2^depth) (§1).

    ``fourier``: u ~ U(0, 1) with C_in/2 channels, z = [sin 2πu, cos 2πu]; ``noise``: u·noise_scale
    with C_in channels; ``meshgrid``: x and y coordinates in [0, 1] (no random draw).
    """
    h, w = input_size(config, height, width)
    if config.input == "meshgrid":
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        return torch.stack([xs, ys])[None]
    channels = config.input_channels // 2 if config.input == "fourier" else config.input_channels
    u = torch.rand(1, channels, h, w, generator=generator)
    if config.input == "noise":
        return u * config.noise_scale
    return torch.cat([torch.sin(2 * math.pi * u), torch.cos(2 * math.pi * u)], dim=1)


def param_count(model: nn.Module) -> int:
    """Number of learnable parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
