"""Reading a Hugging Face checkpoint folder's files, with one-line refusals: config.json and other
JSON files, and the safetensors weights (model.safetensors, or the shards of
model.safetensors.index.json). Nothing is unpickled: a .bin/.pt checkpoint is refused, since
loading it could run code. model.ModelConfig.from_json and model.Transformer.from_pretrained
build on this.
"""
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

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
