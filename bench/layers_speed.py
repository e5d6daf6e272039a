"""Time the Lipschitz convolution and the Gaussian upsampler against their baselines.

Whole-network steps (forward + backward + Adam step) of the decoder (width 128, depth 5, RGB,
bilinear unless named) at 64² and 128² outputs, medians over interleaved repetitions:

(a) ``plain``: λ = 0, every 3×3 convolution a plain convolution (the DIP baseline);
(b) ``lipschitz``: λ = 1.4 with pipeline.lipschitz (certified warm-started power iteration);
(c) ``svd``: λ = 1.4 with σ from a full SVD at every forward (the reference's method, here);
(d) ``gaussian``: λ = 0 with pipeline.upsample.GaussianUpsample in every block, and
    ``gaussian_naive``: the same with a depthwise ``conv_transpose2d`` whose 5×5 kernel is rebuilt
    at every call (the naive form). Their baseline is (a), the same network with bilinear.

Targets: lipschitz/plain ≤ 1.10 and gaussian/plain ≤ 1.15 at every size.

Then the upsamplers alone (forward + backward, batch 1, 128 channels, per input size): bilinear,
GaussianUpsample, the naive form and three separable / polyphase forms that were considered for
GaussianUpsample (each checked equal to the naive form first).

Run from the repository root::

    python -m bench.layers_speed [--quick] [--reps 21] [--out bench/layers_speed.json]

On a shared machine, multi-threaded ops stall whenever another process holds a core; the
interleaving spreads such stalls over all variants, but note the machine's load with the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.lipschitz import LipschitzConv2d
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.results import write_json
from pipeline.upsample import (
    GaussianUpsample,
    gaussian_kernel_1d,
    gaussian_upsample_naive,
)

LIPSCHITZ_TARGET = 1.10
GAUSSIAN_TARGET = 1.15
LAM = 1.4
UPSAMPLE_SIGMA = 0.5
UPSAMPLE_CHANNELS = 128


class SVDLipschitzConv2d(LipschitzConv2d):
    """Reference method: σ from a full SVD of the reshaped W̄ at every forward."""

    def effective_weight(self) -> Tensor:
        with torch.no_grad():
            sigma = torch.linalg.svd(self.weight.detach().flatten(1), full_matrices=False).S[0]
        return self.weight / (sigma / self.lam).clamp(min=1.0)


class NaiveGaussianUpsample(nn.Module):
    """The naive form: builds the 5×5 kernel and runs one transposed convolution per call."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_upsample_naive(x, self.sigma)


def _swap(model: nn.Module, kind: type[nn.Module], build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace every submodule of type ``kind`` by ``build(old)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, build(child))


def _svd_copy(layer: nn.Module) -> nn.Module:
    assert isinstance(layer, LipschitzConv2d)
    copy = SVDLipschitzConv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.lam, padding=layer.padding
    )
    copy.load_state_dict(layer.state_dict())
    return copy


def _naive_copy(layer: nn.Module) -> nn.Module:
    assert isinstance(layer, GaussianUpsample)
    return NaiveGaussianUpsample(layer.sigma)


def build_networks(seed: int) -> dict[str, nn.Module]:
    """The five networks of the module docstring, each initialised from ``seed``."""
    configs = {
        "plain": DecoderConfig(lam=0.0),
        "lipschitz": DecoderConfig(lam=LAM),
        "svd": DecoderConfig(lam=LAM),
        "gaussian": DecoderConfig(lam=0.0, upsample="gaussian"),
        "gaussian_naive": DecoderConfig(lam=0.0, upsample="gaussian"),
    }
    networks: dict[str, nn.Module] = {
        name: Decoder(config, torch.Generator().manual_seed(seed))
        for name, config in configs.items()
    }
    _swap(networks["svd"], LipschitzConv2d, _svd_copy)
    _swap(networks["gaussian_naive"], GaussianUpsample, _naive_copy)
    return networks


def training_step(model: nn.Module, z: Tensor, target: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(z), target).backward()
        optimizer.step()

    return step


def interleaved_medians(
    functions: dict[str, Callable[[], object]], reps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call; each repetition calls every function once, in rotated order."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --- candidate forms of the Gaussian upsampler (op-level comparison only) ---------------------


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
    # Output 2m: k0·x[m−1] + k2·x[m] + k4·x[m+1]; output 2m+1: k1·x[m] + k3·x[m+1] (zero outside).
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


def upsample_functions(size: int) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(1, UPSAMPLE_CHANNELS, size, size, generator=generator, requires_grad=True)
    grad = torch.randn(1, UPSAMPLE_CHANNELS, 2 * size, 2 * size, generator=generator)
    taps = gaussian_kernel_1d(UPSAMPLE_SIGMA).float()
    module = GaussianUpsample(UPSAMPLE_CHANNELS, UPSAMPLE_SIGMA)
    forms: dict[str, Callable[[Tensor], Tensor]] = {
        "bilinear": lambda t: F.interpolate(
            t, scale_factor=2, mode="bilinear", align_corners=False
        ),
        "gaussian": module,
        "gaussian_naive": lambda t: gaussian_upsample_naive(t, UPSAMPLE_SIGMA),
        "separable_transposed": lambda t: separable_transposed(t, taps),
        "polyphase_slices": lambda t: polyphase_slices(t, taps),
        "phases_pixel_shuffle": lambda t: phases_pixel_shuffle(t, taps),
    }
    reference = gaussian_upsample_naive(x, UPSAMPLE_SIGMA)
    for name, form in forms.items():
        if name != "bilinear":
            error = (form(x) - reference).abs().max().item()
            if error > 1e-5:
                raise RuntimeError(f"{name} differs from the naive form by {error:.2e}")

    def timed(form: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(form(x), x, grad)

    return {name: timed(form) for name, form in forms.items()}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64² only, 7 repetitions")
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (default 21)")
    parser.add_argument("--out", type=Path, default=Path("bench/layers_speed.json"))
    args = parser.parse_args()
    reps = 7 if args.quick else args.reps
    if reps < 1:
        raise SystemExit("--reps must be >= 1")
    sizes = [64] if args.quick else [64, 128]
    upsample_sizes = [2, 4, 8, 16, 32, 64] if args.quick else [2, 4, 8, 16, 32, 64, 128, 256]

    network_rows, network_results = [], {}
    targets_met = True
    for size in sizes:
        networks = build_networks(seed=0)
        z = make_input(DecoderConfig(), size, size, torch.Generator().manual_seed(1))
        target = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
        steps = {name: training_step(net, z, target) for name, net in networks.items()}
        medians = interleaved_medians(steps, reps=reps, warmup=3)
        base = medians["plain"]
        network_results[f"{size}x{size}"] = {
            name: {"median_ms": 1e3 * t, "ratio_vs_plain": t / base} for name, t in medians.items()
        }
        for name, t in medians.items():
            network_rows.append([f"{size}²", name, f"{1e3 * t:.1f}", f"{t / base:.3f}"])
        targets_met &= medians["lipschitz"] / base <= LIPSCHITZ_TARGET
        targets_met &= medians["gaussian"] / base <= GAUSSIAN_TARGET

    upsample_rows, upsample_results = [], {}
    for size in upsample_sizes:
        up_reps = reps if size <= 64 else max(5, reps // 3)
        medians = interleaved_medians(upsample_functions(size), reps=up_reps, warmup=2)
        base = medians["bilinear"]
        upsample_results[f"{size}x{size}"] = {
            name: {"median_ms": 1e3 * t, "ratio_vs_bilinear": t / base}
            for name, t in medians.items()
        }
        upsample_rows.append(
            [f"{size}²", f"{1e3 * base:.3f}"]
            + [f"{t / base:.2f}" for name, t in medians.items() if name != "bilinear"]
        )
    upsample_names = [name for name in upsample_functions(2) if name != "bilinear"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} repetitions")
    print("\nNetwork step (forward + backward + Adam), medians:\n")
    print(markdown_table(["output", "variant", "ms", "ratio vs plain"], network_rows))
    print(
        f"\nTargets: lipschitz/plain <= {LIPSCHITZ_TARGET}, gaussian/plain <= {GAUSSIAN_TARGET}: "
        f"{'met' if targets_met else 'NOT met'}"
    )
    print(f"\nUpsampler alone ({UPSAMPLE_CHANNELS} channels, forward + backward), ratios:\n")
    print(markdown_table(["input", "bilinear ms", *upsample_names], upsample_rows))

    write_json(
        args.out,
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "repetitions": reps,
            "load_average_1min": os.getloadavg()[0],
            "network_step": network_results,
            "upsample_op": upsample_results,
            "targets": {
                "lipschitz_vs_plain": LIPSCHITZ_TARGET,
                "gaussian_vs_plain": GAUSSIAN_TARGET,
                "met": targets_met,
            },
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
