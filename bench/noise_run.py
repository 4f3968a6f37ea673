"""One run of the noise experiment: a method trained on one mixture of one seed (train.main, or a
baseline's main), evaluated on the clean test set, and measured: flag precision / recall against the
injected labels, the training compute, a relabeling baseline's own report. Everything lands in the
run's result.json.
"""
import hashlib
import importlib
import io
import json
import math
import resource
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

import train
from data import ChatTemplate, build_examples, epoch_batches
from eval import accuracy, load as load_model, per_turn_loss
from noise_data import PREFILTER_KEEP, device, steps_for
from pool import SIGNAL_EXITS, dump, file_sha
from resure import prefilter
from support.conversations import load_conversations, read_scores
from support.report import unit_noisy

# The paper's configuration (Sec. 3): one loss per dialogue, cumulative Welford statistics over the
# reliable losses, alpha 1, Eq. 6's floor the 5th percentile of every weight, the ramp, statistics
# warmed up on the clean warm-up set; every other variant is named by what it changes.
PAPER = dict(method="resure", unit="dialogue", stats="welford", stats_update="reliable",
             floor_over="all", detector="loss", warm=True)
TRACKING = dict(stats="ema", stats_update="winsorized")  # the tracking estimator (docs/method.md)
ILR = ["--rounds", "2", "--max-replace", "0.15"]
# name -> train.py settings and a plain label; warm: statistics from the clean warm-up set;
# baseline: baselines/NAME.py
VARIANTS = {
    "sft": dict(method="sft", unit="dialogue", label="SFT (every weight 1)"),
    "resure": dict(PAPER, label="ReSURE, the paper's configuration"),
    "resure[turn]": dict(PAPER, unit="turn", label="the paper's estimator on per-turn units"),
    "resure[turn,ema/winsorized]": dict(PAPER, unit="turn", **TRACKING,
                                        label="per-turn units, EMA / winsorized statistics"),
    "hard": dict(PAPER, method="hard", label="hard filtering (a flagged unit weighs 0)"),
    "resure[floor:flagged]": dict(PAPER, floor_over="flagged",
                                  label="the floor over the flagged units' weights only"),
    "resure[turn,ema/winsorized,loss+gain]": dict(
        PAPER, unit="turn", detector="loss+gain", **TRACKING,
        label="per-turn units, EMA / winsorized statistics, the loss+gain detector"),
    "resure[turn,loss+gain]": dict(PAPER, unit="turn", detector="loss+gain",
                                   label="per-turn units, the loss+gain detector"),
    "resure[ema/winsorized]": dict(PAPER, **TRACKING, label="EMA / winsorized statistics"),
    "resure[mad/all]": dict(PAPER, stats="mad", stats_update="all",
                            label="median / MAD statistics over every unit"),
    "resure[loss+gain]": dict(PAPER, detector="loss+gain", label="the loss+gain detector"),
    "resure[loss+gain,ema/winsorized]": dict(PAPER, detector="loss+gain", **TRACKING,
                                             label="the loss+gain detector, EMA / winsorized "
                                                   "statistics"),
    "global": dict(PAPER, method="global", label="one turn group for every depth"),
    "prefilter": dict(method="sft", unit="dialogue", prefilter=True,
                      label="pre-filtering by the base model's loss (keep 0.75), then SFT"),
    "prefilter+resure": dict(PAPER, prefilter=True,
                             label="pre-filtering (keep 0.75), then the paper's configuration"),
    "ilr[oracle]": dict(baseline="ilr", args=ILR + ["--feedback", "oracle"],
                        label="ILR, oracle feedback"),
    "ilr[sim:0.8]": dict(baseline="ilr", args=ILR + ["--feedback", "sim:0.8"],
                         label="ILR, a comparator right 80 % of the time"),
    "ilr[naive]": dict(baseline="ilr", args=ILR + ["--naive"], label="ILR without feedback"),
    "dpo": dict(baseline="dpo", args=["--feedback", "oracle", "--beta", "0.1"],
                label="DPO after SFT, oracle feedback"),
    "robustft": dict(baseline="robustft",
                     args=["--k", "3", "--keep", "0.5", "--reflect", "4", "--detector", "base"],
                     label="RobustFT"),
}


# ------------------------------------------------------------------------------------------ the job
def unit_of(plan, variant):
    """The variant's unit (one loss per dialogue or per assistant turn); noise.py's --unit sets
    every variant's."""
    return plan.get("unit") or variant.get("unit", "dialogue")


def train_flags(plan, seed, steps, unit):
    """The flags every method shares: same steps, batch, lr schedule, LoRA, length, precision,
    seed."""
    return ["--seed", str(seed), "--max-steps", str(steps), "--batch-size", str(plan["batch"]),
            "--grad-accum", "1", "--lr", str(plan["lr"]),
            "--warmup-ratio", str(plan["warmup_ratio"]),
            "--lora-r", str(plan["lora_r"]), "--lora-alpha", str(plan["lora_alpha"]),
            "--lora-dropout", str(plan["lora_dropout"]), "--max-len", str(plan["max_len"]),
            "--dtype", plan["dtype"], "--unit", unit,
            "--record-units", "--log-every", "1", "--report-top", "5"]


def resure_flags(plan, variant):
    """train.py's ReSURE settings of a variant, only those that act on its method (train.py refuses
    a flag that does nothing): sft weighs nothing, hard floors nothing. With the clean warm-up set
    the statistics start from it alone and judge from the first step (--warmup-samples 0)."""
    method = variant["method"]
    if method == "sft":
        return ["--method", "sft"]
    warmup = 0 if variant.get("warm") else plan["warmup"]
    flags = ["--method", method, "--alpha", "1.0", "--warmup-samples", str(warmup),
             "--ramp-steps", str(plan["ramp"]), "--stats", variant.get("stats", "welford"),
             "--stats-update", variant.get("stats_update", "reliable"),
             "--detector", variant.get("detector", "loss")]
    if method != "hard":
        flags += ["--floor-percentile", "5", "--floor-over", variant.get("floor_over", "all")]
    return flags


def make_job(plan, name, seed, mix, paths, model_dir, run_dir):
    """Everything one run needs, as JSON (a worker process reads it), with a signature of its
    settings and data: a finished run with the same signature is not run again. The signature
    names the output folder OUT and the model by plan["model_id"] (its files' digest), so a
    finished run counts wherever the folder and the model lie."""
    variant = VARIANTS[name]
    unit = unit_of(plan, variant)
    steps = steps_for(plan, len(load_conversations(paths[mix])))
    evaluation = dict(new_tokens=plan["new_tokens"], eval_batch=plan["eval_batch"],
                      max_len=plan["max_len"], dtype=plan["dtype"], unit=unit)
    job = dict(name=name, seed=seed, mixture=mix, run_dir=str(run_dir), model=str(model_dir),
               data=str(paths[mix]), test=str(paths["test"]), steps=steps,
               baseline=variant.get("baseline"), eval=evaluation, threads=plan["threads"])
    argv = ["--model", str(model_dir), "--data", str(paths[mix]), "--out", str(run_dir)]
    if variant.get("baseline"):
        argv += variant["args"] + train_flags(plan, seed, steps, unit)
    else:
        argv += train_flags(plan, seed, steps, unit) + resure_flags(plan, variant)
    if variant.get("warm"):
        argv += ["--warmup-data", str(paths["warm"])]
        job["warm"] = str(paths["warm"])
    if variant.get("prefilter"):
        scores = str(paths[mix + ":scores"])
        argv += ["--prefilter-keep", str(PREFILTER_KEEP), "--prefilter-scores", scores]
        job["scores"] = scores
    job["argv"] = argv
    files = [paths[mix], paths["test"]] + [Path(job[k]) for k in ("warm", "scores") if k in job]
    root = str(Path(run_dir).parents[3])
    model_id = plan.get("model_id", str(model_dir))
    job["flags"] = [x.replace(root, "OUT").replace(str(model_dir), model_id) for x in argv]
    signature = json.dumps([job["flags"], evaluation, file_sha(*files)])
    job["sig"] = hashlib.sha256(signature.encode()).hexdigest()[:16]
    return job


# ------------------------------------------------------------------------------------------ the run
def cpu_seconds():
    """CPU time of this process and its children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_job(job):
    """Train one (method, mixture, seed), evaluate it on the clean test set, write result.json;
    returns it."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    out = Path(job["run_dir"])
    shutil.rmtree(out, ignore_errors=True)  # a run without result.json is redone from the start
    out.mkdir(parents=True)
    t0 = time.time()
    cpu0 = cpu_seconds()
    res = {"sig": job["sig"], "variant": job["name"], "mixture": job["mixture"],
           "seed": job["seed"], "flags": job["flags"]}
    error = train_run(job, out)
    if error:
        res.update(error=error, train_s=time.time() - t0)
        dump(res, out / "result.json")
        return res
    res["train_s"] = time.time() - t0
    res.update(evaluate(job, out))
    res["eval_s"] = time.time() - t0 - res["train_s"]
    res["cpu_s"] = cpu_seconds() - cpu0
    res.update(measure(job, out))
    dump(res, out / "result.json")
    # the adapter and checkpoints go (~20 MB a run at r=16); logs, units and metrics stay
    for d in out.iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    # read back: the same types whether the result comes from this run or from a resume
    return json.loads((out / "result.json").read_text())


def train_run(job, out):
    """train.main (or the baseline's main) with the job's argv, its output in out/train.log; the
    error line of a method that failed (a row that says so, not a lost table), None when it trained.
    """
    log = io.StringIO()
    try:
        with redirect_stdout(log):
            if job["baseline"]:
                importlib.import_module(f"baselines.{job['baseline']}").main(job["argv"])
            else:
                train.main(job["argv"])
    except (Exception, SystemExit) as e:
        (out / "train.log").write_text(log.getvalue())
        if isinstance(e, SystemExit) and e.code in SIGNAL_EXITS:
            # train.py was stopped by a signal: so is the experiment; this run (no result.json) is
            # redone by the next invocation
            raise
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {first_line}"
    (out / "train.log").write_text(log.getvalue())
    return None


def evaluate(job, out):
    """Clean-test exact match (greedy, reference history) and loss per supervised token, overall and
    per turn."""
    ev = job["eval"]
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[ev["dtype"]]
    net, tpl = load_model(job["model"], out / "adapter", dtype=dtype, device=str(device()))
    convs = load_conversations(job["test"])
    examples, _ = build_examples(convs, tpl, ev["max_len"], None)
    acc = accuracy(net, tpl, convs, batch_size=ev["eval_batch"], max_new_tokens=ev["new_tokens"])
    losses = per_turn_loss(net, examples, batch_size=16, pad_id=tpl.pad_id)
    state = out / "resure_state.json"
    warnings = json.loads(state.read_text()).get("warned", []) if state.is_file() else []
    return {"accuracy": acc["overall"], "acc_total": acc["total"],
            "acc_per_turn": {int(k): r["accuracy"] for k, r in acc["per_turn"].items()},
            "loss": losses["overall"]["loss"],
            "loss_per_turn": {int(k): r["loss"] for k, r in losses["per_turn"].items()},
            "warnings": warnings}


def measure(job, out):
    """Flagging and the loss statistics' trajectory (ReSURE variants), and the training compute."""
    variant = VARIANTS[job["name"]]
    tpl = ChatTemplate.from_pretrained(job["model"])
    examples = training_examples(job, tpl)
    res = {}
    if (out / "units.jsonl").is_file() and variant.get("method", "sft") != "sft":
        views = variant.get("detector") == "loss+gain"
        res["flagging"] = flagging(out / "units.jsonl", examples, views)
        res["trajectory"] = trajectory(out / "metrics.jsonl")
    if not job["baseline"]:
        res["compute"] = compute(job, examples, tpl)
        return res
    report = {}
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
    res["compute"] = report.get("compute")
    res["label_accuracy"] = label_accuracy(report)
    before = report.get("label_accuracy")
    if isinstance(before, list) and before:
        res["label_accuracy_before"] = before[0]
    else:
        res["label_accuracy_before"] = report.get("original_label_accuracy")
    small = {k: v for k, v in report.items() if len(json.dumps(v, default=str)) < 4000}
    res["baseline_report"] = small
    return res


# ---------------------------------------------------------------------------------------- measuring
def training_examples(job, tpl):
    """The run's training examples as train.py built them (pre-filtered ones re-indexed as train.py
    does)."""
    convs = load_conversations(job["data"])
    free = VARIANTS[job["name"]].get("detector") == "loss+gain"
    examples, _ = build_examples(convs, tpl, job["eval"]["max_len"], None, free=free)
    if job.get("scores"):
        scores = -read_scores(job["scores"], convs)[[e["conv_index"] for e in examples]]
        keep = prefilter(scores, keep=PREFILTER_KEEP)
        examples = [dict(examples[i], index=j) for j, i in enumerate(keep)]
    return examples


def compute(job, examples, tpl):
    """Training compute of a train.py run, replayed from its sampler: optimizer steps, the tokens of
    its batches, and the extra forward tokens (the context-gain rows, the warm-up set's and the
    pre-filter's scoring)."""
    argv = job["argv"]
    seed = int(argv[argv.index("--seed") + 1])
    batch = int(argv[argv.index("--batch-size") + 1])
    per_epoch = -(-len(examples) // batch)
    tokens = 0
    extra = 0
    for step in range(job["steps"]):
        for i in epoch_batches(len(examples), batch, seed, step // per_epoch)[step % per_epoch]:
            tokens += len(examples[i]["input_ids"])
            extra += sum(len(f[1]) for f in examples[i].get("free", ()))
    if job.get("warm"):  # the warm-up set, scored for the statistics' start
        extra += scored_tokens(job["warm"], tpl, job["eval"]["max_len"])
    if job.get("scores"):  # the pre-filter scored the whole mixture
        extra += scored_tokens(job["data"], tpl, job["eval"]["max_len"])
    return {"trainings": 1, "optimizer_steps": job["steps"], "train_tokens": tokens,
            "generated_tokens": 0, "forward_tokens": extra, "comparisons": 0}


def scored_tokens(path, tpl, max_len):
    examples, _ = build_examples(load_conversations(path), tpl, max_len, None)
    return sum(len(e["input_ids"]) for e in examples)


def label_accuracy(report):
    """A relabeling baseline's final training-set label accuracy: the first number under a key that
    names label accuracy (a dict of them: its "final" / "after" entry, else its last)."""
    if not isinstance(report, dict):
        return None
    for k, v in report.items():
        if "label" in k and "acc" in k:
            found = final_number(v)
            if found is not None:
                return found
    for v in report.values():
        found = label_accuracy(v)
        if found is not None:
            return found
    return None


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def final_number(v):
    """The number a label-accuracy entry stands for: itself, a dict's final / after / last or last
    number, a list's last."""
    if is_number(v):
        return float(v)
    if isinstance(v, dict):
        for key in ("final", "after", "last"):
            if isinstance(v.get(key), (int, float)):
                return float(v[key])
        numbers = [u for u in v.values() if is_number(u)]
        if numbers:
            return float(numbers[-1])
    if isinstance(v, list) and v and isinstance(v[-1], (int, float)):
        return float(v[-1])
    return None


def flagging(units_path, examples, views=False):
    """Unit decisions after the warm-up against the injected labels (examples: the run's training
    set, as train.py built it): overall, per noise kind, per turn depth, and (views) per detector
    view."""
    rows = []
    with open(units_path) as f:
        for r in map(json.loads, f):
            if r["warmup"] or r["skipped"]:  # no decision yet, or a step train.py undid
                continue
            ex = examples[r["sample"]]
            turn = r["turn"]
            noisy = unit_noisy(ex, turn)
            if noisy is None:
                continue
            kind = "clean"
            if noisy:
                kind = ex["meta"]["noise_type"][turn - 1] if turn > 0 else "mixed"
            view = (r.get("view") or "").split("+")
            rows.append((r["flagged"], noisy, kind, turn or r["group"], r["weight"], view))
    out = {"all": counts(rows), "by_kind": split(rows, 2), "by_depth": split(rows, 3)}
    if views:
        out["by_view"] = {}
        for view in ("loss", "gain"):
            in_view = [(view in x[5],) + x[1:] for x in rows]
            out["by_view"][view] = {"all": counts(in_view), "by_kind": split(in_view, 2)}
    return out


def split(rows, col):
    """counts() per value of column col (2: noise kind, 3: turn depth)."""
    keys = sorted({x[col] for x in rows}, key=str)
    return {k: counts([x for x in rows if x[col] == k]) for k in keys}


def counts(rows):
    """Units, noisy, flagged, true positives, precision, recall, flag rate and mean weights of
    (flagged, noisy, kind, depth, weight, views) rows."""
    flagged = np.array([x[0] for x in rows], bool)
    noisy = np.array([x[1] for x in rows], bool)
    weight = np.array([x[4] for x in rows], float)
    tp = int((flagged & noisy).sum())
    return {"units": len(rows), "noisy": int(noisy.sum()), "flagged": int(flagged.sum()), "tp": tp,
            "precision": tp / flagged.sum() if flagged.sum() else math.nan,
            "recall": tp / noisy.sum() if noisy.sum() else math.nan,
            "flag_rate": flagged.mean() if len(flagged) else math.nan,
            "weight_noisy": weight[noisy].mean() if noisy.any() else math.nan,
            "weight_clean": weight[~noisy].mean() if (~noisy).any() else math.nan}


def trajectory(metrics_path):
    """Per logged step: the flagged share and, per turn group, (mu, tau, batch loss, flagged share).
    """
    out = []
    if not Path(metrics_path).is_file():
        return out
    with open(metrics_path) as f:
        for r in map(json.loads, f):
            if "groups" not in r:
                continue
            groups = {b: [g.get("mu"), g.get("tau"), g.get("batch_loss"), g.get("flagged")]
                      for b, g in r["groups"].items()}
            out.append({"step": r["step"], "flagged": r.get("flagged"), "groups": groups})
    return out
