"""Decoding with a captured CUDA graph: the GPU fast path of model.generate, kept off the reading path.

model.generate (static=True, the default on CUDA) calls static_decoder(). It decodes with a fixed-shape step:
the KV cache is written at a device-side slot and attention runs over every slot (masked), so the step has no
host synchronisation and can be captured once as a CUDA graph and replayed per token: one launch per token
instead of a few hundred small kernels. On a CPU the same step runs eagerly (what the tests check).
The graph and its cache are kept per model (DECODE_GRAPHS, weakly keyed) for the next call with the same batch
size, cache length (rounded up to 256 slots) and module state; DECODE_GRAPHS.pop(model) frees their memory.
Inside the graph, decode-sized fp32 GEMMs run as W @ x^T (DecodeGemm): for some shapes cuBLAS picks a far
slower kernel for x @ W^T at a few rows (measurements: bench/README.md).
"""
import weakref

import torch
import torch.nn.functional as F

# model -> (graph_key, cache, step); beside the model, not on it, so that deepcopy never meets a CUDA graph
DECODE_GRAPHS = weakref.WeakKeyDictionary()


class StaticKVCache:
    """model.KVCache's buffers and fields, with decode steps that write slot `slot` (a device tensor) and return
    every slot; the prefill (model.hidden_states) fills it left to right as usual and moves `slot` to its end."""

    def __init__(self, model, batch, max_len):
        self.__dict__.update(vars(model.new_cache(batch, max_len)))  # k, v, valid, next_pos, length, padded
        self.slot, self.static = torch.zeros(1, dtype=torch.long, device=self.valid.device), False

    def update(self, layer, k, v):
        if self.static:  # decode_step: fixed shapes, write at a device-side index, attend over every slot
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        s, e = self.length, self.length + k.shape[2]
        self.slot.fill_(e)
        self.k[layer][:, :, s:e], self.v[layer][:, :, s:e] = k, v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def reset(self):
        self.valid.zero_()
        self.next_pos.zero_()
        self.slot.zero_()
        self.length, self.padded = 0, False


class DecodeGemm(torch.overrides.TorchFunctionMode):
    """F.linear on `device` (CUDA) in fp32 with at most 16 rows and no autograd, computed as W @ x^T."""

    def __init__(self, device="cuda"):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type == self.device and x.dtype == torch.float32 \
                    and 0 < x.numel() <= 16 * x.shape[-1] and not torch.is_grad_enabled():
                y = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], weight.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def decode_step(model, tok, cache):
    """Logits [B, V] of one new token per row (tok [B]) with fixed shapes and no host synchronisation: writes
    slot cache.slot and attends over every slot marked valid (masked), where hidden_states slices the filled part."""
    cache.static = True
    slots = torch.arange(cache.valid.shape[1], device=tok.device)
    cache.valid.index_fill_(1, cache.slot, True)
    ok = cache.valid & (slots <= cache.slot)                           # [B, max_len]
    w = model.config.sliding_window
    masks = {None: ok[:, None, None]}
    if w is not None:
        masks[w] = (ok & (slots > cache.slot - w))[:, None, None]
    x = model.model.embed_tokens(tok[:, None])
    cos, sin = model.rope(cache.next_pos[:, None], x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, masks, cache)
    cache.next_pos += 1
    cache.slot += 1
    cache.static = False
    return model.lm_head(model.model.norm(x)[:, 0])


def graph_key(model, B, max_len):
    """What a captured decode step has baked in: shapes, every module's plain attributes, every tensor's address."""
    flags = tuple((id(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float))))
                  for m in model.modules())
    return B, max_len, flags, tuple((t.data_ptr(), t.dtype) for t in model.state_dict(keep_vars=True).values())


def static_decoder(model, B, max_len):
    """(cache, step) for model.generate: on CUDA decode_step captured as a graph (see _graph_step), else eager."""
    if model.model.embed_tokens.weight.device.type != "cuda":
        cache = StaticKVCache(model, B, max_len)
        return cache, lambda tok: decode_step(model, tok, cache)
    return _graph_step(model, B, max_len)


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
    cache = StaticKVCache(model, B, max_len)
    tok_in = torch.zeros(B, dtype=torch.long, device=cache.valid.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), DecodeGemm():  # warm-up runs (they allocate workspaces) outside the capture
        for _ in range(2):
            decode_step(model, tok_in, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), DecodeGemm():
        logits = decode_step(model, tok_in, cache)
    cache.reset()  # undo the warm-up's writes

    def step(tok):
        tok_in.copy_(tok)
        graph.replay()
        return logits
    DECODE_GRAPHS[model] = (key, cache, step)
    return cache, step
