"""Command-line checks that train.py, eval.py and the tools share: number ranges, devices, output
paths; then train.py's flags (train_parser), a flag that does nothing beside another refused."""
import argparse
import math
import os
import sys

import torch


class UsageError(ValueError):
    """Bad input: a missing or malformed file, an impossible setting; the message is one line."""


def num(kind, lo, hi=None, lo_ok=True, hi_ok=False):
    """An argparse type: a finite number of `kind` in its range, else one line naming the range.
    lo_ok / hi_ok: whether the range includes lo / hi; hi None: no upper end."""
    def parse(text):
        v = kind(text)
        if not (math.isfinite(v) and above(v, lo, lo_ok) and below(v, hi, hi_ok)):
            bounds = describe(lo, hi, lo_ok, hi_ok)
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def above(v, lo, inclusive):
    if inclusive:
        return v >= lo
    return v > lo


def below(v, hi, inclusive):
    if hi is None:
        return True
    if inclusive:
        return v <= hi
    return v < hi


def describe(lo, hi, lo_ok, hi_ok):
    """The range in words: ">= 0", "> 0 and < 1", ..."""
    text = f"{'>=' if lo_ok else '>'} {lo}"
    if hi is not None:
        text += f" and {'<=' if hi_ok else '<'} {hi}"
    return text


def check_paths(device=None, out=None, inputs=()):
    """Before any work: the device exists here, --out can be written and is none of the input
    files."""
    try:
        if device is not None:
            kind = torch.empty(0, device=device).device.type
            if kind not in ("cpu", "cuda", "mps"):
                raise RuntimeError("not a compute device")
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device}: not usable here "
                         f"({str(e).splitlines()[0][:100]})") from None
    if not out:
        return
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: its folder cannot be made ({e.strerror})") from None
    is_input = any(i and os.path.exists(out) and os.path.exists(i) and os.path.samefile(out, i)
                   for i in inputs)
    if os.path.isdir(out) or not os.access(folder, os.W_OK) or is_input:
        raise UsageError(f"--out {out}: is a folder, is not writable, or is an input file")


def run_main(main, prog, interrupted):
    """main() as a program's exit code: bad input (ValueError, OSError, ...) is one line on stderr
    and 2, Ctrl-C the line `interrupted` and 130."""
    try:
        main()
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit 2 (no usage block first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def given_flags(parser, argv, args):
    """The settings (dests) that argv gives, not parser's defaults: argv parsed again into a
    namespace whose every setting is preset to a marker that only a given flag replaces; args:
    parser's first parse of argv."""
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


# -------------------------------------------------------------------------------------------------
# train.py's flags

POSITIVE = num(float, 0, lo_ok=False)
COUNT = num(int, 1, 10**9, hi_ok=True)
NONNEGATIVE = num(float, 0)
NONNEGATIVE_INT = num(int, 0, 10**9, hi_ok=True)


def train_parser(description):
    """train.py's flags, a setting left out None where train.py fills in the paper's (the demo's)
    value; description: its --help's first line."""
    p = Parser(prog="train.py", description=description,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", help="a Hugging Face folder (safetensors, tokenizer.json); none: the demo's")
    add("--data", help="training conversations (.jsonl or .json, OpenAI messages or ShareGPT)")
    add("--eval-data", help="held-out conversations for per-turn loss every --eval-every steps")
    add("--warmup-data", help="clean conversations to initialize the statistics (paper: 640)")
    add("--out", default="out", help="run folder: checkpoints, adapter, metrics, report")
    add("--chat-template", help="force a template (qwen2.5, smollm2, llama3, qwen3, chatml)")
    add("--on-bad-sample", choices=["error", "skip"], default="error")
    # the schedule and the optimizer
    add("--epochs", type=num(float, 0, 1e6, lo_ok=False, hi_ok=True), help="paper: 3")
    add("--max-steps", type=COUNT, help="optimizer steps (instead of --epochs)")
    add("--batch-size", type=COUNT, help="per device; paper: 4")
    add("--grad-accum", type=COUNT, help="paper: 4 (4 GPUs x 4 x 4 = 64)")
    add("--lr", type=POSITIVE, help="paper: 1e-5, cosine")
    add("--warmup-ratio", type=num(float, 0, 1), help="linear lr warm-up fraction; paper: 0.01")
    add("--weight-decay", type=NONNEGATIVE, default=0.0)
    add("--beta2", type=num(float, 0, 1, lo_ok=False), default=0.95)
    add("--grad-clip", type=NONNEGATIVE, default=1.0, help="max gradient norm; 0: no clipping")
    add("--max-len", type=num(int, 2, 10**9, hi_ok=True), help="tokens; longer: last turns cut")
    add("--seed", type=num(int, 0, 2**32 - 1, hi_ok=True), default=42)
    add("--dtype", choices=["fp32", "bf16", "fp16"], help="base weights, autocast; adapter: fp32")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="paper: on")
    add("--group-by-length", action="store_true", help="batch similar lengths: less padding")
    # LoRA
    add("--lora-r", type=num(int, 1, 65536, hi_ok=True), help="paper: 128")
    add("--lora-alpha", type=POSITIVE, help="paper: 16")
    add("--lora-dropout", type=num(float, 0, 1), help="paper: 0.3")
    # ReSURE
    add("--method", choices=["resure", "sft", "global", "hard"], default="resure",
        help="sft: every weight 1 (Vicuna-style tuning); global, hard: ablations of this project")
    add("--unit", choices=["dialogue", "turn"], help="what one loss l_s is (paper: dialogue)")
    add("--loss-norm", choices=["sample", "token"], default="sample", help="per unit (paper)")
    add("--alpha", type=NONNEGATIVE, help="tau = mu + alpha * sigma (Eq. 5); paper: 1.0")
    add("--floor-percentile", type=num(float, 0, 100, hi_ok=True),
        help="eps = this percentile of one gathered micro-batch's weights (Eq. 6); paper: 5")
    add("--floor-over", choices=["all", "flagged"], default="all",
        help="the weights eps is a percentile of: every unit's, or the flagged units' only")
    add("--warmup-samples", type=NONNEGATIVE_INT, help="units before detection; paper: 640")
    add("--ramp-steps", type=NONNEGATIVE_INT, help="steps over which down-weighting grows")
    add("--max-turn-groups", type=NONNEGATIVE_INT, default=0,
        help="deeper turns share the last one; 0: one group per depth")
    add("--stats", choices=["welford", "ema", "window", "mad"], help="paper: welford")
    add("--stats-update", choices=["reliable", "winsorized", "all"], help="paper: reliable")
    add("--ema-decay", type=num(float, 0, 1, lo_ok=False), default=0.05)
    add("--window", type=num(int, 2, 10**9, hi_ok=True), default=256)
    add("--detector", choices=["loss", "loss+gain"], default="loss", help="loss: the paper; "
        "loss+gain: also a context gain outside mu_g +- gain_alpha sigma_g (ours; its band needs "
        "tracking statistics, --stats ema --stats-update winsorized: docs/method.md)")
    add("--gain-alpha", type=POSITIVE, default=2.0, help="the gain band's half-width in sigmas")
    add("--prefilter-keep", type=num(float, 0, 1, lo_ok=False, hi_ok=True), default=1.0,
        help="static baseline: train on this fraction only")
    add("--prefilter-scores", help="quality scores, one per conversation (higher is better), "
        "instead of the base model's loss: a number per line, or JSON lines {\"id\", \"score\"}")
    # the run folder and the reports
    add("--record-units", action="store_true", help="every unit's loss, tau, weight: units.jsonl")
    add("--log-every", type=COUNT, default=10)
    add("--eval-every", type=NONNEGATIVE_INT, default=0, help="0: only at the end")
    add("--save-every", type=NONNEGATIVE_INT, default=0, help="0: only at the end")
    add("--resume", action="store_true", help="require a checkpoint (one found resumes anyway)")
    add("--no-resume", action="store_true", help="start over, every time (a job a scheduler "
        "may requeue leaves it out): an earlier run in --out is moved aside first")
    add("--allow-changed-config", action="store_true", help="resume with a setting changed")
    add("--merge", action="store_true", help="also export a merged model to OUT/merged")
    add("--report-top", type=NONNEGATIVE_INT, default=20, help="samples listed in report.json")
    add("--demo-eval", type=NONNEGATIVE_INT, default=32, help="the demo's test dialogues")
    return p


def refuse_idle_flags(args, given):
    """A flag given where it does nothing is refused in one line naming both flags. With --method
    sft nothing is flagged, so what shapes flags and weights idles (the statistics and --alpha's
    tau are still logged); with hard, flagged units weigh 0 and nothing is floored."""
    sft = args.method == "sft"
    method = f"--method {args.method}"
    floorless = args.method in ("sft", "hard")
    idle = [  # (its setting, the flag, what it does nothing with, whether it is idle)
        ("detector", "--detector loss+gain", method, sft and args.detector == "loss+gain"),
        ("gain_alpha", "--gain-alpha", f"--detector {args.detector}", args.detector == "loss"),
        ("ema_decay", "--ema-decay", f"--stats {args.stats}", args.stats != "ema"),
        ("window", "--window", f"--stats {args.stats}", args.stats not in ("window", "mad")),
        ("floor_percentile", "--floor-percentile", method, floorless),
        ("floor_over", "--floor-over", method, floorless),
        ("ramp_steps", "--ramp-steps", method, sft),
        ("stats_update", "--stats-update", method, sft),
        ("prefilter_scores", "--prefilter-scores", "--prefilter-keep 1", args.prefilter_keep == 1),
        ("eval_every", "--eval-every", "no --eval-data", not args.eval_data),
        ("epochs", "--epochs", f"--max-steps {args.max_steps}", args.max_steps is not None),
        ("demo_eval", "--demo-eval", "--model or --data (no demo)", not args.demo),
    ]
    for setting, flag, beside, idles in idle:
        if setting in given and idles:
            raise UsageError(f"{flag} does nothing with {beside}: leave it out")


def check_model_and_data(args):
    """train.py's --model is a folder and its --data a file."""
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
