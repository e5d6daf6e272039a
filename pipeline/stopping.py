"""Stopping rules for the deep image prior, as pure functions over a logged trajectory.

Each rule takes the per-measurement curves of one fit (NumPy arrays indexed by measurement, not by
iteration) and returns the index of the measurement at which it stops, or ``None`` when it never
fires. Because they are pure, different rules can be compared on the same run without
re-optimising (method.md §5).

- :func:`ratio_rule` — Shi et al. 2022, Eq. 8: the blurriness/sharpness ratio plateaus; the
  paper compares window means of the ratio with an absolute ε, and two scale-free forms compare
  them relative to the ratio's level or on log r (:data:`RATIO_SCALES`).
- :func:`oracle_peak` — the best PSNR against the clean image (needs the clean image).
- :func:`es_wmv` / :func:`es_emv` — Wang et al., "Early Stopping for Deep Image Prior": the running
  (windowed or exponential) variance of the outputs stops improving.
- :func:`sure_window_rule` — for a fit whose MC-SURE curve is known (λ chosen by
  :mod:`pipeline.lambda_choice`): the estimated MSE stops falling.

:class:`OnlineRatioRule` is the same ratio rule evaluated inside the fit loop on the device,
without a host synchronisation per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError, check_choice, check_int, check_number

RATIO_WINDOW = 100
RATIO_EPS = 0.01
RATIO_SCALES = ("absolute", "relative", "log")
"""How the ratio rule compares its two window means (:func:`ratio_rule`)."""
VARIANCE_WINDOW = 100
EMV_ALPHA = 0.1
VARIANCE_PATIENCE = 1000

SURE_WINDOW = 50
SURE_DELTA = 0.01
SURE_THRESHOLD = "noise"
SURE_KEEP = "last"
"""The SURE window rule's window w, threshold δ, what δ is a fraction of and which output of
the least window it keeps (fixed before the test groups of experiments/unseen were scored:
experiments/unseen/preregistered.md)."""
SURE_THRESHOLDS = ("level", "noise")
SURE_KEEPS = ("centre", "last")

SECTION_RULES = {"ratio": "ratio", "es_wmv": "wmv", "es_emv": "emv"}
"""Rule names of params.yaml's ``stopping`` section → prefix of their settings here."""


@dataclass(frozen=True)
class StoppingConfig:
    """Settings of every stopping rule; the defaults are the paper's (method.md §5) and ES-WMV /
    ES-EMV's (experiments.md, "Other stopping rules").

    One place for them: params.yaml's ``stopping`` section (``{ratio: {window, eps, scale}, es_wmv:
    {window, patience}, es_emv: {alpha, patience}}``) is merged into every fit's settings, the fit
    runs the ratio rule online and records the WMV / EMV curves with them, and the evaluation reads
    them back from each fit's recorded settings, so a stop in a table is the stop of its fit.
    """

    ratio_window: int = RATIO_WINDOW
    ratio_eps: float = RATIO_EPS
    ratio_scale: str = "absolute"
    wmv_window: int = VARIANCE_WINDOW
    wmv_patience: int = VARIANCE_PATIENCE
    emv_alpha: float = EMV_ALPHA
    emv_patience: int = VARIANCE_PATIENCE

    def __post_init__(self) -> None:
        _check_window(self.ratio_window, self.ratio_eps, self.ratio_scale)
        check_int("wmv_window", self.wmv_window, 0)
        check_int("wmv_patience", self.wmv_patience, 1)
        check_number("emv_alpha", self.emv_alpha, maximum=1, above=0)
        check_int("emv_patience", self.emv_patience, 1)

    @staticmethod
    def flatten(section: dict[str, Any] | None) -> dict[str, Any]:
        """params.yaml's nested ``stopping`` section as flat settings (``ratio.window`` →
        ``ratio_window``); unknown rules or keys are a :class:`UserError`."""
        names = {f.name for f in fields(StoppingConfig)}
        flat: dict[str, Any] = {}
        for rule, values in (section or {}).items():
            prefix = SECTION_RULES.get(rule)
            if prefix is None or not isinstance(values, dict):
                raise UserError(
                    f"params.yaml stopping.{rule}: expected one of {', '.join(SECTION_RULES)} "
                    "mapping to its settings"
                )
            for key, value in values.items():
                name = f"{prefix}_{key}"
                if name not in names:
                    raise UserError(f"params.yaml stopping.{rule} has no setting {key!r}")
                flat[name] = value
        return flat


def _check_window(window: int, eps: float, scale: str) -> None:
    check_int("ratio_window", window, 2)
    check_number("ratio_eps", eps, above=0)
    check_choice("ratio_scale", scale, RATIO_SCALES)


def ratio_rule(
    ratios: np.ndarray,
    window: int = RATIO_WINDOW,
    eps: float = RATIO_EPS,
    scale: str = "absolute",
) -> int | None:
    """First index ``i`` at which the ratio rule fires (Shi et al. 2022, Eq. 8).

    At ``i > 2n`` with ``m1 = mean(v[i-2n : i-n])`` and ``m2 = mean(v[i-n+1 : i])`` the rule fires
    when ``d < eps``, where by ``scale``

    - ``absolute`` (the paper): ``v = r``, ``d = |m1 - m2|``;
    - ``relative``: ``v = r``, ``d = |m1 - m2| / |m2|``, the change relative to the ratio's level;
    - ``log``: ``v = log r``, ``d = |m1 - m2|``, the change of the windows' geometric means.

    The two scale-free forms fire at the same iteration for ``r`` and ``c·r``: the ratio's level
    depends on the image's content and size (README, "Default profile"), its relative change
    less so. The second window holds n-1 values and leaves out ``v[i]`` (a quirk of the
    reference, kept so that stop iterations are comparable).
    """
    _check_window(window, eps, scale)
    r = np.asarray(ratios, dtype=np.float64)
    n = window
    if len(r) <= 2 * n:
        return None
    with np.errstate(divide="ignore"):  # a ratio of 0 (a flat output) is log 0 = -inf
        v = np.log(r) if scale == "log" else r
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(2 * n + 1, len(r))
    m1 = (c[i - n] - c[i - 2 * n]) / n
    m2 = (c[i] - c[i - n + 1]) / (n - 1)
    d = np.abs(m1 - m2)
    if scale == "relative":
        d = d / np.abs(m2)
    fired = np.flatnonzero(d < eps)
    return int(i[fired[0]]) if fired.size else None


def oracle_peak(psnr: np.ndarray) -> int | None:
    """Index of the best PSNR against the clean image (first one on ties); ``None`` if all NaN."""
    p = np.asarray(psnr, dtype=np.float64)
    if p.size == 0 or np.all(np.isnan(p)):
        return None
    return int(np.nanargmax(p))


def patience_stop(values: np.ndarray, patience: int) -> int | None:
    """Index of the running minimum of a curve (ES-WMV's variance, an MC-SURE curve) once it has
    not improved for ``patience`` measurements; NaN values are skipped."""
    check_int("patience", patience, 1)
    v = np.asarray(values, dtype=np.float64)
    best, best_at = np.inf, -1
    for i, value in enumerate(v):
        if np.isnan(value):
            continue
        if value < best:
            best, best_at = value, i
        elif i - best_at >= patience:
            return best_at
    return None


def es_wmv(wmv: np.ndarray, patience: int = VARIANCE_PATIENCE) -> int | None:
    """ES-WMV: stop at the minimum of the windowed moving variance of the outputs.

    ``wmv[i]`` is the mean squared deviation of the last W outputs from their mean (NaN while
    fewer than W outputs exist); the rule returns the index of the minimum once it has not
    improved for ``patience`` measurements.
    """
    return patience_stop(wmv, patience)


def es_emv(emv: np.ndarray, patience: int = VARIANCE_PATIENCE) -> int | None:
    """ES-EMV: as :func:`es_wmv` on the exponential moving variance (α = 0.1)."""
    return patience_stop(emv, patience)


def trailing_means(values: np.ndarray, window: int) -> np.ndarray:
    """``m[t] = mean(values[t - window + 1 : t + 1])``; NaN for ``t < window - 1``."""
    check_int("window", window, 1)
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    means = np.full(len(v), np.nan)
    if len(v) >= window:
        means[window - 1 :] = (c[window:] - c[: len(v) - window + 1]) / window
    return means


@dataclass(frozen=True)
class SureStop:
    """Where :func:`sure_window_rule` fired (``fired``), the last iteration of the window of
    least mean SURE up to there (``best``: the candidate's score is that mean) and the output it
    keeps (``kept``: ``best`` or the window's centre), as curve indices."""

    fired: int
    best: int
    kept: int


def sure_window_rule(
    sure: np.ndarray,
    noise_var: float,
    window: int = SURE_WINDOW,
    delta: float = SURE_DELTA,
    threshold: str = SURE_THRESHOLD,
    keep: str = SURE_KEEP,
) -> SureStop | None:
    """The SURE window rule: stop once the estimated MSE has stopped falling.

    With ``S[t]`` the mean of the SURE curve over the last ``w = window`` values
    (:func:`trailing_means`), the rule fires at the first ``t ≥ 2w − 1`` where
    ``S[t − w] − S[t]`` is below

    - ``δ·|S[t]|`` (``threshold="level"``): over the last w iterations the estimated MSE fell by
      less than the fraction δ of itself (for S > 0, the estimated PSNR rose by less than
      10·log10(1 + δ) dB), or rose. The bound follows the fit's own error, so a fit that
      still improves slowly at a high error runs on;
    - ``δ·σ²`` (``threshold="noise"``, ``noise_var`` = σ²): it fell by less than the fraction δ
      of the noise variance.

    Both read the same on any intensity level (SURE and σ² scale together). The output kept is
    the iterate at ``b = argmin S[0 … t]`` (first on ties; ``keep="last"``) or at the centre of
    that window, ``b − ⌊(w − 1)/2⌋`` (``keep="centre"``): a trailing mean lags a sharp minimum
    by half a window. SURE of one probe is noisy from iteration to iteration
    (:mod:`pipeline.lambda_choice`), hence the window means. ``None`` where it never fires.
    """
    check_sure_window(window, delta, threshold, keep)
    check_number("noise_var", noise_var, above=0)
    means = trailing_means(sure, window)
    t = np.arange(2 * window - 1, len(means))
    fell = means[t - window] - means[t]
    bound = delta * (np.abs(means[t]) if threshold == "level" else noise_var)
    fired = np.flatnonzero(fell < bound)
    if not fired.size:
        return None
    at = int(t[fired[0]])
    best = int(np.nanargmin(means[: at + 1]))
    return SureStop(fired=at, best=best, kept=best - sure_keep_lag(window, keep))


def check_sure_window(window: int, delta: float, threshold: str, keep: str) -> None:
    """A :class:`~pipeline.errors.SettingError` naming the first bad setting of
    :func:`sure_window_rule`."""
    check_int("window", window, 1)
    check_number("delta", delta, above=0)
    check_choice("threshold", threshold, SURE_THRESHOLDS)
    check_choice("keep", keep, SURE_KEEPS)


def sure_keep_lag(window: int, keep: str) -> int:
    """How many iterations before the least window's last one its kept output lies."""
    return (window - 1) // 2 if keep == "centre" else 0


class OnlineRatioRule:
    """The ratio rule of K fits advancing in lockstep, evaluated on the device as their ratios
    arrive, with no host synchronisation; ``window``, ``eps`` and ``scale`` as in
    :func:`ratio_rule` (with ``scale="log"`` the buffer holds log r).

    The last ``2n + 1`` ratios of every member live in one ``(K, 2n + 1)`` ring buffer, so one
    update serves all members. :meth:`update` returns the members whose rule fires for the first
    time at this measurement, so the caller can keep their outputs with ``torch.where``;
    :attr:`fired` (latched) and :attr:`fired_at` (measurement index, −1 before) are read only when
    the caller syncs anyway.
    """

    def __init__(
        self,
        members: int = 1,
        window: int = RATIO_WINDOW,
        eps: float = RATIO_EPS,
        device: str | torch.device = "cpu",
        scale: str = "absolute",
    ):
        _check_window(window, eps, scale)
        self.window = window
        self.eps = eps
        self.scale = scale
        self.count = 0
        self.history = torch.zeros((members, 2 * window + 1), dtype=torch.float64, device=device)
        self.fired = torch.zeros(members, dtype=torch.bool, device=device)
        self.fired_at = torch.full((members,), -1, dtype=torch.long, device=device)

    def update(self, ratio: Tensor) -> Tensor:
        """Feed the members' ratios (K,) of measurement :attr:`count`; returns the (K,) mask of
        members whose rule fires for the first time now."""
        n, size, i = self.window, self.history.shape[1], self.count
        value = ratio.detach().to(torch.float64)
        self.history[:, i % size] = value.log() if self.scale == "log" else value
        self.count += 1
        if i <= 2 * n:
            return torch.zeros_like(self.fired)
        device = self.history.device
        m1 = self.history[:, torch.arange(i - 2 * n, i - n, device=device) % size].mean(dim=1)
        m2 = self.history[:, torch.arange(i - n + 1, i, device=device) % size].mean(dim=1)
        d = (m1 - m2).abs()
        if self.scale == "relative":
            d = d / m2.abs()
        first = (d < self.eps) & ~self.fired
        self.fired_at = torch.where(first, torch.full_like(self.fired_at, i), self.fired_at)
        self.fired = self.fired | first
        return first

    def select(self, index: Tensor) -> None:
        """Keep only the members at ``index``, in that order."""
        self.history = self.history.index_select(0, index)
        self.fired = self.fired.index_select(0, index)
        self.fired_at = self.fired_at.index_select(0, index)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.clone(),
            "count": self.count,
            "fired": self.fired.clone(),
            "fired_at": self.fired_at.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.history.device
        self.history = state["history"].to(device)
        self.count = int(state["count"])
        self.fired = state["fired"].to(device)
        self.fired_at = state["fired_at"].to(device)
