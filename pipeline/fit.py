"""The fit loop: optimise randomly initialised decoders to degraded observations, K ≥ 1 at once.

Adam on ``MSE(A'(f_θ(z)), y)`` (method.md §6; Shi et al. 2022, Sec. 3) with, at every measured
iteration, the spectral measures of the output (:mod:`pipeline.monitor`): FBC bands against the
observation, blurriness, sharpness, their ratio and its stopping rule, PSNR against the observation
and — when the clean image is given, for evaluation only — against the clean image. Everything stays
on the device; the host reads it only every ``log_every`` iterations, when callbacks run.

One engine, :class:`FitState`, runs K ≥ 1 fits in lockstep. What differs with K is only the
network strategy (:mod:`pipeline.networks`: a plain module for one fit, vmapped stacked parameters
for several). Members may differ in :data:`MEMBER_SETTINGS`, their observation, task and clean
image; one Adam over the (stacked) parameters is exactly K independent Adams (Adam is elementwise,
and member k's parameters receive the gradient of its own loss only). At each sync a member that its
callback asks to end, or (``halt_at_stop``) whose ratio rule has fired, is recorded and dropped
from the stacks, so it stops changing and the others run faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline.degradations import Degradation
from pipeline.errors import (
    SettingError,
    UserError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    located,
)
from pipeline.model import DecoderConfig
from pipeline.monitor import PSNR_PROTOCOLS, FitMonitor
from pipeline.networks import NetworkSettings, ParamPairs, build_network
from pipeline.results import FitResult
from pipeline.runtime import PRECISIONS
from pipeline.stopping import StoppingConfig

if TYPE_CHECKING:
    from pipeline.checkpoint import Checkpoint

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MEMBER_SETTINGS = ("seed", "lam", "gauss_sigma")
"""Settings that may differ between the members of one fit engine; all others must agree."""


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
    ``precision`` is ``tf32`` (the default: CUDA's TF32 tensor cores for convolutions and matrix
    products, as PyTorch's own default for convolutions, which the reference code ran with),
    ``fp32`` (strict float32) or ``bf16`` (bfloat16 autocast of the network's forward; σ̂, losses
    and measures stay float32). The TF32 switches are process-wide:
    :func:`pipeline.runtime.configure` sets them where the process starts (the ``sdip`` commands
    do), as it does ``threads``. On the CPU ``fp32`` and ``tf32`` are the same float32 fit.
    ``channels_last`` (the default) stores activations NHWC, faster on this project's CPU at every
    size measured (64² width 32 to 512² width 128); ``compile`` runs the network through
    ``torch.compile`` in ``compile_mode`` (``reduce-overhead`` replays CUDA graphs of the network's
    forward and backward, ``max-autotune`` also searches kernels).
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
    precision: str = "tf32"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_int("iterations", self.iterations, 1)
        check_number("lr", self.lr, above=0)
        check_int("seed", self.seed, 0)
        if not isinstance(self.device, str):
            raise SettingError("device", f"device must be a name such as cpu, got {self.device!r}")
        check_int("measure_every", self.measure_every, 1)
        check_int("log_every", self.log_every, 1)
        check_int("fbc_bands", self.fbc_bands, 1)
        check_bool("halt_at_stop", self.halt_at_stop)
        if self.backtrack is not None:
            check_bool("backtrack", self.backtrack)
        check_number("backtrack_drop_db", self.backtrack_drop_db, above=0)
        check_number("input_noise", self.input_noise, 0)
        check_choice("psnr_protocol", self.psnr_protocol, PSNR_PROTOCOLS)
        check_int("threads", self.threads, 0)
        check_choice("precision", self.precision, PRECISIONS)
        check_bool("channels_last", self.channels_last)
        check_bool("compile", self.compile)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        """Build from a flat mapping (params.yaml, CLI); keys of :class:`DecoderConfig` go to
        ``model``, keys of :class:`StoppingConfig` to ``stopping``. Unknown keys are a
        :class:`UserError`; a bad value names where it was written when ``values`` is a
        :class:`~pipeline.errors.LocatedSettings`."""
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
        try:
            return cls(
                model=DecoderConfig(**model_values),
                stopping=StoppingConfig(**{k: v for k, v in values.items() if k in stopping_keys}),
                **{k: v for k, v in values.items() if k in own},
            )
        except SettingError as err:
            raise located(err, values) from err

    def flat(self) -> dict[str, Any]:
        """All settings as one flat mapping (for tracking; :meth:`from_dict` reads it back)."""
        values = asdict(self)
        return {**values.pop("model"), **values.pop("stopping"), **values}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` in float32 on ``device``; a host → CUDA copy goes through pinned memory, async."""
    x = x.detach().to(torch.float32)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def output_shape(task: Degradation, y: Tensor, clean: Tensor | None) -> tuple[int, int, int]:
    """(C, H, W) of the network output for observation ``y``; a clean image must match it."""
    height, width = task.output_shape(y)
    if clean is not None and tuple(clean.shape[-2:]) != (height, width):
        raise UserError(
            f"clean image is {tuple(clean.shape[-2:])}, the fit's output is {(height, width)}"
        )
    return y.shape[1], height, width


def uses_backtracking(config: FitConfig, task: Degradation) -> bool:
    """``config.backtrack``, or when None the task's own default (``Degradation.backtracks``)."""
    return task.backtracks if config.backtrack is None else config.backtrack


def common_config(configs: Sequence[FitConfig]) -> FitConfig:
    """The first config, after checking that the others differ from it only in
    :data:`MEMBER_SETTINGS`; otherwise a :class:`UserError` naming the settings."""
    if not configs:
        raise UserError("a fit needs at least one member")
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


def select_adam(optimizer: torch.optim.Adam, pairs: ParamPairs, index: Tensor) -> torch.optim.Adam:
    """A new Adam over the new parameters of ``pairs`` with the moments of the members at
    ``index``; the step count is a shared scalar, the moments lead with the member dimension."""
    lr = optimizer.param_groups[0]["lr"]
    selected = torch.optim.Adam([new for _, new in pairs], lr=lr)
    for old, new in pairs:
        moments = optimizer.state.get(old)
        if moments:
            selected.state[new] = {
                key: value.index_select(0, index) if value.dim() else value.clone()
                for key, value in moments.items()
            }
    return selected


class MemberView:
    """One running member of a fit, as callbacks see it: ``member`` (its index in the configs),
    ``config``, ``iteration``, ``measured``, ``curves`` (on the device), ``last_out``, ``stopped``
    and ``curves_numpy()``."""

    def __init__(self, state: FitState, position: int) -> None:
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
        return self._state.monitor.curves.of(self._position)

    @property
    def last_out(self) -> Tensor:
        return self._state.last_out[self._position : self._position + 1]

    @property
    def stopped(self) -> bool:
        """Whether this member's ratio rule has fired (a host sync)."""
        return bool(self._state.monitor.stop.rule.fired[self._position])

    def curves_numpy(self) -> dict[str, np.ndarray]:
        return self._state.monitor.curves_numpy(self._position)


Callback = Callable[[MemberView], bool | None]
"""Called with each running member every ``log_every`` iterations and at the end; returning True
ends that member now (e.g. a pruner), raising aborts the whole fit."""


class FitState:
    """The state of K ≥ 1 fits advanced in lockstep by :meth:`step` (module docstring).

    ``members`` lists the indices (into ``configs``) of the members still running, in the order of
    the stacks; ``results`` holds the :class:`FitResult` of every member that has ended.
    """

    def __init__(
        self,
        observations: Sequence[Tensor],
        tasks: Sequence[Degradation],
        configs: Sequence[FitConfig],
        cleans: Sequence[Tensor | None] | None = None,
        region: tuple[int, int, int, int] | None = None,
    ) -> None:
        count = len(configs)
        cleans = [None] * count if cleans is None else list(cleans)
        if not len(observations) == len(tasks) == len(cleans) == count:
            raise UserError(
                f"a fit needs one observation, task and clean image (or None) per config: got "
                f"{len(observations)}, {len(tasks)}, {len(cleans)} for {count}"
            )
        self.base = common_config(configs)
        self.configs = list(configs)
        self.device = resolve_device(self.base.device)
        dev = self.device
        ys = [to_device(y, dev) for y in observations]
        for index, y in enumerate(ys):
            if y.dim() != 4 or y.shape[0] != 1 or y.shape != ys[0].shape:
                raise UserError(
                    f"observation {index} has shape {tuple(y.shape)}; every member needs a "
                    f"(1, C, H, W) observation of member 0's shape {tuple(ys[0].shape)}"
                )
        if len({clean is None for clean in cleans}) > 1:
            raise UserError("give a clean image for every member or for none")
        clean_list = [None if c is None else to_device(c, dev) for c in cleans]
        shapes = {output_shape(t, y, c) for t, y, c in zip(tasks, ys, clean_list, strict=True)}
        if len(shapes) > 1:
            raise UserError(f"the members' outputs differ in size: {sorted(shapes)}")
        shape = shapes.pop()
        backtracks = {uses_backtracking(self.base, task) for task in tasks}
        if len(backtracks) > 1:
            raise UserError("the members' tasks differ in backtracking; set backtrack explicitly")
        cfg = self.base
        compile_mode = cfg.compile_mode if cfg.compile else None
        settings = NetworkSettings(cfg.input_noise, cfg.precision, cfg.channels_last, compile_mode)
        self.network = build_network(self.configs, settings, shape, dev)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=cfg.lr)
        self.backtracking = (
            Backtracking(self.network.parameters(), count, cfg.backtrack_drop_db)
            if backtracks.pop()
            else None
        )
        y = torch.cat(ys)
        clean = None if clean_list[0] is None else torch.cat(clean_list)  # type: ignore[arg-type]
        self.monitor = FitMonitor(cfg, tasks, y, clean, shape, region)
        self.last_out = torch.zeros((count, *shape), device=dev)
        self.members = list(range(count))
        self.results: dict[int, FitResult] = {}
        self.iteration = 0

    @property
    def running(self) -> bool:
        return bool(self.members)

    @property
    def done(self) -> bool:
        return self.iteration >= self.base.iterations

    def step(self) -> None:
        """One Adam step of every running member; measures first on measured iterations."""
        out = self.network.forward()
        losses = self.monitor.observations.losses(out)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if self.iteration % self.base.measure_every == 0:
            with torch.no_grad():
                psnr_obs = self.monitor.record(out.detach(), losses.detach())
                if self.backtracking is not None:
                    self.backtracking.update(self.network.parameters(), psnr_obs)
        self.optimizer.step()
        self.last_out = out.detach()
        self.iteration += 1

    def sync(self, callbacks: Sequence[Callback], elapsed: Callable[[], float]) -> None:
        """Run the callbacks on every running member, then end those that are done, asked to
        end or (``halt_at_stop``) stopped by their ratio rule; ``elapsed`` gives the wall time
        recorded in their results."""
        positions = range(len(self.members))
        asked = {
            position
            for position in positions
            if any([bool(callback(MemberView(self, position))) for callback in callbacks])
        }
        fired = self.monitor.fired() if self.base.halt_at_stop else [False] * len(self.members)
        ending = [p for p in positions if self.done or fired[p] or p in asked]
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
        keep = [p for p in positions if p not in ending]
        if keep:
            self._keep(keep)
        self.members = [self.members[p] for p in keep]

    def _keep(self, positions: list[int]) -> None:
        """Drop every member not at ``positions`` from the stacks (not from ``members``)."""
        index = torch.tensor(positions, device=self.device)
        self.optimizer = select_adam(self.optimizer, self.network.select(index), index)
        if self.backtracking is not None:
            self.backtracking.select(index)
        self.last_out = self.last_out.index_select(0, index)
        self.monitor.select(index)

    def state_dict(self) -> dict[str, Any]:
        """Everything the fits need to continue as if never stopped: the network (parameters,
        buffers such as the σ warm starts, the input-noise RNG), Adam, backtracking, the
        measurements and stopping rules, the last outputs and the results of ended members."""
        backtracking = self.backtracking
        return {
            "iteration": self.iteration,
            "members": list(self.members),
            "results": self.results,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "backtracking": None
            if backtracking is None
            else {"saved": backtracking.saved, "saved_psnr_obs": backtracking.saved_psnr_obs},
            "monitor": self.monitor.state_dict(),
            "last_out": self.last_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a state built from the same arguments."""
        members = list(state["members"])
        if members != self.members:
            self._keep([self.members.index(member) for member in members])
            self.members = members
        self.iteration = int(state["iteration"])
        self.results = dict(state["results"])
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.backtracking is not None:
            saved = state["backtracking"]
            self.backtracking.saved = [t.to(self.device) for t in saved["saved"]]
            self.backtracking.saved_psnr_obs = saved["saved_psnr_obs"].to(self.device)
        self.monitor.load_state_dict(state["monitor"])
        self.last_out = state["last_out"].to(self.device)


def fit_many(
    observations: Sequence[Tensor],
    tasks: Sequence[Degradation] | Degradation,
    configs: Sequence[FitConfig],
    callbacks: Sequence[Callback] = (),
    cleans: Sequence[Tensor | None] | None = None,
    checkpoint: Checkpoint | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> list[FitResult]:
    """Fit K ≥ 1 members at once; returns their :class:`FitResult` in the order of ``configs``.

    Member k fits ``observations[k]`` (1, C, H, W) under ``tasks[k]`` (or one shared task) with
    ``configs[k]``; ``cleans[k]`` is its clean image for evaluation (all or none). Configs may
    differ only in :data:`MEMBER_SETTINGS` and the observations must share their shape, else a
    :class:`UserError`. ``callbacks`` (:data:`Callback`) see every running member every
    ``log_every`` iterations and at the end. For K > 1 each result equals
    ``fit(observations[k], tasks[k], configs[k], clean=cleans[k])`` up to floating-point rounding
    (:mod:`pipeline.networks`); its ``wall_time`` is the fit's compute time when the member ended.

    With a ``checkpoint`` (:class:`pipeline.checkpoint.Checkpoint`) the fits resume from it when
    it holds their state, save it every ``checkpoint.every`` iterations and when the process is
    asked to terminate (:func:`pipeline.runtime.termination_requested`; then
    :class:`pipeline.checkpoint.FitInterruptedError` is raised), and remove it once they have ended.

    ``region`` (top, left, height, width) is where the user's image lies in the outputs when it
    was padded to the network's size (:attr:`pipeline.problem.Problem.region`): PSNR against the
    clean images, and so the oracle peak, is read there.
    """
    if isinstance(tasks, Degradation):
        tasks = [tasks] * len(configs)
    state = FitState(observations, tasks, configs, cleans, region)
    before = 0.0
    if checkpoint is not None:
        before = checkpoint.restore(state)
    start = time.perf_counter()

    def elapsed() -> float:
        return before + time.perf_counter() - start

    log_every = state.base.log_every
    while state.running:
        state.step()
        if state.iteration % log_every == 0 or state.done:
            state.sync(callbacks, elapsed)
        if checkpoint is not None and state.running:
            checkpoint.after_step(state, elapsed())
    if checkpoint is not None:
        checkpoint.remove()
    return [state.results[member] for member in range(len(configs))]


def fit(
    observation: Tensor,
    task: Degradation,
    config: FitConfig,
    callbacks: Sequence[Callback] = (),
    clean: Tensor | None = None,
    checkpoint: Checkpoint | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> FitResult:
    """Fit the decoder to ``observation`` under ``task``'s forward operator: :func:`fit_many` of
    one member."""
    return fit_many([observation], [task], [config], callbacks, [clean], checkpoint, region)[0]
