"""data.py and support/conversations.py: validation, conversions, chat templates against
transformers, masks, truncation, batching."""
import gzip
import json
import random
import re
import signal
import subprocess
import sys
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import ChatTemplate
from scripts.convert import convert
from support.conversations import BadSample, DataError, load_conversations, read_scores

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIRS = {"qwen2.5": "qwen2.5-instruct", "llama3": "llama-3.2-instruct", "qwen3": "qwen3"}
EOT = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>",
       "smollm2": "<|im_end|>"}
LLAMA3_DATE = {"date_string": "26 Jul 2024"}  # transformers would render today's date


def user(content):
    return {"role": "user", "content": content}


def reply(content):
    return {"role": "assistant", "content": content}


def chat(n_turns):
    """A plain dialogue of n_turns user / assistant exchanges."""
    return [m for i in range(n_turns) for m in (user(f"question {i}?"), reply(f"answer {i}."))]


# ------------------------------------------------------------------------------------------------
# reading and validation

def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


GOOD = json.dumps({"messages": [user("hi"), reply("hello")]})
U = user("q")
A = reply("a")
ALT = "(user/assistant alternate after an optional leading system message)"
# the reasons support/conversations.py documents
REASONS = ("invalid json", "not utf-8", "unknown format", "empty conversation", "unknown role",
           "non-string content", "empty content", "roles not alternating", "no assistant turn")
UNKNOWN_ROLE = json.dumps({"messages": [U, {"role": "tool", "content": "x"}]})
UNKNOWN_ROLE_DETAIL = "message 1 has role 'tool', expected one of system, user, assistant"
NO_ASSISTANT = json.dumps({"conversations": [{"from": "human", "value": "q"}]})
# json.dumps writes a lone surrogate as the escape "\ud800": valid JSON, not Unicode text
LONE_SURROGATE = json.dumps({"messages": [U, reply("a \ud800 b")]})
SURROGATE_DETAIL = "holds the lone surrogate \\ud800, which no UTF-8 text can carry"
LOW_SURROGATE_DETAIL = SURROGATE_DETAIL.replace("ud800", "udc00")

BAD_CASES = [
    ('{"messages": [', "invalid json", "Expecting value (column 15)"),
    ("[1, 2]", "unknown format", "record is list, expected an object"),
    ('{"text": "hi"}', "unknown format", "record has neither 'messages' nor 'conversations'"),
    ('{"messages": "hi"}', "unknown format", "'messages' is str, expected a list"),
    ('{"messages": [{"role": "user"}]}', "unknown format", "message 0 lacks 'role' or 'content'"),
    ('{"messages": []}', "empty conversation", "'messages' is empty"),
    ('{"conversations": []}', "empty conversation", "'conversations' is empty"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}]}), "empty conversation",
     "only a system message"),
    (UNKNOWN_ROLE, "unknown role", UNKNOWN_ROLE_DETAIL),
    (json.dumps({"conversations": [{"from": "human", "value": "q"},
                                   {"from": "bot", "value": "a"}]}),
     "unknown role",
     "message 1 has from 'bot', expected one of system, human, user, gpt, assistant"),
    (json.dumps({"messages": [U, {"role": "assistant",
                                  "content": [{"type": "text", "text": "a"}]}]}),
     "non-string content", "message 1 (assistant) content is list"),
    (json.dumps({"messages": [{"role": "user", "content": None}, A]}), "non-string content",
     "message 0 (user) content is NoneType"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": " \n "}]}), "empty content",
     "message 1 (assistant) is empty"),
    (json.dumps({"messages": [U, {**A, "weight": 0.5}]}), "unknown format",
     'message 1 has weight 0.5, expected 0 or 1 (and no contrary "train")'),
    (json.dumps({"conversations": [{"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a", "weight": 0, "train": True}]}),
     "unknown format", 'message 1 has weight 0, expected 0 or 1 (and no contrary "train")'),
    (json.dumps({"messages": [U, {**A, "train": "false"}]}), "unknown format",
     "message 1 has train 'false', expected true or false"),
    (json.dumps({"messages": [U, {**A, "noisy": "false"}]}), "unknown format",
     "message 1 has noisy 'false', expected true or false"),
    (json.dumps({"messages": [U, {**A, "noisy": 1}]}), "unknown format",
     "message 1 has noisy 1, expected true or false"),
    (json.dumps({"messages": [U, {**A, "noise_type": 3}]}), "unknown format",
     "message 1 has noise_type 3, expected a string or null"),
    (json.dumps({"messages": [U, {**A, "reference": None}]}), "unknown format",
     "message 1 has reference None, expected a string"),
    (json.dumps({"messages": [U, {**A, "reasoning_content": ["x"]}]}), "unknown format",
     "message 1 has reasoning_content ['x'], expected a string or null"),
    (LONE_SURROGATE, "not utf-8", f"message 1 (assistant) {SURROGATE_DETAIL}"),
    (json.dumps({"id": "x\udc00", "messages": [U, A]}), "not utf-8",
     f"a field of the record {LOW_SURROGATE_DETAIL}"),
    (json.dumps({"messages": [U, U, A]}), "roles not alternating",
     f"message 1 is user, expected assistant {ALT}"),
    (json.dumps({"messages": [A, U]}), "roles not alternating",
     f"message 0 is assistant, expected user {ALT}"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, U, A,
                              {"role": "system", "content": "t"}, A]}),
     "roles not alternating", f"message 3 is system, expected user {ALT}"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, U]}), "no assistant turn",
     "conversation has no assistant message"),
    (NO_ASSISTANT, "no assistant turn", "conversation has no assistant message"),
]


@pytest.mark.parametrize("line,reason,detail", BAD_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_every_validation_reason_has_a_one_line_message(tmp_path, line, reason, detail):
    p = _write(tmp_path, [GOOD, line])
    with pytest.raises(BadSample) as e:
        load_conversations(p)
    assert str(e.value) == f"{p}:2: {reason}: {detail}"
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)
    assert e.value.reason in REASONS
    # skip mode keeps the good record and counts the reason
    rep = {}
    assert len(load_conversations(p, on_bad_sample="skip", report=rep)) == 1
    assert rep["reasons"] == {reason: 1}
    assert rep["bad"] == [str(e.value)]


def test_boolean_noise_labels_and_null_noise_type_are_kept(tmp_path):
    msgs = [U, {**A, "noisy": False, "noise_type": None, "reference": "a"},
            U, {**A, "noisy": True, "noise_type": "wrong", "reference": "b"}]
    p = _write(tmp_path, [json.dumps({"messages": msgs})])
    assert load_conversations(p)[0]["messages"] == msgs


def test_skip_reports_counts_per_reason(tmp_path, capsys):
    lines = [GOOD, "not json", GOOD, UNKNOWN_ROLE, UNKNOWN_ROLE, "", NO_ASSISTANT, GOOD]
    p = _write(tmp_path, lines)
    rep = {}
    convs = load_conversations(p, on_bad_sample="skip", report=rep)
    assert len(convs) == 3
    assert rep["records"] == 7  # the blank line is not a record
    assert rep["kept"] == 3
    assert rep["skipped"] == 4
    assert rep["reasons"] == {"invalid json": 1, "unknown role": 2, "no assistant turn": 1}
    assert [b.split(": ")[0] for b in rep["bad"]] == [f"{p}:2", f"{p}:4", f"{p}:5", f"{p}:7"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{p}: kept 3 of 7 records, skipped 4 (invalid json 1, no assistant turn 1, "
                   "unknown role 2)"]
    with pytest.raises(DataError, match="on_bad_sample must be"):
        load_conversations(p, on_bad_sample="ignore")


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    """JSONL records end at \\n only; json.dumps(ensure_ascii=False) leaves U+2028, U+2029,
    \\x85 and \\x0c raw inside strings, where str.splitlines() would break a record in two."""
    odd = "a\u2028b\u2029c\x85d\x0ce\x1cf\r\ng"
    recs = [{"messages": [user(odd), reply(odd)]}] * 2
    p = tmp_path / "odd.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert load_conversations(p) == recs


def test_formats_json_array_sharegpt_extra_fields_gz(tmp_path):
    recs = [
        {"id": 7, "source": "x", "messages": [
            {"role": "system", "content": "be brief"}, U,
            {"role": "assistant", "content": "a", "noisy": True, "noise_type": "wrong"}]},
        {"id": "s1", "conversations": [{"from": "system", "value": "sys"},
                                       {"from": "human", "value": "hey"},
                                       {"from": "gpt", "value": "yo", "weight": 0}]},
    ]
    sharegpt = [{"role": "system", "content": "sys"}, user("hey"),
                {"role": "assistant", "content": "yo", "weight": 0, "train": False}]
    want = [recs[0], {"messages": sharegpt, "id": "s1"}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    assert load_conversations(p) == want
    pj = _write(tmp_path, [json.dumps(r) for r in recs], "b.jsonl")
    assert load_conversations(pj) == want
    pg = tmp_path / "c.jsonl.gz"
    with gzip.open(pg, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    assert load_conversations(pg) == want
    pb = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark (Windows editors) is not a JSON error
    pb.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode())
    assert load_conversations(pb) == want
    odd = {"conversations": [{"from": "human", "value": "q", "role": "assistant"},
                             {"from": "gpt", "value": "a"}]}
    first = load_conversations(_write(tmp_path, [json.dumps(odd)]))[0]["messages"][0]
    assert first == user("q")
    # a bad record in a JSON array is named by its index; an unparseable array by its line
    p.write_text(json.dumps([recs[0], {"messages": []}]), encoding="utf-8")
    bad_index = f"{p}[1]: empty conversation: 'messages' is empty"
    with pytest.raises(BadSample, match=re.escape(bad_index)):
        load_conversations(p)
    p.write_text('[\n{"messages": []},\n{oops}\n]', encoding="utf-8")
    with pytest.raises(BadSample, match=re.escape(f"{p}:3: invalid json: ")):
        load_conversations(p)


# ------------------------------------------------------------------------------------------------
# public dialogues

def test_hh_rlhf_conversion_reports_malformed_rows(fixtures_dir):
    path = fixtures_dir / "dialogues" / "hh-rlhf-helpful-base" / "test.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    rep = {}
    convs = convert(path, "hh", report=rep)
    assert rep["records"] == 2354
    assert rep["kept"] == 2344
    assert len(convs) == 2344
    assert rep["reasons"] == {"roles not alternating": 9, "empty content": 1}
    bad_rows = sorted(int(b.split(": ")[0].rsplit(":", 1)[1]) - 1 for b in rep["bad"])
    assert bad_rows == [120, 355, 567, 991, 1132, 1166, 1307, 1355, 1683, 1847]
    assert f"{path}:121: empty content: message 3 (assistant) is empty" in rep["bad"]
    # row 0 by hand: one Human and one Assistant turn
    c0 = convs[0]
    assert c0["id"] == "hh-0"
    assert c0["source"] == "hh-rlhf"
    human, assistant = (m["content"] for m in c0["messages"])
    assert raw[0]["chosen"] == "\n\nHuman: " + human + "\n\nAssistant: " + assistant
    kept_turns = sum(m["role"] == "assistant" for c in convs for m in c["messages"])
    raw_turns = sum(r["chosen"].count("\n\nAssistant:") for i, r in enumerate(raw)
                    if i not in bad_rows)
    assert kept_turns == raw_turns
    with pytest.raises(BadSample, match=re.escape(f"{path}:121: empty content")):
        convert(path, "hh", on_bad_sample="error")


def test_mtbench101_conversion(fixtures_dir):
    path = fixtures_dir / "mt_bench_101" / "mtbench101.jsonl"
    raw = [json.loads(line) for line in open(path, encoding="utf-8")]
    rep = {}
    convs = convert(path, "mtbench101", report=rep)
    assert len(raw) == 1388
    assert len(convs) == 1388
    assert rep["skipped"] == 0
    for r, c in zip(raw, convs):
        assert c["id"] == r["id"]
        assert c["task"] == r["task"]
        assert c["source"] == "mt-bench-101"
        contents = [x for h in r["history"] for x in (h["user"], h["bot"])]
        assert [m["content"] for m in c["messages"]] == contents
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"] * len(r["history"])


def test_convert_cli(fixtures_dir, tmp_path):
    src = fixtures_dir / "dialogues" / "hh-rlhf-helpful-base" / "test.jsonl.gz"
    out = tmp_path / "hh.jsonl"
    r = subprocess.run([sys.executable, "scripts/convert.py", "--format", "hh", str(src), str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("kept 2344 of 2354 records, skipped 10 (empty content 1, roles not alternating 9)"
            in r.stderr)
    assert len(load_conversations(out)) == 2344


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    p = _write(tmp_path, [GOOD, UNKNOWN_ROLE])
    assert data.main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {p}:2: unknown role: {UNKNOWN_ROLE_DETAIL}\n"
    assert data.main(["check", str(p), "--on-bad-sample", "skip"]) == 0
    assert data.main(["check", str(tmp_path / "missing.jsonl")]) == 2
    # the skip report line and the missing-file line
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_cli_refuses_a_lone_surrogate_before_the_tokenizer(tmp_path, capsys, fixtures_dir):
    """A lone surrogate is valid JSON that no tokenizer takes: check --model names its record in one
    line, and under skip drops and counts it; the rest encodes."""
    model = str(fixtures_dir / "tokenizers" / "qwen2.5-instruct")
    p = _write(tmp_path, [GOOD, LONE_SURROGATE])
    assert data.main(["check", str(p), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {p}:2: not utf-8: message 1 (assistant) {SURROGATE_DETAIL}\n"
    assert data.main(["check", str(p), "--model", model, "--on-bad-sample", "skip"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"{p}: kept 1 of 2 records, skipped 1 (not utf-8 1)\n"
    assert "1 conversations -> 1 examples" in captured.out


# ------------------------------------------------------------------------------------------------
# chat templates vs transformers' apply_chat_template

def _conversations():
    S = {"role": "system", "content": "You are a terse assistant."}
    code = "Here:\n```python\ndef f(x):\n    return x * 2\n```\nDone."
    convs = [
        [user("Hi"), reply("Hello!")],
        [S, user("What is 2+2?"), reply("4")],
        [user("Ça va? 你好 🙂"), reply("Très bien, 谢谢! e\u0301 naïve 😀"), user("¿Y tú?"),
         reply("Bien.")],
        [user("Write code"), reply(code)],
        [S] + [m for i in range(6) for m in (user(f"step {i}?"), reply(f"answer {i}."))],
        [user("  padded question \n"), reply("  padded answer  \n\n")],
        [user("start with a newline"), reply("\nline one\nline two")],
        [{"role": "system", "content": "  spaced system  "}, user("x"), reply("y")],
        [{"role": "system", "content": ""}, user("empty system"), reply("ok")],
        [user("first"), reply("one"), user("second, unanswered")],
        [user("tabs\tand\ttabs\n\nand blank lines"), reply("- item 1\n- item 2\n\n1. a\n2. b")],
        [user('<b>bold</b> & "quotes" \'single\''), reply("{\"json\": [1, 2, {\"k\": null}]}")],
        [S, user("Numbers 1234567890 3.14159 -42"), reply("12345678901234567890")],
        [user("مرحبا بالعالم"), reply("नमस्ते दुनिया"), user("Привет"), reply("Здравствуйте")],
        [user("long " * 200), reply("word " * 150)],
        [user("windows\r\nline\r\nendings"), reply("ok\r\n")],
        [user("think first"), reply("<think>\nplan it\n</think>\n\nThe answer is 3."),
         user("again"), reply("Sure: 4.")],
        [S, user("a"), reply("b"), user("c"), reply("d"), user("e")],
        [user("Tab\tat end\t"), reply("trailing spaces   ")],
        [user("noise labels"),
         {"role": "assistant", "content": "17", "noisy": True, "noise_type": "wrong"}],
        [user("markdown"), reply("# Title\n\n**bold** _it_ `code`\n\n> quote"), user("more"),
         reply("| a | b |\n|---|---|\n| 1 | 2 |")],
        chat(5),
    ]
    rng = random.Random(0)
    words = ["alpha", "βeta", "γάμμα", "δ", "日本語", "テスト", "😀", "x=1;", "{}", "naïve", "\n", "  ",
             "end."]

    def text(prefix, suffix=""):
        return prefix + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + suffix

    for _ in range(4):
        n = rng.randint(1, 6)
        c = [S] if rng.random() < 0.5 else []
        for _ in range(n):
            c += [user(text("", "?")), reply(text("A "))]
        convs.append(c)
    return convs


CONVS = _conversations()


@pytest.fixture(scope="module", params=["qwen2.5", "llama3", "qwen3", "smollm2"])
def pair(request, fixtures_dir):
    from transformers import AutoTokenizer
    name = request.param
    if name == "smollm2":
        d = request.getfixturevalue("smollm2_dir")
    else:
        d = fixtures_dir / "tokenizers" / TOKENIZER_DIRS[name]
    return name, ChatTemplate.from_pretrained(d), AutoTokenizer.from_pretrained(str(d)), Path(d)


def _hf_ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _hf_kwargs(name):
    return LLAMA3_DATE if name == "llama3" else {}


def test_detect_and_special_ids(pair):
    name, tpl, hf, d = pair
    assert tpl.name == name
    assert data.detect_template(d) == name
    assert tpl.stop_ids[0] == hf.convert_tokens_to_ids(EOT[name])
    want_pad = hf.pad_token_id
    if want_pad is None:
        want_pad = hf.convert_tokens_to_ids(EOT[name])
    assert tpl.pad_id == want_pad
    gen = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    gen = gen if isinstance(gen, list) else [gen]
    assert set(tpl.stop_ids) == {tpl.stop_ids[0], *gen}


def test_render_and_ids_equal_transformers(pair):
    name, tpl, hf, _ = pair
    kw = _hf_kwargs(name)
    assert len(CONVS) >= 20
    for i, conv in enumerate(CONVS):
        for gen in (False, True):
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
            assert tpl.render(conv, add_generation_prompt=gen) == want, (name, i, gen)
        enc = tpl.encode(conv)
        assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["turn_ids"])
        want_ids = _hf_ids(hf.apply_chat_template(conv, tokenize=True, **kw))
        assert enc["input_ids"] == want_ids, (name, i)
        assert enc["input_ids"] == hf(tpl.render(conv), add_special_tokens=False)["input_ids"]
        if name == "llama3":
            assert enc["input_ids"][0] == hf.bos_token_id
            assert enc["input_ids"].count(hf.bos_token_id) == 1
            # the hf tokenizer alone would add a second BOS; ours never adds one
            assert hf(tpl.render(conv))["input_ids"][:2] == [hf.bos_token_id] * 2
            assert tpl.tokenizer.encode(tpl.render(conv)).ids == enc["input_ids"]
    if name == "llama3":
        conv = CONVS[1]
        want = hf.apply_chat_template(conv, tokenize=False, date_string="05 Feb 2025")
        assert tpl.render(conv, date_string="05 Feb 2025") == want
    if name == "qwen3":
        for conv in (CONVS[9], CONVS[17]):
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=False)
            assert tpl.render(conv, add_generation_prompt=True, enable_thinking=False) == want


def _expected_targets(name, conv):
    """Supervised text of each assistant turn, straight from the official templates' rules."""
    out = []
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        c = m["content"]
        if name == "llama3":
            c = c.strip()
        if name == "qwen3" and "</think>" in c:
            c = c.split("</think>")[-1].lstrip("\n")
        if name == "qwen3" and i == last == len(conv) - 1:
            c = c.lstrip("\n")
        out.append(c + EOT[name])
    return out


def _nfc(text):
    return unicodedata.normalize("NFC", text)


def test_labels_and_turn_ids_cover_exactly_the_assistant_replies(pair):
    name, tpl, hf, _ = pair
    for i, conv in enumerate(CONVS):
        enc = tpl.encode(conv)
        ids, labels, turns = enc["input_ids"], enc["labels"], enc["turn_ids"]
        assert all((label == -100) == (t == 0) for label, t in zip(labels, turns))
        assert all(label in (-100, x) for label, x in zip(labels, ids))
        targets = _expected_targets(name, conv)
        assert max(turns) == len(targets)
        for k, want in enumerate(targets, 1):
            pos = [p for p, t in enumerate(turns) if t == k]
            assert pos == list(range(pos[0], pos[-1] + 1)), (name, i, k)  # one contiguous run
            got = _nfc(hf.decode([ids[p] for p in pos], skip_special_tokens=False))
            extra = got[:len(got) - len(_nfc(want))]
            # a token straddling header and reply (a reply opening with whitespace) is supervised
            # as a whole
            assert got.endswith(_nfc(want)), (name, i, k, got, want)
            assert extra.strip() == "", (name, i, k, got, want)
            after = pos[-1] + 1
            if after < len(ids) and name != "llama3":
                assert hf.convert_ids_to_tokens(ids[after]) == "Ċ"
                assert labels[after] == -100


def test_openai_weight_zero_is_context_like_train_false(pair, tmp_path):
    """OpenAI's fine-tuning format marks an assistant message not to learn from with "weight": 0:
    it is rendered and tokenized exactly as "train": false (its reply unsupervised, turn numbers
    kept), "weight": 1 as plain."""
    name, tpl, _, _ = pair
    turns = [U, reply("first"), user("again"), reply("second")]
    weighted = [turns[0], dict(turns[1], weight=0), turns[2], dict(turns[3], weight=1)]
    p = _write(tmp_path, [json.dumps({"messages": weighted})])
    msgs = load_conversations(p)[0]["messages"]
    assert [m.get("train") for m in msgs] == [None, False, None, True]
    assert msgs[1]["weight"] == 0
    got = tpl.encode(msgs)
    want = tpl.encode([turns[0], {**turns[1], "train": False}, turns[2], turns[3]])
    assert got == want
    assert sorted(set(got["turn_ids"])) == [0, 2]
    assert tpl.encode(turns)["labels"] != got["labels"]  # without the weight, turn 1 is supervised


def test_hand_checked_masks(pair):
    name, tpl, hf, _ = pair
    conv = [user("What is 2+2?"), reply("4"), user("And 3+3?"), reply("6 is the answer.")]
    enc = tpl.encode(conv)
    toks = hf.convert_ids_to_tokens(enc["input_ids"])
    sup = [(t, k) for t, label, k in zip(toks, enc["labels"], enc["turn_ids"]) if label != -100]
    eot = EOT[name]
    assert sup == [("4", 1), (eot, 1), ("6", 2), ("Ġis", 2), ("Ġthe", 2), ("Ġanswer", 2), (".", 2),
                   (eot, 2)]
    first = enc["turn_ids"].index(1)
    if name == "llama3":
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    else:
        header = "<|im_start|>assistant\n"
    assert hf.decode(enc["input_ids"][:first], skip_special_tokens=False).endswith(header)
    # the header's newline is its own token
    assert toks[first - 1] == ("ĊĊ" if name == "llama3" else "Ċ")
    last = enc["turn_ids"].index(2)
    if name == "qwen3":  # the final turn's empty think block is context, like the generation prompt
        assert toks[last - 4:last] == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    assert data.turn_group(enc["turn_ids"], enc["labels"]) == 2
    assert data.turn_group(enc["turn_ids"], enc["labels"], max_turn_groups=1) == 1


def test_encode_prompt_is_the_generation_prefix(pair):
    name, tpl, hf, _ = pair
    kw = {"qwen3": {"enable_thinking": False}, "llama3": LLAMA3_DATE}.get(name, {})
    for conv in CONVS:
        last = conv[-1]["content"]
        if conv[-1]["role"] != "assistant" or last[:1].isspace() or "</think>" in last:
            continue
        prompt = tpl.encode_prompt(conv[:-1])
        hf_prompt = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True,
                                           **kw)
        assert prompt == _hf_ids(hf_prompt)
        enc = tpl.encode(conv)
        start = enc["turn_ids"].index(max(enc["turn_ids"]))
        assert enc["input_ids"][:start] == prompt  # what the model sees before the last reply


def test_stop_ids_of_real_checkpoints(fixtures_dir):
    """The end-of-turn token first, then generation_config's / config's eos_token_id and
    tokenizer_config's eos_token, without repeats."""
    tok_dir = fixtures_dir / "tokenizers"
    expect = {"llama-3.2-instruct": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
              "qwen2.5-instruct": ["<|im_end|>", "<|endoftext|>"],
              "qwen3": ["<|im_end|>", "<|endoftext|>"]}
    for name, tokens in expect.items():
        tpl = ChatTemplate.from_pretrained(tok_dir / name)
        assert tpl.stop_ids == [tpl.tokenizer.token_to_id(t) for t in tokens]
    llama = ChatTemplate.from_pretrained(tok_dir / "llama-3.2-instruct")
    assert llama.stop_ids == [128009, 128001, 128008]


def test_detection_fallback_and_forcing(fixtures_dir, tmp_path, capsys):
    q = fixtures_dir / "tokenizers" / "qwen2.5-instruct"
    forced = ChatTemplate.from_pretrained(q, name="chatml")
    assert forced.name == "chatml"
    want = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert forced.render([U, A]) == want
    assert ChatTemplate.from_pretrained(q, name="qwen3").name == "qwen3"
    with pytest.raises(DataError, match="unknown chat template 'gpt2'"):
        ChatTemplate.from_pretrained(q, name="gpt2")
    with pytest.raises(DataError, match="the tokenizer has no <\\|begin_of_text\\|> token"):
        ChatTemplate.from_pretrained(q, name="llama3")
    for src, mt, want in (("qwen2.5-instruct", "qwen2", "qwen2.5"), ("qwen3", "qwen3", "qwen3"),
                          ("llama-3.2-instruct", "llama", "llama3"),
                          ("qwen2.5-instruct", "llama", "chatml")):
        d = tmp_path / f"{src}-{mt}"
        d.mkdir()
        (d / "tokenizer.json").symlink_to(fixtures_dir / "tokenizers" / src / "tokenizer.json")
        (d / "config.json").write_text(json.dumps({"model_type": mt}))
        assert data.detect_template(d) == want
    # a chat template of its own (here Alpaca's form) is not silently replaced: stderr says what
    # is used instead
    d = tmp_path / "qwen2.5-instruct-llama"
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": alpaca}))
    assert data.detect_template(d) == "chatml"
    assert capsys.readouterr().err == (
        f"{d}: its chat template is none we know; rendering as chatml (chosen by model_type and "
        "vocabulary; --chat-template forces one)\n")
    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DataError, match="cannot detect the chat template"):
        data.detect_template(d)


# ------------------------------------------------------------------------------------------------
# examples and truncation

@pytest.fixture(scope="module")
def qwen(fixtures_dir):
    return ChatTemplate.from_pretrained(fixtures_dir / "tokenizers" / "qwen2.5-instruct")


def labelled(content, noisy=False):
    noise_type = "wrong" if noisy else None
    return {"role": "assistant", "content": content, "noisy": noisy, "noise_type": noise_type}


def test_truncation_at_turn_boundaries_is_counted(qwen, fixtures_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / "qwen2.5-instruct"))
    long = "word " * 300
    convs = [
        {"id": "A", "messages": [user("hi"), labelled("hello")]},
        {"id": "B", "messages": [user("a"), labelled("b"), user("c"), labelled(long, True),
                                 user("d"), labelled("e")]},
        {"id": "C", "messages": [user(long), labelled("x")]},
        {"id": "D", "messages": [user("q"), labelled(long)]},
        {"id": "E", "source": "s", "messages": [user("1"), labelled("2"), user("3"),
                                                labelled("4", True), user("5"), labelled("6")]},
    ]
    ex, rep = data.build_examples(convs, qwen, max_len=120, max_turn_groups=2)
    assert [e["meta"]["id"] for e in ex] == ["A", "B", "E"]
    counts = {k: rep[k] for k in ("conversations", "examples", "truncated", "dropped",
                                  "turns_kept", "turns_dropped")}
    assert counts == {"conversations": 5, "examples": 3, "truncated": 1, "dropped": 2,
                      "turns_kept": 5, "turns_dropped": 4}
    assert "2 dropped" in rep.summary()
    assert "1 truncated" in rep.summary()
    b = ex[1]
    kept = hf.apply_chat_template(convs[1]["messages"][:2], tokenize=True)
    assert b["input_ids"] == _hf_ids(kept)
    assert b["n_turns"] == 1
    assert b["group"] == 1
    assert b["meta"]["noisy"] == [False]
    assert b["conv_index"] == 1
    e = ex[2]
    assert e["n_turns"] == 3
    assert e["group"] == 2
    assert e["meta"] == {"id": "E", "source": "s", "noisy": [False, True, False],
                         "noise_type": [None, "wrong", None]}
    assert [x["index"] for x in ex] == [0, 1, 2]
    assert all(len(x["input_ids"]) <= 120 for x in ex)
    # exact fit keeps everything, one token less drops the last turn
    n = len(qwen.encode(convs[4]["messages"])["input_ids"])
    assert data.build_examples([convs[4]], qwen, n)[1]["truncated"] == 0
    ex2, rep2 = data.build_examples([convs[4]], qwen, n - 1)
    assert rep2["truncated"] == 1
    assert ex2[0]["n_turns"] == 2


def test_qwen3_truncation_rerenders_last_turn(fixtures_dir):
    from transformers import AutoTokenizer
    d = fixtures_dir / "tokenizers" / "qwen3"
    tpl = ChatTemplate.from_pretrained(d)
    hf = AutoTokenizer.from_pretrained(str(d))
    msgs = [U, A, user("more"), reply("x " * 200)]
    ex, rep = data.build_examples([{"messages": msgs}], tpl, max_len=60)
    assert rep["truncated"] == 1
    # with its think block
    assert ex[0]["input_ids"] == _hf_ids(hf.apply_chat_template(msgs[:2], tokenize=True))


def _oracle_cut(hf, conv, max_len, kw):
    """The search the official template implies: the most assistant turns k whose prefix, rendered
    and tokenized by transformers, fits in max_len -> (k, its ids); (0, None) if none fits."""
    ends = [i + 1 for i, m in enumerate(conv) if m["role"] == "assistant"]
    for k in range(len(ends), 0, -1):
        ids = _hf_ids(hf.apply_chat_template(conv[:ends[k - 1]], tokenize=True, **kw))
        if len(ids) <= max_len:
            return k, ids
    return 0, None


def test_truncation_equals_the_per_turn_search_with_the_official_template(pair):
    """At every prefix length, and one token short of it, build_examples keeps the most turns whose
    prefix fits, tokenized as transformers renders that prefix (Qwen3: with the last kept turn's
    think block)."""
    name, tpl, hf, _ = pair
    kw = _hf_kwargs(name)
    for i, conv in enumerate(CONVS):
        ends = [j + 1 for j, m in enumerate(conv) if m["role"] == "assistant"]
        lengths = [len(_hf_ids(hf.apply_chat_template(conv[:e], tokenize=True, **kw)))
                   for e in ends]
        for max_len in sorted({n + d for n in lengths for d in (-1, 0)}):
            k, want = _oracle_cut(hf, conv, max_len, kw)
            ex, rep = data.build_examples([{"messages": conv}], tpl, max_len)
            if k == 0:
                assert rep["dropped"] == 1, (name, i, max_len)
                continue
            assert ex[0]["n_turns"] == k, (name, i, max_len)
            assert ex[0]["input_ids"] == want, (name, i, max_len)
            kept = tpl.encode(conv[:ends[k - 1]])
            assert ex[0]["labels"] == kept["labels"], (name, i, max_len)
            assert ex[0]["turn_ids"] == kept["turn_ids"], (name, i, max_len)


@contextmanager
def deadline(seconds):
    """Fail the block once it runs longer than `seconds` (rather than waiting for it to end)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3"])
def test_a_dialogue_of_thousands_of_turns_prepares_in_linear_time(name, fixtures_dir):
    """Cutting a long dialogue to max_len costs about one tokenization of it, not one per dropped
    turn: 4,000 turns prepare in well under 5 seconds, cut where the official template says."""
    from transformers import AutoTokenizer
    d = fixtures_dir / "tokenizers" / TOKENIZER_DIRS[name]
    tpl = ChatTemplate.from_pretrained(d)
    hf = AutoTokenizer.from_pretrained(str(d))
    conv = chat(4000)
    start = time.perf_counter()
    with deadline(5.0):
        ex, rep = data.build_examples([{"messages": conv}], tpl, max_len=512)
    assert time.perf_counter() - start < 5.0
    k = ex[0]["n_turns"]
    assert rep["truncated"] == 1
    assert rep["turns_dropped"] == 4000 - k
    kw = _hf_kwargs(name)
    kept = _hf_ids(hf.apply_chat_template(conv[:2 * k], tokenize=True, **kw))
    one_more = _hf_ids(hf.apply_chat_template(conv[:2 * k + 2], tokenize=True, **kw))
    assert ex[0]["input_ids"] == kept
    assert len(one_more) > 512


def test_turn_starts_count_the_tokens_before_each_reply(pair):
    """turn_starts gives, for each assistant message, the tokens the official template renders for
    the messages before it."""
    name, tpl, hf, _ = pair
    kw = _hf_kwargs(name)
    for i, conv in enumerate(CONVS):
        starts = tpl.turn_starts(conv)
        ids = tpl.encode(conv)["input_ids"]
        replies = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
        assert len(starts) == len(replies)
        for start, j in zip(starts, replies):
            before = _hf_ids(hf.apply_chat_template(conv[:j], tokenize=True, **kw))
            assert start == len(before), (name, i, j)
            assert ids[:start] == before, (name, i, j)


def test_turn_group_hand_examples():
    t = [0, 1, 1, 0, 2, 2, 0, 3, 3]
    labels = [-100, 5, 6, -100, 7, 8, -100, 9, 9]
    assert data.turn_group(t, labels) == 3
    assert data.turn_group(t, labels, max_turn_groups=2) == 2
    assert data.turn_group(t, labels[:7] + [-100, -100]) == 2  # only supervised turns count
    assert data.turn_group(torch.tensor(t), torch.tensor(labels)) == 3
    assert data.turn_group([0, 0], [-100, -100]) == 0


def test_collate_right_pads():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "turn_ids": [0, 1, 1], "group": 1,
           "index": 4},
          {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, -100, 9],
           "turn_ids": [0, 0, 1, 0, 2], "group": 2, "index": 0}]
    b = data.collate(ex, pad_id=99)
    assert b["input_ids"].tolist() == [[5, 6, 7, 99, 99], [1, 2, 3, 4, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, -100, 9]]
    assert b["turn_ids"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["group"].tolist() == [1, 2]
    assert b["index"].tolist() == [4, 0]
    assert all(v.dtype == torch.long for v in b.values())


def test_collate_free_rows_are_the_replies_alone(qwen):
    """With free=True each supervised reply is also encoded after an empty user turn; collate pads
    those rows and names the (batch row, turn) of each."""
    convs = [{"messages": [user("a"), reply("b"), user("c"), {**reply("dd"), "train": False},
                           user("e"), reply("f f")]},
             {"messages": [user("x"), reply("y")]}]
    ex, _ = data.build_examples(convs, qwen, 1024, free=True)
    alone = [qwen.encode([user(""), reply(text)]) for text in ("b", "f f", "y")]
    assert [(k, ids) for k, ids, _ in ex[0]["free"]] == [(1, alone[0]["input_ids"]),
                                                       (3, alone[1]["input_ids"])]
    b = data.collate(ex, pad_id=0)
    assert b["free_unit"].tolist() == [[0, 1], [0, 3], [1, 1]]
    width = max(len(e["input_ids"]) for e in alone)
    for row, e in enumerate(alone):
        n = len(e["input_ids"])
        assert b["free_ids"][row].tolist() == e["input_ids"] + [0] * (width - n)
        assert b["free_labels"][row].tolist() == e["labels"] + [-100] * (width - n)
        assert b["free_mask"][row].tolist() == [1] * n + [0] * (width - n)


# ------------------------------------------------------------------------------------------------
# sampler

def _epoch(n, bs, seed=42, epoch=0, rank=0, world=1, lengths=None, drop_last=False):
    batches = data.epoch_batches(n, bs * world, seed, epoch, lengths, drop_last)
    return [data.rank_slice(b, rank, world) for b in batches]


def test_sampler_deterministic_and_covers_each_epoch():
    ea = _epoch(37, 4, seed=1)
    assert ea == _epoch(37, 4, seed=1)
    assert len(ea) == 10
    assert sorted(sum(ea, [])) == list(range(37))
    assert _epoch(37, 4, seed=2) != ea
    e1 = _epoch(37, 4, seed=1, epoch=1)
    assert e1 != ea
    assert sorted(sum(e1, [])) == list(range(37))
    dl = _epoch(37, 4, drop_last=True)
    assert len(dl) == 9
    assert all(len(x) == 4 for x in dl)


@pytest.mark.parametrize("n", [5, 23, 24, 200])
@pytest.mark.parametrize("world,bs", [(2, 1), (2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("grouped,drop_last", [(False, False), (True, False), (False, True),
                                               (True, True)])
def test_sampler_ranks_concatenate_to_single_process_batch(n, world, bs, grouped, drop_last):
    lengths = [random.Random(i).randint(1, 500) for i in range(n)] if grouped else None
    for epoch in (0, 3):
        want = _epoch(n, bs * world, 7, epoch, lengths=lengths, drop_last=drop_last)
        ranks = [_epoch(n, bs, 7, epoch, r, world, lengths, drop_last) for r in range(world)]
        assert all(len(x) == len(want) for x in ranks)
        for k, batch in enumerate(want):
            assert sum((x[k] for x in ranks), []) == batch
            sizes = [len(x[k]) for x in ranks]
            if len(batch) == bs * world:
                assert sizes == [bs] * world
            else:
                assert max(sizes) - min(sizes) <= 1


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_sampler_length_grouping_cuts_padding():
    lengths = [random.Random(i).randint(1, 1000) for i in range(2000)]
    grouped = _epoch(2000, 8, lengths=lengths)
    plain = _epoch(2000, 8)
    assert _padding(lengths, grouped) < 0.2 * _padding(lengths, plain)
    assert sorted(sum(grouped, [])) == list(range(2000))


def test_read_scores_lines_ids_and_one_line_errors(tmp_path):
    """--prefilter-scores: a number per line in conversation order, or {"id", "score"} lines matched
    by id; every refusal names the file (and the line, where one is at fault)."""
    convs = [{"id": "a"}, {"id": "b"}, {"id": 3}]
    f = tmp_path / "s.txt"
    f.write_text("1.5\n\n-2\n7e1\n")
    np.testing.assert_array_equal(read_scores(f, convs), [1.5, -2.0, 70.0])
    rows = ({"id": 3, "score": 0.5}, {"id": "a", "score": 1}, {"id": "b", "score": -1})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.testing.assert_array_equal(read_scores(f, convs), [1.0, -1.0, 0.5])
    for text, err in (("1\n\nthree\n4\n", f"{f}:3: not a number or a JSON object: 'three'"),
                      ("1\n2\n", f"{f}: 2 scores for 3 conversations"),
                      ("1\nNaN\n2\n", f"{f}: no finite numeric score for conversation 1 (id 'b')"),
                      ('{"id": "a", "score": 1}\n{"id": "a", "score": 2}\n',
                       f'{f}: id "a" has more than one score'),
                      ('{"id": "a", "score": 1}\n{"id": 3, "score": 2}\n',
                       f"{f}: no finite numeric score for conversation 1 (id 'b')")):
        f.write_text(text)
        with pytest.raises(DataError) as e:
            read_scores(f, convs)
        assert str(e.value) == err
