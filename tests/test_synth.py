"""support/synth.py: the synthetic noisy benchmark, checked by an independent interpreter of the user instructions."""
import json
import re

import pytest

import data
from data import ChatTemplate
from support import synth as S


ITEM_RE = r"([a-z]+)"


def _interpret(users):
    """True answers from the user messages only (not from data.py's generator)."""
    counter = "counter" in users[0]
    out, state = [], None
    for i, msg in enumerate(users):
        if counter:
            if i == 0:
                state = int(re.search(r"(?:Start at|counter at) (\d+)", msg).group(1))
            else:
                m = re.fullmatch(r"(Add|Increase it by|Plus|Subtract|Decrease it by|Minus) (\d+)\.", msg)
                state = state + int(m.group(2)) * (1 if m.group(1) in ("Add", "Increase it by", "Plus") else -1)
            out.append(str(state))
        else:
            if i == 0:
                state = [re.search(r"(?:Start with|list with) " + ITEM_RE, msg).group(1)]
            else:
                add = re.fullmatch(r"(?:Add|Also add|Put) " + ITEM_RE + r"(?: on the list)?\.", msg)
                rem = re.fullmatch(r"(?:Remove|Take|Drop) " + ITEM_RE + r"(?: off the list)?\.", msg)
                assert bool(add) != bool(rem), msg
                state = state + [add.group(1)] if add and add.group(1) not in state else \
                    [x for x in state if x != rem.group(1)] if rem else state
            out.append(", ".join(state))
    return out


def _step(counter, shown, msg):
    """Apply one instruction to a shown state given as text (for replies that build on a wrong state)."""
    if counter:
        m = re.fullmatch(r"(Add|Increase it by|Plus|Subtract|Decrease it by|Minus) (\d+)\.", msg)
        return str(int(shown) + int(m.group(2)) * (1 if m.group(1) in ("Add", "Increase it by", "Plus") else -1))
    items = [] if shown == "(empty)" else shown.split(", ")
    add = re.fullmatch(r"(?:Add|Also add|Put) " + ITEM_RE + r"(?: on the list)?\.", msg)
    if add:
        items = items if add.group(1) in items else items + [add.group(1)]
    else:
        items = [x for x in items if x != re.fullmatch(r"(?:Remove|Take|Drop) " + ITEM_RE + r"(?: off the list)?\.",
                                                       msg).group(1)]
    return ", ".join(items) or "(empty)"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    meta = S.synth(d, seed=5, n_train=400, n_test=80)
    return d, meta


def test_synth_is_deterministic(synth_dir, tmp_path):
    d, meta = synth_dir
    again = S.synth(tmp_path / "a", seed=5, n_train=400, n_test=80)
    names = ["train_H.jsonl", "train_N.jsonl", "train_L.jsonl", "test.jsonl", "synth_meta.json"]
    assert all((d / f).read_bytes() == (tmp_path / "a" / f).read_bytes() for f in names) and again == meta
    S.synth(tmp_path / "b", seed=6, n_train=400, n_test=80)
    assert (d / "train_N.jsonl").read_bytes() != (tmp_path / "b" / "train_N.jsonl").read_bytes()


def test_synth_noise_labels_match_the_corruptions(synth_dir):
    d, meta = synth_dir
    tiers = {t: data.load_conversations(d / f"train_{t}.jsonl") for t in "HNL"}
    test = data.load_conversations(d / "test.jsonl")
    refs = {r["task"]: set() for r in tiers["H"]}
    for r in tiers["H"]:
        refs[r["task"]] |= {m["content"] for m in r["messages"] if m["role"] == "assistant"}
    kinds = {}
    for tier, recs in tiers.items():
        assert [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in recs] == \
            [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in tiers["H"]]  # same dialogues
        for r in recs:
            users = [m["content"] for m in r["messages"] if m["role"] == "user"]
            replies = [m for m in r["messages"] if m["role"] == "assistant"]
            truth, counter = _interpret(users), r["task"] == "counter"
            assert 2 <= len(users) <= 5 and len(replies) == len(users)
            shown, state_error_seen = None, False
            for k, (msg, m, true) in enumerate(zip(users, replies, truth)):
                shown = true if k == 0 else _step(counter, shown, msg)
                c, t = m["content"], m["noise_type"]
                assert m["reference"] == true and m["noisy"] == (c != true) and (t is None) == (not m["noisy"])
                kinds[t] = kinds.get(t, 0) + 1
                if t in (None, "propagated"):
                    assert c == shown
                    assert t is None or state_error_seen
                elif t == "state_error":
                    assert k < len(users) - 1
                    shown, state_error_seen = c, True
                    assert re.fullmatch(r"\d+", c) if counter else re.fullmatch(r"[a-z]+(, [a-z]+)*", c)
                elif t == "wrong":
                    assert c != shown
                    assert re.fullmatch(r"\d+", c) if counter else re.fullmatch(r"[a-z]+(, [a-z]+)*", c)
                elif t == "truncated":
                    assert shown.startswith(c) and len(c) < len(shown) and c[-1].isalnum() and shown[len(c)].isalnum()
                elif t == "off_topic":
                    assert c in refs["list" if counter else "counter"]
                else:
                    raise AssertionError(t)
        if tier == "H":
            assert all(not m.get("noisy", False) for r in recs for m in r["messages"])
    assert {"wrong", "off_topic", "truncated", "state_error", "propagated", None} <= set(kinds)
    for r in test:
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert [m["content"] for m in r["messages"] if m["role"] == "assistant"] == _interpret(users)
        assert all(m["noisy"] is False for m in r["messages"] if m["role"] == "assistant")
    train_users = {tuple(m["content"] for m in r["messages"] if m["role"] == "user") for r in tiers["H"]}
    assert not train_users & {tuple(m["content"] for m in r["messages"] if m["role"] == "user") for r in test}
    # realized noise: the tiers' stated fractions
    st = meta["tiers"]
    assert st["H"]["noisy_fraction"] == 0 and 0.15 < st["N"]["noisy_fraction"] < 0.35 < st["L"]["noisy_fraction"] < 0.65
    noisy = sum(m["noisy"] for r in tiers["N"] for m in r["messages"] if m["role"] == "assistant")
    assert st["N"]["noisy_turns"] == noisy


def test_synth_default_mix_is_unchanged(tmp_path):
    """The opt-in echo kind leaves the default files byte for byte as they were (sha256 pinned before it existed)."""
    import hashlib
    names = ["train_H.jsonl", "train_N.jsonl", "train_L.jsonl", "test.jsonl", "synth_meta.json"]
    for kw, want in ((dict(seed=5, n_train=400, n_test=80),
                      "bf4415314aca70e96618344201e27a475836e936876783a40b53545330e320af"),
                     (dict(seed=1, n_train=60, n_test=10, profile="flat", min_turns=1, max_turns=6),
                      "f562116b50f1c19ce46e788f5b7ef3faacbc061f41213b2d301421a8df0948b9")):
        S.synth(tmp_path, **kw)
        assert hashlib.sha256(b"".join((tmp_path / f).read_bytes() for f in names)).hexdigest() == want


def test_synth_echo(tmp_path):
    kinds = dict(S.SYNTH_KINDS, echo=0.5)
    meta = S.synth(tmp_path / "a", seed=3, n_train=200, n_test=10, kinds=kinds)
    S.synth(tmp_path / "b", seed=3, n_train=200, n_test=10, kinds=kinds)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in ("train_N.jsonl", "train_L.jsonl", "synth_meta.json"))
    n_echo = 0
    for tier in "HNL":
        for r in data.load_conversations(tmp_path / "a" / f"train_{tier}.jsonl"):
            users = [m["content"] for m in r["messages"] if m["role"] == "user"]
            replies = [m for m in r["messages"] if m["role"] == "assistant"]
            assert [m["reference"] for m in replies] == _interpret(users)  # echo leaves the truth alone
            for u, m in zip(users, replies):
                if m["noise_type"] == "echo":
                    n_echo += 1
                    assert m["noisy"] and m["content"] in (u, u.lower(), u.rstrip("."))
                    assert m["content"] != m["reference"]
    assert n_echo == meta["tiers"]["N"]["by_kind"]["echo"] + meta["tiers"]["L"]["by_kind"]["echo"] > 20
    assert S.main(["--out", str(tmp_path / "c"), "--n-train", "20", "--n-test", "2", "--kinds", "echo=1"]) == 0
    assert set(json.loads((tmp_path / "c" / "synth_meta.json").read_text())["tiers"]["L"]["by_kind"]) <= \
        {"echo", "propagated"}
    assert S.main(["--out", str(tmp_path / "d"), "--kinds", "echo"]) == 2    # NAME=WEIGHT, one line, exit 2
    assert S.main(["--out", str(tmp_path / "d"), "--kinds", "parrot=1"]) == 2


def test_synth_turn_profiles(tmp_path):
    late = S.synth(tmp_path / "late", seed=1, n_train=600, n_test=10, rates={"N": 0.3}, profile="late",
                      kinds={"wrong": 1.0}, min_turns=4, max_turns=4)["tiers"]["N"]["noisy_fraction_by_turn"]
    early = S.synth(tmp_path / "early", seed=1, n_train=600, n_test=10, rates={"N": 0.3}, profile="early",
                       kinds={"wrong": 1.0}, min_turns=4, max_turns=4)["tiers"]["N"]["noisy_fraction_by_turn"]
    # expected per-turn rates 0.3 * 2k/(n+1) = 0.12, 0.24, 0.36, 0.48 (late) and reversed (early)
    for k, p in zip((1, 2, 3, 4), (0.12, 0.24, 0.36, 0.48)):
        assert abs(late[k] - p) < 0.06 and abs(early[5 - k] - p) < 0.06


def test_synth_dialogues_are_short_for_smollm2(synth_dir, smollm2_dir):
    d, _ = synth_dir
    tpl = ChatTemplate.from_pretrained(smollm2_dir)
    ex, rep = data.build_examples(data.load_conversations(d / "test.jsonl"), tpl, max_len=200)
    assert rep["dropped"] == rep["truncated"] == 0 and max(len(e["input_ids"]) for e in ex) < 200
    assert all(len(tpl.tokenizer.encode(m["content"], add_special_tokens=False).ids) <= 12
               for r in data.load_conversations(d / "test.jsonl") for m in r["messages"] if m["role"] == "assistant")


def test_synth_cli(tmp_path, capsys):
    assert data.main(["synth", "--out", str(tmp_path), "--n-train", "30", "--n-test", "5", "--rate-L", "0.9"]) == 0
    assert S.main(["--out", str(tmp_path / "x"), "--n-train", "-3"]) == 2  # a bad size: one line, exit 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_meta.json", "test.jsonl", "train_H.jsonl",
                                                          "train_L.jsonl", "train_N.jsonl"]
    assert json.loads((tmp_path / "synth_meta.json").read_text())["rates"]["L"] == 0.9
    assert "train_L.jsonl: 30 dialogues" in capsys.readouterr().out
