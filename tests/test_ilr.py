"""ILR (baselines/ilr.py) and the comparators (baselines/feedback.py): both-order averaging and the alpha cap on a
stub comparator, sim:P's realized accuracy, the oracle's no-damage property, and the CLI end to end on a tiny
random llama."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from baselines import label_accuracy, label_positions
from baselines.feedback import Feedback, Format, Oracle, Simulated, form_ok, make, realized_accuracy
from baselines.ilr import halves, main as ilr_main, refine
from support.conversations import load_conversations
from eval import answer_matches, load
from conftest import tiny_setup
from support.synth import synth

ROOT = Path(__file__).resolve().parents[1]


def dialogue(i, labels, refs=None):
    """A conversation with one user/assistant exchange per label (references optional)."""
    msgs = []
    for k, lab in enumerate(labels):
        msgs += [{"role": "user", "content": f"question {i}.{k}"},
                 {"role": "assistant", "content": lab, **({"reference": refs[k], "noisy": lab != refs[k],
                                                           "noise_type": None} if refs else {})}]
    return {"id": f"d{i}", "messages": msgs}


class Biased:
    """A stub judge with a position bias: p(A better) = 0.7 + 0.15 (q(A) - q(B)); both orders average to
    0.5 + 0.15 (q(a) - q(b)). Every single query prefers whatever is shown first unless q differs by 4/3."""
    needs_reference = False
    name = "stub"

    def __init__(self, q):
        self.q, self.calls = q, []

    def __call__(self, context, a, b, turn):
        self.calls.append((a, b))
        return 0.7 + 0.15 * (self.q.get(a, 0.0) - self.q.get(b, 0.0))


def test_both_order_averaging_and_alpha_cap():
    # 10 dialogues x 2 labels = 20 labels: cap = floor(0.15 * 20) = 3
    convs = [dialogue(i, [f"L{i}a", f"L{i}b"]) for i in range(10)]
    q = {f"L{i}{s}": 0.0 for i in range(10) for s in "ab"}
    props, better = {}, {}
    for i in range(10):
        props[(i, 1)] = f"P{i}a"
        q[f"P{i}a"] = (i - 4) / 5.0          # i = 0..3 worse, 4 equal, 5..9 better (by (i - 4) / 5)
        better[(i, 1)] = 0.5 + 0.15 * q[f"P{i}a"]
    props[(0, 3)] = "L0b"                      # identical to its label: not compared
    props[(1, 3)] = "  "                       # empty: no proposal
    fb = Feedback(Biased(q))
    before = json.dumps(convs)
    out, records, counts = refine(convs, props, fb, 0.15, round_k=1)
    assert json.dumps(convs) == before        # the input is not modified
    assert counts == {"labels": 20, "proposed": 11, "differing": 10, "compared": 10, "candidates": 5, "cap": 3,
                      "replaced": 3}
    assert fb.queries == 20
    assert len(fb.comparator.calls) == 20
    assert {r["proposal"]: r["p"] for r in records} == pytest.approx({f"P{i}a": better[(i, 1)] for i in range(10)})
    # every single first-order query preferred the proposal (bias), yet only p > 0.5 after averaging qualifies,
    # and of the five the three most confident are taken
    assert all(fb.comparator.q[a] - fb.comparator.q[b] > -4 / 3 for a, b in fb.comparator.calls)
    assert sorted(r["proposal"] for r in records if r["replaced"]) == ["P7a", "P8a", "P9a"]
    for i in range(10):
        m = out[i]["messages"][1]
        if i in (7, 8, 9):
            assert m["content"] == f"P{i}a"
            assert m["original"] == {"content": f"L{i}a"}
            assert m["replaced_round"] == 1
        else:
            assert m == convs[i]["messages"][1]
        assert out[i]["messages"][3] == convs[i]["messages"][3]

    # a second round keeps the first original beside the label
    out2, _, c2 = refine(out, {(7, 1): "Z"}, Feedback(Biased({"Z": 1.0})), 0.15, round_k=2)
    assert c2["replaced"] == 1
    assert out2[7]["messages"][1]["original"] == {"content": "L7a"}
    assert out2[7]["messages"][1]["replaced_round"] == 2

    # fewer candidates than the cap: all of them; a cap of 0: none
    _, _, c3 = refine(convs, {(5, 1): "P5a"}, Feedback(Biased(q)), 0.15, round_k=1)
    assert c3["replaced"] == 1
    _, _, c4 = refine(convs, props, Feedback(Biased(q)), 0.0, round_k=1)
    assert c4["cap"] == 0
    assert c4["replaced"] == 0


def test_naive_replaces_cap_at_random_without_queries():
    convs = [dialogue(i, [f"L{i}"]) for i in range(40)]
    props = {(i, 1): f"P{i}" for i in range(40)}
    out, records, counts = refine(convs, props, None, 0.15, 1, np.random.default_rng(0))
    assert counts["replaced"] == 6
    assert counts["compared"] == 0
    assert all(r["p"] is None for r in records)
    picked = sorted(i for i in range(40) if out[i]["messages"][1]["content"] == f"P{i}")
    assert len(picked) == 6
    assert picked != list(range(6))
    _, _, again = refine(convs, props, None, 0.15, 1, np.random.default_rng(0))
    assert again == counts


def noisy_benchmark(tmp_path, n=40):
    synth(tmp_path, seed=5, n_train=n, n_test=1)
    return load_conversations(tmp_path / "train_L.jsonl")


def test_oracle_never_damages_and_counts_agree_with_a_recount(tmp_path):
    """Random proposals (right, the current label's neighbours, off-form) under the oracle: every replacement is a
    fix, as many as the cap allows; sim:0.8 on the same proposals: its decisions realize about 0.8."""
    convs = noisy_benchmark(tmp_path)
    rng = random.Random(1)
    targets = label_positions(convs)
    props = {}
    for ci, mi in targets:
        ref = convs[ci]["messages"][mi]["reference"]
        props[(ci, mi)] = rng.choice([ref, ref + " x", "banana", convs[ci]["messages"][mi]["content"]])
    from baselines.ilr import label_changes
    out, records, counts = refine(convs, props, Feedback(Oracle()), 0.15, 1)
    ev = label_changes(convs, out, records, props)
    fixable = sum(answer_matches(props[t], convs[t[0]]["messages"][t[1]]["reference"]) and not answer_matches(
        convs[t[0]]["messages"][t[1]]["content"], convs[t[0]]["messages"][t[1]]["reference"]) for t in targets)
    assert ev["damaged"] == 0
    assert ev["changed"] == 0
    assert ev["fixed"] == counts["replaced"] == min(counts["cap"], fixable) > 0

    def hand(cs):  # the labels' accuracy, counted here
        return np.mean([answer_matches(cs[ci]["messages"][mi]["content"], cs[ci]["messages"][mi]["reference"])
                        for ci, mi in targets])
    assert ev["label_accuracy_before"] == pytest.approx(hand(convs))
    assert ev["label_accuracy_after"] == pytest.approx(hand(convs) + ev["fixed"] / len(targets))
    assert ev["comparator"]["accuracy"] == 1.0
    assert ev["comparator"]["wrong"] == 0


@pytest.mark.parametrize("p", [0.65, 0.8])
def test_sim_realizes_p_within_binomial_error(p):
    n, sim = 4000, Simulated(p, seed=7)
    fb, decisions, scores = Feedback(sim), [], set()
    for i in range(n):
        ref = str(10 + i % 50)
        ctx = [{"role": "user", "content": f"Keep a counter and reply with its value only. Start at {ref}. #{i}"}]
        turn = {"role": "assistant", "content": ref, "reference": ref}
        wrong = str(int(ref) + 1 + i % 7)
        a, b = (ref, wrong) if i % 2 else (wrong, ref)
        assert sim(ctx, a, b, turn) + sim(ctx, b, a, turn) == pytest.approx(1.0)  # one judgment per pair
        pr = fb.compare(ctx, a, b, turn)
        assert pr == pytest.approx(sim(ctx, a, b, turn), abs=1e-12)
        assert pr != 0.5
        decisions.append((turn, a, b, pr))
        scores.add(round(pr, 9))
    acc = realized_accuracy(decisions)
    assert acc["informative"] == n
    assert acc["tie"] == 0
    assert abs(acc["accuracy"] - p) <= 4 * math.sqrt(p * (1 - p) / n), acc
    assert len(scores) > n * 0.9                 # continuous: a quantile of p is meaningful
    # nothing to tell apart: both right or both wrong is no preference
    turn = {"reference": "5"}
    assert sim([], "5", "5.", turn) == 0.5
    assert sim([], "6", "7", turn) == 0.5
    assert fb.queries == 2 * n


def test_format_checks_form_only():
    counter = [{"role": "user", "content": "Keep a counter and reply with its value only. Start at 23."}]
    shop = [{"role": "user", "content": "Keep a shopping list and reply with the whole list only. Start with milk."},
            {"role": "assistant", "content": "milk"}, {"role": "user", "content": "Also add tea."}]
    assert form_ok(counter, "24")
    assert not form_ok(counter, "milk")
    assert not form_ok(counter, "2 4")
    assert form_ok(shop, "milk, tea")
    assert form_ok(shop, "tea")
    assert not form_ok(shop, "milk, te")
    assert not form_ok(shop, "27")
    assert not form_ok(shop, "milk, milk")
    assert form_ok(shop, "(empty)")
    assert form_ok([{"role": "user", "content": "hi"}], "hello")
    assert not form_ok([], "")
    f = Format()
    assert f(counter, "99", "tea", {}) == 1.0
    assert f(counter, "tea", "99", {}) == 0.0
    assert f(counter, "1", "2", {}) == 0.5


def test_make_and_reference_checks(tmp_path):
    assert make("oracle").name == "oracle"
    assert make("sim:0.65").p == 0.65
    assert make("format").name == "format"
    for bad in ("bogus", "sim:", "sim:x", "sim:1.5", "sim:nan", "local:/nonexistent", "http:"):
        with pytest.raises(ValueError, match="--feedback"):
            make(bad)
    convs = [dialogue(0, ["a"])]  # no reference
    from baselines.feedback import check_references
    with pytest.raises(ValueError, match="needs a 'reference'"):
        check_references(convs, label_positions(convs), Feedback(Oracle()), "x.jsonl")
    check_references(convs, label_positions(convs), Feedback(Format()), "x.jsonl")  # needs none
    assert label_accuracy(convs) is None


def test_halves_partition_by_dialogue():
    a, b = halves(9, 3, 1)
    assert sorted(a + b) == list(range(9))
    assert len(a) == 5
    assert a != halves(9, 3, 2)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return tiny_setup(tmp_path_factory.mktemp("ilr"), smollm2_dir, n_train=16, n_test=2, max_turns=3)


TRAIN = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--max-len", "128", "--lora-r", "4",
         "--lora-alpha", "8", "--lr", "3e-3", "--max-new-tokens", "4"]


def cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "baselines/ilr.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_naive(tiny, capsys):
    """Two naive rounds (every tiny-model proposal differs, so each round replaces exactly the cap): the files, the
    counts and the label accuracy against a recount, the compute, the adapter; a rerun reuses every training."""
    out, data = tiny / "naive", tiny / "data" / "train_L.jsonl"
    p = cli("--model", tiny / "tiny", "--data", data, "--out", out, "--rounds", 2, "--naive", "--round-models",
            "last", *TRAIN)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    convs = load_conversations(data)
    n = len(label_positions(convs))
    cap = math.floor(0.15 * n)
    acc = [label_accuracy(convs)]
    for k in (1, 2):
        row, refined = rep["per_round"][k], load_conversations(out / f"round-{k}" / "train.jsonl")
        moved = [m for c in refined for m in c["messages"] if m.get("replaced_round") == k]
        assert row["replaced"] == cap == len(moved)
        assert row["compared"] == 0
        assert all("original" in m for m in moved)
        assert all("noisy" not in m for m in moved)
        recs = [json.loads(x) for x in (out / f"round-{k}" / "proposals.jsonl").read_text().splitlines()]
        assert len(recs) == row["differing"]
        assert sum(r["replaced"] for r in recs) == cap
        acc.append(np.mean([answer_matches(m["content"], m["reference"]) for c in refined for m in c["messages"]
                            if m["role"] == "assistant"]))
        assert row["label_accuracy_after"] == pytest.approx(acc[-1])
    assert rep["label_accuracy"] == pytest.approx(acc)
    c = rep["compute"]
    assert set(c) == {"trainings", "optimizer_steps", "train_tokens", "generated_tokens", "forward_tokens",
                      "comparisons"}
    assert all(type(v) is int for v in c.values())
    assert c["trainings"] == 5
    assert c["optimizer_steps"] == 10
    assert c["comparisons"] == 0
    assert 0 < c["generated_tokens"] <= 4 * 2 * n
    assert c["train_tokens"] > 0
    assert c["forward_tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "round-2" / "model" / "adapter" / "adapter_model.safetensors").read_bytes()
    net, _ = load(tiny / "tiny", out / "adapter")          # eval.py reads it unchanged
    assert net is not None
    again = ilr_main(["--model", str(tiny / "tiny"), "--data", str(data), "--out", str(out), "--rounds", "2",
                      "--naive", "--round-models", "last", *TRAIN])
    assert again["compute"] == c
    assert again["label_accuracy"] == rep["label_accuracy"]
    assert "nothing to do" in capsys.readouterr().out


def test_oracle_round_in_process(tiny):
    """main(argv) as bench/noise.py calls it: the oracle never replaces a right label by a wrong proposal."""
    rep = ilr_main(["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"), "--out",
                    str(tiny / "oracle"), "--rounds", "1", "--feedback", "oracle", *TRAIN])
    row = rep["per_round"][1]
    assert row["damaged"] == 0
    assert row["compared"] == row["differing"] > 0
    assert rep["compute"]["comparisons"] == 2 * row["compared"]
    assert rep["compute"]["trainings"] == 4
    assert row["comparator"]["accuracy"] in (1.0, None)


def test_errors_are_one_line(tiny):
    base = ["--model", tiny / "tiny", "--data", tiny / "data" / "train_L.jsonl", "--out", tiny / "err"]
    p = cli(*base, "--feedback", "bogus")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("baselines/ilr.py: error: --feedback 'bogus'"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    no_ref = tiny / "noref.jsonl"
    no_ref.write_text(json.dumps(dialogue(0, ["a"])) + "\n" + json.dumps(dialogue(1, ["b"])) + "\n")
    for args, needle in [(["--feedback", "oracle", "--naive"], "not both"),
                         (["--max-replace", "2", "--naive"], "--max-replace"),
                         (["--naive", "--rounds", "-1"], "--rounds"),
                         (["--naive", "--lr", "-1"], "training flags: argument --lr: must be > 0, got -1"),
                         (["--naive", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
                         (["--naive", "--data", str(tiny / "missing.jsonl")], "--data .*missing.jsonl: no such file"),
                         (["--feedback", "sim:0.8", "--data", str(no_ref)], "needs a 'reference'")]:
        with pytest.raises(ValueError, match=needle) as e:
            ilr_main([*map(str, base), *args])
        assert "\n" not in str(e.value)
