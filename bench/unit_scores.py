"""A base model's per-unit scores exactly as train.py computes them (train.score_units): what its
warm-up statistics and static pre-filtering see. The one place bench/ calls train.score_units."""
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch

import train


def score_units(net, template, examples, unit, dtype="fp32", batch_size=8):
    """(losses, groups, context gains or None) per unit of examples under net, in train.py's
    precision: dtype "bf16" runs under autocast as train.py does, "fp32" without."""
    device = next(net.parameters()).device
    if dtype == "fp32":
        amp = nullcontext
    else:
        amp = partial(torch.autocast, device.type, dtype=torch.bfloat16)
    run = SimpleNamespace(net=net, device=device, template=template, amp=amp,
                          args=SimpleNamespace(unit=unit))
    return train.score_units(run, examples, unit, batch_size)
