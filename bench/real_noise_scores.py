"""What bench/real_noise.py measures of the detectors: how well the base model's scores separate
each noise kind from the clean turns (ROC AUC), how a run's flags match the injected labels at each
turn's first and last judged sighting, and a replay of ReSURE over a run's recorded (loss, gain)
stream with other settings."""
import json
import math
from pathlib import Path

import numpy as np

from real_noise_data import KINDS, BenchError
from resure import ReSURE
from unit_scores import score_units


# ------------------------------------------------------------------------------------------ scoring
def auc(pos, neg):
    """ROC AUC of a score separating pos from neg: P(pos > neg) + P(pos = neg) / 2, from the
    Mann-Whitney rank sum with average ranks for ties (nan when either side is empty or a score is
    not finite)."""
    pos = np.asarray(pos, np.float64).ravel()
    neg = np.asarray(neg, np.float64).ravel()
    if not len(pos) or not len(neg):
        return math.nan
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        return math.nan
    x = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average rank of each tie block
    rank_sum = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(rank_sum / (len(pos) * len(neg)))


def unit_labels(examples):
    """(sample, turn, kind) of every turn unit of examples, in train.score_units' order; kind
    "clean" for a clean turn."""
    rows = []
    for s, e in enumerate(examples):
        kinds = e["meta"].get("noise_type") or [None] * e["n_turns"]
        noisy = e["meta"].get("noisy") or [False] * e["n_turns"]
        for t in range(1, e["n_turns"] + 1):
            rows.append((s, t, kinds[t - 1] if noisy[t - 1] else "clean"))
    return rows


def base_scores(net, template, examples, batch_size=8):
    """Per turn unit of examples (built with free=True): the base model's loss and context gain,
    exactly as train.py scores them, with their labels. Returns a dict of aligned lists."""
    losses, groups, gains = score_units(net, template, examples, "turn", "fp32", batch_size)
    rows = unit_labels(examples)
    if len(rows) != len(losses) or gains is None:
        raise BenchError(f"{len(losses)} scored units for {len(rows)} turns (or no context gains)")
    return {"sample": [r[0] for r in rows], "turn": [r[1] for r in rows],
            "group": groups.tolist(), "kind": [r[2] for r in rows], "loss": losses.tolist(),
            "gain": gains.tolist()}


def detectability(scores, kinds=KINDS):
    """Per noise kind: n, median loss / gain, and the AUC against clean turns of loss, -gain and
    gain."""
    kind = np.array(scores["kind"])
    loss = np.array(scores["loss"])
    gain = np.array(scores["gain"])
    clean = kind == "clean"
    out = {"clean": {"n": int(clean.sum()), "loss_median": float(np.median(loss[clean])),
                     "gain_median": float(np.median(gain[clean]))}}
    for k in kinds:
        m = kind == k
        if not m.any():
            continue
        out[k] = {"n": int(m.sum()), "loss_median": float(np.median(loss[m])),
                  "gain_median": float(np.median(gain[m])),
                  "auc_loss": auc(loss[m], loss[clean]),
                  "auc_gain_low": auc(-gain[m], -gain[clean]),
                  "auc_gain_high": auc(gain[m], gain[clean])}
    return out


# ----------------------------------------------------------------------------------------- flagging
def read_units(out):
    """units.jsonl of a run without the records of skipped steps (train.py undid those)."""
    with open(Path(out) / "units.jsonl") as f:
        return [r for r in map(json.loads, f) if not r["skipped"]]


def sightings(records):
    """(first, last) judged record of every (sample, turn): warm-up records judge nothing."""
    first = {}
    last = {}
    for r in records:
        if r["warmup"]:
            continue
        key = (r["sample"], r["turn"])
        first.setdefault(key, r)
        last[key] = r
    return first, last


def label_of(examples):
    """(sample, turn) -> noise kind or "clean", from the examples exactly as train.py built them."""
    return {(s, t): k for s, t, k in unit_labels(examples)}


def in_view(r, view):
    if view is None:
        return r["flagged"]
    return view in (r.get("view") or "").split("+")


def ratio(a, b):
    return a / b if b else math.nan


def flag_table(recs, labels, view=None, kinds=KINDS):
    """Flag quality of one view over one sighting per unit (recs: (sample, turn) -> record).
    Overall: precision, recall, the clean turns' flag rate; per kind: recall, precision against the
    clean turns alone (tp / (tp + fp): the precision if this were the only kind of noise), mean
    weight."""
    kind = np.array([labels[k] for k in recs])
    flag = np.array([in_view(r, view) for r in recs.values()], bool)
    weight = np.array([r["weight"] for r in recs.values()])
    clean = kind == "clean"
    fp = int((flag & clean).sum())
    tp = int((flag & ~clean).sum())
    noisy = int((~clean).sum())
    clean_weight = float(weight[clean].mean()) if clean.any() else math.nan
    out = {"units": len(kind), "noisy": noisy, "flagged": int(flag.sum()), "tp": tp,
           "precision": ratio(tp, tp + fp), "recall": ratio(tp, noisy),
           "clean_flag_rate": ratio(fp, int(clean.sum())), "clean_weight": clean_weight,
           "by_kind": {}}
    for k in kinds:
        m = kind == k
        if m.any():
            hit = int((flag & m).sum())
            out["by_kind"][k] = {"n": int(m.sum()), "flagged": hit, "recall": hit / m.sum(),
                                 "precision_vs_clean": ratio(hit, hit + fp),
                                 "weight": float(weight[m].mean())}
    return out


def first_sighting_auc(first, labels, key, kinds=KINDS):
    """AUC per noise kind of a recorded score (loss or gain) at each unit's first judged sighting.
    """
    kind = np.array([labels[k] for k in first])
    x = np.array([math.nan if r.get(key) is None else r[key] for r in first.values()], np.float64)
    clean = kind == "clean"
    return {k: {"auc": auc(x[kind == k], x[clean]), "auc_low": auc(-x[kind == k], -x[clean])}
            for k in kinds if (kind == k).any()}


def flagging(out, examples, gain):
    """Per view (any / loss / gain) and sighting (first / last) the flag table of one run's
    units.jsonl, and the first sighting's AUC of the recorded scores."""
    labels = label_of(examples)
    first, last = sightings(read_units(out))
    views = {"any": None, "loss": "loss"}
    if gain:
        views["gain"] = "gain"
    res = {v: {"first": flag_table(first, labels, view), "last": flag_table(last, labels, view)}
           for v, view in views.items()}
    res["auc_first_sighting"] = {"loss": first_sighting_auc(first, labels, "loss")}
    if gain:
        res["auc_first_sighting"]["gain"] = first_sighting_auc(first, labels, "gain")
    return res


# ------------------------------------------------------------------------------------------- replay
# (loss alpha, band below mu_g in sigma_g, band above, statistic); None: the loss view alone. "gain"
# is the core's context gain; "relative" the gain over the context-free NLL (the share of the
# reply's NLL the dialogue explains).
SWEEP = [(a, None, None, "gain") for a in (1.0, 1.5, 2.0)] + \
    [(1.0, b, b, "gain") for b in (1.0, 1.5, 2.0, 2.5, 3.0)] + \
    [(1.0, lo, hi, "gain") for lo, hi in ((1.0, 1.5), (1.0, 2.0), (1.0, 3.0))] + \
    [(1.5, 2.0, 2.0, "gain"), (1.5, 1.0, 2.0, "gain"), (2.0, 2.0, 2.0, "gain")] + \
    [(a, lo, hi, "relative") for a in (1.0, 1.5, 2.0) for lo, hi in ((2.0, 2.0), (1.5, 2.0),
                                                                    (1.0, 2.0))]


class Band(ReSURE):
    """ReSURE with the gain band mu_g - lo * sigma_g .. mu_g + hi * sigma_g (lo = hi: the core's own
    rule); replays only, to measure what a core change would flag."""

    def __init__(self, lo, hi, **kw):
        super().__init__(gain_alpha=hi, **kw)
        self.lo = lo

    def gain_band(self, b):
        est = self.gain_stats[b]
        if est.count < self.min_count:
            return -math.inf, math.inf
        return est.mean - self.lo * est.std, est.mean + self.gain_alpha * est.std


def relative(loss, gain):
    """The context gain as a share of the context-free NLL (loss + gain): 1 - NLL(reply | dialogue)
    / NLL(reply)."""
    return gain / (gain + loss)


def replay(records, plan, lo=None, hi=None, warm=None, alpha=1.0, stat="gain"):
    """ReSURE run again over a run's recorded (loss, gain) stream, one weigh call per optimizer step
    in order, with another loss alpha or gain band (lo, hi in sigma_g; None: the loss view alone),
    the statistics first filled from a clean warm-up set when warm = (losses, groups, gains) of its
    units under the base model. The flags are those the rule would raise on this trajectory (its own
    weights would have moved the trajectory a little). stat "relative": the band is put on
    relative(loss, gain) instead of the gain."""
    if stat == "relative":
        records = [dict(r, gain=None if r.get("gain") is None else relative(r["loss"], r["gain"]))
                   for r in records]
        if warm:
            warm = (warm[0], warm[1], [relative(x, g) for x, g in zip(warm[0], warm[2])])
    settings = dict(alpha=alpha, floor_percentile=5.0, warmup_samples=plan["warmup_samples"],
                    ramp_steps=plan["ramp_steps"], mode="resure", stats="ema",
                    stats_update="winsorized", record=True)
    rs = ReSURE(**settings) if hi is None else Band(lo, hi, **settings)
    if warm is not None:
        rs.warmup_from(*warm)
    out = []
    steps = {}
    for r in records:
        steps.setdefault(r["step"], []).append(r)
    for step in sorted(steps):
        rows = steps[step]
        gains = None
        if hi is not None:
            gains = [math.nan if r.get("gain") is None else r["gain"] for r in rows]
        losses = [math.nan if r["loss"] is None else r["loss"] for r in rows]
        rs.weigh(losses, [r["group"] for r in rows], ids=[r["sample"] for r in rows],
                 turns=[r["turn"] for r in rows], gains=gains)
        out += [dict(x, step=step) for x in rs.pop_records()]
    return out


def replay_sweep(out, examples, plan, warm, gain_alpha=2.0, settings=SWEEP):
    """Flag tables of the SWEEP settings replayed on a loss+gain run's stream, from the stream's own
    warm-up and from the clean warm-up set; and whether replaying the run's own setting reproduces
    its flags exactly."""
    recs = read_units(out)
    labels = label_of(examples)
    rows = {}
    for a, lo, hi, stat in settings:
        for w in ("stream", "clean"):
            start = warm if w == "clean" else None
            first, last = sightings(replay(recs, plan, lo, hi, start, a, stat))
            rows[f"alpha={a} band=-{lo}/+{hi} {stat} warmup={w}"] = {
                "alpha": a, "lo": lo, "hi": hi, "stat": stat, "warmup": w,
                "first": flag_table(first, labels), "last": flag_table(last, labels)}
    # the runs warm up on the clean set (--warmup-data)
    own = replay(recs, plan, gain_alpha, gain_alpha, warm)
    same = [(r["flagged"], r["view"]) for r in own] == [(r["flagged"], r["view"]) for r in recs]
    return {"reproduces_run": same, "rows": rows}
