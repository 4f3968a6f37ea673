"""results.md of bench/real_noise.py, from its results dict: what the base model's scores can see,
the flags of each run at the first and last sighting of each turn, the held-out loss per turn depth
and each run's held-out loss against sft's (paired by held-out dialogue: 95 % t-interval, Holm p;
bench/bench_report.py), the context-gain view's acceptance, the replay sweep and the cost of the
gain forward. Pictures: heldout.png, the paired differences (matplotlib, optional)."""
import math
from pathlib import Path

from bench_report import (NO_DIFFERENCE, compare, comparison_table, difference_text, family,
                          family_note, fixed, head, interval_figure, paired_differences, pyplot,
                          row)
from real_noise_data import KINDS

HELD_OUT = "held-out dialogues"


def cell(x, digits=2):
    """A number in this report's tables: '-' where there is none."""
    return fixed(x, digits, missing="-")


# ---------------------------------------------------------------------------------------- judgments
def blind_kinds(det, threshold=0.7):
    """Kinds whose loss does not rank above the clean turns' (AUC below threshold): a loss threshold
    misses them."""
    return [k for k in KINDS if k in det and not det[k]["auc_loss"] >= threshold]


def kind_recall(table, kind):
    return table["by_kind"].get(kind, {}).get("recall", math.nan)


def acceptance(gain, loss):
    """The context-gain view's targets at the first and at the last judged sighting: recall >= 0.7
    on echo and off-topic replies, overall precision >= 0.8, recall on shuffled / truncated replies
    not below the loss detector's. {target: {sighting: {"value", "bar", "holds"}}}."""
    out = {}
    for s in ("first", "last"):
        g = gain["any"][s]
        lo = loss["any"][s]
        checks = {"echo recall": (kind_recall(g, "echo"), 0.7),
                  "off_topic recall": (kind_recall(g, "off_topic"), 0.7),
                  "precision": (g["precision"], 0.8),
                  "shuffled recall": (kind_recall(g, "shuffled"), kind_recall(lo, "shuffled")),
                  "truncated recall": (kind_recall(g, "truncated"), kind_recall(lo, "truncated"))}
        for target, (value, bar) in checks.items():
            holds = bool(value >= bar)
            out.setdefault(target, {})[s] = {"value": value, "bar": bar, "holds": holds}
    return out


def heldout_family(per_dialogue):
    """Each run's held-out loss against sft's, paired by held-out dialogue, Holm-adjusted over the
    runs ([] without sft)."""
    if "sft" not in per_dialogue:
        return []
    reference = dict(enumerate(per_dialogue["sft"]["loss"]))
    comps = []
    for name, losses in per_dialogue.items():
        if name == "sft":
            continue
        diffs = paired_differences(dict(enumerate(losses["loss"])), reference)
        comps.append(compare(name, HELD_OUT, diffs))
    return family(comps)


def heldout_words(c):
    """One sentence on a run's held-out loss against sft's."""
    text = difference_text(c, 1, 4, "nats per token")
    if not c.resolved:
        return f"- {c.name} vs sft, held-out loss: {NO_DIFFERENCE}: {text}."
    if c.mean < 0:
        return f"- **{c.name} beats sft** on held-out loss: {text}."
    return f"- sft beats {c.name} on held-out loss: {text}."


def figure(out, res):
    """heldout.png: each run's held-out loss minus sft's with its interval; None without one."""
    comps = heldout_family(res.get("heldout_dialogues", {}))
    if not comps:
        return None
    plt = pyplot()
    if plt is None:
        return None
    return interval_figure(plt, Path(out) / "heldout.png", comps,
                           "held-out loss minus sft's, paired by held-out dialogue",
                           xlabel="nats per token")


# ----------------------------------------------------------------------------------------- sections
def markdown(res):
    lines = setup_section(res) + detect_section(res)
    for s in ("first", "last"):
        lines += sighting_section(res, s)
    lines += kind_precision_section(res) + first_auc_section(res) + heldout_section(res)
    lines += comparison_section(res)
    for name, acc in res.get("acceptance", {}).items():
        lines += acceptance_section(name, acc)
    if "replay" in res:
        lines += replay_section(res["replay"])
    if "overhead" in res:
        lines += overhead_section(res["overhead"])
    return "\n".join(lines) + "\n"


def setup_section(res):
    st = res["settings"]
    dd = res["data"]
    kinds = ", ".join(f"{k} {n}" for k, n in dd["by_kind"].items())
    text = (f"Model {st['model']}; {dd['train_dialogues']} training dialogues ({dd['turns']} "
            f"assistant turns kept at max_len {st['max_len']}: {kinds}), "
            f"{dd['heldout_dialogues']} clean held-out dialogues, {dd['warm_dialogues']} clean "
            f"warm-up dialogues; seed {st['seed']}, noise rate {st['rate']}. Training: "
            f"{st['steps']} steps x {st['batch']} dialogues, lr {st['lr']}, LoRA r {st['lora_r']}, "
            f"unit turn, ema/winsorized statistics, alpha 1.0, warm-up {st['warmup_samples']} "
            f"units, ramp {st['ramp_steps']} steps, torch threads {st['torch_threads']}. Whole "
            f"run: {res['time']['wall_s'] / 60:.1f} min wall, {res['time']['cpu_s'] / 60:.1f} min "
            "CPU of this process.")
    return ["# Real dialogues with injected noise (MT-Bench-101)", "", text]


def detect_section(res):
    det = res["detectability"]
    clean = det["clean"]
    lines = ["", "## What the base model's scores can see (ROC AUC against clean turns, every "
             "training turn)", ""]
    lines += head(["kind", "n", "loss", "context gain, low", "context gain, high", "median loss",
                   "median gain"])
    lines.append(row(["clean", clean["n"], "", "", "", cell(clean["loss_median"]),
                      cell(clean["gain_median"])]))
    for k, v in det.items():
        if k == "clean":
            continue
        lines.append(row([k, v["n"], cell(v["auc_loss"]), cell(v["auc_gain_low"]),
                          cell(v["auc_gain_high"]), cell(v["loss_median"]),
                          cell(v["gain_median"])]))
    blind = blind_kinds(det)
    seen = ", ".join(blind) if blind else "none of the kinds"
    lines += ["", f"A loss threshold cannot see: {seen} (loss AUC below 0.7: their loss is not "
              "above the clean turns')."]
    return lines


def sighting_section(res, s):
    lines = ["", f"## Flags at the {s} judged sighting of each turn (after the warm-up)", ""]
    lines += head(["run / view", "flagged", "precision", "recall", "clean flag rate",
                   *[f"recall {k}" for k in KINDS]])
    for name, r in res["runs"].items():
        for view, tables in r.get("flagging", {}).items():
            if view == "auc_first_sighting":
                continue
            t = tables[s]
            recalls = [cell(t["by_kind"].get(k, {}).get("recall")) for k in KINDS]
            lines.append(row([f"{name} / {view}", f"{t['flagged']} of {t['units']}",
                              cell(t["precision"]), cell(t["recall"]), cell(t["clean_flag_rate"]),
                              *recalls]))
    return lines


def kind_precision_section(res):
    lines = ["", "Precision per kind against the clean turns alone (tp / (tp + clean flags), last "
             "sighting, view any) and the kind's mean weight there:", ""]
    lines += head(["run", "clean weight", *KINDS])
    for name, r in res["runs"].items():
        if "flagging" not in r:
            continue
        t = r["flagging"]["any"]["last"]
        cells = []
        for k in KINDS:
            d = t["by_kind"].get(k, {})
            cells.append(f"{cell(d.get('precision_vs_clean'))} (w {cell(d.get('weight'))})")
        lines.append(row([name, cell(t["clean_weight"]), *cells]))
    return lines


def first_auc_section(res):
    lines = ["", "AUC of the recorded score at each turn's first judged sighting during training:",
             ""]
    lines += head(["run / score", *KINDS])
    for name, r in res["runs"].items():
        for score, a in r.get("flagging", {}).get("auc_first_sighting", {}).items():
            cells = []
            for k in KINDS:
                if k not in a:
                    cells.append("-")
                    continue
                text = cell(a[k]["auc"])
                if score == "gain":
                    text += f" / low {cell(a[k]['auc_low'])}"
                cells.append(text)
            lines.append(row([f"{name} / {score}", *cells]))
    return lines


def heldout_section(res):
    depths = sorted({d for h in res["heldout"].values() if h for d in h["per_turn"]}, key=int)
    lines = ["", "## Clean held-out per-turn loss (nats per token)", ""]
    lines += head(["model", "overall", *[f"turn {d}" for d in depths], "train wall"])
    for name, h in res["heldout"].items():
        if not h:
            continue
        wall = res["runs"].get(name, {}).get("wall_s")
        wall_text = "-" if wall is None else f"{wall / 60:.1f} min"
        per_turn = [cell(h["per_turn"].get(d, {}).get("loss"), 4) for d in depths]
        lines.append(row([name, cell(h["overall"]["loss"], 4), *per_turn, wall_text]))
    return lines


def comparison_section(res):
    comps = heldout_family(res.get("heldout_dialogues", {}))
    if not comps:
        return []
    seed = res["settings"]["seed"]
    lines = ["", "## Held-out loss against sft, paired by held-out dialogue", ""]
    lines += comparison_table(comps, ("run", "paired by"), 1, 4)
    lines += ["", family_note("held-out dialogue") + f" One training run per method (seed {seed}): "
              "the interval covers the held-out dialogues, not the spread between training seeds.",
              ""]
    return lines + [heldout_words(c) for c in comps]


def acceptance_section(name, acc):
    lines = ["", f"## Acceptance of the context-gain view: {name} (view any) against the loss "
             "detector's run", ""]
    lines += head(["target", "first sighting", "last sighting"])
    for target, c in acc.items():
        lines.append(row([target, verdict_cell(c["first"]), verdict_cell(c["last"])]))
    return lines


def verdict_cell(c):
    holds = "holds" if c["holds"] else "FAILS"
    return f"{cell(c['value'])} (bar {cell(c['bar'])}): {holds}"


def replay_section(rp):
    lines = ["", "## Replay: other gain bands on the loss+gain run's recorded stream", "",
             "The same (loss, gain) values step by step through resure.ReSURE (replaying the run's "
             f"own setting reproduces its flags: {rp['reproduces_run']}). Band -lo/+hi: flagged "
             "below mu_g - lo sigma_g or above mu_g + hi sigma_g (the core: lo = hi = alpha_g); "
             "none: the loss view alone. Band on gain: the core's context gain; on relative: "
             "gain / context-free NLL. clean: the statistics first filled from the clean warm-up "
             "dialogues scored by the base model.", ""]
    lines += head(["alpha", "band on", "band", "warm-up", "precision", "recall", "clean flag rate",
                   *[f"recall {k}" for k in KINDS]])
    for r in rp["rows"].values():
        band = "none" if r["hi"] is None else f"-{r['lo']} / +{r['hi']}"
        on = "-" if r["hi"] is None else r["stat"]
        recalls = [both(r, "by_kind", k) for k in KINDS]
        lines.append(row([r["alpha"], on, band, r["warmup"], both(r, "precision"),
                          both(r, "recall"), both(r, "clean_flag_rate"), *recalls]))
    return lines + ["", "(each cell: first / last sighting)"]


def both(replayed, key, kind=None):
    """'first / last' of one number of a replayed setting's flag tables."""
    values = []
    for s in ("first", "last"):
        t = replayed[s]
        values.append(t[key].get(kind, {}).get("recall") if kind else t[key])
    return " / ".join(cell(v) for v in values)


def overhead_section(o):
    lines = ["", "## Cost of the context-gain forward (train.py's train_step, same batches, "
             "alternating)", ""]
    lines += head(["detector", "median step CPU s", "median step wall s"])
    for detector in ("loss", "loss+gain"):
        lines.append(row([detector, cell(o[detector]["cpu"]), cell(o[detector]["wall"])]))
    lines += ["", f"Overhead of loss+gain: {o['overhead_cpu'] * 100:.0f} % CPU time (median of "
              f"per-step paired ratios {o['overhead_cpu_paired'] * 100:.0f} %), "
              f"{o['overhead_wall'] * 100:.0f} % wall; {o['steps']} steps each after one untimed, "
              f"batch {o['batch']} dialogues, max_len {o['max_len']}, {o['threads']} torch "
              "thread(s)."]
    if "free_rows" not in o:
        return lines
    lines += ["", "The context-free forward alone, over the same steps' free rows, packed three "
              "ways (CPU s per step, and as a fraction of the loss detector's step):", ""]
    lines += head(["packing", "tokens processed", "real tokens", "CPU s / step",
                   "share of a loss step"])
    for k, v in o["free_rows"].items():
        share = v["cpu_s_per_step"] / o["loss"]["cpu"] * 100
        lines.append(row([k, v["tokens"], v["real_tokens"], cell(v["cpu_s_per_step"]),
                          f"{share:.0f} %"]))
    return lines
