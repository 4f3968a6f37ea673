"""scripts/audit.py: losses and context gains against transformers on three chat templates; flags
and weights against the rule applied by hand to the numbers it writes; statistics against numpy;
the report's AUCs against a pairwise count; an interrupted audit against an uninterrupted one."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_setup
from scripts import audit, audit_report

TOKENIZERS = {"smollm2": None, "llama3": "llama-3.2-instruct", "qwen2.5": "qwen2.5-instruct"}
VOCAB = {"smollm2": 49152, "llama3": 128256, "qwen2.5": 151936}
END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>"}
LLAMA3_DATE = "26 Jul 2024"  # data.py renders Llama-3 with the template's own fallback date


def user(text):
    return {"role": "user", "content": text}


def reply(text, **labels):
    return {"role": "assistant", "content": text, **labels}


SKY = ("Sunlight scatters off air molecules, and blue light scatters most. So the sky looks blue "
       "from every direction.")
CONVERSATIONS = [
    {"id": "arith", "messages": [user("What is 2 + 2?"), reply("4", noisy=False, noise_type=None),
                                 user("And times 3?"),
                                 reply("12, since 4 x 3 = 12.", noisy=True, noise_type="wrong")]},
    {"id": "colours", "messages": [{"role": "system", "content": "You are terse."},
                                   user("Name a colour."), reply("Blue."), user("Another?"),
                                   {**reply("Green."), "train": False},
                                   user("One more, in French?"), reply("Rouge, c'est « rouge ».")]},
    {"messages": [user("Ça va? 你好"), reply("Très bien, 谢谢! 😀"), user("Write a list"),
                  reply("- one\n- two\n\n1. a\n2. b")]},
    {"id": 7, "messages": [user("Explain why the sky is blue in two sentences."), reply(SKY)]},
]
# (dialogue, turn) of every supervised reply: turn 2 of dialogue 1 is context ("train": false)
SUPERVISED = {(0, 1), (0, 2), (1, 1), (1, 3), (2, 1), (2, 2), (3, 1)}


def write_jsonl(path, records):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run_audit(*argv):
    """audit.cli in this process: (exit code, the units, the report)."""
    args = [str(a) for a in argv]
    rc = audit.cli(args)
    out = Path(args[args.index("--out") + 1])
    if rc != 0:
        return rc, None, None
    return rc, read_jsonl(out / "units.jsonl"), json.loads((out / "report.json").read_text())


# --- tiny random models that speak three real tokenizers ----------------------------------------
@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tiny(request, tmp_path_factory, fixtures_dir):
    """(template name, folder): a tiny random llama (qwen2 for Qwen2.5) with the template's
    tokenizer, its weights large enough that losses and gains spread over several nats."""
    import transformers
    name = request.param
    if name == "smollm2":
        source = request.getfixturevalue("smollm2_dir")
    else:
        source = fixtures_dir / "tokenizers" / TOKENIZERS[name]
    config_class = transformers.LlamaConfig
    model_class = transformers.LlamaForCausalLM
    if name == "qwen2.5":
        config_class = transformers.Qwen2Config
        model_class = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = config_class(vocab_size=VOCAB[name], hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, initializer_range=0.5)
    folder = tmp_path_factory.mktemp(f"tiny-{name}")
    model_class(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / f, folder / f)
    return name, folder


def ids_of(rendered):
    """apply_chat_template's token ids, whether it returns a list or a dict-like encoding."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def reply_nll(hf, tok, name, messages, k):
    """transformers' own per-token NLL of assistant turn k's reply (its text and end-of-turn
    token) after the messages before it, both rendered by apply_chat_template."""
    kw = {"date_string": LLAMA3_DATE} if name == "llama3" else {}
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"][k - 1]
    prompt = ids_of(tok.apply_chat_template(messages[:at], add_generation_prompt=True,
                                            tokenize=True, **kw))
    full = ids_of(tok.apply_chat_template(messages[:at + 1], tokenize=True, **kw))
    assert full[:len(prompt)] == prompt
    end = full.index(tok.convert_tokens_to_ids(END_OF_TURN[name]), len(prompt))
    ids = torch.tensor([full[:end + 1]])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    targets = ids[0, len(prompt):]
    return -logp[len(prompt) - 1:end].gather(1, targets[:, None])[:, 0]


def oracle(hf, tok, name, conv, turns):
    """(loss, gain) of the unit of these turns: the mean NLL of their tokens in the dialogue; the
    mean NLL of the same replies, each alone after an empty user turn, minus it."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
    replies = [m for m in msgs if m["role"] == "assistant"]
    in_dialogue = torch.cat([reply_nll(hf, tok, name, msgs, k) for k in turns])
    alone = torch.cat([reply_nll(hf, tok, name, [user(""), replies[k - 1]], 1) for k in turns])
    return float(in_dialogue.mean()), float(alone.mean() - in_dialogue.mean())


@pytest.mark.parametrize("unit", ["turn", "dialogue"])
def test_losses_and_gains_equal_transformers(tiny, unit, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name, folder = tiny
    data = write_jsonl(tmp_path / "convs.jsonl", CONVERSATIONS)
    rc, units, report = run_audit("--model", folder, "--data", data, "--out", tmp_path / "out",
                                  "--unit", unit, "--batch-size", 3)
    assert rc == 0
    assert report["settings"]["chat_template"] == name
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    want = SUPERVISED if unit == "turn" else {(d, 0) for d in range(len(CONVERSATIONS))}
    assert {(u["dialogue"], u["turn"]) for u in units} == want
    worst = 0.0
    for u in units:
        loss, gain = oracle(hf, tok, name, CONVERSATIONS[u["dialogue"]], u["turns"])
        worst = max(worst, abs(u["loss"] - loss), abs(u["gain"] - gain))
    assert worst <= 1e-4
    assert max(abs(u["gain"]) for u in units) > 0.1  # the gains are far from 0: the check sees them
    colours = [u["turns"] for u in units if u["dialogue"] == 1]
    assert all(2 not in turns for turns in colours)  # "train": false is context, never scored


def test_an_adapter_is_scored_as_peft_applies_it(synth_setup, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lora import apply_lora, lora_modules, save_adapter
    from model import Transformer
    folder, _ = synth_setup
    net = Transformer.from_pretrained(folder)
    apply_lora(net, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for m in lora_modules(net).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)  # a fresh adapter would change nothing
    adapter = tmp_path / "adapter"
    save_adapter(net, str(adapter), str(folder))
    data = write_jsonl(tmp_path / "convs.jsonl", CONVERSATIONS)
    argv = ["--model", folder, "--data", data, "--out", tmp_path / "out"]
    rc, units, report = run_audit(*argv, "--adapter", adapter)
    assert rc == 0
    assert report["settings"]["adapter_sha256"] is not None
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    worst = 0.0
    for u in units:
        loss, gain = oracle(hf, tok, "smollm2", CONVERSATIONS[u["dialogue"]], u["turns"])
        worst = max(worst, abs(u["loss"] - loss), abs(u["gain"] - gain))
    assert worst <= 1e-4
    capsys.readouterr()
    assert audit.cli([str(a) for a in argv]) == 2  # the same --out without the adapter: refused
    assert "(adapter_sha256: " in capsys.readouterr().err


# --- flags, weights and statistics --------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_setup(tmp_path_factory, smollm2_dir):
    """The tiny SmolLM2-tokenizer model and synthetic dialogues with every kind of noise."""
    kinds = {"wrong": 0.3, "off_topic": 0.2, "truncated": 0.2, "state_error": 0.2, "echo": 0.3}
    d = tiny_setup(tmp_path_factory.mktemp("audit"), smollm2_dir, n_train=60, n_test=2,
                   kinds=kinds)
    return d / "tiny", d / "data" / "train_L.jsonl"


@pytest.fixture(scope="module")
def audited(synth_setup, tmp_path_factory):
    """One uninterrupted audit of the synthetic data: (its folder, the argv)."""
    model, data = synth_setup
    out = tmp_path_factory.mktemp("audited") / "out"
    argv = ["--model", model, "--data", data, "--out", out, "--batch-size", 4]
    assert run_audit(*argv)[0] == 0
    return out, argv


def bounds(u):
    """(tau, lo, hi) of a unit line, None read as unbounded."""
    lo, hi = u["band"]
    tau = math.inf if u["tau"] is None else u["tau"]
    return tau, -math.inf if lo is None else lo, math.inf if hi is None else hi


def test_flags_are_the_rule_applied_to_the_written_numbers(audited):
    out, _ = audited
    units = read_jsonl(out / "units.jsonl")
    assert len(units) > 100
    for u in units:
        tau, lo, hi = bounds(u)
        high_loss = u["loss"] > tau
        echo_like = u["gain"] > hi
        off_topic_like = u["gain"] < lo
        reason = u["reason"] or ""
        assert u["flagged"] == (high_loss or echo_like or off_topic_like), u
        assert ("high loss" in reason) == high_loss, u
        assert ("echo-like" in reason) == echo_like, u
        assert ("off-topic-like" in reason) == off_topic_like, u
    assert any("high loss" in (u["reason"] or "") for u in units)
    assert any("gain" in (u["reason"] or "") for u in units)  # both views flag something here


def test_weights_are_eq6_with_the_gain_view_and_the_dataset_wide_floor(audited):
    out, _ = audited
    units = read_jsonl(out / "units.jsonl")
    report = json.loads((out / "report.json").read_text())
    raw = []
    for u in units:
        tau, lo, hi = bounds(u)
        w = 1.0
        if u["loss"] > tau:
            w = math.exp(-(u["loss"] - tau) / tau)                    # Eq. 6 before the floor
        if u["gain"] > hi or u["gain"] < lo:
            distance = max(lo - u["gain"], u["gain"] - hi)
            w = min(w, math.exp(-distance / ((hi - lo) / 2)))         # the gain view
        raw.append(w)
    eps = float(np.percentile(raw, 5.0))                              # the dataset as one batch
    assert report["eps"] == pytest.approx(eps, abs=1e-12)
    assert eps < 1.0
    for u, w in zip(units, raw):
        want = max(w, eps) if u["flagged"] else 1.0
        assert u["weight"] == pytest.approx(want, abs=1e-12), u


def test_mad_statistics_equal_numpy_and_ignore_the_file_order(audited, synth_setup, tmp_path):
    out, _ = audited
    units = read_jsonl(out / "units.jsonl")
    report = json.loads((out / "report.json").read_text())
    for g in report["groups"]:
        losses = np.array([u["loss"] for u in units if u["group"] == g["group"]])
        gains = np.array([u["gain"] for u in units if u["group"] == g["group"]])
        sigma = 1.4826 * np.median(np.abs(losses - np.median(losses)))
        assert g["loss"]["tau"] == pytest.approx(np.median(losses) + sigma, rel=1e-12)
        gain_sigma = 1.4826 * np.median(np.abs(gains - np.median(gains)))
        hi = np.median(gains) + 2 * gain_sigma
        assert g["gain"]["hi"] == pytest.approx(hi, rel=1e-12, abs=1e-12)
    model, data = synth_setup
    records = read_jsonl(data)
    order = np.random.default_rng(0).permutation(len(records))
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", [records[i] for i in order])
    rc, again, _ = run_audit("--model", model, "--data", shuffled, "--out", tmp_path / "out",
                             "--batch-size", 4)
    assert rc == 0
    by_id = {(u["id"], u["turn"]): u for u in again}
    for u in units:
        v = by_id[(u["id"], u["turn"])]
        assert v["tau"] == pytest.approx(u["tau"], abs=1e-6)
        assert v["band"] == pytest.approx(u["band"], abs=1e-6)
        assert v["flagged"] == u["flagged"]


def test_the_papers_rule_settles_at_a_fixed_point(audited):
    """--stats welford --stats-update reliable: each group's tau is the mean + alpha * std (ddof 1)
    of exactly the group's losses at or under it."""
    _, argv = audited
    for alpha in (1.0, 2.0):
        rc, units, report = run_audit(*argv, "--stats", "welford", "--alpha", alpha)
        assert rc == 0
        assert report["settled"]
        for g in report["groups"]:
            losses = np.array([u["loss"] for u in units if u["group"] == g["group"]])
            tau = g["loss"]["tau"]
            under = losses[losses <= tau]
            assert g["loss"]["fed"] == len(under)
            assert tau == pytest.approx(under.mean() + alpha * under.std(ddof=1), rel=1e-9)


# --- the report ---------------------------------------------------------------------------------
def pairwise_auc(scores, positive):
    """P(a positive scores above a negative), ties one half, by counting every pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_a_pairwise_count():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=60), 1)  # rounded: many ties
    positive = rng.random(60) < 0.3
    want = pairwise_auc(scores, positive)
    assert audit_report.roc_auc(scores, positive) == pytest.approx(want, abs=1e-12)
    assert audit_report.roc_auc([1.0, 2.0, 3.0], [False, False, True]) == 1.0
    assert audit_report.roc_auc([1.0, 1.0], [True, False]) == 0.5
    assert audit_report.roc_auc([1.0, 2.0], [False, False]) is None


def test_the_reports_auc_and_flag_quality_come_from_the_units_file(audited):
    out, _ = audited
    units = read_jsonl(out / "units.jsonl")
    noise = json.loads((out / "report.json").read_text())["noise"]
    kinds = {u["noise_type"] for u in units if u["noisy"]}
    assert set(noise) == {"any", *kinds}
    assert {"echo", "off_topic", "wrong"} <= kinds
    for kind, row in noise.items():
        chosen = [u for u in units if not u["noisy"] or kind in ("any", u["noise_type"])]
        positive = [bool(u["noisy"]) for u in chosen]
        assert row["noisy"] == sum(positive)
        flagged = [u["flagged"] for u in chosen]
        tp = sum(f and p for f, p in zip(flagged, positive))
        assert row["recall"] == pytest.approx(tp / sum(positive))
        if any(flagged):
            assert row["precision"] == pytest.approx(tp / sum(flagged))
        by_loss = ["high loss" in (u["reason"] or "") for u in chosen]
        loss_tp = sum(f and p for f, p in zip(by_loss, positive))
        assert row["loss_recall"] == pytest.approx(loss_tp / sum(positive))
        for key, score in (("auc_loss", "z_loss"), ("auc_gain", "z_gain"),
                           ("auc_excess", "excess")):
            want = pairwise_auc([u[score] for u in chosen], positive)
            assert row[key] == pytest.approx(want, abs=1e-12), (kind, key)
        outside = pairwise_auc([abs(u["z_gain"]) for u in chosen], positive)
        assert row["auc_gain_outside"] == pytest.approx(outside, abs=1e-12)


def test_report_shows_groups_suspects_and_how_to_get_the_pictures(audited, monkeypatch):
    out, argv = audited
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert run_audit(*argv)[0] == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    assert "pip install matplotlib" in md
    assert report["pictures"] == audit_report.HOW_TO_DRAW
    for g in report["groups"]:
        loss = g["loss"]
        row = f"| {g['group']} | {g['units']} | {loss['mu']:.3f} | {loss['sigma']:.3f} | "
        assert row + f"{loss['tau']:.3f} |" in md
    suspects = report["suspects"]
    assert len(suspects) == min(20, report["flagged"])
    excess = [s["excess"] for s in suspects]
    assert excess == sorted(excess, reverse=True)
    first = suspects[0]
    conv = read_jsonl(argv[argv.index("--data") + 1])[first["dialogue"]]
    replies = [i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"]
    at = replies[first["turn"] - 1]
    assert first["reply"] == conv["messages"][at]["content"]
    assert first["user"] == conv["messages"][at - 1]["content"]
    assert f"> **user:** {first['user'].splitlines()[0]}" in md


def test_pictures_with_matplotlib(audited):
    out, argv = audited
    assert run_audit(*argv)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pictures"] == [f"group_{g['group']}.png" for g in report["groups"]]
    for name in report["pictures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "report.md").read_text()


# --- resuming, refusing, bad input --------------------------------------------------------------
def test_interrupted_and_rerun_equals_uninterrupted(audited, tmp_path, monkeypatch, capsys):
    out, argv = audited
    mine = tmp_path / "out"
    argv = [str(mine) if a == out else str(a) for a in argv]
    real = audit.score_batch
    calls = []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(audit, "score_batch", interrupted_at_the_third)
    capsys.readouterr()
    assert audit.cli(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("audit.py: interrupted; ")
    assert "keeps 2 of" in err[-1]
    assert err[-1].endswith("the same command continues")
    assert not (mine / "units.jsonl").exists()
    with open(mine / "scores.jsonl", "a") as f:  # a batch line cut short by the interruption
        f.write('{"batch": 2, "units": [{"dialogue": 3, "lo')
    monkeypatch.setattr(audit, "score_batch", real)
    assert audit.cli(argv) == 0
    assert "holds 2 of" in capsys.readouterr().err
    assert run_audit(*audited[1])[0] == 0  # the uninterrupted scores, judged here again
    for name in ("units.jsonl", "report.json", "report.md"):
        assert (mine / name).read_text() == (out / name).read_text(), name
    assert read_jsonl(mine / "scores.jsonl")[1:] == read_jsonl(out / "scores.jsonl")[1:]


def test_other_scoring_settings_are_refused_others_judge_again(audited, capsys):
    out, argv = audited
    capsys.readouterr()
    assert audit.cli([str(a) for a in argv] + ["--unit", "dialogue"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "holds the scores of another audit (unit: 'turn' there, 'dialogue' here)" in err[0]
    before = (out / "scores.jsonl").read_bytes()
    rc, _, report = run_audit(*argv, "--alpha", 3)
    assert rc == 0
    assert (out / "scores.jsonl").read_bytes() == before  # nothing scored again
    assert report["settings"]["alpha"] == 3
    for g in report["groups"]:
        want = g["loss"]["mu"] + 3 * g["loss"]["sigma"]
        assert g["loss"]["tau"] == pytest.approx(want, rel=1e-12)
    assert run_audit(*argv)[0] == 0  # back to the module's settings for the other tests


@pytest.mark.parametrize("change, words", [
    (("--data", "missing.jsonl"), "--data missing.jsonl: no such file"),
    (("--model", "nowhere"), "--model nowhere: not a folder"),
    (("--adapter", "nowhere"), "--adapter nowhere: not a folder"),
    (("--batch-size", "0"), "argument --batch-size: must be >= 1 and <= 1000000, got 0"),
    (("--alpha", "-1"), "argument --alpha: must be >= 0, got -1"),
    (("--stats", "ema"), "argument --stats: invalid choice: 'ema'"),
])
def test_bad_input_is_one_line_and_exit_2(audited, change, words, tmp_path, capsys):
    _, argv = audited
    argv = [str(a) for a in argv]
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    capsys.readouterr()
    assert audit.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("audit.py: error: ")
    assert words in err[0]


def test_a_bad_record_names_its_line(synth_setup, tmp_path, capsys):
    model, data = synth_setup
    lines = data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"messages": ['] + lines[3:6]) + "\n")
    argv = ["--model", str(model), "--data", str(bad), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert audit.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{bad}:4: invalid json" in err[0]
    assert audit.cli(argv + ["--on-bad-sample", "skip"]) == 0


def test_ctrl_c_is_one_line_and_exit_130(synth_setup, tmp_path):
    model, data = synth_setup
    data = write_jsonl(tmp_path / "long.jsonl", read_jsonl(data) * 5)  # outlasts the start-up
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "audit.py"), "--model", str(model),
           "--data", str(data), "--out", str(out), "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    scores = out / "scores.jsonl"
    while time.time() < deadline and p.poll() is None:
        if scores.exists() and scores.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("audit.py: interrupted; ")


# --- the real model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_an_echo_gains_more_from_its_context_than_the_real_reply(smollm2_dir, fixtures_dir,
                                                                  tmp_path):
    """Why a gain above the band reads "echo-like": under SmolLM2-135M-Instruct a reply that
    repeats the user's turn is far easier to predict in its dialogue than alone, more so than the
    reply it replaces (MT-Bench-101 dialogues of ten tasks)."""
    from scripts.convert import convert
    first_of_task = {}
    for c in convert(str(fixtures_dir / "mt_bench_101" / "mtbench101.jsonl"), "mtbench101"):
        if len(c["messages"]) >= 4:
            first_of_task.setdefault(c["task"], c)
    convs = list(first_of_task.values())[:10]
    echoed = []
    for c in convs:
        msgs = [dict(m) for m in c["messages"]]
        msgs[3]["content"] = msgs[2]["content"]  # the second reply repeats the second user turn
        echoed.append({**c, "messages": msgs})
    data = write_jsonl(tmp_path / "d.jsonl", convs + echoed)
    rc, units, _ = run_audit("--model", smollm2_dir, "--data", data, "--out", tmp_path / "out")
    assert rc == 0
    gain = {(u["dialogue"], u["turn"]): u["gain"] for u in units}
    lift = [gain[(len(convs) + i, 2)] - gain[(i, 2)] for i in range(len(convs))]
    assert len({c["task"] for c in convs}) == 10
    assert min(lift) > 0
    assert np.mean(lift) > 1.0  # nats per token
