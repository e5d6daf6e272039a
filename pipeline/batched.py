"""K independent fits in one batched network pass (issue 5, "Throughput").

A paper run is hundreds of independent fits, each a network too small to keep an accelerator (or
even two CPU cores, at the CPU profile's width) busy. Here K members — different images of one
size, or one image with different λ, Gaussian σ or seeds — advance in lockstep:

- **Network.** Each member's decoder is built exactly as a single fit builds it
  (:func:`pipeline.fit.init_fit`, from the member's own seed); their parameters and buffers are
  stacked along a leading member dimension and run through one ``torch.func.vmap`` of
  ``torch.func.functional_call`` on a parameter-free template of the decoder. vmap turns each
  convolution into one grouped convolution over the K members, so the K networks cost one
  launch per layer instead of K (``bench/run.py`` measures this against hand-written grouped
  convolutions and against running the members one after the other).
- **Lipschitz control per member** (method.md §2). λ is a per-layer constant of
  :class:`~pipeline.lipschitz.LipschitzConv2d`, so it cannot vary under one template; instead the
  template's 3×3 convolutions are uncontrolled and each member's used weight
  ``W_k = W̄_k / max(1, σ̂(W̄_k)/λ_k)`` is formed before the vmapped pass, with σ̂ from the layer's
  own estimator :func:`~pipeline.lipschitz.top_singular_value` run on all K weights at once
  (warm-start bases kept per member; certified on the single fit's schedule). A member with
  λ ≤ 0 uses ``λ_k = ∞``: W_k = W̄_k exactly, so the DIP baseline can share a batch with
  controlled members. Gaussian σ differs per member through the stacked kernel buffers of
  :class:`~pipeline.upsample.GaussianUpsample`.
- **Optimiser.** One Adam over the stacked parameters. Adam is elementwise (each entry's update
  depends only on its own gradient, moments and the shared step count), so this is exactly K
  independent Adams. The loss is the sum of the members' losses; member k's parameters receive
  the gradient of its own loss only.
- **Measures and stopping** (method.md §4–5): the shared :class:`~pipeline.fit.FitMonitor`, with
  one ratio rule per member; no host synchronisation except every ``log_every`` iterations.
- **Ending members.** At a sync, a member whose rule has fired (with ``halt_at_stop``), or whose
  callback asks to end it, is recorded as it stands and removed from the batch: its parameters,
  Adam moments and measurements are dropped from the stacks, so it stops changing and the
  others run faster. Without ``halt_at_stop`` every member runs the budget and its output at the
  stop is kept on the side, as in a single fit.

Equality with single fits: member k computes what ``fit(observations[k], tasks[k], configs[k])``
computes, but its grouped convolutions and batched σ̂ round differently. These fits are chaotic in
float32: a one-ulp change of a single weight of a *single* fit grows about tenfold every few Adam
steps, and a batched member departs from its single fit at that same rate. Equality therefore
holds to rounding over a short horizon — ``tests/test_batched.py`` checks 12-iteration fits
(width 8, lr 1e-3) to 1e-4 on the images, 1e-4 relative on the loss and PSNR curves and equal
stop and best iterations — and over a whole fit a member is an equivalent run, as a single fit on
another CPU or thread count is.

Speed options: ``precision`` as in a single fit, except that vmap ignores autocast, so ``bf16``
casts the forward's inputs (parameters, buffers, z) to bfloat16 instead; ``channels_last`` has no
effect (vmap lays the members out as channel groups); ``compile`` compiles the vmapped network.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, vmap

from pipeline.degradations import Degradation
from pipeline.errors import UserError
from pipeline.fit import (
    Backtracking,
    FitConfig,
    FitMonitor,
    FitResult,
    float32_precision,
    init_fit,
    output_shape,
    perturbed,
    prepare_host,
    resolve_device,
    to_device,
    uses_backtracking,
)
from pipeline.lipschitz import LipschitzConv2d, _rows, certified_at, top_singular_value
from pipeline.model import Decoder, MeanOnlyBatchNorm

MEMBER_SETTINGS = ("seed", "lam", "gauss_sigma")
"""Settings that may differ between the members of one batch; all others must agree."""


def common_config(configs: Sequence[FitConfig]) -> FitConfig:
    """The first config, after checking that the others differ from it only in
    :data:`MEMBER_SETTINGS`; otherwise a :class:`UserError` naming the settings."""
    if not configs:
        raise UserError("a batched fit needs at least one member")
    base = configs[0].flat()
    for index, config in enumerate(configs[1:], start=1):
        differ = [
            name
            for name, value in config.flat().items()
            if name not in MEMBER_SETTINGS and value != base[name]
        ]
        if differ:
            raise UserError(
                f"member {index} of the batch differs from member 0 in {', '.join(differ)}; "
                f"only {', '.join(MEMBER_SETTINGS)} may differ between batched fits"
            )
    return configs[0]


@dataclass
class _ControlledLayer:
    """Per-member state of one Lipschitz-controlled 3×3 convolution of the decoder."""

    weight: str  # the parameter's name, e.g. "convs.0.conv1.weight"
    lam: Tensor  # (K,) float64; inf for members without control
    basis: Tensor  # (K, n, p) warm starts of the σ estimates
    rtol: float


class MemberView:
    """One running member of a batched fit, read like a :class:`~pipeline.fit.FitState` by
    callbacks (``iteration``, ``measured``, ``curves``, ``last_out``, ``stopped``,
    ``curves_numpy()``, ``config``)."""

    def __init__(self, state: BatchedFitState, position: int) -> None:
        self._state = state
        self._position = position
        self.member = state.members[position]
        self.config = state.configs[self.member]
        self.iteration = state.iteration

    @property
    def measured(self) -> int:
        return self._state.monitor.measured

    @property
    def curves(self) -> dict[str, Tensor]:
        return {name: values[self._position] for name, values in self._state.monitor.curves.items()}

    @property
    def last_out(self) -> Tensor:
        return self._state.last_out[self._position : self._position + 1]

    @property
    def stopped(self) -> bool:
        """Whether this member's ratio rule has fired (a host sync)."""
        return bool(self._state.monitor.rule.fired[self._position])

    def curves_numpy(self) -> dict[str, np.ndarray]:
        return self._state.monitor.curves_numpy(self._position)


MemberCallback = Callable[[MemberView], bool | None]
"""Called with each running member every ``log_every`` iterations and at the end; returning
True ends that member now (e.g. a pruner), raising aborts the whole batch."""


class BatchedFitState:
    """The state of K fits advanced in lockstep by :meth:`step` (module docstring).

    ``members`` lists the indices (into ``configs``) of the members still running, in the order
    of the stacks; ``results`` holds the :class:`FitResult` of every member that has ended.
    """

    def __init__(
        self,
        observations: Sequence[Tensor],
        tasks: Sequence[Degradation],
        configs: Sequence[FitConfig],
        cleans: Sequence[Tensor | None] | None = None,
    ) -> None:
        count = len(configs)
        cleans = [None] * count if cleans is None else list(cleans)
        if not len(observations) == len(tasks) == len(cleans) == count:
            raise UserError(
                f"a batched fit needs one observation, task and clean image (or None) per "
                f"config: got {len(observations)}, {len(tasks)}, {len(cleans)} for {count}"
            )
        self.base = common_config(configs)
        self.configs = list(configs)
        self.device = resolve_device(self.base.device)
        prepare_host(self.base, self.device)
        dev = self.device
        ys = [to_device(y, dev) for y in observations]
        for index, y in enumerate(ys):
            if y.dim() != 4 or y.shape[0] != 1 or y.shape != ys[0].shape:
                raise UserError(
                    f"observation {index} has shape {tuple(y.shape)}; every member of a batch "
                    f"needs a (1, C, H, W) observation of member 0's shape {tuple(ys[0].shape)}"
                )
        if len({clean is None for clean in cleans}) > 1:
            raise UserError("give a clean image for every member of the batch or for none")
        clean_list = [None if c is None else to_device(c, dev) for c in cleans]
        shapes = {output_shape(t, y, c) for t, y, c in zip(tasks, ys, clean_list, strict=True)}
        if len(shapes) > 1:
            raise UserError(f"the members' outputs differ in size: {sorted(shapes)}")
        shape = shapes.pop()
        backtracks = {uses_backtracking(self.base, task) for task in tasks}
        if len(backtracks) > 1:
            raise UserError("the members' tasks differ in backtracking; set backtrack explicitly")
        backtrack = backtracks.pop()
        y = torch.cat(ys)
        clean = None if clean_list[0] is None else torch.cat(clean_list)  # type: ignore[arg-type]

        built = [init_fit(config, *shape, dev) for config in self.configs]
        models = [model for model, _, _ in built]
        with torch.device("meta"):
            # Holds the structure only: every tensor is swapped in by functional_call.
            self.template = Decoder(replace(self.base.model, out_channels=shape[0], lam=0.0))
            for module in self.template.modules():
                if isinstance(module, MeanOnlyBatchNorm):
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
        self.optimizer = torch.optim.Adam(self.params.values(), lr=self.base.lr)
        self.backtracking = (
            Backtracking(list(self.params.values()), count, self.base.backtrack_drop_db)
            if backtrack
            else None
        )
        self.monitor = FitMonitor(self.base, tasks, y, clean, shape)
        self.last_out = torch.zeros((count, *shape), device=dev)
        self.members = list(range(count))
        self.results: dict[int, FitResult] = {}
        self.iteration = 0
        network = vmap(self._member_forward)
        self._network = torch.compile(network) if self.base.compile else network

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

    def _member_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], z: Tensor):
        return functional_call(self.template, (params, buffers), (z,))

    def weights(self) -> dict[str, Tensor]:
        """The parameters as the forward uses them: each controlled W̄_k replaced by
        W̄_k / max(1, σ̂_k/λ_k), differentiable in W̄_k with σ̂_k held constant (§2)."""
        weights = dict(self.params)
        certify = certified_at(self.iteration)
        # Layers with weights of one shape in one call, as a single fit does (sigma_estimates):
        # the small linear algebra costs about as much per call as per layer.
        groups: dict[tuple[tuple[int, ...], float], list[_ControlledLayer]] = {}
        for layer in self.layers:
            key = (tuple(self.params[layer.weight].shape), layer.rtol)
            groups.setdefault(key, []).append(layer)
        for (_, rtol), group in groups.items():
            free = [self.params[layer.weight] for layer in group]
            with torch.no_grad():
                rows = torch.stack([_rows(w.detach().flatten(2)) for w in free])
                bases = torch.stack([layer.basis for layer in group])
                sigmas, next_bases = top_singular_value(rows, bases, rtol, certify)
            for layer, w, sigma, basis in zip(group, free, sigmas, next_bases, strict=True):
                layer.basis.copy_(basis)
                scale = (sigma / layer.lam).clamp(min=1.0).to(w.dtype)
                weights[layer.weight] = w / scale.view(-1, 1, 1, 1, 1)
        return weights

    def forward(self, z: Tensor) -> Tensor:
        """The members' outputs (K, C, H, W) for inputs ``z`` (K, 1, C_in, h, w)."""
        weights, buffers = self.weights(), self.buffers
        if self.base.precision == "bf16":
            # vmap ignores autocast, so the forward's inputs are cast instead; the float32
            # parameters stay the optimiser's, and the loss and measures stay float32.
            weights, buffers = (
                {name: t.to(torch.bfloat16) for name, t in group.items()}
                for group in (weights, buffers)
            )
            z = z.to(torch.bfloat16)
        return self._network(weights, buffers, z)[:, 0].float()

    @property
    def running(self) -> bool:
        return bool(self.members)

    @property
    def done(self) -> bool:
        return self.iteration >= self.base.iterations

    def step(self) -> None:
        """One Adam step of every running member; measures first on measured iterations."""
        cfg = self.base
        z = self.z
        if cfg.input_noise > 0:
            z = torch.stack(
                [perturbed(z[i], cfg.input_noise, self.noise[i]) for i in range(len(self.members))]
            )
        y, tasks = self.monitor.y, self.monitor.tasks
        with float32_precision(cfg.precision):
            out = self.forward(z)
            losses = torch.stack(
                [task.loss(out[i : i + 1], y[i : i + 1]) for i, task in enumerate(tasks)]
            )
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
        if self.iteration % cfg.measure_every == 0:
            with torch.no_grad():
                psnr_obs = self.monitor.record(out.detach(), losses.detach())
                if self.backtracking is not None:
                    self.backtracking.update(list(self.params.values()), psnr_obs)
        self.optimizer.step()
        self.last_out = out.detach()
        self.iteration += 1

    def sync(self, callbacks: Sequence[MemberCallback], elapsed: Callable[[], float]) -> None:
        """Run the callbacks on every running member, then end those that are done, asked to
        end or (``halt_at_stop``) stopped by their ratio rule; ``elapsed`` gives the wall
        time recorded in their results."""
        asked = {
            position
            for position in range(len(self.members))
            if any([bool(callback(MemberView(self, position))) for callback in callbacks])
        }
        fired = self.monitor.fired() if self.base.halt_at_stop else [False] * len(self.members)
        ending = [
            position
            for position in range(len(self.members))
            if self.done or fired[position] or position in asked
        ]
        if not ending:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = elapsed()
        for position in ending:
            member = self.members[position]
            self.results[member] = self.monitor.result(
                position,
                self.last_out[position : position + 1],
                self.iteration,
                wall,
                self.configs[member],
            )
        keep = [position for position in range(len(self.members)) if position not in ending]
        if keep:
            self._select(keep)
        self.members = [self.members[position] for position in keep]

    def _select(self, keep: list[int]) -> None:
        """Drop every member not at a position in ``keep`` from all stacks."""
        index = torch.tensor(keep, device=self.device)
        old = self.params
        self.params = {
            name: p.detach().index_select(0, index).requires_grad_() for name, p in old.items()
        }
        optimizer = torch.optim.Adam(self.params.values(), lr=self.base.lr)
        for before, after in zip(old.values(), self.params.values(), strict=True):
            moments = self.optimizer.state.get(before)
            if moments:
                # The step count is a shared scalar; the moments lead with the member dimension.
                optimizer.state[after] = {
                    key: value.index_select(0, index) if value.dim() else value.clone()
                    for key, value in moments.items()
                }
        self.optimizer = optimizer
        self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}
        for layer in self.layers:
            layer.lam = layer.lam.index_select(0, index)
            layer.basis = layer.basis.index_select(0, index)
        self.z = self.z.index_select(0, index)
        self.noise = [self.noise[position] for position in keep]
        if self.backtracking is not None:
            self.backtracking.select(index)
        self.last_out = self.last_out.index_select(0, index)
        self.monitor.select(keep)


def fit_batched(
    observations: Sequence[Tensor],
    tasks: Sequence[Degradation] | Degradation,
    configs: Sequence[FitConfig],
    callbacks: Sequence[MemberCallback] = (),
    cleans: Sequence[Tensor | None] | None = None,
) -> list[FitResult]:
    """Fit K members at once; returns their :class:`FitResult` in the order of ``configs``.

    Member k fits ``observations[k]`` (1, C, H, W) under ``tasks[k]`` (or one shared task) with
    ``configs[k]``; ``cleans[k]`` is its clean image for evaluation (all or none). Configs may
    differ only in :data:`MEMBER_SETTINGS` and the observations must share their shape, else a
    :class:`UserError`. Each result equals ``fit(observations[k], tasks[k], configs[k],
    clean=cleans[k])`` up to floating-point rounding; its ``wall_time`` is the batch's elapsed
    time when the member ended.
    """
    if isinstance(tasks, Degradation):
        tasks = [tasks] * len(configs)
    state = BatchedFitState(observations, tasks, configs, cleans)
    start = time.perf_counter()
    log_every = state.base.log_every
    while state.running:
        state.step()
        if state.iteration % log_every == 0 or state.done:
            state.sync(callbacks, lambda: time.perf_counter() - start)
    return [state.results[member] for member in range(len(configs))]
