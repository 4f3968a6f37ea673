"""Real dialogues with injected noise: which kinds of bad supervision each detector view sees.

    python bench/real_noise.py                         # SmolLM2-135M-Instruct, 1 torch thread
    python bench/real_noise.py --out /tmp/rn --quick   # a CI-sized check of the whole pipeline
    options: --seed S, --overhead-steps N (time the gain forward), --extra "NAME=train.py flags"
             (one more run)

Data (bench/real_noise_data.py): MT-Bench-101 (../shared/fixtures, 1388 multi-turn dialogues), split
by seed into training dialogues, clean warm-up dialogues and clean held-out dialogues. A fraction
`rate` of the training assistant turns is replaced by noise of five kinds (off_topic, shuffled,
truncated, echo, wrong_same_dialogue), each labelled on its message.
Measured, all from train.py's own code (bench/real_noise_scores.py):
  (a) the base model's per-turn loss and context gain of every training turn (train.score_units,
      what the detectors see at first sighting before any training): ROC AUC per noise kind
      against the clean turns of the loss, of low gain (-gain) and of high gain;
  (b) sft, resure[turn,ema/winsorized] (--detector loss) and
      resure[turn,ema/winsorized,loss+gain], per-turn units and EMA / winsorized statistics (not the
      paper's configuration: the tracking statistics the gain view needs), the same data, seed
      and steps, with --record-units: flag precision / recall per view and per noise kind at the
      first judged sighting of each turn and at its last sighting, and the AUC of the loss at first
      sighting during training;
  (c) the clean held-out per-turn loss of the base model and after each run (train.py
      --eval-data), and each run's loss per held-out dialogue (its adapter, eval.load): every run
      against sft, paired by held-out dialogue, with its 95 % t-interval and Holm-adjusted p
      (bench/bench_report.py);
  (d) a replay: resure.ReSURE run again over the loss+gain run's recorded (loss, gain) stream with
      other loss alphas and gain bands (SWEEP), from the stream's warm-up and from clean warm-up
      dialogues: which flags another setting would have raised on the same trajectory (its weights
      would have moved the trajectory a little, so a chosen setting is then trained for real with
      --extra).
Writes OUT/results.json and OUT/results.md (bench/real_noise_report.py), and OUT/heldout.png with
matplotlib; every training run lives in OUT/runs/NAME and is skipped when it is already there,
finished, and resumed when interrupted; the base model's scores are cached in
OUT/base_scores.json. OUT is bench/results/real-noise unless --out says otherwise (--quick:
runs/real_noise_quick); the repository keeps its results.json and results.md (.gitignore leaves
the rest out), from which `python bench/tables.py` writes the documents' real-noise tables.
"""
import argparse
import io
import json
import os
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model as M  # noqa: E402
import train  # noqa: E402
from data import ChatTemplate, build_examples  # noqa: E402
from eval import load as load_model, per_turn_loss  # noqa: E402
from real_noise_data import KINDS, MTBENCH101, inject, load_mtbench101, split  # noqa: E402
from real_noise_report import acceptance, figure, heldout_family, markdown  # noqa: E402
from real_noise_scores import (base_scores, detectability, flagging, replay_sweep,  # noqa: E402
                               unit_labels)
from support.conversations import load_conversations, save_jsonl  # noqa: E402

PRESETS = {
    # train / warm / test: dialogues; rate: noisy fraction of the training turns; steps: optimizer
    # steps per run
    "cpu": dict(train=160, warm=48, test=48, rate=0.3, steps=40, batch=8, max_len=256, lr=1e-3,
                lora_r=16, lora_alpha=32, warmup_samples=48, ramp_steps=5),
    "quick": dict(train=16, warm=4, test=4, rate=0.4, steps=3, batch=4, max_len=128, lr=1e-3,
                  lora_r=4, lora_alpha=8, warmup_samples=8, ramp_steps=1),
}
RESULTS = ROOT / "bench" / "results" / "real-noise"  # the repository keeps its results.json
QUICK_RESULTS = Path("runs/real_noise_quick")
# name -> train.py flags beyond the common ones; the three runs share data, seed, steps and batches
LOSS_RUN = "resure[turn,ema/winsorized]"              # the loss detector, named by what it changes
GAIN_RUN = "resure[turn,ema/winsorized,loss+gain]"    # and with the context-gain view
METHODS = {
    "sft": ["--method", "sft"],
    LOSS_RUN: ["--method", "resure", "--detector", "loss", "--warmup-data", "{warm}"],
    GAIN_RUN: ["--method", "resure", "--detector", "loss+gain", "--warmup-data", "{warm}"],
}


# ----------------------------------------------------------------------------------------- training
def train_argv(plan, model_dir, files, out, seed, flags):
    """train.py's command line of one run: the plan's settings, unit turn, ema / winsorized
    statistics; "{warm}" in flags stands for the clean warm-up file."""
    weighting = ["--floor-percentile", "5", "--stats-update", "winsorized",
                 "--ramp-steps", str(plan["ramp_steps"])]
    if "sft" in flags:  # train.py refuses flags that do nothing with --method sft
        weighting = []
    return ["--model", str(model_dir), "--data", str(files["train"]),
            "--eval-data", str(files["test"]), "--out", str(out), "--seed", str(seed),
            "--max-steps", str(plan["steps"]), "--batch-size", str(plan["batch"]),
            "--grad-accum", "1", "--lr", str(plan["lr"]), "--warmup-ratio", "0.05",
            "--lora-r", str(plan["lora_r"]), "--lora-alpha", str(plan["lora_alpha"]),
            "--lora-dropout", "0.05", "--max-len", str(plan["max_len"]), "--dtype", "fp32",
            "--unit", "turn", "--alpha", "1.0", "--stats", "ema", *weighting,
            "--warmup-samples", str(plan["warmup_samples"]), "--group-by-length",
            "--record-units", "--log-every", "5", "--report-top", "5",
            *[str(files["warm"]) if f == "{warm}" else f for f in flags]]


def train_one(plan, model_dir, files, out, seed, flags):
    """One train.main run (resumed, or skipped when out holds it finished); its log goes to
    out/train.log. Returns its wall seconds."""
    os.makedirs(out, exist_ok=True)
    log = io.StringIO()
    t0 = time.time()
    with redirect_stdout(log):
        train.main(train_argv(plan, model_dir, files, out, seed, flags))
    with open(Path(out) / "train.log", "a") as f:
        f.write(log.getvalue())
    return time.time() - t0


def final_eval(out):
    """The held-out per-turn loss train.py wrote at the end of a run (metrics.jsonl's last eval)."""
    with open(Path(out) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"eval"' in line]
    return str_keys(rows[-1]["eval"]) if rows else None


def str_keys(ev):
    """Per-turn depths as JSON has them, whether computed here or read back."""
    return dict(ev, per_turn={str(k): v for k, v in ev["per_turn"].items()})


def dialogue_losses(model_dir, adapter, examples, pad_id):
    """Loss per supervised token and token count of each held-out dialogue under the base model
    (adapter None) or a run's adapter (eval.load, merged): the pairs of the comparison with sft."""
    net, _ = load_model(str(model_dir), adapter)
    losses = []
    tokens = []
    for e in examples:
        overall = per_turn_loss(net, [e], pad_id=pad_id)["overall"]
        losses.append(overall["loss"])
        tokens.append(overall["tokens"])
    return {"loss": losses, "tokens": tokens}


# -------------------------------------------------------------------------------------------- speed
def step_overhead(model_dir, files, plan, out, steps=6, seed=0):
    """Per-step time of train.py's own train_step with --detector loss and --detector loss+gain on
    the same data and batches (same seed), built by train.build and stepped alternately (ABBA order,
    so that load drifts on a shared machine hit both alike); the first step of each is left out.
    Process CPU time is the measure that other processes' load does not inflate; wall time beside
    it."""
    made = {}
    for det in ("loss", "loss+gain"):
        argv = train_argv(plan, model_dir, files, Path(out) / f"speed-{det}", seed,
                          ["--method", "resure", "--detector", det, "--no-resume"])
        args = train.parse_args(argv)
        r = train.build(args, 0, 1, torch.device("cpu"), train.ReSURELoss())
        r.net.train()
        made[det] = r
    times = {det: {"cpu": [], "wall": []} for det in made}
    for s in range(steps + 1):
        for det in ("loss", "loss+gain") if s % 2 == 0 else ("loss+gain", "loss"):
            cpu = time.process_time()
            wall = time.perf_counter()
            train.train_step(made[det], s)
            if s:
                times[det]["cpu"].append(time.process_time() - cpu)
                times[det]["wall"].append(time.perf_counter() - wall)
    res = {}
    for det, d in times.items():
        res[det] = {k: float(np.median(v)) for k, v in d.items()} | {"steps": d["cpu"]}
    res["free_rows"] = free_row_cost(made["loss+gain"], files, range(1, steps + 1))
    for k in ("cpu", "wall"):
        res[f"overhead_{k}"] = res["loss+gain"][k] / res["loss"][k] - 1
    ratios = np.array(times["loss+gain"]["cpu"]) / np.array(times["loss"]["cpu"])
    res["overhead_cpu_paired"] = float(np.median(ratios) - 1)  # step by step: the same batch
    res.update(steps=steps, batch=plan["batch"], max_len=plan["max_len"],
               threads=torch.get_num_threads())
    return res


@torch.no_grad()
def free_row_cost(run, files, steps):
    """CPU seconds of the context-gain forward over the free rows of the given steps' batches,
    packed three ways: as data.collate pads them (every row to the batch's longest), sorted by
    length in chunks of 8 rows, and sorted with an explicit empty system message (templates that add
    a default system prompt to a conversation without one, SmolLM2's and Qwen2.5's, otherwise put it
    before every reply); with the tokens each processes."""
    convs = load_conversations(files["train"])
    tpl = run.template
    out = {k: {"cpu_s": 0.0, "tokens": 0, "real_tokens": 0}
           for k in ("padded", "sorted", "sorted_short")}
    for s in steps:
        exs = [run.examples[i] for i in run.sampler.indices(s)]
        padded = [(f[1], f[2]) for e in exs for f in e["free"]]
        short = sorted((short_row(convs, tpl, e, f[0]) for e in exs for f in e["free"]), key=len_0)
        rows = {"padded": [padded], "sorted": chunks(sorted(padded, key=len_0)),
                "sorted_short": chunks(short)}
        for k, batches in rows.items():
            cpu = time.process_time()
            for batch in batches:
                n, real = forward(run.net, tpl, batch)
                out[k]["tokens"] += n
                out[k]["real_tokens"] += real
            out[k]["cpu_s"] += time.process_time() - cpu
    for v in out.values():
        v["cpu_s_per_step"] = v["cpu_s"] / len(steps)
    return out


def len_0(r):
    return len(r[0])


def chunks(rows, size=8):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def short_row(convs, tpl, e, j):
    """Reply j of example e after an empty system message and an empty user turn: (ids, labels)."""
    reply = [m for m in convs[e["conv_index"]]["messages"] if m["role"] == "assistant"][j - 1]
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
    enc = tpl.encode(empty + [{**reply, "train": True}])
    return enc["input_ids"], enc["labels"]


def forward(net, tpl, rows):
    """One padded batch of (ids, labels) rows through net: (tokens processed, real tokens)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tpl.pad_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    net.token_losses(ids, labels, mask)
    return ids.numel(), int(mask.sum())


# ------------------------------------------------------------------------------------------ the run
def cached(path, key, compute):
    """compute() saved as JSON at path with its key; reused while the key (the settings) is the
    same."""
    if Path(path).is_file():
        saved = json.loads(Path(path).read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    Path(path).write_text(json.dumps({"key": key, "value": value}, default=float))
    return value


def json_default(x):
    return float(x) if isinstance(x, (np.floating, np.integer)) else str(x)


class Data:
    """One seed's files and examples: the noisy training set, the clean warm-up and held-out sets.
    """

    def __init__(self, plan, model_dir, out, seed, path):
        train_set, warm, test = split(load_mtbench101(path),
                                      [plan["train"], plan["warm"], plan["test"]], seed)
        self.noisy = inject(train_set, plan["rate"], KINDS, seed)
        self.warm = warm
        self.test = test
        self.files = {"train": out / "train.jsonl", "warm": out / "warm.jsonl",
                      "test": out / "heldout.jsonl"}
        for k, convs in (("train", self.noisy), ("warm", warm), ("test", test)):
            save_jsonl(convs, self.files[k])
        self.tpl = ChatTemplate.from_pretrained(model_dir)
        self.examples, self.report = build_examples(self.noisy, self.tpl, plan["max_len"], None,
                                                    free=True)
        self.warm_examples = build_examples(warm, self.tpl, plan["max_len"], None, free=True)[0]
        self.test_examples = build_examples(test, self.tpl, plan["max_len"], None)[0]


def base_model_scores(plan, model_dir, out, seed, data, path):
    """The base model's scores of the training and warm-up turns and its held-out loss, cached in
    OUT/base_scores.json while the settings stay the same."""
    key = {"plan": plan, "seed": seed, "model": str(Path(model_dir).resolve()),
           "data": str(path or MTBENCH101)}

    def score():
        net = M.Transformer.from_pretrained(model_dir)
        cpu = time.process_time()
        heldout = per_turn_loss(net, data.test_examples, pad_id=data.tpl.pad_id)
        scores = {"train": base_scores(net, data.tpl, data.examples),
                  "warm": base_scores(net, data.tpl, data.warm_examples),
                  "heldout": str_keys(heldout)}
        return dict(scores, cpu_s=time.process_time() - cpu)
    return cached(out / "base_scores.json", key, score)


def run(model_dir, out_dir, seed=0, quick=False, *, data=None, extra=None, sweep=True,
        overhead_steps=0):
    """The whole experiment (module docstring) -> results dict, also written to out_dir/results.json
    and .md. data: the MT-Bench-101 jsonl (default ../shared/fixtures); extra: {name: train.py
    flags} more runs beside METHODS ("{warm}" in the flags stands for the clean warm-up file);
    sweep: replay gain bands on the loss+gain run's stream; overhead_steps > 0: also time
    train_step with both detectors."""
    plan = dict(PRESETS["quick" if quick else "cpu"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cpu0 = time.process_time()
    d = Data(plan, model_dir, out, seed, data)
    base = base_model_scores(plan, model_dir, out, seed, d, data)
    res = summary(plan, model_dir, seed, data, d, base)
    for name, flags in {**METHODS, **(extra or {})}.items():
        res["runs"][name] = train_and_measure(plan, model_dir, out, seed, d, name, flags, res)
    warm_scores = (base["warm"]["loss"], base["warm"]["group"], base["warm"]["gain"])
    if sweep and GAIN_RUN in res["runs"]:
        res["replay"] = replay_sweep(run_folder(out, GAIN_RUN), d.examples, plan, warm_scores)
    if overhead_steps:
        res["overhead"] = step_overhead(model_dir, d.files, plan, out / "speed", overhead_steps,
                                        seed)
    loss_flags = res["runs"][LOSS_RUN]["flagging"]
    res["acceptance"] = {name: acceptance(r["flagging"], loss_flags)
                         for name, r in res["runs"].items()
                         if name != LOSS_RUN and "flagging" in r and "gain" in r["flagging"]}
    comps = heldout_family(res["heldout_dialogues"])
    res["comparisons"] = {"held-out loss vs sft": [dict(asdict(c), resolved=c.resolved)
                                                   for c in comps]}
    res["time"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=json_default))
    (out / "results.md").write_text(markdown(res))
    figure(out, res)
    return res


def summary(plan, model_dir, seed, path, d, base):
    """The results dict before the runs: settings, data, what the base model's scores see."""
    kinds = [k for _, _, k in unit_labels(d.examples)]  # the turns train.py keeps (max_len cuts)
    settings = dict(plan, seed=seed, model=str(model_dir), unit="turn", stats="ema/winsorized",
                    kinds=list(KINDS), data=str(path or MTBENCH101),
                    torch_threads=torch.get_num_threads())
    data = {"train_dialogues": len(d.noisy), "train_examples": len(d.examples),
            "build": d.report.summary(), "turns": len(kinds),
            "by_kind": {k: kinds.count(k) for k in ("clean", *KINDS)},
            "warm_dialogues": len(d.warm), "heldout_dialogues": len(d.test)}
    return {"settings": settings, "data": data, "detectability": detectability(base["train"]),
            "base_score_cpu_s": base["cpu_s"], "heldout": {"base": base["heldout"]},
            "heldout_dialogues": {}, "runs": {}}


def run_folder(out, name):
    """A run's folder: its name with the characters a path cannot hold (/ and :) as _."""
    return out / "runs" / name.replace("/", "_").replace(":", "_")


def train_and_measure(plan, model_dir, out, seed, d, name, flags, res):
    """One run trained (or found finished), its held-out loss (overall, per turn and per dialogue)
    put into res, and its record: flags, wall and CPU seconds, flagging unless it is sft."""
    folder = run_folder(out, name)
    cpu = time.process_time()
    wall = train_one(plan, model_dir, d.files, folder, seed, flags)
    r = {"flags": flags, "wall_s": wall, "cpu_s": time.process_time() - cpu}
    res["heldout"][name] = final_eval(folder)
    res["heldout_dialogues"][name] = dialogue_losses(model_dir, folder / "adapter",
                                                     d.test_examples, d.tpl.pad_id)
    if "sft" not in flags:
        r["flagging"] = flagging(folder, d.examples, gain="loss+gain" in flags)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default: bench/results/real-noise; --quick: "
                                 "runs/real_noise_quick)")
    p.add_argument("--quick", action="store_true", help="the CI-sized preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model",
                   help="Hugging Face folder (default: SmolLM2-135M-Instruct, support/smollm2.py)")
    p.add_argument("--data", help="MT-Bench-101 jsonl (default: ../shared/fixtures)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help='another run, e.g. "gain-a3=--method resure --detector loss+gain '
                        '--gain-alpha 3"; {warm} stands for the clean warm-up file')
    p.add_argument("--no-sweep", action="store_true", help="skip the gain-band replay")
    p.add_argument("--overhead-steps", type=int, default=0,
                   help="also time train_step with both detectors")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra = {}
    for e in a.extra:
        name, _, flags = e.partition("=")
        if not name or not flags:
            p.error(f"--extra {e!r}: expected NAME=FLAGS")
        extra[name] = flags.split()
    model = a.model
    if model is None:
        from support.smollm2 import prepare_smollm2
        model = prepare_smollm2()
    out = a.out or (QUICK_RESULTS if a.quick else RESULTS)
    res = run(model, out, a.seed, a.quick, data=a.data, extra=extra, sweep=not a.no_sweep,
              overhead_steps=a.overhead_steps)
    print((Path(out) / "results.md").read_text())
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one line
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"real_noise.py: error: {first_line}", file=sys.stderr)
        sys.exit(2)
