"""bench/real_noise.py: the noise injector against its labels, the ROC AUC against scipy and a
pairwise count, and a tiny end-to-end run whose flag tables are recounted by hand from units.jsonl
and whose held-out comparison is recomputed with scipy."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import real_noise as R  # noqa: E402
from real_noise_data import KINDS, BenchError, inject, load_mtbench101  # noqa: E402
from real_noise_scores import auc  # noqa: E402


@pytest.fixture(scope="module")
def dialogues(fixtures_dir):
    return load_mtbench101(fixtures_dir / "mt_bench_101" / "mtbench101.jsonl")[:80]


def assistant_turns(conv):
    return [(i, m) for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"]


def test_each_kind_does_what_its_label_says(dialogues):
    before = json.dumps(dialogues)
    noisy = inject(dialogues, 0.5, seed=3)
    assert json.dumps(dialogues) == before  # the input is left alone
    replies = {(ci, i): m["content"] for ci, c in enumerate(dialogues)
               for i, m in assistant_turns(c)}
    seen = set()
    for ci, (orig, conv) in enumerate(zip(dialogues, noisy)):
        assert [m["role"] for m in conv["messages"]] == [m["role"] for m in orig["messages"]]
        for i, m in enumerate(conv["messages"]):
            if m["role"] == "user":
                assert m == orig["messages"][i]
                continue
            ref = orig["messages"][i]["content"]
            text = m["content"]
            kind = m["noise_type"]
            assert m["reference"] == ref
            assert m["noisy"] == (kind is not None)
            seen.add(kind)
            if kind is None:
                assert text == ref
                continue
            assert text != ref, kind
            opening = orig["messages"][0]["content"]
            same_dialogue = [replies[(ci, j)] for j, _ in assistant_turns(orig) if j != i]
            other_openings = [r for (cj, _), r in replies.items()
                              if dialogues[cj]["messages"][0]["content"] != opening]
            check_kind(kind, text, ref, conv["messages"][i - 1]["content"], same_dialogue,
                       other_openings)
    assert seen == {None, *KINDS}


def check_kind(kind, text, ref, user_turn, same_dialogue, other_openings):
    """One noisy reply against what its kind promises."""
    if kind == "echo":
        assert text == user_turn
    elif kind == "shuffled":
        assert sorted(text.split()) == sorted(ref.split())
        assert text.split() != ref.split()
    elif kind == "truncated":
        assert ref.startswith(text)
        assert text.strip()
        assert ref[len(text)].isspace()  # cut at a word boundary
    elif kind == "wrong_same_dialogue":
        assert text in same_dialogue
    elif kind == "off_topic":
        assert text in other_openings


def test_rate_shares_and_determinism(dialogues):
    n = sum(len(assistant_turns(c)) for c in dialogues)
    for rate in (0.0, 0.23, 0.5):
        kinds = [m["noise_type"] for c in inject(dialogues, rate, seed=1)
                 for _, m in assistant_turns(c) if m["noisy"]]
        assert len(kinds) == round(rate * n), rate
        counts = [kinds.count(k) for k in KINDS]
        assert max(counts) - min(counts) <= 1, rate
    a = inject(dialogues, 0.3, seed=7)
    b = inject(dialogues, 0.3, seed=7)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(inject(dialogues, 0.3, seed=8))
    only = inject(dialogues, 0.3, kinds=("echo", "truncated"), seed=7)
    kinds = {m["noise_type"] for c in only for _, m in assistant_turns(c)}
    assert kinds == {None, "echo", "truncated"}
    with pytest.raises(BenchError):
        inject(dialogues, 0.3, kinds=("echo", "nonsense"))
    with pytest.raises(BenchError):
        inject(dialogues, 1.5)


def test_auc_against_pairs_and_scipy():
    from scipy.stats import mannwhitneyu
    rng = np.random.default_rng(0)
    for n1, n0 in ((1, 1), (3, 7), (40, 25)):
        pos = rng.integers(0, 6, n1).astype(float)  # few values: many ties
        neg = rng.integers(0, 6, n0).astype(float)
        pairs = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        assert auc(pos, neg) == pytest.approx(pairs, abs=1e-12)
        u = mannwhitneyu(pos, neg).statistic
        assert auc(pos, neg) == pytest.approx(u / (n1 * n0), abs=1e-12)
        assert auc(pos, neg) + auc(-pos, -neg) == pytest.approx(1.0)
    assert auc([2, 3], [0, 1]) == 1.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1]) == 0.5
    assert math.isnan(auc([], [1.0]))
    assert math.isnan(auc([1.0], [math.nan]))


def test_heldout_words_only_where_resolved():
    """A run 'beats' sft, in bold, only where the Holm-adjusted p is below 0.05."""
    from bench_report import Comparison
    from real_noise_report import heldout_words
    better = Comparison("resure", "held-out dialogues", 48, -0.02, 0.01, -0.023, -0.017, 1e-9,
                        p_holm=2e-9)
    unclear = Comparison("resure+gain", "held-out dialogues", 48, -0.02, 0.1, -0.05, 0.01, 0.2,
                         p_holm=0.4)
    assert heldout_words(better).startswith("- **resure beats sft** on held-out loss: -0.0200")
    assert "beats" not in heldout_words(unclear)
    assert "**" not in heldout_words(unclear)
    assert "no difference resolved" in heldout_words(unclear)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny random llama with SmolLM2's tokenizer and chat template (written by transformers)."""
    from machine import make_tiny_model
    return Path(make_tiny_model(tmp_path_factory.mktemp("real_noise") / "tiny", smollm2_dir))


def test_quick_run_end_to_end(tiny, fixtures_dir, tmp_path):
    out = tmp_path / "rn"
    data = fixtures_dir / "mt_bench_101" / "mtbench101.jsonl"
    res = R.run(tiny, out, seed=1, quick=True, data=data)
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"].keys() == {"sft", R.LOSS_RUN, R.GAIN_RUN}
    md = (out / "results.md").read_text()
    assert "A loss threshold cannot see" in md
    assert "## Held-out loss against sft, paired by held-out dialogue" in md
    assert set(res["heldout"]) == {"base", "sft", R.LOSS_RUN, R.GAIN_RUN}
    for name, h in res["heldout"].items():
        assert math.isfinite(h["overall"]["loss"]), name
    for k, v in res["detectability"].items():
        if k == "clean":
            continue
        assert 0 <= v["auc_loss"] <= 1, k
        assert v["auc_gain_low"] + v["auc_gain_high"] == pytest.approx(1), k
    assert res["replay"]["reproduces_run"]
    check_flag_tables(res, out, tiny)
    check_heldout_pairs(res)
    check_document_tables(out, res)


def check_document_tables(out, res):
    """bench/tables.py's real-noise tables from the run's results.json: the AUCs and the recalls
    of each kind, the runs counted; each section of results.md in the documents' blocks."""
    import tables
    real = tables.Real(out / "results.json")
    summary = tables.gain_summary(real)
    assert summary[0].startswith("3 of 3 training runs of `python bench/real_noise.py` are finished")
    rows = {r[0].split(" (")[0]: r for r in table_rows(summary)}
    last = {name: res["runs"][name]["flagging"]["any"]["last"] for name in (R.LOSS_RUN, R.GAIN_RUN)}
    for kind, d in res["detectability"].items():
        if kind == "clean":
            continue
        row = rows[kind]
        assert row[1] == f"{d['auc_loss']:.2f}", kind
        assert row[3] == f"{d['auc_gain_high']:.2f}", kind
        for cell, name in zip(row[4:], last):
            recall = last[name]["by_kind"].get(kind, {}).get("recall")
            assert cell == ("-" if recall is None else f"{recall:.2f}"), (kind, name)
    md = (out / "results.md").read_text()
    for name in ("real-noise/detect", "real-noise/flags-last", "real-noise/vs-sft"):
        kind, write, args = tables.TABLES[name]
        body = write(real, *args)[2:]
        assert "\n".join(body) in md, name


def table_rows(lines):
    """The cells of a markdown table's rows, its header row and rule left out."""
    rows = [line for line in lines if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def check_flag_tables(res, out, tiny):
    """The flag tables recounted from units.jsonl: the last judged record of each turn against the
    data's labels."""
    from data import ChatTemplate, build_examples
    convs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    tpl = ChatTemplate.from_pretrained(tiny)
    examples = build_examples(convs, tpl, R.PRESETS["quick"]["max_len"], None)[0]
    for name in (R.LOSS_RUN, R.GAIN_RUN):
        lines = (R.run_folder(out, name) / "units.jsonl").read_text().splitlines()
        units = [json.loads(line) for line in lines]
        last = {(u["sample"], u["turn"]): u for u in units if not u["warmup"] and not u["skipped"]}
        kind = {}
        for sample, turn in last:
            messages = convs[examples[sample]["conv_index"]]["messages"]
            m = [m for m in messages if m["role"] == "assistant"][turn - 1]
            kind[sample, turn] = m["noise_type"] if m["noisy"] else "clean"
        for view in ("any", "loss", "gain") if name == R.GAIN_RUN else ("any", "loss"):
            if view == "any":
                hit = {key: u["flagged"] for key, u in last.items()}
            else:
                hit = {key: view in (u["view"] or "").split("+") for key, u in last.items()}
            t = res["runs"][name]["flagging"][view]["last"]
            assert t["units"] == len(last), (name, view)
            assert t["flagged"] == sum(hit.values()), (name, view)
            assert t["tp"] == sum(hit[k] and kind[k] != "clean" for k in last), (name, view)
            for k in KINDS:
                of_kind = [x for x in last if kind[x] == k]
                if of_kind:
                    want = sum(hit[x] for x in of_kind) / len(of_kind)
                    assert t["by_kind"][k]["recall"] == pytest.approx(want), (name, view, k)


def check_heldout_pairs(res):
    """Each run's loss per held-out dialogue: weighted by tokens, the mean train.py's own held-out
    evaluation reports; and the comparison with sft as scipy's paired t-test computes it."""
    from scipy import stats
    per_dialogue = res["heldout_dialogues"]
    assert set(per_dialogue) == {"sft", R.LOSS_RUN, R.GAIN_RUN}
    for name, d in per_dialogue.items():
        assert len(d["loss"]) == res["data"]["heldout_dialogues"], name
        weighted = np.dot(d["loss"], d["tokens"]) / sum(d["tokens"])
        assert weighted == pytest.approx(res["heldout"][name]["overall"]["loss"], rel=1e-4), name
    comps = {c["name"]: c for c in res["comparisons"]["held-out loss vs sft"]}
    assert set(comps) == {R.LOSS_RUN, R.GAIN_RUN}
    for name, c in comps.items():
        test = stats.ttest_rel(per_dialogue[name]["loss"], per_dialogue["sft"]["loss"])
        assert c["n"] == len(per_dialogue["sft"]["loss"]), name
        assert c["p"] == pytest.approx(test.pvalue, rel=1e-9), name
