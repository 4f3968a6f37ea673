"""The noise experiment: does ReSURE keep a model from getting worse as its training data grows noisier, where plain
SFT gets worse (the paper's Table 4), and how does it compare with the other ways of handling noisy labels?

    python bench/noise.py --regime    # first: SFT alone on H and H+N+L; is there a drop for a method to fix?
    python bench/noise.py --cpu       # the answer: <= 3 hours on 2 idle CPU cores (4 methods), resumable run by run
    python bench/noise.py --gpu       # one GPU, several runs at once (--jobs), sized for 8 minutes on an H200
    python bench/noise.py --quick     # a short check on SmolLM2 (fewer seeds and dialogues, 4 methods)
    python bench/noise.py --tiny      # a tiny random model, seconds (what CI runs; the numbers mean nothing)
    python bench/noise.py --report DIR            # results.md and the figures again, from DIR/results.json
    options: --model DIR --out DIR --seeds 1,2,3 --methods sft,resure --mixtures H,H+N+L --n N --epochs E --lr X
             --lora-r R --test N --jobs J --threads T --no-real ...

Data (support/synth.py, one benchmark per seed, with the echo kind added to its default noise mix): tiers H (clean),
N (injection rate 0.5 per turn, ~53 % noisy assistant turns), L (0.9, ~78 %; --rate-n, --rate-l) hold the same
dialogues with different injected noise; these rates are the regime check's (at synth's own 0.2 / 0.5, SFT on
H+N+L was not measurably worse than on H). A mixture adds
data of falling quality, as in the paper's Table 4 (ordinal 1-4 in this order for Spearman):
    H      = the H version of dialogue set A                        (n dialogues)
    H+N    = H of A + the N version of a disjoint set B            (2n)
    H+L    = H of A + the L version of a disjoint set C            (2n)
    H+N+L  = H of A + N of B + L of C                               (3n)
plus a disjoint clean warm-up set W (the paper's high-quality warm-up samples) and a clean test set. Like the paper,
a run trains `epochs` passes over its mixture (more data, more steps); every method trains the same number of
optimizer steps on a given mixture (--max-steps), so pre-filtered data is passed over more often, and a relabeling
baseline's final training has the same steps as SFT's (its extra work is reported as compute).

Methods (one assistant turn is one unit; each run is train.main(argv) or a baseline's main(argv)):
    sft                        every weight 1 (Vicuna-style tuning)
    resure                     the paper: Welford over reliable losses, statistics initialized on W (--warmup-data)
    resure[ema/winsorized]     tracking estimators (README: lag and collapse), the same warm-up set
    resure[mad/all]
    resure[loss+gain]          the paper's estimator with the context-gain view beside the loss (--detector)
    hard                       flagged weight 0 (an ablation of this project), the paper's estimator
    prefilter                  keep the 0.75 of the mixture with the lowest base-model loss, then sft
    prefilter+resure           the same kept data, then resure (the paper's Table 3 best)
    ilr[oracle], ilr[sim:0.8], ilr[naive], dpo, robustft: baselines/*.py, run when the module exists
Measured per run: clean-test exact match (eval.accuracy, greedy, reference history) and per-turn loss; flag
precision / recall of every unit decision after the warm-up (units.jsonl) against the injected labels, overall, per
noise kind, per turn depth and per detector view; the training compute; a relabeling baseline's own report. Over
seeds: mean and sample std; a difference (to SFT, or to the same method on H) is the mean of the per-seed paired
differences, reported as "no difference" when it is not larger than their std. The real-data part (dialogues with
injected noise kinds) is bench/real_noise.py's run(), called at the end when that file exists.

Every run lives in OUT/runs/seed*/MIXTURE/METHOD/ and ends with result.json; a rerun of the same command skips
finished runs, so an interruption loses one run, not the table. SIGINT / SIGTERM stop the experiment (and its
workers) with one line; a method that fails is a row that says so, and the experiment goes on. results.json /
results.md are rewritten after every run; noise.png and resure_dynamics.png (matplotlib, optional) at the end and
by --report.
"""
import argparse
import gc
import hashlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model as M  # noqa: E402
import train  # noqa: E402
from data import ChatTemplate, build_examples, epoch_batches  # noqa: E402
from support.conversations import load_conversations, read_scores, save_jsonl  # noqa: E402
from support.report import unit_noisy  # noqa: E402
from eval import accuracy, load as load_model, per_turn_loss, spearman  # noqa: E402
from resure import prefilter  # noqa: E402
from support.synth import SYNTH_KINDS, SYNTH_RATES, synth  # noqa: E402

MIXTURES = ("H", "H+N", "H+L", "H+N+L")
PAPER_EST = dict(stats="welford", stats_update="reliable")
PREFILTER_KEEP = 0.75
VARIANTS = {  # name -> train.py settings; warm: statistics from the clean warm-up set; baseline: baselines/NAME.py
    "sft": dict(method="sft"),
    "resure": dict(method="resure", warm=True, **PAPER_EST),
    "resure[ema/winsorized]": dict(method="resure", warm=True, stats="ema", stats_update="winsorized"),
    "resure[mad/all]": dict(method="resure", warm=True, stats="mad", stats_update="all"),
    "resure[loss+gain]": dict(method="resure", warm=True, detector="loss+gain", **PAPER_EST),
    "resure[loss+gain,ema/winsorized]": dict(method="resure", warm=True, detector="loss+gain", stats="ema",
                                             stats_update="winsorized"),
    "hard": dict(method="hard", warm=True, **PAPER_EST),
    "global": dict(method="global", warm=True, **PAPER_EST),
    "prefilter": dict(method="sft", prefilter=True),
    "prefilter+resure": dict(method="resure", warm=True, prefilter=True, **PAPER_EST),
    "ilr[oracle]": dict(baseline="ilr", args=["--rounds", "2", "--max-replace", "0.15", "--feedback", "oracle"]),
    "ilr[sim:0.8]": dict(baseline="ilr", args=["--rounds", "2", "--max-replace", "0.15", "--feedback", "sim:0.8"]),
    "ilr[naive]": dict(baseline="ilr", args=["--rounds", "2", "--max-replace", "0.15", "--naive"]),
    "dpo": dict(baseline="dpo", args=["--feedback", "oracle", "--beta", "0.1"]),
    "robustft": dict(baseline="robustft", args=["--k", "3", "--keep", "0.5", "--reflect", "4", "--detector", "base"]),
}
CORE = ("sft", "resure", "resure[ema/winsorized]", "resure[mad/all]", "resure[loss+gain]", "hard", "prefilter",
        "prefilter+resure")
BASELINES = ("ilr[oracle]", "ilr[sim:0.8]", "ilr[naive]", "dpo", "robustft")
COMMON = dict(warmup=64, ramp=5, max_len=192, max_turns=4, new_tokens=16, echo=0.2, rate_n=0.5, rate_l=0.9,
              lora_dropout=0.05, warmup_ratio=0.05, jobs=1, threads=None, eval_batch=32, real=True, mixtures=MIXTURES,
              baseline_mixtures=MIXTURES)
PRESETS = {
    # n: dialogues per tier; warm: clean warm-up dialogues; test: clean test dialogues per seed; epochs over the
    # mixture's dialogues (steps = ceil(epochs * dialogues / batch), the same for every method on that mixture)
    "tiny": dict(COMMON, seeds=[1, 2], n=6, warm=4, test=2, epochs=1, batch=4, lr=3e-3, lora_r=4, lora_alpha=8,
                 warmup=4, ramp=1, max_len=160, new_tokens=4, dtype="fp32", real=False,
                 methods=("sft", "resure[loss+gain]", "prefilter+resure")),
    "quick": dict(COMMON, seeds=[1, 2], n=16, warm=16, test=24, epochs=3, batch=8, lr=1e-3, lora_r=16, lora_alpha=32,
                  dtype="fp32", real=False, methods=("sft", "resure", "resure[ema/winsorized]", "resure[loss+gain]")),
    # chosen from the regime check (bench/README.md): SFT loses far more than its seed spread from H to H+N+L.
    # 3 hours on 2 cores hold 4 methods x 4 mixtures x 3 seeds (12 minutes a method and seed); the other methods,
    # the baselines (several trainings a run) and bench/real_noise.py run with --methods / --real, or on a GPU
    "cpu": dict(COMMON, seeds=[1, 2, 3], n=16, warm=32, test=48, epochs=9, batch=8, lr=1e-3, lora_r=16,
                lora_alpha=32, dtype="bf16", threads=2, real=False, baseline_mixtures=("H+N+L",),
                methods=("sft", "resure", "resure[ema/winsorized]", "prefilter+resure")),
    # the same steps per run as an earlier 96 dialogues x 3 epochs sizing; not measured: no GPU has run it
    "gpu": dict(COMMON, seeds=[1, 2, 3, 4, 5], n=32, warm=64, test=96, epochs=9, batch=16, lr=1e-3, lora_r=16,
                lora_alpha=32, dtype="bf16", jobs=12, threads=1, eval_batch=128, methods=CORE + BASELINES),
}
PRESETS["regime"] = dict(PRESETS["cpu"], methods=("sft",), mixtures=("H", "H+N+L"), real=False)


class BenchError(ValueError):
    pass


SIGNAL_EXITS = (130, 143)  # how train.py (and a worker) exits after SIGINT / SIGTERM


def _sigterm(signum, frame):
    raise SystemExit(143)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sha(*paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _dump(obj, path):
    """JSON written whole or not at all (a reader never sees half a file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1) + "\n")
    os.replace(tmp, path)


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


def _num(x):
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------- data
def kinds(plan):
    return dict(SYNTH_KINDS, echo=plan["echo"]) if plan["echo"] else dict(SYNTH_KINDS)


def make_data(root, seed, plan):
    """The seed's synthetic benchmark, its mixtures, warm-up and test sets as JSONL files: (paths, stats)."""
    n, w = plan["n"], plan["warm"]
    d = Path(root) / f"data-seed{seed}"
    rates = dict(H=0.0, N=plan["rate_n"], L=plan["rate_l"])
    synth(d, seed=seed, n_train=3 * n + w, n_test=plan["test"], max_turns=plan["max_turns"], rates=rates,
          kinds=kinds(plan))
    tiers = {t: load_conversations(d / f"train_{t}.jsonl") for t in "HNL"}
    parts = {"H": tiers["H"][:n], "N": tiers["N"][n:2 * n], "L": tiers["L"][2 * n:3 * n]}
    paths, stats = {"warm": d / "warmup.jsonl", "test": d / "test.jsonl"}, {}
    save_jsonl(tiers["H"][3 * n:3 * n + w], paths["warm"])
    for mix in MIXTURES:
        convs = [c for t in mix.split("+") for c in parts[t]]
        paths[mix] = d / f"mix_{mix}.jsonl"
        save_jsonl(convs, paths[mix])
        turns = [m for c in convs for m in c["messages"] if m["role"] == "assistant"]
        kinds_ = {}
        for m in turns:
            if m.get("noisy"):
                kinds_[m["noise_type"]] = kinds_.get(m["noise_type"], 0) + 1
        stats[mix] = {"dialogues": len(convs), "turns": len(turns), "noisy": sum(bool(m.get("noisy")) for m in turns),
                      "kinds": kinds_, "steps": steps_for(plan, len(convs))}
    return paths, stats


def steps_for(plan, dialogues):
    """Optimizer steps for `epochs` passes over a mixture: a step trains `batch` dialogues (with --unit turn, each of
    their assistant turns is a unit with its own loss and weight inside its dialogue)."""
    return max(1, math.ceil(plan["epochs"] * dialogues / plan["batch"]))


def scorer(net, tpl, plan):
    """What train.score_units needs of a run, around a loaded base model."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["dtype"]]
    amp = (lambda: torch.autocast(_device().type, dtype=dt)) if dt != torch.float32 else nullcontext
    return SimpleNamespace(net=net, device=_device(), template=tpl, amp=amp, args=SimpleNamespace(unit="dialogue"))


def prefilter_scores(run, tpl, path, plan):
    """Base-model loss of every dialogue of a mixture, written as --prefilter-scores (one score per conversation,
    higher is better: -loss), so that train.py keeps exactly what --prefilter-keep would; and how well the dropped
    quarter matches the dialogues with a noisy turn."""
    out = path.with_suffix(".scores")
    convs = load_conversations(path)
    examples, _ = build_examples(convs, tpl, plan["max_len"], None)
    if not out.is_file():
        losses = train.score_units(run, examples, "dialogue")[0]
        full = np.full(len(convs), np.inf)
        full[[e["conv_index"] for e in examples]] = losses
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(-float(x) if math.isfinite(x) else -1e30) + "\n" for x in full))
        os.replace(tmp, out)
    keep = prefilter(-read_scores(out, convs)[[e["conv_index"] for e in examples]], keep=PREFILTER_KEEP)
    noisy = np.array([unit_noisy(e, 0) for e in examples], bool)  # the supervised turns this example trains on
    dropped = np.ones(len(examples), bool)
    dropped[keep] = False
    tp, nd, nn_ = int((dropped & noisy).sum()), int(dropped.sum()), int(noisy.sum())
    return out, {"kept": len(keep), "of": len(examples), "dropped_noisy": tp, "dropped": nd, "noisy": nn_,
                 "precision": tp / nd if nd else math.nan, "recall": tp / nn_ if nn_ else math.nan}


def prepare_seed(out, seed, plan, model_dir, tpl):
    """Data, the base model's scores (clean test, pre-filtering) for one seed; cached in the data folder."""
    paths, stats = make_data(out, seed, plan)
    d = paths["test"].parent
    sig = dict(model=str(model_dir), data=_sha(paths["test"], *(paths[m] for m in MIXTURES)), dtype=plan["dtype"],
               new_tokens=plan["new_tokens"], max_len=plan["max_len"])
    base_file = d / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    need_pre = any(VARIANTS[m].get("prefilter") for m in plan["methods"])
    pre_done = all(paths[m].with_suffix(".scores").is_file() for m in plan["mixtures"])
    if base is not None and base.get("sig") == sig and (not need_pre or pre_done):
        net = None
    else:
        for m in MIXTURES:  # scores of another plan are stale
            paths[m].with_suffix(".scores").unlink(missing_ok=True)
        net = M.Transformer.from_pretrained(model_dir, dtype=torch.float32 if plan["dtype"] == "fp32" else
                                            torch.bfloat16, device=_device()).eval()
    if base is None or base.get("sig") != sig:
        convs = load_conversations(paths["test"])
        ex, _ = build_examples(convs, tpl, plan["max_len"], None)
        acc = accuracy(net, tpl, convs, batch_size=plan["eval_batch"], max_new_tokens=plan["new_tokens"])
        base = {"sig": sig, "accuracy": acc["overall"], "acc_total": acc["total"],
                "loss": per_turn_loss(net, ex, batch_size=16, pad_id=tpl.pad_id)["overall"]["loss"]}
        _dump(base, base_file)
    pre = {}
    if need_pre:
        run = scorer(net, tpl, plan)
        for mix in plan["mixtures"]:
            paths[mix + ":scores"], pre[mix] = prefilter_scores(run, tpl, paths[mix], plan)
    del net
    return paths, stats, base, pre


# ----------------------------------------------------------------------------------------------------- one run
def train_flags(plan, seed, steps):
    """The flags every method shares: same steps, batch, lr schedule, LoRA, length, precision, unit, seed."""
    return ["--seed", str(seed), "--max-steps", str(steps), "--batch-size", str(plan["batch"]), "--grad-accum", "1",
            "--lr", str(plan["lr"]), "--warmup-ratio", str(plan["warmup_ratio"]), "--lora-r", str(plan["lora_r"]),
            "--lora-alpha", str(plan["lora_alpha"]), "--lora-dropout", str(plan["lora_dropout"]),
            "--max-len", str(plan["max_len"]), "--dtype", plan["dtype"], "--unit", plan["unit"],
            "--record-units", "--log-every", "1", "--report-top", "5"]


def make_job(plan, name, seed, mix, paths, model_dir, run_dir):
    v = VARIANTS[name]
    steps = steps_for(plan, len(load_conversations(paths[mix])))
    data = paths[mix]
    job = dict(name=name, seed=seed, mixture=mix, run_dir=str(run_dir), model=str(model_dir), data=str(data),
               test=str(paths["test"]), steps=steps, baseline=v.get("baseline"),
               eval=dict(new_tokens=plan["new_tokens"], eval_batch=plan["eval_batch"], max_len=plan["max_len"],
                         dtype=plan["dtype"], unit=plan["unit"]), threads=plan["threads"])
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(run_dir)]
    if v.get("baseline"):
        argv += v["args"] + train_flags(plan, seed, steps)
    else:
        argv += train_flags(plan, seed, steps) + [
            "--method", v["method"], "--alpha", "1.0", "--floor-percentile", "5",
            "--warmup-samples", str(plan["warmup"]), "--ramp-steps", str(plan["ramp"]),
            "--stats", v.get("stats", "welford"), "--stats-update", v.get("stats_update", "reliable"),
            "--detector", v.get("detector", "loss")]
        if v.get("warm"):
            argv += ["--warmup-data", str(paths["warm"])]
            job["warm"] = str(paths["warm"])
        if v.get("prefilter"):
            argv += ["--prefilter-keep", str(PREFILTER_KEEP), "--prefilter-scores", str(paths[mix + ":scores"])]
            job["scores"] = str(paths[mix + ":scores"])
    job["argv"] = argv
    files = [data, paths["test"]] + [Path(job[k]) for k in ("warm", "scores") if k in job]
    root = str(Path(run_dir).parents[3])  # OUT: a moved output folder keeps its finished runs
    rel = [x.replace(root, "OUT") for x in argv]
    job["sig"] = hashlib.sha256(json.dumps([rel, job["eval"], _sha(*files)]).encode()).hexdigest()[:16]
    return job


def finished(job):
    f = Path(job["run_dir"]) / "result.json"
    if not f.is_file():
        return None
    try:
        r = json.loads(f.read_text())
    except ValueError:
        return None
    return r if r.get("sig") == job["sig"] else None


def run_job(job):
    """Train one (method, mixture, seed), evaluate it on the clean test set, write result.json; returns it."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    out = Path(job["run_dir"])
    shutil.rmtree(out, ignore_errors=True)  # a run without result.json is redone from the start
    out.mkdir(parents=True)
    log, t0, cpu0 = io.StringIO(), time.time(), _cpu_s()
    res = {"sig": job["sig"], "variant": job["name"], "mixture": job["mixture"], "seed": job["seed"]}
    try:
        with redirect_stdout(log):
            if job["baseline"]:
                import importlib
                mod = importlib.import_module(f"baselines.{job['baseline']}")
                mod.main(job["argv"])
            else:
                train.main(job["argv"])
    except (Exception, SystemExit) as e:  # a failing method is a row that says so, not a lost table
        (out / "train.log").write_text(log.getvalue())
        if isinstance(e, SystemExit) and e.code in SIGNAL_EXITS:
            raise  # train.py was stopped by a signal: so is the experiment, and this run (no result.json) is redone
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res.update(error=msg, train_s=time.time() - t0)
        _dump(res, out / "result.json")
        return res
    (out / "train.log").write_text(log.getvalue())
    t_train = time.time() - t0
    ev = job["eval"]
    dt = {"fp32": "float32", "bf16": "bfloat16"}[ev["dtype"]]
    net, tpl = load_model(job["model"], out / "adapter", dtype=dt, device=str(_device()))
    test_convs = load_conversations(job["test"])
    test_ex, _ = build_examples(test_convs, tpl, ev["max_len"], None)
    acc = accuracy(net, tpl, test_convs, batch_size=ev["eval_batch"], max_new_tokens=ev["new_tokens"])
    ptl = per_turn_loss(net, test_ex, batch_size=16, pad_id=tpl.pad_id)
    del net
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    state = out / "resure_state.json"
    res.update(accuracy=acc["overall"], acc_total=acc["total"],
               acc_per_turn={int(k): r["accuracy"] for k, r in acc["per_turn"].items()},
               loss=ptl["overall"]["loss"], loss_per_turn={int(k): r["loss"] for k, r in ptl["per_turn"].items()},
               train_s=t_train, eval_s=time.time() - t0 - t_train, cpu_s=_cpu_s() - cpu0,
               warnings=json.loads(state.read_text()).get("warned", []) if state.is_file() else [])
    examples = training_examples(job, tpl)
    if (out / "units.jsonl").is_file() and VARIANTS[job["name"]].get("method", "sft") != "sft":
        res["flagging"] = flagging(out / "units.jsonl", examples, VARIANTS[job["name"]].get("detector") == "loss+gain")
        res["trajectory"] = trajectory(out / "metrics.jsonl")
    if job["baseline"]:
        res["compute"] = report.get("compute")
        res["label_accuracy"] = label_accuracy(report)
        la = report.get("label_accuracy")
        res["label_accuracy_before"] = la[0] if isinstance(la, list) and la else report.get("original_label_accuracy")
        res["baseline_report"] = {k: v for k, v in report.items() if len(json.dumps(v, default=str)) < 4000}
    else:
        res["compute"] = compute(job, examples, tpl)
    _dump(res, out / "result.json")
    for d in out.iterdir():  # the adapter and checkpoints (~20 MB a run at r=16): logs, units and metrics stay
        if d.is_dir():
            shutil.rmtree(d)
    return json.loads((out / "result.json").read_text())  # the same types whether read back later or not


def _cpu_s():
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def training_examples(job, tpl):
    """The run's training examples as train.py built them (pre-filtered ones re-indexed as train.py does)."""
    convs = load_conversations(job["data"])
    ex, _ = build_examples(convs, tpl, job["eval"]["max_len"], None,
                           free=VARIANTS[job["name"]].get("detector") == "loss+gain")
    if job.get("scores"):
        keep = prefilter(-read_scores(job["scores"], convs)[[e["conv_index"] for e in ex]], keep=PREFILTER_KEEP)
        ex = [dict(ex[i], index=j) for j, i in enumerate(keep)]
    return ex


def compute(job, examples, tpl):
    """Training compute of a train.py run, replayed from its sampler: optimizer steps, the tokens of its batches,
    and the extra forward tokens (the context-gain rows, the warm-up set's and the pre-filter's scoring)."""
    seed = int(job["argv"][job["argv"].index("--seed") + 1])
    G, n = int(job["argv"][job["argv"].index("--batch-size") + 1]), len(examples)
    per_epoch = -(-n // G)
    tokens = free = 0
    for m in range(job["steps"]):
        for i in epoch_batches(n, G, seed, m // per_epoch)[m % per_epoch]:
            tokens += len(examples[i]["input_ids"])
            free += sum(len(f[1]) for f in examples[i].get("free", ()))
    extra = free
    if job.get("warm"):
        extra += sum(len(e["input_ids"]) for e in build_examples(load_conversations(job["warm"]), tpl,
                                                                 job["eval"]["max_len"], None)[0])
    if job.get("scores"):
        extra += sum(len(e["input_ids"]) for e in build_examples(load_conversations(job["data"]), tpl,
                                                                 job["eval"]["max_len"], None)[0])
    return {"trainings": 1, "optimizer_steps": job["steps"], "train_tokens": tokens, "generated_tokens": 0,
            "forward_tokens": extra, "comparisons": 0}


def label_accuracy(report):
    """A relabeling baseline's final training-set label accuracy: the first number under a key that names label
    accuracy (a dict of them: its "final" / "after" entry, else its last)."""
    def find(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if "label" in k and "acc" in k:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        return float(v)
                    if isinstance(v, dict):
                        for key in ("final", "after", "last"):
                            if isinstance(v.get(key), (int, float)):
                                return float(v[key])
                        nums = [u for u in v.values() if isinstance(u, (int, float)) and not isinstance(u, bool)]
                        if nums:
                            return float(nums[-1])
                    if isinstance(v, list) and v and isinstance(v[-1], (int, float)):
                        return float(v[-1])
            for v in x.values():
                got = find(v)
                if got is not None:
                    return got
        return None
    return find(report)


def flagging(units_path, examples, views=False):
    """Unit decisions after the warm-up against the injected labels (examples: the run's training set, as
    train.py built it): overall, per noise kind, per turn depth, and (views) per detector view."""
    rows = []
    for r in map(json.loads, open(units_path)):
        if r["warmup"] or r["skipped"]:              # no decision yet, or a step train.py undid
            continue
        ex, t = examples[r["sample"]], r["turn"]
        noisy = unit_noisy(ex, t)
        if noisy is None:
            continue
        kind = (ex["meta"]["noise_type"][t - 1] if t > 0 else "mixed") if noisy else "clean"
        rows.append((r["flagged"], noisy, kind, t or r["group"], r["weight"], (r.get("view") or "").split("+")))
    out = {"all": pr(rows), "by_kind": split(rows, 2), "by_depth": split(rows, 3)}
    if views:
        out["by_view"] = {}
        for view in ("loss", "gain"):
            vr = [(view in x[5],) + x[1:] for x in rows]
            out["by_view"][view] = {"all": pr(vr), "by_kind": split(vr, 2)}
    return out


def split(rows, col):
    return {k: pr([x for x in rows if x[col] == k]) for k in sorted({x[col] for x in rows}, key=str)}


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


def trajectory(metrics_path):
    """Per logged step: the flagged share and, per turn group, (mu, tau, batch loss, flagged share) as judged."""
    out = []
    if not Path(metrics_path).is_file():
        return out
    for r in map(json.loads, open(metrics_path)):
        if "groups" in r:
            out.append({"step": r["step"], "flagged": r.get("flagged"),
                        "groups": {b: [g.get("mu"), g.get("tau"), g.get("batch_loss"), g.get("flagged")]
                                   for b, g in r["groups"].items()}})
    return out


# --------------------------------------------------------------------------------------------------- statistics
def mean_sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def paired(a, b):
    """Mean and sample std of the per-seed differences a[s] - b[s] over the seeds both have."""
    return mean_sd([a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None])


def verdict(m, s):
    """' (no difference)' when a paired difference is not larger than its spread; '' when it is."""
    if not math.isfinite(m):
        return ""
    if not math.isfinite(s):
        return " (one seed: no spread)"
    return " (no difference)" if abs(m) <= s else ""


def fmt(m, s, scale=1.0, digits=1, sign=False):
    if not math.isfinite(m):
        return "n/a"
    return f"{m * scale:{'+' if sign else ''}.{digits}f}" + (f" ± {s * scale:.{digits}f}" if math.isfinite(s) else "")


def by_seed(results, v, mix, k):
    return {r["seed"]: r.get(k) for r in results if r["variant"] == v and r["mixture"] == mix and "error" not in r}


def summarize(results, variants, seeds, mixtures=MIXTURES):
    """{variant: {"mixtures": {mix: {accuracy, loss: (m, sd); d_accuracy, d_loss: paired vs sft; h_accuracy,
    h_loss: paired vs the same method on H}}, "spearman": {accuracy, loss}}}."""
    out = {}
    for v in variants:
        row = {}
        for mix in mixtures:
            row[mix] = {k: mean_sd(list(by_seed(results, v, mix, k).values())) for k in ("accuracy", "loss")}
            for k in ("accuracy", "loss"):
                if v != "sft" and "sft" in variants:
                    row[mix]["d_" + k] = paired(by_seed(results, v, mix, k), by_seed(results, "sft", mix, k))
                if mix != "H" and "H" in mixtures:
                    row[mix]["h_" + k] = paired(by_seed(results, v, mix, k), by_seed(results, v, "H", k))
        rs = [r for r in results if r["variant"] == v and "error" not in r and r["mixture"] in mixtures]
        xs = [MIXTURES.index(r["mixture"]) + 1 for r in rs]
        sp = {}
        for k in ("accuracy", "loss"):
            ys = [r[k] for r in rs]
            ok = len(ys) >= 2 and len(set(xs)) > 1 and all(y is not None and math.isfinite(y) for y in ys)
            sp[k] = spearman(xs, ys) if ok else math.nan
        out[v] = {"mixtures": row, "spearman": sp}
    return out


def pooled(results, variant, mixture, section, view=None):
    """Flagging counts of a (variant, mixture) summed over seeds, precision/recall recomputed from the sums.
    section: "all" -> {"all": counts}; "by_kind" / "by_depth" -> {key: counts}; view: a detector view's flags."""
    tot = {}
    for r in results:
        if r["variant"] != variant or r["mixture"] != mixture or "flagging" not in r:
            continue
        fl = r["flagging"] if view is None else r["flagging"].get("by_view", {}).get(view)
        if not fl or section not in fl:
            continue
        node = fl[section]
        for sub, d in ({"all": node} if section == "all" else node).items():
            t = tot.setdefault(sub, {"units": 0, "noisy": 0, "flagged": 0, "tp": 0})
            for c in t:
                t[c] += d[c]
    for t in tot.values():
        t["precision"] = t["tp"] / t["flagged"] if t["flagged"] else math.nan
        t["recall"] = t["tp"] / t["noisy"] if t["noisy"] else math.nan
        t["flag_rate"] = t["flagged"] / t["units"] if t["units"] else math.nan
    return tot


# -------------------------------------------------------------------------------------------------------- report
def _p(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _f(x, d=2):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def _sp(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.2f}"


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(cells):
    return [_row(cells), "|" + "---|" * len(cells)]


def write_results(out, saved):
    """results.md from what results.json holds (also what --report regenerates)."""
    plan, results, base, data_stats = saved["plan"], saved["results"], saved["base"], saved["data"]
    mixes = [m for m in MIXTURES if m in plan["mixtures"]]
    seeds = [int(s) for s in plan["seeds"]]
    ok = [r for r in results if "error" not in r]
    v_list = [v for v in plan["methods"] if any(r["variant"] == v for r in ok)]
    failed = {}
    for r in results:
        if "error" in r:
            failed.setdefault(r["variant"], []).append(r["error"])
    summary = summarize(ok, v_list, seeds, mixes)
    done, total = len(results), saved.get("runs_planned", len(results))
    run_s = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in results)
    L = [f"# The noise experiment (bench/noise.py, preset {plan['preset']})", "",
         f"Machine: {saved['machine']}. Wall time {saved['wall_s'] / 60:.1f} min for {done} of {total} runs"
         + (f" over {saved['invocations']} invocations (resumed)" if saved.get("invocations", 1) > 1 else "")
         + f"; the runs' own training and evaluation: {run_s / 60:.1f} min"
         + (f" ({saved['cpu_share']:.2f} of the {os.cpu_count()} cores on average went to the last invocation; load "
            f"average {saved['load']})" if saved.get("cpu_share") is not None else "") + ".", "",
         f"Plan: model {plan['model_name']}; seeds {seeds}; {plan['n']} dialogues per tier, warm-up set "
         f"{plan['warm']} clean dialogues, {plan['test']} clean test dialogues per seed; per-turn noise rate "
         f"N {plan.get('rate_n', SYNTH_RATES['N']):g}, L {plan.get('rate_l', SYNTH_RATES['L']):g}; noise kinds "
         f"{', '.join(f'{k} {w:g}' for k, w in plan['kinds'].items())}; {plan['epochs']} epochs over each mixture "
         f"at batch {plan['batch']} (the same optimizer steps for every method on a mixture); lr {plan['lr']} cosine, "
         f"LoRA r={plan['lora_r']} alpha={plan['lora_alpha']}, unit={plan['unit']}, {plan['dtype']}; ReSURE alpha 1, "
         f"floor 5th percentile, warm-up from the clean set (--warmup-samples {plan['warmup']}), ramp "
         f"{plan['ramp']} steps; greedy answers of at most {plan['new_tokens']} tokens. Mean ± sample std over "
         "seeds (each seed: its own data, LoRA init and order). A difference is paired by seed and reads "
         "\"no difference\" when it is not larger than the std of the per-seed differences.", ""]
    if failed:
        L += ["Failed runs (left out of every table): " + "; ".join(
            f"{v}: {len(e)} run(s), e.g. {e[0][:160]}" for v, e in failed.items()), ""]
    L += ["## Data (summed over seeds)", ""] + _head(["mixture", "dialogues", "optimizer steps per run",
                                                       "assistant turns", "noisy turns", "by kind"])
    for mix in mixes:
        st = [data_stats[str(s)][mix] for s in seeds if str(s) in data_stats]
        if not st:
            continue
        kk = {}
        for s in st:
            for k, n in s["kinds"].items():
                kk[k] = kk.get(k, 0) + n
        turns, noisy = sum(s["turns"] for s in st), sum(s["noisy"] for s in st)
        L.append(_row([mix, sum(s["dialogues"] for s in st), st[0]["steps"], turns,
                       f"{noisy} ({100 * noisy / turns:.1f}%)", ", ".join(f"{k} {n}" for k, n in sorted(kk.items()))]))
    bm = mean_sd([b["accuracy"] for b in base.values()])
    bl = mean_sd([b["loss"] for b in base.values()])
    L += ["", "## Clean-test exact-match accuracy (%)", ""] + _head(
        ["method"] + mixes + ["Spearman(mixture, accuracy)"])
    L.append(_row(["base model (no training)"] + [fmt(*bm, 100)] * len(mixes) + [""]))
    for v in v_list:
        L.append(_row([v] + [fmt(*summary[v]["mixtures"][m]["accuracy"], 100) for m in mixes]
                      + [_sp(summary[v]["spearman"]["accuracy"])]))
    if "H" in mixes and len(mixes) > 1:
        L += ["", "## Change from H, paired by seed (accuracy in points; the regime check reads the sft row)", ""] + \
            _head(["method"] + [f"H -> {m}" for m in mixes if m != "H"])
        for v in v_list:
            L.append(_row([v] + [fmt(*summary[v]["mixtures"][m]["h_accuracy"], 100, sign=True)
                                 + verdict(*summary[v]["mixtures"][m]["h_accuracy"]) for m in mixes if m != "H"]))
    L += ["", "## Clean-test loss per supervised token (lower is better)", ""] + _head(
        ["method"] + mixes + ["Spearman(mixture, loss)"])
    L.append(_row(["base model (no training)"] + [fmt(*bl, 1, 3)] * len(mixes) + [""]))
    for v in v_list:
        L.append(_row([v] + [fmt(*summary[v]["mixtures"][m]["loss"], 1, 3) for m in mixes]
                      + [_sp(summary[v]["spearman"]["loss"])]))
    if "sft" in v_list and len(v_list) > 1:
        L += ["", "## Difference to SFT, paired by seed (accuracy in points / loss)", ""] + _head(
            ["method"] + [f"{m}: accuracy" for m in mixes] + [f"{m}: loss" for m in mixes])
        for v in v_list:
            if v == "sft":
                continue
            row = summary[v]["mixtures"]
            L.append(_row([v] + [fmt(*row[m]["d_accuracy"], 100, sign=True) + verdict(*row[m]["d_accuracy"])
                                 for m in mixes] + [fmt(*row[m]["d_loss"], 1, 3, sign=True)
                                                    + verdict(*row[m]["d_loss"]) for m in mixes]))
    L += compute_section(ok, v_list, mixes)
    L += flag_sections(ok, v_list, mixes, saved)
    L += ["", f"## Clean-test loss per turn depth, mixture {mixes[-1]}", ""]
    depths = sorted({int(d) for r in ok for d in r["loss_per_turn"]})
    L += _head(["method"] + [f"turn {d}" for d in depths])
    for v in v_list:
        rs = [r for r in ok if r["variant"] == v and r["mixture"] == mixes[-1]]
        L.append(_row([v] + [fmt(*mean_sd([r["loss_per_turn"].get(str(d), r["loss_per_turn"].get(d))
                                           for r in rs]), 1, 3) for d in depths]))
    if saved.get("real") is not None:
        L += ["", "## Real dialogues with injected noise (bench/real_noise.py)", ""] + real_section(saved["real"])
    L += ["", "## What this run shows", ""] + findings(summary, v_list, ok, plan, mixes)
    text = "\n".join(L) + "\n"
    (Path(out) / "results.md").write_text(text)
    return text, summary


def compute_section(ok, v_list, mixes):
    last = mixes[-1]
    L = ["", f"## Compute per run, mixture {last} (mean over seeds; forward tokens: extra scoring passes)", ""] + \
        _head(["method", "trainings", "optimizer steps (all trainings)", "train tokens", "generated tokens",
               "extra forward tokens", "comparisons", "train s", "eval s"])
    for v in v_list:
        rs = [r for r in ok if r["variant"] == v and r["mixture"] == last]
        c = [r.get("compute") or {} for r in rs]
        avg = (lambda k: mean_sd([_num(x.get(k)) for x in c])[0])  # noqa: E731
        L.append(_row([v] + [_f(avg(k), 0) for k in ("trainings", "optimizer_steps", "train_tokens",
                                                      "generated_tokens", "forward_tokens", "comparisons")]
                      + [_f(mean_sd([r.get("train_s") for r in rs])[0], 0),
                         _f(mean_sd([r.get("eval_s") for r in rs])[0], 0)]))
    rel = [v for v in v_list if any(r.get("label_accuracy") is not None for r in ok if r["variant"] == v)]
    if rel:
        L += ["", "Training-set label accuracy (%) of the relabeling methods, before -> after (their report.json):",
              ""] + _head(["method"] + mixes)
        for v in rel:
            L.append(_row([v] + [fmt(*mean_sd(list(by_seed(ok, v, m, "label_accuracy_before").values())), 100)
                                 + " -> " + fmt(*mean_sd(list(by_seed(ok, v, m, "label_accuracy").values())), 100)
                                 for m in mixes]))
    return L


def flag_sections(ok, v_list, mixes, saved):
    flaggers = [v for v in v_list if any("flagging" in r for r in ok if r["variant"] == v)]
    L = []
    if flaggers:
        L += ["", "## Flagging against the injected noise labels (every unit decision after the warm-up, pooled "
              "over seeds)", ""] + _head(["method", "mixture", "units", "noisy", "flagged", "precision", "recall",
                                          "mean weight noisy / clean", "lag / collapse warnings"])
        for v in flaggers:
            for mix in mixes:
                t = pooled(ok, v, mix, "all").get("all")
                if not t:
                    continue
                rs = [r for r in ok if r["variant"] == v and r["mixture"] == mix and "flagging" in r]
                wn = mean_sd([r["flagging"]["all"]["weight_noisy"] for r in rs])[0]
                wc = mean_sd([r["flagging"]["all"]["weight_clean"] for r in rs])[0]
                warn = sorted({w for r in rs for w in r.get("warnings", [])})
                L.append(_row([v, mix, t["units"], t["noisy"], t["flagged"], _p(t["precision"]), _p(t["recall"]),
                               f"{_f(wn)} / {_f(wc)}", ", ".join(warn) or "-"]))
        last = mixes[-1]
        kinds_ = sorted({k for r in ok if r["mixture"] == last and "flagging" in r for k in r["flagging"]["by_kind"]})
        kinds_ = (["clean"] if "clean" in kinds_ else []) + [k for k in kinds_ if k != "clean"]
        L += ["", f"### Per noise kind, mixture {last}: flag rate (recall for a noise kind, false-positive rate for "
              "clean); per detector view where there are two", ""] + _head(["method"] + kinds_)
        for v in flaggers:
            views = [None] + (["loss", "gain"] if any("by_view" in r["flagging"] for r in ok if r["variant"] == v
                                                       and "flagging" in r) else [])
            for view in views:
                t = pooled(ok, v, last, "by_kind", view)
                L.append(_row([v + (f" (view {view})" if view else "")]
                              + [f"{_p(t[k]['flag_rate'])} (n={t[k]['units']})" if k in t else "-" for k in kinds_]))
        depths = sorted({int(d) for r in ok if r["mixture"] == last and "flagging" in r
                         for d in r["flagging"]["by_depth"]})
        L += ["", f"### Per turn depth, mixture {last}: precision / recall (noisy share)", ""] + \
            _head(["method"] + [f"turn {d}" for d in depths])
        for v in flaggers:
            t = {int(k): x for k, x in pooled(ok, v, last, "by_depth").items()}
            L.append(_row([v] + [f"{_p(t[d]['precision'])} / {_p(t[d]['recall'])} ({_p(t[d]['noisy'] / t[d]['units'])})"
                                 if d in t and t[d]["units"] else "-" for d in depths]))
        gainers = [v for v in flaggers if any("by_view" in r["flagging"] for r in ok if r["variant"] == v
                                              and "flagging" in r)]
        if gainers:
            L += ["", "### Per detector view (pooled over seeds)", ""] + _head(
                ["method", "mixture", "view", "flagged", "precision", "recall"])
            for v in gainers:
                for mix in mixes:
                    for view in ("loss", "gain"):
                        t = pooled(ok, v, mix, "all", view).get("all")
                        if t:
                            L.append(_row([v, mix, view, t["flagged"], _p(t["precision"]), _p(t["recall"])]))
    pre = saved.get("prefilter") or {}
    if pre:
        tot = {mix: {k: sum(p[mix][k] for p in pre.values() if mix in p) for k in ("dropped_noisy", "dropped", "noisy")}
               for mix in mixes}
        L += ["", "Static pre-filtering (base-model loss, keep 0.75; the paper ranks with a reward model) as a "
              "detector of dialogues with any noisy turn, pooled over seeds: " + "; ".join(
                  f"{mix}: precision {_p(t['dropped_noisy'] / max(1, t['dropped']))}, recall "
                  f"{_p(t['dropped_noisy'] / t['noisy'])}" for mix, t in tot.items() if t["noisy"]) + "."]
    return L


def real_section(real):
    """The real-data part as bench/real_noise.run returned it: its own markdown when it gives one, else JSON."""
    if isinstance(real, dict) and isinstance(real.get("markdown"), str):
        return [real["markdown"]]
    if isinstance(real, dict) and real.get("error"):
        return [f"Not run: {real['error']}"]
    return ["```json", json.dumps(real, indent=1, default=str)[:20000], "```"]


def findings(summary, v_list, ok, plan, mixes):
    """Plain sentences generated from the numbers, whatever they show."""
    out = []
    totals = [r["acc_total"] for r in ok if "acc_total" in r]
    if totals:
        out.append(f"- Accuracy is over {min(totals)}-{max(totals)} test answers per seed: one answer is "
                   f"{100 / min(totals):.2f} points.")
    for v in v_list:
        sp = summary[v]["spearman"]["accuracy"]
        if math.isfinite(sp):
            out.append(f"- {v}: Spearman(mixture, accuracy) = {_sp(sp)} over the (mixture, seed) pairs")
    for v in v_list:
        for m in mixes:
            if m == "H" or "h_accuracy" not in summary[v]["mixtures"][m]:
                continue
            d, s = summary[v]["mixtures"][m]["h_accuracy"]
            if v == "sft" and math.isfinite(d):
                out.append(f"- sft from H to {m}: {fmt(d, s, 100, sign=True)} points"
                           + (" (no difference: no regime where noise hurts)" if verdict(d, s) else
                              (" (noise hurts, beyond the seed spread)" if d < 0 else " (more data helped)")))
    if "sft" in v_list:
        for v in v_list:
            if v == "sft":
                continue
            parts = []
            for m in mixes:
                d, s = summary[v]["mixtures"][m].get("d_accuracy", (math.nan, math.nan))
                if math.isfinite(d):
                    parts.append(f"{m} {100 * d:+.1f}" + (" (no difference)" if verdict(d, s) == " (no difference)"
                                                          else ""))
            if parts:
                out.append(f"- {v} vs sft, accuracy points: " + ", ".join(parts))
    lag = sorted({(r["variant"], r["mixture"]) for r in ok if "lag" in r.get("warnings", [])})
    col = sorted({(r["variant"], r["mixture"]) for r in ok if "collapse" in r.get("warnings", [])})
    if lag:
        out.append("- lag warning raised in: " + ", ".join(f"{v} on {m}" for v, m in lag))
    if col:
        out.append("- collapse warning raised in: " + ", ".join(f"{v} on {m}" for v, m in col))
    return out


def plot(out, saved, summary):
    """noise.png (accuracy and loss vs mixture, one line per method) and resure_dynamics.png (per turn group mu,
    tau and batch loss, and the flagged share, over training: seed 1 of the last mixture)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no figures written (pip install matplotlib for them)")
        return []
    plan = saved["plan"]
    mixes = [m for m in MIXTURES if m in plan["mixtures"]]
    v_list = [v for v in plan["methods"] if v in summary]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(mixes))
    for i, v in enumerate(v_list):
        for ax, k, scale in ((axes[0], "accuracy", 100), (axes[1], "loss", 1)):
            ms = [summary[v]["mixtures"][m][k] for m in mixes]
            ax.errorbar(x + (i - len(v_list) / 2) * 0.025, [m * scale for m, _ in ms],
                        yerr=[(s * scale if math.isfinite(s) else 0) for _, s in ms], marker="o", capsize=3, label=v)
    for ax, title in ((axes[0], "clean-test exact match (%)"), (axes[1], "clean-test loss per token")):
        ax.set_xticks(x, mixes)
        ax.set_xlabel("training mixture (more data, lower quality ->)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [Path(out) / "noise.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    last, seed = mixes[-1], plan["seeds"][0]
    runs = [r for r in saved["results"] if r["mixture"] == last and r["seed"] == seed and r.get("trajectory")]
    if runs:
        k = max(1, max(len(r["trajectory"]) for r in runs) // 15)  # flag shares per step are noisy: moving mean

        def smooth(ys):
            ys = np.array([_num(y) for y in ys], float)
            return ys if k == 1 else np.array([np.nanmean(ys[max(0, i - k + 1):i + 1]) if np.isfinite(
                ys[max(0, i - k + 1):i + 1]).any() else np.nan for i in range(len(ys))])
        fig, axes = plt.subplots(len(runs), 2, figsize=(12, 2.8 * len(runs)), squeeze=False)
        for (a0, a1), r in zip(axes, runs):
            groups = sorted({b for t in r["trajectory"] for b in t["groups"]}, key=int)
            for j, b in enumerate(groups):
                pts = [(t["step"], *t["groups"][b]) for t in r["trajectory"] if b in t["groups"]]
                st = [p[0] for p in pts]
                col = f"C{j}"
                a0.plot(st, [_num(p[1]) for p in pts], color=col, label=f"turn {b}: mu")
                a0.plot(st, [_num(p[2]) for p in pts], color=col, ls="--", label=f"turn {b}: tau")
                a0.plot(st, [_num(p[3]) for p in pts], color=col, ls=":", alpha=0.6)
                a1.plot(st, smooth([p[4] for p in pts]), color=col, label=f"turn {b}")
            a1.plot([t["step"] for t in r["trajectory"]], smooth([t["flagged"] for t in r["trajectory"]]), color="k",
                    lw=2, label="all")
            a0.set_title(f"{r['variant']}: mu (solid), tau (dashed), batch loss (dotted)", fontsize=9)
            a1.set_title(f"{r['variant']}: flagged share" + (f" (mean of the last {k} steps)" if k > 1 else
                                                              " per step"), fontsize=9)
            a0.set_yscale("log")
            a0.legend(fontsize=6, ncol=2)
            a1.legend(fontsize=6)
            for a in (a0, a1):
                a.set_xlabel("optimizer step")
                a.grid(alpha=0.3)
        fig.suptitle(f"ReSURE over training: mixture {last}, seed {seed}")
        fig.tight_layout()
        paths.append(Path(out) / "resure_dynamics.png")
        fig.savefig(paths[1], dpi=110)
        plt.close(fig)
    return paths


def _earlier_wall(path):
    """Wall time and invocations recorded by the runs before a resume, so the total counts every invocation."""
    try:
        saved = json.loads(Path(path).read_text())
        return float(saved.get("wall_s") or 0.0), int(saved.get("invocations", 1))
    except (OSError, ValueError):
        return 0.0, 0


def report(out):
    """results.md and the figures from OUT/results.json alone."""
    f = Path(out) / "results.json"
    if not f.is_file():
        raise BenchError(f"--report {out}: no results.json there")
    saved = json.loads(f.read_text())
    text, summary = write_results(out, saved)
    figs = plot(out, saved, summary)
    return text, figs


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    for name, h in (("tiny", "a tiny random model, seconds (CI)"), ("quick", "a short check on SmolLM2"),
                    ("regime", "sft alone on H and H+N+L at the --cpu settings: is there a drop to fix?"),
                    ("cpu", "the answer on 2 CPU cores (<= 3 hours idle; the default)"),
                    ("gpu", "one GPU, --jobs runs at once (sized for 8 minutes on one H200)")):
        g.add_argument("--" + name, action="store_true", help=h)
    g.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # the old name of --gpu
    g.add_argument("--report", metavar="DIR", help="regenerate DIR/results.md and the figures from DIR/results.json")
    g.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)      # one run, in a process of its own
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct; --tiny: a tiny random llama)")
    p.add_argument("--out", default="runs/noise", help="output folder (results.md, results.json, figures, runs)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the preset)")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--mixtures", help="comma-separated, from: " + ", ".join(MIXTURES))
    for k, t in (("n", int), ("warm", int), ("test", int), ("epochs", float), ("batch", int), ("lr", float),
                 ("lora_r", int), ("lora_alpha", float), ("echo", float), ("rate_n", float), ("rate_l", float),
                 ("jobs", int), ("threads", int), ("eval_batch", int), ("new_tokens", int)):
        p.add_argument("--" + k.replace("_", "-"), type=t, help="overrides the preset")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="overrides the preset")
    p.add_argument("--unit", choices=["turn", "dialogue"], default="turn")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="run bench/real_noise.py at the end (default: --gpu)")
    return p.parse_args(argv)


def make_plan(a):
    preset = next((k for k in ("tiny", "quick", "regime", "gpu") if getattr(a, k)), "gpu" if a.full else "cpu")
    plan = dict(PRESETS[preset], preset=preset, unit=a.unit)
    for k in ("n", "warm", "test", "epochs", "batch", "lr", "lora_r", "lora_alpha", "echo", "rate_n", "rate_l",
              "jobs", "threads", "eval_batch", "new_tokens", "dtype", "real"):
        if getattr(a, k) is not None:
            plan[k] = getattr(a, k)
    if a.seeds:
        plan["seeds"] = [int(s) for s in a.seeds.split(",")]
    if a.methods:
        plan["methods"] = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.mixtures:
        plan["mixtures"] = [m.strip() for m in a.mixtures.split(",") if m.strip()]
    plan["methods"], plan["mixtures"] = list(plan["methods"]), [m for m in MIXTURES if m in plan["mixtures"]]
    bad = [m for m in plan["methods"] if m not in VARIANTS]
    if bad:
        raise BenchError(f"--methods: unknown {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    bad = [m for m in (a.mixtures or "").split(",") if m.strip() and m.strip() not in MIXTURES]
    if bad or not plan["mixtures"]:
        raise BenchError(f"--mixtures: unknown {', '.join(bad) or '(none given)'} (known: {', '.join(MIXTURES)})")
    if plan["n"] < 1 or plan["test"] < 1 or plan["warm"] < 1 or plan["epochs"] <= 0 or plan["jobs"] < 1:
        raise BenchError("--n, --test, --warm and --jobs must be >= 1 and --epochs > 0")
    plan["kinds"] = kinds(plan)
    return plan


def available(name):
    """Whether a method can run here: baselines/NAME.py must exist (they land separately)."""
    b = VARIANTS[name].get("baseline")
    return b is None or (ROOT / "baselines" / f"{b}.py").is_file()


def run_pool(todo, n_jobs, done_cb):
    """Each job in `python bench/noise.py --worker JOB.json`, n_jobs at a time (several runs share one GPU)."""
    queue, running = list(todo), []
    try:
        _pool_loop(queue, running, n_jobs, done_cb)
    finally:  # stopped (a signal, a worker stopped by one): the workers stop after their step too
        for _, proc, log in running:
            proc.terminate()
            proc.wait()
            log.close()


def _pool_loop(queue, running, n_jobs, done_cb):
    while queue or running:
        while queue and len(running) < n_jobs:
            job = queue.pop(0)
            d = Path(job["run_dir"])
            d.parent.mkdir(parents=True, exist_ok=True)
            jf = d.parent / f"{d.name}.job.json"
            _dump(job, jf)
            log = open(d.parent / f"{d.name}.worker.log", "w")
            running.append((job, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(jf)],
                                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(0.5)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode in SIGNAL_EXITS or -proc.returncode in (signal.SIGINT, signal.SIGTERM):
                raise SystemExit(proc.returncode if proc.returncode > 0 else 128 - proc.returncode)
            r = finished(job) or {"sig": job["sig"], "variant": job["name"], "mixture": job["mixture"],
                                  "seed": job["seed"], "error": f"worker exited with code {proc.returncode}"}
            done_cb(r)


def run_real(plan, model_dir, out):
    """bench/real_noise.py's run() (written separately): its dict is kept whole in OUT/real/real.json, and
    results.json keeps its results.md (headings one level down) for this report."""
    d = Path(out) / "real"
    f = d / "real.json"
    if not f.is_file():
        if not (ROOT / "bench" / "real_noise.py").is_file():
            print("note: bench/real_noise.py is not here: the real-data part is not run")
            return None
        import importlib
        try:
            mod = importlib.import_module("real_noise")
            res = mod.run(str(model_dir), str(d), plan["seeds"][0], plan["preset"] in ("tiny", "quick"))
        except Exception as e:  # its failure is reported, the synthetic table stands
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        _dump(res, f)
    md = d / "results.md"
    text = md.read_text() if md.is_file() else "```json\n" + f.read_text()[:20000] + "\n```"
    return {"out": str(d), "markdown": "\n".join("#" + line if line.startswith("#") else line
                                                 for line in text.splitlines())}


def main(argv=None):
    a = parse_args(argv)
    if a.report:
        text, figs = report(a.report)
        print(text)
        print("written: " + ", ".join(str(p) for p in [Path(a.report) / "results.md", *figs]))
        return {"out": a.report}
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        run_job(job)
        return None
    plan = make_plan(a)
    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = a.model
    if model_dir is None:
        from support.smollm2 import prepare_smollm2
        model_dir = prepare_smollm2()
        if a.tiny:
            from speed import make_tiny_model
            model_dir = make_tiny_model(out / "tiny-model", tokenizer_dir=model_dir)
    plan["model_name"] = Path(model_dir).name
    tpl = ChatTemplate.from_pretrained(model_dir)
    from speed import cpu_info
    machine = (f"{cpu_info()[0]}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{plan['threads'] or torch.get_num_threads()} threads x {plan['jobs']} jobs"
               + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    missing = [m for m in plan["methods"] if not available(m)]
    if missing:
        print(f"note: not run, their baselines/*.py is not here yet: {', '.join(missing)}")
    methods = [m for m in plan["methods"] if m not in missing]
    print(f"noise.py {plan['preset']}: {machine}; load average {os.getloadavg()[0]:.2f}")
    t_start, cpu0, load0 = time.time(), _cpu_s(), os.getloadavg()[0]
    jobs, data_stats, base, pre = [], {}, {}, {}
    for seed in plan["seeds"]:
        t0 = time.time()
        paths, data_stats[seed], base[seed], p = prepare_seed(out, seed, plan, model_dir, tpl)
        print(f"seed {seed}: data written, base model scored (clean-test accuracy {100 * base[seed]['accuracy']:.1f}%, "
              f"loss {base[seed]['loss']:.3f}) in {time.time() - t0:.0f} s", flush=True)
        if p:
            pre[seed] = p
        for phase in (CORE, BASELINES, [m for m in methods if m not in CORE + BASELINES]):
            for mix in plan["mixtures"]:
                for name in [m for m in methods if m in phase and (m not in BASELINES
                                                                   or mix in plan["baseline_mixtures"])]:
                    run_dir = out / "runs" / f"seed{seed}" / mix / name.replace("/", "_").replace(":", "_")
                    jobs.append(make_job(plan, name, seed, mix, paths, model_dir, run_dir))
    # the cleanest and the noisiest mixture first, sft first on them (the regime check, and the reference of every
    # paired difference), then the mixtures between, then the baselines: an experiment stopped early still holds
    # its widest paired comparison on every seed
    ends = (plan["mixtures"][0], plan["mixtures"][-1])
    jobs.sort(key=lambda j: (j["name"] in BASELINES, j["mixture"] not in ends, j["name"] != "sft"))
    steps = {m: data_stats[plan["seeds"][0]][m]["steps"] for m in plan["mixtures"]}
    print(f"plan: {len(jobs)} training runs = {len(plan['seeds'])} seeds x {len(plan['mixtures'])} mixtures x "
          f"{len(methods)} methods ({', '.join(methods)}); steps per run {steps} (batch {plan['batch']}, "
          f"{plan['epochs']} epochs); {plan['n']} dialogues per tier; {plan['test']} test dialogues; {plan['dtype']}; "
          f"model {model_dir}; output {out}", flush=True)
    results = {j["sig"]: r for j in jobs if (r := finished(j))}
    if results:
        print(f"resuming: {len(results)} of {len(jobs)} runs already finished in {out}", flush=True)
    saved = {"plan": plan, "machine": machine, "base": base, "data": data_stats, "prefilter": pre,
             "runs_planned": len(jobs), "real": None}
    before = _earlier_wall(out / "results.json") if results else (0.0, 0)
    todo = [j for j in jobs if j["sig"] not in results]
    todo_steps = sum(j["steps"] for j in todo)

    def save():
        el = time.time() - t_start
        saved.update(results=[results[j["sig"]] for j in jobs if j["sig"] in results], wall_s=before[0] + el,
                     invocations=before[1] + 1, this_wall_s=el,
                     cpu_share=(_cpu_s() - cpu0) / el / (os.cpu_count() or 1) if el > 0 else None,
                     load=f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} now")
        _dump(saved, out / "results.json")
        text, summary = write_results(out, json.loads((out / "results.json").read_text()))
        saved["summary"] = summary  # derived (--report recomputes it), kept for readers of results.json
        _dump(saved, out / "results.json")
        return text, summary

    def done(r):
        results[r["sig"]] = r
        left = sum(j["steps"] for j in todo if j["sig"] not in results)
        el = time.time() - t_start
        fl = r.get("flagging", {}).get("all", {})
        print(f"[{len(results)}/{len(jobs)}] seed {r['seed']} {r['mixture']:6s} {r['variant']:24s} "
              + (f"ERROR {r['error']}" if "error" in r else
                 f"acc {100 * r['accuracy']:5.1f}% loss {r['loss']:.3f}"
                 + (f" flagged {fl['flagged']}/{fl['units']} P {_p(fl['precision'])} R {_p(fl['recall'])}"
                    if fl else "") + f" | {r['train_s']:.0f}+{r['eval_s']:.0f} s")
              + f", ETA {el / (todo_steps - left) * left / 60:.1f} min", flush=True)  # runs cost about their steps
        save()

    previous = signal.signal(signal.SIGTERM, _sigterm)  # outside train.py's own handling too: stop, keep what finished
    try:
        if plan["jobs"] > 1:
            run_pool(todo, plan["jobs"], done)
        else:
            for job in todo:
                done(run_job(job))
                gc.collect()
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) else 130
        print(f"noise.py: stopped by a signal; {len(results)} of {len(jobs)} runs are finished in {out} and the same "
              "command goes on from there", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if plan["real"]:
        saved["real"] = run_real(plan, model_dir, out)
    text, summary = save()
    figs = plot(out, json.loads((out / "results.json").read_text()), summary)
    print("\n" + text)
    print("written: " + ", ".join(str(p) for p in [out / "results.md", out / "results.json", *figs]))
    return {"results": saved["results"], "summary": summary, "out": str(out)}


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"noise.py: error: {e}", file=sys.stderr)
        sys.exit(2)
