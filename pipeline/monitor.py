"""What is measured while K ≥ 1 fits advance in lockstep, kept on the device.

At a measured iteration every member records its loss; the PSNR and the frequency-band
correspondence (docs/method.md §4) of ``A'(out)·mask`` against its observation;
the blurriness, sharpness and their ratio (§5), which feeds the members' ratio rule (the
output at its first firing is kept); with the clean image, PSNR against it and the best output so
far; and the windowed (ES-WMV) and exponential (ES-EMV) moving variances of its outputs.

:class:`FitMonitor` is built from small trackers, each owning its state and its member selection.
The rule that keeps them honest: **every tensor attribute of a tracker leads with the member
dimension**, so :meth:`Tracker.select` keeps the chosen members of all of them and
:meth:`Tracker.state_dict` saves all of them, with nothing to list by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline.degradations import Degradation
from pipeline.measures import blur, fbc, psnr, psnr_y, sharpness
from pipeline.stopping import OnlineRatioRule, StoppingConfig

if TYPE_CHECKING:
    from pipeline.fit import FitConfig, FitResult

CURVE_NAMES = ("loss", "psnr", "psnr_obs", "blur", "sharpness", "ratio", "wmv", "emv")
PSNR_PROTOCOLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rgb": psnr,
    "y": lambda x, ref: psnr_y(x, ref, shave=4),
}
"""How PSNR against the clean image is read (docs/experiments.md, "Protocols")."""


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of same-dtype ``tensors`` on the host, moved in one transfer (into pinned memory
    from CUDA): one synchronisation however many values are read."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        flat = host
    parts = flat.split([t.numel() for t in tensors])
    return [part.reshape(t.shape) for part, t in zip(parts, tensors, strict=True)]


def member_of(x: Tensor, index: int) -> Tensor:
    """Member ``index`` of ``x`` (K, …) as a batch of one; ``x`` itself when K = 1. Slicing the
    only member would add a slice to the autograd graph, whose backward reorders a later sum
    (the tail's bias gradient): the same value to rounding, not to the bit, and float32 fits
    amplify rounding."""
    return x if x.shape[0] == 1 else x[index : index + 1]


class Tracker:
    """Per-member state; every tensor attribute leads with the member dimension K (module
    docstring). Attributes that are trackers themselves (or have ``select``) are selected too."""

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index``, in that order."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.index_select(0, index))
            elif hasattr(value, "select"):
                value.select(index)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: value.state_dict() if hasattr(value, "state_dict") else value
            for name, value in vars(self).items()
            if isinstance(value, Tensor | int | float) or hasattr(value, "state_dict")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.items():
            value = getattr(self, name)
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(saved)
            elif isinstance(value, Tensor):
                setattr(self, name, saved.to(value.device))
            else:
                setattr(self, name, saved)


class Curves(Tracker):
    """The measured curves, one (K, n, columns) tensor: the :data:`CURVE_NAMES` then the FBC
    bands; rows not measured yet are NaN."""

    def __init__(self, members: int, rows: int, bands: int, device: torch.device) -> None:
        self.bands = bands
        self.values = torch.full(
            (members, rows, len(CURVE_NAMES) + bands), torch.nan, device=device
        )

    def write(self, row: int, name: str, values: Tensor) -> None:
        """Set curve ``name`` (``fbc``: all bands, (K, bands)) at ``row`` for every member."""
        if name == "fbc":
            self.values[:, row, len(CURVE_NAMES) :] = values
        else:
            self.values[:, row, CURVE_NAMES.index(name)] = values

    def of(self, member: int) -> dict[str, Tensor]:
        """Member ``member``'s curves on the device, (n,) each; ``fbc`` is (n, bands)."""
        values = self.values[member]
        curves = {name: values[:, column] for column, name in enumerate(CURVE_NAMES)}
        curves["fbc"] = values[:, len(CURVE_NAMES) :]
        return curves

    def host(self, member: int, rows: int, every: int) -> dict[str, np.ndarray]:
        """Member ``member``'s first ``rows`` rows on the host (one synchronisation), with the
        iteration of each row (a measurement every ``every`` iterations)."""
        (values,) = to_host([self.values[member, :rows]])
        array = values.numpy()
        curves = {name: array[:, column] for column, name in enumerate(CURVE_NAMES)}
        for band in range(self.bands):
            curves[f"fbc_{band + 1}"] = array[:, len(CURVE_NAMES) + band]
        curves["iteration"] = np.arange(rows) * every
        return curves


class Observations(Tracker):
    """The members' observations y, loss masks (all ones for a task without one), clean images
    and tasks. ``region`` (top, left, height, width) is the part of the output that is the
    user's image when it was padded to the network's size (:class:`pipeline.problem.FitSize`):
    PSNR against the clean image is read there, so that it is the PSNR of the image the user
    gets; None is the whole output."""

    def __init__(
        self,
        tasks: Sequence[Degradation],
        y: Tensor,
        clean: Tensor | None,
        region: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.y = y
        self.region = region
        self.clean = None if clean is None else self.in_region(clean)
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

    def in_region(self, x: Tensor) -> Tensor:
        """The user's image in ``x`` (K, C, H, W) of the output's size."""
        if self.region is None:
            return x
        top, left, height, width = self.region
        return x[..., top : top + height, left : left + width]

    def seen(self, out: Tensor) -> Tensor:
        """``A'(out)·mask`` of every member: what it compares with its observation."""
        seen = torch.cat([task.forward(out[i : i + 1]) for i, task in enumerate(self.tasks)])
        return seen if self.mask is None else seen * self.mask

    def losses(self, out: Tensor) -> Tensor:
        """Every member's loss (K,) (docs/method.md §6): its own task's ``MSE(A'(out)·m, y·m)``."""
        return torch.stack(
            [
                task.loss(member_of(out, i), member_of(self.y, i))
                for i, task in enumerate(self.tasks)
            ]
        )

    def select(self, index: Tensor) -> None:
        super().select(index)
        self.tasks = [self.tasks[i] for i in index.tolist()]


class StopTracker(Tracker):
    """The ratio rule of the members (:class:`~pipeline.stopping.OnlineRatioRule`) and the output
    at each member's first firing."""

    def __init__(self, stopping: StoppingConfig, shape: tuple[int, ...], device: torch.device):
        self.rule = OnlineRatioRule(
            shape[0], stopping.ratio_window, stopping.ratio_eps, device, stopping.ratio_scale
        )
        self.out = torch.zeros(shape, device=device)

    def update(self, ratio: Tensor, out: Tensor) -> None:
        first = self.rule.update(ratio)
        self.out = torch.where(first.view(-1, 1, 1, 1), out, self.out)


class PeakTracker(Tracker):
    """The best PSNR against the clean image so far (the oracle peak), where and what it was."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.out = torch.zeros(shape, device=device)
        self.psnr = torch.full((shape[0],), -float("inf"), device=device)
        self.at = torch.full((shape[0],), -1, dtype=torch.long, device=device)

    def update(self, p: Tensor, out: Tensor, row: int) -> None:
        better = p > self.psnr
        self.out = torch.where(better.view(-1, 1, 1, 1), out, self.out)
        self.psnr = torch.where(better, p, self.psnr)
        self.at = torch.where(better, torch.full_like(self.at, row), self.at)


class VarianceTracker(Tracker):
    """Windowed (ES-WMV) and exponential (ES-EMV) moving variance of the outputs (Wang et al.,
    "Early Stopping for Deep Image Prior"; docs/experiments.md, "Other stopping rules").

    WMV over the last W outputs x_1..x_W: ``mean over pixels of (1/W Σ x_i² − x̄²)``, from running
    sums in float64; EMV: ``v ← (1 − α) v + α (1 − α) mean((x − m)²)``, ``m ← (1 − α) m + α x``
    from ``m = x_0``, ``v = 0``, recorded bias-corrected as ``v_t / (1 − (1 − α)^t)`` (as Adam's
    moments): started from 0, the plain average is smallest at the first measurements, and
    ES-EMV, which stops at the minimum, stopped every fit at iteration 0 or 1. The first output
    has no EMV (NaN).
    """

    def __init__(self, stopping: StoppingConfig, shape: tuple[int, ...], device: torch.device):
        self.width = stopping.wmv_window
        self.alpha = stopping.emv_alpha
        members = shape[0]
        self.window = (
            torch.zeros((members, self.width, *shape[1:]), device=device) if self.width else None
        )
        self.window_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.window_sq = torch.zeros((members,), dtype=torch.float64, device=device)
        self.ema = torch.zeros(shape, device=device)
        self.emv = torch.zeros((members,), device=device)

    def update(self, x: Tensor, row: int) -> tuple[Tensor | None, Tensor]:
        """Feed the outputs (K, C, H, W) of measurement ``row``; returns (WMV or None while the
        window fills, EMV), (K,) each."""
        dims = (1, 2, 3)
        wmv = None
        if self.window is not None:
            w = self.width
            slot = row % w
            old = self.window[:, slot]
            self.window_sum += x.double() - old.double()
            self.window_sq += x.double().square().sum(dims) - old.double().square().sum(dims)
            self.window[:, slot] = x
            if row + 1 >= w:
                mean = self.window_sum / w
                wmv = ((self.window_sq / w - mean.square().sum(dims)) / x[0].numel()).float()
        if row == 0:
            self.ema = x.clone()
            return wmv, torch.full_like(self.emv, torch.nan)
        a = self.alpha
        dev2 = (x - self.ema).square().mean(dims)
        self.emv = (1 - a) * self.emv + a * (1 - a) * dev2
        self.ema = (1 - a) * self.ema + a * x
        return wmv, self.emv / (1 - (1 - a) ** row)


class FitMonitor:
    """Everything measured while K ≥ 1 fits advance in lockstep (module docstring)."""

    def __init__(
        self,
        config: FitConfig,
        tasks: Sequence[Degradation],
        y: Tensor,
        clean: Tensor | None,
        out_shape: tuple[int, int, int],
        region: tuple[int, int, int, int] | None = None,
    ) -> None:
        dev, k = y.device, len(tasks)
        shape = (k, *out_shape)
        self.config = config
        self.measured = 0
        self.observations = Observations(tasks, y, clean, region)
        self.curves = Curves(
            k, -(-config.iterations // config.measure_every), config.fbc_bands, dev
        )
        self.stop = StopTracker(config.stopping, shape, dev)
        self.peak = PeakTracker(shape, dev)
        self.variance = VarianceTracker(config.stopping, shape, dev)

    def trackers(self) -> dict[str, Tracker]:
        return {
            "observations": self.observations,
            "curves": self.curves,
            "stop": self.stop,
            "peak": self.peak,
            "variance": self.variance,
        }

    def record(self, out: Tensor, loss: Tensor) -> Tensor:
        """Measure outputs ``out`` (K, C, H, W) with losses ``loss`` (K,) as the next measurement;
        returns the members' PSNR of ``A'(out)·mask`` against their observations (K,)."""
        row, curves, obs = self.measured, self.curves, self.observations
        seen = obs.seen(out)
        curves.write(row, "loss", loss)
        psnr_obs = psnr(seen, obs.y)
        curves.write(row, "psnr_obs", psnr_obs)
        curves.write(
            row, "fbc", fbc(seen if seen.shape == obs.y.shape else out, obs.y, curves.bands)
        )
        b, s = blur(out), sharpness(out)
        curves.write(row, "blur", b)
        curves.write(row, "sharpness", s)
        ratio = b / s
        curves.write(row, "ratio", ratio)
        self.stop.update(ratio, out)
        if obs.clean is not None:
            p = PSNR_PROTOCOLS[self.config.psnr_protocol](obs.in_region(out), obs.clean)
            curves.write(row, "psnr", p)
            self.peak.update(p, out, row)
        wmv, emv = self.variance.update(out, row)
        if wmv is not None:
            curves.write(row, "wmv", wmv)
        curves.write(row, "emv", emv)
        self.measured += 1
        return psnr_obs

    def fired(self) -> list[bool]:
        """Whether each member's ratio rule has fired (one host synchronisation)."""
        return [bool(v) for v in to_host([self.stop.rule.fired])[0]]

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index``, in that order."""
        for tracker in self.trackers().values():
            tracker.select(index)

    def curves_numpy(self, member: int) -> dict[str, np.ndarray]:
        """Member ``member``'s curves so far, on the host (one synchronisation)."""
        return self.curves.host(member, self.measured, self.config.measure_every)

    def result(
        self, member: int, final: Tensor, iterations_run: int, wall_time: float, config: FitConfig
    ) -> FitResult:
        """Member ``member``'s :class:`~pipeline.fit.FitResult`; ``final`` is its last output
        (1, C, H, W)."""
        from pipeline.fit import FitResult

        every = self.config.measure_every
        fired_at, best_at = (
            int(v) for v in to_host([self.stop.rule.fired_at[member], self.peak.at[member]])
        )
        task, y = self.observations.tasks[member], self.observations.y[member : member + 1]

        def host(x: Tensor) -> Tensor:
            return task.restore(x, y).clamp(0, 1).cpu()

        restored = host(final)
        return FitResult(
            final=restored,
            at_stop=host(self.stop.out[member : member + 1]) if fired_at >= 0 else restored,
            best=host(self.peak.out[member : member + 1]) if best_at >= 0 else None,
            stop_iteration=fired_at * every if fired_at >= 0 else None,
            best_iteration=best_at * every if best_at >= 0 else None,
            iterations_run=iterations_run,
            curves=self.curves_numpy(member),
            wall_time=wall_time,
            config=config,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            **{name: t.state_dict() for name, t in self.trackers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.measured = int(state["measured"])
        for name, tracker in self.trackers().items():
            tracker.load_state_dict(state[name])
