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
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import gemm_dtype
from support.checkpoint import read_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."

# adapter_config.json settings beyond plain matrices on the targeted layers: refused when set.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "exclude_modules", "target_parameters", "lora_bias")


class AdapterError(ValueError):
    """An adapter that does not fit the model (keys, shapes, config)."""


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
    none."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: not found (an adapter folder holds adapter_config.json "
                               "and adapter_model.safetensors)")
    cfg = _adapter_config(cfg_path)
    use_rslora = cfg.get("use_rslora", False)
    if not lora_modules(model):
        apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   targets=cfg["target_modules"], use_rslora=use_rslora, verbose=verbose)
    theirs = _peft_tensors(weights_path)
    _warn_if_other_base(model, adapter_dir)
    ours = lora_state_dict(model)
    _check_fit(ours, theirs, weights_path)
    with torch.no_grad():
        for key, value in ours.items():
            value.copy_(theirs[key].to(value.dtype))
    scaling = lora_scaling(cfg["r"], cfg["lora_alpha"], use_rslora)
    for m in lora_modules(model).values():
        m.scaling = scaling
    return model


def _adapter_config(path):
    """adapter_config.json if it describes adapters we load, plain LoRA matrices; one AdapterError
    line if not."""
    cfg = read_json(path, AdapterError)
    problem = _config_problem(cfg)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    return cfg


def _config_problem(cfg):
    """What in an adapter config we cannot load, in a few words; None for plain LoRA."""
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    if type(r) is not int or r <= 0:
        return "needs a positive integer r and a number lora_alpha"
    if not isinstance(alpha, (int, float)) or not -1e30 < alpha < 1e30:
        return "needs a positive integer r and a number lora_alpha"
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)"
    problem = _targets_problem(cfg.get("target_modules"))
    if problem:
        return problem
    for key in UNSUPPORTED:
        if cfg.get(key):
            return f"{key} is not supported (only plain adapter matrices)"
    if cfg.get("bias", "none") != "none":
        return f"bias={cfg['bias']!r} is not supported"
    return None


def _targets_problem(targets):
    """What is wrong with target_modules: PEFT takes a list of module names or one regular
    expression."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return f"target_modules {targets!r} is not a regular expression ({e})"
        return None
    names = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if not names or not targets:
        return "target_modules must be a list of module names or a regular expression"
    return None


def _warn_if_other_base(model, adapter_dir):
    """One stderr line when base.json says the adapter was trained on other weights."""
    path = os.path.join(adapter_dir, "base.json")
    if not os.path.isfile(path):
        return
    base = read_json(path, AdapterError)
    mine = getattr(model, "fingerprint", None)
    theirs = base.get("fingerprint")
    if not theirs or not mine or theirs == mine:
        return
    name = os.path.basename(str(getattr(model, "path", "")))
    print(f"warning: {adapter_dir} was trained on base model {base.get('base_model')!r} "
          f"(fingerprint {theirs}), not on {name!r} (fingerprint {mine}): same shapes, other "
          "weights or config", file=sys.stderr)


def _peft_tensors(path):
    """The tensors of an adapter_model.safetensors under our names, or one AdapterError line. PEFT
    writes "base_model.model.<name>.lora_A.weight"; older files carry the adapter name too."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first_line = str(e).splitlines()[0][:120]
        raise AdapterError(f"{path}: not a readable safetensors file ({first_line})") from None
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[key] = value
    return out


def _check_fit(ours, theirs, path):
    """Refuse adapter tensors whose names, shapes or values do not fit the model's LoRA layers."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    if missing or unexpected:
        detail = []
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            example = f" (e.g. {', '.join(names[:2])})" if names else ""
            detail.append(f"{len(names)} {what}{example}")
        raise AdapterError(f"{path}: adapter does not fit the model: {', '.join(detail)}")
    bad = [f"{k} {tuple(theirs[k].shape)} != {tuple(v.shape)}" for k, v in ours.items()
           if theirs[k].shape != v.shape]
    if bad:
        raise AdapterError(f"{path}: {len(bad)} adapter tensors have the wrong shape, "
                           f"e.g. {bad[0]}")
    nonfinite = [k for k, v in theirs.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise AdapterError(f"{path}: adapter tensor {nonfinite[0]} holds NaN or infinite "
                           "values")
