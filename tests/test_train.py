"""train.py end to end on a tiny random model: learning, torchrun equivalence, exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import model as M
from conftest import ROOT, run, train_args
from lora import load_adapter
from resure import ReSURE

ESTIMATORS = [("welford", "reliable", "loss"), ("ema", "winsorized", "loss"), ("window", "reliable", "loss"),
              ("mad", "all", "loss"), ("welford", "reliable", "loss+gain")]


def assert_close_tree(a, b, rtol, path="stats"):
    """Same structure, same ints and strings, floats within rtol (losses differ in the last fp32 bits)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close_tree(a[k], b[k], rtol, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= rtol * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "weighted_loss" in r]  # training steps (eval rows carry "eval" instead)


@pytest.mark.slow
def test_loss_goes_down_and_outputs_reload(setup):
    out = setup / "learn"
    run(setup, out, "--max-steps", "30", "--batch-size", "8", "--grad-accum", "1", "--lora-dropout", "0", "--lr", "3e-2",
        "--eval-data", str(setup / "data" / "test.jsonl"), "--record-units", "--stats", "ema",
        "--stats-update", "winsorized")  # an estimator that keeps up with the falling loss, so units get flagged
    m = metrics(out)
    assert len(m) == 30
    assert [r["step"] for r in m] == list(range(1, 31))
    first, last = sum(r["loss"] for r in m[:5]) / 5, sum(r["loss"] for r in m[-5:]) / 5
    assert last < first - 0.5, (first, last)
    net = M.Transformer.from_pretrained(setup / "tiny")
    load_adapter(net, out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    ours = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    for k, v in net.state_dict().items():
        if ".lora_" in k:
            assert torch.equal(v, ours[k])
    rs = ReSURE(warmup_samples=16, ramp_steps=2, stats="ema", stats_update="winsorized")
    rs.load_state_dict(json.loads((out / "resure_state.json").read_text()))
    assert rs.seen == 30 * 8
    report = json.loads((out / "report.json").read_text())
    # flagging quality by hand: the last sighting of each unit in units.jsonl against the noise labels of the
    # conversation it came from (unit = dialogue: noisy if any turn the example kept is noisy; no example dropped)
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert len(units) == 30 * 8
    assert all(u["turn"] == 0 for u in units)
    last = {u["sample"]: u for u in units}
    convs = [json.loads(line) for line in (setup / "data" / "train_N.jsonl").read_text().splitlines()]
    kept = {i: u["group"] for i, u in last.items()}  # depth of the last kept turn (< 8 here): truncation counted
    noisy = {i: any(m.get("noisy") for m in [m for m in convs[i]["messages"] if m["role"] == "assistant"][:kept[i]])
             for i in last}
    tp = sum(last[i]["flagged"] and noisy[i] for i in last)
    n_flag, n_noisy = sum(u["flagged"] for u in last.values()), sum(noisy.values())
    assert n_flag > 0
    assert n_noisy > 0
    assert report["flagging"] == {"units": len(last), "flagged": n_flag, "noisy": n_noisy,
                                  "precision": pytest.approx(tp / n_flag), "recall": pytest.approx(tp / n_noisy)}
    assert report["most_down_weighted"][0]["weight"] == min(u["weight"] for u in last.values())
    assert any('"eval"' in line for line in (out / "metrics.jsonl").read_text().splitlines())


def test_skipped_step_leaves_no_trace(setup, monkeypatch):
    """A step whose gradient norm is not finite is skipped: the adapter does not move, ReSURE's statistics are
    rolled back (seen counts the other steps only), its units are logged as skipped and left out of the report."""
    import train
    real, snaps = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):  # called once per step, after backward, before the optimizer step
        params = list(params)
        snaps.append([p.detach().clone() for p in params])
        norm = real(params, max_norm)
        return torch.tensor(float("nan")) if len(snaps) == 3 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = setup / "skip"
    train.main(["--model", str(setup / "tiny"), "--data", str(setup / "data" / "train_N.jsonl"), "--out", str(out),
                "--max-len", "128", "--lora-r", "4", "--lora-alpha", "8", "--lr", "3e-2", "--lora-dropout", "0",
                "--warmup-samples", "16", "--ramp-steps", "2", "--max-steps", "5", "--batch-size", "8",
                "--grad-accum", "1", "--record-units", "--no-resume"])
    assert len(snaps) == 5
    moved = [any(not torch.equal(a, b) for a, b in zip(snaps[i], snaps[i + 1])) for i in range(4)]
    assert moved[1:] == [True, False, True]  # step index 2 changed nothing (index 0 runs at warm-up lr 0)
    assert metrics(out)[-1]["skipped_steps"] == 1
    assert json.loads((out / "resure_state.json").read_text())["seen"] == 4 * 8
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert [u["step"] for u in units if u["skipped"]] == [2] * 8
    assert len(units) == 5 * 8
    assert json.loads((out / "report.json").read_text())["flagging"]["units"] == 4 * 8


def test_context_gain_of_hand_made_replies_equals_transformers(setup):
    """gain = NLL(reply | an empty user turn) - NLL(reply | the dialogue so far), per turn and pooled per dialogue,
    from data.py's free rows and resure.gain_of, against transformers' own logits on the same token ids."""
    import transformers
    from data import ChatTemplate, build_examples, collate
    from resure import gain_of, unit_losses
    tpl = ChatTemplate.from_pretrained(setup / "tiny")
    conv = {"messages": [{"role": "user", "content": "Keep a counter. Start at 3."}, {"role": "assistant", "content": "3"},
                         {"role": "user", "content": "Add 4."}, {"role": "assistant", "content": "Add 4."},
                         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "x", "train": False}]}
    ex, _ = build_examples([conv], tpl, 256, free=True)
    assert [k for k, _, _ in ex[0]["free"]] == [1, 2]  # a reply marked "train": false is not scored
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup / "tiny", dtype=torch.float64).eval()

    def nll(ids, labels):  # mean CE of the supervised tokens, in float64, by transformers
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1]
        y = torch.tensor(labels[1:])
        ce = torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none")
        return ce[y != -100], [t for t in labels[1:] if t != -100]
    full, free = {}, {}
    for k in (1, 2):
        lab = [t if tid == k else -100 for t, tid in zip(ex[0]["labels"], ex[0]["turn_ids"])]
        full[k] = nll(ex[0]["input_ids"], lab)
        _, ids, flab = ex[0]["free"][k - 1]
        free[k] = nll(ids, flab)
        assert full[k][1] == free[k][1]  # the same reply tokens in both encodings
    net = M.Transformer.from_pretrained(setup / "tiny", dtype=torch.float64)
    b = collate(ex, tpl.pad_id)
    with torch.no_grad():
        tok = net.token_losses(b["input_ids"], b["labels"], b["attention_mask"])
        ftok = net.token_losses(b["free_ids"], b["free_labels"], b["free_mask"])
    import train
    for unit in ("turn", "dialogue"):
        losses, _, _, sidx, turn = unit_losses(tok, b["labels"], b["turn_ids"], b["group"], unit)
        gains = gain_of(ftok, b["free_labels"], b["free_unit"], losses, sidx, turn, unit, 1)
        want = [float(free[k][0].mean() - full[k][0].mean()) for k in (1, 2)] if unit == "turn" else \
            [float(torch.cat([free[1][0], free[2][0]]).mean() - torch.cat([full[1][0], full[2][0]]).mean())]
        assert gains.tolist() == pytest.approx(want, rel=1e-5), unit  # token_losses is fp32
        # what train.py runs: the rows' shared start once, then each reply (padded to the longest) from its K/V
        assert (b["free_ids"][0, :4] == b["free_ids"][1, :4]).all()
        assert b["free_mask"][0].sum() != b["free_mask"][1].sum()
        gains = train.context_gain(net, nullcontext(), unit, b, losses, sidx, turn)
        assert gains.tolist() == pytest.approx(want, rel=1e-5), unit


def test_sampler_shares_each_epoch_between_the_ranks():
    """13 examples, a global batch of 6 on 2 ranks: two batches an epoch, each split 3 + 3, every
    example once an epoch but one (a third batch of one would leave a rank empty); a new sampler (a
    resumed run) draws what the used one did."""
    import train
    ranks = [train.Sampler(13, 6, seed=5, rank=r, world=2, lengths=None) for r in (0, 1)]
    assert ranks[0].per_epoch == 2
    assert ranks[0].dropped == 1
    for epoch in (0, 1):
        order = np.random.default_rng([5, epoch]).permutation(13).tolist()
        shares = [s.indices(2 * epoch + k) for k in (0, 1) for s in ranks]
        assert [len(x) for x in shares] == [3, 3, 3, 3]
        assert sum(shares, []) == order[:12]
    fresh = train.Sampler(13, 6, seed=5, rank=1, world=2, lengths=None)
    assert fresh.indices(3) == ranks[1].indices(3)


def test_floor_over_reaches_resure_and_the_run_identity(setup):
    """--floor-over is handed to ReSURE and recorded in run.json's settings, so that a rerun with
    the other value is a different run."""
    import train
    from support.runs import run_identity
    argv = ["--model", str(setup / "tiny"), "--data", str(setup / "data" / "train_N.jsonl")]
    default = train.parse_args(argv)
    flagged = train.parse_args([*argv, "--floor-over", "flagged"])
    assert default.floor_over == "all"
    assert train.new_resure(flagged, record=False).config.floor_over == "flagged"
    assert run_identity(default, 1)["floor_over"] == "all"
    assert run_identity(flagged, 1)["floor_over"] == "flagged"


@pytest.mark.slow
@pytest.mark.parametrize("stats,update,detector", ESTIMATORS)
def test_torchrun_two_ranks_equal_one_process(setup, stats, update, detector):
    common = ("--max-steps", "4", "--grad-accum", "2", "--lora-dropout", "0", "--lr", "1e-4", "--stats", stats,
              "--stats-update", update, "--unit", "turn", "--detector", detector)
    one, two = setup / f"one-{stats}-{detector}", setup / f"two-{stats}-{detector}"
    run(setup, one, "--batch-size", "6", *common)
    run(setup, two, "--batch-size", "3", *common, nproc=2)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
        assert a["units"] == b["units"]
        assert a["flagged_units"] == b["flagged_units"]
    s1 = json.loads((one / "resure_state.json").read_text())
    s2 = json.loads((two / "resure_state.json").read_text())
    assert s1["seen"] == s2["seen"]
    assert s1["flagged_total"] == s2["flagged_total"]
    assert_close_tree(s1["stats"], s2["stats"], 1e-6)
    if detector == "loss+gain":  # the context gains, gathered from both ranks, make the same statistics
        assert_close_tree(s1["gain_stats"], s2["gain_stats"], 1e-5)
        assert s1["gain_stats"]["groups"]
        assert s1["config"]["gain_alpha"] == 2.0
    a1 = load_file(one / "adapter" / "adapter_model.safetensors")
    a2 = load_file(two / "adapter" / "adapter_model.safetensors")
    for k in a1:  # the gradient all-reduce sums in another order, and each rank pads its free rows otherwise:
        tol = 1e-6 if detector == "loss" else 1e-5  # fp32 rounding, relative to each tensor's norm
        assert float((a1[k] - a2[k]).norm() / a1[k].norm()) <= tol, k


@pytest.mark.slow
@pytest.mark.parametrize("stats,update,detector", ESTIMATORS)
def test_sigkill_and_resume_is_bitwise_exact(setup, stats, update, detector):
    common = ("--max-steps", "8", "--batch-size", "4", "--grad-accum", "1", "--lora-dropout", "0.1", "--save-every", "2",
              "--stats", stats, "--stats-update", update, "--detector", detector)
    ref, cut = setup / f"ref-{stats}-{detector}", setup / f"cut-{stats}-{detector}"
    run(setup, ref, *common)
    p = run(setup, cut, *common, wait=False)
    kill_after = {"welford": 2, "ema": 4, "window": 6, "mad": 4}[stats] + 2 * (detector != "loss")  # other steps
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / f"step-{kill_after:07d}").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (cut / f"step-{kill_after:07d}").exists()
    assert not (cut / "adapter").exists()
    # a kill in the middle of writing the next checkpoint leaves only a temporary folder behind
    (cut / ".tmp-step-0000099").mkdir(exist_ok=True)
    (cut / ".tmp-step-0000099" / "trainer.pt").write_bytes(b"partial")
    out = run(setup, cut, *common).stdout
    assert "resumed from step-" in out
    for f in ("adapter/adapter_model.safetensors", "resure_state.json"):
        assert (ref / f).read_bytes() == (cut / f).read_bytes(), f
    m_ref, m_cut = metrics(ref), metrics(cut)
    last = {r["step"]: r["loss"] for r in m_cut}
    assert all(last[r["step"]] == r["loss"] for r in m_ref)


def test_bad_input_one_line_errors(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data", str(bad)], "bad.jsonl"),
        (["--model", str(tmp_path)], str(tmp_path)),
        (["--batch-size", "0"], "--batch-size"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--data", str(empty)], "no usable conversation"),
    ]
    for extra, needle in cases:
        args = ["--model", str(setup / "tiny"), "--data", str(setup / "data" / "train_N.jsonl"),
                "--out", str(tmp_path / "o"), "--max-steps", "1", *extra]
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2, (extra, p.stderr[-2000:])
        assert len(err) == 1, (extra, p.stderr)
        assert needle in err[0], (extra, p.stderr)
        assert "Traceback" not in p.stderr, (extra, p.stderr)


@pytest.mark.slow
def test_demo_shortened_prints_numbers_from_the_run(smollm2_dir, tmp_path):
    """`python train.py` with no --model/--data, cut to 3 steps and 3 test dialogues: the printed after-training
    accuracy is recomputed here from the saved adapter with eval.accuracy."""
    from data import ChatTemplate
    from support.conversations import load_conversations
    from eval import accuracy
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), "--max-steps", "3",
                        "--demo-eval", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("demo:")
    assert lines[1].startswith("demo settings:")
    acc = [line for line in lines if line.startswith("clean-test exact match")]
    assert len(acc) == 1
    assert any(line.startswith("flagging vs noise labels") for line in lines)
    after = float(acc[0].split("-> after ")[1])
    before = float(acc[0].split("before ")[1].split(" ->")[0])
    cache = Path(os.environ.get("RESURE_CACHE", Path.home() / ".cache" / "resure"))
    test = load_conversations(cache / "synth-seed42" / "test.jsonl")[:3]
    template = ChatTemplate.from_pretrained(smollm2_dir)
    net = M.Transformer.from_pretrained(smollm2_dir)
    assert abs(accuracy(net, template, test)["overall"] - before) < 1e-3
    load_adapter(net, out / "adapter")
    assert abs(accuracy(net, template, test)["overall"] - after) < 1e-3


def test_data_alone_trains_the_demo_model_with_the_paper_settings(smollm2_dir, tmp_path):
    """--data without --model: SmolLM2-135M-Instruct (the demo's model) with the paper's settings, not the demo's;
    --model without --data has no data to train on and says so in one line."""
    import train
    from support.cli import UsageError
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}))
    args = train.parse_args(["--data", str(f)])
    assert not args.demo
    assert args.model is None
    assert (args.lora_alpha, args.lora_dropout) == (16, 0.3)
    run = train.main(["--data", str(f), "--out", str(tmp_path / "out"), "--max-steps", "1", "--warmup-ratio", "0",
                      "--max-len", "64", "--batch-size", "1", "--grad-accum", "1", "--lora-r", "4", "--method", "sft"])
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == smollm2_dir
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 16)
    assert run.net.config.num_hidden_layers == 30
    assert run.net.config.hidden_size == 576
    with pytest.raises(UsageError, match=r"^--model needs --data \(the demo's data is made for its own model\)$"):
        train.parse_args(["--model", str(smollm2_dir)])


# ---------------------------------------------------------------------------------------------------------------
# The edges: requeues, changed settings, idle flags, signals

def _main(setup, out, *extra):
    """train.main in this process on the tiny setup (conftest.train_args)."""
    import train
    return train.main(train_args(setup, out, *extra))


def _term_during_step(monkeypatch, index, sig=signal.SIGTERM):
    """Send sig to this process while train_step runs the step of this 0-based index (the Stop handler is in place)."""
    import train
    real = train.train_step

    def step(run, step):
        if step == index:
            os.kill(os.getpid(), sig)
        return real(run, step)
    monkeypatch.setattr(train, "train_step", step)


def test_a_stop_under_no_resume_names_the_command_that_continues_and_it_does(setup, tmp_path, monkeypatch, capsys):
    """--no-resume starts over every time it is given, so a stopped run's line names the command that continues it:
    the same without --no-resume. That command resumes from the checkpoint and trains the remaining steps."""
    out = tmp_path / "run"
    _term_during_step(monkeypatch, 1)
    with pytest.raises(SystemExit) as stopped:
        _main(setup, out, "--max-steps", "4", "--no-resume")
    assert stopped.value.code == 128 + signal.SIGTERM
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train.py:")]
    assert lines == [f"train.py: stopped by signal {int(signal.SIGTERM)} after step 2; checkpoint step-0000002 "
                     "written: the same command without --no-resume continues the run"]
    monkeypatch.undo()
    _main(setup, out, "--max-steps", "4")
    assert "resumed from step-0000002 (step 2)" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_smaller_data_under_allow_changed_config_trains_to_the_end(setup, tmp_path, capsys):
    """--allow-changed-config with a smaller --data: the run resumes and ends with a report of the new examples only
    (the checkpoint's table numbers other examples), the optimizer takes the command's --beta2, and a checkpoint past
    the run's last step is refused in one line."""
    from support.cli import UsageError
    small = tmp_path / "small.jsonl"
    lines = (setup / "data" / "train_N.jsonl").read_text().splitlines()[:40]
    small.write_text("\n".join(lines) + "\n")
    ids = {json.loads(x)["id"] for x in lines}
    out = tmp_path / "run"
    _main(setup, out, "--max-steps", "2")
    run = _main(setup, out, "--max-steps", "4", "--data", small, "--beta2", "0.9", "--allow-changed-config")
    text = capsys.readouterr().out
    assert "resumed from step-0000002 (step 2), written under other settings" in text
    report = json.loads((out / "report.json").read_text())
    assert report["most_down_weighted"]
    assert {r["id"] for r in report["most_down_weighted"]} <= ids
    assert max(r["sample"] for r in report["most_down_weighted"]) < 40
    assert run.opt.param_groups[0]["betas"] == (0.9, 0.9)
    assert json.loads((out / "run.json").read_text())["finished"]
    with pytest.raises(UsageError, match=r"its checkpoint is at step 4, past this run's 3 steps"):
        _main(setup, out, "--max-steps", "3", "--data", small, "--beta2", "0.9", "--allow-changed-config")


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_carries_its_settings_when_run_json_is_missing(setup, tmp_path, capsys):
    """Without run.json, a rerun with other data and another learning rate is refused in one line naming both (the
    checkpoints left as they were); the command that wrote them continues from them."""
    from support.runs import RunError
    other = tmp_path / "other.jsonl"
    other.write_text((setup / "data" / "train_H.jsonl").read_text())
    out = tmp_path / "run"
    _main(setup, out, "--max-steps", "2")
    (out / "run.json").unlink()
    before = _tree(out)
    with pytest.raises(RunError, match=r"holds a run with other settings \(lr: 0\.003 -> 0\.001, data_sha256: ") as e:
        _main(setup, out, "--max-steps", "2", "--data", other, "--lr", "1e-3")
    assert "\n" not in str(e.value)
    assert _tree(out) == before
    capsys.readouterr()
    _main(setup, out, "--max-steps", "2")
    assert "resumed from step-0000002 (step 2)\n" in capsys.readouterr().out


def test_a_record_older_than_a_setting_takes_its_default(setup, tmp_path, capsys):
    """A run folder written before --floor-over existed (run.json and the checkpoint without it, or a checkpoint
    without its own record of settings) is this run when --floor-over keeps its default, and a run with other
    settings when it does not."""
    from support.runs import RunError
    out = tmp_path / "run"
    _main(setup, out, "--max-steps", "2")
    records = [out / "run.json", out / "step-0000002" / "trainer.json", out / "step-0000002" / "COMPLETE"]

    def rewrite(path, change):
        record = json.loads(path.read_text())
        change(record)
        path.write_text(json.dumps(record))
    for path in records:
        rewrite(path, lambda r: r.get("run", {}).pop("floor_over", None))
    assert _main(setup, out, "--max-steps", "2") is None  # finished: nothing to do
    assert "already holds this run, finished (2 steps): nothing to do" in capsys.readouterr().out
    for path in records[1:]:  # checkpoints older than their record of settings: run.json's
        rewrite(path, lambda r: r.pop("run", None))
    assert _main(setup, out, "--max-steps", "2") is None
    with pytest.raises(RunError, match=r"other settings \(floor_over: 'all' -> 'flagged'\)"):
        _main(setup, out, "--max-steps", "2", "--floor-over", "flagged")


def test_the_schedule_is_transformers_cosine_with_warmup():
    """cosine_lr against transformers.get_cosine_schedule_with_warmup, every step of three schedules."""
    import transformers
    import train
    for total, warmup in ((10, 1), (7, 3), (5, 0)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
        want = []
        for _ in range(total):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert [train.cosine_lr(s, total, warmup, 2e-3) for s in range(total)] == pytest.approx(want, abs=1e-15)


def test_a_run_that_would_train_nothing_is_refused(setup, tmp_path):
    """One optimizer step with a warm-up runs at learning rate 0: refused in one line before training, nothing
    written; without the warm-up the one step trains every lora_B."""
    from support.cli import UsageError
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"^the run is 1 optimizer step, which the linear warm-up \(--warmup-ratio "
                                         r"0\.01\) takes at learning rate 0: it would train nothing"):
        _main(setup, out, "--max-steps", "1")
    assert not list(out.glob("step-*"))
    assert not (out / "adapter").exists()
    _main(setup, out, "--max-steps", "1", "--warmup-ratio", "0")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b
    for k in lora_b:
        assert saved[k].abs().sum() > 0, k


IDLE = [  # (flags, the flag that does nothing, the flag it is idle beside)
    (["--method", "sft", "--detector", "loss+gain"], "--detector loss+gain", "--method sft"),
    (["--gain-alpha", "3"], "--gain-alpha", "--detector loss"),
    (["--ema-decay", "0.1"], "--ema-decay", "--stats welford"),
    (["--stats", "mad", "--ema-decay", "0.1"], "--ema-decay", "--stats mad"),
    (["--window", "64"], "--window", "--stats welford"),
    (["--stats", "ema", "--window", "64"], "--window", "--stats ema"),
    (["--method", "sft", "--floor-percentile", "10"], "--floor-percentile", "--method sft"),
    (["--method", "hard", "--floor-percentile", "10"], "--floor-percentile", "--method hard"),
    (["--method", "hard", "--floor-over", "flagged"], "--floor-over", "--method hard"),
    (["--method", "sft", "--floor-over", "all"], "--floor-over", "--method sft"),
    (["--method", "sft", "--ramp-steps", "3"], "--ramp-steps", "--method sft"),
    (["--method", "sft", "--stats-update", "all"], "--stats-update", "--method sft"),
    (["--prefilter-scores", "s.jsonl"], "--prefilter-scores", "--prefilter-keep 1"),
    (["--eval-every", "5"], "--eval-every", "--eval-data"),
    (["--epochs", "2", "--max-steps", "5"], "--epochs", "--max-steps 5"),
    (["--demo-eval", "5"], "--demo-eval", "demo"),
]
LIVE = [["--detector", "loss+gain", "--gain-alpha", "3"], ["--stats", "ema", "--ema-decay", "0.1"],
        ["--stats", "mad", "--window", "64"], ["--method", "global", "--floor-over", "flagged"],
        ["--method", "hard", "--ramp-steps", "3"], ["--method", "sft", "--stats", "ema", "--alpha", "2"],
        ["--prefilter-keep", "0.5", "--prefilter-scores", "s.jsonl"], ["--eval-data", "t.jsonl", "--eval-every", "5"],
        ["--epochs", "2"], ["--method", "hard", "--detector", "loss+gain"]]


@pytest.mark.parametrize("flags,idle,beside", IDLE)
def test_a_flag_that_does_nothing_beside_another_is_refused(flags, idle, beside):
    import train
    from support.cli import UsageError
    with pytest.raises(UsageError) as e:
        train.parse_args(["--model", "m", "--data", "d.jsonl", *flags])
    message = str(e.value)
    assert message.startswith(f"{idle} does nothing "), message
    assert beside in message, message
    assert "\n" not in message


@pytest.mark.parametrize("flags", LIVE)
def test_the_same_flags_where_they_act_are_taken(flags):
    import train
    train.parse_args(["--model", "m", "--data", "d.jsonl", *flags])


def test_the_demo_takes_ema_decay_and_epochs_refuse_its_max_steps():
    """The demo's estimator is ema (its --ema-decay acts); its steps are set (--max-steps 45), so --epochs idles."""
    import train
    from support.cli import UsageError
    assert train.parse_args(["--ema-decay", "0.1"]).ema_decay == 0.1
    with pytest.raises(UsageError, match=r"^--epochs does nothing with --max-steps 45"):
        train.parse_args(["--epochs", "2"])


def test_a_batch_other_than_the_papers_is_said_in_one_line(setup, tmp_path, capsys):
    """Under --model, an effective batch (batch x accumulation x ranks) other than the paper's 64 is one line naming
    the step's batch and Eq. 6's floor's (one gathered micro-batch); the paper's 64 says nothing."""
    _main(setup, tmp_path / "small", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "3")
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("batch:")]
    assert lines == ["batch: 6 samples per optimizer step, the paper's 64; Eq. 6's floor is a percentile over each "
                     "micro-batch's 2 gathered samples (the paper's 16)"]
    _main(setup, tmp_path / "paper", "--max-steps", "2", "--batch-size", "16", "--grad-accum", "4")
    assert not [x for x in capsys.readouterr().out.splitlines() if x.startswith("batch:")]


@pytest.mark.parametrize("stats, said", [("welford", True), ("ema", False), ("window", False)])
def test_the_gain_view_under_cumulative_statistics_is_said_in_one_line(stats, said):
    """--detector loss+gain with the cumulative Welford statistics names the lag and the tracking
    statistics in one line; with tracking statistics nothing is said."""
    import train
    from support.report import announce
    args = train.parse_args(["--model", "m", "--data", "d.jsonl", "--detector", "loss+gain",
                             "--stats", stats, "--batch-size", "16", "--grad-accum", "4"])
    lines = []
    announce(args, 3, 1, lines.append)
    notes = [x for x in lines if x.startswith("detector:")]
    expected = ["detector: loss+gain under cumulative --stats welford: the gain band remembers the "
                "early gains and lags behind them (--stats ema --stats-update winsorized tracks; "
                "docs/method.md)"]
    assert notes == (expected if said else [])


def test_a_signal_during_the_final_save_says_the_run_finished(setup, tmp_path, monkeypatch, capsys):
    """SIGINT while the finished run writes its outputs: they are written whole, run.json says finished, and the one
    line says so (exit 130); the same command then has nothing to do."""
    from support import runs
    real = runs.Folder.finish

    def finish(folder, steps):
        os.kill(os.getpid(), signal.SIGINT)
        return real(folder, steps)
    monkeypatch.setattr(runs.Folder, "finish", finish)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        _main(setup, out, "--max-steps", "2")
    assert stopped.value.code == 130
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train.py:")]
    assert lines == [f"train.py: signal 2 arrived during the final save; the run finished whole ({out}/adapter): "
                     "nothing to continue"]
    assert json.loads((out / "run.json").read_text())["finished"]
    monkeypatch.undo()
    assert _main(setup, out, "--max-steps", "2") is None
