"""Evaluation: per-turn loss, multi-turn answers in FastChat's format, exact match, Spearman's rho.
Each is a function and a subcommand:

    python eval.py loss     --model M [--adapter A] --data convs.jsonl [--out loss.json]
    python eval.py generate --model M [--adapter A] --questions question.jsonl [--out answers.jsonl]
    python eval.py accuracy --model M [--adapter A] --data test.jsonl
    python eval.py spearman --x 1,2,3,1,2,3 --y 6.1,5.8,5.2,6.0,5.9,5.0
    python scripts/judge.py ...   (LLM judges on answer files, see its --help)

Reading order: load, per_turn_loss, generation (generate_texts, question files,
generate_answers), accuracy, spearman, the command line. `generate` keeps its answers in a
resumable answer file (support/answers.py): a rerun continues only answers of the same producer,
and the default file name carries a short hash of the producer.
Errors are one line on stderr: exit code 2 for bad input, 130 on Ctrl-C.
"""
import argparse
import hashlib
import json
import math
import os
import re
import reprlib
import sys
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch

from data import ChatTemplate, build_examples, collate
from lora import load_adapter, merge_lora
from model import Transformer, generate
from support.answers import Producer, answer_file, conversation_question, file_question
from support.answers import file_sha256, read_objects
from support.cli import UsageError, check_paths, num, run_main
from support.conversations import load_conversations


class EvalError(UsageError):
    """Bad input to an evaluation: a missing or malformed file or field; the message is one line."""


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.py's names for them


def load(model_dir, adapter=None, dtype="float32", device="cpu", chat_template=None):
    """model.py Transformer (+ LoRA adapter, merged for speed) and data.py ChatTemplate."""
    if not os.path.isdir(model_dir):
        raise EvalError(f"--model {model_dir}: not a folder")
    dtype = getattr(torch, DTYPES.get(dtype, dtype))
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter:
        merge_lora(load_adapter(model, adapter))
    template = ChatTemplate.from_pretrained(model_dir, name=chat_template)
    return model.eval(), template


# --- per-turn loss ---
@torch.no_grad()
def per_turn_loss(model, examples, batch_size=8, pad_id=0, max_turn_groups=None):
    """Mean token loss, token count and perplexity per turn depth (assistant turn 1..N) and overall;
    a depth is capped at max_turn_groups when given, as turn groups are."""
    sums = defaultdict(float)
    counts = defaultdict(int)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no LoRA dropout
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        losses = model.token_losses(ids, labels, batch["attention_mask"].to(device)).double()
        supervised = labels != -100
        depth = batch["turn_ids"].to(device)
        if max_turn_groups:
            depth = depth.clamp(max=max_turn_groups)
        for d in torch.unique(depth[supervised]).tolist():
            here = supervised & (depth == d)
            sums[d] += losses[here].sum().item()
            counts[d] += int(here.sum())
    model.train(was_training)
    per_turn = {d: loss_row(sums[d], counts[d]) for d in sorted(sums)}
    overall = loss_row(sum(sums.values()), sum(counts.values()))
    return {"per_turn": per_turn, "overall": overall}


def loss_row(total, tokens):
    """Mean loss, token count and perplexity of `tokens` tokens whose losses add up to `total`."""
    if tokens == 0:
        return {"loss": float("nan"), "tokens": 0, "ppl": float("nan")}
    mean = total / tokens
    return {"loss": mean, "tokens": tokens, "ppl": math.exp(mean)}


# --- generation ---
def shifted(seed, offset):
    """The seed of a batch that starts at `offset`; None (unseeded) stays None."""
    if seed is None:
        return None
    return seed + offset


@torch.no_grad()
def generate_texts(model, template, prompts, batch_size=8, max_new_tokens=256, temperature=0.0,
                   top_p=1.0, seed=None):
    """Decoded completions of token-id prompts, batched longest first (model.generate pads on the
    left and stops each row at its first stop id). Returns (texts, number of new tokens)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [None] * len(prompts)
    new_tokens = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        outs = generate(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_ids=tuple(template.stop_ids),
                        pad_id=template.pad_id, seed=shifted(seed, start))
        for i, out in zip(rows, outs):
            new_tokens += len(out)
            texts[i] = template.decode(out).strip()
    return texts, new_tokens


def read_jsonl(path):
    """(where, object) for each record of a .jsonl file (or a JSON array; .gz too); a missing file,
    bad JSON or a record that is not a JSON object is refused."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    return read_objects(path, EvalError)


def read_questions(path):
    """MT-Bench questions ({"question_id", "category", "turns": [user messages], "reference"?}), or
    a conversation file (data.py formats), one question per conversation (conversation_question)."""
    rows = read_jsonl(path)
    questions = []
    seen = set()
    question_file = bool(rows) and "turns" in rows[0][1]
    for index, (where, record) in enumerate(rows):
        if question_file:
            question = file_question(where, record, EvalError)
        else:
            question = conversation_question(where, record, index, EvalError)
        qid = question["question_id"]
        if qid in seen:
            raise EvalError(f"{where}: question_id {reprlib.repr(qid)} is repeated")
        seen.add(qid)
        questions.append(question)
    return questions


def answer_record(question_id, model_id, turns):
    """One FastChat model-answer line; answer_id hashes its content, so reruns give the same ids."""
    content = json.dumps([question_id, model_id, turns]).encode()
    answer_id = hashlib.sha256(content).hexdigest()[:22]
    return {"question_id": question_id, "answer_id": answer_id, "model_id": model_id,
            "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}


def dialogue(question, answers, k):
    """The messages that ask turn k of a question: its context, its turns before k each followed by
    the model's own answer, then turn k."""
    messages = list(question.get("context", []))
    for user, answer in zip(question["turns"][:k], answers):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": question["turns"][k]})
    return messages


def generate_answers(model, template, questions, model_id, batch_size=8, max_new_tokens=256,
                     temperature=0.0, top_p=1.0, seed=None):
    """(FastChat answer records, stats): turn k of every question is asked with the model's OWN
    answers to turns < k in context; all questions' k-th turns are generated together."""
    answers = [[] for _ in questions]
    new_tokens = 0
    started = time.perf_counter()
    for k in range(max((len(q["turns"]) for q in questions), default=0)):
        asked = [i for i, q in enumerate(questions) if k < len(q["turns"])]
        prompts = [template.encode_prompt(dialogue(questions[i], answers[i], k)) for i in asked]
        texts, n = generate_texts(model, template, prompts, batch_size, max_new_tokens, temperature,
                                  top_p, seed)
        new_tokens += n
        for i, text in zip(asked, texts):
            answers[i].append(text)
    seconds = time.perf_counter() - started
    records = [answer_record(q["question_id"], model_id, a) for q, a in zip(questions, answers)]
    rate = new_tokens / seconds if seconds > 0 else float("nan")
    return records, {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": rate}


# --- exact-match accuracy on the synthetic benchmark ---
def normalize_answer(text):
    """Canonical form for exact match: lower case, single spaces, no final period, ", " between."""
    text = " ".join(str(text).strip().lower().split()).rstrip(".").strip()
    return ", ".join(part.strip() for part in text.split(","))


def answer_matches(pred, ref):
    return normalize_answer(pred) == normalize_answer(ref)


def with_references(messages):
    """The messages, each assistant's content replaced by its "reference" (the truth) if any."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and "reference" in m:
            m = dict(m, content=m["reference"])
        out.append(m)
    return out


def check_references(path, conversations):
    """Every "reference" is non-blank (support/conversations.py checks that it is a string)."""
    for n, conversation in enumerate(conversations, 1):
        for i, m in enumerate(conversation["messages"]):
            if "reference" in m and not m["reference"].strip():
                raise EvalError(f"{path}: conversation {n}, message {i}: reference is "
                                f"{reprlib.repr(m['reference'])}, expected a non-blank string")


def accuracy(model, template, conversations, batch_size=8, max_new_tokens=32, max_turn_groups=None):
    """Greedy exact-match accuracy per turn depth and overall. Turn k is predicted with the
    REFERENCE earlier answers in context, so each depth measures that turn alone; a turn's
    reference is its "reference" field (support/synth.py writes the truth there), else content."""
    cap = max_turn_groups or math.inf
    prompts = []
    refs = []
    depths = []
    for conversation in conversations:
        messages = with_references(conversation["messages"])
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for depth, i in enumerate(replies, 1):
            prompts.append(template.encode_prompt(messages[:i]))
            refs.append(messages[i]["content"])
            depths.append(min(depth, cap))
    preds, _ = generate_texts(model, template, prompts, batch_size, max_new_tokens)
    correct = defaultdict(int)
    total = defaultdict(int)
    for depth, pred, ref in zip(depths, preds, refs):
        correct[depth] += answer_matches(pred, ref)
        total[depth] += 1
    per_turn = {d: {"accuracy": correct[d] / total[d], "correct": correct[d], "total": total[d]}
                for d in sorted(total)}
    n_correct = sum(correct.values())
    n_total = sum(total.values())
    overall = n_correct / n_total if n_total else float("nan")
    return {"overall": overall, "correct": n_correct, "total": n_total, "per_turn": per_turn}


# --- Spearman (Table 4 analogue), numpy only ---
def rankdata(a):
    """Ranks 1..n, ties get the mean of the ranks they span (scipy's 'average')."""
    values = np.asarray(a, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last copy
    first = last - counts + 1
    return ((first + last) / 2.0)[inverse]


def spearman(x, y):
    """Spearman's rho: Pearson correlation of the average ranks (nan when a side is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise EvalError(f"spearman needs two 1-D sequences of the same length >= 2, got {x.shape} "
                        f"and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise EvalError("spearman: values must be finite numbers")
    rx = rankdata(x) - (len(x) + 1) / 2  # centred ranks
    ry = rankdata(y) - (len(y) + 1) / 2
    spread = math.sqrt((rx @ rx) * (ry @ ry))
    if spread == 0:
        return float("nan")
    return float(rx @ ry / spread)


# --- command line ---
def numbers(text, flag):
    """The comma-separated numbers of a flag; an empty or non-numeric value is refused by its
    position, so that no value is dropped and the rest paired with the wrong partners."""
    values = []
    for position, item in enumerate(text.split(","), 1):
        if not item.strip():
            raise EvalError(f"{flag} {text!r}: value {position} is empty")
        try:
            values.append(float(item))
        except ValueError:
            message = f"{flag} {text!r}: value {position} ({item.strip()!r}) is not a number"
            raise EvalError(message) from None
    return values


class Parser(argparse.ArgumentParser):
    """argparse whose errors are EvalErrors: one line, no usage block."""

    def error(self, message):
        raise EvalError(f"{message} (see --help)")


COUNT = num(int, 1, 10**6, hi_ok=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    p = Parser(prog="eval.py", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="cmd", required=True)
    names = ("loss", "generate", "accuracy", "spearman")
    parsers = {name: commands.add_parser(name) for name in names}
    for name in ("loss", "generate", "accuracy"):
        add = parsers[name].add_argument
        add("--model", required=True, help="Hugging Face folder")
        add("--adapter", help="LoRA adapter folder (PEFT format)")
        add("--chat-template", help="force a template name (see data.py)")
        add("--batch-size", type=COUNT, default=8)
        add("--dtype", default="float32", choices=["float32", "bfloat16", "float16", *DTYPES])
        add("--device", default=DEVICE)
        add("--out", help="output file (generate: answers .jsonl; others: results .json)")
    for name in ("loss", "accuracy"):
        add = parsers[name].add_argument
        add("--data", required=True, help="conversations (loss) or support/synth.py's test.jsonl")
        add("--on-bad-sample", choices=["error", "skip"], default="error")
    add = parsers["loss"].add_argument
    add("--max-len", type=num(int, 2, 10**9, hi_ok=True), default=2048)
    add("--max-turn-groups", type=num(int, 1, 10**9, hi_ok=True), help="cap the turn depth")
    parsers["accuracy"].add_argument("--max-new-tokens", type=COUNT, default=32)
    add = parsers["generate"].add_argument
    add("--questions", required=True, help="MT-Bench question.jsonl or a conversation file")
    add("--model-id", help="model_id in the answer file (default: model + adapter folder names)")
    add("--max-new-tokens", type=COUNT, default=512)
    add("--temperature", type=num(float, 0), default=0.0)
    add("--top-p", type=num(float, 0, 1, lo_ok=False, hi_ok=True), default=1.0)
    add("--seed", type=num(int, 0, 2**32 - 1, hi_ok=True), default=None)
    add = parsers["spearman"].add_argument
    add("--x", required=True, help="settings as ordinal numbers, e.g. 1,2,3 for H, H+N, H+N+L")
    add("--y", required=True, help="scores, same length")
    args = p.parse_args(argv)
    if args.cmd != "spearman":
        inputs = (getattr(args, "data", None), getattr(args, "questions", None))
        check_paths(args.device, args.out, inputs)
    return args


def emit(result, out):
    """Print the result as JSON, and write it to OUT when given."""
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


def run_loss(args):
    conversations = load_conversations(args.data, on_bad_sample=args.on_bad_sample)
    if not conversations:
        raise EvalError(f"{args.data}: nothing to evaluate")
    model, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    examples, report = build_examples(conversations, template, args.max_len, args.max_turn_groups)
    print(f"data: {report.summary()}")
    if not examples:
        raise EvalError(f"{args.data}: nothing to evaluate ({report.summary()})")
    result = per_turn_loss(model, examples, args.batch_size, template.pad_id, args.max_turn_groups)
    for depth, row in [*result["per_turn"].items(), ("all", result["overall"])]:
        print(f"turn {depth:>3}  loss {row['loss']:.4f}  ppl {row['ppl']:10.3f}  "
              f"tokens {row['tokens']}")
    emit(result, args.out)


def run_accuracy(args):
    conversations = load_conversations(args.data, on_bad_sample=args.on_bad_sample)
    if not conversations:
        raise EvalError(f"{args.data}: nothing to evaluate")
    check_references(args.data, conversations)
    model, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    result = accuracy(model, template, conversations, args.batch_size, args.max_new_tokens)
    overall = dict(result, accuracy=result["overall"])
    for depth, row in [*result["per_turn"].items(), ("all", overall)]:
        counts = f"{row['correct']}/{row['total']}"
        print(f"turn {depth:>3}  exact match {row['accuracy']:.3f}  ({counts})")
    emit(result, args.out)


def run_generate(args):
    questions = read_questions(args.questions)
    if not questions:
        raise EvalError(f"{args.questions}: nothing to evaluate")
    model, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    folders = [args.model]
    adapter_sha256 = None
    if args.adapter:
        folders.append(args.adapter)
        adapter_sha256 = file_sha256(os.path.join(args.adapter, "adapter_model.safetensors"))
    model_id = args.model_id or "-".join(os.path.basename(os.path.normpath(d)) for d in folders)
    producer = Producer(model_id=model_id, base_fingerprint=model.fingerprint,
                        adapter_sha256=adapter_sha256, chat_template=template.name,
                        dtype=DTYPES.get(args.dtype, args.dtype), batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    name = re.sub(r"[^\w.-]", "_", model_id)  # a model id is a name, not a path
    out = args.out or f"{name}-{producer.short_hash()}.jsonl"  # two producers never share a file

    def answer(batch, start):
        """The batch that starts at question `start`, seeded by that place: a rerun repeats it."""
        return generate_answers(model, template, batch, model_id, args.batch_size,
                                args.max_new_tokens, args.temperature, args.top_p,
                                shifted(args.seed, start))
    answer_file(questions, out, producer, answer)


def run_spearman(args):
    print(json.dumps({"spearman": spearman(numbers(args.x, "--x"), numbers(args.y, "--y"))}))


COMMANDS = {"loss": run_loss, "generate": run_generate, "accuracy": run_accuracy,
            "spearman": run_spearman}


def main(argv=None):
    """One subcommand; bad input raises an EvalError (or another one-line ValueError)."""
    args = parse_args(argv)
    COMMANDS[args.cmd](args)


def cli(argv=None):
    """main() with failures reported in one line; exit code 2 for bad input, 130 on Ctrl-C."""
    interrupted = "interrupted (generate keeps the answers it wrote; the same command continues)"
    return run_main(partial(main, argv), "eval.py", interrupted)


if __name__ == "__main__":
    sys.exit(cli())
