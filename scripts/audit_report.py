"""scripts/audit.py's report: OUT/report.json, OUT/report.md and a picture per turn group
(OUT/group_B.png, with matplotlib), all from the per-unit lines audit.py writes to OUT/units.jsonl,
the groups' standings, and the conversations (for the text of the most suspect units).

Against noise labels ("noisy", "noise_type" on assistant messages), per noise kind: the units of
that kind against the clean ones (units of other kinds left out), the flags' precision and recall
(either view, the loss view, the gain view), and the ROC AUC of four scores: z_loss; z_gain (above
0.5 the kind gains more from its context than clean units, below less); |z_gain|, the distance
from the band's centre; excess, the sigmas beyond the nearest bound (> 0: flagged). A unit without
a score (its group too small for statistics) is left out of that AUC.
"""
import json
import math
import os

import numpy as np

from eval import rankdata

TEXT_CHARS = 400
SCORES = {"auc_loss": "z_loss", "auc_gain": "z_gain", "auc_gain_outside": "abs_z_gain",
          "auc_excess": "excess"}
VIEWS = {"": None, "loss_": "high loss", "gain_": "gain"}   # key prefix: what the reason holds
FLOOR_OVER = {"all": "every unit's", "flagged": "the flagged units'"}
HOW_TO_DRAW = ("Pictures need matplotlib: `pip install matplotlib`, then the same command again "
               "(scores.jsonl is kept: only the judging and this report are redone).")


# --- numbers -----------------------------------------------------------------------------------
def roc_auc(scores, positive):
    """P(a positive unit scores above a negative one), ties counting one half: Mann-Whitney's U
    over n_pos * n_neg, from average ranks. None without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def kinds_of(line):
    """A unit's noise kinds: its turn's, or a dialogue's noisy turns' ("unspecified" if unnamed)."""
    if not line.get("noisy"):
        return set()
    kinds = line.get("noise_type")
    if not isinstance(kinds, list):
        kinds = [kinds]
    return {str(k) for k in kinds if k} or {"unspecified"}


def score_of(line, name):
    if name == "abs_z_gain":
        return None if line["z_gain"] is None else abs(line["z_gain"])
    return line[name]


def precision_recall(flags, positive):
    tp = int((flags & positive).sum())
    precision = tp / int(flags.sum()) if flags.any() else None
    recall = tp / int(positive.sum()) if positive.any() else None
    return {"precision": precision, "recall": recall}


def kind_row(lines, positive):
    """One noise kind (positive) against the clean units: precision / recall per view, AUCs."""
    reasons = [line["reason"] or "" for line in lines]
    row = {"units": len(lines), "noisy": int(positive.sum())}
    for prefix, view in VIEWS.items():
        if view is None:
            flags = np.array([line["flagged"] for line in lines])
        else:
            flags = np.array([view in r for r in reasons])
        row.update({prefix + key: v for key, v in precision_recall(flags, positive).items()})
    for key, name in SCORES.items():
        scored = [(score_of(line, name), p) for line, p in zip(lines, positive)
                  if score_of(line, name) is not None]
        row[key] = roc_auc([s for s, _ in scored], [p for _, p in scored])
    return row


def noise_quality(lines):
    """{kind: row} for "any" noisy unit and each kind; None when no unit has a noise label."""
    labelled = [line for line in lines if line.get("noisy") is not None]
    if not labelled:
        return None
    kinds = sorted(set().union(*(kinds_of(line) for line in labelled)))
    out = {}
    for kind in ["any", *kinds]:
        chosen = [line for line in labelled
                  if not line["noisy"] or kind == "any" or kind in kinds_of(line)]
        positive = np.array([bool(line["noisy"]) for line in chosen])
        out[kind] = kind_row(chosen, positive)
    return out


def finite(x):
    if math.isfinite(x):
        return float(x)
    return None


def group_rows(j, lines):
    """Per turn group: units, the loss view (mu, sigma, tau), the gain view (mu, sigma, band), and
    how many each view flags."""
    rows = []
    for b, st in j["groups"].items():
        mine = [line for line in lines if line["group"] == b]
        reasons = [line["reason"] or "" for line in mine]
        flagged = sum(line["flagged"] for line in mine)
        rows.append({"group": b, "units": len(mine), "flagged": flagged,
                     "flagged_share": flagged / len(mine),
                     "high_loss": sum("high loss" in r for r in reasons),
                     "echo_like": sum("echo-like" in r for r in reasons),
                     "off_topic_like": sum("off-topic-like" in r for r in reasons),
                     "loss": {"mu": finite(st.mu), "sigma": finite(st.sigma),
                              "tau": finite(st.tau), "fed": st.fed},
                     "gain": {"mu": finite(st.mu_g), "sigma": finite(st.sigma_g),
                              "lo": finite(st.lo), "hi": finite(st.hi), "fed": st.fed_g}})
    return rows


def shown_turn(line):
    """The assistant turn a unit's text comes from: its own, or a dialogue's last supervised one."""
    return line["turn"] or max(line["turns"])


def texts(conv, turn):
    """(the user message before assistant turn `turn`, that reply)."""
    msgs = conv["messages"]
    i = [n for n, m in enumerate(msgs) if m["role"] == "assistant"][turn - 1]
    return msgs[i - 1]["content"], msgs[i]["content"]


def suspicion_order(line):
    """Furthest outside first; then by dialogue and turn."""
    excess = line["excess"] if line["excess"] is not None else math.inf
    return -excess, line["dialogue"], line["turn"]


def suspects(lines, convs, top):
    """The `top` flagged units furthest outside their bounds, with the user turn and the reply."""
    flagged = sorted((line for line in lines if line["flagged"]), key=suspicion_order)
    out = []
    for line in flagged[:top]:
        user, reply = texts(convs[line["dialogue"]], shown_turn(line))
        out.append({**line, "shown_turn": shown_turn(line), "user": user, "reply": reply})
    return out


# --- pictures ----------------------------------------------------------------------------------
def draw(lines, groups, out_dir):
    """group_B.png per group: the losses' histogram with tau, and loss against gain with the band.
    None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    files = []
    for b, standing in groups.items():
        mine = [line for line in lines if line["group"] == b and line["loss"] is not None]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        draw_histogram(left, mine, standing)
        draw_scatter(right, mine, standing)
        fig.suptitle(f"turn group {b}: {len(mine)} units")
        fig.tight_layout()
        name = f"group_{b}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def draw_histogram(ax, lines, standing):
    noisy = [line["loss"] for line in lines if line.get("noisy")]
    clean = [line["loss"] for line in lines if not line.get("noisy")]
    labels = ["clean" if noisy else "units", "noisy"]
    ax.hist([clean, noisy], bins=40, stacked=True, color=["tab:blue", "tab:orange"], label=labels)
    if math.isfinite(standing.tau):
        ax.axvline(standing.tau, color="tab:red", label=f"tau = {standing.tau:.3f}")
    ax.set_xlabel("loss (nats per token)")
    ax.set_ylabel("units")
    ax.legend()


def draw_scatter(ax, lines, standing):
    shown = [line for line in lines if line["gain"] is not None]
    for flagged, color in ((False, "tab:blue"), (True, "tab:red")):
        for noisy, marker in ((False, "o"), (True, "x")):
            points = [(x["loss"], x["gain"]) for x in shown
                      if x["flagged"] == flagged and bool(x.get("noisy")) == noisy]
            if points:
                label = ("flagged" if flagged else "kept") + (", noisy" if noisy else "")
                ax.scatter(*zip(*points), s=10, c=color, marker=marker, label=label)
    if math.isfinite(standing.lo) and math.isfinite(standing.hi):
        ax.axhspan(standing.lo, standing.hi, color="tab:green", alpha=0.12, label="gain band")
    if math.isfinite(standing.tau):
        ax.axvline(standing.tau, color="tab:red", linestyle="--", label="tau")
    ax.set_xlabel("loss (nats per token)")
    ax.set_ylabel("context gain (nats per token)")
    ax.legend(fontsize=8)


# --- the files ---------------------------------------------------------------------------------
def write(args, settings, data_report, j, lines, convs):
    """OUT/report.json and OUT/report.md from the judgement j (audit.judge) and the units' lines;
    returns the report."""
    judging = {key: getattr(args, key) for key in ("stats", "stats_update", "alpha", "gain_alpha",
                                                    "floor_percentile", "floor_over", "min_count")}
    pictures = draw(lines, j["groups"], args.out)
    report = {"settings": {**settings, **judging}, "data": data_report.summary(),
              "units": len(lines), "flagged": sum(line["flagged"] for line in lines),
              "eps": j["eps"], "rounds": j["rounds"], "settled": j["settled"],
              "groups": group_rows(j, lines), "noise": noise_quality(lines),
              "suspects": suspects(lines, convs, args.top),
              "pictures": HOW_TO_DRAW if pictures is None else pictures}
    replace(os.path.join(args.out, "report.json"), json.dumps(report, indent=1, ensure_ascii=False))
    replace(os.path.join(args.out, "report.md"), markdown(report))
    return report


def replace(path, text):
    """Whole or absent: written under a temporary name, then renamed."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]


def quoted(who, text):
    if len(text) > TEXT_CHARS:
        text = text[:TEXT_CHARS] + " [...]"
    body = text.replace("\r", "").split("\n")
    return [f"> **{who}:** {body[0]}"] + [f"> {line}" for line in body[1:]]


def markdown(report):
    s = report["settings"]
    adapter = f" + adapter {s['adapter']}" if s["adapter"] else ""
    out = [f"# ReSURE audit of {os.path.basename(s['data'])}", "",
           f"Model {s['model']}{adapter}, chat template {s['chat_template']}, {s['dtype']}; unit: "
           f"{s['unit']}. {report['data']}.", "",
           f"{report['units']} units, {report['flagged']} flagged. Statistics per turn group over "
           f"the whole dataset: {s['stats']} (update: {s['stats_update']}, settled: "
           f"{report['settled']} after {report['rounds']} round(s)); tau = mu + {s['alpha']} sigma "
           f"(Eq. 5); gain band mu_g -+ {s['gain_alpha']} sigma_g. A gain above the band is "
           "echo-like (the reply is far easier to predict in its dialogue than alone: it copies "
           "its context), below it off-topic-like (the dialogue does not help predict it). "
           f"Eq. 6's floor eps = {fmt(report['eps'])}: the {s['floor_percentile']:g}th percentile "
           f"of {FLOOR_OVER[s['floor_over']]} weights, the dataset taken as one batch.", ""]
    out += group_section(report["groups"]) + picture_section(report["pictures"])
    out += noise_section(report["noise"]) + suspect_section(report["suspects"])
    out += ["", "## Files", "", "`units.jsonl`: a line per unit: dialogue (its position among the "
            "file's valid conversations), id, turn (0 for a dialogue unit), turns (the replies it "
            "covers), group, tokens, loss, gain, tau, band (the gain's [lo, hi]), z_loss, z_gain, "
            "excess, flagged, reason, weight, and noisy / noise_type where the data has them. "
            "`report.json`: this report's numbers. `scores.jsonl`: the scores per batch, what a "
            "rerun continues from.", ""]
    return "\n".join(out)


def group_section(groups):
    rows = []
    for g in groups:
        band = f"{fmt(g['gain']['lo'])} .. {fmt(g['gain']['hi'])}"
        flagged = f"{g['flagged']} ({g['flagged_share']:.0%})"
        rows.append([g["group"], g["units"], g["loss"]["mu"], g["loss"]["sigma"], g["loss"]["tau"],
                     g["gain"]["mu"], g["gain"]["sigma"], band, flagged, g["high_loss"],
                     g["echo_like"], g["off_topic_like"]])
    header = ["group", "units", "mu", "sigma", "tau", "gain mu", "gain sigma", "gain band",
              "flagged", "high loss", "echo-like", "off-topic-like"]
    return ["## Turn groups", ""] + table(header, rows)


def picture_section(pictures):
    out = ["", "## Pictures", ""]
    if not isinstance(pictures, list):
        return out + [pictures]
    return out + [f"![turn group {name[len('group_'):-len('.png')]}]({name})" for name in pictures]


def noise_section(noise):
    if not noise:
        return []
    out = ["", "## Against the noise labels", "", "Each kind against the clean units. P / R: the "
           "flags' precision / recall; AUC of z_loss, of z_gain (below 0.5: the kind gains less "
           "from its context than clean units), of |z_gain| and of the excess.", ""]
    rows = []
    for kind, r in noise.items():
        pr = [f"{fmt(r[p + 'precision'], 2)} / {fmt(r[p + 'recall'], 2)}" for p in VIEWS]
        rows.append([kind, r["noisy"], *pr, r["auc_loss"], r["auc_gain"], r["auc_gain_outside"],
                     r["auc_excess"]])
    header = ["kind", "units", "flagged P / R", "loss P / R", "gain P / R", "AUC loss",
              "AUC gain", "AUC abs gain", "AUC excess"]
    return out + table(header, rows)


def suspect_section(rows):
    out = ["", "## Most suspect units", "", "Flagged, furthest outside first (excess: sigmas "
           "beyond the nearest bound). A dialogue unit shows its last reply.", ""]
    for n, r in enumerate(rows, 1):
        noise = f"; noise: {r.get('noise_type')}" if r.get("noisy") else ""
        ident = f" (id {r['id']})" if r["id"] is not None else ""
        lo, hi = r["band"]
        out += [f"### {n}. dialogue {r['dialogue']}{ident}, turn {r['shown_turn']}, group "
                f"{r['group']}: {r['reason']}", "",
                f"loss {fmt(r['loss'])} (tau {fmt(r['tau'])}, z {fmt(r['z_loss'], 2)}), gain "
                f"{fmt(r['gain'])} (band {fmt(lo)} .. {fmt(hi)}, z {fmt(r['z_gain'], 2)}), excess "
                f"{fmt(r['excess'], 2)}, weight {fmt(r['weight'])}, {r['tokens']} tokens{noise}",
                ""]
        out += quoted("user", r["user"]) + [">"] + quoted("assistant", r["reply"]) + [""]
    if not rows:
        out.append("Nothing is flagged.")
    return out
