"""LoRA fine-tuning of a LLaMA / Qwen chat model on multi-turn dialogues, with ReSURE reweighting.

    python train.py                             # the demo: SmolLM2-135M, noisy dialogues, CPU
    python train.py --model DIR --data train.jsonl --out runs/x
    torchrun --nproc_per_node=4 train.py --model DIR --data train.jsonl --out runs/x

One optimizer step = grad_accum micro-batches on every rank. Per micro-batch: per-token losses,
per-unit losses (a dialogue or one assistant turn), all-gathered so that every rank weighs the
same global batch (resure.py), backward on this rank's share of Eq. 7 (ReSURELoss below); only the
LoRA adapter trains. The run folder (support/runs.py) loses nothing: checkpoints are whole or
absent, a signal finishes the step and saves, a rerun resumes exactly.

Reading order: the settings, the objective, the run's state (Sampler, Run), train_step and the
loop, build(), then main() and the command line.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import ChatTemplate, build_examples, collate, epoch_batches, rank_slice
from eval import accuracy, per_turn_loss
from lora import apply_lora, disabled, load_adapter, lora_state_dict, save_adapter
from model import Transformer
from resure import ReSURE, count_units, gain_of, prefilter, reweighted_loss, unit_losses
from support.distributed import all_reduce_sum, gather
from support import runs
from support.cli import UsageError, check_model_and_data, given_flags, refuse_idle_flags
from support.cli import run_main, train_parser
from support.conversations import load_conversations, read_scores
from support.export import export_merged
from support.report import announce, flag_report, log_step

START = time.time()  # the demo reports its whole time
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()

# The paper's settings (Sec. 4), for a flag left out under --model; docs/method.md lists deviations.
PAPER = dict(
    lora_r=128, lora_alpha=16, lora_dropout=0.3,
    lr=1e-5, warmup_ratio=0.01, epochs=3,
    batch_size=4, grad_accum=4, max_len=2048,  # 4 GPUs x 4 x 4 = 64 dialogues per step
    unit="dialogue", alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=25,
    stats="welford", stats_update="reliable",
    grad_checkpointing=True, dtype="bf16" if BF16 else "fp32",
)
# The demo: minutes on 2 CPU cores, and the effect shows (its settings are printed at the start).
# Not the paper's configuration: per-turn units, and EMA / winsorized statistics because the loss
# falls within a few dozen steps, where cumulative Welford statistics lag (docs/method.md).
DEMO = dict(
    lora_r=16, lora_alpha=32, lora_dropout=0.05,
    lr=1e-3, warmup_ratio=0.05, epochs=1, max_steps=45,
    batch_size=8, grad_accum=1, max_len=256,
    unit="turn", alpha=1.0, floor_percentile=5.0, warmup_samples=64, ramp_steps=10,
    stats="ema", stats_update="winsorized",
    grad_checkpointing=False, dtype="fp32",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def print0(message):
    """Print on rank 0 only (torchrun's RANK; a process started alone is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message)


# -------------------------------------------------------------------------------------------------
# The objective: ReSURE's reweighted unit losses

class ReSURELoss:
    """What train.py minimizes: ReSURE's reweighted unit losses (Eqs. 1-7). A baseline hands
    main() another object with these four methods (baselines/dpo.py does)."""

    def examples(self, convs, template, args):
        """(training examples, data.Report); with --detector loss+gain each reply also alone."""
        groups = args.max_turn_groups or None
        free = args.detector == "loss+gain"
        return build_examples(convs, template, args.max_len, groups, free=free)

    def collate(self, examples, pad_id):
        return collate(examples, pad_id)

    def count(self, run, b):
        """(units, supervised tokens) of micro-batch b, known before its forward pass."""
        return count_units(b["labels"], b["turn_ids"], run.args.unit)

    def loss(self, run, b, k, totals):
        """(this rank's share of the step's loss, the global batch's unit losses, their weights)
        of micro-batch k of a step; totals: the step's (units, tokens) over every rank."""
        args = run.args
        with run.autocast:
            tok = run.ddp(b["input_ids"], b["labels"], b["attention_mask"]).float()
        units = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], args.unit)  # Eq. 1
        losses, groups, ntok, sidx, turn = units
        values = losses.detach()[None]
        if args.detector == "loss+gain":
            gains = context_gain(run.net, run.autocast, args.unit, b, values[0], sidx, turn)
            values = torch.cat([values, gains[None]])
        values, groups, ids, turns, offsets = gather(values, groups, b["index"][sidx], turn)
        gains = values[1] if len(values) > 1 else None
        weights, _ = run.rs.weigh(values[0], groups, ids=ids, turns=turns, new_step=k == 0,
                                  gains=gains)  # Eqs. 2-6
        mine = weights[offsets[run.rank]:offsets[run.rank + 1]]
        loss = reweighted_loss(losses, ntok, mine, args.loss_norm, *totals, run.world)  # Eq. 7
        return loss, values[0], weights


@torch.no_grad()
def context_gain(net, autocast, unit, b, losses, sidx, turn, rows=8):
    """Each unit's context gain (resure.gain_of) from its replies scored alone (data.py's free rows
    of batch b): their common start (the template's empty user turn) runs once, then rows of similar
    length continue from its K/V. losses, sidx, turn: b's units (resure.unit_losses)."""
    if "free_ids" not in b:
        return torch.full_like(losses, math.nan)
    ids = b["free_ids"]
    labels = b["free_labels"]
    mask = b["free_mask"]
    # the unsupervised tokens every row starts with, less the last (where each row's scoring begins)
    same = (ids == ids[:1]) & (labels == -100)
    start = max(0, int(same.all(0).long().cumprod(0).sum()) - 1)
    lengths = mask.sum(1)
    tok = torch.zeros(labels[:, start:].shape, device=ids.device)
    cache = None
    with autocast:
        if start:
            cache = net.new_cache(1, ids.shape[1])
            net.hidden_states(ids[:1, :start], cache=cache)
        for r in lengths.argsort(descending=True).split(rows):
            end = int(lengths[r[0]])
            span = slice(start, end)
            rows_cache = cache.expand(len(r)) if start else None
            scored = net.token_losses(ids[r, span], labels[r, span], mask[r, span],
                                      cache=rows_cache)
            tok[r, :end - start] = scored.float()
    batch = len(b["input_ids"])
    return gain_of(tok, labels[:, start:], b["free_unit"], losses, sidx, turn, unit, batch)


@torch.no_grad()
def score_units(net, autocast, pad_id, examples, unit, batch_size=8):
    """Per-unit (losses, groups, context gains or None) of examples under net, without dropout:
    the warm-up statistics and the static pre-filter."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    columns = []
    for i in range(0, len(examples), batch_size):
        b = to_device(collate(examples[i:i + batch_size], pad_id), device)
        with autocast:
            tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"]).float()
        units = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], unit)
        losses, groups, _, sidx, turn = units
        gains = context_gain(net, autocast, unit, b, losses, sidx, turn)
        columns.append(torch.stack([losses.double(), groups.double(), gains.double()]).cpu())
    net.train(was_training)
    losses, groups, gains = torch.cat(columns, 1).numpy()
    if not np.isfinite(gains).any():
        gains = None
    return losses, groups.astype(np.int64), gains


def to_device(b, device):
    return {key: value.to(device) for key, value in b.items()}


class TokenLoss(torch.nn.Module):
    """What DDP wraps: forward = per-token losses, so DDP's hooks see the whole computation."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, labels, attention_mask):
        return self.net.token_losses(input_ids, labels, attention_mask)


# -------------------------------------------------------------------------------------------------
# The run's state

@dataclass
class Sampler:
    """Which examples micro-batch m trains on: epoch e is a permutation seeded by (seed, e), cut
    into global batches (data.epoch_batches), of which each rank takes its share (data.rank_slice).
    Nothing else is drawn, so a resumed run sees what the uninterrupted one would have."""
    n: int                     # training examples
    global_batch: int          # examples per micro-batch over all ranks: batch_size x world
    seed: int
    rank: int
    world: int
    lengths: list[int] | None  # each example's tokens, with --group-by-length
    epochs: dict = field(default_factory=dict)  # epoch -> its global batches, drawn once

    @property
    def dropped(self):
        """Examples left out of each epoch: a last batch that would leave a rank empty."""
        rest = self.n % self.global_batch
        return rest if rest < self.world else 0

    @property
    def per_epoch(self):
        """Global batches in one epoch."""
        return -(-self.n // self.global_batch) - (self.dropped > 0)

    def indices(self, m):
        """The examples of this rank's share of micro-batch m (counted from the run's start)."""
        epoch = m // self.per_epoch
        if epoch not in self.epochs:
            self.epochs[epoch] = epoch_batches(self.n, self.global_batch, self.seed, epoch,
                                               self.lengths)
        batch = self.epochs[epoch][m % self.per_epoch]
        return rank_slice(batch, self.rank, self.world)


@dataclass
class Run:
    """One training run, as build() makes it; train_step() advances it, support/runs.py keeps it
    in OUT through save_state() and load_state()."""
    args: argparse.Namespace          # the command line, resolved (parse_args)
    rank: int                         # this process among world (torchrun's RANK; 0 alone)
    world: int                        # processes training together
    device: torch.device              # where this rank computes
    objective: ReSURELoss             # what is minimized (or a baseline's, with the same methods)
    net: Transformer                  # the base model with LoRA applied; only the adapter trains
    template: ChatTemplate            # renders and tokenizes the conversations
    autocast: AbstractContextManager  # mixed precision around each forward (a no-op in fp32)
    rs: ReSURE                        # the running statistics and the weights (Eqs. 2-6)
    examples: list[dict]              # training examples (data.build_examples), pre-filtered
    eval_examples: list[dict] | None  # --eval-data's examples
    params: list[torch.nn.Parameter]  # the adapter's weights: what the optimizer steps
    opt: torch.optim.AdamW
    scaler: torch.amp.GradScaler      # loss scaling for fp16 on CUDA, a pass-through otherwise
    ddp: torch.nn.Module              # TokenLoss(net), in DDP when several ranks train
    sampler: Sampler                  # micro-batch -> this rank's examples
    total: int                        # optimizer steps of the whole run
    warmup: int                       # of them, the steps of linear lr warm-up
    last_seen: dict = field(default_factory=dict)  # (sample, turn) -> its last record (report)

    def trainer_state(self):
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def unit_state(self):
        return {"resure": self.rs.state_dict(), "last_seen": list(self.last_seen.values())}

    def restore(self, trainer, state):
        """Put trainer_state() and unit_state() back; the optimizer keeps this command's betas and
        weight decay (--allow-changed-config may have changed them)."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.opt.load_state_dict(trainer["optimizer"])
        for group, own in zip(self.opt.param_groups, settings):
            group.update(own)
        self.scaler.load_state_dict(trainer["scaler"])
        self.rs.load_state_dict(state["resure"])
        self.last_seen = {(r["sample"], r["turn"]): r for r in state["last_seen"]}

    def save_state(self, path):
        """This run's part of a checkpoint: the adapter, trainer.pt and state.json."""
        save_adapter(self.net, path, self.args.model)
        torch.save(self.trainer_state(), os.path.join(path, "trainer.pt"))
        runs.dump(self.unit_state(), os.path.join(path, "state.json"))

    def load_state(self, path):
        """Restore save_state()'s files, each read and checked first; a failure half way puts back
        what was there, so that a damaged checkpoint leaves a fresh run fresh."""
        trainer, state = runs.read_trainer_state(path)
        adapter = {k: v.detach().clone() for k, v in lora_state_dict(self.net).items()}
        before = (copy.deepcopy(self.trainer_state()), self.unit_state())
        try:
            load_adapter(self.net, path)
            self.restore(trainer, state)
        except Exception:
            with torch.no_grad():
                for k, v in lora_state_dict(self.net).items():
                    v.copy_(adapter[k])
            self.restore(*before)
            raise


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""
    step: int             # steps done, this one included
    epoch: float          # passes over the data so far
    loss: float           # mean unit loss of the step (finite units)
    weighted_loss: float  # mean of weight x unit loss
    lr: float
    grad_norm: float      # before clipping
    skipped: bool         # the gradient was not finite: nothing changed
    tokens: int           # this rank's tokens
    finite_units: int
    records: list[dict]   # ReSURE's unit records (rank 0), for units.jsonl


# -------------------------------------------------------------------------------------------------
# Training

def cosine_lr(step, total, warmup, base):
    """Linear warm-up then cosine decay to 0 (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(run, step):
    """One optimizer step of grad_accum micro-batches on every rank. A step whose gradient is not
    finite is skipped: counted, and its units leave no trace in the statistics or the report."""
    lr = cosine_lr(step, run.total, run.warmup, run.args.lr)
    for group in run.opt.param_groups:
        group["lr"] = lr
    first = step * run.args.grad_accum
    batches = [micro_batch(run, m) for m in range(first, first + run.args.grad_accum)]
    counts = np.sum([run.objective.count(run, b) for b in batches], axis=0)
    totals = all_reduce_sum(*counts)
    statistics = run.rs.state_dict()  # put back if the step is skipped
    sums, records, tokens = accumulate(run, batches, totals)
    grad_norm = optimizer_step(run)
    skipped = not math.isfinite(grad_norm)
    if skipped:
        run.rs.load_state_dict(statistics)
    for r in records:
        r.update(step=step, skipped=skipped)
        if not skipped:
            run.last_seen[(r["sample"], r["turn"])] = r
    loss_sum, weighted_sum, finite = sums
    epoch = (step + 1) * run.args.grad_accum / run.sampler.per_epoch
    return StepResult(step=step + 1, epoch=epoch, loss=mean(loss_sum, finite),
                      weighted_loss=mean(weighted_sum, finite), lr=lr, grad_norm=grad_norm,
                      skipped=skipped, tokens=tokens, finite_units=int(finite), records=records)


def micro_batch(run, m):
    examples = [run.examples[i] for i in run.sampler.indices(m)]
    return run.objective.collate(examples, run.template.pad_id)


def accumulate(run, batches, totals):
    """Forward and backward of each micro-batch, gradients synchronized on the last: the sums of
    (unit losses, weighted unit losses, finite units), ReSURE's records and this rank's tokens."""
    sums = np.zeros(3)
    records = []
    tokens = 0
    for k, b in enumerate(batches):
        b = to_device(b, run.device)
        last = k == len(batches) - 1
        sync = nullcontext() if run.world == 1 or last else run.ddp.no_sync()
        with sync:
            loss, losses, weights = run.objective.loss(run, b, k, totals)
            run.scaler.scale(loss).backward()
        ok = np.isfinite(losses)
        sums += [losses[ok].sum(), (weights[ok] * losses[ok]).sum(), ok.sum()]
        records += run.rs.pop_records()
        tokens += int(b["attention_mask"].sum())
    return sums, records, tokens


def optimizer_step(run):
    """Clip, step, zero; returns the gradient norm. A norm that is not finite (a NaN loss, an fp16
    overflow) means a poisoned gradient: the optimizer does not step."""
    run.scaler.unscale_(run.opt)
    max_norm = run.args.grad_clip or math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    if math.isfinite(grad_norm):
        run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return grad_norm


def mean(total, n):
    if n == 0:
        return math.nan
    return total / n


def train(run, folder, step, stop):
    """Steps from `step` to run.total with their logs, evaluations and checkpoints; after SIGINT
    or SIGTERM the step is finished and checkpointed, and the process exits (130 / 143)."""
    args = run.args
    t0 = time.time()
    tokens = 0
    skipped = 0
    blind = 0  # steps in a row without one finite unit loss
    while step < run.total:
        result = train_step(run, step)
        step = result.step
        tokens += result.tokens
        skipped += result.skipped
        blind = blind + 1 if result.finite_units == 0 else 0
        if blind >= min(5, run.total):
            raise UsageError(f"no finite unit loss in the last {blind} steps (step {step}): the "
                             "model produces NaN or inf (check its weights and --dtype: some "
                             "models overflow in fp16)")
        if run.rank == 0 and args.record_units:
            runs.append_jsonl(os.path.join(args.out, "units.jsonl"), result.records)
        if step % args.log_every == 0 or step == run.total:
            log_step(run, result, tokens, time.time() - t0, skipped)
            t0 = time.time()
            tokens = 0
        for warning in run.rs.warnings():
            print0(warning)
        if args.eval_every and step % args.eval_every == 0:
            log_eval(run, step)
        if stop.requested():
            runs.save_checkpoint(run, folder, step)
            stop.exit_after(step)  # saying which command continues (Folder.continuing)
        if args.save_every and step % args.save_every == 0 and step < run.total:
            runs.save_checkpoint(run, folder, step)
    if blind:  # the last steps' every loss was NaN: the adapter diverged, nothing final is written
        raise UsageError(f"the last {blind} steps had no finite unit loss: the adapter diverged "
                         "(is --lr too high?)")
    runs.save_checkpoint(run, folder, step)


def log_eval(run, step):
    """(rank 0) --eval-data's per-turn loss (eval.per_turn_loss) in metrics.jsonl and stdout."""
    if run.rank != 0 or not run.eval_examples:
        return
    res = per_turn_loss(run.net, run.eval_examples, pad_id=run.template.pad_id)  # eval mode
    runs.append_jsonl(os.path.join(run.args.out, "metrics.jsonl"), [{"step": step, "eval": res}])
    print(f"eval step {step}: " + json.dumps(res, default=float))


# -------------------------------------------------------------------------------------------------
# Building the run

def build(args, rank, world, device, objective):
    """The run: seeds, model, template, ReSURE, data (pre-filtered, statistics warmed up when
    asked), LoRA, optimizer, sampler and schedule. The order fixes every random draw."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    net = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    net.gradient_checkpointing = args.grad_checkpointing
    template = ChatTemplate.from_pretrained(args.model, name=args.chat_template)
    print0(f"model: {args.model} ({net.config.model_type}), chat template {template.name}")
    autocast = autocast_context(device, dtype)
    rs = new_resure(args, record=rank == 0)
    examples, eval_examples = load_data(args, objective, template, net, autocast, rs)
    apply_lora(net, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
               verbose=rank == 0)
    params = [p for p in net.parameters() if p.requires_grad]
    betas = (0.9, args.beta2)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=betas, weight_decay=args.weight_decay)
    fp16_cuda = dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16_cuda)
    sampler = make_sampler(args, examples, rank, world)
    total, warmup = schedule(args, sampler)
    ddp = TokenLoss(net)  # what the backward runs through, in DDP when several ranks train
    if world > 1:
        ddp = DDP(ddp, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(args=args, rank=rank, world=world, device=device, objective=objective, net=net,
               template=template, autocast=autocast, rs=rs, examples=examples,
               eval_examples=eval_examples, params=params, opt=opt, scaler=scaler,
               ddp=ddp, sampler=sampler, total=total, warmup=warmup)


def schedule(args, sampler):
    """(optimizer steps, warm-up steps) of cosine_lr, whose first warm-up step is at learning rate
    0: a run of that one step would train nothing, and is refused."""
    epoch_steps = int(args.epochs * sampler.per_epoch) // args.grad_accum
    total = args.max_steps or max(1, epoch_steps)
    if total == 1 and args.warmup_ratio > 0:
        raise UsageError(f"the run is 1 optimizer step, which the linear warm-up (--warmup-ratio "
                         f"{args.warmup_ratio}) takes at learning rate 0: it would train nothing; "
                         "give more steps (--max-steps, --epochs) or --warmup-ratio 0")
    return total, math.ceil(args.warmup_ratio * total)


def autocast_context(device, dtype):
    """Autocast to dtype around each forward (none in fp32): one object, entered again and again."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def new_resure(args, record):
    """ReSURE as the flags set it; record: keep per-unit records (rank 0 writes them)."""
    gain_alpha = args.gain_alpha if args.detector == "loss+gain" else None
    return ReSURE(alpha=args.alpha, floor_percentile=args.floor_percentile,
                  floor_over=args.floor_over, warmup_samples=args.warmup_samples,
                  ramp_steps=args.ramp_steps, max_turn_groups=args.max_turn_groups or None,
                  mode=args.method, stats=args.stats, stats_update=args.stats_update,
                  ema_decay=args.ema_decay, window=args.window, gain_alpha=gain_alpha,
                  record=record)


def load_data(args, objective, template, net, autocast, rs):
    """Training examples (pre-filtered when asked) and held-out ones; --warmup-data warms rs up."""
    make = objective.examples
    examples, report, convs = read_examples(args.data, "--data", template, args, make)
    print0(f"data: {args.data}: {report.summary()}")
    eval_examples = None
    if args.eval_data:
        held_out = read_examples(args.eval_data, "--eval-data", template, args, plain_examples)
        eval_examples = held_out[0]
    if args.prefilter_keep < 1 or args.prefilter_scores:
        examples = prefilter_examples(args, examples, convs, net, autocast, template.pad_id)
    if args.warmup_data:
        make = ReSURELoss().examples
        warm = read_examples(args.warmup_data, "--warmup-data", template, args, make)[0]
        n = rs.warmup_from(*score_units(net, autocast, template.pad_id, warm, args.unit))
        print0(f"warm-up: statistics initialized from {n} units of {len(warm)} samples of "
               f"{args.warmup_data}")
    elif args.method != "sft":
        print0(f"warm-up: statistics from the first {args.warmup_samples} units of the training "
               "stream (the paper warms up on 640 clean samples: --warmup-data)")
    return examples, eval_examples


def read_examples(path, flag, template, args, make):
    """(examples, data.Report, conversations) of one file, the examples by make(convs, template,
    args); one line naming the flag or the file when it is missing or yields nothing."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    convs = load_conversations(path, on_bad_sample=args.on_bad_sample)
    examples, report = make(convs, template, args)
    if not examples:
        raise UsageError(f"{path}: no usable conversation ({report.summary()})")
    return examples, report, convs


def plain_examples(convs, template, args):
    """Held-out examples: every reply in its dialogue, none alone."""
    return build_examples(convs, template, args.max_len, args.max_turn_groups or None)


def prefilter_examples(args, examples, convs, net, autocast, pad_id):
    """The paper's static pre-filter (Sec. 5.2): the best --prefilter-keep of the examples by
    --prefilter-scores, or (ours, for the paper's reward model) by the base model's loss."""
    if args.prefilter_scores:
        rows = [e["conv_index"] for e in examples]
        scores = -read_scores(args.prefilter_scores, convs)[rows]
    else:
        scores = score_units(net, autocast, pad_id, examples, "dialogue")[0]
    keep = prefilter(scores, keep=args.prefilter_keep)
    by = args.prefilter_scores or "base-model loss, our stand-in for the paper reward model"
    print0(f"prefilter: kept {len(keep)} of {len(examples)} samples (the best by {by})")
    return [dict(examples[i], index=j) for j, i in enumerate(keep)]  # numbered anew


def make_sampler(args, examples, rank, world):
    """The sampler of the examples over world ranks; data that leaves a rank nothing is refused."""
    lengths = None
    if args.group_by_length:
        lengths = [len(e["input_ids"]) for e in examples]
    sampler = Sampler(len(examples), args.batch_size * world, args.seed, rank, world, lengths)
    if sampler.per_epoch < 1:
        raise UsageError(f"--data {args.data}: {len(examples)} examples cannot feed {world} ranks")
    if sampler.dropped:
        print0(f"sampler: dropping the last {sampler.dropped} samples of each epoch (fewer than "
               f"{world} ranks)")
    return sampler


# -------------------------------------------------------------------------------------------------
# The job: one process, or one of torchrun's

def setup_distributed():
    """(rank, world size, device). Under torchrun: NCCL on GPUs, one per LOCAL_RANK, gloo on
    CPUs; a process started alone trains by itself, on the GPU if there is one."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if not cuda:
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    return rank, world, torch.device("cuda", local)


def main(argv=None, objective=None):
    """Train; returns the finished Run, None when --out already held this run, finished.
    objective: ReSURELoss() unless a baseline brings its own."""
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    folder = runs.Folder(args.out, rank, world, device, require_checkpoint=args.resume,
                         fresh=args.no_resume, allow_changed=args.allow_changed_config)
    run = None
    try:
        demo_test = None
        if args.model is None:  # the demo's files, or its model alone, made on first use
            from support.demo import resolve_model
            demo_test = resolve_model(args, DEMO, print0)
        check_model_and_data(args)
        identity = runs.run_identity(args, world)
        # each setting's value when its flag is left out: what a record older than it ran with
        defaults = vars(parse_args([] if args.demo else ["--data", args.data]))
        if not folder.claim(identity, runs.final_outputs(args), defaults):
            return None
        run = build(args, rank, world, device, objective or ReSURELoss())
        folder.start(getattr(run.net, "fingerprint", None))
        with runs.Stop(folder) as stop:  # a signal is answered after a step, or at the end
            step = runs.resume(run, folder)
            announce(args, run.total, world, print0)
            run.net.train()
            train(run, folder, step, stop)
            if rank == 0:
                finish(run, folder, demo_test)
            late = stop.requested()  # a collective: the other ranks wait for rank 0's writes
        if late:
            stop.exit_finished()
        return run
    finally:
        runs.teardown(run, folder)


def finish(run, folder, demo_test):
    """(rank 0) The adapter, resure_state.json, report.json (support/report.py), the final
    evaluation, the merged export; then run.json says finished; the demo scores its test set."""
    args = run.args
    adapter = os.path.join(args.out, "adapter")
    try:
        save_adapter(run.net, adapter, args.model)
    except runs.WRITE_ERRORS as e:  # a full disk: the final checkpoint is intact
        raise UsageError(f"cannot write {adapter} ({runs.one_line(e)}); "
                         f"{folder.continuing()} writes it") from None
    runs.dump(run.rs.state_dict(), os.path.join(args.out, "resure_state.json"))
    views = ("loss", "gain") if args.detector == "loss+gain" else ()
    table = flag_report(run.last_seen.values(), run.examples, run.template, args.report_top, views)
    runs.dump({"steps": run.total, **table}, os.path.join(args.out, "report.json"))
    log_eval(run, run.total)
    if args.merge:
        merged = export_merged(run.net, args.model, os.path.join(args.out, "merged"))
        print(f"merged model written to {merged}")
    folder.finish(run.total)
    print(f"adapter written to {adapter}")
    if demo_test:
        demo_report(run, demo_test)


def demo_report(run, test_file):
    """The demo's last lines: exact match on --demo-eval clean test dialogues, before and after."""
    t0 = time.time()
    convs = load_conversations(test_file)[:run.args.demo_eval]
    if not convs:
        return
    run.net.eval()
    after = accuracy(run.net, run.template, convs)
    with disabled(run.net):  # the base model
        before = accuracy(run.net, run.template, convs)
    print(f"clean-test exact match ({len(convs)} dialogues, {before['total']} turns, "
          f"{time.time() - t0:.0f} s): before {before['overall']:.3f} -> after "
          f"{after['overall']:.3f}")
    print(f"demo done in {time.time() - START:.0f} s")


# -------------------------------------------------------------------------------------------------
# The command line (its flags: support/cli.py)

def parse_args(argv=None):
    """The flags, each left out taking the paper's (the demo's) value; contradicting or idle
    flags are refused in one line."""
    p = train_parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    given = given_flags(p, argv, args)
    args.demo = args.model is None and args.data is None
    if args.data is None and args.model is not None:
        raise UsageError("--model needs --data (the demo's data is made for its own model)")
    for key, value in (DEMO if args.demo else PAPER).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.resume and args.no_resume:
        raise UsageError("--resume and --no-resume contradict each other")
    refuse_idle_flags(args, given)
    return args


if __name__ == "__main__":  # Ctrl-C before training starts (after, a signal finishes the step)
    sys.exit(run_main(main, "train.py", "interrupted before training started, nothing lost: the "
                      "same command starts it"))
