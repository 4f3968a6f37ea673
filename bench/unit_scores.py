"""A base model's per-unit scores exactly as train.py computes them (train.score_units): what its
warm-up statistics and static pre-filtering see. The one place bench/ calls train.score_units."""
from contextlib import nullcontext

import torch

import train


def score_units(net, template, examples, unit, dtype="fp32", batch_size=8):
    """(losses, groups, context gains or None) per unit of examples under net, in train.py's
    precision: dtype "bf16" runs under autocast as train.py does, "fp32" without."""
    device = next(net.parameters()).device
    if dtype == "fp32":
        autocast = nullcontext()
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    return train.score_units(net, autocast, template.pad_id, examples, unit, batch_size)
