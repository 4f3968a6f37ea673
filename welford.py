"""Running loss statistics for ReSURE's thresholds: Welford's algorithm (paper Sec. 3, Eqs. 2-4) and three
tracking estimators that go beyond the paper (cumulative statistics lag a falling loss and, fed only the units
judged reliable, collapse; see the README).

One interface: update(x), .count, .mean, .std, state_dict(), load_state_dict(s).
  Welford      cumulative mean and sample (n-1) variance in float64 (the paper, Eqs. 2-4), mergeable (Chan et al.)
  EMA(decay)   equal weights while fewer than 1/decay values were seen, then exponential weights (Finch 2009)
  Window(k)    exact mean and sample std of the last k values
  MedianMAD(k) median and 1.4826 * MAD of the last k values as mean and std: robust, needs no exclusion
GroupedStats keeps one estimator per turn group. States are plain JSON; Python floats round-trip through json exactly.
"""
import math
import statistics
from collections import deque


class StateError(ValueError):
    pass


class Estimator:
    kind, params = None, ()

    @property
    def std(self):
        return math.sqrt(self.var)

    def _check(self, s):
        if s.get("kind") != self.kind or any(s.get(p) != getattr(self, p) for p in self.params):
            raise StateError(f"estimator state {({k: s.get(k) for k in ('kind',) + self.params})} does not match "
                             f"{self.kind} {({p: getattr(self, p) for p in self.params})}")


class Welford(Estimator):
    kind = "welford"

    def __init__(self):
        self.count, self._mean, self.m2 = 0, 0.0, 0.0

    def update(self, x):
        x = float(x)
        self.count += 1
        delta = x - self._mean
        self._mean += delta / self.count            # Eq. 2: mu_n = mu_{n-1} + (x - mu_{n-1}) / n
        self.m2 += delta * (x - self._mean)         # Eq. 3: M2_n = M2_{n-1} + (x - mu_{n-1}) (x - mu_n)

    def merge(self, other):
        """Chan et al. (1979): self becomes the statistics of both streams."""
        n = self.count + other.count
        if other.count:
            delta = other._mean - self._mean
            self._mean += delta * other.count / n
            self.m2 += other.m2 + delta * delta * self.count * other.count / n
            self.count = n
        return self

    @property
    def mean(self):
        return self._mean if self.count else math.nan

    @property
    def var(self):                                  # Eq. 4: sigma^2 = M2 / (n - 1)
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    def state_dict(self):
        return {"kind": self.kind, "count": self.count, "mean": self._mean, "m2": self.m2}

    def load_state_dict(self, s):
        self._check(s)
        self.count, self._mean, self.m2 = int(s["count"]), float(s["mean"]), float(s["m2"])


class EMA(Estimator):
    """Welford while fewer than 1/decay values were seen (the newest weight 1/n falls to decay), then Finch (2009):
    mean += decay * (x - mean); var = (1 - decay) * (var + decay * (x - mean_old)^2), from the sample variance."""
    kind, params = "ema", ("decay",)

    def __init__(self, decay=0.05):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.w, self.var = float(decay), Welford(), math.nan

    count = property(lambda self: self.w.count)
    mean = property(lambda self: self.w.mean)

    def update(self, x):
        x, d = float(x), self.decay
        if self.w.count < 1.0 / d:                  # equal-weight phase
            self.w.update(x)
            self.var = self.w.var
        else:
            delta = x - self.w._mean
            self.w._mean += d * delta
            self.var = (1.0 - d) * (self.var + d * delta * delta)
            self.w.count += 1

    def state_dict(self):
        return {"kind": self.kind, "decay": self.decay, "welford": self.w.state_dict(),
                "var": self.var if self.count > 1 else None}                   # no NaN in the JSON

    def load_state_dict(self, s):
        self._check(s)
        self.w.load_state_dict(s["welford"])
        self.var = math.nan if s["var"] is None else float(s["var"])


class Window(Estimator):
    """Exact two-pass mean and sample variance of the last k values."""
    kind, params = "window", ("k",)

    def __init__(self, k=256):
        if int(k) < 2:
            raise ValueError(f"window must hold at least 2 values, got {k}")
        self.k, self.values = int(k), deque(maxlen=int(k))

    count = property(lambda self: len(self.values))

    def update(self, x):
        self.values.append(float(x))

    @property
    def mean(self):
        return math.fsum(self.values) / len(self.values) if self.values else math.nan

    @property
    def var(self):
        m, n = self.mean, len(self.values)
        return math.fsum((v - m) ** 2 for v in self.values) / (n - 1) if n > 1 else math.nan

    def state_dict(self):
        return {"kind": self.kind, "k": self.k, "values": list(self.values)}

    def load_state_dict(self, s):
        self._check(s)
        self.values = deque((float(v) for v in s["values"]), maxlen=self.k)


class MedianMAD(Window):
    """Median and 1.4826 * median absolute deviation of the last k values (1.4826 * MAD = sigma for a normal)."""
    kind = "mad"

    @property
    def mean(self):
        return statistics.median(self.values) if self.values else math.nan

    @property
    def std(self):
        m = self.mean
        return 1.4826 * statistics.median(abs(v - m) for v in self.values) if len(self.values) > 1 else math.nan

    var = property(lambda self: self.std ** 2)


ESTIMATORS = {"welford": Welford, "ema": EMA, "window": Window, "mad": MedianMAD}


def make_estimator(kind="welford", ema_decay=0.05, window=256):
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown statistic {kind!r}: choose one of {', '.join(ESTIMATORS)}")
    return {"ema": lambda: EMA(ema_decay), "window": lambda: Window(window),
            "mad": lambda: MedianMAD(window)}.get(kind, Welford)()


class GroupedStats:
    """One estimator per turn group b (int >= 1), made on first use by make_estimator(kind, ...)."""

    def __init__(self, kind="welford", ema_decay=0.05, window=256):
        make_estimator(kind, ema_decay, window)     # fail now on a bad setting
        self.kind, self.ema_decay, self.window, self.groups = kind, float(ema_decay), int(window), {}

    def __getitem__(self, b):
        if int(b) not in self.groups:
            self.groups[int(b)] = make_estimator(self.kind, self.ema_decay, self.window)
        return self.groups[int(b)]

    def update(self, b, x):
        self[b].update(x)

    def state_dict(self):
        return {"kind": self.kind, "ema_decay": self.ema_decay, "window": self.window,
                "groups": {str(b): e.state_dict() for b, e in sorted(self.groups.items())}}

    def load_state_dict(self, s):
        for key in ("kind", "ema_decay", "window"):
            if s.get(key) != getattr(self, key):
                raise StateError(f"grouped statistics state has {key}={s.get(key)!r}, expected {getattr(self, key)!r}")
        self.groups = {}
        for b, es in s["groups"].items():
            self[int(b)].load_state_dict(es)
