"""Every experiment table of README.md, bench/README.md and docs/method.md, written from the results
the repository keeps: bench/results/noise-cpu/results.json (`python bench/noise.py --cpu`),
bench/results/real-noise/results.json (`python bench/real_noise.py`) and
bench/results/baselines/results.json (the baselines' clean-test answer counts).

    python bench/tables.py           # rewrite every table in place
    python bench/tables.py --check   # exit 1, naming each table its results no longer give

A table sits between two lines of its document, its name saying what is written there (TABLES):

    <!-- table: noise/accuracy -->
    (written by this program, never by hand)
    <!-- /table -->

Each block starts with a line saying how many of the experiment's runs are finished. A comparison
shows n, the mean paired difference, its 95 % t-interval and the Holm-adjusted p over its table
(bench/bench_report.py); a claim is made only where that p is below 0.05. Without results a block
says so and shows no number.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import noise  # noqa: E402
import real_noise  # noqa: E402
import real_noise_report as report  # noqa: E402
from bench_report import (LEVEL, NO_DIFFERENCE, compare_proportions,  # noqa: E402
                          comparison_table, difference_text, family, family_note, fixed, head,
                          interval_text, mean_sd, mean_sd_text, p_text, percent, row, signed,
                          verdict)
from noise_flags import pooled  # noqa: E402
from noise_report import FAMILIES, Context  # noqa: E402
from noise_run import VARIANTS, resure_flags, unit_of  # noqa: E402
from real_noise_data import KINDS  # noqa: E402

DOCUMENTS = ("README.md", "bench/README.md", "docs/method.md")
NOISE = noise.RESULTS / "results.json"
REAL = real_noise.RESULTS / "results.json"
BASELINES = ROOT / "bench" / "results" / "baselines" / "results.json"
OPEN = re.compile(r"^<!-- table: (.*) -->$")
CLOSE = "<!-- /table -->"
SHARED = ("--alpha", "--warmup-samples", "--ramp-steps")  # flags of every ReSURE configuration
# how a resolved comparison of each family reads in a sentence
CLAIMS = {
    "accuracy from H": "{name}'s accuracy {setting}",
    "accuracy vs sft": "{name} against sft on {setting}, accuracy",
    "loss vs sft": "{name} against sft on {setting}, loss per token",
    "from H vs sft's": "{name}'s change {setting} against sft's",
    "accuracy vs resure": "{name} against resure on {setting}, accuracy",
}


class TableError(ValueError):
    pass


def relative(path):
    """A results file as the documents name it: from the repository's root when it lies there."""
    path = Path(path).resolve()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return str(path)


# ------------------------------------------------------------------------- the noise experiment
class Noise:
    """The noise experiment's committed results (None when there are none) and the --cpu plan they
    belong to."""

    def __init__(self, path=NOISE):
        self.path = Path(path)
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else None
        if self.saved is None:
            self.plan = noise.make_plan(noise.parse_args(["--cpu"]))
            self.cx = None
            self.planned = len(self.plan["seeds"]) * len(self.plan["mixtures"])
            self.planned *= len(self.plan["methods"])
        else:
            self.plan = self.saved["plan"]
            self.cx = Context(self.saved)
            self.planned = self.saved.get("runs_planned", len(self.saved["results"]))
        self.mixes = list(self.plan["mixtures"])

    def status(self):
        """The line every noise block starts with: how many of the preset's runs are finished."""
        where = relative(self.path)
        command = f"`python bench/noise.py --{self.plan['preset']}`"
        if self.saved is None:
            return (f"0 of {self.planned} runs of {command} are finished ({where} is not in the "
                    "repository yet).")
        results = self.saved["results"]
        failed = sum("error" in r for r in results)
        line = f"{len(results)} of {self.planned} runs of {command} are finished ({where})"
        if failed:
            line += f"; {failed} of them failed and are left out"
        return line + "."

    def methods(self):
        """The methods in the plan's order: every one planned, finished or not."""
        return list(self.plan["methods"])


def configurations(n):
    """Each configuration of the preset: its label and the train.py flags that tell it apart; the
    flags they share under the table."""
    lines = head(["configuration", "what it is", "train.py flags"])
    for name in n.methods():
        variant = VARIANTS[name]
        flags = ["--method", variant["method"], "--unit", unit_of(n.plan, variant)]
        flags += own_flags(resure_flags(n.plan, variant))
        lines.append(row([name, variant["label"], "`" + " ".join(flags) + "`"]))
    shared = flag_pairs(resure_flags(n.plan, VARIANTS["resure"]), SHARED)
    plan = n.plan
    note = (f"Every ReSURE configuration also runs `{' '.join(shared)} --warmup-data W`: W is the "
            f"clean warm-up set ({plan['warm']} dialogues), the statistics' only source before "
            f"training. Shared by all: {plan['n']} dialogues per tier, {plan['epochs']:g} epochs "
            f"at batch {plan['batch']} (equal optimizer steps per mixture), lr {plan['lr']:g} "
            f"cosine, LoRA r={plan['lora_r']} alpha={plan['lora_alpha']:g}, {plan['dtype']}, "
            f"seeds {', '.join(map(str, plan['seeds']))}.")
    return [n.status(), ""] + lines + ["", note]


def own_flags(flags):
    """A ReSURE configuration's flags (resure_flags) but --method and those all of them share."""
    own = [flags[i] for i in range(0, len(flags), 2) if flags[i] not in SHARED + ("--method",)]
    return flag_pairs(flags, own)


def flag_pairs(flags, keys):
    """The (flag, value) pairs of a flag list whose flag is one of keys, in their order."""
    pairs = [flags[i:i + 2] for i in range(0, len(flags), 2)]
    return [x for pair in pairs if pair[0] in keys for x in pair]


def scores(n, measure):
    """Mean ± sample std over seeds per configuration and mixture, with the runs it is over."""
    scale = 100 if measure == "accuracy" else 1
    digits = 1 if measure == "accuracy" else 3
    lines = head(["configuration", *n.mixes, "runs"])
    if n.cx is not None:
        base = mean_sd([b[measure] for b in n.saved["base"].values()])
        cell = mean_sd_text(*base, scale, digits)
        lines.append(row(["base model (no training)", *[cell] * len(n.mixes), ""]))
    for name in n.methods():
        runs = [] if n.cx is None else [r for r in n.cx.ok if r["variant"] == name]
        cells = []
        for mix in n.mixes:
            values = [r[measure] for r in runs if r["mixture"] == mix]
            cells.append(mean_sd_text(*mean_sd(values), scale, digits) if values else "-")
        lines.append(row([name, *cells, f"{len(runs)} of {len(n.plan['seeds']) * len(n.mixes)}"]))
    unit = "clean-test exact match, %" if measure == "accuracy" else "clean-test loss per token"
    note = f"Mean ± sample std over the finished seeds ({unit})."
    return [n.status(), ""] + lines + ["", note]


def comparisons(n, name, only=None):
    """One family of paired comparisons (noise_report.FAMILIES) as a table; only: the rows of
    these methods (their Holm p stays the one over the whole family)."""
    comps = [] if n.cx is None else n.cx.families[name]
    if only is not None:
        comps = [c for c in comps if c.name in only]
    if not comps:
        return [n.status(), "", "No paired comparison yet: it needs finished runs of both sides "
                "on the same seeds."]
    scale, digits, _ = FAMILIES[name]
    lines = comparison_table(comps, ("configuration", "mixtures"), scale, digits)
    note = family_note("seed")
    if only is not None:
        note += (f" Here the Holm p is over all {len(n.cx.families[name])} comparisons of the "
                 "family, not over the rows shown alone.")
    return [n.status(), ""] + lines + ["", note]


def flagging(n):
    """Flag counts pooled over seeds: the clean flag rate on H, precision and recall on the noisy
    mixtures, in each configuration's own unit (a dialogue or an assistant turn)."""
    cells = ["configuration", "unit"]
    for mix in n.mixes:
        cells.append(f"{mix}: flagged of units")
        cells += [f"{mix}: precision", f"{mix}: recall"] if mix != "H" else []
    lines = head(cells)
    ok = [] if n.cx is None else n.cx.ok
    for name in n.methods():
        variant = VARIANTS[name]
        if variant["method"] == "sft":
            continue
        cells = [name, unit_of(n.plan, variant)]
        for mix in n.mixes:
            t = pooled(ok, name, mix, "all").get("all")
            if t is None:
                cells += ["-"] if mix == "H" else ["-", "-", "-"]
                continue
            cells.append(f"{t['flagged']} of {t['units']} ({percent(t['flag_rate'])})")
            if mix != "H":
                cells += [percent(t["precision"]), percent(t["recall"])]
        lines.append(row(cells))
    note = ("Every unit decision after the warm-up, counts summed over the finished seeds; a "
            "dialogue unit is noisy when any of its supervised turns is.")
    return [n.status(), ""] + lines + ["", note]


def claims(n):
    """The resolved comparisons of every family, one sentence each; nothing else is claimed."""
    if n.cx is None:
        return [n.status(), "", "Nothing is claimed until runs are finished."]
    every = [(name, c) for name, comps in n.cx.families.items() for c in comps]
    resolved = [(name, c) for name, c in every if c.resolved]
    lines = [n.status(), "", f"{len(resolved)} of {len(every)} paired comparisons are resolved "
             "(Holm p < 0.05 within their table); every other one reads "
             f"\"{NO_DIFFERENCE}\"."]
    if resolved:
        lines.append("")
    for name, c in resolved:
        scale, digits, unit = FAMILIES[name]
        subject = CLAIMS[name].format(name=c.name, setting=c.setting)
        lines.append(f"- {subject}: {difference_text(c, scale, digits, unit)}.")
    return lines


def answer(n):
    """The paper's question on this experiment: does any configuration beat SFT on the noisiest
    mixture without losing to it on the clean one? Read from the family "accuracy vs sft": beating
    is a resolved positive difference on the noisy mixture, losing a resolved negative one on H."""
    if n.cx is None:
        return [n.status(), "", "The answer waits for finished runs."]
    noisy = n.mixes[-1]
    comps = {(c.name, c.setting): c for c in n.cx.families["accuracy vs sft"]}
    names = [v for v in n.methods() if v != "sft"]
    lines = head(["configuration", f"{noisy} vs sft, points", "H vs sft, points", ""])
    winners = []
    for v in names:
        on_noisy = comps.get((v, noisy))
        on_h = comps.get((v, "H"))
        if on_noisy is None or on_h is None or min(on_noisy.n, on_h.n) < 2:
            lines.append(row([v, "-", "-", "fewer than two seeds on each mixture"]))
            continue
        beats = on_noisy.resolved and on_noisy.mean > 0
        loses = on_h.resolved and on_h.mean < 0
        if beats and not loses:
            winners.append(v)
        words = ("beats sft on " + noisy) if beats else f"{NO_DIFFERENCE} on {noisy}"
        words += "; loses on H" if loses else ""
        lines.append(row([v, difference_text(on_noisy, 100, 1), difference_text(on_h, 100, 1),
                          words]))
    planned = n.planned
    finished = len(n.saved["results"])
    if winners:
        found = (f"{', '.join(winners)} has accuracy on {noisy} resolved above sft's and no loss "
                 "on H resolved (its interval on H says how large a loss it still allows).")
    else:
        found = (f"no configuration has accuracy on {noisy} resolved above sft's (Holm over the "
                 f"{len(comps)} comparisons of the accuracy-vs-sft table).")
    if finished < planned:
        verdict_line = f"Not answered yet ({finished} of {planned} runs finished); so far {found}"
    elif winners:
        verdict_line = f"Yes: {found}"
    else:
        verdict_line = f"No: {found}"
    note = ("Paired by seed; each cell: the mean difference, its 95 % t-interval and the Holm p "
            "over the accuracy-vs-sft family (bench/README.md).")
    return [n.status(), "", verdict_line, ""] + lines + ["", note]


# --------------------------------------------------------------------- real dialogues with noise
class Real:
    """bench/real_noise.py's committed results.json (None when it is not there)."""

    def __init__(self, path=REAL):
        self.path = Path(path)
        self.res = json.loads(self.path.read_text()) if self.path.is_file() else None

    def status(self):
        planned = len(real_noise.METHODS)
        command = "`python bench/real_noise.py`"
        if self.res is None:
            return (f"0 of {planned} training runs of {command} are finished "
                    f"({relative(self.path)} is not in the repository yet).")
        seed = self.res["settings"]["seed"]
        return (f"{len(self.res['runs'])} of {planned} training runs of {command} are finished "
                f"(seed {seed}; {relative(self.path)}).")


def section(real, make, *args):
    """A bench/real_noise_report.py section, make(results, *args), without its heading, under the
    status line."""
    if real.res is None:
        return [real.status()]
    lines = [line for line in make(real.res, *args) if not line.startswith("#")]
    while lines and not lines[0]:
        lines.pop(0)
    return [real.status(), ""] + lines


def acceptance_rows(res):
    """The context-gain view's targets against the loss detector, one table per gain run."""
    lines = []
    for name, acc in res.get("acceptance", {}).items():
        lines += report.acceptance_section(name, acc)
    return lines or ["No run with the gain view in the results."]


def replay_rows(res):
    """The replay sweep's table, or why there is none."""
    if "replay" not in res:
        return ["No replay: the run was made with --no-sweep."]
    return report.replay_section(res["replay"])


def gain_summary(real):
    """Per noise kind: what the base model's scores can see (ROC AUC against the clean turns) and
    the recall of real_noise's two ReSURE runs (the loss detector, and loss+gain) at each turn's
    last sighting; then precision, recall and the clean flag rate."""
    if real.res is None:
        return [real.status()]
    detect = real.res["detectability"]
    runs = {name: real.res["runs"][name]["flagging"]["any"]["last"]
            for name in (real_noise.LOSS_RUN, real_noise.GAIN_RUN)}
    lines = head(["noise kind (turns)", "AUC: loss", "AUC: low gain", "AUC: high gain",
                  *[f"recall, {name}" for name in runs]])
    for kind in KINDS:
        if kind not in detect:
            continue
        d = detect[kind]
        recalls = [fixed(t["by_kind"].get(kind, {}).get("recall"), missing="-")
                   for t in runs.values()]
        lines.append(row([f"{kind} ({d['n']})", fixed(d["auc_loss"]), fixed(d["auc_gain_low"]),
                          fixed(d["auc_gain_high"]), *recalls]))
    pairs = [f"{fixed(t['precision'])} / {fixed(t['recall'])}" for t in runs.values()]
    lines.append(row(["all noisy turns: precision / recall", "", "", "", *pairs]))
    rates = [percent(t["clean_flag_rate"]) for t in runs.values()]
    lines.append(row([f"clean turns flagged ({detect['clean']['n']})", "", "", "", *rates]))
    return [real.status(), ""] + lines


# ------------------------------------------------------------------------------------ baselines
class Baselines:
    """The baselines' clean-test answer counts (bench/results/baselines/results.json): per table,
    each setting's right answers out of the same test answers, and the comparator queries spent."""

    def __init__(self, path=BASELINES):
        self.path = Path(path)
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else None

    def comparisons(self):
        """Every setting against its table's reference, one family: (table, comparison) pairs."""
        pairs = []
        for table in self.saved["tables"].values():
            total = table["answers"]
            reference = table["reference"]
            for name, right in table["right"].items():
                if name == reference:
                    continue
                c = compare_proportions(name, reference, right, total,
                                        table["right"][reference], total)
                pairs.append((table, c))
        family([c for _, c in pairs])
        return pairs


def baselines_vs_sft(b):
    """Each baseline's clean-test accuracy against SFT on the same data, with Newcombe's interval
    and the Holm p over all of them."""
    if b.saved is None:
        return [f"{relative(b.path)} is not in the repository yet."]
    lines = head(["setting", "against", "right of answers", "comparator queries",
                  "difference, points", f"{LEVEL} interval", "Holm p", ""])
    for table, c in b.comparisons():
        right = f"{table['right'][c.name]} of {table['answers']}"
        queries = table["comparator_queries"].get(c.name, "none")
        difference = signed(100 * c.mean, 1)
        if c.resolved:
            difference = f"**{difference}**"
        lines.append(row([c.name, c.setting, right, queries, difference,
                          interval_text(c, 100, 1), p_text(c.p_holm), verdict(c)]))
    note = (f"{b.saved['source']} ({relative(b.path)}). One run per setting, so the pairs are "
            "not seeds: each accuracy is a proportion of the same test answers, compared as two "
            f"independent proportions (difference in points, Newcombe's {LEVEL} score interval, "
            "the pooled z-test's p Holm-adjusted over the rows; answers to the same questions are "
            "positively correlated, so a paired interval would be narrower). Resolved (bold): "
            f"Holm p < 0.05; otherwise {NO_DIFFERENCE}.")
    return lines + ["", note]


# --------------------------------------------------------------------------------- the documents
# name -> (its results: "noise", "real" or "baselines", the function that writes it, its further
# arguments)
TABLES = {
    "noise/configurations": ("noise", configurations, ()),
    "noise/accuracy": ("noise", scores, ("accuracy",)),
    "noise/loss": ("noise", scores, ("loss",)),
    "noise/regime": ("noise", comparisons, ("accuracy from H", ("sft",))),
    "noise/from-h": ("noise", comparisons, ("accuracy from H",)),
    "noise/vs-sft": ("noise", comparisons, ("accuracy vs sft",)),
    "noise/loss-vs-sft": ("noise", comparisons, ("loss vs sft",)),
    "noise/from-h-vs-sft": ("noise", comparisons, ("from H vs sft's",)),
    "noise/vs-paper": ("noise", comparisons, ("accuracy vs resure",)),
    "noise/flagging": ("noise", flagging, ()),
    "noise/claims": ("noise", claims, ()),
    "noise/answer": ("noise", answer, ()),
    "real-noise/summary": ("real", gain_summary, ()),
    "real-noise/detect": ("real", section, (report.detect_section,)),
    "real-noise/flags-first": ("real", section, (report.sighting_section, "first")),
    "real-noise/flags-last": ("real", section, (report.sighting_section, "last")),
    "real-noise/kind-precision": ("real", section, (report.kind_precision_section,)),
    "real-noise/first-auc": ("real", section, (report.first_auc_section,)),
    "real-noise/heldout": ("real", section, (report.heldout_section,)),
    "real-noise/vs-sft": ("real", section, (report.comparison_section,)),
    "real-noise/acceptance": ("real", section, (acceptance_rows,)),
    "real-noise/replay": ("real", section, (replay_rows,)),
    "baselines/vs-sft": ("baselines", baselines_vs_sft, ()),
}


def blocks(path, lines):
    """(name, open line, close line) of every table of a document's lines; one line naming the
    file and line on a marker that is not closed or a name that is not known."""
    found = []
    start = None
    for i, line in enumerate(lines):
        opening = OPEN.match(line)
        if opening and start is not None:
            raise TableError(f"{path}:{i + 1}: a table opens inside the table of line {start + 1}")
        if opening:
            start = i
            name = opening.group(1).strip()
            if name not in TABLES:
                raise TableError(f"{path}:{i + 1}: unknown table {name!r} (known: "
                                 f"{', '.join(TABLES)})")
        elif line == CLOSE and start is None:
            raise TableError(f"{path}:{i + 1}: {CLOSE} without a table opened before it")
        elif line == CLOSE:
            found.append((name, start, i))
            start = None
    if start is not None:
        raise TableError(f"{path}:{start + 1}: table {name!r} is not closed by {CLOSE}")
    return found


def rewrite(text, path, sources):
    """The document with every table written from its results: (new text, [(line, name) of each
    table that changed])."""
    lines = text.split("\n")
    changed = []
    for name, start, end in reversed(blocks(path, lines)):
        kind, write, args = TABLES[name]
        body = "\n".join(write(sources[kind], *args)).split("\n")  # one line per element
        if lines[start + 1:end] != body:
            changed.append((start + 1, name))
        lines[start + 1:end] = body
    return "\n".join(lines), sorted(changed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 naming each table its results no longer give")
    p.add_argument("--root", default=str(ROOT), help="the folder of the documents")
    p.add_argument("--noise", default=str(NOISE), help="the noise experiment's results.json")
    p.add_argument("--real", default=str(REAL), help="bench/real_noise.py's results.json")
    p.add_argument("--baselines", default=str(BASELINES),
                   help="the baselines' answer counts (results.json)")
    a = p.parse_args(argv)
    sources = {"noise": Noise(a.noise), "real": Real(a.real), "baselines": Baselines(a.baselines)}
    stale = []
    for document in DOCUMENTS:
        path = Path(a.root) / document
        if not path.is_file():
            raise TableError(f"{path}: no such document")
        text = path.read_text()
        new, changed = rewrite(text, document, sources)
        stale += [f"{document}:{line}: table {name}" for line, name in changed]
        if new != text and not a.check:
            path.write_text(new)
    if a.check and stale:
        for line in stale:
            print(f"{line} differs from its results (python bench/tables.py rewrites it)")
        return 1
    if not a.check:
        print(f"{len(stale)} table(s) rewritten" + "".join(f"\n  {x}" for x in stale))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TableError, ValueError, OSError) as e:
        print(f"tables.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
