"""DPO (baselines/dpo.py): the loss and its gradient against a hand computation on a tiny float64
model (with transformers + PEFT as the oracle and a finite difference), pair building on stub
samples and the query budget, the CLI end to end on a tiny random llama, the trained policy's
summary by hand, and interruptions."""
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model as M
import train
from baselines import dpo
from baselines.dpo import DPOLoss, sample_pairs
from baselines.feedback import Feedback, Oracle
from eval import load
from lora import apply_lora, lora_modules, save_adapter
from resure import ReSURE
from conftest import tiny_setup
from support.conversations import load_conversations
from test_ilr import check_same, reference_run, stop_and_rerun, stop_points, stops
from test_ilr import written_in_place

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A float64 llama with a 64-token vocabulary (transformers writes it; ours and PEFT read
    it)."""
    import transformers
    d = tmp_path_factory.mktemp("dpo_small")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False,
                                   initializer_range=0.3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def pair_batch():
    """Two pairs of token sequences; only the final reply of each is supervised (labels = ids
    there)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    # chosen 0, chosen 1, rejected 0, rejected 1
    for prompt_len, reply_len in ((5, 4), (7, 3), (5, 6), (7, 2)):
        ids = torch.randint(0, 64, (prompt_len + reply_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:],
                     "turn_ids": [0] * prompt_len + [1] * reply_len})
    return [{"chosen": rows[0], "rejected": rows[2]}, {"chosen": rows[1], "rejected": rows[3]}]


def hand_logp(logits, row):
    """sum over supervised t of log softmax(logits[t - 1])[ids[t]], written out from the logits."""
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, row["input_ids"][t]] for t, y in enumerate(row["labels"]) if y != -100)


def dpo_run(net, objective, examples):
    """The train.Run that DPOLoss.loss sees in one process on the CPU: net with its adapter, no
    autocast, a plain forward; the batch is made by hand, so there is no template."""
    params = [p for p in net.parameters() if p.requires_grad]
    args = train.parse_args(["--model", "small", "--data", "pairs.jsonl", "--method", "sft"])
    sampler = train.Sampler(len(examples), 2, seed=0, rank=0, world=1, lengths=None)
    return train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), objective=objective,
                     net=net, template=None, autocast=nullcontext(), rs=ReSURE(mode="sft"),
                     examples=examples, eval_examples=None, params=params,
                     opt=torch.optim.AdamW(params),
                     scaler=torch.amp.GradScaler("cpu", enabled=False),
                     ddp=train.TokenLoss(net), sampler=sampler, total=1, warmup=0)


def test_dpo_loss_and_gradient_against_hand_computation(small, tmp_path):
    import peft
    import transformers
    beta = 0.1
    net = M.Transformer.from_pretrained(small, dtype=torch.float64)
    apply_lora(net, r=4, alpha=8, dropout=0.0, verbose=False)
    net.double()  # the adapter too (it is fp32 by default), so every product below is float64
    torch.manual_seed(2)
    with torch.no_grad():
        # B != 0: the policy differs from the reference; values on the fp32 grid, so that the
        # (fp32) adapter file PEFT reads is exact
        for m in lora_modules(net).values():
            m.lora_B.weight.normal_(0, 0.2)
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(w.float().double())
    net.train()
    obj = DPOLoss(beta)
    examples = pair_batch()
    run = dpo_run(net, obj, examples)
    b = obj.collate(examples, pad_id=0)
    assert obj.count(run, b) == (2, 4 + 3 + 6 + 2)
    loss, unit_losses, weights = obj.loss(run, b, 0, (2, 15))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    # the oracle: transformers in float64, with our adapter read by PEFT; log-probs written out by
    # hand
    save_adapter(net, tmp_path / "ad", str(small))
    hf = transformers.LlamaForCausalLM.from_pretrained(small, dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad", is_trainable=True).double()
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    pi = [hand_logp(pm(torch.tensor([r["input_ids"]])).logits[0], r) for r in rows]
    with torch.no_grad(), pm.disable_adapter():
        ref = [hand_logp(pm(torch.tensor([r["input_ids"]])).logits[0], r) for r in rows]
    margins = [beta * ((pi[i] - ref[i]) - (pi[i + 2] - ref[i + 2])) for i in (0, 1)]
    hand = [-torch.nn.functional.logsigmoid(m) for m in margins]
    # model.token_losses returns fp32 per-token losses (the core's contract), so agreement is to
    # fp32 precision: the log-ratios are differences of sums of ~20 nats, whose fp32 rounding is
    # ~1e-6
    assert unit_losses.tolist() == pytest.approx([float(h.detach()) for h in hand], rel=1e-5)
    assert weights.tolist() == [1.0, 1.0]
    mean = (hand[0] + hand[1]) / 2
    assert float(loss) == pytest.approx(float(mean.detach()), rel=1e-5)
    mean.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert float((ours[n] - theirs[n]).norm() / theirs[n].norm()) < 1e-5, n  # measured: <= 2e-7

    # a finite difference on one LoRA entry, through our objective alone
    name = "model.layers.1.mlp.down_proj.lora_B.weight"
    w, h = dict(net.named_parameters())[name], 1e-2
    i, j = divmod(int(ours[name].abs().argmax()), w.shape[1])
    vals = []
    for s in (1, -1):
        with torch.no_grad():
            w[i, j] += s * h
            vals.append(float(obj.loss(run, b, 0, (2, 15))[0]))
            w[i, j] -= s * h
    assert (vals[0] - vals[1]) / (2 * h) == pytest.approx(float(ours[name][i, j]), rel=1e-3)

    # a fresh adapter (B = 0) is the reference itself: the loss is log 2 and the history says
    # margin 0
    with torch.no_grad():
        for m in lora_modules(net).values():
            m.lora_B.weight.zero_()
    fresh = float(obj.loss(run, b, 0, (2, 15))[0])
    assert fresh == pytest.approx(math.log(2), abs=1e-7)  # log 2 in fp32
    assert obj.history[-1]["margin"] == 0
    assert obj.history[-1]["reward_accuracy"] == 0


class ThreeTokensAMessage:
    """A template stub whose prompts are three tokens per message."""

    def encode_prompt(self, messages):
        return [1] * (3 * len(messages))


def test_sample_pairs_drops_identical_and_ties_and_keeps_the_budget(monkeypatch):
    start = "Keep a counter and reply with its value only. Start at 5."
    conv = {"messages": [{"role": "user", "content": start},
                         {"role": "assistant", "content": "5", "reference": "5"},
                         {"role": "user", "content": "Add 2."},
                         {"role": "assistant", "content": "8", "reference": "7"}]}
    it = iter(())

    def generate(net, tpl, prompts, *args, **kwargs):  # the next canned answers, one per prompt
        return [next(it) for _ in prompts]
    monkeypatch.setattr(dpo, "generate", generate)
    tpl = ThreeTokensAMessage()
    args = SimpleNamespace(samples=2, gen_batch_size=4, max_new_tokens=4, temperature=1.0,
                           top_p=1.0)
    targets = [(0, 1), (0, 3)]
    fb = Feedback(Oracle())
    # turn 1: one right, one wrong; turn 2: one distinct answer, no pair
    it = iter(["5", "6", "9", "9"])
    pairs, counts, decisions, _ = sample_pairs(None, tpl, [conv], targets, fb, args, 100, 0, {})
    assert counts["pairs"] == 1
    assert counts["compared"] == 1
    assert counts["with_two_distinct"] == 1
    assert pairs[0]["messages"][-1]["content"] == "5"
    assert pairs[0]["rejected"] == "6"
    assert pairs[0]["p"] == 1.0
    assert pairs[0]["messages"][:-1] == conv["messages"][:1]
    assert fb.queries == 2
    args.samples = 3
    # turn 1: 5, 6 (5 again dropped); turn 2: 9, 7, 8 -> 3 pairs
    it = iter(["5", "6", "5", "9", "7", "8"])
    pairs, counts, decisions, _ = sample_pairs(None, tpl, [conv], targets, fb, args, 100, 0, {})
    assert counts["compared"] == 4
    assert counts["ties"] == 1
    assert counts["pairs"] == 3  # 9 vs 8: both wrong
    chosen_rejected = sorted((p["messages"][-1]["content"], p["rejected"]) for p in pairs)
    assert chosen_rejected == [("5", "6"), ("7", "8"), ("7", "9")]
    fb2 = Feedback(Oracle(), max_queries=4)  # two pairs' worth of queries
    it = iter(["5", "6", "5", "9", "7", "8"])
    pairs, counts, _, _ = sample_pairs(None, tpl, [conv], targets, fb2, args, 100, 0, {})
    assert fb2.queries == 4
    assert counts["compared"] == 2
    assert counts["over_budget"] == 2
    it = iter(["5", "6", "7"])
    _, counts, _, _ = sample_pairs(None, tpl, [conv], targets, Feedback(Oracle()), args, 8, 0, {})
    assert counts["too_long"] == 1  # the turn-2 prompt (9 ids) is over max_len 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return tiny_setup(tmp_path_factory.mktemp("dpo"), smollm2_dir, n_train=12, n_test=2,
                      max_turns=3)


def test_cli_end_to_end(tiny):
    """SFT, pairs judged by the tiny model itself (local:DIR: every sample is garbage, so only a
    real judge gives preferences), DPO on the merged SFT model; the stacked adapter equals the two
    stages; the first DPO step's loss is log 2 (policy = reference)."""
    out = tiny / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "baselines/dpo.py", *dpo_argv(tiny, out), "--log-every",
                        "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == rep["pairs"] > 0
    assert rep["compared"] == rep["pairs"] + rep["ties"]
    assert all(x["messages"][-1]["content"] != x["rejected"] for x in pairs)
    assert all(x["p"] > 0.5 for x in pairs)
    c = rep["compute"]
    assert all(type(v) is int for v in c.values())
    assert len(c) == 6
    assert c["trainings"] == 2
    assert c["optimizer_steps"] == 5
    assert c["comparisons"] == 2 * rep["compared"]
    assert 0 < c["generated_tokens"] <= 4 * rep["sampled"]
    assert c["forward_tokens"] > 0
    assert c["train_tokens"] > 0
    steps = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["lr"] == 0
    assert steps[1]["lr"] == pytest.approx(1e-2, rel=1e-6)  # --dpo-lr, warm-up first
    assert rep["label_accuracy"]
    assert len(rep["label_accuracy"]) == 1
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    assert cfg["lora_alpha"] == 8
    stacked, _ = load(tiny / "tiny", out / "adapter")  # eval.py reads it on the base model
    two, _ = load(out / "sft-merged", out / "dpo" / "adapter")  # the two stages as trained
    sft, _ = load(tiny / "tiny", out / "sft" / "adapter")
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, s = stacked(ids), two(ids), sft(ids)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max() < (a - s).abs().max()


def test_errors_are_one_line(tiny):
    base = ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"), "--out",
            str(tiny / "err"), "--feedback", "oracle"]
    p = subprocess.run([sys.executable, "baselines/dpo.py", *base, "--samples", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    said = "baselines/dpo.py: error: --samples must be >= 2 (a pair needs two answers), got 1"
    assert p.stderr.strip() == said, p.stderr
    for args, needle in [(["--method", "resure"], "--method other than sft"),
                         (["--beta", "0"], "--beta"), (["--temperature", "0"], "--temperature"),
                         (["--sft-adapter", str(tiny)], "--sft-adapter"),
                         (["--prefilter-keep", "0.5"], "--prefilter-keep"),
                         (["--max-queries", "-2"], "--max-queries >= 0")]:
        with pytest.raises(ValueError, match=needle) as e:
            dpo.main([*base, *args])
        assert "\n" not in str(e.value)
    # --max-comparisons is another spelling of the same budget
    assert dpo.parse_args([*base, "--max-comparisons", "6"])[0].max_queries == 6


# -------------------------------------------------------------------------------------------------
# Interruptions (helpers in tests/test_ilr.py)

DPO_TRAIN = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--max-len", "128",
             "--lora-r", "4", "--lora-alpha", "8", "--lr", "3e-3", "--max-new-tokens", "4",
             "--dpo-lr", "1e-2", "--dpo-max-steps", "3"]
DPO_FILES = ["pairs.jsonl", "dpo/adapter/adapter_model.safetensors",
             "adapter/adapter_model.safetensors"]


def dpo_argv(tiny, out):
    return ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"),
            "--out", str(out), "--feedback", f"local:{tiny / 'tiny'}", *DPO_TRAIN]


@pytest.fixture(scope="module")
def dpo_reference(tiny):
    out = tiny / "reference"
    return reference_run(dpo.main, dpo_argv(tiny, out), out, DPO_FILES)


def test_every_file_is_written_whole(dpo_reference):
    assert written_in_place(dpo_reference.opened, dpo_reference.out) == []


@pytest.mark.parametrize("point", range(3))
def test_a_stop_at_any_write_is_one_line_and_the_same_command_ends_as_uninterrupted(
        tiny, dpo_reference, capsys, monkeypatch, point):
    """A stop at the first write, half way and at the last; the local judge's cache keeps what
    it was asked, and the rerun counts the same work."""
    n = stop_points(dpo_reference, 3)[point]
    out = tiny / f"stopped-{point}"
    argv = dpo_argv(tiny, out)
    stop_and_rerun(dpo.main, dpo.PROG, argv, out, stops(3)[point], capsys, monkeypatch, n=n)
    check_same(out, DPO_FILES, dpo_reference.outcome)


@pytest.mark.slow
def test_a_stop_at_every_third_write_ends_as_uninterrupted(tiny, dpo_reference, capsys,
                                                           monkeypatch):
    for i, n in enumerate(range(1, len(dpo_reference.renames) + 1, 3)):
        out = tiny / f"every-{n}"
        argv = dpo_argv(tiny, out)
        stop_and_rerun(dpo.main, dpo.PROG, argv, out, stops(2)[i % 2], capsys, monkeypatch, n=n)
        check_same(out, DPO_FILES, dpo_reference.outcome)


def test_training_summary_is_the_trained_policy_on_its_pairs(tiny, dpo_reference):
    """report.json's "training" against log-probabilities written out from the logits of the
    merged SFT model (the reference) and of it with the DPO adapter (the policy)."""
    out = dpo_reference.out
    training = json.loads((out / "report.json").read_text())["training"]
    template = load(out / "sft-merged")[1]
    args = SimpleNamespace(max_len=128, data="pairs.jsonl")
    examples, _ = DPOLoss().examples(load_conversations(out / "pairs.jsonl"), template, args)
    logps = []
    for adapter in (None, out / "dpo" / "adapter"):
        net = load(out / "sft-merged", adapter)[0]
        rows = []
        with torch.no_grad():
            for e in examples:
                for row in (e["chosen"], e["rejected"]):
                    logits = net(torch.tensor([row["input_ids"]]))[0].double()
                    rows.append(float(hand_logp(logits, row)))
        logps.append(rows)
    ref, pi = logps
    margins = [0.1 * ((pi[i] - ref[i]) - (pi[i + 1] - ref[i + 1])) for i in range(0, len(pi), 2)]
    assert training["pairs"] == len(examples) > 0
    assert training["margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-5)
    wins = sum(m > 0 for m in margins) / len(margins)
    assert training["reward_accuracy"] == pytest.approx(wins)
    losses = [math.log1p(math.exp(-m)) for m in margins]
    assert training["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
