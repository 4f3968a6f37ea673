"""The report code the experiments share (bench/noise.py, bench/real_noise.py): number formats and
markdown tables, the statistics of paired comparisons, the sentences drawn from them, and pictures.

Statistics. A comparison pairs two settings unit by unit (by seed, or by held-out dialogue) and
reports n, the mean paired difference, its 95 % t-interval (Student t with n - 1 degrees of freedom)
and the two-sided p of the paired t-test; a table's comparisons form one family, whose p are
Holm-adjusted. A difference is resolved when its Holm-adjusted p is below 0.05; the report's words
("beats", "flattens", bold) are kept for those, every other comparison reads "no difference
resolved". The t distribution is computed here (its tail through the regularized incomplete beta
function), so the reports need no scipy; the tests check it against scipy.stats.

Where only each setting's count of right answers on one test set is kept (the baselines' single
runs), two settings are compared as independent proportions: Newcombe's score interval of the
difference (method 10 of Newcombe 1998, from the two Wilson intervals) and the two-sided p of the
pooled z-test. Answers to the same test questions are positively correlated, so the unpaired
interval is wider than a paired one would be.
"""
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from eval import spearman

ALPHA = 0.05  # the family-wise error rate of a table's comparisons
CONFIDENCE = 0.95  # the level of every interval shown
LEVEL = f"{100 * CONFIDENCE:g} %"
NO_DIFFERENCE = "no difference resolved"


# ------------------------------------------------------------------------------------------ formats
def fixed(x, digits=2, missing="n/a"):
    """x with `digits` decimals; `missing` for None, nan and inf."""
    if x is None or not math.isfinite(x):
        return missing
    return f"{x:.{digits}f}"


def signed(x, digits=2, missing="n/a"):
    if x is None or not math.isfinite(x):
        return missing
    return f"{x:+.{digits}f}"


def percent(x):
    """A share as a whole percentage: 0.425 -> '42%'."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.0f}%"


def mean_sd_text(mean, sd, scale=1.0, digits=1, sign=False):
    """'mean ± sd' scaled (sd left out when there is none)."""
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    if math.isfinite(sd):
        text += f" ± {sd * scale:.{digits}f}"
    return text


def row(cells):
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def head(cells):
    """A markdown table's header row and its rule."""
    return [row(cells), "|" + "---|" * len(cells)]


# ----------------------------------------------------------------------------------- t distribution
def _beta_fraction(x, a, b):
    """The continued fraction of the incomplete beta function (modified Lentz), converging for x <
    (a+1)/(a+b+2)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(x, a, b, y=None):
    """I_x(a, b), the regularized incomplete beta function; y = 1 - x when the caller knows it more
    precisely."""
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log(y) - log_beta)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(y, b, a) / b


def t_tail(t, df):
    """P(T > t) for Student's t with df degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    square = t * t
    # P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)
    two_sided = regularized_beta(df / (df + square), df / 2.0, 0.5, y=square / (df + square))
    if t >= 0:
        return two_sided / 2.0
    return 1.0 - two_sided / 2.0


def t_quantile(p, df):
    """The t with P(T <= t) = p for Student's t with df degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be inside (0, 1), got {p}")
    t = _upper_point(min(p, 1.0 - p), df)
    if p < 0.5:
        return -t
    return t


def _upper_point(tail, df):
    """The t >= 0 with P(T > t) = tail (<= 1/2), by bisection: t_tail falls as t grows."""
    low = 0.0
    high = 1.0
    while t_tail(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if t_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


# -------------------------------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    """One paired comparison: `name` against its reference in `setting` (the differences name -
    reference). low / high: the 95 % t-interval of the mean difference; p: the paired t-test's
    two-sided p; p_holm: p adjusted over the comparisons of its table (nan where no test was
    possible: fewer than two pairs)."""
    name: str
    setting: str
    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float
    p_holm: float = math.nan

    @property
    def resolved(self):
        return self.p_holm < ALPHA


def mean_sd(xs):
    """Mean and sample std of the finite values (nan, nan when there are none; sd nan for one)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    if len(xs) == 1:
        return float(xs[0]), math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1))


def paired_differences(values, reference):
    """values[k] - reference[k] over the keys (seeds) both have a finite value for, in key order."""
    keys = sorted(k for k in values if k in reference)
    out = []
    for k in keys:
        a = values[k]
        b = reference[k]
        if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
            continue
        out.append(a - b)
    return out


def compare(name, setting, differences):
    """The paired t statistics of a list of differences."""
    d = np.asarray(differences, np.float64)
    n = len(d)
    if n == 0:
        return Comparison(name, setting, 0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n == 1:
        return Comparison(name, setting, 1, mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:  # every pair differs by the same amount: no spread to test against
        p = 1.0 if mean == 0.0 else 0.0
        return Comparison(name, setting, n, mean, sd, mean, mean, p)
    half = t_quantile((1.0 + CONFIDENCE) / 2.0, n - 1) * se
    p = 2.0 * t_tail(abs(mean) / se, n - 1)
    return Comparison(name, setting, n, mean, sd, mean - half, mean + half, min(1.0, p))


def wilson(hits, total, z):
    """The Wilson score interval of the proportion hits / total."""
    share = hits / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    half /= 1 + z * z / total
    return centre - half, centre + half


def compare_proportions(name, setting, hits, total, reference_hits, reference_total):
    """hits / total against reference_hits / reference_total as independent proportions: the
    difference, Newcombe's 95 % score interval (method 10) and the pooled z-test's two-sided p.
    n is the smaller of the two totals; sd is not defined here (nan)."""
    z = NormalDist().inv_cdf((1.0 + CONFIDENCE) / 2.0)
    share = hits / total
    reference = reference_hits / reference_total
    mean = share - reference
    low, high = wilson(hits, total, z)
    reference_low, reference_high = wilson(reference_hits, reference_total, z)
    below = math.hypot(share - low, reference_high - reference)
    above = math.hypot(high - share, reference - reference_low)
    pooled = (hits + reference_hits) / (total + reference_total)
    se = math.sqrt(pooled * (1 - pooled) * (1 / total + 1 / reference_total))
    if se == 0.0:  # both all right or both all wrong
        p = 1.0
    else:
        p = 2.0 * NormalDist().cdf(-abs(mean) / se)
    n = min(total, reference_total)
    return Comparison(name, setting, n, mean, math.nan, mean - below, mean + above, p)


def holm(ps):
    """Holm's step-down adjustment of a family of p values; nan entries (no test) stay nan and do
    not count."""
    tested = sorted((p, i) for i, p in enumerate(ps) if math.isfinite(p))
    m = len(tested)
    adjusted = [math.nan] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def family(comparisons):
    """The comparisons of one table with their Holm-adjusted p filled in (returned for chaining)."""
    for c, p in zip(comparisons, holm([c.p for c in comparisons])):
        c.p_holm = p
    return comparisons


def spearman_or_nan(x, y):
    """Spearman's rho of the finite pairs (eval.spearman), nan with fewer than two of them."""
    pairs = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
    if len(pairs) < 2:
        return math.nan
    return spearman([a for a, _ in pairs], [b for _, b in pairs])


# --------------------------------------------------------------------------------- tables and words
def p_text(p):
    if not math.isfinite(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


def interval_text(c, scale=1.0, digits=3):
    """'[low, high]' of a comparison, scaled."""
    if not math.isfinite(c.low):
        return "n/a"
    return f"[{c.low * scale:+.{digits}f}, {c.high * scale:+.{digits}f}]"


def verdict(c):
    """'resolved' when the Holm-adjusted p is below ALPHA, else NO_DIFFERENCE (the reason where n <
    2)."""
    if c.resolved:
        return "resolved"
    if c.n < 2:
        return f"{NO_DIFFERENCE} (n = {c.n}: no interval)"
    return NO_DIFFERENCE


def comparison_table(comparisons, names, scale=1.0, digits=3):
    """A family as a markdown table: `names` head the first two columns (name, setting); the mean is
    bold only when resolved."""
    lines = head([*names, "n", "mean difference", f"{LEVEL} t-interval", "Holm p", ""])
    for c in comparisons:
        mean = signed(c.mean * scale, digits)
        if c.resolved:
            mean = f"**{mean}**"
        interval = interval_text(c, scale, digits)
        lines.append(row([c.name, c.setting, c.n, mean, interval, p_text(c.p_holm), verdict(c)]))
    return lines


def difference_text(c, scale=1.0, digits=3, unit=""):
    """'+5.0 points (n = 5, 95 % CI [+1.1, +8.9], Holm p 0.031)': a comparison in a sentence."""
    amount = signed(c.mean * scale, digits) + (f" {unit}" if unit else "")
    if not math.isfinite(c.low):
        return f"{amount} (n = {c.n}, no interval)"
    interval = interval_text(c, scale, digits)
    return f"{amount} (n = {c.n}, {LEVEL} CI {interval}, Holm p {p_text(c.p_holm)})"


def family_note(kind):
    """The sentence under a comparison table: what is paired, and what resolved means."""
    return (f"Paired by {kind}: n pairs, the mean of their differences and its {LEVEL} t-interval "
            "(Student t, n - 1 degrees of freedom); Holm p: the paired t-test's p adjusted over "
            f"this table's comparisons. Resolved (bold): Holm p < {ALPHA}; otherwise "
            f"{NO_DIFFERENCE}.")


# ----------------------------------------------------------------------------------------- pictures
def pyplot():
    """matplotlib.pyplot on the Agg backend; None, said in one line, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, no figures written "
              "(pip install matplotlib for them)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def interval_figure(plt, path, comparisons, title, scale=1.0, xlabel="difference"):
    """The comparisons as points with their 95 % t-intervals, filled where resolved; written to
    path."""
    shown = [c for c in comparisons if math.isfinite(c.mean)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shown) + 1.5))
    for y, c in enumerate(shown):
        if math.isfinite(c.low):
            ax.plot([c.low * scale, c.high * scale], [y, y], color="C0")
        face = "C0" if c.resolved else "white"
        ax.plot([c.mean * scale], [y], marker="o", color="C0", markerfacecolor=face)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(shown)), [f"{c.name}, {c.setting}" for c in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
