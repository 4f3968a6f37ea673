"""Speed of our model.py + lora.py against transformers + PEFT on the same work.

    python bench/speed.py                  # SmolLM2-135M-Instruct, more repetitions (minutes)
    python bench/speed.py --quick          # < 5 minutes on 2 CPU cores
    python bench/speed.py --tiny           # a tiny random llama, seconds (what CI runs)
    python bench/speed.py --model DIR --out results/   # any llama folder; speed.md + speed.json
    python bench/speed.py --device cuda    # on a GPU (memory = torch.cuda.max_memory_allocated)

Everything runs on --device (default: the CPU, even where a GPU is present). Every A/B measurement
runs both sides in this process, alternating them ABBA (so a slow drift of the machine hits both
alike), after one warm-up call each, with the same torch thread count; the table shows medians.
What both sides run is in bench/speed_steps.py.
  train    one LoRA training step: forward, backward, AdamW step. LoRA r=16, alpha=32, no dropout,
           on every linear layer of the blocks; batch B x T random token ids, no padding, spans
           alternating context / assistant so about half the tokens are supervised (the same ids
           and labels for both). Ours: model.token_losses, mean over the supervised tokens; theirs:
           LlamaForCausalLM(labels=...).loss, the same mean. fp32, and bf16 = base weights in bf16
           + torch.autocast(bf16) for both (adapters fp32 on both sides); both run torch's own
           kernels.
  memory   peak resident memory of a training run: each (implementation, dtype) in its own fresh
           subprocess, which imports its libraries, resets the kernel's peak counter
           (/proc/self/clear_refs), then loads the model and runs 2 steps (--quick: 1); peak =
           VmHWM - VmRSS at the reset (library imports are not counted for either side; what our
           code imports lazily while loading is). The whole-process VmHWM is shown too.
  resure   ReSURE's extra work in our training step (unit losses per assistant turn, gather,
           weigh, the Eq. 7 loss and its backward) timed on its own, over our plain step (mean over
           supervised tokens); beside it a whole-step A/B of the two (at the 3% level usually
           inside the step-to-step noise, shown beside it).
  generate greedy decoding of N new tokens at batch 1 and 8 (random prompts of 24-64 tokens, left
           padded), no early stop on either side so both produce exactly N tokens; includes the
           prefill. Ours: model.generate with no stop ids; theirs: model.generate(do_sample=False,
           min_new_tokens=N), which suppresses EOS where ours emits it and goes on, so "identical"
           compares the tokens before our first EOS.
  load     checkpoint folder -> model in memory: Transformer.from_pretrained vs
           AutoModelForCausalLM.from_pretrained, the first load in a fresh process (libraries
           imported before the clock starts; what a command line pays) and repeated loads in one
           process.
  peak     fraction of this machine's matmul peak: best FLOP/s over n x n matmuls and the model's
           own largest GEMM shape, in the same dtype; the useful FLOPs of a LoRA step
           (speed_steps.train_flops) / step time / that peak.
The table is marked unreliable when other processes used more than 0.2 cores on average during the
run (all CPU time in /proc/stat minus this process's and its children's): with 2 threads on 2 busy
cores torch slows down many times.
"""
import argparse
import gc
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model as M  # noqa: E402
from data import ChatTemplate  # noqa: E402
from machine import CpuShare, machine_info, make_tiny_model  # noqa: E402
from speed_steps import (DTYPES, autocast, chat_batch, free_rows, hf_step, load_hf,  # noqa: E402
                         load_ours, new_resure, on_device, ours_step, resure_loss, resure_step,
                         train_flops)
from speed_table import table  # noqa: E402
from support.checkpoint import CheckpointError  # noqa: E402
from support.smollm2 import prepare_smollm2  # noqa: E402

PARTS = ("train", "memory", "generate", "load")
PRESETS = {  # reps: timed repetitions per side (after one warm-up); mem_steps: steps per memory run
    "full": dict(batch=4, length=256, rank=16, reps=7, new_tokens=64, gen_batches=(1, 8),
                 gen_reps=5, load_reps=5, cold_reps=4, matmul_n=(1024, 2048, 3072), mem_steps=2,
                 dtypes=("fp32", "bf16"), resure_dtypes=("fp32", "bf16"),
                 mem_dtypes=("fp32", "bf16"), gen_dtypes=("fp32", "bf16")),
    "quick": dict(batch=4, length=256, rank=16, reps=5, new_tokens=32, gen_batches=(1, 8),
                  gen_reps=3, load_reps=3, cold_reps=2, matmul_n=(1024, 2048), mem_steps=1,
                  dtypes=("fp32", "bf16"), resure_dtypes=("fp32",), mem_dtypes=("fp32", "bf16"),
                  gen_dtypes=("fp32",)),
    "tiny": dict(batch=2, length=32, rank=4, reps=2, new_tokens=4, gen_batches=(1, 3), gen_reps=2,
                 load_reps=2, cold_reps=1, matmul_n=(128, 256), mem_steps=1,
                 dtypes=("fp32", "bf16"), resure_dtypes=("fp32", "bf16"), mem_dtypes=("fp32",),
                 gen_dtypes=("fp32",)),
}


class BenchError(ValueError):
    pass


def log(line):
    print(line, flush=True)


def med(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Bench:
    """What every measurement reads: the model folder, where both sides run, the preset's sizes
    (cfg) and the torch thread count."""
    model: str
    device: torch.device
    cfg: dict
    threads: int

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, f):
        """Seconds of one call of f, the device's queued work included."""
        self.sync()
        t0 = time.perf_counter()
        f()
        self.sync()
        return time.perf_counter() - t0

    def alternate(self, fns, reps, warmup=1):
        """{name: [seconds]} for callables run ABBA-alternated, after `warmup` untimed calls each.
        """
        for _ in range(warmup):
            for f in fns.values():
                f()
        times = {k: [] for k in fns}
        order = list(fns)
        for i in range(reps):
            for k in (order if i % 2 == 0 else order[::-1]):
                gc.collect()
                times[k].append(self.timed(fns[k]))
        return times


def matmul_peak(bench, dtype, sizes, model_shape=None, reps=5):
    """Best FLOP/s over n x n x n matmuls (2 n^3 FLOPs) of the given sizes and the model's own
    largest GEMM shape (tokens x hidden) @ (hidden x intermediate): {"peak", "by_shape"}."""
    g = torch.Generator().manual_seed(0)
    shapes = [(n, n, n) for n in sizes] + ([model_shape] if model_shape else [])
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(device=bench.device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=bench.device, dtype=dtype)
        a @ b
        best = min(bench.timed(lambda: a @ b) for _ in range(reps))
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return {"peak": max(out.values()), "by_shape": out}


def copy_bandwidth(bench, nbytes, reps=5):
    """Bytes per second (read + written) of copying one large tensor: what the memory system
    delivers in practice."""
    a = torch.ones(max(1, nbytes // 4), device=bench.device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(bench.timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * a.numel() * 4 / best


# -------------------------------------------------------------------------------- fresh processes
def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/self/status has no {key}")


def reset_peak():
    """Reset VmHWM to the current RSS (/proc/self/clear_refs); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_child(a, device):
    """In a fresh process: peak RSS of loading + a.mem_steps training steps of one side."""
    b, n_sup = chat_batch(M.ModelConfig.from_json(a.model).vocab_size, a.batch, a.length)
    b = on_device(b, device)
    if a.mem_child == "hf":
        import peft  # noqa: F401  (imported before the reset: libraries are not the model's memory)
        import transformers  # noqa: F401
    importlib.import_module("torch._dynamo")  # AdamW's first step imports it (~74 MiB): a library
    dtype = DTYPES[a.mem_dtype]
    amp = autocast(dtype, device)
    gc.collect()
    reset = reset_peak()
    base = status_kib("VmRSS")
    if a.mem_child == "ours":
        net, opt = load_ours(a.model, dtype, a.rank, device)
        for _ in range(a.mem_steps):
            ours_step(net, opt, b, n_sup, amp)
    else:
        hf, opt = load_hf(a.model, dtype, a.rank, device)
        for _ in range(a.mem_steps):
            hf_step(hf, opt, b, amp)
    peak = status_kib("VmHWM")
    if device.type == "cuda":  # GPU memory instead: the allocator's peak (nothing before the load)
        base = 0
        peak = torch.cuda.max_memory_allocated() / 1024
    print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024,
                      "delta_mib": (peak - base) / 1024, "hwm_reset": reset}))


def load_child(a, device):
    """In a fresh process: seconds of the first checkpoint load (libraries already imported)."""
    dtype = DTYPES[a.mem_dtype]
    if a.load_child == "hf":
        import transformers
        quiet(transformers)
        t0 = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(device)
    else:
        t0 = time.perf_counter()
        M.Transformer.from_pretrained(a.model, dtype=dtype, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def child(bench, mode, side, dtype):
    """This script as a fresh subprocess in mode mem|load for one side; returns its JSON line."""
    cfg = bench.cfg
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}-child", side,
           "--mem-dtype", dtype, "--model", bench.model, "--threads", str(bench.threads),
           "--batch", str(cfg["batch"]), "--length", str(cfg["length"]), "--rank", str(cfg["rank"]),
           "--mem-steps", str(cfg["mem_steps"]), "--device", str(bench.device)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"{mode} subprocess {side}/{dtype} failed: {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ measurements
def bench_train(bench, dtype_name):
    """Our LoRA step against transformers + PEFT's on the same batch; ReSURE's extra work beside."""
    cfg = bench.cfg
    dtype = DTYPES[dtype_name]
    amp = autocast(dtype, bench.device)
    config = M.ModelConfig.from_json(bench.model)
    b, n_sup = chat_batch(config.vocab_size, cfg["batch"], cfg["length"])
    b = on_device(b, bench.device)
    net, opt = load_ours(bench.model, dtype, cfg["rank"], bench.device)
    hf, hf_opt = load_hf(bench.model, dtype, cfg["rank"], bench.device)
    sides = {"ours": partial(ours_step, net, opt, b, n_sup, amp),
             "hf": partial(hf_step, hf, hf_opt, b, amp)}
    first = {k: f() for k, f in sides.items()}  # also the warm-up
    t = bench.alternate(sides, cfg["reps"], warmup=0)
    del hf, hf_opt
    gc.collect()
    tokens = cfg["batch"] * cfg["length"]
    res = {"tokens": tokens, "supervised": n_sup, "first_loss": first, "seconds": t,
           "tokens_per_s": {k: tokens / med(v) for k, v in t.items()},
           "flops": train_flops(config, cfg["batch"], cfg["length"], n_sup, cfg["rank"])}
    log(f"  train {dtype_name}: ours {med(t['ours']):.3f} s/step, transformers+PEFT "
        f"{med(t['hf']):.3f} s/step (first-step loss {first['ours']:.4f} vs {first['hf']:.4f})")
    if dtype_name in cfg["resure_dtypes"]:
        res["resure"] = bench_resure(bench, net, opt, b, n_sup, amp, dtype_name)
    return res


def bench_resure(bench, net, opt, b, n_sup, amp, dtype_name):
    """ReSURE's step against the plain one, its bookkeeping alone, and loss+gain against loss."""
    reps = bench.cfg["reps"]
    rs = new_resure()
    steps = {"resure": partial(resure_step, net, opt, b, rs, amp),
             "plain": partial(ours_step, net, opt, b, n_sup, amp)}
    t = bench.alternate(steps, reps, warmup=0)
    with amp():
        with torch.no_grad():
            tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"]).float()
    tok.requires_grad_(True)
    # the bookkeeping alone: unit losses + gather + weigh + Eq. 1 + its gradient
    book = []
    for _ in range(max(5, reps * 3)):
        book.append(bench.timed(lambda: resure_loss(tok, b, rs).backward()))
    plain = t["plain"]
    out = {"seconds": t, "bookkeeping_s": book, "step_overhead": med(t["resure"]) / med(plain) - 1,
           "step_spread": (max(plain) - min(plain)) / med(plain),
           "overhead": med(book) / med(plain)}
    log(f"  resure {dtype_name}: {med(t['resure']):.3f} vs plain {med(plain):.3f} s/step; "
        f"bookkeeping alone {1e3 * med(book):.2f} ms")
    free = on_device(free_rows(b), bench.device)
    with_gain = new_resure(gain_alpha=2.0)  # --detector loss+gain against --detector loss
    detectors = {"gain": partial(resure_step, net, opt, b, with_gain, amp, free),
                 "loss": partial(resure_step, net, opt, b, rs, amp)}
    t = bench.alternate(detectors, reps, warmup=1)
    extra = int(free["free_mask"].sum())
    out["gain"] = {"seconds": t, "free_tokens": extra,
                   "overhead": med(t["gain"]) / med(t["loss"]) - 1}
    log(f"  loss+gain {dtype_name}: {med(t['gain']):.3f} vs loss {med(t['loss']):.3f} s/step "
        f"({extra} extra forward tokens)")
    return out


def bench_generate(bench, dtype_name):
    """Greedy decoding of new_tokens at each batch size, ours against transformers', and the
    batch-1 ceiling the copy bandwidth puts on it."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    dtype = DTYPES[dtype_name]
    net = M.Transformer.from_pretrained(bench.model, dtype=dtype, device=bench.device).eval()
    hf = AutoModelForCausalLM.from_pretrained(bench.model, dtype=dtype).to(bench.device).eval()
    n = bench.cfg["new_tokens"]
    stops = set(ChatTemplate.from_pretrained(bench.model).stop_ids)
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    bandwidth = copy_bandwidth(bench, max(weight_bytes, 64 << 20))
    # batch 1 reads every weight once per new token: tokens/s <= bandwidth / weight bytes
    # (generously taking the copy's read + write rate as the read rate; KV cache ignored)
    out = {"ceiling": {"weight_bytes": weight_bytes, "copy_bytes_per_s": bandwidth,
                       "tokens_per_s": bandwidth / weight_bytes}}
    for batch in bench.cfg["gen_batches"]:
        out[batch] = generate_batch(bench, net, hf, config, batch, stops)
        speeds = out[batch]["tokens_per_s"]
        log(f"  generate {dtype_name} batch {batch}: ours {speeds['ours']:.1f} tok/s, "
            f"transformers {speeds['hf']:.1f} tok/s, identical tokens "
            f"{out[batch]['same_tokens']:.0%}")
    return out


def generate_batch(bench, net, hf, config, batch, stops):
    """One batch size's A/B of greedy decoding: seconds, tokens/s and the share of identical tokens
    before our first stop token."""
    n = bench.cfg["new_tokens"]
    g = np.random.default_rng(batch)
    lengths = [48] if batch == 1 else g.integers(24, 65, batch).tolist()
    prompts = [g.integers(0, net.config.vocab_size, length).tolist() for length in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=bench.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=bench.device)
    made = {}

    def ours():
        made["ours"] = M.generate(net, prompts, max_new_tokens=n, stop_ids=(), pad_id=0)

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        made["hf"] = out[:, width:].tolist()
    t = bench.alternate({"ours": ours, "hf": theirs}, bench.cfg["gen_reps"])
    counts = {k: sum(len(r) for r in v) for k, v in made.items()}
    if counts["ours"] != batch * n or counts["hf"] != batch * n:
        raise BenchError(f"generation made {counts} tokens, expected {batch * n} each")
    # transformers' min_new_tokens suppresses EOS while ours emits it and goes on: compare up to
    # our first stop
    cut = [next((i for i, tok in enumerate(r) if tok in stops), n) for r in made["ours"]]
    same = 0
    for mine, theirs_row, c in zip(made["ours"], made["hf"], cut):
        same += sum(x == y for x, y in zip(mine[:c], theirs_row[:c]))
    return {"seconds": t, "tokens_per_s": {k: batch * n / med(v) for k, v in t.items()},
            "same_tokens": same / max(1, sum(cut))}


def bench_load(bench, dtype_name):
    """Warm: repeated loads in this process. Cold: the first load in a fresh process (after its
    imports)."""
    from transformers import AutoModelForCausalLM
    dtype = DTYPES[dtype_name]

    def ours():
        M.Transformer.from_pretrained(bench.model, dtype=dtype, device=bench.device)

    def theirs():
        AutoModelForCausalLM.from_pretrained(bench.model, dtype=dtype).to(bench.device)
    t = bench.alternate({"ours": ours, "hf": theirs}, bench.cfg["load_reps"])
    cold = {"ours": [], "hf": []}
    for i in range(bench.cfg["cold_reps"]):
        for side in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            cold[side].append(child(bench, "load", side, dtype_name)["seconds"])
    log(f"  load {dtype_name}: warm ours {med(t['ours']):.3f} s, transformers "
        f"{med(t['hf']):.3f} s; cold ours {med(cold['ours']):.3f} s, transformers "
        f"{med(cold['hf']):.3f} s")
    return {"seconds": t, "cold_seconds": cold}


# ------------------------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face llama-family folder (default: "
                                   "SmolLM2-135M-Instruct, prepared)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repetitions: < 5 minutes on 2 cores")
    g.add_argument("--tiny", action="store_true", help="a tiny random model and workload (CI)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's)")
    p.add_argument("--out", help="folder to write speed.md and speed.json into")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="which measurements (comma-separated)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where both sides run")
    # internal: one memory or load measurement in a fresh process
    p.add_argument("--mem-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--load-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--mem-dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    for k in ("batch", "length", "rank", "mem-steps"):
        p.add_argument(f"--{k}", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quiet(transformers):
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def measure(bench, parts, skip_memory, tiny):
    """Every measurement of the chosen parts, per dtype of the preset: speed.json's measurements."""
    cfg = bench.cfg
    r = {"train": {}, "memory": {}, "generate": {}, "load": {}, "matmul_peak": {}}
    config = M.ModelConfig.from_json(bench.model)
    for d in cfg["dtypes"]:
        if "train" in parts:
            sizes = tuple(cfg["matmul_n"])
            if bench.device.type == "cuda" and not tiny:
                sizes += (4096, 8192)
            gemm = (cfg["batch"] * cfg["length"], config.hidden_size, config.intermediate_size)
            r["matmul_peak"][d] = matmul_peak(bench, DTYPES[d], sizes, gemm)
            speeds = ", ".join(f"{k} {v / 1e9:.0f}"
                               for k, v in r["matmul_peak"][d]["by_shape"].items())
            log(f"  matmul {d}: {speeds} GFLOP/s")
            r["train"][d] = bench_train(bench, d)
        if "memory" in parts and not skip_memory and d in cfg["mem_dtypes"]:
            r["memory"][d] = {side: child(bench, "mem", side, d) for side in ("ours", "hf")}
            log(f"  memory {d}: ours {r['memory'][d]['ours']['delta_mib']:.0f} MiB, "
                f"transformers+PEFT {r['memory'][d]['hf']['delta_mib']:.0f} MiB")
    for d in cfg["gen_dtypes"] if "generate" in parts else ():
        r["generate"][d] = bench_generate(bench, d)
    for d in cfg["gen_dtypes"] if "load" in parts else ():
        r["load"][d] = bench_load(bench, d)
    return r


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {a.device}: torch sees no CUDA device")
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if a.mem_child:
        return mem_child(a, device)
    if a.load_child:
        return load_child(a, device)
    import transformers
    quiet(transformers)
    preset = "tiny" if a.tiny else "quick" if a.quick else "full"
    parts = set(a.parts.split(","))
    if not parts <= set(PARTS):
        raise BenchError(f"--parts {a.parts}: choose from {', '.join(PARTS)}")
    cfg = dict(PRESETS[preset])
    for k in ("batch", "length", "rank"):  # workload overrides (e.g. a bigger batch on a GPU)
        cfg[k] = getattr(a, k) or cfg[k]
    tmp = tempfile.mkdtemp(prefix="speed-tiny-") if a.model is None and a.tiny else None
    try:
        model = a.model
        if tmp:
            model = make_tiny_model(Path(tmp) / "model")
        elif model is None:
            model = prepare_smollm2()
        if not (Path(model) / "config.json").is_file():
            raise BenchError(f"--model {model}: no config.json there")
        r = run(Bench(model, device, cfg, threads), preset, parts, a.skip_memory, a.tiny)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    md = table(r)
    print("\n" + md)
    print(f"\n(total {r['wall_s']:.0f} s)")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        (Path(a.out) / "speed.md").write_text(md + "\n")
        (Path(a.out) / "speed.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    return r


def run(bench, preset, parts, skip_memory, tiny):
    """speed.json's contents: the machine, the settings and every measurement."""
    started = time.time()
    share = CpuShare()
    r = {"machine": machine_info(bench.threads), "model": bench.model, "preset": preset,
         "cfg": bench.cfg, "device": str(bench.device)}
    m = r["machine"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {bench.threads} threads, "
        f"load average {m['loadavg'][0]:.2f}")
    r["params"] = sum(p.numel() for p in M.Transformer.from_pretrained(bench.model).parameters())
    r.update(measure(bench, parts, skip_memory, tiny))
    r["loadavg_end"] = os.getloadavg()
    r["others_cores"] = share.others()
    r["wall_s"] = time.time() - started
    return r


if __name__ == "__main__":
    try:
        main()
    except (BenchError, CheckpointError) as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        sys.exit(2)
