"""model.py against transformers (the oracle).

Tiny random checkpoints of every supported architecture are written by transformers' own
save_pretrained (norm weights and biases randomised too, so q/k norm placement and Qwen2 biases
matter), then loaded by model.Transformer and compared logit by logit, with right and left padding,
with a KV cache, and through greedy generation, eager and compiled. Then the real
SmolLM2-135M-Instruct: its logits and its answer to a chat prompt.
"""
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model
from data import ChatTemplate, load_tokenizer
from lora import apply_lora, lora_modules, merge_lora
from model import ModelConfig, Transformer, generate
from support.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
# name: (transformers config class, its kwargs, save sharded?)
CASES = {
    "llama": ("LlamaConfig", {}, True),
    "llama_llama3_rope": ("LlamaConfig", dict(head_dim=32, attention_bias=True, mlp_bias=True,
                                              rope_parameters=LLAMA3), False),
    "llama_linear_rope": ("LlamaConfig", dict(rope_parameters=LINEAR), False),
    "mistral": ("MistralConfig", dict(sliding_window=5), False),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=True,
                                  sliding_window=5, max_window_layers=1), False),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True), False),
}
# the same weights with config.json rewritten the way Hub checkpoints ship it: rope_theta and
# rope_scaling, no layer_types
OLD_STYLE = {"llama_llama3_rope_old": "llama_llama3_rope",
             "llama_linear_rope_old": "llama_linear_rope",
             "qwen2_old": "qwen2"}
ALL = list(CASES) + list(OLD_STYLE)


def _old_style(config_file: Path):
    c = json.loads(config_file.read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    if rope["rope_type"] == "linear":  # the oldest spelling: "type", not "rope_type"
        c["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    if rope["rope_type"] == "default":
        c["rope_scaling"] = None
    c.pop("layer_types", None)
    config_file.write_text(json.dumps(c, indent=2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, folder, our model), built once."""
    import transformers
    out = {}
    for i, (name, (cls, kw, sharded)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        config = getattr(transformers, cls)(**TINY, **kw)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        hf.eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.3 * torch.randn_like(p))
        hf.generation_config.eos_token_id = None  # tiny vocabularies: never stop early
        hf.generation_config.pad_token_id = 0
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d, max_shard_size="40KB" if sharded else "1GB")
        out[name] = (hf, d, Transformer.from_pretrained(d))
    for name, base in OLD_STYLE.items():
        hf, d, _ = out[base]
        d2 = tmp_path_factory.mktemp(name)
        for f in d.iterdir():
            shutil.copy(f, d2)
        _old_style(d2 / "config.json")
        out[name] = (hf, d2, Transformer.from_pretrained(d2))
    return out


def batch(lengths, T, V, pad, left, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        mask[b, sl] = 1
    return ids.masked_fill(mask == 0, pad), mask


def rel_err(a, b, where):
    return ((a - b)[where].abs().max() / b[where].abs().max()).item()


def test_tiny_checkpoints_are_what_they_claim(tiny):
    """The fixtures exercise what they should: >= 2 shards, tied files without lm_head, old-style
    configs."""
    assert len(list(tiny["llama"][1].glob("model-*.safetensors"))) >= 2
    assert (tiny["llama"][1] / "model.safetensors.index.json").is_file()
    for name in ("qwen2", "qwen3"):
        m = tiny[name][2]
        assert "lm_head.weight" not in load_file(tiny[name][1] / "model.safetensors")
        assert m.lm_head.weight is m.model.embed_tokens.weight
    assert tiny["llama"][2].lm_head.weight is not tiny["llama"][2].model.embed_tokens.weight
    for old, new in OLD_STYLE.items():
        c = json.loads((tiny[old][1] / "config.json").read_text())
        assert "rope_parameters" not in c
        assert "rope_theta" in c
        assert ModelConfig.from_json(tiny[old][1]) == ModelConfig.from_json(tiny[new][1])
    cfg = ModelConfig.from_json(tiny["llama_llama3_rope"][1])
    assert cfg.rope_type == "llama3"
    assert cfg.rope_factor == 8.0
    assert cfg.rope_original_max_position_embeddings == 32
    assert ModelConfig.from_json(tiny["llama_linear_rope_old"][1]).rope_type == "linear"
    assert ModelConfig.from_json(tiny["qwen2"][1]).sliding_layers == [1, 2]
    assert ModelConfig.from_json(tiny["mistral"][1]).sliding_layers == [0, 1, 2]
    assert tiny["qwen3"][2].model.layers[0].self_attn.q_norm.weight.std() > 0.1


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers_with_padding(tiny, name):
    hf, _, m = tiny[name]
    V, T = TINY["vocab_size"], 12
    for left in (False, True):
        ids, mask = batch([12, 7, 4], T, V, pad=0, left=left)
        # transformers' forward does not derive the positions from the mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            ours = m(ids, attention_mask=mask)
        assert ref.shape == (3, T, V)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref, mask.bool()) < 1e-5, (name, "left" if left else "right")


@pytest.mark.parametrize("name", ALL)
def test_padded_batch_equals_each_sequence_alone(tiny, name):
    m = tiny[name][2]
    lengths = [12, 7, 4]
    for left in (False, True):
        ids, mask = batch(lengths, 12, TINY["vocab_size"], pad=0, left=left, seed=1)
        with torch.no_grad():
            padded = m(ids, attention_mask=mask)
            for b, n in enumerate(lengths):
                real = mask[b].bool()
                alone = m(ids[b, real][None])[0]
                assert rel_err(padded[b, real], alone, slice(None)) < 1e-5, (name, b, left)


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_decoding_equals_full_forward(tiny, name):
    m = tiny[name][2]
    ids, mask = batch([12, 9, 4], 12, TINY["vocab_size"], pad=0, left=True, seed=2)
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        cache = m.new_cache(3, 16)
        buffers = [t.data_ptr() for t in cache.k + cache.v]
        parts = [m(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]  # row 2: all padding
        parts += [m(ids[:, 5:8], attention_mask=mask[:, 5:8], cache=cache)]  # after a prefix
        # then one token at a time, through generate's decode step
        parts += [model.decode_one_token(m, ids[:, t], cache)[:, None] for t in range(8, 12)]
    assert int(cache.length) == 12
    assert rel_err(torch.cat(parts, 1), full, mask.bool()) < 1e-5
    assert cache.valid[:, 12:].sum() == 0  # the slots after the tokens stay empty
    assert torch.equal(cache.valid[:, :12], mask.bool())  # padding slots are not valid keys
    assert torch.equal(cache.next_pos, mask.sum(1))  # each row's next position: its real tokens
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # written in place
    assert all(t.shape == (3, m.config.num_key_value_heads, 16, m.config.head_dim) for t in cache.k)


def test_expanded_cache_continues_each_row_independently(tiny):
    """expand(batch): a one-row cache of a shared prompt, copied for rows that continue it
    differently (train.py's context gain, scripts/judge.py). Each row equals the full forward of
    prompt + its own continuation, and the one-row cache is left as it was."""
    m = tiny["mistral"][2]  # a sliding window of 5 slots
    prompt = torch.tensor([[7, 31, 12, 90, 4, 55]])
    conts, mask = batch([5, 3, 1], 5, TINY["vocab_size"], pad=0, left=False, seed=6)
    with torch.no_grad():
        shared = m.new_cache(1, 11)
        m(prompt, cache=shared)
        before = [t.clone() for t in shared.tensors()]
        rows = m(conts, attention_mask=mask, cache=shared.expand(3))
        for b, n in enumerate([5, 3, 1]):
            alone = m(torch.cat([prompt[0], conts[b, :n]])[None])[0, 6:]
            assert rel_err(rows[b, :n], alone, slice(None)) < 1e-5, b
    after = shared.tensors()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(shared.length) == 6


# old-style twins parse to equal ModelConfigs (checked above)
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(tiny, name):
    hf, _, m = tiny[name]
    prompts = [[5, 9, 14, 3, 77, 21, 8], [40, 2, 61], [11, 12, 13, 14, 15]]
    ids, mask = batch([7, 3, 5], 7, TINY["vocab_size"], pad=0, left=True)
    for b, p in enumerate(prompts):
        ids[b, 7 - len(p):] = torch.tensor(p)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    ref = ref[:, 7:].tolist()
    assert generate(m, prompts, max_new_tokens=32) == ref
    if name == "llama":  # stops per sequence at any stop id (excluded from the output)
        stop = ref[0][4]
        cut = [r[:r.index(stop)] if stop in r else r for r in ref]
        assert generate(m, prompts, max_new_tokens=32, stop_ids=[stop, 10_000]) == cut
        assert any(len(c) < 32 for c in cut)
        assert generate(m, prompts, max_new_tokens=5) == [r[:5] for r in ref]


def test_compiled_decode_reuses_one_cache_per_shape(tiny):
    """generate's compiled decode keeps its cache on the model: rounded up to 256 slots, emptied and
    reused while batch size, dtype and device stay, replaced when one changes."""
    net = copy.deepcopy(tiny["llama"][2])
    first = model.reusable_cache(net, 3, 40)
    assert first.k[0].shape[2] == 256
    assert net.decode_cache is first
    net(torch.tensor([[5, 6, 7]] * 3), cache=first)
    again = model.reusable_cache(net, 3, 200)
    assert again is first
    assert int(again.length) == 0  # emptied
    assert not again.valid.any()
    assert not again.next_pos.any()
    assert all(not t.any() for t in again.k + again.v)
    assert model.reusable_cache(net, 3, 300).k[0].shape[2] == 512
    assert model.reusable_cache(net, 2, 300).k[0].shape[0] == 2
    net.double()
    assert model.reusable_cache(net, 2, 300).k[0].dtype == torch.float64


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny):
    """generate(compile=True) runs decode_one_token through torch.compile (on a CPU: inductor's
    C++ kernels; the CUDA graphs are checked on a GPU by bench/cuda_check.py). Its greedy tokens
    equal the eager path's; a second call reuses the compiled step; LoRA layers added, then
    merged, make torch.compile's guards compile it again, and the tokens still equal the eager
    path's."""
    from torch._dynamo.utils import counters
    net = copy.deepcopy(tiny["qwen2"][2])  # biases, GQA, a sliding window, a tied head
    prompts = [[5, 9, 14, 3, 77, 21, 8], [40, 2, 61], [11, 12, 13, 14, 15]]
    graphs = counters["stats"]["unique_graphs"]
    base = generate(net, prompts, max_new_tokens=24, compile=False)
    assert generate(net, prompts, max_new_tokens=24, compile=True) == base
    assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled, not run eagerly
    assert generate(net, prompts, max_new_tokens=20, compile=True) == [r[:20] for r in base]
    assert counters["stats"]["unique_graphs"] == graphs + 1  # reused: no second compile
    apply_lora(net, r=4, alpha=8, dropout=0.0, verbose=False)
    with torch.no_grad():
        for layer in lora_modules(net).values():
            layer.lora_B.weight.normal_(0, 0.5)
    tuned = generate(net, prompts, max_new_tokens=24, compile=False)
    assert tuned != base  # the adapters change the tokens, so the check below can fail
    assert generate(net, prompts, max_new_tokens=24, compile=True) == tuned
    merge_lora(net)
    assert generate(net, prompts, max_new_tokens=24, compile=True) == tuned
    assert counters["stats"]["unique_graphs"] == graphs + 3


def test_sampling_follows_temperature_and_top_p(tiny):
    """4000 draws of the first token against softmax(logits / T), and the top-p nucleus, from
    transformers' logits."""
    hf, _, m = tiny["llama"]
    prompt, n, temp = [5, 17, 33, 8], 4000, 1.5
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double()
    p = torch.softmax(logits / temp, -1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]
    nucleus = torch.zeros_like(p)
    nucleus[order[before < 0.6]] = p[order[before < 0.6]]
    nucleus /= nucleus.sum()
    assert 2 < (nucleus > 0).sum() < 50  # a real nucleus: neither greedy nor everything
    for top_p, expect in ((1.0, p), (0.6, nucleus)):
        draws = generate(m, [prompt] * n, max_new_tokens=1, temperature=temp, top_p=top_p, seed=0)
        freq = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=p.numel()).double() / n
        bound = 4.5 * (expect * (1 - expect) / n).sqrt() + 1e-9
        assert ((freq - expect).abs() <= bound).all(), top_p
    greedy = generate(m, [prompt], 8)
    # a tiny temperature is greedy, with no NaN
    assert generate(m, [prompt], max_new_tokens=8, temperature=1e-300, seed=1) == greedy
    a = generate(m, [prompt] * 3, max_new_tokens=8, temperature=1.0, seed=7)
    assert a == generate(m, [prompt] * 3, max_new_tokens=8, temperature=1.0, seed=7)
    assert generate(m, [prompt], max_new_tokens=8, temperature=1.0, top_p=1e-9) == greedy


def _saved_vocab_wide(fn, V):
    """Run fn under a saved-tensors hook; return its result and (number of saved tensors, elements
    of saved tensors [.., V])."""
    stats = [0, 0]

    def pack(t):
        stats[0] += 1
        if t.dim() >= 2 and t.shape[-1] == V:
            stats[1] += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, stats


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_chunked_token_losses_equal_full_cross_entropy(tiny, name):
    m = tiny[name][2]
    V, chunk = TINY["vocab_size"], 5
    ids, mask = batch([12, 10, 6], 12, V, pad=0, left=False, seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2:5] = -100  # an unsupervised span (a prompt) inside a sequence
    losses, (_, wide) = _saved_vocab_wide(
        lambda: m.token_losses(ids, labels, attention_mask=mask, chunk_size=chunk), V)
    logits = m(ids, attention_mask=mask)
    full = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                           reduction="none")
    full = F.pad(full, (1, 0))
    assert losses.dtype == torch.float32
    assert losses.shape == ids.shape
    assert (losses - full).abs().max().item() <= 1e-6
    assert (losses[:, 0] == 0).all()
    assert (losses[labels == -100] == 0).all()
    n_sup = int((labels[:, 1:] != -100).sum())
    assert n_sup > 3 * chunk  # several chunks
    assert wide <= chunk * V  # logits are recomputed per chunk, never all kept
    w = torch.rand(ids.shape)
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad((losses * w).sum(), params)
    g2 = torch.autograd.grad((full * w).sum(), params)
    for a, b in zip(g1, g2):  # the same gradients up to float summation order
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    with torch.no_grad():
        again = m.token_losses(ids, labels, attention_mask=mask, chunk_size=chunk)
    assert torch.equal(again, losses.detach())
    none = m.token_losses(ids, torch.full_like(ids, -100))
    assert (none == 0).all()
    assert none.requires_grad


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_frozen_head_token_losses_form_the_input_gradient_in_forward(tiny, name):
    """With lm_head frozen (as under LoRA) token_losses takes LinearCrossEntropy: same losses and
    gradients as full cross-entropy in float64, and no vocabulary-wide tensor is kept for
    backward."""
    m = tiny[name][2]
    V, chunk = TINY["vocab_size"], 4
    ids, mask = batch([12, 9, 7], 12, V, pad=0, left=False, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 1:4] = -100
    head = m.lm_head.weight
    params = [p for p in m.parameters() if p is not head]
    head.requires_grad_(False)
    try:
        losses, (_, wide) = _saved_vocab_wide(
            lambda: m.token_losses(ids, labels, attention_mask=mask, chunk_size=chunk), V)
        w = torch.rand(ids.shape)
        g1 = torch.autograd.grad((losses * w).sum(), params)
        m64 = copy.deepcopy(m).double()
        logits = m64(ids, attention_mask=mask)
        full = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                               reduction="none")
        full = F.pad(full, (1, 0))
        params64 = [p for p in m64.parameters() if p.requires_grad]
        g2 = torch.autograd.grad((full * w.double()).sum(), params64)
    finally:
        head.requires_grad_(True)
    assert wide == 0
    assert int((labels[:, 1:] != -100).sum()) > 3 * chunk
    # the path taken: LinearCrossEntropy, not the recomputing checkpoint
    nodes = [losses.grad_fn]
    seen = set()
    while nodes:
        n = nodes.pop()
        if n is not None and n not in seen:
            seen.add(n)
            nodes += [f for f, _ in n.next_functions]
    assert "LinearCrossEntropyBackward" in {type(n).__name__ for n in seen}
    # fp32 against fp64
    assert (losses.double() - full).abs().max().item() <= 1e-6 * full.abs().max().item()
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert (a.double() - b).abs().max() <= 2e-5 * b.abs().max() + 1e-12
    with torch.no_grad():  # eval takes the same path, without forming gradients
        again = m.token_losses(ids, labels, attention_mask=mask, chunk_size=chunk)
    assert torch.equal(again, losses.detach())


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_gradient_checkpointing_gives_same_gradients(tiny, name):
    m = tiny[name][2]
    ids, mask = batch([12, 8], 12, TINY["vocab_size"], pad=0, left=False, seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    params = list(m.parameters())
    grads, counts = [], []
    m.train()
    try:
        for on in (False, True):
            m.gradient_checkpointing = on
            loss, (n_saved, _) = _saved_vocab_wide(lambda: m.token_losses(ids, labels, mask).sum(),
                                                   TINY["vocab_size"])
            grads.append(torch.autograd.grad(loss, params))
            counts.append(n_saved)
    finally:
        m.gradient_checkpointing = False
        m.eval()
    assert counts[1] < counts[0] / 3  # blocks really were checkpointed
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------ loading refusals
def _copy(src, dst, tensors=None, config=None):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"))
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _refusal(path):
    with pytest.raises(CheckpointError) as e:
        Transformer.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_bf16_model_is_as_accurate_as_transformers_bf16(tiny):
    """A whole bf16 forward (fp32 master weights, bf16 autocast): its distance from the fp32 model
    is no larger than transformers' bf16 distance from the same fp32 model (gradients:
    test_lora)."""
    hf, d, m = tiny["qwen2"]  # biases, a sliding window and a tied head
    ids, mask = batch([12, 9], 12, TINY["vocab_size"], pad=0, left=False)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = m(ids, attention_mask=mask).double()
            theirs = hf(input_ids=ids, attention_mask=mask).logits.double()
    where = mask.bool()
    assert rel_err(ours, ref, where) <= 1.5 * rel_err(theirs, ref, where) + 1e-3
    assert rel_err(ours, ref, where) > 0  # bf16 really happened


def test_loading_refuses_bad_checkpoints(tiny, tmp_path):
    src = tiny["llama_llama3_rope"][1]
    sd = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    msg = _refusal(_copy(src, tmp_path / "missing", missing))
    assert "missing tensor(s) model.layers.1.mlp.up_proj.weight" in msg

    extra = {**sd, "model.layers.0.extra.weight": torch.zeros(3)}
    msg = _refusal(_copy(src, tmp_path / "extra", extra))
    assert "unexpected tensor(s) model.layers.0.extra.weight in model.safetensors" in msg

    wrong = {**sd, "model.layers.0.self_attn.q_proj.weight": torch.zeros(127, 64)}
    msg = _refusal(_copy(src, tmp_path / "shape", wrong))
    assert ("tensor model.layers.0.self_attn.q_proj.weight has shape (127, 64), "
            "config.json implies (128, 64)") in msg

    msg = _refusal(_copy(src, tmp_path / "gpt2", sd, {**cfg, "model_type": "gpt2"}))
    assert "model_type 'gpt2' is not supported" in msg

    yarn = {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    assert "rope type 'yarn' is not supported" in _refusal(_copy(src, tmp_path / "yarn", sd, yarn))

    qwen2 = tiny["qwen2"][1]
    untied = load_file(qwen2 / "model.safetensors")
    qcfg = json.loads((qwen2 / "config.json").read_text())
    untied_cfg = {**qcfg, "tie_word_embeddings": False}
    msg = _refusal(_copy(qwen2, tmp_path / "untied", untied, untied_cfg))
    assert "missing tensor(s) lm_head.weight" in msg

    # a tied checkpoint may still store lm_head.weight, but only as a copy of the embeddings
    embeddings = untied["model.embed_tokens.weight"]
    ok = _copy(qwen2, tmp_path / "tied_copy", {**untied, "lm_head.weight": embeddings.clone()})
    assert torch.equal(Transformer.from_pretrained(ok).lm_head.weight, embeddings)
    bad = {**untied, "lm_head.weight": embeddings + 1}
    assert "lm_head.weight differs" in _refusal(_copy(qwen2, tmp_path / "tied_bad", bad))

    pickled = _copy(src, tmp_path / "bin")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "no model.safetensors or model.safetensors.index.json" in _refusal(pickled)

    trunc = _copy(src, tmp_path / "trunc", sd)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-10])
    assert "truncated" in _refusal(trunc)


def _fingerprint(path, dtype=torch.float32):
    return Transformer.from_pretrained(path, dtype=dtype).fingerprint


def test_fingerprint_hashes_every_tensor_as_stored(tiny, tmp_path):
    """The base model's fingerprint (kept with adapters and in a run folder) changes with the
    dtype the weights are stored in and with any one value, and with nothing else: not a second
    load, not the dtype the model computes in, not how the tensors are sharded."""
    src = tiny["llama_linear_rope"][1]
    sd = load_file(src / "model.safetensors")
    first = _fingerprint(src)
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert _fingerprint(src) == first
    assert _fingerprint(src, dtype=torch.bfloat16) == first
    assert _fingerprint(src, dtype=torch.float64) == first

    # the same values stored in fp32 and in bf16 load to equal fp32 models, but are other files
    rounded = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    widened = {k: v.float() for k, v in rounded.items()}
    in_fp32 = Transformer.from_pretrained(_copy(src, tmp_path / "fp32", widened))
    in_bf16 = Transformer.from_pretrained(_copy(src, tmp_path / "bf16", rounded))
    for name, p in in_fp32.state_dict().items():
        assert torch.equal(p, in_bf16.state_dict()[name]), name
    fp32 = in_fp32.fingerprint
    bf16 = in_bf16.fingerprint
    assert fp32 != bf16

    # the smallest change of one value of one tensor
    nudged = {k: v.clone() for k, v in sd.items()}
    up = nudged["model.layers.1.mlp.up_proj.weight"].view(-1)
    up[1] = torch.nextafter(up[1], torch.tensor(float("inf")))
    one_value = _fingerprint(_copy(src, tmp_path / "one_value", nudged))
    assert one_value != first

    # the sharded llama's tensors saved as one file
    sharded = tiny["llama"][1]
    whole = {}
    for shard in sharded.glob("model-*.safetensors"):
        whole.update(load_file(shard))
    one_file = _fingerprint(_copy(sharded, tmp_path / "one_file", whole))
    assert one_file == tiny["llama"][2].fingerprint


@pytest.mark.slow
def test_loads_into_bfloat16_without_a_float32_copy(tmp_path):
    """bf16 checkpoint -> bf16 model: values intact, and peak memory grows by ~ the model's size,
    not more."""
    cfg = dict(model_type="llama", vocab_size=16000, hidden_size=512, intermediate_size=1024,
               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)  # 65 MB in bf16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        skeleton = Transformer(ModelConfig.from_json(cfg))
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    nbytes = sum(t.numel() * 2 for t in sd.values())
    # In a fresh process: load once to warm up torch's lazy initialisation, free it, then load again
    # while a thread samples the process's anonymous resident memory (RssAnon: what the load
    # allocates; the weight file's pages that safetensors maps are page cache, which the kernel can
    # drop, so VmHWM would count them too).
    probe = f"""
import gc, sys, threading, time, torch
sys.path.insert(0, {str(ROOT)!r})
import model

def anon():
    status = open("/proc/self/status").read().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("RssAnon"))) * 1024

def load():
    return model.Transformer.from_pretrained({str(tmp_path)!r}, dtype=torch.bfloat16)

m = load()
del m
gc.collect()
base = anon()
peak = [0]
done = []

def watch():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)

t = threading.Thread(target=watch)
t.start()
m = load()
done.append(1)
t.join()
print(max(peak[0], anon()) - base)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    grown = int(run.stdout)
    assert grown < 1.3 * nbytes, (grown / nbytes)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, p in m.named_parameters():
        assert p.dtype == torch.bfloat16, name
    for k in sd:
        assert torch.equal(m.state_dict()[k], sd[k]), k
    m32 = Transformer.from_pretrained(tmp_path)  # bf16 file -> fp32 model, exact
    up = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(m32.state_dict()[up], sd[up].float())


# ------------------------------------------------------------------- real configs and tokenizers
@pytest.mark.parametrize("name", ["llama-3.2-instruct", "qwen2.5-instruct", "qwen3"])
def test_real_configs_build_the_same_model_as_transformers(fixtures_dir, name):
    """Llama-3.2-3B, Qwen2.5-7B, Qwen3-4B config.json: same tensor names and shapes as
    transformers builds, the same RoPE frequencies (Llama-3.2's llama3 scaling with factor 32), the
    same tying."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = fixtures_dir / "tokenizers" / name
    hc = AutoConfig.from_pretrained(d)
    cfg = ModelConfig.from_json(d)
    with torch.device("meta"):
        ours = Transformer(cfg)
        theirs = AutoModelForCausalLM.from_config(hc)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    rotary = type(theirs.model.rotary_emb)(hc)
    assert torch.equal(model.rope_inv_freq(cfg), rotary.inv_freq)
    assert rotary.attention_scaling == 1.0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hc.tie_word_embeddings
    layer_types = getattr(hc, "layer_types", None) or []
    assert cfg.sliding_layers == [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    assert cfg.rms_norm_eps == hc.rms_norm_eps
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    assert cfg.head_dim == head_dim


SMALL = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
             num_hidden_layers=1, num_attention_heads=2)


def test_config_errors_are_one_line(tmp_path):
    base = SMALL
    cases = [({"model_type": "phi3"}, "model_type 'phi3' is not supported"),
             ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
              "rope type 'dynamic' is not supported"),
             ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
             ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
             ({"hidden_size": None}, "'hidden_size' must be a positive integer, got None"),
             ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer, got 0"),
             ({"vocab_size": "10"}, "'vocab_size' must be a positive integer, got '10'"),
             ({"num_key_value_heads": 0},
              "'num_key_value_heads' must be a positive integer, got 0"),
             ({"num_attention_heads": 4, "num_key_value_heads": 3},
              "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
             ({"head_dim": 3}, "head_dim 3 is odd"),
             ({"hidden_size": 6}, "head_dim 3 is odd"),
             ({"max_position_embeddings": -5},
              "'max_position_embeddings' must be a positive integer"),
             ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a positive number, got 0"),
             ({"model_type": "qwen2", "layer_types": ["full_attention"] * 2},
              r"layer_types must list one type per layer \(1\)"),
             ({"model_type": "mistral", "sliding_window": 0},
              "sliding_window must be a positive integer")]
    for bad, text in cases:
        f = tmp_path / "config.json"
        f.write_text(json.dumps({**base, **bad}))
        with pytest.raises(CheckpointError, match=text) as e:
            ModelConfig.from_json(f)
        assert "\n" not in str(e.value)
        assert str(f) in str(e.value)
    # transformers' Qwen3 default
    assert ModelConfig.from_json({**base, "model_type": "qwen3"}).head_dim == 128
    # an unused window is not checked (Qwen2 configs ship one with use_sliding_window false)
    qwen2 = ModelConfig.from_json({**base, "model_type": "qwen2", "sliding_window": 0})
    assert qwen2.sliding_layers == []
    # Mistral may have no window
    mistral = ModelConfig.from_json({**base, "model_type": "mistral", "sliding_window": None})
    assert mistral.sliding_window is None


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# a RoPE setting that cannot work, and the refusal naming its key
BAD_ROPE = [
    ({"rope_scaling": {"type": "linear", "factor": 0}},
     "'rope_scaling.factor' must be a positive number, got 0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}},
     "'rope_scaling.factor' must be a positive number, got -2.0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}},
     "'rope_scaling.factor' must be a positive number, got '4'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": True}},
     "'rope_scaling.factor' must be a positive number, got True"),
    ({"rope_scaling": {"rope_type": "linear", "factor": None}},
     "'rope_scaling.factor' must be a positive number, got None"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": float("nan")}},
     "'rope_parameters.factor' must be a positive number, got nan"),
    ({"rope_scaling": {**LLAMA3_SCALING, "factor": 0.0}},
     "'rope_scaling.factor' must be a positive number, got 0.0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": 0}},
     "'rope_scaling.low_freq_factor' must be a positive number, got 0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "high_freq_factor": -4.0}},
     "'rope_scaling.high_freq_factor' must be a positive number, got -4.0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": 4.0}},
     "rope_scaling.high_freq_factor 4.0 must be greater than low_freq_factor 4.0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": 5.0}},
     "rope_scaling.high_freq_factor 4.0 must be greater than low_freq_factor 5.0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "original_max_position_embeddings": 0}},
     "'rope_scaling.original_max_position_embeddings' must be a positive integer, got 0"),
    ({"rope_scaling": {**LLAMA3_SCALING, "original_max_position_embeddings": 8192.5}},
     "'rope_scaling.original_max_position_embeddings' must be a positive integer, got 8192.5"),
    ({"rope_scaling": {**LLAMA3_SCALING, "original_max_position_embeddings": "8192"}},
     "'rope_scaling.original_max_position_embeddings' must be a positive integer, got '8192'"),
    ({"rope_scaling": {**LLAMA3_SCALING, "original_max_position_embeddings": True}},
     "'rope_scaling.original_max_position_embeddings' must be a positive integer, got True"),
    ({"rope_theta": 0}, "'rope_theta' must be a positive number, got 0"),
    ({"rope_theta": None}, "'rope_theta' must be a positive number, got None"),
    ({"rope_theta": "1e4"}, "'rope_theta' must be a positive number, got '1e4'"),
    ({"rope_theta": True}, "'rope_theta' must be a positive number, got True"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 0.0}},
     "'rope_parameters.rope_theta' must be a positive number, got 0.0"),
    ({"rope_scaling": "linear"}, "'rope_scaling' must be an object, got linear"),
    ({"partial_rotary_factor": True}, "partial_rotary_factor True is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
]


@pytest.mark.parametrize("bad, text", BAD_ROPE)
def test_rope_settings_that_cannot_work_are_refused(tmp_path, bad, text):
    """A RoPE setting that would make inv_freq infinite, NaN, negative or meaningless (a factor
    <= 0, llama3's band with high <= low, an original length that is not a positive integer, a
    string or a boolean for a number) is one line naming config.json and the key."""
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**SMALL, **bad}))
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_json(f)
    msg = str(e.value)
    assert text in msg
    assert msg.startswith(f"{f}: ")
    assert "\n" not in msg


def test_rope_refusal_comes_before_the_weights_are_read(tiny, tmp_path):
    """from_pretrained checks config.json first: a folder with a broken RoPE factor and no weights
    at all is refused for the factor."""
    src = tiny["llama_linear_rope"][1]
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"]["factor"] = 0
    msg = _refusal(_copy(src, tmp_path / "factor0", config=cfg))
    assert "config.json: 'rope_parameters.factor' must be a positive number, got 0" in msg


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 0.5},  # transformers warns (factor < 1), computes the same
    {"rope_type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": 2},  # ints
    {**LLAMA3_SCALING, "original_max_position_embeddings": 200},  # above max_position_embeddings
    {"rope_type": "default", "rope_theta": 500000},
])
def test_accepted_rope_settings_give_transformers_frequencies(rope):
    """Settings at the edge of what is accepted build the RoPE frequencies transformers builds."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    c = {**SMALL, "hidden_size": 64, "max_position_embeddings": 128, "rope_scaling": rope}
    cfg = ModelConfig.from_json(c)
    hc = LlamaConfig(**copy.deepcopy(c))
    assert torch.equal(model.rope_inv_freq(cfg), LlamaRotaryEmbedding(hc).inv_freq)


# ---------------------------------------------------------------------------- real SmolLM2-135M
@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    # our tokenizer.json and chat template, read by transformers
    htok = AutoTokenizer.from_pretrained(smollm2_dir)
    return hf, htok, Transformer.from_pretrained(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smol):
    hf, htok, m, tok = smol
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "Name a prime number."},
              {"role": "assistant", "content": "7"},
              {"role": "user", "content": "Another one?"}]]
    texts = [htok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    rows = [tok.encode(text).ids for text in texts]
    theirs = htok.apply_chat_template(chats[0], add_generation_prompt=True, return_dict=True)
    assert rows[0] == theirs["input_ids"]
    T = max(map(len, rows))
    ids = torch.tensor([[2] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = m(ids, attention_mask=mask)
    assert (ours - ref)[mask.bool()].abs().max().item() < 1e-4


@pytest.mark.slow
def test_smollm2_greedy_answer_mentions_paris(smol, smollm2_dir):
    hf, htok, m, tok = smol
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = htok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(text).ids
    stop_ids = ChatTemplate.from_pretrained(smollm2_dir).stop_ids
    new = generate(m, [prompt], max_new_tokens=24, stop_ids=stop_ids)[0]
    assert "Paris" in tok.decode(new)
    # transformers' greedy choice, teacher-forced over prompt + answer + <|im_end|>: the same
    # tokens, and the answer stopped at <|im_end|> (which generate does not return)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:].argmax(-1).tolist()
    assert ref == new + [2]
