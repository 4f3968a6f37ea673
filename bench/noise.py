"""The noise experiment: does ReSURE keep a model from getting worse as its data grows noisier?
Plain SFT gets worse there (the paper's Table 4); how do ReSURE as the paper configures it, the
variants of its readings and the other ways of handling noisy labels compare with it?

    python bench/noise.py --cpu       # the answer on 2 CPU cores: 7 configurations x H, H+N+L x 5
                                      # seeds (70 runs, about 3.7 hours); resumes where it stopped
    python bench/noise.py --regime    # SFT alone on H and H+N+L at the --cpu settings
    python bench/noise.py --gpu       # one GPU, several runs at once (--jobs), 8 minutes on an H200
    python bench/noise.py --quick     # a short check on SmolLM2 (fewer seeds and dialogues)
    python bench/noise.py --tiny      # a tiny random model, seconds (CI; the numbers mean nothing)
    python bench/noise.py --report DIR    # results.md and the figures again, from DIR/results.json
    options: --model DIR --out DIR --seeds 1,2,3 --methods sft,resure --mixtures H,H+N+L --n N
             --epochs E --lr X --lora-r R --test N --jobs J --threads T --unit U --no-real ...

--cpu writes to bench/results/noise-cpu/, which the repository keeps: each finished run's
result.json and the summary results.json / results.md are tracked by git, the data and the runs'
logs are not (.gitignore). `python bench/tables.py` rewrites the experiment tables of README.md,
bench/README.md and docs/method.md from that results.json. Other presets write to runs/noise.

Cost of --cpu (SmolLM2-135M-Instruct, bf16, 2 torch threads on 2 idle AMD EPYC cores, from the
per-step time bench/README.md records for this regime, 4.7 s per optimizer step of 8 dialogues):
a run on H is 18 steps (about 1.4 minutes of training), on H+N+L 54 (about 4.2 minutes), and each
run's clean-test evaluation about 17 s; the 70 runs are 2,520 steps, about 3.3 hours of training
and 20 minutes of evaluation; the loss+gain detector adds about 15 % to its runs' steps (4
minutes), the data and the base model's scores about a minute per seed: about 3.7 hours in all.
Other work on the same cores stretches it in proportion: with a load average of 5 on 2 cores a
step took 40-60 s.

Data (bench/noise_data.py; support/synth.py, one benchmark per seed, with the echo kind added to its
default noise mix): tiers H (clean), N (injection rate 0.5 per turn, ~53 % noisy assistant turns),
L (0.9, ~78 %; --rate-n, --rate-l) hold the same dialogues with different injected noise. A
mixture adds data of falling quality, as in the paper's Table 4 (ordinal 1-4 in this order for
Spearman):
    H      = the H version of dialogue set A                        (n dialogues)
    H+N    = H of A + the N version of a disjoint set B             (2n)
    H+L    = H of A + the L version of a disjoint set C             (2n)
    H+N+L  = H of A + N of B + L of C                               (3n)
plus a disjoint clean warm-up set W (the paper's high-quality warm-up samples) and a clean test set.
Like the paper, a run trains `epochs` passes over its mixture (more data, more steps); every method
trains the same number of optimizer steps on a given mixture (--max-steps), so pre-filtered data is
passed over more often, and a relabeling baseline's final training has the same steps as SFT's (its
extra work is reported as compute).

Methods (bench/noise_run.py VARIANTS; each run is train.main(argv) or a baseline's main(argv)).
"resure" is the paper's configuration: one loss per dialogue (--unit dialogue), Welford over the
reliable losses, alpha 1, Eq. 6's floor the 5th percentile of every weight (--floor-over all), the
ramp, the statistics warmed up on W alone (--warmup-data, --warmup-samples 0). Every other variant
is named by what it changes; --cpu runs these seven:
    sft                                    every weight 1 (Vicuna-style tuning), dialogue units
    resure                                 the paper's configuration
    resure[turn]                           the paper's estimator on per-turn units (--unit turn)
    resure[turn,ema/winsorized]            per-turn units, tracking statistics (lag and collapse)
    hard                                   a flagged unit weighs 0 (an ablation of this project)
    resure[floor:flagged]                  Eq. 6's floor over the flagged units' weights only
    resure[turn,ema/winsorized,loss+gain]  the context-gain view beside the loss, per-turn units
                                           and the tracking statistics the view needs
and further: resure[ema/winsorized], resure[mad/all], resure[loss+gain], global, prefilter (keep
the 0.75 of the mixture with the lowest base-model loss, then sft), prefilter+resure (the paper's
Table 3 best), ilr[oracle], ilr[sim:0.8], ilr[naive], dpo, robustft (baselines/*.py, run when the
module exists). --unit sets every method's unit.
Measured per run: clean-test exact match (eval.accuracy, greedy, reference history) and per-turn
loss; flag precision / recall of every unit decision after the warm-up (units.jsonl) against the
injected labels, overall, per noise kind, per turn depth and per detector view; the training
compute; a relabeling baseline's own report; the run's train.py flags. Over seeds
(bench/noise_report.py): mean and sample std; a difference (to sft, to resure, or to the same
method on H) is paired by seed, with its 95 % t-interval and a Holm-adjusted p over the comparisons
of its table; Spearman between the mixture and the score over the per-mixture means, as the
paper's Table 4, and pooled over seeds beside it. The real-data part (dialogues with injected
noise kinds) is bench/real_noise.py's run(), called at the end.

Every run lives in OUT/runs/seed*/MIXTURE/METHOD/ and ends with result.json; a rerun of the same
command skips finished runs, so an interruption loses one run, not the table (bench/pool.py).
SIGINT / SIGTERM stop the experiment (and its workers) with one line; a method that fails is a row
that says so, and the experiment goes on. results.json / results.md are rewritten after every run;
noise.png, differences.png and resure_dynamics.png (matplotlib, optional) at the end and by
--report.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_report import percent  # noqa: E402
from data import ChatTemplate  # noqa: E402
from machine import cpu_info  # noqa: E402
from noise_data import MIXTURES, noise_kinds, prepare_seed  # noqa: E402
from noise_figures import plot  # noqa: E402
from noise_report import write_results  # noqa: E402
from noise_run import VARIANTS, cpu_seconds, make_job, run_job  # noqa: E402
from pool import dump, earlier_wall, finished, model_sha, run_jobs  # noqa: E402

# the paper's configuration, and the variants of its readings, each named by what it changes
PAPER_AND_VARIANTS = ("sft", "resure", "resure[turn]", "resure[turn,ema/winsorized]", "hard",
                      "resure[floor:flagged]", "resure[turn,ema/winsorized,loss+gain]")
CORE = ("sft", "resure", "resure[ema/winsorized]", "resure[mad/all]", "resure[loss+gain]", "hard",
        "prefilter", "prefilter+resure")
BASELINES = ("ilr[oracle]", "ilr[sim:0.8]", "ilr[naive]", "dpo", "robustft")
COMMON = dict(warmup=64, ramp=5, max_len=192, max_turns=4, new_tokens=16, echo=0.2, rate_n=0.5,
              rate_l=0.9, lora_dropout=0.05, warmup_ratio=0.05, jobs=1, threads=None,
              eval_batch=32, real=True, mixtures=MIXTURES, baseline_mixtures=MIXTURES)
# n: dialogues per tier; warm: clean warm-up dialogues; test: clean test dialogues per seed; epochs
# over the mixture's dialogues (steps = ceil(epochs * dialogues / batch), the same for every method)
PRESETS = {
    "tiny": dict(COMMON, seeds=[1, 2], n=6, warm=4, test=2, epochs=1, batch=4, lr=3e-3, lora_r=4,
                 lora_alpha=8, warmup=4, ramp=1, max_len=160, new_tokens=4, dtype="fp32",
                 real=False, methods=("sft", "resure", "resure[turn,ema/winsorized,loss+gain]",
                                      "prefilter+resure")),
    "quick": dict(COMMON, seeds=[1, 2], n=16, warm=16, test=24, epochs=3, batch=8, lr=1e-3,
                  lora_r=16, lora_alpha=32, dtype="fp32", real=False,
                  methods=("sft", "resure", "resure[ema/winsorized]", "resure[loss+gain]")),
    # lr 1e-3, LoRA alpha / r = 2, 9 epochs: a regime where the loss falls within a few dozen
    # steps and SFT has noisy replies to fit; the paper's configuration and six others on the
    # cleanest and the noisiest mixture, 5 seeds (bench/README.md)
    "cpu": dict(COMMON, seeds=[0, 1, 2, 3, 4], n=16, warm=32, test=48, epochs=9, batch=8, lr=1e-3,
                lora_r=16, lora_alpha=32, dtype="bf16", threads=2, real=False,
                mixtures=("H", "H+N+L"), baseline_mixtures=("H+N+L",),
                methods=PAPER_AND_VARIANTS),
    # the same steps per run as a 96 dialogues x 3 epochs sizing; not measured on a GPU
    "gpu": dict(COMMON, seeds=[1, 2, 3, 4, 5], n=32, warm=64, test=96, epochs=9, batch=16, lr=1e-3,
                lora_r=16, lora_alpha=32, dtype="bf16", jobs=12, threads=1, eval_batch=128,
                methods=CORE + BASELINES),
}
PRESETS["regime"] = dict(PRESETS["cpu"], methods=("sft",))
# where a preset writes unless --out says otherwise: the repository keeps --cpu's results
RESULTS = ROOT / "bench" / "results" / "noise-cpu"
OVERRIDES = (("n", int), ("warm", int), ("test", int), ("epochs", float), ("batch", int),
             ("lr", float), ("lora_r", int), ("lora_alpha", float), ("echo", float),
             ("rate_n", float), ("rate_l", float), ("jobs", int), ("threads", int),
             ("eval_batch", int), ("new_tokens", int))


class BenchError(ValueError):
    pass


# ----------------------------------------------------------------------------------------- the plan
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    presets = (("tiny", "a tiny random model, seconds (CI)"),
               ("quick", "a short check on SmolLM2"),
               ("regime", "sft alone on H and H+N+L at the --cpu settings: a drop to fix?"),
               ("cpu", "the answer on 2 CPU cores (about 3.7 hours idle; the default), "
                       "written to bench/results/noise-cpu"),
               ("gpu", "one GPU, --jobs runs at once (sized for 8 minutes on one H200)"))
    for name, text in presets:
        g.add_argument("--" + name, action="store_true", help=text)
    g.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # another name of --gpu
    g.add_argument("--report", metavar="DIR",
                   help="regenerate DIR/results.md and the figures from DIR/results.json")
    g.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)  # one run, its own process
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct; --tiny: a "
                                   "tiny random llama)")
    p.add_argument("--out", help="output folder (results.md, results.json, figures, runs; "
                                 "default: bench/results/noise-cpu for --cpu, else runs/noise)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the preset)")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--mixtures", help="comma-separated, from: " + ", ".join(MIXTURES))
    for key, kind in OVERRIDES:
        p.add_argument("--" + key.replace("_", "-"), type=kind, help="overrides the preset")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="overrides the preset")
    p.add_argument("--unit", choices=["turn", "dialogue"],
                   help="every method's unit (default: each method's own)")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="run bench/real_noise.py at the end (default: --gpu)")
    return p.parse_args(argv)


def names(text):
    """A comma-separated list's non-empty names; a comma inside [...] belongs to its name
    (resure[turn,ema/winsorized])."""
    out = [""]
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append("")
        else:
            out[-1] += char
    return [x.strip() for x in out if x.strip()]


def make_plan(a):
    """The preset with the command line's overrides, checked: one line on anything unknown."""
    chosen = [k for k in ("tiny", "quick", "regime", "gpu") if getattr(a, k)]
    preset = chosen[0] if chosen else "gpu" if a.full else "cpu"
    plan = dict(PRESETS[preset], preset=preset, unit=a.unit)
    for key in [k for k, _ in OVERRIDES] + ["dtype", "real"]:
        if getattr(a, key) is not None:
            plan[key] = getattr(a, key)
    if a.seeds:
        plan["seeds"] = [int(s) for s in a.seeds.split(",")]
    if a.methods:
        plan["methods"] = names(a.methods)
    if a.mixtures:
        plan["mixtures"] = names(a.mixtures)
    plan["methods"] = list(plan["methods"])
    plan["mixtures"] = [m for m in MIXTURES if m in plan["mixtures"]]
    unknown = [m for m in plan["methods"] if m not in VARIANTS]
    if unknown:
        raise BenchError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    unknown = [m for m in names(a.mixtures or "") if m not in MIXTURES]
    if unknown or not plan["mixtures"]:
        given = ", ".join(unknown) or "(none given)"
        raise BenchError(f"--mixtures: unknown {given} (known: {', '.join(MIXTURES)})")
    sizes = (plan["n"], plan["test"], plan["warm"], plan["jobs"])
    if min(sizes) < 1 or plan["epochs"] <= 0:
        raise BenchError("--n, --test, --warm and --jobs must be >= 1 and --epochs > 0")
    plan["kinds"] = noise_kinds(plan)
    return plan


def available(name):
    """Whether a method can run here: baselines/NAME.py must exist (they land separately)."""
    baseline = VARIANTS[name].get("baseline")
    return baseline is None or (ROOT / "baselines" / f"{baseline}.py").is_file()


def model_folder(a, out):
    """--model, else SmolLM2-135M-Instruct (prepared once), or for --tiny a tiny random llama that
    speaks its tokenizer."""
    if a.model is not None:
        return a.model
    from support.smollm2 import prepare_smollm2
    smollm2 = prepare_smollm2()
    if not a.tiny:
        return smollm2
    from machine import make_tiny_model
    return make_tiny_model(out / "tiny-model", tokenizer_dir=smollm2)


def output_folder(a, plan):
    """--out, else the preset's folder: bench/results/noise-cpu for --cpu, runs/noise otherwise."""
    if a.out is not None:
        return Path(a.out)
    if plan["preset"] == "cpu":
        return RESULTS
    return Path("runs/noise")


def machine_line(plan):
    threads = plan["threads"] or torch.get_num_threads()
    line = (f"{cpu_info()[0]}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} threads x {plan['jobs']} jobs")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


# ----------------------------------------------------------------------------------------- the jobs
def job_order(plan):
    """The cleanest and the noisiest mixture first, sft first on them (the regime check, and the
    reference of every paired difference), then the mixtures between, then the baselines: an
    experiment stopped early still holds its widest paired comparison on every seed."""
    ends = (plan["mixtures"][0], plan["mixtures"][-1])

    def key(job):
        return job["name"] in BASELINES, job["mixture"] not in ends, job["name"] != "sft"
    return key


def prepare(plan, out, methods, model_dir):
    """Every seed's data and base-model scores, and the jobs of every (seed, mixture, method):
    (jobs in the order they run, what results.json holds besides the runs)."""
    tpl = ChatTemplate.from_pretrained(model_dir)
    need_prefilter = any(VARIANTS[m].get("prefilter") for m in plan["methods"])
    jobs = []
    data = {}
    base = {}
    kept = {}
    for seed in plan["seeds"]:
        t0 = time.time()
        paths, data[seed], base[seed], pre = prepare_seed(out, seed, plan, model_dir, tpl,
                                                          need_prefilter)
        print(f"seed {seed}: data written, base model scored (clean-test accuracy "
              f"{100 * base[seed]['accuracy']:.1f}%, loss {base[seed]['loss']:.3f}) in "
              f"{time.time() - t0:.0f} s", flush=True)
        if pre:
            kept[seed] = pre
        others = [m for m in methods if m not in CORE + BASELINES]
        for phase in (CORE, BASELINES, others):
            for mix in plan["mixtures"]:
                for name in [m for m in methods if m in phase]:
                    if name in BASELINES and mix not in plan["baseline_mixtures"]:
                        continue
                    folder = name.replace("/", "_").replace(":", "_")
                    run_dir = out / "runs" / f"seed{seed}" / mix / folder
                    jobs.append(make_job(plan, name, seed, mix, paths, model_dir, run_dir))
    jobs.sort(key=job_order(plan))
    saved = {"plan": plan, "base": base, "data": data, "prefilter": kept,
             "runs_planned": len(jobs), "real": None}
    return jobs, saved


# ------------------------------------------------------------------------------------- the progress
class Progress:
    """One invocation's bookkeeping: the finished results, results.json and results.md rewritten
    after every run, and the wall time counted over every invocation of the same command."""

    def __init__(self, out, jobs, saved, started, cpu0, load0):
        self.out = out
        self.jobs = jobs
        self.saved = saved
        self.started = started
        self.cpu0 = cpu0
        self.load0 = load0
        self.results = {j["sig"]: r for j in jobs if (r := finished(j))}
        self.earlier = earlier_wall(out / "results.json") if self.results else (0.0, 0)
        self.todo = [j for j in jobs if j["sig"] not in self.results]
        self.todo_steps = sum(j["steps"] for j in self.todo)

    def save(self):
        """results.json, then results.md from it: (results.md's text, its report Context)."""
        elapsed = time.time() - self.started
        cpu_share = None
        if elapsed > 0:
            cpu_share = (cpu_seconds() - self.cpu0) / elapsed / (os.cpu_count() or 1)
        ordered = [self.results[j["sig"]] for j in self.jobs if j["sig"] in self.results]
        self.saved.update(results=ordered, wall_s=self.earlier[0] + elapsed,
                          invocations=self.earlier[1] + 1, this_wall_s=elapsed,
                          cpu_share=cpu_share,
                          load=f"{self.load0:.1f} at the start, {os.getloadavg()[0]:.1f} now")
        dump(self.saved, self.out / "results.json")
        saved = json.loads((self.out / "results.json").read_text())
        text, report = write_results(self.out, saved)
        self.saved.update(report.derived())  # for readers of results.json; --report recomputes it
        dump(self.saved, self.out / "results.json")
        return text, report

    def done(self, r):
        """A finished run: its line with an ETA (runs cost about their steps); everything saved."""
        self.results[r["sig"]] = r
        left = sum(j["steps"] for j in self.todo if j["sig"] not in self.results)
        elapsed = time.time() - self.started
        eta = elapsed / (self.todo_steps - left) * left / 60
        count = f"[{len(self.results)}/{len(self.jobs)}]"
        print(f"{count} {run_line(r)}, ETA {eta:.1f} min", flush=True)
        self.save()


def run_line(r):
    """One finished run in a line: accuracy, loss, flags, seconds; or its error."""
    line = f"seed {r['seed']} {r['mixture']:6s} {r['variant']:24s} "
    if "error" in r:
        return line + f"ERROR {r['error']}"
    line += f"acc {100 * r['accuracy']:5.1f}% loss {r['loss']:.3f}"
    flags = r.get("flagging", {}).get("all", {})
    if flags:
        precision = percent(flags["precision"])
        recall = percent(flags["recall"])
        line += f" flagged {flags['flagged']}/{flags['units']} P {precision} R {recall}"
    return line + f" | {r['train_s']:.0f}+{r['eval_s']:.0f} s"


# ------------------------------------------------------------------------------------------ the run
def run_real(plan, model_dir, out):
    """bench/real_noise.py's run(): its dict is kept whole in OUT/real/real.json, and results.json
    keeps its results.md (headings one level down) for this report."""
    folder = Path(out) / "real"
    kept = folder / "real.json"
    if not kept.is_file():
        import real_noise
        quick = plan["preset"] in ("tiny", "quick")
        try:
            res = real_noise.run(str(model_dir), str(folder), plan["seeds"][0], quick)
        except Exception as e:  # its failure is reported, the synthetic table stands
            first_line = str(e).splitlines()[0] if str(e) else ""
            return {"error": f"{type(e).__name__}: {first_line}"}
        dump(res, kept)
    md = folder / "results.md"
    if md.is_file():
        text = md.read_text()
    else:
        text = "```json\n" + kept.read_text()[:20000] + "\n```"
    lines = ["#" + line if line.startswith("#") else line for line in text.splitlines()]
    return {"out": str(folder), "markdown": "\n".join(lines)}


def report(out):
    """results.md and the figures from OUT/results.json alone."""
    f = Path(out) / "results.json"
    if not f.is_file():
        raise BenchError(f"--report {out}: no results.json there")
    saved = json.loads(f.read_text())
    text, report_context = write_results(out, saved)
    figures = plot(out, saved, report_context.summary, report_context.families)
    return text, figures


def experiment(a):
    """The experiment of the command line a: plan, data, every run not yet finished, report."""
    plan = make_plan(a)
    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    out = output_folder(a, plan)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(a, out)
    plan["model_name"] = Path(model_dir).name
    plan["model_id"] = model_sha(model_dir)
    machine = machine_line(plan)
    started = time.time()
    cpu0 = cpu_seconds()
    load0 = os.getloadavg()[0]
    missing = [m for m in plan["methods"] if not available(m)]
    if missing:
        print(f"note: not run, their baselines/*.py is not here yet: {', '.join(missing)}")
    methods = [m for m in plan["methods"] if m not in missing]
    print(f"noise.py {plan['preset']}: {machine}; load average {load0:.2f}")
    jobs, saved = prepare(plan, out, methods, model_dir)
    saved["machine"] = machine
    steps = {m: saved["data"][plan["seeds"][0]][m]["steps"] for m in plan["mixtures"]}
    shape = (f"{len(plan['seeds'])} seeds x {len(plan['mixtures'])} mixtures x {len(methods)} "
             f"methods ({', '.join(methods)})")
    print(f"plan: {len(jobs)} training runs = {shape}; steps per run {steps} (batch "
          f"{plan['batch']}, {plan['epochs']} epochs); {plan['n']} dialogues per tier; "
          f"{plan['test']} test dialogues; {plan['dtype']}; model {model_dir}; output {out}",
          flush=True)
    progress = Progress(out, jobs, saved, started, cpu0, load0)
    if progress.results:
        print(f"resuming: {len(progress.results)} of {len(jobs)} runs already finished in {out}",
              flush=True)
    try:
        run_jobs(progress.todo, plan["jobs"], run_job, progress.done)
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) else 130
        print(f"noise.py: stopped by a signal; {len(progress.results)} of {len(jobs)} runs are "
              f"finished in {out} and the same command goes on from there", file=sys.stderr,
              flush=True)
        sys.exit(code)
    if plan["real"]:
        saved["real"] = run_real(plan, model_dir, out)
    text, report_context = progress.save()
    saved = json.loads((out / "results.json").read_text())
    figures = plot(out, saved, report_context.summary, report_context.families)
    print("\n" + text)
    written = [out / "results.md", out / "results.json", *figures]
    print("written: " + ", ".join(str(p) for p in written))
    return {"results": progress.saved["results"], "summary": report_context.summary,
            "out": str(out)}


def main(argv=None):
    a = parse_args(argv)
    if a.report:
        text, figures = report(a.report)
        print(text)
        written = [Path(a.report) / "results.md", *figures]
        print("written: " + ", ".join(str(p) for p in written))
        return {"out": a.report}
    if a.worker:
        run_job(json.loads(Path(a.worker).read_text()))
        return None
    return experiment(a)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"noise.py: error: {e}", file=sys.stderr)
        sys.exit(2)
