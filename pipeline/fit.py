"""The fit loop: optimise a randomly initialised decoder to one degraded observation.

Adam on ``MSE(A(f_θ(z)), y)`` (method.md §6) with, at every measured iteration, the spectral
measures of the output (FBC bands against the observation, blurriness, sharpness, their ratio),
PSNR against the observation and — when the clean image is given, for evaluation only — against
the clean image. All measurements stay on the device in preallocated curves; the host reads them
only every ``log_every`` iterations, when callbacks run.

Everything a fit needs to continue lives in one :class:`FitState` (model, optimiser, input,
RNG, stopping-rule state, curves so far), so it can be checkpointed, resumed or batched. What is
measured lives in a :class:`FitMonitor` of K members, K = 1 here; :mod:`pipeline.batched` runs K
fits in one network pass with the same monitor.

GPU path (issue 5): ``precision`` (strict float32, TF32, bfloat16 autocast), ``channels_last``,
``compile`` (``torch.compile``); host ↔ device copies go through pinned memory, and the curves
come back in one transfer per read.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.degradations import Degradation
from pipeline.errors import UserError
from pipeline.measures import blur, fbc, psnr, psnr_y, sharpness
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.stopping import OnlineRatioRule, StoppingConfig

BACKTRACK_TASKS = ("denoising", "deblocking")
PSNR_PROTOCOLS = {
    "rgb": psnr,
    "y": lambda x, ref: psnr_y(x, ref, shave=4),
}
PRECISIONS = ("fp32", "tf32", "bf16")

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "denoising": {"lam": 1.4},
    "deblocking": {"lam": 1.4},
    "inpainting": {"lam": 1.6},
    "sr": {"lam": 1.4, "iterations": 2000},
    "enhancement": {"lam": 1.0, "iterations": 100},
}
"""Per-task settings of the reference scripts (method.md §2, experiments.md "Tasks"). λ for
super-resolution is not published (tune it); its budget is DIP's 2,000 iterations for ×4."""


@dataclass(frozen=True)
class FitConfig:
    """Settings of one fit; the paper's values are the defaults (method.md §5–6).

    ``backtrack=None`` means the task's default: on for denoising and deblocking, as in DIP.
    ``psnr_protocol`` is how PSNR against the clean image is read (experiments.md, "Protocols"):
    ``rgb`` over all channels, no shave; ``y`` on the Y channel with a 4-pixel border removed (SR).
    ``threads`` > 0 sets PyTorch's CPU threads for the process (0 keeps its default): small
    convolutions gain little from a second thread and lose badly when cores are shared.
    ``halt_at_stop`` ends the fit at the first sync after the ratio rule fires; otherwise the
    fit runs the whole budget and the output at the stop is kept on the side.

    Speed options (results agree with the defaults to rounding, or to bfloat16's precision):
    ``precision`` is ``fp32`` (strict float32; TF32 off on CUDA), ``tf32`` (CUDA's TF32 tensor
    cores for convolutions and matrix products) or ``bf16`` (bfloat16 autocast of the network's
    forward; losses and measures stay float32); ``channels_last`` (the default) stores activations
    NHWC, faster on this project's CPU at every size measured (64² width 32 to 512² width 128);
    ``compile`` runs the network through ``torch.compile``.
    """

    model: DecoderConfig = field(default_factory=DecoderConfig)
    iterations: int = 10_000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    measure_every: int = 1
    log_every: int = 100
    fbc_bands: int = 5
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    halt_at_stop: bool = False
    backtrack: bool | None = None
    backtrack_drop_db: float = 5.0
    input_noise: float = 0.0
    psnr_protocol: str = "rgb"
    threads: int = 0
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 1,
            "lr": self.lr > 0,
            "measure_every": self.measure_every >= 1,
            "log_every": self.log_every >= 1,
            "fbc_bands": self.fbc_bands >= 1,
            "input_noise": self.input_noise >= 0,
            "backtrack_drop_db": self.backtrack_drop_db > 0,
            "psnr_protocol": self.psnr_protocol in PSNR_PROTOCOLS,
            "precision": self.precision in PRECISIONS,
            "threads": self.threads >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"invalid fit setting {name}={getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        """Build from a flat mapping (params.yaml, CLI); keys of :class:`DecoderConfig` go to
        ``model``, keys of :class:`StoppingConfig` to ``stopping``. Unknown keys are a
        :class:`UserError`."""
        own = {f.name for f in fields(cls)} - {"model", "stopping"}
        model_keys = {f.name for f in fields(DecoderConfig)}
        stopping_keys = {f.name for f in fields(StoppingConfig)}
        unknown = set(values) - own - model_keys - stopping_keys
        if unknown:
            raise UserError(f"unknown fit setting(s): {', '.join(sorted(unknown))}")
        model_values = {k: v for k, v in values.items() if k in model_keys}
        for key in ("upsample", "gauss_sigma"):
            if isinstance(model_values.get(key), list):
                model_values[key] = tuple(model_values[key])
        return cls(
            model=DecoderConfig(**model_values),
            stopping=StoppingConfig(**{k: v for k, v in values.items() if k in stopping_keys}),
            **{k: v for k, v in values.items() if k in own},
        )

    def flat(self) -> dict[str, Any]:
        """All settings as one flat mapping (for tracking; :meth:`from_dict` reads it back)."""
        values = asdict(self)
        return {**values.pop("model"), **values.pop("stopping"), **values}


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_RETAIN_BYTES = 1 << 31
"""Freed memory the process keeps for reuse on CPU (glibc's trim threshold, see prepare_host)."""


def prepare_host(config: FitConfig, device: torch.device) -> None:
    """Process-wide settings for fits: PyTorch's CPU threads (``threads`` > 0) and, on a CPU with
    glibc, an allocator that keeps freed memory.

    glibc hands blocks over 32 MiB back to the kernel on free, so a 512² fit, whose activation
    maps are 128 MiB each, re-faults them at every step: 4.9 M page faults and 7.6 of 20 s in the
    kernel for 7 steps of the width-128 decoder, measured. Raising the mmap and trim thresholds
    keeps them on the heap: 2.42 → 1.80 s a step. Smaller maps never reach the threshold.
    """
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        _keep_freed_memory()


@functools.cache
def _keep_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): its allocator is left alone
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, HEAP_RETAIN_BYTES)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


CURVE_NAMES = ("loss", "psnr", "psnr_obs", "blur", "sharpness", "ratio", "wmv", "emv")


@dataclass
class FitResult:
    """What one fit produced. Images are restored images (1,C,H,W) on the CPU in [0,1]."""

    final: Tensor
    at_stop: Tensor
    best: Tensor | None
    stop_iteration: int | None
    best_iteration: int | None
    iterations_run: int
    curves: dict[str, np.ndarray]
    wall_time: float
    config: FitConfig

    def summary(self) -> dict[str, Any]:
        """Scalars of the fit: stop, peak and final values of the curves."""

        def at(name: str, iteration: int | None) -> float | None:
            if iteration is None:
                return None
            index = int(np.searchsorted(self.curves["iteration"], iteration))
            value = float(self.curves[name][index])
            return None if np.isnan(value) else value

        last = int(self.curves["iteration"][-1])
        return {
            "iterations_run": self.iterations_run,
            "stop_iteration": self.stop_iteration,
            "best_iteration": self.best_iteration,
            "psnr_final": at("psnr", last),
            "psnr_stop": at(
                "psnr", self.stop_iteration if self.stop_iteration is not None else last
            ),
            "psnr_best": at("psnr", self.best_iteration),
            "psnr_obs_final": at("psnr_obs", last),
            "wall_time_s": round(self.wall_time, 3),
        }


def init_fit(
    config: FitConfig, channels: int, height: int, width: int, device: torch.device
) -> tuple[Decoder, Tensor, torch.Generator]:
    """The decoder, its fixed input z and the input-noise generator of one fit.

    All three come from ``config.seed`` in separate streams (weights: seed, z: seed + 1, input
    noise: seed + 2), so a fit is the same whether it runs alone or batched with others.
    """
    model_config = replace(config.model, out_channels=channels)
    weights = torch.Generator().manual_seed(config.seed)
    model = Decoder(model_config, generator=weights).to(device)
    inputs = torch.Generator().manual_seed(config.seed + 1)
    z = make_input(model_config, height, width, inputs).to(device)
    if config.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    noise = torch.Generator(device).manual_seed(config.seed + 2)
    return model, z, noise


def perturbed(z: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """``z + scale·n``, n ~ N(0, 1) drawn from ``generator`` (DIP's input regularisation)."""
    return z + scale * torch.randn(z.shape, generator=generator, device=z.device)


def output_shape(task: Degradation, y: Tensor, clean: Tensor | None) -> tuple[int, int, int]:
    """(C, H, W) of the network output for observation ``y``; a clean image must match it."""
    height, width = task.output_shape(y)
    if clean is not None and tuple(clean.shape[-2:]) != (height, width):
        raise UserError(
            f"clean image is {tuple(clean.shape[-2:])}, the fit's output is {(height, width)}"
        )
    return y.shape[1], height, width


def uses_backtracking(config: FitConfig, task: Degradation) -> bool:
    """``config.backtrack``, or the task's default when None (on for denoising, deblocking)."""
    return task.name in BACKTRACK_TASKS if config.backtrack is None else config.backtrack


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` in float32 on ``device``; a host → CUDA copy goes through pinned memory, async."""
    x = x.detach().to(torch.float32)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of same-dtype ``tensors`` on the host, moved in one transfer (into pinned memory
    from CUDA): one synchronisation however many curves are read."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        flat = host
    parts = flat.split([t.numel() for t in tensors])
    return [part.reshape(t.shape) for part, t in zip(parts, tensors, strict=True)]


@contextmanager
def float32_precision(precision: str) -> Iterator[None]:
    """CUDA's TF32 switches for convolutions and matrix products: on for ``tf32``, off
    otherwise (strict float32), restored on exit. They have no effect on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bfloat16 autocast of the network's forward for ``bf16``, a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Backtracking:
    """DIP's fallback (method.md §5), per member: at each measured iteration a drop of the
    observation PSNR of more than ``drop_db`` below the checkpoint's restores the checkpoint into
    the parameters; otherwise the current parameters become the checkpoint. Parameters lead with
    the member dimension K (or have none when K = 1). Done with ``torch.where``, so it costs no
    host synchronisation."""

    def __init__(self, params: Sequence[Tensor], members: int, drop_db: float) -> None:
        self.saved = [p.detach().clone() for p in params]
        self.saved_psnr_obs = torch.full((members,), -float("inf"), device=self.saved[0].device)
        self.drop_db = drop_db

    def update(self, params: Sequence[Tensor], psnr_obs: Tensor) -> None:
        """Check the members' observation PSNR ``psnr_obs`` (K,) of the current ``params``."""
        drop = psnr_obs < self.saved_psnr_obs - self.drop_db
        for param, checkpoint in zip(params, self.saved, strict=True):
            where = drop.view(-1, *(1,) * (param.dim() - 1))
            checkpoint.copy_(torch.where(where, checkpoint, param))
            param.copy_(checkpoint)
        self.saved_psnr_obs = torch.where(drop, self.saved_psnr_obs, psnr_obs)

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (stacked parameters)."""
        self.saved = [p.index_select(0, index) for p in self.saved]
        self.saved_psnr_obs = self.saved_psnr_obs.index_select(0, index)


class FitMonitor:
    """Everything measured while K ≥ 1 fits advance in lockstep, kept on the device.

    At a measured iteration m with outputs ``out`` (K, C, H, W), each member k records its loss;
    the PSNR and the FBC bands (method.md §4) of ``A'(out)·mask`` against its observation; blur,
    sharpness and their ratio (§5), which feeds the members' :class:`OnlineRatioRule` (the output at
    the rule's first firing is kept); with the clean image, PSNR against it under
    ``psnr_protocol`` and the best output so far; and the windowed (ES-WMV) and exponential
    (ES-EMV) moving variances of its outputs. Curves are (K, n) tensors, n = ⌈iterations /
    measure_every⌉. A single fit (:class:`FitState`) is K = 1; batched fits
    (:mod:`pipeline.batched`) use this same code.
    """

    def __init__(
        self,
        config: FitConfig,
        tasks: Sequence[Degradation],
        y: Tensor,
        clean: Tensor | None,
        out_shape: tuple[int, int, int],
    ) -> None:
        cfg, dev, k = config, y.device, len(tasks)
        self.config = config
        self.tasks = list(tasks)
        self.y = y
        self.clean = clean
        masks = [task.loss_mask(y[i : i + 1]) for i, task in enumerate(self.tasks)]
        self.mask = (
            None
            if all(mask is None for mask in masks)
            else torch.cat(
                [
                    torch.ones_like(y[i : i + 1, :1]) if mask is None else mask
                    for i, mask in enumerate(masks)
                ]
            )
        )
        n = -(-cfg.iterations // cfg.measure_every)
        self.measured = 0
        self.curves = {name: torch.full((k, n), float("nan"), device=dev) for name in CURVE_NAMES}
        self.curves["fbc"] = torch.full((k, n, cfg.fbc_bands), float("nan"), device=dev)
        stopping = cfg.stopping
        self.rule = OnlineRatioRule(
            k, stopping.ratio_window, stopping.ratio_eps, dev, stopping.ratio_scale
        )
        shape = (k, *out_shape)
        self.stop_out = torch.zeros(shape, device=dev)
        self.best_out = torch.zeros(shape, device=dev)
        self.best_psnr = torch.full((k,), -float("inf"), device=dev)
        self.best_at = torch.full((k,), -1, dtype=torch.long, device=dev)
        window = cfg.stopping.wmv_window
        self.window_outs = torch.zeros((window, *shape), device=dev) if window else None
        self.window_sum = torch.zeros(shape, dtype=torch.float64, device=dev)
        self.window_sq = torch.zeros((k,), dtype=torch.float64, device=dev)
        self.ema = torch.zeros(shape, device=dev)
        self.emv = torch.zeros((k,), device=dev)

    def record(self, out: Tensor, loss: Tensor) -> Tensor:
        """Measure outputs ``out`` (K, C, H, W) with losses ``loss`` (K,) as the next measurement;
        returns the members' PSNR of ``A'(out)·mask`` against their observations (K,)."""
        m, c, cfg = self.measured, self.curves, self.config
        seen = torch.cat([task.forward(out[i : i + 1]) for i, task in enumerate(self.tasks)])
        if self.mask is not None:
            seen = seen * self.mask
        c["loss"][:, m] = loss
        psnr_obs = psnr(seen, self.y)
        c["psnr_obs"][:, m] = psnr_obs
        c["fbc"][:, m] = fbc(seen if seen.shape == self.y.shape else out, self.y, cfg.fbc_bands)
        b, s = blur(out), sharpness(out)
        c["blur"][:, m], c["sharpness"][:, m] = b, s
        ratio = b / s
        c["ratio"][:, m] = ratio
        first = self.rule.update(ratio)
        self.stop_out = torch.where(first.view(-1, 1, 1, 1), out, self.stop_out)
        if self.clean is not None:
            p = PSNR_PROTOCOLS[cfg.psnr_protocol](out, self.clean)
            c["psnr"][:, m] = p
            better = p > self.best_psnr
            self.best_out = torch.where(better.view(-1, 1, 1, 1), out, self.best_out)
            self.best_psnr = torch.where(better, p, self.best_psnr)
            self.best_at = torch.where(better, torch.full_like(self.best_at, m), self.best_at)
        self._track_variance(out, m)
        self.measured += 1
        return psnr_obs

    def _track_variance(self, x: Tensor, m: int) -> None:
        """Windowed (ES-WMV) and exponential (ES-EMV) moving variance of the outputs."""
        cfg = self.config
        dims = (1, 2, 3)
        numel = x[0].numel()
        if self.window_outs is not None:
            w = cfg.stopping.wmv_window
            slot = m % w
            old = self.window_outs[slot]
            self.window_sum += x.double() - old.double()
            self.window_sq += x.double().square().sum(dims) - old.double().square().sum(dims)
            self.window_outs[slot] = x
            if m + 1 >= w:
                mean = self.window_sum / w
                var = (self.window_sq / w - mean.square().sum(dims)) / numel
                self.curves["wmv"][:, m] = var.float()
        if m == 0:
            self.ema = x.clone()
            self.curves["emv"][:, m] = 0.0
        else:
            a = cfg.stopping.emv_alpha
            dev2 = (x - self.ema).square().mean(dims)
            self.emv = (1 - a) * self.emv + a * (1 - a) * dev2
            self.ema = (1 - a) * self.ema + a * x
            self.curves["emv"][:, m] = self.emv

    def fired(self) -> list[bool]:
        """Whether each member's ratio rule has fired (one host synchronisation)."""
        return [bool(v) for v in to_host([self.rule.fired])[0]]

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the members at positions ``keep``, in that order."""
        index = torch.tensor(list(keep), device=self.y.device)
        self.tasks = [self.tasks[i] for i in keep]
        self.rule.select(index)
        self.curves = {name: values.index_select(0, index) for name, values in self.curves.items()}
        for name in (
            "y",
            "clean",
            "mask",
            "stop_out",
            "best_out",
            "best_psnr",
            "best_at",
            "window_sum",
            "window_sq",
            "ema",
            "emv",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        if self.window_outs is not None:
            self.window_outs = self.window_outs.index_select(1, index)

    def curves_numpy(self, member: int) -> dict[str, np.ndarray]:
        """Member ``member``'s curves so far, on the host (one synchronisation)."""
        m = self.measured
        names = (*CURVE_NAMES, "fbc")
        host = to_host([self.curves[name][member, :m] for name in names])
        out = {name: values.numpy() for name, values in zip(CURVE_NAMES, host, strict=False)}
        for band in range(self.config.fbc_bands):
            out[f"fbc_{band + 1}"] = host[-1][:, band].numpy()
        out["iteration"] = np.arange(m) * self.config.measure_every
        return out

    def result(
        self,
        member: int,
        final: Tensor,
        iterations_run: int,
        wall_time: float,
        config: FitConfig,
    ) -> FitResult:
        """Member ``member``'s :class:`FitResult`; ``final`` is its last output (1, C, H, W)."""
        every = self.config.measure_every
        fired_at, best_at = (
            int(v) for v in to_host([self.rule.fired_at[member], self.best_at[member]])
        )
        task, y = self.tasks[member], self.y[member : member + 1]

        def host(x: Tensor) -> Tensor:
            return task.restore(x, y).clamp(0, 1).cpu()

        restored = host(final)
        return FitResult(
            final=restored,
            at_stop=host(self.stop_out[member : member + 1]) if fired_at >= 0 else restored,
            best=host(self.best_out[member : member + 1]) if best_at >= 0 else None,
            stop_iteration=fired_at * every if fired_at >= 0 else None,
            best_iteration=best_at * every if best_at >= 0 else None,
            iterations_run=iterations_run,
            curves=self.curves_numpy(member),
            wall_time=wall_time,
            config=config,
        )


class FitState:
    """The whole state of one fit, advanced one iteration at a time by :meth:`step`."""

    def __init__(
        self,
        observation: Tensor,
        task: Degradation,
        config: FitConfig,
        clean: Tensor | None = None,
    ):
        self.config = config
        self.task = task
        self.device = resolve_device(config.device)
        prepare_host(config, self.device)
        dev = self.device
        self.y = to_device(observation, dev)
        self.clean = None if clean is None else to_device(clean, dev)
        shape = output_shape(task, self.y, self.clean)
        self.model, self.z, self.noise_generator = init_fit(config, *shape, dev)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if config.compile else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.backtracking = (
            Backtracking(list(self.model.parameters()), 1, config.backtrack_drop_db)
            if uses_backtracking(config, task)
            else None
        )
        self.monitor = FitMonitor(config, [task], self.y, self.clean, shape)
        self.last_out = torch.zeros((1, *shape), device=dev)
        self.iteration = 0

    @property
    def measured(self) -> int:
        """Number of measurements so far."""
        return self.monitor.measured

    @property
    def curves(self) -> dict[str, Tensor]:
        """The curves on the device, (n,) each (``fbc``: (n, bands)); unmeasured rows are NaN."""
        return {name: values[0] for name, values in self.monitor.curves.items()}

    def step(self) -> None:
        """One Adam step; measures the output first when this iteration is a measured one."""
        cfg = self.config
        self.model.train()
        z = self.z
        if cfg.input_noise > 0:
            z = perturbed(z, cfg.input_noise, self.noise_generator)
        with float32_precision(cfg.precision):
            with autocast(cfg.precision, self.device):
                out = self.network(z)
            out = out.float()
            loss = self.task.loss(out, self.y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.iteration % cfg.measure_every == 0:
            with torch.no_grad():
                psnr_obs = self.monitor.record(out.detach(), loss.detach().reshape(1))
                if self.backtracking is not None:
                    self.backtracking.update(list(self.model.parameters()), psnr_obs)
        self.optimizer.step()
        self.last_out = out.detach()
        self.iteration += 1

    @property
    def done(self) -> bool:
        return self.iteration >= self.config.iterations

    @property
    def stopped(self) -> bool:
        """Whether the ratio rule has fired (reads the device flag: a host sync)."""
        return self.monitor.fired()[0]

    def curves_numpy(self) -> dict[str, np.ndarray]:
        """The measured curves so far, on the host (one sync)."""
        return self.monitor.curves_numpy(0)

    def result(self, wall_time: float) -> FitResult:
        return self.monitor.result(0, self.last_out, self.iteration, wall_time, self.config)


Callback = Callable[[FitState], None]


def fit(
    observation: Tensor,
    task: Degradation,
    config: FitConfig,
    callbacks: Sequence[Callback] = (),
    clean: Tensor | None = None,
) -> FitResult:
    """Fit the decoder to ``observation`` under ``task``'s forward operator.

    ``callbacks`` are called with the :class:`FitState` every ``config.log_every`` iterations and
    once at the end; they may raise to abort (e.g. an Optuna pruner).
    """
    state = FitState(observation, task, config, clean)
    start = time.perf_counter()
    while not state.done:
        state.step()
        if state.iteration % config.log_every == 0 or state.done:
            for callback in callbacks:
                callback(state)
            if config.halt_at_stop and state.stopped:
                break
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    return state.result(time.perf_counter() - start)
