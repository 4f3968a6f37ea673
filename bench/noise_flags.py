"""The flagging tables of the noise experiment's results.md: every unit decision after the warm-up
against the injected noise labels, pooled over seeds (counts summed, precision and recall recomputed
from the sums), per mixture, per noise kind, per turn depth and per detector view; and the static
pre-filter as a detector of noisy dialogues. Called by bench/noise_report.py."""
import math

from bench_report import fixed, head, mean_sd, percent, row


def pooled(results, variant, mixture, section, view=None):
    """Flagging counts of a (variant, mixture) summed over seeds, precision/recall recomputed from
    the sums. section: "all" -> {"all": counts}; "by_kind" / "by_depth" -> {key: counts}; view: one
    detector view."""
    total = {}
    for r in results:
        if r["variant"] != variant or r["mixture"] != mixture or "flagging" not in r:
            continue
        flags = r["flagging"]
        if view is not None:
            flags = flags.get("by_view", {}).get(view)
        if not flags or section not in flags:
            continue
        node = flags[section]
        if section == "all":
            node = {"all": node}
        for key, d in node.items():
            t = total.setdefault(key, {"units": 0, "noisy": 0, "flagged": 0, "tp": 0})
            for c in t:
                t[c] += d[c]
    for t in total.values():
        t["precision"] = t["tp"] / t["flagged"] if t["flagged"] else math.nan
        t["recall"] = t["tp"] / t["noisy"] if t["noisy"] else math.nan
        t["flag_rate"] = t["flagged"] / t["units"] if t["units"] else math.nan
    return total


def flag_sections(cx):
    """The flagging part of results.md (cx: the report's noise_report.Context)."""
    flaggers = [v for v in cx.methods if any("flagging" in r for r in cx.ok if r["variant"] == v)]
    lines = []
    if flaggers:
        lines += flag_table(cx, flaggers) + kind_table(cx, flaggers) + depth_table(cx, flaggers)
        lines += view_table(cx, flaggers)
    return lines + prefilter_line(cx)


def flag_table(cx, flaggers):
    title = ("## Flagging against the injected noise labels (every unit decision after the "
             "warm-up, pooled over seeds)")
    lines = ["", title, ""]
    lines += head(["method", "mixture", "units", "noisy", "flagged", "precision", "recall",
                   "mean weight noisy / clean", "lag / collapse warnings"])
    for v in flaggers:
        for mix in cx.mixes:
            t = pooled(cx.ok, v, mix, "all").get("all")
            if not t:
                continue
            runs = [r for r in cx.ok
                    if r["variant"] == v and r["mixture"] == mix and "flagging" in r]
            noisy = mean_sd([r["flagging"]["all"]["weight_noisy"] for r in runs])[0]
            clean = mean_sd([r["flagging"]["all"]["weight_clean"] for r in runs])[0]
            warned = sorted({w for r in runs for w in r.get("warnings", [])})
            lines.append(row([v, mix, t["units"], t["noisy"], t["flagged"], percent(t["precision"]),
                              percent(t["recall"]), f"{fixed(noisy)} / {fixed(clean)}",
                              ", ".join(warned) or "-"]))
    return lines


def has_views(cx, v):
    return any("by_view" in r["flagging"] for r in cx.ok if r["variant"] == v and "flagging" in r)


def kind_table(cx, flaggers):
    last = cx.mixes[-1]
    kinds = sorted({k for r in cx.ok if r["mixture"] == last and "flagging" in r
                    for k in r["flagging"]["by_kind"]})
    kinds = (["clean"] if "clean" in kinds else []) + [k for k in kinds if k != "clean"]
    title = (f"### Per noise kind, mixture {last}: flag rate (recall for a noise kind, "
             "false-positive rate for clean); per detector view where there are two")
    lines = ["", title, ""] + head(["method", *kinds])
    for v in flaggers:
        views = [None] + (["loss", "gain"] if has_views(cx, v) else [])
        for view in views:
            t = pooled(cx.ok, v, last, "by_kind", view)
            label = v + (f" (view {view})" if view else "")
            cells = [f"{percent(t[k]['flag_rate'])} (n={t[k]['units']})" if k in t else "-"
                     for k in kinds]
            lines.append(row([label, *cells]))
    return lines


def depth_table(cx, flaggers):
    last = cx.mixes[-1]
    depths = sorted({int(d) for r in cx.ok if r["mixture"] == last and "flagging" in r
                     for d in r["flagging"]["by_depth"]})
    lines = ["", f"### Per turn depth, mixture {last}: precision / recall (noisy share)", ""]
    lines += head(["method"] + [f"turn {d}" for d in depths])
    for v in flaggers:
        t = {int(k): x for k, x in pooled(cx.ok, v, last, "by_depth").items()}
        cells = []
        for d in depths:
            if d not in t or not t[d]["units"]:
                cells.append("-")
                continue
            share = percent(t[d]["noisy"] / t[d]["units"])
            cells.append(f"{percent(t[d]['precision'])} / {percent(t[d]['recall'])} ({share})")
        lines.append(row([v, *cells]))
    return lines


def view_table(cx, flaggers):
    gainers = [v for v in flaggers if has_views(cx, v)]
    if not gainers:
        return []
    lines = ["", "### Per detector view (pooled over seeds)", ""]
    lines += head(["method", "mixture", "view", "flagged", "precision", "recall"])
    for v in gainers:
        for mix in cx.mixes:
            for view in ("loss", "gain"):
                t = pooled(cx.ok, v, mix, "all", view).get("all")
                if t:
                    lines.append(row([v, mix, view, t["flagged"], percent(t["precision"]),
                                      percent(t["recall"])]))
    return lines


def prefilter_line(cx):
    pre = cx.saved.get("prefilter") or {}
    if not pre:
        return []
    parts = []
    for mix in cx.mixes:
        t = {k: sum(p[mix][k] for p in pre.values() if mix in p)
             for k in ("dropped_noisy", "dropped", "noisy")}
        if t["noisy"]:
            precision = percent(t["dropped_noisy"] / max(1, t["dropped"]))
            recall = percent(t["dropped_noisy"] / t["noisy"])
            parts.append(f"{mix}: precision {precision}, recall {recall}")
    return ["", "Static pre-filtering (base-model loss, keep 0.75; the paper ranks with a reward "
            "model) as a detector of dialogues with any noisy turn, pooled over seeds: "
            + "; ".join(parts) + "."]
