"""data.py: validation, conversions, chat templates vs transformers, masks, truncation, batching, synthetic data."""
import gzip
import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import ChatTemplate
from support.conversations import BadSample
from scripts.convert import convert

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIRS = {"qwen2.5": "qwen2.5-instruct", "llama3": "llama-3.2-instruct", "qwen3": "qwen3"}
EOT = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>", "smollm2": "<|im_end|>"}


# ---------------------------------------------------------------------------------------------------------------
# reading and validation

def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
ALT = "(user/assistant alternate after an optional leading system message)"
REASONS = ("invalid json", "not utf-8", "unknown format", "empty conversation", "unknown role", "non-string content",
           "empty content", "roles not alternating", "no assistant turn")  # as support/conversations.py documents

BAD_CASES = [
    ('{"messages": [', "invalid json", "Expecting value (column 15)"),
    ("[1, 2]", "unknown format", "record is list, expected an object"),
    ('{"text": "hi"}', "unknown format", "record has neither 'messages' nor 'conversations'"),
    ('{"messages": "hi"}', "unknown format", "'messages' is str, expected a list"),
    ('{"messages": [{"role": "user"}]}', "unknown format", "message 0 lacks 'role' or 'content'"),
    ('{"messages": []}', "empty conversation", "'messages' is empty"),
    ('{"conversations": []}', "empty conversation", "'conversations' is empty"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}]}), "empty conversation", "only a system message"),
    (json.dumps({"messages": [U, {"role": "tool", "content": "x"}]}), "unknown role",
     "message 1 has role 'tool', expected one of system, user, assistant"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}), "unknown role",
     "message 1 has from 'bot', expected one of system, human, user, gpt, assistant"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}),
     "non-string content", "message 1 (assistant) content is list"),
    (json.dumps({"messages": [{"role": "user", "content": None}, A]}), "non-string content",
     "message 0 (user) content is NoneType"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": " \n "}]}), "empty content",
     "message 1 (assistant) is empty"),
    (json.dumps({"messages": [U, {**A, "weight": 0.5}]}), "unknown format",
     'message 1 has weight 0.5, expected 0 or 1 (and no contrary "train")'),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0,
                                                                      "train": True}]}), "unknown format",
     'message 1 has weight 0, expected 0 or 1 (and no contrary "train")'),
    (json.dumps({"messages": [U, U, A]}), "roles not alternating", f"message 1 is user, expected assistant {ALT}"),
    (json.dumps({"messages": [A, U]}), "roles not alternating", f"message 0 is assistant, expected user {ALT}"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, U, A, {"role": "system", "content": "t"}, A]}),
     "roles not alternating", f"message 3 is system, expected user {ALT}"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, U]}), "no assistant turn",
     "conversation has no assistant message"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}]}), "no assistant turn",
     "conversation has no assistant message"),
]


@pytest.mark.parametrize("line,reason,detail", BAD_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_every_validation_reason_has_a_one_line_message(tmp_path, line, reason, detail):
    p = _write(tmp_path, [GOOD, line])
    with pytest.raises(BadSample) as e:
        data.load_conversations(p)
    assert str(e.value) == f"{p}:2: {reason}: {detail}"
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and e.value.reason in REASONS
    # skip mode keeps the good record and counts the reason
    rep = {}
    assert len(data.load_conversations(p, on_bad_sample="skip", report=rep)) == 1
    assert rep["reasons"] == {reason: 1} and rep["bad"] == [str(e.value)]


def test_skip_reports_counts_per_reason(tmp_path, capsys):
    lines = [GOOD, "not json", GOOD, BAD_CASES[8][0], BAD_CASES[8][0], "", BAD_CASES[-1][0], GOOD]
    p = _write(tmp_path, lines)
    rep = {}
    convs = data.load_conversations(p, on_bad_sample="skip", report=rep)
    assert len(convs) == 3
    assert rep["records"] == 7 and rep["kept"] == 3 and rep["skipped"] == 4  # the blank line is not a record
    assert rep["reasons"] == {"invalid json": 1, "unknown role": 2, "no assistant turn": 1}
    assert [b.split(": ")[0] for b in rep["bad"]] == [f"{p}:2", f"{p}:4", f"{p}:5", f"{p}:7"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{p}: kept 3 of 7 records, skipped 4 (invalid json 1, no assistant turn 1, unknown role 2)"]
    with pytest.raises(data.DataError, match="on_bad_sample must be"):
        data.load_conversations(p, on_bad_sample="ignore")


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    """JSONL records end at \\n only; json.dumps(ensure_ascii=False) leaves U+2028/U+2029/\\x85/\\x0c raw inside
    strings, where str.splitlines() would break a record in two."""
    odd = "a\u2028b\u2029c\x85d\x0ce\x1cf\r\ng"
    recs = [{"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": odd}]}] * 2
    p = tmp_path / "odd.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert data.load_conversations(p) == recs


def test_formats_json_array_sharegpt_extra_fields_gz(tmp_path):
    recs = [
        {"id": 7, "source": "x", "messages": [
            {"role": "system", "content": "be brief"}, U,
            {"role": "assistant", "content": "a", "noisy": True, "noise_type": "wrong"}]},
        {"id": "s1", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hey"},
                                       {"from": "gpt", "value": "yo", "weight": 0}]},
    ]
    want = [recs[0], {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hey"},
                                   {"role": "assistant", "content": "yo", "weight": 0, "train": False}], "id": "s1"}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    assert data.load_conversations(p) == want
    pj = _write(tmp_path, [json.dumps(r) for r in recs], "b.jsonl")
    assert data.load_conversations(pj) == want
    pg = tmp_path / "c.jsonl.gz"
    with gzip.open(pg, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    assert data.load_conversations(pg) == want
    pb = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark (Windows editors) is not a JSON error
    pb.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode())
    assert data.load_conversations(pb) == want
    odd = {"conversations": [{"from": "human", "value": "q", "role": "assistant"}, {"from": "gpt", "value": "a"}]}
    assert data.load_conversations(_write(tmp_path, [json.dumps(odd)]))[0]["messages"][0] == {"role": "user",
                                                                                              "content": "q"}
    # a bad record in a JSON array is named by its index; an unparseable array by its line
    p.write_text(json.dumps([recs[0], {"messages": []}]), encoding="utf-8")
    with pytest.raises(BadSample, match=re.escape(f"{p}[1]: empty conversation: 'messages' is empty")):
        data.load_conversations(p)
    p.write_text('[\n{"messages": []},\n{oops}\n]', encoding="utf-8")
    with pytest.raises(BadSample, match=re.escape(f"{p}:3: invalid json: ")):
        data.load_conversations(p)


# ---------------------------------------------------------------------------------------------------------------
# public dialogues

def test_hh_rlhf_conversion_reports_malformed_rows(fixtures_dir):
    path = fixtures_dir / "dialogues" / "hh-rlhf-helpful-base" / "test.jsonl.gz"
    raw = [json.loads(l) for l in gzip.open(path, "rt", encoding="utf-8")]
    rep = {}
    convs = convert(path, "hh", report=rep)
    assert rep["records"] == 2354 and rep["kept"] == 2344 == len(convs)
    assert rep["reasons"] == {"roles not alternating": 9, "empty content": 1}
    bad_rows = sorted(int(b.split(": ")[0].rsplit(":", 1)[1]) - 1 for b in rep["bad"])
    assert bad_rows == [120, 355, 567, 991, 1132, 1166, 1307, 1355, 1683, 1847]
    assert f"{path}:121: empty content: message 3 (assistant) is empty" in rep["bad"]
    # row 0 by hand: one Human and one Assistant turn
    c0 = convs[0]
    assert c0["id"] == "hh-0" and c0["source"] == "hh-rlhf"
    assert raw[0]["chosen"] == "\n\nHuman: " + c0["messages"][0]["content"] + "\n\nAssistant: " + \
        c0["messages"][1]["content"]
    assert sum(m["role"] == "assistant" for c in convs for m in c["messages"]) == \
        sum(r["chosen"].count("\n\nAssistant:") for i, r in enumerate(raw) if i not in bad_rows)
    with pytest.raises(BadSample, match=re.escape(f"{path}:121: empty content")):
        convert(path, "hh", on_bad_sample="error")


def test_mtbench101_conversion(fixtures_dir):
    path = fixtures_dir / "mt_bench_101" / "mtbench101.jsonl"
    raw = [json.loads(l) for l in open(path, encoding="utf-8")]
    rep = {}
    convs = convert(path, "mtbench101", report=rep)
    assert len(convs) == 1388 == len(raw) and rep["skipped"] == 0
    for r, c in zip(raw, convs):
        assert c["id"] == r["id"] and c["task"] == r["task"] and c["source"] == "mt-bench-101"
        assert [m["content"] for m in c["messages"]] == [x for h in r["history"] for x in (h["user"], h["bot"])]
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"] * len(r["history"])


def test_convert_cli(fixtures_dir, tmp_path):
    src = fixtures_dir / "dialogues" / "hh-rlhf-helpful-base" / "test.jsonl.gz"
    out = tmp_path / "hh.jsonl"
    r = subprocess.run([sys.executable, "scripts/convert.py", "--format", "hh", str(src), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kept 2344 of 2354 records, skipped 10 (empty content 1, roles not alternating 9)" in r.stderr
    assert len(data.load_conversations(out)) == 2344


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    p = _write(tmp_path, [GOOD, BAD_CASES[8][0]])
    assert data.main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {p}:2: unknown role: {BAD_CASES[8][2]}\n"
    assert data.main(["check", str(p), "--on-bad-sample", "skip"]) == 0
    assert data.main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # skip report line + missing-file line


# ---------------------------------------------------------------------------------------------------------------
# chat templates vs transformers' apply_chat_template

def _conversations():
    S = {"role": "system", "content": "You are a terse assistant."}
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    code = "Here:\n```python\ndef f(x):\n    return x * 2\n```\nDone."
    convs = [
        [u("Hi"), a("Hello!")],
        [S, u("What is 2+2?"), a("4")],
        [u("Ça va? 你好 🙂"), a("Très bien, 谢谢! e\u0301 naïve 😀"), u("¿Y tú?"), a("Bien.")],
        [u("Write code"), a(code)],
        [S] + [m for i in range(6) for m in (u(f"step {i}?"), a(f"answer {i}."))],
        [u("  padded question \n"), a("  padded answer  \n\n")],
        [u("start with a newline"), a("\nline one\nline two")],
        [{"role": "system", "content": "  spaced system  "}, u("x"), a("y")],
        [{"role": "system", "content": ""}, u("empty system"), a("ok")],
        [u("first"), a("one"), u("second, unanswered")],
        [u("tabs\tand\ttabs\n\nand blank lines"), a("- item 1\n- item 2\n\n1. a\n2. b")],
        [u('<b>bold</b> & "quotes" \'single\''), a("{\"json\": [1, 2, {\"k\": null}]}")],
        [S, u("Numbers 1234567890 3.14159 -42"), a("12345678901234567890")],
        [u("مرحبا بالعالم"), a("नमस्ते दुनिया"), u("Привет"), a("Здравствуйте")],
        [u("long " * 200), a("word " * 150)],
        [u("windows\r\nline\r\nendings"), a("ok\r\n")],
        [u("think first"), a("<think>\nplan it\n</think>\n\nThe answer is 3."), u("again"), a("Sure: 4.")],
        [S, u("a"), a("b"), u("c"), a("d"), u("e")],
        [u("Tab\tat end\t"), a("trailing spaces   ")],
        [u("noise labels"), {"role": "assistant", "content": "17", "noisy": True, "noise_type": "wrong"}],
        [u("markdown"), a("# Title\n\n**bold** _it_ `code`\n\n> quote"), u("more"),
         a("| a | b |\n|---|---|\n| 1 | 2 |")],
        [u("q1"), a("r1"), u("q2"), a("r2"), u("q3"), a("r3"), u("q4"), a("r4"), u("q5"), a("r5")],
    ]
    rng = random.Random(0)
    words = ["alpha", "βeta", "γάμμα", "δ", "日本語", "テスト", "😀", "x=1;", "{}", "naïve", "\n", "  ", "end."]
    for _ in range(4):
        n = rng.randint(1, 6)
        c = [S] if rng.random() < 0.5 else []
        for _ in range(n):
            c += [u(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + "?"),
                  a("A " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))]
        convs.append(c)
    return convs


CONVS = _conversations()


@pytest.fixture(scope="module", params=["qwen2.5", "llama3", "qwen3", "smollm2"])
def pair(request, fixtures_dir):
    from transformers import AutoTokenizer
    name = request.param
    d = request.getfixturevalue("smollm2_dir") if name == "smollm2" else \
        fixtures_dir / "tokenizers" / TOKENIZER_DIRS[name]
    return name, ChatTemplate.from_pretrained(d), AutoTokenizer.from_pretrained(str(d)), Path(d)


def _hf_ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_detect_and_special_ids(pair):
    name, tpl, hf, d = pair
    assert tpl.name == name == data.detect_template(d)
    assert tpl.stop_ids[0] == hf.convert_tokens_to_ids(EOT[name])
    want_pad = hf.pad_token_id if hf.pad_token_id is not None else hf.convert_tokens_to_ids(EOT[name])
    assert tpl.pad_id == want_pad
    gen = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    assert set(tpl.stop_ids) == {tpl.stop_ids[0], *(gen if isinstance(gen, list) else [gen])}


def test_render_and_ids_equal_transformers(pair):
    name, tpl, hf, _ = pair
    assert len(CONVS) >= 20
    for i, conv in enumerate(CONVS):
        for gen in (False, True):
            kw = {"date_string": "26 Jul 2024"} if name == "llama3" else {}
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
            assert tpl.render(conv, add_generation_prompt=gen) == want, (name, i, gen)
        enc = tpl.encode(conv)
        assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["turn_ids"])
        assert enc["input_ids"] == _hf_ids(hf.apply_chat_template(conv, tokenize=True, **kw)), (name, i)
        assert enc["input_ids"] == hf(tpl.render(conv), add_special_tokens=False)["input_ids"]
        if name == "llama3":
            assert enc["input_ids"][0] == hf.bos_token_id and enc["input_ids"].count(hf.bos_token_id) == 1
            # the hf tokenizer alone would add a second BOS; ours never adds one
            assert hf(tpl.render(conv))["input_ids"][:2] == [hf.bos_token_id] * 2
            assert tpl.tokenizer.encode(tpl.render(conv)).ids == enc["input_ids"]
    if name == "llama3":
        conv = CONVS[1]
        assert tpl.render(conv, date_string="05 Feb 2025") == \
            hf.apply_chat_template(conv, tokenize=False, date_string="05 Feb 2025")
    if name == "qwen3":
        for conv in (CONVS[9], CONVS[17]):
            assert tpl.render(conv, add_generation_prompt=True, enable_thinking=False) == \
                hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def _expected_targets(name, conv):
    """Supervised text of each assistant turn, straight from the official templates' rules."""
    out, last = [], max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        c = m["content"]
        if name == "llama3":
            c = c.strip()
        if name == "qwen3":
            c = c.split("</think>")[-1].lstrip("\n") if "</think>" in c else c
            c = c.lstrip("\n") if i == last and i == len(conv) - 1 else c
        out.append(c + EOT[name])
    return out


def test_labels_and_turn_ids_cover_exactly_the_assistant_replies(pair):
    name, tpl, hf, _ = pair
    nfc = lambda s: unicodedata.normalize("NFC", s)
    for i, conv in enumerate(CONVS):
        enc = tpl.encode(conv)
        ids, labels, turns = enc["input_ids"], enc["labels"], enc["turn_ids"]
        assert all((l == -100) == (t == 0) for l, t in zip(labels, turns))
        assert all(l in (-100, x) for l, x in zip(labels, ids))
        targets = _expected_targets(name, conv)
        assert max(turns) == len(targets)
        for k, want in enumerate(targets, 1):
            pos = [p for p, t in enumerate(turns) if t == k]
            assert pos == list(range(pos[0], pos[-1] + 1)), (name, i, k)  # one contiguous run
            got = hf.decode([ids[p] for p in pos], skip_special_tokens=False)
            extra = nfc(got)[:len(nfc(got)) - len(nfc(want))]
            # a token straddling header and reply (reply starting with whitespace) is supervised as a whole
            assert nfc(got).endswith(nfc(want)) and extra.strip() == "", (name, i, k, got, want)
            if pos[-1] + 1 < len(ids) and name != "llama3":
                assert hf.convert_ids_to_tokens(ids[pos[-1] + 1]) == "Ċ" and labels[pos[-1] + 1] == -100


def test_openai_weight_zero_is_context_like_train_false(pair, tmp_path):
    """OpenAI's fine-tuning format marks an assistant message not to learn from with "weight": 0: it is rendered
    and tokenized exactly as "train": false (its reply unsupervised, turn numbers kept), "weight": 1 as plain."""
    name, tpl, _, _ = pair
    turns = [U, {**A, "content": "first"}, {**U, "content": "again"}, {**A, "content": "second"}]
    weighted = [dict(m, weight=w) if m["role"] == "assistant" else m for m, w in zip(turns, (None, 0, None, 1))]
    p = _write(tmp_path, [json.dumps({"messages": weighted})])
    msgs = data.load_conversations(p)[0]["messages"]
    assert [m.get("train") for m in msgs] == [None, False, None, True] and msgs[1]["weight"] == 0
    got, want = tpl.encode(msgs), tpl.encode([turns[0], {**turns[1], "train": False}, turns[2], turns[3]])
    assert got == want and sorted(set(got["turn_ids"])) == [0, 2]
    assert tpl.encode(turns)["labels"] != got["labels"]  # without the weight, turn 1 is supervised


def test_hand_checked_masks(pair):
    name, tpl, hf, _ = pair
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6 is the answer."}]
    enc = tpl.encode(conv)
    toks = hf.convert_ids_to_tokens(enc["input_ids"])
    sup = [(t, k) for t, l, k in zip(toks, enc["labels"], enc["turn_ids"]) if l != -100]
    eot = EOT[name]
    assert sup == [("4", 1), (eot, 1), ("6", 2), ("Ġis", 2), ("Ġthe", 2), ("Ġanswer", 2), (".", 2), (eot, 2)]
    first = enc["turn_ids"].index(1)
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n" if name == "llama3" else "<|im_start|>assistant\n"
    assert hf.decode(enc["input_ids"][:first], skip_special_tokens=False).endswith(header)
    assert toks[first - 1] == ("ĊĊ" if name == "llama3" else "Ċ")  # the header's newline is its own token
    last = enc["turn_ids"].index(2)
    if name == "qwen3":  # the final turn's empty think block is context, like the generation prompt
        assert toks[last - 4:last] == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    assert data.turn_group(enc["turn_ids"], enc["labels"]) == 2
    assert data.turn_group(enc["turn_ids"], enc["labels"], max_turn_groups=1) == 1


def test_encode_prompt_is_the_generation_prefix(pair):
    name, tpl, hf, _ = pair
    for conv in CONVS:
        if conv[-1]["role"] != "assistant" or conv[-1]["content"][:1].isspace() or "</think>" in conv[-1]["content"]:
            continue
        prompt = tpl.encode_prompt(conv[:-1])
        kw = {"qwen3": {"enable_thinking": False}, "llama3": {"date_string": "26 Jul 2024"}}.get(name, {})
        assert prompt == _hf_ids(hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, **kw))
        enc = tpl.encode(conv)
        n_last = max(enc["turn_ids"])
        start = enc["turn_ids"].index(n_last)
        assert enc["input_ids"][:start] == prompt  # what the model sees before generating the last reply


def test_stop_ids_of_real_checkpoints(fixtures_dir):
    """The end-of-turn token first, then generation_config's / config's eos_token_id and tokenizer_config's
    eos_token, without repeats."""
    tok_dir = fixtures_dir / "tokenizers"
    expect = {"llama-3.2-instruct": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
              "qwen2.5-instruct": ["<|im_end|>", "<|endoftext|>"], "qwen3": ["<|im_end|>", "<|endoftext|>"]}
    for name, tokens in expect.items():
        tpl = ChatTemplate.from_pretrained(tok_dir / name)
        assert tpl.stop_ids == [tpl.tokenizer.token_to_id(t) for t in tokens]
    assert ChatTemplate.from_pretrained(tok_dir / "llama-3.2-instruct").stop_ids == [128009, 128001, 128008]


def test_detection_fallback_and_forcing(fixtures_dir, tmp_path, capsys):
    q = fixtures_dir / "tokenizers" / "qwen2.5-instruct"
    forced = ChatTemplate.from_pretrained(q, name="chatml")
    conv = [U, A]
    assert forced.name == "chatml"
    assert forced.render(conv) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert ChatTemplate.from_pretrained(q, name="qwen3").name == "qwen3"
    with pytest.raises(data.DataError, match="unknown chat template 'gpt2'"):
        ChatTemplate.from_pretrained(q, name="gpt2")
    with pytest.raises(data.DataError, match="the tokenizer has no <\\|begin_of_text\\|> token"):
        ChatTemplate.from_pretrained(q, name="llama3")
    for src, mt, want in (("qwen2.5-instruct", "qwen2", "qwen2.5"), ("qwen3", "qwen3", "qwen3"),
                          ("llama-3.2-instruct", "llama", "llama3"), ("qwen2.5-instruct", "llama", "chatml")):
        d = tmp_path / f"{src}-{mt}"
        d.mkdir()
        (d / "tokenizer.json").symlink_to(fixtures_dir / "tokenizers" / src / "tokenizer.json")
        (d / "config.json").write_text(json.dumps({"model_type": mt}))
        assert data.detect_template(d) == want
    # a chat template of its own (here Alpaca's form) is not silently replaced: stderr says what is used instead
    d = tmp_path / "qwen2.5-instruct-llama"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}### {{ m['role'] }}:"
                                                                          "\n{{ m['content'] }}\n{% endfor %}"}))
    assert data.detect_template(d) == "chatml"
    assert capsys.readouterr().err == (f"{d}: its chat template is none we know; rendering as chatml (chosen by "
                                       "model_type and vocabulary; --chat-template forces one)\n")
    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(data.DataError, match="cannot detect the chat template"):
        data.detect_template(d)


# ---------------------------------------------------------------------------------------------------------------
# examples and truncation

@pytest.fixture(scope="module")
def qwen(fixtures_dir):
    return ChatTemplate.from_pretrained(fixtures_dir / "tokenizers" / "qwen2.5-instruct")


def test_truncation_at_turn_boundaries_is_counted(qwen, fixtures_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / "qwen2.5-instruct"))
    u = lambda c: {"role": "user", "content": c}
    a = lambda c, n=False: {"role": "assistant", "content": c, "noisy": n, "noise_type": "wrong" if n else None}
    long = "word " * 300
    convs = [
        {"id": "A", "messages": [u("hi"), a("hello")]},
        {"id": "B", "messages": [u("a"), a("b"), u("c"), a(long, True), u("d"), a("e")]},
        {"id": "C", "messages": [u(long), a("x")]},
        {"id": "D", "messages": [u("q"), a(long)]},
        {"id": "E", "source": "s", "messages": [u("1"), a("2"), u("3"), a("4", True), u("5"), a("6")]},
    ]
    ex, rep = data.build_examples(convs, qwen, max_len=120, max_turn_groups=2)
    assert [e["meta"]["id"] for e in ex] == ["A", "B", "E"]
    assert {k: rep[k] for k in ("conversations", "examples", "truncated", "dropped", "turns_kept", "turns_dropped")} \
        == {"conversations": 5, "examples": 3, "truncated": 1, "dropped": 2, "turns_kept": 5, "turns_dropped": 4}
    assert "2 dropped" in rep.summary() and "1 truncated" in rep.summary()
    b = ex[1]
    assert b["input_ids"] == _hf_ids(hf.apply_chat_template(convs[1]["messages"][:2], tokenize=True))
    assert b["n_turns"] == 1 and b["group"] == 1 and b["meta"]["noisy"] == [False] and b["conv_index"] == 1
    e = ex[2]
    assert e["n_turns"] == 3 and e["group"] == 2
    assert e["meta"] == {"id": "E", "source": "s", "noisy": [False, True, False], "noise_type": [None, "wrong", None]}
    assert [x["index"] for x in ex] == [0, 1, 2] and all(len(x["input_ids"]) <= 120 for x in ex)
    # exact fit keeps everything, one token less drops the last turn
    n = len(qwen.encode(convs[4]["messages"])["input_ids"])
    assert data.build_examples([convs[4]], qwen, n)[1]["truncated"] == 0
    ex2, rep2 = data.build_examples([convs[4]], qwen, n - 1)
    assert rep2["truncated"] == 1 and ex2[0]["n_turns"] == 2


def test_qwen3_truncation_rerenders_last_turn(fixtures_dir):
    from transformers import AutoTokenizer
    d = fixtures_dir / "tokenizers" / "qwen3"
    tpl, hf = ChatTemplate.from_pretrained(d), AutoTokenizer.from_pretrained(str(d))
    msgs = [U, A, {"role": "user", "content": "more"}, {"role": "assistant", "content": "x " * 200}]
    ex, rep = data.build_examples([{"messages": msgs}], tpl, max_len=60)
    assert rep["truncated"] == 1
    assert ex[0]["input_ids"] == _hf_ids(hf.apply_chat_template(msgs[:2], tokenize=True))  # with its think block


def test_turn_group_hand_examples():
    t = [0, 1, 1, 0, 2, 2, 0, 3, 3]
    l = [-100, 5, 6, -100, 7, 8, -100, 9, 9]
    assert data.turn_group(t, l) == 3
    assert data.turn_group(t, l, max_turn_groups=2) == 2
    assert data.turn_group(t, l[:7] + [-100, -100]) == 2  # only supervised turns count
    assert data.turn_group(torch.tensor(t), torch.tensor(l)) == 3
    assert data.turn_group([0, 0], [-100, -100]) == 0


def test_collate_right_pads():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "turn_ids": [0, 1, 1], "group": 1, "index": 4},
          {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, -100, 9], "turn_ids": [0, 0, 1, 0, 2],
           "group": 2, "index": 0}]
    b = data.collate(ex, pad_id=99)
    assert b["input_ids"].tolist() == [[5, 6, 7, 99, 99], [1, 2, 3, 4, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, -100, 9]]
    assert b["turn_ids"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["group"].tolist() == [1, 2] and b["index"].tolist() == [4, 0]
    assert all(v.dtype == torch.long for v in b.values())


# ---------------------------------------------------------------------------------------------------------------
# sampler

def _epoch(n, bs, seed=42, epoch=0, rank=0, world=1, lengths=None, drop_last=False):
    return [data.rank_slice(b, rank, world) for b in data.epoch_batches(n, bs * world, seed, epoch, lengths, drop_last)]


def test_sampler_deterministic_and_covers_each_epoch():
    ea = _epoch(37, 4, seed=1)
    assert ea == _epoch(37, 4, seed=1) and len(ea) == 10 and sorted(sum(ea, [])) == list(range(37))
    assert _epoch(37, 4, seed=2) != ea
    e1 = _epoch(37, 4, seed=1, epoch=1)
    assert e1 != ea and sorted(sum(e1, [])) == list(range(37))
    dl = _epoch(37, 4, drop_last=True)
    assert len(dl) == 9 and all(len(x) == 4 for x in dl)


@pytest.mark.parametrize("n", [5, 23, 24, 200])
@pytest.mark.parametrize("world,bs", [(2, 1), (2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("grouped,drop_last", [(False, False), (True, False), (False, True), (True, True)])
def test_sampler_ranks_concatenate_to_single_process_batch(n, world, bs, grouped, drop_last):
    lengths = [random.Random(i).randint(1, 500) for i in range(n)] if grouped else None
    for epoch in (0, 3):
        want = _epoch(n, bs * world, 7, epoch, lengths=lengths, drop_last=drop_last)
        ranks = [_epoch(n, bs, 7, epoch, r, world, lengths, drop_last) for r in range(world)]
        assert all(len(x) == len(want) for x in ranks)
        for k, batch in enumerate(want):
            assert sum((x[k] for x in ranks), []) == batch
            if len(batch) == bs * world:
                assert all(len(x[k]) == bs for x in ranks)
            else:
                assert max(len(x[k]) for x in ranks) - min(len(x[k]) for x in ranks) <= 1


def test_sampler_length_grouping_cuts_padding():
    lengths = [random.Random(i).randint(1, 1000) for i in range(2000)]
    pad = lambda s: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in s)
    grouped, plain = _epoch(2000, 8, lengths=lengths), _epoch(2000, 8)
    assert pad(grouped) < 0.2 * pad(plain)
    assert sorted(sum(grouped, [])) == list(range(2000))




def test_read_scores_lines_ids_and_one_line_errors(tmp_path):
    """--prefilter-scores: a number per line in conversation order, or {"id", "score"} lines matched by id; every
    refusal names the file (and the line, where one is at fault)."""
    from support.conversations import read_scores
    convs = [{"id": "a"}, {"id": "b"}, {"id": 3}]
    f = tmp_path / "s.txt"
    f.write_text("1.5\n\n-2\n7e1\n")
    np.testing.assert_array_equal(read_scores(f, convs), [1.5, -2.0, 70.0])
    f.write_text("".join(json.dumps(r) + "\n" for r in ({"id": 3, "score": 0.5}, {"id": "a", "score": 1},
                                                         {"id": "b", "score": -1})))
    np.testing.assert_array_equal(read_scores(f, convs), [1.0, -1.0, 0.5])
    for text, err in (("1\n\nthree\n4\n", f"{f}:3: not a number or a JSON object: 'three'"),
                      ("1\n2\n", f"{f}: 2 scores for 3 conversations"),
                      ("1\nNaN\n2\n", f"{f}: no finite numeric score for conversation 1 (id 'b')"),
                      ('{"id": "a", "score": 1}\n{"id": "a", "score": 2}\n', f'{f}: id "a" has more than one score'),
                      ('{"id": "a", "score": 1}\n{"id": 3, "score": 2}\n',
                       f"{f}: no finite numeric score for conversation 1 (id 'b')")):
        f.write_text(text)
        with pytest.raises(data.DataError) as e:
            read_scores(f, convs)
        assert str(e.value) == err
