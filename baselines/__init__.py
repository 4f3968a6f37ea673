"""Baselines that answer unreliable supervision differently from ReSURE, built on the core (model, LoRA, data,
train.main, generation) and kept out of the seven core files:

    baselines/ilr.py       Iterative Label Refinement (arXiv 2501.07886): replace labels, retrain by SFT
    baselines/dpo.py       DPO on pairs sampled from the SFT model, preferred side chosen by the same feedback
    baselines/feedback.py  the comparators both use: oracle, sim:P, format, local:DIR, http:NAME

Contract (what bench/noise.py relies on): each baseline's main(argv) -> report dict runs end to end and writes
    OUT/adapter       a LoRA adapter on --model in train.py's (PEFT) format: eval.load(--model, OUT/adapter) reads it
    OUT/report.json   the returned report, with
        "compute": integer counts of this run's work: trainings (train.main runs), optimizer_steps (summed over
                   them), train_tokens (tokens through forward + backward in training), generated_tokens (tokens
                   decoded), forward_tokens (tokens through forward-only passes: generation prompts, DPO reference
                   log-probs, a local judge's prompts), comparisons (comparator queries; each order of a pair is one)
        "label_accuracy": the training labels' exact-match accuracy against their references, per round (a list,
                   index = round; DPO keeps the labels, so one entry), null where the data has no references.
Training flags of train.py (python train.py --help) pass through to every train.main call; --method defaults to
sft. A training whose folder already holds the same finished run (same flags, same data bytes) is reused, not
redone, and its compute is read back from its compute.json. Runs in one process on one device (no torchrun).
"""
import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from eval import generate_texts, load  # noqa: E402
from lora import merge_lora  # noqa: E402
from support.cli import UsageError  # noqa: E402

COMPUTE_KEYS = ("trainings", "optimizer_steps", "train_tokens", "generated_tokens", "forward_tokens", "comparisons")


class BaselineError(ValueError):
    """Bad input to a baseline; the message is one line naming the file or flag."""


def new_compute():
    return dict.fromkeys(COMPUTE_KEYS, 0)


def add_compute(total, part):
    for k, v in part.items():
        total[k] = total.get(k, 0) + int(v)


def write_json(obj, path):
    """Indented JSON written under a temporary name and renamed into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def training_args(model, data, rest, method="sft"):
    """Validate the pass-through training flags with train.py's own parser (its error as one line of ours) and
    return (argv prefix for train.main without --out, parsed args). --method defaults to `method`."""
    own_method = any(a == "--method" or a.startswith("--method=") for a in rest)
    argv = ["--model", str(model), "--data", str(data), *(() if own_method else ("--method", method)), *rest]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = train.parse_args([*argv, "--out", os.devnull])
    except SystemExit:  # train.py's parser printed one line: give it as ours
        msg = err.getvalue().strip().splitlines()[-1].removeprefix("train.py: error: ")
        raise BaselineError(f"training flags: {msg.removesuffix(' (see --help)')} (see python train.py --help)") \
            from None
    except UsageError as e:
        raise BaselineError(f"training flags: {e}") from None
    return argv, args


class Parser(argparse.ArgumentParser):
    """argparse whose errors are BaselineErrors (one line, no usage block), so main(argv) can be called too."""

    def error(self, message):
        raise BaselineError(f"{message} (see --help)")


def parser(prog, doc):
    """The flags every baseline shares; any flag it does not know is a training flag (parse_known_args)."""
    p = Parser(prog=prog, description=doc.split("\n")[0],
               epilog="Any other flag is a training flag of train.py (python train.py --help), given to every "
                      "training.")
    p.add_argument("--model", required=True, help="Hugging Face folder")
    p.add_argument("--data", required=True, help="training conversations (the unreliable demonstrations)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--feedback", help="oracle, sim:P, format, local:DIR or http:NAME (baselines/feedback.py)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer")
    p.add_argument("--gen-batch-size", type=int, default=16)
    return p


def check_inputs(model, data):
    if not os.path.isdir(model):
        raise BaselineError(f"--model {model}: not a folder")
    if not os.path.isfile(data):
        raise BaselineError(f"--data {data}: no such file")


class CountedSFT(train.ReSURELoss):
    """train.py's own objective, counting the tokens it trains on (compute accounting only)."""

    def __init__(self):
        self.compute = {"train_tokens": 0}

    def loss(self, run, b, k, totals):
        self.compute["train_tokens"] += int(b["attention_mask"].sum())
        return super().loss(run, b, k, totals)


def set_flag(argv, flag, value):
    """A copy of argv with the value after `flag` replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


def train_run(argv, data, out, compute, objective=None, log=print):
    """One train.main run on `data` into `out` (argv: training_args' prefix). Returns the trained net with its
    adapter merged, in eval mode (loaded from out/adapter when `out` already held this run, finished)."""
    objective = objective or CountedSFT()
    argv = set_flag(argv, "--data", data)
    run = train.main([*argv, "--out", str(out)], objective=objective)
    steps = json.loads((Path(out) / "report.json").read_text())["steps"]
    record = Path(out) / "compute.json"
    if run is not None:
        write_json({"optimizer_steps": steps, **objective.compute}, record)
        net = merge_lora(run.net).eval()
    else:
        net = load(argv[argv.index("--model") + 1], Path(out) / "adapter", device=device())[0]
    done = json.loads(record.read_text()) if record.is_file() else {"optimizer_steps": steps}
    add_compute(compute, {"trainings": 1, **done})
    log(f"trained {out}: {steps} steps")
    return net


def device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def generate(net, template, prompts, compute, batch_size=16, max_new_tokens=64, temperature=0.0, top_p=1.0,
             seed=None):
    """eval.generate_texts with its work counted: prompt tokens as forward tokens, new tokens as generated."""
    if not prompts:
        return []
    texts, n_new = generate_texts(net, template, prompts, batch_size, max_new_tokens, temperature, top_p, seed)
    add_compute(compute, {"generated_tokens": n_new, "forward_tokens": sum(map(len, prompts))})
    return texts


def label_positions(convs):
    """(conversation, message) index of every trained assistant turn, i.e. every label ("train": false is context)."""
    return [(ci, mi) for ci, c in enumerate(convs) for mi, m in enumerate(c["messages"])
            if m["role"] == "assistant" and m.get("train", True)]


def label_accuracy(convs, targets=None):
    """Exact-match accuracy of the labels against their references (evaluation only); None without references."""
    from baselines.feedback import reference
    from eval import answer_matches
    pairs = [(c["messages"][mi]["content"], reference(c["messages"][mi]))
             for c, mi in ((convs[ci], mi) for ci, mi in (targets or label_positions(convs)))]
    pairs = [(x, r) for x, r in pairs if r is not None]
    return sum(answer_matches(x, r) for x, r in pairs) / len(pairs) if pairs else None


def cli(prog, main, argv=None):
    """Run main(argv, default sys.argv[1:]) as a command: bad input of every kind is one line on stderr, exit 2;
    Ctrl-C is one line, exit 130."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the same command, rerun, continues from what was saved", file=sys.stderr)
        sys.exit(130)
