"""The work bench/speed.py times, on both sides: our model.py + lora.py and transformers + PEFT
loaded the same way, a batch of chat-like token spans, one LoRA training step each, what ReSURE adds
to ours, and the useful FLOPs of a step. The one place bench/ calls train.context_gain."""
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

import model as M
import train
from data import turn_group
from lora import DEFAULT_TARGETS, apply_lora
from resure import ReSURE, count_units, reweighted_loss, unit_losses
from support.distributed import all_reduce_sum, gather

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- the batch
def chat_batch(vocab, batch, length, seed=0):
    """Random ids; spans of 8..56 tokens alternate context / assistant (turn k = the k-th assistant
    span), about half of them supervised. Returns (dict(input_ids, labels, attention_mask, turn_ids,
    group), the supervised count)."""
    g = np.random.default_rng(seed)
    ids = torch.from_numpy(g.integers(0, vocab, (batch, length))).long()
    labels = torch.full_like(ids, -100)
    turn_ids = torch.zeros_like(ids)
    for b in range(batch):
        pos = 0
        turn = 0
        assistant = False
        while pos < length:
            n = int(g.integers(8, 57))
            if assistant:
                turn += 1
                labels[b, pos:pos + n] = ids[b, pos:pos + n]
                turn_ids[b, pos:pos + n] = turn
            pos += n
            assistant = not assistant
    labels[:, 0] = -100
    group = torch.tensor([turn_group(t, l) for t, l in zip(turn_ids, labels)])
    out = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
               turn_ids=turn_ids, group=group)
    return out, int((labels[:, 1:] != -100).sum())


def on_device(b, device):
    return {k: v.to(device) for k, v in b.items()}


def autocast(dtype, device):
    """The context a step runs in: autocast to dtype below fp32, nothing at fp32."""
    if dtype == torch.float32:
        return nullcontext
    return partial(torch.autocast, device.type, dtype=dtype)


def free_rows(b, header=6):
    """--detector loss+gain's extra input: every assistant span of the batch alone after `header`
    context tokens (the empty user turn of a chat template), as data.collate's free_* rows."""
    rows = []
    head = b["input_ids"][0, :header].tolist()  # the same start on every row, as a template renders
    for i, (ids, turns) in enumerate(zip(b["input_ids"], b["turn_ids"])):
        for k in turns.unique().tolist()[1:]:
            span = ids[turns == k].tolist()
            rows.append((i, k, head + span, [-100] * header + span))
    width = max(len(r[2]) for r in rows)
    ids = [r[2] + [0] * (width - len(r[2])) for r in rows]
    labels = [r[3] + [-100] * (width - len(r[3])) for r in rows]
    mask = [[1] * len(r[2]) + [0] * (width - len(r[2])) for r in rows]
    return dict(free_ids=torch.tensor(ids), free_labels=torch.tensor(labels),
                free_mask=torch.tensor(mask), free_unit=torch.tensor([r[:2] for r in rows]))


# ---------------------------------------------------------------------------------------- the sides
def load_ours(path, dtype, rank, device):
    net = M.Transformer.from_pretrained(path, dtype=dtype, device=device)
    apply_lora(net, r=rank, alpha=2 * rank, dropout=0.0, verbose=False)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net, opt


def load_hf(path, dtype, rank, device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    hf = get_peft_model(hf, config)
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    return hf, opt


def optimizer_step(opt, loss):
    """The rest of a training step, the same on every side: backward, AdamW step, no gradients."""
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def ours_step(net, opt, b, n_sup, amp):
    with amp():
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
    return optimizer_step(opt, tok.sum() / n_sup)


def hf_step(hf, opt, b, amp):
    with amp():
        out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                 use_cache=False)
    return optimizer_step(opt, out.loss)


# --------------------------------------------------------------------------------- what ReSURE adds
def new_resure(seed=0, gain_alpha=None):
    """Active ReSURE (no warm-up, no ramp, per-unit records as train.py keeps them), statistics
    primed so that some units are flagged."""
    rs = ReSURE(warmup_samples=0, ramp_steps=0, record=True, gain_alpha=gain_alpha)
    g = np.random.default_rng(seed)
    groups = np.repeat(np.arange(1, 9), 32)
    losses = g.gamma(4.0, 2.0, len(groups))
    gains = None
    if gain_alpha is not None:
        gains = g.normal(0.5, 0.5, len(groups))
    rs.warmup_from(losses, groups, gains=gains)
    return rs


def resure_loss(tok, b, rs, gains=None):
    """What ReSURE adds to a train.py step of one micro-batch: the statistics' copy kept for a
    rollback, the step's unit and token totals, unit losses per turn, gather (losses, groups, sample
    ids, turns), weigh with per-unit records (then popped, as train.py writes them out), Eq. 1.
    gains(losses, sample ids, turns, batch size): each unit's context gain (--detector loss+gain).
    """
    rs.state_dict()  # train.py keeps this copy to undo a skipped step
    total_units, total_tokens = all_reduce_sum(*count_units(b["labels"], b["turn_ids"], "turn"))
    losses, groups, ntok, sidx, turn = unit_losses(tok, b["labels"], b["turn_ids"], b["group"],
                                                   "turn")
    values = losses.detach()[None]
    if gains:  # each unit's context gain travels with its loss
        unit_gains = gains(losses.detach(), sidx, turn, len(b["input_ids"]))
        values = torch.cat([values, unit_gains[None]])
    values, g_groups, g_ids, g_turns, _ = gather(values, groups, sidx, turn)
    gathered_gains = values[1] if gains else None
    weights, _ = rs.weigh(values[0], g_groups, ids=g_ids, turns=g_turns, gains=gathered_gains)
    rs.pop_records()
    return reweighted_loss(losses, ntok, weights, norm="sample", total_units=total_units,
                           total_tokens=total_tokens)


class ContextGain:
    """The extra forward of --detector loss+gain: train.context_gain itself, the replies of a
    batch's free rows scored alone."""

    def __init__(self, net, free, amp):
        self.net = net
        self.amp = amp
        self.free = free

    def __call__(self, losses, sidx, turn, batch):
        rows = dict(self.free, input_ids=range(batch))
        return train.context_gain(self.net, self.amp(), "turn", rows, losses, sidx, turn)


def resure_step(net, opt, b, rs, amp, free=None):
    """Our training step with ReSURE's weights; free: the batch's free rows (--detector loss+gain).
    """
    with amp():
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
    gains = ContextGain(net, free, amp) if free else None
    return optimizer_step(opt, resure_loss(tok.float(), b, rs, gains))


# -------------------------------------------------------------------------------------------- FLOPs
def train_flops(cfg, batch, length, n_sup, rank, targets=DEFAULT_TARGETS):
    """Useful FLOPs of one LoRA step (frozen base): forward 2*P*tokens for the block linears;
    backward needs only the input gradients of frozen weights (another 2*P*tokens) but input and
    weight gradients of the adapters (2 x their forward); causal attention QK^T and AV over the
    lower triangle, backward 2 x forward; lm_head at the supervised positions only, forward + input
    gradient. Recomputation and logits nobody needs do not count."""
    D = cfg.hidden_size
    inner = cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, inner), "up_proj": (D, inner), "down_proj": (inner, D)}
    layers = cfg.num_hidden_layers
    tokens = batch * length
    dense = 2 * layers * sum(i * o for i, o in shapes.values()) * tokens
    adapters = sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
    lora = 2 * layers * adapters * tokens
    pairs = length * (length + 1) / 2  # causal: each token attends to those before it and itself
    attention = layers * batch * cfg.num_attention_heads * 2 * 2 * cfg.head_dim * pairs
    head = 2 * D * cfg.vocab_size * n_sup
    return 2 * dense + 3 * lora + 3 * attention + 2 * head
