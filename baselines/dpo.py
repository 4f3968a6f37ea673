"""DPO (Rafailov et al., arXiv 2305.18290) after SFT, the foil ILR's paper compares against: the
same comparison feedback, spent on preference pairs that train the model instead of on the labels.

    python baselines/dpo.py --model DIR --data train.jsonl --out runs/dpo \\
        --feedback oracle|sim:0.8|format|local:DIR|http:NAME [--beta 0.1] [--max-queries N] \\
        [training flags as in train.py]

1. SFT on D (train.py, --method sft), or --sft-adapter DIR to start from a finished one.
2. Pairs from that SFT model: for every label of D (every trained assistant turn; the dialogue's
   own earlier turns as context) --samples answers at --temperature; identical answers are
   dropped; every pair of the distinct ones is shown to the comparator in both orders
   (baselines/feedback.py) and its preferred side becomes "chosen"; a tie (p = 0.5) drops the
   pair. --max-queries caps the comparator queries (a feedback budget, spent in label order).
3. The reference model is the SFT model: its adapter is merged into OUT/sft-merged and a fresh
   adapter is trained on top by train.main with DPOLoss as the objective (the one training loop;
   only the loss differs), so lora.disabled() is the reference. Loss per pair, on the final
   assistant turn's log-probability (its supervised tokens, end-of-turn included, summed):
   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),  beta 0.1.
   --dpo-lr / --dpo-max-steps override --lr / --max-steps for this stage only.
4. OUT/adapter: the SFT and DPO adapters stacked into one LoRA adapter on --model (rank r_sft +
   r_dpo, A = [A_sft; A_dpo], B = [s_sft B_sft, s_dpo B_dpo], scaling 1: the same weight update),
   so eval.load(--model, OUT/adapter) gives the final model, like any train.py adapter.

Writes under OUT: sft/ (train.py's run), sft-merged/ (the reference), pairs.jsonl (a conversation
ending in the chosen reply, with "rejected", "p" and where it came from), dpo/ (train.py's run on
the merged model), adapter/, report.json: pair counts, the comparator's realized accuracy and the
samples' accuracy where the data has references, "training" (the trained policy's DPO loss, reward
accuracy and mean margin on its pairs, read from its files, no dropout), max_queries, compute (see
baselines/__init__.py for the contract). The trainings are train.py's runs, resumed or reused by a
rerun; the merged model, the samples and the pairs are recomputed from files, the same every run.
"""
import argparse
import gc
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from baselines import BaselineError, Counted, add_compute, check_inputs  # noqa: E402
from baselines import cli, device, generate, label_accuracy, label_positions  # noqa: E402
from baselines import new_compute, parser, set_flag, train_run, training_args  # noqa: E402
from baselines.feedback import Feedback, check_references, make, realized_accuracy  # noqa: E402
from baselines.feedback import reference  # noqa: E402
from data import ChatTemplate, collate  # noqa: E402
from eval import answer_matches, load  # noqa: E402
from lora import apply_lora, disabled, load_adapter, lora_modules, save_adapter  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from support.checkpoint import read_json  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from support.distributed import gather  # noqa: E402
from support.export import export_merged  # noqa: E402
from support.runs import Progress, dump, replace_folder, stops_reported  # noqa: E402

PROG = "baselines/dpo.py"


def dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from sequence
    log-probabilities."""
    return -F.logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))


def sequence_logps(token_losses):
    """log p of each row's supervised tokens from model.token_losses (0 where unsupervised): minus
    their sum."""
    return -token_losses.sum(1)


def encode_final(template, messages):
    """Token ids with only the final assistant turn supervised (earlier assistant turns are
    context)."""
    context = []
    for m in messages[:-1]:
        if m["role"] == "assistant":
            m = dict(m, train=False)
        context.append(m)
    return template.encode(context + [dict(messages[-1], train=True)])


class PairReport(dict):
    def summary(self):
        return (f"{self['pairs']} pairs -> {self['examples']} examples ({self['dropped']} "
                f"dropped: longer than max_len={self['max_len']} or nothing supervised)")


def unsupervised(encoded):
    return all(x == -100 for x in encoded["labels"])


class DPOLoss(Counted):
    """train.main's objective for DPO (the four methods of train.ReSURELoss). An example is a pair:
    a conversation ending in the chosen reply plus the "rejected" reply; a batch stacks the chosen
    rows, then the rejected ones. The policy is run.net with its adapter; the reference is run.net
    with the adapter disabled, under no_grad. Its counts (baselines.Counted): the policy's tokens
    (train) and the reference's (forward only). history keeps, per micro-batch of this process,
    the mean loss, the reward accuracy (beta-scaled log-ratio of chosen above rejected) and the
    mean margin."""

    def __init__(self, beta=0.1):
        self.beta = beta
        self.history = []

    def examples(self, convs, template, args):
        report = PairReport(pairs=len(convs), examples=0, dropped=0, max_len=args.max_len)
        out = []
        for i, c in enumerate(convs):
            msgs = c["messages"]
            rejected = c.get("rejected")
            if msgs[-1]["role"] != "assistant" or not isinstance(rejected, str) or \
                    not rejected.strip():
                raise BaselineError(f"{args.data}: pair {i} needs a final assistant message "
                                    "(chosen) and a non-empty 'rejected' reply")
            chosen = encode_final(template, msgs)
            other = encode_final(template, msgs[:-1] + [dict(msgs[-1], content=rejected)])
            longest = max(len(chosen["input_ids"]), len(other["input_ids"]))
            if longest > args.max_len or unsupervised(chosen) or unsupervised(other):
                report["dropped"] += 1
                continue
            out.append({"chosen": chosen, "rejected": other, "index": len(out), "conv_index": i})
        report["examples"] = len(out)
        return out, report

    def collate(self, examples, pad_id):
        rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        b = collate(rows, pad_id)
        return {k: b[k] for k in ("input_ids", "labels", "attention_mask")}

    def count(self, run, b):  # (pairs, supervised tokens)
        return len(b["input_ids"]) // 2, int((b["labels"] != -100).sum())

    def tokens(self, example):
        return len(example["chosen"]["input_ids"]) + len(example["rejected"]["input_ids"])

    def run_counts(self, run):
        counts = super().run_counts(run)
        counts["forward_tokens"] = counts["train_tokens"]  # the reference reads every pair too
        return counts

    def loss(self, run, b, k, totals):
        self.write_record(run)
        ids = b["input_ids"]
        labels = b["labels"]
        mask = b["attention_mask"]
        n = len(ids) // 2
        # the reference first: nothing toggles in backward
        with torch.no_grad(), disabled(run.net), run.autocast:
            ref = sequence_logps(run.net.token_losses(ids, labels, mask).float())
        with run.autocast:
            pi = sequence_logps(run.ddp(ids, labels, mask).float())
        losses = dpo_losses(pi[:n], pi[n:], ref[:n], ref[n:], self.beta)
        margin = (self.beta * ((pi[:n] - ref[:n]) - (pi[n:] - ref[n:]))).detach()
        self.history.append({"loss": float(losses.detach().mean()),
                             "reward_accuracy": float((margin > 0).double().mean()),
                             "margin": float(margin.mean())})
        vals, _ = gather(losses.detach())
        return losses.sum() / max(totals[0], 1) * run.world, vals, np.ones_like(vals)


def sample_pairs(net, template, convs, targets, feedback, args, max_len, seed, compute):
    """Preference pairs from the model's samples (see the module docstring). Returns (pair
    records, counts, decisions (turn, a, b, p) for evaluation, {target: samples})."""
    prompts = {t: template.encode_prompt(convs[t[0]]["messages"][:t[1]]) for t in targets}
    todo = [t for t in targets if len(prompts[t]) <= max_len]
    repeated = [prompts[t] for t in todo for _ in range(args.samples)]
    texts = generate(net, template, repeated, compute, args.gen_batch_size, args.max_new_tokens,
                     args.temperature, args.top_p, seed)
    samples = {t: texts[i * args.samples:(i + 1) * args.samples] for i, t in enumerate(todo)}
    pairs = []
    decisions = []
    counts = dict(prompts=len(targets), too_long=len(targets) - len(todo), sampled=len(texts),
                  with_two_distinct=0, compared=0, ties=0, over_budget=0)
    for ci, mi in todo:
        distinct = list(dict.fromkeys(s for s in samples[ci, mi] if s.strip()))
        counts["with_two_distinct"] += len(distinct) >= 2
        context = convs[ci]["messages"][:mi]
        turn = convs[ci]["messages"][mi]
        for a, b in itertools.combinations(distinct, 2):
            if not feedback.can_compare():
                counts["over_budget"] += 1
                continue
            p = feedback.compare(context, a, b, turn)
            counts["compared"] += 1
            decisions.append((turn, a, b, p))
            if p == 0.5:
                counts["ties"] += 1
                continue
            ordered = [a, b]  # the preferred reply first
            if p < 0.5:
                ordered.reverse()
            chosen, rejected = ordered
            pairs.append({"messages": context + [{"role": "assistant", "content": chosen}],
                          "rejected": rejected, "p": max(p, 1 - p), "conversation": ci,
                          "message": mi})
    counts["pairs"] = len(pairs)
    return pairs, counts, decisions, samples


def stack_adapters(base_dir, adapters, out_dir):
    """One LoRA adapter on base_dir whose update is the sum of `adapters`' updates (each on the
    model the one before it was merged into): ranks concatenated, each B scaled by its adapter's
    scaling, scaling 1. Built on meta-device skeletons, so no weights are loaded. base.json (the
    base's fingerprint) comes from the first. The folder is written whole."""
    cfg = ModelConfig.from_json(Path(base_dir) / "config.json")
    parts = []
    for d in adapters:
        with torch.device("meta"):
            skeleton = Transformer(cfg)
        parts.append(lora_modules(load_adapter(skeleton, d)))
    if any(p.keys() != parts[0].keys() for p in parts):
        names = ", ".join(map(str, adapters))
        raise BaselineError(f"adapters {names}: they target different modules, cannot be stacked")
    r = sum(next(iter(p.values())).r for p in parts)
    with torch.device("meta"):
        out = Transformer(cfg)
    targets = sorted({n.rsplit(".", 1)[-1] for n in parts[0]})
    apply_lora(out, r=r, alpha=r, dropout=0.0, targets=targets, verbose=False)
    with torch.no_grad():
        for name, m in lora_modules(out).items():
            m.lora_A.weight.copy_(torch.cat([p[name].lora_A.weight for p in parts], 0))
            scaled = [p[name].lora_B.weight * p[name].scaling for p in parts]
            m.lora_B.weight.copy_(torch.cat(scaled, 1))
    out.fingerprint = None
    base_json = Path(adapters[0]) / "base.json"
    if base_json.is_file():
        out.fingerprint = read_json(base_json, BaselineError).get("fingerprint")

    def write(folder):
        save_adapter(out, str(folder), str(base_dir))
    return replace_folder(write, out_dir)


@torch.no_grad()
def pair_logps(net, objective, examples, pad_id, batch_size):
    """log p of every pair's chosen and of its rejected reply under net: two tensors."""
    dev = next(net.parameters()).device
    chosen = []
    rejected = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        b = objective.collate(part, pad_id)
        losses = net.token_losses(b["input_ids"].to(dev), b["labels"].to(dev),
                                  b["attention_mask"].to(dev))
        logps = sequence_logps(losses.double()).cpu()
        chosen.append(logps[:len(part)])
        rejected.append(logps[len(part):])
    return torch.cat(chosen), torch.cat(rejected)


def policy_summary(reference_model, adapter, pairs_file, objective, template, train_args):
    """The trained policy on its own pairs, in eval mode and from its files (the same after any
    resume): mean DPO loss, reward accuracy (margin > 0) and mean margin against the reference."""
    examples, _ = objective.examples(load_conversations(pairs_file), template, train_args)
    logps = []
    for adapter_dir in (None, adapter):  # the reference, then the policy
        net = load(reference_model, adapter_dir, train_args.dtype, device())[0]
        logps.append(pair_logps(net, objective, examples, template.pad_id, train_args.batch_size))
        del net
        gc.collect()
    (ref_chosen, ref_rejected), (pi_chosen, pi_rejected) = logps
    beta = objective.beta
    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    losses = dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    return {"pairs": len(examples), "loss": float(losses.mean()),
            "reward_accuracy": float((margin > 0).double().mean()),
            "margin": float(margin.mean())}


def parse_args(argv):
    p = parser(PROG, __doc__)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's inverse temperature")
    p.add_argument("--samples", type=int, default=2,
                   help="answers sampled per prompt (every distinct pair is compared)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sft-adapter",
                   help="a finished SFT adapter on --model to start from (no SFT training)")
    p.add_argument("--dpo-lr", type=float, help="learning rate of the DPO stage (default: --lr)")
    p.add_argument("--dpo-max-steps", type=int,
                   help="optimizer steps of the DPO stage (default: --max-steps)")
    a, rest = p.parse_known_args(argv)
    if a.feedback is None:
        raise BaselineError("--feedback is required (oracle, sim:P, format, local:DIR or "
                            "http:NAME)")
    if not (math.isfinite(a.beta) and a.beta > 0):
        raise BaselineError(f"--beta must be > 0, got {a.beta}")
    if a.samples < 2:
        raise BaselineError(f"--samples must be >= 2 (a pair needs two answers), got {a.samples}")
    if not (a.temperature > 0 and math.isfinite(a.temperature)):
        raise BaselineError("--temperature must be > 0 (greedy answers are all identical), got "
                            f"{a.temperature}")
    if not 0 < a.top_p <= 1 or a.max_new_tokens < 1 or a.gen_batch_size < 1 or a.max_queries < 0:
        raise BaselineError("need 0 < --top-p <= 1, --max-new-tokens >= 1, --gen-batch-size >= 1, "
                            "--max-queries >= 0")
    if a.sft_adapter and not Path(a.sft_adapter, "adapter_config.json").is_file():
        raise BaselineError(f"--sft-adapter {a.sft_adapter}: no adapter_config.json there")
    return a, rest


def check_training_flags(train_args):
    """Refuse the training flags DPO's own loss leaves without meaning."""
    refused = (("--method other than sft", train_args.method != "sft"),
               ("--prefilter-keep", train_args.prefilter_keep < 1),
               ("--prefilter-scores", train_args.prefilter_scores),
               ("--warmup-data", train_args.warmup_data),
               ("--detector loss+gain", train_args.detector != "loss"),
               ("--group-by-length", train_args.group_by_length))
    for flag, given in refused:
        if given:
            raise BaselineError(f"{flag}: does not apply to DPO (its loss replaces train.py's "
                                "objective)")


def main(argv=None):
    """Run SFT + DPO end to end; returns the report (also OUT/report.json)."""
    t_start = time.time()
    a, rest = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(a.model, a.data)
    train_argv, targs = training_args(a.model, a.data, rest)
    check_training_flags(targs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = load_conversations(a.data, on_bad_sample=targs.on_bad_sample)
    targets = label_positions(convs)
    if not targets:
        raise BaselineError(f"--data {a.data}: no trained assistant turn")
    feedback = Feedback(make(a.feedback, targs.seed, str(out)), a.max_queries)
    check_references(convs, targets, feedback, a.data)
    template = ChatTemplate.from_pretrained(a.model, name=targs.chat_template)
    with stops_reported(Progress(out)) as progress:
        stages = Stages(a, train_argv, targs, out, template, progress)
        report = stages.run(convs, targets, feedback)
        report["seconds"] = round(time.time() - t_start, 1)
        progress.start("writing report.json")
        dump(report, str(out / "report.json"))
    log(f"done in {report['seconds']:.0f} s, {report['compute']['comparisons']} comparator "
        f"queries: adapter {out / 'adapter'} (on {a.model}), report {out / 'report.json'}")
    return report


@dataclass
class Stages:
    """SFT, pairs, DPO and the stacked adapter, each stage's output saved whole in OUT."""
    args: argparse.Namespace        # DPO's own flags
    train_argv: list[str]           # the training flags as training_args gives them
    train_args: argparse.Namespace  # the same, parsed by train.py
    out: Path
    template: ChatTemplate
    progress: Progress              # what a signal's line names
    compute: dict = field(default_factory=new_compute)  # this run's work (the report's compute)

    def train(self, argv, data, run_dir, objective=None):
        self.progress.start(f"training {self.progress.name(run_dir)}", run_dir)
        train_run(argv, data, run_dir, self.compute, objective, log=log)
        self.progress.done(run_dir)

    def sft(self):
        """The SFT adapter (trained here unless --sft-adapter) and the merged reference model."""
        a = self.args
        sft_adapter = Path(a.sft_adapter or self.out / "sft" / "adapter")
        if not a.sft_adapter:
            self.train(self.train_argv, a.data, self.out / "sft")
        self.progress.start("writing sft-merged")
        net = load(a.model, sft_adapter, self.train_args.dtype, device())[0]
        merged = export_merged(net, a.model, str(self.out / "sft-merged"))
        self.progress.done(merged)
        return sft_adapter, net, merged

    def pairs(self, net, convs, targets, feedback):
        """Sampled, judged pairs in OUT/pairs.jsonl; returns sample_pairs' counts, decisions and
        samples."""
        self.progress.start("sampling and judging pairs")
        pairs, counts, decisions, samples = sample_pairs(
            net, self.template, convs, targets, feedback, self.args, self.train_args.max_len,
            self.train_args.seed, self.compute)
        add_compute(self.compute, {"comparisons": feedback.queries,
                                   "forward_tokens": feedback.forward_tokens})
        log(f"{counts['compared']} pairs compared, {counts['ties']} ties, {counts['pairs']} "
            "preference pairs")
        if not pairs:
            raise BaselineError(f"--feedback {self.args.feedback}: no preference pair (the "
                                f"comparator tied on all {counts['compared']} sampled pairs, or "
                                "no prompt gave two distinct answers)")
        save_jsonl(pairs, self.out / "pairs.jsonl")
        self.progress.done(self.out / "pairs.jsonl")
        return counts, decisions, samples

    def dpo(self, merged):
        """The DPO run on the merged SFT model; returns its objective."""
        a = self.args
        argv = set_flag(self.train_argv, "--model", merged)
        if a.dpo_lr:
            argv += ["--lr", str(a.dpo_lr)]
        if a.dpo_max_steps:
            argv += ["--max-steps", str(a.dpo_max_steps)]
        objective = DPOLoss(a.beta)
        self.train(argv, self.out / "pairs.jsonl", self.out / "dpo", objective)
        return objective

    def run(self, convs, targets, feedback):
        """Every stage; returns the report (without its seconds)."""
        a = self.args
        sft_adapter, net, merged = self.sft()
        counts, decisions, samples = self.pairs(net, convs, targets, feedback)
        del net  # the DPO run loads the merged copy
        gc.collect()
        objective = self.dpo(merged)
        self.progress.start("stacking the adapters")
        stack_adapters(a.model, [sft_adapter, self.out / "dpo" / "adapter"], self.out / "adapter")
        self.progress.done(self.out / "adapter")
        self.progress.start("scoring the trained policy on its pairs")
        training = policy_summary(merged, self.out / "dpo" / "adapter", self.out / "pairs.jsonl",
                                  objective, self.template, self.train_args)
        right = list(sample_correct(samples, convs))
        sample_accuracy = None
        if right:
            sample_accuracy = sum(right) / len(right)
        accuracy = label_accuracy(convs)
        if accuracy is not None:
            accuracy = [accuracy]
        return {"method": "dpo", "feedback": a.feedback, "model": a.model, "data": a.data,
                "beta": a.beta, "samples": a.samples, "temperature": a.temperature,
                "max_queries": a.max_queries, **counts, "label_accuracy": accuracy,
                "sample_accuracy": sample_accuracy, "comparator": realized_accuracy(decisions),
                "training": training, "compute": self.compute, "sft_adapter": str(sft_adapter),
                "reference_model": merged, "adapter": str(self.out / "adapter")}


def log(message):
    print(f"dpo: {message}", flush=True)


def sample_correct(samples, convs):
    """Whether each sampled answer matches its reference (evaluation only)."""
    for (ci, mi), texts in samples.items():
        ref = reference(convs[ci]["messages"][mi])
        if ref is not None:
            yield from (answer_matches(t, ref) for t in texts)


if __name__ == "__main__":
    cli(PROG, main)
