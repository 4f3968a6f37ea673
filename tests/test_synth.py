"""support/synth.py: the synthetic noisy benchmark, checked by an independent interpreter of the
user instructions."""
import hashlib
import json
import re

import pytest

import data
from data import ChatTemplate
from support import synth as S
from support.conversations import load_conversations

ITEM = r"([a-z]+)"
COUNTER_STEP = re.compile(r"(Add|Increase it by|Plus|Subtract|Decrease it by|Minus) (\d+)\.")
UP = ("Add", "Increase it by", "Plus")
LIST_ADD = re.compile(r"(?:Add|Also add|Put) " + ITEM + r"(?: on the list)?\.")
LIST_REMOVE = re.compile(r"(?:Remove|Take|Drop) " + ITEM + r"(?: off the list)?\.")
FILES = ["train_H.jsonl", "train_N.jsonl", "train_L.jsonl", "test.jsonl", "synth_meta.json"]


def _counter_step(value, msg):
    m = COUNTER_STEP.fullmatch(msg)
    sign = 1 if m.group(1) in UP else -1
    return value + sign * int(m.group(2))


def _list_step(items, msg):
    add = LIST_ADD.fullmatch(msg)
    remove = LIST_REMOVE.fullmatch(msg)
    assert bool(add) != bool(remove), msg
    if add:
        return items if add.group(1) in items else items + [add.group(1)]
    return [x for x in items if x != remove.group(1)]


def _interpret(users):
    """True answers from the user messages only (not from synth.py's generator)."""
    out = []
    if "counter" in users[0]:
        value = int(re.search(r"(?:Start at|counter at) (\d+)", users[0]).group(1))
        out.append(str(value))
        for msg in users[1:]:
            value = _counter_step(value, msg)
            out.append(str(value))
        return out
    items = [re.search(r"(?:Start with|list with) " + ITEM, users[0]).group(1)]
    out.append(", ".join(items))
    for msg in users[1:]:
        items = _list_step(items, msg)
        out.append(", ".join(items))
    return out


def _step(counter, shown, msg):
    """Apply one instruction to a shown state given as text (for replies that build on a wrong
    state)."""
    if counter:
        return str(_counter_step(int(shown), msg))
    items = [] if shown == "(empty)" else shown.split(", ")
    return ", ".join(_list_step(items, msg)) or "(empty)"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    meta = S.synth(d, seed=5, n_train=400, n_test=80)
    return d, meta


def test_synth_is_deterministic(synth_dir, tmp_path):
    d, meta = synth_dir
    again = S.synth(tmp_path / "a", seed=5, n_train=400, n_test=80)
    for f in FILES:
        assert (d / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f
    assert again == meta
    S.synth(tmp_path / "b", seed=6, n_train=400, n_test=80)
    assert (d / "train_N.jsonl").read_bytes() != (tmp_path / "b" / "train_N.jsonl").read_bytes()


def _users(record):
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def _replies(record):
    return [m for m in record["messages"] if m["role"] == "assistant"]


STATE_FORM = {True: r"\d+", False: r"[a-z]+(, [a-z]+)*"}  # counter, list


def _check_reply(m, k, n, shown, counter, off_topic_replies):
    """One labelled reply against the independent reading: returns the state later turns build
    on."""
    c = m["content"]
    t = m["noise_type"]
    if t in (None, "propagated"):
        assert c == shown
    elif t == "state_error":
        assert k < n - 1
        assert re.fullmatch(STATE_FORM[counter], c)
        return c
    elif t == "wrong":
        assert c != shown
        assert re.fullmatch(STATE_FORM[counter], c)
    elif t == "truncated":
        assert shown.startswith(c)
        assert len(c) < len(shown)
        assert c[-1].isalnum()
        assert shown[len(c)].isalnum()
    elif t == "off_topic":
        assert c in off_topic_replies
    else:
        raise AssertionError(t)
    return shown


def test_synth_noise_labels_match_the_corruptions(synth_dir):
    d, meta = synth_dir
    tiers = {t: load_conversations(d / f"train_{t}.jsonl") for t in "HNL"}
    test = load_conversations(d / "test.jsonl")
    refs = {r["task"]: set() for r in tiers["H"]}
    for r in tiers["H"]:
        refs[r["task"]] |= {m["content"] for m in _replies(r)}
    kinds = {}
    for tier, recs in tiers.items():
        # the same dialogues in every tier
        assert [_users(r) for r in recs] == [_users(r) for r in tiers["H"]]
        for r in recs:
            users = _users(r)
            replies = _replies(r)
            truth = _interpret(users)
            counter = r["task"] == "counter"
            assert 2 <= len(users) <= 5
            assert len(replies) == len(users)
            shown = None
            state_error_seen = False
            for k, (msg, m, true) in enumerate(zip(users, replies, truth)):
                shown = true if k == 0 else _step(counter, shown, msg)
                assert m["reference"] == true
                assert m["noisy"] == (m["content"] != true)
                assert (m["noise_type"] is None) == (not m["noisy"])
                kinds[m["noise_type"]] = kinds.get(m["noise_type"], 0) + 1
                if m["noise_type"] == "propagated":
                    assert state_error_seen
                other_task = refs["list" if counter else "counter"]
                shown_next = _check_reply(m, k, len(users), shown, counter, other_task)
                state_error_seen |= m["noise_type"] == "state_error"
                shown = shown_next
        if tier == "H":
            assert all(not m.get("noisy", False) for r in recs for m in r["messages"])
    assert {"wrong", "off_topic", "truncated", "state_error", "propagated", None} <= set(kinds)
    for r in test:
        assert [m["content"] for m in _replies(r)] == _interpret(_users(r))
        assert all(m["noisy"] is False for m in _replies(r))
    train_users = {tuple(_users(r)) for r in tiers["H"]}
    assert not train_users & {tuple(_users(r)) for r in test}
    # realized noise: the tiers' stated fractions
    st = meta["tiers"]
    assert st["H"]["noisy_fraction"] == 0
    assert 0.15 < st["N"]["noisy_fraction"] < 0.35
    assert 0.35 < st["L"]["noisy_fraction"] < 0.65
    noisy = sum(m["noisy"] for r in tiers["N"] for m in _replies(r))
    assert st["N"]["noisy_turns"] == noisy


def test_synth_default_mix_is_unchanged(tmp_path):
    """The default mix (echo is opt-in) writes exactly these bytes: their sha256 is pinned."""
    for kw, want in ((dict(seed=5, n_train=400, n_test=80),
                      "bf4415314aca70e96618344201e27a475836e936876783a40b53545330e320af"),
                     (dict(seed=1, n_train=60, n_test=10, profile="flat", min_turns=1, max_turns=6),
                      "f562116b50f1c19ce46e788f5b7ef3faacbc061f41213b2d301421a8df0948b9")):
        S.synth(tmp_path, **kw)
        files = b"".join((tmp_path / f).read_bytes() for f in FILES)
        assert hashlib.sha256(files).hexdigest() == want


def test_synth_echo(tmp_path):
    kinds = dict(S.SYNTH_KINDS, echo=0.5)
    meta = S.synth(tmp_path / "a", seed=3, n_train=200, n_test=10, kinds=kinds)
    S.synth(tmp_path / "b", seed=3, n_train=200, n_test=10, kinds=kinds)
    for f in ("train_N.jsonl", "train_L.jsonl", "synth_meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    n_echo = 0
    for tier in "HNL":
        for r in load_conversations(tmp_path / "a" / f"train_{tier}.jsonl"):
            users = _users(r)
            replies = _replies(r)
            # echo leaves the truth alone
            assert [m["reference"] for m in replies] == _interpret(users)
            for u, m in zip(users, replies):
                if m["noise_type"] == "echo":
                    n_echo += 1
                    assert m["noisy"]
                    assert m["content"] in (u, u.lower(), u.rstrip("."))
                    assert m["content"] != m["reference"]
    by_kind = [meta["tiers"][t]["by_kind"]["echo"] for t in "NL"]
    assert n_echo == sum(by_kind)
    assert n_echo > 20
    assert S.main(["--out", str(tmp_path / "c"), "--n-train", "20", "--n-test", "2",
                   "--kinds", "echo=1"]) == 0
    meta_c = json.loads((tmp_path / "c" / "synth_meta.json").read_text())
    assert set(meta_c["tiers"]["L"]["by_kind"]) <= {"echo", "propagated"}
    # NAME=WEIGHT, one line, exit 2
    assert S.main(["--out", str(tmp_path / "d"), "--kinds", "echo"]) == 2
    assert S.main(["--out", str(tmp_path / "d"), "--kinds", "parrot=1"]) == 2


def test_synth_turn_profiles(tmp_path):
    common = dict(seed=1, n_train=600, n_test=10, rates={"N": 0.3}, kinds={"wrong": 1.0},
                  min_turns=4, max_turns=4)
    late = S.synth(tmp_path / "late", profile="late", **common)
    early = S.synth(tmp_path / "early", profile="early", **common)
    late = late["tiers"]["N"]["noisy_fraction_by_turn"]
    early = early["tiers"]["N"]["noisy_fraction_by_turn"]
    # expected per-turn rates 0.3 * 2k/(n+1) = 0.12, 0.24, 0.36, 0.48 (late) and reversed (early)
    for k, p in zip((1, 2, 3, 4), (0.12, 0.24, 0.36, 0.48)):
        assert abs(late[k] - p) < 0.06, k
        assert abs(early[5 - k] - p) < 0.06, k


def test_synth_dialogues_are_short_for_smollm2(synth_dir, smollm2_dir):
    d, _ = synth_dir
    tpl = ChatTemplate.from_pretrained(smollm2_dir)
    test = load_conversations(d / "test.jsonl")
    ex, rep = data.build_examples(test, tpl, max_len=200)
    assert rep["dropped"] == 0
    assert rep["truncated"] == 0
    assert max(len(e["input_ids"]) for e in ex) < 200
    for r in test:
        for m in _replies(r):
            assert len(tpl.tokenizer.encode(m["content"], add_special_tokens=False).ids) <= 12


def test_synth_cli(tmp_path, capsys):
    assert S.main(["--out", str(tmp_path), "--n-train", "30", "--n-test", "5",
                   "--rate-L", "0.9"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert json.loads((tmp_path / "synth_meta.json").read_text())["rates"]["L"] == 0.9
    assert "train_L.jsonl: 30 dialogues" in capsys.readouterr().out
    # a bad size: one line, exit 2
    assert S.main(["--out", str(tmp_path / "x"), "--n-train", "-3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("synth: error: ")
    assert "got n_train=-3," in err
