"""What the method's parts cost, each beside the plain network and beside a naive formulation.

1. :func:`network_overheads`: network steps (forward, backward, Adam at lr 1e-3, MSE to a random
   target) of the decoder (width 128, depth 5, RGB), all variants interleaved in one run:
   ``plain`` (λ = 0, bilinear: the DIP baseline); ``lipschitz`` (λ = 1.4, pipeline.lipschitz);
   ``svd`` (λ = 1.4 with σ from a full SVD of each weight at every forward: the authors' method);
   ``gaussian`` (λ = 0, pipeline.upsample.GaussianUpsample in every block) and ``gaussian_naive``
   (a depthwise ``conv_transpose2d`` whose 5×5 kernel is rebuilt at every call). Medians over two
   windows: ``early`` (steps 4 to 3 + reps, where every forward of the Lipschitz layers is
   certified) and ``steady`` (the last ``reps`` steps, all past
   pipeline.lipschitz.CERTIFY_WARMUP, where one forward in 16 is). A fit is thousands of steps,
   so the targets apply to the steady window: lipschitz/plain ≤ 1.10 and gaussian/plain ≤ 1.15.
2. :func:`measures_alone`: ``fbc`` + ``blur`` + ``sharpness`` + ``psnr`` (pipeline.measures) of a
   512² RGB image against one forward + backward of a 128 → 128 3×3 convolution at 512² (target:
   ≤ 10 %, so that measuring every iteration costs little next to the network's fine layers), and
   against their naive per-iteration form (:func:`host_measures`).
3. :func:`measured_fit`: fit steps at 256² measuring every iteration, never, or in the naive form.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (
    PAPER_WIDTH,
    Timed,
    fit_state,
    interleaved_medians,
    interleaved_times,
    problem,
)
from pipeline.lipschitz import CERTIFY_WARMUP, LipschitzConv2d
from pipeline.measures import blur, fbc, psnr, sharpness
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.upsample import gaussian_upsample_naive

LIPSCHITZ_TARGET = 1.10
GAUSSIAN_TARGET = 1.15
MEASURES_TARGET = 0.10
LAM = 1.4
WARMUP = 3


class SVDLipschitzConv2d(LipschitzConv2d):
    """The authors' method: σ from a full SVD of the reshaped W̄ at every forward."""

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


def training_step(model: nn.Module, z: Tensor, target: Tensor, bf16: bool = False) -> Timed:
    """One step of a plain network fit: forward (under bfloat16 autocast when ``bf16``), MSE to
    ``target``, backward, Adam (lr 1e-3)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z)
        F.mse_loss(out.float(), target).backward()
        optimizer.step()

    return step


def network_overheads(size: int, reps: int) -> dict[str, Any]:
    """Median step times (ms) of the variants and their ratios, per window, at size²."""
    z = make_input(DecoderConfig(), size, size, torch.Generator().manual_seed(1))
    target = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    steps = {name: training_step(net, z, target) for name, net in build_networks(seed=0).items()}
    steady_start = max(WARMUP + reps, WARMUP + CERTIFY_WARMUP)
    times = interleaved_times(steps, steady_start + reps)
    windows = {"early": slice(WARMUP, WARMUP + reps), "steady": slice(steady_start, None)}
    results: dict[str, Any] = {}
    for window, span in windows.items():
        ms = {name: 1e3 * statistics.median(values[span]) for name, values in times.items()}
        results[window] = {
            "step_ms": ms,
            "lipschitz_vs_plain": ms["lipschitz"] / ms["plain"],
            "svd_vs_plain": ms["svd"] / ms["plain"],
            "gaussian_vs_bilinear": ms["gaussian"] / ms["plain"],
            "gaussian_naive_vs_bilinear": ms["gaussian_naive"] / ms["plain"],
        }
    steady = results["steady"]
    results["targets_met"] = (
        steady["lipschitz_vs_plain"] <= LIPSCHITZ_TARGET
        and steady["gaussian_vs_bilinear"] <= GAUSSIAN_TARGET
    )
    return results


def device_measures(out: Tensor, y: Tensor) -> None:
    """The measures as the fit takes them: float32, where the output is, nothing read back."""
    fbc(out, y)
    blur(out)
    sharpness(out)
    psnr(out, y)


def host_measures(out: Tensor, y: Tensor) -> None:
    """The naive per-iteration form: the measures of a float64 copy of the output on the host,
    each value read back (on a GPU, a copy and a synchronisation every iteration)."""
    out, y = out.detach().double().cpu(), y.detach().double().cpu()
    fbc(out, y).tolist()
    blur(out).item()
    sharpness(out).item()
    psnr(out, y).item()


def measures_alone(size: int, reps: int) -> dict[str, Any]:
    """The measures of a size² RGB image against a 128-channel convolution step at size²."""
    generator = torch.Generator().manual_seed(0)
    output, reference = (torch.rand(1, 3, size, size, generator=generator) for _ in range(2))
    features = torch.rand(1, PAPER_WIDTH, size, size, generator=generator, requires_grad=True)
    weight = torch.randn(PAPER_WIDTH, PAPER_WIDTH, 3, 3, generator=generator).requires_grad_()

    def conv_step() -> None:
        # Input and weight gradients, as for a layer inside the network.
        features.grad = weight.grad = None
        F.conv2d(features, weight, padding=1).sum().backward()

    ms = {
        name: 1e3 * seconds
        for name, seconds in interleaved_medians(
            {
                "measures": lambda: device_measures(output, reference),
                "conv_step": conv_step,
                "host_measures": lambda: host_measures(output, reference),
            },
            reps=reps,
            warmup=1,
        ).items()
    }
    fraction = ms["measures"] / ms["conv_step"]
    return {
        "size": size,
        "step_ms": ms,
        "measures_vs_conv_step": fraction,
        "target": MEASURES_TARGET,
        "met": fraction <= MEASURES_TARGET,
        "host_vs_device": ms["host_measures"] / ms["measures"],
    }


def measured_fit(size: int, reps: int) -> dict[str, Any]:
    """Fit steps measuring every iteration, never (after the first), or in the naive form.
    Without backtracking, which acts on measured iterations only."""
    iterations = WARMUP + reps + 1
    every, never, naive = (
        fit_state(size, PAPER_WIDTH, iterations, measure_every=measure_every, backtrack=False)
        for measure_every in (1, 10**9, 10**9)
    )
    _, y, _ = problem(size)

    def naive_step() -> None:
        naive.step()
        host_measures(naive.last_out, y)

    medians = interleaved_medians(
        {"measured": every.step, "unmeasured": never.step, "host_measures": naive_step},
        reps=reps,
        warmup=WARMUP,
    )
    ms = {name: 1e3 * seconds for name, seconds in medians.items()}
    return {
        "size": size,
        "step_ms": ms,
        "measures_vs_none": ms["measured"] / ms["unmeasured"],
        "host_measures_vs_none": ms["host_measures"] / ms["unmeasured"],
    }


def overheads(quick: bool) -> dict[str, Any]:
    """The network variants at 64² (and 128²); the measures alone at 512², and in a fit at 256²
    (where a step is short enough for them to show)."""
    reps = 7 if quick else 15
    return {
        "network": {
            f"{size}x{size}": network_overheads(size, reps)
            for size in ((64,) if quick else (64, 128))
        },
        "measures_alone": measures_alone(512, reps),
        "measured_fit": measured_fit(256, 5 if quick else 9),
    }
