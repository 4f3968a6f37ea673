"""welford.py against straightforward float64 numpy references and hand-computed states."""
import json
import math

import numpy as np
import pytest

import welford
from welford import EMA, GroupedStats, MedianMAD, StateError, Welford, Window


def update_all(est, xs):
    for x in xs:
        est.update(x)


@pytest.mark.parametrize("seed", range(5))
def test_welford_matches_numpy_two_pass(seed):
    x = np.random.default_rng(seed).normal(3.0, 2.0, size=1 + 37 * seed) ** 3
    w = Welford()
    update_all(w, x)
    assert w.count == len(x)
    assert w.mean == pytest.approx(np.mean(x), rel=1e-13, abs=1e-13)
    if len(x) > 1:
        assert w.var == pytest.approx(np.var(x, ddof=1), rel=1e-12)
        assert w.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    else:
        assert math.isnan(w.var)
    assert math.isnan(Welford().mean)


def test_large_offset_variance_relative_error():
    # 10^6 values with mean 10^6 and std 1: naive sum-of-squares loses every digit; Welford must keep 1e-9.
    x = np.random.default_rng(0).normal(1e6, 1.0, size=10**6)
    w = Welford()
    update_all(w, x.tolist())
    m = math.fsum(x) / len(x)                                       # two-pass, correctly rounded sums
    ref = math.fsum((x - m) ** 2) / (len(x) - 1)
    assert abs(w.var - ref) / ref < 1e-9
    assert abs(w.var - np.var(x, ddof=1)) / ref < 1e-9


@pytest.mark.parametrize("cuts", [(0, 10, 500), (1, 2, 3, 999), (250, 251, 700)])
def test_merge_of_partitions_equals_sequential(cuts):
    x = np.random.default_rng(2).normal(5.0, 3.0, size=1000)
    seq = Welford()
    update_all(seq, x)
    parts = np.split(x, list(cuts))
    total = Welford()
    for p in parts:
        w = Welford()
        update_all(w, p)
        total.merge(w)
    assert total.count == seq.count
    assert total.mean == pytest.approx(seq.mean, rel=1e-13)
    assert total.var == pytest.approx(seq.var, rel=1e-12)
    assert total.var == pytest.approx(np.var(x, ddof=1), rel=1e-12)


def _ema_reference(x, d):
    """Equal weights (numpy mean / ddof=1 variance) for the first m = ceil(1/d) values, then Finch 2009."""
    m = math.ceil(1 / d - 1e-12)
    out = []
    for n in range(1, len(x) + 1):
        if n <= m:
            mean, var = np.mean(x[:n]), (np.var(x[:n], ddof=1) if n > 1 else math.nan)
        else:
            diff = x[n - 1] - mean
            mean = mean + d * diff
            var = (1 - d) * (var + d * diff * diff)
        out.append((mean, math.sqrt(var)))
    return out


@pytest.mark.parametrize("decay", [0.05, 0.3, 0.5, 0.9])
def test_ema_matches_reference_through_the_switch(decay):
    x = np.random.default_rng(3).normal(2.0, 0.5, size=80)
    e = EMA(decay)
    for n, (v, (mean, std)) in enumerate(zip(x, _ema_reference(x, decay)), 1):
        e.update(v)
        assert e.count == n
        assert e.mean == pytest.approx(mean, rel=1e-12)
        if n > 1:
            assert e.std == pytest.approx(std, rel=1e-11)
    # after the switch the latest value has weight exactly `decay` in the mean
    before = e.mean
    e.update(before + 1.0)
    assert e.mean - before == pytest.approx(decay, rel=1e-12)


def test_ema_switch_point():
    e = EMA(0.05)                                                   # 1/decay = 20 equal-weight values
    update_all(e, range(20))
    assert e.mean == pytest.approx(9.5)
    assert e.std == pytest.approx(np.std(np.arange(20), ddof=1))
    e.update(100.0)
    assert e.mean == pytest.approx(9.5 + 0.05 * 90.5)


@pytest.mark.parametrize("k", [2, 5, 64])
def test_window_and_median_mad_match_numpy(k):
    x = np.random.default_rng(k).standard_t(3, size=200)
    win, mad = Window(k), MedianMAD(k)
    for n, v in enumerate(x, 1):
        win.update(v)
        mad.update(v)
        last = x[max(0, n - k):n]
        assert win.count == len(last)
        assert mad.count == len(last)
        assert win.mean == pytest.approx(np.mean(last), rel=1e-12, abs=1e-14)
        med = np.median(last)
        assert mad.mean == pytest.approx(med, rel=1e-15, abs=1e-15)
        if len(last) > 1:
            assert win.std == pytest.approx(np.std(last, ddof=1), rel=1e-12)
            assert mad.std == pytest.approx(1.4826 * np.median(np.abs(last - med)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("kind", ["welford", "ema", "window", "mad"])
def test_state_round_trip_through_json_is_exact(kind, n):
    rng = np.random.default_rng(4)
    a = welford.make_estimator(kind, ema_decay=0.1, window=16)
    update_all(a, rng.normal(size=n) * np.pi)
    b = welford.make_estimator(kind, ema_decay=0.1, window=16)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))    # strict JSON, no NaN
    assert b.state_dict() == a.state_dict()
    for v in rng.normal(size=40):                               # continue both: bitwise identical
        a.update(v)
        b.update(v)
        assert a.state_dict() == b.state_dict()
        assert a.count == b.count
        np.testing.assert_array_equal([a.mean, a.std], [b.mean, b.std])           # bitwise (nan == nan here)


def test_grouped_stats_state_and_factory():
    g = GroupedStats("ema", ema_decay=0.2)
    for b, v in [(1, 0.5), (3, 2.0), (1, 0.7), (3, 1.0), (1, 0.1)]:
        g.update(b, v)
    s = json.dumps(g.state_dict())                               # JSON-serializable
    h = GroupedStats("ema", ema_decay=0.2)
    h.load_state_dict(json.loads(s))
    assert h.state_dict() == g.state_dict()
    assert sorted(h.groups) == [1, 3]
    assert h[1].mean == pytest.approx(np.mean([0.5, 0.7, 0.1]))
    with pytest.raises(ValueError, match="ema_decay"):
        GroupedStats("ema", ema_decay=0.3).load_state_dict(json.loads(s))
    with pytest.raises(ValueError, match="kind"):
        GroupedStats("welford").load_state_dict(json.loads(s))
    with pytest.raises(ValueError, match="unknown statistic 'median'"):
        GroupedStats("median")


# --- the checkpoint layouts, by hand: 1, 2, 3 into each estimator ----------------------------------
# welford: mean 2, M2 = 1 + 0 + 1 = 2.
# ema(0.5): 1 and 2 are the equal-weight phase (count < 1/decay = 2): mean 1.5, M2 0.5, var 0.5;
#   then 3: mean 1.5 + 0.5 * 1.5 = 2.25, var 0.5 * (0.5 + 0.5 * 1.5^2) = 0.8125; M2 stays 0.5.
# window(2) and mad(2) keep 2 and 3: mean / median 2.5, std sqrt(0.5), MAD 0.5 -> 1.4826 * 0.5.
LAYOUTS = {
    "welford": ({"kind": "welford", "count": 3, "mean": 2.0, "m2": 2.0}, 2.0, 1.0),
    "ema": ({"kind": "ema", "decay": 0.5, "var": 0.8125,
             "welford": {"kind": "welford", "count": 3, "mean": 2.25, "m2": 0.5}},
            2.25, math.sqrt(0.8125)),
    "window": ({"kind": "window", "k": 2, "values": [2.0, 3.0]}, 2.5, math.sqrt(0.5)),
    "mad": ({"kind": "mad", "k": 2, "values": [2.0, 3.0]}, 2.5, 1.4826 * 0.5),
}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_state_layout_by_hand(kind):
    state, mean, std = LAYOUTS[kind]
    est = welford.make_estimator(kind, ema_decay=0.5, window=2)
    update_all(est, [1.0, 2.0, 3.0])
    assert est.state_dict() == state
    assert est.mean == pytest.approx(mean, rel=1e-15)
    assert est.std == pytest.approx(std, rel=1e-15)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_saved_state_loads_and_continues(kind):
    state, mean, std = LAYOUTS[kind]
    est = welford.make_estimator(kind, ema_decay=0.5, window=2)
    est.load_state_dict(json.loads(json.dumps(state)))
    assert est.count == 3 - (kind in ("window", "mad"))
    assert est.mean == pytest.approx(mean, rel=1e-15)
    assert est.std == pytest.approx(std, rel=1e-15)
    fresh = welford.make_estimator(kind, ema_decay=0.5, window=2)
    update_all(fresh, [1.0, 2.0, 3.0, 7.0])
    est.update(7.0)
    assert est.state_dict() == fresh.state_dict()


def test_empty_estimators_have_no_statistics():
    for kind in LAYOUTS:
        est = welford.make_estimator(kind, window=2)
        assert est.count == 0, kind
        assert math.isnan(est.mean), kind
        assert math.isnan(est.std), kind


def test_grouped_stats_layout_by_hand():
    g = GroupedStats("welford")
    for b, v in [(2, 1.0), (1, 4.0), (2, 3.0)]:
        g.update(b, v)
    assert g.state_dict() == {"kind": "welford", "ema_decay": 0.05, "window": 256, "groups": {
        "1": {"kind": "welford", "count": 1, "mean": 4.0, "m2": 0.0},
        "2": {"kind": "welford", "count": 2, "mean": 2.0, "m2": 2.0}}}


def test_state_of_another_estimator_is_refused():
    ema = EMA(0.5)
    with pytest.raises(StateError, match="does not match ema"):
        ema.load_state_dict({"kind": "ema", "decay": 0.25, "welford": {}, "var": None})
    with pytest.raises(StateError, match="does not match welford"):
        ema.load_state_dict({"kind": "ema", "decay": 0.5, "var": None,
                             "welford": {"kind": "window", "count": 1, "mean": 0.0, "m2": 0.0}})
    with pytest.raises(StateError, match="does not match window"):
        Window(2).load_state_dict(LAYOUTS["mad"][0])
