"""Merged export: a LoRA-adapted model.py Transformer written as a plain Hugging Face folder
(adapters folded into the weights), which transformers, vLLM or this project load like any
checkpoint.

    python train.py ... --merge        # OUT/merged at the end of a run
    export_merged(model, base_dir, out_dir)
The folder is written beside out_dir under a temporary name and renamed into place when complete.
"""
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


def export_merged(model, base_dir, out_dir, max_shard_bytes=5 * 2**30):
    """Write a merged Hugging Face folder: config, safetensors shards (and their index when large),
    tokenizer files."""
    tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    state = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if ".lora_A." in k or ".lora_B." in k or (tie and k == "lm_head.weight"):
                continue
            state[k] = v
        for name, m in model.named_modules():
            if not hasattr(m, "delta_weight"):
                continue
            w = m.weight.float() if m.merged else m.weight.float() + m.delta_weight()
            state[f"{name}.weight"] = w.to(m.weight.dtype)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".merged-", dir=parent)
    try:
        try:
            _write(state, base_dir, tmp, max_shard_bytes)
        except SafetensorError as e:  # a full disk, as safetensors reports it
            raise OSError(f"cannot write the merged model: {e}") from None
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write(state, base_dir, tmp, max_shard_bytes):
    """The folder's files, written into tmp."""
    shards = [{}]  # tensors in name order, a new shard when the next would pass max_shard_bytes
    size = 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    dtype = next(iter(state.values())).dtype
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(base_dir, name)):
            shutil.copy2(os.path.join(base_dir, name), os.path.join(tmp, name))
