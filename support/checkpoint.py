"""Reading a Hugging Face checkpoint folder's files, with one-line refusals: config.json and other JSON files, and
the safetensors weights (model.safetensors, or the shards of model.safetensors.index.json). Nothing is unpickled:
a .bin/.pt checkpoint is refused, since loading it could run code. model.Transformer.from_pretrained builds on this.
"""
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A config.json or weight file we refuse; the message is one line naming the file and what is wrong."""


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


def check_config(c, where):
    """Refuse a config.json whose raw sizes are not positive integers, or whose layer_types is not one type per
    layer, before anything is built from them."""
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required + tuple(k for k in optional if c.get(k) is not None):  # optional: absent or null is fine
        if type(c.get(key)) is not int or c[key] <= 0:
            raise CheckpointError(f"{where}: {key!r} must be a positive integer, got {c.get(key)!r}")
    types, n = c.get("layer_types"), c["num_hidden_layers"]
    if types is not None and (not isinstance(types, list) or len(types) != n):
        raise CheckpointError(f"{where}: layer_types must list one type per layer ({n}), got {str(types)[:80]}")


def check_sizes(cfg, where):
    """The sizes model.ModelConfig derived (defaults filled in) can build a working model: heads in whole groups per
    K/V head, an even head_dim (RoPE rotates pairs), a positive integer sliding window where one is used."""
    heads, kv, hd, window = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    for bad, why in ((heads % kv, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"),
                     (hd % 2, f"head_dim {hd} is odd (RoPE rotates pairs of dimensions)"),
                     (cfg.sliding_layers and (type(window) is not int or window <= 0),
                      f"sliding_window must be a positive integer, got {window!r}")):
        if bad:
            raise CheckpointError(f"{where}: {why}")
    return cfg


def names(items):
    """The first five of a list of names, and how many more."""
    return ", ".join(items[:5]) + (f", ... (+{len(items) - 5} more)" if len(items) > 5 else "")


def safetensors_index(path) -> dict:
    """{tensor name: (file, safe_open handle)} over model.safetensors or the shards of model.safetensors.index.json.
    Only safetensors are read: a .bin/.pt checkpoint would be unpickled, which can run code."""
    path, index = Path(path), Path(path) / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object)")
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(.bin/.pt checkpoints are refused: loading them would unpickle)")
    found = {}
    for f in files:
        try:
            st = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, missing, truncated or corrupt "
                                  f"({str(e).splitlines()[0][:120]})") from None
        for name in st.keys():
            if name in found or (weight_map is not None and weight_map.get(name) != f.name):
                raise CheckpointError(f"{f}: holds tensor {name}, which the index maps to {weight_map.get(name)}"
                                      if name not in found else f"{f}: tensor {name} is also in {found[name][0].name}")
            found[name] = (f, st)
    absent = [k for k in weight_map or {} if k not in found]
    if absent:
        raise CheckpointError(f"{path}: index lists tensor(s) {names(absent)} that no shard holds")
    return found
