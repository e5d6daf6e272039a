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


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"eps": 0.0}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        ratio_rule(np.zeros(10), **{"window": 5, "eps": 0.01, **kwargs})
