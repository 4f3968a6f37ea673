"""The run folder of train.py: nothing a user ran is lost, and nothing is done twice.

    OUT/run.json       the run's settings (the flags that change what it computes, the sha256 of
                       its input files, the base model's fingerprint, the world size) and whether
                       it finished
    OUT/step-NNNNNNN/  a checkpoint: the trainer's files (adapter, trainer.pt, state.json),
                       trainer.json (its step, world size and the settings it was written under),
                       rng-rank*.pt, COMPLETE; written as .tmp-step-NNNNNNN/ and renamed when
                       whole, the newest two of the run kept
    OUT/metrics.jsonl, units.jsonl   the logs, cut back to the checkpoint's step on resume

A rerun of a finished run does nothing; a rerun of an interrupted one continues from the newest
checkpoint that loads (a damaged one of its own is skipped with one line), bitwise-exactly; a run
with other settings than the newest checkpoint's is refused; --no-resume moves an earlier run's
files into OUT/previous-<time>/; OUT/.lock keeps a second process out. A checkpoint written under
other settings is never deleted or overwritten. SIGINT / SIGTERM finish the current step,
checkpoint and exit 130 / 143 (Stop). A failed write (a full disk) removes the partial checkpoint
and names the intact one. Everything is read as data: torch.load runs with weights_only, so a
pickle payload planted in a checkpoint cannot execute.

This module handles files and the ranks' agreement about them, from run.json's record of a run
(run_identity) to the end of the job (teardown). What touches the model stays with the trainer:
it hands Folder.save a function that writes its state into a folder, and Folder.resume one that
reads it back. Work outside train.py's loop (the baselines' steps) keeps the same promise with the
last section: folders written whole, damaged state recomputed, and a signal's one line naming what
was kept (Progress, stops_reported).
"""
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel as DDP

from support.checkpoint import read_json
from support.cli import UsageError

OURS = ("run.json", "metrics.jsonl", "units.jsonl", "report.json", "resure_state.json", "adapter",
        "merged")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # a full disk shows up as any of these
# train.py's flags that do not change what a run computes; resuming with another changed is refused
NOT_RUN_KEYS = ("data", "eval_data", "out", "record_units", "log_every", "eval_every",
                "save_every", "resume", "no_resume", "allow_changed_config", "merge", "report_top",
                "demo_eval", "demo")
SIGNAL_NAMES = {130: "SIGINT", 143: "SIGTERM"}


class RunError(ValueError):
    """A run folder we cannot use; the message is one line."""


UNKNOWN = "the settings it was written under: unknown"  # a record that cannot be read


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
    defaults: dict = field(default_factory=dict)  # each setting's value when its flag is left out
    previous: dict | None = None   # run.json as claim() found it (None: absent, or set aside)
    resumed_changes: dict = field(default_factory=dict)  # how the resumed checkpoint's run differs

    def log(self, message):
        if self.rank == 0:
            print(message)

    def claim(self, identity, outputs, defaults=None):
        """Check OUT before any work. False when it holds this very run, finished, with its outputs
        (paths relative to OUT) all there: nothing to do. A run of other settings is refused
        (check_records); a second process on the same OUT is refused (the lock, held for the whole
        run). defaults: each setting's value when its flag is left out, which a record written
        before the setting existed ran with."""
        self.identity = dict(identity)
        self.defaults = dict(defaults or {})
        self.take_lock()
        if self.fresh:
            return True
        self.previous = self.read_record()
        if self.require_checkpoint and not self.checkpoints():
            raise RunError(f"--resume: no checkpoint in {self.out}")
        changed = self.check_records()
        finished = self.previous and self.previous.get("finished")
        done = all(os.path.exists(os.path.join(self.out, path)) for path in outputs)
        if finished and not changed and done:
            steps = self.previous.get("steps")
            self.log(f"{self.out} already holds this run, finished ({steps} steps): nothing to do")
            return False
        return True

    def check_records(self):
        """How this run differs from the newest checkpoint's settings and from a finished
        run.json's. Refused unless allow_changed; a checkpoint of another world size always (each
        rank's random state is its own)."""
        checkpoints = self.checkpoints()
        changed = {}
        if self.previous and (self.previous.get("finished") or not checkpoints):
            changed.update(self.changes(self.previous["run"]))
        if checkpoints:
            changed.update(self.changes(self.written_under(checkpoints[-1])))
        if checkpoints and "world_size" in changed:
            ranks = changed["world_size"][0]
            raise RunError(f"{self.out}: its checkpoints were written by {ranks} ranks and resume "
                           f"only on {ranks} (each rank keeps its random state), not on "
                           f"{self.world}; use another --out, or --no-resume to start over")
        finished = self.previous and self.previous.get("finished")
        if changed and not self.allow_changed and (checkpoints or finished):
            raise RunError(f"{self.out} holds a run with other settings ({describe(changed)}); use "
                           "another --out, --no-resume to start over, or --allow-changed-config")
        return changed

    def changes(self, before):
        """{setting: (recorded, this run's)} where a recorded identity differs from this run's. A
        setting the record predates counts as its default; a base-model fingerprint missing on
        either side as the same; a record that cannot be read (None) as UNKNOWN."""
        if not isinstance(before, dict):
            return {UNKNOWN: None}
        changed = {}
        for key, now in self.identity.items():
            old = before.get(key, self.defaults.get(key))
            if key == "model_fingerprint" and None in (old, now):
                continue
            if old != now:
                changed[key] = (old, now)
        return changed

    def written_under(self, name):
        """The identity checkpoint `name` was written under: its trainer.json's "run" or, for a
        checkpoint older than that record, run.json's; None when neither can be read."""
        try:
            marker = read_json(os.path.join(self.out, name, "trainer.json"), RunError)
        except (RunError, OSError):
            return None
        if "run" in marker:
            return marker["run"]
        return (self.previous or {}).get("run")

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
        """Just before training: the records are checked again with the base model's fingerprint
        (other base weights are a changed setting); when fresh, an earlier run's files move to
        OUT/previous-<time>/ (the user's own files stay); run.json records this run."""
        self.identity["model_fingerprint"] = fingerprint
        if not self.fresh:
            self.check_records()
        if self.fresh and self.rank == 0:
            names = [n for n in os.listdir(self.out)
                     if n in OURS or n.startswith(("step-", ".tmp-step-"))]
            aside = self.move_aside(names)
            if aside:
                self.log(f"--no-resume: the earlier run's files in {self.out} were moved to "
                         f"{aside}")
        self.barrier()
        if self.rank == 0:
            dump({"run": self.identity, "finished": False}, os.path.join(self.out, "run.json"))
        self.barrier()

    def move_aside(self, names):
        """Move names (in OUT) into OUT/previous-<time>/ and return that folder (None: nothing)."""
        if not names:
            return None
        aside = os.path.join(self.out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside, exist_ok=True)
        for name in names:
            os.replace(os.path.join(self.out, name), os.path.join(aside, name))
        return aside

    def continuing(self):
        """The command that continues this run: --no-resume starts over every time it is given, as
        nanoGPT's init_from='scratch' does, so a job a scheduler requeues must leave it out."""
        if self.fresh:
            return "the same command without --no-resume"
        return "the same command"

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
        renamed into place; the newest two of this run's are kept (another run's stay). A failed
        write removes the partial folder and names the intact checkpoint."""
        tmp = os.path.join(self.out, f".tmp-step-{step:07d}")
        final = os.path.join(self.out, f"step-{step:07d}")
        previous = self.checkpoints()
        marker = {"step": step, "world_size": self.world, "run": self.identity}
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
                intact = (f"the previous checkpoint {previous[-1]} is intact: "
                          f"{self.continuing()} continues from it")
            raise RunError(f"cannot write checkpoint {final} ({why}); {intact}")
        if self.rank == 0:
            dump(marker, os.path.join(tmp, "COMPLETE"))
            name = os.path.basename(final)
            if os.path.isdir(final) and self.changes(self.written_under(name)):
                aside = self.move_aside([name])  # another run's (resumed at its last step)
                self.log(f"{name} of a run with other settings moved to {aside}")
            shutil.rmtree(final, ignore_errors=True)  # a damaged one of this run, skipped
            os.replace(tmp, final)
            for old in self.checkpoints()[:-2]:
                if not self.changes(self.written_under(old)):
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
        if done != info:
            raise RunError(f"{path}: COMPLETE and trainer.json disagree")
        if info.get("world_size") != self.world:
            raise RunError(f"{path}: written by {info.get('world_size')} ranks, not {self.world}")
        before = rng_state()
        try:
            set_rng_state(rng)
            read(path)
        except Exception:
            set_rng_state(before)
            raise
        return int(info["step"])

    def resume(self, read):
        """Restore the newest checkpoint that loads on every rank and return its step, 0 without
        one. One of this run's that does not load is damaged: skipped with one line (a later save
        replaces it). One written under other settings is never skipped: it resumes (allow_changed;
        resumed_changes says how it differs) or the run is refused in one line. The logs are cut
        back to that step, so that they read as if the run had never stopped."""
        for name in reversed(self.checkpoints()):
            changed = self.changes(self.written_under(name))
            other = f"{self.out}/{name}, written under other settings ({describe(changed)}),"
            if changed and not self.allow_changed:
                raise RunError(f"{other} is the next to resume from; use another --out, "
                               "--no-resume to start over, or --allow-changed-config")
            step = None
            error = None
            try:
                step = self.load(os.path.join(self.out, name), read)
            except Exception as e:  # any damage: truncated or bad files, a refused pickle, shapes
                error = e
            if not self.any_rank(error is not None):
                message = f"resumed from {name} (step {step})"
                if changed:
                    message += f", written under other settings ({describe(changed)})"
                self.log(message)
                self.resumed_changes = changed
                self.cut_logs(step)
                return step
            why = one_line(error) if error else "on another rank"
            if changed:
                raise RunError(f"{other} does not load with this command's ({why}); remove it, "
                               "use another --out, or --no-resume to set it aside")
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

    def largest(self, value):
        """The largest of an integer over the ranks (a collective: every rank calls it)."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any_rank(self, flag):
        """True when flag is true on any rank (a collective: every rank calls it)."""
        return self.largest(bool(flag)) > 0


def describe(changed):
    """Folder.changes() in words, the first four: "key: old -> new"."""
    parts = []
    for key, values in list(changed.items())[:4]:
        if values is None:
            parts.append(key)
        else:
            parts.append(f"{key}: {values[0]!r} -> {values[1]!r}")
    return ", ".join(parts)


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
    each step and stops. The ranks agree on the signal: the largest number any of them got. The
    previous handlers come back afterwards."""

    def __init__(self, folder):
        self.folder = folder
        self.received = 0  # the first signal this rank got
        self.signum = 0    # the signal the ranks agreed on at the last requested()
        self.saved = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def requested(self):
        """The signal any rank got, agreed by all (a collective); 0 for none."""
        self.signum = self.folder.largest(self.received)
        return self.signum

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)

    def exit_after(self, step):
        """(every rank) Exit after checkpoint step-NNNNNNN; rank 0 says which command continues."""
        self.folder.log(f"train.py: stopped by signal {self.signum} after step {step}; checkpoint "
                        f"step-{step:07d} written: {self.folder.continuing()} continues the run")
        raise SystemExit(self.exit_code)

    def exit_finished(self):
        """(every rank) Exit after a signal that came while the finished run wrote its outputs."""
        self.folder.log(f"train.py: signal {self.signum} arrived during the final save; the run "
                        f"finished whole ({self.folder.out}/adapter): nothing to continue")
        raise SystemExit(self.exit_code)


# -------------------------------------------------------------------------------------------------
# train.py's run (a train.Run) in its folder, from main's claim to its teardown

def run_identity(args, world):
    """run.json's record of a run: the settings that change what it computes (every setting of
    train.py's args but NOT_RUN_KEYS), the sha256 of every input file, absolute paths, the world
    size; the base model's fingerprint joins it once the model is loaded (Folder.start)."""
    ident = {k: getattr(args, k, None) for k in vars(args) if k not in NOT_RUN_KEYS}
    for k in ("data", "warmup_data", "prefilter_scores"):
        path = getattr(args, k)
        ident[k + "_sha256"] = path and os.path.isfile(path) and _sha256(path)
    ident.update(world_size=world, model=os.path.abspath(args.model),
                 warmup_data=args.warmup_data and os.path.abspath(args.warmup_data))
    return ident


def final_outputs(args):
    """What a finished run of train.py leaves in OUT, relative to it."""
    outputs = [os.path.join("adapter", "adapter_model.safetensors")]
    if args.merge:
        outputs.append("merged")
    return outputs


def resume(run, folder):
    """The step the run starts from: Folder.resume's, one past the run's end refused; a checkpoint
    of other settings (--allow-changed-config) leaves the run's report table, which may number
    other examples."""
    step = folder.resume(run.load_state)
    if step > run.total:
        raise UsageError(f"{run.args.out}: its checkpoint is at step {step}, past this run's "
                         f"{run.total} steps (--max-steps, --epochs)")
    if folder.resumed_changes and run.last_seen:
        run.last_seen = {}
        folder.log(f"report.json: lists the units of steps {step + 1} on (the checkpoint's run "
                   "had other settings)")
    return step


def read_trainer_state(path):
    """(trainer.pt, state.json) of checkpoint `path`, both read and checked before the run
    restores anything (train.Run.load_state)."""
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    state = read_json(os.path.join(path, "state.json"), RunError)
    if not isinstance(state.get("last_seen"), list):
        raise RunError(f"{path}/state.json: no list of units")
    return trainer, state


def save_checkpoint(run, folder, step):
    """Checkpoint step-NNNNNNN, whole or not at all; an adapter gone NaN or infinite is refused."""
    if all(bool(torch.isfinite(p).all()) for p in run.params):
        folder.save(step, run.save_state)
        return
    previous = folder.checkpoints()
    last = f"the last good checkpoint is {previous[-1]}" if previous else "nothing was saved"
    raise RunError(f"the adapter's weights are NaN or infinite after step {step} (is --lr too "
                   f"high?); {last}")


def teardown(run, folder):
    """The end of train.main, also on an error (run None before it is built): the lock given back,
    then DDP (unwrapped and collected: a reducer in a reference cycle that outlives the gloo group
    makes torch 2.13 abort at exit now and then), then the process group."""
    folder.release()
    if run is not None and isinstance(run.ddp, DDP):
        run.ddp = run.ddp.module
    gc.collect()
    if dist.is_initialized():  # torchrun, also with one rank
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------
# Files

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


def append_jsonl(path, records):
    """Records added to a JSON-lines log (metrics.jsonl, units.jsonl), one per line."""
    with open(path, "a") as f:
        f.writelines(json.dumps(r, default=float) + "\n" for r in records)


# -------------------------------------------------------------------------------------------------
# Work outside train.py's loop (the baselines' steps): files written whole, stops reported

def replace_folder(build, dst):
    """Folder dst written whole: build(tmp) fills a fresh .tmp-NAME beside it, which then takes
    dst's place (dst is briefly absent, never half written)."""
    dst = Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def copy_folder(src, dst):
    """A whole copy of folder src at dst."""
    def build(tmp):
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return replace_folder(build, dst)


def read_state(path, log):
    """A state file written by dump, or None when it is absent or damaged (then one line says so,
    and what it held is computed again)."""
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, RunError)
    except RunError as e:
        log(f"{e}; computed again")
        return None


# Signals: one line naming what was kept

class Stopped(SystemExit):
    """A baseline stopped by a signal: exit code 130 (SIGINT) or 143 (SIGTERM), and the line that
    says what was kept and that the same command continues."""

    def __init__(self, code, line):
        super().__init__(code)
        self.line = line


@dataclass
class Progress:
    """Where a baseline's run stands, for the line a signal prints: what it is doing, what it has
    saved whole (names relative to out), and the training under way."""
    out: Path
    doing: str = "starting"
    saved: list[str] = field(default_factory=list)
    training: Path | None = None   # a train.py run folder being trained

    def start(self, doing, training=None):
        self.doing = doing
        self.training = training

    def done(self, path):
        self.saved.append(self.name(path))
        self.training = None

    def name(self, path):
        return os.path.relpath(path, self.out)

    def kept(self):
        """The things saved, the last three by name, and the state of the training under way."""
        parts = self.saved[-3:]
        if len(self.saved) > 3:
            parts.insert(0, f"{len(self.saved) - 3} earlier")
        if self.training is not None:
            state = training_state(self.training)
            if state:
                parts.append(f"{self.name(self.training)} ({state})")
        return ", ".join(parts) or "nothing yet"

    def line(self, code):
        return (f"stopped by {SIGNAL_NAMES.get(code, code)} while {self.doing}; kept in "
                f"{self.out}: {self.kept()}; the same command continues")


def training_state(out):
    """What train.py's run folder `out` keeps: 'finished', its newest checkpoint, or None."""
    folder = Folder(str(out))
    record = None
    try:
        record = folder.read_record()
    except RunError:  # a damaged run.json: the checkpoints may still be whole
        pass
    if record and record.get("finished"):
        return "finished"
    checkpoints = folder.checkpoints()
    if checkpoints:
        return f"checkpoint {checkpoints[-1]}"
    return None


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits():
    """Inside (in the main thread): SIGTERM raises SystemExit(143), as SIGINT raises
    KeyboardInterrupt, so that the stop can be reported; the previous handler comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_code(error):
    """130 / 143 when `error` is a stop by SIGINT / SIGTERM (train.main exits so after the
    checkpoint a signal asked for), else None."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit) and error.code in SIGNAL_NAMES:
        return error.code
    return None


@contextlib.contextmanager
def stops_reported(progress):
    """main's body: any stop by a signal becomes Stopped, whose line names what progress has
    kept."""
    try:
        with sigterm_exits():
            yield progress
    except Stopped:
        raise
    except (KeyboardInterrupt, SystemExit) as e:
        code = signal_code(e)
        if code is None:
            raise
        raise Stopped(code, progress.line(code)) from None
