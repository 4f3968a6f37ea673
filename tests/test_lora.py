"""lora.py against PEFT and transformers (the oracles): adapters and merged exports move both
ways."""
import json

import pytest
import torch

import model as M
from support.checkpoint import AdapterError
from support.export import export_merged
from lora import (LoRALinear, apply_lora, disabled, load_adapter, lora_modules, lora_state_dict,
                  merge_lora, save_adapter, unmerge_lora)

import peft  # noqa: E402  (test oracle)
import transformers  # noqa: E402  (test oracle)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(path, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    hf.save_pretrained(path)
    return hf


def tiny_qwen2(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return hf


def randomize_b(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in lora_state_dict(net).items():
            if k.endswith("lora_B.weight"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)


def ids(batch=2, T=12, vocab=256, seed=3):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol):
    scale = b.abs().max().clamp_min(1.0)
    return float((a - b).abs().max() / scale) < tol


@pytest.fixture(params=["llama", "qwen2"])
def tiny(tmp_path, request):
    d = tmp_path / request.param
    hf = (tiny_llama if request.param == "llama" else tiny_qwen2)(d)
    return d, hf


def test_fresh_adapter_changes_nothing_and_counts_params(tiny, capsys):
    d, _ = tiny
    net = M.Transformer.from_pretrained(d).eval()
    x = ids()
    before = net(x)
    apply_lora(net, r=8, alpha=16, dropout=0.0)
    assert "trainable params" in capsys.readouterr().out
    assert torch.equal(net(x), before)
    names = [n for n, m in net.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names
    # only adapter parameters are trainable
    for n, p in net.named_parameters():
        assert p.requires_grad == (".lora_A." in n or ".lora_B." in n), n


def test_our_adapter_loads_in_peft(tiny, tmp_path):
    d, hf = tiny
    net = M.Transformer.from_pretrained(d).eval()
    apply_lora(net, r=4, alpha=8, dropout=0.0)
    randomize_b(net)
    save_adapter(net, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["bias"] == "none"
    assert cfg["r"] == 4
    assert cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    x = ids()
    with torch.no_grad():
        ref = pm(x).logits
        ours = net(x)
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = base(x).logits
    assert not close(ref, plain, 1e-4)  # the adapter does change the outputs
    assert close(ours, ref, 1e-5)


def test_peft_trained_adapter_loads_here(tmp_path):
    d = tmp_path / "base"
    hf = tiny_llama(d)
    base_logits = hf(ids()).logits.detach()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for s in range(3):
        x = ids(seed=10 + s)
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "peft_ad")
    pm.eval()
    x = ids()
    with torch.no_grad():
        ref = pm(x).logits
    assert not close(ref, base_logits, 1e-4)  # the training did move the model
    net = M.Transformer.from_pretrained(d).eval()
    load_adapter(net, tmp_path / "peft_ad")
    assert sorted(net.lora_config.target_modules) == ["down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        assert close(net(x), ref, 1e-5)


PEFT_TARGETS = {
    "suffixes": ["self_attn.q_proj", "mlp.down_proj"],
    "full paths": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
    "all-linear": "all-linear",
    "regex": r"model\.layers\.1\.self_attn\.(q|v)_proj",
}


def peft_lora_names(pm):
    """The modules PEFT put an adapter on, under the base model's names."""
    names = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    return sorted(names)


@pytest.mark.parametrize("form", sorted(PEFT_TARGETS))
def test_peft_adapter_with_any_target_form_loads_here(form, tmp_path):
    """PEFT matches a target against the module name (equal, or a "."-suffix; a string is a regex
    on the whole name): an adapter PEFT saved with such targets puts LoRA on the same layers here,
    gives PEFT's logits, and saved again it loads in PEFT on the same layers."""
    d = tmp_path / "base"
    tiny_llama(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[form],
                          init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "peft_ad")
    x = ids()
    with torch.no_grad():
        ref = pm(x).logits
    wanted = peft_lora_names(pm)
    net = M.Transformer.from_pretrained(d).eval()
    load_adapter(net, tmp_path / "peft_ad")
    assert sorted(lora_modules(net)) == wanted
    with torch.no_grad():
        assert close(net(x), ref, 1e-5)
    save_adapter(net, tmp_path / "ours")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    again = peft.PeftModel.from_pretrained(hf2, tmp_path / "ours").eval()
    assert peft_lora_names(again) == wanted
    with torch.no_grad():
        assert close(again(x).logits, ref, 1e-5)


NOT_TARGETS = "target_modules must be a list of module names or a regular expression"


@pytest.mark.parametrize("change,why", [
    ({"target_modules": "(q_proj"}, "target_modules '(q_proj' is not a regular expression"),
    ({"target_modules": ["q_proj", 3]}, NOT_TARGETS),
    ({"target_modules": []}, NOT_TARGETS),
    ({"layers_to_transform": [0]},
     "layers_to_transform is not supported (only plain adapter matrices)"),
    ({"r": 0}, "needs a positive integer r and a number lora_alpha"),
    ({"use_dora": True}, "use_dora is not supported (only plain adapter matrices)"),
])
def test_load_refuses_configs_it_cannot_honour_in_one_line(tmp_path, change, why):
    tiny_llama(tmp_path / "a")
    net = M.Transformer.from_pretrained(tmp_path / "a")
    apply_lora(net, r=4, alpha=8, dropout=0.0, verbose=False)
    save_adapter(net, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(AdapterError) as e:
        load_adapter(M.Transformer.from_pretrained(tmp_path / "a"), tmp_path / "ad")
    assert str(e.value).startswith(f"{path}: {why}")


def test_merge_unmerge_and_merged_export_loads_in_transformers(tiny, tmp_path):
    d, _ = tiny
    net = M.Transformer.from_pretrained(d).eval()
    apply_lora(net, r=4, alpha=8, dropout=0.0)
    randomize_b(net)
    x = ids()
    with torch.no_grad():
        unmerged = net(x)
        merge_lora(net)
        merged = net(x)
        assert close(merged, unmerged, 1e-5)
        unmerge_lora(net)
        assert close(net(x), unmerged, 1e-6)
        base = M.Transformer.from_pretrained(d).eval()(x)
        # the adapter does something, well beyond the tolerance the disabled check uses
        assert (unmerged - base).abs().max() > 100 * (merged - unmerged).abs().max()
        assert not close(unmerged, base, 1e-4)
        for pre_merged in (False, True):
            if pre_merged:
                merge_lora(net)
            with disabled(net):  # the base weights up to the rounding of W + d - d above
                assert close(net(x), base, 1e-6)
            assert close(net(x), unmerged, 1e-5)
            assert all(m.merged == pre_merged for m in lora_modules(net).values())
        unmerge_lora(net)
    for shard in (None, 60_000):  # single file, and sharded with an index
        out = tmp_path / f"merged-{shard}"
        export_merged(net, d, out, **({"max_shard_bytes": shard} if shard else {}))
        assert (out / "model.safetensors.index.json").exists() == bool(shard)
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert close(hf2(x).logits, unmerged, 1e-5)


def test_gradients_only_in_adapter_and_dropout_modes(tmp_path):
    d = tmp_path / "m"
    tiny_llama(d)
    net = M.Transformer.from_pretrained(d)
    apply_lora(net, r=4, alpha=8, dropout=0.5)
    randomize_b(net)
    x = ids()
    net.train()
    logits = net(x)
    logits.float().pow(2).mean().backward()
    for n, p in net.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None, n
            assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    b = net(x)
    assert not torch.equal(a, b)  # dropout active in train mode
    net.eval()
    assert torch.equal(net(x), net(x))  # and off in eval mode
    lin = net.model.layers[0].self_attn.q_proj
    h = torch.randn(3, lin.in_features)
    with torch.no_grad():
        expect = h @ lin.weight.T + (h @ lin.lora_A.weight.T @ lin.lora_B.weight.T) * (8 / 4)
        assert torch.allclose(lin(h), expect, atol=1e-6)


def test_bf16_base_with_fp32_adapter(tmp_path):
    d = tmp_path / "m"
    tiny_llama(d)
    net = M.Transformer.from_pretrained(d, dtype=torch.bfloat16)
    apply_lora(net, r=4, alpha=8, dropout=0.0)
    lin = net.model.layers[0].mlp.down_proj
    assert lin.weight.dtype == torch.bfloat16
    assert lin.lora_A.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(ids())
    out.float().mean().backward()
    assert lin.lora_B.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.lora_B.weight.grad).all()


def test_bf16_lora_gradients_as_accurate_as_peft(tiny, tmp_path):
    """A LoRA step on bf16 base weights under bf16 autocast: the adapter gradients' distance from
    the fp32 step is no larger than PEFT's in bf16."""
    d, hf = tiny
    x = ids(batch=3, T=16)
    labels = x.clone()
    labels[:, :5] = -100

    def ours(dtype):
        net = M.Transformer.from_pretrained(d, dtype=dtype)
        torch.manual_seed(0)  # the same A for both
        apply_lora(net, r=4, alpha=8, dropout=0.0, verbose=False)
        randomize_b(net)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            tok = net.token_losses(x, labels)
        (tok.sum() / (labels[:, 1:] != -100).sum()).backward()
        return net

    ref, low = ours(torch.float32), ours(torch.bfloat16)
    save_adapter(ref, tmp_path / "ad")  # the same adapter for PEFT, on bf16 base weights
    pm = peft.PeftModel.from_pretrained(hf.to(torch.bfloat16), tmp_path / "ad", is_trainable=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pm(input_ids=x, labels=labels).loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    assert len(theirs) == 2 * 2 * 7
    worst = {"ours": 0.0, "peft": 0.0}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            g = p.grad.double()
            for who, other in (("ours", dict(low.named_parameters())[n].grad), ("peft", theirs[n])):
                worst[who] = max(worst[who], float((other.double() - g).norm() / g.norm()))
    assert 0 < worst["ours"] <= 1.5 * worst["peft"] + 1e-3, worst


def test_load_refuses_adapters_that_do_not_fit(tmp_path):
    tiny_llama(tmp_path / "a")
    tiny_llama(tmp_path / "b", hidden_size=32, intermediate_size=48)
    net_a = M.Transformer.from_pretrained(tmp_path / "a")
    apply_lora(net_a, r=4, alpha=8, dropout=0.0)
    save_adapter(net_a, tmp_path / "ad")
    net_b = M.Transformer.from_pretrained(tmp_path / "b")
    wrong_shape = r"wrong shape, e\.g\. model\.layers\.\d+\.\S+\.lora_[AB]\.weight"
    with pytest.raises(AdapterError, match=wrong_shape):
        load_adapter(net_b, tmp_path / "ad")
    net_c = M.Transformer.from_pretrained(tmp_path / "a")
    apply_lora(net_c, r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    unexpected = (r"does not fit the model: 0 missing, 24 unexpected "
                  r"\(e\.g\. model\.layers\.0\.mlp\.down_proj\.lora_A\.weight")
    with pytest.raises(AdapterError, match=unexpected):
        load_adapter(net_c, tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not found"):
        load_adapter(net_c, tmp_path / "nothing")


@pytest.mark.slow
def test_real_smollm2_adapter_roundtrip_with_peft(smollm2_dir, tmp_path):
    net = M.Transformer.from_pretrained(smollm2_dir).eval()
    apply_lora(net, r=8, alpha=16, dropout=0.0)
    randomize_b(net, seed=5)
    save_adapter(net, tmp_path / "ad")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    x = ids(batch=1, T=24, vocab=49152)
    with torch.no_grad():
        ref = pm(x).logits
        ours = net(x)
    assert close(ours, ref, 1e-4)
    net2 = M.Transformer.from_pretrained(smollm2_dir).eval()
    load_adapter(net2, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(net2(x), ours)
