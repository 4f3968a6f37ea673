"""Command-line checks that train.py, eval.py and the tools share: number ranges, devices, output
paths."""
import argparse
import math
import os
import sys

import torch


class UsageError(ValueError):
    """Bad input: a missing or malformed file, an impossible setting; the message is one line."""


def num(kind, lo, hi=None, lo_ok=True, hi_ok=False):
    """An argparse type: a finite number of `kind` in its range, else one line naming the range.
    lo_ok / hi_ok: whether the range includes lo / hi; hi None: no upper end."""
    def parse(text):
        v = kind(text)
        if not (math.isfinite(v) and above(v, lo, lo_ok) and below(v, hi, hi_ok)):
            bounds = describe(lo, hi, lo_ok, hi_ok)
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def above(v, lo, inclusive):
    if inclusive:
        return v >= lo
    return v > lo


def below(v, hi, inclusive):
    if hi is None:
        return True
    if inclusive:
        return v <= hi
    return v < hi


def describe(lo, hi, lo_ok, hi_ok):
    """The range in words: ">= 0", "> 0 and < 1", ..."""
    text = f"{'>=' if lo_ok else '>'} {lo}"
    if hi is not None:
        text += f" and {'<=' if hi_ok else '<'} {hi}"
    return text


def check_paths(device=None, out=None, inputs=()):
    """Before any work: the device exists here, --out can be written and is none of the input
    files."""
    try:
        if device is not None:
            kind = torch.empty(0, device=device).device.type
            if kind not in ("cpu", "cuda", "mps"):
                raise RuntimeError("not a compute device")
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device}: not usable here "
                         f"({str(e).splitlines()[0][:100]})") from None
    if not out:
        return
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: its folder cannot be made ({e.strerror})") from None
    is_input = any(i and os.path.exists(out) and os.path.exists(i) and os.path.samefile(out, i)
                   for i in inputs)
    if os.path.isdir(out) or not os.access(folder, os.W_OK) or is_input:
        raise UsageError(f"--out {out}: is a folder, is not writable, or is an input file")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit 2 (no usage block first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def given_flags(parser, argv, args):
    """The settings (dests) that argv gives, not parser's defaults: argv parsed again into a
    namespace whose every setting is preset to a marker that only a given flag replaces; args:
    parser's first parse of argv."""
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}
