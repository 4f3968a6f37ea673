"""See what ReSURE sees before training: every assistant turn of a dataset scored and judged.

    python scripts/audit.py --model DIR --data FILE --out DIR [--adapter DIR] [--unit turn|dialogue]
        [--stats mad|welford] [--stats-update all|reliable|winsorized] [--alpha 1] [--gain-alpha 2]
        [--batch-size 8] [--max-len 2048] [--chat-template NAME] [--dtype fp32|bf16]

Scoring, batch by batch, with the model (and adapter), no training: each unit's loss (Eq. 1: the
mean token loss of one reply, or of a dialogue's replies with --unit dialogue), its context gain
(resure.gain_of: the loss of the same reply tokens scored alone after an empty user turn, minus
their loss in the dialogue) and its turn group. Batches run longest first. OUT/scores.jsonl gets
one line per batch behind a header of the settings a score depends on: the same command run again
continues where an interrupted one stopped; another of those settings is refused (another --out
starts a new audit); other judging settings judge the same scores again.

Judging, over the whole dataset at once: ReSURE itself (resure.py, as train.py --detector
loss+gain sets it, warmed up and ramped in) weighs the dataset as one batch, its statistics per
turn group filled with welford.py's estimators, each group's values fed in ascending order, so no
order of the file or the batches enters:
  --stats mad (the default): median and 1.4826 * MAD of every unit. Robust: the outliers the audit
      looks for barely move it; it needs no exclusion and no iteration, and does not collapse.
  --stats welford: mean and sample std. With --stats-update reliable (the paper's rule, its
      default) only the units at or under tau feed the statistics that make tau: iterated from
      "every unit" until no bound moves. With alpha = 1 that fixed point creeps towards the lowest
      losses (the collapse resure.py watches for); a group with over half of its units flagged
      gets a warning line. winsorized: flagged values enter as the bound; all: every unit.
A unit is flagged when its loss is above tau = mu + alpha * sigma (Eq. 5), or its gain outside
mu_g -+ gain_alpha * sigma_g. Above the band is echo-like: a reply that copies its context is easy
to predict in the dialogue and hard alone. Below it is off-topic-like: the dialogue does not help
predict the reply. The weight is Eq. 6 (resure.weight_rule), the gain view's exp(-d / h) where
lower, and the floor eps over the whole dataset, as ReSURE takes it over one gathered batch.

Writes OUT/units.jsonl (a line per unit, by dialogue then turn), OUT/report.json, OUT/report.md and
a picture per group where matplotlib is installed (scripts/audit_report.py). Memory: the model, one
batch's tokens and activations, the conversations' text and a few numbers per unit.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import Report, build_examples, collate  # noqa: E402
from eval import load  # noqa: E402
from resure import ReSURE, unit_losses  # noqa: E402
from scripts import audit_report  # noqa: E402
from support.cli import UsageError, check_paths, num  # noqa: E402
from support.conversations import load_conversations  # noqa: E402
from train import autocast_context, context_gain  # noqa: E402

SCORES = "scores.jsonl"
PLAN_CHUNK = 256          # conversations encoded at once to measure their lengths
MAX_ROUNDS = 200          # fixed-point rounds of the statistics
PROGRESS_EVERY_S = 5.0
# What a score depends on: a rerun into the same --out must have the same.
SCORING = ("model_fingerprint", "adapter_sha256", "data_sha256", "on_bad_sample", "chat_template",
           "unit", "max_len", "max_turn_groups", "dtype", "batch_size")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while scoring; the message says how much is kept."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line from cli(), not argparse's usage block
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(prog="scripts/audit.py", description=__doc__.split("\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", required=True, help="Hugging Face folder (config.json, safetensors, tokenizer)")
    add("--data", required=True, help="conversations (.jsonl / .json, OpenAI messages or ShareGPT)")
    add("--out", required=True, help="folder: scores.jsonl, units.jsonl, report.json, report.md")
    add("--adapter", help="LoRA adapter folder (PEFT format), merged into the model")
    add("--unit", choices=["turn", "dialogue"], default="turn", help="a loss per turn or dialogue")
    add("--stats", choices=["mad", "welford"], default="mad", help="median / MAD or mean / std")
    add("--stats-update", choices=["all", "reliable", "winsorized"],
        help="which units feed the statistics (default: all for mad, reliable for welford)")
    add("--alpha", type=num(float, 0), default=1.0, help="tau = mu + alpha * sigma (Eq. 5)")
    add("--gain-alpha", type=num(float, 0), default=2.0, help="the gain band's half-width, sigmas")
    add("--floor-percentile", type=num(float, 0, 100, hi_ok=True), default=5.0, help="Eq. 6's eps")
    add("--floor-over", choices=["all", "flagged"], default="all",
        help="eps over every unit's weight (the literal reading) or the flagged units' only")
    add("--min-count", type=num(int, 2, 10**9, hi_ok=True), default=2,
        help="a group with fewer units has no threshold")
    add("--max-turn-groups", type=num(int, 0, 10**9, hi_ok=True), default=0,
        help="deeper turns share the last group; 0: one group per depth")
    add("--batch-size", type=num(int, 1, 10**6, hi_ok=True), default=8)
    add("--max-len", type=num(int, 2, 10**9, hi_ok=True), default=2048,
        help="tokens; a longer dialogue loses its trailing turns")
    add("--chat-template", help="force a template (qwen2.5, smollm2, llama3, qwen3, chatml)")
    add("--dtype", choices=["fp32", "bf16"], default="fp32")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--on-bad-sample", choices=["error", "skip"], default="error")
    add("--top", type=num(int, 0, 10**6, hi_ok=True), default=20, help="suspects in the report")
    args = p.parse_args(argv)
    if args.stats_update is None:
        args.stats_update = "reliable" if args.stats == "welford" else "all"
    return args


def check_inputs(args):
    """One line naming the flag, before any work."""
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
    if args.adapter and not os.path.isdir(args.adapter):
        raise UsageError(f"--adapter {args.adapter}: not a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    check_paths(args.device)


def sha256_of(paths):
    """One hash over the files' names and bytes."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def settings_of(args, net, template):
    """OUT/scores.jsonl's header: what a score depends on (SCORING), and the paths for a reader."""
    adapter = None
    adapter_files = []
    if args.adapter:
        adapter = os.path.abspath(args.adapter)
        adapter_files = sorted(str(p) for p in Path(args.adapter).iterdir() if p.is_file())
    return {"model": os.path.abspath(args.model), "model_fingerprint": net.fingerprint,
            "adapter": adapter, "adapter_sha256": sha256_of(adapter_files) if adapter else None,
            "data": os.path.abspath(args.data), "data_sha256": sha256_of([args.data]),
            "on_bad_sample": args.on_bad_sample, "chat_template": template.name,
            "unit": args.unit, "max_len": args.max_len, "max_turn_groups": args.max_turn_groups,
            "dtype": args.dtype, "batch_size": args.batch_size}


# --- scoring -----------------------------------------------------------------------------------
def plan_batches(convs, template, args):
    """(batches of conversation indices, token lengths, the encoding Report): longest first, ties
    by position, so padding is small and a rerun makes the same batches. Conversations are encoded
    PLAN_CHUNK at a time and only their lengths kept."""
    lengths = np.zeros(len(convs), dtype=np.int64)
    counts = {}
    for start in range(0, len(convs), PLAN_CHUNK):
        examples, rep = build_examples(convs[start:start + PLAN_CHUNK], template, args.max_len)
        for e in examples:
            lengths[start + e["conv_index"]] = len(e["input_ids"])
        for key, value in rep.items():
            counts[key] = counts.get(key, 0) + value
    counts["max_len"] = args.max_len
    order = np.lexsort((np.arange(len(convs)), -lengths))
    order = order[lengths[order] > 0]           # dropped: no supervised turn fits
    size = args.batch_size
    batches = [order[i:i + size].tolist() for i in range(0, len(order), size)]
    return batches, lengths, Report(counts)


def noise_labels(meta, turns, unit):
    """The unit's noise labels where the data has them: its turn's, or for a dialogue whether any
    of its supervised turns is noisy and their kinds."""
    if "noisy" not in meta and "noise_type" not in meta:
        return {}
    n = len(meta.get("noisy") or meta["noise_type"])
    flags = meta.get("noisy") or [None] * n
    kinds = meta.get("noise_type") or [None] * n
    if unit == "turn":
        return {"noisy": flags[turns[0] - 1], "noise_type": kinds[turns[0] - 1]}
    noisy = [k for k in turns if flags[k - 1]]
    return {"noisy": bool(noisy),
            "noise_type": sorted({str(kinds[k - 1]) for k in noisy if kinds[k - 1]})}


def json_float(x):
    """x as a JSON number, None for NaN and infinities."""
    x = float(x)
    if math.isfinite(x):
        return x
    return None


@torch.no_grad()
def score_batch(net, amp, template, convs, indices, args):
    """One batch's units: dialogue, id, turn, turns, group, tokens, loss, gain, noise labels."""
    chosen = [convs[i] for i in indices]
    examples, _ = build_examples(chosen, template, args.max_len, args.max_turn_groups or None,
                                 free=True)
    device = next(net.parameters()).device
    b = {key: value.to(device) for key, value in collate(examples, template.pad_id).items()}
    with amp:
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"]).float()
    losses, groups, tokens, rows, turns = unit_losses(tok, b["labels"], b["turn_ids"], b["group"],
                                                      args.unit)
    gains = context_gain(net, amp, args.unit, b, losses, rows, turns)  # the replies alone
    if args.max_turn_groups:
        groups = groups.clamp(max=args.max_turn_groups)
    units = []
    for i in range(len(losses)):
        e = examples[int(rows[i])]
        covered = [int(turns[i])]
        if args.unit == "dialogue":
            covered = sorted({k for k, y in zip(e["turn_ids"], e["labels"]) if y != -100})
        units.append({"dialogue": indices[e["conv_index"]], "id": e["meta"].get("id"),
                      "turn": int(turns[i]), "turns": covered, "group": int(groups[i]),
                      "tokens": int(tokens[i]), "loss": json_float(losses[i]),
                      "gain": json_float(gains[i]), **noise_labels(e["meta"], covered, args.unit)})
    return units


def read_scores(path, settings, n_batches):
    """The batches OUT/scores.jsonl holds for these settings ([] for none). A last line cut short
    by an interruption is dropped: the file is truncated to the whole batches before it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if not lines[0].strip():  # made, but interrupted before its header was written
        os.truncate(path, 0)
        return []
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("audit") != "scores":
        raise UsageError(f"{path}:1: not an audit's scores header; give another --out")
    theirs = header.get("settings", {})
    changed = [k for k in SCORING if theirs.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise UsageError(f"--out {os.path.dirname(path)} holds the scores of another audit ({k}: "
                         f"{theirs.get(k)!r} there, {settings[k]!r} here); give another --out")
    batches = []
    kept = len(lines[0]) + 1
    for n, line in enumerate(lines[1:], 2):
        try:
            rec = json.loads(line)
        except ValueError:  # the torn last line of an interrupted write
            break
        expected = len(batches) < n_batches and isinstance(rec, dict)
        if not expected or rec.get("batch") != len(batches):
            raise UsageError(f"{path}:{n}: not batch {len(batches)} of {n_batches}; "
                             "give another --out")
        batches.append(rec["units"])
        kept += len(line) + 1
    os.truncate(path, kept)
    return batches


def append_line(f, obj):
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def progress(tokens, start, done, t0):
    """A line on stderr: batches, tokens, time, and the ETA at this run's rate."""
    seconds = time.time() - t0
    rate = tokens[start:done].sum() / max(seconds, 1e-9)
    eta = tokens[done:].sum() / rate if rate > 0 else math.inf
    print(f"audit: batch {done}/{len(tokens)}, {tokens[:done].sum()} of {tokens.sum()} tokens, "
          f"{seconds:.0f} s, eta {eta:.0f} s", file=sys.stderr)


def score_all(net, amp, template, convs, args, path, settings):
    """Every batch OUT/scores.jsonl lacks, appended a line per batch: (every unit, the Report)."""
    batches, lengths, report = plan_batches(convs, template, args)
    if not batches:
        raise UsageError(f"--data {args.data}: nothing to score ({report.summary()})")
    done = read_scores(path, settings, len(batches))
    print(f"data: {args.data}: {report.summary()}", file=sys.stderr)
    if 0 < len(done) < len(batches):
        print(f"audit: {path} holds {len(done)} of {len(batches)} batches; continuing",
              file=sys.stderr)
    elif done:
        print(f"audit: {path} holds every batch; judging them again", file=sys.stderr)
    tokens = np.array([lengths[b].sum() for b in batches])
    start = len(done)
    t0 = time.time()
    last = t0
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            append_line(f, {"audit": "scores", "settings": settings, "batches": len(batches)})
        try:
            for i in range(start, len(batches)):
                units = score_batch(net, amp, template, convs, batches[i], args)
                append_line(f, {"batch": i, "units": units})
                done.append(units)
                if time.time() - last >= PROGRESS_EVERY_S or i + 1 == len(batches):
                    progress(tokens, start, len(done), t0)
                    last = time.time()
        except KeyboardInterrupt:
            raise Interrupted(f"audit.py: interrupted; {path} keeps {len(done)} of "
                              f"{len(batches)} batches: the same command continues") from None
    return [u for units in done for u in units], report


# --- judging -----------------------------------------------------------------------------------
@dataclass
class Standing:
    """A turn group's statistics as the dataset is judged by them: the loss view (Eq. 5's mu,
    sigma, tau) and the gain view (mu_g, sigma_g, the band [lo, hi]); fed: values they hold."""
    mu: float
    sigma: float
    tau: float
    fed: int
    mu_g: float
    sigma_g: float
    lo: float
    hi: float
    fed_g: int

    def bounds(self):
        return self.tau, self.lo, self.hi


def new_resure(args, window):
    """ReSURE as train.py --detector loss+gain sets it, warmed up and ramped in."""
    return ReSURE(alpha=args.alpha, floor_percentile=args.floor_percentile, warmup_samples=0,
                  ramp_steps=0, min_count=args.min_count, stats=args.stats,
                  stats_update=args.stats_update, window=window, gain_alpha=args.gain_alpha,
                  floor_over=args.floor_over)


def filled(fed, args, window):
    """A fresh ReSURE whose statistics hold each group's fed (losses, gains), in ascending order."""
    rs = new_resure(args, window)
    for b, (losses, gains) in fed.items():
        for x in np.sort(losses):
            rs.stats.update(b, x)
        for x in np.sort(gains):
            rs.gain_stats.update(b, x)
    return rs


def standing_of(rs, b):
    loss = rs.stats[b]
    gain = rs.gain_stats[b]
    lo, hi = rs.gain_band(b)
    return Standing(loss.mean, loss.std, rs.tau(b), loss.count, gain.mean, gain.std, lo, hi,
                    gain.count)


def kept(losses, gains, bounds, update):
    """What a group's statistics are fed under bounds (tau, lo, hi), as ReSURE._update feeds."""
    tau, lo, hi = bounds
    if update == "reliable":
        return losses[losses <= tau], gains[(gains >= lo) & (gains <= hi)]
    if update == "winsorized":
        return np.minimum(losses, tau), np.clip(gains, lo, hi)
    return losses, gains


def close(a, b):
    """The same bound to within rounding (equal infinities included)."""
    return a == b or abs(a - b) <= 1e-12 * (1 + abs(b))


def settle(units, args):
    """(ReSURE holding the settled statistics, {group: Standing}, rounds, settled). Round 1 feeds
    every finite value; each later round what --stats-update keeps under the last round's bounds,
    until no bound moves (--stats-update all: one round)."""
    finite = np.isfinite(units["loss"])
    values = {}
    for b in sorted(set(units["group"].tolist())):
        m = finite & (units["group"] == b)
        values[b] = (units["loss"][m], units["gain"][m & np.isfinite(units["gain"])])
    window = max(2, *(len(losses) for losses, _ in values.values()))
    fed = values
    before = None
    for rounds in range(1, MAX_ROUNDS + 1):
        rs = filled(fed, args, window)
        now = {b: standing_of(rs, b) for b in values}
        moved = before is None or any(not close(x, y) for b in values
                                      for x, y in zip(now[b].bounds(), before[b].bounds()))
        if args.stats_update == "all" or not moved:
            return rs, now, rounds, True
        fed = {b: kept(*values[b], now[b].bounds(), args.stats_update) for b in values}
        before = now
    return rs, now, MAX_ROUNDS, False


def judge(units, args):
    """ReSURE.weigh over the whole dataset as one batch, under the settled statistics: per unit its
    group's numbers, the views that flag it, z-scores, flagged and the weight; eps (Eq. 6's floor,
    None when nothing is flagged), the groups' standings, the rounds."""
    rs, groups, rounds, settled = settle(units, args)
    per = {key: np.array([getattr(groups[b], key) for b in units["group"].tolist()])
           for key in ("tau", "mu", "sigma", "lo", "hi", "mu_g", "sigma_g")}
    weights, flagged = rs.weigh(units["loss"], units["group"], gains=units["gain"])
    loss = units["loss"]
    gain = units["gain"]
    both = np.isfinite(loss) & np.isfinite(gain)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_loss = np.where(per["sigma"] > 0, (loss - per["mu"]) / per["sigma"], np.nan)
        z_gain = np.where(per["sigma_g"] > 0, (gain - per["mu_g"]) / per["sigma_g"], np.nan)
    views = {"by_loss": np.isfinite(loss) & (loss > per["tau"]),
             "high_gain": both & (gain > per["hi"]), "low_gain": both & (gain < per["lo"])}
    return dict(per, **views, flagged=flagged, weight=weights, z_loss=z_loss, z_gain=z_gain,
                eps=rs.summary().get("eps"), groups=groups, rounds=rounds, settled=settled)


def columns(records):
    """The numbers judging needs, as numpy columns (None -> NaN)."""
    def column(key, dtype):
        return np.array([np.nan if r[key] is None else r[key] for r in records], dtype=dtype)
    return {"group": column("group", np.int64), "loss": column("loss", np.float64),
            "gain": column("gain", np.float64)}


def reason_of(j, i):
    """Why unit i is flagged, in words (None when it is not)."""
    words = {"by_loss": "high loss", "high_gain": "echo-like gain",
             "low_gain": "off-topic-like gain"}
    return " + ".join(text for key, text in words.items() if j[key][i]) or None


def excess_of(z_loss, z_gain, args):
    """Sigmas beyond the nearest bound (> 0 outside: flagged); None without statistics."""
    parts = [x for x in (z_loss - args.alpha, abs(z_gain) - args.gain_alpha) if math.isfinite(x)]
    if not parts:
        return None
    return max(parts)


def unit_lines(records, j, args):
    """units.jsonl: each unit's scores, then its judgement."""
    out = []
    for i, r in enumerate(records):
        scored = {key: r[key] for key in ("dialogue", "id", "turn", "turns", "group", "tokens",
                                          "loss", "gain")}
        labels = {key: r[key] for key in ("noisy", "noise_type") if key in r}
        out.append({**scored, "tau": json_float(j["tau"][i]),
                    "band": [json_float(j["lo"][i]), json_float(j["hi"][i])],
                    "z_loss": json_float(j["z_loss"][i]), "z_gain": json_float(j["z_gain"][i]),
                    "excess": excess_of(j["z_loss"][i], j["z_gain"][i], args),
                    "flagged": bool(j["flagged"][i]), "reason": reason_of(j, i),
                    "weight": float(j["weight"][i]), **labels})
    return out


def write_jsonl(records, path):
    """Whole or absent: written under a temporary name, then renamed."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tmp.replace(path)


def warn(j, units):
    """A line per group whose tau flags over half of its units, and one if nothing settled."""
    for b, standing in j["groups"].items():
        share = j["by_loss"][units["group"] == b].mean()
        if share > 0.5:
            print(f"audit: warning: group {b}: {share:.0%} of its units are above tau = "
                  f"{standing.tau:.3f}: statistics of only the units under tau shrink towards the "
                  "lowest losses (--stats mad or --stats-update winsorized do not)",
                  file=sys.stderr)
    if not j["settled"]:
        print(f"audit: warning: the statistics still moved after {j['rounds']} rounds; the last "
              "round's judge", file=sys.stderr)


# --- the command -------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    convs = load_conversations(args.data, on_bad_sample=args.on_bad_sample)
    if not convs:
        raise UsageError(f"--data {args.data}: no conversation")
    net, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    amp = autocast_context(torch.device(args.device), dtype)
    os.makedirs(args.out, exist_ok=True)
    settings = settings_of(args, net, template)
    path = os.path.join(args.out, SCORES)
    records, report = score_all(net, amp, template, convs, args, path, settings)
    records.sort(key=itemgetter("dialogue", "turn"))
    units = columns(records)
    j = judge(units, args)
    warn(j, units)
    lines = unit_lines(records, j, args)
    write_jsonl(lines, os.path.join(args.out, "units.jsonl"))
    audit_report.write(args, settings, report, j, lines, convs)
    print(f"audit: {len(lines)} units, {int(j['flagged'].sum())} flagged -> "
          f"{os.path.join(args.out, 'report.md')}", file=sys.stderr)


def cli(argv=None):
    """main() with failures in one line: exit 2 for bad input, 130 for Ctrl-C."""
    try:
        main(argv)
        return 0
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("audit.py: interrupted; OUT/scores.jsonl keeps the batches scored: the same command "
              "continues", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        print(f"audit.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
