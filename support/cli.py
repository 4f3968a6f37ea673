"""Command-line checks that train.py, eval.py and the tools share: number ranges, devices, output paths."""
import argparse
import math
import os

import torch


class UsageError(ValueError):
    """Bad input: a missing or malformed file, an impossible setting; the message is one line."""


def num(kind, lo, hi=None, lo_ok=True, hi_ok=False):
    """An argparse type: a finite number of `kind` in its range, else one line naming the range."""
    def parse(text):
        v = kind(text)
        if not (math.isfinite(v) and (v >= lo if lo_ok else v > lo) and (hi is None or (v <= hi if hi_ok else v < hi))):
            raise argparse.ArgumentTypeError(f"must be {'>=' if lo_ok else '>'} {lo}" + (
                f" and {'<=' if hi_ok else '<'} {hi}" if hi is not None else "") + f", got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def check_paths(device=None, out=None, inputs=()):
    """Before any work: the device exists here, --out can be written and is none of the input files."""
    try:
        if device is not None and torch.empty(0, device=device).device.type not in ("cpu", "cuda", "mps"):
            raise RuntimeError("not a compute device")
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device}: not usable here ({str(e).splitlines()[0][:100]})") from None
    if out:
        folder = os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: its folder cannot be made ({e.strerror})") from None
        if os.path.isdir(out) or not os.access(folder, os.W_OK) or any(
                i and os.path.exists(out) and os.path.exists(i) and os.path.samefile(out, i) for i in inputs):
            raise UsageError(f"--out {out}: is a folder, is not writable, or is an input file")
