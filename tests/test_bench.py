"""bench/speed.py and bench/noise.py end to end on a tiny random llama (CI smoke: the numbers themselves mean
nothing at this size, but every table must hold them, and what can be checked against an oracle is)."""
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from conftest import tiny_setup  # noqa: E402

NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny random llama (written by transformers) that speaks SmolLM2's tokenizer and chat template."""
    from speed import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("bench") / "tiny", tokenizer_dir=smollm2_dir)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def table_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-")]


@pytest.mark.slow
def test_speed_tiny(tiny, tmp_path, keep_threads, capsys):
    import speed
    r = speed.main(["--tiny", "--model", tiny, "--threads", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    md = (tmp_path / "speed.md").read_text()
    assert md.strip() in printed
    assert "Machine: " in md and f"torch {torch.__version__}" in md and "1 threads" in md and " cores" in md
    rows = {row[0]: row for row in table_rows(md)[1:]}
    resure = "ReSURE overhead over a plain SFT step (ours)"
    wanted = ["LoRA train step, fp32", "LoRA train step, bf16", "peak memory of training, fp32",
              f"{resure}, fp32", f"{resure}, bf16", "greedy generation, batch 1, fp32",
              "greedy generation, batch 3, fp32", "checkpoint load, fp32, first in a fresh process",
              "checkpoint load, fp32, repeated in one process", "training throughput / matmul peak, fp32",
              "training throughput / matmul peak, bf16"]
    for w in wanted:
        row = next((v for k, v in rows.items() if k.startswith(w)), None)
        assert row is not None, f"no row {w!r} in\n{md}"
        for cell in row[1:4]:  # ours, theirs, ratio: each holds a finite number
            m = NUM.search(cell)
            assert m and math.isfinite(float(m.group())), (w, cell)
    saved = json.loads((tmp_path / "speed.json").read_text())
    for d in ("fp32", "bf16"):
        tr = saved["train"][d]
        assert tr["tokens_per_s"]["ours"] > 0 and tr["tokens_per_s"]["hf"] > 0
        assert len(tr["seconds"]["ours"]) == len(tr["seconds"]["hf"]) == speed.PRESETS["tiny"]["reps"]
        assert saved["matmul_peak"][d]["peak"] > 0 and tr["resure"]["overhead"] > 0
    # both sides computed the same loss on the same batch before any update (transformers is the oracle)
    first = saved["train"]["fp32"]["first_loss"]
    assert first["ours"] == pytest.approx(first["hf"], rel=1e-4)
    for side in saved["memory"]["fp32"].values():  # the peak counter was reset, and loading + training added to it
        assert side["hwm_reset"] and side["delta_mib"] > 0
    cold = saved["load"]["fp32"]["cold_seconds"]
    assert len(cold["ours"]) == len(cold["hf"]) == 1 and min(cold["ours"] + cold["hf"]) > 0
    gen = saved["generate"]["fp32"]
    ceiling = gen.pop("ceiling")
    assert set(gen) == {"1", "3"} and all(g["tokens_per_s"]["ours"] > 0 for g in gen.values())
    assert all(g["same_tokens"] == 1.0 for g in gen.values())  # greedy fp32: transformers' generate is the oracle
    from transformers import AutoModelForCausalLM
    n_params = AutoModelForCausalLM.from_pretrained(tiny).num_parameters()  # tied head counted once
    assert ceiling["weight_bytes"] == 4 * n_params and ceiling["copy_bytes_per_s"] > 0
    assert any(k.startswith("batch-1 decoding ceiling, fp32") for k in rows)
    # useful FLOPs: 2*dense + 3*lora + 3*attention + 2*head, recomputed here from the config by hand
    cfg = json.loads((Path(tiny) / "config.json").read_text())
    D, I, L, V, H, KV = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                          "num_attention_heads", "num_key_value_heads"))
    hd, B, T, rk = D // H, 2, 32, 4
    lin = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, I), (D, I), (I, D)]
    want = (2 * 2 * L * sum(i * o for i, o in lin) * B * T + 3 * 2 * L * sum(rk * (i + o) for i, o in lin) * B * T
            + 3 * L * B * H * 4 * hd * T * (T + 1) / 2 + 2 * 2 * D * V * saved["train"]["fp32"]["supervised"])
    assert saved["train"]["fp32"]["flops"] == pytest.approx(want, rel=1e-12)
    assert r["preset"] == "tiny"


def test_speed_bad_model_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"speed.py: error: --model {tmp_path}: no config.json there"


def test_speed_chat_batch_is_half_supervised():
    import speed
    b, n_sup = speed.chat_batch(1000, 4, 256)
    sup = b["labels"] != -100
    assert n_sup == int(sup[:, 1:].sum()) and 0.35 < sup.float().mean() < 0.65
    assert torch.equal(b["labels"][sup], b["input_ids"][sup]) and not sup[:, 0].any()
    assert bool((b["turn_ids"][sup] >= 1).all()) and not bool(b["turn_ids"][~sup].any())
    assert b["group"].tolist() == [min(int(t[s].max()), 8) for t, s in zip(b["turn_ids"], sup)]  # last supervised turn


@pytest.mark.slow
def test_noise_tiny(tiny, tmp_path, keep_threads, capsys):
    import noise
    out = tmp_path / "noise"
    res = noise.main(["--tiny", "--model", tiny, "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    methods = list(noise.PRESETS["tiny"]["methods"])
    assert printed.startswith("noise.py tiny:") and f"plan: {2 * 4 * len(methods)} training runs" in printed
    md = (out / "results.md").read_text()
    rows = table_rows(md.split("## Clean-test exact-match accuracy")[1].split("##")[0])
    assert [r[0] for r in rows[1:]] == ["base model (no training)"] + methods
    assert all(NUM.match(cell) for r in rows[1:] for cell in r[1:5])
    for section in ("## Data", "## Change from H", "## Clean-test loss", "## Difference to SFT", "## Compute",
                    "## Flagging", "Per noise kind", "Per turn depth", "Per detector view", "## What this run shows"):
        assert section in md
    saved = json.loads((out / "results.json").read_text())
    runs = saved["results"]
    assert not [r for r in runs if "error" in r]
    assert sorted((r["variant"], r["mixture"], r["seed"]) for r in runs) == sorted(
        (v, m, s) for v in methods for m in noise.MIXTURES for s in (1, 2))
    n = noise.PRESETS["tiny"]["n"]
    for s in ("1", "2"):
        st = saved["data"][s]
        assert [st[m]["dialogues"] for m in noise.MIXTURES] == [n, 2 * n, 2 * n, 3 * n]
        for m in noise.MIXTURES:  # a step trains `batch` dialogues: epochs are passes over the mixture's file
            lines = (out / f"data-seed{s}" / f"mix_{m}.jsonl").read_text().splitlines()
            p = noise.PRESETS["tiny"]
            assert st[m]["steps"] == math.ceil(p["epochs"] * len(lines) / p["batch"])
        frac = {m: st[m]["noisy"] / st[m]["turns"] for m in noise.MIXTURES}
        assert frac["H"] == 0 < frac["H+N"] < frac["H+L"] and frac["H+N"] < frac["H+N+L"]
        kept = (out / f"data-seed{s}" / "mix_H+N+L.scores").read_text().split()
        assert len(kept) == 3 * n and saved["prefilter"][s]["H+N+L"]["kept"] == math.floor(0.75 * 3 * n + 0.5)
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0
        # same final training compute: every method trains its mixture's steps
        assert r["compute"]["optimizer_steps"] == saved["data"][str(r["seed"])][r["mixture"]]["steps"]
        if r["variant"] != "sft":
            a = r["flagging"]["all"]
            assert a["tp"] <= min(a["flagged"], a["noisy"]) and a["flagged"] <= a["units"]
            assert r["trajectory"] and r["trajectory"][-1]["step"] == r["compute"]["optimizer_steps"]
            if r["mixture"] == "H":
                assert a["noisy"] == 0  # tier H carries no injected noise
        if r["variant"] == "resure[loss+gain]":  # a unit is flagged when either view flags it
            v = r["flagging"]["by_view"]
            assert max(v["loss"]["all"]["flagged"], v["gain"]["all"]["flagged"]) <= r["flagging"]["all"]["flagged"] \
                <= v["loss"]["all"]["flagged"] + v["gain"]["all"]["flagged"]
            assert r["compute"]["forward_tokens"] > 0  # the context-free rows and the warm-up set
    # Spearman per method against scipy (the oracle), over all (mixture, seed) pairs, mixtures ranked 1-4
    from scipy.stats import spearmanr
    for v in methods:
        xs = [noise.MIXTURES.index(r["mixture"]) for r in runs if r["variant"] == v]
        ys = [r["loss"] for r in runs if r["variant"] == v]
        want = spearmanr(xs, ys).statistic
        got = saved["summary"][v]["spearman"]["loss"]
        assert (got is None and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    try:
        import matplotlib  # noqa: F401
        assert (out / "noise.png").stat().st_size > 1000 and (out / "resure_dynamics.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in printed and not (out / "noise.png").exists()
    assert res["out"] == str(out)
    # resumable: the same command finds every run finished; --report rebuilds results.md from results.json alone
    (out / "results.md").unlink()
    noise.main(["--tiny", "--model", tiny, "--out", str(out), "--threads", "1"])
    assert f"resuming: {len(runs)} of {len(runs)} runs already finished" in capsys.readouterr().out
    again = (out / "results.md").read_text()
    (out / "results.md").unlink()
    noise.main(["--report", str(out)])
    strip = (lambda t: re.sub(r"^Machine:.*$", "", t, flags=re.M))  # noqa: E731
    assert strip((out / "results.md").read_text()) == strip(again) and strip(again) == strip(md)


@pytest.mark.slow
def test_noise_runs_the_baselines_beside_sft(tmp_path, smollm2_dir, keep_threads):
    """bench/noise.py runs ILR, DPO and RobustFT (baselines/) on a mixture beside SFT and reports their compute and
    label accuracy from their own report.json. The tiny model emits tokens (conftest.tiny_setup), so ILR proposes
    and asks its comparator and RobustFT relabels; DPO may find no pair with one right answer on a random model: then
    it is a one-line failure in the table, never a crash."""
    import noise
    model = tiny_setup(tmp_path, smollm2_dir, n_train=2, n_test=1) / "tiny"
    out = tmp_path / "noise"
    names = ["sft", "ilr[oracle]", "ilr[naive]", "dpo", "robustft"]
    noise.main(["--tiny", "--model", str(model), "--out", str(out), "--threads", "1", "--seeds", "1",
                "--mixtures", "H+N+L", "--methods", ",".join(names)])
    saved = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in saved["results"]}
    assert sorted(runs) == sorted(names)
    md = (out / "results.md").read_text()
    for name in ("ilr[oracle]", "ilr[naive]", "robustft"):
        r, rep = runs[name], json.loads((out / "runs" / "seed1" / "H+N+L" / name / "report.json").read_text())
        assert "error" not in r and r["compute"] == rep["compute"] and r["compute"]["generated_tokens"] > 0, name
        acc = rep["label_accuracy"]
        if name != "robustft":  # round 0, then two halves and a retrain per round; feedback only with a comparator
            assert r["compute"]["trainings"] == 1 + 3 * rep["rounds"] and rep["per_round"][1]["differing"] > 0
            assert (r["compute"]["comparisons"] > 0) == (name == "ilr[oracle]")
            acc = acc[-1]
        assert r["label_accuracy"] == pytest.approx(acc), name
        assert f"| {name} | " in md.split("label accuracy (%)")[1]
    r = runs["dpo"]
    if "error" in r:
        assert "\n" not in r["error"] and "dpo: 1 run(s)" in md.split("Failed runs")[1].split("\n")[0]
    else:
        assert r["compute"]["comparisons"] > 0 and r["compute"]["generated_tokens"] > 0


def test_noise_paired_differences_and_spread():
    import noise
    acc = {("sft", "H"): (0.50, 0.60, 0.55), ("x", "H"): (0.70, 0.72, 0.80),
           ("sft", "H+N"): (0.40, 0.50, 0.45), ("x", "H+N"): (0.41, 0.49, 0.45)}
    rs = [dict(variant=v, mixture=m, seed=s, accuracy=a[s - 1], loss=1.0) for (v, m), a in acc.items()
          for s in (1, 2, 3)]
    summ = noise.summarize(rs, ["sft", "x"], [1, 2, 3], ("H", "H+N"))
    # x - sft on H per seed: 0.20, 0.12, 0.25 -> mean 0.19, sample std by hand
    d = [0.20, 0.12, 0.25]
    m, s = summ["x"]["mixtures"]["H"]["d_accuracy"]
    assert m == pytest.approx(0.19) and s == pytest.approx(math.sqrt(sum((x - 0.19) ** 2 for x in d) / 2))
    assert noise.verdict(m, s) == ""                                    # 0.19 > sd 0.066: a difference
    m, s = summ["x"]["mixtures"]["H+N"]["d_accuracy"]                    # 0.01, -0.01, 0.00
    assert m == pytest.approx(0.0) and s == pytest.approx(0.01) and noise.verdict(m, s) == " (no difference)"
    # the regime check: sft from H to H+N is -0.10 on every seed, a drop with no spread at all
    m, s = summ["sft"]["mixtures"]["H+N"]["h_accuracy"]
    assert m == pytest.approx(-0.10) and s == pytest.approx(0.0, abs=1e-12) and noise.verdict(m, s) == ""
    assert noise.verdict(0.1, math.nan) == " (one seed: no spread)" and noise.verdict(0.05, 0.05) == " (no difference)"
    # a seed missing on one side is left out of the pairing, not paired with another seed
    m, s = noise.paired({1: 0.5, 2: 0.7}, {2: 0.6, 3: 0.1})
    assert m == pytest.approx(0.1) and math.isnan(s)
    # Spearman: mixtures H, H+N ranked 1, 2 against accuracy, over the six (mixture, seed) pairs of a method
    from scipy.stats import spearmanr
    assert summ["x"]["spearman"]["accuracy"] == pytest.approx(
        spearmanr([1, 1, 1, 2, 2, 2], list(acc["x", "H"]) + list(acc["x", "H+N"])).statistic)


def test_noise_flagging_per_kind_depth_and_view(tmp_path):
    import noise
    ex = [{"meta": {"noisy": [False, True, True], "noise_type": [None, "echo", "wrong"]}, "n_turns": 3},
          {"meta": {"noisy": [False, False], "noise_type": [None, None]}, "n_turns": 2}]
    recs = [  # (sample, turn, flagged, view, warmup, skipped)
        (0, 1, False, None, True, False),     # warm-up: no decision
        (0, 2, True, "gain", False, False), (0, 3, True, "loss+gain", False, False),
        (1, 1, True, "loss", False, False), (1, 2, False, None, False, False),
        (0, 3, False, None, False, True),     # a skipped step: left out
        (0, 1, False, None, False, False)]
    with open(tmp_path / "units.jsonl", "w") as f:
        for s, t, fl, view, w, sk in recs:
            f.write(json.dumps({"sample": s, "turn": t, "group": t, "flagged": fl, "view": view, "warmup": w,
                                "skipped": sk, "weight": 0.5 if fl else 1.0}) + "\n")
    fl = noise.flagging(tmp_path / "units.jsonl", ex, views=True)
    a = fl["all"]
    assert (a["units"], a["noisy"], a["flagged"], a["tp"]) == (5, 2, 3, 2)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == 1.0 and a["weight_noisy"] == 0.5
    assert fl["by_kind"]["echo"]["recall"] == 1.0 and fl["by_kind"]["clean"]["flag_rate"] == pytest.approx(1 / 3)
    assert fl["by_depth"][1]["flagged"] == 1 and fl["by_depth"][3]["tp"] == 1
    loss, gain = fl["by_view"]["loss"]["all"], fl["by_view"]["gain"]["all"]
    assert (loss["flagged"], loss["tp"], gain["flagged"], gain["tp"]) == (2, 1, 2, 2)
    assert fl["by_view"]["gain"]["by_kind"]["echo"]["recall"] == 1.0 and \
        fl["by_view"]["loss"]["by_kind"]["echo"]["recall"] == 0.0


def test_bad_input_is_one_line_error(tmp_path):
    import noise
    import speed
    with pytest.raises(noise.BenchError, match="unknown bogus"):
        noise.main(["--methods", "sft,bogus", "--out", str(tmp_path)])
    with pytest.raises(speed.BenchError, match="no config.json"):
        speed.main(["--model", str(tmp_path), "--skip-memory"])
    p = subprocess.run([sys.executable, "bench/noise.py", "--methods", "bogus", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "bogus" in p.stderr and "Traceback" not in p.stderr


def test_noise_rates_reach_the_data(tmp_path):
    """--rate-n / --rate-l set the injection rates of tiers N and L: 0 leaves a tier clean; 1 makes every last turn
    noisy (the late profile weights turn k of n by 2k / (n + 1), capped at 1). Counted from the files."""
    import noise
    plan = noise.make_plan(noise.parse_args(["--tiny", "--rate-n", "0", "--rate-l", "1"]))
    paths, stats = noise.make_data(tmp_path, 7, plan)
    turns = {t: [[m for m in json.loads(line)["messages"] if m["role"] == "assistant"]
                 for line in (tmp_path / "data-seed7" / f"train_{t}.jsonl").read_text().splitlines()] for t in "NL"}
    assert turns["N"] and not any(m["noisy"] for d in turns["N"] for m in d)
    assert all(d[-1]["noisy"] for d in turns["L"])
    assert sum(m["noisy"] for d in turns["L"] for m in d) > 0.6 * sum(map(len, turns["L"]))
    assert json.loads((tmp_path / "data-seed7" / "synth_meta.json").read_text())["rates"] == {"H": 0, "N": 0, "L": 1}
    assert stats["H+N"]["noisy"] == 0 < stats["H+L"]["noisy"]
    with pytest.raises(SystemExit):  # argparse: a rate is a number
        noise.parse_args(["--rate-l", "high"])


@pytest.mark.slow
def test_noise_stops_on_a_signal_and_resumes(tiny, tmp_path, keep_threads, capsys, monkeypatch):
    """train.py exits 143 after SIGTERM (tests/test_reliability.py): the experiment stops there with one line,
    keeps the finished run, records nothing for the stopped one, and the same command does only what is left."""
    import noise
    import train
    argv = ["--tiny", "--model", tiny, "--out", str(tmp_path), "--methods", "sft", "--mixtures", "H",
            "--threads", "1"]
    real, calls = train.main, []

    def stopped_second(a):
        calls.append(a)
        if len(calls) == 2:
            raise SystemExit(143)
        return real(a)
    monkeypatch.setattr(train, "main", stopped_second)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        noise.main(argv)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"noise.py: stopped by a signal; 1 of 2 runs are finished in {tmp_path} and the same command "
                       "goes on from there")
    done = sorted(tmp_path.glob("runs/*/H/sft/result.json"))
    assert [p.parent.parent.parent.name for p in done] == ["seed1"] and "error" not in json.loads(done[0].read_text())
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["invocations"] == 1 and first["wall_s"] == first["this_wall_s"] > 0
    monkeypatch.setattr(train, "main", real)
    noise.main(argv)
    assert "resuming: 1 of 2 runs already finished" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in saved["results"]) == [1, 2] and not [r for r in saved["results"] if "error" in r]
    # the wall time counts both invocations, not only the one that resumed
    assert saved["invocations"] == 2 and saved["wall_s"] == pytest.approx(first["wall_s"] + saved["this_wall_s"])
    run_min = sum(r["train_s"] + r["eval_s"] for r in saved["results"]) / 60
    head = (tmp_path / "results.md").read_text().splitlines()[2]
    assert f"for 2 of 2 runs over 2 invocations (resumed); the runs' own training and evaluation: {run_min:.1f} min" \
        in head


def test_noise_pool_stops_when_a_worker_was_stopped(monkeypatch, tmp_path):
    """With --jobs > 1, a worker that exits 143 (or dies of SIGTERM) stops the pool; the other workers are sent
    SIGTERM and waited for, and no result is recorded for either."""
    import noise

    class Proc:  # code None: still running for a few polls, then done (exit 0)
        def __init__(self, code):
            self.returncode, self.terminated, self.polls = code, False, 0

        def poll(self):
            self.polls += 1
            if self.returncode is None and self.polls > 3:
                self.returncode = 0
            return self.returncode

        def terminate(self):
            self.terminated = True

        def wait(self):
            return self.returncode
    for code, want in ((143, 143), (-15, 143), (130, 130)):
        procs = iter([Proc(code), Proc(None)])
        made = []
        monkeypatch.setattr(noise.subprocess, "Popen", lambda *a, **k: made.append(next(procs)) or made[-1])
        jobs = [dict(run_dir=str(tmp_path / f"r{i}"), sig=str(i), name="sft", mixture="H", seed=1) for i in (0, 1)]
        got = []
        with pytest.raises(SystemExit) as e:
            noise.run_pool(jobs, 2, got.append)
        assert e.value.code == want and got == [] and made[1].terminated and made[1].returncode is None
