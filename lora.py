"""LoRA adapters for model.py, saved and loaded in PEFT's format.

A LoRALinear *is* the nn.Linear it replaces (same `weight`, same `bias`, same module name), plus two small
matrices: y = x W^T + b + (dropout(x) A^T B^T) * lora_alpha / r.  A starts kaiming-uniform, B starts at zero,
so a fresh adapter changes nothing.  Because the base keeps its name, `model.layers.0.self_attn.q_proj.weight`
is still the checkpoint key, and the adapter keys are PEFT's with the `base_model.model.` prefix dropped:
`model.layers.0.self_attn.q_proj.lora_A.weight`.  Base weights may be bf16/fp16; the adapter stays fp32.
"""
import json
import math
import os
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import gemm_dtype
from support.checkpoint import read_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that does not fit the model (keys, shapes, config)."""


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)  # take over base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        for t in (self.weight, self.bias):
            if t is not None:
                t.requires_grad_(False)
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device if base.weight.device.type != "meta" else "cpu"
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.disabled = False, False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT (and nn.Linear) do
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        # Both matmuls run in the autocast dtype under autocast, else in the input's dtype (the adapter is fp32).
        z = F.linear(self.lora_dropout(x), self.lora_A.weight.to(gemm_dtype(x)))   # [..., r]
        # y += scaling * z B^T as one GEMM that accumulates into y (in place is safe: linear's backward does not
        # need its output): no full-width temporaries, two kernels fewer than scale + matmul + add.
        y.view(-1, y.shape[-1]).addmm_(z.reshape(-1, self.r).to(y.dtype), self.lora_B.weight.to(y.dtype).t(),
                                       alpha=self.scaling)
        return y

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling in fp32, the update that merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}"


def apply_lora(model: nn.Module, r: int = 128, alpha: float = 16, dropout: float = 0.3, targets=DEFAULT_TARGETS,
               use_rslora: bool = False, verbose: bool = True) -> nn.Module:
    """Freeze everything, then wrap each targeted linear layer in a LoRALinear (paper: r=128, alpha=16, p=0.3)."""
    if r <= 0:
        raise AdapterError(f"LoRA rank must be positive, got r={r}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules()  # PEFT's rule: the last name component, inside the blocks
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and ".layers." in f".{name}"
             and name.rsplit(".", 1)[-1] in set(targets)]
    if not names:
        raise AdapterError(f"no linear layer in the model matches LoRA targets {sorted(set(targets))}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={r} alpha={alpha} dropout={dropout} on {len(names)} layers: trainable params "
              f"{trainable:,} || all params {total:,} || trainable% {100 * trainable / total:.4f}")
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under our module names (`...q_proj.lora_A.weight`)."""
    return {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight for name, m in lora_modules(model).items()
            for ab in "AB"}


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
    """The base model inside the block: every adapter is skipped (merged ones are unmerged for the block)."""
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


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None):
    """adapter_config.json + adapter_model.safetensors, readable by peft.PeftModel.from_pretrained, and base.json
    (the base model's name and model.fingerprint), so that load_adapter can warn about an adapter put on another
    base. Each file is written under a temporary name and renamed into place."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise AdapterError("model has no LoRA adapter to save (call apply_lora first)")
    os.makedirs(out_dir, exist_ok=True)
    base = base_model_name_or_path or str(getattr(model, "path", "") or "")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": cfg["target_modules"], "bias": "none", "use_rslora": cfg["use_rslora"],
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {PEFT_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    tmp = os.path.join(out_dir, ".adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    base_info = {"base_model": os.path.basename(os.path.normpath(base)), "fingerprint": getattr(model, "fingerprint",
                                                                                                None)}
    for name, obj in (("adapter_config.json", config), ("base.json", base_info)):
        with open(os.path.join(out_dir, f".{name}.tmp"), "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(os.path.join(out_dir, f".{name}.tmp"), os.path.join(out_dir, name))


def load_adapter(model: nn.Module, adapter_dir: str, verbose: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into model, adding LoRA layers first if it has none."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    w_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(f"{p}: not found (an adapter folder holds adapter_config.json and "
                               "adapter_model.safetensors)")
    cfg = _adapter_config(cfg_path)
    if not lora_modules(model):
        apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   targets=cfg["target_modules"], use_rslora=cfg.get("use_rslora", False), verbose=verbose)
    tensors = _read_adapter(w_path)
    base = os.path.join(adapter_dir, "base.json")
    base = read_json(base, AdapterError) if os.path.isfile(base) else {}
    mine = getattr(model, "fingerprint", None)
    if base.get("fingerprint") and mine and base["fingerprint"] != mine:
        print(f"warning: {adapter_dir} was trained on base model {base.get('base_model')!r} (fingerprint "
              f"{base['fingerprint']}), not on {os.path.basename(str(getattr(model, 'path', '')))!r} "
              f"(fingerprint {mine}): same shapes, other weights or config", file=sys.stderr)
    ours = lora_state_dict(model)
    # PEFT writes "base_model.model.<name>.lora_A.weight"; older files may carry the adapter name too.
    theirs = {k.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                                        ".lora_B."): v
              for k, v in tensors.items()}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    if missing or unexpected:
        detail = [f"{len(names)} {what}" + (f" (e.g. {', '.join(names[:2])})" if names else "")
                  for what, names in (("missing", missing), ("unexpected", unexpected))]
        raise AdapterError(f"{w_path}: adapter does not fit the model: {', '.join(detail)}")
    bad = [f"{k} {tuple(theirs[k].shape)} != {tuple(v.shape)}" for k, v in ours.items()
           if theirs[k].shape != v.shape]
    if bad:
        raise AdapterError(f"{w_path}: {len(bad)} adapter tensors have the wrong shape, e.g. {bad[0]}")
    nonfinite = [k for k, v in theirs.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise AdapterError(f"{w_path}: adapter tensor {nonfinite[0]} holds NaN or infinite values")
    with torch.no_grad():
        for k, v in ours.items():
            v.copy_(theirs[k].to(v.dtype))
    scaling = (cfg["lora_alpha"] / math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["lora_alpha"] / cfg["r"])
    for m in lora_modules(model).values():
        m.scaling = scaling
    return model


def _adapter_config(path):
    """adapter_config.json if it describes adapters we load: plain LoRA matrices (one AdapterError line if not)."""
    cfg = read_json(path, AdapterError)
    t = cfg.get("target_modules")
    why = ("needs a positive integer r and a number lora_alpha" if type(cfg.get("r")) is not int or cfg["r"] <= 0 or
           not isinstance(cfg.get("lora_alpha"), (int, float)) or not -1e30 < cfg["lora_alpha"] < 1e30 else
           f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)" if cfg.get("peft_type", "LORA") != "LORA"
           else "target_modules must be a list of module names" if isinstance(t, str) or not t else
           next((f"{k} is not supported (only plain adapter matrices)" for k in ("use_dora", "fan_in_fan_out",
                 "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)), None) or
           (f"bias={cfg['bias']!r} is not supported" if cfg.get("bias", "none") != "none" else None))
    if why:
        raise AdapterError(f"{path}: {why}")
    return cfg


def _read_adapter(path):
    """The tensors of an adapter_model.safetensors, or one AdapterError line."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
