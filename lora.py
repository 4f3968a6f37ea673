"""LoRA adapters for model.py, saved and loaded in PEFT's format.

A LoRALinear *is* the nn.Linear it replaces (same `weight`, same `bias`, same module name), plus two
small matrices A [r, in] and B [out, r]:

    y = x W^T + b + dropout(x) A^T B^T * scaling,    scaling = lora_alpha / r

(rsLoRA: lora_alpha / sqrt(r)). A starts kaiming-uniform and B at zero, so a fresh adapter changes
nothing. Because the base keeps its name, `model.layers.0.self_attn.q_proj.weight` is still the
checkpoint key, and the adapter keys are PEFT's with the `base_model.model.` prefix dropped:
`model.layers.0.self_attn.q_proj.lora_A.weight`. Base weights may be bf16 or fp16; the adapter
stays fp32.

Which layers get an adapter follows PEFT: a target name matches a module whose name equals it or
ends with "." + it ("q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj"); a target
given as one string is a regular expression that must match the whole module name. Only linear
layers inside the transformer blocks are candidates.
"""
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model import gemm_dtype
from support.checkpoint import (AdapterError, check_adapter_fit, read_adapter_config,
                                read_adapter_tensors, warn_if_other_base)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """The settings apply_lora used, as adapter_config.json names them."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    target_modules: list[str] | str


def lora_scaling(r, alpha, use_rslora=False):
    """The factor on B A: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    if use_rslora:
        return alpha / math.sqrt(r)
    return alpha / r


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        nn.Module.__init__(self)  # take over base's tensors instead of allocating new ones
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        for t in (self.weight, self.bias):
            if t is not None:
                t.requires_grad_(False)
        self.r = r
        self.lora_alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = "cpu" if base.weight.device.type == "meta" else base.weight.device
        fp32 = {"bias": False, "device": device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, r, **fp32)
        self.lora_B = nn.Linear(r, self.out_features, **fp32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # B A * scaling is inside `weight`
        self.disabled = False  # the adapter is skipped (see `disabled`)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT (and nn.Linear) do
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        # Both matmuls run in autocast's dtype under autocast, else in x's (the adapter is fp32).
        z = F.linear(self.lora_dropout(x), self.lora_A.weight.to(gemm_dtype(x)))  # [..., r]
        # y += scaling * z B^T as one GEMM that accumulates into y (in place is safe: linear's
        # backward does not need its output): no full-width temporaries, two kernels fewer than
        # scale + matmul + add.
        z = z.reshape(-1, self.r).to(y.dtype)
        b = self.lora_B.weight.to(y.dtype).t()
        y.view(-1, y.shape[-1]).addmm_(z, b, alpha=self.scaling)
        return y

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling in fp32, the update that merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            merged = self.weight.float() + self.delta_weight()
            self.weight.copy_(merged.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            base = self.weight.float() - self.delta_weight()
            self.weight.copy_(base.to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}"


def _is_target(name, targets):
    """PEFT's rule: a string is a regular expression on the whole name; a list entry matches the
    name itself or its last components ("q_proj" and "self_attn.q_proj" match
    "model.layers.0.self_attn.q_proj")."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 128, alpha: float = 16, dropout: float = 0.3,
               targets=DEFAULT_TARGETS, use_rslora: bool = False,
               verbose: bool = True) -> nn.Module:
    """Freeze everything, then wrap each targeted linear layer inside the transformer blocks in a
    LoRALinear (paper: r=128, alpha=16, p=0.3). targets: module names or suffixes, or one regex."""
    if r <= 0:
        raise AdapterError(f"LoRA rank must be positive, got r={r}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, module in model.named_modules():
        plain_linear = isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
        in_block = ".layers." in f".{name}"
        if plain_linear and in_block and _is_target(name, targets):
            names.append(name)
    if not names:
        shown = targets if isinstance(targets, str) else sorted(set(targets))
        raise AdapterError(f"no linear layer in the model matches LoRA targets {shown!r}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        layer = LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora)
        setattr(model.get_submodule(parent), leaf, layer)
    if isinstance(targets, str):
        used = targets
    else:  # the targets that matched: the saved config names no layer the model lacks
        used = sorted(t for t in set(targets) if any(_is_target(n, [t]) for n in names))
    model.lora_config = LoRAConfig(r, alpha, dropout, use_rslora, used)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={r} alpha={alpha} dropout={dropout} on {len(names)} layers: "
              f"trainable params {trainable:,} || all params {total:,} || "
              f"trainable% {100 * trainable / total:.4f}")
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under our module names (`...q_proj.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
    return out


def merge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()
    return model


@contextmanager
def disabled(model: nn.Module):
    """The base model inside the block: every adapter is skipped (merged ones are unmerged for the
    block)."""
    mods = list(lora_modules(model).values())
    merged = [m for m in mods if m.merged]
    for m in merged:
        m.unmerge()
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False
        for m in merged:
            m.merge()


# ------------------------------------------------------------------------------------------------
# Saving and loading in PEFT's format

def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None):
    """adapter_config.json + adapter_model.safetensors, readable by peft.PeftModel.from_pretrained,
    and base.json (the base model's name and model.fingerprint), so that load_adapter can warn about
    an adapter put on another base. Each file is written under a temporary name and renamed into
    place."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise AdapterError("model has no LoRA adapter to save (call apply_lora first)")
    os.makedirs(out_dir, exist_ok=True)
    base = base_model_name_or_path or str(getattr(model, "path", "") or "")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              **asdict(cfg), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {}
    for key, value in lora_state_dict(model).items():
        tensors[PEFT_PREFIX + key] = value.detach().float().cpu().contiguous()
    tmp = os.path.join(out_dir, ".adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    base_name = os.path.basename(os.path.normpath(base))
    base_info = {"base_model": base_name, "fingerprint": getattr(model, "fingerprint", None)}
    for name, obj in (("adapter_config.json", config), ("base.json", base_info)):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, name))


def load_adapter(model: nn.Module, adapter_dir: str, verbose: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into model, adding LoRA layers first if it has
    none. Its files are read and checked by support/checkpoint.py."""
    cfg, weights_path = read_adapter_config(adapter_dir)
    use_rslora = cfg.get("use_rslora", False)
    if not lora_modules(model):
        apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   targets=cfg["target_modules"], use_rslora=use_rslora, verbose=verbose)
    theirs = read_adapter_tensors(weights_path, PEFT_PREFIX)
    warn_if_other_base(adapter_dir, getattr(model, "fingerprint", None), getattr(model, "path", ""))
    ours = lora_state_dict(model)
    check_adapter_fit(ours, theirs, weights_path)
    with torch.no_grad():
        for key, value in ours.items():
            value.copy_(theirs[key].to(value.dtype))
    scaling = lora_scaling(cfg["r"], cfg["lora_alpha"], use_rslora)
    for m in lora_modules(model).values():
        m.scaling = scaling
    return model
