"""Real dialogues with injected noise: which kinds of bad supervision the loss threshold and the context-gain view see.

    python bench/real_noise.py --out runs/real_noise     # SmolLM2-135M-Instruct, 1 torch thread (PRESETS["cpu"])
    python bench/real_noise.py --out /tmp/rn --quick     # a CI-sized check of the whole pipeline
    options: --seed S, --overhead-steps N (time the gain forward), --extra "NAME=train.py flags" (one more run)

Data: MT-Bench-101 (../shared/fixtures, 1388 multi-turn dialogues), split by seed into training dialogues, clean
warm-up dialogues and clean held-out dialogues. A fraction `rate` of the training assistant turns is replaced by
noise of five kinds, each labelled on its message ("noisy", "noise_type", "reference" = the original reply):
    off_topic            a reply taken from another dialogue
    shuffled             the reply's words in a random order
    truncated            the reply cut at a word boundary between 30 % and 70 % of its characters
    echo                 the reply repeats the user's turn before it
    wrong_same_dialogue  another turn's reply of the same dialogue (plausible, on topic, wrong)
Measured, all from train.py's own code:
  (a) the base model's per-turn loss and context gain of every training turn (train.score_units, what the
      detectors see at first sighting before any training): ROC AUC per noise kind against the clean turns of the
      loss, of low gain (-gain) and of high gain;
  (b) sft, resure --detector loss and resure --detector loss+gain, unit turn, the same data, seed and steps, with
      --record-units: flag precision / recall per view and per noise kind at the first judged sighting of each turn
      and at its last sighting, and the AUC of the loss at first sighting during training;
  (c) the clean held-out per-turn loss of the base model and after each run (train.py --eval-data).
  (d) a replay: resure.ReSURE run again over the loss+gain run's recorded (loss, gain) stream with other loss
      alphas and gain bands (SWEEP), from the stream's warm-up and from clean warm-up dialogues: which flags
      another setting would have raised on the same trajectory (its weights would have moved the trajectory a
      little, so a chosen setting is then trained for real with --extra).
Writes OUT/results.json and OUT/results.md; every training run lives in OUT/runs/NAME and is skipped when it is
already there, finished, and resumed when interrupted; the base model's scores are cached in OUT/base_scores.json.
"""
import argparse
import copy
import io
import json
import math
import os
import sys
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
import train  # noqa: E402
from data import ChatTemplate, build_examples  # noqa: E402
from support.conversations import iter_json_records, save_jsonl, validate  # noqa: E402
from eval import per_turn_loss  # noqa: E402
from resure import ReSURE  # noqa: E402
from scripts.convert import from_mtbench101  # noqa: E402

KINDS = ("off_topic", "shuffled", "truncated", "echo", "wrong_same_dialogue")
MTBENCH101 = ROOT.parent / "shared" / "fixtures" / "mt_bench_101" / "mtbench101.jsonl"
PRESETS = {
    # train / warm / test: dialogues; rate: noisy fraction of the training turns; steps: optimizer steps per run
    "cpu": dict(train=160, warm=48, test=48, rate=0.3, steps=40, batch=8, max_len=256, lr=1e-3, lora_r=16,
                lora_alpha=32, warmup_samples=48, ramp_steps=5),
    "quick": dict(train=16, warm=4, test=4, rate=0.4, steps=3, batch=4, max_len=128, lr=1e-3, lora_r=4,
                  lora_alpha=8, warmup_samples=8, ramp_steps=1),
}
# name -> train.py flags beyond the common ones; the three runs share data, seed, steps and batches.
METHODS = {
    "sft": ["--method", "sft"],
    "resure": ["--method", "resure", "--detector", "loss", "--warmup-data", "{warm}"],
    "resure+gain": ["--method", "resure", "--detector", "loss+gain", "--warmup-data", "{warm}"],
}


class BenchError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------- data
def load_mtbench101(path=None):
    """MT-Bench-101 as conversations (scripts/convert.py, validated by data.py), the dialogues with at least two
    assistant turns."""
    path = str(path or MTBENCH101)
    convs = validate(path, ((w, from_mtbench101(obj, i)) for i, (w, obj) in enumerate(iter_json_records(path))))
    return [c for c in convs if sum(m["role"] == "assistant" for m in c["messages"]) >= 2]


def split(convs, sizes, seed):
    """Disjoint random subsets of the given sizes (a seeded permutation); a dialogue whose first user message
    already appeared in an earlier subset is skipped, so no held-out dialogue repeats a training one's opening."""
    order = np.random.default_rng([seed, 1]).permutation(len(convs))
    seen, parts, pos = set(), [], 0
    for n in sizes:
        part = []
        while len(part) < n and pos < len(order):
            c = convs[order[pos]]
            pos += 1
            key = c["messages"][0]["content"]
            if key not in seen:
                part.append(c)
        seen |= {c["messages"][0]["content"] for c in part}
        if len(part) < n:
            raise BenchError(f"only {len(part)} dialogues left for a subset of {n}")
        parts.append(part)
    return parts


def _eligible(kind, conv, j, asst):
    """Can turn j (index into the dialogue's assistant messages asst) carry this kind of noise?"""
    text = conv["messages"][asst[j]]["content"]
    words = text.split()
    if kind == "shuffled":
        return len(set(words)) >= 3
    if kind == "truncated":
        return len(words) >= 4
    if kind == "echo":
        return conv["messages"][asst[j] - 1]["content"].strip() != text.strip()
    if kind == "wrong_same_dialogue":
        return any(conv["messages"][i]["content"] != text for i in asst if i != asst[j])
    return True


def inject(convs, rate, kinds=KINDS, seed=0):
    """A copy of convs where round(rate * assistant turns) replies are replaced by noise, the kinds in equal
    shares (the first kinds get the remainder); every assistant message is labelled noisy, noise_type (None when
    clean) and reference (its original reply). Deterministic given seed. A kind takes only turns it can change
    (shuffled: >= 3 distinct words, truncated: >= 4 words, wrong_same_dialogue: another turn with another reply)."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds) or not 0 <= rate <= 1:
        raise BenchError(f"inject: kinds must be distinct names of {KINDS} and 0 <= rate <= 1, got {kinds}, {rate}")
    out = copy.deepcopy(convs)
    asst = [[i for i, m in enumerate(c["messages"]) if m["role"] == "assistant"] for c in out]
    turns = [(ci, j) for ci, a in enumerate(asst) for j in range(len(a))]
    for ci, a in enumerate(asst):
        for i in a:
            m = out[ci]["messages"][i]
            m.update(noisy=False, noise_type=None, reference=m["content"])
    rng = np.random.default_rng([seed, 2])
    n = int(round(rate * len(turns)))
    quota = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    taken = {}
    # the most constrained kinds choose first, each from its own seeded order of the turns
    for kind in sorted(kinds, key=("wrong_same_dialogue", "truncated", "shuffled", "echo", "off_topic").index):
        got = 0
        for t in rng.permutation(len(turns)):
            if got == quota[kind]:
                break
            ci, j = turns[t]
            if (ci, j) not in taken and _eligible(kind, out[ci], j, asst[ci]):
                taken[(ci, j)] = kind
                got += 1
        if got < quota[kind]:
            raise BenchError(f"inject: only {got} turns can take {kind} noise, {quota[kind]} asked")
    for (ci, j), kind in sorted(taken.items()):
        msgs = out[ci]["messages"]
        m = msgs[asst[ci][j]]
        m.update(content=_noise(kind, out, ci, j, asst, rng), noisy=True, noise_type=kind)
    return out


def _noise(kind, convs, ci, j, asst, rng):
    """The noisy reply of kind for assistant turn j of dialogue ci (built from original replies only)."""
    msgs = convs[ci]["messages"]
    ref = msgs[asst[ci][j]]["reference"]
    if kind == "echo":
        return msgs[asst[ci][j] - 1]["content"]
    if kind == "shuffled":
        words = ref.split()
        while True:  # >= 3 distinct words: a permutation other than the original exists
            perm = [words[i] for i in rng.permutation(len(words))]
            if perm != words:
                return " ".join(perm)
    if kind == "truncated":  # cut at a space between 30 % and 70 % of the characters (a strict prefix)
        cuts = [p for p in range(len(ref)) if ref[p].isspace() and 0.3 * len(ref) <= p <= 0.7 * len(ref)
                and ref[:p].strip()]
        if not cuts:  # long words: the middle word boundary
            cuts = [p for p in range(1, len(ref)) if ref[p].isspace() and ref[:p].strip()]
            cuts = [cuts[len(cuts) // 2]]
        return ref[:cuts[int(rng.integers(len(cuts)))]].rstrip()
    if kind == "wrong_same_dialogue":
        others = [msgs[i]["reference"] for i in asst[ci] if msgs[i]["reference"] != ref]
        return others[int(rng.integers(len(others)))]
    opening = msgs[0]["content"]
    for _ in range(10000):  # off_topic: a reply of another dialogue with another opening
        cj = int(rng.integers(len(convs)))
        other = convs[cj]["messages"]
        reply = other[asst[cj][int(rng.integers(len(asst[cj])))]]["reference"]
        if cj != ci and other[0]["content"] != opening and reply != ref:
            return reply
    raise BenchError("inject: off_topic needs dialogues with other openings and other replies")


# ------------------------------------------------------------------------------------------------------ scoring
def auc(pos, neg):
    """ROC AUC of a score separating pos from neg: P(pos > neg) + P(pos = neg) / 2, from the Mann-Whitney rank
    sum with average ranks for ties (nan when either side is empty or a score is not finite)."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if not len(pos) or not len(neg) or not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        return math.nan
    x = np.concatenate([pos, neg])
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average rank of each tie block
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def unit_labels(examples):
    """(sample, turn, kind) of every turn unit of examples, in train.score_units' order; kind "clean"."""
    rows = []
    for s, e in enumerate(examples):
        kinds = e["meta"].get("noise_type") or [None] * e["n_turns"]
        noisy = e["meta"].get("noisy") or [False] * e["n_turns"]
        for t in range(1, e["n_turns"] + 1):
            rows.append((s, t, kinds[t - 1] if noisy[t - 1] else "clean"))
    return rows


def base_scores(net, template, examples, batch_size=8):
    """Per turn unit of examples (built with free=True): the base model's loss and context gain, exactly as
    train.py scores them (train.score_units), with their labels. Returns a dict of aligned lists."""
    device = next(net.parameters()).device
    run = SimpleNamespace(net=net, device=device, amp=nullcontext, template=template,
                          args=SimpleNamespace(unit="turn"))
    losses, groups, gains = train.score_units(run, examples, "turn", batch_size)
    rows = unit_labels(examples)
    if len(rows) != len(losses) or gains is None:
        raise BenchError(f"{len(losses)} scored units for {len(rows)} turns (or no context gains)")
    return {"sample": [r[0] for r in rows], "turn": [r[1] for r in rows], "group": groups.tolist(),
            "kind": [r[2] for r in rows], "loss": losses.tolist(), "gain": gains.tolist()}


def detectability(scores, kinds=KINDS):
    """Per noise kind: n, median loss / gain, and the AUC against clean turns of loss, -gain and gain."""
    kind = np.array(scores["kind"])
    loss, gain = np.array(scores["loss"]), np.array(scores["gain"])
    clean = kind == "clean"
    out = {"clean": {"n": int(clean.sum()), "loss_median": float(np.median(loss[clean])),
                     "gain_median": float(np.median(gain[clean]))}}
    for k in kinds:
        m = kind == k
        if not m.any():
            continue
        out[k] = {"n": int(m.sum()), "loss_median": float(np.median(loss[m])),
                  "gain_median": float(np.median(gain[m])), "auc_loss": auc(loss[m], loss[clean]),
                  "auc_gain_low": auc(-gain[m], -gain[clean]), "auc_gain_high": auc(gain[m], gain[clean])}
    return out


# ------------------------------------------------------------------------------------------------------ training
def train_argv(plan, model_dir, files, out, seed, flags):
    """train.py's command line of one run: the plan's settings, unit turn, ema / winsorized statistics."""
    return ["--model", str(model_dir), "--data", str(files["train"]), "--eval-data", str(files["test"]),
            "--out", str(out), "--seed", str(seed), "--max-steps", str(plan["steps"]),
            "--batch-size", str(plan["batch"]), "--grad-accum", "1", "--lr", str(plan["lr"]), "--warmup-ratio", "0.05",
            "--lora-r", str(plan["lora_r"]), "--lora-alpha", str(plan["lora_alpha"]), "--lora-dropout", "0.05",
            "--max-len", str(plan["max_len"]), "--dtype", "fp32", "--unit", "turn", "--alpha", "1.0",
            "--floor-percentile", "5", "--stats", "ema", "--stats-update", "winsorized",
            "--warmup-samples", str(plan["warmup_samples"]), "--ramp-steps", str(plan["ramp_steps"]),
            "--group-by-length", "--record-units", "--log-every", "5", "--report-top", "5",
            *[str(files["warm"]) if f == "{warm}" else f for f in flags]]


def train_one(plan, model_dir, files, out, seed, flags):
    """One train.main run (resumed, or skipped when out holds it finished); its log goes to out/train.log."""
    os.makedirs(out, exist_ok=True)
    log, t0 = io.StringIO(), time.time()
    with redirect_stdout(log):
        train.main(train_argv(plan, model_dir, files, out, seed, flags))
    with open(Path(out) / "train.log", "a") as f:
        f.write(log.getvalue())
    return time.time() - t0


def read_units(out):
    """units.jsonl of a run without the records of skipped steps (train.py undid those)."""
    with open(Path(out) / "units.jsonl") as f:
        return [r for r in map(json.loads, f) if not r["skipped"]]


def sightings(records):
    """(first, last) judged record of every (sample, turn): warm-up records judge nothing and are left out."""
    first, last = {}, {}
    for r in records:
        if r["warmup"]:
            continue
        key = (r["sample"], r["turn"])
        first.setdefault(key, r)
        last[key] = r
    return first, last


def label_of(examples):
    """(sample, turn) -> noise kind or "clean", from the examples exactly as train.py built them."""
    return {(s, t): k for s, t, k in unit_labels(examples)}


def in_view(r, view):
    return r["flagged"] if view is None else view in (r.get("view") or "").split("+")


def flag_table(recs, labels, view=None, kinds=KINDS):
    """Flag quality of one view over one sighting per unit (recs: (sample, turn) -> record). Overall: precision,
    recall, the clean turns' flag rate; per kind: recall, precision against the clean turns alone (tp / (tp + fp):
    the precision if this were the only kind of noise), mean weight."""
    kind = np.array([labels[k] for k in recs])
    flag = np.array([in_view(r, view) for r in recs.values()], bool)
    weight = np.array([r["weight"] for r in recs.values()])
    clean = kind == "clean"
    fp, tp = int((flag & clean).sum()), int((flag & ~clean).sum())
    nan = (lambda a, b: a / b if b else math.nan)
    out = {"units": len(kind), "noisy": int((~clean).sum()), "flagged": int(flag.sum()), "tp": tp,
           "precision": nan(tp, tp + fp), "recall": nan(tp, int((~clean).sum())),
           "clean_flag_rate": nan(fp, int(clean.sum())), "clean_weight": float(weight[clean].mean()) if clean.any()
           else math.nan, "by_kind": {}}
    for k in kinds:
        m = kind == k
        if m.any():
            hit = int((flag & m).sum())
            out["by_kind"][k] = {"n": int(m.sum()), "flagged": hit, "recall": hit / m.sum(),
                                 "precision_vs_clean": nan(hit, hit + fp), "weight": float(weight[m].mean())}
    return out


def first_sighting_auc(first, labels, key, kinds=KINDS):
    """AUC per noise kind of a recorded score (loss or gain) at each unit's first judged sighting in training."""
    kind = np.array([labels[k] for k in first])
    x = np.array([math.nan if r.get(key) is None else r[key] for r in first.values()], np.float64)
    clean = kind == "clean"
    return {k: {"auc": auc(x[kind == k], x[clean]), "auc_low": auc(-x[kind == k], -x[clean])}
            for k in kinds if (kind == k).any()}


def flagging(out, examples, gain):
    """Per view (any / loss / gain) and sighting (first / last) the flag table of one run's units.jsonl."""
    labels = label_of(examples)
    first, last = sightings(read_units(out))
    views = {"any": None, "loss": "loss", **({"gain": "gain"} if gain else {})}
    res = {v: {"first": flag_table(first, labels, view), "last": flag_table(last, labels, view)}
           for v, view in views.items()}
    res["auc_first_sighting"] = {"loss": first_sighting_auc(first, labels, "loss"),
                                 **({"gain": first_sighting_auc(first, labels, "gain")} if gain else {})}
    return res


# -------------------------------------------------------------------------------------------------------- replay
# (loss alpha, band below mu_g in sigma_g, band above, statistic); None: the loss view alone. "gain" is the core's
# context gain; "relative" the gain over the context-free NLL (the share of the reply's NLL the dialogue explains).
SWEEP = [(a, None, None, "gain") for a in (1.0, 1.5, 2.0)] + \
    [(1.0, b, b, "gain") for b in (1.0, 1.5, 2.0, 2.5, 3.0)] + \
    [(1.0, lo, hi, "gain") for lo, hi in ((1.0, 1.5), (1.0, 2.0), (1.0, 3.0))] + \
    [(1.5, 2.0, 2.0, "gain"), (1.5, 1.0, 2.0, "gain"), (2.0, 2.0, 2.0, "gain")] + \
    [(a, lo, hi, "relative") for a in (1.0, 1.5, 2.0) for lo, hi in ((2.0, 2.0), (1.5, 2.0), (1.0, 2.0))]


class Band(ReSURE):
    """ReSURE with the gain band mu_g - lo * sigma_g .. mu_g + hi * sigma_g (lo = hi: the core's own rule); replays
    only, to measure what a core change would flag."""

    def __init__(self, lo, hi, **kw):
        super().__init__(gain_alpha=hi, **kw)
        self.lo = lo

    def gain_band(self, b):
        est = self.gain_stats[b]
        if est.count < self.min_count:
            return -math.inf, math.inf
        return est.mean - self.lo * est.std, est.mean + self.gain_alpha * est.std


def relative(loss, gain):
    """The context gain as a share of the context-free NLL (loss + gain): 1 - NLL(reply | dialogue) / NLL(reply)."""
    return gain / (gain + loss)


def replay(records, plan, lo=None, hi=None, warm=None, alpha=1.0, stat="gain"):
    """ReSURE run again over a run's recorded (loss, gain) stream, one weigh call per optimizer step in order, with
    another loss alpha or gain band (lo, hi in sigma_g; None: the loss view alone), the statistics first filled from
    a clean warm-up set when warm = (losses, groups, gains) of its units under the base model. The flags are those
    the rule would raise on this trajectory (its own weights would have moved the trajectory a little).
    stat "relative": the band is put on relative(loss, gain) instead of the gain."""
    if stat == "relative":
        records = [dict(r, gain=None if r.get("gain") is None else relative(r["loss"], r["gain"])) for r in records]
        warm = warm and (warm[0], warm[1], [relative(x, g) for x, g in zip(warm[0], warm[2])])
    kw = dict(alpha=alpha, floor_percentile=5.0, warmup_samples=plan["warmup_samples"],
              ramp_steps=plan["ramp_steps"], mode="resure", stats="ema", stats_update="winsorized", record=True)
    rs = ReSURE(**kw) if hi is None else Band(lo, hi, **kw)
    if warm is not None:
        rs.warmup_from(*warm)
    out, steps = [], {}
    for r in records:
        steps.setdefault(r["step"], []).append(r)
    for step in sorted(steps):
        rows = steps[step]
        gains = None if hi is None else [math.nan if r.get("gain") is None else r["gain"] for r in rows]
        rs.weigh([math.nan if r["loss"] is None else r["loss"] for r in rows], [r["group"] for r in rows],
                 ids=[r["sample"] for r in rows], turns=[r["turn"] for r in rows], gains=gains)
        out += [dict(x, step=step) for x in rs.pop_records()]
    return out


def replay_sweep(out, examples, plan, warm, gain_alpha=2.0, settings=SWEEP):
    """Flag tables of the SWEEP settings replayed on a loss+gain run's stream, from the stream's own warm-up and
    from the clean warm-up set; and whether replaying the run's own setting reproduces its flags exactly."""
    recs, labels = read_units(out), label_of(examples)
    rows = {}
    for a, lo, hi, stat in settings:
        for w in ("stream", "clean"):
            first, last = sightings(replay(recs, plan, lo, hi, warm if w == "clean" else None, a, stat))
            rows[f"alpha={a} band=-{lo}/+{hi} {stat} warmup={w}"] = {
                "alpha": a, "lo": lo, "hi": hi, "stat": stat, "warmup": w,
                "first": flag_table(first, labels), "last": flag_table(last, labels)}
    own = replay(recs, plan, gain_alpha, gain_alpha, warm)  # the runs warm up on the clean set (--warmup-data)
    same = [(r["flagged"], r["view"]) for r in own] == [(r["flagged"], r["view"]) for r in recs]
    return {"reproduces_run": same, "rows": rows}


# -------------------------------------------------------------------------------------------------------- speed
def step_overhead(model_dir, files, plan, out, steps=6, seed=0):
    """Per-step time of train.py's own train_step with --detector loss and --detector loss+gain on the same data
    and batches (same seed), built by train.build and stepped alternately (ABBA order, so that load drifts on a
    shared machine hit both alike); the first step of each is left out. Process CPU time is the measure that
    other processes' load does not inflate; wall time beside it."""
    made = {}
    for det in ("loss", "loss+gain"):
        argv = train_argv(plan, model_dir, files, Path(out) / f"speed-{det}", seed,
                          ["--method", "resure", "--detector", det, "--no-resume"])
        args = train.parse_args(argv)
        r = train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), out=args.out, last_seen={},
                      demo_test=None, objective=train.ReSURELoss(), log=lambda *a, **k: None)
        train.build(r)
        r.net.train()
        made[det] = r
    times = {det: {"cpu": [], "wall": []} for det in made}
    for s in range(steps + 1):
        for det in ("loss", "loss+gain") if s % 2 == 0 else ("loss+gain", "loss"):
            c, t = time.process_time(), time.perf_counter()
            train.train_step(made[det], s)
            if s:
                times[det]["cpu"].append(time.process_time() - c)
                times[det]["wall"].append(time.perf_counter() - t)
    res = {det: {k: float(np.median(v)) for k, v in d.items()} | {"steps": d["cpu"]} for det, d in times.items()}
    res["free_rows"] = free_row_cost(made["loss+gain"], files, range(1, steps + 1))
    for k in ("cpu", "wall"):
        res[f"overhead_{k}"] = res["loss+gain"][k] / res["loss"][k] - 1
    ratios = np.array(times["loss+gain"]["cpu"]) / np.array(times["loss"]["cpu"])
    res["overhead_cpu_paired"] = float(np.median(ratios) - 1)  # step by step: the same batch on both
    res.update(steps=steps, batch=plan["batch"], max_len=plan["max_len"], threads=torch.get_num_threads())
    return res


@torch.no_grad()
def free_row_cost(run, files, steps):
    """CPU seconds of the context-gain forward over the free rows of the given steps' batches, packed three ways:
    as data.collate pads them (every row to the batch's longest), sorted by length in chunks of 8 rows, and
    sorted with an explicit empty system message (templates that add a default system prompt to a conversation
    without one, SmolLM2's and Qwen2.5's, otherwise put it before every reply); with the tokens each processes."""
    from support.conversations import load_conversations
    convs, tpl = load_conversations(files["train"]), run.template

    def short(e, j):  # the same reply after an empty system message and an empty user turn
        reply = [m for m in convs[e["conv_index"]]["messages"] if m["role"] == "assistant"][j - 1]
        enc = tpl.encode([{"role": "system", "content": ""}, {"role": "user", "content": ""}, {**reply, "train": True}])
        return enc["input_ids"], enc["labels"]

    def forward(rows):  # rows: (ids, labels); one padded batch
        T = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [tpl.pad_id] * (T - len(r[0])) for r in rows])
        lab = torch.tensor([r[1] + [-100] * (T - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (T - len(r[0])) for r in rows])
        run.net.token_losses(ids, lab, mask)
        return ids.numel(), int(mask.sum())

    out = {k: {"cpu_s": 0.0, "tokens": 0, "real_tokens": 0} for k in ("padded", "sorted", "sorted_short")}
    for s in steps:
        exs = [run.examples[i] for i in run.batches(s)]
        rows = {"padded": [[(f[1], f[2]) for e in exs for f in e["free"]]]}
        srt = sorted(rows["padded"][0], key=lambda r: len(r[0]))
        rows["sorted"] = [srt[i:i + 8] for i in range(0, len(srt), 8)]
        srt = sorted((short(e, f[0]) for e in exs for f in e["free"]), key=lambda r: len(r[0]))
        rows["sorted_short"] = [srt[i:i + 8] for i in range(0, len(srt), 8)]
        for k, chunks in rows.items():
            c = time.process_time()
            for chunk in chunks:
                n, real = forward(chunk)
                out[k]["tokens"] += n
                out[k]["real_tokens"] += real
            out[k]["cpu_s"] += time.process_time() - c
    for v in out.values():
        v["cpu_s_per_step"] = v["cpu_s"] / len(steps)
    return out


# ------------------------------------------------------------------------------------------------------ the run
def _cached(path, key, compute):
    """compute() saved as JSON at path with its key; reused while the key (the settings) is the same."""
    if Path(path).is_file():
        saved = json.loads(Path(path).read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    Path(path).write_text(json.dumps({"key": key, "value": value}, default=float))
    return value


def final_eval(out):
    """The held-out per-turn loss train.py wrote at the end of a run (metrics.jsonl's last eval row)."""
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"eval"' in line]
    return _str_keys(rows[-1]["eval"]) if rows else None


def _str_keys(ev):  # per-turn depths as JSON has them, whether computed here or read back
    return dict(ev, per_turn={str(k): v for k, v in ev["per_turn"].items()})


def run(model_dir, out_dir, seed=0, quick=False, *, data=None, extra=None, sweep=True, overhead_steps=0):
    """The whole experiment (module docstring) -> results dict, also written to out_dir/results.json and .md.
    data: the MT-Bench-101 jsonl (default ../shared/fixtures); extra: {name: train.py flags} more runs beside
    METHODS ("{warm}" in the flags stands for the clean warm-up file); sweep: replay gain bands on the loss+gain
    run's stream; overhead_steps > 0: also time train_step with both detectors."""
    plan = dict(PRESETS["quick" if quick else "cpu"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    tr, warm, test = split(load_mtbench101(data), [plan["train"], plan["warm"], plan["test"]], seed)
    noisy = inject(tr, plan["rate"], KINDS, seed)
    files = {"train": out / "train.jsonl", "warm": out / "warm.jsonl", "test": out / "heldout.jsonl"}
    for k, convs in (("train", noisy), ("warm", warm), ("test", test)):
        save_jsonl(convs, files[k])
    tpl = ChatTemplate.from_pretrained(model_dir)
    examples, rep = build_examples(noisy, tpl, plan["max_len"], None, free=True)
    warm_ex = build_examples(warm, tpl, plan["max_len"], None, free=True)[0]
    test_ex = build_examples(test, tpl, plan["max_len"], None)[0]
    key = {"plan": plan, "seed": seed, "model": str(Path(model_dir).resolve()), "data": str(data or MTBENCH101)}

    def score():
        net = M.Transformer.from_pretrained(model_dir)
        c = time.process_time()
        s = {"train": base_scores(net, tpl, examples), "warm": base_scores(net, tpl, warm_ex),
             "heldout": _str_keys(per_turn_loss(net, test_ex, pad_id=tpl.pad_id))}
        return dict(s, cpu_s=time.process_time() - c)
    base = _cached(out / "base_scores.json", key, score)
    kinds = [k for _, _, k in unit_labels(examples)]  # the turns train.py keeps (max_len cuts trailing ones)
    res = {"settings": dict(plan, seed=seed, model=str(model_dir), unit="turn", stats="ema/winsorized",
                            kinds=list(KINDS), data=str(data or MTBENCH101), torch_threads=torch.get_num_threads()),
           "data": {"train_dialogues": len(noisy), "train_examples": len(examples), "build": rep.summary(),
                    "turns": len(kinds), "by_kind": {k: kinds.count(k) for k in ("clean", *KINDS)},
                    "warm_dialogues": len(warm), "heldout_dialogues": len(test)},
           "detectability": detectability(base["train"]), "base_score_cpu_s": base["cpu_s"],
           "heldout": {"base": base["heldout"]}, "runs": {}}
    for name, flags in {**METHODS, **(extra or {})}.items():
        d, c = out / "runs" / name, time.process_time()
        wall = train_one(plan, model_dir, files, d, seed, flags)
        r = {"flags": flags, "wall_s": wall, "cpu_s": time.process_time() - c}
        res["heldout"][name] = final_eval(d)
        if "sft" not in flags:
            r["flagging"] = flagging(d, examples, gain="loss+gain" in flags)
        res["runs"][name] = r
    warm_scores = (base["warm"]["loss"], base["warm"]["group"], base["warm"]["gain"])
    if sweep and "resure+gain" in res["runs"]:
        res["replay"] = replay_sweep(out / "runs" / "resure+gain", examples, plan, warm_scores)
    if overhead_steps:
        res["overhead"] = step_overhead(model_dir, files, plan, out / "speed", overhead_steps, seed)
    res["acceptance"] = {name: acceptance(res["runs"][name]["flagging"], res["runs"]["resure"]["flagging"])
                         for name in res["runs"] if name != "resure" and "flagging" in res["runs"][name]
                         and "gain" in res["runs"][name]["flagging"]}
    res["time"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=_json))
    (out / "results.md").write_text(markdown(res))
    return res


def _json(x):
    return float(x) if isinstance(x, (np.floating, np.integer)) else str(x)


def acceptance(gain, loss):
    """The context-gain view's targets at the first and at the last judged sighting: recall >= 0.7 on echo and
    off-topic replies, overall precision >= 0.8, recall on shuffled / truncated replies not below the loss
    detector's. {target: {sighting: {"value", "bar", "holds"}}}."""
    rk = (lambda t, k: t["by_kind"].get(k, {}).get("recall", math.nan))
    out = {}
    for target, get, bar in (("echo recall", lambda t: rk(t, "echo"), lambda _: 0.7),
                             ("off_topic recall", lambda t: rk(t, "off_topic"), lambda _: 0.7),
                             ("precision", lambda t: t["precision"], lambda _: 0.8),
                             ("shuffled recall", lambda t: rk(t, "shuffled"), lambda t: rk(t, "shuffled")),
                             ("truncated recall", lambda t: rk(t, "truncated"), lambda t: rk(t, "truncated"))):
        out[target] = {}
        for s in ("first", "last"):
            v, b = get(gain["any"][s]), bar(loss["any"][s])
            out[target][s] = {"value": v, "bar": b, "holds": bool(v >= b)}
    return out


# ------------------------------------------------------------------------------------------------------ report
def _f(x, d=2):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def blind_kinds(det, threshold=0.7):
    """Kinds whose loss does not rank above the clean turns' (AUC below threshold): a loss threshold misses them."""
    return [k for k in KINDS if k in det and not det[k]["auc_loss"] >= threshold]


def markdown(res):
    st, dd, det = res["settings"], res["data"], res["detectability"]
    L = ["# Real dialogues with injected noise (MT-Bench-101)", "",
         f"Model {st['model']}; {dd['train_dialogues']} training dialogues ({dd['turns']} assistant turns kept at "
         f"max_len {st['max_len']}: " + ", ".join(f"{k} {n}" for k, n in dd["by_kind"].items()) +
         f"), {dd['heldout_dialogues']} clean held-out dialogues, {dd['warm_dialogues']} clean warm-up dialogues; "
         f"seed {st['seed']}, noise rate {st['rate']}. Training: {st['steps']} steps x {st['batch']} dialogues, lr "
         f"{st['lr']}, LoRA r {st['lora_r']}, unit turn, ema/winsorized statistics, alpha 1.0, warm-up "
         f"{st['warmup_samples']} units, ramp {st['ramp_steps']} steps, torch threads {st['torch_threads']}. Whole "
         f"run: {res['time']['wall_s'] / 60:.1f} min wall, {res['time']['cpu_s'] / 60:.1f} min CPU of this process.",
         "", "## What the base model's scores can see (ROC AUC against clean turns, every training turn)", "",
         "| kind | n | loss | context gain, low | context gain, high | median loss | median gain |",
         "|---|---|---|---|---|---|---|",
         f"| clean | {det['clean']['n']} | | | | {_f(det['clean']['loss_median'])} | "
         f"{_f(det['clean']['gain_median'])} |"]
    L += [f"| {k} | {v['n']} | {_f(v['auc_loss'])} | {_f(v['auc_gain_low'])} | {_f(v['auc_gain_high'])} | "
          f"{_f(v['loss_median'])} | {_f(v['gain_median'])} |" for k, v in det.items() if k != "clean"]
    blind = blind_kinds(det)
    L += ["", "A loss threshold cannot see: " + (", ".join(blind) if blind else "none of the kinds") +
          " (loss AUC below 0.7: their loss is not above the clean turns')."]
    for s in ("first", "last"):
        L += ["", f"## Flags at the {s} judged sighting of each turn (after the warm-up)", "",
              "| run / view | flagged | precision | recall | clean flag rate | " +
              " | ".join(f"recall {k}" for k in KINDS) + " |", "|---" * (5 + len(KINDS)) + "|"]
        for name, r in res["runs"].items():
            for v, t in r.get("flagging", {}).items():
                if v == "auc_first_sighting":
                    continue
                t = t[s]
                L.append(f"| {name} / {v} | {t['flagged']} of {t['units']} | {_f(t['precision'])} | "
                         f"{_f(t['recall'])} | {_f(t['clean_flag_rate'])} | " +
                         " | ".join(_f(t["by_kind"].get(k, {}).get("recall")) for k in KINDS) + " |")
    L += ["", "Precision per kind against the clean turns alone (tp / (tp + clean flags), last sighting, view any) "
          "and the kind's mean weight there:", "", "| run | clean weight | " +
          " | ".join(f"{k}" for k in KINDS) + " |", "|---" * (2 + len(KINDS)) + "|"]
    for name, r in res["runs"].items():
        if "flagging" in r:
            t = r["flagging"]["any"]["last"]
            cell = (lambda d: f"{_f(d.get('precision_vs_clean'))} (w {_f(d.get('weight'))})")
            L.append(f"| {name} | {_f(t['clean_weight'])} | " +
                     " | ".join(cell(t["by_kind"].get(k, {})) for k in KINDS) + " |")
    L += ["", "AUC of the recorded score at each turn's first judged sighting during training:", "",
          "| run / score | " + " | ".join(KINDS) + " |", "|---" * (1 + len(KINDS)) + "|"]
    for name, r in res["runs"].items():
        for score, a in r.get("flagging", {}).get("auc_first_sighting", {}).items():
            col = (lambda k: _f(a[k]["auc"]) + (f" / low {_f(a[k]['auc_low'])}" if score == "gain" else "")
                   if k in a else "-")
            L.append(f"| {name} / {score} | " + " | ".join(col(k) for k in KINDS) + " |")
    depths = sorted({d for h in res["heldout"].values() if h for d in h["per_turn"]}, key=int)
    L += ["", "## Clean held-out per-turn loss (nats per token)", "",
          "| model | overall | " + " | ".join(f"turn {d}" for d in depths) + " | train wall |",
          "|---" * (3 + len(depths)) + "|"]
    for name, h in res["heldout"].items():
        if h:
            wall = res["runs"].get(name, {}).get("wall_s")
            L.append(f"| {name} | {_f(h['overall']['loss'], 4)} | " + " | ".join(
                _f(h["per_turn"].get(d, {}).get("loss"), 4) for d in depths) +
                f" | {'-' if wall is None else f'{wall / 60:.1f} min'} |")
    for name, acc in res.get("acceptance", {}).items():
        L += ["", f"## Acceptance of the context-gain view: {name} (view any) against resure --detector loss", "",
              "| target | first sighting | last sighting |", "|---|---|---|"]
        cell = (lambda c: f"{_f(c['value'])} (bar {_f(c['bar'])}): {'holds' if c['holds'] else 'FAILS'}")
        L += [f"| {t} | {cell(c['first'])} | {cell(c['last'])} |" for t, c in acc.items()]
    if "replay" in res:
        rp = res["replay"]
        L += ["", "## Replay: other gain bands on the loss+gain run's recorded stream", "",
              f"The same (loss, gain) values step by step through resure.ReSURE (replaying the run's own setting "
              f"reproduces its flags: {rp['reproduces_run']}). Band -lo/+hi: flagged below mu_g - lo sigma_g or above "
              "mu_g + hi sigma_g (the core: lo = hi = alpha_g); none: the loss view alone. Band on gain: the core's "
              "context gain; on relative: gain / context-free NLL. clean: the statistics first filled from the clean "
              "warm-up dialogues scored by the base model.", "",
              "| alpha | band on | band | warm-up | precision | recall | clean flag rate | " +
              " | ".join(f"recall {k}" for k in KINDS) + " |", "|---" * (7 + len(KINDS)) + "|"]
        for row in rp["rows"].values():
            fl = (lambda get: " / ".join(_f(get(row[s])) for s in ("first", "last")))
            band = "none" if row["hi"] is None else f"-{row['lo']} / +{row['hi']}"
            on = "-" if row["hi"] is None else row["stat"]
            L.append(f"| {row['alpha']} | {on} | {band} | {row['warmup']} | {fl(lambda t: t['precision'])} | "
                     f"{fl(lambda t: t['recall'])} | {fl(lambda t: t['clean_flag_rate'])} | " + " | ".join(
                         fl(lambda t: t["by_kind"].get(k, {}).get("recall")) for k in KINDS) + " |")
        L += ["", "(each cell: first / last sighting)"]
    if "overhead" in res:
        o = res["overhead"]
        L += ["", "## Cost of the context-gain forward (train.py's train_step, same batches, alternating)", "",
              "| detector | median step CPU s | median step wall s |", "|---|---|---|",
              f"| loss | {_f(o['loss']['cpu'])} | {_f(o['loss']['wall'])} |",
              f"| loss+gain | {_f(o['loss+gain']['cpu'])} | {_f(o['loss+gain']['wall'])} |", "",
              f"Overhead of loss+gain: {o['overhead_cpu'] * 100:.0f} % CPU time (median of per-step paired ratios "
              f"{o['overhead_cpu_paired'] * 100:.0f} %), {o['overhead_wall'] * 100:.0f} % wall; {o['steps']} steps "
              f"each after one untimed, batch {o['batch']} dialogues, max_len {o['max_len']}, {o['threads']} torch "
              "thread(s)."]
        if "free_rows" in o:
            L += ["", "The context-free forward alone, over the same steps' free rows, packed three ways (CPU s per "
                  "step, and as a fraction of the loss detector's step):", "",
                  "| packing | tokens processed | real tokens | CPU s / step | share of a loss step |",
                  "|---|---|---|---|---|"]
            L += [f"| {k} | {v['tokens']} | {v['real_tokens']} | {_f(v['cpu_s_per_step'])} | "
                  f"{v['cpu_s_per_step'] / o['loss']['cpu'] * 100:.0f} % |" for k, v in o["free_rows"].items()]
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the CI-sized preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="Hugging Face folder (default: SmolLM2-135M-Instruct, support/smollm2.py)")
    p.add_argument("--data", help="MT-Bench-101 jsonl (default: ../shared/fixtures)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help='another run, e.g. "gain-a3=--method resure --detector loss+gain --gain-alpha 3"; '
                        "{warm} stands for the clean warm-up file")
    p.add_argument("--no-sweep", action="store_true", help="skip the gain-band replay")
    p.add_argument("--overhead-steps", type=int, default=0, help="also time train_step with both detectors")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra = {}
    for e in a.extra:
        name, _, flags = e.partition("=")
        if not name or not flags:
            p.error(f"--extra {e!r}: expected NAME=FLAGS")
        extra[name] = flags.split()
    if a.model is None:
        from support.smollm2 import prepare_smollm2
        a.model = prepare_smollm2()
    res = run(a.model, a.out, a.seed, a.quick, data=a.data, extra=extra, sweep=not a.no_sweep,
              overhead_steps=a.overhead_steps)
    print((Path(a.out) / "results.md").read_text())
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one line
        print(f"real_noise.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
