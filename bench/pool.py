"""The job pool of bench/noise.py: jobs run one after another in this process or several at once in
worker processes; SIGINT / SIGTERM stop them all; what finished is on disk (written whole or not at
all), so the same command resumes where it stopped.

A job is a dict (bench/noise_run.py make_job) with at least run_dir and sig; it is finished when
run_dir/result.json holds the same sig. A worker is `python bench/noise.py --worker JOB.json`.
"""
import gc
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("noise.py")
SIGNAL_EXITS = (130, 143)  # how train.py (and a worker) exits after SIGINT / SIGTERM
POLL_S = 0.5


# ------------------------------------------------------------------------------------------ storage
def dump(obj, path):
    """JSON written whole or not at all (a reader never sees half a file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1) + "\n")
    os.replace(tmp, path)


def json_safe(x):
    """JSON-safe: nan/inf -> null, numpy scalars -> Python, tuples -> lists, keys -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def file_sha(*paths):
    """A short digest of the files' bytes: a job's signature changes with its data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def model_sha(folder):
    """A short digest of a model folder's config.json and weights (read in blocks): a run's
    identity names its model by this, not by where the folder lies."""
    h = hashlib.sha256()
    folder = Path(folder)
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:16]


def finished(job):
    """The job's result.json when it finished with the job's signature, else None."""
    f = Path(job["run_dir"]) / "result.json"
    if not f.is_file():
        return None
    try:
        r = json.loads(f.read_text())
    except ValueError:
        return None
    if r.get("sig") != job["sig"]:
        return None
    return r


def earlier_wall(path):
    """Wall time and invocations recorded by the runs before a resume, so the total counts every
    invocation."""
    try:
        saved = json.loads(Path(path).read_text())
        return float(saved.get("wall_s") or 0.0), int(saved.get("invocations", 1))
    except (OSError, ValueError):
        return 0.0, 0


# ----------------------------------------------------------------------------------------- the pool
def _sigterm(signum, frame):
    raise SystemExit(143)


def run_jobs(todo, n_jobs, run_one, done):
    """Every job of todo, done(result) after each: run_one(job) in this process one after another
    (n_jobs 1), or n_jobs worker processes at once. SIGTERM raises SystemExit(143) meanwhile
    (outside train.py's own handling too), as SIGINT raises KeyboardInterrupt; the caller's handler
    is back afterwards."""
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        if n_jobs > 1:
            run_pool(todo, n_jobs, done)
            return
        for job in todo:
            done(run_one(job))
            gc.collect()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_pool(todo, n_jobs, done):
    """Each job in `python bench/noise.py --worker JOB.json`, n_jobs at a time (several runs share
    one GPU)."""
    queue = list(todo)
    running = []
    try:
        while queue or running:
            while queue and len(running) < n_jobs:
                running.append(start_worker(queue.pop(0)))
            time.sleep(POLL_S)
            for worker in list(running):
                if worker.proc.poll() is None:
                    continue
                running.remove(worker)
                worker.log.close()
                done(collect(worker))
    finally:  # stopped (a signal, a worker stopped by one): the workers stop after their step too
        for worker in running:
            worker.proc.terminate()
            worker.proc.wait()
            worker.log.close()


class Worker:
    """A job running in its own process, its output going to a log file beside the run folder."""

    def __init__(self, job, proc, log):
        self.job = job
        self.proc = proc
        self.log = log


def start_worker(job):
    run_dir = Path(job["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job_file = run_dir.parent / f"{run_dir.name}.job.json"
    dump(job, job_file)
    log = open(run_dir.parent / f"{run_dir.name}.worker.log", "w")
    command = [sys.executable, str(WORKER), "--worker", str(job_file)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return Worker(job, proc, log)


def collect(worker):
    """A finished worker's result; a worker stopped by a signal stops the pool with the same exit
    code."""
    code = worker.proc.returncode
    if code in SIGNAL_EXITS or -code in (signal.SIGINT, signal.SIGTERM):
        raise SystemExit(code if code > 0 else 128 - code)
    result = finished(worker.job)
    if result is not None:
        return result
    job = worker.job
    return {"sig": job["sig"], "variant": job["name"], "mixture": job["mixture"],
            "seed": job["seed"], "flags": job.get("flags"),
            "error": f"worker exited with code {code}"}
