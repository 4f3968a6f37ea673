"""resure.py: Eqs. 1 and 5-7 against a hand-computed example and a straightforward numpy oracle; the
two readings of Eq. 6's floor, modes, ramp, non-finite losses, exact state (and the saved layout),
units, the reweighted loss, 2-process gloo equivalence, and the lag and collapse streams."""
import copy
import gc
import json
import math
import os
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import resure
from resure import ReSURE, ReSUREError
from support.distributed import GatherError, all_reduce_sum, gather


def _round_trip(r, **kw):
    s = ReSURE(**kw)
    s.load_state_dict(json.loads(json.dumps(r.state_dict(), allow_nan=False)))
    return s


# --- the worked example -------------------------------------------------------------------------------------------
WARM_L, WARM_G = [1.0, 2.0, 3.0, 2.0, 4.0, 6.0], [1, 1, 1, 2, 2, 2]
# group 1: {1, 2, 3}: mu = 2, sigma^2 = (1 + 0 + 1)/2 = 1  -> tau_1 = 2 + 1*1 = 3          (Eq. 5, alpha = 1)
# group 2: {2, 4, 6}: mu = 4, sigma^2 = (4 + 0 + 4)/2 = 4  -> tau_2 = 4 + 1*2 = 6
B1_L = [1.5, 3.0, 4.5, 9.0, 5.0, 7.5, 30.0, 12.0, 2.0, 0.5]
B1_G = [1, 1, 1, 1, 2, 2, 2, 2, 1, 1]
# Eq. 6, w = exp(-(l - tau)/tau) for l > tau:
#   u2: exp(-(4.5-3)/3) = exp(-0.5)    u3: exp(-(9-3)/3) = exp(-2)
#   u5: exp(-(7.5-6)/6) = exp(-0.25)   u6: exp(-(30-6)/6) = exp(-4)   u7: exp(-(12-6)/6) = exp(-1)
#   u1 has l = tau = 3: reliable (l <= tau).
# Eq. 7: sorted weights e^-4, e^-2, e^-1, e^-0.5, e^-0.25, 1, 1, 1, 1, 1; the 5th percentile sits at rank
#   0.05 * (10 - 1) = 0.45: eps = e^-4 + 0.45 * (e^-2 - e^-4). Only u6 (e^-4) lies below it.
EPS1 = math.exp(-4) + 0.45 * (math.exp(-2) - math.exp(-4))
B1_W = [1, 1, math.exp(-0.5), math.exp(-2), 1, math.exp(-0.25), EPS1, math.exp(-1), 1, 1]
B1_F = [False, False, True, True, False, True, True, True, False, False]
# Reliable units enter in batch order: group 1 = {1,2,3, 1.5,3,2,0.5}: n = 7, sum 13, sum of squares 29.5,
#   mu = 13/7, sigma^2 = (29.5 - 169/7)/6 = 25/28;
#   group 2 = {2,4,6, 5}: n = 4, sum of squares 81, mu = 17/4, sigma^2 = (81 - 4*(17/4)^2)/3 = 35/12.
T1, T2 = 13 / 7 + math.sqrt(25 / 28), 17 / 4 + math.sqrt(35 / 12)    # tau_1 = 2.8021, tau_2 = 5.9578
B2_L, B2_G = [3.0, 1.0, 9.0, 4.0], [1, 1, 2, 2]
# u0: 3 > tau_1: exp(-(3 - T1)/T1) = 0.9319;  u2: 9 > tau_2: exp(-(9 - T2)/T2) = 0.6001;  u1, u3 reliable.
# sorted: W2b, W2a, 1, 1; rank 0.05 * 3 = 0.15: eps = W2b + 0.15 * (W2a - W2b) > W2b, so u2 gets eps.
W2A, W2B = math.exp(-(3.0 - T1) / T1), math.exp(-(9.0 - T2) / T2)
EPS2 = W2B + 0.15 * (W2A - W2B)
B2_W = [W2A, 1, EPS2, 1]


def _worked(**kw):
    r = ReSURE(**{**dict(alpha=1.0, floor_percentile=5.0, warmup_samples=6, ramp_steps=0), **kw})
    assert r.warmup_from(WARM_L, WARM_G) == 6
    return r


def test_worked_example_by_hand():
    r = _worked()
    w, f = r.weigh(np.array(B1_L), np.array(B1_G))
    assert w.dtype == np.float64
    assert f.dtype == bool
    np.testing.assert_allclose(w, B1_W, rtol=0, atol=1e-12)
    assert f.tolist() == B1_F
    s = r.summary()
    assert s["groups"][1]["tau"] == pytest.approx(3.0, abs=1e-12)
    assert s["groups"][2]["tau"] == pytest.approx(6.0)
    assert s["eps"] == pytest.approx(EPS1, abs=1e-12)
    assert s["flagged_units"] == 5
    assert s["weight_min"] == pytest.approx(EPS1)
    assert s["groups"][2]["flagged"] == 0.75
    assert r.stats[1].mean == pytest.approx(13 / 7, abs=1e-12)
    assert r.stats[1].std == pytest.approx(math.sqrt(25 / 28))
    assert r.stats[2].mean == pytest.approx(4.25, abs=1e-12)
    assert r.stats[2].std == pytest.approx(math.sqrt(35 / 12))
    w, f = r.weigh(torch.tensor(B2_L), torch.tensor(B2_G))          # torch input accepted
    np.testing.assert_allclose(w, B2_W, rtol=0, atol=1e-12)
    assert f.tolist() == [True, False, True, False]


@pytest.mark.parametrize("update,g1,g2", [
    ("winsorized", [1, 2, 3, 1.5, 3.0, 3.0, 3.0, 2.0, 0.5], [2, 4, 6, 5.0, 6.0, 6.0, 6.0]),  # flagged enter as tau
    ("all", [1, 2, 3, 1.5, 3.0, 4.5, 9.0, 2.0, 0.5], [2, 4, 6, 5.0, 7.5, 30.0, 12.0])])
def test_worked_example_stats_update(update, g1, g2):
    r = _worked(stats_update=update)
    w, f = r.weigh(B1_L, B1_G)
    np.testing.assert_allclose(w, B1_W, rtol=0, atol=1e-12)      # same batch, same pre-batch thresholds
    for b, vals in ((1, g1), (2, g2)):
        assert r.stats[b].count == len(vals)
        assert r.stats[b].mean == pytest.approx(np.mean(vals), rel=1e-14)
        assert r.stats[b].std == pytest.approx(np.std(vals, ddof=1), rel=1e-13)


def test_worked_example_ramp_and_modes():
    r = _worked(ramp_steps=4)
    w1, _ = r.weigh(B1_L, B1_G)                                   # first step after warm-up: r = 1/4
    np.testing.assert_allclose(w1, [1 - 0.25 * (1 - w) for w in B1_W], rtol=0, atol=1e-12)
    w2, _ = r.weigh(B2_L, B2_G)                                   # r = 2/4, statistics unaffected by the ramp
    np.testing.assert_allclose(w2, [1 - 0.5 * (1 - w) for w in B2_W], rtol=0, atol=1e-12)
    hard = _worked(mode="hard")
    assert hard.weigh(B1_L, B1_G)[0].tolist() == [0.0 if f else 1.0 for f in B1_F]
    sft = _worked(mode="sft")
    w, f = sft.weigh(B1_L, B1_G)
    assert w.tolist() == [1.0] * 10
    assert not f.any()
    assert sft.stats[2].count == 7
    glob = ReSURE(mode="global", warmup_samples=6, ramp_steps=0)
    glob.warmup_from(WARM_L, WARM_G)                              # one group {1,2,3,2,4,6}: mu = 3, var = 16/5
    tau = 3 + math.sqrt(16 / 5)
    w, f = glob.weigh([4.0, 5.0, 2.0], [1, 5, 2])
    assert f.tolist() == [False, True, False]
    assert sorted(glob.stats.groups) == [1]
    # raw weights 1, exp(-(5-tau)/tau), 1: the floor is at rank 0.1 between w and 1
    raw = math.exp(-(5 - tau) / tau)
    assert w[1] == pytest.approx(raw + 0.1 * (1 - raw), abs=1e-12)


# --- the two readings of Eq. 6's floor, by hand ---------------------------------------------------------------
# Warm-up group 1 = {1, 2, 3}: tau_1 = 3. A loss of 8.25 weighs exp(-(8.25 - 3)/3) = exp(-1.75) = 0.1738.
W175 = math.exp(-1.75)
# 16 units, one flagged. "all": numpy's linear 5th percentile of {W175, fifteen 1.0s} sits at rank
# 0.05 * 15 = 0.75: eps = W175 + 0.75 * (1 - W175) = 0.7934. "flagged": the percentile of {W175} is W175.
EPS_ALL_16 = W175 + 0.75 * (1 - W175)
# 64 units, three flagged (losses 4.5, 9, 6: weights e^-0.5, e^-2, e^-1). "all": rank 0.05 * 63 = 3.15
# falls between the 4th and 5th smallest, both 1.0: eps = 1. "flagged": rank 0.05 * 2 = 0.1 among
# {e^-2, e^-1, e^-0.5}: eps = e^-2 + 0.1 * (e^-1 - e^-2), which lifts e^-2 only.
EPS_FLAGGED_64 = math.exp(-2) + 0.1 * (math.exp(-1) - math.exp(-2))


def _floor_batch(n, bad):
    losses = np.full(n, 2.0)
    for i, loss in bad.items():
        losses[i] = loss
    return losses, np.ones(n, dtype=int)


def _warm_group_1(over):
    r = ReSURE(warmup_samples=3, ramp_steps=0, floor_over=over)
    r.warmup_from([1.0, 2.0, 3.0], [1, 1, 1])
    assert r.tau(1) == 3.0
    return r


def test_floor_over_all_lifts_a_lone_flagged_unit():
    losses, groups = _floor_batch(16, {5: 8.25})
    r = _warm_group_1("all")
    w, f = r.weigh(losses, groups)
    assert np.flatnonzero(f).tolist() == [5]
    assert w[5] == pytest.approx(EPS_ALL_16, rel=1e-15)
    assert EPS_ALL_16 == pytest.approx(0.7934, abs=1e-4)
    assert r.summary()["eps"] == pytest.approx(EPS_ALL_16, rel=1e-15)
    assert (np.delete(w, 5) == 1.0).all()


def test_floor_over_flagged_keeps_a_lone_flagged_unit():
    losses, groups = _floor_batch(16, {5: 8.25})
    r = _warm_group_1("flagged")
    w, f = r.weigh(losses, groups)
    assert np.flatnonzero(f).tolist() == [5]
    assert w[5] == pytest.approx(W175, rel=1e-15)
    assert r.summary()["eps"] == pytest.approx(W175, rel=1e-15)
    assert (np.delete(w, 5) == 1.0).all()


def test_floor_over_all_with_few_flagged_down_weights_nothing():
    losses, groups = _floor_batch(64, {3: 4.5, 30: 9.0, 63: 6.0})
    r = _warm_group_1("all")
    w, f = r.weigh(losses, groups)
    assert np.flatnonzero(f).tolist() == [3, 30, 63]
    assert r.summary()["eps"] == 1.0
    assert (w == 1.0).all()


def test_floor_over_flagged_with_few_flagged():
    losses, groups = _floor_batch(64, {3: 4.5, 30: 9.0, 63: 6.0})
    r = _warm_group_1("flagged")
    w, f = r.weigh(losses, groups)
    assert np.flatnonzero(f).tolist() == [3, 30, 63]
    assert r.summary()["eps"] == pytest.approx(EPS_FLAGGED_64, rel=1e-15)
    np.testing.assert_allclose(w[[3, 30, 63]], [math.exp(-0.5), EPS_FLAGGED_64, math.exp(-1)],
                               rtol=1e-15)


def test_floor_over_is_part_of_the_checkpointed_config():
    flagged = ReSURE(floor_over="flagged")
    assert flagged.state_dict()["config"]["floor_over"] == "flagged"
    assert ReSURE().state_dict()["config"]["floor_over"] == "all"
    with pytest.raises(ReSUREError, match="floor_over: checkpoint 'flagged' vs now 'all'"):
        ReSURE().load_state_dict(flagged.state_dict())
    keyless = ReSURE().state_dict()
    del keyless["config"]["floor_over"]                         # a state written without the key
    with pytest.raises(ReSUREError, match="floor_over: checkpoint 'all' vs now 'flagged'"):
        ReSURE(floor_over="flagged").load_state_dict(keyless)
    ReSURE().load_state_dict(keyless)                           # means "all"


# --- a state in the saved layout, by hand ------------------------------------------------------------------
# Group 1: n 3, mean 2, M2 2 -> sigma 1, tau_1 = 3. Group 2: n 3, mean 4, M2 8 -> sigma 2, tau_2 = 6.
# Gains of group 1: n 3, mean 0.5, M2 0.08 -> sigma 0.2, band 0.5 -+ 2 * 0.2 = [0.1, 0.9].
SAVED = json.loads("""{"config": {"alpha": 1.0, "floor_percentile": 5.0, "warmup_samples": 6,
 "ramp_steps": 4, "min_count": 2, "max_turn_groups": null, "mode": "resure", "stats_kind": "welford",
 "stats_update": "reliable", "ema_decay": 0.05, "window": 256, "gain_alpha": 2.0},
 "calls": 4, "seen": 40, "ramp_pos": 2, "units_total": 35, "flagged_total": 5, "nonfinite_total": 1,
 "lag_run": 0, "collapse_run": 1, "warned": ["lag"],
 "stats": {"kind": "welford", "ema_decay": 0.05, "window": 256, "groups": {
   "1": {"kind": "welford", "count": 3, "mean": 2.0, "m2": 2.0},
   "2": {"kind": "welford", "count": 3, "mean": 4.0, "m2": 8.0}}},
 "gain_stats": {"kind": "welford", "ema_decay": 0.05, "window": 256, "groups": {
   "1": {"kind": "welford", "count": 3, "mean": 0.5, "m2": 0.08}}}}""")


def _saved():
    r = ReSURE(warmup_samples=6, ramp_steps=4, gain_alpha=2.0)
    r.load_state_dict(copy.deepcopy(SAVED))
    return r


def test_saved_layout_loads():
    r = _saved()
    assert r.tau(1) == 3.0
    assert r.tau(2) == 6.0
    assert r.gain_band(1) == pytest.approx((0.1, 0.9), rel=1e-14)
    assert r.seen == 40
    assert r.counters.calls == 4
    assert r.counters.ramp_pos == 2


def test_saved_layout_is_written_back_unchanged():
    expected = copy.deepcopy(SAVED)
    expected["config"]["floor_over"] = "all"
    assert json.dumps(_saved().state_dict()) == json.dumps(expected)      # same keys, same order


def test_saved_layout_continues_by_hand():
    # unit 1: 4.5 > tau_1 = 3: raw exp(-0.5); "all": rank 0.05 * 1 over {exp(-0.5), 1}:
    # eps = exp(-0.5) + 0.05 * (1 - exp(-0.5)); the third step after warm-up: r = 3/4.
    r = _saved()
    w, f = r.weigh([2.0, 4.5], [1, 1], gains=[0.5, 0.5])
    eps = math.exp(-0.5) + 0.05 * (1 - math.exp(-0.5))
    assert f.tolist() == [False, True]
    assert w[0] == 1.0
    assert w[1] == pytest.approx(1 - 0.75 * (1 - eps), rel=1e-15)
    assert r.summary()["weigh_calls"] == 5
    assert r.summary()["ramp"] == 0.75
    assert r.stats[1].count == 4                                # the reliable unit entered
    assert r.gain_stats[1].count == 5                           # both gains lie inside the band


# --- a straightforward numpy oracle for streams of batches ----------------------------------------------------
def oracle(batches, alpha=1.0, p=5.0, warmup=30, min_count=2, max_g=8, mode="resure", upd="reliable",
           stats="welford", window=256, over="all"):
    hist = defaultdict(list)
    seen = 0
    out = []

    def mu_sigma(h):
        h = np.array(h[-window:] if stats in ("window", "mad") else h)
        if stats == "mad":
            med = np.median(h)
            return len(h), med, 1.4826 * np.median(np.abs(h - med))
        return len(h), np.mean(h), np.std(h, ddof=1)

    for l, g in batches:
        g = np.ones_like(g) if mode == "global" else g if max_g is None else np.minimum(g, max_g)
        fin = np.isfinite(l)
        taus = {}
        for b in set(g.tolist()):
            n, m, s = mu_sigma(hist[b]) if len(hist[b]) >= 2 else (len(hist[b]), 0, 0)
            taus[b] = m + alpha * s if n >= min_count else np.inf
        tau = np.array([taus[b] for b in g.tolist()])
        flag = fin & (l > tau) & (seen >= warmup) & (mode != "sft")
        w = np.where(fin, 1.0, 0.0)
        if flag.any() and mode == "hard":
            w[flag] = 0.0
        elif flag.any():
            w[flag] = np.exp(-(l[flag] - tau[flag]) / tau[flag])
            pool = w[fin] if over == "all" else w[flag]
            w[flag] = np.maximum(w[flag], np.percentile(pool, p))
        for i in np.flatnonzero(fin):
            if not flag[i] or upd == "all":
                hist[g[i]].append(l[i])
            elif upd == "winsorized":
                hist[g[i]].append(tau[i])
        seen += int(fin.sum())
        out.append((w, flag, tau))
    return out


def stream(seed, n_batches=25, nonfinite=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        n = int(rng.integers(1, 25))
        l = rng.lognormal(0.0, 0.4, n) + 1.5 * (rng.random(n) < 0.2)
        if nonfinite:
            l[rng.random(n) < 0.1] = rng.choice([np.nan, np.inf, -np.inf])
        out.append((l, rng.integers(1, 11, n)))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode,upd,stats", [("resure", "reliable", "welford"), ("resure", "winsorized", "welford"),
                                            ("resure", "all", "mad"), ("global", "reliable", "welford"),
                                            ("hard", "winsorized", "window"), ("sft", "reliable", "welford")])
def test_stream_matches_numpy_oracle(seed, mode, upd, stats):
    batches = stream(seed, nonfinite=seed % 2 == 1)
    cap = None if seed % 2 == 0 else 8  # the paper: one group per turn depth; or deeper turns share group 8
    r = ReSURE(warmup_samples=30, ramp_steps=0, mode=mode, stats_update=upd, stats=stats, window=40,
               max_turn_groups=cap)
    for (l, g), (w_ref, f_ref, tau_ref) in zip(batches, oracle(batches, mode=mode, upd=upd, stats=stats, window=40,
                                                               max_g=cap)):
        w, f = r.weigh(l, g)
        assert f.tolist() == f_ref.tolist()
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode,upd,stats", [("resure", "reliable", "welford"), ("resure", "all", "mad"),
                                            ("global", "winsorized", "window")])
def test_stream_floor_over_flagged_matches_numpy_oracle(seed, mode, upd, stats):
    batches = stream(50 + seed, nonfinite=seed % 2 == 1)
    r = ReSURE(warmup_samples=30, ramp_steps=0, mode=mode, stats_update=upd, stats=stats, window=40,
               max_turn_groups=8, floor_over="flagged")
    ref = oracle(batches, mode=mode, upd=upd, stats=stats, window=40, over="flagged")
    flagged = 0
    for (l, g), (w_ref, f_ref, _) in zip(batches, ref):
        w, f = r.weigh(l, g)
        assert f.tolist() == f_ref.tolist()
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-13)
        flagged += int(f.sum())
    assert flagged > 0


@pytest.mark.parametrize("seed", range(20))
def test_properties(seed):
    batches = stream(100 + seed, n_batches=20)
    r = ReSURE(warmup_samples=20, ramp_steps=0, max_turn_groups=8)
    for l, g in batches:
        before = json.dumps(r.stats.state_dict())
        taus = np.array([r.tau(b) for b in np.minimum(g, 8)])
        w, f = r.weigh(l, g)
        assert (w > 0).all()                                                  # weights in (0, 1]
        assert (w <= 1).all()
        assert (w[~f] == 1.0).all()                                           # reliable units: exactly 1
        assert (l[f] > taus[f]).all()
        assert r.summary()["warmup"] or (l[~f] <= taus[~f]).all()
        # flagged units never change the statistics: the batch without them gives the same estimator states
        other = ReSURE(warmup_samples=0, ramp_steps=0)
        other.stats.load_state_dict(json.loads(before))
        for b, x in zip(np.minimum(g[~f], 8), l[~f]):
            other.stats.update(b, x)
        assert other.stats.state_dict() == r.stats.state_dict()
        if f.any():                                                           # the floor lifts exactly the
            raw = np.where(f, np.exp(-(l - taus) / np.where(f, taus, 1)), 1.0)  # weights below the percentile
            eps = np.percentile(raw, 5.0)
            np.testing.assert_array_equal(w[f], np.where(raw[f] < eps, eps, raw[f]))   # bitwise


def test_ramp_is_linear_over_steps():
    batches = stream(7, n_batches=12)
    full = ReSURE(warmup_samples=20, ramp_steps=0)
    ramped = ReSURE(warmup_samples=20, ramp_steps=5)
    s = 0
    for l, g in batches:
        w0, f0 = full.weigh(l, g)
        w, f = ramped.weigh(l, g)
        assert f.tolist() == f0.tolist()
        assert ramped.stats.state_dict() == full.stats.state_dict()
        if ramped.summary()["warmup"]:
            assert (w == 1).all()
            continue
        rr = min(1.0, (s + 1) / 5)
        assert ramped.summary()["ramp"] == rr
        np.testing.assert_allclose(w, 1 - rr * (1 - w0), rtol=0, atol=1e-15)
        s += 1
    assert s >= 6


def test_warmup_min_count_and_group_cap():
    r = ReSURE(warmup_samples=20, ramp_steps=0, min_count=3, max_turn_groups=4)
    for _ in range(3):                                              # before: 0, 8, 16 seen < 20: warm-up batches
        w, f = r.weigh([0.1] * 4 + [100.0] * 4, [1, 1, 2, 2, 5, 6, 9, 4])
        assert (w == 1).all()
        assert not f.any()
        assert r.summary()["warmup"]
    assert sorted(r.stats.groups) == [1, 2, 4]
    assert r.stats[4].count == 12                                   # groups >= 4 share group 4
    w, f = r.weigh([5.0, 5.0, 5.0, 500.0], [1, 3, 3, 7])            # group 3 has no values: reliable
    assert f.tolist() == [True, False, False, True]                 # tau_1 = 0.1, tau_4 = 100
                                                                    # group 3 now has 2 < min_count values
    assert r.weigh([50.0], [3])[1].tolist() == [False]
    assert r.weigh([500.0], [3])[1].tolist() == [True]              # 3 values: judged


def test_nonfinite_losses_weight_zero_counted_never_in_stats():
    clean = stream(3, n_batches=15)
    a = ReSURE(warmup_samples=20, ramp_steps=0)
    b = ReSURE(warmup_samples=20, ramp_steps=0)
    bad_total = 0
    for l, g in clean:
        wa, fa = a.weigh(l, g)
        l2 = np.concatenate([[np.nan], l, [np.inf, -np.inf]])
        g2 = np.concatenate([[1], g, [2, 3]])
        wb, fb = b.weigh(l2, g2)
        bad_total += 3
        assert wb[[0, -2, -1]].tolist() == [0.0, 0.0, 0.0]
        assert not fb[[0, -2, -1]].any()
        np.testing.assert_array_equal(wb[1:-2], wa)               # the floor's percentile ignores them too
        assert b.summary()["nonfinite"] == 3
        assert b.summary()["nonfinite_total"] == bad_total
    assert a.stats.state_dict() == b.stats.state_dict()
    assert a.seen == b.seen


def test_bad_input_raises_one_line_errors():
    r = ReSURE()
    for args, msg in [(([0.1, -0.2], [1, 1]), "unit 1 has negative loss"), (([0.1], [1, 2]), "1 losses but 2 groups"),
                      (([0.1, 0.2], [1, 0]), "unit 1 has turn group 0"), (([[0.1]], [1]), "must be 1-D"),
                      (([0.1], [1.5]), "must be integers")]:
        with pytest.raises(ReSUREError, match=msg) as e:
            r.weigh(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown statistic"):
        ReSURE(stats="median")
    with pytest.raises(ValueError, match="stats_kind: checkpoint 'welford' vs now 'ema'"):
        ReSURE(stats="ema").load_state_dict(ReSURE().state_dict())


@pytest.mark.parametrize("setting,value,msg", [
    ("mode", "soft", "mode must be one of"),
    ("stats_update", "some", "stats_update must be one of"),
    ("floor_over", "reliable", "floor_over must be one of \\('all', 'flagged'\\), got 'reliable'"),
    ("floor_percentile", 101, "floor_percentile must be in \\[0, 100\\], got 101.0"),
    ("min_count", 1, "min_count must be >= 2, got 1"),
    ("max_turn_groups", -1, "max_turn_groups must be >= 1"),
    ("ramp_steps", -1, "ramp_steps must be >= 0"),
    ("warmup_samples", -5, "warmup_samples must be >= 0"),
    ("alpha", -0.5, "alpha must be >= 0, got -0.5"),
    ("gain_alpha", -1, "gain_alpha must be >= 0")])
def test_bad_setting_is_named_in_one_line(setting, value, msg):
    with pytest.raises(ReSUREError, match=msg) as e:
        ReSURE(**{setting: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stats,upd", [("welford", "reliable"), ("ema", "winsorized"), ("window", "all"),
                                       ("mad", "all")])
def test_state_round_trip_is_exact(stats, upd):
    kw = dict(stats=stats, stats_update=upd, warmup_samples=20, ramp_steps=7, ema_decay=0.1, window=32)
    batches = stream(11, n_batches=20, nonfinite=True)
    a = ReSURE(**kw)
    for l, g in batches[:10]:
        a.weigh(l, g)
    b = _round_trip(a, **kw)
    assert b.state_dict() == a.state_dict()
    json.dumps(a.state_dict(), allow_nan=False)                                   # strict JSON
    json.dumps(a.summary(), allow_nan=False)
    for l, g in batches[10:]:
        wa, fa = a.weigh(l, g)
        wb, fb = b.weigh(l, g)
        assert wa.tobytes() == wb.tobytes()
        assert fa.tolist() == fb.tolist()
    assert json.dumps(a.state_dict()) == json.dumps(b.state_dict())
    assert a.summary() == b.summary()
    # train.py's skipped-step rollback: state_dict() is a snapshot (later weigh calls do not reach into it), and
    # loading it undoes those calls exactly, so the next step weighs as if the skipped one never happened
    snap, before = a.state_dict(), json.dumps(a.state_dict())
    for l, g in batches[:3]:
        a.weigh(l, g)
    assert json.dumps(snap) == before
    assert json.dumps(a.state_dict()) != before
    a.load_state_dict(snap)
    assert json.dumps(a.state_dict()) == before
    l, g = batches[5]
    assert a.weigh(l, g)[0].tobytes() == b.weigh(l, g)[0].tobytes()


def test_records():
    r = _worked(record=True)
    r.weigh(B1_L, B1_G, ids=np.arange(100, 110), turns=torch.arange(10))
    rec = r.pop_records()
    assert len(rec) == 10
    assert r.pop_records() == []
    assert rec[6] == {"call": 1, "sample": 106, "turn": 6, "group": 2, "loss": 30.0, "tau": pytest.approx(6.0),
                      "weight": pytest.approx(EPS1), "flagged": True, "warmup": False, "view": "loss"}
    json.dumps(rec)
    w = ReSURE(warmup_samples=12, record=True)  # warm-up: units seen before a batch < 12
    w.weigh(B1_L, B1_G)
    w.weigh(B1_L, B1_G)
    w.weigh(B1_L, B1_G)
    assert [r["warmup"] for r in w.pop_records()] == [True] * 20 + [False] * 10


# --- units and Eq. 1 --------------------------------------------------------------------------------------------
def _batch(seed, B=4, T=20, V=11):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    turn_ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):                                           # turns: prompt then answer, repeated
        cuts = sorted(torch.randperm(T - 1, generator=g)[:6].add(1).tolist())
        for k, (s, e) in enumerate(zip(cuts[0::2], cuts[1::2] + [T])):
            turn_ids[b, s:e] = k + 1
        labels[b][turn_ids[b] == 0] = -100
        labels[b][torch.rand(T, generator=g) < 0.2] = -100
    labels[-1] = -100                                            # a dialogue with no supervised token
    labels[0, 0], turn_ids[0, 0] = 3, 1                          # position 0 predicts nothing: ignored
    tl = torch.rand(B, T, generator=g, dtype=torch.float32).mul(3).masked_fill(labels == -100, 0.0)
    return tl.requires_grad_(), labels, turn_ids, torch.arange(1, B + 1) * 2


def _units_reference(tl, labels, turn_ids, groups, unit):
    out = []
    for b in range(labels.shape[0]):
        sup = labels[b] != -100
        sup[0] = False                                           # position 0 has no prediction
        if unit == "dialogue" and sup.any():
            out.append((tl[b][sup].double().mean().item(), int(groups[b]), int(sup.sum()), b, 0))
        if unit == "turn":
            for k in sorted(set(turn_ids[b][sup].tolist())):
                m = sup & (turn_ids[b] == k)
                out.append((tl[b][m].double().mean().item(), k, int(m.sum()), b, k))
    return out


@pytest.mark.parametrize("unit", ["dialogue", "turn"])
@pytest.mark.parametrize("seed", range(3))
def test_unit_losses_match_loop_reference(unit, seed):
    tl, labels, turn_ids, groups = _batch(seed)
    losses, g, tok, si, turn = resure.unit_losses(tl, labels, turn_ids, groups, unit)
    ref = _units_reference(tl, labels, turn_ids, groups, unit)
    assert len(ref) > 0
    assert len(losses) == len(ref)
    np.testing.assert_allclose(losses.detach().double().numpy(), [x[0] for x in ref], rtol=1e-6)
    assert g.tolist() == [x[1] for x in ref]
    assert tok.tolist() == [x[2] for x in ref]
    assert si.tolist() == [x[3] for x in ref]
    assert turn.tolist() == [x[4] for x in ref]
    units, tokens = resure.count_units(labels, turn_ids, unit)
    assert units == len(ref)
    assert tokens == int((labels[:, 1:] != -100).sum())
    losses.sum().backward()                                      # d(sum of unit means)/d token = 1/n_tokens
    expect = torch.zeros_like(tl)
    for (_, _, n, b, k) in ref:
        m = (labels[b] != -100) & ((turn_ids[b] == k) if unit == "turn" else True)
        m[0] = False
        expect[b][m] = 1.0 / n
    torch.testing.assert_close(tl.grad, expect)


def test_nonfinite_token_does_not_poison_other_turns():
    tl, labels, turn_ids, groups = _batch(0)
    tl = tl.detach().clone()
    b, t = (labels[:, 1:] != -100).nonzero()[0].tolist()
    t += 1
    tl[b, t] = float("inf")
    losses, _, _, si, turn = resure.unit_losses(tl, labels, turn_ids, groups, "turn")
    bad = (si == b) & (turn == turn_ids[b, t])
    assert torch.isinf(losses[bad]).all()
    assert torch.isfinite(losses[~bad]).all()


def test_unit_losses_rejects_supervised_token_without_turn():
    tl, labels, turn_ids, groups = _batch(1)
    b, t = (labels[:, 1:] != -100).nonzero()[0].tolist()
    t += 1
    turn_ids[b, t] = 0
    with pytest.raises(ReSUREError, match=f"sample {b} of the batch has a supervised token with turn id < 1"):
        resure.unit_losses(tl, labels, turn_ids, groups, "turn")


@pytest.mark.parametrize("norm", ["sample", "token"])
def test_reweighted_loss_is_eq1_with_constant_weights(norm):
    l = torch.tensor([0.5, 2.0, 1.0, float("nan")], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([3, 5, 2, 4])
    w = torch.tensor([1.0, 0.25, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    loss = resure.reweighted_loss(l, n, w, norm=norm, total_units=10, total_tokens=40)
    if norm == "sample":                                          # (1*0.5 + 0.25*2 + 0.5*1) / 10
        value = 1.5 / 10
        grad = [1 / 10, 0.25 / 10, 0.5 / 10, 0]
    else:                                                         # (1*0.5*3 + 0.25*2*5 + 0.5*1*2) / 40
        value = 5.0 / 40
        grad = [3 / 40, 0.25 * 5 / 40, 0.5 * 2 / 40, 0]
    assert loss.item() == pytest.approx(value, rel=1e-15)
    loss.backward()
    assert l.grad.tolist() == pytest.approx(grad, rel=1e-15)
    assert w.grad is None                                         # the weights are constants
    ddp = resure.reweighted_loss(l, n, w.detach().numpy(), norm=norm, total_units=10, total_tokens=40, world_size=2)
    assert ddp.item() == pytest.approx(2 * value, rel=1e-15)
    default = resure.reweighted_loss(l, n, [1.0, 1.0, 1.0, 0.0], norm=norm)
    assert default.item() == pytest.approx(3.5 / 4 if norm == "sample" else (1.5 + 10 + 2) / 14, rel=1e-15)


def test_gather_without_distributed_is_a_copy():
    l = torch.tensor([0.5, 1.5])
    g = np.array([1, 2])
    t = [3, 4]
    losses, groups, tokens, offsets = gather(l, g, t)
    assert losses.dtype == np.float64
    assert groups.dtype == np.int64
    assert tokens.dtype == np.int64
    assert groups.tolist() == [1, 2]
    assert tokens.tolist() == [3, 4]
    assert offsets.tolist() == [0, 2]
    l[0] = 9.0                    # the inputs change, the gathered copy does not
    g[0] = 9
    t[0] = 9
    assert losses.tolist() == [0.5, 1.5]
    assert groups.tolist() == [1, 2]
    assert tokens.tolist() == [3, 4]
    assert [x.tolist() for x in gather(l)] == [[9.0, 1.5], [0, 2]]  # losses alone
    assert all_reduce_sum(3, 4) == (3, 4)


@pytest.mark.parametrize("values,column,msg", [
    ([0.5, 1.5], [1, 2, 3], "gather: every column needs one value per unit \\(2 units\\)"),
    ([0.5, 1.5], [1, 2.5], "gather: column 1 must be integers, got float64 values such as 2.5"),
    ([0.5, 1.5], [[1, 2]], "gather: column 1 must be 1-D, got shape \\(1, 2\\)"),
    ([[[0.5]]], [1], "gather: values must be 1-D or 2-D, got shape \\(1, 1, 1\\)")])
def test_gather_refuses_a_bad_column_in_one_line(values, column, msg):
    with pytest.raises(GatherError, match=msg) as e:
        gather(values, column)
    assert "\n" not in str(e.value)


def test_prefilter():
    scores = [3.0, 1.0, np.nan, 1.0, 0.5, 9.0, 2.0, 1.0]
    assert resure.prefilter(scores, keep=0.75).tolist() == [0, 1, 3, 4, 6, 7]     # round(6.0) = 6 lowest
    assert resure.prefilter(scores, keep=0.25).tolist() == [1, 4]                 # tie at 1.0: index 1 first
    assert resure.prefilter(scores, keep=1.0).tolist() == list(range(8))
    with pytest.raises(ValueError, match="keep must be in"):
        resure.prefilter(scores, keep=0)


# --- 2 gloo processes == 1 process ---------------------------------------------------------------------------------
V, D, BL, T = 13, 6, 3, 16
CONFIGS = [dict(stats="welford", stats_update="reliable", unit="turn", norm="token"),
           dict(stats="ema", stats_update="winsorized", unit="dialogue", norm="sample"),
           dict(stats="mad", stats_update="all", unit="turn", norm="sample", mode="hard")]


def _shard(cfg_i, micro, rank):
    tl, labels, turn_ids, groups = _batch(1000 * cfg_i + 10 * micro + rank, B=BL, T=T, V=V)
    if rank == 1 and micro == 0:
        labels[1:] = -100                                         # ranks hold different numbers of units
    ids = torch.randint(0, V, (BL, T), generator=torch.Generator().manual_seed(7 + micro + 100 * rank))
    return ids, labels, turn_ids, groups


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Tanh(), torch.nn.Linear(D, V))


def _token_losses(m, ids, labels):
    logits = m(ids)
    return torch.nn.functional.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100,
                                             reduction="none").view(labels.shape)


def _resure(cfg):
    r = ReSURE(warmup_samples=4, ramp_steps=0, ema_decay=0.2, window=8, stats=cfg["stats"],
               stats_update=cfg["stats_update"], mode=cfg.get("mode", "resure"))
    r.warmup_from(np.array([1.5, 2.5, 2.0, 3.0, 2.2, 2.8, 2.6, 2.4]), np.array([1, 1, 2, 2, 3, 3, 4, 4]))
    return r


def _run(world, rank, micro=3):
    torch.set_num_threads(1)
    results = []
    for ci, cfg in enumerate(CONFIGS):
        model = _model()
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        r = _resure(cfg)
        ranks = [rank] if world > 1 else [0, 1]                   # one process holds both ranks' shards
        shards = [[_shard(ci, m, k) for k in ranks] for m in range(micro)]
        units = tokens = 0
        for m in range(micro):
            for ids, labels, turn_ids, groups in shards[m]:
                u, n = resure.count_units(labels, turn_ids, cfg["unit"])
                units, tokens = units + u, tokens + n
        units, tokens = all_reduce_sum(units, tokens)
        weights = []
        for m in range(micro):
            parts = [resure.unit_losses(_token_losses(net, ids, labels), labels, turn_ids, groups, cfg["unit"])
                     for ids, labels, turn_ids, groups in shards[m]]
            lu, gu, tu = (torch.cat([p[i] for p in parts]) for i in range(3))
            g_l, g_g, g_t, offsets = gather(lu, gu, tu)
            w, f = r.weigh(g_l, g_g)
            weights.append((w, f))
            mine = slice(offsets[rank], offsets[rank + 1])
            assert np.array_equal(g_l[mine], lu.detach().double().numpy())
            assert np.array_equal(g_g[mine], gu.numpy())
            assert np.array_equal(g_t[mine], tu.numpy())
            sync = net.no_sync() if world > 1 and m < micro - 1 else nullcontext()
            with sync:
                resure.reweighted_loss(lu, tu, w[mine], cfg["norm"], units, tokens, world).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append(dict(weights=weights, state=json.dumps(r.state_dict()), grads=grads))
    return results


def _worker(rank, world, tmp):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    try:
        torch.save(_run(world, rank), os.path.join(tmp, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        gc.collect()            # the DDP reducers (in reference cycles) go before the group, as in runs.teardown
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    try:
        ref = _run(1, 0)
    finally:
        torch.set_num_threads(threads)
    flagged = 0
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for g, e in zip(got, ref):
            for (wg, fg), (we, fe) in zip(g["weights"], e["weights"]):
                assert wg.tobytes() == we.tobytes()                                    # bitwise
                assert fg.tolist() == fe.tolist()
                flagged += int(fe.sum())
            assert g["state"] == e["state"]                                            # bitwise (JSON repr)
            rel = (g["grads"] - e["grads"]).norm() / e["grads"].norm()
            assert rel < 1e-6
    assert flagged > 0                                                                 # the test reweights


# --- lag and collapse ------------------------------------------------------------------------------------------
SIM = dict(warmup_samples=32, ramp_steps=0, alpha=1.0, floor_percentile=5.0)   # 2 warm-up steps, no ramp


def simulate(stats, upd, clean_fn, steps, seed, B=16, outlier=1.0, p_out=0.2, noise=0.05):
    """Units in 2 turn groups; clean = clean_fn(t) + N(0, noise) (clipped at 0); 20% outliers at clean + 1.0."""
    rng = np.random.default_rng(seed)
    r = ReSURE(stats=stats, stats_update=upd, **SIM)
    out, warnings = [], []
    for t in range(steps):
        bad = rng.random(B) < p_out
        l = np.maximum(clean_fn(t) + noise * rng.standard_normal(B), 0.0) + outlier * bad
        w, f = r.weigh(l, rng.integers(1, 3, B))
        out.append((bad, f))
        warnings += r.warnings()
    return out, warnings, r


def rates(out, start):
    bad = np.concatenate([b for b, _ in out[start:]])
    f = np.concatenate([f for _, f in out[start:]])
    return f[bad].mean(), f[~bad].mean()            # outlier recall, clean units flagged


def falling(t):
    return 2.0 * math.exp(-t / 40) + 0.2


@pytest.mark.parametrize("stats,upd", [("ema", "winsorized"), ("mad", "all")])
def test_falling_stream_alternatives_track(stats, upd):
    for seed in range(3):                             # late = the last 100 of 300 steps
        out, warnings, _ = simulate(stats, upd, falling, 300, seed)
        recall, clean = rates(out, 200)
        assert recall >= 0.9, (seed, recall, clean)
        assert clean <= 0.2, (seed, recall, clean)
        assert warnings == []


def test_falling_stream_default_lags():
    recalls = []
    for seed in range(3):
        out, warnings, r = simulate("welford", "reliable", falling, 300, seed)
        recalls.append(rates(out, 200)[0])
        assert rates(out, 200)[1] == 0.0
        assert any("(lag)" in w for w in warnings)   # early on, nothing flagged while losses fall under mu
    # Measured: 0.47-0.60 of the late outliers caught (20 seeds, 1 group: mean 0.52, range 0.41-0.66), because
    # cumulative tau only crosses the outlier level (~1.21) around step 250. "Under half" of the last 100 steps
    # is not robust; what holds is that the default catches far fewer than the tracking estimators (>= 0.9).
    assert np.mean(recalls) < 0.75, recalls
    out, _, _ = simulate("welford", "reliable", falling, 150, 0)
    assert rates(out, 100)[0] < 0.1                  # steps 100-149: cumulative tau is still above the outliers


def test_falling_stream_second_half_numbers():
    """The default against the tracking estimators with "late" = the second half of the run (steps
    150-299), mean over 5 seeds.
    Measured over 10 seeds: default 0.37 of the outliers caught (0.23-0.57 per seed); (ema, winsorized) and
    (mad, all) 1.00, flagging at most 0.17 and 0.05 of the clean units."""
    caught = {}
    for stats, upd in [("welford", "reliable"), ("ema", "winsorized"), ("mad", "all")]:
        res = [rates(simulate(stats, upd, falling, 300, seed)[0], 150) for seed in range(5)]
        caught[stats] = np.mean([r for r, _ in res])
        if stats != "welford":
            assert min(r for r, _ in res) >= 0.9, (stats, res)
            assert max(c for _, c in res) <= 0.2, (stats, res)
    assert caught["welford"] < 0.5, caught


def test_lag_warning_on_a_clean_falling_stream():
    out, warnings, r = simulate("welford", "reliable", falling, 100, 0, p_out=0.0)
    assert len(warnings) == 1
    assert "(lag)" in warnings[0]
    assert "--stats ema --stats-update winsorized" in warnings[0]
    assert r.counters.flagged_total == 0


@pytest.mark.parametrize("stats,upd", [("ema", "winsorized"), ("mad", "all"), ("ema", "reliable")])
def test_stationary_stream(stats, upd):
    out, warnings, r = simulate(stats, upd, lambda t: 1.0, 2000, 0, noise=0.1)
    clean = [rates(out[s:s + 500], 0)[1] for s in range(0, 2000, 500)]
    if upd == "reliable":                             # exclusion truncates the statistics: collapse
        assert clean[-1] > 0.5, clean
        assert sum("(collapse)" in w for w in warnings) == 1
        assert "--stats mad --stats-update all" in warnings[0]
    else:
        assert max(clean) <= 0.2, clean
        assert rates(out, 0)[0] >= 0.99
        assert warnings == []


def test_stationary_stream_paper_row():
    """docs/method.md's collapse table, the paper's row (welford, reliable): 40-43 % of the clean
    units flagged in the last 500 of 2000 steps, the share still rising (seeds 0-2 give 0.399,
    0.428, 0.406); under half, so no collapse warning."""
    for seed in range(3):
        out, warnings, _ = simulate("welford", "reliable", lambda t: 1.0, 2000, seed, noise=0.1)
        clean = [rates(out[s:s + 500], 0)[1] for s in range(0, 2000, 500)]
        assert 0.395 <= clean[-1] <= 0.435, (seed, clean)
        assert clean == sorted(clean), (seed, clean)
        assert warnings == []


# --- the ramp counts optimizer steps, not micro-batches --------------------------------------------------------
def test_ramp_moves_once_per_optimizer_step():
    """With grad accumulation 3, three weigh() calls make one optimizer step: r = s / ramp_steps for the s-th step
    after the warm-up, whichever micro-batch the warm-up ended in."""
    batches = stream(5, n_batches=30)
    r = ReSURE(warmup_samples=25, ramp_steps=4)
    seen_r, step = [], 0
    for i, (l, g) in enumerate(batches):
        r.weigh(l, g, new_step=i % 3 == 0)
        if not r.summary()["warmup"]:
            seen_r.append((i // 3, r.summary()["ramp"]))
    first = seen_r[0][0]  # the optimizer step in which the warm-up ended counts as step 1
    for step, ramp in seen_r:
        assert ramp == min(1.0, (step - first + 1) / 4), (step, ramp)
    assert seen_r[-1][1] == 1.0
    assert len({s for s, _ in seen_r}) >= 5


# --- the context-gain view against a numpy oracle ---------------------------------------------------------------
def gain_oracle(batches, alpha=1.0, gain_alpha=2.0, p=5.0, warmup=30, upd="reliable"):
    """Loss view as in oracle(); gain view: per group mean -+ gain_alpha * std (ddof 1) of the gains that view
    judged reliable; a flagged gain weighs exp(-d / h) (d: distance outside the band, h: its half-width); a unit
    weighs the lower of the two; the floor applies to every flagged unit."""
    hl = defaultdict(list)
    hg = defaultdict(list)
    seen = 0
    out = []

    def ms(h):
        return (np.mean(h), np.std(h, ddof=1)) if len(h) >= 2 else None

    for l, g, x in batches:
        fin = np.isfinite(l)
        tau = np.array([ms(hl[b])[0] + alpha * ms(hl[b])[1] if ms(hl[b]) else np.inf for b in g.tolist()])
        lo = np.array([ms(hg[b])[0] - gain_alpha * ms(hg[b])[1] if ms(hg[b]) else -np.inf for b in g.tolist()])
        hi = np.array([ms(hg[b])[0] + gain_alpha * ms(hg[b])[1] if ms(hg[b]) else np.inf for b in g.tolist()])
        on = seen >= warmup
        fl = fin & (l > tau) & on
        fg = fin & ((x < lo) | (x > hi)) & on
        w = np.where(fin, 1.0, 0.0)
        w[fl] = np.exp(-(l[fl] - tau[fl]) / tau[fl])
        d = np.maximum(lo - x, x - hi)
        h = (hi - lo) / 2
        w[fg] = np.minimum(w[fg], np.exp(-d[fg] / h[fg]))
        f = fl | fg
        if f.any():
            w[f] = np.maximum(w[f], np.percentile(w[fin], p))
        for i in np.flatnonzero(fin):
            for hist, flag, v, clip in ((hl, fl, l, tau), (hg, fg, x, np.clip(x, lo, hi))):
                if not flag[i] or upd == "all":
                    hist[g[i]].append(v[i])
                elif upd == "winsorized":
                    hist[g[i]].append(clip[i])
        seen += int(fin.sum())
        out.append((w, f, fl, fg))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("upd", ["reliable", "winsorized", "all"])
def test_gain_view_matches_numpy_oracle(seed, upd):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(25):
        n = int(rng.integers(2, 20))
        l = rng.lognormal(0.0, 0.3, n) + 1.5 * (rng.random(n) < 0.1)
        x = rng.normal(0.6, 0.2, n) + rng.choice([0.0, 2.0, -1.5], n, p=[0.8, 0.1, 0.1])  # echoes / off-topic
        batches.append((l, rng.integers(1, 4, n), x))
    r = ReSURE(warmup_samples=30, ramp_steps=0, gain_alpha=2.0, stats_update=upd, record=True)
    for (l, g, x), (w_ref, f_ref, fl, fg) in zip(batches, gain_oracle(batches, upd=upd)):
        w, f = r.weigh(l, g, gains=x)
        assert f.tolist() == f_ref.tolist()
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-13)
        views = [rec["view"] for rec in r.pop_records()]
        assert views == [("loss+gain" if a and b else "loss" if a else "gain" if b else None) for a, b in zip(fl, fg)]
    assert r.counters.flagged_total > 0
    assert r.summary()["flagged_by_gain"] >= 0
    b = _round_trip(r, warmup_samples=30, ramp_steps=0, gain_alpha=2.0, stats_update=upd)
    assert json.dumps(b.state_dict()) == json.dumps(r.state_dict())  # the gain statistics are checkpointed too
    l, g, x = batches[3]
    assert r.weigh(l, g, gains=x)[0].tobytes() == b.weigh(l, g, gains=x)[0].tobytes()
    with pytest.raises(ReSUREError, match="3 losses but 2 gains"):
        r.weigh([1.0, 1.0, 1.0], [1, 1, 1], gains=[0.1, 0.2])
