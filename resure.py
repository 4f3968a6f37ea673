"""ReSURE (arXiv 2508.19996, Sec. 3): down-weight supervision whose loss is unusually high for its
turn depth. The file follows the paper:
  Eq. 1     unit_losses: a unit's loss l is the mean cross-entropy of its supervised tokens; a unit
            is a dialogue (the paper) or one assistant turn (ours)
  groups    units are grouped by turn depth b; deeper turns may share the last group
  Eqs. 2-5  each group keeps a running mean mu_b and std sigma_b of its reliable losses
            (welford.py); ReSURE.tau: tau_b = mu_b + alpha * sigma_b, before the batch
  Eq. 6     ReSURE.weigh: l <= tau_b is reliable, w = 1; else w = max(eps, exp(-(l - tau) / tau)),
            eps the floor_percentile-th percentile of the batch's weights (ReSURE._floor)
  update    only reliable losses enter their group's statistics, in batch order (ReSURE._update)
  Eq. 7     reweighted_loss: the mean of l~ = w * l over the step's units, w a constant
Warm-up: every w = 1 while fewer than warmup_samples units were seen, or after warmup_from filled
the statistics from a separate clean set (the paper's 640 samples); a group with fewer than
min_count values judges nothing. Ramp (our reading of "gradually increased filtering weight"):
w_eff = 1 - r * (1 - w), r = min(1, s / ramp_steps) in the s-th optimizer step after warm-up.
Beyond the paper (docs/method.md): modes sft, global, hard; stats_update winsorized or all; other
estimators; the context-gain view (gain_alpha); the lag / collapse watch (Observer). Non-finite
losses get w = 0 and never enter the statistics. Another weighting rule: edit weight_rule().
"""
import copy
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from support.distributed import column
from welford import GroupedStats

MODES = ("resure", "sft", "global", "hard")
UPDATES = ("reliable", "winsorized", "all")
FLOOR_OVER = ("all", "flagged")
FIX = "--stats ema --stats-update winsorized or --stats mad --stats-update all"


class ReSUREError(ValueError):
    pass


def _np(x, dtype, name):
    return column(x, dtype, f"resure: {name}", ReSUREError)


def _num(x):
    """x as a JSON-safe float: None for NaN and infinities."""
    x = float(x)
    return x if math.isfinite(x) else None


# --- Eq. 1: units and their losses ---------------------------------------------------------------
def _unit_masks(labels, turn_ids, unit):
    """Each unit's supervised tokens [B, K, T] and the turn ids 1..K of its K slots (None for
    dialogue units, K = 1)."""
    sup = labels != -100
    sup[:, 0] = False                   # position 0 predicts nothing (token_losses pads it with 0)
    if unit == "dialogue":
        return sup.unsqueeze(1), None
    if unit != "turn":
        raise ReSUREError(f"resure: unit must be 'dialogue' or 'turn', got {unit!r}")
    orphans = sup & (turn_ids < 1)
    if orphans.any():
        b = int(orphans.any(1).nonzero()[0])
        raise ReSUREError(f"resure: sample {b} of the batch has a supervised token with turn "
                          "id < 1")
    last = int(turn_ids[sup].max()) if sup.any() else 0
    turns = torch.arange(1, last + 1, device=labels.device)
    return sup.unsqueeze(1) & (turn_ids.unsqueeze(1) == turns[None, :, None]), turns


def count_units(labels, turn_ids=None, unit="dialogue"):
    """(units, supervised tokens) that unit_losses will return, known before the forward pass."""
    masks, _ = _unit_masks(labels, turn_ids, unit)
    return int((masks.sum(-1) > 0).sum()), int(masks.sum())


def unit_losses(token_losses, labels, turn_ids, groups, unit="dialogue"):
    """Eq. 1 per unit from token_losses [B, T] (model.token_losses: entry t is the CE of labels[t],
    0 where -100 and at t = 0). A unit is a dialogue (group: its depth groups[b]) or an assistant
    turn with supervised tokens (group: its turn id), sample-major, turns ascending. Returns
    losses [U] (with grad), groups, tokens, sample_index and turn (0 for dialogue units)."""
    shapes = {"token_losses": token_losses.shape, "labels": labels.shape}
    if turn_ids is not None:
        shapes["turn_ids"] = turn_ids.shape
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ReSUREError(f"resure: {listed} must have one shape")
    masks, turns = _unit_masks(labels, turn_ids, unit)
    sums = torch.where(masks, token_losses.unsqueeze(1), 0.0).sum(-1)   # [B, K], deterministic
    counts = masks.sum(-1)
    sample, k = (counts > 0).nonzero(as_tuple=True)
    tokens = counts[sample, k]
    losses = sums[sample, k] / tokens
    if unit == "dialogue":
        depth = torch.as_tensor(groups, device=labels.device)[sample].long()
        return losses, depth, tokens, sample, 0 * sample
    return losses, turns[k], tokens, sample, turns[k]


def gain_of(free_token_losses, free_labels, free_unit, losses, sample, turn, unit="dialogue",
            batch=None):
    """Each unit's context gain (beyond the paper), in nats per token: the mean loss of its reply
    tokens scored alone after an empty user turn (free_token_losses [R, T] of the R rows
    free_unit = (batch row, turn)) minus its loss in the dialogue. A dialogue pools its replies."""
    positions = torch.arange(free_labels.shape[1], device=free_labels.device)
    sup = (free_labels != -100) & (positions > 0)
    row, k = free_unit.unbind(1)
    rows = batch or int(torch.cat([row, sample]).max()) + 1
    slots = int(torch.cat([k, turn]).max()) + 1
    free_sum = losses.new_zeros(rows, slots)
    row_sums = (free_token_losses * sup).sum(1).to(losses.dtype)
    free_sum.index_put_((row, k), row_sums, accumulate=True)
    free_count = losses.new_zeros(rows, slots)
    free_count.index_put_((row, k), sup.sum(1).to(losses.dtype), accumulate=True)
    if unit == "dialogue":
        free = free_sum.sum(1)[sample] / free_count.sum(1)[sample]
    else:
        free = free_sum[sample, turn] / free_count[sample, turn]
    return free - losses


# --- turn groups ---------------------------------------------------------------------------------
def _units(losses, groups, config):
    """The units' losses as float64 (NaN and infinities pass: they get w = 0; negative losses do
    not) and their turn groups b >= 1: each its depth, capped at max_turn_groups; mode global puts
    every unit in group 1."""
    l = _np(losses, np.float64, "losses")
    negative = np.isfinite(l) & (l < 0)
    if negative.any():
        i = int(np.argmax(negative))
        raise ReSUREError(f"resure: unit {i} has negative loss {float(l[i])}; "
                          "Eqs. 5-7 assume non-negative (cross-entropy) losses")
    g = _np(groups, np.int64, "groups")
    if len(g) != len(l):
        raise ReSUREError(f"resure: {len(l)} losses but {len(g)} groups")
    if (g < 1).any():
        i = int(np.argmax(g < 1))
        raise ReSUREError(f"resure: unit {i} has turn group {g[i]}; groups are >= 1")
    if config.mode == "global":
        return l, np.ones_like(g)
    if config.max_turn_groups:
        return l, np.minimum(g, config.max_turn_groups)
    return l, g


# --- Eqs. 2-5: the settings, the statistics, the thresholds --------------------------------------
@dataclass
class ReSUREConfig:
    """ReSURE's settings; a checkpoint's must match the run's (load_state_dict checks each)."""
    alpha: float = 1.0                  # Eq. 5: tau = mu + alpha * sigma
    floor_percentile: float = 5.0       # Eq. 6: eps is this percentile of the batch's weights
    warmup_samples: int = 640           # units seen before the first batch that is judged
    ramp_steps: int = 50                # optimizer steps until the down-weighting is full
    min_count: int = 2                  # values a group needs before its sigma is used
    max_turn_groups: int | None = None  # deeper turns share this group (None or 0: no cap)
    mode: str = "resure"                # one of MODES
    stats_kind: str = "welford"         # the estimator, one of welford.ESTIMATORS
    stats_update: str = "reliable"      # what flagged units feed the statistics, one of UPDATES
    ema_decay: float = 0.05             # the ema estimator's decay
    window: int = 256                   # the window and mad estimators' length
    gain_alpha: float | None = None     # the gain band's half-width in sigmas (None: no gain view)
    floor_over: str = "all"             # the weights Eq. 6's percentile is over, one of FLOOR_OVER

    def __post_init__(self):
        rules = [("mode", self.mode in MODES, f"one of {MODES}"),
                 ("stats_update", self.stats_update in UPDATES, f"one of {UPDATES}"),
                 ("floor_over", self.floor_over in FLOOR_OVER, f"one of {FLOOR_OVER}"),
                 ("floor_percentile", 0 <= self.floor_percentile <= 100, "in [0, 100]"),
                 ("min_count", self.min_count >= 2, ">= 2"),
                 ("max_turn_groups", (self.max_turn_groups or 1) >= 1, ">= 1 (None or 0: no cap)"),
                 ("ramp_steps", self.ramp_steps >= 0, ">= 0"),
                 ("warmup_samples", self.warmup_samples >= 0, ">= 0"),
                 ("alpha", self.alpha >= 0, ">= 0"),
                 ("gain_alpha", (self.gain_alpha or 0) >= 0, ">= 0 (None: no gain view)")]
        for name, ok, requirement in rules:
            if not ok:
                got = getattr(self, name)
                raise ReSUREError(f"resure: {name} must be {requirement}, got {got!r}")


@dataclass
class Counters:
    """What a run has counted; a checkpoint keeps them at the top level of ReSURE's state."""
    calls: int = 0                      # weigh() calls
    seen: int = 0                       # finite units seen, the warm-up set's included
    ramp_pos: int = 0                   # optimizer steps after warm-up, the current one included
    units_total: int = 0                # units weighed, non-finite ones included
    flagged_total: int = 0
    nonfinite_total: int = 0

    def count(self, units, finite, flagged):
        self.calls += 1
        self.seen += finite
        self.units_total += units
        self.flagged_total += flagged
        self.nonfinite_total += units - finite


@dataclass
class Standing:
    """A turn group's statistics as a batch is judged by them: Eq. 5's inputs and tau."""
    count: int
    mean: float
    std: float
    tau: float


@dataclass
class GainView:
    """The context-gain view of a batch: a unit whose gain lies d outside its group's band [lo, hi]
    is flagged and weighs exp(-d / h), h the band's half-width (Eq. 6's shape, the band's scale)."""
    gains: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    flagged: np.ndarray
    weights: np.ndarray                 # exp(-d / h) where flagged, 1 elsewhere


def weight_rule(l, tau):
    """Eq. 6 before the floor, for losses l above their thresholds tau (tau = 0 gives w = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        positive_tau = np.where(tau > 0, tau, 1.0)
        return np.where(tau > 0, np.exp(-(l - tau) / positive_tau), 0.0)


class ReSURE:
    """Weighs each batch of unit losses against its turn groups' thresholds (Eqs. 5-6) and feeds
    the reliable ones to the groups' statistics (Eqs. 2-4). The arguments are ReSUREConfig's fields
    (stats sets stats_kind), and warn_steps and record for the Observer beside it."""

    def __init__(self, alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=50,
                 min_count=2, max_turn_groups=None, mode="resure", stats="welford",
                 stats_update="reliable", ema_decay=0.05, window=256, gain_alpha=None,
                 warn_steps=20, record=False, floor_over="all"):
        if gain_alpha is not None:
            gain_alpha = float(gain_alpha)
        self.config = ReSUREConfig(
            alpha=float(alpha), floor_percentile=float(floor_percentile),
            warmup_samples=warmup_samples, ramp_steps=ramp_steps, min_count=min_count,
            max_turn_groups=max_turn_groups, mode=mode, stats_kind=stats,
            stats_update=stats_update, ema_decay=float(ema_decay), window=window,
            gain_alpha=gain_alpha, floor_over=floor_over)
        self.stats = GroupedStats(stats, ema_decay, window)         # the losses', per turn group
        self.gain_stats = GroupedStats(stats, ema_decay, window)    # the gains', with gain_alpha
        self.counters = Counters()
        self.observer = Observer(self.config, warn_steps, record)

    @property
    def seen(self):
        return self.counters.seen

    @property
    def gain_alpha(self):
        return self.config.gain_alpha

    @property
    def min_count(self):
        return self.config.min_count

    def tau(self, b):
        """Eq. 5 for group b as the statistics stand now (inf while it has < min_count values)."""
        est = self.stats[b]
        if est.count < self.config.min_count:
            return math.inf
        return est.mean + self.config.alpha * est.std

    def gain_band(self, b):
        """(lo, hi) = mu_g -+ gain_alpha * sigma_g of group b's context gains ((-inf, inf) while
        the group has < min_count values)."""
        est = self.gain_stats[b]
        if est.count < self.config.min_count:
            return -math.inf, math.inf
        half_width = (self.config.gain_alpha or 0.0) * est.std
        return est.mean - half_width, est.mean + half_width

    def _standing(self, b):
        est = self.stats[b]
        return Standing(est.count, est.mean, est.std, self.tau(b))

    # --- Eq. 6 and its floor ---------------------------------------------------------------------
    def weigh(self, losses, groups, ids=None, turns=None, new_step=True, gains=None):
        """(weights float64, flagged bool) for one batch, then the conditional update in batch
        order. new_step: this batch starts an optimizer step (the ramp moves once per step).
        gains: each unit's context gain (with gain_alpha). ids / turns only label the records."""
        l, g = _units(losses, groups, self.config)
        finite = np.isfinite(l)
        before = {b: self._standing(b) for b in sorted(set(g.tolist()))}
        tau = np.array([before[b].tau for b in g.tolist()], dtype=np.float64)  # Eq. 5
        warmup = self.counters.seen < self.config.warmup_samples
        active = not warmup and self.config.mode != "sft"
        by_loss = finite & (l > tau) & active
        w = np.where(finite, 1.0, 0.0)
        w[by_loss] = weight_rule(l[by_loss], tau[by_loss])             # Eq. 6 before the floor
        gain = self._gain_view(gains, g, finite, active)
        by_gain = np.zeros(len(l), dtype=bool)
        if gain is not None:
            by_gain = gain.flagged
            w[by_gain] = np.minimum(w[by_gain], gain.weights[by_gain])  # the lower view's
        flagged = by_loss | by_gain
        ramp = self._ramp(active, new_step)
        eps = None
        if self.config.mode == "hard":
            w[flagged] = 0.0                                           # filtering, not reweighting
        elif flagged.any():
            eps = self._floor(w, finite, flagged)                      # Eq. 6: the floor
            w[flagged] = np.maximum(w[flagged], eps)
        if ramp < 1.0:
            w[flagged] = 1.0 - ramp * (1.0 - w[flagged])               # the ramp
        self._update(self.stats, g, l, finite, by_loss, tau)           # the conditional update
        if gain is not None:
            clipped = np.clip(gain.gains, gain.lo, gain.hi)
            judged = finite & np.isfinite(gain.gains)
            self._update(self.gain_stats, g, gain.gains, judged, by_gain, clipped)
        self.counters.count(len(l), int(finite.sum()), int(flagged.sum()))
        decision = Decision(losses=l, groups=g, finite=finite, before=before, tau=tau,
                            warmup=warmup, active=active, by_loss=by_loss, by_gain=by_gain,
                            gain=gain, weights=w, flagged=flagged, ramp=ramp, eps=eps)
        self.observer.observe(decision, self.counters, ids, turns)
        return w, flagged

    def _floor(self, weights, finite, flagged):
        """Eq. 6's eps, the floor_percentile-th percentile (numpy, linear) of the weights before
        the floor. The paper's "5th percentile of the current batch's weights" reads two ways:
        floor_over "all" (the literal reading) takes every finite unit's, the reliable 1.0s
        included, so while k <= p/100 * (n - 1) of n units are flagged eps = 1; "flagged" takes the
        flagged units' only, so eps bounds how far the lowest fall below the others."""
        pool = weights[flagged] if self.config.floor_over == "flagged" else weights[finite]
        return float(np.percentile(pool, self.config.floor_percentile))

    def _ramp(self, active, new_step):
        """r, the share of the down-weighting applied: 0 while nothing is judged, then
        min(1, s / ramp_steps) in the s-th optimizer step (the first judged batch starts step 1)."""
        if not active:
            return 0.0
        if new_step or self.counters.ramp_pos == 0:
            self.counters.ramp_pos += 1
        if self.config.ramp_steps == 0:
            return 1.0
        return min(1.0, self.counters.ramp_pos / self.config.ramp_steps)

    def _gains(self, gains, n):
        x = _np(gains, np.float64, "gains")
        if len(x) != n:
            raise ReSUREError(f"resure: {n} losses but {len(x)} gains")
        return x

    def _gain_view(self, gains, g, finite, active):
        """The batch's GainView against each group's band, or None without gains or gain_alpha."""
        if gains is None or self.config.gain_alpha is None:
            return None
        x = self._gains(gains, len(g))
        bands = [self.gain_band(b) for b in g]
        lo = np.array([band[0] for band in bands], dtype=np.float64)
        hi = np.array([band[1] for band in bands], dtype=np.float64)
        flagged = finite & np.isfinite(x) & ((x < lo) | (x > hi)) & active
        weights = np.ones(len(x))
        with np.errstate(divide="ignore", invalid="ignore"):
            distance = np.maximum(lo - x, x - hi)[flagged]
            half_width = ((hi - lo) / 2)[flagged]
            weights[flagged] = np.where(half_width > 0, np.exp(-distance / half_width), 0.0)
        return GainView(x, lo, hi, flagged, weights)

    # --- the conditional update ------------------------------------------------------------------
    def _update(self, stats, g, x, ok, flagged, clipped):
        """Reliable values enter their group's statistics in batch order; flagged ones as
        stats_update says (all: as they are; winsorized: clipped to tau or the band)."""
        for i in np.flatnonzero(ok):
            if not flagged[i] or self.config.stats_update == "all":
                stats.update(g[i], x[i])
            elif self.config.stats_update == "winsorized":
                stats.update(g[i], clipped[i])

    def warmup_from(self, losses, groups, gains=None):
        """Fill the statistics from a separate clean set (the paper: 640 dialogues); its finite
        units count as seen. Returns their number."""
        l, g = _units(losses, groups, self.config)
        finite = np.isfinite(l)
        none = np.zeros(len(l), dtype=bool)
        self._update(self.stats, g, l, finite, none, l)
        if gains is not None and self.config.gain_alpha is not None:
            x = self._gains(gains, len(l))
            self._update(self.gain_stats, g, x, finite & np.isfinite(x), none, x)
        n_finite = int(finite.sum())
        self.counters.seen += n_finite
        self.counters.nonfinite_total += len(l) - n_finite
        return n_finite

    # --- what the run shows, and checkpoints -----------------------------------------------------
    def summary(self):
        """The last weigh() call, JSON-safe: per group the statistics it was judged by and its
        batch's units, loss and flagged share; the weights' mean / min / median, eps, counts."""
        return copy.deepcopy(self.observer.last)

    def warnings(self):
        """Lag / collapse warnings raised since the last call (each once per run): print them."""
        return self.observer.take_warnings()

    def pop_records(self):
        """Per-unit records (record=True) since the last call; call it every step."""
        return self.observer.take_records()

    def state_dict(self):
        """A snapshot in plain JSON: the settings, the counters, the watch, the statistics."""
        state = {"config": asdict(self.config), **asdict(self.counters),
                 **self.observer.state_dict(), "stats": self.stats.state_dict()}
        if self.config.gain_alpha is not None:
            state["gain_stats"] = self.gain_stats.state_dict()
        return state

    def load_state_dict(self, s):
        """Resume from a state_dict() (without floor_over: "all"), refusing one whose settings
        differ from this run's, each difference named."""
        saved = {"floor_over": "all", **s["config"]}
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}"
                for k, v in asdict(self.config).items() if saved.get(k) != v]
        if diff:
            raise ReSUREError("resure state does not match this run's settings: " + "; ".join(diff))
        self.counters = Counters(**{f.name: int(s[f.name]) for f in fields(Counters)})
        self.observer.load_state_dict(s)
        self.stats.load_state_dict(s["stats"])
        if self.config.gain_alpha is not None:
            self.gain_stats.load_state_dict(s["gain_stats"])


# --- beside weigh: what each decision shows ------------------------------------------------------
@dataclass
class Decision:
    """One weigh() call as decided, per unit in batch order: what the Observer reads."""
    losses: np.ndarray                  # l, non-finite ones included
    groups: np.ndarray                  # b
    finite: np.ndarray
    before: dict                        # b -> Standing: the statistics the batch was judged by
    tau: np.ndarray                     # Eq. 5
    warmup: bool
    active: bool                        # judged: past warm-up and not mode sft
    by_loss: np.ndarray                 # flagged by l > tau
    by_gain: np.ndarray                 # flagged by the context-gain view
    gain: GainView | None
    weights: np.ndarray                 # the final weights
    flagged: np.ndarray
    ramp: float
    eps: float | None                   # Eq. 6's floor; None when nothing was floored


VIEWS = {(True, True): "loss+gain", (True, False): "loss", (False, True): "gain",
         (False, False): None}


@dataclass
class Observer:
    """Per-unit records (record=True), the last call's summary, and the lag / collapse watch
    (beyond the paper). Lag: nothing flagged while every judged group's batch loss sits below its
    mean (so >= alpha * sigma under tau); collapse: more than half of the units flagged. Each is
    warned about once per run, when it has lasted warn_steps consecutive judged calls."""
    config: ReSUREConfig
    warn_steps: int = 20
    record: bool = False
    records: list = field(default_factory=list)     # per-unit records since take_records()
    last: dict = field(default_factory=dict)        # the last call's summary
    lag_run: int = 0                                # consecutive judged calls that looked like lag
    collapse_run: int = 0                           # ... and like collapse
    warned: list = field(default_factory=list)      # the kinds warned about in this run
    pending: list = field(default_factory=list)     # their messages, until take_warnings()

    def observe(self, decision, counters, ids=None, turns=None):
        groups = self._groups(decision)
        self.last = self._summary(decision, counters, groups)
        self._watch(decision, groups)
        if self.record:
            self.records += self._records(decision, counters.calls, ids, turns)

    def _groups(self, d):
        """Per group: the statistics the batch was judged by, its units, their loss and flags."""
        out = {}
        for b, standing in d.before.items():
            units = (d.groups == b) & d.finite
            out[b] = {"n": standing.count, "mu": _num(standing.mean),
                      "sigma": _num(standing.std), "tau": _num(standing.tau),
                      "batch_units": int(units.sum()), "batch_loss": None, "flagged": None}
            if units.any():
                out[b]["batch_loss"] = _num(d.losses[units].mean())
                out[b]["flagged"] = float(d.flagged[units].mean())
        return out

    def _summary(self, d, counters, groups):
        weights = d.weights[d.finite]
        n_finite = int(d.finite.sum())
        n_flagged = int(d.flagged.sum())
        out = {"weigh_calls": counters.calls, "seen": counters.seen, "warmup": d.warmup,
               "ramp": d.ramp, "units": len(d.losses), "flagged_units": n_flagged,
               "flagged": n_flagged / n_finite if n_finite else 0.0,
               "loss_mean": _stat(np.mean, d.losses[d.finite]),
               "flagged_loss_mean": _stat(np.mean, d.losses[d.flagged]),
               "weight_mean": _stat(np.mean, weights), "weight_min": _stat(np.min, weights),
               "weight_median": _stat(np.median, weights), "eps": d.eps,
               "nonfinite": len(d.losses) - n_finite,
               "nonfinite_total": counters.nonfinite_total,
               "flagged_total": counters.flagged_total, "units_total": counters.units_total,
               "groups": groups}
        if self.config.gain_alpha is not None:
            out["flagged_by_gain"] = int(d.by_gain.sum())
        return out

    def _records(self, d, call, ids, turns):
        out = []
        for i in range(len(d.losses)):
            record = {"call": call, "sample": _label(ids, i), "turn": _label(turns, i),
                      "group": int(d.groups[i]), "loss": _num(d.losses[i]),
                      "tau": _num(d.tau[i]), "weight": float(d.weights[i]),
                      "flagged": bool(d.flagged[i]), "warmup": bool(d.warmup),
                      "view": VIEWS[bool(d.by_loss[i]), bool(d.by_gain[i])]}
            if d.gain is not None:
                record["gain"] = _num(d.gain.gains[i])
                record["gain_lo"] = _num(d.gain.lo[i])
                record["gain_hi"] = _num(d.gain.hi[i])
            out.append(record)
        return out

    def _watch(self, d, groups):
        n_finite = int(d.finite.sum())
        n_flagged = int(d.flagged.sum())
        if not d.active or not n_finite:
            return
        judged = [s for s in groups.values() if s["tau"] is not None and s["batch_units"]]
        lag = n_flagged == 0 and bool(judged) and all(s["batch_loss"] < s["mu"] for s in judged)
        self.lag_run = self.lag_run + 1 if lag else 0
        self.collapse_run = self.collapse_run + 1 if n_flagged > n_finite / 2 else 0
        if self.lag_run >= self.warn_steps:
            self._warn("lag", (
                f"resure warning (lag): nothing flagged for {self.lag_run} steps while every "
                f"group's batch loss sat below its running mean, far under tau: the "
                f"{self.config.stats_kind} statistics lag behind the falling loss and ReSURE "
                f"acts as plain SFT; {FIX} track the loss"))
        if self.collapse_run >= self.warn_steps:
            self._warn("collapse", (
                f"resure warning (collapse): more than half of the units flagged for "
                f"{self.collapse_run} steps: with --stats-update {self.config.stats_update} "
                f"the statistics see only losses below tau, so sigma shrinks and tau keeps "
                f"falling; {FIX} avoid it"))

    def _warn(self, kind, message):
        if kind not in self.warned:
            self.warned.append(kind)
            self.pending.append(message)

    def take_warnings(self):
        out = self.pending
        self.pending = []
        return out

    def take_records(self):
        out = self.records
        self.records = []
        return out

    def state_dict(self):
        return {"lag_run": self.lag_run, "collapse_run": self.collapse_run,
                "warned": list(self.warned)}

    def load_state_dict(self, s):
        self.lag_run = int(s["lag_run"])
        self.collapse_run = int(s["collapse_run"])
        self.warned = list(s["warned"])
        self.pending = []               # a warning raised after the snapshot is raised again


def _stat(reduce, x):
    return _num(reduce(x)) if len(x) else None


def _label(values, i):
    return None if values is None else int(values[i])


# --- Eq. 7: the reweighted loss ------------------------------------------------------------------
def reweighted_loss(unit_losses, unit_tokens, weights, norm="sample", total_units=None,
                    total_tokens=None, world_size=1):
    """The mean of Eq. 7's l~ = w * l, w constant: sample: sum w*l / total_units; token:
    sum w*l*n_tokens / total_tokens. total_* count every rank's and micro-batch's units of the
    optimizer step (default: this call's); DDP averages gradients over ranks, so world_size
    multiplies the result back to the single-process gradient. Units with w = 0 or a non-finite
    loss are left out (no 0 * nan)."""
    if torch.is_tensor(weights):
        weights = weights.detach().cpu()
    w = torch.as_tensor(np.asarray(weights, np.float64))
    if w.shape != unit_losses.shape:
        raise ReSUREError(f"resure: {tuple(w.shape)} weights for {tuple(unit_losses.shape)} "
                          "unit losses")
    w = w.to(unit_losses.device, unit_losses.dtype)
    keep = (w > 0) & torch.isfinite(unit_losses.detach())
    if norm == "sample":
        total = len(unit_losses) if total_units is None else total_units
        per_unit = 1
    elif norm == "token":
        total = int(unit_tokens.sum()) if total_tokens is None else total_tokens
        per_unit = unit_tokens.to(unit_losses.device, unit_losses.dtype)[keep]
    else:
        raise ReSUREError(f"resure: norm must be 'sample' or 'token', got {norm!r}")
    return (w[keep] * unit_losses[keep] * per_unit).sum() / max(total, 1) * world_size


# --- static pre-filtering baseline (paper Sec. 5.2) ----------------------------------------------
def prefilter(scores, keep=0.75):
    """Keep the lowest-scoring fraction of a dataset (train.py scores by the base model's loss, our
    stand-in for the paper's reward model, or by -score from --prefilter-scores): floor(keep * n +
    0.5) samples, ties broken by index, non-finite scores last. Returns the indices, ascending."""
    s = _np(scores, np.float64, "scores")
    if not 0 < keep <= 1:
        raise ReSUREError(f"resure: prefilter keep must be in (0, 1], got {keep}")
    order = np.lexsort((np.arange(len(s)), np.where(np.isfinite(s), s, np.inf)))
    return np.sort(order[:int(math.floor(keep * len(s) + 0.5))])
