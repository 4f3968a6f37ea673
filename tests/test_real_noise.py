"""bench/real_noise.py: the noise injector against its labels, the ROC AUC against scipy and a pairwise count, and a
tiny end-to-end run whose flag tables are recounted by hand from units.jsonl."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import real_noise as R  # noqa: E402


@pytest.fixture(scope="module")
def dialogues(fixtures_dir):
    return R.load_mtbench101(fixtures_dir / "mt_bench_101" / "mtbench101.jsonl")[:80]


def assistant_turns(conv):
    return [(i, m) for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"]


def test_each_kind_does_what_its_label_says(dialogues):
    before = json.dumps(dialogues)
    noisy = R.inject(dialogues, 0.5, seed=3)
    assert json.dumps(dialogues) == before  # the input is left alone
    replies = {(ci, i): m["content"] for ci, c in enumerate(dialogues) for i, m in assistant_turns(c)}
    seen = set()
    for ci, (orig, conv) in enumerate(zip(dialogues, noisy)):
        assert [m["role"] for m in conv["messages"]] == [m["role"] for m in orig["messages"]]
        for i, m in enumerate(conv["messages"]):
            if m["role"] == "user":
                assert m == orig["messages"][i]
                continue
            ref, text, kind = orig["messages"][i]["content"], m["content"], m["noise_type"]
            assert m["reference"] == ref and m["noisy"] == (kind is not None)
            seen.add(kind)
            if kind is None:
                assert text == ref
                continue
            assert text != ref, kind
            if kind == "echo":
                assert text == conv["messages"][i - 1]["content"]
            elif kind == "shuffled":
                assert sorted(text.split()) == sorted(ref.split()) and text.split() != ref.split()
            elif kind == "truncated":
                assert ref.startswith(text) and text.strip() and ref[len(text)].isspace()  # cut at a word boundary
            elif kind == "wrong_same_dialogue":
                assert text in [replies[(ci, j)] for j, _ in assistant_turns(orig) if j != i]
            elif kind == "off_topic":
                assert any(text == r for (cj, _), r in replies.items()
                           if dialogues[cj]["messages"][0]["content"] != orig["messages"][0]["content"])
    assert seen == {None, *R.KINDS}


def test_rate_shares_and_determinism(dialogues):
    n = sum(len(assistant_turns(c)) for c in dialogues)
    for rate in (0.0, 0.23, 0.5):
        kinds = [m["noise_type"] for c in R.inject(dialogues, rate, seed=1) for _, m in assistant_turns(c)
                 if m["noisy"]]
        assert len(kinds) == round(rate * n)
        counts = [kinds.count(k) for k in R.KINDS]
        assert max(counts) - min(counts) <= 1
    a, b = R.inject(dialogues, 0.3, seed=7), R.inject(dialogues, 0.3, seed=7)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(R.inject(dialogues, 0.3, seed=8))
    only = R.inject(dialogues, 0.3, kinds=("echo", "truncated"), seed=7)
    assert {m["noise_type"] for c in only for _, m in assistant_turns(c)} == {None, "echo", "truncated"}
    with pytest.raises(R.BenchError):
        R.inject(dialogues, 0.3, kinds=("echo", "nonsense"))
    with pytest.raises(R.BenchError):
        R.inject(dialogues, 1.5)


def test_auc_against_pairs_and_scipy():
    from scipy.stats import mannwhitneyu
    rng = np.random.default_rng(0)
    for n1, n0 in ((1, 1), (3, 7), (40, 25)):
        pos, neg = rng.integers(0, 6, n1).astype(float), rng.integers(0, 6, n0).astype(float)  # many ties
        pairs = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        assert R.auc(pos, neg) == pytest.approx(pairs, abs=1e-12)
        assert R.auc(pos, neg) == pytest.approx(mannwhitneyu(pos, neg).statistic / (n1 * n0), abs=1e-12)
        assert R.auc(pos, neg) + R.auc(-pos, -neg) == pytest.approx(1.0)
    assert R.auc([2, 3], [0, 1]) == 1.0 and R.auc([0, 1], [2, 3]) == 0.0 and R.auc([1, 1], [1]) == 0.5
    assert math.isnan(R.auc([], [1.0])) and math.isnan(R.auc([1.0], [math.nan]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny random llama with SmolLM2's tokenizer and chat template (bench/speed.py's, written by transformers)."""
    from speed import make_tiny_model
    return Path(make_tiny_model(tmp_path_factory.mktemp("real_noise") / "tiny", smollm2_dir))


def test_quick_run_end_to_end(tiny, fixtures_dir, tmp_path):
    out = tmp_path / "rn"
    res = R.run(tiny, out, seed=1, quick=True, data=fixtures_dir / "mt_bench_101" / "mtbench101.jsonl")
    assert json.loads((out / "results.json").read_text())["runs"].keys() == {"sft", "resure", "resure+gain"}
    assert "A loss threshold cannot see" in (out / "results.md").read_text()
    assert set(res["heldout"]) == {"base", "sft", "resure", "resure+gain"}
    assert all(math.isfinite(h["overall"]["loss"]) for h in res["heldout"].values())
    for k, v in res["detectability"].items():
        assert k == "clean" or 0 <= v["auc_loss"] <= 1 and v["auc_gain_low"] + v["auc_gain_high"] == pytest.approx(1)
    assert res["replay"]["reproduces_run"]
    # the flag tables recounted from units.jsonl: the last judged record of each turn against the data's labels
    convs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    from data import ChatTemplate, build_examples
    examples = build_examples(convs, ChatTemplate.from_pretrained(tiny), R.PRESETS["quick"]["max_len"], None)[0]
    for name in ("resure", "resure+gain"):
        units = [json.loads(line) for line in (out / "runs" / name / "units.jsonl").read_text().splitlines()]
        last = {(u["sample"], u["turn"]): u for u in units if not u["warmup"] and not u["skipped"]}
        kind = {key: (lambda m: m["noise_type"] if m["noisy"] else "clean")(
            [m for m in convs[examples[key[0]]["conv_index"]]["messages"] if m["role"] == "assistant"][key[1] - 1])
            for key in last}
        for view in ("any", "loss", "gain") if name == "resure+gain" else ("any", "loss"):
            hit = {key: u["flagged"] if view == "any" else view in (u["view"] or "").split("+")
                   for key, u in last.items()}
            t = res["runs"][name]["flagging"][view]["last"]
            tp = sum(hit[k] and kind[k] != "clean" for k in last)
            assert (t["units"], t["flagged"], t["tp"]) == (len(last), sum(hit.values()), tp)
            for k in R.KINDS:
                n = sum(kind[x] == k for x in last)
                if n:
                    assert t["by_kind"][k]["recall"] == pytest.approx(sum(hit[x] for x in last if kind[x] == k) / n)
