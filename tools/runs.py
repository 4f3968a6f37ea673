"""The run folder of train.py: nothing a user ran is lost, and nothing is done twice.

    OUT/run.json               the run's settings (train.RUN_KEYS, the data's sha256, the world size), "finished"
    OUT/step-NNNNNNN/          a checkpoint: adapter, trainer.pt (optimizer, scaler), state.json (ReSURE, the report's
                               table), trainer.json, rng-rank*.pt, COMPLETE; written as .tmp-step-NNNNNNN/ and renamed
                               when whole, the newest two kept
    OUT/metrics.jsonl, units.jsonl   the logs, cut back to the checkpoint's step on resume

A rerun of a finished run does nothing; a rerun of an interrupted one continues from the newest checkpoint that
loads (a damaged one is skipped with one line), bitwise-exactly; a run with other settings is refused; --no-resume
moves an earlier run aside. SIGINT / SIGTERM finish the current step, checkpoint and exit 130 / 143. A failed write
(a full disk) removes the partial checkpoint and names the intact one. Everything is read as data: torch.load runs
with weights_only, so a pickle payload planted in a checkpoint cannot execute.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from tools.checkpoint import read_json


class RunError(ValueError):
    """A run folder we cannot use; the message is one line."""


def setup_distributed():
    """(rank, world size, device): torchrun's environment, NCCL on GPUs and gloo on CPUs; one process without it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")


def rng_state():  # plain types and tensors only, so that torch.load(weights_only=True) reads it back
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(tuple(s["python"]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def identity(args, keys, world):
    """The settings that define a run (keys of args), the data file's sha256, absolute paths, the world size."""
    ident = {k: getattr(args, k, None) for k in keys}
    h = hashlib.sha256()
    with open(args.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    ident["data_sha256"] = h.hexdigest()
    ident.update(world_size=world, model=os.path.abspath(args.model),
                 warmup_data=args.warmup_data and os.path.abspath(args.warmup_data))
    return ident


def claim(run):
    """Check OUT before any work. False when it holds this very run, finished (nothing to do); a run of other
    settings that has a checkpoint or finished is refused (unless --no-resume or --allow-changed-config)."""
    out, args = run.out, run.args
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot be created ({e})") from None
    if not os.access(out, os.W_OK):
        raise RunError(f"--out {out}: not writable")
    meta = os.path.join(out, "run.json")
    run.previous = read_json(meta, RunError) if os.path.isfile(meta) else None
    if run.previous is None or args.no_resume:
        return True
    changed = [k for k in run.identity if run.previous.get("run", {}).get(k) != run.identity[k]]
    if changed and not args.allow_changed_config and (run.previous.get("finished") or checkpoints(out)):
        raise RunError(f"{out} holds a run with other settings (" + ", ".join(
            f"{k}: {run.previous.get('run', {}).get(k)!r} -> {run.identity[k]!r}" for k in changed[:4]) +
            "); use another --out, --no-resume to start over, or --allow-changed-config")
    if run.previous.get("finished") and not changed:
        run.log(f"{out} already holds this run, finished ({run.previous.get('steps')} steps): nothing to do")
        return False
    return True


def start(run):
    """Just before training: with --no-resume an earlier run is moved aside; OUT/run.json records this run."""
    out = run.out
    if run.previous is not None and run.args.no_resume and run.rank == 0:
        aside = f"{os.path.normpath(out)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(out, aside)
        os.makedirs(out)
        run.log(f"--no-resume: the earlier run in {out} was moved to {aside}")
    barrier(run)
    if run.rank == 0:
        dump({"run": run.identity, "finished": False}, os.path.join(out, "run.json"))
    barrier(run)


def finished(run, steps):
    dump({"run": run.identity, "finished": True, "steps": steps}, os.path.join(run.out, "run.json"))


def checkpoints(out):
    return sorted(d for d in os.listdir(out) if d.startswith("step-")) if os.path.isdir(out) else []


def save(run, step):
    """Write checkpoint step-NNNNNNN whole or not at all; the newest two are kept."""
    tmp, final = os.path.join(run.out, f".tmp-step-{step:07d}"), os.path.join(run.out, f"step-{step:07d}")
    err = None
    from lora import save_adapter
    try:
        if run.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(run.net, tmp, run.args.model)
            torch.save({"optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict()},
                       os.path.join(tmp, "trainer.pt"))
            dump({"resure": run.rs.state_dict(), "last_seen": list(run.last_seen.values())},
                 os.path.join(tmp, "state.json"))
            dump({"step": step, "world_size": run.world}, os.path.join(tmp, "trainer.json"))
        barrier(run)
        torch.save(rng_state(), os.path.join(tmp, f"rng-rank{run.rank}.pt"))
    except OSError as e:
        err = e
    if any_rank(run, err is not None):
        shutil.rmtree(tmp, ignore_errors=True)
        prev = checkpoints(run.out)
        raise RunError(f"cannot write checkpoint {final} ({err or 'failed on another rank'}); "
                       + (f"the previous checkpoint {prev[-1]} is intact" if prev else "there is no earlier one"))
    if run.rank == 0:
        dump({"step": step, "world_size": run.world}, os.path.join(tmp, "COMPLETE"))
        shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step that the resume skipped
        os.replace(tmp, final)
        for old in checkpoints(run.out)[:-2]:
            shutil.rmtree(os.path.join(run.out, old), ignore_errors=True)
    barrier(run)


def load(run, path):
    """Restore checkpoint `path` into the run and return its step; everything is read and checked first."""
    from lora import load_adapter
    done, info = read_json(os.path.join(path, "COMPLETE"), RunError), read_json(os.path.join(path, "trainer.json"),
                                                                                RunError)
    state = read_json(os.path.join(path, "state.json"), RunError)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    rng = torch.load(os.path.join(path, f"rng-rank{run.rank}.pt"), weights_only=True)
    if done != info or done.get("world_size") != run.world:
        raise RunError(f"COMPLETE ({done}) does not match trainer.json ({info}) or this run's {run.world} ranks")
    load_adapter(run.net, path)
    run.opt.load_state_dict(trainer["optimizer"])
    run.scaler.load_state_dict(trainer["scaler"])
    run.rs.load_state_dict(state["resure"])
    run.last_seen = {(r["sample"], r["turn"]): r for r in state["last_seen"]}
    set_rng_state(rng)
    return int(info["step"])


def resume(run):
    """Load the newest checkpoint that loads on every rank (one line for each one skipped); returns its step.
    The logs are cut back to that step, so that they read as if the run had never stopped."""
    for name in reversed(checkpoints(run.out)):
        try:
            step, err = load(run, os.path.join(run.out, name)), None
        except Exception as e:  # any damage: truncated files, bad JSON, a refused pickle, wrong shapes
            step, err = None, e
        if not any_rank(run, err is not None):
            run.log(f"resumed from {name} (step {step})")
            if run.rank == 0:
                truncate_logs(run.out, step)
            return step
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if err else "damaged on another rank"
        run.log(f"checkpoint {name} skipped: incomplete or damaged ({why})")
    if run.args.resume:
        raise RunError(f"--resume: no usable checkpoint in {run.out}")
    if run.rank == 0:
        truncate_logs(run.out, 0)
    return 0


def truncate_logs(out, step):
    """Cut metrics.jsonl and units.jsonl back to what a run stopped after `step` steps had written."""
    for name, keep in (("metrics.jsonl", lambda r: r.get("step", 0) <= step),
                       ("units.jsonl", lambda r: r.get("step", 0) < step)):
        path, kept = os.path.join(out, name), []
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            for line in f.read().split(b"\n"):
                try:
                    kept += [line + b"\n"] if line.strip() and keep(json.loads(line)) else []
                except ValueError:  # a half-written last line of a killed run
                    pass
        with open(path + ".tmp", "wb") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class Stop:
    """While training (a context), SIGINT / SIGTERM set a flag; the loop asks requested() after each step (all
    ranks agree) and stops. The previous handlers come back afterwards."""

    def __init__(self, run):
        self.run, self.signum, self.saved = run, 0, {}

    def __enter__(self):
        self.saved = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def requested(self):
        return any_rank(self.run, self.signum)

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)


def dump(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, default=float)
    os.replace(path + ".tmp", path)


def barrier(run):
    if run.world > 1:
        dist.barrier()


def any_rank(run, flag):
    """True when flag is true on any rank (a collective: every rank calls it)."""
    if run.world == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=run.device if run.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
