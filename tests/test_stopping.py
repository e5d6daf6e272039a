"""Stopping rules: ratio rule of Eq. 8 (with its window quirk), oracle, ES-WMV/EMV, online form."""

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.stopping import OnlineRatioRule, es_emv, es_wmv, oracle_peak, ratio_rule


def ratio_rule_loop(r: list[float], n: int, eps: float) -> int | None:
    """Literal transcription of method.md §5: the first i > 2n with |m1 - m2| < eps."""
    for i in range(len(r)):
        if i > 2 * n:
            m1 = np.mean(r[i - 2 * n : i - n])
            m2 = np.mean(r[i - n + 1 : i])
            if abs(m1 - m2) < eps:
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


def test_never_fires_before_2n_plus_1():
    assert ratio_rule(np.zeros(21), 10, 0.01) is None
    assert ratio_rule(np.zeros(22), 10, 0.01) == 21


def test_online_rule_matches_offline():
    rng = np.random.default_rng(0)
    r = np.concatenate([np.linspace(1, 0.2, 60), 0.2 + rng.normal(0, 1e-3, 80)])
    rule = OnlineRatioRule(window=10, eps=0.01)
    flags = [bool(rule.update(torch.tensor(v))) for v in r]
    expected = ratio_rule(r, 10, 0.01)
    assert expected is not None
    assert int(rule.fired_at) == expected
    assert flags.index(True) == expected and all(flags[expected:])


def test_online_rule_state_round_trip():
    r = np.linspace(1, 0, 50)
    a, b = OnlineRatioRule(window=5), OnlineRatioRule(window=5)
    for v in r[:30]:
        a.update(torch.tensor(v))
    b.load_state_dict(a.state_dict())
    for v in r[30:]:
        assert bool(a.update(torch.tensor(v))) == bool(b.update(torch.tensor(v)))
    assert int(a.fired_at) == int(b.fired_at)


def test_oracle_peak():
    assert oracle_peak(np.array([np.nan, 20.0, 25.0, 24.0, 25.0])) == 2
    assert oracle_peak(np.array([np.nan, np.nan])) is None


def test_variance_rules_stop_at_the_minimum_after_patience():
    v = np.concatenate([[np.nan] * 5, np.linspace(1, 0.1, 50), np.linspace(0.1, 1, 50)])
    assert es_wmv(v, patience=10) == 54
    assert es_emv(v, patience=60) is None


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"eps": 0.0}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        ratio_rule(np.zeros(10), **{"window": 5, "eps": 0.01, **kwargs})
