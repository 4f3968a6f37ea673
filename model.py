"""A LLaMA / Mistral / Qwen2 / Qwen3 decoder in plain PyTorch, exact to Hugging Face transformers.

In reading order: config, rotary embeddings, attention, MLP, block, the Transformer (its forward,
its loss at supervised positions only, loading a checkpoint folder), the loss's kernels, the KV
cache, generation. Reading and checking the checkpoint's files (config.json, safetensors) is
support/checkpoint.py. Module names equal Hugging Face's (`model.layers.0.self_attn.q_proj`), so
lora.py wraps layers by name and its adapters load in PEFT.
"""
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.checkpoint import check_sizes, config_fields, load_weights, read_config

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
    head_dim: int                         # may differ from hidden_size // num_attention_heads
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
    sliding_window: int | None = None     # sliding-window attention on these layers:
    sliding_layers: list = field(default_factory=list)

    @classmethod
    def from_json(cls, path_or_dict) -> "ModelConfig":
        """Read a Hugging Face config.json (a folder, the file, or the dict itself), old or new rope
        style; refusals are one line naming the file."""
        c, where = read_config(path_or_dict)
        config = cls(**config_fields(c, where, SUPPORTED_MODEL_TYPES))
        return check_sizes(config, where)


# ----------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32, CPU) of the rotary embeddings, as rope_type says."""
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu")
    inv_freq = 1.0 / (cfg.rope_theta ** (dims / cfg.head_dim))
    if cfg.rope_type == "linear":  # positions / factor == frequencies / factor
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        return llama3_scaled(inv_freq, cfg)
    return inv_freq


def llama3_scaled(inv_freq, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling: slow frequencies divided by factor, fast ones kept, smooth between."""
    old_len = cfg.rope_original_max_position_embeddings
    low = cfg.rope_low_freq_factor
    high = cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled, scaled)


def apply_rope(x, cos, sin):
    """Hugging Face's half-split rotation of pairs (i, i + d/2): no q/k permutation is needed."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- the layers
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as transformers does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.num_attention_heads
        self.n_kv_head = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim = self.n_head * self.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        # a sliding window of this many slots, on the layers that have one
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else None

    def forward(self, x, cos, sin, masks, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, n_head, T, head_dim]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, n_kv_head, T, head_dim]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # every slot: [B, n_kv_head, max_len, head_dim]
        mask = masks[self.window]  # None: plain causal attention, no padding
        group = self.n_head // self.n_kv_head
        grouped = group > 1
        if grouped and q.is_cuda and (mask is not None or q.dtype == torch.float32):
            # On CUDA only flash attention (half precision, no mask) takes grouped K/V: every other
            # kernel gets one K/V per query head rather than fall back to the math path.
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            grouped = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=grouped)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

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
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Decoder(nn.Module):  # Hugging Face's `model.` prefix: embed_tokens, layers, norm
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask(query_slots, keys_real, window):
    """Boolean mask [B, 1, T, S] (True = attend) of queries at query_slots [T] over key slots 0..S-1
    (keys_real [B, S]): causal, within the window if any, real keys only, and always the query
    itself, so that a padding row's softmax is never empty (no NaN)."""
    keys = torch.arange(keys_real.shape[1], device=keys_real.device)
    queries = query_slots[:, None]
    ok = keys <= queries
    if window is not None:
        ok = ok & (keys > queries - window)
    ok = (ok & keys_real[:, None]) | (keys == queries)
    return ok[:, None]


def gemm_dtype(x) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ----------------------------------------------------------------------------- the Transformer
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)  # fp32, a plain attribute so .to(dtype) cannot round it
        self.gradient_checkpointing = False  # recompute each block in backward (training only)
        self.path = None         # the checkpoint folder, set by from_pretrained
        self.fingerprint = None  # the checkpoint's identity (config, weights as stored), as path
        self.decode_cache = None  # generate's compiled decode keeps its cache here (None frees it)

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """Final-normed hidden states [B, T, D]. attention_mask [B, T]: 1 = real token. Positions
        count the real tokens before each one (left padding is invisible); with a cache they go on
        from its rows', and the tokens' K/V are written after the ones it holds."""
        real = None
        if attention_mask is not None:
            real = attention_mask[:, -input_ids.shape[1]:].bool()
        positions, masks = self.positions_and_masks(input_ids, real, cache)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute:  # keep only the block's input; its activations are recomputed in backward
                x = checkpoint(block, x, cos, sin, masks, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, masks, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def positions_and_masks(self, input_ids, real, cache=None):
        """RoPE positions [B, T] and the attention mask of each window size (None: no window). With
        a cache the tokens attend over all of its slots, the empty ones masked: every shape is fixed
        and nothing waits on the host, so torch.compile can capture a decode step whole."""
        B, T = input_ids.shape
        plain_causal = cache is None and (real is None or bool(real.all()))  # no padding, no cache
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        steps = real.long().cumsum(-1) - 1
        slots = torch.arange(T, device=input_ids.device)
        keys_real = real
        if cache is not None:
            steps = steps + cache.next_pos[:, None]
            slots = slots + cache.length
            cache.valid.index_copy_(1, slots, real)
            cache.next_pos += real.sum(-1)
            keys_real = cache.valid
        masks = {}
        for window in {None, self.config.sliding_window}:
            if plain_causal and window is None:
                masks[window] = None  # SDPA's is_causal, which the fastest kernels take
            else:
                masks[window] = attention_mask(slots, keys_real, window)
        return steps.clamp(min=0), masks

    def rope(self, positions, dtype):
        """cos, sin [B, 1, T, head_dim] for positions [B, T], computed in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """Logits [B, T, V] in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))

    def token_losses(self, input_ids, labels, attention_mask=None, chunk_size=1024, cache=None):
        """Per-token cross-entropy [B, T] (fp32), 0 where labels == -100 and at t = 0; labels[b, t]
        is predicted from position t-1, as in transformers. The vocabulary projection runs at
        supervised positions only, chunk_size rows at a time: no [B, T, V] logits ever exist.
        cache: the K/V of a prompt these rows continue (no grad)."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"token_losses: labels {tuple(labels.shape)} != "
                             f"input_ids {tuple(input_ids.shape)}")
        h = self.hidden_states(input_ids, attention_mask, cache)[:, :-1]
        targets = labels[:, 1:]
        supervised = targets != -100
        h = h[supervised]        # [N, D]
        y = targets[supervised]  # [N]
        if y.numel() == 0:  # nothing supervised: zeros, still connected to the graph
            zeros = h.new_zeros(supervised.shape, dtype=torch.float32) + 0 * h.sum()
            return F.pad(zeros, (1, 0))
        weight = self.lm_head.weight
        dtype = gemm_dtype(h)
        grad = torch.is_grad_enabled()
        if grad and weight.requires_grad:
            # a trainable head: each chunk's logits are recomputed in backward
            chunks = zip(h.split(chunk_size), y.split(chunk_size))
            values = torch.cat([checkpoint(chunk_cross_entropy, hc, yc, weight, dtype,
                                           use_reentrant=False) for hc, yc in chunks])
        else:
            # a frozen head (LoRA, eval): the gradient wrt h is formed in forward, none recomputed
            need_grad = grad and h.requires_grad
            values = LinearCrossEntropy.apply(h, weight, y, chunk_size, dtype, need_grad)
        losses = torch.zeros(supervised.shape, dtype=torch.float32, device=h.device)
        return F.pad(losses.masked_scatter(supervised, values), (1, 0))

    def new_cache(self, batch, max_len) -> "KVCache":
        """An empty KV cache of `batch` rows, max_len slots each, in the model's dtype, device."""
        weight = self.lm_head.weight
        return KVCache.empty(self.config, batch, max_len, weight.dtype, weight.device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """A Hugging Face folder in `dtype` on `device`: built on the meta device, then each tensor
        read, checked and assigned (support/checkpoint.py), so peak memory is about the model's."""
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        identity = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        tied = cfg.tie_word_embeddings
        tensors, model.fingerprint = load_weights(path, expected, tied, identity, dtype, device)
        for name, tensor in tensors.items():
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(tensor))
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.path = str(path)
        return model.eval()


# ----------------------------------------------------------------------------- the loss
def row_cross_entropy(logits, y, lse=None):
    """-log softmax(logits)[y] per row of fp32 logits [n, V], targets y [n]."""
    if lse is None:
        lse = logits.logsumexp(-1)
    return lse - logits.gather(1, y[:, None]).squeeze(1)


def chunk_cross_entropy(h, y, weight, dtype):
    """row_cross_entropy of logits = h @ weight^T, computed in dtype, softmax in fp32."""
    logits = F.linear(h.to(dtype), weight.to(dtype)).float()
    return row_cross_entropy(logits, y)


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits = h @ W^T (fp32 softmax) for a frozen W, chunk rows at once.
    Forward also forms d loss_n / d h_n = (softmax_n - onehot_n) W, so no [N, V] logits are kept
    or recomputed for backward."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_size, dtype, need_grad):
        w = weight.to(dtype)
        losses = []
        grads = []
        with torch.autocast(h.device.type, enabled=False):
            for hc, yc in zip(h.split(chunk_size), y.split(chunk_size)):
                logits = F.linear(hc.to(dtype), w).float()  # [n, V]
                lse = logits.logsumexp(-1)
                losses.append(row_cross_entropy(logits, yc, lse))
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(len(yc), device=probs.device), yc] -= 1.0
                    grads.append((probs.to(dtype) @ w).to(h.dtype))
        ctx.save_for_backward(torch.cat(grads) if need_grad else None)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_h,) = ctx.saved_tensors
        grad_h = (grad_h.float() * grad_losses[:, None]).to(grad_h.dtype)
        return grad_h, None, None, None, None, None


# ----------------------------------------------------------------------------- the KV cache
@dataclass(eq=False)
class KVCache:
    """Preallocated K/V of every layer, filled left to right. Its size never changes, so a decode
    step over it has fixed shapes. A slot holds a token, real or left padding, of every row."""
    k: list          # per layer [B, n_kv_head, max_len, head_dim]
    v: list          # per layer, the same
    valid: torch.Tensor     # [B, max_len] bool: the slot holds a real token
    next_pos: torch.Tensor  # [B] long: each row's next RoPE position
    length: torch.Tensor    # [] long: slots filled so far, the same in every row

    @classmethod
    def empty(cls, cfg: ModelConfig, batch, max_len, dtype, device) -> "KVCache":
        """A cache of `batch` rows, max_len slots each, with no token in it."""
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                   next_pos=torch.zeros(batch, dtype=torch.long, device=device),
                   length=torch.zeros((), dtype=torch.long, device=device))

    def update(self, layer, k, v):
        """Write k, v [B, n_kv_head, T, head_dim] in the T slots after `length`; return all."""
        slots = self.length + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def expand(self, batch) -> "KVCache":
        """An independent copy of this one-row cache (a prompt all rows share) for `batch` rows."""
        return KVCache(k=[repeat_row(t, batch) for t in self.k],
                       v=[repeat_row(t, batch) for t in self.v],
                       valid=repeat_row(self.valid, batch),
                       next_pos=repeat_row(self.next_pos, batch),
                       length=self.length.clone())

    def fits(self, batch, max_len, dtype, device) -> bool:
        """Whether this cache holds `batch` rows of max_len slots, in dtype on device."""
        keys = self.k[0]
        shape_fits = keys.shape[0] == batch and keys.shape[2] == max_len
        return shape_fits and keys.dtype == dtype and keys.device == device

    def tensors(self) -> list:
        """Every tensor of the cache."""
        return [*self.k, *self.v, self.valid, self.next_pos, self.length]

    def reset(self):
        """Empty the cache again, keeping its buffers (and so their addresses)."""
        for t in self.tensors():
            t.zero_()


def repeat_row(t, batch):
    """A copy of t [1, ...] with its one row repeated `batch` times."""
    return t.expand(batch, *t.shape[1:]).clone()


# ----------------------------------------------------------------------------- generation
def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token per row of logits [B, V]: argmax at temperature 0, else a draw from softmax(logits
    / T) restricted to the fewest most likely tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    # in float64 and shifted to max 0: no inf / inf or x / 0 for a tiny temperature
    logits = logits.double()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:  # nucleus sampling
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        drop[..., 0] = False               # always keep the most likely token
        probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_one_token(model, tok, cache):
    """Logits [B, V] of one new token per row (tok [B]) after the cache's: the decode step."""
    return model(tok[:, None], cache=cache)[:, -1]


@functools.cache
def compiled_decode(device_type):
    """decode_one_token through torch.compile: on CUDA as a CUDA graph (reduce-overhead, one launch
    per token). Its guards recompile it for a new batch size, dtype, LoRA layer or merge."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_one_token, mode=mode, fullgraph=True)


def reusable_cache(model, batch, max_len) -> KVCache:
    """An empty cache for the compiled decode step, kept on the model and reused (static buffers,
    length rounded up to 256), so a call of the same batch size replays the captured step."""
    max_len = -(-max_len // 256) * 256
    weight = model.lm_head.weight
    cache = model.decode_cache
    if cache is None or not cache.fits(batch, max_len, weight.dtype, weight.device):
        model.decode_cache = None  # free the old buffers first
        cache = model.new_cache(batch, max_len)
        for t in cache.tensors():
            torch._dynamo.mark_static_address(t)
        model.decode_cache = cache
    cache.reset()
    return cache


@torch.no_grad()
def generate(model, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, stop_ids=(), pad_id=0,
             seed=None, compile=None):
    """New tokens for each prompt (lists of ids), batched with left padding and a KV cache. A row
    stops at its first token in stop_ids (not returned) or after max_new_tokens. compile (default:
    on CUDA) runs the decode step through compiled_decode."""
    valid = all(prompts) and max_new_tokens >= 1 and temperature >= 0 and 0 < top_p <= 1
    if not prompts or not valid:
        raise ValueError(f"generate: need prompts, none empty, max_new_tokens >= 1, "
                         f"temperature >= 0 and 0 < top_p <= 1, got {len(prompts)} prompts, "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    device = model.lm_head.weight.device
    ids, real = left_padded(prompts, pad_id, device)
    max_len = ids.shape[1] + max_new_tokens
    if compile is None:
        compile = device.type == "cuda"
    compile = compile and max_new_tokens > 1
    was_training = model.training
    model.eval()
    if compile:
        cache = reusable_cache(model, len(prompts), max_len)
        step = compiled_decode(device.type)
    else:
        cache = model.new_cache(len(prompts), max_len)
        step = decode_one_token
    logits = model.lm_head(model.hidden_states(ids, real, cache)[:, -1])  # the prefill, eager
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        out.append(tok)
        done |= torch.isin(tok, stops)
        if i == max_new_tokens - 1 or (len(stops) and bool(done.all())):
            break
        if compile:  # the last step's logits are consumed: a CUDA graph may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(model, tok, cache)
    model.train(was_training)
    return [cut_at_stop(row, stop_ids) for row in torch.stack(out, 1).tolist()]


def left_padded(prompts, pad_id, device):
    """ids [B, L] of the prompts left-padded to the longest one, and their attention mask [B, L]."""
    longest = max(len(p) for p in prompts)
    ids = [[pad_id] * (longest - len(p)) + list(p) for p in prompts]
    real = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(real, device=device)


def cut_at_stop(tokens, stop_ids):
    """tokens up to (not including) the first one in stop_ids."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens
