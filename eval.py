"""Evaluation: per-turn loss, multi-turn generation in FastChat's answer format, exact-match accuracy, Spearman.

    python eval.py loss     --model M [--adapter A] --data convs.jsonl [--out loss.json]
    python eval.py generate --model M [--adapter A] --questions question.jsonl --out answers.jsonl
    python eval.py accuracy --model M [--adapter A] --data test.jsonl
    python eval.py spearman --x 1,2,3,1,2,3 --y 6.1,5.8,5.2,6.0,5.9,5.0
    python scripts/judge.py ...   (LLM judges, see its --help)

An answer file line: {"question_id": 81, "answer_id": "..", "model_id": "m", "choices": [{"index": 0, "turns":
[".."]}], "tstamp": 1700000000.0}. Errors are one line on stderr: exit code 2 for bad input, 1 when a judge fails.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from data import ChatTemplate, build_examples, collate
from support.conversations import BadSample, iter_json_records, load_conversations, save_jsonl
from lora import load_adapter, merge_lora
from model import Transformer, generate
from support.cli import UsageError as EvalError, check_paths


def read_jsonl(path):
    """(where, object) for each record of a .jsonl file (or a JSON array; .gz too), read as data.py reads them."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    rows = []
    for where, obj in iter_json_records(path):
        if isinstance(obj, BadSample):
            raise EvalError(f"{where}: invalid JSON ({obj.detail})")
        if not isinstance(obj, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, obj))
    return rows


def load(model_dir, adapter=None, dtype="float32", device="cpu", chat_template=None):
    """model.py Transformer (+ LoRA adapter, merged for speed) and data.py ChatTemplate, ready for inference."""
    if not os.path.isdir(model_dir):
        raise EvalError(f"--model {model_dir}: not a folder")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)  # train.py's names too
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if adapter:
        merge_lora(load_adapter(model, adapter))
    return model.eval(), ChatTemplate.from_pretrained(model_dir, name=chat_template)


# --- per-turn loss ---
@torch.no_grad()
def per_turn_loss(model, examples, batch_size=8, pad_id=0, max_turn_groups=None):
    """Mean token loss, token count and perplexity per turn depth (assistant turn 1..N) and overall, over tokens:
    a supervised token belongs to depth turn_ids[t], capped at max_turn_groups when given (as turn groups are)."""
    sums, counts, dev, was_training = {}, {}, next(model.parameters()).device, model.training
    model.eval()  # no LoRA dropout
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        ids, labels, tids = b["input_ids"].to(dev), b["labels"].to(dev), b["turn_ids"].to(dev)
        tok = model.token_losses(ids, labels, b["attention_mask"].to(dev)).double()
        sup = labels != -100
        depth = tids.clamp(max=max_turn_groups) if max_turn_groups else tids
        for d in torch.unique(depth[sup]).tolist():
            m = sup & (depth == d)
            sums[d] = sums.get(d, 0.0) + tok[m].sum().item()
            counts[d] = counts.get(d, 0) + int(m.sum())
    model.train(was_training)

    def row(s, n):
        return {"loss": s / n if n else float("nan"), "tokens": n, "ppl": math.exp(s / n) if n else float("nan")}
    return {"per_turn": {d: row(sums[d], counts[d]) for d in sorted(sums)},
            "overall": row(sum(sums.values()), sum(counts.values()))}


# --- generation ---
@torch.no_grad()
def generate_texts(model, template, prompts, batch_size=8, max_new_tokens=256, temperature=0.0, top_p=1.0,
                   seed=None):
    """Decoded completions of token-id prompts, batched by similar length (model.generate pads on the left and
    stops each row at its first stop id). Returns (texts, number of new tokens)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts, n_new = [None] * len(prompts), 0
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        outs = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, stop_ids=tuple(template.stop_ids), pad_id=template.pad_id,
                        seed=None if seed is None else seed + j)
        for i, out in zip(idx, outs):
            n_new += len(out)
            texts[i] = template.decode(out).strip()
    return texts, n_new


def read_questions(path):
    """MT-Bench questions ({"question_id", "category", "turns": [user messages], "reference"?}), or a conversation
    file (data.py formats): then the question is the user turn before the final assistant turn (or the last message,
    when that is a user's), with the dialogue before it as "context"."""
    rows, seen, out = read_jsonl(path), set(), []
    if rows and "turns" in rows[0][1]:
        for where, q in rows:
            t = q.get("turns")
            if "question_id" not in q or not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
                raise EvalError(f"{where}: a question needs question_id and turns, a non-empty list of strings")
            out.append({"category": "", "context": [], **q})
    else:
        for i, c in enumerate(load_conversations(path)):
            msgs = c["messages"]
            end = len(msgs) if msgs[-1]["role"] == "user" else \
                max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            out.append({"question_id": c.get("id", i), "category": c.get("category", "dialogue"),
                        "turns": [msgs[end - 1]["content"]], "context": msgs[:end - 1]})
    for i, q in enumerate(out):
        qid, where = q["question_id"], rows[i][0] if len(rows) == len(out) else path
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise EvalError(f"{where}: question_id {qid!r} is not an integer or a string")
        if qid in seen:
            raise EvalError(f"{where}: question_id {qid!r} is repeated")
        seen.add(qid)
    return out


def answer_record(question_id, model_id, turns):
    """One FastChat model-answer line; answer_id is a hash of its content, so reruns give the same ids."""
    h = hashlib.sha256(json.dumps([question_id, model_id, turns]).encode()).hexdigest()[:22]
    return {"question_id": question_id, "answer_id": h, "model_id": model_id,
            "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}


def generate_answers(model, template, questions, model_id, batch_size=8, max_new_tokens=256, temperature=0.0,
                     top_p=1.0, seed=None):
    """Multi-turn answers: turn k of every question is asked with the model's OWN answers to turns < k in context.
    All questions' k-th turns are generated together. Returns (FastChat answer records, stats with tokens/s)."""
    answers = [[] for _ in questions]
    t0, n_new = time.perf_counter(), 0
    for k in range(max((len(q["turns"]) for q in questions), default=0)):
        todo = [i for i, q in enumerate(questions) if k < len(q["turns"])]
        prompts = []
        for i in todo:
            msgs = list(questions[i].get("context", []))
            for u, a in zip(questions[i]["turns"][:k], answers[i]):
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            prompts.append(template.encode_prompt(msgs + [{"role": "user", "content": questions[i]["turns"][k]}]))
        texts, n = generate_texts(model, template, prompts, batch_size, max_new_tokens, temperature, top_p, seed)
        n_new += n
        for i, t in zip(todo, texts):
            answers[i].append(t)
    dt = time.perf_counter() - t0
    records = [answer_record(q["question_id"], model_id, a) for q, a in zip(questions, answers)]
    return records, {"new_tokens": n_new, "seconds": dt, "tokens_per_s": n_new / dt if dt > 0 else float("nan")}


def answer_file(model, template, questions, model_id, out, args):
    """eval.generate_answers batch_size questions at a time, OUT rewritten (whole, atomically) after each batch: a
    rerun keeps the answers OUT holds for this model and continues with the same seeds, so the same answers; answers
    to questions not asked this time stay."""
    done = {r.get("question_id"): r for _, r in (read_jsonl(out) if os.path.exists(out) else ())}
    if any(r.get("model_id") != model_id or i is None for i, r in done.items()):
        raise EvalError(f"{out}: holds records that are not answers of model_id {model_id!r}; give another --out")
    order = {q["question_id"]: n for n, q in enumerate(questions)}
    if done:
        print(f"{out}: {len(order.keys() & done.keys())} of {len(order)} questions answered already, continuing")
    new, sec = 0, 0.0
    for j in range(0, len(questions), args.batch_size):
        part = [q for q in questions[j:j + args.batch_size] if q["question_id"] not in done]
        if not part:  # this batch was answered before: nothing to generate or write
            continue
        recs, st = generate_answers(model, template, part, model_id, args.batch_size, args.max_new_tokens,
                                    args.temperature, args.top_p, None if args.seed is None else args.seed + j)
        done.update((r["question_id"], r) for r in recs)
        new, sec = new + st["new_tokens"], sec + st["seconds"]
        save_jsonl(sorted(done.values(), key=lambda r: order.get(r["question_id"], len(order))), out)
    print(f"{len(questions)} answers -> {out}: {new} new tokens in {sec:.1f}s ({new / max(sec, 1e-9):.1f} tokens/s)")


# --- exact-match accuracy on the synthetic benchmark ---
def normalize_answer(text):
    """Canonical form for exact match: trimmed, lower case, no trailing period, single spaces, ", " separators."""
    t = " ".join(str(text).strip().lower().split()).rstrip(".").strip()
    return ", ".join(p.strip() for p in t.split(","))


def answer_matches(pred, ref):
    return normalize_answer(pred) == normalize_answer(ref)



def accuracy(model, template, conversations, batch_size=8, max_new_tokens=32, max_turn_groups=None):
    """Exact-match accuracy (answer_matches) per turn depth and overall, greedy. Turn k is predicted with the
    REFERENCE earlier answers in context (teacher-forced history), so each depth measures that turn alone. A turn's
    reference is its "reference" field when present (support/synth.py writes the truth there), else its content."""
    prompts, refs, depths = [], [], []
    for c in conversations:
        msgs = [dict(m, content=m.get("reference", m["content"])) if m["role"] == "assistant" else m
                for m in c["messages"]]
        k = 0
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                k += 1
                prompts.append(template.encode_prompt(msgs[:i]))
                refs.append(m["content"])
                depths.append(min(k, max_turn_groups) if max_turn_groups else k)
    preds, _ = generate_texts(model, template, prompts, batch_size, max_new_tokens)
    per = {}
    for d, p, r in zip(depths, preds, refs):
        c = per.setdefault(d, [0, 0])
        c[0] += bool(answer_matches(p, r))
        c[1] += 1
    correct, total = sum(c[0] for c in per.values()), sum(c[1] for c in per.values())
    return {"overall": correct / total if total else float("nan"), "correct": correct, "total": total,
            "per_turn": {d: {"accuracy": c[0] / c[1], "correct": c[0], "total": c[1]} for d, c in sorted(per.items())}}


# --- Spearman (Table 4 analogue), numpy only ---
def rankdata(a):
    """Ranks 1..n, ties get the mean of the ranks they span (scipy's 'average')."""
    _, inverse, counts = np.unique(np.asarray(a, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                        # the rank of each distinct value's last copy
    return ((last - counts + 1 + last) / 2.0)[inverse]


def spearman(x, y):
    """Spearman's rho: Pearson correlation of the average ranks (nan when either side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise EvalError(f"spearman needs two 1-D sequences of the same length >= 2, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise EvalError("spearman: values must be finite numbers")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    den = math.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


# --- command line ---
def _numbers(s, flag):
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{flag} {s!r}: expected comma-separated numbers") from None


def _emit(res, out):
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


RANGES = dict(batch_size=(1, 0, 1e6), max_new_tokens=(1, 0, 1e6), temperature=(0, 0, 1e6), top_p=(0, 1, 1),
              max_len=(2, 0, 1e9), max_turn_groups=(1, 0, 1e9), seed=(0, 0, 2**32 - 1))  # (low, low excluded, high)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cmd = {c: sub.add_parser(c).add_argument for c in ("loss", "generate", "accuracy", "spearman")}
    for c in ("loss", "generate", "accuracy"):
        add = cmd[c]
        add("--model", required=True, help="Hugging Face folder")
        add("--adapter", help="LoRA adapter folder (PEFT format)")
        add("--chat-template", help="force a template name (see data.py)")
        add("--batch-size", type=int, default=8)
        add("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"])
        add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        add("--out", help="output file (generate: answers .jsonl; others: results .json)")
    for c in ("loss", "accuracy"):
        cmd[c]("--data", required=True, help="conversations (loss) or support/synth.py's test.jsonl (accuracy)")
        cmd[c]("--on-bad-sample", choices=["error", "skip"], default="error")
    cmd["loss"]("--max-len", type=int, default=2048)
    cmd["loss"]("--max-turn-groups", type=int, default=None, help="cap the turn depth (default: none)")
    cmd["accuracy"]("--max-new-tokens", type=int, default=32)
    add = cmd["generate"]
    add("--questions", required=True, help="MT-Bench question.jsonl or a conversation file")
    add("--model-id", help="model_id in the answer file (default: model folder name, + adapter name)")
    add("--max-new-tokens", type=int, default=512)
    add("--temperature", type=float, default=0.0)
    add("--top-p", type=float, default=1.0)
    add("--seed", type=int, default=None)
    cmd["spearman"]("--x", required=True, help="settings as ordinal numbers, e.g. 1,2,3 for H, H+N, H+N+L")
    cmd["spearman"]("--y", required=True, help="scores, same length")
    args = p.parse_args(argv)
    for k, (lo, strict, hi) in RANGES.items():
        v = getattr(args, k, None)
        if v is not None and not (math.isfinite(v) and (v > lo if strict else v >= lo) and v <= hi):
            raise EvalError(f"--{k.replace('_', '-')} must be {'>' if strict else '>='} {lo} and <= {hi:g}, got {v}")
    if args.cmd != "spearman":
        check_paths(args.device, args.out, (getattr(args, "data", None), getattr(args, "questions", None)))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cmd == "spearman":
        return print(json.dumps({"spearman": spearman(_numbers(args.x, "--x"), _numbers(args.y, "--y"))}))
    data = read_questions(args.questions) if args.cmd == "generate" else \
        load_conversations(args.data, on_bad_sample=args.on_bad_sample)
    if not data:
        raise EvalError(f"{args.questions if args.cmd == 'generate' else args.data}: nothing to evaluate")
    model, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    if args.cmd == "generate":
        model_id = args.model_id or "-".join(os.path.basename(os.path.normpath(d)) for d in (args.model, args.adapter)
                                             if d)
        out = args.out or re.sub(r"[^\w.-]", "_", model_id) + ".jsonl"  # a model id is a name, not a path
        return answer_file(model, template, data, model_id, out, args)
    if args.cmd == "accuracy":
        res = accuracy(model, template, data, args.batch_size, args.max_new_tokens)
        for d, r in list(res["per_turn"].items()) + [("all", {"accuracy": res["overall"], **res})]:
            print(f"turn {d:>3}  exact match {r['accuracy']:.3f}  ({r['correct']}/{r['total']})")
        return _emit(res, args.out)
    examples, report = build_examples(data, template, args.max_len, args.max_turn_groups)
    print(f"data: {report.summary()}")
    if not examples:
        raise EvalError(f"{args.data}: nothing to evaluate ({report.summary()})")
    res = per_turn_loss(model, examples, args.batch_size, template.pad_id, args.max_turn_groups)
    for d, r in list(res["per_turn"].items()) + [("all", res["overall"])]:
        print(f"turn {d:>3}  loss {r['loss']:.4f}  ppl {r['ppl']:10.3f}  tokens {r['tokens']}")
    _emit(res, args.out)


def cli(argv=None):
    """main() with failures reported in one line: exit code 2 for bad input, 1 when the judge backend fails."""
    try:
        main(argv)
        return 0
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        print(f"eval.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("eval.py: interrupted (generate and judge keep what they wrote; the same command continues)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
