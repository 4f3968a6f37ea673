"""Running loss statistics for ReSURE's thresholds: Welford's algorithm (paper Sec. 3, Eqs. 2-4)
and three tracking estimators beyond the paper (cumulative statistics lag a falling loss and, fed
only the units judged reliable, collapse; see docs/method.md). Each has update(x), .count, .mean, .std
and a plain-JSON state_dict() / load_state_dict(s):
  Welford      cumulative mean and sample (n-1) variance in float64 (Eqs. 2-4), mergeable
  EMA(decay)   equal weights while fewer than 1/decay values were seen, then exponential weights
  Window(k)    exact mean and sample std of the last k values
  MedianMAD(k) median and 1.4826 * MAD of the last k values as mean and std: robust, needs no
               exclusion
GroupedStats keeps one estimator per turn group.
"""
import math
import statistics
from collections import deque


class StateError(ValueError):
    pass


def welford_step(count, mean, m2, x):
    """One value x into (count, mean, M2): Eqs. 2-3. Returns the new (count, mean, M2)."""
    count += 1
    delta = x - mean
    mean += delta / count                   # Eq. 2: mu_n = mu_{n-1} + (x - mu_{n-1}) / n
    m2 += delta * (x - mean)                # Eq. 3: M2_n = M2_{n-1} + (x - mu_{n-1}) (x - mu_n)
    return count, mean, m2


def sample_variance(count, m2):
    """Eq. 4: sigma^2 = M2 / (n - 1); NaN below two values."""
    if count < 2:
        return math.nan
    return m2 / (count - 1)


class Estimator:
    """What every estimator shares: mean from a running mu (NaN before the first value), std from
    var, and the check that a state is this estimator's."""
    kind = None
    params = ()                             # the settings a state must match, e.g. ("decay",)

    @property
    def mean(self):
        return self.mu if self.count else math.nan

    @property
    def std(self):
        return math.sqrt(self.var)

    def _check(self, s):
        saved = {key: s.get(key) for key in ("kind", *self.params)}
        mine = {p: getattr(self, p) for p in self.params}
        if saved["kind"] != self.kind or any(saved[p] != mine[p] for p in self.params):
            raise StateError(f"estimator state {saved} does not match {self.kind} {mine}")


class Welford(Estimator):
    """The paper's cumulative statistics: every value seen weighs the same."""
    kind = "welford"

    def __init__(self):
        self.count = 0
        self.mu = 0.0                       # the running mean
        self.m2 = 0.0                       # sum of squared deviations from the mean

    def update(self, x):
        self.count, self.mu, self.m2 = welford_step(self.count, self.mu, self.m2, float(x))

    def merge(self, other):
        """Chan et al. (1979): self becomes the statistics of both streams."""
        n = self.count + other.count
        if other.count:
            delta = other.mu - self.mu
            self.mu += delta * other.count / n
            self.m2 += other.m2 + delta * delta * self.count * other.count / n
            self.count = n
        return self

    @property
    def var(self):
        return sample_variance(self.count, self.m2)

    def state_dict(self):
        return {"kind": self.kind, "count": self.count, "mean": self.mu, "m2": self.m2}

    def load_state_dict(self, s):
        self._check(s)
        self.count = int(s["count"])
        self.mu = float(s["mean"])
        self.m2 = float(s["m2"])


class EMA(Estimator):
    """Welford while fewer than 1/decay values were seen (the newest weight 1/n falls to decay),
    then Finch (2009), from the sample variance:
        mean += decay * (x - mean_old);  var = (1 - decay) * (var + decay * (x - mean_old)^2).
    Its state keeps the equal-weight phase as a Welford state, M2 as it stood at the switch."""
    kind = "ema"
    params = ("decay",)

    def __init__(self, decay=0.05):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.count = 0
        self.mu = 0.0                       # the running mean
        self.m2 = 0.0                       # Welford's M2 of the equal-weight phase
        self.var = math.nan

    def update(self, x):
        x = float(x)
        if self.count < 1.0 / self.decay:   # equal-weight phase: Eqs. 2-4
            self.count, self.mu, self.m2 = welford_step(self.count, self.mu, self.m2, x)
            self.var = sample_variance(self.count, self.m2)
            return
        delta = x - self.mu
        self.mu += self.decay * delta
        self.var = (1.0 - self.decay) * (self.var + self.decay * delta * delta)
        self.count += 1

    def state_dict(self):
        welford = {"kind": Welford.kind, "count": self.count, "mean": self.mu, "m2": self.m2}
        var = self.var if self.count > 1 else None                  # no NaN in the JSON
        return {"kind": self.kind, "decay": self.decay, "welford": welford, "var": var}

    def load_state_dict(self, s):
        self._check(s)
        start = Welford()
        start.load_state_dict(s["welford"])
        self.count = start.count
        self.mu = start.mu
        self.m2 = start.m2
        self.var = math.nan if s["var"] is None else float(s["var"])


class Window(Estimator):
    """Exact two-pass mean and sample variance of the last k values."""
    kind = "window"
    params = ("k",)

    def __init__(self, k=256):
        if int(k) < 2:
            raise ValueError(f"window must hold at least 2 values, got {k}")
        self.k = int(k)
        self.values = deque(maxlen=self.k)

    @property
    def count(self):
        return len(self.values)

    def update(self, x):
        self.values.append(float(x))

    @property
    def mean(self):
        return math.fsum(self.values) / len(self.values) if self.values else math.nan

    @property
    def var(self):
        if len(self.values) < 2:
            return math.nan
        m = self.mean
        return math.fsum((v - m) ** 2 for v in self.values) / (len(self.values) - 1)

    def state_dict(self):
        return {"kind": self.kind, "k": self.k, "values": list(self.values)}

    def load_state_dict(self, s):
        self._check(s)
        self.values = deque((float(v) for v in s["values"]), maxlen=self.k)


class MedianMAD(Window):
    """Median and 1.4826 * median absolute deviation (= sigma for a normal distribution) of the
    last k values."""
    kind = "mad"

    @property
    def mean(self):
        return statistics.median(self.values) if self.values else math.nan

    @property
    def std(self):
        if len(self.values) < 2:
            return math.nan
        m = self.mean
        return 1.4826 * statistics.median(abs(v - m) for v in self.values)

    @property
    def var(self):
        return self.std ** 2


ESTIMATORS = {"welford": Welford, "ema": EMA, "window": Window, "mad": MedianMAD}


def make_estimator(kind="welford", ema_decay=0.05, window=256):
    """A fresh estimator of this kind; ema_decay and window set the kinds that take them."""
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown statistic {kind!r}: choose one of {', '.join(ESTIMATORS)}")
    if kind == "ema":
        return EMA(ema_decay)
    if kind in ("window", "mad"):
        return ESTIMATORS[kind](window)
    return Welford()


class GroupedStats:
    """One estimator per turn group b (int >= 1), made on first use by make_estimator(kind, ...)."""
    SETTINGS = ("kind", "ema_decay", "window")

    def __init__(self, kind="welford", ema_decay=0.05, window=256):
        make_estimator(kind, ema_decay, window)     # fail now on a bad setting
        self.kind = kind
        self.ema_decay = float(ema_decay)
        self.window = int(window)
        self.groups = {}

    def __getitem__(self, b):
        b = int(b)
        if b not in self.groups:
            self.groups[b] = make_estimator(self.kind, self.ema_decay, self.window)
        return self.groups[b]

    def update(self, b, x):
        self[b].update(x)

    def state_dict(self):
        groups = {str(b): est.state_dict() for b, est in sorted(self.groups.items())}
        return {"kind": self.kind, "ema_decay": self.ema_decay, "window": self.window,
                "groups": groups}

    def load_state_dict(self, s):
        for key in self.SETTINGS:
            if s.get(key) != getattr(self, key):
                raise StateError(f"grouped statistics state has {key}={s.get(key)!r}, "
                                 f"expected {getattr(self, key)!r}")
        self.groups = {}
        for b, est in s["groups"].items():
            self[int(b)].load_state_dict(est)
