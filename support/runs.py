"""The run folder of train.py: nothing a user ran is lost, and nothing is done twice.

    OUT/run.json       the run's settings (the flags that change what it computes, the sha256 of
                       its input files, the base model's fingerprint, the world size) and whether
                       it finished
    OUT/step-NNNNNNN/  a checkpoint: the trainer's files (adapter, trainer.pt, state.json),
                       trainer.json, rng-rank*.pt, COMPLETE; written as .tmp-step-NNNNNNN/ and
                       renamed when whole, the newest two kept
    OUT/metrics.jsonl, units.jsonl   the logs, cut back to the checkpoint's step on resume

A rerun of a finished run does nothing; a rerun of an interrupted one continues from the newest
checkpoint that loads (a damaged one is skipped with one line), bitwise-exactly; a run with other
settings is refused; --no-resume moves an earlier run's files into OUT/previous-<time>/; OUT/.lock
keeps a second process out. SIGINT / SIGTERM finish the current step, checkpoint and exit 130 / 143
(Stop). A failed write (a full disk) removes the partial checkpoint and names the intact one.
Everything is read as data: torch.load runs with weights_only, so a pickle payload planted in a
checkpoint cannot execute.

This module handles files and the ranks' agreement about them. What touches the model stays with
the trainer: it hands Folder.save a function that writes its state into a folder, and
Folder.resume one that reads it back.
"""
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from support.checkpoint import read_json

OURS = ("run.json", "metrics.jsonl", "units.jsonl", "report.json", "resure_state.json", "adapter",
        "merged")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # a full disk shows up as any of these


class RunError(ValueError):
    """A run folder we cannot use; the message is one line."""


@dataclass
class Folder:
    """OUT as one rank of a run sees it. How an earlier run found there is treated comes from the
    command line: require_checkpoint (--resume), fresh (--no-resume), allow_changed
    (--allow-changed-config)."""
    out: str                       # the run folder
    rank: int = 0                  # this process among world
    world: int = 1                 # processes training together
    device: torch.device = torch.device("cpu")  # where the ranks agree (NCCL: this rank's GPU)
    require_checkpoint: bool = False  # a checkpoint to continue from must be there
    fresh: bool = False            # start over: an earlier run's files are moved aside
    allow_changed: bool = False    # continue although a setting of the run changed
    lock: IO | None = None         # OUT/.lock, held by rank 0 from claim() to release()
    identity: dict = field(default_factory=dict)  # run.json's "run": settings, inputs, model
    previous: dict | None = None   # run.json as claim() found it (None: absent, or set aside)

    def log(self, message):
        if self.rank == 0:
            print(message)

    def claim(self, identity, outputs):
        """Check OUT before any work. False when it holds this very run, finished, with its outputs
        (paths relative to OUT) all there: nothing to do. A run of other settings that has a
        checkpoint or finished is refused (unless fresh or allow_changed); a second process on the
        same OUT is refused (the lock, held for the whole run)."""
        self.identity = dict(identity)
        self.take_lock()
        if self.fresh:
            return True
        self.previous = self.read_record()
        checkpoints = self.checkpoints()
        if self.require_checkpoint and not checkpoints:
            raise RunError(f"--resume: no checkpoint in {self.out}")
        if self.previous is None:
            return True
        before = self.previous["run"]
        changed = [k for k in self.identity if before.get(k) != self.identity[k]]
        finished = self.previous.get("finished")
        if changed and not self.allow_changed and (finished or checkpoints):
            diffs = [f"{k}: {before.get(k)!r} -> {self.identity[k]!r}" for k in changed[:4]]
            raise RunError(f"{self.out} holds a run with other settings ({', '.join(diffs)}); use "
                           "another --out, --no-resume to start over, or --allow-changed-config")
        done = all(os.path.exists(os.path.join(self.out, path)) for path in outputs)
        if finished and not changed and done:
            steps = self.previous.get("steps")
            self.log(f"{self.out} already holds this run, finished ({steps} steps): nothing to do")
            return False
        return True

    def take_lock(self):
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise RunError(f"--out {self.out}: exists and is not a folder")
        try:
            os.makedirs(self.out, exist_ok=True)
            if self.rank == 0:
                self.lock = open(os.path.join(self.out, ".lock"), "a")
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise RunError(f"--out {self.out}: another training process is using this "
                           "folder") from None
        except OSError as e:
            raise RunError(f"--out {self.out}: cannot be created or written "
                           f"({e.strerror})") from None

    def read_record(self):
        """run.json, None when there is none. A damaged one is refused, or with allow_changed
        rewritten from this command's settings (the checkpoints beside it may still be whole)."""
        path = os.path.join(self.out, "run.json")
        if not os.path.isfile(path):
            return None
        try:
            record = read_json(path, RunError)
            if not isinstance(record.get("run"), dict):
                raise RunError(f"{path}: not a run record")
        except RunError as e:
            if not self.allow_changed:
                raise RunError(f"{e}; --allow-changed-config continues from the newest checkpoint "
                               "with this command's settings, --no-resume starts over") from None
            self.log(f"{e}: rewritten from this command's settings (--allow-changed-config)")
            return None
        return record

    def start(self, fingerprint):
        """Just before training: a changed base model (its fingerprint) is refused like a changed
        setting; when fresh, an earlier run's files move to OUT/previous-<time>/ (the user's own
        files stay); run.json records this run."""
        before = (self.previous or {}).get("run", {}).get("model_fingerprint")
        other = fingerprint and before not in (None, fingerprint)
        if other and self.checkpoints() and not self.allow_changed:
            raise RunError(f"{self.out} holds a run on other base weights (fingerprint {before} "
                           f"-> {fingerprint}); use another --out, --no-resume or "
                           "--allow-changed-config")
        self.identity["model_fingerprint"] = fingerprint
        if self.fresh and self.rank == 0:
            self.move_aside()
        self.barrier()
        if self.rank == 0:
            dump({"run": self.identity, "finished": False}, os.path.join(self.out, "run.json"))
        self.barrier()

    def move_aside(self):
        names = [n for n in os.listdir(self.out)
                 if n in OURS or n.startswith(("step-", ".tmp-step-"))]
        if not names:
            return
        aside = os.path.join(self.out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for name in names:
            os.replace(os.path.join(self.out, name), os.path.join(aside, name))
        self.log(f"--no-resume: the earlier run's files in {self.out} were moved to {aside}")

    def finish(self, steps):
        """run.json says this run finished after `steps` optimizer steps."""
        record = {"run": self.identity, "finished": True, "steps": steps}
        dump(record, os.path.join(self.out, "run.json"))

    def release(self):
        """Give OUT/.lock back (also on an error: a caller in the same process may train again)."""
        if self.lock:
            self.lock.close()
            self.lock = None

    def checkpoints(self):
        """The names of OUT's checkpoints, oldest first."""
        if not os.path.isdir(self.out):
            return []
        return sorted(d for d in os.listdir(self.out) if d.startswith("step-"))

    def save(self, step, write):
        """Checkpoint step-NNNNNNN, whole or not at all: write(folder) puts the trainer's files
        there (rank 0), every rank adds its random state, COMPLETE comes last and the folder is
        renamed into place; the newest two are kept. A failed write removes the partial folder and
        names the intact checkpoint."""
        tmp = os.path.join(self.out, f".tmp-step-{step:07d}")
        final = os.path.join(self.out, f"step-{step:07d}")
        previous = self.checkpoints()
        marker = {"step": step, "world_size": self.world}
        error = None
        if self.rank == 0:
            error = attempt(write_trainer_files, tmp, write, marker)
        self.barrier()
        rng_file = os.path.join(tmp, f"rng-rank{self.rank}.pt")
        error = error or attempt(torch.save, rng_state(), rng_file)
        if self.any_rank(error is not None):
            shutil.rmtree(tmp, ignore_errors=True)
            why = one_line(error) if error else "failed on another rank"
            intact = "there is no earlier one"
            if previous:
                intact = f"the previous checkpoint {previous[-1]} is intact"
            raise RunError(f"cannot write checkpoint {final} ({why}); {intact}")
        if self.rank == 0:
            dump(marker, os.path.join(tmp, "COMPLETE"))
            shutil.rmtree(final, ignore_errors=True)  # a damaged one the resume skipped
            os.replace(tmp, final)
            for old in self.checkpoints()[:-2]:
                shutil.rmtree(os.path.join(self.out, old), ignore_errors=True)
        self.barrier()

    def load(self, path, read):
        """Restore checkpoint `path` and return its step. Its markers and this rank's random state
        are read and checked first, then read(path) restores the trainer's files (putting back what
        it restored if it fails); on a failure the random state goes back too, so a damaged
        checkpoint leaves a fresh run fresh."""
        done = read_json(os.path.join(path, "COMPLETE"), RunError)
        info = read_json(os.path.join(path, "trainer.json"), RunError)
        rng = torch.load(os.path.join(path, f"rng-rank{self.rank}.pt"), weights_only=True)
        if done != info or done.get("world_size") != self.world:
            raise RunError(f"COMPLETE ({done}) and trainer.json ({info}) do not agree with "
                           "this run")
        before = rng_state()
        try:
            set_rng_state(rng)
            read(path)
        except Exception:
            set_rng_state(before)
            raise
        return int(info["step"])

    def resume(self, read):
        """Restore the newest checkpoint that loads on every rank (one line for each one skipped)
        and return its step, 0 without one. The logs are cut back to that step, so that they read
        as if the run had never stopped."""
        for name in reversed(self.checkpoints()):
            step = None
            error = None
            try:
                step = self.load(os.path.join(self.out, name), read)
            except Exception as e:  # any damage: truncated or bad files, a refused pickle, shapes
                error = e
            if not self.any_rank(error is not None):
                self.log(f"resumed from {name} (step {step})")
                self.cut_logs(step)
                return step
            why = one_line(error) if error else "on another rank"
            self.log(f"checkpoint {name} skipped: incomplete or damaged ({why})")
        self.cut_logs(0)
        return 0

    def cut_logs(self, step):
        """Cut metrics.jsonl and units.jsonl back to what a run stopped after `step` steps had
        written: the metrics through that step, the units of the steps before it (a unit record
        carries its 0-based step)."""
        if self.rank == 0:
            cut_jsonl(os.path.join(self.out, "metrics.jsonl"), step + 1)
            cut_jsonl(os.path.join(self.out, "units.jsonl"), step)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def any_rank(self, flag):
        """True when flag is true on any rank (a collective: every rank calls it)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def write_trainer_files(tmp, write, marker):
    """A checkpoint's folder afresh, the trainer's files in it, then trainer.json."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    dump(marker, os.path.join(tmp, "trainer.json"))


def attempt(fn, *args):
    """The write error fn(*args) raised (a full disk), or None."""
    try:
        fn(*args)
    except WRITE_ERRORS as e:
        return e
    return None


def cut_jsonl(path, end):
    """Keep the records of a JSON-lines log whose "step" is below `end`; drop a half-written one."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # the half-written last line of a killed run
            continue
        if record.get("step", 0) < end:
            kept.append(line + b"\n")
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Stop:
    """While training (a context), SIGINT / SIGTERM set a flag; the loop asks requested() after
    each step (all ranks agree) and stops. The previous handlers come back afterwards."""

    def __init__(self, folder):
        self.folder = folder
        self.signum = 0
        self.saved = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def requested(self):
        return self.folder.any_rank(self.signum)

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)


def identity(args, keys, world):
    """The settings that define a run (keys of args), the sha256 of every input file, absolute
    paths, the world size; the base model's fingerprint joins it once the model is loaded
    (Folder.start)."""
    ident = {k: getattr(args, k, None) for k in keys}
    for k in ("data", "warmup_data", "prefilter_scores"):
        path = getattr(args, k)
        ident[k + "_sha256"] = path and os.path.isfile(path) and _sha256(path)
    ident.update(world_size=world, model=os.path.abspath(args.model),
                 warmup_data=args.warmup_data and os.path.abspath(args.warmup_data))
    return ident


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state():
    """Every generator's state, in plain types and tensors only, so that
    torch.load(weights_only=True) reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(s):
    random.setstate(tuple(s["python"]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def dump(obj, path):
    """JSON written under a temporary name and renamed into place."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, default=float)
    os.replace(path + ".tmp", path)


def one_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
