"""Speed of our model.py + lora.py against transformers + PEFT on the same work.

    python bench/speed.py                  # SmolLM2-135M-Instruct, more repetitions (minutes)
    python bench/speed.py --quick          # < 5 minutes on 2 CPU cores
    python bench/speed.py --tiny           # a tiny random llama, seconds (what CI runs)
    python bench/speed.py --model DIR --out results/   # any llama-family folder; writes speed.md + speed.json
    python bench/speed.py --device cuda    # the same on a GPU (memory = torch.cuda.max_memory_allocated)

Everything runs on --device (default: the CPU, even where a GPU is present). Every A/B measurement runs both sides in this process,
alternating them ABBA (so a slow drift of the machine hits both alike), after one warm-up call each, with the same
torch thread count; the table shows medians.
  train    one LoRA training step: forward, backward, AdamW step. LoRA r=16, alpha=32, no dropout, on every linear
           layer of the blocks; batch B x T random token ids, no padding, spans alternating context / assistant so
           about half the tokens are supervised (the same ids and labels for both). Ours: model.token_losses, mean
           over the supervised tokens; theirs: LlamaForCausalLM(labels=...).loss, the same mean. fp32, and bf16 =
           base weights in bf16 + torch.autocast(bf16) for both (adapters fp32 on both sides); both run torch's
           own kernels.
  memory   peak resident memory of a training run: each (implementation, dtype) in its own fresh subprocess, which
           imports its libraries, resets the kernel's peak counter (/proc/self/clear_refs), then loads the model and
           runs 2 steps (--quick: 1); peak = VmHWM - VmRSS at the reset (library imports are not counted for
           either side; what our code imports lazily while loading is). The whole-process VmHWM is shown too.
  resure   ReSURE's extra work in our training step (unit losses per assistant turn, gather, weigh, the Eq. 7 loss
           and its backward) timed on its own, over our plain step (mean over supervised tokens); beside it a
           whole-step A/B of the two (at the 3% level usually inside the step-to-step noise, shown beside it).
  generate greedy decoding of N new tokens at batch 1 and 8 (random prompts of 24-64 tokens, left padded), no early
           stop on either side so both produce exactly N tokens; includes the prefill. Ours: model.generate with no
           stop ids; theirs: model.generate(do_sample=False, min_new_tokens=N), which suppresses EOS where ours emits
           it and goes on, so "identical" compares the tokens before our first EOS.
  load     checkpoint folder -> model in memory: Transformer.from_pretrained vs AutoModelForCausalLM.from_pretrained,
           the first load in a fresh process (libraries imported before the clock starts; what a command line pays)
           and repeated loads in one process.
  peak     fraction of this machine's matmul peak: best FLOP/s over n x n matmuls and the model's own largest GEMM
           shape, in the same dtype; the useful FLOPs of a LoRA step (train_flops below) / step time / that peak.
The table is marked unreliable when other processes used more than 0.2 cores on average during the run (all CPU time
in /proc/stat minus this process's and its children's): with 2 threads on 2 busy cores torch slows down many times.
"""
import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
from data import ChatTemplate, load_tokenizer, turn_group  # noqa: E402
from lora import DEFAULT_TARGETS, apply_lora  # noqa: E402
from support.checkpoint import CheckpointError  # noqa: E402
from support.export import TOKENIZER_FILES  # noqa: E402
from support.smollm2 import prepare_smollm2  # noqa: E402
import train  # noqa: E402
from resure import ReSURE, all_reduce_sum, count_units, gather, reweighted_loss, unit_losses  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"train_bf16": 1.0, "train_fp32": 1.25, "generate": 3.0, "resure_overhead": 0.03, "gain_overhead": 0.25}
DEV = torch.device("cpu")  # --device
BUSY = 0.2  # other processes using more than this many cores on average during the run: timings unreliable


class BenchError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------------- settings
PRESETS = {  # reps: timed repetitions per side (after one warm-up); mem_steps: steps in each memory subprocess
    "full": dict(batch=4, length=256, rank=16, reps=7, new_tokens=64, gen_batches=(1, 8), gen_reps=5, load_reps=5,
                 cold_reps=4, matmul_n=(1024, 2048, 3072), mem_steps=2, dtypes=("fp32", "bf16"),
                 resure_dtypes=("fp32", "bf16"), mem_dtypes=("fp32", "bf16"), gen_dtypes=("fp32", "bf16")),
    "quick": dict(batch=4, length=256, rank=16, reps=5, new_tokens=32, gen_batches=(1, 8), gen_reps=3, load_reps=3,
                  cold_reps=2, matmul_n=(1024, 2048), mem_steps=1, dtypes=("fp32", "bf16"), resure_dtypes=("fp32",),
                  mem_dtypes=("fp32", "bf16"), gen_dtypes=("fp32",)),
    "tiny": dict(batch=2, length=32, rank=4, reps=2, new_tokens=4, gen_batches=(1, 3), gen_reps=2, load_reps=2,
                 cold_reps=1, matmul_n=(128, 256), mem_steps=1, dtypes=("fp32", "bf16"),
                 resure_dtypes=("fp32", "bf16"), mem_dtypes=("fp32",), gen_dtypes=("fp32",)),
}


def cpu_info():
    """(CPU model name, which of the matmul-relevant ISA extensions it has), from one read of /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        info = {}
    flags = info.get("flags", "").split()
    return (info.get("model name") or platform.processor() or platform.machine(),
            [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags])


def machine(threads):
    cpu, isa = cpu_info()
    import transformers
    import peft
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg": os.getloadavg()}


class CpuShare:
    """CPU time used by OTHER processes while this one ran: /proc/stat busy time minus our own (and children's)."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.time(), self._busy(), self._own()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")  # user nice system idle iowait irq softirq steal ...
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, (v[7] if len(v) > 7 else 0) / tick

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self):
        """(cores used by others on average, cores stolen by the hypervisor on average); None without /proc."""
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = max(time.time() - self.t0, 1e-9)
        return (max(0.0, busy[0] - self.busy0[0] - (self._own() - self.own0)) / wall,
                (busy[1] - self.busy0[1]) / wall)


def make_tiny_model(out_dir, tokenizer_dir=None):
    """A tiny random llama written by transformers (the oracle), with a tokenizer copied from tokenizer_dir."""
    import transformers
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    vocab_size = load_tokenizer(tokenizer_dir).get_vocab_size(with_added_tokens=True) if tokenizer_dir else 512
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if tokenizer_dir and (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    return str(out_dir)


# ---------------------------------------------------------------------------------------------------------- data
def chat_batch(vocab, batch, length, seed=0):
    """Random ids; spans of 8..56 tokens alternate context / assistant (turn k = k-th assistant span) -> ~1/2
    supervised. Returns dict(input_ids, labels, attention_mask, turn_ids, group) and the supervised count."""
    g = np.random.default_rng(seed)
    ids = torch.from_numpy(g.integers(0, vocab, (batch, length))).long()
    labels = torch.full_like(ids, -100)
    turn_ids = torch.zeros_like(ids)
    for b in range(batch):
        pos, k, asst = 0, 0, False
        while pos < length:
            n = int(g.integers(8, 57))
            if asst:
                k += 1
                labels[b, pos:pos + n], turn_ids[b, pos:pos + n] = ids[b, pos:pos + n], k
            pos, asst = pos + n, not asst
    labels[:, 0] = -100
    group = torch.tensor([turn_group(t, l) for t, l in zip(turn_ids, labels)])
    out = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), turn_ids=turn_ids, group=group)
    return out, int((labels[:, 1:] != -100).sum())


def autocast(dtype):
    return (lambda: torch.autocast(DEV.type, dtype=dtype)) if dtype != torch.float32 else nullcontext


def on_device(b):
    return {k: v.to(DEV) for k, v in b.items()}


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- the sides
def load_ours(path, dtype, rank):
    net = M.Transformer.from_pretrained(path, dtype=dtype, device=DEV)
    apply_lora(net, r=rank, alpha=2 * rank, dropout=0.0, verbose=False)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net, opt


def load_hf(path, dtype, rank):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEV)
    hf = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                       target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    return hf, opt


def optimizer_step(opt, loss):
    """The rest of a training step, the same on every side: backward, AdamW step, gradients cleared."""
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def ours_step(net, opt, b, n_sup, amp):
    with amp():
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
    return optimizer_step(opt, tok.sum() / n_sup)


def resure_loss(tok, b, rs, gains=None):
    """What ReSURE adds to a train.py step of one micro-batch: the statistics' copy kept for a rollback, the step's
    unit and token totals, unit losses per turn, gather (losses, groups, sample ids, turns), weigh with per-unit
    records (then popped, as train.py writes them out), Eq. 1."""
    rs.state_dict()  # train.py keeps this copy to undo a skipped step
    total_units, total_tokens = all_reduce_sum(*count_units(b["labels"], b["turn_ids"], "turn"))
    losses, groups, ntok, sidx, turn = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], "turn")
    vals = losses.detach()[None]
    if gains:  # --detector loss+gain: each unit's context gain travels with its loss
        vals = torch.cat([vals, gains(losses.detach(), sidx, turn, len(b["input_ids"]))[None]])
    vals, g_groups, g_ids, g_turns, _ = gather(vals, groups, sidx, turn)
    weights, _ = rs.weigh(vals[0], g_groups, ids=g_ids, turns=g_turns, gains=vals[1] if gains else None)
    rs.pop_records()
    return reweighted_loss(losses, ntok, weights, norm="sample", total_units=total_units, total_tokens=total_tokens)


def resure_step(net, opt, b, rs, amp, free=None):
    with amp():
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
    return optimizer_step(opt, resure_loss(tok.float(), b, rs, free and (lambda *u: context_gain(net, free, amp, *u))))


def free_rows(b, header=6):
    """--detector loss+gain's extra input: every assistant span of the batch alone after `header` context tokens
    (the empty user turn of a chat template), as data.collate's free_* rows."""
    rows, head = [], b["input_ids"][0, :header].tolist()  # the same start on every row, as a template renders it
    for i, (ids, turns) in enumerate(zip(b["input_ids"], b["turn_ids"])):
        for k in turns.unique().tolist()[1:]:
            span = ids[turns == k].tolist()
            rows.append((i, k, head + span, [-100] * header + span))
    T = max(len(r[2]) for r in rows)
    return dict(free_ids=torch.tensor([r[2] + [0] * (T - len(r[2])) for r in rows]),
                free_labels=torch.tensor([r[3] + [-100] * (T - len(r[3])) for r in rows]),
                free_mask=torch.tensor([[1] * len(r[2]) + [0] * (T - len(r[2])) for r in rows]),
                free_unit=torch.tensor([r[:2] for r in rows]))


def context_gain(net, free, amp, losses, sidx, turn, batch):
    """The extra forward of --detector loss+gain: train.context_gain itself, the replies scored alone."""
    run = SimpleNamespace(net=net, amp=amp, args=SimpleNamespace(unit="turn"))
    return train.context_gain(run, dict(free, input_ids=range(batch)), losses, sidx, turn)


def hf_step(hf, opt, b, amp):
    with amp():
        loss = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                  use_cache=False).loss
    return optimizer_step(opt, loss)


def new_resure(seed=0, gain_alpha=None):
    """Active ReSURE (no warm-up, no ramp, per-unit records as train.py keeps them), statistics primed so that some
    units are flagged."""
    rs = ReSURE(warmup_samples=0, ramp_steps=0, record=True, gain_alpha=gain_alpha)
    g = np.random.default_rng(seed)
    groups = np.repeat(np.arange(1, 9), 32)
    rs.warmup_from(g.gamma(4.0, 2.0, len(groups)), groups, gains=None if gain_alpha is None else
                   g.normal(0.5, 0.5, len(groups)))
    return rs


# ------------------------------------------------------------------------------------------------------ timing
def alternate(fns, reps, warmup=1):
    """{name: [seconds]} for callables run ABBA-alternated, after `warmup` untimed calls each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in (names if i % 2 == 0 else names[::-1]):
            gc.collect()
            times[k].append(_timed(fns[k]))
    return times


def med(xs):
    return statistics.median(xs)


def matmul_peak(dtype, sizes, model_shape=None, reps=5):
    """Best FLOP/s over n x n x n matmuls (2 n^3 FLOPs) of the given sizes and the model's own largest GEMM
    shape (tokens x hidden) @ (hidden x intermediate): {"peak", "by_shape"}."""
    g = torch.Generator().manual_seed(0)
    shapes = [(n, n, n) for n in sizes] + ([model_shape] if model_shape else [])
    out = {}
    for m, k, n in shapes:
        a, b = (torch.randn(*s, generator=g).to(device=DEV, dtype=dtype) for s in ((m, k), (k, n)))
        a @ b
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / min(_timed(lambda: a @ b) for _ in range(reps))
    return {"peak": max(out.values()), "by_shape": out}


def copy_bandwidth(nbytes, reps=5):
    """Bytes per second (read + written) of copying one large tensor: what the memory system delivers in practice."""
    a = torch.ones(max(1, nbytes // 4), device=DEV)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() * 4 / min(_timed(lambda: b.copy_(a)) for _ in range(reps))


def _timed(f):
    sync()
    t0 = time.perf_counter()
    f()
    sync()
    return time.perf_counter() - t0


def train_flops(cfg, batch, length, n_sup, rank, targets=DEFAULT_TARGETS):
    """Useful FLOPs of one LoRA step (frozen base): forward 2*P*tokens for the block linears; backward needs only
    the input gradients of frozen weights (another 2*P*tokens) but input and weight gradients of the adapters
    (2 x their forward); causal attention QK^T and AV over the lower triangle, backward 2 x forward; lm_head at the
    supervised positions only, forward + input gradient. Recomputation and logits nobody needs do not count."""
    D, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
    tokens = batch * length
    dense = 2 * L * sum(i * o for i, o in shapes.values()) * tokens
    lora = 2 * L * sum(rank * (i + o) for n, (i, o) in shapes.items() if n in targets) * tokens
    attn = L * batch * cfg.num_attention_heads * 2 * 2 * cfg.head_dim * length * (length + 1) / 2
    head = 2 * D * V * n_sup
    return 2 * dense + 3 * lora + 3 * attn + 2 * head


# -------------------------------------------------------------------------------------------------- memory child
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/self/status has no {key}")


def mem_child(a):
    """Run in a fresh process: peak RSS of loading + a.mem_steps training steps of one implementation."""
    torch.set_num_threads(a.threads)
    b, n_sup = chat_batch(M.ModelConfig.from_json(a.model).vocab_size, a.batch, a.length)
    b = on_device(b)
    if a.mem_child == "hf":
        import peft  # noqa: F401  (imported before the reset: libraries are not the model's memory)
        import transformers  # noqa: F401
    importlib.import_module("torch._dynamo")  # AdamW's first step imports it (~74 MiB): a library, not the model
    dtype, amp = DTYPES[a.mem_dtype], autocast(DTYPES[a.mem_dtype])
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    base = _status_kib("VmRSS")
    if a.mem_child == "ours":
        net, opt = load_ours(a.model, dtype, a.rank)
        for _ in range(a.mem_steps):
            ours_step(net, opt, b, n_sup, amp)
    else:
        hf, opt = load_hf(a.model, dtype, a.rank)
        for _ in range(a.mem_steps):
            hf_step(hf, opt, b, amp)
    peak = _status_kib("VmHWM")
    if DEV.type == "cuda":  # GPU memory instead: the allocator's peak (nothing was allocated before the load)
        base, peak = 0, torch.cuda.max_memory_allocated() / 1024
    print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
                      "hwm_reset": reset}))


def load_child(a):
    """Run in a fresh process: seconds of the first checkpoint load (libraries already imported)."""
    torch.set_num_threads(a.threads)
    if a.load_child == "hf":
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        t0 = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=DTYPES[a.mem_dtype]).to(DEV)
    else:
        t0 = time.perf_counter()
        M.Transformer.from_pretrained(a.model, dtype=DTYPES[a.mem_dtype], device=DEV)
    sync()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def child(mode, impl, dtype, a, cfg):
    """Run this script as a fresh subprocess in mode mem|load; returns its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}-child", impl, "--mem-dtype", dtype,
           "--model", a.model, "--threads", str(a.threads), "--batch", str(cfg["batch"]),
           "--length", str(cfg["length"]), "--rank", str(cfg["rank"]), "--mem-steps", str(cfg["mem_steps"]),
           "--device", str(DEV)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    if p.returncode != 0:
        raise BenchError(f"{mode} subprocess {impl}/{dtype} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- benches
def bench_train(path, dtype_name, cfg, log):
    dtype, amp = DTYPES[dtype_name], autocast(DTYPES[dtype_name])
    mcfg = M.ModelConfig.from_json(path)
    b, n_sup = chat_batch(mcfg.vocab_size, cfg["batch"], cfg["length"])
    b = on_device(b)
    net, opt = load_ours(path, dtype, cfg["rank"])
    hf, hopt = load_hf(path, dtype, cfg["rank"])
    sides = {"ours": lambda: ours_step(net, opt, b, n_sup, amp), "hf": lambda: hf_step(hf, hopt, b, amp)}
    first = {k: f() for k, f in sides.items()}  # = warm-up
    t = alternate(sides, cfg["reps"], warmup=0)
    del hf, hopt
    gc.collect()
    tokens = cfg["batch"] * cfg["length"]
    res = {"tokens": tokens, "supervised": n_sup, "first_loss": first, "seconds": t,
           "tokens_per_s": {k: tokens / med(v) for k, v in t.items()},
           "flops": train_flops(mcfg, cfg["batch"], cfg["length"], n_sup, cfg["rank"])}
    log(f"  train {dtype_name}: ours {med(t['ours']):.3f} s/step, transformers+PEFT {med(t['hf']):.3f} s/step "
        f"(first-step loss {first['ours']:.4f} vs {first['hf']:.4f})")
    if dtype_name in cfg["resure_dtypes"]:
        res["resure"] = bench_resure(net, opt, b, n_sup, amp, cfg, dtype_name, log)
    return res


def bench_resure(net, opt, b, n_sup, amp, cfg, dtype_name, log):
    rs = new_resure()
    t2 = alternate({"resure": lambda: resure_step(net, opt, b, rs, amp),
                    "plain": lambda: ours_step(net, opt, b, n_sup, amp)}, cfg["reps"], warmup=0)
    with amp():
        with torch.no_grad():
            tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"]).float()
    tok.requires_grad_(True)
    book = []
    for _ in range(max(5, cfg["reps"] * 3)):  # the bookkeeping alone: unit losses + gather + weigh + Eq. 1 + its grad
        book.append(_timed(lambda: resure_loss(tok, b, rs).backward()))
    plain = t2["plain"]
    out = {"seconds": t2, "bookkeeping_s": book, "step_overhead": med(t2["resure"]) / med(plain) - 1,
           "step_spread": (max(plain) - min(plain)) / med(plain), "overhead": med(book) / med(plain)}
    log(f"  resure {dtype_name}: {med(t2['resure']):.3f} vs plain {med(plain):.3f} s/step; bookkeeping alone "
        f"{1e3 * med(book):.2f} ms")
    free, rg = on_device(free_rows(b)), new_resure(gain_alpha=2.0)  # --detector loss+gain against --detector loss
    t3 = alternate({"gain": lambda: resure_step(net, opt, b, rg, amp, free),
                    "loss": lambda: resure_step(net, opt, b, rs, amp)}, cfg["reps"], warmup=1)
    out["gain"] = {"seconds": t3, "free_tokens": int(free["free_mask"].sum()),
                   "overhead": med(t3["gain"]) / med(t3["loss"]) - 1}
    log(f"  loss+gain {dtype_name}: {med(t3['gain']):.3f} vs loss {med(t3['loss']):.3f} s/step "
        f"({int(free['free_mask'].sum())} extra forward tokens)")
    return out


def bench_generate(path, dtype_name, cfg, log):
    from transformers import AutoModelForCausalLM, GenerationConfig
    dtype = DTYPES[dtype_name]
    net = M.Transformer.from_pretrained(path, dtype=dtype, device=DEV).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEV).eval()
    vocab, n, stops = net.config.vocab_size, cfg["new_tokens"], set(ChatTemplate.from_pretrained(path).stop_ids)
    gcfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    wbytes = sum(p.numel() * p.element_size() for p in net.parameters())
    bw = copy_bandwidth(max(wbytes, 64 << 20))
    # batch 1 reads every weight once per new token: tokens/s <= bandwidth / weight bytes (generously taking the
    # copy's read + write rate as the read rate; KV cache and activations ignored)
    out = {"ceiling": {"weight_bytes": wbytes, "copy_bytes_per_s": bw, "tokens_per_s": bw / wbytes}}
    for B in cfg["gen_batches"]:
        g = np.random.default_rng(B)
        lens = [48] if B == 1 else g.integers(24, 65, B).tolist()
        prompts = [g.integers(0, vocab, L).tolist() for L in lens]
        L = max(lens)
        ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=DEV)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=DEV)
        res = {}

        def ours():
            res["ours"] = M.generate(net, prompts, max_new_tokens=n, stop_ids=(), pad_id=0)

        def theirs():
            with torch.no_grad():
                res["hf"] = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg)[:, L:].tolist()
        t = alternate({"ours": ours, "hf": theirs}, cfg["gen_reps"])
        counts = {k: sum(len(r) for r in v) for k, v in res.items()}
        if counts["ours"] != B * n or counts["hf"] != B * n:
            raise BenchError(f"generation made {counts} tokens, expected {B * n} each")
        # transformers' min_new_tokens suppresses EOS while ours emits it and goes on: compare up to the first stop
        cut = [next((i for i, t in enumerate(row) if t in stops), n) for row in res["ours"]]
        same = sum(x == y for a, b, c in zip(res["ours"], res["hf"], cut) for x, y in zip(a[:c], b[:c]))
        same /= max(1, sum(cut))
        out[B] = {"seconds": t, "tokens_per_s": {k: B * n / med(v) for k, v in t.items()}, "same_tokens": same}
        log(f"  generate {dtype_name} batch {B}: ours {out[B]['tokens_per_s']['ours']:.1f} tok/s, transformers "
            f"{out[B]['tokens_per_s']['hf']:.1f} tok/s, identical tokens {same:.0%}")
    return out


def bench_load(path, dtype_name, cfg, a, log):
    """Warm: repeated loads in this process. Cold: the first load in a fresh process (after its imports)."""
    from transformers import AutoModelForCausalLM
    dtype = DTYPES[dtype_name]

    def ours():
        M.Transformer.from_pretrained(path, dtype=dtype, device=DEV)

    def theirs():
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEV)
    t = alternate({"ours": ours, "hf": theirs}, cfg["load_reps"])
    cold = {"ours": [], "hf": []}
    for i in range(cfg["cold_reps"]):
        for k in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            cold[k].append(child("load", k, dtype_name, a, cfg)["seconds"])
    log(f"  load {dtype_name}: warm ours {med(t['ours']):.3f} s, transformers {med(t['hf']):.3f} s; cold ours "
        f"{med(cold['ours']):.3f} s, transformers {med(cold['hf']):.3f} s")
    return {"seconds": t, "cold_seconds": cold}


# --------------------------------------------------------------------------------------------------------- table
def ratio_row(name, ours, theirs, ratio, target=None, higher=True, fmt="{:.1f}"):
    if target is None:
        met = ""
    else:
        met = "yes" if (ratio >= target if higher else ratio <= target) else "**no**"
    tgt = "" if target is None else (f">= {target:g}x" if higher else f"<= {target:g}x")
    return f"| {name} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio:.2f}x | {tgt} | {met} |"


def table(r):
    m = r["machine"]
    lines = [f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} threads, transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}"
             + (f", GPU {m['cuda']} ({'used' if r['device'].startswith('cuda') else 'not used'})" if m["cuda"] else "") + f"; load average at start "
             f"{m['loadavg'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}.",
             f"Model: {r['model']} ({r['params'] / 1e6:.1f}M parameters); preset {r['preset']}; "
             f"train batch {r['cfg']['batch']} x {r['cfg']['length']}, LoRA r={r['cfg']['rank']} on "
             f"{', '.join(DEFAULT_TARGETS)}; medians of {r['cfg']['reps']} (train), {r['cfg']['gen_reps']} "
             f"(generate), {r['cfg']['load_reps']} (load) alternated repetitions.", "",
             "| measurement | ours (model.py + lora.py) | transformers + PEFT | ours vs theirs | target | met |",
             "|---|---|---|---|---|---|"]
    for d, tr in r["train"].items():
        tp = tr["tokens_per_s"]
        tgt = TARGETS.get(f"train_{d}")
        lines.append(ratio_row(f"LoRA train step, {d} (tokens/s)", tp["ours"], tp["hf"], tp["ours"] / tp["hf"],
                               tgt))
    for d, mem in r["memory"].items():
        o, h = mem["ours"]["delta_mib"], mem["hf"]["delta_mib"]
        lines.append(ratio_row(f"peak memory of training, {d} (MiB above the libraries' imports)", o, h, o / h,
                               1.0, higher=False, fmt="{:.0f}"))
        o, h = mem["ours"]["peak_mib"], mem["hf"]["peak_mib"]
        lines.append(ratio_row(f"peak memory of training, {d} (MiB, whole process)", o, h, o / h, fmt="{:.0f}"))
    for d, tr in r["train"].items():
        if "resure" not in tr:
            continue
        rs = tr["resure"]
        o, p = med(rs["seconds"]["resure"]), med(rs["seconds"]["plain"])
        met = "yes" if rs["overhead"] <= TARGETS["resure_overhead"] else "**no**"
        lines.append(f"| ReSURE overhead over a plain SFT step (ours), {d} | {1e3 * med(rs['bookkeeping_s']):.1f} ms "
                     f"of ReSURE work per step | {p:.3f} s plain step | {100 * rs['overhead']:+.2f}% (whole steps "
                     f"A/B: {o:.3f} vs {p:.3f} s, {100 * rs['step_overhead']:+.1f}%, step-to-step spread "
                     f"{100 * rs['step_spread']:.0f}%) | <= +{100 * TARGETS['resure_overhead']:g}% | {met} |")
        if "gain" in rs:
            gs, ov = rs["gain"], rs["gain"]["overhead"]
            met = "yes" if ov <= TARGETS["gain_overhead"] else "**no**"
            lines.append(f"| --detector loss+gain over --detector loss (ours), {d}: the replies scored alone, "
                         f"{gs['free_tokens']} extra forward tokens, no gradient | {med(gs['seconds']['gain']):.3f} s "
                         f"step | {med(gs['seconds']['loss']):.3f} s step | {100 * ov:+.1f}% | "
                         f"<= +{100 * TARGETS['gain_overhead']:g}% | {met} |")
    for d, gen in r["generate"].items():
        for B, g in gen.items():
            if B == "ceiling":
                continue
            tp = g["tokens_per_s"]
            lines.append(ratio_row(f"greedy generation, batch {B}, {d} (tokens/s; {r['cfg']['new_tokens']} new; "
                                   f"{g['same_tokens']:.0%} identical before EOS)", tp["ours"], tp["hf"],
                                   tp["ours"] / tp["hf"], TARGETS["generate"]))
        c, one = gen["ceiling"], gen.get(1)
        if one:
            o, h = one["tokens_per_s"]["ours"], one["tokens_per_s"]["hf"]
            lines.append(f"| batch-1 decoding ceiling, {d}: {c['weight_bytes'] / 1e6:.0f} MB of weights read per "
                         f"token at the measured copy bandwidth {c['copy_bytes_per_s'] / 1e9:.1f} GB/s = "
                         f"{c['tokens_per_s']:.1f} tokens/s | {100 * o / c['tokens_per_s']:.0f}% of it | "
                         f"{100 * h / c['tokens_per_s']:.0f}% of it | 3x theirs would be "
                         f"{300 * h / c['tokens_per_s']:.0f}% of it | | |")
    for d, ld in r["load"].items():
        o, h = med(ld["cold_seconds"]["ours"]), med(ld["cold_seconds"]["hf"])
        lines.append(ratio_row(f"checkpoint load, {d}, first in a fresh process (s)", o, h, h / o, fmt="{:.3f}"))
        o, h = med(ld["seconds"]["ours"]), med(ld["seconds"]["hf"])
        lines.append(ratio_row(f"checkpoint load, {d}, repeated in one process (s)", o, h, h / o, fmt="{:.3f}"))
    for d, tr in r["train"].items():
        peak, what = r["matmul_peak"][d]["peak"], "peak"
        fo, fh = (tr["flops"] * tr["tokens_per_s"][k] / tr["tokens"] / peak for k in ("ours", "hf"))
        note = " **above the measured peak: the peak measurement was disturbed**" if max(fo, fh) > 1 else ""
        lines.append(f"| training throughput / matmul peak, {d} ({what} {peak / 1e9:.0f} GFLOP/s, "
                     f"{tr['flops'] / 1e9:.0f} useful GFLOP/step){note} | {100 * fo:.1f}% | {100 * fh:.1f}% | "
                     f"{fo / fh:.2f}x | | |")
    others = r.get("others_cores")
    if others is not None:
        lines[0] += (f" Other processes used {others[0]:.2f} cores on average during the run (steal "
                     f"{others[1]:.2f}).")
        if others[0] > BUSY or others[1] > BUSY:
            lines[0:0] = [f"**WARNING: the machine was busy (other processes used {others[0]:.2f} cores, steal "
                          f"{others[1]:.2f}, on average during the run), so these timings are unreliable.**", ""]
    lines += ["", "Ratios: ours / theirs for throughput; theirs / ours (speed-up) for load time; ours / theirs for "
              "memory (<= 1 is no more memory). Peak memory: each side in its own fresh process, VmHWM after the "
              "model load and the training steps minus VmRSS after importing the libraries (on a GPU: "
              "torch.cuda.max_memory_allocated). Useful FLOPs: "
              "bench/speed.py train_flops (frozen-base LoRA step, supervised-only lm_head, causal attention)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face llama-family folder (default: SmolLM2-135M-Instruct, prepared)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repetitions: < 5 minutes on 2 CPU cores")
    g.add_argument("--tiny", action="store_true", help="a tiny random model and workload (CI)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--out", help="folder to write speed.md and speed.json into")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--parts", default="train,memory,generate,load", help="which measurements (comma-separated)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where both sides run")
    # internal: one memory measurement in a fresh process
    p.add_argument("--mem-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--load-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--mem-dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    for k in ("batch", "length", "rank", "mem-steps"):
        p.add_argument(f"--{k}", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    global DEV
    a = parse_args(argv)
    DEV = torch.device(a.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {a.device}: torch sees no CUDA device")
    a.threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(a.threads)
    if a.mem_child:
        return mem_child(a)
    if a.load_child:
        return load_child(a)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    preset = "tiny" if a.tiny else "quick" if a.quick else "full"
    parts = set(a.parts.split(","))
    if not parts <= {"train", "memory", "generate", "load"}:
        raise BenchError(f"--parts {a.parts}: choose from train, memory, generate, load")
    cfg = dict(PRESETS[preset])
    tmp = None
    if a.model is None:
        if a.tiny:
            tmp = tempfile.mkdtemp(prefix="speed-tiny-")
            a.model = make_tiny_model(Path(tmp) / "model")
        else:
            a.model = prepare_smollm2()
    if not (Path(a.model) / "config.json").is_file():
        raise BenchError(f"--model {a.model}: no config.json there")
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start, share = time.time(), CpuShare()
    for k in ("batch", "length", "rank"):  # workload overrides (e.g. a bigger batch on a GPU)
        cfg[k] = getattr(a, k) or cfg[k]
    r = {"machine": machine(a.threads), "model": a.model, "preset": preset, "cfg": cfg, "device": str(DEV),
         "train": {}, "memory": {}, "generate": {}, "load": {}, "matmul_peak": {}}
    m = r["machine"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {a.threads} threads, load average "
        f"{m['loadavg'][0]:.2f}")
    r["params"] = sum(p.numel() for p in M.Transformer.from_pretrained(a.model).parameters())
    try:
        for d in cfg["dtypes"]:
            mc = M.ModelConfig.from_json(a.model)
            if "train" in parts:
                sizes = tuple(cfg["matmul_n"]) + ((4096, 8192) if DEV.type == "cuda" and not a.tiny else ())
                r["matmul_peak"][d] = matmul_peak(DTYPES[d], sizes,
                                                  (cfg["batch"] * cfg["length"], mc.hidden_size, mc.intermediate_size))
                log(f"  matmul {d}: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in
                                                  r["matmul_peak"][d]["by_shape"].items()) + " GFLOP/s")
                r["train"][d] = bench_train(a.model, d, cfg, log)
            if "memory" in parts and not a.skip_memory and d in cfg["mem_dtypes"]:
                r["memory"][d] = {k: child("mem", k, d, a, cfg) for k in ("ours", "hf")}
                log(f"  memory {d}: ours {r['memory'][d]['ours']['delta_mib']:.0f} MiB, transformers+PEFT "
                    f"{r['memory'][d]['hf']['delta_mib']:.0f} MiB")
        for d in cfg["gen_dtypes"] if "generate" in parts else ():
            r["generate"][d] = bench_generate(a.model, d, cfg, log)
        for d in cfg["gen_dtypes"] if "load" in parts else ():
            r["load"][d] = bench_load(a.model, d, cfg, a, log)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    r["loadavg_end"] = os.getloadavg()
    r["others_cores"] = share.others()
    r["wall_s"] = time.time() - t_start
    md = table(r)
    print("\n" + md)
    print(f"\n(total {r['wall_s']:.0f} s)")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        (Path(a.out) / "speed.md").write_text(md + "\n")
        (Path(a.out) / "speed.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    return r


if __name__ == "__main__":
    try:
        main()
    except (BenchError, CheckpointError) as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        sys.exit(2)
