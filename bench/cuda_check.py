"""What only a GPU can check: model.py and lora.py on CUDA against transformers + PEFT on the same GPU, and the
compiled decoding of model.generate (torch.compile, CUDA graphs) against its eager path.

    python bench/cuda_check.py --like DIR [--out OUT]

DIR is a llama-family folder whose config.json and tokenizer files are used; its weights are not needed: a random
checkpoint of that shape is written by transformers (seed 0) to OUT/model, so the check runs where no weights can
be fetched. Prints one line per check (PASS / FAIL with the measured error) and exits 1 if any failed; writes
OUT/cuda_check.json. bench/cuda_check.sh runs this, then train.py in fp32 / bf16 / fp16 and bench/speed.py.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
from lora import DEFAULT_TARGETS, PEFT_PREFIX, apply_lora  # noqa: E402
from support.export import TOKENIZER_FILES  # noqa: E402

RESULTS = []


def check(name, value, limit):
    ok = bool(value <= limit)
    RESULTS.append({"check": name, "value": float(value), "limit": limit, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})", flush=True)


def random_checkpoint(like, out):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(like)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # transformers' init is 0.02-scaled noise: give the logits some spread
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    hf.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (Path(like) / f).is_file():
            shutil.copy(Path(like) / f, Path(out) / f)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def differ(a, b):
    return sum(x != y for r, s in zip(a, b) for x, y in zip(r, s)) + sum(abs(len(r) - len(s)) for r, s in zip(a, b))


def reuse_and_recapture(ours, ids, t_first):
    """The compiled decode step (a CUDA graph) and its cache are reused by the next call of the same batch size,
    and compiled again when module state it has baked in changes (new LoRA layers, their scaling, merging)."""
    from torch._dynamo.utils import counters

    from lora import merge_lora
    other = [ids[1, 50:60].tolist(), ids[2, 10:30].tolist(), ids[0, 70:75].tolist()]
    cache = ours.decode_cache
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    base = M.generate(ours, other, max_new_tokens=48)
    t_reuse = time.perf_counter() - t0
    print(f"  compiled generate: first call {t_first:.2f} s, next call {t_reuse:.3f} s", flush=True)
    check("generate: decode compiled again for a call of the same shape",
          counters["stats"]["unique_graphs"] - graphs, 0)
    check("generate: a new decode cache for a call of the same shape", int(ours.decode_cache is not cache), 0)
    check("generate: reused compiled step vs eager, tokens differing",
          differ(base, M.generate(ours, other, 48, compile=False)), 0)
    apply_lora(ours, r=8, alpha=16, dropout=0.0, verbose=False)
    with torch.no_grad():
        for n, q in ours.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.05)
    tuned = M.generate(ours, other, 48)
    check("generate: with LoRA (compiled again) vs eager, tokens differing",
          differ(tuned, M.generate(ours, other, 48, compile=False)), 0)
    check("generate: LoRA changed the tokens (else the check above is empty)", int(differ(tuned, base) == 0), 0)
    lora = [m for m in ours.modules() if hasattr(m, "scaling")]
    for m in lora:
        m.scaling = 0.0
    check("generate: LoRA scaling 0 gives the base tokens", differ(M.generate(ours, other, 48), base), 0)
    for m in lora:
        m.scaling = 2.0
    merge_lora(ours)
    check("generate: merged LoRA (compiled again) vs eager, tokens differing",
          differ(M.generate(ours, other, 48), M.generate(ours, other, 48, compile=False)), 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--like", required=True)
    p.add_argument("--out", default="cuda_check_out")
    p.add_argument("--device", default="cuda", help="cpu only to dry-run this script (generate runs eagerly there)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_check.py: error: torch sees no CUDA device")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = Path(a.out)
    path = random_checkpoint(a.like, out / "model")
    dev = torch.device(a.device)
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(0)
    V = M.ModelConfig.from_json(path).vocab_size
    ids = torch.randint(0, V, (4, 128), generator=g).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :64] = -100  # a prompt: only the second half is supervised

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[1]
        ours = M.Transformer.from_pretrained(path, dtype=dtype, device=dev)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            lo, lh = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        check(f"logits vs transformers, {name}", rel(lo[real], lh[real]), 1e-5 if name == "float32" else 2e-2)
        # greedy decoding: the compiled step (CUDA graph) against the eager step and transformers (batch 3, left
        # padded)
        prompts = [ids[0, :20].tolist(), ids[2, :7].tolist(), ids[3, :13].tolist()]
        t0 = time.perf_counter()
        graph = M.generate(ours, prompts, max_new_tokens=48)
        t_graph = time.perf_counter() - t0
        eager = M.generate(ours, prompts, max_new_tokens=48, compile=False)
        same = sum(x == y for r, s in zip(graph, eager) for x, y in zip(r, s)) / sum(map(len, eager))
        check(f"generate: compiled vs eager tokens differ, {name}", 1 - same, 0.0 if name == "float32" else 0.1)
        L = max(map(len, prompts))
        pid = torch.tensor([[0] * (L - len(q)) + q for q in prompts], device=dev)
        pm = torch.tensor([[0] * (L - len(q)) + [1] * len(q) for q in prompts], device=dev)
        with torch.no_grad():
            ref = hf.generate(input_ids=pid, attention_mask=pm, max_new_tokens=48, min_new_tokens=48,
                              do_sample=False, pad_token_id=0)[:, L:].tolist()
        first = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(graph, ref)]
        print(f"  {name}: tokens equal to transformers before the first difference {first} of 48; "
              f"compiled generate {t_graph:.2f} s (compilation included)", flush=True)
        if name == "float32":
            check("generate: rows whose first 16 tokens differ from transformers, float32",
                  sum(f < 16 for f in first), 0)
            if dev.type == "cuda":
                reuse_and_recapture(ours, ids, t_graph)
        del hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # a LoRA training step on CUDA (fp32, bf16 autocast, fp16 autocast) against PEFT on the same GPU
    for amp in (None, torch.bfloat16, torch.float16):
        name = "fp32" if amp is None else str(amp).split(".")[1] + " autocast"
        ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else torch.enable_grad
        torch.manual_seed(1)
        ours = M.Transformer.from_pretrained(path, device=dev)
        apply_lora(ours, r=16, alpha=32, dropout=0.0, verbose=False)
        hf = AutoModelForCausalLM.from_pretrained(path).to(dev)
        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS)))
        mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        theirs = {n.replace(PEFT_PREFIX, "").replace(".default", ""): p
                  for n, p in hf.named_parameters() if p.requires_grad}
        with torch.no_grad():  # the same nonzero adapter on both sides
            for n, q in mine.items():
                q.copy_(0.01 * torch.randn_like(q))
                theirs[n].copy_(q)
        with ctx():
            tok = ours.token_losses(ids, labels, mask)
        n_sup = (labels[:, 1:] != -100).sum()
        loss = tok.sum() / n_sup
        loss.backward()
        with ctx():
            ref = hf(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos).loss
        ref.backward()
        lim = 1e-5 if amp is None else 3e-2
        check(f"LoRA loss vs PEFT, {name}", abs(loss.item() - ref.item()) / ref.item(), lim)
        check(f"LoRA gradients vs PEFT (worst tensor, relative norm), {name}",
              max(rel(q.grad, theirs[n].grad) for n, q in mine.items()), 1e-4 if amp is None else 1e-1)
        del hf, ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    failed = [r for r in RESULTS if not r["ok"]]
    (out / "cuda_check.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
