"""LoRA fine-tuning of a LLaMA / Qwen chat model on multi-turn dialogues, with ReSURE reweighting.

    python train.py                                   # the demo: SmolLM2-135M + synthetic noisy dialogues, CPU
    python train.py --model DIR --data train.jsonl --out runs/x
    torchrun --nproc_per_node=4 train.py --model DIR --data train.jsonl --out runs/x

One optimizer step = grad_accum micro-batches on every rank. Per micro-batch: per-token losses, per-unit losses (a
dialogue or one assistant turn), all-gathered so that every rank weighs the same global batch (resure.py), backward on
this rank's share of Eq. 7 (ReSURELoss below); only the LoRA adapter trains. The run folder (support/runs.py) loses
nothing: checkpoints are whole or absent, a signal finishes the step and saves, a rerun resumes exactly.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from data import ChatTemplate, build_examples, collate, epoch_batches, rank_slice
from support.conversations import load_conversations, read_scores
from lora import apply_lora, save_adapter
from resure import ReSURE, all_reduce_sum, count_units, gain_of, gather, prefilter, reweighted_loss, unit_losses
from support import runs
from support.cli import UsageError, num
from support.report import flag_report, log_line

START = time.time()  # the demo reports its whole time

# The paper's settings (Sec. 4), taken when --model is given and a flag is left out; the README lists deviations.
PAPER = dict(lora_r=128, lora_alpha=16, lora_dropout=0.3, lr=1e-5, warmup_ratio=0.01, batch_size=4, grad_accum=4,
             epochs=3, max_len=2048, alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=25,
             unit="dialogue", stats="welford", stats_update="reliable", grad_checkpointing=True,
             dtype="bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32")
# The demo: small enough for 2 CPU cores in minutes, strong enough that the effect shows (printed at start).
DEMO = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lr=1e-3, warmup_ratio=0.05, batch_size=8, grad_accum=1,
            epochs=1, max_len=256, alpha=1.0, floor_percentile=5.0, warmup_samples=64, ramp_steps=10, dtype="fp32",
            stats="ema", stats_update="winsorized", unit="turn", max_steps=45, grad_checkpointing=False)
# Flags that do not change what a run computes; resuming with any other flag changed is refused.
NOT_RUN_KEYS = ("data", "eval_data", "out", "record_units", "log_every", "eval_every", "save_every", "resume",
                "no_resume", "allow_changed_config", "merge", "report_top", "demo_eval", "demo")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage block first)
        print(f"train.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


POS, POS_INT, NONNEG, NONNEG_INT = num(float, 0, lo_ok=False), num(int, 1, 10**9, hi_ok=True), num(float, 0), \
    num(int, 0, 10**9, hi_ok=True)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", help="Hugging Face folder (config.json, safetensors, tokenizer.json); none: the demo's model")
    add("--data", help="training conversations (.jsonl or .json, OpenAI messages or ShareGPT)")
    add("--eval-data", help="held-out conversations for per-turn loss every --eval-every steps")
    add("--warmup-data", help="high-quality conversations to initialize the statistics from (paper: 640)")
    add("--out", default="out", help="run folder: checkpoints, adapter, metrics.jsonl, report.json")
    add("--chat-template", help="force a template (qwen2.5, smollm2, llama3, qwen3, chatml)")
    add("--on-bad-sample", choices=["error", "skip"], default="error")
    add("--epochs", type=num(float, 0, 1e6, lo_ok=False, hi_ok=True), help="paper: 3")
    add("--max-steps", type=POS_INT, help="optimizer steps (overrides --epochs)")
    add("--batch-size", type=POS_INT, help="per device; paper: 4")
    add("--grad-accum", type=POS_INT, help="paper: 4 (4 GPUs x 4 x 4 = 64)")
    add("--lr", type=POS, help="paper: 1e-5, cosine")
    add("--warmup-ratio", type=num(float, 0, 1), help="linear lr warm-up fraction; paper: 0.01")
    add("--weight-decay", type=NONNEG, default=0.0)
    add("--beta2", type=num(float, 0, 1, lo_ok=False), default=0.95)
    add("--grad-clip", type=NONNEG, default=1.0, help="max gradient norm; 0: no clipping")
    add("--max-len", type=num(int, 2, 10**9, hi_ok=True), help="tokens; longer dialogues lose trailing turns")
    add("--seed", type=num(int, 0, 2**32 - 1, hi_ok=True), default=42)
    add("--dtype", choices=["fp32", "bf16", "fp16"], help="base weights + autocast; adapter stays fp32")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="paper: on")
    add("--group-by-length", action="store_true", help="batch similar lengths together to cut padding")
    add("--lora-r", type=num(int, 1, 65536, hi_ok=True), help="paper: 128")
    add("--lora-alpha", type=POS, help="paper: 16")
    add("--lora-dropout", type=num(float, 0, 1), help="paper: 0.3")
    add("--method", choices=["resure", "sft", "global", "hard"], default="resure",
        help="sft: every weight 1 (Vicuna-style tuning); global, hard: ablations of this project")
    add("--unit", choices=["dialogue", "turn"], help="what one loss l_s is (paper: dialogue)")
    add("--loss-norm", choices=["sample", "token"], default="sample", help="mean over units (paper) or tokens")
    add("--alpha", type=NONNEG, help="tau = mu + alpha * sigma (Eq. 5); paper: 1.0")
    add("--floor-percentile", type=num(float, 0, 100, hi_ok=True),
        help="eps = this percentile of the weights of one gathered micro-batch (Eq. 6); paper: 5")
    add("--warmup-samples", type=NONNEG_INT, help="units seen before detection starts; paper: 640")
    add("--ramp-steps", type=NONNEG_INT, help="optimizer steps over which down-weighting is blended in")
    add("--max-turn-groups", type=NONNEG_INT, default=0, help="deeper turns share the last one; 0: one group per depth")
    add("--stats", choices=["welford", "ema", "window", "mad"], help="running estimator; paper: welford")
    add("--stats-update", choices=["reliable", "winsorized", "all"],
        help="which units update the statistics; paper: reliable")
    add("--ema-decay", type=num(float, 0, 1, lo_ok=False), default=0.05)
    add("--window", type=num(int, 2, 10**9, hi_ok=True), default=256)
    add("--detector", choices=["loss", "loss+gain"], default="loss",
        help="loss: the paper; loss+gain: also flag a context gain outside mu_g +- gain_alpha sigma_g (ours)")
    add("--gain-alpha", type=POS, default=2.0, help="the context-gain band's half-width in sigmas")
    add("--prefilter-keep", type=num(float, 0, 1, lo_ok=False, hi_ok=True), default=1.0,
        help="static baseline: train on this fraction only")
    add("--prefilter-scores", help="quality scores, one per conversation (higher is better), instead of the "
        "base model's loss: a number per line, or JSON lines {\"id\", \"score\"}")
    add("--record-units", action="store_true", help="write every unit's loss/tau/weight to units.jsonl")
    add("--log-every", type=POS_INT, default=10)
    add("--eval-every", type=NONNEG_INT, default=0, help="0: only at the end")
    add("--save-every", type=NONNEG_INT, default=0, help="0: only at the end")
    add("--resume", action="store_true", help="require a checkpoint to continue from (automatic if present)")
    add("--no-resume", action="store_true", help="start over: an earlier run in --out is moved aside first")
    add("--allow-changed-config", action="store_true", help="resume although a setting of the run changed")
    add("--merge", action="store_true", help="also export a merged Hugging Face folder to OUT/merged")
    add("--report-top", type=NONNEG_INT, default=20, help="most down-weighted samples listed in report.json")
    add("--demo-eval", type=NONNEG_INT, default=32, help="demo only: clean test dialogues scored before and after")
    args = p.parse_args(argv)
    args.demo = args.model is None and args.data is None
    if args.data is None and args.model is not None:
        raise UsageError("--model needs --data (the demo's data is made for its own model)")
    for k, v in (DEMO if args.demo else PAPER).items():  # a flag left out takes the paper's (the demo's) value
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    if args.resume and args.no_resume:
        raise UsageError("--resume and --no-resume contradict each other")
    return args


class TokenLoss(torch.nn.Module):
    """What DDP wraps: forward = per-token losses, so DDP's hooks see the whole computation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, labels, attention_mask):
        return self.net.token_losses(input_ids, labels, attention_mask)


def cosine_lr(step, total, warmup, base):
    """Linear warm-up then cosine decay to 0 (what transformers' get_cosine_schedule_with_warmup computes)."""
    if step < warmup:
        return base * step / max(1, warmup)
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def score_units(run, examples, unit, batch_size=8):
    """Per-unit (losses, groups, context gains or None) of examples under run.net, without dropout: the warm-up
    statistics and static pre-filtering."""
    was_training, out = run.net.training, []
    run.net.eval()
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(run.device) for k, v in collate(examples[i:i + batch_size], run.template.pad_id).items()}
        with run.amp():
            tok = run.net.token_losses(b["input_ids"], b["labels"], b["attention_mask"]).float()
        losses, groups, _, sidx, turn = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], unit)
        gains = context_gain(run, b, losses, sidx, turn)
        out.append(torch.stack([losses.double(), groups.double(), gains.double()]).cpu())
    run.net.train(was_training)
    losses, groups, gains = torch.cat(out, 1).numpy()
    return losses, groups.astype(np.int64), gains if np.isfinite(gains).any() else None


@torch.no_grad()
def context_gain(run, b, losses, sidx, turn, rows=8):
    """Each unit's context gain (resure.gain_of) from its replies scored alone (data.py's free rows): their common
    start (the template's empty user turn) runs once, then rows of similar length continue from its K/V."""
    if "free_ids" not in b:
        return torch.full_like(losses, math.nan)
    ids, labels, mask = b["free_ids"], b["free_labels"], b["free_mask"]
    P = max(0, int(((ids == ids[:1]) & (labels == -100)).all(0).long().cumprod(0).sum()) - 1)  # that start, less one
    n, tok, cache = mask.sum(1), torch.zeros(labels[:, P:].shape, device=ids.device), run.net.new_cache(1, ids.shape[1])
    with run.amp():
        if P:
            run.net.hidden_states(ids[:1, :P], cache=cache)
        for r in n.argsort(descending=True).split(rows):
            T, c = int(n[r[0]]), cache.expand(len(r)) if P else None
            tok[r, :T - P] = run.net.token_losses(ids[r, P:T], labels[r, P:T], mask[r, P:T], cache=c).float()
    return gain_of(tok, labels[:, P:], b["free_unit"], losses, sidx, turn, run.args.unit, len(b["input_ids"]))


class ReSURELoss:
    """What train.py minimizes: ReSURE's reweighted unit losses (Eqs. 1-7). A baseline hands train.main another
    object with these four methods (baselines/dpo.py does) and keeps the rest of the loop."""

    def examples(self, run, convs):
        return build_examples(convs, run.template, run.args.max_len, run.args.max_turn_groups or None,
                              free=run.args.detector == "loss+gain")

    def collate(self, run, examples):
        return collate(examples, run.template.pad_id)

    def count(self, run, b):  # (units, supervised tokens) of a micro-batch, known before its forward pass
        return count_units(b["labels"], b["turn_ids"], run.args.unit)

    def loss(self, run, b, k, totals):
        """(this rank's share of the step's loss, the global batch's unit losses, their weights)."""
        args = run.args
        with run.amp():
            tok = run.ddp(b["input_ids"], b["labels"], b["attention_mask"]).float()
        losses, groups, ntok, sidx, turn = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], args.unit)  # Eq. 1
        vals = losses.detach()[None]
        if args.detector == "loss+gain":
            vals = torch.cat([vals, context_gain(run, b, losses.detach(), sidx, turn)[None]])
        vals, groups, ids, turns, offsets = gather(vals, groups, b["index"][sidx], turn)
        weights, _ = run.rs.weigh(vals[0], groups, ids=ids, turns=turns, new_step=k == 0,       # Eqs. 2-6
                                  gains=vals[1] if len(vals) > 1 else None)
        mine = weights[offsets[run.rank]:offsets[run.rank + 1]]
        return reweighted_loss(losses, ntok, mine, args.loss_norm, *totals, run.world), vals[0], weights  # Eq. 7


Run = argparse.Namespace  # everything one training run holds: args, rank/world/device, net, opt, rs, examples, ...


def load_examples(run, path, label, convert=None):
    if not os.path.isfile(path):
        raise UsageError(f"{label} {path}: no such file")
    convs = load_conversations(path, on_bad_sample=run.args.on_bad_sample)
    examples, report = (convert or ReSURELoss().examples)(run, convs)
    if not examples:
        raise UsageError(f"{path}: no usable conversation ({report.summary()})")
    return examples, report, convs


def prepare_data(run):
    """Training examples (pre-filtered when asked), held-out examples, and the statistics' warm-up."""
    args = run.args
    run.examples, report, convs = load_examples(run, args.data, "--data", run.objective.examples)
    run.log(f"data: {args.data}: {report.summary()}")
    plain = lambda r, c: build_examples(c, r.template, args.max_len, args.max_turn_groups or None)  # noqa: E731
    run.eval_examples = load_examples(run, args.eval_data, "--eval-data", plain)[0] if args.eval_data else None
    if args.prefilter_keep < 1 or args.prefilter_scores:  # the paper's static pre-filtering (Sec. 5.2)
        scores = -read_scores(args.prefilter_scores, convs)[[e["conv_index"] for e in run.examples]] if \
            args.prefilter_scores else score_units(run, run.examples, "dialogue")[0]  # ours: the base model's loss
        keep = prefilter(scores, keep=args.prefilter_keep)
        run.log(f"prefilter: kept {len(keep)} of {len(run.examples)} samples (the best by "
                f"{args.prefilter_scores or 'base-model loss, our stand-in for the paper reward model'})")
        run.examples = [dict(run.examples[i], index=j) for j, i in enumerate(keep)]
    if args.warmup_data:
        wex = load_examples(run, args.warmup_data, "--warmup-data")[0]
        n = run.rs.warmup_from(*score_units(run, wex, args.unit))
        run.log(f"warm-up: statistics initialized from {n} units of {len(wex)} samples of {args.warmup_data}")
    elif args.method != "sft":
        run.log(f"warm-up: statistics from the first {args.warmup_samples} units of the unfiltered training stream "
                "(the paper warms up on 640 high-quality samples: give them with --warmup-data)")


def build(run):
    """Model, template, data, ReSURE, LoRA, optimizer, scaler and schedule; False when OUT holds this run, done."""
    args = run.args
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
    run.identity = runs.identity(args, [k for k in vars(args) if k not in NOT_RUN_KEYS], run.world)
    if not runs.claim(run):
        return False
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    run.amp = (lambda: torch.autocast(run.device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    run.net = M.Transformer.from_pretrained(args.model, dtype=dtype, device=run.device)
    run.net.gradient_checkpointing = args.grad_checkpointing
    run.template = ChatTemplate.from_pretrained(args.model, name=args.chat_template)
    run.log(f"model: {args.model} ({run.net.config.model_type}), chat template {run.template.name}")
    run.rs = ReSURE(alpha=args.alpha, floor_percentile=args.floor_percentile, warmup_samples=args.warmup_samples,
                    ramp_steps=args.ramp_steps, max_turn_groups=args.max_turn_groups or None, mode=args.method,
                    stats=args.stats, stats_update=args.stats_update, ema_decay=args.ema_decay, window=args.window,
                    gain_alpha=args.gain_alpha if args.detector == "loss+gain" else None, record=run.rank == 0)
    prepare_data(run)
    apply_lora(run.net, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, verbose=run.rank == 0)
    run.params = [p for p in run.net.parameters() if p.requires_grad]
    run.opt = torch.optim.AdamW(run.params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=dtype == torch.float16 and run.device.type == "cuda")
    cuda = [run.device.index] if run.device.type == "cuda" else None
    run.ddp = DDP(TokenLoss(run.net), device_ids=cuda) if run.world > 1 else TokenLoss(run.net)
    n, G = len(run.examples), args.batch_size * run.world
    run.per_epoch = -(-n // G) - (0 < n % G < run.world)  # a last batch that would leave a rank empty is dropped
    if run.per_epoch < 1:
        raise UsageError(f"--data {args.data}: {n} examples cannot feed {run.world} ranks")
    if 0 < n % G < run.world:
        run.log(f"sampler: dropping the last {n % G} samples of each epoch (fewer than {run.world} ranks)")
    run.total = args.max_steps or max(1, int(args.epochs * run.per_epoch) // args.grad_accum)
    run.warmup = math.ceil(args.warmup_ratio * run.total)
    lengths = [len(e["input_ids"]) for e in run.examples] if args.group_by_length else None
    run.epochs = {}  # epoch -> its global batches: (epoch, position) is all the sampler's state
    run.batches = lambda m: rank_slice(run.epochs.setdefault(m // run.per_epoch, epoch_batches(
        n, G, args.seed, m // run.per_epoch, lengths))[m % run.per_epoch], run.rank, run.world)
    return True


def train_step(run, step):
    """One optimizer step of grad_accum micro-batches on every rank; returns what the log needs."""
    args, rs = run.args, run.rs
    lr = cosine_lr(step, run.total, run.warmup, args.lr)
    for g in run.opt.param_groups:
        g["lr"] = lr
    batches = [run.objective.collate(run, [run.examples[i] for i in run.batches(step * args.grad_accum + k)])
               for k in range(args.grad_accum)]
    totals = all_reduce_sum(*np.sum([run.objective.count(run, b) for b in batches], axis=0))
    rs_before, sums, recs, tokens = rs.state_dict(), np.zeros(3), [], 0  # rs_before: restored if skipped
    for k, b in enumerate(batches):
        b = {key: v.to(run.device) for key, v in b.items()}
        with nullcontext() if run.world == 1 or k == len(batches) - 1 else run.ddp.no_sync():
            loss, losses, weights = run.objective.loss(run, b, k, totals)
            run.scaler.scale(loss).backward()
        ok = np.isfinite(losses)
        sums += [losses[ok].sum(), (weights[ok] * losses[ok]).sum(), ok.sum()]
        recs += rs.pop_records()
        tokens += int(b["attention_mask"].sum())
    run.scaler.unscale_(run.opt)
    gnorm = float(torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip or math.inf))
    ok = math.isfinite(gnorm)  # a non-finite loss or an fp16 overflow poisoned the gradient: skip the step
    if ok:
        run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    if not ok:  # counted, and this step's units leave no trace in the statistics
        rs.load_state_dict(rs_before)
    for r in recs:  # logged as skipped, and left out of the report, when the step was undone
        r.update(step=step, skipped=not ok)
        run.last_seen.update({(r["sample"], r["turn"]): r} if ok else {})
    n = sums[2]
    return dict(step=step + 1, epoch=(step + 1) * args.grad_accum / run.per_epoch, loss=sums[0] / n if n else math.nan,
                weighted_loss=sums[1] / n if n else math.nan, lr=lr, grad_norm=gnorm, ok=ok, tokens=tokens,
                finite_units=int(n), records=recs)


def train(run, step, stop):
    """Steps from `step` to run.total: logs, evaluation, checkpoints; SIGINT / SIGTERM stop after a step."""
    args, master = run.args, run.rank == 0
    metrics = open(os.path.join(run.out, "metrics.jsonl"), "a") if master else None
    units = open(os.path.join(run.out, "units.jsonl"), "a") if master and args.record_units else None
    t0, tokens, skipped, blind = time.time(), 0, 0, 0
    while step < run.total:
        r = train_step(run, step)
        step, tokens, skipped = step + 1, tokens + r["tokens"], skipped + (not r["ok"])
        blind = blind + 1 if r["finite_units"] == 0 else 0
        if blind >= min(5, run.total):
            raise UsageError(f"no finite unit loss in the last {blind} steps (step {step}): the model produces "
                             "NaN or inf (check its weights and --dtype: some models overflow in fp16)")
        if units:
            units.writelines(json.dumps(x) + "\n" for x in r["records"])
            units.flush()
        if master and (step % args.log_every == 0 or step == run.total):
            dt = time.time() - t0
            rec = dict(step=step, epoch=r["epoch"], loss=r["loss"], weighted_loss=r["weighted_loss"], lr=r["lr"],
                       grad_norm=r["grad_norm"], tokens_per_s=tokens * run.world / dt,
                       eta_s=dt / args.log_every * (run.total - step), skipped_steps=skipped, **run.rs.summary())
            t0, tokens = time.time(), 0
            metrics.write(json.dumps(rec, default=float) + "\n")
            metrics.flush()
            run.log(log_line(rec))
        for w in run.rs.warnings():
            run.log(w)
        if master and run.eval_examples and args.eval_every and step % args.eval_every == 0:
            log_eval(run, metrics, step)
        if stop.requested():
            runs.save(run, step)
            run.log(f"train.py: stopped by signal {stop.signum} after step {step}; checkpoint step-{step:07d} "
                    "written: the same command continues the run")
            raise SystemExit(stop.exit_code)
        if args.save_every and step % args.save_every == 0 and step < run.total:
            runs.save(run, step)
    if blind:  # the run ends on steps whose every loss was NaN: the adapter diverged, so nothing final is written
        raise UsageError(f"the last {blind} steps had no finite unit loss: the adapter diverged (is --lr too high?)")
    runs.save(run, step)
    return metrics


def main(argv=None, objective=None):
    """Train; returns the model (None when --out already held this finished run). objective: ReSURELoss() unless
    a baseline brings its own."""
    args = parse_args(argv)
    rank, world, device = runs.setup_distributed()
    run = Run(args=args, rank=rank, world=world, device=device, out=args.out, last_seen={}, demo_test=None,
              objective=objective or ReSURELoss(), log=print if rank == 0 else (lambda *a, **k: None))
    try:
        if args.demo:
            from support.demo import prepare
            run.demo_test = prepare(args, DEMO, run.log)
        elif args.model is None:  # --data alone: the demo's model, the paper's settings
            from support.smollm2 import prepare_smollm2
            args.model = prepare_smollm2()
        if not build(run):
            return None
        runs.start(run)
        with runs.Stop(run) as stop:  # from here on a signal is answered after a step, or once the run is done
            step = runs.resume(run)
            run.log(f"training {run.total} steps x {args.grad_accum} micro-batches x {args.batch_size} x {world} "
                    f"ranks; method={args.method} unit={args.unit} stats={args.stats}/{args.stats_update}")
            run.net.train()
            metrics = train(run, step, stop)
            if rank == 0:
                finish(run, metrics)
            runs.barrier(run)  # the other ranks wait for rank 0's final writes before the group goes away
        if stop.signum:
            raise SystemExit(stop.exit_code)
        return run.net
    finally:
        runs.teardown(run)


def log_eval(run, metrics, step):
    from eval import per_turn_loss
    res = per_turn_loss(run.net, run.eval_examples, pad_id=run.template.pad_id)  # in eval mode, then back
    metrics.write(json.dumps({"step": step, "eval": res}, default=float) + "\n")
    metrics.flush()
    run.log(f"eval step {step}: " + json.dumps(res, default=float))


def finish(run, metrics):
    """The adapter, resure_state.json, report.json (the most down-weighted units; flagging against noise labels
    where the data has them, per view), the final evaluation, the merged export; then the run is finished."""
    args, step = run.args, run.total
    adapter = os.path.join(run.out, "adapter")
    try:
        save_adapter(run.net, adapter, args.model)
    except runs.WRITE_ERRORS as e:  # a full disk: the final checkpoint is intact, the same command writes it again
        raise UsageError(f"cannot write {adapter} ({runs.one_line(e)}); rerun the same command") from None
    runs.dump(run.rs.state_dict(), os.path.join(run.out, "resure_state.json"))
    report = {"steps": step, **flag_report(run.last_seen.values(), run.examples, run.template, args.report_top,
                                           ("loss", "gain") if args.detector == "loss+gain" else (), run.log)}
    runs.dump(report, os.path.join(run.out, "report.json"))
    if run.eval_examples:
        log_eval(run, metrics, step)
    if args.merge:
        from support.export import export_merged
        run.log(f"merged model written to {export_merged(run.net, args.model, os.path.join(run.out, 'merged'))}")
    runs.finished(run, step)
    run.log(f"adapter written to {adapter}")
    if run.demo_test:
        demo_report(run)



def demo_report(run):
    """The demo's last lines: exact-match accuracy on the first --demo-eval clean test dialogues, before (adapter
    off) and after."""
    from eval import accuracy
    from lora import disabled
    t0 = time.time()
    convs = load_conversations(run.demo_test)[:run.args.demo_eval]
    if not convs:
        return
    run.net.eval()
    after = accuracy(run.net, run.template, convs)
    with disabled(run.net):  # the base model
        before = accuracy(run.net, run.template, convs)
    run.log(f"clean-test exact match ({len(convs)} dialogues, {before['total']} turns, {time.time() - t0:.0f} s): "
            f"before {before['overall']:.3f} -> after {after['overall']:.3f}")
    run.log(f"demo done in {time.time() - START:.0f} s")

if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError, MemoryError) as e:  # bad input of every kind: one line, exit 2
        print(f"train.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started (then a signal finishes the step and checkpoints)
        print("train.py: interrupted before training started; nothing to lose", file=sys.stderr)
        sys.exit(130)
