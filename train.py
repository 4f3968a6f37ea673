"""LoRA fine-tuning of a LLaMA/Qwen chat model on multi-turn data, with ReSURE reweighting.

    python train.py                                   # demo: SmolLM2-135M + synthetic noisy dialogues, CPU
    python train.py --model DIR --data train.jsonl --out runs/x
    torchrun --nproc_per_node=4 train.py --model DIR --data train.jsonl --dtype bf16 --grad-checkpointing

One optimizer step = grad_accum micro-steps on every rank. Each micro-step: forward to per-token losses, per-unit
losses (a dialogue, or one assistant turn), all-gather (loss, group, tokens) so every rank weighs the same global
batch identically (resure.py), backward on the local share of Eq. 1. Only the LoRA adapter is trained.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from data import ChatTemplate, Sampler, build_examples, collate, load_conversations
from lora import apply_lora, load_adapter, save_adapter, export_merged
from resure import ReSURE, all_reduce_sum, count_units, gather, prefilter, reweighted_loss, unit_losses


class UsageError(ValueError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage block first)
        print(f"train.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# Paper settings (ReSURE, Sec. 4): used whenever --model is given and a flag is left out.
PAPER = dict(lora_r=128, lora_alpha=16, lora_dropout=0.3, lr=1e-5, warmup_ratio=0.01, batch_size=4, grad_accum=4,
             epochs=3, max_len=2048, alpha=1.0, floor_percentile=5.0, warmup_samples=640, ramp_steps=100,
             unit="dialogue", stats="welford", stats_update="reliable",
             dtype="bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32")
# Demo settings: small enough for 2 CPU cores in minutes, strong enough that the effect shows (printed at start).
DEMO = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lr=1e-3, warmup_ratio=0.05, batch_size=8, grad_accum=1,
            epochs=1, max_len=256, alpha=1.0, floor_percentile=5.0, warmup_samples=64, ramp_steps=10, dtype="fp32",
            stats="ema", stats_update="winsorized", unit="turn", max_steps=45)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="Hugging Face folder (config.json, safetensors, tokenizer.json); none: the SmolLM2 demo")
    a("--data", help="training conversations (.jsonl or .json, OpenAI messages or ShareGPT)")
    a("--eval-data", help="held-out conversations for per-turn loss every --eval-every steps")
    a("--warmup-data", help="high-quality conversations to initialize the statistics from (paper: 640)")
    a("--out", default="out", help="output folder (checkpoints, adapter, metrics.jsonl, report)")
    a("--chat-template", default=None, help="force a template (qwen2.5, smollm2, llama3, qwen3, chatml)")
    a("--on-bad-sample", choices=["error", "skip"], default="error")
    # schedule
    a("--epochs", type=float, default=None, help="paper: 3")
    a("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=None, help="per device; paper: 4")
    a("--grad-accum", type=int, default=None, help="paper: 4 (4 GPUs x 4 x 4 = 64)")
    a("--lr", type=float, default=None, help="paper: 1e-5, cosine")
    a("--warmup-ratio", type=float, default=None, help="linear lr warm-up fraction; paper: 0.01")
    a("--weight-decay", type=float, default=0.0)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0)
    a("--max-len", type=int, default=None, help="tokens; longer dialogues lose trailing turns")
    a("--seed", type=int, default=42)
    a("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="base weights + autocast; adapter stays fp32")
    a("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    a("--group-by-length", action="store_true", help="batch similar lengths together to cut padding")
    # LoRA
    a("--lora-r", type=int, default=None, help="paper: 128")
    a("--lora-alpha", type=float, default=None, help="paper: 16")
    a("--lora-dropout", type=float, default=None, help="paper: 0.3")
    # ReSURE
    a("--method", choices=["resure", "sft", "global", "hard"], default="resure",
      help="sft = every weight 1; global = one group for all depths; hard = flagged units get weight 0")
    a("--unit", choices=["dialogue", "turn"], default=None, help="what one loss l_s is (paper: dialogue)")
    a("--loss-norm", choices=["sample", "token"], default="sample", help="Eq. 1 (sample) or per token")
    a("--alpha", type=float, default=None, help="tau = mu + alpha * sigma (Eq. 5); paper: 1.0")
    a("--floor-percentile", type=float, default=None, help="eps = this percentile of batch weights; paper: 5")
    a("--warmup-samples", type=int, default=None, help="units seen before detection starts; paper: 640")
    a("--ramp-steps", type=int, default=None, help="steps over which down-weighting is blended in")
    a("--max-turn-groups", type=int, default=8, help="deeper turns share the last group")
    a("--stats", choices=["welford", "ema", "window", "mad"], default=None, help="running estimator; paper: welford")
    a("--stats-update", choices=["reliable", "winsorized", "all"], default=None,
      help="which units update the statistics; paper: reliable")
    a("--ema-decay", type=float, default=0.05)
    a("--window", type=int, default=256)
    a("--prefilter-keep", type=float, default=1.0, help="static baseline: keep the lowest-loss fraction first")
    a("--record-units", action="store_true", help="write every unit's loss/tau/weight to units.jsonl")
    # output
    a("--log-every", type=int, default=10)
    a("--eval-every", type=int, default=0, help="0: only at the end")
    a("--save-every", type=int, default=0, help="0: only at the end")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out (automatic if present)")
    a("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    a("--merge", action="store_true", help="also export a merged Hugging Face folder to OUT/merged")
    a("--report-top", type=int, default=20, help="most down-weighted samples listed in report.json")
    a("--demo-eval", type=int, default=32, help="demo only: clean test dialogues scored before and after")
    args = p.parse_args(argv)
    args.demo = args.model is None and args.data is None
    if (args.model is None) != (args.data is None):
        raise UsageError("give both --model and --data, or neither for the demo")
    for k, v in (DEMO if args.demo else PAPER).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("batch_size", "grad_accum", "lora_r", "max_len"):
        if getattr(args, k) <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if not 0 < args.prefilter_keep <= 1:
        raise UsageError(f"--prefilter-keep must be in (0, 1], got {args.prefilter_keep}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# distributed + determinism

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, local, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, local, torch.device("cpu")


def rng_state():  # plain types and tensors only, so torch.load(weights_only=True) reads it back
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


class TokenLoss(nn.Module):
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
def score_units(net, examples, pad_id, device, unit, batch_size=8, autocast=nullcontext):
    """Per-unit losses of examples under net (for warm-up statistics and static pre-filtering)."""
    net.eval()
    out_l, out_g = [], []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
        u = unit_losses(tok.float(), b["labels"], b["turn_ids"], b["group"], unit)
        out_l.append(u[0].double().cpu())
        out_g.append(u[1].cpu())
    net.train()
    return torch.cat(out_l).numpy(), torch.cat(out_g).numpy()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: OUT/step-0000100/ written as OUT/.tmp-step-0000100/ then renamed (a kill mid-write leaves the
# previous checkpoint intact); the newest two are kept.

def checkpoints(out):
    if not os.path.isdir(out):
        return []
    return sorted(d for d in os.listdir(out) if d.startswith("step-") and os.path.isdir(os.path.join(out, d)))


def save_checkpoint(out, step, net, opt, scaler, rs, args, rank, world):
    tmp, final = os.path.join(out, f".tmp-step-{step:07d}"), os.path.join(out, f"step-{step:07d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(net, tmp, args.model)
        torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                   os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "resure_state.json"), "w") as f:
            json.dump(rs.state_dict(), f)
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({"step": step, "world_size": world, "args": vars(args)}, f, indent=1, default=str)
    if world > 1:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(str(step))
        os.replace(tmp, final)
        for old in checkpoints(out)[:-2]:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(path, net, opt, scaler, rs, rank):
    load_adapter(net, path)
    state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    with open(os.path.join(path, "resure_state.json")) as f:
        rs.load_state_dict(json.load(f))
    rng = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=True))
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)["step"]


# ----------------------------------------------------------------------------------------------------------------

def load_examples(path, template, args, label):
    if not os.path.isfile(path):
        raise UsageError(f"{label} {path}: no such file")
    convs = load_conversations(path, on_bad_sample=args.on_bad_sample)
    examples, report = build_examples(convs, template, args.max_len, args.max_turn_groups)
    if not examples:
        raise UsageError(f"{path}: no usable conversation ({report.summary()})")
    return examples, report


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank, device = setup_distributed()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    demo_test = None
    if args.demo:
        args, demo_test = prepare_demo(args, log)
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a folder")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext

    # model, adapter, data
    net = M.Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    if args.grad_checkpointing:
        net.gradient_checkpointing = True
    template = ChatTemplate.from_pretrained(args.model, name=args.chat_template)
    examples, report = load_examples(args.data, template, args, "--data")
    log(f"data: {args.data}: {report.summary()}")
    eval_examples = load_examples(args.eval_data, template, args, "--eval-data")[0] if args.eval_data else None
    if args.prefilter_keep < 1:  # Sec. 5.2 baseline: base-model loss as the quality indicator
        scores, _ = score_units(net, examples, template.pad_id, device, "dialogue", autocast=amp)
        keep = prefilter(scores, keep=args.prefilter_keep)
        log(f"prefilter: kept {len(keep)} of {len(examples)} samples (lowest base-model loss)")
        examples = [dict(examples[i], index=j) for j, i in enumerate(keep)]
    rs = ReSURE(alpha=args.alpha, floor_percentile=args.floor_percentile, warmup_samples=args.warmup_samples,
                ramp_steps=args.ramp_steps, max_turn_groups=args.max_turn_groups, mode=args.method,
                stats=args.stats, stats_update=args.stats_update, ema_decay=args.ema_decay, window=args.window,
                record=master)  # per-unit records for units.jsonl and report.json
    if args.warmup_data:
        wex, _ = load_examples(args.warmup_data, template, args, "--warmup-data")
        wl, wg = score_units(net, wex, template.pad_id, device, args.unit, autocast=amp)
        rs.warmup_from(wl, wg)
        log(f"statistics initialized from {len(wex)} samples of {args.warmup_data}")

    apply_lora(net, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, verbose=master)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    ddp = DDP(TokenLoss(net), device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 \
        else TokenLoss(net)

    sampler = Sampler(len(examples), args.batch_size, rank=rank, world_size=world, seed=args.seed, shuffle=True,
                      group_by_length=[len(e["input_ids"]) for e in examples] if args.group_by_length else None)
    micro_per_epoch = len(sampler)
    tail = len(examples) % (args.batch_size * world)
    if 0 < tail < world:  # the last global batch would leave some rank empty: drop it, and say so
        micro_per_epoch -= 1
        log(f"sampler: dropping the last {tail} samples of each epoch (fewer than {world} ranks)")
    total = args.max_steps or max(1, int(args.epochs * micro_per_epoch) // args.grad_accum)
    warmup = math.ceil(args.warmup_ratio * total)
    epoch_batches = {}

    def micro_batch(m):  # the m-th micro-batch of the run, across epochs: (epoch, position) is all the state
        epoch, pos = divmod(m, micro_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = sampler.global_batches(epoch)
        return sampler.rank_slice(epoch_batches[epoch][pos])

    step = 0
    os.makedirs(args.out, exist_ok=True)
    ckpts = checkpoints(args.out)
    if ckpts and not args.no_resume:
        step = load_checkpoint(os.path.join(args.out, ckpts[-1]), net, opt, scaler, rs, rank)
        log(f"resumed from {ckpts[-1]} (step {step})")
    elif args.resume:
        raise UsageError(f"--resume: no checkpoint in {args.out}")
    log(f"training {total} steps x {args.grad_accum} micro-batches x {args.batch_size} x {world} ranks; "
        f"method={args.method} unit={args.unit} stats={args.stats}/{args.stats_update} dtype={args.dtype}")

    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if master else None
    units_log = open(os.path.join(args.out, "units.jsonl"), "a") if master and args.record_units else None
    last_seen = {}  # (sample index, turn) -> last record, for the final report
    t0, tokens_since, skipped = time.time(), 0, 0
    net.train()
    while step < total:
        lr = cosine_lr(step, total, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [collate([examples[i] for i in micro_batch(step * args.grad_accum + k)], template.pad_id)
                   for k in range(args.grad_accum)]
        local = [count_units(b["labels"], b["turn_ids"], args.unit) for b in batches]
        total_units, total_tokens = all_reduce_sum(sum(u for u, _ in local), sum(t for _, t in local))
        rs_before = rs.state_dict()  # a fresh copy: restored if this step is skipped
        sum_loss = sum_wloss = 0.0
        step_recs = []  # master only (record=master): sample, turn, group, loss, tau, weight, flagged, warmup
        for k, b in enumerate(batches):
            b = {key: v.to(device) for key, v in b.items()}
            sync = nullcontext() if (world == 1 or k == len(batches) - 1) else ddp.no_sync()
            with sync:
                with amp():
                    tok = ddp(b["input_ids"], b["labels"], b["attention_mask"])
                losses, groups, ntok, sidx, turn = unit_losses(tok.float(), b["labels"], b["turn_ids"],
                                                               b["group"], args.unit)
                g_l, g_g, g_ids, g_turn, offsets = gather(losses.detach(), groups, b["index"][sidx], turn)
                weights, _ = rs.weigh(g_l, g_g, ids=g_ids, turns=g_turn)
                lo, hi = offsets[rank], offsets[rank + 1]
                loss = reweighted_loss(losses, ntok, weights[lo:hi], norm=args.loss_norm, total_units=total_units,
                                       total_tokens=total_tokens, world_size=world)
                (scaler.scale(loss) if scaler else loss).backward()
            sum_loss += float(np.sum(g_l[np.isfinite(g_l)]))
            sum_wloss += float(np.sum((weights * np.nan_to_num(g_l, nan=0.0, posinf=0.0))))
            step_recs += rs.pop_records()
            tokens_since += int(b["attention_mask"].sum())
        if scaler:
            scaler.unscale_(opt)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        if scaler:  # fp16: the scaler skips an overflowing step itself and lowers its scale
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            ok = scaler.get_scale() >= scale
        else:  # a non-finite loss inside the model poisoned the gradients: skip the step
            ok = math.isfinite(gnorm)
            if ok:
                opt.step()
        if not ok:  # counted, and this step's units leave no trace in the statistics
            skipped += 1
            rs.load_state_dict(rs_before)
        for rec in step_recs:  # logged as skipped, and not in the report, when the step was undone
            rec.update(step=step, skipped=not ok)
            if ok:
                last_seen[(rec["sample"], rec["turn"])] = rec
            if units_log:
                units_log.write(json.dumps(rec) + "\n")
        opt.zero_grad(set_to_none=True)
        step += 1

        if master and (step % args.log_every == 0 or step == total):
            dt = time.time() - t0
            summ = rs.summary()
            rec = dict(step=step, epoch=step * args.grad_accum / micro_per_epoch, loss=sum_loss / total_units,
                       weighted_loss=sum_wloss / total_units, lr=lr, grad_norm=gnorm,
                       tokens_per_s=tokens_since * world / dt, eta_s=dt / args.log_every * (total - step),
                       skipped_steps=skipped, **summ)
            t0, tokens_since = time.time(), 0
            metrics.write(json.dumps(rec, default=float) + "\n")
            metrics.flush()
            log(format_log(rec))
        for w in rs.warnings():
            log(w)
        if eval_examples and args.eval_every and step % args.eval_every == 0 and master:
            log_eval(net, eval_examples, template, metrics, step, log)
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(args.out, step, net, opt, scaler, rs, args, rank, world)

    save_checkpoint(args.out, step, net, opt, scaler, rs, args, rank, world)
    if master:
        finish(args, net, rs, examples, last_seen, eval_examples, template, metrics, step, log)
        if demo_test is not None:
            demo_report(args, net, template, demo_test, log)
    if dist.is_initialized():  # torchrun, also with one rank
        dist.destroy_process_group()
    return net


def format_log(r):
    f = (lambda x, fmt=".3f": "-" if x is None else format(x, fmt))
    groups = " ".join(f"b{g}:loss={f(s['batch_loss'])},mu={f(s['mu'])},tau={f(s['tau'])},flag={f(s['flagged'], '.2f')}"
                      for g, s in sorted(r.get("groups", {}).items()))
    return (f"step {r['step']:5d} ep {r['epoch']:.2f} loss {r['loss']:.4f} wloss {r['weighted_loss']:.4f} "
            f"lr {r['lr']:.2e} gnorm {r['grad_norm']:.3f} tok/s {r['tokens_per_s']:.0f} "
            f"eta {r['eta_s'] / 60:.1f}m | {groups}")


def log_eval(net, eval_examples, template, metrics, step, log):
    from eval import per_turn_loss
    res = per_turn_loss(net, eval_examples, pad_id=template.pad_id)  # in eval mode, then back
    metrics.write(json.dumps({"step": step, "eval": res}, default=float) + "\n")
    log(f"eval step {step}: " + json.dumps(res, default=float))


def finish(args, net, rs, examples, last_seen, eval_examples, template, metrics, step, log):
    adapter = os.path.join(args.out, "adapter")
    save_adapter(net, adapter, args.model)
    with open(os.path.join(args.out, "resure_state.json"), "w") as f:
        json.dump(rs.state_dict(), f, indent=1)
    recs = sorted(last_seen.values(), key=lambda r: r["weight"])
    top = []
    for r in recs[:args.report_top]:
        ex = examples[r["sample"]]
        meta = ex.get("meta", {})
        top.append(dict(r, id=meta.get("id", r["sample"]), snippet=snippet(ex, template, r["turn"])))
    report = {"steps": step, "most_down_weighted": top}
    pr = flag_quality(recs, examples)
    if pr:
        report["flagging"] = pr
        fmt = (lambda x: "-" if x is None else f"{x:.2f}")
        log(f"flagging vs noise labels: precision {fmt(pr['precision'])} recall {fmt(pr['recall'])} "
            f"({pr['flagged']} flagged, {pr['noisy']} noisy of {pr['units']} units, last sighting of each)")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    if eval_examples:
        log_eval(net, eval_examples, template, metrics, step, log)
    if args.merge:
        export_merged(net, args.model, os.path.join(args.out, "merged"))
        log(f"merged model written to {os.path.join(args.out, 'merged')}")
    log(f"adapter written to {adapter}")


def unit_noisy(ex, turn):
    """Noise label of a unit: its own turn (unit=turn) or any supervised turn of the dialogue (unit=dialogue)."""
    flags = ex.get("meta", {}).get("noisy")
    if flags is None:
        return None
    n = ex.get("n_turns", len(flags))
    flags = [bool(x) for x in flags[:n]]
    return flags[turn - 1] if turn > 0 else any(flags)


def flag_quality(recs, examples):
    pairs = [(r["flagged"], unit_noisy(examples[r["sample"]], r["turn"])) for r in recs]
    pairs = [(f, n) for f, n in pairs if n is not None]
    if not pairs:
        return None
    tp = sum(f and n for f, n in pairs)
    nf, nn_ = sum(f for f, _ in pairs), sum(n for _, n in pairs)
    return dict(units=len(pairs), flagged=nf, noisy=nn_, precision=tp / nf if nf else None,
                recall=tp / nn_ if nn_ else None)


def snippet(ex, template, turn, n=80):
    lab = ex["labels"]
    ids = [t for t, l, tid in zip(ex["input_ids"], lab, ex["turn_ids"]) if l != -100 and (turn <= 0 or tid == turn)]
    return template.tokenizer.decode(ids)[:n]


# ----------------------------------------------------------------------------------------------------------------
# demo: `python train.py` with no --model/--data

DEMO_START = time.time()


def prepare_demo(args, log):
    from data import synth
    cache = os.environ.get("RESURE_CACHE", os.path.expanduser("~/.cache/resure"))
    args.model = M.prepare_smollm2()
    data_dir = os.path.join(cache, f"synth-seed{args.seed}")
    if not os.path.isfile(os.path.join(data_dir, "synth_meta.json")):  # written last: the set is complete
        synth(data_dir, seed=args.seed)
    args.data = os.path.join(data_dir, "train_N.jsonl")
    log("demo: SmolLM2-135M-Instruct + LoRA + ReSURE on the synthetic noisy multi-turn benchmark (tier N)")
    log("demo settings: " + " ".join(f"{k}={getattr(args, k)}" for k in DEMO))
    return args, os.path.join(data_dir, "test.jsonl")


def demo_report(args, net, template, test_path, log):
    from eval import accuracy
    from lora import disabled
    t0 = time.time()
    convs = load_conversations(test_path)[:args.demo_eval]
    net.eval()
    after = accuracy(net, template, convs)
    with disabled(net):  # the base model
        before = accuracy(net, template, convs)
    log(f"clean-test exact match ({len(convs)} dialogues, {before['total']} turns, {time.time() - t0:.0f} s): "
        f"before {before['overall']:.3f} -> after {after['overall']:.3f}")
    log(f"demo done in {time.time() - DEMO_START:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
