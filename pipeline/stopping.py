"""Stopping rules for the deep image prior, as pure functions over a logged trajectory.

Each rule takes the per-measurement curves of one fit (NumPy arrays indexed by measurement, not by
iteration) and returns the index of the measurement at which it stops, or ``None`` when it never
fires. Because they are pure, different rules can be compared on the same run without
re-optimising (method.md §5).

- :func:`ratio_rule` — Shi et al. 2022, Eq. 8: the blurriness/sharpness ratio plateaus.
- :func:`oracle_peak` — the best PSNR against the clean image (needs the clean image).
- :func:`es_wmv` / :func:`es_emv` — Wang et al., "Early Stopping for Deep Image Prior": the running
  (windowed or exponential) variance of the outputs stops improving.

:class:`OnlineRatioRule` is the same ratio rule evaluated inside the fit loop on the device,
without a host synchronisation per iteration.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError

RATIO_WINDOW = 100
RATIO_EPS = 0.01
VARIANCE_PATIENCE = 1000


def _check_window(window: int, eps: float) -> None:
    if window < 2:
        raise UserError(f"stopping window must be at least 2, got {window}")
    if eps <= 0:
        raise UserError(f"stopping epsilon must be positive, got {eps}")


def ratio_rule(
    ratios: np.ndarray, window: int = RATIO_WINDOW, eps: float = RATIO_EPS
) -> int | None:
    """First index ``i`` at which the ratio rule fires (Shi et al. 2022, Eq. 8).

    At ``i > 2n`` with ``m1 = mean(r[i-2n : i-n])`` and ``m2 = mean(r[i-n+1 : i])`` the rule fires
    when ``|m1 - m2| < eps``. The second window holds n-1 values and leaves out ``r[i]`` (a quirk of
    the reference, kept so that stop iterations are comparable).
    """
    _check_window(window, eps)
    r = np.asarray(ratios, dtype=np.float64)
    n = window
    if len(r) <= 2 * n:
        return None
    c = np.concatenate([[0.0], np.cumsum(r)])
    i = np.arange(2 * n + 1, len(r))
    m1 = (c[i - n] - c[i - 2 * n]) / n
    m2 = (c[i] - c[i - n + 1]) / (n - 1)
    fired = np.flatnonzero(np.abs(m1 - m2) < eps)
    return int(i[fired[0]]) if fired.size else None


def oracle_peak(psnr: np.ndarray) -> int | None:
    """Index of the best PSNR against the clean image (first one on ties); ``None`` if all NaN."""
    p = np.asarray(psnr, dtype=np.float64)
    if p.size == 0 or np.all(np.isnan(p)):
        return None
    return int(np.nanargmax(p))


def _patience_stop(variance: np.ndarray, patience: int) -> int | None:
    """Index of the running minimum once it has not improved for ``patience`` measurements."""
    if patience < 1:
        raise UserError(f"stopping patience must be at least 1, got {patience}")
    v = np.asarray(variance, dtype=np.float64)
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
    return _patience_stop(wmv, patience)


def es_emv(emv: np.ndarray, patience: int = VARIANCE_PATIENCE) -> int | None:
    """ES-EMV: as :func:`es_wmv` on the exponential moving variance (α = 0.1)."""
    return _patience_stop(emv, patience)


class OnlineRatioRule:
    """The ratio rule evaluated on the device as ratios arrive, with no host synchronisation.

    The last ``2n`` ratios live in a ring buffer; :meth:`update` returns a 0-d bool tensor that is
    True from the first firing on (latched), so the caller can keep the output of that iteration
    with ``torch.where`` and read the flag only when it syncs anyway.
    """

    def __init__(
        self, window: int = RATIO_WINDOW, eps: float = RATIO_EPS, device: str | torch.device = "cpu"
    ):
        _check_window(window, eps)
        self.window = window
        self.eps = eps
        self.history = torch.zeros(2 * window + 1, dtype=torch.float64, device=device)
        self.count = 0
        self.fired = torch.zeros((), dtype=torch.bool, device=device)
        self.fired_at = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, ratio: Tensor) -> Tensor:
        """Feed the ratio of measurement ``count``; return the latched "has fired" flag."""
        n = self.window
        size = self.history.numel()
        i = self.count
        self.history[i % size] = ratio.detach().to(torch.float64).reshape(())
        self.count += 1
        if i <= 2 * n:
            return self.fired
        idx1 = torch.arange(i - 2 * n, i - n, device=self.history.device) % size
        idx2 = torch.arange(i - n + 1, i, device=self.history.device) % size
        m1 = self.history[idx1].mean()
        m2 = self.history[idx2].mean()
        now = (m1 - m2).abs() < self.eps
        first = now & ~self.fired
        self.fired_at = torch.where(first, torch.full_like(self.fired_at, i), self.fired_at)
        self.fired = self.fired | now
        return self.fired

    def state_dict(self) -> dict:
        return {
            "history": self.history.clone(),
            "count": self.count,
            "fired": self.fired.clone(),
            "fired_at": self.fired_at.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(self.history.device)
        self.count = int(state["count"])
        self.fired = state["fired"].to(self.history.device)
        self.fired_at = state["fired_at"].to(self.history.device)
