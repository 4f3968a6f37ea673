"""bench/speed.py and bench/noise.py end to end on a tiny random llama (CI smoke: the numbers mean
nothing at this size, but every table must hold them, and what can be checked against an oracle is),
and the shared report statistics (bench/bench_report.py) against scipy."""
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from conftest import tiny_setup  # noqa: E402

NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny random llama (written by transformers) that speaks SmolLM2's tokenizer and chat
    template."""
    from machine import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("bench") / "tiny", tokenizer_dir=smollm2_dir)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def table_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if not set(line) <= set("|-")]


# ----------------------------------------------------------------------------------------- speed.py
@pytest.mark.slow
def test_speed_tiny(tiny, tmp_path, keep_threads, capsys):
    import speed
    r = speed.main(["--tiny", "--model", tiny, "--threads", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    md = (tmp_path / "speed.md").read_text()
    assert md.strip() in printed
    for fact in ("Machine: ", f"torch {torch.__version__}", "1 threads", " cores"):
        assert fact in md, fact
    rows = {row[0]: row for row in table_rows(md)[1:]}
    resure = "ReSURE overhead over a plain SFT step (ours)"
    wanted = ["LoRA train step, fp32", "LoRA train step, bf16", "peak memory of training, fp32",
              f"{resure}, fp32", f"{resure}, bf16", "greedy generation, batch 1, fp32",
              "greedy generation, batch 3, fp32", "checkpoint load, fp32, first in a fresh process",
              "checkpoint load, fp32, repeated in one process",
              "training throughput / matmul peak, fp32", "training throughput / matmul peak, bf16"]
    for w in wanted:
        row = next((v for k, v in rows.items() if k.startswith(w)), None)
        assert row is not None, f"no row {w!r} in\n{md}"
        for cell in row[1:4]:  # ours, theirs, ratio: each holds a finite number
            m = NUM.search(cell)
            assert m, (w, cell)
            assert math.isfinite(float(m.group())), (w, cell)
    saved = json.loads((tmp_path / "speed.json").read_text())
    for d in ("fp32", "bf16"):
        tr = saved["train"][d]
        assert tr["tokens_per_s"]["ours"] > 0, d
        assert tr["tokens_per_s"]["hf"] > 0, d
        assert len(tr["seconds"]["ours"]) == speed.PRESETS["tiny"]["reps"], d
        assert len(tr["seconds"]["hf"]) == speed.PRESETS["tiny"]["reps"], d
        assert saved["matmul_peak"][d]["peak"] > 0, d
        assert tr["resure"]["overhead"] > 0, d
    # both sides computed the same loss on the same batch before any update (transformers: oracle)
    first = saved["train"]["fp32"]["first_loss"]
    assert first["ours"] == pytest.approx(first["hf"], rel=1e-4)
    for name, side in saved["memory"]["fp32"].items():  # the peak counter was reset, then grew
        assert side["hwm_reset"], name
        assert side["delta_mib"] > 0, name
    cold = saved["load"]["fp32"]["cold_seconds"]
    assert len(cold["ours"]) == 1
    assert len(cold["hf"]) == 1
    assert min(cold["ours"] + cold["hf"]) > 0
    gen = saved["generate"]["fp32"]
    ceiling = gen.pop("ceiling")
    assert set(gen) == {"1", "3"}
    for batch, g in gen.items():
        assert g["tokens_per_s"]["ours"] > 0, batch
        assert g["same_tokens"] == 1.0, batch  # greedy fp32: transformers' generate is the oracle
    from transformers import AutoModelForCausalLM
    n_params = AutoModelForCausalLM.from_pretrained(tiny).num_parameters()  # tied head once
    assert ceiling["weight_bytes"] == 4 * n_params
    assert ceiling["copy_bytes_per_s"] > 0
    assert any(k.startswith("batch-1 decoding ceiling, fp32") for k in rows)
    # useful FLOPs: 2*dense + 3*lora + 3*attention + 2*head, recomputed here from the config by hand
    cfg = json.loads((Path(tiny) / "config.json").read_text())
    D, I, L, V = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "vocab_size"))
    H = cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"]
    hd = D // H
    B = speed.PRESETS["tiny"]["batch"]
    T = speed.PRESETS["tiny"]["length"]
    rk = speed.PRESETS["tiny"]["rank"]
    lin = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, I), (D, I), (I, D)]
    dense = 2 * 2 * L * sum(i * o for i, o in lin) * B * T
    lora = 3 * 2 * L * sum(rk * (i + o) for i, o in lin) * B * T
    attention = 3 * L * B * H * 4 * hd * T * (T + 1) / 2
    head = 2 * 2 * D * V * saved["train"]["fp32"]["supervised"]
    assert saved["train"]["fp32"]["flops"] == pytest.approx(dense + lora + attention + head,
                                                            rel=1e-12)
    assert r["preset"] == "tiny"


def test_speed_bad_model_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.strip() == f"speed.py: error: --model {tmp_path}: no config.json there"


def test_speed_chat_batch_is_half_supervised():
    from speed_steps import chat_batch
    b, n_sup = chat_batch(1000, 4, 256)
    sup = b["labels"] != -100
    assert n_sup == int(sup[:, 1:].sum())
    assert 0.35 < sup.float().mean() < 0.65
    assert torch.equal(b["labels"][sup], b["input_ids"][sup])
    assert not sup[:, 0].any()
    assert bool((b["turn_ids"][sup] >= 1).all())
    assert not bool(b["turn_ids"][~sup].any())
    last_turns = [min(int(t[s].max()), 8) for t, s in zip(b["turn_ids"], sup)]
    assert b["group"].tolist() == last_turns  # the group of a row: its last supervised turn


# ------------------------------------------------------------------------------------- statistics
def test_t_distribution_against_scipy():
    from scipy import special, stats
    from bench_report import regularized_beta, t_quantile, t_tail
    for df in (1, 2, 3, 4.5, 10, 30, 200):
        for t in (-40.0, -2.5, -0.3, 0.0, 0.1, 1.0, 1.96, 4.3, 12.0, 1e4):
            assert t_tail(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-10, abs=1e-300), (df, t)
        for p in (1e-6, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-12), \
                (df, p)
    for a, b in ((0.5, 0.5), (1.0, 3.0), (2.5, 0.5), (15.0, 40.0), (100.0, 0.5)):
        for x in (1e-4, 0.1, 0.5, 0.77, 0.999):
            want = special.betainc(a, b, x)
            assert regularized_beta(x, a, b) == pytest.approx(want, rel=1e-11), (x, a, b)
    assert t_tail(math.inf, 3) == 0.0
    assert t_tail(-math.inf, 3) == 1.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


@pytest.mark.parametrize("counts, low, high", [
    ((56, 70, 48, 80), 0.0524, 0.3339),   # Newcombe (1998), Table II, example (a), method 10
    ((9, 10, 3, 10), 0.1705, 0.8090),     # example (b)
])
def test_proportion_interval_against_newcombe(counts, low, high):
    from bench_report import compare_proportions
    c = compare_proportions("x", "ref", *counts)
    assert c.low == pytest.approx(low, abs=5e-5)
    assert c.high == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("counts", [(62, 97, 53, 97), (11, 114, 65, 114), (5, 40, 9, 60)])
def test_proportion_p_against_scipy(counts):
    """The pooled two-proportion z-test's p equals the uncorrected chi-square test's."""
    from scipy import stats
    from bench_report import compare_proportions
    hits, total, reference_hits, reference_total = counts
    table = [[hits, total - hits], [reference_hits, reference_total - reference_hits]]
    want = stats.chi2_contingency(table, correction=False).pvalue
    c = compare_proportions("x", "ref", *counts)
    assert c.p == pytest.approx(want, rel=1e-9)
    assert c.mean == pytest.approx(hits / total - reference_hits / reference_total)


def test_paired_comparison_against_scipy():
    from scipy import stats
    from bench_report import compare, paired_differences
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        a = rng.normal(0.5, 0.1, n)
        b = a - rng.normal(0.03, 0.05, n)
        c = compare("x", "H", paired_differences(dict(enumerate(a)), dict(enumerate(b))))
        test = stats.ttest_rel(a, b)
        d = a - b
        low, high = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
        assert c.n == n
        assert c.mean == pytest.approx(d.mean(), rel=1e-12)
        assert c.p == pytest.approx(test.pvalue, rel=1e-9), n
        assert c.low == pytest.approx(low, rel=1e-9), n
        assert c.high == pytest.approx(high, rel=1e-9), n
    # a seed missing on one side, or a value that is not a number, is left out of the pairing
    assert paired_differences({1: 0.5, 2: 0.7, 4: None}, {2: 0.6, 3: 0.1, 4: 0.2}) == \
        pytest.approx([0.1])
    one = compare("x", "H", [0.1])
    assert one.n == 1
    assert math.isnan(one.low)
    assert math.isnan(one.p)
    assert not one.resolved
    same = compare("x", "H", [-0.25, -0.25, -0.25])  # no spread: the t statistic is infinite
    assert same.p == 0.0
    assert same.low == -0.25
    assert compare("x", "H", [0.0, 0.0]).p == 1.0


def holm_by_hand(ps):
    """Holm's adjusted p: max over j <= i of min(1, (m - j + 1) p_(j)), ranks i from 1."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    m = len(ps)
    adjusted = [0.0] * m
    for i, k in enumerate(order, 1):
        adjusted[k] = max(min(1.0, (m - j + 1) * ps[order[j - 1]]) for j in range(1, i + 1))
    return adjusted


def test_holm_adjustment():
    from bench_report import holm
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.001, 0.2, 0.5, 0.03]) == pytest.approx([0.004, 0.4, 0.5, 0.09])
    ps = list(np.random.default_rng(1).uniform(0, 0.2, 9))
    assert holm(ps) == pytest.approx(holm_by_hand(ps))
    got = holm([0.02, math.nan, 0.04])  # no test: left out of the family
    assert got[0] == pytest.approx(0.04)
    assert math.isnan(got[1])
    assert got[2] == pytest.approx(0.04)


ACCURACY = {  # per seed 1..5; x beats sft beyond doubt where noise is added, y never resolves
    ("sft", "H"): [0.60, 0.62, 0.58, 0.61, 0.59],
    ("sft", "H+N"): [0.50, 0.50, 0.49, 0.50, 0.49],
    ("sft", "H+N+L"): [0.40, 0.44, 0.36, 0.42, 0.38],
    ("x", "H"): [0.60, 0.63, 0.57, 0.61, 0.595],
    ("x", "H+N"): [0.59, 0.61, 0.59, 0.62, 0.57],
    ("x", "H+N+L"): [0.55, 0.64, 0.53, 0.61, 0.56],
    ("y", "H"): [0.65, 0.58, 0.61, 0.55, 0.61],
    ("y", "H+N"): [0.54, 0.45, 0.55, 0.47, 0.47],
    ("y", "H+N+L"): [0.43, 0.40, 0.40, 0.45, 0.35],
}
MIXES = ("H", "H+N", "H+N+L")


def synthetic_results():
    """Runs of three methods on three mixtures, five seeds; the loss falls as the accuracy rises."""
    return [dict(variant=v, mixture=m, seed=s, accuracy=acc[s - 1],
                 loss=2.0 - acc[s - 1] + 0.01 * s)
            for (v, m), acc in ACCURACY.items() for s in range(1, 6)]


def test_noise_comparisons_against_scipy():
    from scipy import stats
    from noise_report import comparisons
    families = comparisons(synthetic_results(), ["sft", "x", "y"], MIXES)
    got = {(c.name, c.setting): c for c in families["accuracy vs sft"]}
    assert sorted(got) == sorted((v, m) for v in ("x", "y") for m in MIXES)
    ps = []
    for (v, m), c in got.items():
        want = stats.ttest_rel(ACCURACY[v, m], ACCURACY["sft", m]).pvalue
        assert c.p == pytest.approx(want, rel=1e-9), (v, m)
        ps.append(c.p)
    for c, want in zip(got.values(), holm_by_hand(ps)):
        assert c.p_holm == pytest.approx(want, rel=1e-12), (c.name, c.setting)
    assert got["x", "H+N"].resolved
    assert got["x", "H+N+L"].resolved
    assert not got["x", "H"].resolved
    assert not any(got["y", m].resolved for m in MIXES)
    # the change from H against sft's: (x on H+N - x on H) - (sft on H+N - sft on H), per seed
    drop = {c.setting: c for c in families["from H vs sft's"] if c.name == "x"}
    per_seed = (np.subtract(ACCURACY["x", "H+N"], ACCURACY["x", "H"])
                - np.subtract(ACCURACY["sft", "H+N"], ACCURACY["sft", "H"]))
    assert drop["H -> H+N"].mean == pytest.approx(per_seed.mean(), rel=1e-12)
    assert drop["H -> H+N"].p == pytest.approx(stats.ttest_1samp(per_seed, 0).pvalue, rel=1e-9)
    regime = {c.setting: c for c in families["accuracy from H"] if c.name == "sft"}
    want = stats.ttest_rel(ACCURACY["sft", "H+N+L"], ACCURACY["sft", "H"]).pvalue
    assert regime["H -> H+N+L"].p == pytest.approx(want, rel=1e-9)


def test_noise_spearman_over_the_mixture_means():
    """The paper's Table 4: Spearman over the per-mixture means (one value per mixture); the pooled
    one over every (mixture, seed) run is kept beside it under its own name."""
    from scipy.stats import spearmanr
    from noise_report import summarize
    summary = summarize(synthetic_results(), ["sft", "x", "y"], MIXES)
    for v in ("sft", "x", "y"):
        means = [np.mean(ACCURACY[v, m]) for m in MIXES]
        want = spearmanr([1, 2, 4], means).statistic  # H+N+L is the fourth mixture
        assert summary[v]["spearman"]["accuracy"] == pytest.approx(want, abs=1e-12), v
        ranks = [r for r, m in zip((1, 2, 4), MIXES) for _ in range(5)]
        pooled = spearmanr(ranks, [a for m in MIXES for a in ACCURACY[v, m]]).statistic
        assert summary[v]["spearman_pooled"]["accuracy"] == pytest.approx(pooled, abs=1e-12), v


def test_noise_words_only_where_resolved():
    """'beats', 'flattens' and bold only for a comparison whose Holm-adjusted p is below 0.05;
    every other comparison reads 'no difference resolved'."""
    from noise_report import Context, findings
    saved = {"plan": {"mixtures": list(MIXES), "seeds": [1, 2, 3, 4, 5],
                      "methods": ["sft", "x", "y"]},
             "results": synthetic_results()}
    lines = findings(Context(saved))
    text = "\n".join(lines)
    x_accuracy = next(line for line in lines if line.startswith("- x vs sft, accuracy"))
    y_accuracy = next(line for line in lines if line.startswith("- y vs sft, accuracy"))
    assert "**x beats sft** on H+N:" in x_accuracy
    assert "**x beats sft** on H+N+L:" in x_accuracy
    assert "no difference resolved on H " in x_accuracy
    assert "beats" not in y_accuracy
    assert "**" not in y_accuracy
    assert "no difference resolved" in y_accuracy
    x_drop = next(line for line in lines if line.startswith("- x's change from H"))
    y_drop = next(line for line in lines if line.startswith("- y's change from H"))
    assert "**x flattens sft's drop** H -> H+N:" in x_drop
    assert "flattens" not in y_drop
    assert "sft from H to H+N+L" in text
    assert "noise hurts sft (resolved)" in text
    bold = re.findall(r"\*\*([^*]+)\*\*", text)
    assert all(b.startswith("x ") for b in bold), bold


# ---------------------------------------------------------------------------------------- noise.py
@pytest.mark.slow
def test_noise_tiny(tiny, tmp_path, keep_threads, capsys):
    import noise
    from noise_data import MIXTURES
    out = tmp_path / "noise"
    res = noise.main(["--tiny", "--model", tiny, "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    methods = list(noise.PRESETS["tiny"]["methods"])
    assert printed.startswith("noise.py tiny:")
    assert f"plan: {2 * 4 * len(methods)} training runs" in printed
    md = (out / "results.md").read_text()
    rows = table_rows(md.split("## Clean-test exact-match accuracy")[1].split("##")[0])
    assert [r[0] for r in rows[1:]] == ["base model (no training)"] + methods
    for r in rows[1:]:
        for cell in r[1:5]:
            assert NUM.match(cell), (r[0], cell)
    for section in ("## Data", "## Change from H", "## Clean-test loss", "## Difference to SFT",
                    "## Change from H against sft's change", "## Compute", "## Flagging",
                    "Per noise kind", "Per turn depth", "Per detector view",
                    "## What this run shows"):
        assert section in md, section
    saved = json.loads((out / "results.json").read_text())
    runs = saved["results"]
    assert not [r for r in runs if "error" in r]
    assert sorted((r["variant"], r["mixture"], r["seed"]) for r in runs) == sorted(
        (v, m, s) for v in methods for m in MIXTURES for s in (1, 2))
    check_data(out, saved)
    check_runs(saved, out)
    check_statistics(saved, methods)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
        assert not (out / "noise.png").exists()
    else:
        for figure in ("noise.png", "differences.png", "resure_dynamics.png"):
            assert (out / figure).stat().st_size > 1000, figure
    assert res["out"] == str(out)
    # resumable: the same command finds every run finished; --report rebuilds results.md from
    # results.json alone
    (out / "results.md").unlink()
    noise.main(["--tiny", "--model", tiny, "--out", str(out), "--threads", "1"])
    assert f"resuming: {len(runs)} of {len(runs)} runs already finished" in capsys.readouterr().out
    again = (out / "results.md").read_text()
    (out / "results.md").unlink()
    noise.main(["--report", str(out)])
    assert without_machine((out / "results.md").read_text()) == without_machine(again)
    assert without_machine(again) == without_machine(md)


def without_machine(text):
    return re.sub(r"^Machine:.*$", "", text, flags=re.M)


def check_data(out, saved):
    import noise
    from noise_data import MIXTURES
    preset = noise.PRESETS["tiny"]
    n = preset["n"]
    for s in ("1", "2"):
        st = saved["data"][s]
        assert [st[m]["dialogues"] for m in MIXTURES] == [n, 2 * n, 2 * n, 3 * n]
        for m in MIXTURES:  # a step trains `batch` dialogues: epochs are passes over the file
            lines = (out / f"data-seed{s}" / f"mix_{m}.jsonl").read_text().splitlines()
            assert st[m]["steps"] == math.ceil(preset["epochs"] * len(lines) / preset["batch"])
        frac = {m: st[m]["noisy"] / st[m]["turns"] for m in MIXTURES}
        assert frac["H"] == 0
        assert 0 < frac["H+N"] < frac["H+L"]
        assert frac["H+N"] < frac["H+N+L"]
        kept = (out / f"data-seed{s}" / "mix_H+N+L.scores").read_text().split()
        assert len(kept) == 3 * n
        assert saved["prefilter"][s]["H+N+L"]["kept"] == math.floor(0.75 * 3 * n + 0.5)


def check_runs(saved, out):
    from noise_run import VARIANTS
    for r in saved["results"]:
        where = (r["variant"], r["mixture"], r["seed"])
        assert 0 <= r["accuracy"] <= 1, where
        # the run's train.py flags are in its result, the output folder named OUT
        flags = r["flags"]
        assert flags[flags.index("--unit") + 1] == VARIANTS[r["variant"]]["unit"], where
        assert flags[flags.index("--seed") + 1] == str(r["seed"]), where
        assert not [x for x in flags if str(out) in x], where
        assert r["loss"] > 0, where
        # same final training compute: every method trains its mixture's steps
        steps = saved["data"][str(r["seed"])][r["mixture"]]["steps"]
        assert r["compute"]["optimizer_steps"] == steps, where
        if r["variant"] == "sft":
            continue
        a = r["flagging"]["all"]
        assert a["tp"] <= min(a["flagged"], a["noisy"]), where
        assert a["flagged"] <= a["units"], where
        assert r["trajectory"][-1]["step"] == r["compute"]["optimizer_steps"], where
        if r["mixture"] == "H":
            assert a["noisy"] == 0, where  # tier H carries no injected noise
        if VARIANTS[r["variant"]]["detector"] == "loss+gain":  # flagged: either view flags it
            views = r["flagging"]["by_view"]
            loss = views["loss"]["all"]["flagged"]
            gain = views["gain"]["all"]["flagged"]
            assert max(loss, gain) <= a["flagged"], where
            assert a["flagged"] <= loss + gain, where
            assert r["compute"]["forward_tokens"] > 0, where  # the free rows and warm-up set


def check_statistics(saved, methods):
    """Spearman and the paired comparisons of results.json, recomputed with scipy."""
    from scipy import stats
    from noise_data import MIXTURES
    runs = saved["results"]
    for v in methods:
        mine = [r for r in runs if r["variant"] == v]
        ranks = [MIXTURES.index(r["mixture"]) + 1 for r in mine]
        want = stats.spearmanr(ranks, [r["loss"] for r in mine]).statistic
        got = saved["summary"][v]["spearman_pooled"]["loss"]
        assert got == pytest.approx(want, abs=1e-12), v
        means = [np.mean([r["loss"] for r in mine if r["mixture"] == m]) for m in MIXTURES]
        want = stats.spearmanr([1, 2, 3, 4], means).statistic
        assert saved["summary"][v]["spearman"]["loss"] == pytest.approx(want, abs=1e-12), v
    loss = {(r["variant"], r["mixture"], r["seed"]): r["loss"] for r in runs}
    for c in saved["comparisons"]["loss vs sft"]:
        a = [loss[c["name"], c["setting"], s] for s in (1, 2)]
        b = [loss["sft", c["setting"], s] for s in (1, 2)]
        assert c["n"] == 2
        assert c["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
        assert c["resolved"] == (c["p_holm"] < 0.05)


@pytest.mark.slow
def test_noise_runs_the_baselines_beside_sft(tmp_path, smollm2_dir, keep_threads):
    """bench/noise.py runs ILR, DPO and RobustFT (baselines/) on a mixture beside SFT and reports
    their compute and label accuracy from their own report.json. The tiny model emits tokens
    (conftest.tiny_setup), so ILR proposes and asks its comparator and RobustFT relabels; DPO may
    find no pair with one right answer on a random model: then it is a one-line failure in the
    table, never a crash."""
    import noise
    model = tiny_setup(tmp_path, smollm2_dir, n_train=2, n_test=1) / "tiny"
    out = tmp_path / "noise"
    names = ["sft", "ilr[oracle]", "ilr[naive]", "dpo", "robustft"]
    noise.main(["--tiny", "--model", str(model), "--out", str(out), "--threads", "1", "--seeds",
                "1", "--mixtures", "H+N+L", "--methods", ",".join(names)])
    saved = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in saved["results"]}
    assert sorted(runs) == sorted(names)
    md = (out / "results.md").read_text()
    for name in ("ilr[oracle]", "ilr[naive]", "robustft"):
        r = runs[name]
        rep = json.loads((out / "runs" / "seed1" / "H+N+L" / name / "report.json").read_text())
        assert "error" not in r, name
        assert r["compute"] == rep["compute"], name
        assert r["compute"]["generated_tokens"] > 0, name
        acc = rep["label_accuracy"]
        if name != "robustft":  # round 0, then two halves and a retrain per round
            assert r["compute"]["trainings"] == 1 + 3 * rep["rounds"], name
            assert rep["per_round"][1]["differing"] > 0, name
            # feedback only with a comparator
            assert (r["compute"]["comparisons"] > 0) == (name == "ilr[oracle]"), name
            acc = acc[-1]
        assert r["label_accuracy"] == pytest.approx(acc), name
        assert f"| {name} | " in md.split("label accuracy (%)")[1], name
    r = runs["dpo"]
    if "error" in r:
        assert "\n" not in r["error"]
        assert "dpo: 1 run(s)" in md.split("Failed runs")[1].split("\n")[0]
    else:
        assert r["compute"]["comparisons"] > 0
        assert r["compute"]["generated_tokens"] > 0


def test_noise_flagging_per_kind_depth_and_view(tmp_path):
    from noise_run import flagging
    ex = [{"meta": {"noisy": [False, True, True], "noise_type": [None, "echo", "wrong"]},
           "n_turns": 3},
          {"meta": {"noisy": [False, False], "noise_type": [None, None]}, "n_turns": 2}]
    recs = [  # (sample, turn, flagged, view, warmup, skipped)
        (0, 1, False, None, True, False),     # warm-up: no decision
        (0, 2, True, "gain", False, False), (0, 3, True, "loss+gain", False, False),
        (1, 1, True, "loss", False, False), (1, 2, False, None, False, False),
        (0, 3, False, None, False, True),     # a skipped step: left out
        (0, 1, False, None, False, False)]
    with open(tmp_path / "units.jsonl", "w") as f:
        for s, t, flagged, view, warm, skipped in recs:
            f.write(json.dumps({"sample": s, "turn": t, "group": t, "flagged": flagged,
                                "view": view, "warmup": warm, "skipped": skipped,
                                "weight": 0.5 if flagged else 1.0}) + "\n")
    fl = flagging(tmp_path / "units.jsonl", ex, views=True)
    a = fl["all"]
    assert a["units"] == 5
    assert a["noisy"] == 2
    assert a["flagged"] == 3
    assert a["tp"] == 2
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["recall"] == 1.0
    assert a["weight_noisy"] == 0.5
    assert fl["by_kind"]["echo"]["recall"] == 1.0
    assert fl["by_kind"]["clean"]["flag_rate"] == pytest.approx(1 / 3)
    assert fl["by_depth"][1]["flagged"] == 1
    assert fl["by_depth"][3]["tp"] == 1
    loss = fl["by_view"]["loss"]
    gain = fl["by_view"]["gain"]
    assert loss["all"]["flagged"] == 2
    assert loss["all"]["tp"] == 1
    assert gain["all"]["flagged"] == 2
    assert gain["all"]["tp"] == 2
    assert gain["by_kind"]["echo"]["recall"] == 1.0
    assert loss["by_kind"]["echo"]["recall"] == 0.0


def test_bad_input_is_one_line_error(tmp_path):
    import noise
    import speed
    with pytest.raises(noise.BenchError, match="unknown bogus"):
        noise.main(["--methods", "sft,bogus", "--out", str(tmp_path)])
    with pytest.raises(speed.BenchError, match="no config.json"):
        speed.main(["--model", str(tmp_path), "--skip-memory"])
    p = subprocess.run([sys.executable, "bench/noise.py", "--methods", "bogus", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1
    assert "bogus" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "bench/noise.py", "--report", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == f"noise.py: error: --report {tmp_path}: no results.json there\n"


def test_noise_rates_reach_the_data(tmp_path):
    """--rate-n / --rate-l set the injection rates of tiers N and L: 0 leaves a tier clean; 1 makes
    every last turn noisy (the late profile weights turn k of n by 2k / (n + 1), capped at 1).
    Counted from the files."""
    import noise
    from noise_data import make_data
    plan = noise.make_plan(noise.parse_args(["--tiny", "--rate-n", "0", "--rate-l", "1"]))
    _, stats = make_data(tmp_path, 7, plan)
    folder = tmp_path / "data-seed7"
    turns = {}
    for t in "NL":
        lines = (folder / f"train_{t}.jsonl").read_text().splitlines()
        turns[t] = [[m for m in json.loads(line)["messages"] if m["role"] == "assistant"]
                    for line in lines]
    assert turns["N"]
    assert not any(m["noisy"] for d in turns["N"] for m in d)
    assert all(d[-1]["noisy"] for d in turns["L"])
    assert sum(m["noisy"] for d in turns["L"] for m in d) > 0.6 * sum(map(len, turns["L"]))
    meta = json.loads((folder / "synth_meta.json").read_text())
    assert meta["rates"] == {"H": 0, "N": 0, "L": 1}
    assert stats["H+N"]["noisy"] == 0
    assert stats["H+L"]["noisy"] > 0
    with pytest.raises(SystemExit):  # argparse: a rate is a number
        noise.parse_args(["--rate-l", "high"])


@pytest.mark.slow
def test_noise_stops_on_a_signal_and_resumes(tiny, tmp_path, keep_threads, capsys, monkeypatch):
    """train.py exits 143 after SIGTERM (tests/test_reliability.py): the experiment stops there
    with one line, keeps the finished run, records nothing for the stopped one, and the same
    command does only what is left."""
    import noise
    import train
    argv = ["--tiny", "--model", tiny, "--out", str(tmp_path), "--methods", "sft", "--mixtures",
            "H", "--threads", "1"]
    real = train.main
    calls = []

    def stopped_second(a):
        calls.append(a)
        if len(calls) == 2:
            raise SystemExit(143)
        return real(a)
    monkeypatch.setattr(train, "main", stopped_second)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        noise.main(argv)
    assert e.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"noise.py: stopped by a signal; 1 of 2 runs are finished in {tmp_path} "
                       "and the same command goes on from there")
    done = sorted(tmp_path.glob("runs/*/H/sft/result.json"))
    assert [p.parent.parent.parent.name for p in done] == ["seed1"]
    assert "error" not in json.loads(done[0].read_text())
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["invocations"] == 1
    assert first["wall_s"] == first["this_wall_s"]
    assert first["wall_s"] > 0
    monkeypatch.setattr(train, "main", real)
    noise.main(argv)
    assert "resuming: 1 of 2 runs already finished" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in saved["results"]) == [1, 2]
    assert not [r for r in saved["results"] if "error" in r]
    # the wall time counts both invocations, not only the one that resumed
    assert saved["invocations"] == 2
    assert saved["wall_s"] == pytest.approx(first["wall_s"] + saved["this_wall_s"])
    run_min = sum(r["train_s"] + r["eval_s"] for r in saved["results"]) / 60
    head = (tmp_path / "results.md").read_text().splitlines()[2]
    assert (f"for 2 of 2 runs over 2 invocations (resumed); the runs' own training and "
            f"evaluation: {run_min:.1f} min") in head


class FakeProcess:
    """A worker that exits with `code` at its first poll; code None: running for three polls, then
    done (exit 0)."""

    def __init__(self, code):
        self.returncode = code
        self.terminated = False
        self.polls = 0

    def poll(self):
        self.polls += 1
        if self.returncode is None and self.polls > 3:
            self.returncode = 0
        return self.returncode

    def terminate(self):
        self.terminated = True

    def wait(self):
        return self.returncode


def test_noise_pool_stops_when_a_worker_was_stopped(monkeypatch, tmp_path):
    """With --jobs > 1, a worker that exits 143 (or dies of SIGTERM) stops the pool; the other
    workers are sent SIGTERM and waited for, and no result is recorded for either."""
    import pool
    monkeypatch.setattr(pool, "POLL_S", 0.0)
    for code, want in ((143, 143), (-15, 143), (130, 130)):
        processes = iter([FakeProcess(code), FakeProcess(None)])
        made = []

        def popen(*args, **kwargs):
            made.append(next(processes))
            return made[-1]
        monkeypatch.setattr(pool.subprocess, "Popen", popen)
        jobs = [dict(run_dir=str(tmp_path / f"r{i}"), sig=str(i), name="sft", mixture="H", seed=1)
                for i in (0, 1)]
        got = []
        with pytest.raises(SystemExit) as e:
            pool.run_pool(jobs, 2, got.append)
        assert e.value.code == want, code
        assert got == [], code
        assert made[1].terminated, code
        assert made[1].returncode is None, code


# ------------------------------------------------------------------------ the paper's configuration
def flag_values(argv):
    """{flag: value} of a train.py command line (a flag without a value maps to True)."""
    out = {}
    for i, x in enumerate(argv):
        if x.startswith("--"):
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            out[x] = True if following.startswith("--") else following
    return out


def test_cpu_preset_runs_the_paper_and_its_variants(tmp_path):
    """--cpu: seven configurations on H and H+N+L, seeds 0-4. resure carries the paper's flags;
    every other configuration differs from it by exactly the flags its name says (sft: the method
    alone, and no warm-up set)."""
    import noise
    from noise_data import make_data
    from noise_run import make_job
    plan = noise.make_plan(noise.parse_args(["--cpu"]))
    assert plan["seeds"] == [0, 1, 2, 3, 4]
    assert plan["mixtures"] == ["H", "H+N+L"]
    assert len(plan["methods"]) == 7
    paths, _ = make_data(tmp_path, 0, plan)
    flags = {}
    for name in plan["methods"]:
        job = make_job(plan, name, 0, "H+N+L", paths, tmp_path / "model",
                       tmp_path / "runs" / "seed0" / "H+N+L" / name)
        flags[name] = flag_values(job["argv"])
    paper = flags["resure"]
    want = {"--method": "resure", "--unit": "dialogue", "--stats": "welford",
            "--stats-update": "reliable", "--alpha": "1.0", "--floor-percentile": "5",
            "--floor-over": "all", "--detector": "loss", "--ramp-steps": "5",
            "--warmup-samples": "0", "--warmup-data": str(paths["warm"])}
    for flag, value in want.items():
        assert paper[flag] == value, flag
    # sft weighs nothing and hard floors nothing: train.py refuses the flags that would idle
    weighing = [f for f in want if f not in ("--method", "--unit")]
    changes = {
        "sft": dict({f: None for f in weighing}, **{"--method": "sft"}),
        "resure[turn]": {"--unit": "turn"},
        "resure[turn,ema/winsorized]": {"--unit": "turn", "--stats": "ema",
                                        "--stats-update": "winsorized"},
        "hard": {"--method": "hard", "--floor-percentile": None, "--floor-over": None},
        "resure[floor:flagged]": {"--floor-over": "flagged"},
        "resure[turn,ema/winsorized,loss+gain]": {"--unit": "turn", "--stats": "ema",
                                                  "--stats-update": "winsorized",
                                                  "--detector": "loss+gain"},
    }
    assert sorted(changes) == sorted(m for m in plan["methods"] if m != "resure")
    for name, change in changes.items():
        differs = {k: flags[name].get(k) for k in set(paper) | set(flags[name])
                   if flags[name].get(k) != paper.get(k) and k != "--out"}
        assert differs == change, name


def test_a_run_is_known_wherever_its_folders_lie(tmp_path):
    """A finished run's identity names the output folder OUT and the model by its files' digest:
    the same run in a moved folder, with the model elsewhere, has the same signature; another
    model has another one."""
    import noise
    from noise_data import make_data
    from noise_run import make_job
    from pool import model_sha
    plan = noise.make_plan(noise.parse_args(["--tiny"]))
    sigs = []
    for place in ("a", "b"):
        out = tmp_path / place / "out"
        model = tmp_path / place / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"hidden_size": 8}')
        (model / "model.safetensors").write_bytes(b"weights")
        paths, _ = make_data(out, 1, plan)
        plan["model_id"] = model_sha(model)
        job = make_job(plan, "resure", 1, "H", paths, model, out / "runs" / "seed1" / "H" / "x")
        sigs.append(job["sig"])
        assert not [x for x in job["flags"] if str(tmp_path) in x]
    assert sigs[0] == sigs[1]
    (model / "model.safetensors").write_bytes(b"other weights")
    plan["model_id"] = model_sha(model)
    job = make_job(plan, "resure", 1, "H", paths, model, out / "runs" / "seed1" / "H" / "x")
    assert job["sig"] != sigs[1]


def test_method_names_keep_their_commas():
    import noise
    text = "sft, resure[turn,ema/winsorized],hard,,resure[turn,ema/winsorized,loss+gain]"
    got = noise.names(text)
    assert got == ["sft", "resure[turn,ema/winsorized]", "hard",
                   "resure[turn,ema/winsorized,loss+gain]"]
    plan = noise.make_plan(noise.parse_args(["--tiny", "--methods", ",".join(got)]))
    assert plan["methods"] == got


# -------------------------------------------------------------------------------------- tables.py
def test_tables_match_the_committed_results(capsys):
    """Every experiment table of README.md, bench/README.md and docs/method.md is what
    bench/tables.py writes from the committed results: run `python bench/tables.py` when this
    fails."""
    import tables
    code = tables.main(["--check"])
    assert code == 0, capsys.readouterr().out


def test_tables_check_names_a_stale_table(tmp_path, capsys):
    import tables
    for document in tables.DOCUMENTS:
        (tmp_path / document).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / document).write_text((ROOT / document).read_text())
    readme = tmp_path / "README.md"
    lines = readme.read_text().split("\n")
    where = lines.index("<!-- table: noise/accuracy -->")
    lines.insert(where + 1, "| sft | 69.4 | 50.5 | 10 of 10 |")  # a number typed by hand
    readme.write_text("\n".join(lines))
    assert tables.main(["--check", "--root", str(tmp_path)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"README.md:{where + 1}: table noise/accuracy differs from its results "
                       "(python bench/tables.py rewrites it)"]
    assert tables.main(["--root", str(tmp_path)]) == 0
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert tables.main(["--check", "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize("planned, opening", [
    (30, "Yes: resure has accuracy on H+N+L resolved above sft's"),
    (40, "Not answered yet (30 of 40 runs finished); so far resure has accuracy on H+N+L"),
])
def test_the_papers_question_is_answered_from_the_accuracy_vs_sft_family(tmp_path, planned,
                                                                          opening):
    """resure (x) beats sft on H+N+L beyond doubt and does not lose on H; hard (y) resolves
    nothing: the answer names resure alone, and says it is provisional while runs are missing."""
    import tables
    names = {"x": "resure", "y": "hard"}
    results = [dict(r, variant=names.get(r["variant"], r["variant"]))
               for r in synthetic_results() if r["mixture"] != "H+N"]
    plan = {"preset": "cpu", "mixtures": ["H", "H+N+L"], "seeds": [1, 2, 3, 4, 5],
            "methods": ["sft", "resure", "hard"], "kinds": {}}
    saved = {"plan": plan, "results": results, "runs_planned": planned, "base": {}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    lines = tables.answer(tables.Noise(tmp_path / "results.json"))
    assert lines[2].startswith(opening)
    rows = {r[0]: r for r in table_rows("\n".join(lines))}
    assert rows["resure"][3] == "beats sft on H+N+L"
    assert rows["hard"][3] == "no difference resolved on H+N+L"


def test_tables_bad_markers_are_one_line_errors(tmp_path):
    import tables
    cases = {
        "<!-- table: noise/bogus -->\n<!-- /table -->\n": "doc.md:1: unknown table 'noise/bogus'",
        "text\n<!-- table: noise/accuracy -->\n": "doc.md:2: table 'noise/accuracy' is not closed",
        "<!-- /table -->\n": "doc.md:1: <!-- /table --> without a table opened before it",
    }
    for text, message in cases.items():
        with pytest.raises(tables.TableError) as e:
            tables.rewrite(text, "doc.md", {})
        assert str(e.value).startswith(message), text
        assert "\n" not in str(e.value)
    p = subprocess.run([sys.executable, "bench/tables.py", "--root", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == f"tables.py: error: {tmp_path / 'README.md'}: no such document\n"


def test_tables_from_results_against_scipy(tmp_path):
    """The tables of a results.json: the finished-runs line, mean ± sample std, and each paired
    comparison's n, mean, 95 % t-interval and Holm p as scipy computes them."""
    from scipy import stats
    import tables
    names = {"x": "resure", "y": "hard"}
    results = [dict(r, variant=names.get(r["variant"], r["variant"]))
               for r in synthetic_results() if r["mixture"] != "H+N"]
    plan = {"preset": "cpu", "mixtures": ["H", "H+N+L"], "seeds": [1, 2, 3, 4, 5],
            "methods": ["sft", "resure", "hard"], "kinds": {}}
    saved = {"plan": plan, "results": results, "runs_planned": 40,
             "base": {"1": {"accuracy": 0.05, "loss": 2.5}, "2": {"accuracy": 0.07, "loss": 2.4}}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    n = tables.Noise(tmp_path / "results.json")
    accuracy = tables.scores(n, "accuracy")
    assert accuracy[0] == (f"30 of 40 runs of `python bench/noise.py --cpu` are finished "
                           f"({tmp_path / 'results.json'}).")
    rows = {r[0]: r for r in table_rows("\n".join(accuracy))[1:]}
    sft = ACCURACY["sft", "H+N+L"]
    assert rows["sft"][2] == f"{100 * np.mean(sft):.1f} ± {100 * np.std(sft, ddof=1):.1f}"
    assert rows["sft"][3] == "10 of 10"
    assert rows["base model (no training)"][1] == "6.0 ± 1.4"
    vs_sft = table_rows("\n".join(tables.comparisons(n, "accuracy vs sft")))
    got = {(r[0], r[1]): r for r in vs_sft[1:]}
    assert sorted(got) == sorted((v, m) for v in ("resure", "hard") for m in ("H", "H+N+L"))
    ps = {}
    for (v, m), r in got.items():
        a = ACCURACY[{"resure": "x", "hard": "y"}[v], m]
        d = 100 * (np.array(a) - ACCURACY["sft", m])
        low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
        assert r[2] == "5", (v, m)
        assert r[3].strip("*") == f"{d.mean():+.1f}", (v, m)
        assert r[4] == f"[{low:+.1f}, {high:+.1f}]", (v, m)
        ps[v, m] = stats.ttest_rel(a, ACCURACY["sft", m]).pvalue
    keys = sorted(ps)
    for key, want in zip(keys, holm_by_hand([ps[k] for k in keys])):
        shown = got[key][5]
        assert shown == ("< 0.001" if want < 0.001 else f"{want:.3f}"), key
    claims = tables.claims(n)
    resolved = [line for line in claims if line.startswith("- ")]
    assert resolved, claims
    assert "- resure against sft on H+N+L, accuracy: +" in "\n".join(resolved)
    assert not [line for line in resolved if line.startswith("- hard against sft")]
