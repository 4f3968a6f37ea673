"""LoRA fine-tuning of a LLaMA / Qwen chat model on multi-turn dialogues, with ReSURE reweighting.

    python train.py                             # the demo: SmolLM2-135M, noisy dialogues, CPU
    python train.py --model DIR --data train.jsonl --out runs/x
    torchrun --nproc_per_node=4 train.py --model DIR --data train.jsonl --out runs/x

One optimizer step = grad_accum micro-batches on every rank. Per micro-batch: per-token losses,
per-unit losses (a dialogue or one assistant turn), all-gathered so that every rank weighs the
same global batch (resure.py), backward on this rank's share of Eq. 7 (ReSURELoss below); only the
LoRA adapter trains. The run folder (support/runs.py) loses nothing: checkpoints are whole or
absent, a signal finishes the step and saves, a rerun resumes exactly.
"""
import argparse
import copy
import gc
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
from resure import ReSURE, count_units, gain_of, prefilter
from resure import reweighted_loss, unit_losses
from support.distributed import all_reduce_sum, gather
from support import runs
from support.checkpoint import read_json
from support.cli import Parser, UsageError, given_flags, num
from support.conversations import load_conversations, read_scores
from support.export import export_merged
from support.report import flag_report, log_line

START = time.time()  # the demo reports its whole time
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()

# The paper's settings (Sec. 4), for a flag left out under --model; the README lists deviations.
PAPER = dict(
    lora_r=128, lora_alpha=16, lora_dropout=0.3,
    lr=1e-5, warmup_ratio=0.01, epochs=3,
    batch_size=4, grad_accum=4, max_len=2048,  # 4 GPUs x 4 x 4 = 64 dialogues per step
    unit="dialogue", alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=25,
    stats="welford", stats_update="reliable",
    grad_checkpointing=True, dtype="bf16" if BF16 else "fp32",
)
# The demo: minutes on 2 CPU cores, and the effect shows (its settings are printed at the start).
DEMO = dict(
    lora_r=16, lora_alpha=32, lora_dropout=0.05,
    lr=1e-3, warmup_ratio=0.05, epochs=1, max_steps=45,
    batch_size=8, grad_accum=1, max_len=256,
    unit="turn", alpha=1.0, floor_percentile=5.0, warmup_samples=64, ramp_steps=10,
    stats="ema", stats_update="winsorized",
    grad_checkpointing=False, dtype="fp32",
)
# Flags that do not change what a run computes; resuming with any other flag changed is refused.
NOT_RUN_KEYS = ("data", "eval_data", "out", "record_units", "log_every", "eval_every",
                "save_every", "resume", "no_resume", "allow_changed_config", "merge", "report_top",
                "demo_eval", "demo")
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
        free = args.detector == "loss+gain"
        groups = args.max_turn_groups or None
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
    start = shared_start(ids, labels)
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


def shared_start(ids, labels):
    """How many unsupervised tokens every free row starts with, less one (the last of them is where
    the scoring of each row begins)."""
    same = (ids == ids[:1]) & (labels == -100)
    return max(0, int(same.all(0).long().cumprod(0).sum()) - 1)


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
        if rest < self.world:
            return rest
        return 0

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
    """One training run, as build() makes it. train_step() advances it; support/runs.py keeps it
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
        """Put what trainer_state() and unit_state() returned back in place; the optimizer keeps
        this command's betas and weight decay (--allow-changed-config may have changed them)."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.opt.load_state_dict(trainer["optimizer"])
        for group, own in zip(self.opt.param_groups, settings):
            group.update(own)
        self.scaler.load_state_dict(trainer["scaler"])
        self.rs.load_state_dict(state["resure"])
        self.last_seen = {(r["sample"], r["turn"]): r for r in state["last_seen"]}

    def save_state(self, path):
        """This run's part of checkpoint folder `path`: the adapter, trainer.pt (optimizer, scaler)
        and state.json (ReSURE, the report's table); support/runs.py writes the rest."""
        save_adapter(self.net, path, self.args.model)
        torch.save(self.trainer_state(), os.path.join(path, "trainer.pt"))
        runs.dump(self.unit_state(), os.path.join(path, "state.json"))

    def load_state(self, path):
        """Restore save_state()'s files. Each is read and checked before anything changes, and a
        failure half way puts back what was there: a damaged checkpoint leaves a fresh run fresh."""
        trainer_file = os.path.join(path, "trainer.pt")
        trainer = torch.load(trainer_file, weights_only=True, map_location="cpu")
        state = read_json(os.path.join(path, "state.json"), runs.RunError)
        if not isinstance(state.get("last_seen"), list):
            raise runs.RunError(f"{path}/state.json: no list of units")
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
            save_checkpoint(run, folder, step)
            stop.exit_after(step)  # saying which command continues (Folder.continuing)
        if args.save_every and step % args.save_every == 0 and step < run.total:
            save_checkpoint(run, folder, step)
    if blind:  # the last steps' every loss was NaN: the adapter diverged, nothing final is written
        raise UsageError(f"the last {blind} steps had no finite unit loss: the adapter diverged "
                         "(is --lr too high?)")
    save_checkpoint(run, folder, step)


def log_step(run, result, tokens, seconds, skipped):
    """(rank 0) The step's line on stdout and in metrics.jsonl; tokens: this rank's in `seconds`."""
    if run.rank != 0:
        return
    eta = seconds / run.args.log_every * (run.total - result.step)
    record = dict(step=result.step, epoch=result.epoch, loss=result.loss,
                  weighted_loss=result.weighted_loss, lr=result.lr, grad_norm=result.grad_norm,
                  tokens_per_s=tokens * run.world / seconds, eta_s=eta, skipped_steps=skipped,
                  **run.rs.summary())
    runs.append_jsonl(os.path.join(run.args.out, "metrics.jsonl"), [record])
    print(log_line(record))


def log_eval(run, step):
    """(rank 0) --eval-data's per-turn loss (eval.per_turn_loss) in metrics.jsonl and stdout."""
    if run.rank != 0 or not run.eval_examples:
        return
    res = per_turn_loss(run.net, run.eval_examples, pad_id=run.template.pad_id)  # eval mode
    runs.append_jsonl(os.path.join(run.args.out, "metrics.jsonl"), [{"step": step, "eval": res}])
    print(f"eval step {step}: " + json.dumps(res, default=float))


def save_checkpoint(run, folder, step):
    """Checkpoint step-NNNNNNN, whole or not at all; an adapter gone NaN or infinite is refused."""
    if all(bool(torch.isfinite(p).all()) for p in run.params):
        folder.save(step, run.save_state)
        return
    previous = folder.checkpoints()
    last = f"the last good checkpoint is {previous[-1]}" if previous else "nothing was saved"
    raise runs.RunError(f"the adapter's weights are NaN or infinite after step {step} (is --lr "
                        f"too high?); {last}")


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
    return Run(args=args, rank=rank, world=world, device=device, objective=objective, net=net,
               template=template, autocast=autocast, rs=rs, examples=examples,
               eval_examples=eval_examples, params=params, opt=opt, scaler=scaler,
               ddp=token_loss(net, world, device), sampler=sampler, total=total, warmup=warmup)


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


def token_loss(net, world, device):
    """What the backward runs through: TokenLoss(net), in DDP when several ranks train."""
    module = TokenLoss(net)
    if world == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=device_ids)


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
    n = len(examples)
    sampler = Sampler(n, args.batch_size * world, args.seed, rank, world, lengths)
    if sampler.per_epoch < 1:
        raise UsageError(f"--data {args.data}: {n} examples cannot feed {world} ranks")
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


def teardown(run, folder):
    """The end of main, also on an error: the lock given back, then DDP (unwrapped and collected:
    a reducer in a reference cycle that outlives the gloo group makes torch 2.13 abort at exit now
    and then), then the process group."""
    folder.release()
    if run is not None and isinstance(run.ddp, DDP):
        run.ddp = run.ddp.module
    gc.collect()
    if dist.is_initialized():  # torchrun, also with one rank
        dist.destroy_process_group()


def main(argv=None, objective=None):
    """Train; returns the finished Run, None when --out already held this run, finished.
    objective: ReSURELoss() unless a baseline brings its own."""
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    folder = runs.Folder(args.out, rank, world, device, require_checkpoint=args.resume,
                         fresh=args.no_resume, allow_changed=args.allow_changed_config)
    run = None
    try:
        demo_test = resolve_model(args)
        check_inputs(args)
        identity = run_identity(args, world)
        # each setting's value when its flag is left out: what a record older than it ran with
        defaults = vars(parse_args([] if args.demo else ["--data", args.data]))
        if not folder.claim(identity, final_outputs(args), defaults):
            return None
        run = build(args, rank, world, device, objective or ReSURELoss())
        folder.start(getattr(run.net, "fingerprint", None))
        with runs.Stop(folder) as stop:  # a signal is answered after a step, or at the end
            step = resume(run, folder)
            announce(run)
            run.net.train()
            train(run, folder, step, stop)
            if rank == 0:
                finish(run, folder, demo_test)
            late = stop.requested()  # a collective: the other ranks wait for rank 0's writes
        if late:
            stop.exit_finished()
        return run
    finally:
        teardown(run, folder)


def resolve_model(args):
    """The demo fills --model and --data with its own (support/demo.py) and returns its clean
    test file; --data alone trains the demo's model with the paper's settings."""
    if args.demo:
        from support.demo import prepare  # the demo's files, made on first use
        args.model, args.data, test = prepare(args.seed)
        print0("demo: SmolLM2-135M-Instruct + LoRA + ReSURE on the synthetic noisy multi-turn "
               "benchmark (tier N)")
        print0("demo settings: " + " ".join(f"{k}={getattr(args, k)}" for k in DEMO))
        return test
    if args.model is None:
        from support.smollm2 import prepare_smollm2  # converted from its GGUF on first use
        args.model = prepare_smollm2()
    return None


def check_inputs(args):
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")


def run_identity(args, world):
    """run.json's record of the settings that change what the run computes, and of its inputs."""
    keys = [k for k in vars(args) if k not in NOT_RUN_KEYS]
    return runs.identity(args, keys, world)


def resume(run, folder):
    """The step the checkpoint resumed (a step past the run's end is refused); one of other
    settings (--allow-changed-config) leaves its report table, which may number other examples."""
    step = folder.resume(run.load_state)
    if step > run.total:
        raise UsageError(f"{run.args.out}: its checkpoint is at step {step}, past this run's "
                         f"{run.total} steps (--max-steps, --epochs)")
    if folder.resumed_changes and run.last_seen:
        run.last_seen = {}
        print0(f"report.json: lists the units of steps {step + 1} on (the checkpoint's run had "
               "other settings)")
    return step


def announce(run):
    """(rank 0) The run's steps; under --model, an effective batch other than the paper's 64 in
    one line: Eq. 6's floor is a percentile over one gathered micro-batch (the paper's 4 x 4)."""
    args = run.args
    micro = args.batch_size * run.world
    print0(f"training {run.total} steps x {args.grad_accum} micro-batches x {args.batch_size} x "
           f"{run.world} ranks; method={args.method} unit={args.unit} "
           f"stats={args.stats}/{args.stats_update}")
    if not args.demo and micro * args.grad_accum != 64:
        print0(f"batch: {micro * args.grad_accum} samples per optimizer step, the paper's 64; Eq. "
               f"6's floor is a percentile over each micro-batch's {micro} gathered samples (the "
               "paper's 16)")


def final_outputs(args):
    """What a finished run leaves in OUT, relative to it."""
    outputs = [os.path.join("adapter", "adapter_model.safetensors")]
    if args.merge:
        outputs.append("merged")
    return outputs


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
    units = run.last_seen.values()
    table = flag_report(units, run.examples, run.template, args.report_top, views)
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
# The command line

POSITIVE = num(float, 0, lo_ok=False)
COUNT = num(int, 1, 10**9, hi_ok=True)
NONNEGATIVE = num(float, 0)
NONNEGATIVE_INT = num(int, 0, 10**9, hi_ok=True)


def parser():
    p = Parser(prog="train.py", description=__doc__.split("\n")[0],
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
        "loss+gain: also a context gain outside mu_g +- gain_alpha sigma_g (ours)")
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


def parse_args(argv=None):
    """The flags, each left out taking the paper's (the demo's) value; contradicting or idle
    flags are refused in one line."""
    p = parser()
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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError, MemoryError) as e:  # bad input: one line, exit 2
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started (then a signal finishes the step)
        print("train.py: interrupted before training started, nothing lost: the same command "
              "starts it", file=sys.stderr)
        sys.exit(130)
