"""Choosing λ per image without the clean image: Monte-Carlo SURE of the whole fit.

The paper says λ "should be tuned for each input image" (docs/method.md §2); a user has no clean
image to tune it with. For white Gaussian noise of known σ, Stein's unbiased risk estimate of an
estimator ``f`` of ``x`` from ``y = x + n`` (N values) is

    SURE(f) = ||y − f(y)||² / N − σ² + 2σ² · div f(y) / N,    E[SURE] = E[||f(y) − x||² / N],

and the divergence is estimated with one random probe ``b`` (Ramani, Blu, Unser 2008, "Monte-Carlo
SURE"; as in the DIP-SURE literature): ``div f(y) ≈ bᵀ(f(y + εb) − f(y)) / ε``.

Here the network's input is fixed noise z, not y, so the estimator is the whole fit: ``f_t(y)``
is the output after t iterations of fitting y. Its divergence comes from a second fit of
``y + εb`` with the same seed, run in lockstep as a member of the same batched pass
(:func:`pipeline.fit.fit_many`), read at the same iteration. float32 fits are chaotic
(a one-ulp change grows about tenfold every few steps), so a small ε measures rounding, not the
fit's response: ``bᵀ(f(y + εb) − f(y))`` has a floor of ≈ 3·10⁻⁴·N whatever ε; ε = σ/2 keeps that
floor below the response (``experiments/unseen/README.md``, section 1). ``b`` is Rademacher
(±1): the lowest-variance probe for the trace (Hutchinson).

With the twin running anyway, SURE is known at every iteration, so it also gives each candidate
its stop: :func:`pipeline.stopping.sure_window_rule` (``stop="sure"``, what ``sdip fit --tune``
uses) keeps the output where the estimated MSE stopped falling; ``stop="ratio"`` scores each
candidate at the fit settings' ratio rule instead.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.degradations import Denoising
from pipeline.errors import UserError
from pipeline.fit import Callback, FitConfig, MemberView, fit_many
from pipeline.problem import Problem
from pipeline.results import FitResult
from pipeline.stopping import (
    SURE_DELTA,
    SURE_KEEP,
    SURE_THRESHOLD,
    SURE_WINDOW,
    SureStop,
    check_sure_window,
    sure_keep_lag,
    sure_window_rule,
    trailing_means,
)

EPS_OVER_SIGMA = 0.5
"""Probe step ε of the divergence estimate, relative to the noise level σ (module docstring)."""

PROBE_SEED = 0
"""Seed of the Rademacher probe b."""


MAD_TO_SIGMA = 0.6745
"""Median of |N(0, 1)|: a median absolute value over it estimates σ (Donoho & Johnstone 1994)."""


def estimate_noise_sigma(y: Tensor) -> float:
    """σ of white noise in an image ``y`` (1, C, H, W) from its finest diagonal Haar details.

    Over the 2×2 blocks ``[[a, b], [c, d]]`` of every channel, ``(a − b − c + d)/2`` is the
    noise's N(0, σ²) plus a little of the image's diagonal detail, so
    ``σ̂ = median |(a − b − c + d)/2| / 0.6745`` (Donoho & Johnstone 1994's estimate on the
    Haar wavelet's HH band). For a user's photo, whose σ is not given.
    """
    height, width = (y.shape[-2] // 2) * 2, (y.shape[-1] // 2) * 2
    x = y[0, :, :height, :width].double()
    detail = (x[:, 0::2, 0::2] - x[:, 0::2, 1::2] - x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 2
    return float(detail.abs().median()) / MAD_TO_SIGMA


def rademacher(shape: tuple[int, ...], seed: int = PROBE_SEED) -> Tensor:
    """A ±1 probe of ``shape`` (float32), drawn on the CPU from a generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, shape, generator=generator)
    return (2 * bits - 1).to(torch.float32)


class ProjectionRecorder:
    """A callback of :func:`pipeline.fit.fit_many` (run with ``log_every = 1`` and
    ``measure_every = 1``) recording, for every member at every iteration t and on the device
    (no host synchronisation), ``⟨b, x_t⟩`` in :attr:`values` and the squared residual
    ``‖m·(y − x_t)‖²`` on the scored pixels ``m`` in :attr:`residuals`, (members, iterations)
    each, NaN where a member had ended. ``b`` is zero off ``m``."""

    def __init__(
        self, probe: Tensor, y: Tensor, scored: Tensor, members: int, iterations: int
    ) -> None:
        self.probe, self.y, self.scored = probe, y, scored
        self.values = torch.full((members, iterations), float("nan"), dtype=torch.float64)
        self.residuals = torch.full_like(self.values, float("nan"))

    def __call__(self, view: MemberView) -> None:
        out = view.last_out
        if self.values.device != out.device:  # once: all live where the fit runs
            device = out.device
            self.probe, self.y, self.scored = (
                t.to(device) for t in (self.probe, self.y, self.scored)
            )
            self.values, self.residuals = self.values.to(device), self.residuals.to(device)
        # At iteration count i the member's last output is that of measured iteration i − 1.
        t = view.iteration - 1
        self.values[view.member, t] = (self.probe * out).sum(dtype=torch.float64)
        residual = self.scored * (self.y.double() - out.double())
        self.residuals[view.member, t] = residual.square().sum()


def mc_sure(
    loss: np.ndarray,
    projection: np.ndarray,
    perturbed_projection: np.ndarray,
    sigma: float,
    eps: float,
    numel: int,
) -> np.ndarray:
    """SURE of the fit at every iteration (module docstring), in MSE units:
    ``loss − σ² + 2σ²·(⟨b, f(y + εb)⟩ − ⟨b, f(y)⟩) / (ε·N)``, where ``loss = ||y − f(y)||²/N``
    over the N scored values (the fit's own loss curve when every pixel is scored) and the
    projections are :class:`ProjectionRecorder`'s."""
    divergence = (np.asarray(perturbed_projection) - np.asarray(projection)) / eps
    return np.asarray(loss, dtype=np.float64) - sigma**2 + 2 * sigma**2 * divergence / numel


GRID = (0.35, 0.495, 0.7, 0.99, 1.4, 1.98, 2.8)
"""Default λ candidates: log-spaced by √2 around the CPU profile's 1.4 (the grid of
``experiments/unseen``)."""


STOPS = ("sure", "ratio")
"""Stops :func:`choose_lambda` can score the candidates at: the SURE window rule
(:func:`pipeline.stopping.sure_window_rule`) or the fit settings' ratio rule."""


@dataclass
class LambdaChoice:
    """What :func:`choose_lambda` found: the chosen λ and every candidate's score.

    ``sure[k]`` is candidate k's SURE (MSE units) at its stop (under the SURE window rule, the
    window mean there), ``stops[k]`` the iteration of the output it keeps (``None``: the rule did
    not fire and the budget's output is scored), ``ended[k]`` the iterations it ran,
    ``results[k]`` its fit of y: ``results[chosen]`` is the restoration at the chosen λ, no
    refit needed. ``stop`` names the rule (:data:`STOPS`).
    """

    lam: float
    chosen: int
    candidates: tuple[float, ...]
    sure: tuple[float, ...]
    stops: tuple[int | None, ...]
    ended: tuple[int, ...]
    sigma: float
    eps: float
    stop: str
    results: list[FitResult]

    def scores(self) -> list[dict[str, Any]]:
        """One row per candidate (for a table or ``summary.json``)."""
        return [
            {
                "lam": lam,
                "sure": sure,
                "sure_psnr": _as_psnr(sure),
                "stop_iteration": stop,
                "iterations_run": ended,
            }
            for lam, sure, stop, ended in zip(
                self.candidates, self.sure, self.stops, self.ended, strict=True
            )
        ]


def _as_psnr(mse: float) -> float | None:
    """``10·log10(1/mse)``; ``None`` for a non-positive estimate (SURE can dip below 0)."""
    return 10 * math.log10(1 / mse) if mse > 0 else None


class _EndWithPartner:
    """Ends candidate k (member k) once its ratio rule has fired, and its perturbed twin
    (member K + k) at the same sync, so that both are recorded up to the candidate's stop."""

    def __init__(self, candidates: int) -> None:
        self.candidates = candidates
        self.ended = [False] * candidates

    def __call__(self, view: MemberView) -> bool:
        if view.member < self.candidates:
            self.ended[view.member] = view.stopped
            return view.stopped
        return self.ended[view.member - self.candidates]


class _SureWindow:
    """The SURE window rule of every candidate, run as the pass goes (a callback after the
    :class:`ProjectionRecorder`, every iteration).

    Candidate k (member k) is seen before its twin (member K + k) at each sync, so at the twin's
    turn both projections of iteration t are recorded: SURE(t) of the pair is computed (one
    host read of three values). The candidate's last outputs are held back as far as the rule's
    kept output lags its window (:func:`~pipeline.stopping.sure_keep_lag`: none, or half a
    window), and the lagged one is kept while the window mean is the least so far. Once the
    rule fires the twin ends at once and the candidate at its next sync (``end``; otherwise both
    run the budget and only the stop is recorded).
    """

    def __init__(
        self,
        recorder: ProjectionRecorder,
        candidates: int,
        sigma: float,
        eps: float,
        end: bool,
        rule: dict[str, Any],
    ) -> None:
        self.recorder, self.count, self.end = recorder, candidates, end
        self.sigma, self.eps, self.rule = sigma, eps, rule
        self.window = rule["window"]
        self.numel = int(recorder.scored.sum())
        self.sure: list[list[float]] = [[] for _ in range(candidates)]
        self.least = [math.inf] * candidates
        lag = sure_keep_lag(rule["window"], rule["keep"])
        self.outputs: list[deque[Tensor]] = [deque(maxlen=lag + 1) for _ in range(candidates)]
        self.kept: list[Tensor | None] = [None] * candidates
        self.fired: list[SureStop | None] = [None] * candidates

    def __call__(self, view: MemberView) -> bool:
        k = view.member % self.count
        if self.fired[k] is not None:
            return self.end
        if view.member < self.count:
            self.outputs[k].append(view.last_out.clone())
            return False
        t = view.iteration - 1
        rec = self.recorder
        values = torch.stack([rec.residuals[k, t], rec.values[k, t], rec.values[view.member, t]])
        residual, projection, twin = values.cpu().tolist()
        sure = self.sure[k]
        sure.extend(
            mc_sure(
                [residual / self.numel], [projection], [twin], self.sigma, self.eps, self.numel
            ).tolist()
        )
        history = np.array(sure)
        mean = trailing_means(history, self.window)[-1]
        if mean < self.least[k]:
            # A window mean exists from t = w − 1 on, when at least lag + 1 outputs are held.
            self.least[k], self.kept[k] = mean, self.outputs[k][0]
        self.fired[k] = sure_window_rule(history, self.sigma**2, **self.rule)
        return self.end and self.fired[k] is not None

    def apply(self, results: list[FitResult], task: Denoising, y: Tensor) -> list[float]:
        """Set each candidate's stop in ``results`` (its output, iteration and rule) to this
        rule's; returns each candidate's score: its window mean of SURE there (where the rule
        did not fire, the mean of the last w values, or of all when the budget is shorter)."""
        scores = []
        for k in range(self.count):
            stop, result = self.fired[k], results[k]
            if stop is None:
                results[k] = replace(
                    result, at_stop=result.final, stop_iteration=None, stop_rule="sure"
                )
                scores.append(float(np.mean(self.sure[k][-self.window :])))
                continue
            kept = self.kept[k]
            assert kept is not None  # the rule fires only after a window mean was seen
            results[k] = replace(
                result,
                at_stop=task.restore(kept, y).clamp(0, 1).cpu(),
                stop_iteration=stop.kept,
                stop_rule="sure",
            )
            scores.append(float(self.least[k]))  # the window mean at stop.best
        return scores


def choose_lambda(
    problem: Problem,
    settings: dict[str, Any],
    candidates: Sequence[float] = GRID,
    sigma: float | None = None,
    halt_at_stop: bool = True,
    probe_seed: int = PROBE_SEED,
    callbacks: Sequence[Callback] = (),
    stop: str = "sure",
    window: int = SURE_WINDOW,
    delta: float = SURE_DELTA,
    threshold: str = SURE_THRESHOLD,
    keep: str = SURE_KEEP,
) -> LambdaChoice:
    """Choose λ for a denoising ``problem`` by MC-SURE at each candidate's stop (module
    docstring): argmin over ``candidates`` of the SURE of the output each keeps at its stop.

    ``stop`` is the rule each candidate stops by (:data:`STOPS`): ``"sure"``, the SURE window
    rule (:func:`pipeline.stopping.sure_window_rule`, scored by its window mean of SURE where
    it keeps its output), or ``"ratio"``, ``settings``' ratio rule (scored by SURE at the
    stop); where the rule does not fire, the budget's last output is scored. The chosen fit's
    result carries that stop (``at_stop``, ``stop_iteration``, ``stop_rule``). ``window``,
    ``delta``, ``threshold`` and ``keep`` are the SURE window rule's settings (its defaults).

    One batched pass of 2K members: the K candidates on y and their twins on y + εb, ε =
    :data:`EPS_OVER_SIGMA`·σ. ``settings`` are the flat fit settings of the tuned fit (e.g. the
    profile's ``gaussian`` method); ``lam`` is replaced by each candidate, and measurements and
    callbacks run every iteration. ``sigma`` is the noise level in [0, 1] units (σ/255); ``None``
    estimates it from y (:func:`estimate_noise_sigma`). ``halt_at_stop`` ends each candidate
    and its twin at the candidate's stop (False: every member runs the budget, e.g. to measure
    the drop after the peak). With ``problem.clean`` the results carry PSNR curves.
    ``callbacks`` are passed on to :func:`~pipeline.fit.fit_many` (every iteration, each
    member: candidate k is member k, its twin member K + k), e.g. a progress bar.
    """
    if not isinstance(problem.task, Denoising):
        raise UserError(
            f"MC-SURE chooses λ for white-noise denoising only, not for {problem.task.name}"
        )
    if not candidates or any(lam <= 0 for lam in candidates):
        raise UserError(f"λ candidates must be positive numbers, got {list(candidates)}")
    if stop not in STOPS:
        raise UserError(f"the λ choice's stop must be one of {', '.join(STOPS)}, got {stop!r}")
    rule = {"window": window, "delta": delta, "threshold": threshold, "keep": keep}
    check_sure_window(**rule)
    y = problem.observation
    # A padded photo is scored on the photo: its padding mirrors it, so its noise is not new.
    scored = problem.observed_mask().expand_as(y)
    sigma = estimate_noise_sigma(problem.observed_part()) if sigma is None else float(sigma)
    if not sigma > 0:
        raise UserError(f"noise level sigma must be positive for MC-SURE, got {sigma}")
    eps = EPS_OVER_SIGMA * sigma
    probe = rademacher(tuple(y.shape), probe_seed) * scored
    count = len(candidates)
    base = {**settings, "measure_every": 1, "log_every": 1, "halt_at_stop": False}
    configs = [FitConfig.from_dict({**base, "lam": float(lam)}) for lam in (*candidates,) * 2]
    recorder = ProjectionRecorder(probe, y, scored, 2 * count, configs[0].iterations)
    sure_rule = (
        _SureWindow(recorder, count, sigma, eps, halt_at_stop, rule) if stop == "sure" else None
    )
    ending: list[Callback] = []
    if sure_rule is not None:
        ending = [sure_rule]
    elif halt_at_stop:
        ending = [_EndWithPartner(count)]
    results = fit_many(
        [y] * count + [y + eps * probe.to(y.dtype)] * count,
        problem.task,
        configs,
        [recorder, *callbacks, *ending],
        cleans=None if problem.clean is None else [problem.clean] * (2 * count),
        region=problem.region,
    )
    sure = (
        sure_rule.apply(results, problem.task, y)
        if sure_rule is not None
        else _ratio_scores(recorder, results[:count], sigma, eps)
    )
    chosen = int(np.nanargmin(sure))
    return LambdaChoice(
        lam=float(candidates[chosen]),
        chosen=chosen,
        candidates=tuple(float(lam) for lam in candidates),
        sure=tuple(sure),
        stops=tuple(result.stop_iteration for result in results[:count]),
        ended=tuple(result.iterations_run for result in results[:count]),
        sigma=sigma,
        eps=eps,
        stop=stop,
        results=results[:count],
    )


def _ratio_scores(
    recorder: ProjectionRecorder, results: list[FitResult], sigma: float, eps: float
) -> list[float]:
    """SURE of each candidate at its ratio-rule stop (the budget's last output where it did
    not fire)."""
    count = len(results)
    projections = recorder.values.cpu().numpy()
    numel = int(recorder.scored.sum())
    residuals = recorder.residuals.cpu().numpy() / numel
    sure = []
    for k, result in enumerate(results):
        index = (
            result.iterations_run - 1 if result.stop_iteration is None else result.stop_iteration
        )
        curve = mc_sure(
            residuals[k, index : index + 1],
            projections[k, index : index + 1],
            projections[count + k, index : index + 1],
            sigma,
            eps,
            numel,
        )
        sure.append(float(curve[0]))
    return sure
