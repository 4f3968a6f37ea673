"""results.md of the noise experiment, from what results.json holds alone (what `--report DIR`
regenerates): mean ± sample std over seeds per method and mixture, Spearman between the mixture and
the score, and four families of paired comparisons (bench/bench_report.py: 95 % t-intervals,
Holm-adjusted p), each paired by seed:

    accuracy from H     a method's accuracy on a mixture minus its own on H (sft's: the regime)
    accuracy vs sft     a method's clean-test accuracy minus sft's on the same mixture
    loss vs sft         the same for the clean-test loss (lower is better)
    from H vs sft's     a method's change from H minus sft's: positive where it keeps more
    accuracy vs resure  a variant's accuracy minus the paper's configuration's (resure), per mixture

The sentences under "What this run shows" are drawn from those comparisons: a claim ("beats",
"flattens", bold) is made only where the Holm-adjusted p is below 0.05, every other comparison reads
"no difference resolved". The flagging tables are bench/noise_flags.py's.
"""
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from bench_report import (NO_DIFFERENCE, comparison_table, compare, difference_text, family,
                          family_note, fixed, head, mean_sd, mean_sd_text, paired_differences, row,
                          signed, spearman_or_nan)
from noise_data import MIXTURES
from noise_flags import flag_sections
from support.synth import SYNTH_RATES

MEASURES = ("accuracy", "loss")
FAMILIES = {  # name -> how its differences read: (scale, digits, unit)
    "accuracy from H": (100, 1, "points"),
    "accuracy vs sft": (100, 1, "points"),
    "loss vs sft": (1, 3, ""),
    "from H vs sft's": (100, 1, "points"),
    "accuracy vs resure": (100, 1, "points"),
}
PATH_FLAGS = ("--model", "--data", "--out")  # flags whose values are where a run's files lie
PAPER = "resure"  # the paper's configuration, the reference of the variants (noise_run.VARIANTS)


# --------------------------------------------------------------------------------------- statistics
def by_seed(results, method, mix, key):
    """{seed: value of key} of a method's finished runs on a mixture."""
    return {r["seed"]: r.get(key) for r in results
            if r["variant"] == method and r["mixture"] == mix and "error" not in r}


def summarize(results, methods, mixtures=MIXTURES):
    """{method: {"mixtures": {mix: {accuracy, loss: (mean, sd) over seeds}}, "spearman": {accuracy,
    loss} over the per-mixture means (one value per mixture, mixtures ranked 1-4: the paper's Table
    4), "spearman_pooled": {accuracy, loss} over every (mixture, seed) run}}."""
    out = {}
    for v in methods:
        per_mix = {}
        for mix in mixtures:
            per_mix[mix] = {k: mean_sd(by_seed(results, v, mix, k).values()) for k in MEASURES}
        ranks = [MIXTURES.index(mix) + 1 for mix in mixtures]
        runs = [r for r in results
                if r["variant"] == v and "error" not in r and r["mixture"] in mixtures]
        run_ranks = [MIXTURES.index(r["mixture"]) + 1 for r in runs]
        means = {}
        pooled_runs = {}
        for k in MEASURES:
            means[k] = spearman_or_nan(ranks, [per_mix[mix][k][0] for mix in mixtures])
            pooled_runs[k] = spearman_or_nan(run_ranks, [r.get(k) for r in runs])
        out[v] = {"mixtures": per_mix, "spearman": means, "spearman_pooled": pooled_runs}
    return out


def change_from_h(results, method, mix):
    """{seed: the method's accuracy on mix minus its own on H}."""
    on_mix = by_seed(results, method, mix, "accuracy")
    on_h = by_seed(results, method, "H", "accuracy")
    return {s: on_mix[s] - on_h[s] for s in on_mix
            if s in on_h and on_mix[s] is not None and on_h[s] is not None}


def comparisons(results, methods, mixtures):
    """The five families (module docstring), each Holm-adjusted on its own: {name: [Comparison]}."""
    after_h = [m for m in mixtures if m != "H"] if "H" in mixtures else []
    out = {name: [] for name in FAMILIES}
    for v in methods:
        for mix in after_h:
            diffs = list(change_from_h(results, v, mix).values())
            out["accuracy from H"].append(compare(v, f"H -> {mix}", diffs))
    if "sft" in methods:
        for v in methods:
            if v != "sft":
                against_sft_families(out, results, v, mixtures, after_h)
    if PAPER in methods:
        for v in methods:
            if v not in ("sft", PAPER):
                for mix in mixtures:
                    diffs = paired_differences(by_seed(results, v, mix, "accuracy"),
                                               by_seed(results, PAPER, mix, "accuracy"))
                    out["accuracy vs resure"].append(compare(v, mix, diffs))
    return {name: family(comps) for name, comps in out.items()}


def against_sft_families(out, results, v, mixtures, after_h):
    """Method v against sft: accuracy and loss per mixture, and its change from H against sft's."""
    for measure in MEASURES:
        for mix in mixtures:
            diffs = paired_differences(by_seed(results, v, mix, measure),
                                       by_seed(results, "sft", mix, measure))
            out[f"{measure} vs sft"].append(compare(v, mix, diffs))
    for mix in after_h:
        diffs = paired_differences(change_from_h(results, v, mix),
                                   change_from_h(results, "sft", mix))
        out["from H vs sft's"].append(compare(v, f"H -> {mix}", diffs))


def comparisons_json(families):
    """The families as results.json keeps them: each comparison's fields, and if it resolved."""
    out = {}
    for name, comps in families.items():
        out[name] = [dict(asdict(c), resolved=c.resolved) for c in comps]
    return out


# --------------------------------------------------------------------------------------- results.md
class Context:
    """What every section of results.md reads: the saved results, the methods and mixtures shown."""

    def __init__(self, saved):
        self.saved = saved
        self.plan = saved["plan"]
        self.results = saved["results"]
        self.ok = [r for r in self.results if "error" not in r]
        self.mixes = [m for m in MIXTURES if m in self.plan["mixtures"]]
        self.seeds = [int(s) for s in self.plan["seeds"]]
        self.methods = [v for v in self.plan["methods"] if any(r["variant"] == v for r in self.ok)]
        self.summary = summarize(self.ok, self.methods, self.mixes)
        self.families = comparisons(self.ok, self.methods, self.mixes)

    def derived(self):
        """What results.json keeps of the report beside the runs (--report recomputes it)."""
        return {"summary": self.summary, "comparisons": comparisons_json(self.families)}


def write_results(out, saved):
    """results.md from what results.json holds: (its text, the Context it was drawn from)."""
    cx = Context(saved)
    lines = header(cx) + data_section(cx)
    lines += score_section(cx, "accuracy")
    lines += family_section(cx, "accuracy from H",
                            "## Change from H, paired by seed (accuracy in points; the regime "
                            "check reads the sft rows)")
    lines += score_section(cx, "loss")
    lines += sft_sections(cx)
    lines += family_section(cx, "accuracy vs resure",
                            "## Difference to the paper's configuration (resure), paired by seed "
                            "(accuracy in points)")
    lines += methods_section(cx) + compute_section(cx) + flag_sections(cx) + per_turn_section(cx)
    if saved.get("real") is not None:
        lines += ["", "## Real dialogues with injected noise (bench/real_noise.py)", ""]
        lines += real_section(saved["real"])
    lines += ["", "## What this run shows", ""] + findings(cx)
    text = "\n".join(lines) + "\n"
    (Path(out) / "results.md").write_text(text)
    return text, cx


def header(cx):
    saved = cx.saved
    plan = cx.plan
    done = len(cx.results)
    total = saved.get("runs_planned", done)
    run_s = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in cx.results)
    wall = (f"Machine: {saved['machine']}. Wall time {saved['wall_s'] / 60:.1f} min for {done} of "
            f"{total} runs")
    if saved.get("invocations", 1) > 1:
        wall += f" over {saved['invocations']} invocations (resumed)"
    wall += f"; the runs' own training and evaluation: {run_s / 60:.1f} min"
    if saved.get("cpu_share") is not None:
        wall += (f" ({saved['cpu_share']:.2f} of the {os.cpu_count()} cores on average went to the "
                 f"last invocation; load average {saved['load']})")
    title = f"# The noise experiment (bench/noise.py, preset {plan['preset']})"
    lines = [title, "", wall + ".", "", plan_text(cx), ""]
    failed = {}
    for r in cx.results:
        if "error" in r:
            failed.setdefault(r["variant"], []).append(r["error"])
    if failed:
        lines += ["Failed runs (left out of every table): " + "; ".join(
            f"{v}: {len(e)} run(s), e.g. {e[0][:160]}" for v, e in failed.items()), ""]
    return lines


def plan_text(cx):
    plan = cx.plan
    kinds = ", ".join(f"{k} {w:g}" for k, w in plan["kinds"].items())
    rate_n = plan.get("rate_n", SYNTH_RATES["N"])
    rate_l = plan.get("rate_l", SYNTH_RATES["L"])
    lora = f"LoRA r={plan['lora_r']} alpha={plan['lora_alpha']}"
    units = "each method's own (resure: one loss per dialogue)"
    if plan.get("unit"):
        units = f"--unit {plan['unit']} for every method"
    return (f"Plan: model {plan['model_name']}; seeds {cx.seeds}; {plan['n']} dialogues per "
            f"tier, warm-up set {plan['warm']} clean dialogues, {plan['test']} clean test "
            f"dialogues per seed; per-turn noise rate N {rate_n:g}, L {rate_l:g}; noise kinds "
            f"{kinds}; {plan['epochs']} epochs over each mixture at batch {plan['batch']} (the "
            f"same optimizer steps for every method on a mixture); lr {plan['lr']} cosine, {lora}, "
            f"{plan['dtype']}; units: {units}; ReSURE alpha 1, floor 5th percentile, statistics "
            f"warmed up on the clean warm-up set, ramp {plan['ramp']} steps (each method's "
            "train.py flags: the Methods section); "
            f"greedy answers of at most {plan['new_tokens']} tokens. Mean ± sample std over seeds "
            "(each seed: its own data, LoRA init and order). A difference is paired by seed: "
            "its 95 % t-interval, and its p Holm-adjusted over the comparisons of its table; a "
            f"claim is made where that p is below 0.05, else \"{NO_DIFFERENCE}\".")


def data_section(cx):
    data = cx.saved["data"]
    lines = ["## Data (summed over seeds)", ""]
    lines += head(["mixture", "dialogues", "optimizer steps per run", "assistant turns",
                   "noisy turns", "by kind"])
    for mix in cx.mixes:
        stats = [data[str(s)][mix] for s in cx.seeds if str(s) in data]
        if not stats:
            continue
        kinds = {}
        for s in stats:
            for k, n in s["kinds"].items():
                kinds[k] = kinds.get(k, 0) + n
        turns = sum(s["turns"] for s in stats)
        noisy = sum(s["noisy"] for s in stats)
        lines.append(row([mix, sum(s["dialogues"] for s in stats), stats[0]["steps"], turns,
                          f"{noisy} ({100 * noisy / turns:.1f}%)",
                          ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))]))
    return lines


def score_section(cx, measure):
    """The accuracy or loss table: mean ± std per method and mixture, and both Spearman columns."""
    title = "## Clean-test loss per supervised token (lower is better)"
    scale = 1
    digits = 3
    if measure == "accuracy":
        title = "## Clean-test exact-match accuracy (%)"
        scale = 100
        digits = 1
    lines = ["", title, ""]
    lines += head(["method", *cx.mixes, f"Spearman(mixture, {measure}) over the per-mixture means",
                   "Spearman pooled over seeds"])
    base = mean_sd([b[measure] for b in cx.saved["base"].values()])
    base_cell = mean_sd_text(*base, scale, digits)
    lines.append(row(["base model (no training)", *[base_cell] * len(cx.mixes), "", ""]))
    for v in cx.methods:
        s = cx.summary[v]
        cells = [mean_sd_text(*s["mixtures"][m][measure], scale, digits) for m in cx.mixes]
        lines.append(row([v, *cells, signed(s["spearman"][measure]),
                          signed(s["spearman_pooled"][measure])]))
    return lines


def family_table(cx, name, setting):
    """A family's comparison table; `setting` heads the column of its mixtures."""
    scale, digits, _ = FAMILIES[name]
    return comparison_table(cx.families[name], ("method", setting), scale, digits)


def family_section(cx, name, title):
    if not cx.families[name]:
        return []
    return ["", title, ""] + family_table(cx, name, "mixtures") + ["", family_note("seed")]


def sft_sections(cx):
    """Difference to SFT (accuracy, loss) and the change from H against sft's change."""
    if not cx.families["accuracy vs sft"]:
        return []
    lines = ["", "## Difference to SFT, paired by seed", "", "### Accuracy (points)", ""]
    lines += family_table(cx, "accuracy vs sft", "mixture")
    lines += ["", "### Loss per supervised token", ""]
    lines += family_table(cx, "loss vs sft", "mixture")
    lines += ["", family_note("seed") + " Each table is its own family."]
    lines += family_section(cx, "from H vs sft's",
                            "## Change from H against sft's change from H (accuracy in points; "
                            "positive: the method keeps more of its H accuracy than sft)")
    return lines


def methods_section(cx):
    """Each method's train.py flags as its first finished run recorded them (the model, data and
    output paths left out)."""
    lines = ["", "## Methods: the train.py flags of each (recorded in every run's result.json)", ""]
    lines += head(["method", "flags"])
    for v in cx.methods:
        flags = next((r.get("flags") for r in cx.ok if r["variant"] == v and r.get("flags")), None)
        lines.append(row([v, "`" + " ".join(shown_flags(flags)) + "`" if flags else "-"]))
    return lines


def shown_flags(flags):
    """A run's flags without --model, --data and --out, a file under OUT by its name."""
    shown = []
    previous = None
    for x in flags:
        if x not in PATH_FLAGS and previous not in PATH_FLAGS:
            shown.append(Path(x).name if x.startswith("OUT/") else x)
        previous = x
    return shown


def compute_section(cx):
    last = cx.mixes[-1]
    title = (f"## Compute per run, mixture {last} (mean over seeds; forward tokens: extra scoring "
             "passes)")
    lines = ["", title, ""]
    lines += head(["method", "trainings", "optimizer steps (all trainings)", "train tokens",
                   "generated tokens", "extra forward tokens", "comparisons", "train s", "eval s"])
    keys = ("trainings", "optimizer_steps", "train_tokens", "generated_tokens", "forward_tokens",
            "comparisons")
    for v in cx.methods:
        runs = [r for r in cx.ok if r["variant"] == v and r["mixture"] == last]
        used = [r.get("compute") or {} for r in runs]
        cells = [fixed(mean_sd([c.get(k) for c in used])[0], 0) for k in keys]
        cells += [fixed(mean_sd([r.get(k) for r in runs])[0], 0) for k in ("train_s", "eval_s")]
        lines.append(row([v, *cells]))
    return lines + label_accuracy_table(cx)


def label_accuracy_table(cx):
    """The relabeling baselines' training-set label accuracy, before -> after."""
    relabelers = [v for v in cx.methods
                  if any(r.get("label_accuracy") is not None for r in cx.ok if r["variant"] == v)]
    if not relabelers:
        return []
    lines = ["", "Training-set label accuracy (%) of the relabeling methods, before -> after "
             "(their report.json):", ""] + head(["method", *cx.mixes])
    for v in relabelers:
        cells = []
        for m in cx.mixes:
            before = mean_sd(by_seed(cx.ok, v, m, "label_accuracy_before").values())
            after = mean_sd(by_seed(cx.ok, v, m, "label_accuracy").values())
            cells.append(mean_sd_text(*before, 100) + " -> " + mean_sd_text(*after, 100))
        lines.append(row([v, *cells]))
    return lines


def per_turn_section(cx):
    last = cx.mixes[-1]
    lines = ["", f"## Clean-test loss per turn depth, mixture {last}", ""]
    depths = sorted({int(d) for r in cx.ok for d in r["loss_per_turn"]})
    lines += head(["method"] + [f"turn {d}" for d in depths])
    for v in cx.methods:
        runs = [r for r in cx.ok if r["variant"] == v and r["mixture"] == last]
        cells = []
        for d in depths:  # depths are str keys read back from JSON, int ones fresh from a run
            losses = [r["loss_per_turn"].get(str(d), r["loss_per_turn"].get(d)) for r in runs]
            cells.append(mean_sd_text(*mean_sd(losses), 1, 3))
        lines.append(row([v, *cells]))
    return lines


def real_section(real):
    """The real-data part as bench/real_noise.run returned it: its markdown, else its JSON."""
    if isinstance(real, dict) and isinstance(real.get("markdown"), str):
        return [real["markdown"]]
    if isinstance(real, dict) and real.get("error"):
        return [f"Not run: {real['error']}"]
    return ["```json", json.dumps(real, indent=1, default=str)[:20000], "```"]


# ----------------------------------------------------------------------------------------- findings
def findings(cx):
    """Plain sentences drawn from the numbers and the comparisons, whatever they show."""
    out = []
    totals = [r["acc_total"] for r in cx.ok if "acc_total" in r]
    if totals:
        out.append(f"- Accuracy is over {min(totals)}-{max(totals)} test answers per seed: one "
                   f"answer is {100 / min(totals):.2f} points.")
    for v in cx.methods:
        s = cx.summary[v]["spearman"]["accuracy"]
        pooled_over_seeds = cx.summary[v]["spearman_pooled"]["accuracy"]
        if math.isfinite(s):
            out.append(f"- {v}: Spearman(mixture, accuracy) over the {len(cx.mixes)} per-mixture "
                       f"means {signed(s)}; pooled over seeds (every (mixture, seed) run) "
                       f"{signed(pooled_over_seeds)}.")
    for c in cx.families["accuracy from H"]:
        if c.name == "sft" and math.isfinite(c.mean):
            out.append(f"- sft from {c.setting.replace(' -> ', ' to ')}: "
                       f"{difference_text(c, 100, 1, 'points')}: {regime_words(c)}.")
    for v in cx.methods:
        if v == "sft":
            continue
        for name, measure in (("accuracy vs sft", "accuracy"), ("loss vs sft", "loss")):
            mine = [c for c in cx.families[name] if c.name == v]
            if mine:
                out.append(f"- {v} vs sft, {measure}: {against_sft(mine, measure)}.")
        mine = [c for c in cx.families["from H vs sft's"] if c.name == v]
        if mine:
            sft_changes = {c.setting: c for c in cx.families["accuracy from H"] if c.name == "sft"}
            out.append(f"- {v}'s change from H against sft's: {against_drop(mine, sft_changes)}.")
        mine = [c for c in cx.families["accuracy vs resure"] if c.name == v]
        if mine:
            out.append(f"- {v} vs {PAPER} (the paper's configuration), accuracy: "
                       f"{against_sft(mine, 'accuracy', PAPER)}.")
    out += warning_lines(cx.ok)
    return out


def regime_words(c):
    if not c.resolved:
        return f"{NO_DIFFERENCE} (no regime where noise hurts)"
    if c.mean < 0:
        return "noise hurts sft (resolved)"
    return "more data helped sft (resolved)"


def against_sft(comps, measure, reference="sft"):
    """Where a method beats the reference (sft, or resure), where the reference beats it (both
    resolved), where neither is resolved."""
    scale, digits, unit = FAMILIES[f"{measure} vs {reference}"]
    parts = []
    for c in comps:
        if not c.resolved:
            continue
        better = c.mean > 0 if measure == "accuracy" else c.mean < 0
        verb = f"**{c.name} beats {reference}**" if better else f"{reference} is better"
        parts.append(f"{verb} on {c.setting}: {difference_text(c, scale, digits, unit)}")
    parts += unresolved(comps, scale, digits, unit)
    return "; ".join(parts)


def against_drop(comps, sft_changes):
    """A method's change from H against sft's: "flattens" only where resolved, and sft's own drop
    too."""
    parts = []
    for c in comps:
        if not c.resolved:
            continue
        text = difference_text(c, 100, 1, "points")
        sft = sft_changes.get(c.setting)
        sft_drops = sft is not None and sft.resolved and sft.mean < 0
        if c.mean > 0 and sft_drops:
            parts.append(f"**{c.name} flattens sft's drop** {c.setting}: {text}")
        elif c.mean > 0:
            parts.append(f"keeps more than sft {c.setting}: {text}")
        else:
            parts.append(f"loses more than sft {c.setting}: {text}")
    parts += unresolved(comps, 100, 1, "points")
    return "; ".join(parts)


def unresolved(comps, scale, digits, unit):
    """One clause for the comparisons without a resolved difference, with means and intervals."""
    rest = [c for c in comps if not c.resolved]
    if not rest:
        return []
    details = ", ".join(f"{c.setting} {difference_text(c, scale, digits, unit)}" for c in rest)
    return [f"{NO_DIFFERENCE} on {details}"]


def warning_lines(ok):
    out = []
    for warning in ("lag", "collapse"):
        where = sorted({(r["variant"], r["mixture"])
                        for r in ok if warning in r.get("warnings", [])})
        if where:
            places = ", ".join(f"{v} on {m}" for v, m in where)
            out.append(f"- {warning} warning raised in: {places}")
    return out
