"""ReSURE (arXiv 2508.19996, Sec. 3): down-weight supervision whose loss is unusually high for its turn depth.

Per turn group b a running estimator (welford.py) tracks the unit losses l (Eq. 1: a unit's mean token loss).
For one batch, with the statistics as they stood before it:
  tau_b = mu_b + alpha * sigma_b                                          (Eq. 5)
  l <= tau_b: reliable, w = 1, and l enters the statistics               (Eqs. 2-4: the conditional update)
  l >  tau_b: unreliable, w = max(eps, exp(-(l - tau_b) / tau_b))        (Eq. 6)
  eps = the floor_percentile-th percentile (numpy, linear) of the batch's weights before the floor
  l~ = w * l with w a constant (Eq. 7); the objective is the mean of l~ over the optimizer step's units.
Warm-up: a batch is a warm-up batch (every w = 1, every loss enters) while fewer than warmup_samples units were
seen before it, or the statistics come from a separate high-quality set (warmup_from, the paper's 640 samples);
a group with fewer than min_count values has no usable sigma, so its units are reliable.
Ramp (our reading of "gradually increased filtering weight"): in the s-th optimizer step after warm-up
(s = 1, 2, ...) w_eff = 1 - r * (1 - w) with r = min(1, s / ramp_steps); ramp_steps = 0: r = 1 at once.
Beyond the paper (README): modes sft (every w = 1), global (one group), hard (flagged w = 0); stats_update
winsorized (flagged units enter as tau) or all; other estimators (welford.py). Non-finite losses get w = 0, are
counted and never enter the statistics. Another weighting rule: edit weight_rule().
"""
import copy
import math

import numpy as np
import torch

from welford import GroupedStats

MODES, UPDATES = ("resure", "sft", "global", "hard"), ("reliable", "winsorized", "all")
FIX = "--stats ema --stats-update winsorized or --stats mad --stats-update all"


class ReSUREError(ValueError):
    pass


def weight_rule(l, tau):
    """Eq. 6 before the floor: the weight of units whose loss l exceeds their threshold tau (tau = 0 gives w = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tau > 0, np.exp(-(l - tau) / np.where(tau > 0, tau, 1.0)), 0.0)


def _np(x, dtype, name):
    if torch.is_tensor(x):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ReSUREError(f"resure: {name} must be 1-D, got shape {tuple(x.shape)}")
    if dtype == np.int64 and x.dtype.kind not in "iu" and x.size and not np.all(np.mod(x, 1) == 0):
        raise ReSUREError(f"resure: {name} must be integers, got {x.dtype} values such as {x[np.mod(x, 1) != 0][0]}")
    return x.astype(dtype)


def _num(x):  # JSON-safe float: None for nan/inf
    x = float(x)
    return x if math.isfinite(x) else None


class ReSURE:
    CONFIG = ("alpha", "floor_percentile", "warmup_samples", "ramp_steps", "min_count", "max_turn_groups", "mode",
              "stats_kind", "stats_update", "ema_decay", "window", "gain_alpha")
    COUNTERS = ("calls", "seen", "ramp_pos", "units_total", "flagged_total", "nonfinite_total", "lag_run",
                "collapse_run")

    def __init__(self, alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=50, min_count=2,
                 max_turn_groups=None, mode="resure", stats="welford", stats_update="reliable", ema_decay=0.05,
                 window=256, gain_alpha=None, warn_steps=20, record=False):
        if mode not in MODES or stats_update not in UPDATES:
            raise ReSUREError(f"resure: mode must be one of {MODES} and stats_update one of {UPDATES}, "
                              f"got mode={mode!r} stats_update={stats_update!r}")
        if not (0 <= floor_percentile <= 100 and min_count >= 2 and (max_turn_groups or 1) >= 1
                and ramp_steps >= 0 and warmup_samples >= 0 and alpha >= 0 and (gain_alpha or 0) >= 0):
            raise ReSUREError("resure: need 0 <= floor_percentile <= 100, min_count >= 2, max_turn_groups >= 1 "
                              "(or None), ramp_steps >= 0, warmup_samples >= 0, alpha >= 0, gain_alpha >= 0")
        self.alpha, self.floor_percentile, self.warmup_samples = float(alpha), float(floor_percentile), warmup_samples
        self.ramp_steps, self.min_count, self.max_turn_groups, self.mode = ramp_steps, min_count, max_turn_groups, mode
        self.stats_kind, self.stats_update, self.ema_decay, self.window = stats, stats_update, float(ema_decay), window
        self.stats = GroupedStats(stats, ema_decay, window)
        self.gain_alpha = None if gain_alpha is None else float(gain_alpha)
        self.gain_stats = GroupedStats(stats, ema_decay, window)  # the context-gain view; used when gain_alpha is set
        self.warn_steps, self.record, self.records = warn_steps, record, []
        for k in self.COUNTERS:  # weigh() calls, finite units seen, calls after warm-up, ..., lag/collapse streaks
            setattr(self, k, 0)
        self.warned, self.pending, self.last = [], [], {}

    def _groups(self, groups, n):
        g = _np(groups, np.int64, "groups")
        if len(g) != n:
            raise ReSUREError(f"resure: {n} losses but {len(g)} groups")
        if (g < 1).any():
            raise ReSUREError(f"resure: unit {int(np.argmax(g < 1))} has turn group {g[g < 1][0]}; groups are >= 1")
        return np.ones_like(g) if self.mode == "global" else np.minimum(g, self.max_turn_groups or g.max(initial=1))

    def _losses(self, losses):
        l = _np(losses, np.float64, "losses")
        bad = np.isfinite(l) & (l < 0)
        if bad.any():
            raise ReSUREError(f"resure: unit {int(np.argmax(bad))} has negative loss {float(l[bad][0])}; "
                              "Eqs. 5-7 assume non-negative (cross-entropy) losses")
        return l

    def tau(self, b):
        """Eq. 5 for group b as the statistics stand now (inf while the group has < min_count values)."""
        est = self.stats[b]
        return est.mean + self.alpha * est.std if est.count >= self.min_count else math.inf

    def gain_band(self, b):
        """(lo, hi) = mu_g -+ gain_alpha * sigma_g of group b's context gains ((-inf, inf) while too few)."""
        est, a = self.gain_stats[b], self.gain_alpha or 0.0
        ok = est.count >= self.min_count
        return (est.mean - a * est.std, est.mean + a * est.std) if ok else (-math.inf, math.inf)

    def weigh(self, losses, groups, ids=None, turns=None, new_step=True, gains=None):
        """(weights float64, flagged bool) for one batch in batch order, then update the statistics in that order.
        new_step: this batch starts an optimizer step (False for the later micro-batches of an accumulated step:
        the ramp moves once per optimizer step). gains: each unit's context gain (with gain_alpha set). ids/turns
        (per unit: sample index, turn) only label the records."""
        l = self._losses(losses)
        g, n, finite = self._groups(groups, len(l)), len(l), np.isfinite(l)
        pre = {int(b): (self.stats[b].count, self.stats[b].mean, self.stats[b].std, self.tau(b)) for b in set(g)}
        tau = np.array([pre[b][3] for b in g], dtype=np.float64)                      # Eq. 5, before the batch
        warm = self.seen < self.warmup_samples
        active = not warm and self.mode != "sft"
        by_loss = finite & (l > tau) & active
        w = np.where(finite, 1.0, 0.0)
        w[by_loss] = weight_rule(l[by_loss], tau[by_loss])                            # Eq. 6 before the floor
        x, band, by_gain = self._gain_view(gains, g, n, finite, active, w)
        flagged, eps, r = by_loss | by_gain, None, 0.0
        if active:
            self.ramp_pos += new_step or self.ramp_pos == 0             # optimizer steps after warm-up, this one too
            r = 1.0 if self.ramp_steps == 0 else min(1.0, self.ramp_pos / self.ramp_steps)
        if flagged.any() and self.mode == "hard":
            w[flagged] = 0.0                                                          # filtering, not reweighting
        elif flagged.any():
            eps = float(np.percentile(w[finite], self.floor_percentile))              # Eq. 6: the floor
            w[flagged] = np.maximum(w[flagged], eps)
        if r < 1.0:
            w[flagged] = 1.0 - r * (1.0 - w[flagged])                                 # the ramp
        self._update(self.stats, g, l, finite, by_loss, tau)                          # the conditional update
        if x is not None:
            self._update(self.gain_stats, g, x, finite & np.isfinite(x), by_gain, np.clip(x, band[0], band[1]))
        self.calls, self.seen, self.units_total = self.calls + 1, self.seen + int(finite.sum()), self.units_total + n
        self.flagged_total += int(flagged.sum())
        self.nonfinite_total += int(n - finite.sum())
        self._summarize(l, g, w, flagged, finite, pre, warm, r, eps, active, by_gain)
        if self.record:
            view = [("loss+gain" if a and b else "loss" if a else "gain" if b else None)
                    for a, b in zip(by_loss, by_gain)]
            self.records += [{"call": self.calls, "sample": None if ids is None else int(ids[i]),
                              "turn": None if turns is None else int(turns[i]), "group": int(g[i]),
                              "loss": _num(l[i]), "tau": _num(tau[i]), "weight": float(w[i]),
                              "flagged": bool(flagged[i]), "warmup": bool(warm), "view": view[i],
                              **({} if x is None else {"gain": _num(x[i]), "gain_lo": _num(band[0][i]),
                                                       "gain_hi": _num(band[1][i])})} for i in range(n)]
        return w, flagged

    def _gain_view(self, gains, g, n, finite, active, w):
        """The context-gain view (beyond the paper): a unit whose gain lies outside its group's band is flagged
        and weighted exp(-d / h), d its distance outside the band and h the band's half-width (Eq. 6's shape
        with the band's own scale, since a gain can be negative); w keeps the lower of the two views' weights."""
        if gains is None or self.gain_alpha is None:
            return None, None, np.zeros(n, dtype=bool)
        x = _np(gains, np.float64, "gains")
        if len(x) != n:
            raise ReSUREError(f"resure: {n} losses but {len(x)} gains")
        lo, hi = (np.array(v) for v in zip(*[self.gain_band(b) for b in g])) if n else (np.zeros(0), np.zeros(0))
        by_gain = finite & np.isfinite(x) & ((x < lo) | (x > hi)) & active
        with np.errstate(divide="ignore", invalid="ignore"):
            d, h = np.maximum(lo - x, x - hi), (hi - lo) / 2
            w[by_gain] = np.minimum(w[by_gain], np.where(h[by_gain] > 0, np.exp(-d[by_gain] / h[by_gain]), 0.0))
        return x, (lo, hi), by_gain

    def _update(self, stats, g, x, ok, flagged, clipped):
        """Reliable values enter their group's statistics in batch order; flagged ones as stats_update says."""
        for i in np.flatnonzero(ok):
            if not flagged[i] or self.stats_update == "all":
                stats.update(g[i], x[i])
            elif self.stats_update == "winsorized":
                stats.update(g[i], clipped[i])

    def warmup_from(self, losses, groups, gains=None):
        """Initialize the statistics from a separate high-quality set (the paper: 640 dialogues); counts as seen."""
        l = self._losses(losses)
        g, ok = self._groups(groups, len(l)), np.isfinite(l)
        self._update(self.stats, g, l, ok, np.zeros(len(l), bool), l)
        if gains is not None and self.gain_alpha is not None:
            x = _np(gains, np.float64, "gains")
            self._update(self.gain_stats, g, x, ok & np.isfinite(x), np.zeros(len(l), bool), x)
        self.seen += int(ok.sum())
        self.nonfinite_total += int((~ok).sum())
        return int(ok.sum())

    # --- observability ------------------------------------------------------------------------------------------
    def _summarize(self, l, g, w, flagged, finite, pre, warm, r, eps, active, by_gain):
        groups = {}
        for b, (cnt, mu, sigma, tau) in sorted(pre.items()):
            m = (g == b) & finite
            groups[b] = {"n": cnt, "mu": _num(mu), "sigma": _num(sigma), "tau": _num(tau), "batch_units": int(m.sum()),
                         "batch_loss": _num(l[m].mean()) if m.any() else None,
                         "flagged": float(flagged[m].mean()) if m.any() else None}
        nf, nflag, wf = int(finite.sum()), int(flagged.sum()), w[finite]
        stat = (lambda f, x: _num(f(x)) if len(x) else None)
        self.last = {"weigh_calls": self.calls, "seen": self.seen, "warmup": warm, "ramp": r, "units": len(l),
                     "flagged_units": nflag, "flagged": nflag / nf if nf else 0.0,
                     "loss_mean": stat(np.mean, l[finite]), "flagged_loss_mean": stat(np.mean, l[flagged]),
                     "weight_mean": stat(np.mean, wf), "weight_min": stat(np.min, wf),
                     "weight_median": stat(np.median, wf), "eps": eps, "nonfinite": len(l) - nf,
                     "nonfinite_total": self.nonfinite_total, "flagged_total": self.flagged_total,
                     "units_total": self.units_total, "groups": groups,
                     **({"flagged_by_gain": int(by_gain.sum())} if self.gain_alpha is not None else {})}
        self._check_lag_collapse(active, nf, nflag, groups)

    def _check_lag_collapse(self, active, nf, nflag, groups):
        """Lag: nothing flagged while every judged group's batch loss is below its mean (so >= alpha*sigma
        under tau); collapse: more than half of the units flagged. Each over warn_steps consecutive calls, once."""
        if not active or not nf:
            return
        judged = [s for s in groups.values() if s["tau"] is not None and s["batch_units"]]
        lag = nflag == 0 and bool(judged) and all(s["batch_loss"] < s["mu"] for s in judged)
        self.lag_run = self.lag_run + 1 if lag else 0
        self.collapse_run = self.collapse_run + 1 if nflag > nf / 2 else 0
        if self.lag_run >= self.warn_steps and "lag" not in self.warned:
            self.warned.append("lag")
            self.pending.append(
                f"resure warning (lag): nothing flagged for {self.lag_run} steps while every group's batch loss sat "
                f"below its running mean, far under tau: the {self.stats_kind} statistics lag behind the falling loss "
                f"and ReSURE acts as plain SFT; {FIX} track the loss")
        if self.collapse_run >= self.warn_steps and "collapse" not in self.warned:
            self.warned.append("collapse")
            self.pending.append(
                f"resure warning (collapse): more than half of the units flagged for {self.collapse_run} steps: with "
                f"--stats-update {self.stats_update} the statistics see only losses below tau, so sigma shrinks and "
                f"tau keeps falling; {FIX} avoid it")

    def summary(self):
        """The last weigh() call, JSON-safe: per group the statistics the batch was judged with (n, mu, sigma, tau)
        beside its batch_units, batch_loss and flagged fraction; weight mean/min/median, eps, counters."""
        return copy.deepcopy(self.last)

    def warnings(self):
        """Lag/collapse warnings raised since the last call (each at most once per run): print them."""
        out, self.pending = self.pending, []
        return out

    def pop_records(self):
        """Per-unit records (record=True) since the last call; call it every step, the list grows otherwise."""
        out, self.records = self.records, []
        return out

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self):
        return {"config": {k: getattr(self, k) for k in self.CONFIG}, **{k: getattr(self, k) for k in self.COUNTERS},
                "warned": list(self.warned), "stats": self.stats.state_dict(),
                **({"gain_stats": self.gain_stats.state_dict()} if self.gain_alpha is not None else {})}

    def load_state_dict(self, s):
        diff = [f"{k}: checkpoint {s['config'].get(k)!r} vs now {getattr(self, k)!r}"
                for k in self.CONFIG if s["config"].get(k, None) != getattr(self, k)]
        if diff:
            raise ReSUREError("resure state does not match this run's settings: " + "; ".join(diff))
        for k in self.COUNTERS:
            setattr(self, k, int(s[k]))
        self.warned, self.pending = list(s["warned"]), []  # a warning raised after the snapshot is raised again
        self.stats.load_state_dict(s["stats"])
        if self.gain_alpha is not None:
            self.gain_stats.load_state_dict(s["gain_stats"])


# --- units (Eq. 1) and the reweighted loss (Eq. 7) --------------------------------------------------------------------
def _unit_masks(labels, turn_ids, unit):
    sup = labels != -100
    sup[:, 0] = False                          # position 0 predicts nothing (token_losses pads it with 0)
    if unit == "dialogue":
        return sup.unsqueeze(1), None                                           # [B, 1, T]
    if unit != "turn":
        raise ReSUREError(f"resure: unit must be 'dialogue' or 'turn', got {unit!r}")
    if (sup & (turn_ids < 1)).any():
        b = int((sup & (turn_ids < 1)).any(1).nonzero()[0])
        raise ReSUREError(f"resure: sample {b} of the batch has a supervised token with turn id < 1")
    turns = torch.arange(1, int(turn_ids[sup].max()) + 1 if sup.any() else 1, device=labels.device)
    return sup.unsqueeze(1) & (turn_ids.unsqueeze(1) == turns[None, :, None]), turns   # [B, K, T]


def count_units(labels, turn_ids=None, unit="dialogue"):
    """(units, supervised tokens) that unit_losses will return for this batch, known before the forward pass."""
    masks, _ = _unit_masks(labels, turn_ids, unit)
    return int((masks.sum(-1) > 0).sum()), int(masks.sum())


def unit_losses(token_losses, labels, turn_ids, groups, unit="dialogue"):
    """token_losses [B, T] as model.token_losses returns it (entry t = CE of labels[t], 0 where -100 and at t = 0).
    A unit is a dialogue (mean CE over its supervised tokens, group = its depth groups[b]) or an assistant turn
    with >= 1 supervised token (group = its 1-based turn id). Units come sample-major, turns ascending.
    Returns losses [U] (with grad), groups [U], tokens [U], sample_index [U], turn [U] (0 for dialogue units)."""
    if token_losses.shape != labels.shape or (turn_ids is not None and turn_ids.shape != labels.shape):
        raise ReSUREError(f"resure: token_losses {tuple(token_losses.shape)}, labels {tuple(labels.shape)} and "
                          f"turn_ids {None if turn_ids is None else tuple(turn_ids.shape)} must have one shape")
    masks, turns = _unit_masks(labels, turn_ids, unit)
    sums = torch.where(masks, token_losses.unsqueeze(1), 0.0).sum(-1)           # [B, K], deterministic
    tok = masks.sum(-1)
    sample, k = (tok > 0).nonzero(as_tuple=True)
    losses, tokens = sums[sample, k] / tok[sample, k], tok[sample, k]
    if unit == "dialogue":
        return losses, torch.as_tensor(groups, device=labels.device)[sample].long(), tokens, sample, 0 * sample
    return losses, turns[k], tokens, sample, turns[k]


def gain_of(free_token_losses, free_labels, free_unit, losses, sample, turn, unit="dialogue", batch=None):
    """Context gain of each unit: the mean loss of its reply tokens scored alone, after an empty user turn
    (free_token_losses [R, T] of the R rows free_unit = (batch row, turn)), minus its loss in the dialogue, in nats
    per token: how much the dialogue helps predict the reply (a dialogue unit pools the tokens of its replies)."""
    sup = (free_labels != -100) & (torch.arange(free_labels.shape[1], device=free_labels.device) > 0)
    row, k = free_unit.unbind(1)
    size = (batch or int(torch.cat([row, sample]).max()) + 1, int(torch.cat([k, turn]).max()) + 1)
    s = losses.new_zeros(size).index_put_((row, k), (free_token_losses * sup).sum(1).to(losses.dtype), accumulate=True)
    n = losses.new_zeros(size).index_put_((row, k), sup.sum(1).to(losses.dtype), accumulate=True)
    free = s.sum(1)[sample] / n.sum(1)[sample] if unit == "dialogue" else s[sample, turn] / n[sample, turn]
    return free - losses


def reweighted_loss(unit_losses, unit_tokens, weights, norm="sample", total_units=None, total_tokens=None,
                    world_size=1):
    """The mean of Eq. 7's l~ = w * l with constant weights. sample: sum w*l / total_units; token:
    sum w*l*n_tokens / total_tokens.
    total_* are GLOBAL counts over every rank and micro-batch of the optimizer step (default: this call's), so the
    local shares add up, over ranks and micro-steps, to the single-process loss. DDP AVERAGES gradients over ranks:
    pass world_size=dist.get_world_size() (the result is multiplied by it) to get the single-process gradient.
    Units with weight 0 or a non-finite loss are left out of the sum (no 0 * nan)."""
    w = torch.as_tensor(np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float64))
    if w.shape != unit_losses.shape:
        raise ReSUREError(f"resure: {tuple(w.shape)} weights for {tuple(unit_losses.shape)} unit losses")
    w = w.to(unit_losses.device, unit_losses.dtype)
    keep = (w > 0) & torch.isfinite(unit_losses.detach())
    if norm == "sample":
        total, n = len(unit_losses) if total_units is None else total_units, 1
    elif norm == "token":
        total = int(unit_tokens.sum()) if total_tokens is None else total_tokens
        n = unit_tokens.to(unit_losses.device, unit_losses.dtype)[keep]
    else:
        raise ReSUREError(f"resure: norm must be 'sample' or 'token', got {norm!r}")
    return (w[keep] * unit_losses[keep] * n).sum() / max(total, 1) * world_size


# --- distributed: every rank weighs the same gathered batch ------------------------------------------------------
def _device():
    dist = torch.distributed
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(values, *columns):
    """All-gather units from every rank (counts may differ), rank-major: (values as numpy float64 -- one row [U] or
    several [m, U], e.g. losses and context gains -- each integer column (groups, sample ids, ...) as numpy int64,
    offsets); rank r's units are offsets[r]:offsets[r + 1]. Three collectives whatever the number of columns.
    Without torch.distributed: copies, offsets = [0, n]."""
    v = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, np.float64)
    if v.ndim not in (1, 2):
        raise ReSUREError(f"resure: gather values must be 1-D or 2-D, got shape {tuple(v.shape)}")
    ints = [_np(c, np.int64, f"column {i + 1}") for i, c in enumerate(columns)]
    n = v.shape[-1]
    if any(len(c) != n for c in ints):
        raise ReSUREError(f"resure: gather needs one value per unit in every column ({n} units)")
    ints = np.stack(ints) if ints else np.zeros((0, n), dtype=np.int64)
    if not _distributed():
        return (v.copy(), *ints.copy(), np.array([0, n]))
    dist, dev, world = torch.distributed, _device(), torch.distributed.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=dev))
    counts = [int(c) for c in counts]

    def all_gather(x):  # [..., n]: pad the last axis to the longest rank, gather, strip, concatenate the ranks
        t = torch.from_numpy(x)
        buf = torch.zeros(*t.shape[:-1], max(counts), dtype=t.dtype, device=dev)
        buf[..., :n] = t.to(dev)
        outs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(outs, buf)
        return np.concatenate([o[..., :c].cpu().numpy() for o, c in zip(outs, counts)], axis=-1)

    return (all_gather(v), *all_gather(ints), np.concatenate([[0], np.cumsum(counts)]))


def all_reduce_sum(*counts):
    """Sum integers (e.g. an optimizer step's units and tokens) over ranks; identity without torch.distributed."""
    if not _distributed():
        return tuple(int(c) for c in counts)
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t)
    return tuple(int(c) for c in t.tolist())


# --- static pre-filtering baseline (paper Sec. 5.2) ---------------------------------------------------------------
def prefilter(scores, keep=0.75):
    """Keep the lowest-scoring fraction of a dataset (train.py scores it by the base model's per-sample loss, our
    stand-in for the paper's reward model, or by -score from --prefilter-scores): floor(keep * n + 0.5) samples,
    ties broken by index, non-finite scores last. Returns the kept indices, ascending."""
    s = _np(scores, np.float64, "scores")
    if not 0 < keep <= 1:
        raise ReSUREError(f"resure: prefilter keep must be in (0, 1], got {keep}")
    order = np.lexsort((np.arange(len(s)), np.where(np.isfinite(s), s, np.inf)))
    return np.sort(order[:int(math.floor(keep * len(s) + 0.5))])
