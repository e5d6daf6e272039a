"""Time the Lipschitz convolution and the Gaussian upsampler against their baselines.

Whole-network training steps (forward + backward + Adam step, lr 1e-3, MSE to a random target) of
the decoder (width 128, depth 5, RGB, bilinear unless named) at 64² and 128² outputs:

(a) ``plain``: λ = 0, every 3×3 convolution a plain convolution (the DIP baseline);
(b) ``lipschitz``: λ = 1.4 with pipeline.lipschitz (certified σ at every forward);
(c) ``svd``: λ = 1.4 with σ from a full SVD of each weight at every forward (the reference's
    method, reimplemented here);
(d) ``gaussian``: λ = 0 with pipeline.upsample.GaussianUpsample in every block, and
    ``gaussian_naive``: the same with a depthwise ``conv_transpose2d`` whose 5×5 kernel is rebuilt
    at every call (the naive form). Their baseline is (a), the same network with bilinear.

All variants step in turn (shuffled order), so load from other processes hits them alike. Medians
are taken over two windows of the same run: ``early`` (steps 4 to 3 + reps) and ``steady`` (the
last ``reps`` steps, after ``--settle`` more). Early in a fit every forward of the Lipschitz
layers is certified (pipeline.lipschitz.CERTIFY_WARMUP), later one in 16; a DIP fit is
thousands of steps, so the targets apply to the steady window: lipschitz/plain ≤ 1.10 and
gaussian/plain ≤ 1.15 at every size.

Then the upsamplers alone (forward + backward, batch 1, 128 channels, per input size): bilinear,
GaussianUpsample, the naive form and three separable / polyphase forms that were considered for
GaussianUpsample (each checked equal to the naive form first).

Run from the repository root::

    python -m bench.layers_speed [--quick] [--reps 21] [--settle 40] [--out PATH]

On a shared machine, multi-threaded ops stall whenever another process holds a core; note the
load average (written to the JSON) with the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
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
from pipeline.upsample import GaussianUpsample, gaussian_kernel_1d, gaussian_upsample_naive

LIPSCHITZ_TARGET = 1.10
GAUSSIAN_TARGET = 1.15
LAM = 1.4
UPSAMPLE_SIGMA = 0.5
UPSAMPLE_CHANNELS = 128
WARMUP = 3


class SVDLipschitzConv2d(LipschitzConv2d):
    """Reference method: σ from a full SVD of the reshaped W̄ at every forward."""

    def effective_weight(self, sigma: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            sigma = torch.linalg.svd(self.weight.detach().flatten(1), full_matrices=False).S[0]
        return self.weight / (sigma / self.lam).clamp(min=1.0)


class SVDDecoder(Decoder):
    """The decoder with SVDLipschitzConv2d layers, which compute their own σ."""

    def __init__(self, config: DecoderConfig, generator: torch.Generator) -> None:
        super().__init__(config, generator)
        for block in self.convs:
            for name in ("conv1", "conv2"):
                layer = getattr(block, name)
                copy = SVDLipschitzConv2d(
                    layer.in_channels, layer.out_channels, 3, layer.lam, padding=layer.padding
                )
                copy.load_state_dict(layer.state_dict())
                setattr(block, name, copy)

    def sigmas(self) -> list[Tensor | None]:
        return [None] * (2 * len(self.convs))


class NaiveGaussianUpsample(nn.Module):
    """The naive form: builds the 5×5 kernel and runs one transposed convolution per call."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_upsample_naive(x, self.sigma)


def build_networks(seed: int) -> dict[str, nn.Module]:
    """The five networks of the module docstring, each initialised from ``seed``."""

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    gaussian = DecoderConfig(lam=0.0, upsample="gaussian")
    naive = Decoder(gaussian, generator())
    naive.upsamplers = nn.ModuleList(NaiveGaussianUpsample(s) for s in gaussian.gauss_sigma)
    return {
        "plain": Decoder(DecoderConfig(lam=0.0), generator()),
        "lipschitz": Decoder(DecoderConfig(lam=LAM), generator()),
        "svd": SVDDecoder(DecoderConfig(lam=LAM), generator()),
        "gaussian": Decoder(gaussian, generator()),
        "gaussian_naive": naive,
    }


def training_step(model: nn.Module, z: Tensor, target: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(z), target).backward()
        optimizer.step()

    return step


def interleaved_times(
    functions: dict[str, Callable[[], object]], calls: int
) -> dict[str, list[float]]:
    """Seconds of each call; every round calls every function once, in a shuffled order (seeded).

    A rotated order would give each function the same predecessor in almost every round, and
    what a predecessor leaves behind (caches, a thread pool spinning down) biased the ratios by a
    few per cent.
    """
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(calls):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    functions: dict[str, Callable[[], object]], reps: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function over ``reps`` interleaved rounds, after
    ``warmup`` untimed rounds."""
    interleaved_times(functions, warmup)
    times = interleaved_times(functions, reps)
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


def network_benchmark(size: int, reps: int, settle: int) -> dict[str, dict[str, dict[str, float]]]:
    """Median step times (ms) and ratios vs plain, per window, for one output size."""
    networks = build_networks(seed=0)
    z = make_input(DecoderConfig(), size, size, torch.Generator().manual_seed(1))
    target = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    steps = {name: training_step(net, z, target) for name, net in networks.items()}
    times = interleaved_times(steps, WARMUP + reps + settle + reps)
    windows = {
        "early": slice(WARMUP, WARMUP + reps),
        "steady": slice(WARMUP + reps + settle, None),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for window, span in windows.items():
        medians = {name: statistics.median(values[span]) for name, values in times.items()}
        results[window] = {
            name: {"median_ms": 1e3 * t, "ratio_vs_plain": t / medians["plain"]}
            for name, t in medians.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64² only, 7 repetitions, settle 20")
    parser.add_argument("--reps", type=int, default=21, help="steps per window (default 21)")
    parser.add_argument("--settle", type=int, default=40, help="steps between windows (40)")
    parser.add_argument("--out", type=Path, default=Path("bench/layers_speed.json"))
    args = parser.parse_args()
    reps, settle = (7, 20) if args.quick else (args.reps, args.settle)
    if reps < 1 or settle < 0:
        raise SystemExit("--reps must be >= 1 and --settle >= 0")
    sizes = [64] if args.quick else [64, 128]
    upsample_sizes = [2, 4, 8, 16, 32, 64] if args.quick else [2, 4, 8, 16, 32, 64, 128, 256]
    load_before = os.getloadavg()[0]

    network_results = {}
    network_rows = []
    targets_met = True
    for size in sizes:
        results = network_benchmark(size, reps, settle)
        network_results[f"{size}x{size}"] = results
        for name in results["steady"]:
            early, steady = results["early"][name], results["steady"][name]
            network_rows.append(
                [
                    f"{size}²",
                    name,
                    f"{early['median_ms']:.1f}",
                    f"{early['ratio_vs_plain']:.3f}",
                    f"{steady['median_ms']:.1f}",
                    f"{steady['ratio_vs_plain']:.3f}",
                ]
            )
        targets_met &= results["steady"]["lipschitz"]["ratio_vs_plain"] <= LIPSCHITZ_TARGET
        targets_met &= results["steady"]["gaussian"]["ratio_vs_plain"] <= GAUSSIAN_TARGET

    upsample_rows, upsample_results = [], {}
    for size in upsample_sizes:
        up_reps = reps if size <= 64 else max(5, reps // 3)
        functions = upsample_functions(size)
        interleaved_times(functions, 2)
        times = interleaved_times(functions, up_reps)
        medians = {name: statistics.median(values) for name, values in times.items()}
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
    load_after = os.getloadavg()[0]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} steps per window, "
        f"load average {load_before:.2f} before / {load_after:.2f} after"
    )
    print("\nNetwork step (forward + backward + Adam), medians:\n")
    header = ["output", "variant", "early ms", "early ratio", "steady ms", "steady ratio"]
    print(markdown_table(header, network_rows))
    print(
        f"\nTargets (steady window): lipschitz/plain <= {LIPSCHITZ_TARGET}, "
        f"gaussian/plain <= {GAUSSIAN_TARGET}: {'met' if targets_met else 'NOT met'}"
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
            "steps_per_window": reps,
            "settle_steps": settle,
            "load_average_1min": {"before": load_before, "after": load_after},
            "network_step": network_results,
            "upsample_op": upsample_results,
            "targets": {
                "window": "steady",
                "lipschitz_vs_plain": LIPSCHITZ_TARGET,
                "gaussian_vs_plain": GAUSSIAN_TARGET,
                "met": targets_met,
            },
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
