"""A LLaMA / Mistral / Qwen2 / Qwen3 decoder in plain PyTorch, exact to Hugging Face transformers.

In reading order: config, rotary embeddings, attention, MLP, block, the Transformer and its loss at supervised
positions, loading a checkpoint folder (files read by support/checkpoint.py), the KV cache, generation. Module names
equal Hugging Face's (`model.layers.0.self_attn.q_proj`): lora.py wraps layers by name; adapters load in PEFT.
"""
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.utils.checkpoint import checkpoint

from support.checkpoint import (CheckpointError, check_config, check_sizes, names as _names,  # noqa: F401
                              read_json, safetensors_index)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    sliding_layers: list = field(default_factory=list)

    @classmethod
    def from_json(cls, path_or_dict) -> "ModelConfig":
        """Read a Hugging Face config.json (a folder, the file, or the dict itself), old or new rope style."""
        c, where = path_or_dict, "config"
        if not isinstance(c, dict):
            p = Path(c) / "config.json" if Path(c).is_dir() else Path(c)
            c, where = read_json(p), str(p)
        mt = c.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
        check_config(c, where)  # the raw sizes' types and ranges (support/checkpoint.py)
        hidden, heads, n_layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        # Sliding window as transformers applies it: Mistral on every layer; Qwen per `layer_types`, or (older
        # configs) with use_sliding_window on the layers from max_window_layers on; Llama never.
        window, sliding = c.get("sliding_window", 4096 if mt == "mistral" else None), []
        if mt == "mistral" and window is not None:
            sliding = list(range(n_layers))
        elif mt in ("qwen2", "qwen3") and c.get("layer_types"):
            sliding = [i for i, t in enumerate(c["layer_types"]) if t == "sliding_attention"]
        elif mt in ("qwen2", "qwen3") and c.get("use_sliding_window") and window is not None:
            sliding = list(range(c.get("max_window_layers", 28), n_layers))
        bias = bool(c.get("attention_bias", False)) and mt in ("llama", "qwen3")  # Qwen2: fixed q/k/v bias
        cfg = cls(
            model_type=mt, vocab_size=c["vocab_size"], hidden_size=hidden, intermediate_size=c["intermediate_size"],
            num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads")
            or heads, head_dim=c.get("head_dim") or (128 if mt == "qwen3" else hidden // heads),
            rms_norm_eps=_positive(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            tie_word_embeddings=bool(c.get("tie_word_embeddings")),
            qkv_bias=bias or mt == "qwen2", o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3", max_position_embeddings=c.get("max_position_embeddings", 4096),
            sliding_window=window if sliding else None, sliding_layers=sliding, **_rope_config(c, where))
        return check_sizes(cfg, where)  # what the sizes derived above must satisfy


def _positive(x, key, where):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1e300:
        raise CheckpointError(f"{where}: {key!r} must be a positive number, got {x!r}")
    return float(x)


def _rope_config(c, where) -> dict:
    """RoPE fields: transformers >= 5 writes `rope_parameters`; Hub checkpoints ship `rope_theta` + `rope_scaling`."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3)")
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor != 1 is not supported")
    out = dict(rope_theta=_positive(rope.get("rope_theta") or c.get("rope_theta") or 10000.0, "rope_theta", where),
               rope_type=kind)
    for key in {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")
                }[kind]:
        if key not in rope:
            raise CheckpointError(f"{where}: rope type {kind!r} needs {key!r}")
        out["rope_" + key] = float(rope[key])
    if kind == "llama3":
        out["rope_original_max_position_embeddings"] = int(rope.get("original_max_position_embeddings")
                                                            or c.get("max_position_embeddings", 8192))
    return out


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32) of the rotary embeddings, scaled as cfg.rope_type says."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d))
    if cfg.rope_type == "linear":  # positions / factor == frequencies / factor
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":  # Llama 3.1: slow frequencies / factor, fast ones kept, smooth in between
        old_len, lo, hi = cfg.rope_original_max_position_embeddings, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """Hugging Face's half-split rotation: pairs (i, i + d/2), so checkpoints need no q/k permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as transformers does)
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.hd = layer, cfg.head_dim
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        D, q, kv, b = cfg.hidden_size, self.n_head * self.hd, self.n_kv * self.hd, cfg.qkv_bias
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, q, b), nn.Linear(D, kv, b), nn.Linear(D, kv, b)
        self.o_proj = nn.Linear(q, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else None

    def forward(self, x, cos, sin, masks, cache=None):
        B, T, _ = x.shape
        q, k = self.q_proj(x).view(B, T, self.n_head, self.hd), self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                          # [B, n_kv, past + T, hd]
        mask = masks[self.window]                                          # None: plain causal, no padding
        gqa = self.n_kv != self.n_head
        if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):
            # on CUDA only flash attention (half precision, no mask) takes grouped K/V; give every other kernel
            # one K/V per query head (head h reads K/V head h // group) rather than fall back to the math path
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, H, b), nn.Linear(D, H, b), nn.Linear(H, D, b)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), Attention(cfg, layer)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), MLP(cfg)

    def forward(self, x, cos, sin, masks, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # Hugging Face's `model.` prefix: embed_tokens, layers, norm
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def gemm_dtype(x) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where autocast is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config, self.path, self.gradient_checkpointing = cfg, None, False
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)  # fp32, a plain attribute so .to(dtype) cannot round it

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """Final-normed hidden states [B, T, D]. attention_mask [B, T]: 1 = real token. Positions count the real
        tokens before each one (so left padding is invisible); with a cache they continue where it stopped."""
        B, T = input_ids.shape
        dev, start = input_ids.device, cache.length if cache is not None else 0
        real = None if attention_mask is None else attention_mask[:, -T:].bool()
        real = None if real is not None and bool(real.all()) else real
        steps = torch.arange(T, device=dev)[None] if real is None else real.long().cumsum(-1) - 1
        positions = ((cache.next_pos[:, None] if cache is not None else 0) + steps).clamp(min=0).expand(B, T)
        keys_real = real
        if cache is not None:
            cache.valid[:, start:start + T] = True if real is None else real
            cache.next_pos += T if real is None else real.sum(-1)
            cache.padded |= real is not None
            keys_real = cache.valid[:, :start + T] if cache.padded else None
        masks = {w: self._mask(keys_real, start, T, w, dev) for w in {None, self.config.sliding_window}}
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:  # with checkpointing, each block is recomputed in backward
            x = checkpoint(block, x, cos, sin, masks, cache, use_reentrant=False) if recompute else \
                block(x, cos, sin, masks, cache)
        if cache is not None:
            cache.length = start + T
        return self.model.norm(x)

    def rope(self, positions, dtype):
        """cos, sin [B, 1, T, hd] for positions [B, T], computed in fp32."""
        self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq              # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _mask(keys_real, start, T, window, dev):
        """Boolean attention mask [B|1, 1, T, start+T] (True = attend), or None for plain causal attention."""
        if keys_real is None and window is None and start == 0:
            return None
        q = torch.arange(start, start + T, device=dev)[:, None]           # cache slots of the queries
        k = torch.arange(start + T, device=dev)[None]
        ok = (k <= q) if window is None else (k <= q) & (k > q - window)
        if keys_real is not None:
            ok = (ok[None] & keys_real[:, None]) | (k == q)  # a padding query sees itself: no empty row, no NaN
        return ok.reshape(-1, 1, T, start + T)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """Logits [B, T, V] in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))

    def token_losses(self, input_ids, labels, attention_mask=None, chunk_size=1024, cache=None):
        """Per-token cross-entropy [B, T] (fp32), 0 where labels == -100 and at t = 0. labels align with
        input_ids as in transformers: labels[b, t] is predicted from position t-1. The vocabulary projection
        runs at supervised positions only, chunk_size rows at a time, so no [B, T, V] logits ever exist.
        cache: the K/V of a prompt these rows continue (no gradient)."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"token_losses: labels {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
        h, target = self.hidden_states(input_ids, attention_mask, cache)[:, :-1], labels[:, 1:]
        sel = target != -100
        h, y = h[sel], target[sel]                                         # [N, D], [N]
        if y.numel() == 0:  # nothing supervised: zeros, still connected to the graph
            return F.pad(h.new_zeros(sel.shape, dtype=torch.float32) + 0 * h.sum(), (1, 0))
        w, dt, grad = self.lm_head.weight, gemm_dtype(h), torch.is_grad_enabled()
        if grad and w.requires_grad:  # a trainable head: each chunk's logits are recomputed in backward
            ce = lambda hc, yc: row_cross_entropy(F.linear(hc.to(dt), w.to(dt)).float(), yc)  # noqa: E731
            vals = torch.cat([checkpoint(ce, hc, yc, use_reentrant=False)
                              for hc, yc in zip(h.split(chunk_size), y.split(chunk_size))])
        else:  # a frozen head (LoRA, eval): the gradient wrt h is formed in forward, nothing is recomputed
            vals = LinearCrossEntropy.apply(h, w, y, chunk_size, dt, grad and h.requires_grad)
        losses = torch.zeros(sel.shape, dtype=torch.float32, device=h.device).masked_scatter(sel, vals)
        return F.pad(losses, (1, 0))

    def new_cache(self, batch, max_len) -> "KVCache":
        return KVCache(self.config, batch, max_len, self.lm_head.weight.dtype, self.lm_head.weight.device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """A Hugging Face folder in `dtype` on `device`: built on the meta device, each tensor read and assigned in
        turn (peak memory about the model's size); missing, unexpected, mis-shaped and non-finite tensors refused."""
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        found = safetensors_index(path)                                    # name -> (file, open file)
        expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        missing = [k for k in expected if k not in found and (k != "lm_head.weight" or not cfg.tie_word_embeddings)]
        if missing:
            raise CheckpointError(f"{path}: missing tensor(s) {_names(missing)} ({len(missing)} of {len(expected)})")
        unexpected = [k for k in found if k not in expected]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensor(s) {_names(unexpected)} in "
                                  f"{_names(sorted({found[k][0].name for k in unexpected}))}")
        for k, (file, st) in found.items():
            dt, shape = st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape())
            if dt not in ("F64", "F32", "F16", "BF16") or shape != expected[k]:
                raise CheckpointError(f"{file}: tensor {k} has " + (f"dtype {dt}, expected a float type" if shape ==
                                      expected[k] else f"shape {shape}, config.json implies {expected[k]}"))
        fingerprint = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
        for k, (file, st) in sorted(found.items()):
            try:
                t = st.get_tensor(k)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: tensor {k} cannot be read, truncated or corrupt ({e})") from None
            spots = torch.arange(64) * (t.numel() - 1) // 63  # the base's identity, kept with adapters (lora.py)
            fingerprint.update(t.flatten()[spots].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
            t = t.to(device=device, dtype=dtype)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{file}: tensor {k} holds NaN or infinite values (as {dtype})")
            mod, _, name = k.rpartition(".")
            setattr(model.get_submodule(mod), name, nn.Parameter(t))
        if cfg.tie_word_embeddings:  # a tied checkpoint may store lm_head.weight too, but only as a copy
            if "lm_head.weight" in found and not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
                raise CheckpointError(f"{found['lm_head.weight'][0]}: lm_head.weight differs from "
                                      "model.embed_tokens.weight but config.json says tie_word_embeddings")
            model.lm_head.weight = model.model.embed_tokens.weight
        model.path, model.fingerprint = str(path), fingerprint.hexdigest()[:16]
        return model.eval()


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits = h @ W^T (fp32 softmax) for a frozen W, chunk rows at a time. Forward also
    forms d loss_n / d h_n = (softmax_n - onehot_n) W, so no [N, V] logits are kept or recomputed for backward."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk, dt, need_grad):
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


class KVCache:
    """Per-layer K/V buffers [B, n_kv, max_len, hd], filled left to right (`length` slots so far). valid[b, s]:
    slot s of row b holds a real token (False for left padding); next_pos[b]: row b's next RoPE position."""

    def __init__(self, cfg: ModelConfig, batch, max_len, dtype, device):
        shape, n = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim), cfg.num_hidden_layers
        self.k, self.v = ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)] for _ in "kv")
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.padded = 0, False

    def expand(self, batch):  # a copy of this one-row cache (a prompt that every row shares) for `batch` rows
        c, rep = object.__new__(KVCache), (lambda t: t.expand(batch, *t.shape[1:]).clone())
        c.__dict__.update(vars(self), k=[*map(rep, self.k)], v=[*map(rep, self.v)], valid=rep(self.valid),
                          next_pos=rep(self.next_pos))
        return c

    def update(self, layer, k, v):
        s, e = self.length, self.length + k.shape[2]
        self.k[layer][:, :, s:e], self.v[layer][:, :, s:e] = k, v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token per row of logits [B, V]: argmax if temperature == 0, else a draw from softmax(logits / T)
    restricted to the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()  # shifted to max 0 and in float64: no inf / inf or x / 0 for a tiny temperature
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        drop[..., 0] = False               # always keep the most likely token
        probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, stop_ids=(), pad_id=0, seed=None,
             static=None):
    """New tokens for each prompt (lists of ids), batched with left padding and a KV cache. Each row stops at its
    first token in stop_ids, which is NOT returned, or after max_new_tokens. static (default: on CUDA) replays the
    decode step as a captured CUDA graph, one launch per token (support/cuda_graphs.py; off the reading path)."""
    if not prompts or not all(prompts) or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need prompts, none empty, max_new_tokens >= 1, temperature >= 0 and "
                         f"0 < top_p <= 1, got {len(prompts)} prompts, {max_new_tokens}, {temperature}, {top_p}")
    dev = model.model.embed_tokens.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
    real = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    was_training = model.training
    model.eval()
    if (dev.type == "cuda" if static is None else static) and max_new_tokens > 1:
        from support.cuda_graphs import static_decoder
        cache, step = static_decoder(model, B, L + max_new_tokens)
    else:
        cache = model.new_cache(B, L + max_new_tokens)
        step = lambda tok: model(tok[:, None], cache=cache)[:, -1]  # noqa: E731
    logits = model.lm_head(model.hidden_states(ids, real, cache=cache)[:, -1])  # the prefill
    done, out = torch.zeros(B, dtype=torch.bool, device=dev), []
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, gen).masked_fill(done, pad_id)
        out.append(tok)
        done |= torch.isin(tok, stops)
        if i == max_new_tokens - 1 or (len(stops) and bool(done.all())):
            break
        logits = step(tok)
    model.train(was_training)
    return [row[:next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))]
            for row in torch.stack(out, 1).tolist()]
