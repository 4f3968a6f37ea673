"""DPO (Rafailov et al., arXiv 2305.18290) after SFT, the foil ILR's paper compares against: the same comparison
feedback, spent on preference pairs that train the model instead of on the labels.

    python baselines/dpo.py --model DIR --data train.jsonl --out runs/dpo \\
        --feedback oracle|sim:0.8|format|local:DIR|http:NAME [--beta 0.1] [training flags as in train.py]

1. SFT on D (train.py, --method sft), or --sft-adapter DIR to start from a finished one.
2. Pairs from that SFT model: for every label of D (every trained assistant turn; the dialogue's own earlier
   turns as context) --samples answers at --temperature; identical answers are dropped; every pair of the distinct
   ones is shown to the comparator in both orders (baselines/feedback.py) and its preferred side becomes "chosen";
   a tie (p = 0.5) drops the pair. --max-comparisons caps the comparator queries (a feedback budget).
3. The reference model is the SFT model: its adapter is merged into OUT/sft-merged and a fresh adapter is trained
   on top by train.main with DPOLoss as the objective (the one training loop; only the loss differs), so
   lora.disabled() is the reference. Loss per pair, on the final assistant turn's log-probability (its supervised
   tokens, end-of-turn included, summed):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),  beta 0.1.
   --dpo-lr / --dpo-max-steps override --lr / --max-steps for this stage only.
4. OUT/adapter: the SFT and DPO adapters stacked into one LoRA adapter on --model (rank r_sft + r_dpo, A = [A_sft;
   A_dpo], B = [s_sft B_sft, s_dpo B_dpo], scaling 1: the same weight update), so eval.load(--model, OUT/adapter)
   gives the final model, like any train.py adapter.

Writes under OUT: sft/ (train.py's run), sft-merged/ (the reference), pairs.jsonl (a conversation ending in the
chosen reply, with "rejected", "p" and where it came from), dpo/ (train.py's run on the merged model), adapter/,
report.json (pair counts, the comparator's realized accuracy and the samples' accuracy where the data has
references, DPO's loss and reward accuracy, compute: see baselines/__init__.py for the contract).
"""
import gc
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from baselines import (BaselineError, add_compute, check_inputs, cli, device, generate, label_accuracy,  # noqa: E402
                       label_positions, new_compute, parser, set_flag, train_run, training_args, write_json)
from baselines.feedback import Feedback, check_references, make, realized_accuracy, reference  # noqa: E402
from data import ChatTemplate, collate  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from eval import answer_matches, load  # noqa: E402
from lora import apply_lora, disabled, load_adapter, lora_modules, save_adapter  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from support.checkpoint import read_json  # noqa: E402
from resure import gather  # noqa: E402

PROG = "baselines/dpo.py"


def dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from sequence log-probabilities."""
    return -F.logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))


def sequence_logps(token_losses):
    """log p of each row's supervised tokens from model.token_losses (0 where unsupervised): minus their sum."""
    return -token_losses.sum(1)


def encode_final(template, messages):
    """Token ids with only the final assistant turn supervised (earlier assistant turns are context)."""
    msgs = [dict(m, train=False) if m["role"] == "assistant" else m for m in messages[:-1]]
    return template.encode(msgs + [dict(messages[-1], train=True)])


class PairReport(dict):
    def summary(self):
        return (f"{self['pairs']} pairs -> {self['examples']} examples ({self['dropped']} dropped: longer than "
                f"max_len={self['max_len']} or nothing supervised)")


class DPOLoss:
    """train.main's objective for DPO (the four methods of train.ReSURELoss). An example is a pair: a conversation
    ending in the chosen reply plus the "rejected" reply; a batch stacks the chosen rows, then the rejected ones.
    The policy is run.net with its adapter; the reference is run.net with the adapter disabled, under no_grad.
    compute counts the policy's tokens (train) and the reference's (forward only); history keeps, per micro-batch,
    the mean loss, the reward accuracy (beta-scaled log-ratio of chosen above rejected) and the mean margin."""

    def __init__(self, beta=0.1):
        self.beta, self.compute, self.history = beta, {"train_tokens": 0, "forward_tokens": 0}, []

    def examples(self, convs, template, args):
        rep, out = PairReport(pairs=len(convs), examples=0, dropped=0, max_len=args.max_len), []
        for i, c in enumerate(convs):
            msgs, rejected = c["messages"], c.get("rejected")
            if msgs[-1]["role"] != "assistant" or not isinstance(rejected, str) or not rejected.strip():
                raise BaselineError(f"{args.data}: pair {i} needs a final assistant message (chosen) and a "
                                    "non-empty 'rejected' reply")
            ch = encode_final(template, msgs)
            rj = encode_final(template, msgs[:-1] + [dict(msgs[-1], content=rejected)])
            if max(len(ch["input_ids"]), len(rj["input_ids"])) > args.max_len or \
                    all(x == -100 for x in ch["labels"]) or all(x == -100 for x in rj["labels"]):
                rep["dropped"] += 1
                continue
            out.append({"chosen": ch, "rejected": rj, "index": len(out), "conv_index": i})
        rep["examples"] = len(out)
        return out, rep

    def collate(self, examples, pad_id):
        b = collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
        return {k: b[k] for k in ("input_ids", "labels", "attention_mask")}

    def count(self, run, b):  # (pairs, supervised tokens)
        return len(b["input_ids"]) // 2, int((b["labels"] != -100).sum())

    def loss(self, run, b, k, totals):
        ids, labels, mask, n = b["input_ids"], b["labels"], b["attention_mask"], len(b["input_ids"]) // 2
        with torch.no_grad(), disabled(run.net), run.autocast:  # the reference first: nothing toggles in backward
            ref = sequence_logps(run.net.token_losses(ids, labels, mask).float())
        with run.autocast:
            pi = sequence_logps(run.ddp(ids, labels, mask).float())
        losses = dpo_losses(pi[:n], pi[n:], ref[:n], ref[n:], self.beta)
        tokens = int(mask.sum())
        self.compute["train_tokens"] += tokens
        self.compute["forward_tokens"] += tokens
        margin = (self.beta * ((pi[:n] - ref[:n]) - (pi[n:] - ref[n:]))).detach()
        self.history.append({"loss": float(losses.detach().mean()), "reward_accuracy": float((margin > 0).double()
                             .mean()), "margin": float(margin.mean())})
        vals, _ = gather(losses.detach())
        return losses.sum() / max(totals[0], 1) * run.world, vals, np.ones_like(vals)


def sample_pairs(net, template, convs, targets, feedback, args, max_len, seed, compute):
    """Preference pairs from the model's samples (see the module docstring). Returns (pair records, counts,
    decisions (turn, a, b, p) for evaluation, {target: samples})."""
    prompts = {t: template.encode_prompt(convs[t[0]]["messages"][:t[1]]) for t in targets}
    todo = [t for t in targets if len(prompts[t]) <= max_len]
    texts = generate(net, template, [prompts[t] for t in todo for _ in range(args.samples)], compute,
                     args.gen_batch_size, args.max_new_tokens, args.temperature, args.top_p, seed)
    samples = {t: texts[i * args.samples:(i + 1) * args.samples] for i, t in enumerate(todo)}
    pairs, decisions, counts = [], [], dict(prompts=len(targets), too_long=len(targets) - len(todo),
                                            sampled=len(texts), with_two_distinct=0, compared=0, ties=0,
                                            over_budget=0)
    for (ci, mi) in todo:
        distinct = list(dict.fromkeys(s for s in samples[ci, mi] if s.strip()))
        counts["with_two_distinct"] += len(distinct) >= 2
        ctx, turn = convs[ci]["messages"][:mi], convs[ci]["messages"][mi]
        for a, b in itertools.combinations(distinct, 2):
            if args.max_comparisons and feedback.queries + 2 > args.max_comparisons:
                counts["over_budget"] += 1
                continue
            p = feedback.compare(ctx, a, b, turn)
            counts["compared"] += 1
            decisions.append((turn, a, b, p))
            if p == 0.5:
                counts["ties"] += 1
                continue
            chosen, rejected = (a, b) if p > 0.5 else (b, a)
            pairs.append({"messages": ctx + [{"role": "assistant", "content": chosen}], "rejected": rejected,
                          "p": max(p, 1 - p), "conversation": ci, "message": mi})
    counts["pairs"] = len(pairs)
    return pairs, counts, decisions, samples


def stack_adapters(base_dir, adapters, out_dir):
    """One LoRA adapter on base_dir whose update is the sum of `adapters`' updates (each on the model the one
    before it was merged into): ranks concatenated, each B scaled by its adapter's scaling, scaling 1. Built on
    meta-device skeletons, so no weights are loaded. base.json (the base's fingerprint) comes from the first."""
    cfg = ModelConfig.from_json(Path(base_dir) / "config.json")
    parts = []
    for d in adapters:
        with torch.device("meta"):
            skeleton = Transformer(cfg)
        parts.append(lora_modules(load_adapter(skeleton, d)))
    if any(p.keys() != parts[0].keys() for p in parts):
        raise BaselineError(f"adapters {', '.join(map(str, adapters))} target different modules: cannot be stacked")
    r = sum(next(iter(p.values())).r for p in parts)
    with torch.device("meta"):
        out = Transformer(cfg)
    apply_lora(out, r=r, alpha=r, dropout=0.0, targets=sorted({n.rsplit(".", 1)[-1] for n in parts[0]}),
               verbose=False)
    with torch.no_grad():
        for name, m in lora_modules(out).items():
            m.lora_A.weight.copy_(torch.cat([p[name].lora_A.weight for p in parts], 0))
            m.lora_B.weight.copy_(torch.cat([p[name].lora_B.weight * p[name].scaling for p in parts], 1))
    out.fingerprint = read_json(Path(adapters[0]) / "base.json", BaselineError).get("fingerprint") \
        if (Path(adapters[0]) / "base.json").is_file() else None
    save_adapter(out, str(out_dir), str(base_dir))
    return out_dir


def parse_args(argv):
    p = parser(PROG, __doc__)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's inverse temperature")
    p.add_argument("--samples", type=int, default=2, help="answers sampled per prompt (every distinct pair is "
                   "compared)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-comparisons", type=int, default=0, help="comparator queries at most (0: no cap)")
    p.add_argument("--sft-adapter", help="a finished SFT adapter on --model to start from (no SFT training)")
    p.add_argument("--dpo-lr", type=float, help="learning rate of the DPO stage (default: --lr)")
    p.add_argument("--dpo-max-steps", type=int, help="optimizer steps of the DPO stage (default: --max-steps)")
    a, rest = p.parse_known_args(argv)
    if a.feedback is None:
        raise BaselineError("--feedback is required (oracle, sim:P, format, local:DIR or http:NAME)")
    if not (math.isfinite(a.beta) and a.beta > 0):
        raise BaselineError(f"--beta must be > 0, got {a.beta}")
    if a.samples < 2:
        raise BaselineError(f"--samples must be >= 2 (a pair needs two answers), got {a.samples}")
    if not (a.temperature > 0 and math.isfinite(a.temperature)):
        raise BaselineError(f"--temperature must be > 0 (greedy answers are all identical), got {a.temperature}")
    if not 0 < a.top_p <= 1 or a.max_new_tokens < 1 or a.gen_batch_size < 1 or a.max_comparisons < 0:
        raise BaselineError("need 0 < --top-p <= 1, --max-new-tokens >= 1, --gen-batch-size >= 1, "
                            "--max-comparisons >= 0")
    if a.sft_adapter and not Path(a.sft_adapter, "adapter_config.json").is_file():
        raise BaselineError(f"--sft-adapter {a.sft_adapter}: no adapter_config.json there")
    return a, rest


def main(argv=None):
    """Run SFT + DPO end to end; returns the report (also OUT/report.json)."""
    t_start = time.time()
    a, rest = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(a.model, a.data)
    base_argv, targs = training_args(a.model, a.data, rest)
    bad = [f for f, on in (("--method other than sft", targs.method != "sft"), ("--prefilter-keep",
           targs.prefilter_keep < 1), ("--prefilter-scores", targs.prefilter_scores), ("--warmup-data",
           targs.warmup_data), ("--detector loss+gain", targs.detector != "loss"), ("--group-by-length",
           targs.group_by_length)) if on]
    if bad:
        raise BaselineError(f"{bad[0]}: does not apply to DPO (its loss replaces train.py's objective)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = load_conversations(a.data, on_bad_sample=targs.on_bad_sample)
    targets = label_positions(convs)
    if not targets:
        raise BaselineError(f"--data {a.data}: no trained assistant turn")
    feedback = Feedback(make(a.feedback, targs.seed, str(out)))
    check_references(convs, targets, feedback, a.data)
    template = ChatTemplate.from_pretrained(a.model, name=targs.chat_template)
    compute = new_compute()
    if a.sft_adapter:
        sft_adapter, net = Path(a.sft_adapter), load(a.model, a.sft_adapter, device=device())[0]
    else:
        sft_adapter, net = out / "sft" / "adapter", train_run(base_argv, a.data, out / "sft", compute, log=log)
    from support.export import export_merged
    merged = export_merged(net, a.model, str(out / "sft-merged"))
    pairs, counts, decisions, samples = sample_pairs(net, template, convs, targets, feedback, a, targs.max_len,
                                                     targs.seed, compute)
    del net  # the SFT model is not needed again: the DPO run loads the merged copy
    gc.collect()
    add_compute(compute, {"comparisons": feedback.queries, "forward_tokens": feedback.forward_tokens})
    log(f"{counts['compared']} pairs compared, {counts['ties']} ties, {counts['pairs']} preference pairs")
    if not pairs:
        raise BaselineError(f"--feedback {a.feedback}: no preference pair (the comparator tied on all "
                            f"{counts['compared']} sampled pairs, or no prompt gave two distinct answers)")
    save_jsonl(pairs, out / "pairs.jsonl")
    dpo_argv = set_flag(base_argv, "--model", merged)
    dpo_argv += [*(("--lr", str(a.dpo_lr)) if a.dpo_lr else ()),
                 *(("--max-steps", str(a.dpo_max_steps)) if a.dpo_max_steps else ())]
    objective = DPOLoss(a.beta)
    train_run(dpo_argv, out / "pairs.jsonl", out / "dpo", compute, objective, log=log)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    stack_adapters(a.model, [sft_adapter, out / "dpo" / "adapter"], out / "adapter")
    refs = list(sample_correct(samples, convs))
    h = objective.history
    report = {"method": "dpo", "feedback": a.feedback, "model": a.model, "data": a.data, "beta": a.beta,
              "samples": a.samples, "temperature": a.temperature, **counts,
              "label_accuracy": None if label_accuracy(convs) is None else [label_accuracy(convs)],
              "sample_accuracy": sum(refs) / len(refs) if refs else None,
              "comparator": realized_accuracy(decisions),
              "training": {"micro_batches": len(h), "loss_first": h[0]["loss"], "loss_last": h[-1]["loss"],
                           "reward_accuracy_last": h[-1]["reward_accuracy"], "margin_last": h[-1]["margin"]}
              if h else None,
              "compute": compute, "sft_adapter": str(sft_adapter), "reference_model": merged,
              "adapter": str(out / "adapter"), "seconds": round(time.time() - t_start, 1)}
    write_json(report, out / "report.json")
    log(f"done in {report['seconds']:.0f} s: adapter {out / 'adapter'} (on {a.model}), report {out / 'report.json'}")
    return report


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
