"""The networks of K ≥ 1 fits that advance together: the one strategy that differs with K.

The fit engine (:mod:`pipeline.fit`) asks a network for its parameters, its outputs for the current
step and, when members end, for the remaining members only. Two strategies answer:

- :class:`SingleNetwork` (K = 1): the decoder as a plain module, channels-last when asked, under
  bfloat16 autocast for ``bf16``, optionally compiled.
- :class:`StackedNetwork` (K > 1): each member's decoder is built exactly as a single fit builds it
  (:func:`init_member`, from the member's own seed); their parameters and buffers are stacked along
  a leading member dimension and run through one ``torch.func.vmap`` of
  ``torch.func.functional_call`` on a parameter-free template of the decoder. vmap turns each
  convolution into one grouped convolution over the K members, so K networks cost one launch per
  layer instead of K. λ is a per-layer constant of :class:`~pipeline.lipschitz.LipschitzConv2d`, so
  it cannot vary under one template: the template's 3×3 convolutions are uncontrolled and each
  member's used weight ``W_k = W̄_k / max(1, σ̂(W̄_k)/λ_k)`` (docs/method.md §2)
  is formed before the vmapped pass, with σ̂ from :func:`~pipeline.lipschitz.spectral_norms` on all K
  weights at once, on the single fit's certificate schedule. A member with λ ≤ 0 uses ``λ_k = ∞``:
  W_k = W̄_k exactly, so the DIP baseline can share a batch with controlled members. Gaussian σ
  (docs/method.md §3) differs per member through the stacked kernel buffers.

Equality: a member of a stacked network computes what its single network computes, but grouped
convolutions and batched σ̂ round differently. These fits are chaotic in float32 (a one-ulp change of
one weight grows about tenfold every few Adam steps), so a stacked member equals its single fit to
rounding over a short horizon (``tests/test_batched.py``) and is an equivalent run over a whole fit,
as a single fit on another CPU or thread count is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from pipeline.lipschitz import LipschitzConv2d, certified_at, spectral_norms
from pipeline.model import Decoder, MeanOnlyBatchNorm, make_input

if TYPE_CHECKING:
    from pipeline.fit import FitConfig

ParamPairs = list[tuple[Tensor, Tensor]]
"""(old parameter, new parameter) after members were dropped: the optimiser moves its state."""


@dataclass(frozen=True)
class NetworkSettings:
    """What every member of one network shares (a subset of :class:`pipeline.fit.FitConfig`)."""

    input_noise: float
    precision: str
    channels_last: bool
    compile_mode: str | None
    """``torch.compile``'s mode, or None for an eager network."""


def compiled(network: Any, mode: str | None) -> Any:
    """``network`` through ``torch.compile`` in ``mode``; itself when ``mode`` is None."""
    return network if mode is None else torch.compile(network, mode=mode)


def init_member(
    config: FitConfig, shape: tuple[int, int, int], device: torch.device
) -> tuple[Decoder, Tensor, torch.Generator]:
    """The decoder, its fixed input z and the input-noise generator of one fit whose output is
    ``shape`` = (C, H, W).

    All three come from ``config.seed`` in separate streams (weights: seed, z: seed + 1, input
    noise: seed + 2), so a fit is the same whether it runs alone or stacked with others.
    """
    channels, height, width = shape
    model_config = replace(config.model, out_channels=channels)
    model = Decoder(model_config, generator=torch.Generator().manual_seed(config.seed)).to(device)
    z = make_input(model_config, height, width, torch.Generator().manual_seed(config.seed + 1))
    noise = torch.Generator(device).manual_seed(config.seed + 2)
    return model, z.to(device), noise


def perturbed(z: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """``z + scale·n``, n ~ N(0, 1) drawn from ``generator`` (DIP's input regularisation)."""
    return z + scale * torch.randn(z.shape, generator=generator, device=z.device)


class Network:
    """What both strategies keep: the engine's network settings and the device."""

    def __init__(self, settings: NetworkSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device


class SingleNetwork(Network):
    """One fit's decoder as a plain module (K = 1)."""

    def __init__(
        self,
        config: FitConfig,
        settings: NetworkSettings,
        shape: tuple[int, int, int],
        device: torch.device,
    ) -> None:
        super().__init__(settings, device)
        self.model, self.z, self.noise = init_member(config, shape, device)
        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.z = self.z.contiguous(memory_format=torch.channels_last)
        self.network = compiled(self.model, settings.compile_mode)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def forward(self) -> Tensor:
        """The output (1, C, H, W) in float32 for the (perturbed) input."""
        self.model.train()
        z = self.z
        if self.settings.input_noise > 0:
            z = perturbed(z, self.settings.input_noise, self.noise)
        bf16 = self.settings.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.network(z)
        return out.float()

    def select(self, index: Tensor) -> ParamPairs:
        raise RuntimeError("a single network has one member: it ends with its fit")

    def state_dict(self) -> dict[str, Any]:
        controlled = self._controlled()
        return {
            "model": self.model.state_dict(),
            "forwards": [layer.forwards for layer in controlled],
            "noise": self.noise.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for layer, forwards in zip(self._controlled(), state["forwards"], strict=True):
            layer.forwards = forwards
        self.noise.set_state(state["noise"])

    def _controlled(self) -> list[LipschitzConv2d]:
        return [m for m in self.model.modules() if isinstance(m, LipschitzConv2d) and m.controlled]


@dataclass
class _ControlledLayer:
    """Per-member state of one Lipschitz-controlled 3×3 convolution of the stacked decoders."""

    weight: str  # the parameter's name, e.g. "convs.0.conv1.weight"
    lam: Tensor  # (K,) float64; inf for members without control
    basis: Tensor  # (K, n, p) warm starts of the σ estimates
    rtol: float


class StackedNetwork(Network):
    """K decoders stacked along a leading member dimension under one vmap (module docstring).

    ``channels_last`` has no effect (vmap lays the members out as channel groups); vmap ignores
    autocast, so ``bf16`` casts the forward's inputs (weights, buffers, z) to bfloat16 instead.
    """

    def __init__(
        self,
        configs: list[FitConfig],
        settings: NetworkSettings,
        shape: tuple[int, int, int],
        device: torch.device,
    ) -> None:
        super().__init__(settings, device)
        built = [init_member(config, shape, device) for config in configs]
        models = [model for model, _, _ in built]
        with torch.device("meta"):
            # Holds the structure only: every tensor is swapped in by functional_call.
            self.template = Decoder(replace(configs[0].model, out_channels=shape[0], lam=0.0))
            for module in self.template.modules():
                if isinstance(module, MeanOnlyBatchNorm):
                    # Its generated vmap rule measured slower than autograd's graph (model.py).
                    module.fused = False
        self.params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
            .contiguous()
            .requires_grad_()
            for name, _ in self.template.named_parameters()
        }
        self.buffers = {
            name: torch.stack([dict(m.named_buffers())[name] for m in models])
            for name, _ in self.template.named_buffers()
        }
        self.layers = self._controlled_layers(models)
        self.z = torch.stack([z for _, z, _ in built])
        self.noise = [generator for _, _, generator in built]
        self.forwards = 0
        network = vmap(self._member_forward)
        self._network = compiled(network, settings.compile_mode)

    def _controlled_layers(self, models: list[Decoder]) -> list[_ControlledLayer]:
        layers = []
        for name, module in self.template.named_modules():
            if not isinstance(module, LipschitzConv2d):
                continue
            own = [model.get_submodule(name) for model in models]
            controlled = [layer for layer in own if layer.controlled]
            if not controlled:
                continue
            first = controlled[0]
            lam = [layer.lam if layer.controlled else math.inf for layer in own]
            layers.append(
                _ControlledLayer(
                    weight=f"{name}.weight",
                    lam=torch.tensor(lam, dtype=torch.float64, device=self.device),
                    # An uncontrolled member's σ is never used; it starts where the others do.
                    basis=torch.stack(
                        [(layer if layer.controlled else first).basis for layer in own]
                    ),
                    rtol=first.rtol,
                )
            )
        return layers

    def _member_forward(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], z: Tensor
    ) -> Tensor:
        return functional_call(self.template, (params, buffers), (z,))

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def weights(self) -> dict[str, Tensor]:
        """The parameters as the forward uses them: each controlled W̄_k replaced by
        W̄_k / max(1, σ̂_k/λ_k), differentiable in W̄_k with σ̂_k held constant (§2)."""
        weights = dict(self.params)
        free = [self.params[layer.weight] for layer in self.layers]
        sigmas, bases = spectral_norms(
            free,
            [layer.basis for layer in self.layers],
            [layer.rtol for layer in self.layers],
            certified_at(self.forwards),
        )
        for layer, w, sigma, basis in zip(self.layers, free, sigmas, bases, strict=True):
            layer.basis.copy_(basis)
            scale = (sigma / layer.lam).clamp(min=1.0).to(w.dtype)
            weights[layer.weight] = w / scale.view(-1, 1, 1, 1, 1)
        self.forwards += 1
        return weights

    def forward(self) -> Tensor:
        """The members' outputs (K, C, H, W) in float32 for their (perturbed) inputs."""
        z = self.z
        if self.settings.input_noise > 0:
            scale = self.settings.input_noise
            z = torch.stack([perturbed(z[i], scale, g) for i, g in enumerate(self.noise)])
        weights, buffers = self.weights(), self.buffers
        if self.settings.precision == "bf16":
            # The float32 parameters stay the optimiser's; the loss and measures stay float32.
            weights, buffers = (
                {name: t.to(torch.bfloat16) for name, t in group.items()}
                for group in (weights, buffers)
            )
            z = z.to(torch.bfloat16)
        return self._network(weights, buffers, z)[:, 0].float()

    def select(self, index: Tensor) -> ParamPairs:
        """Keep only the members at ``index``; returns (old, new) parameter pairs."""
        old = self.params
        self.params = {
            name: p.detach().index_select(0, index).requires_grad_() for name, p in old.items()
        }
        self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}
        for layer in self.layers:
            layer.lam = layer.lam.index_select(0, index)
            layer.basis = layer.basis.index_select(0, index)
        self.z = self.z.index_select(0, index)
        self.noise = [self.noise[i] for i in index.tolist()]
        return list(zip(old.values(), self.params.values(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {name: p.detach().clone() for name, p in self.params.items()},
            "buffers": {name: b.clone() for name, b in self.buffers.items()},
            "lam": [layer.lam.clone() for layer in self.layers],
            "basis": [layer.basis.clone() for layer in self.layers],
            "z": self.z.clone(),
            "noise": [g.get_state() for g in self.noise],
            "forwards": self.forwards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.buffers = {name: b.to(self.device) for name, b in state["buffers"].items()}
        for layer, lam, basis in zip(self.layers, state["lam"], state["basis"], strict=True):
            layer.lam, layer.basis = lam.to(self.device), basis.to(self.device)
        self.z = state["z"].to(self.device)
        for generator, saved in zip(self.noise, state["noise"], strict=True):
            generator.set_state(saved)
        self.forwards = int(state["forwards"])


def build_network(
    configs: list[FitConfig],
    settings: NetworkSettings,
    shape: tuple[int, int, int],
    device: torch.device,
) -> SingleNetwork | StackedNetwork:
    """The network strategy for ``len(configs)`` members: plain for one, stacked for more."""
    if len(configs) == 1:
        return SingleNetwork(configs[0], settings, shape, device)
    return StackedNetwork(configs, settings, shape, device)
