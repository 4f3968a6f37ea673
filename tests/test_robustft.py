"""baselines/robustft.py: the checker, retrieval, entropy and selection against hand computations;
the refined conversations; the whole CLI on a tiny random llama, both detectors; one-line errors;
interruptions, signals and a torn refinement record."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from baselines import new_compute
from baselines import robustft as R
from data import ChatTemplate, build_examples
from support.conversations import load_conversations
from model import Transformer
from conftest import tiny_setup
from test_ilr import REAL_REPLACE, StopAtWrite, as_command, check_same, check_stop_line
from test_ilr import reference_run, stop_and_rerun, stop_points, stops, written_in_place

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
SMALL = ["--reflect", "2", "--max-new-tokens", "4", "--reason-tokens", "6", "--max-steps", "2",
         "--batch-size", "16", "--grad-accum", "1", "--max-len", "128", "--lora-r", "4",
         "--lora-alpha", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """conftest.tiny_setup with 8 synthetic dialogues per tier."""
    return tiny_setup(tmp_path_factory.mktemp("robustft"), smollm2_dir, n_train=8, n_test=2)


def test_checker_and_answer_extraction():
    assert R.is_reliable("27", "27", "27.")  # eval.answer_matches: case, spaces, a final period
    assert R.is_reliable("milk, tea", "Milk,tea", "milk,  tea")
    assert not R.is_reliable("27", "27", "28")
    assert not R.is_reliable("27", "26", "27")
    assert R.extract_answer("Let me think.\nAnswer: 27") == "27"
    assert R.extract_answer("steps\nanswer:\n  milk, tea\nmore text") == "milk, tea"
    assert R.extract_answer("Answer: 5\nOn reflection...\nAnswer: 6.") == "6."
    assert R.extract_answer("**Answer:** 27") == "27"
    assert R.extract_answer("no marker here\n\n42\n") == "42"
    assert R.extract_answer("I am ready.\n\nAnswer:") == "I am ready."
    assert R.extract_answer("") == R.extract_answer("Answer:") == ""


def test_nearest_neighbours_by_cosine():
    pool = [[1, 0], [0, 1], [1, 1], [-1, 0]]
    # cosines of (2, 1): 2/sqrt5 = .894, 1/sqrt5 = .447, 3/sqrt10 = .949, -.894
    assert R.nearest([[2, 1]], pool, 3) == [[2, 0, 1]]
    # pool 2 is of the query's dialogue
    assert R.nearest([[2, 1]], pool, 3, [7], [0, 0, 7, 0]) == [[0, 1, 3]]
    # a tie (.707, .707): the lower index first
    assert R.nearest([[1, 1], [0, -1]], pool, 2) == [[2, 0], [0, 3]]
    assert R.nearest([[1, 1]], pool, 9) == [[2, 0, 1, 3]]  # k larger than the pool
    assert R.nearest([[1, 1]], np.zeros((0, 2)), 3) == [[]]  # no clean turn at all
    assert R.nearest(np.zeros((0, 2)), pool, 3) == []
    assert R.nearest([[1, 0], [0, 1], [1, 1]], pool, 1, chunk=2) == [[0], [1], [2]]


def test_entropy_selection():
    e = [0.5, 2.0, math.inf, 0.1, 1.0]
    assert R.select_lowest(e, 0.5) == [3, 0]  # floor(0.5 * 5) = 2 of the lowest
    assert R.select_lowest(e, 0.2) == [3]
    assert R.select_lowest(e, 1.0) == [3, 0, 4, 1]  # an unusable relabel (inf) is never kept
    assert R.select_lowest([1.0, 1.0, 0.5], 1.0) == [2, 0, 1]
    assert R.select_lowest([], 0.5) == []


def test_entropy_is_mean_nll_of_the_reply(tiny):
    """Eq. 7 against full-vocabulary log-softmax of the model's logits at the reply's tokens."""
    net = Transformer.from_pretrained(tiny / "tiny").eval()
    tpl = ChatTemplate.from_pretrained(tiny / "tiny")
    chats = [[{"role": "user", "content": "Start at 5."}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Add 2."}], [{"role": "user", "content": "Hello there"}]]
    replies = ["7", "Hi, how can I help?"]
    compute = new_compute()
    got = R.entropies(net, tpl, chats + chats[:1], replies + [""], 2, compute)
    assert math.isinf(got[2])
    for chat, reply, g in zip(chats, replies, got):
        prompt = tpl.encode_prompt(chat)
        reply_ids = tpl.tokenizer.encode(reply, add_special_tokens=False).ids + [tpl.eot_id]
        ids = torch.tensor([prompt + reply_ids])
        with torch.no_grad():
            logp = torch.log_softmax(net(ids).double(), -1)[0]
        nll = [-logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(reply_ids)]
        assert g == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_refine_replaces_exactly_the_selected_turns():
    convs = [{"id": "a", "messages": [
        {"role": "user", "content": "Start at 5."},
        {"role": "assistant", "content": "5", "noisy": False, "noise_type": None, "reference": "5"},
        {"role": "user", "content": "Add 2."},
        {"role": "assistant", "content": "9", "noisy": True, "noise_type": "wrong",
         "reference": "7"},
        {"role": "user", "content": "Add 1."},
        {"role": "assistant", "content": "8", "noisy": True, "noise_type": "wrong",
         "reference": "8x"}]},
        {"id": "b", "messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "x", "extra": [1, 2]}]}]
    before = json.dumps(convs)
    out = R.refine(convs, {(0, 3): "7", (0, 5): None})
    assert json.dumps(convs) == before  # the input is left alone
    assert json.dumps(out[1]) == json.dumps(convs[1])
    for i in (0, 1, 2, 4):
        assert json.dumps(out[0]["messages"][i]) == json.dumps(convs[0]["messages"][i])
    assert out[0]["messages"][3] == {"role": "assistant", "content": "7", "noisy": False,
                                     "noise_type": None, "reference": "7",
                                     "original_content": "9", "robustft": "relabeled"}
    dropped = {**convs[0]["messages"][5], "train": False, "robustft": "dropped"}
    assert out[0]["messages"][5] == dropped
    assert {k: v for k, v in out[0].items() if k != "messages"} == {"id": "a"}


def run_cli(tiny, out, *extra):
    cmd = [sys.executable, str(ROOT / "baselines" / "robustft.py"), *rft_argv(tiny, out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_base_detector(tiny):
    out = tiny / "base"
    p = run_cli(tiny, out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    recs = json.loads((out / "refine.json").read_text())["records"]
    src = load_conversations(tiny / "data" / "train_L.jsonl")
    got = load_conversations(out / "train.jsonl")
    # every checked turn is kept, relabeled or dropped as refine.json says; nothing else moved
    replies = sum(m["role"] == "assistant" for c in src for m in c["messages"])
    assert len(recs) == rep["turns"] == replies
    changed = set()
    for r in recs:
        m, m0 = got[r["conv"]]["messages"][r["msg"]], src[r["conv"]]["messages"][r["msg"]]
        if r["clean"]:
            assert m == m0
        elif r.get("selected"):
            assert m["content"] == r["relabel"]
            assert m["original_content"] == m0["content"]
        else:
            assert m == {**m0, "train": False, "robustft": "dropped"}
        changed.add((r["conv"], r["msg"]))
    for ci, c in enumerate(src):
        for i, m in enumerate(c["messages"]):
            if (ci, i) not in changed:
                assert got[ci]["messages"][i] == m
    assert rep["detected"] == sum(not r["clean"] for r in recs) == rep["selected"] + rep["dropped"]
    noisy_recs = [r for r in recs if not r["clean"]]
    scores = [math.inf if r["entropy"] is None else r["entropy"] for r in noisy_recs]
    keep = R.select_lowest(scores, 0.5)
    assert {i for i, r in enumerate(noisy_recs) if r.get("selected")} == set(keep)
    assert rep["selected"] == len(keep) > 0
    noisy = [m["noisy"] for c in src for m in c["messages"] if m["role"] == "assistant"]
    det = [not r["clean"] for r in recs]
    tp = sum(d and n for d, n in zip(det, noisy))
    assert rep["recall"] == pytest.approx(tp / sum(noisy))
    assert rep["original_label_accuracy"] == pytest.approx(1 - sum(noisy) / len(noisy))
    # compute: one training of 2 steps, each a single batch holding every example (batch size
    # 16 > 8)
    tpl = ChatTemplate.from_pretrained(tiny / "tiny")
    tokens = build_examples(got, tpl, 128)[1]["tokens"]
    c = rep["compute"]
    assert c["trainings"] == 1
    assert c["optimizer_steps"] == 2
    assert c["train_tokens"] == 2 * tokens
    assert c["comparisons"] == 0
    assert all(isinstance(v, int) for v in c.values())
    assert c["generated_tokens"] > 0
    assert c["forward_tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    p = run_cli(tiny, out)  # a rerun reuses the refinement and the finished training
    assert p.returncode == 0, p.stderr[-2000:]
    assert "holds this refinement: reused" in p.stdout
    assert json.loads((out / "report.json").read_text())["compute"] == c


def test_crossfit_detector_trains_on_the_other_half(tiny):
    p = run_cli(tiny, tiny / "cf", "--detector", "crossfit")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tiny / "cf" / "report.json").read_text())
    halves = [load_conversations(tiny / "cf" / f"half-{h}.jsonl") for h in (0, 1)]
    ids = sorted(c["id"] for h in halves for c in h)
    assert ids == sorted(c["id"] for c in load_conversations(tiny / "data" / "train_L.jsonl"))
    assert len(halves[0]) == len(halves[1]) == 4
    assert (rep["compute"]["trainings"], rep["compute"]["optimizer_steps"]) == (3, 6)
    for h in (0, 1):
        assert (tiny / "cf" / f"crossfit-{h}" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("extra, says", [
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--keep", "nan"], "--keep must be in (0, 1]"),
    (["--k", "0"], "--k must be >= 1"),
    (["--lr", "-1"], "--lr"),
    (["--detector", "oracle"], "invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "none.jsonl"], "no such file"),
    (["--data", "bad.jsonl"], "no assistant turn"),
])
def test_bad_input_one_line(tiny, tmp_path, monkeypatch, capsys, extra, says):
    monkeypatch.chdir(tmp_path)
    Path("bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    argv = ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"), "--out",
            "o", *extra]
    try:
        code = R.cli(argv)
    except SystemExit as e:  # cli's exit 2 after its one line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert says in err, err


def test_cli_bad_input_no_traceback(tiny, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "baselines" / "robustft.py"), "--model",
                        str(tiny / "tiny"), "--data", str(tmp_path / "none.jsonl"), "--out",
                        str(tmp_path / "o")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("robustft.py: error: ")
    assert p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr
    assert "no such file" in p.stderr


def test_a_stop_before_any_work_is_one_line_in_every_baseline_command(monkeypatch, capsys):
    """A Ctrl-C or SIGTERM before a baseline's work starts (main raising it at once) ends the
    commands with one line, not a traceback."""
    import baselines

    def interrupted(argv=None):
        raise KeyboardInterrupt

    def terminated(argv=None):
        raise SystemExit(143)
    with pytest.raises(SystemExit) as e:
        baselines.cli("ilr.py", interrupted)
    assert e.value.code == 130
    monkeypatch.setattr(R, "main", terminated)
    with pytest.raises(SystemExit) as e:
        R.cli([])
    assert e.value.code == 143
    assert capsys.readouterr().err.splitlines() == [
        "ilr.py: stopped by SIGINT before any work; the same command starts it",
        "robustft.py: stopped by SIGTERM before any work; the same command starts it"]


# -------------------------------------------------------------------------------------------------
# Interruptions (helpers in tests/test_ilr.py)

RFT_FILES = ["train.jsonl", "final/adapter/adapter_model.safetensors",
             "adapter/adapter_model.safetensors"]


def refinement_records(out):
    """refine.json's per-turn records (its seconds differ between runs)."""
    return json.loads((out / "refine.json").read_text())["records"]


def rft_argv(tiny, out, *extra):
    return ["--model", str(tiny / "tiny"), "--data", str(tiny / "data" / "train_L.jsonl"), "--out",
            str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def rft_reference(tiny):
    out = tiny / "reference"
    return reference_run(R.main, rft_argv(tiny, out), out, RFT_FILES)


def test_every_file_is_written_whole(rft_reference):
    assert written_in_place(rft_reference.opened, rft_reference.out) == []


@pytest.mark.parametrize("point", range(3))
def test_a_stop_at_any_write_is_one_line_and_the_same_command_ends_as_uninterrupted(
        tiny, rft_reference, capsys, monkeypatch, point):
    n = stop_points(rft_reference, 3)[point]
    out = tiny / f"stopped-{point}"
    stop = stops(3)[point]
    stop_and_rerun(R.main, R.PROG, rft_argv(tiny, out), out, stop, capsys, monkeypatch, n=n)
    check_same(out, RFT_FILES, rft_reference.outcome)
    assert refinement_records(out) == refinement_records(rft_reference.out)


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["base", "crossfit"])
def test_a_stop_at_every_third_write_ends_as_uninterrupted(tiny, capsys, monkeypatch, detector):
    reference = tiny / f"every-reference-{detector}"
    argv = rft_argv(tiny, reference, "--detector", detector)
    expected = reference_run(R.main, argv, reference, RFT_FILES)
    for i, n in enumerate(range(1, len(expected.renames) + 1, 3)):
        out = tiny / f"every-{detector}-{n}"
        argv = rft_argv(tiny, out, "--detector", detector)
        stop_and_rerun(R.main, R.PROG, argv, out, stops(2)[i % 2], capsys, monkeypatch, n=n)
        check_same(out, RFT_FILES, expected.outcome)
        assert refinement_records(out) == refinement_records(reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_final_model_is_saved_says_one_line_and_the_rerun_ends_equal(
        tiny, rft_reference, capsys, monkeypatch, signum):
    """The signal lands as train.py saves the final adapter: it finishes the run and exits
    130 / 143; one line says so, and the same command writes the rest."""
    out = tiny / f"signal-{signum}"
    final_adapter = os.path.join(str(out), "final", "adapter")
    real_save = train.save_adapter

    def save_then_signal(net, path, *args):
        if os.fspath(path) == final_adapter:
            os.kill(os.getpid(), signum)
        return real_save(net, path, *args)
    monkeypatch.setattr(train, "save_adapter", save_then_signal)
    code, lines, _ = as_command(R.PROG, R.main, rft_argv(tiny, out), capsys)
    monkeypatch.setattr(train, "save_adapter", real_save)
    assert code == 128 + signum, lines
    check_stop_line(lines, R.PROG, code)
    assert "final (finished)" in lines[0]
    code, lines, _ = as_command(R.PROG, R.main, rft_argv(tiny, out), capsys)
    assert code == 0, lines
    check_same(out, RFT_FILES, rft_reference.outcome)
    assert refinement_records(out) == refinement_records(rft_reference.out)


def test_a_torn_refinement_record_is_named_and_computed_again(tiny, rft_reference, capsys,
                                                              monkeypatch):
    """refine.json torn (as an in-place write killed half way would leave it) after a stop in the
    final training: the rerun names it in one line, computes the refinement again and ends as the
    uninterrupted run."""
    out = tiny / "torn"
    argv = rft_argv(tiny, out)

    def final_training(dst):
        return os.path.join("final", "") in dst
    monkeypatch.setattr(os, "replace", StopAtWrite(SystemExit(143), where=final_training))
    with pytest.raises(SystemExit):
        R.main(argv)
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    record = out / "refine.json"
    text = record.read_text()
    record.write_text(text[:len(text) // 2])
    capsys.readouterr()
    code, lines, said = as_command(R.PROG, R.main, argv, capsys)
    assert code == 0, lines
    assert f"{record}: not a valid JSON file" in said
    check_same(out, RFT_FILES, rft_reference.outcome)
