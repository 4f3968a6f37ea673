"""ILR (baselines/ilr.py) and the comparators (baselines/feedback.py): both-order averaging and the
alpha cap on a stub comparator, the query budget, sim:P's realized accuracy, the oracle's no-damage
property, the CLI end to end on a tiny random llama, and interruptions at every kind of point."""
import builtins
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import baselines
from baselines import label_accuracy, label_positions
from baselines.feedback import Feedback, Format, Oracle, Simulated, form_ok, make, realized_accuracy
from baselines.ilr import PROG, halves, main as ilr_main, refine
from support.conversations import load_conversations
from eval import answer_matches, load
from conftest import tiny_setup
from support.synth import synth

ROOT = Path(__file__).resolve().parents[1]


def dialogue(i, labels, refs=None):
    """A conversation with one user/assistant exchange per label (references optional)."""
    msgs = []
    for k, lab in enumerate(labels):
        labels_of = {}
        if refs:
            labels_of = {"reference": refs[k], "noisy": lab != refs[k], "noise_type": None}
        msgs += [{"role": "user", "content": f"question {i}.{k}"},
                 {"role": "assistant", "content": lab, **labels_of}]
    return {"id": f"d{i}", "messages": msgs}


class Biased:
    """A stub judge with a position bias: p(A better) = 0.7 + 0.15 (q(A) - q(B)); both orders
    average to 0.5 + 0.15 (q(a) - q(b)). Every single query prefers whatever is shown first unless q
    differs by 4/3."""
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
    assert counts == {"labels": 20, "proposed": 11, "differing": 10, "compared": 10,
                      "over_budget": 0, "candidates": 5, "cap": 3, "replaced": 3}
    assert fb.queries == 20
    assert len(fb.comparator.calls) == 20
    expected = {f"P{i}a": better[(i, 1)] for i in range(10)}
    assert {r["proposal"]: r["p"] for r in records} == pytest.approx(expected)
    # every single first-order query preferred the proposal (bias), yet only p > 0.5 after
    # averaging qualifies,
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


def test_max_queries_caps_the_comparisons_in_label_order():
    """--max-queries 7: three comparisons (six queries) in label order, the other differing
    proposals left without feedback and never replaced."""
    convs = [dialogue(i, [f"L{i}"]) for i in range(10)]
    q = {f"P{i}": 1.0 for i in range(10)}  # every proposal better than its label
    props = {(i, 1): f"P{i}" for i in range(10)}
    fb = Feedback(Biased(q), max_queries=7)
    out, records, counts = refine(convs, props, fb, 1.0, round_k=1)
    assert fb.queries == 6
    assert counts["compared"] == 3
    assert counts["over_budget"] == 7
    assert counts["candidates"] == 3
    assert [r["p"] is not None for r in records] == [True] * 3 + [False] * 7
    assert sorted(r["proposal"] for r in records if r["replaced"]) == ["P0", "P1", "P2"]
    assert fb.can_compare() is False


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
    """Random proposals (right, the current label's neighbours, off-form) under the oracle: every
    replacement is a fix, as many as the cap allows; sim:0.8 on the same proposals: its decisions
    realize about 0.8."""
    convs = noisy_benchmark(tmp_path)
    rng = random.Random(1)
    targets = label_positions(convs)
    props = {}
    for ci, mi in targets:
        ref = convs[ci]["messages"][mi]["reference"]
        label = convs[ci]["messages"][mi]["content"]
        props[(ci, mi)] = rng.choice([ref, ref + " x", "banana", label])
    from baselines.ilr import label_changes
    out, records, counts = refine(convs, props, Feedback(Oracle()), 0.15, 1)
    ev = label_changes(convs, out, records, props)
    fixable = 0
    for ci, mi in targets:
        message = convs[ci]["messages"][mi]
        proposal_right = answer_matches(props[ci, mi], message["reference"])
        fixable += proposal_right and not answer_matches(message["content"], message["reference"])
    assert ev["damaged"] == 0
    assert ev["changed"] == 0
    assert ev["fixed"] == counts["replaced"] == min(counts["cap"], fixable) > 0

    def hand(cs):  # the labels' accuracy, counted here
        messages = [cs[ci]["messages"][mi] for ci, mi in targets]
        return np.mean([answer_matches(m["content"], m["reference"]) for m in messages])
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
        question = f"Keep a counter and reply with its value only. Start at {ref}. #{i}"
        ctx = [{"role": "user", "content": question}]
        turn = {"role": "assistant", "content": ref, "reference": ref}
        wrong = str(int(ref) + 1 + i % 7)
        a, b = (ref, wrong) if i % 2 else (wrong, ref)
        # one judgment per pair
        assert sim(ctx, a, b, turn) + sim(ctx, b, a, turn) == pytest.approx(1.0)
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
    counter = [{"role": "user",
                "content": "Keep a counter and reply with its value only. Start at 23."}]
    shop = [{"role": "user", "content": "Keep a shopping list and reply with the whole list only. "
                                        "Start with milk."},
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
    return tiny_setup(tmp_path_factory.mktemp("ilr"), smollm2_dir, n_train=16, n_test=2,
                      max_turns=3)


TRAIN = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--max-len", "128",
         "--lora-r", "4", "--lora-alpha", "8", "--lr", "3e-3", "--max-new-tokens", "4"]


def cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "baselines/ilr.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_naive(tiny, capsys):
    """Two naive rounds (every tiny-model proposal differs, so each round replaces exactly the cap):
    the files, the counts and the label accuracy against a recount, the compute, the adapter; a
    rerun reuses every training."""
    out, data = tiny / "naive", tiny / "data" / "train_L.jsonl"
    p = cli("--model", tiny / "tiny", "--data", data, "--out", out, "--rounds", 2, "--naive",
            "--round-models", "last", *TRAIN)
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
        lines = (out / f"round-{k}" / "proposals.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert len(recs) == row["differing"]
        assert sum(r["replaced"] for r in recs) == cap
        messages = [m for c in refined for m in c["messages"]]
        acc.append(np.mean([answer_matches(m["content"], m["reference"]) for m in messages
                            if m["role"] == "assistant"]))
        assert row["label_accuracy_after"] == pytest.approx(acc[-1])
    assert rep["label_accuracy"] == pytest.approx(acc)
    c = rep["compute"]
    assert set(c) == {"trainings", "optimizer_steps", "train_tokens", "generated_tokens",
                      "forward_tokens", "comparisons"}
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
    again = ilr_main(["--model", str(tiny / "tiny"), "--data", str(data), "--out", str(out),
                      "--rounds", "2", "--naive", "--round-models", "last", *TRAIN])
    assert again["compute"] == c
    assert again["label_accuracy"] == rep["label_accuracy"]
    assert "nothing to do" in capsys.readouterr().out


def test_oracle_round_in_process(tiny):
    """main(argv) as bench/noise.py calls it: the oracle never replaces a right label by a wrong
    proposal."""
    argv = ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"),
            "--out", str(tiny / "oracle"), "--rounds", "1", "--feedback", "oracle", *TRAIN]
    rep = ilr_main(argv)
    row = rep["per_round"][1]
    assert row["damaged"] == 0
    assert row["compared"] == row["differing"] > 3
    assert rep["compute"]["comparisons"] == 2 * row["compared"]
    assert rep["compute"]["trainings"] == 4
    assert row["comparator"]["accuracy"] in (1.0, None)
    # the same run under a budget of 7 queries: three comparisons, the rest over budget
    capped = ilr_main([*argv, "--max-queries", "7"])
    row = capped["per_round"][1]
    assert capped["max_queries"] == 7
    assert capped["compute"]["comparisons"] == 6
    assert row["compared"] == 3
    assert row["over_budget"] == row["differing"] - 3


def test_errors_are_one_line(tiny):
    base = ["--model", tiny / "tiny", "--data", tiny / "data" / "train_L.jsonl", "--out",
            tiny / "err"]
    p = cli(*base, "--feedback", "bogus")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("baselines/ilr.py: error: --feedback 'bogus'"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    no_ref = tiny / "noref.jsonl"
    no_ref.write_text(json.dumps(dialogue(0, ["a"])) + "\n" + json.dumps(dialogue(1, ["b"])) + "\n")
    for args, needle in [(["--feedback", "oracle", "--naive"], "not both"),
                         (["--max-replace", "2", "--naive"], "--max-replace"),
                         (["--naive", "--rounds", "-1"], "--rounds"),
                         (["--naive", "--lr", "-1"],
                          "training flags: argument --lr: must be > 0, got -1"),
                         (["--naive", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
                         (["--naive", "--data", str(tiny / "missing.jsonl")],
                          "--data .*missing.jsonl: no such file"),
                         (["--naive", "--max-queries", "10"], "--max-queries needs --feedback"),
                         (["--feedback", "oracle", "--max-queries", "-1"], "--max-queries must be"),
                         (["--feedback", "sim:0.8", "--data", str(no_ref)], "needs a 'reference'")]:
        with pytest.raises(ValueError, match=needle) as e:
            ilr_main([*map(str, base), *args])
        assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------------------
# Interruptions: every file whole, one line on a signal, and the same command ends as if it had
# never stopped. The helpers serve tests/test_dpo.py and tests/test_robustft.py too.

REAL_REPLACE = os.replace
REAL_OPEN = builtins.open


class StopAtWrite:
    """os.replace that raises `stop` in place of its n-th rename (n from 1), or of the first whose
    destination `where` accepts: a signal landing while a file is written, which leaves its
    temporary and not the file. It records the destinations it renamed to."""

    def __init__(self, stop=None, n=None, where=None):
        self.stop = stop
        self.n = n
        self.where = where
        self.calls = 0
        self.fired = False
        self.targets = []

    def __call__(self, src, dst, **kwargs):
        self.calls += 1
        hit = self.calls == self.n or (self.where is not None and self.where(os.fspath(dst)))
        if self.stop is not None and hit and not self.fired:
            self.fired = True
            raise self.stop
        self.targets.append(os.fspath(dst))
        return REAL_REPLACE(src, dst, **kwargs)


def record_writes(mp):
    """Patch open (builtins and io, which pathlib uses) to record every path opened to write
    ('w' or 'x': appending to a log is not writing a file anew)."""
    opened = []

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and ("w" in mode or "x" in mode):
            opened.append(os.path.abspath(os.fspath(file)))
        return REAL_OPEN(file, mode, *args, **kwargs)
    mp.setattr(builtins, "open", recording_open)
    mp.setattr(io, "open", recording_open)
    return opened


def written_in_place(opened, out):
    """The paths under out opened to write under their final name: not a temporary (*.tmp) and
    not inside a folder built beside its place (a name starting with '.')."""
    bad = []
    for path in opened:
        rel = os.path.relpath(path, out)
        parts = rel.split(os.sep)
        if rel.startswith(".."):
            continue
        if not (path.endswith(".tmp") or any(p.startswith(".") for p in parts)):
            bad.append(rel)
    return bad


def without_timings(x):
    """x without its wall-clock fields (seconds, wall_s), which no two runs share."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if k not in ("seconds", "wall_s")}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


def outcome(out, files):
    """What a finished run leaves: its report without timings (out's path read as OUT) and the
    bytes of `files` (relative to out)."""
    report = json.loads((out / "report.json").read_text().replace(str(out), "OUT"))
    return without_timings(report), {f: (out / f).read_bytes() for f in files}


def check_same(out, files, expected):
    """out's outcome equals `expected` (an outcome of the same files): file by file, then the
    report."""
    report, contents = outcome(out, files)
    expected_report, expected_contents = expected
    for name in files:
        assert contents[name] == expected_contents[name], name
    assert report == expected_report


def as_command(prog, main, argv, capsys):
    """(exit code, stderr lines, stdout) of main run as the baseline's command, in this
    process."""
    code = 0
    try:
        baselines.cli(prog, main, argv)
    except SystemExit as e:
        code = e.code
    said = capsys.readouterr()
    return code, said.err.splitlines(), said.out


def check_stop_line(lines, prog, code):
    """The one line a stopped baseline says: which signal, what was kept, that the same command
    continues."""
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: stopped by {'SIGINT' if code == 130 else 'SIGTERM'}")
    assert "kept in " in lines[0]
    assert lines[0].endswith("the same command continues")


@dataclass
class Reference:
    """An uninterrupted run: what it left, the destinations of its renames in order, and the
    files it opened to write."""
    out: Path
    outcome: tuple
    renames: list
    opened: list


def reference_run(main, argv, out, files):
    with pytest.MonkeyPatch.context() as mp:
        renames = StopAtWrite()
        mp.setattr(os, "replace", renames)
        opened = record_writes(mp)
        main(argv)
    return Reference(out, outcome(out, files), renames.targets, opened)


def stop_and_rerun(main, prog, argv, out, stop, capsys, monkeypatch, n=None, where=None):
    """Run with `stop` raised in place of the n-th rename (or the first `where` accepts), check
    the one line and exit code, then rerun as the same command; returns the rerun's stdout."""
    monkeypatch.setattr(os, "replace", StopAtWrite(stop, n, where))
    code, lines, _ = as_command(prog, main, argv, capsys)
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    expected = 130 if isinstance(stop, KeyboardInterrupt) else 143
    assert code == expected, lines
    check_stop_line(lines, prog, code)
    assert str(out) in lines[0]
    code, lines, said = as_command(prog, main, argv, capsys)
    assert code == 0, lines
    return said


ILR_FILES = ["round-1/proposals.jsonl", "round-1/train.jsonl",
             "round-1/model/adapter/adapter_model.safetensors", "adapter/adapter_model.safetensors"]


def ilr_argv(tiny, out, *extra):
    return ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"), "--out",
            str(out), "--rounds", "1", "--naive", *TRAIN, *extra]


@pytest.fixture(scope="module")
def ilr_reference(tiny):
    out = tiny / "reference"
    return reference_run(ilr_main, ilr_argv(tiny, out), out, ILR_FILES)


def test_every_file_is_written_under_a_temporary_name(ilr_reference):
    """Nothing ILR (or a training in it) writes is opened under its final name: a kill mid-write
    leaves the earlier file or none."""
    assert written_in_place(ilr_reference.opened, ilr_reference.out) == []
    assert any(t.endswith("adapter") for t in ilr_reference.renames)  # the copy came whole


def stop_points(reference, count):
    """`count` rename numbers spread over the run, the first and the last included."""
    n = len(reference.renames)
    return sorted({1 + round(i * (n - 1) / (count - 1)) for i in range(count)})


def stops(count):
    """KeyboardInterrupt and SystemExit(143) (SIGTERM) by turns."""
    return [KeyboardInterrupt() if i % 2 == 0 else SystemExit(143) for i in range(count)]


@pytest.mark.parametrize("point", range(4))
def test_a_stop_at_any_write_is_one_line_and_the_same_command_ends_as_uninterrupted(
        tiny, ilr_reference, capsys, monkeypatch, point):
    n = stop_points(ilr_reference, 4)[point]
    out = tiny / f"stopped-{point}"
    argv = ilr_argv(tiny, out)
    stop_and_rerun(ilr_main, PROG, argv, out, stops(4)[point], capsys, monkeypatch, n=n)
    check_same(out, ILR_FILES, ilr_reference.outcome)


@pytest.mark.slow
def test_a_stop_at_every_third_write_ends_as_uninterrupted(tiny, ilr_reference, capsys,
                                                           monkeypatch):
    for i, n in enumerate(range(1, len(ilr_reference.renames) + 1, 3)):
        out = tiny / f"every-{n}"
        argv = ilr_argv(tiny, out)
        stop = stops(2)[i % 2]
        stop_and_rerun(ilr_main, PROG, argv, out, stop, capsys, monkeypatch, n=n)
        check_same(out, ILR_FILES, ilr_reference.outcome)


def test_a_round_resumed_after_a_finished_half_proposes_as_an_uninterrupted_one(
        tiny, monkeypatch):
    """bf16 training, stopped as half 1 starts, then the same command: half 0 is reused, and its
    proposals come from its model in the training's dtype, as in the uninterrupted run."""
    reference = tiny / "bf16"
    argv = ilr_argv(tiny, reference, "--dtype", "bf16")
    expected = reference_run(ilr_main, argv, reference, ILR_FILES)
    out = tiny / "bf16-stopped"
    argv = ilr_argv(tiny, out, "--dtype", "bf16")

    def half_1_starts(dst):  # the first file of half 1's run folder
        return os.path.join("round-1", "half-1", "") in dst
    monkeypatch.setattr(os, "replace", StopAtWrite(SystemExit(143), where=half_1_starts))
    with pytest.raises(SystemExit) as stopped:
        ilr_main(argv)
    assert stopped.value.code == 143
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    assert (out / "round-1" / "half-0" / "adapter" / "adapter_model.safetensors").is_file()
    ilr_main(argv)
    check_same(out, ILR_FILES, expected.outcome)


def test_a_torn_compute_record_is_named_and_the_training_counted_again(tiny, ilr_reference,
                                                                       capsys):
    """A finished half whose compute.json was torn: one line names the file, the half trains
    again, and the run ends as the uninterrupted one."""
    out = tiny / "torn"
    argv = ilr_argv(tiny, out)
    ilr_main(argv)
    record = out / "round-1" / "half-0" / "compute.json"
    text = record.read_text()
    record.write_text(text[:len(text) // 2])
    capsys.readouterr()
    code, lines, said = as_command(PROG, ilr_main, argv, capsys)
    assert code == 0, lines
    assert str(record) in said  # named on the line that says it trains again
    check_same(out, ILR_FILES, ilr_reference.outcome)


@pytest.mark.slow
def test_sigterm_to_the_command_is_one_line_and_the_same_command_continues(tiny):
    """A real SIGTERM to the command once round 1's first half trains, then the same command:
    one line, exit 143, and the run ends as an uninterrupted one (all three as subprocesses)."""
    reference = tiny / "sigterm-reference"
    p = cli(*ilr_argv(tiny, reference))
    assert p.returncode == 0, p.stderr[-2000:]
    out = tiny / "sigterm"
    argv = ilr_argv(tiny, out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "baselines/ilr.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = out / "round-1" / "half-0" / "run.json"
    deadline = time.time() + 240
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    check_stop_line(stderr.splitlines(), PROG, 143)
    p = cli(*argv)
    assert p.returncode == 0, p.stderr[-2000:]
    check_same(out, ILR_FILES, outcome(reference, ILR_FILES))
