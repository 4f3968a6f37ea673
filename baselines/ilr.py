"""Iterative Label Refinement (ILR, Ye, Laidlaw and Steinhardt, arXiv 2501.07886): spend
comparison feedback on the training labels instead of on the model.

    python baselines/ilr.py --model DIR --data train.jsonl --out runs/ilr --rounds 3 \\
        --max-replace 0.15 --feedback oracle|sim:0.8|format|local:DIR|http:NAME [--naive] \\
        [--max-queries N] [training flags as in train.py]

1. Round 0: SFT on the demonstrations D (every trained assistant turn is a label).
2. Round k = 1..K: split D by dialogue into two halves (seeded by --seed and k); train a fresh SFT
   model on each half; each proposes, greedily, a new answer for every label of the other half,
   with the dialogue's own earlier turns (its current labels) as context.
3. Feedback only where a proposal differs from the current label: the comparator
   (baselines/feedback.py) gives the probability that the proposal is better, asked in both orders
   and averaged. --max-queries caps the comparator queries of the whole run (two per comparison),
   spent round by round in label order; a proposal left without feedback is not replaced.
4. A label is replaced where that probability is above 0.5, at most floor(alpha * labels) per
   round (--max-replace, alpha = 0.15), the most confident first. --naive: replace without
   feedback, a random choice of the differing proposals under the same cap (the control that
   shows what the feedback is worth).
5. Retrain SFT from scratch on the refined D (every round with --round-models all, the paper's;
   only after the last with last, which saves K - 1 trainings and keeps the labels identical);
   repeat.

Writes, under OUT:
    round-0/model/          the SFT run on D (train.py's run folder)
    round-K/half-{0,1}.jsonl, half-{0,1}/   the halves and the models trained on them
    round-K/proposals.jsonl every differing proposal: label, proposal, p (null with --naive or
                            past --max-queries), replaced
    round-K/train.jsonl     the refined D: a replaced assistant message carries "original" (the
                            first label, with its noise fields) and "replaced_round"; its own noise
                            fields are dropped, since nothing known to the method says whether the
                            new label is noisy
    round-K/model/          the SFT run on the refined D
    adapter/                the last round's adapter (on --model, train.py's format)
    report.json             per round: labels, proposals, differing, compared, over_budget,
                            candidates (p > 0.5), cap, replaced; where the data has references
                            (evaluation only): label accuracy before / after, fixed (wrong ->
                            right), damaged (right -> wrong), changed (wrong -> another wrong),
                            proposal accuracy, the comparator's realized accuracy; max_queries;
                            compute (see baselines/__init__.py for the contract)
The trainings are train.py's runs, resumed or reused by a rerun; proposals and feedback are
recomputed from the trained models' files, the same on every run.
"""
import argparse
import copy
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from baselines import BaselineError, add_compute, check_inputs, cli  # noqa: E402
from baselines import generate, label_accuracy, label_positions  # noqa: E402
from baselines import new_compute, parser, train_run, trained_model, training_args  # noqa: E402
from baselines.feedback import Feedback, check_references, make, realized_accuracy  # noqa: E402
from baselines.feedback import reference  # noqa: E402
from data import ChatTemplate  # noqa: E402
from eval import answer_matches  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from support.runs import Progress, copy_folder, dump, stops_reported  # noqa: E402

PROG = "baselines/ilr.py"


def parse_args(argv):
    p = parser(PROG, __doc__)
    p.add_argument("--rounds", type=int, default=3, help="refinement rounds K (0: plain SFT)")
    p.add_argument("--max-replace", type=float, default=0.15,
                   help="alpha: at most this fraction of the labels replaced per round")
    p.add_argument("--naive", action="store_true",
                   help="replace without feedback (random choice under the cap)")
    p.add_argument("--round-models", choices=("all", "last"), default="all",
                   help="retrain on the refined data every round (the paper) or only after the "
                        "last one")
    a, rest = p.parse_known_args(argv)
    if a.rounds < 0:
        raise BaselineError(f"--rounds must be >= 0, got {a.rounds}")
    if not 0 <= a.max_replace <= 1:
        raise BaselineError(f"--max-replace must be in [0, 1], got {a.max_replace}")
    if a.max_new_tokens < 1 or a.gen_batch_size < 1:
        raise BaselineError("--max-new-tokens and --gen-batch-size must be >= 1")
    if a.max_queries < 0:
        raise BaselineError(f"--max-queries must be >= 0, got {a.max_queries}")
    if a.naive == (a.feedback is not None):
        raise BaselineError("give --feedback, or --naive (replacement without feedback), not both")
    if a.naive and a.max_queries:
        raise BaselineError("--max-queries needs --feedback (--naive asks no comparator)")
    return a, rest


def halves(n, seed, k):
    """Dialogue indices of the two halves of round k (a seeded permutation cut in the middle),
    each ascending."""
    order = np.random.default_rng([seed, k]).permutation(n)
    middle = (n + 1) // 2
    return sorted(order[:middle].tolist()), sorted(order[middle:].tolist())


def propose(net, template, convs, targets, max_len, compute, args):
    """Greedy proposals {(conversation, message): text} for the target labels; a prompt longer
    than the training's max_len is left without one. Context: the dialogue's messages before the
    label (its current labels)."""
    prompts = {t: template.encode_prompt(convs[t[0]]["messages"][:t[1]]) for t in targets}
    todo = [t for t in targets if len(prompts[t]) <= max_len]
    texts = generate(net, template, [prompts[t] for t in todo], compute, args.gen_batch_size,
                     args.max_new_tokens)
    return dict(zip(todo, texts))


def select(probs, cap, rng=None):
    """Which differing proposals to accept: with feedback (rng None) those with p > 0.5, the most
    confident first, at most cap (p None: not compared); naive (rng given): a random choice of cap
    of them."""
    if rng is not None:
        return sorted(rng.permutation(len(probs))[:cap].tolist())
    better = [i for i, p in enumerate(probs) if p is not None and p > 0.5]
    order = sorted(better, key=lambda i: -probs[i])  # stable: ties by index
    return sorted(order[:cap])


def differing_proposals(convs, targets, proposals):
    """[((conversation, message), proposal)] where a non-empty proposal differs from the label."""
    out = []
    for ci, mi in targets:
        proposal = proposals.get((ci, mi), "").strip()
        if proposal and proposal != convs[ci]["messages"][mi]["content"].strip():
            out.append(((ci, mi), proposals[ci, mi]))
    return out


def judge(feedback, convs, differing):
    """P(proposal better than label) of each differing proposal, in order, while feedback's
    --max-queries lasts; None for the rest (and for all with --naive's feedback None)."""
    probs = []
    for (ci, mi), proposal in differing:
        if feedback is None or not feedback.can_compare():
            probs.append(None)
            continue
        messages = convs[ci]["messages"]
        probs.append(feedback.compare(messages[:mi], proposal, messages[mi]["content"],
                                      messages[mi]))
    return probs


def replace_label(message, proposal, round_k):
    """Put proposal in place of message's label; "original" keeps the first label."""
    first = message.get("original")
    if not first:
        first = {k: message[k] for k in ("content", "noisy", "noise_type") if k in message}
    for k in ("noisy", "noise_type"):
        message.pop(k, None)
    message.update(content=proposal, original=first, replaced_round=round_k)


def refine(convs, proposals, feedback, alpha, round_k, rng=None):
    """One ILR replacement step. proposals: {(conversation, message): text}. feedback: a Feedback,
    or None with an rng for naive ILR. Returns (refined copy of convs, one record per differing
    proposal, counts)."""
    targets = label_positions(convs)
    differing = differing_proposals(convs, targets, proposals)
    probs = judge(feedback, convs, differing)
    cap = math.floor(alpha * len(targets) + 1e-9)
    chosen = set(select(probs, cap, rng))
    out = copy.deepcopy(convs)
    records = []
    for i, ((ci, mi), proposal) in enumerate(differing):
        message = out[ci]["messages"][mi]
        records.append({"conversation": ci, "message": mi, "label": message["content"],
                        "proposal": proposal, "p": probs[i], "replaced": i in chosen})
        if i in chosen:
            replace_label(message, proposal, round_k)
    compared = sum(p is not None for p in probs)
    candidates = len(differing)
    if feedback is not None:
        candidates = sum(p is not None and p > 0.5 for p in probs)
    over_budget = 0
    if feedback is not None:
        over_budget = len(differing) - compared
    counts = {"labels": len(targets),
              "proposed": sum(bool(proposals.get(t, "").strip()) for t in targets),
              "differing": len(differing), "compared": compared, "over_budget": over_budget,
              "candidates": candidates, "cap": cap, "replaced": len(chosen)}
    return out, records, counts


def is_right(text, turn):
    """Whether text matches the reference answer of assistant message `turn`."""
    return answer_matches(text, reference(turn))


def label_changes(before, after, records, proposals):
    """Evaluation of one round against the references (None without them): accuracy before /
    after, fixed, damaged, changed (wrong -> another wrong), the proposals' accuracy, the
    comparator's realized accuracy."""
    accuracy_before = label_accuracy(before)
    if accuracy_before is None:
        return None
    counts = {"fixed": 0, "damaged": 0, "changed": 0, "fixable": 0}
    decisions = []
    for r in records:
        turn = before[r["conversation"]]["messages"][r["message"]]
        label_right = is_right(r["label"], turn)
        proposal_right = is_right(r["proposal"], turn)
        # differing proposals that were right where the label was wrong
        counts["fixable"] += proposal_right and not label_right
        if r["replaced"]:
            counts["fixed"] += proposal_right and not label_right
            counts["damaged"] += label_right and not proposal_right
            counts["changed"] += not label_right and not proposal_right
        if r["p"] is not None:
            decisions.append((turn, r["proposal"], r["label"], r["p"]))
    right = []
    for (ci, mi), text in proposals.items():
        turn = before[ci]["messages"][mi]
        if text.strip() and reference(turn) is not None:
            right.append(is_right(text, turn))
    proposal_accuracy = None
    if right:
        proposal_accuracy = sum(right) / len(right)
    return {"label_accuracy_before": accuracy_before,
            "label_accuracy_after": label_accuracy(after), **counts,
            "proposal_accuracy": proposal_accuracy,
            "comparator": realized_accuracy(decisions)}


@dataclass
class ILRRun:
    """One ILR run as main sets it up; the rounds read it."""
    args: argparse.Namespace        # ILR's own flags
    train_argv: list[str]           # the training flags as training_args gives them
    train_args: argparse.Namespace  # the same, parsed by train.py
    out: Path
    template: ChatTemplate
    targets: list[tuple[int, int]]  # every label's (conversation, message)
    feedback: Feedback | None       # None: --naive
    progress: Progress              # what a signal's line names

    def train(self, data, run_dir, compute):
        """train_run into run_dir, the progress told before and after."""
        name = self.progress.name(run_dir)
        self.progress.start(f"training {name}", run_dir)
        train_run(self.train_argv, data, run_dir, compute, log=log)
        self.progress.done(run_dir)


def main(argv=None):
    """Run ILR end to end; returns the report (also OUT/report.json)."""
    t_start = time.time()
    a, rest = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(a.model, a.data)
    train_argv, targs = training_args(a.model, a.data, rest)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = load_conversations(a.data, on_bad_sample=targs.on_bad_sample)
    targets = label_positions(convs)
    if len(convs) < 2 or not targets:
        raise BaselineError(f"--data {a.data}: ILR needs at least two conversations with a "
                            "trained assistant turn")
    feedback = None
    if not a.naive:
        feedback = Feedback(make(a.feedback, targs.seed, str(out)), a.max_queries)
        check_references(convs, targets, feedback, a.data)
    template = ChatTemplate.from_pretrained(a.model, name=targs.chat_template)
    with stops_reported(Progress(out)) as progress:
        run = ILRRun(a, train_argv, targs, out, template, targets, feedback, progress)
        report = refine_and_train(run, convs)
        report["seconds"] = round(time.time() - t_start, 1)
        progress.start("writing report.json")
        dump(report, str(out / "report.json"))
    log(f"done in {report['seconds']:.0f} s, {report['compute']['comparisons']} comparator "
        f"queries: adapter {out / 'adapter'}, report {out / 'report.json'}")
    return report


def refine_and_train(run, convs):
    """Round 0 and the K rounds; the last model's adapter copied to OUT/adapter. Returns the
    report (without its seconds)."""
    a = run.args
    rounds = [{"round": 0, "labels": len(run.targets), "label_accuracy": label_accuracy(convs),
               "compute": new_compute()}]
    last = None
    if a.rounds == 0 or a.round_models == "all":
        last = run.out / "round-0" / "model"
        run.train(a.data, last, rounds[0]["compute"])
    for k in range(1, a.rounds + 1):
        convs, row = refinement_round(run, convs, k)
        rounds.append(row)
        if a.round_models == "all" or k == a.rounds:
            last = run.out / f"round-{k}" / "model"
    run.progress.start("copying the last model's adapter")
    copy_folder(last / "adapter", run.out / "adapter")
    compute = new_compute()
    for r in rounds:
        add_compute(compute, r["compute"])
    accuracies = [rounds[0]["label_accuracy"]]
    accuracies += [r.get("label_accuracy_after") for r in rounds[1:]]
    if accuracies[0] is None:
        accuracies = None
    method = "ilr"
    if a.naive:
        method = "ilr-naive"
    return {"method": method, "feedback": a.feedback, "model": a.model, "data": a.data,
            "rounds": a.rounds, "max_replace": a.max_replace, "round_models": a.round_models,
            "max_queries": a.max_queries, "label_accuracy": accuracies,
            "comparator": total_comparator(rounds), "per_round": rounds, "compute": compute,
            "final_model": str(last), "adapter": str(run.out / "adapter")}


def refinement_round(run, convs, k):
    """Round k: the halves' models propose, the feedback picks, the labels are replaced (and the
    round's model trained). Returns (the refined conversations, the round's row)."""
    t0 = time.time()
    compute = new_compute()
    folder = run.out / f"round-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    feedback = run.feedback
    queries0 = 0
    tokens0 = 0
    if feedback:
        queries0 = feedback.queries
        tokens0 = feedback.forward_tokens
    parts = halves(len(convs), run.train_args.seed, k)
    for j, part in enumerate(parts):
        save_jsonl([convs[i] for i in part], folder / f"half-{j}.jsonl")
    proposals = {}
    for j, part in enumerate(parts):
        proposals.update(propose_from_half(run, convs, folder, j, parts[1 - j], compute))
    rng = None
    if feedback is None:
        rng = np.random.default_rng([run.train_args.seed, k, 1])
    run.progress.start(f"judging round {k}'s proposals")
    refined, records, counts = refine(convs, proposals, feedback, run.args.max_replace, k, rng)
    if feedback:
        add_compute(compute, {"comparisons": feedback.queries - queries0,
                              "forward_tokens": feedback.forward_tokens - tokens0})
    save_jsonl(records, folder / "proposals.jsonl")
    save_jsonl(refined, folder / "train.jsonl")
    run.progress.done(folder / "train.jsonl")
    row = {"round": k, **counts, **(label_changes(convs, refined, records, proposals) or {})}
    if run.args.round_models == "all" or k == run.args.rounds:
        run.train(folder / "train.jsonl", folder / "model", compute)
    row.update(compute=compute, seconds=round(time.time() - t0, 1))
    log_round(k, counts, row)
    return refined, row


def propose_from_half(run, convs, folder, j, other_part, compute):
    """Train on half j of round `folder`, then propose labels for the other half's dialogues."""
    run_dir = folder / f"half-{j}"
    run.train(folder / f"half-{j}.jsonl", run_dir, compute)
    run.progress.start(f"proposing labels with {run.progress.name(run_dir)}")
    net = trained_model(run.args.model, run_dir, run.train_args.dtype)
    other = set(other_part)
    targets = [t for t in run.targets if t[0] in other]
    proposals = propose(net, run.template, convs, targets, run.train_args.max_len, compute,
                        run.args)
    del net  # before the next model is built
    gc.collect()
    return proposals


def log_round(k, counts, row):
    line = (f"round {k}: {counts['differing']} of {counts['labels']} proposals differ, "
            f"{counts['replaced']} replaced")
    if "fixed" in row:
        line += (f"; label accuracy {row['label_accuracy_before']:.3f} -> "
                 f"{row['label_accuracy_after']:.3f} (fixed {row['fixed']}, damaged "
                 f"{row['damaged']})")
    log(line)


def log(message):
    print(f"ilr: {message}", flush=True)


def total_comparator(rounds):
    """The comparator's realized accuracy summed over the rounds (None without references or
    feedback)."""
    rows = [r["comparator"] for r in rounds if r.get("comparator")]
    if not rows:
        return None
    total = {k: sum(r[k] for r in rows) for k in ("informative", "right", "wrong", "tie")}
    total["accuracy"] = None
    if total["informative"]:
        total["accuracy"] = total["right"] / total["informative"]
    return total


if __name__ == "__main__":
    cli(PROG, main)
