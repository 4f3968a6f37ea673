"""The noise experiment's data for one seed: the synthetic benchmark's tiers, the four mixtures, the
clean warm-up and test sets as JSONL files, and what the base model makes of them (clean-test
accuracy and loss, the pre-filter's scores), cached beside the data.

A mixture adds data of falling quality, as in the paper's Table 4 (ordinal 1-4 in this order for
Spearman): H = the H version of dialogue set A; H+N = + the N version of a disjoint set B; H+L = H
of A + the L version of a disjoint set C; H+N+L = all three. The warm-up set W is a further disjoint
clean set.
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

import model as M
from data import build_examples
from eval import accuracy, per_turn_loss
from pool import dump, file_sha
from resure import prefilter
from support.conversations import load_conversations, read_scores, save_jsonl
from support.report import unit_noisy
from support.synth import SYNTH_KINDS, synth
from unit_scores import score_units

MIXTURES = ("H", "H+N", "H+L", "H+N+L")
PREFILTER_KEEP = 0.75  # the share of a mixture's dialogues pre-filtering keeps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def noise_kinds(plan):
    """synth's noise kinds and their weights, with the echo kind added at the plan's weight."""
    if plan["echo"]:
        return dict(SYNTH_KINDS, echo=plan["echo"])
    return dict(SYNTH_KINDS)


def steps_for(plan, dialogues):
    """Optimizer steps for `epochs` passes over a mixture: a step trains `batch` dialogues (with
    --unit turn, each of their assistant turns is a unit with its own loss and weight inside its
    dialogue)."""
    return max(1, math.ceil(plan["epochs"] * dialogues / plan["batch"]))


def make_data(root, seed, plan):
    """The seed's synthetic benchmark, its mixtures, warm-up and test sets as JSONL files: (paths,
    stats)."""
    n = plan["n"]
    warm = plan["warm"]
    folder = Path(root) / f"data-seed{seed}"
    rates = dict(H=0.0, N=plan["rate_n"], L=plan["rate_l"])
    synth(folder, seed=seed, n_train=3 * n + warm, n_test=plan["test"], max_turns=plan["max_turns"],
          rates=rates, kinds=noise_kinds(plan))
    tiers = {t: load_conversations(folder / f"train_{t}.jsonl") for t in "HNL"}
    parts = {"H": tiers["H"][:n], "N": tiers["N"][n:2 * n], "L": tiers["L"][2 * n:3 * n]}
    paths = {"warm": folder / "warmup.jsonl", "test": folder / "test.jsonl"}
    save_jsonl(tiers["H"][3 * n:3 * n + warm], paths["warm"])
    stats = {}
    for mix in MIXTURES:
        convs = [c for tier in mix.split("+") for c in parts[tier]]
        paths[mix] = folder / f"mix_{mix}.jsonl"
        save_jsonl(convs, paths[mix])
        stats[mix] = mixture_stats(convs, steps_for(plan, len(convs)))
    return paths, stats


def mixture_stats(convs, steps):
    """Dialogues, assistant turns, noisy turns (in all and per kind) and optimizer steps of a
    mixture."""
    turns = [m for c in convs for m in c["messages"] if m["role"] == "assistant"]
    noisy = [m for m in turns if m.get("noisy")]
    kinds = {}
    for m in noisy:
        kinds[m["noise_type"]] = kinds.get(m["noise_type"], 0) + 1
    return {"dialogues": len(convs), "turns": len(turns), "noisy": len(noisy), "kinds": kinds,
            "steps": steps}


def prepare_seed(out, seed, plan, model_dir, tpl, need_prefilter):
    """Data and the base model's scores (clean test, pre-filtering) for one seed; cached in the data
    folder. Returns (paths, data stats, base model's clean-test scores, pre-filter stats per
    mixture)."""
    paths, stats = make_data(out, seed, plan)
    base_file = paths["test"].parent / "base.json"
    sig = dict(model=str(model_dir), data=file_sha(paths["test"], *(paths[m] for m in MIXTURES)),
               dtype=plan["dtype"], new_tokens=plan["new_tokens"], max_len=plan["max_len"])
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    base_valid = base is not None and base.get("sig") == sig
    scores_done = all(paths[m].with_suffix(".scores").is_file() for m in plan["mixtures"])
    net = None
    if not base_valid or (need_prefilter and not scores_done):
        for m in MIXTURES:  # scores of another plan are stale
            paths[m].with_suffix(".scores").unlink(missing_ok=True)
        net = M.Transformer.from_pretrained(model_dir, dtype=DTYPES[plan["dtype"]], device=device())
        net.eval()
    if not base_valid:
        base = dict(base_scores(net, tpl, paths["test"], plan), sig=sig)
        dump(base, base_file)
    kept = {}
    if need_prefilter:
        for mix in plan["mixtures"]:
            paths[mix + ":scores"], kept[mix] = prefilter_scores(net, tpl, paths[mix], plan)
    return paths, stats, base, kept


def base_scores(net, tpl, test_path, plan):
    """The base model's clean-test exact match and loss per supervised token."""
    convs = load_conversations(test_path)
    examples, _ = build_examples(convs, tpl, plan["max_len"], None)
    acc = accuracy(net, tpl, convs, batch_size=plan["eval_batch"],
                   max_new_tokens=plan["new_tokens"])
    loss = per_turn_loss(net, examples, batch_size=16, pad_id=tpl.pad_id)["overall"]["loss"]
    return {"accuracy": acc["overall"], "acc_total": acc["total"], "loss": loss}


def prefilter_scores(net, tpl, path, plan):
    """Base-model loss of every dialogue of a mixture, written as --prefilter-scores (one score per
    conversation, higher is better: -loss), so that train.py keeps exactly what --prefilter-keep
    would; and how well the dropped quarter matches the dialogues with a noisy turn. net: None when
    the file is there."""
    scores = path.with_suffix(".scores")
    convs = load_conversations(path)
    examples, _ = build_examples(convs, tpl, plan["max_len"], None)
    indices = [e["conv_index"] for e in examples]
    if not scores.is_file():
        losses = score_units(net, tpl, examples, "dialogue", plan["dtype"])[0]
        full = np.full(len(convs), np.inf)
        full[indices] = losses
        lines = [json.dumps(-float(x) if math.isfinite(x) else -1e30) + "\n" for x in full]
        tmp = scores.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, scores)
    keep = prefilter(-read_scores(scores, convs)[indices], keep=PREFILTER_KEEP)
    # a dialogue is noisy when one of the supervised turns it trains on is
    noisy = np.array([unit_noisy(e, 0) for e in examples], bool)
    dropped = np.ones(len(examples), bool)
    dropped[keep] = False
    hits = int((dropped & noisy).sum())
    n_dropped = int(dropped.sum())
    n_noisy = int(noisy.sum())
    return scores, {"kept": len(keep), "of": len(examples), "dropped_noisy": hits,
                    "dropped": n_dropped, "noisy": n_noisy,
                    "precision": hits / n_dropped if n_dropped else math.nan,
                    "recall": hits / n_noisy if n_noisy else math.nan}
