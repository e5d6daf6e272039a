"""Stopping rules: ratio rule of Eq. 8 (with its window quirk), oracle, ES-WMV/EMV, online form,
the SURE window rule."""

import math

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.stopping import (
    RATIO_SCALES,
    SURE_KEEPS,
    SURE_THRESHOLDS,
    OnlineRatioRule,
    StoppingConfig,
    SureStop,
    es_emv,
    es_wmv,
    oracle_peak,
    ratio_rule,
    sure_window_rule,
    trailing_means,
)


def ratio_rule_loop(r: list[float], n: int, eps: float, scale: str = "absolute") -> int | None:
    """Literal transcription of method.md §5: the first i > 2n with |m1 - m2| < eps; ``relative``
    divides the difference by |m2|, ``log`` takes the window means of log r."""
    for i in range(len(r)):
        if i > 2 * n:
            first, second = r[i - 2 * n : i - n], r[i - n + 1 : i]
            if scale == "log":
                first, second = [math.log(v) for v in first], [math.log(v) for v in second]
            m1 = sum(first) / len(first)
            m2 = sum(second) / len(second)
            d = abs(m1 - m2) / abs(m2) if scale == "relative" else abs(m1 - m2)
            if d < eps:
                return i
    return None


def test_fires_on_a_plateau_not_on_a_falling_ratio():
    falling = np.linspace(5.0, 0.0, 600)  # slope 1/120 per step: windows 100 apart differ by 0.83
    assert ratio_rule(falling, 100, 0.01) is None
    plateau = np.concatenate([falling[:300], np.full(400, falling[299])])
    stop = ratio_rule(plateau, 100, 0.01)
    assert stop is not None and 300 < stop < 600


def test_vectorised_rule_equals_literal_transcription():
    rng = np.random.default_rng(3)
    for _ in range(20):
        r = np.cumsum(rng.normal(0, 0.01, size=rng.integers(5, 90)))
        n = int(rng.integers(2, 12))
        eps = float(rng.uniform(0.001, 0.05))
        assert ratio_rule(r, n, eps) == ratio_rule_loop(list(r), n, eps)


@pytest.mark.parametrize("scale", RATIO_SCALES)
def test_every_scale_equals_literal_transcription(scale: str):
    rng = np.random.default_rng(4)
    fired = 0
    for _ in range(30):
        r = 2.0 + np.cumsum(rng.normal(0, 0.02, size=rng.integers(5, 90)))
        n = int(rng.integers(2, 12))
        eps = float(rng.uniform(0.0002, 0.005))
        expected = ratio_rule_loop(list(r), n, eps, scale)
        assert ratio_rule(r, n, eps, scale) == expected
        fired += expected is not None
    assert 5 < fired < 25  # both outcomes are exercised


def test_scale_free_forms_hand_computed():
    """Windows of n = 2 at i = 5: m1 = mean(r[1:3]), m2 = mean(r[4:5]) = r[4]."""
    r = np.array([9.0, 4.0, 4.0, 7.0, 3.6, 1.0])
    # absolute |4 - 3.6| = 0.4; relative 0.4 / 3.6 = 0.111; log |log 4 - log 3.6| = 0.10536
    assert ratio_rule(r, 2, 0.41) == 5 and ratio_rule(r, 2, 0.39) is None
    assert ratio_rule(r, 2, 0.112, "relative") == 5
    assert ratio_rule(r, 2, 0.111, "relative") is None
    assert ratio_rule(r, 2, 0.1054, "log") == 5 and ratio_rule(r, 2, 0.1053, "log") is None


def test_scale_free_forms_ignore_the_ratios_level():
    """A ratio settling at 2.4 (astronaut, coffee) and the same curve scaled to 5.7 (chelsea's
    level): the absolute rule stops them at different iterations, the scale-free forms do not."""
    t = np.arange(1500)
    r = 2.4 + 3.0 * np.exp(-t / 200.0)
    scaled = r * 5.7 / 2.4
    assert ratio_rule(r, 150, 0.1) != ratio_rule(scaled, 150, 0.1)
    for scale, eps in (("relative", 0.04), ("log", 0.04)):
        stop = ratio_rule(r, 150, eps, scale)
        assert stop is not None and stop == ratio_rule(scaled, 150, eps, scale)


def test_never_fires_before_2n_plus_1():
    assert ratio_rule(np.zeros(21), 10, 0.01) is None
    assert ratio_rule(np.zeros(22), 10, 0.01) == 21


def test_online_rule_matches_offline():
    rng = np.random.default_rng(0)
    r = np.concatenate([np.linspace(1, 0.2, 60), 0.2 + rng.normal(0, 1e-3, 80)])
    other = 2.0 - r  # falls then plateaus at 1.8: fires at the same index
    rule = OnlineRatioRule(members=3, window=10, eps=0.01)
    firsts = [
        rule.update(torch.tensor([v, 5.0 - 0.05 * i, w]))
        for i, (v, w) in enumerate(zip(r, other, strict=True))
    ]
    expected = ratio_rule(r, 10, 0.01)
    assert expected is not None and ratio_rule(5.0 - 0.05 * np.arange(len(r)), 10, 0.01) is None
    assert rule.fired_at.tolist() == [expected, -1, ratio_rule(other, 10, 0.01)]
    assert [bool(f[0]) for f in firsts].index(True) == expected
    assert sum(bool(f[0]) for f in firsts) == 1  # "first" is true once; fired stays latched
    assert rule.fired.tolist() == [True, False, True]


@pytest.mark.parametrize("scale", ["relative", "log"])
def test_online_scale_free_rule_matches_offline(scale: str):
    rng = np.random.default_rng(1)
    curves = [2.0 + np.cumsum(rng.normal(0, 0.02, size=120)) for _ in range(3)]
    curves.append(np.concatenate([np.linspace(6, 2, 50), 2 + rng.normal(0, 1e-3, 70)]))
    curves.append(6.0 * np.exp(-np.arange(120) / 40))  # falls 15 % a window: never fires
    rule = OnlineRatioRule(members=len(curves), window=6, eps=0.01, scale=scale)
    for values in zip(*curves, strict=True):
        rule.update(torch.tensor(values))
    expected = [ratio_rule(r, 6, 0.01, scale) for r in curves]
    assert any(e is None for e in expected) and any(e is not None for e in expected)
    assert rule.fired_at.tolist() == [-1 if e is None else e for e in expected]


def test_stopping_section_sets_the_scale():
    flat = StoppingConfig.flatten({"ratio": {"window": 150, "eps": 0.04, "scale": "log"}})
    assert flat == {"ratio_window": 150, "ratio_eps": 0.04, "ratio_scale": "log"}
    assert StoppingConfig(**flat).ratio_scale == "log"
    assert StoppingConfig().ratio_scale == "absolute"
    with pytest.raises(UserError, match="scale must be one of"):
        StoppingConfig(ratio_scale="logarithmic")


def test_online_rule_state_round_trip():
    r = np.linspace(1, 0, 50)
    a, b = OnlineRatioRule(window=5), OnlineRatioRule(window=5)
    for v in r[:30]:
        a.update(torch.tensor([v]))
    b.load_state_dict(a.state_dict())
    for v in r[30:]:
        assert bool(a.update(torch.tensor([v]))) == bool(b.update(torch.tensor([v])))
    assert a.fired_at.tolist() == b.fired_at.tolist()


def test_online_rule_select_keeps_the_chosen_members():
    rule = OnlineRatioRule(members=3, window=2, eps=0.5)
    for i in range(6):
        rule.update(torch.tensor([1.0, 10.0 * i, 2.0]))
    rule.select(torch.tensor([2, 1]))
    assert rule.fired.tolist() == [True, False] and rule.fired_at.tolist() == [5, -1]
    # A ring of 2n + 1 = 5 slots: measurement 5 overwrote slot 0.
    assert rule.history.tolist() == [[2.0] * 5, [50.0, 10.0, 20.0, 30.0, 40.0]]


def test_oracle_peak():
    assert oracle_peak(np.array([np.nan, 20.0, 25.0, 24.0, 25.0])) == 2
    assert oracle_peak(np.array([np.nan, np.nan])) is None


def test_variance_rules_stop_at_the_minimum_after_patience():
    v = np.concatenate([[np.nan] * 5, np.linspace(1, 0.1, 50), np.linspace(0.1, 1, 50)])
    assert es_wmv(v, patience=10) == 54
    assert es_emv(v, patience=60) is None


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"eps": 0.0}, {"scale": "ln"}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        ratio_rule(np.zeros(10), **{"window": 5, "eps": 0.01, **kwargs})


def sure_window_loop(
    sure: list[float],
    noise_var: float,
    w: int,
    delta: float,
    threshold: str = "noise",
    keep: str = "last",
) -> SureStop | None:
    """Literal transcription of the SURE window rule: S[t] = mean(sure[t-w+1 .. t]); fire at the
    first t >= 2w-1 with S[t-w] - S[t] < delta * noise_var ("noise") or < delta * |S[t]|
    ("level"); best = the first argmin of S[0 .. t]; keep best, or best - (w-1)//2 ("centre")."""
    means = {t: sum(sure[t - w + 1 : t + 1]) / w for t in range(w - 1, len(sure))}
    for t in range(2 * w - 1, len(sure)):
        bound = delta * (noise_var if threshold == "noise" else abs(means[t]))
        if means[t - w] - means[t] < bound:
            best = min(range(w - 1, t + 1), key=lambda i: (means[i], i))
            return SureStop(
                fired=t, best=best, kept=best - (w - 1) // 2 if keep == "centre" else best
            )
    return None


def test_trailing_means_hand_computed():
    np.testing.assert_array_equal(
        trailing_means(np.array([1.0, 3.0, 5.0, 4.0]), 2), [np.nan, 2.0, 4.0, 4.5]
    )
    assert np.isnan(trailing_means(np.array([1.0, 2.0]), 3)).all()


def test_sure_window_rule_hand_computed():
    # w = 2: S = [-, 4.5, 3.5, 2.75, 2.475, 2.525, 2.6]; S[t-2] - S[t] = 1.75, 1.025, 0.225 at
    # t = 3, 4, 5 (>= 0.1), then 2.475 - 2.6 = -0.125 < 0.1 at t = 6; least S up to 6: t = 4.
    sure = np.array([5.0, 4.0, 3.0, 2.5, 2.45, 2.6, 2.6])
    noise = {"threshold": "noise", "keep": "last"}
    assert sure_window_rule(sure, 1.0, 2, 0.1, **noise) == SureStop(fired=6, best=4, kept=4)
    assert sure_window_rule(sure[:6], 1.0, 2, 0.1, **noise) is None
    # δ·σ² sets the threshold: δ = 0.3 fires at t = 5 (0.225 < 0.3), keeping t = 4.
    assert sure_window_rule(sure, 1.0, 2, 0.3, **noise) == SureStop(fired=5, best=4, kept=4)
    # δ·|S[t]|: δ = 0.1 gives 0.35, 0.2475, 0.2525 at t = 3, 4, 5: 1.75 and 1.025 pass, 0.225 <
    # 0.2525 fires at t = 5, keeping t = 4.
    level = sure_window_rule(sure, 1.0, 2, 0.1, threshold="level", keep="last")
    assert level == SureStop(fired=5, best=4, kept=4)
    # w = 3: S = [-, -, 4, 3.1667, 2.65, 2.5167, 2.55]; S[2] - S[5] = 1.4833 >= 0.2517 at t = 5,
    # S[3] - S[6] = 0.6167 >= 0.255 at t = 6: never fires; δ = 0.5 fires at t = 6 (0.6167 <
    # 1.275) with the least window ending at 5, kept at its centre 4 (one before its last
    # iterate: (w − 1) // 2 = 1).
    assert sure_window_rule(sure, 1.0, 3, 0.1, threshold="level", keep="centre") is None
    centre = sure_window_rule(sure, 1.0, 3, 0.5, threshold="level", keep="centre")
    assert centre == SureStop(fired=6, best=5, kept=4)


def test_sure_window_rule_equals_literal_transcription():
    rng = np.random.default_rng(3)
    for trial in range(40):
        length, w = int(rng.integers(5, 200)), int(rng.integers(1, 30))
        t = np.arange(length)
        sure = (
            np.exp(-t / rng.uniform(5, 80)) + rng.uniform(0, 2e-3) * t + rng.normal(0, 0.01, length)
        )
        noise_var, delta = rng.uniform(0.01, 1), rng.uniform(0.001, 0.1)
        form = {"threshold": SURE_THRESHOLDS[trial % 2], "keep": SURE_KEEPS[trial // 2 % 2]}
        expected = sure_window_loop(sure.tolist(), noise_var, w, delta, **form)
        assert sure_window_rule(sure, noise_var, w, delta, **form) == expected, trial


def test_sure_window_rule_reads_sure_in_units_of_the_noise_variance():
    t = np.arange(1000)
    sure = 0.02 * np.exp(-t / 60) + 0.004 + 1e-6 * t  # least at t = 349, rising after
    noise = {"window": 50, "threshold": "noise", "keep": "last"}
    stop = sure_window_rule(sure, 0.01, **noise)
    assert stop == SureStop(fired=336, best=336, kept=336)
    assert stop == sure_window_rule(7 * sure, 0.07, **noise)
    # At any δ > 0 it fires once S has risen over a window: the least window is the one
    # centred on t = 349 (it ends 24 or 25 later), and the fire comes after it; its centre is
    # kept with keep="centre".
    rising = sure_window_rule(sure, 0.01, delta=1e-9, **noise)
    assert rising is not None and rising.best in (373, 374, 375) and rising.fired > rising.best
    centred = sure_window_rule(sure, 0.01, delta=1e-9, **{**noise, "keep": "centre"})
    assert centred is not None and centred.kept == rising.best - 24 and abs(centred.kept - 349) <= 2


def test_sure_window_rule_level_threshold_follows_the_error_not_sigma():
    # S = exp(-t/1000) falls by e^0.02 - 1 = 2.02 % of itself per window of 20: above δ = 1 %,
    # so the level rule runs to the end, while δσ² = 0.03 (σ² = 1, S ≤ 1) fires at once.
    sure = np.exp(-np.arange(400) / 1000)
    assert sure_window_rule(sure, 1.0, 20, 0.01, threshold="level", keep="last") is None
    noise = sure_window_rule(sure, 1.0, 20, 0.03, threshold="noise", keep="last")
    assert noise == SureStop(fired=39, best=39, kept=39)
    # At a 10× lower error level it behaves the same (scale-free), whatever σ² says.
    level = {"window": 20, "delta": 0.03, "threshold": "level", "keep": "centre"}
    assert sure_window_rule(sure, 1.0, **level) == sure_window_rule(sure / 10, 5.0, **level)
    assert sure_window_rule(sure, 1.0, **level) == SureStop(fired=39, best=39, kept=30)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"delta": 0.0},
        {"noise_var": 0.0},
        {"window": 2.5},
        {"threshold": "sigma"},
        {"keep": "first"},
    ],
)
def test_bad_sure_window_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        sure_window_rule(np.zeros(10), **{"noise_var": 1.0, **kwargs})
