"""Iterative Label Refinement (ILR, Ye, Laidlaw and Steinhardt, arXiv 2501.07886): spend comparison feedback on
the training labels instead of on the model.

    python baselines/ilr.py --model DIR --data train.jsonl --out runs/ilr --rounds 3 --max-replace 0.15 \\
        --feedback oracle|sim:0.8|format|local:DIR|http:NAME [--naive] [training flags as in train.py]

1. Round 0: SFT on the demonstrations D (every trained assistant turn is a label).
2. Round k = 1..K: split D by dialogue into two halves (seeded by --seed and k); train a fresh SFT model on each
   half; each proposes, greedily, a new answer for every label of the other half, with the dialogue's own earlier
   turns (its current labels) as context.
3. Feedback only where a proposal differs from the current label: the comparator (baselines/feedback.py) gives
   the probability that the proposal is better, asked in both orders and averaged.
4. A label is replaced where that probability is above 0.5, at most floor(alpha * labels) per round (--max-replace,
   alpha = 0.15), the most confident first. --naive: replace without feedback, a random choice of the differing
   proposals under the same cap (the control that shows what the feedback is worth).
5. Retrain SFT from scratch on the refined D (every round with --round-models all, the paper's; only after the
   last with last, which saves K - 1 trainings and keeps the labels identical); repeat.

Writes, under OUT:
    round-0/model/                   the SFT run on D (train.py's run folder)
    round-K/half-{0,1}.jsonl, half-{0,1}/   the halves and the models trained on them
    round-K/proposals.jsonl          every differing proposal: label, proposal, p (null with --naive), replaced
    round-K/train.jsonl              the refined D: a replaced assistant message carries "original" (the first
                                     label, with its noise fields) and "replaced_round"; its own noise fields are
                                     dropped, since nothing known to the method says whether the new label is noisy
    round-K/model/                   the SFT run on the refined D
    adapter/                         the last round's adapter (on --model, train.py's format)
    report.json                      per round: labels, proposals, differing, compared, candidates (p > 0.5), cap,
                                     replaced; where the data has references (evaluation only): label accuracy
                                     before / after, fixed (wrong -> right), damaged (right -> wrong), changed
                                     (wrong -> another wrong), proposal accuracy, the comparator's realized
                                     accuracy; compute (see baselines/__init__.py for the contract)
"""
import copy
import gc
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from baselines import (BaselineError, add_compute, check_inputs, cli, generate, label_accuracy,  # noqa: E402
                       label_positions, new_compute, parser, train_run, training_args, write_json)
from baselines.feedback import Feedback, check_references, make, realized_accuracy, reference  # noqa: E402
from data import ChatTemplate  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from eval import answer_matches  # noqa: E402

PROG = "baselines/ilr.py"


def parse_args(argv):
    p = parser(PROG, __doc__)
    p.add_argument("--rounds", type=int, default=3, help="refinement rounds K (0: plain SFT)")
    p.add_argument("--max-replace", type=float, default=0.15, help="alpha: at most this fraction of the labels "
                   "replaced per round")
    p.add_argument("--naive", action="store_true", help="replace without feedback (random choice under the cap)")
    p.add_argument("--round-models", choices=("all", "last"), default="all",
                   help="retrain on the refined data every round (the paper) or only after the last one")
    a, rest = p.parse_known_args(argv)
    if a.rounds < 0:
        raise BaselineError(f"--rounds must be >= 0, got {a.rounds}")
    if not 0 <= a.max_replace <= 1:
        raise BaselineError(f"--max-replace must be in [0, 1], got {a.max_replace}")
    if a.max_new_tokens < 1 or a.gen_batch_size < 1:
        raise BaselineError("--max-new-tokens and --gen-batch-size must be >= 1")
    if a.naive == (a.feedback is not None):
        raise BaselineError("give --feedback, or --naive (replacement without feedback), not both")
    return a, rest


def halves(n, seed, k):
    """Dialogue indices of the two halves of round k (a seeded permutation cut in the middle), each ascending."""
    order = np.random.default_rng([seed, k]).permutation(n)
    return sorted(order[:(n + 1) // 2].tolist()), sorted(order[(n + 1) // 2:].tolist())


def propose(net, template, convs, targets, max_len, compute, args):
    """Greedy proposals {(conversation, message): text} for the target labels; a prompt longer than the training's
    max_len is left without one. Context: the dialogue's messages before the label (its current labels)."""
    prompts = {t: template.encode_prompt(convs[t[0]]["messages"][:t[1]]) for t in targets}
    todo = [t for t in targets if len(prompts[t]) <= max_len]
    texts = generate(net, template, [prompts[t] for t in todo], compute, args.gen_batch_size, args.max_new_tokens)
    return dict(zip(todo, texts))


def select(probs, cap, rng=None):
    """Which differing proposals to accept: with feedback (rng None) those with p > 0.5, the most confident
    first, at most cap; naive (probs None, rng given): a random choice of cap of them."""
    if rng is not None:
        return sorted(rng.permutation(len(probs))[:cap].tolist())
    order = sorted((i for i, p in enumerate(probs) if p > 0.5), key=lambda i: -probs[i])  # stable: ties by index
    return sorted(order[:cap])


def refine(convs, proposals, feedback, alpha, round_k, rng=None):
    """One ILR replacement step. proposals: {(conversation, message): text}. feedback: a Feedback, or None with an
    rng for naive ILR. Returns (refined copy of convs, one record per differing proposal, counts)."""
    targets = label_positions(convs)
    differing = [(t, proposals[t]) for t in targets
                 if proposals.get(t, "").strip() and proposals[t].strip() != convs[t[0]]["messages"][t[1]]["content"]
                 .strip()]
    probs = [None if feedback is None else
             feedback.compare(convs[ci]["messages"][:mi], prop, convs[ci]["messages"][mi]["content"],
                              convs[ci]["messages"][mi]) for (ci, mi), prop in differing]
    cap = math.floor(alpha * len(targets) + 1e-9)
    chosen = set(select(probs, cap, rng) if feedback is None else select(probs, cap))
    out, records = copy.deepcopy(convs), []
    for i, ((ci, mi), prop) in enumerate(differing):
        msg = out[ci]["messages"][mi]
        records.append({"conversation": ci, "message": mi, "label": msg["content"], "proposal": prop,
                        "p": probs[i], "replaced": i in chosen})
        if i in chosen:
            first = msg.get("original") or {k: msg[k] for k in ("content", "noisy", "noise_type") if k in msg}
            for k in ("noisy", "noise_type"):
                msg.pop(k, None)
            msg.update(content=prop, original=first, replaced_round=round_k)
    counts = {"labels": len(targets), "proposed": sum(bool(proposals.get(t, "").strip()) for t in targets),
              "differing": len(differing), "compared": 0 if feedback is None else len(differing),
              "candidates": len(differing) if feedback is None else sum(p > 0.5 for p in probs), "cap": cap,
              "replaced": len(chosen)}
    return out, records, counts


def is_right(text, turn):
    """Whether text matches the reference answer of assistant message `turn`."""
    return answer_matches(text, reference(turn))


def label_changes(before, after, records, proposals):
    """Evaluation of one round against the references (None without them): accuracy before / after, fixed,
    damaged, changed (wrong -> another wrong), the proposals' accuracy, the comparator's realized accuracy."""
    acc0, acc1 = label_accuracy(before), label_accuracy(after)
    if acc0 is None:
        return None
    moved = [(before[r["conversation"]]["messages"][r["message"]], r) for r in records if r["replaced"]]
    right = [is_right(r["label"], turn) for turn, r in moved], [is_right(r["proposal"], turn) for turn, r in moved]
    props = [is_right(text, before[ci]["messages"][mi]) for (ci, mi), text in proposals.items() if text.strip()
             and reference(before[ci]["messages"][mi]) is not None]
    fixable = sum(is_right(r["proposal"], before[r["conversation"]]["messages"][r["message"]]) and
                  not is_right(r["label"], before[r["conversation"]]["messages"][r["message"]]) for r in records)
    return {"label_accuracy_before": acc0, "label_accuracy_after": acc1,
            "fixed": sum(p and not x for x, p in zip(*right)), "damaged": sum(x and not p for x, p in zip(*right)),
            "changed": sum(not x and not p for x, p in zip(*right)),
            "proposal_accuracy": sum(props) / len(props) if props else None,
            "fixable": fixable,  # differing proposals that were right where the label was wrong
            "comparator": realized_accuracy([(before[r["conversation"]]["messages"][r["message"]], r["proposal"],
                                              r["label"], r["p"]) for r in records if r["p"] is not None])}


def main(argv=None):
    """Run ILR end to end; returns the report (also OUT/report.json)."""
    t_start = time.time()
    a, rest = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(a.model, a.data)
    base_argv, targs = training_args(a.model, a.data, rest)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = load_conversations(a.data, on_bad_sample=targs.on_bad_sample)
    targets = label_positions(convs)
    if len(convs) < 2 or not targets:
        raise BaselineError(f"--data {a.data}: ILR needs at least two conversations with a trained assistant turn")
    feedback = None if a.naive else Feedback(make(a.feedback, targs.seed, str(out)))
    if feedback:
        check_references(convs, targets, feedback, a.data)
    template = ChatTemplate.from_pretrained(a.model, name=targs.chat_template)
    compute = new_compute()
    rounds = [{"round": 0, "labels": len(targets), "label_accuracy": label_accuracy(convs), "compute": new_compute()}]
    last = None
    if a.rounds == 0 or a.round_models == "all":
        last = out / "round-0" / "model"
        train_run(base_argv, a.data, last, rounds[0]["compute"], log=log)  # kept only as files
    for k in range(1, a.rounds + 1):
        t0, rc, d = time.time(), new_compute(), out / f"round-{k}"
        d.mkdir(parents=True, exist_ok=True)
        queries0, tokens0 = (feedback.queries, feedback.forward_tokens) if feedback else (0, 0)
        parts, proposals = halves(len(convs), targs.seed, k), {}
        for j, part in enumerate(parts):
            save_jsonl([convs[i] for i in part], d / f"half-{j}.jsonl")
        for j, part in enumerate(parts):
            net = train_run(base_argv, d / f"half-{j}.jsonl", d / f"half-{j}", rc, log=log)
            other = set(parts[1 - j])
            proposals.update(propose(net, template, convs, [t for t in targets if t[0] in other], targs.max_len, rc, a))
            del net  # before the next model is built
            gc.collect()
        rng = np.random.default_rng([targs.seed, k, 1]) if a.naive else None
        refined, records, counts = refine(convs, proposals, feedback, a.max_replace, k, rng)
        if feedback:
            add_compute(rc, {"comparisons": feedback.queries - queries0,
                             "forward_tokens": feedback.forward_tokens - tokens0})
        save_jsonl(records, d / "proposals.jsonl")
        save_jsonl(refined, d / "train.jsonl")
        row = {"round": k, **counts, **(label_changes(convs, refined, records, proposals) or {})}
        convs = refined
        if a.round_models == "all" or k == a.rounds:
            last = d / "model"
            train_run(base_argv, d / "train.jsonl", last, rc, log=log)
        row.update(compute=rc, seconds=round(time.time() - t0, 1))
        rounds.append(row)
        log(f"round {k}: {counts['differing']} of {counts['labels']} proposals differ, {counts['replaced']} replaced"
            + (f"; label accuracy {row['label_accuracy_before']:.3f} -> {row['label_accuracy_after']:.3f} "
               f"(fixed {row['fixed']}, damaged {row['damaged']})" if "fixed" in row else ""))
    for r in rounds:
        add_compute(compute, r["compute"])
    shutil.rmtree(out / "adapter", ignore_errors=True)
    shutil.copytree(last / "adapter", out / "adapter")
    accs = [rounds[0]["label_accuracy"]] + [r.get("label_accuracy_after") for r in rounds[1:]]
    report = {"method": "ilr-naive" if a.naive else "ilr", "feedback": a.feedback, "model": a.model, "data": a.data,
              "rounds": a.rounds, "max_replace": a.max_replace, "round_models": a.round_models,
              "label_accuracy": None if accs[0] is None else accs,
              "comparator": total_comparator(rounds), "per_round": rounds, "compute": compute, "final_model": str(last), "adapter": str(out / "adapter"),
              "seconds": round(time.time() - t_start, 1)}
    write_json(report, out / "report.json")
    log(f"done in {report['seconds']:.0f} s: adapter {out / 'adapter'}, report {out / 'report.json'}")
    return report


def log(message):
    print(f"ilr: {message}", flush=True)


def total_comparator(rounds):
    """The comparator's realized accuracy summed over the rounds (None without references or feedback)."""
    rows = [r["comparator"] for r in rounds if r.get("comparator")]
    if not rows:
        return None
    tot = {k: sum(r[k] for r in rows) for k in ("informative", "right", "wrong", "tie")}
    tot["accuracy"] = tot["right"] / tot["informative"] if tot["informative"] else None
    return tot


if __name__ == "__main__":
    cli(PROG, main)
