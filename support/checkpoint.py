"""Reading a Hugging Face checkpoint folder's files, with one-line refusals: config.json and other
JSON files, the safetensors weights (model.safetensors, or the shards of
model.safetensors.index.json), the chat template and special tokens of its tokenizer files, and a
PEFT adapter folder (adapter_config.json, adapter_model.safetensors, base.json). Nothing is
unpickled: a .bin/.pt checkpoint is refused, since loading it could run code. model.py, lora.py
and data.py build on this.
"""
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from support.conversations import DataError

ROPE_TYPES = ("default", "linear", "llama3")
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}  # what each type needs


class CheckpointError(ValueError):
    """A config.json or weight file we refuse; the message is one line naming the file and what is
    wrong."""


def read_json(path, error=CheckpointError) -> dict:
    """A JSON file's object, or `error` with one line naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise error(f"{path}: not a valid JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config(path_or_dict):
    """(config dict, where) from a folder holding config.json, the file itself, or the dict itself;
    `where` names the source in error messages."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    return read_json(path), str(path)


def check_config(c, where, supported):
    """Refuse a config.json of another architecture, or whose raw sizes are not positive integers,
    or whose layer_types is not one type per layer, before anything is built from it."""
    model_type = c.get("model_type")
    if model_type not in supported:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(supported)})")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {c['hidden_act']!r} is not supported "
                              "(only 'silu')")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    present = [key for key in optional if c.get(key) is not None]  # absent or null is fine
    for key in required + tuple(present):
        positive_integer(c.get(key), key, where)
    positive(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", where)
    types = c.get("layer_types")
    n = c["num_hidden_layers"]
    if types is not None and (not isinstance(types, list) or len(types) != n):
        raise CheckpointError(f"{where}: layer_types must list one type per layer ({n}), "
                              f"got {str(types)[:80]}")


def positive(x, key, where) -> float:
    """x as a float, or a refusal naming `key` unless it is a positive finite number (a boolean,
    a string or null is not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1e300:
        raise CheckpointError(f"{where}: {key!r} must be a positive number, got {x!r}")
    return float(x)


def positive_integer(x, key, where) -> int:
    """x, or a refusal naming `key` unless it is a positive integer (not a boolean, not 8192.0)."""
    if type(x) is not int or x <= 0:
        raise CheckpointError(f"{where}: {key!r} must be a positive integer, got {x!r}")
    return x


def rope_section(c, where):
    """(the RoPE settings, their key in config.json): transformers >= 5 writes `rope_parameters`;
    Hub checkpoints ship `rope_scaling` (null or absent: plain RoPE) beside a top-level
    `rope_theta`."""
    for section in ("rope_parameters", "rope_scaling"):
        rope = c.get(section)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"{where}: {section!r} must be an object, got {str(rope)[:80]}")
        if any(isinstance(v, dict) for v in rope.values()):
            raise CheckpointError(f"{where}: per-layer-type {section} are not supported")
        if rope:
            return rope, section
    return {}, "rope_parameters"


def rope_fields(c, where) -> dict:
    """ModelConfig's rope_* fields, each refused in one line naming its key unless RoPE can work
    with it: a positive theta and factor, llama3's positive frequency factors with high above low,
    a positive integer original length. The oldest rope_scaling spelling says "type" for
    "rope_type"."""
    rope, section = rope_section(c, where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial is not None and (isinstance(partial, bool) or partial != 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor {partial!r} is not supported "
                              "(only 1: RoPE over the whole head)")
    fields = {"rope_type": kind, "rope_theta": 10000.0}  # transformers' default theta
    if "rope_theta" in rope:
        fields["rope_theta"] = positive(rope["rope_theta"], f"{section}.rope_theta", where)
    elif "rope_theta" in c:
        fields["rope_theta"] = positive(c["rope_theta"], "rope_theta", where)
    for key in ROPE_KEYS[kind]:
        if key not in rope:
            raise CheckpointError(f"{where}: rope type {kind!r} needs {key!r}")
        fields["rope_" + key] = positive(rope[key], f"{section}.{key}", where)
    if kind == "llama3":
        fields.update(llama3_fields(c, rope, section, where))
    return fields


def llama3_fields(c, rope, section, where) -> dict:
    """llama3's checks beyond positive factors: the smooth band between the two wavelength
    thresholds divides by high_freq_factor - low_freq_factor, so high must exceed low; the
    original context length (max_position_embeddings when rope_scaling does not say) is a
    positive integer."""
    low = rope["low_freq_factor"]
    high = rope["high_freq_factor"]
    if high <= low:
        raise CheckpointError(f"{where}: {section}.high_freq_factor {high!r} must be greater than "
                              f"low_freq_factor {low!r} (llama3 divides by their difference)")
    if "original_max_position_embeddings" in rope:
        key = f"{section}.original_max_position_embeddings"
        length = positive_integer(rope["original_max_position_embeddings"], key, where)
    else:  # check_config has checked max_position_embeddings
        length = c.get("max_position_embeddings") or 8192
    return {"rope_original_max_position_embeddings": length}


def config_fields(c, where, supported) -> dict:
    """model.ModelConfig's fields from a config.json dict, defaults filled in as transformers fills
    them; refused in one line naming `where` unless check_config and rope_fields accept it."""
    check_config(c, where, supported)
    model_type = c["model_type"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if not head_dim:
        head_dim = 128 if model_type == "qwen3" else c["hidden_size"] // heads
    default_window = 4096 if model_type == "mistral" else None
    window = c.get("sliding_window", default_window)
    sliding = sliding_layers(c, window)
    # attention_bias: q/k/v and o biases in Llama and Qwen3; Qwen2 always has q/k/v biases only
    attention_bias = bool(c.get("attention_bias", False)) and model_type in ("llama", "qwen3")
    return dict(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(c.get("mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        **rope_fields(c, where),
    )


def sliding_layers(c, window) -> list:
    """The layers with sliding-window attention, as transformers applies it: Mistral every layer;
    Qwen per `layer_types`, or (older configs) with use_sliding_window from max_window_layers on;
    Llama none."""
    model_type = c["model_type"]
    n_layers = c["num_hidden_layers"]
    if model_type == "mistral" and window is not None:
        return list(range(n_layers))
    if model_type not in ("qwen2", "qwen3"):
        return []
    if c.get("layer_types"):
        return [i for i, kind in enumerate(c["layer_types"]) if kind == "sliding_attention"]
    if c.get("use_sliding_window") and window is not None:
        return list(range(c.get("max_window_layers", 28), n_layers))
    return []


def check_sizes(cfg, where):
    """The sizes model.ModelConfig derived (defaults filled in) can build a working model: heads in
    whole groups per K/V head, an even head_dim (RoPE rotates pairs), a positive integer sliding
    window where one is used."""
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads
    window = cfg.sliding_window
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    if cfg.head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {cfg.head_dim} is odd "
                              "(RoPE rotates pairs of dimensions)")
    if cfg.sliding_layers and (type(window) is not int or window <= 0):
        raise CheckpointError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    return cfg


def names(items):
    """The first five of a list of names, and how many more."""
    shown = ", ".join(items[:5])
    if len(items) > 5:
        shown += f", ... (+{len(items) - 5} more)"
    return shown


def safetensors_index(path) -> dict:
    """{tensor name: (file, safe_open handle)} over model.safetensors or the shards of
    model.safetensors.index.json. Only safetensors are read: a .bin/.pt checkpoint would be
    unpickled, which can run code."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object)")
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(.bin/.pt checkpoints are refused: loading them would unpickle)")
    found = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            first_line = str(e).splitlines()[0][:120]
            raise CheckpointError(f"{f}: not a readable safetensors file, missing, truncated or "
                                  f"corrupt ({first_line})") from None
        for name in handle.keys():
            if name in found:
                raise CheckpointError(f"{f}: tensor {name} is also in {found[name][0].name}")
            if weight_map is not None and weight_map.get(name) != f.name:
                raise CheckpointError(f"{f}: holds tensor {name}, which the index maps to "
                                      f"{weight_map.get(name)}")
            found[name] = (f, handle)
    absent = [k for k in weight_map or {} if k not in found]
    if absent:
        raise CheckpointError(f"{path}: index lists tensor(s) {names(absent)} that no shard holds")
    return found


def check_tensors(path, found, expected, optional=()):
    """Refuse a checkpoint whose tensors (found: safetensors_index) are not the model's (expected:
    name -> shape): a missing one (unless in optional), an unexpected one, a non-float dtype or
    another shape."""
    missing = [k for k in expected if k not in found and k not in optional]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {names(missing)} "
                              f"({len(missing)} of {len(expected)})")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        files = sorted({found[k][0].name for k in unexpected})
        raise CheckpointError(f"{path}: unexpected tensor(s) {names(unexpected)} in {names(files)}")
    for name, (file, handle) in found.items():
        info = handle.get_slice(name)
        dtype = info.get_dtype()
        shape = tuple(info.get_shape())
        if shape != expected[name]:
            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, "
                                  f"config.json implies {expected[name]}")
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, expected a float type")


def read_tensor(file, handle, name):
    """One tensor of an open safetensors file, or a refusal naming the file and the tensor."""
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: tensor {name} cannot be read, truncated or corrupt "
                              f"({e})") from None


def load_weights(path, expected, tied, identity, dtype, device):
    """({name: tensor in dtype on device}, fingerprint) of a checkpoint folder, read one tensor at a
    time and refused where check_tensors says, or where a value is not finite. With `tied`,
    lm_head.weight is optional and, if stored, must equal model.embed_tokens.weight.

    The fingerprint is the base's identity, kept with adapters and in a run folder so that a
    resumed run refuses other weights: a hash of `identity` (the config) and of each tensor as
    stored (name, dtype, shape, bytes), whatever dtype the model computes in. A rewrite in
    another dtype or any changed value gives another fingerprint; resharding does not."""
    found = safetensors_index(path)  # name -> (file, open file)
    check_tensors(path, found, expected, ["lm_head.weight"] if tied else [])
    digest = hashlib.sha256(identity.encode())
    tensors = {}
    for name, (file, handle) in sorted(found.items()):
        tensor = read_tensor(file, handle, name)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        tensor = tensor.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values "
                                  f"(as {dtype})")
        tensors[name] = tensor
    head = tensors.get("lm_head.weight")
    if tied and head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
        raise CheckpointError(f"{found['lm_head.weight'][0]}: lm_head.weight differs from "
                              "model.embed_tokens.weight but config.json says tie_word_embeddings")
    return tensors, digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The tokenizer files: which chat template, which special tokens

def read_optional_json(path) -> dict:
    """A JSON file's object, or {} where there is no such file."""
    if not Path(path).is_file():
        return {}
    return read_json(path, DataError)


def chat_template_text(model_dir) -> str:
    """chat_template.jinja, else tokenizer_config.json's chat_template ("" where there is none)."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_optional_json(Path(model_dir) / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = [t for t in template if isinstance(t, dict) and t.get("name") == "default"]
        template = named[0].get("template") if named else None
    if isinstance(template, str):
        return template
    return ""


def template_by_text(text):
    """The template whose marks the jinja text carries, or None."""
    if "<|start_header_id|>" in text and "Cutting Knowledge Date" in text:
        return "llama3"
    if "<|im_start|>" not in text:
        return None
    if "<think>" in text or "reasoning_content" in text:
        return "qwen3"
    if "You are Qwen, created by Alibaba Cloud" in text:
        return "qwen2.5"
    if "SmolLM" in text:
        return "smollm2"
    return "chatml"


def template_by_model_type(model_dir, model_type):
    """Qwen2 and Qwen3 by model_type; a llama by the turn tokens in its vocabulary; else None."""
    tokenizer_json = Path(model_dir) / "tokenizer.json"
    if model_type == "qwen2":
        return "qwen2.5"
    if model_type == "qwen3":
        return "qwen3"
    if model_type != "llama" or not tokenizer_json.is_file():
        return None
    vocab = tokenizer_json.read_text(encoding="utf-8", errors="replace")
    if '"<|start_header_id|>"' in vocab:
        return "llama3"
    if '"<|im_start|>"' in vocab:
        return "chatml"
    return None


def special_token_ids(model_dir, tokenizer):
    """(stop ids, pad id) of a checkpoint folder: eos_token_id of generation_config.json and
    config.json, then tokenizer_config.json's eos_token; its pad_token, else generation_config's
    pad_token_id. A tokenizer with more ids than config.json's vocab_size is refused."""
    d = Path(model_dir)
    generation = read_optional_json(d / "generation_config.json")
    config = read_optional_json(d / "config.json")
    tokenizer_config = read_optional_json(d / "tokenizer_config.json")
    stops = int_ids(generation.get("eos_token_id")) + int_ids(config.get("eos_token_id"))
    eos_id = token_id(tokenizer, tokenizer_config.get("eos_token"))
    if eos_id is not None:
        stops.append(eos_id)
    pad_id = token_id(tokenizer, tokenizer_config.get("pad_token"))
    if pad_id is None:
        pad_id = generation.get("pad_token_id")
    n_ids = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and n_ids > vocab:
        raise DataError(f"{d / 'tokenizer.json'}: {n_ids} token ids, but config.json has "
                        f"vocab_size {vocab}: the tokenizer does not belong to this model")
    return stops, pad_id


def int_ids(value):
    """The integer ids of an eos_token_id entry (one id or a list of them)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int)]


def token_id(tokenizer, token):
    """The id of a tokenizer_config.json token entry (a string or {"content": ...}), or None."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return tokenizer.token_to_id(token)


# ------------------------------------------------------------------------------------------------
# PEFT adapter folders

# adapter_config.json settings beyond plain matrices on the targeted layers: refused when set.
ADAPTER_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                       "modules_to_save", "layers_to_transform", "exclude_modules",
                       "target_parameters", "lora_bias")


class AdapterError(ValueError):
    """An adapter that does not fit the model (keys, shapes, config)."""


def read_adapter_config(adapter_dir):
    """(adapter_config.json, the path of adapter_model.safetensors) of an adapter folder whose
    config describes plain LoRA matrices; one AdapterError line if not."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: not found (an adapter folder holds adapter_config.json "
                               "and adapter_model.safetensors)")
    cfg = read_json(cfg_path, AdapterError)
    problem = adapter_config_problem(cfg)
    if problem:
        raise AdapterError(f"{cfg_path}: {problem}")
    return cfg, weights_path


def adapter_config_problem(cfg):
    """What in an adapter config we cannot load, in a few words; None for plain LoRA."""
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    if type(r) is not int or r <= 0:
        return "needs a positive integer r and a number lora_alpha"
    if not isinstance(alpha, (int, float)) or not -1e30 < alpha < 1e30:
        return "needs a positive integer r and a number lora_alpha"
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)"
    problem = targets_problem(cfg.get("target_modules"))
    if problem:
        return problem
    for key in ADAPTER_UNSUPPORTED:
        if cfg.get(key):
            return f"{key} is not supported (only plain adapter matrices)"
    if cfg.get("bias", "none") != "none":
        return f"bias={cfg['bias']!r} is not supported"
    return None


def targets_problem(targets):
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


def read_adapter_tensors(path, prefix):
    """The tensors of an adapter_model.safetensors under the model's names, or one AdapterError
    line. PEFT writes `prefix` + "<name>.lora_A.weight"; older files carry the adapter name too."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first_line = str(e).splitlines()[0][:120]
        raise AdapterError(f"{path}: not a readable safetensors file ({first_line})") from None
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix(prefix)
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[key] = value
    return out


def check_adapter_fit(ours, theirs, path):
    """Refuse adapter tensors whose names, shapes or values do not fit the model's LoRA layers."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    if missing or unexpected:
        detail = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            example = f" (e.g. {', '.join(keys[:2])})" if keys else ""
            detail.append(f"{len(keys)} {what}{example}")
        raise AdapterError(f"{path}: adapter does not fit the model: {', '.join(detail)}")
    bad = [f"{k} {tuple(theirs[k].shape)} != {tuple(v.shape)}" for k, v in ours.items()
           if theirs[k].shape != v.shape]
    if bad:
        raise AdapterError(f"{path}: {len(bad)} adapter tensors have the wrong shape, "
                           f"e.g. {bad[0]}")
    nonfinite = [k for k, v in theirs.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise AdapterError(f"{path}: adapter tensor {nonfinite[0]} holds NaN or infinite values")


def warn_if_other_base(adapter_dir, fingerprint, model_path):
    """One stderr line when the folder's base.json says the adapter was trained on weights other
    than those of `fingerprint` (the model loaded from model_path)."""
    path = os.path.join(adapter_dir, "base.json")
    if not os.path.isfile(path):
        return
    base = read_json(path, AdapterError)
    theirs = base.get("fingerprint")
    if not theirs or not fingerprint or theirs == fingerprint:
        return
    name = os.path.basename(str(model_path))
    print(f"warning: {adapter_dir} was trained on base model {base.get('base_model')!r} "
          f"(fingerprint {theirs}), not on {name!r} (fingerprint {fingerprint}): same shapes, "
          "other weights or config", file=sys.stderr)
