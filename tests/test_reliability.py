"""Never lose a run, never a traceback: reruns, interruptions, damaged checkpoints, changed settings, out-of-range
flags, bad files and bad models, through the command lines as a user meets them (tiny model, synthetic data)."""
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run, train_args

pytestmark = pytest.mark.slow


def cli(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(p, needle, code=2):
    err = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert len(err) == 1, (p.returncode, p.stderr[-2000:])
    assert needle in err[0], (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])


def snapshot(folder):
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(path):
    """The optimizer steps logged in a metrics.jsonl."""
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "weighted_loss" in r]


def test_rerun_of_a_finished_run_changes_nothing_and_no_resume_starts_clean(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--max-steps", "2")
    before = snapshot(out)
    p = run(setup, out, "--max-steps", "2")
    assert "already holds this run, finished (2 steps): nothing to do" in p.stdout
    assert snapshot(out) == before
    (out / "notes.txt").write_text("the user's own file")
    p = run(setup, out, "--max-steps", "2", "--lr", "1e-2", "--no-resume")
    aside = [d for d in out.iterdir() if d.name.startswith("previous-")]
    assert len(aside) == 1
    assert "were moved to" in p.stdout
    assert (out / "notes.txt").is_file()
    assert {k: v for k, v in snapshot(aside[0]).items()} == {k: v for k, v in before.items() if k != ".lock"}
    assert json.loads((out / "run.json").read_text())["run"]["lr"] == 1e-2
    assert len(steps(out / "metrics.jsonl")) == 2
    (out / "adapter" / "adapter_model.safetensors").unlink()  # a finished run missing an output writes it again
    assert "nothing to do" not in run(setup, out, "--max-steps", "2", "--lr", "1e-2").stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_second_process_on_the_same_folder_is_refused(setup, tmp_path):
    first = run(setup, tmp_path / "run", "--max-steps", "30", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "run" / "run.json").is_file():
        time.sleep(0.05)
    one_line_error(run(setup, tmp_path / "run", "--max-steps", "30", check=False), "another training process")
    first.kill()
    first.wait()


def test_changed_settings_or_data_are_refused(setup, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(setup / "data" / "train_N.jsonl", data)
    out = tmp_path / "run"
    run(setup, out, "--max-steps", "2", "--data", data)
    one_line_error(run(setup, out, "--max-steps", "2", "--data", data, "--batch-size", "3", check=False),
                   "batch_size: 4 -> 3")
    one_line_error(run(setup, out, "--max-steps", "2", "--data", data, "--method", "hard", check=False),
                   "method: 'resure' -> 'hard'")
    data.write_text(data.read_text().replace("Add", "Plus", 1))  # the same path, other content
    one_line_error(run(setup, out, "--max-steps", "2", "--data", data, check=False), "data_sha256")
    p = run(setup, out, "--max-steps", "2", "--data", data, "--allow-changed-config")  # an explicit override
    assert p.returncode == 0


def _reference(setup, name, *common):
    ref = setup / name
    if not (ref / "run.json").is_file() or not json.loads((ref / "run.json").read_text())["finished"]:
        run(setup, ref, *common)
    return ref


def _same_run(ref, out):
    assert (ref / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (ref / "resure_state.json").read_bytes() == (out / "resure_state.json").read_bytes()
    assert json.loads((ref / "report.json").read_text()) == json.loads((out / "report.json").read_text())
    m_ref, m_out = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out))
    assert [(r["step"], r.get("loss")) for r in m_ref] == [(r["step"], r.get("loss")) for r in m_out]
    u_ref, u_out = ((d / "units.jsonl").read_text().splitlines() for d in (ref, out))
    assert u_ref == u_out  # every unit decision once, none repeated by the resume


SIGNAL_RUN = ("--max-steps", "6", "--batch-size", "4", "--lora-dropout", "0.1", "--record-units", "--save-every", "100")


def _signal_after(setup, out, n, sig):
    """Start the SIGNAL_RUN training into out and send it sig once n steps are in its metrics.jsonl."""
    p = run(setup, out, *SIGNAL_RUN, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(steps(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []) < n:
        time.sleep(0.02)
    p.send_signal(sig)
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_the_same_command_continues(setup, tmp_path, sig):
    ref = _reference(setup, "signal-ref", *SIGNAL_RUN)
    out = tmp_path / "run"
    p = _signal_after(setup, out, 2, sig)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + sig, text[-2000:]
    assert "stopped by signal" in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert [d.name for d in out.iterdir() if d.name.startswith("step-")]
    assert not (out / "adapter").exists()
    assert "resumed from step-" in run(setup, out, *SIGNAL_RUN).stdout
    _same_run(ref, out)


def test_a_damaged_run_json_names_both_ways_on_and_one_keeps_the_checkpoints(setup, tmp_path):
    """run.json unreadable beside a whole checkpoint: the rerun says how to go on instead of failing bare, and
    --allow-changed-config continues from the checkpoint, ending as the uninterrupted run."""
    ref = _reference(setup, "signal-ref", *SIGNAL_RUN)
    out = tmp_path / "run"
    p = _signal_after(setup, out, 2, signal.SIGTERM)
    p.communicate(timeout=300)
    (out / "run.json").write_text('{"run": ')
    one_line_error(run(setup, out, *SIGNAL_RUN, check=False), "run.json: not a valid JSON file (JSONDecodeError: "
                   "Expecting value: line 1 column 9 (char 8)); --allow-changed-config continues from the newest "
                   "checkpoint with this command's settings, --no-resume starts over")
    text = run(setup, out, *SIGNAL_RUN, "--allow-changed-config").stdout
    assert "run.json: not a valid JSON file" in text
    assert "rewritten from this command's settings" in text
    assert "resumed from step-" in text
    assert json.loads((out / "run.json").read_text())["finished"]
    _same_run(ref, out)


DAMAGE = {
    "pickle payload in trainer.pt": lambda d, flag: torch.save(_Payload(flag), d / "trainer.pt"),
    "empty rng-rank0.pt": lambda d, flag: (d / "rng-rank0.pt").write_bytes(b""),
    "state.json of another shape": lambda d, flag: (d / "state.json").write_text("{}"),
    "truncated adapter": lambda d, flag: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]),
    "no COMPLETE marker": lambda d, flag: (d / "COMPLETE").unlink(),
    "garbage state.json": lambda d, flag: (d / "state.json").write_text("{not json"),
}


class _Payload:
    """Unpickling this runs os.system: a checkpoint must never be unpickled beyond plain data."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_a_damaged_only_checkpoint_leaves_a_fresh_start_fresh(setup, tmp_path):
    """The newest checkpoint fails to load half way (its state.json is of another shape, read after the adapter):
    what it had restored is put back, so the run that starts over from step 0 equals an uninterrupted one."""
    ref = _reference(setup, "signal-ref", *SIGNAL_RUN)
    out = tmp_path / "run"
    _signal_after(setup, out, 3, signal.SIGTERM).wait()
    (ckpt,) = [d for d in out.iterdir() if d.name.startswith("step-")]
    (ckpt / "state.json").write_text('{"resure": {"config": {}}, "last_seen": []}')
    text = run(setup, out, *SIGNAL_RUN).stdout
    assert f"checkpoint {ckpt.name} skipped" in text
    assert "resumed from" not in text
    _same_run(ref, out)


def test_an_adapter_that_diverges_is_never_written(setup, tmp_path):
    p = run(setup, tmp_path / "run", "--max-steps", "4", "--lr", "1e30", "--warmup-ratio", "0", check=False)
    assert p.returncode == 2, p.stderr
    assert ("NaN or infinite" in p.stderr or "no finite unit loss" in p.stderr), p.stderr
    assert not (tmp_path / "run" / "adapter").exists()
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_older_one_resumes_exactly(setup, tmp_path, damage):
    common = ("--max-steps", "6", "--batch-size", "4", "--lora-dropout", "0.1", "--record-units", "--save-every", "2")
    ref = _reference(setup, "damage-ref", *common)
    out, flag = tmp_path / "run", tmp_path / "payload-ran"
    p = run(setup, out, *common, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "step-0000004").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    DAMAGE[damage](out / "step-0000004", flag)
    text = run(setup, out, *common).stdout
    assert "checkpoint step-0000004 skipped: incomplete or damaged" in text
    assert "resumed from step-0000002" in text
    assert not flag.exists()  # the planted payload never ran
    _same_run(ref, out)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch, capsys):
    import train
    calls, real = [], torch.save

    def save(obj, f, *a, **k):  # the third checkpoint's first file write fails as on a full disk
        calls.append(f)
        if "step-0000006" in str(f):
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"cannot write checkpoint .*step-0000006 .*No space left on device.*"
                                         r"the previous checkpoint step-0000004 is intact"):
        train.main(train_args(setup, out, "--max-steps", "8", "--save-every", "2"))
    assert sorted(d.name for d in out.iterdir() if "step-" in d.name) == ["step-0000002", "step-0000004"]
    monkeypatch.setattr(torch, "save", real)
    p = run(setup, out, "--max-steps", "8", "--save-every", "2")
    assert "resumed from step-0000004" in p.stdout
    assert (out / "adapter").is_dir()


def test_every_numeric_flag_has_a_range(setup, tmp_path):
    base = ["--model", setup / "tiny", "--data", setup / "data" / "train_N.jsonl", "--out", tmp_path / "o"]
    for flag, value in [("--max-steps", "0"), ("--epochs", "-1"), ("--warmup-ratio", "1.5"), ("--grad-clip", "-1"),
                        ("--lora-alpha", "-1"), ("--save-every", "-1"), ("--eval-every", "-1"), ("--log-every", "0"),
                        ("--batch-size", "0"), ("--lr", "nan"), ("--seed", "-1"), ("--lora-dropout", "1"),
                        ("--floor-percentile", "101"), ("--ema-decay", "0"), ("--window", "1"), ("--max-len", "1"),
                        ("--gain-alpha", "inf"), ("--prefilter-keep", "0"), ("--beta2", "1")]:
        one_line_error(cli("train.py", *base, flag, value, timeout=60), f"argument {flag}: must be")
    for args in [("generate", "--max-new-tokens", "0"), ("generate", "--temperature", "-1"), ("generate", "--top-p", "0"),
                 ("loss", "--max-len", "-1"), ("loss", "--batch-size", "0"), ("loss", "--device", "cuda:7")]:
        extra = ["--questions", tmp_path / "q.jsonl"] if args[0] == "generate" else ["--data", tmp_path / "d.jsonl"]
        one_line_error(cli("eval.py", args[0], "--model", setup / "tiny", *extra, *args[1:], timeout=60), args[1])
    one_line_error(cli("support/synth.py", "--out", tmp_path / "s", "--n-train", "-5", timeout=60), "n_train")
    one_line_error(cli("support/synth.py", "--out", tmp_path / "s", "--rate-N", "1.5", timeout=60), "rates")


def _copy_model(setup, dst, **changes):
    shutil.copytree(setup / "tiny", dst)
    for name, fn in changes.items():
        fn(dst / name)
    return dst


def test_bad_models_and_adapters(setup, tmp_path):
    data = setup / "data" / "train_N.jsonl"

    def nan_weight(f):
        sd = load_file(f)
        sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(sd, str(f))
    nan = _copy_model(setup, tmp_path / "nan", **{"model.safetensors": nan_weight})
    one_line_error(cli("train.py", "--model", nan, "--data", data, "--out", tmp_path / "o1"), "holds NaN")
    one_line_error(cli("eval.py", "loss", "--model", nan, "--data", data), "holds NaN")
    trunc = _copy_model(setup, tmp_path / "tok", **{"tokenizer.json": lambda f: f.write_text(f.read_text()[:5000])})
    one_line_error(cli("train.py", "--model", trunc, "--data", data, "--out", tmp_path / "o2"), "tokenizer.json")
    import transformers
    small = tmp_path / "small"  # a model whose embedding has fewer rows than the tokenizer has ids
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(small)
    shutil.copy(setup / "tiny" / "tokenizer.json", small)
    one_line_error(cli("eval.py", "loss", "--model", small, "--data", data), "vocab_size 1000")
    # an adapter trained on one base and loaded on another with the same shapes: loaded, with a warning
    run(setup, tmp_path / "a", "--max-steps", "1", "--warmup-ratio", "0")
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(setup / "tiny"))
    shutil.copytree(setup / "tiny", tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    p = cli("eval.py", "loss", "--model", tmp_path / "other", "--adapter", tmp_path / "a" / "adapter", "--data",
            setup / "data" / "test.jsonl")
    assert p.returncode == 0
    assert "was trained on base model 'tiny'" in p.stderr
    (tmp_path / "a" / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    one_line_error(cli("eval.py", "loss", "--model", setup / "tiny", "--adapter", tmp_path / "a" / "adapter",
                       "--data", data), "not a readable safetensors file")


def test_bad_data_files_are_one_line_and_skippable(setup, tmp_path):
    good = (setup / "data" / "train_N.jsonl").read_text().splitlines()
    files = {"binary.jsonl": os.urandom(3000), "latin1.jsonl": "caf\xe9 au lait\n".encode("latin-1"),
             "nested.jsonl": b"[" * 100000 + b"]" * 100000 + b"\n"}
    with gzip.open(tmp_path / "t.jsonl.gz", "wb") as f:
        f.write("\n".join(good).encode())
    files["truncated.jsonl.gz"] = (tmp_path / "t.jsonl.gz").read_bytes()[:300]
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        one_line_error(cli("train.py", "--model", setup / "tiny", "--data", tmp_path / name, "--out", tmp_path / "o"),
                       name)
        one_line_error(cli("data.py", "check", tmp_path / name), name)
    mixed = tmp_path / "mixed.jsonl"  # an undecodable line in skip mode is one bad sample, not a lost file
    mixed.write_bytes("\n".join(good[:20]).encode() + b"\n\xff\xfe broken\n" + "\n".join(good[20:30]).encode())
    p = cli("data.py", "check", mixed, "--on-bad-sample", "skip")
    assert p.returncode == 0
    assert "30 valid conversations" in p.stdout
    assert "not utf-8 1" in p.stderr


def test_output_paths_are_checked_before_the_work(setup, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(cli("train.py", "--model", setup / "tiny", "--data", setup / "data" / "train_N.jsonl", "--out",
                       tmp_path / "file"), "is not a folder")
    t0 = time.time()
    one_line_error(cli("eval.py", "loss", "--model", setup / "tiny", "--data", setup / "data" / "test.jsonl",
                       "--out", tmp_path / "file" / "loss.json"), "loss.json")
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n')
    one_line_error(cli("eval.py", "generate", "--model", setup / "tiny", "--questions", q, "--out", tmp_path / "a.jsonl"),
                   "question_id 1 is repeated")
    assert time.time() - t0 < 120


def test_ramp_counts_optimizer_steps_whatever_the_accumulation(setup, tmp_path):
    """--ramp-steps 3 with --grad-accum 4: the weights' ramp r is 1/3, 2/3, 1 over the first three optimizer
    steps after the warm-up, constant within a step (metrics.jsonl logs the step's last micro-batch)."""
    out = tmp_path / "run"
    run(setup, out, "--max-steps", "6", "--grad-accum", "4", "--batch-size", "2", "--ramp-steps", "3",
        "--warmup-samples", "10", "--unit", "dialogue")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    active = [r["ramp"] for r in rows if not r["warmup"]]
    assert active[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert rows[0]["warmup"]
    assert len(active) >= 4


def test_prefilter_scores_from_a_file(setup, tmp_path):
    """--prefilter-scores keeps the best-scored conversations: every unit the run saw comes from them."""
    convs = [json.loads(x) for x in (setup / "data" / "train_N.jsonl").read_text().splitlines()]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": c["id"], "score": -i}) + "\n" for i, c in enumerate(convs)))
    out = tmp_path / "run"
    p = run(setup, out, "--prefilter-keep", "0.25", "--prefilter-scores", scores, "--batch-size", "8",
            "--report-top", "1000", "--max-steps", "3")
    assert f"kept 24 of {len(convs)} samples" in p.stdout
    seen = {r["id"] for r in json.loads((out / "report.json").read_text())["most_down_weighted"]}
    assert seen == {c["id"] for c in convs[:24]}
    scores.write_text("1\n2\nthree\n")
    one_line_error(run(setup, tmp_path / "r2", "--prefilter-keep", "0.5", "--prefilter-scores", scores, check=False),
                   "scores.jsonl")


def test_checkpoints_of_two_ranks_are_never_overwritten_by_one_process(setup, tmp_path):
    """A run of 2 ranks resumed by one process is refused in one line before training, also with
    --allow-changed-config, and its checkpoints are left exactly as they were."""
    out = tmp_path / "run"
    common = ("--max-steps", "4", "--save-every", "2", "--grad-accum", "1")
    run(setup, out, *common, "--batch-size", "2", nproc=2)
    before = snapshot(out)
    for extra in (("--allow-changed-config",), ()):
        p = run(setup, out, *common, "--batch-size", "4", *extra, check=False)
        one_line_error(p, "its checkpoints were written by 2 ranks and resume only on 2")
        assert snapshot(out) == before


def _rank_pid(tag, rank):
    """The process whose environment holds TEST_TAG=tag and RANK=rank (a torchrun worker), or None."""
    for entry in os.listdir("/proc"):
        try:
            env = (Path("/proc") / entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def test_a_signal_to_one_rank_of_two_is_named_by_rank_0(setup, tmp_path):
    """SIGINT to rank 1 alone: the ranks agree on the signal, so rank 0's line names signal 2 (not 0), after a step
    whose checkpoint is there."""
    out = tmp_path / "run"
    tag = f"sigint-{os.getpid()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *train_args(setup, out, "--max-steps", "40", "--batch-size", "2", "--grad-accum", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TEST_TAG=tag)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and steps(out / "metrics.jsonl")):
        time.sleep(0.05)
    rank_1 = _rank_pid(tag, 1)
    assert rank_1 is not None
    os.kill(rank_1, signal.SIGINT)
    text = p.communicate(timeout=300)[0]
    lines = [x for x in text.splitlines() if "stopped by signal" in x]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith("train.py: stopped by signal 2 after step "), lines
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert (out / f"step-{step:07d}").is_dir()
