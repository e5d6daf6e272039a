"""The fit loop: optimise a randomly initialised decoder to one degraded observation.

Adam on ``MSE(A(f_θ(z)), y)`` (method.md §6) with, at every measured iteration, the spectral
measures of the output (FBC bands against the observation, blurriness, sharpness, their ratio),
PSNR against the observation and — when the clean image is given, for evaluation only — against
the clean image. All measurements stay on the device in preallocated curves; the host reads them
only every ``log_every`` iterations, when callbacks run.

Everything a fit needs to continue lives in one :class:`FitState` (model, optimiser, input,
RNG, stopping-rule state, curves so far), so it can be checkpointed, resumed or batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.degradations import Degradation
from pipeline.errors import UserError
from pipeline.measures import blur, fbc, psnr, psnr_y, sharpness
from pipeline.model import Decoder, DecoderConfig, make_input
from pipeline.stopping import OnlineRatioRule

BACKTRACK_TASKS = ("denoising", "deblocking")
PSNR_PROTOCOLS = {
    "rgb": psnr,
    "y": lambda x, ref: psnr_y(x, ref, shave=4),
}

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
    """

    model: DecoderConfig = field(default_factory=DecoderConfig)
    iterations: int = 10_000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    measure_every: int = 1
    log_every: int = 100
    fbc_bands: int = 5
    stop_window: int = 100
    stop_eps: float = 0.01
    halt_at_stop: bool = False
    backtrack: bool | None = None
    backtrack_drop_db: float = 5.0
    variance_window: int = 100
    emv_alpha: float = 0.1
    input_noise: float = 0.0
    psnr_protocol: str = "rgb"
    threads: int = 0

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 1,
            "lr": self.lr > 0,
            "measure_every": self.measure_every >= 1,
            "log_every": self.log_every >= 1,
            "fbc_bands": self.fbc_bands >= 1,
            "variance_window": self.variance_window >= 0,
            "emv_alpha": 0 < self.emv_alpha <= 1,
            "input_noise": self.input_noise >= 0,
            "backtrack_drop_db": self.backtrack_drop_db > 0,
            "psnr_protocol": self.psnr_protocol in PSNR_PROTOCOLS,
            "threads": self.threads >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"invalid fit setting {name}={getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        """Build from a flat mapping (params.yaml, CLI); keys of :class:`DecoderConfig` go to
        ``model``. Unknown keys are a :class:`UserError`."""
        own = {f.name for f in fields(cls)} - {"model"}
        model_keys = {f.name for f in fields(DecoderConfig)}
        unknown = set(values) - own - model_keys
        if unknown:
            raise UserError(f"unknown fit setting(s): {', '.join(sorted(unknown))}")
        model_values = {k: v for k, v in values.items() if k in model_keys}
        for key in ("upsample", "gauss_sigma"):
            if isinstance(model_values.get(key), list):
                model_values[key] = tuple(model_values[key])
        return cls(
            model=DecoderConfig(**model_values),
            **{k: v for k, v in values.items() if k in own},
        )

    def flat(self) -> dict[str, Any]:
        """All settings as one flat mapping (for tracking)."""
        values = asdict(self)
        return {**values.pop("model"), **values}


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
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        dev = self.device
        self.y = observation.to(dev, torch.float32)
        self.clean = None if clean is None else clean.to(dev, torch.float32)
        height, width = task.output_shape(self.y)
        if self.clean is not None and tuple(self.clean.shape[-2:]) != (height, width):
            raise UserError(
                f"clean image is {tuple(self.clean.shape[-2:])}, "
                f"the fit's output is {(height, width)}"
            )
        model_config = replace(config.model, out_channels=self.y.shape[1])
        # Separate streams for the weights, the input and the input noise, all from the seed.
        weights = torch.Generator().manual_seed(config.seed)
        self.model = Decoder(model_config, generator=weights).to(dev)
        inputs = torch.Generator().manual_seed(config.seed + 1)
        self.z = make_input(model_config, height, width, inputs).to(dev)
        self.noise_generator = torch.Generator(dev).manual_seed(config.seed + 2)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.backtrack = (
            task.name in BACKTRACK_TASKS if config.backtrack is None else config.backtrack
        )
        self.rule = OnlineRatioRule(config.stop_window, config.stop_eps, dev)
        self.iteration = 0
        self._init_curves(height, width)

    def _init_curves(self, height: int, width: int) -> None:
        cfg, dev = self.config, self.device
        n = -(-cfg.iterations // cfg.measure_every)
        self.measured = 0
        self.curves = {name: torch.full((n,), float("nan"), device=dev) for name in CURVE_NAMES}
        self.curves["fbc"] = torch.full((n, cfg.fbc_bands), float("nan"), device=dev)
        shape = (1, self.y.shape[1], height, width)
        self.stop_out = torch.zeros(shape, device=dev)
        self.best_out = torch.zeros(shape, device=dev)
        self.best_psnr = torch.full((), -float("inf"), device=dev)
        self.best_at = torch.full((), -1, dtype=torch.long, device=dev)
        self.last_out = torch.zeros(shape, device=dev)
        window = cfg.variance_window
        self.window_outs = torch.zeros((window, *shape[1:]), device=dev) if window else None
        self.window_sum = torch.zeros(shape[1:], dtype=torch.float64, device=dev)
        self.window_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.ema = torch.zeros(shape[1:], device=dev)
        self.emv = torch.zeros((), device=dev)
        if self.backtrack:
            self.saved_params = [p.detach().clone() for p in self.model.parameters()]
            self.saved_psnr_obs = torch.full((), -float("inf"), device=dev)

    def step(self) -> None:
        """One Adam step; measures the output first when this iteration is a measured one."""
        cfg = self.config
        self.model.train()
        z = self.z
        if cfg.input_noise > 0:
            z = z + cfg.input_noise * torch.randn(
                z.shape, generator=self.noise_generator, device=self.device
            )
        out = self.model(z)
        loss = self.task.loss(out, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        measured = self.iteration % cfg.measure_every == 0
        if measured:
            with torch.no_grad():
                self._measure(out.detach(), loss.detach())
        self.optimizer.step()
        self.last_out = out.detach()
        self.iteration += 1

    def _measure(self, out: Tensor, loss: Tensor) -> None:
        m, c = self.measured, self.curves
        seen = self.task.forward(out)
        mask = self.task.loss_mask(self.y)
        if mask is not None:
            seen = seen * mask
        c["loss"][m] = loss
        psnr_obs = psnr(seen, self.y)[0]
        c["psnr_obs"][m] = psnr_obs
        c["fbc"][m] = fbc(
            seen if seen.shape == self.y.shape else out, self.y, self.config.fbc_bands
        )[0]
        b, s = blur(out)[0], sharpness(out)[0]
        c["blur"][m], c["sharpness"][m] = b, s
        ratio = b / s
        c["ratio"][m] = ratio
        fired = self.rule.update(ratio)
        first = fired & (self.rule.fired_at == m)
        self.stop_out = torch.where(first, out, self.stop_out)
        if self.clean is not None:
            p = PSNR_PROTOCOLS[self.config.psnr_protocol](out, self.clean)[0]
            c["psnr"][m] = p
            better = p > self.best_psnr
            self.best_out = torch.where(better, out, self.best_out)
            self.best_psnr = torch.where(better, p, self.best_psnr)
            self.best_at = torch.where(better, torch.full_like(self.best_at, m), self.best_at)
        self._track_variance(out, m)
        if self.backtrack:
            self._backtrack(psnr_obs)
        self.measured += 1

    def _track_variance(self, out: Tensor, m: int) -> None:
        """Windowed (ES-WMV) and exponential (ES-EMV) moving variance of the outputs."""
        cfg = self.config
        x = out[0]
        numel = x.numel()
        if self.window_outs is not None:
            w = cfg.variance_window
            slot = m % w
            old = self.window_outs[slot]
            self.window_sum += x.double() - old.double()
            self.window_sq += x.double().square().sum() - old.double().square().sum()
            self.window_outs[slot] = x
            if m + 1 >= w:
                mean = self.window_sum / w
                var = (self.window_sq / w - mean.square().sum()) / numel
                self.curves["wmv"][m] = var.float()
        if m == 0:
            self.ema = x.clone()
            self.curves["emv"][m] = 0.0
        else:
            a = cfg.emv_alpha
            dev2 = (x - self.ema).square().mean()
            self.emv = (1 - a) * self.emv + a * (1 - a) * dev2
            self.ema = (1 - a) * self.ema + a * x
            self.curves["emv"][m] = self.emv

    def _backtrack(self, psnr_obs: Tensor) -> None:
        """DIP's fallback: a drop of more than ``backtrack_drop_db`` against the last checkpoint
        restores the checkpoint's parameters; otherwise the current parameters become it.
        Done with ``torch.where`` so it costs no host synchronisation."""
        drop = psnr_obs < self.saved_psnr_obs - self.config.backtrack_drop_db
        with torch.no_grad():
            for param, saved in zip(self.model.parameters(), self.saved_params, strict=True):
                saved.copy_(torch.where(drop, saved, param))
                param.copy_(saved)
        self.saved_psnr_obs = torch.where(drop, self.saved_psnr_obs, psnr_obs)

    @property
    def done(self) -> bool:
        return self.iteration >= self.config.iterations

    @property
    def stopped(self) -> bool:
        """Whether the ratio rule has fired (reads the device flag: a host sync)."""
        return bool(self.rule.fired)

    def curves_numpy(self) -> dict[str, np.ndarray]:
        """The measured curves so far, on the host (one sync)."""
        m = self.measured
        out = {name: self.curves[name][:m].cpu().numpy() for name in CURVE_NAMES}
        fbc_values = self.curves["fbc"][:m].cpu().numpy()
        for band in range(self.config.fbc_bands):
            out[f"fbc_{band + 1}"] = fbc_values[:, band]
        out["iteration"] = np.arange(m) * self.config.measure_every
        return out

    def result(self, wall_time: float) -> FitResult:
        every = self.config.measure_every
        fired_at = int(self.rule.fired_at)
        best_at = int(self.best_at)
        restore = self.task.restore

        def host(x: Tensor) -> Tensor:
            return restore(x, self.y).clamp(0, 1).cpu()

        final = host(self.last_out)
        return FitResult(
            final=final,
            at_stop=host(self.stop_out) if fired_at >= 0 else final,
            best=host(self.best_out) if best_at >= 0 else None,
            stop_iteration=fired_at * every if fired_at >= 0 else None,
            best_iteration=best_at * every if best_at >= 0 else None,
            iterations_run=self.iteration,
            curves=self.curves_numpy(),
            wall_time=wall_time,
            config=self.config,
        )


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
