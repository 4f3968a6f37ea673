"""The noise-robustness experiment in miniature (issues 8 and 9): does ReSURE keep a model from getting worse as
the training data grows noisier, where plain SFT gets worse?

    python bench/noise.py --quick     # SmolLM2-135M-Instruct, <= 30 minutes on 2 CPU cores
    python bench/noise.py --full      # a GPU: more data, steps and seeds
    python bench/noise.py --tiny      # a tiny random model, seconds (what CI runs; the numbers mean nothing)
    options: --model DIR --out DIR --seeds 1,2,3 --steps N --methods sft,resure --dtype bf16 ...

Data (data.synth, one benchmark per seed): tiers H (clean), N (~24% noisy assistant turns), L (~53%) are the same
dialogues with different injected noise. Like the paper's Fig. 2 / Table 4, a mixture adds data of falling quality:
    H      = the H version of dialogue set A              (n dialogues, no noise)
    H+N    = H of A + the N version of a disjoint set B  (2n)
    H+N+L  = H of A + N of B + the L version of C        (3n)
Every run trains the same number of optimizer steps (same compute), so a larger mixture is not seen more often;
the paper trains epochs instead (more data = more steps), which a CPU budget does not allow.

Methods, each trained by train.main(argv), so exactly the real training code runs (unit = one assistant turn):
    sft                      --method sft (every weight 1; the paper's "w/o Welford", Vicuna-style tuning)
    resure                   --method resure --stats ema --stats-update winsorized (issue 9's estimator)
    prefilter                keep the 0.75 of each mixture with the lowest base-model loss, then sft
    prefilter+resure         the same kept data, then resure
    global, hard             the paper's ablations (one group for all turn depths; flagged weight 0), ema/winsorized
    resure[welford/reliable] the paper's estimator read literally; resure[mad/all] a windowed median / MAD
Pre-filtering: the mixture is scored once per seed with train.score_units and resure.prefilter, exactly what
`train.py --prefilter-keep 0.75` does, and the kept conversations are trained on (identical examples and order).

Measured per (method, mixture, seed): clean-test exact-match accuracy (eval.accuracy, greedy, reference history)
and per-turn loss (eval.per_turn_loss) on the seed's clean test dialogues; flagging precision / recall of every
unit decision after the warm-up (units.jsonl of train.py --record-units) against the injected per-turn noise
labels, per noise type and per turn depth. Over seeds: mean and sample std; a difference to SFT is the mean of the
per-seed (paired) differences, and is marked "within spread" when it is not larger than their std. Spearman
(eval.spearman) between the mixture (1, 2, 3) and the score over all (mixture, seed) pairs, per method: the paper
reports it negative for SFT and positive for ReSURE. Writes OUT/results.md, OUT/results.json and OUT/noise.png
(if matplotlib is installed; otherwise a printed note).
"""
import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model as M  # noqa: E402
import train  # noqa: E402
from data import ChatTemplate, build_examples, load_conversations, save_jsonl  # noqa: E402
from tools.smollm2 import prepare_smollm2  # noqa: E402
from tools.synth import synth  # noqa: E402
from eval import accuracy, per_turn_loss, spearman  # noqa: E402
from lora import merge_lora  # noqa: E402
from resure import ReSURE, prefilter  # noqa: E402
from speed import cpu_info, make_tiny_model  # noqa: E402

MIXTURES = ("H", "H+N", "H+N+L")
ESTIMATOR = dict(stats="ema", stats_update="winsorized")
VARIANTS = {  # name -> train.py flags (+ prefilter: train on the kept 0.75)
    "sft": dict(method="sft"),
    "resure": dict(method="resure", **ESTIMATOR),
    "prefilter": dict(method="sft", prefilter=True),
    "prefilter+resure": dict(method="resure", prefilter=True, **ESTIMATOR),
    "global": dict(method="global", **ESTIMATOR),
    "hard": dict(method="hard", **ESTIMATOR),
    "resure[welford/reliable]": dict(method="resure", stats="welford", stats_update="reliable"),
    "resure[mad/all]": dict(method="resure", stats="mad", stats_update="all"),
}
ESTIMATOR_ROWS = {"resure[welford/reliable]": "welford / reliable (paper)", "resure": "ema / winsorized",
                  "resure[mad/all]": "mad / all"}
PREFILTER_KEEP = 0.75
PRESETS = {
    # n: dialogues per tier in a mixture; test: clean test dialogues; steps: optimizer steps per run
    "tiny": dict(seeds=[1, 2], n=12, test=3, steps=2, batch=4, lr=3e-3, lora_r=4, lora_alpha=8, warmup=8, ramp=1,
                 max_len=160, max_turns=4, new_tokens=8, dtype="fp32",
                 methods=("sft", "resure", "prefilter+resure", "resure[mad/all]")),
    "quick": dict(seeds=[1, 2], n=64, test=12, steps=10, batch=8, lr=1e-3, lora_r=16, lora_alpha=32, warmup=32,
                  ramp=3, max_len=192, max_turns=4, new_tokens=16, dtype="fp32",
                  methods=("sft", "resure", "prefilter", "hard", "resure[welford/reliable]", "resure[mad/all]")),
    "full": dict(seeds=[1, 2, 3, 4, 5], n=600, test=200, steps=300, batch=16, lr=5e-4, lora_r=16, lora_alpha=32,
                 warmup=256, ramp=20, max_len=256, max_turns=5, new_tokens=32, dtype="bf16"),
}


class BenchError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------- data
def make_data(root, seed, n, n_test, max_turns):
    """Synthetic benchmark of this seed and the three mixtures as JSONL files; returns their paths and stats."""
    d = Path(root) / f"data-seed{seed}"
    synth(d, seed=seed, n_train=3 * n, n_test=n_test, max_turns=max_turns)
    tiers = {t: load_conversations(d / f"train_{t}.jsonl") for t in "HNL"}
    parts = {"H": tiers["H"][:n], "N": tiers["N"][n:2 * n], "L": tiers["L"][2 * n:3 * n]}
    paths, stats = {}, {}
    for mix in MIXTURES:
        convs = [c for t in mix.split("+") for c in parts[t]]
        paths[mix] = d / f"mix_{mix}.jsonl"
        save_jsonl(convs, paths[mix])
        turns = [m for c in convs for m in c["messages"] if m["role"] == "assistant"]
        kinds = {}
        for m in turns:
            if m.get("noisy"):
                kinds[m["noise_type"]] = kinds.get(m["noise_type"], 0) + 1
        stats[mix] = {"dialogues": len(convs), "turns": len(turns), "noisy": sum(bool(m.get("noisy")) for m in turns),
                      "kinds": kinds}
    return paths, d / "test.jsonl", stats


def prefiltered(net, tpl, path, plan, out_path):
    """The kept 0.75 of a mixture, as train.py --prefilter-keep computes it (base-model per-dialogue loss)."""
    convs = load_conversations(path)
    examples, _ = build_examples(convs, tpl, plan["max_len"])
    dtype, dev = _dtype(plan), _device()
    amp = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    scores, _ = train.score_units(net, examples, tpl.pad_id, dev, "dialogue", autocast=amp)
    keep = prefilter(scores, keep=PREFILTER_KEEP)
    kept = [convs[examples[i]["conv_index"]] for i in keep]
    save_jsonl(kept, out_path)
    noisy = [train.unit_noisy(e, 0) for e in examples]  # the supervised turns this example trains on
    dropped = np.ones(len(examples), bool)
    dropped[keep] = False
    tp, nd, nn_ = int((dropped & noisy).sum()), int(dropped.sum()), int(np.sum(noisy))
    return {"kept": len(kept), "of": len(examples), "dropped_noisy": tp,
            "precision": tp / nd if nd else math.nan, "recall": tp / nn_ if nn_ else math.nan}


def prefiltered_path(path):
    return path.with_name(f"{path.stem}_prefilter.jsonl")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(plan):
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["dtype"]]


# ----------------------------------------------------------------------------------------------------- one run
def train_argv(plan, model_dir, data, out, seed, v):
    a = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-resume", "--seed", str(seed),
         "--max-steps", str(plan["steps"]), "--batch-size", str(plan["batch"]), "--grad-accum", "1",
         "--lr", str(plan["lr"]), "--warmup-ratio", "0.05", "--lora-r", str(plan["lora_r"]),
         "--lora-alpha", str(plan["lora_alpha"]), "--lora-dropout", "0.05", "--max-len", str(plan["max_len"]),
         "--dtype", plan["dtype"], "--unit", plan["unit"], "--alpha", "1.0", "--floor-percentile", "5",
         "--warmup-samples", str(plan["warmup"]), "--ramp-steps", str(plan["ramp"]), "--method", v["method"],
         "--record-units", "--log-every", str(max(1, plan["steps"] // 4)), "--report-top", "5"]
    if "stats" in v:
        a += ["--stats", v["stats"], "--stats-update", v["stats_update"]]
    return a


def run_one(plan, model_dir, data, out, seed, v, test_convs, test_examples, tpl, train_examples):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    log = io.StringIO()
    t0 = time.time()
    with redirect_stdout(log):
        net = train.main(train_argv(plan, model_dir, data, out, seed, v))
    t_train = time.time() - t0
    (Path(out) / "train.log").write_text(log.getvalue())
    merge_lora(net)
    net.eval()
    acc = accuracy(net, tpl, test_convs, batch_size=16, max_new_tokens=plan["new_tokens"])
    ptl = per_turn_loss(net, test_examples, batch_size=16, pad_id=tpl.pad_id)
    res = {"accuracy": acc["overall"], "acc_total": acc["total"],
           "acc_per_turn": {int(k): r["accuracy"] for k, r in acc["per_turn"].items()},
           "loss": ptl["overall"]["loss"], "loss_per_turn": {int(k): r["loss"] for k, r in ptl["per_turn"].items()},
           "train_s": t_train, "eval_s": time.time() - t0 - t_train,
           "warnings": json.loads((Path(out) / "resure_state.json").read_text())["warned"]}
    if v["method"] != "sft":
        res["flagging"] = flagging(out, train_examples)
    del net
    for d in Path(out).iterdir():  # the adapter and checkpoints (~80 MB a run at r=16): logs and units stay
        if d.is_dir():
            shutil.rmtree(d)
    return res


def flagging(out, examples):
    """Unit decisions after the warm-up against the injected labels (examples: the run's training set, as
    train.py built it): overall, per noise type, per turn depth."""
    rows = []
    for r in map(json.loads, open(Path(out) / "units.jsonl")):
        if r["warmup"] or r["skipped"]:              # no decision yet, or a step train.py undid
            continue
        ex, t = examples[r["sample"]], r["turn"]
        noisy = train.unit_noisy(ex, t)
        kind = (ex["meta"]["noise_type"][t - 1] if t > 0 else "mixed") if noisy else "clean"
        rows.append((r["flagged"], noisy, kind, t or r["group"], r["weight"]))

    def pr(sel):
        f = np.array([x[0] for x in sel], bool)
        n = np.array([x[1] for x in sel], bool)
        w = np.array([x[4] for x in sel], float)
        tp = int((f & n).sum())
        return {"units": len(sel), "noisy": int(n.sum()), "flagged": int(f.sum()), "tp": tp,
                "precision": tp / f.sum() if f.sum() else math.nan, "recall": tp / n.sum() if n.sum() else math.nan,
                "flag_rate": f.mean() if len(f) else math.nan,
                "weight_noisy": w[n].mean() if n.any() else math.nan,
                "weight_clean": w[~n].mean() if (~n).any() else math.nan}
    return {"all": pr(rows),
            "by_kind": {k: pr([x for x in rows if x[2] == k]) for k in sorted({x[2] for x in rows})},
            "by_depth": {d: pr([x for x in rows if x[3] == d]) for d in sorted({x[3] for x in rows})}}


# --------------------------------------------------------------------------------------------------- statistics
def mean_sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def fmt(m, s, scale=1.0, digits=1):
    if not math.isfinite(m):
        return "n/a"
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if math.isfinite(s) else "")


def pooled(results, variant, mixture, section):
    """Flagging counts of a (variant, mixture) summed over seeds, precision/recall recomputed from the sums.
    section: "all" -> {"all": counts}; "by_kind" / "by_depth" -> {key: counts}."""
    tot = {}
    for r in results:
        if r["variant"] != variant or r["mixture"] != mixture or "flagging" not in r:
            continue
        node = r["flagging"][section]
        for sub, d in ({"all": node} if section == "all" else node).items():
            t = tot.setdefault(sub, {"units": 0, "noisy": 0, "flagged": 0, "tp": 0})
            for c in t:
                t[c] += d[c]
    for t in tot.values():
        t["precision"] = t["tp"] / t["flagged"] if t["flagged"] else math.nan
        t["recall"] = t["tp"] / t["noisy"] if t["noisy"] else math.nan
        t["flag_rate"] = t["flagged"] / t["units"] if t["units"] else math.nan
    return tot


def summarize(results, variants, seeds):
    """{variant: {mixture: {acc: (m, sd), loss: (m, sd), d_acc: (m, sd) vs sft}}, spearman per variant}."""
    get = lambda v, mix, k: [r[k] for r in results if r["variant"] == v and r["mixture"] == mix]  # noqa: E731
    out = {}
    for v in variants:
        row = {}
        for mix in MIXTURES:
            row[mix] = {k: mean_sd(get(v, mix, k)) for k in ("accuracy", "loss")}
            if v != "sft" and "sft" in variants:
                for k in ("accuracy", "loss"):
                    a = {r["seed"]: r[k] for r in results if r["variant"] == v and r["mixture"] == mix}
                    b = {r["seed"]: r[k] for r in results if r["variant"] == "sft" and r["mixture"] == mix}
                    row[mix]["d_" + k] = mean_sd([a[s] - b[s] for s in seeds if s in a and s in b])
        xs = [MIXTURES.index(r["mixture"]) + 1 for r in results if r["variant"] == v]
        sp = {}
        for k in ("accuracy", "loss"):
            ys = [r[k] for r in results if r["variant"] == v]
            ok = len(ys) >= 2 and len(set(xs)) > 1 and all(math.isfinite(y) for y in ys)
            sp[k] = spearman(xs, ys) if ok else math.nan
        out[v] = {"mixtures": row, "spearman": sp}
    return out


def verdict(m, s):
    if not math.isfinite(m):
        return ""
    if not math.isfinite(s):
        return " (one seed: no spread)"
    return " (within spread)" if abs(m) <= s else ""


# -------------------------------------------------------------------------------------------------------- report
def write_results(out, plan, results, summary, data_stats, prefilter_stats, base, machine, wall):
    v_list = [v for v in plan["methods"] if v in summary]
    L = [f"# Noise robustness in miniature (bench/noise.py, preset {plan['preset']})", "",
         f"Machine: {machine}. Wall time {wall / 60:.1f} min.", "",
         f"Plan: model {plan['model_name']}; seeds {plan['seeds']}; {plan['n']} dialogues per tier; "
         f"{plan['steps']} optimizer steps x batch {plan['batch']} per run (same compute for every mixture); "
         f"lr {plan['lr']}, LoRA r={plan['lora_r']} alpha={plan['lora_alpha']}, unit={plan['unit']}, "
         f"{plan['dtype']}; ReSURE warm-up {plan['warmup']} units, ramp {plan['ramp']} steps, alpha 1, floor 5th "
         f"percentile; {plan['test']} clean test dialogues per seed; greedy answers of at most {plan['new_tokens']} "
         "tokens. Mean ± sample std over seeds (each seed: its own synthetic data, LoRA init and order).", "",
         "## Data (summed over seeds)", "", "| mixture | dialogues | assistant turns | noisy turns | by kind |",
         "|---|---|---|---|---|"]
    for mix in MIXTURES:
        st = [data_stats[s][mix] for s in plan["seeds"]]
        kinds = {}
        for s in st:
            for k, n in s["kinds"].items():
                kinds[k] = kinds.get(k, 0) + n
        turns, noisy = sum(s["turns"] for s in st), sum(s["noisy"] for s in st)
        L.append(f"| {mix} | {sum(s['dialogues'] for s in st)} | {turns} | {noisy} ({100 * noisy / turns:.1f}%) | "
                 + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + " |")
    L += ["", "## Clean-test exact-match accuracy (%)", "",
          "| method | " + " | ".join(MIXTURES) + " | Spearman(mixture, accuracy) |", "|---" * (len(MIXTURES) + 2) + "|"]
    bm = mean_sd([b["accuracy"] for b in base.values()])
    L.append("| base model (no training) | " + " | ".join([fmt(*bm, 100)] * len(MIXTURES)) + " | |")
    for v in v_list:
        row = summary[v]["mixtures"]
        L.append(f"| {v} | " + " | ".join(fmt(*row[m]["accuracy"], 100) for m in MIXTURES) +
                 f" | {_sp(summary[v]['spearman']['accuracy'])} |")
    L += ["", "## Clean-test loss per supervised token (lower is better)", "",
          "| method | " + " | ".join(MIXTURES) + " | Spearman(mixture, loss) |", "|---" * (len(MIXTURES) + 2) + "|"]
    bl = mean_sd([b["loss"] for b in base.values()])
    L.append("| base model (no training) | " + " | ".join([fmt(*bl, 1, 3)] * len(MIXTURES)) + " | |")
    for v in v_list:
        row = summary[v]["mixtures"]
        L.append(f"| {v} | " + " | ".join(fmt(*row[m]["loss"], 1, 3) for m in MIXTURES) +
                 f" | {_sp(summary[v]['spearman']['loss'])} |")
    if "sft" in v_list:
        L += ["", "## Difference to SFT (paired by seed; accuracy in points, loss)", "",
              "| method | " + " | ".join(f"{m}: d accuracy | {m}: d loss" for m in MIXTURES) + " |",
              "|---" * (2 * len(MIXTURES) + 1) + "|"]
        for v in v_list:
            if v == "sft":
                continue
            row = summary[v]["mixtures"]
            cells = []
            for m in MIXTURES:
                da, dl = row[m]["d_accuracy"], row[m]["d_loss"]
                cells += [("+" if da[0] > 0 else "") + fmt(*da, 100) + verdict(*da),
                          ("+" if dl[0] > 0 else "") + fmt(*dl, 1, 3) + verdict(*dl)]
            L.append(f"| {v} | " + " | ".join(cells) + " |")
    L += ["", "## Flagging against the injected noise labels (units after the warm-up, pooled over seeds)", "",
          "| method | mixture | units | noisy | flagged | precision | recall | mean weight noisy / clean | "
          "lag / collapse warnings |", "|---|---|---|---|---|---|---|---|---|"]
    for v in v_list:
        if VARIANTS[v]["method"] == "sft":
            continue
        for mix in MIXTURES:
            t = pooled(results, v, mix, "all").get("all")
            if not t:
                continue
            rs = [r for r in results if r["variant"] == v and r["mixture"] == mix]
            wn = mean_sd([r["flagging"]["all"]["weight_noisy"] for r in rs])[0]
            wc = mean_sd([r["flagging"]["all"]["weight_clean"] for r in rs])[0]
            warn = sorted({w for r in rs for w in r["warnings"]})
            L.append(f"| {v} | {mix} | {t['units']} | {t['noisy']} | {t['flagged']} | {_p(t['precision'])} | "
                     f"{_p(t['recall'])} | {_f(wn)} / {_f(wc)} | {', '.join(warn) or '-'} |")
    if prefilter_stats:
        L += ["", "Static pre-filtering (base-model loss, keep 0.75), as a detector of dialogues with any noisy turn: "
              + "; ".join(f"{mix}: precision {_p(np.mean([p[mix]['precision'] for p in prefilter_stats.values()]))}, "
                          f"recall {_p(np.mean([p[mix]['recall'] for p in prefilter_stats.values()]))}"
                          for mix in MIXTURES) + " (mean over seeds)."]
    last = MIXTURES[-1]
    flaggers = [v for v in v_list if VARIANTS[v]["method"] != "sft"]
    if flaggers:
        L += ["", f"### Per noise type, mixture {last} (flag rate = recall for a noise type, false-positive rate "
              "for clean)", "", "| method | " + " | ".join(_kinds(results, last)) + " |",
              "|---" * (len(_kinds(results, last)) + 1) + "|"]
        for v in flaggers:
            t = pooled(results, v, last, "by_kind")
            L.append(f"| {v} | " + " | ".join(f"{_p(t[k]['flag_rate'])} (n={t[k]['units']})" if k in t else "-"
                                              for k in _kinds(results, last)) + " |")
        depths = sorted({int(d) for r in results if r["mixture"] == last and "flagging" in r
                         for d in r["flagging"]["by_depth"]})
        L += ["", f"### Per turn depth, mixture {last}: precision / recall (noisy fraction)", "",
              "| method | " + " | ".join(f"turn {d}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
        for v in flaggers:
            t = pooled(results, v, last, "by_depth")
            L.append(f"| {v} | " + " | ".join(
                f"{_p(t[d]['precision'])} / {_p(t[d]['recall'])} ({_p(t[d]['noisy'] / t[d]['units'])})"
                if d in t and t[d]["units"] else "-" for d in depths) + " |")
    L += ["", f"### Clean-test loss per turn depth, mixture {last}", ""]
    depths = sorted({int(d) for r in results for d in r["loss_per_turn"]})
    L += ["| method | " + " | ".join(f"turn {d}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    for v in v_list:
        rs = [r for r in results if r["variant"] == v and r["mixture"] == last]
        L.append(f"| {v} | " + " | ".join(fmt(*mean_sd([r["loss_per_turn"].get(d, math.nan) for r in rs]), 1, 3)
                                          for d in depths) + " |")
    L += ["", "## What this run shows", ""] + findings(summary, v_list, results, plan)
    text = "\n".join(L) + "\n"
    (Path(out) / "results.md").write_text(text)
    return text


def _kinds(results, mix):
    ks = sorted({k for r in results if r["mixture"] == mix and "flagging" in r for k in r["flagging"]["by_kind"]})
    return ["clean"] + [k for k in ks if k != "clean"] if "clean" in ks else ks


def _p(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _f(x):
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


def _sp(x):
    return "n/a" if not math.isfinite(x) else f"{x:+.2f}"


def findings(summary, v_list, results, plan):
    """Plain sentences generated from the numbers, whatever they show, and the limits of this run."""
    prompts = {r["seed"]: r["acc_total"] for r in results if "acc_total" in r}
    out = [f"- Every run trains {plan['steps']} steps: a larger mixture is not trained on longer, so more data cannot "
           "help here; the mixtures measure falling quality at equal compute (the paper trains epochs)."]
    if prompts:
        out.append(f"- Accuracy is over {min(prompts.values())}-{max(prompts.values())} test answers per seed: one "
                   f"answer is {100 / min(prompts.values()):.1f} points.")
    if plan["steps"] < ReSURE().warn_steps:
        out.append(f"- Runs are shorter than the {ReSURE().warn_steps} steps after which resure.py warns of lag or "
                   "collapse, so no such warning can appear here.")
    for v in v_list:
        sp = summary[v]["spearman"]["accuracy"]
        out.append(f"- {v}: Spearman(mixture, accuracy) = {_sp(sp)} "
                   + ("(more, noisier data helped)" if sp > 0 else "(more, noisier data hurt)" if sp < 0 else
                      "(no trend)" if math.isfinite(sp) else ""))
    if "sft" in v_list:
        for v in v_list:
            if v == "sft":
                continue
            for mix in MIXTURES[1:]:
                m, s = summary[v]["mixtures"][mix]["d_accuracy"]
                if math.isfinite(m):
                    word = "better" if m > 0 else "worse" if m < 0 else "equal"
                    out.append(f"- {v} vs sft on {mix}: {100 * m:+.1f} points accuracy ({word})" + verdict(m, s))
    lag = sorted({(r["variant"], r["mixture"]) for r in results if "lag" in r["warnings"]})
    col = sorted({(r["variant"], r["mixture"]) for r in results if "collapse" in r["warnings"]})
    if lag:
        out.append("- lag warning raised in: " + ", ".join(f"{v} on {m}" for v, m in lag))
    if col:
        out.append("- collapse warning raised in: " + ", ".join(f"{v} on {m}" for v, m in col))
    return out


def plot(out, summary, v_list):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot written (pip install matplotlib for noise.png)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(MIXTURES))
    for i, v in enumerate(v_list):
        for ax, k, scale in ((axes[0], "accuracy", 100), (axes[1], "loss", 1)):
            ms = [summary[v]["mixtures"][m][k] for m in MIXTURES]
            ax.errorbar(x + (i - len(v_list) / 2) * 0.03, [m * scale for m, _ in ms],
                        yerr=[(s * scale if math.isfinite(s) else 0) for _, s in ms], marker="o", capsize=3, label=v)
    for ax, title in ((axes[0], "clean-test exact match (%)"), (axes[1], "clean-test loss per token")):
        ax.set_xticks(x, MIXTURES)
        ax.set_xlabel("training mixture (more data, lower quality ->)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "noise.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="<= 30 minutes on 2 CPU cores (the default preset)")
    g.add_argument("--full", action="store_true", help="a GPU")
    g.add_argument("--tiny", action="store_true", help="a tiny random model (CI: checks that everything runs)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct; --tiny: a tiny random llama)")
    p.add_argument("--out", default="runs/noise", help="output folder (results.md, results.json, noise.png, runs)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the preset)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (overrides the preset)")
    p.add_argument("--n", type=int, help="dialogues per tier (overrides the preset)")
    p.add_argument("--test", type=int, help="clean test dialogues (overrides the preset)")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: all with "
                   "--full; --quick leaves out global and prefilter+resure to fit 30 minutes; --tiny runs 4)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="overrides the preset")
    p.add_argument("--unit", choices=["turn", "dialogue"], default="turn")
    p.add_argument("--threads", type=int, help="torch threads")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    preset = "tiny" if a.tiny else "full" if a.full else "quick"
    plan = dict(PRESETS[preset], preset=preset, unit=a.unit)
    for k in ("steps", "n", "test", "dtype"):
        if getattr(a, k) is not None:
            plan[k] = getattr(a, k)
    if a.seeds:
        plan["seeds"] = [int(s) for s in a.seeds.split(",")]
    plan["methods"] = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else \
        list(plan.get("methods", VARIANTS))
    bad = [m for m in plan["methods"] if m not in VARIANTS]
    if bad:
        raise BenchError(f"--methods: unknown {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = a.model
    if model_dir is None:
        model_dir = prepare_smollm2()
        if a.tiny:
            model_dir = make_tiny_model(out / "tiny-model", tokenizer_dir=model_dir)
    plan["model_name"] = Path(model_dir).name
    tpl = ChatTemplate.from_pretrained(model_dir)
    machine = (f"{cpu_info()[0]}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
               + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    runs = len(plan["seeds"]) * len(MIXTURES) * len(plan["methods"])
    skipped = [v for v in VARIANTS if v not in plan["methods"]]
    print(f"noise.py {preset}: {machine}; load average {os.getloadavg()[0]:.2f}")
    print(f"plan: {runs} training runs = {len(plan['seeds'])} seeds x {len(MIXTURES)} mixtures x "
          f"{len(plan['methods'])} methods ({', '.join(plan['methods'])}); {plan['steps']} steps x batch "
          f"{plan['batch']}; {plan['n']} dialogues per tier; {plan['test']} test dialogues; {plan['dtype']}; "
          f"model {model_dir}; output {out}" + (f"; not run: {', '.join(skipped)} (add them with --methods)"
                                                 if skipped else ""), flush=True)
    t_start = time.time()
    results, base, data_stats, prefilter_stats, train_examples = [], {}, {}, {}, {}
    done = 0
    for seed in plan["seeds"]:
        paths, test_path, data_stats[seed] = make_data(out, seed, plan["n"], plan["test"], plan["max_turns"])
        test_convs = load_conversations(test_path)
        test_examples, _ = build_examples(test_convs, tpl, plan["max_len"])
        net = M.Transformer.from_pretrained(model_dir, dtype=_dtype(plan), device=_device()).eval()
        b_acc = accuracy(net, tpl, test_convs, batch_size=16, max_new_tokens=plan["new_tokens"])
        base[seed] = {"accuracy": b_acc["overall"],
                      "loss": per_turn_loss(net, test_examples, batch_size=16, pad_id=tpl.pad_id)["overall"]["loss"]}
        if any(VARIANTS[m].get("prefilter") for m in plan["methods"]):
            prefilter_stats[seed] = {mix: prefiltered(net, tpl, paths[mix], plan, prefiltered_path(paths[mix]))
                                     for mix in MIXTURES}
        del net
        for mix in MIXTURES:
            for name in plan["methods"]:
                v = VARIANTS[name]
                data = prefiltered_path(paths[mix]) if v.get("prefilter") else paths[mix]
                run_dir = out / "runs" / f"seed{seed}" / mix / name.replace("/", "_")
                if data not in train_examples:  # tokenized once per data file, not once per run
                    train_examples[data] = build_examples(load_conversations(data), tpl, plan["max_len"])[0]
                r = run_one(plan, model_dir, data, run_dir, seed, v, test_convs, test_examples, tpl,
                            train_examples[data])
                r.update(variant=name, mixture=mix, seed=seed)
                results.append(r)
                done += 1
                el = time.time() - t_start
                fl = r.get("flagging", {}).get("all", {})
                print(f"[{done}/{runs}] seed {seed} {mix:6s} {name:25s} acc {100 * r['accuracy']:5.1f}% loss "
                      f"{r['loss']:.3f}" + (f" flagged {fl['flagged']}/{fl['units']} P {_p(fl['precision'])} "
                                            f"R {_p(fl['recall'])}" if fl else "")
                      + f" | {r['train_s']:.0f}+{r['eval_s']:.0f} s, ETA {el / done * (runs - done) / 60:.1f} min",
                      flush=True)
    wall = time.time() - t_start
    summary = summarize(results, plan["methods"], plan["seeds"])
    text = write_results(out, plan, results, summary, data_stats, prefilter_stats, base, machine, wall)
    (out / "results.json").write_text(json.dumps(_clean({
        "plan": plan, "machine": machine, "wall_s": wall, "base": base, "data": data_stats,
        "prefilter": prefilter_stats, "results": results, "summary": summary}), indent=1) + "\n")
    png = plot(out, summary, [v for v in plan["methods"] if v in summary])
    print("\n" + text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + (f", {png}" if png else ""))
    return {"results": results, "summary": summary, "out": str(out)}


def _clean(x):
    """JSON-safe: nan/inf -> null, numpy scalars -> Python, tuples -> lists, keys -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"noise.py: error: {e}", file=sys.stderr)
        sys.exit(2)
