"""Baselines that answer unreliable supervision differently from ReSURE, built on the core (model,
LoRA, data, train.main, generation) and kept out of the seven core files:

    baselines/ilr.py       Iterative Label Refinement (arXiv 2501.07886): replace labels, retrain
    baselines/dpo.py       DPO on pairs sampled from the SFT model, judged by the same feedback
    baselines/robustft.py  RobustFT (arXiv 2412.14922): detect and relabel, then fine-tune
    baselines/feedback.py  the comparators of ILR and DPO: oracle, sim:P, format, local, http

Contract (what bench/noise.py relies on): each baseline's main(argv) -> report dict runs end to end
and writes
    OUT/adapter       a LoRA adapter on --model in train.py's (PEFT) format, which
                      eval.load(--model, OUT/adapter) reads
    OUT/report.json   the returned report, with
        "compute": integer counts of this run's work: trainings (train.main runs),
            optimizer_steps (summed over them), train_tokens (tokens through forward + backward in
            training), generated_tokens (tokens decoded), forward_tokens (tokens through
            forward-only passes: generation prompts, DPO reference log-probs, a local judge's
            prompts), comparisons (comparator queries; each order of a pair is one)
        "label_accuracy": the training labels' exact-match accuracy against their references, per
            round (a list, index = round; DPO keeps the labels, so one entry), null where the data
            has no references.
Training flags of train.py (python train.py --help) pass through to every train.main call; --method
defaults to sft. Runs in one process on one device (no torchrun).

A run is never lost, as train.py's are not: every file is written whole under a temporary name and
renamed into place (support/runs.py's dump, or a folder built beside its place); each training is
train.main's, which resumes itself and reuses a finished run; every other step is recomputed, the
same on every run. So the same command, after an interruption anywhere, continues and ends as an
uninterrupted run would. A signal (SIGINT, SIGTERM) ends main with Stopped: exit 130 / 143 and one
line naming what was kept.
"""
import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from eval import generate_texts, load  # noqa: E402
from support import runs  # noqa: E402
from support.checkpoint import read_json  # noqa: E402
from support.cli import UsageError  # noqa: E402
from support.runs import SIGNAL_NAMES, Stopped, read_state, sigterm_exits, signal_code  # noqa: E402

COMPUTE_KEYS = ("trainings", "optimizer_steps", "train_tokens", "generated_tokens",
                "forward_tokens", "comparisons")


class BaselineError(ValueError):
    """Bad input to a baseline; the message is one line naming the file or flag."""


def new_compute():
    return dict.fromkeys(COMPUTE_KEYS, 0)


def add_compute(total, part):
    for key, value in part.items():
        total[key] = total.get(key, 0) + int(value)


# -------------------------------------------------------------------------------------------------
# Flags

def training_args(model, data, rest, method="sft"):
    """Validate the pass-through training flags with train.py's own parser (its error as one line
    of ours) and return (argv prefix for train.main without --out, parsed args). --method defaults
    to `method`."""
    own_method = any(a == "--method" or a.startswith("--method=") for a in rest)
    argv = ["--model", str(model), "--data", str(data)]
    if not own_method:
        argv += ["--method", method]
    argv += rest
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = train.parse_args([*argv, "--out", os.devnull])
    except SystemExit:  # train.py's parser printed one line: give it as ours
        message = err.getvalue().strip().splitlines()[-1]
        message = message.removeprefix("train.py: error: ").removesuffix(" (see --help)")
        raise BaselineError(f"training flags: {message} (see python train.py --help)") from None
    except UsageError as e:
        raise BaselineError(f"training flags: {e}") from None
    return argv, args


class Parser(argparse.ArgumentParser):
    """argparse whose errors are BaselineErrors (one line, no usage block), so main(argv) can be
    called too."""

    def error(self, message):
        raise BaselineError(f"{message} (see --help)")


def parser(prog, doc):
    """The flags ILR and DPO share; any flag it does not know is a training flag
    (parse_known_args)."""
    p = Parser(prog=prog, description=doc.split("\n")[0],
               epilog="Any other flag is a training flag of train.py (python train.py --help), "
                      "given to every training.")
    p.add_argument("--model", required=True, help="Hugging Face folder")
    p.add_argument("--data", required=True,
                   help="training conversations (the unreliable demonstrations)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--feedback",
                   help="oracle, sim:P, format, local:DIR or http:NAME (baselines/feedback.py)")
    p.add_argument("--max-queries", "--max-comparisons", dest="max_queries", type=int, default=0,
                   help="comparator queries at most, over the whole run (each order of a pair is "
                        "one; 0: no cap); report.json's compute.comparisons counts those asked")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer")
    p.add_argument("--gen-batch-size", type=int, default=16)
    return p


def check_inputs(model, data):
    if not os.path.isdir(model):
        raise BaselineError(f"--model {model}: not a folder")
    if not os.path.isfile(data):
        raise BaselineError(f"--data {data}: no such file")


def set_flag(argv, flag, value):
    """A copy of argv with the value after `flag` replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


# -------------------------------------------------------------------------------------------------
# Trainings through train.main, counted

class Counted:
    """What a baseline's train.main objective adds: its run's counts in OUT/compute.json. They are
    known at the first micro-batch (train.py's sampler fixes every later one) and written then,
    before any step, so a run that finishes has them however often it was interrupted."""
    record = None          # the run folder's compute.json (set by train_run)
    pending = False        # the record is still to be written by this train.main call

    def start(self, record):
        self.record = record
        self.pending = True

    def tokens(self, example):
        """Tokens of one example through forward and backward."""
        return len(example["input_ids"])

    def run_counts(self, run):
        """The whole run's counts: optimizer steps and the tokens of every micro-batch."""
        tokens = 0
        for m in range(run.total * run.args.grad_accum):
            tokens += sum(self.tokens(run.examples[i]) for i in run.sampler.indices(m))
        return {"optimizer_steps": run.total, "train_tokens": tokens}

    def write_record(self, run):
        if self.pending:
            runs.dump(self.run_counts(run), str(self.record))
            self.pending = False


class CountedLoss(Counted, train.ReSURELoss):
    """train.py's own objective (any --method), its work counted."""

    def loss(self, run, b, k, totals):
        self.write_record(run)
        return super().loss(run, b, k, totals)


def train_run(argv, data, out, compute, objective=None, log=print):
    """One train.main run on `data` into `out` (argv: training_args' prefix), its counts added to
    compute. A finished run is reused; one whose compute.json is missing or damaged is trained
    again from the start (--no-resume), the only way to count it."""
    objective = objective or CountedLoss()
    record = Path(out) / "compute.json"
    argv = [*set_flag(argv, "--data", data), "--out", str(out)]
    objective.start(record)
    train.main(argv, objective=objective)
    done = read_state(record, log)
    if done is None:
        log(f"{record}: absent or damaged, so {out} is trained again from the start to count it")
        objective.start(record)
        train.main([*(a for a in argv if a != "--resume"), "--no-resume"], objective=objective)
        done = read_json(record, BaselineError)
    add_compute(compute, {"trainings": 1, **done})
    log(f"trained {out}: {done['optimizer_steps']} steps")


def device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def trained_model(model, out, dtype):
    """The model train.py's run folder `out` trained, its adapter merged, in eval mode: read from
    its files in the training's --dtype, so that a run resumed after it finished sees the same
    model as one that trained it just now."""
    return load(model, Path(out) / "adapter", dtype, device())[0]


def generate(net, template, prompts, compute, batch_size=16, max_new_tokens=64, temperature=0.0,
             top_p=1.0, seed=None):
    """eval.generate_texts with its work counted: prompt tokens as forward tokens, new tokens as
    generated."""
    if not prompts:
        return []
    texts, n_new = generate_texts(net, template, prompts, batch_size, max_new_tokens,
                                  temperature, top_p, seed)
    add_compute(compute, {"generated_tokens": n_new, "forward_tokens": sum(map(len, prompts))})
    return texts


def label_positions(convs):
    """(conversation, message) index of every trained assistant turn, i.e. every label
    ("train": false is context)."""
    positions = []
    for ci, conv in enumerate(convs):
        for mi, message in enumerate(conv["messages"]):
            if message["role"] == "assistant" and message.get("train", True):
                positions.append((ci, mi))
    return positions


def label_accuracy(convs, targets=None):
    """Exact-match accuracy of the labels against their references (evaluation only); None
    without references."""
    from baselines.feedback import reference
    from eval import answer_matches
    right = []
    for ci, mi in targets or label_positions(convs):
        message = convs[ci]["messages"][mi]
        ref = reference(message)
        if ref is not None:
            right.append(answer_matches(message["content"], ref))
    if not right:
        return None
    return sum(right) / len(right)


def cli(prog, main, argv=None):
    """Run main(argv, default sys.argv[1:]) as a command: bad input of every kind is one line on
    stderr, exit 2; a signal is one line, exit 130 / 143."""
    try:
        with sigterm_exits():
            main(sys.argv[1:] if argv is None else argv)
    except Stopped as e:
        print(f"{prog}: {e.line}", file=sys.stderr)
        sys.exit(e.code)
    except (ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as e:
        code = signal_code(e)
        if code is None:
            raise
        print(f"{prog}: stopped by {SIGNAL_NAMES[code]} before any work; the same command "
              "starts it", file=sys.stderr)
        sys.exit(code)
