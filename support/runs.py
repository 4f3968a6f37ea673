"""The run folder of train.py: nothing a user ran is lost, and nothing is done twice.

    OUT/run.json               the run's settings (the flags that change what it computes, the sha256 of its input
                               files, the base model's fingerprint, the world size) and whether it finished
    OUT/step-NNNNNNN/          a checkpoint: adapter, trainer.pt (optimizer, scaler), state.json (ReSURE, the report's
                               table), trainer.json, rng-rank*.pt, COMPLETE; written as .tmp-step-NNNNNNN/ and renamed
                               when whole, the newest two kept
    OUT/metrics.jsonl, units.jsonl   the logs, cut back to the checkpoint's step on resume

A rerun of a finished run does nothing; a rerun of an interrupted one continues from the newest checkpoint that
loads (a damaged one is skipped with one line), bitwise-exactly; a run with other settings is refused; --no-resume
moves an earlier run's files into OUT/previous-<time>/; OUT/.lock keeps a second process out. SIGINT / SIGTERM
finish the current step, checkpoint and exit 130 / 143. A failed write (a full disk) removes the partial checkpoint
and names the intact one. Everything is read as data: torch.load runs with weights_only, so a pickle payload
planted in a checkpoint cannot execute. """
import copy
import fcntl
import gc
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
from safetensors import SafetensorError

from support.checkpoint import read_json


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


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identity(args, keys, world):
    """The settings that define a run (keys of args), the sha256 of every input file, absolute paths, the world
    size; the base model's fingerprint joins it once the model is loaded (start)."""
    ident = {k: getattr(args, k, None) for k in keys}
    for k in ("data", "warmup_data", "prefilter_scores"):
        ident[k + "_sha256"] = getattr(args, k) and os.path.isfile(getattr(args, k)) and _sha256(getattr(args, k))
    ident.update(world_size=world, model=os.path.abspath(args.model),
                 warmup_data=args.warmup_data and os.path.abspath(args.warmup_data))
    return ident


OURS = ("run.json", "metrics.jsonl", "units.jsonl", "report.json", "resure_state.json", "adapter", "merged")


def claim(run):
    """Check OUT before any work. False when it holds this very run, finished, its outputs all there (nothing to
    do); a run of other settings that has a checkpoint or finished is refused (unless --no-resume or
    --allow-changed-config); a second process on the same OUT is refused (a lock held for the whole run)."""
    out, args = run.out, run.args
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        if run.rank == 0:
            run.lock = open(os.path.join(out, ".lock"), "a")
            fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        release(run)
        raise RunError(f"--out {out}: another training process is using this folder") from None
    except OSError as e:
        raise RunError(f"--out {out}: cannot be created or written ({e.strerror})") from None
    meta, ckpts = os.path.join(out, "run.json"), checkpoints(out)
    if args.no_resume:
        run.previous = True
        return True
    try:
        run.previous = read_json(meta, RunError) if os.path.isfile(meta) else None
        if run.previous is not None and not isinstance(run.previous.get("run"), dict):
            raise RunError(f"{meta}: not a run record")
    except RunError as e:  # damaged: the checkpoints beside it may still be whole
        if not args.allow_changed_config:
            raise RunError(f"{e}; --allow-changed-config continues from the newest checkpoint with this command's "
                           "settings, --no-resume starts over") from None
        run.log(f"{e}: rewritten from this command's settings (--allow-changed-config)")
        run.previous = None
    if args.resume and not ckpts:
        raise RunError(f"--resume: no checkpoint in {out}")
    if run.previous is None:
        return True
    changed = [k for k in run.identity if run.previous["run"].get(k) != run.identity[k]]
    if changed and not args.allow_changed_config and (run.previous.get("finished") or ckpts):
        raise RunError(f"{out} holds a run with other settings (" + ", ".join(
            f"{k}: {run.previous['run'].get(k)!r} -> {run.identity[k]!r}" for k in changed[:4]) +
            "); use another --out, --no-resume to start over, or --allow-changed-config")
    outputs = os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors")) and \
        (not args.merge or os.path.isdir(os.path.join(out, "merged")))
    if run.previous.get("finished") and not changed and outputs:
        run.log(f"{out} already holds this run, finished ({run.previous.get('steps')} steps): nothing to do")
        return False
    return True


def start(run):
    """Just before training: with --no-resume an earlier run's files move to OUT/previous-<time>/ (the user's own
    files stay); a changed base model (its fingerprint) is refused like a changed setting; run.json records
    this run."""
    out, fp = run.out, getattr(run.net, "fingerprint", None)
    old = (run.previous or {}) if isinstance(run.previous, dict) else {}
    if fp and old.get("run", {}).get("model_fingerprint") not in (None, fp) and checkpoints(out) and \
            not run.args.allow_changed_config:
        raise RunError(f"{out} holds a run on other base weights (fingerprint {old['run']['model_fingerprint']} "
                       f"-> {fp}); use another --out, --no-resume or --allow-changed-config")
    run.identity["model_fingerprint"] = fp
    if run.args.no_resume and run.rank == 0:
        names = [n for n in os.listdir(out) if n in OURS or n.startswith(("step-", ".tmp-step-"))]
        if names:
            aside = os.path.join(out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(aside)
            for n in names:
                os.replace(os.path.join(out, n), os.path.join(aside, n))
            run.log(f"--no-resume: the earlier run's files in {out} were moved to {aside}")
    barrier(run)
    if run.rank == 0:
        dump({"run": run.identity, "finished": False}, os.path.join(out, "run.json"))
    barrier(run)


def release(run):
    """Give OUT/.lock back (also on an error: a caller in the same process may train again)."""
    if getattr(run, "lock", None):
        run.lock.close()
        run.lock = None


def teardown(run):
    """The end of train.main, also on an error: the lock given back, then DDP, then the process group. DDP sits in
    reference cycles, so it is collected here: a DDP reducer that outlives the gloo process group makes torch
    2.13 abort at interpreter exit now and then ("terminate called without an active exception")."""
    release(run)
    run.ddp = None
    gc.collect()
    if dist.is_initialized():  # torchrun, also with one rank
        dist.destroy_process_group()


def finished(run, steps):
    dump({"run": run.identity, "finished": True, "steps": steps}, os.path.join(run.out, "run.json"))


def checkpoints(out):
    return sorted(d for d in os.listdir(out) if d.startswith("step-")) if os.path.isdir(out) else []


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # a full disk shows up as any of these


def save(run, step):
    """Write checkpoint step-NNNNNNN whole or not at all; the newest two are kept. An adapter that became
    non-finite is refused before anything is written."""
    from lora import save_adapter
    tmp, final = os.path.join(run.out, f".tmp-step-{step:07d}"), os.path.join(run.out, f"step-{step:07d}")
    prev = checkpoints(run.out)
    if not all(bool(torch.isfinite(p).all()) for p in run.params):
        raise RunError(f"the adapter's weights are NaN or infinite after step {step} (is --lr too high?); "
                       + (f"the last good checkpoint is {prev[-1]}" if prev else "nothing was saved"))
    err = None
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
    except WRITE_ERRORS as e:
        err = e
    if any_rank(run, err is not None):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write checkpoint {final} ({one_line(err) if err else 'failed on another rank'}); "
                       + (f"the previous checkpoint {prev[-1]} is intact" if prev else "there is no earlier one"))
    if run.rank == 0:
        dump({"step": step, "world_size": run.world}, os.path.join(tmp, "COMPLETE"))
        shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step that the resume skipped
        os.replace(tmp, final)
        for old in checkpoints(run.out)[:-2]:
            shutil.rmtree(os.path.join(run.out, old), ignore_errors=True)
    barrier(run)


def one_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def load(run, path):
    """Restore checkpoint `path` into the run and return its step. Every file is read and checked first, and a
    failure while restoring puts back what was there, so a damaged checkpoint leaves a fresh run fresh."""
    from lora import load_adapter, lora_state_dict
    done, info = read_json(os.path.join(path, "COMPLETE"), RunError), read_json(os.path.join(path, "trainer.json"),
                                                                                RunError)
    state = read_json(os.path.join(path, "state.json"), RunError)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    rng = torch.load(os.path.join(path, f"rng-rank{run.rank}.pt"), weights_only=True)
    if done != info or done.get("world_size") != run.world or not isinstance(state.get("last_seen"), list):
        raise RunError(f"COMPLETE ({done}), trainer.json ({info}) and state.json do not agree with this run")
    before = ({k: v.detach().clone() for k, v in lora_state_dict(run.net).items()}, copy.deepcopy(run.opt.state_dict()),
              run.scaler.state_dict(), run.rs.state_dict())
    try:
        load_adapter(run.net, path)
        run.opt.load_state_dict(trainer["optimizer"])
        run.scaler.load_state_dict(trainer["scaler"])
        run.rs.load_state_dict(state["resure"])
        run.last_seen = {(r["sample"], r["turn"]): r for r in state["last_seen"]}
        set_rng_state(rng)
    except Exception:
        with torch.no_grad():
            for k, v in lora_state_dict(run.net).items():
                v.copy_(before[0][k])
        run.opt.load_state_dict(before[1])
        run.scaler.load_state_dict(before[2])
        run.rs.load_state_dict(before[3])
        run.last_seen = {}
        raise
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
        run.log(f"checkpoint {name} skipped: incomplete or damaged ({one_line(err) if err else 'on another rank'})")
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
