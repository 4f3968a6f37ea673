"""RobustFT (arXiv 2412.14922) as a baseline: repair a noisy SFT set before training, then fine-tune with the core.

    python baselines/robustft.py --model DIR --data train.jsonl --out runs/robustft --k 3 --keep 0.5 \\
        --reflect 4 [--detector base|crossfit] [training flags as in train.py]

The unit is one assistant turn; its query is the dialogue before it, with the dialogue's own earlier turns as they
are labelled. Every step runs the model being fine-tuned (model.py), greedy:
  1. base prediction y^ = M(q) (Eq. 1), and a reasoning-enhanced prediction (Eq. 2): --reflect n generations, the
     first reasons step by step, each later one reflects on the one before and answers again; the answer is the
     line after "Answer:".
  2. Checker (Eq. 3): a turn is clean when both predictions match its label (eval.answer_matches, as the authors'
     code checks); the rest is the potential-noise set.
  3. For each potentially noisy turn, the --k clean turns of other dialogues whose queries are nearest by cosine
     similarity of the model's own mean-pooled final hidden states (Eq. 4) go into the prompt as examples, and the
     model answers again: y^cont (Eq. 5).
  4. Review (Eq. 6): the model, shown the reasoning and the context answers, gives the new label.
  5. Selection (Eqs. 7-8): the mean negative log-probability of y^cont under the model that wrote it; the lowest
     --keep fraction of the potential-noise set keeps its new label, the rest stays as context with "train": false.
  6. Fine-tuning (Eq. 9) on the clean turns plus the selected relabels: train.main on OUT/train.jsonl
     (--method sft unless given), the training flags passed through.
--detector base runs all of this literally with the base model. --detector crossfit (a deviation, not the paper):
the dialogues are split in two halves, a model is fine-tuned on each half with the same training flags, and every
step for a turn (1-2 and 4-5) is run by the model fine-tuned on the other half; retrieval keeps the base encoder.

Writes in OUT:
  train.jsonl      the refined conversations: a selected turn has the new label as content and "original_content",
                   "robustft": "relabeled" (its noise labels, where the data has a reference, re-derived from it);
                   a dropped turn has "train": false and "robustft": "dropped"; everything else is unchanged
  refine.json      the settings, one record per checked turn (predictions, neighbours, entropy, decision) and the
                   refinement's compute; a rerun with the same settings reuses it
  half-0.jsonl, half-1.jsonl, crossfit-0/, crossfit-1/   (crossfit) the halves and their train.py runs
  final/           the train.py run on train.jsonl; adapter/ is a copy of final/adapter (PEFT format, eval.py reads it)
  report.json      turns, clean, detected, relabeled (a non-empty new label), selected, dropped; where the data has
                   noise labels: precision, recall (of detection against "noisy") and recall_by_type; where it has
                   references: relabel_accuracy (relabeled turns), selected_accuracy, label_accuracy (supervised turns
                   of train.jsonl), original_label_accuracy (supervised turns of --data), prediction_accuracy (base,
                   reasoning, context, review); "compute" with integer keys trainings, optimizer_steps, train_tokens
                   (tokens of every training batch), generated_tokens, forward_tokens (prompt tokens read by
                   generation, encoder and entropy-scoring tokens), comparisons (always 0); "training" (train.py's
                   report, without its per-unit list), "wall_s" (seconds of the refinement, the halves' trainings
                   included, and of the final training). None where a quantity has nothing to count.
main(argv) -> that report dict. Single process only (no torchrun). Bad input: one line on stderr, exit 2.
The references of the data are read only for the report, never by the method.
"""
import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import baselines  # noqa: E402
import train  # noqa: E402
from data import collate  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from eval import answer_matches, generate_texts, load  # noqa: E402

REASON = ("{question}\n\nThink step by step about the conversation so far, then give your final reply on its own "
          "last line, starting with \"Answer: \".")
REFLECT = ("Reflect on your reasoning above: check every step against the conversation and correct any mistake. "
           "Then give your final reply on its own last line, starting with \"Answer: \".")
CONTEXT = ("Here are examples of conversations and their correct replies.\n\n{examples}Reply to the following "
           "message in the same way.\n\n{question}")
REVIEW = ("{question}\n\nTwo replies to this message were proposed.\n1. Reasoning-enhanced reply: {reasoning}\n"
          "2. Context-enhanced reply: {context}\nReview them and give the correct reply on its own last line, "
          "starting with \"Answer: \".")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class RobustFTError(ValueError):
    """Bad input or an impossible setting; the message is one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like train.py
        print(f"robustft.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False,
               epilog="Every other flag is a training flag of train.py, passed to each training.")
    add = p.add_argument
    add("--model", required=True, help="Hugging Face folder of the model to fine-tune")
    add("--data", required=True, help="noisy training conversations")
    add("--out", required=True, help="output folder")
    add("--k", type=int, default=3, help="clean examples retrieved per noisy turn (Eq. 4)")
    add("--keep", type=float, default=0.5, help="beta: fraction of the potential-noise set kept, lowest entropy")
    add("--reflect", type=int, default=4, help="n: generations of the reasoning-enhanced prediction (Eq. 2)")
    add("--detector", choices=["base", "crossfit"], default="base",
        help="base: the paper, the model itself; crossfit: models fine-tuned on the other half (a deviation)")
    add("--max-new-tokens", type=int, default=32, help="tokens of a base, context or review answer")
    add("--reason-tokens", type=int, default=128, help="tokens of each reasoning or reflection generation")
    add("--gen-batch-size", type=int, default=8)
    args, rest = p.parse_known_args(argv)
    for k, lo in (("k", 1), ("reflect", 1), ("max_new_tokens", 1), ("reason_tokens", 1), ("gen_batch_size", 1)):
        if getattr(args, k) < lo:
            raise RobustFTError(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(args, k)}")
    if not (math.isfinite(args.keep) and 0 < args.keep <= 1):
        raise RobustFTError(f"--keep must be in (0, 1], got {args.keep}")
    rest += [] if any(a == "--method" or a.startswith("--method=") for a in rest) else ["--method", "sft"]
    args.train_flags = rest
    err = io.StringIO()
    try:  # the training flags are checked before any work; train.py's own argparse errors become ours
        with redirect_stderr(err):
            args.train = train.parse_args(["--model", args.model, "--data", args.data, *rest])
    except SystemExit:
        raise RobustFTError("training flags: " + err.getvalue().strip().removeprefix("train.py: error: ")) from None
    if not os.path.isdir(args.model):
        raise RobustFTError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise RobustFTError(f"--data {args.data}: no such file")
    return args


# ---------------------------------------------------------------------------------------------------------------
# the method's pieces, each checked by hand in tests/test_robustft.py

def extract_answer(text):
    """The reply after the last "Answer:" (its first non-empty line), else the last non-empty line before it."""
    def lines(t):
        return [x for x in (y.strip(" \t*\"'`") for y in t.splitlines()) if x]
    hits = list(re.finditer(r"(?i)answer\s*:", text))
    after = lines(text[hits[-1].end():]) if hits else []
    before = lines(text[:hits[-1].start()] if hits else text)
    return after[0] if after else before[-1] if before else ""


def is_reliable(label, base_pred, reasoning_pred):
    """Eq. 3: a label is reliable when both predictions agree with it."""
    return bool(answer_matches(base_pred, label) and answer_matches(reasoning_pred, label))


def nearest(queries, pool, k, query_groups=None, pool_groups=None, chunk=1024):
    """Eq. 4: for each query vector, the indices of its k most cosine-similar pool vectors, most similar first (ties:
    the lower index), never one of the query's own group (here: its dialogue)."""
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float64)), dim=-1)
    p = torch.nn.functional.normalize(torch.as_tensor(np.asarray(pool, dtype=np.float64)), dim=-1)
    out = []
    for a in range(0, len(q), chunk):
        sim = (q[a:a + chunk] @ p.reshape(len(p), -1).T).numpy() if len(p) else np.zeros((len(q[a:a + chunk]), 0))
        if query_groups is not None:
            sim[np.equal.outer(np.asarray(query_groups)[a:a + chunk], np.asarray(pool_groups))] = -np.inf
        for row in sim:
            out.append([int(j) for j in np.argsort(-row, kind="stable")[:k] if np.isfinite(row[j])])
    return out


def select_lowest(entropies, keep):
    """Eq. 8: the floor(keep * n) turns of lowest entropy, in that order (ties: lower index); non-finite never."""
    e = np.asarray(entropies, dtype=np.float64)
    order = [int(i) for i in np.argsort(e, kind="stable") if np.isfinite(e[i])]
    return order[:int(math.floor(keep * len(e) + 1e-9))]


def transcript(messages):
    """A dialogue as plain text, one "Role: content" line block per message (the examples' and encoder's form)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def refine(convs, decisions, references=True):
    """Copies of convs with decisions applied: {(conv, message index): new label} relabels, {(...): None} drops
    (context only). Every other message, and every other field of a changed one, is left as it was."""
    out = []
    for ci, conv in enumerate(convs):
        msgs = list(conv["messages"])
        for i, m in enumerate(msgs):
            if (ci, i) not in decisions:
                continue
            new = decisions[ci, i]
            if new is None:
                msgs[i] = {**m, "train": False, "robustft": "dropped"}
                continue
            m = {**m, "content": new, "original_content": m["content"], "robustft": "relabeled"}
            if references and "reference" in m:  # the noise labels describe the content: re-derived for the report
                m["noisy"] = not answer_matches(new, m["reference"])
                m["noise_type"] = "relabeled" if m["noisy"] else None
            msgs[i] = m
        out.append({**conv, "messages": msgs})
    return out


# ---------------------------------------------------------------------------------------------------------------
# model calls

class Compute(dict):
    def __init__(self):
        super().__init__(trainings=0, optimizer_steps=0, train_tokens=0, generated_tokens=0, forward_tokens=0,
                         comparisons=0)


def answers(net, template, chats, max_new_tokens, batch_size, compute):
    """Greedy replies (stripped text) to chats (message lists ending with a user turn)."""
    prompts = [template.encode_prompt(c) for c in chats]
    if not prompts:
        return []
    texts, n = generate_texts(net, template, prompts, batch_size, max_new_tokens)
    compute["generated_tokens"] += n
    compute["forward_tokens"] += sum(map(len, prompts))
    return texts


def with_question(messages, text):
    """The dialogue before a turn, its last user message replaced by text."""
    return messages[:-1] + [{"role": "user", "content": text}]


def reasoning_answers(net, template, queries, n, args, compute):
    """Eq. 2: n generations, M_Reas(q, M_Refl(M_Reas(q, ...))); returns (final outputs, extracted answers)."""
    first = [with_question(q, REASON.format(question=q[-1]["content"])) for q in queries]
    outs = answers(net, template, first, args.reason_tokens, args.gen_batch_size, compute)
    for _ in range(n - 1):
        chats = [c + [{"role": "assistant", "content": o}, {"role": "user", "content": REFLECT}]
                 for c, o in zip(first, outs)]
        outs = answers(net, template, chats, args.reason_tokens, args.gen_batch_size, compute)
    return outs, [extract_answer(o) for o in outs]


@torch.no_grad()
def embed(net, template, texts, max_len, batch_size, compute):
    """The encoder of Eq. 4: final-normed hidden states mean-pooled over each text's tokens (its last max_len)."""
    dev, out = next(net.parameters()).device, []
    ids = [template.tokenizer.encode(t, add_special_tokens=False).ids[-max_len:] or [template.pad_id] for t in texts]
    compute["forward_tokens"] += sum(map(len, ids))
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        T = max(map(len, chunk))
        x = torch.tensor([r + [template.pad_id] * (T - len(r)) for r in chunk], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], device=dev)
        h = net.hidden_states(x, mask).float()
        out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.config.hidden_size))


@torch.no_grad()
def entropies(net, template, chats, replies, batch_size, compute):
    """Eq. 7: the mean negative log-probability of each reply's tokens (and its end-of-turn token) after its chat;
    inf for an empty reply."""
    dev, out = next(net.parameters()).device, np.full(len(chats), np.inf)
    ok = [i for i, r in enumerate(replies) if r.strip()]
    encs = {i: template.encode([{**m, "train": False} if m["role"] == "assistant" else m for m in chats[i]]
                               + [{"role": "assistant", "content": replies[i]}]) for i in ok}
    compute["forward_tokens"] += sum(len(e["input_ids"]) for e in encs.values())
    ok.sort(key=lambda i: -len(encs[i]["input_ids"]))
    for j in range(0, len(ok), batch_size):
        idx = ok[j:j + batch_size]
        b = collate([encs[i] for i in idx], template.pad_id)
        labels = b["labels"].to(dev)
        tok = net.token_losses(b["input_ids"].to(dev), labels, b["attention_mask"].to(dev)).double()
        sup = (labels != -100).double()
        sup[:, 0] = 0  # token_losses scores nothing at t = 0
        for i, v in zip(idx, ((tok * sup).sum(1) / sup.sum(1).clamp(min=1)).tolist()):
            out[i] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# training through the core, counted

def train_counted(argv, out):
    """train.main(argv) -> (optimizer steps, tokens of every training batch, seconds), saved beside the run."""
    t0 = time.time()
    run = train.main(argv)
    path = os.path.join(out, "train_compute.json")
    if run is None:  # this very run was already finished: what it cost was written then
        if not os.path.isfile(path):
            raise RobustFTError(f"{out}: a finished run without train_compute.json; use another --out")
        c = json.loads(Path(path).read_text())
        return c["optimizer_steps"], c["train_tokens"], c["seconds"]
    steps = run.total
    micro_batches = range(steps * run.args.grad_accum)
    tokens = sum(len(run.examples[i]["input_ids"]) for m in micro_batches for i in run.sampler.indices(m))
    dt = round(time.time() - t0, 1)
    Path(path).write_text(json.dumps({"optimizer_steps": steps, "train_tokens": tokens, "seconds": dt}))
    return steps, tokens, dt


def add_training(compute, counted):
    compute["trainings"] += 1
    compute["optimizer_steps"] += counted[0]
    compute["train_tokens"] += counted[1]
    return counted[2]


# ---------------------------------------------------------------------------------------------------------------
# the pipeline

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings(args):
    t = args.train
    s = dict(model=os.path.abspath(args.model), data_sha256=sha256(args.data), k=args.k, keep=args.keep,
             reflect=args.reflect, detector=args.detector, max_new_tokens=args.max_new_tokens,
             reason_tokens=args.reason_tokens, seed=t.seed, dtype=t.dtype, max_len=t.max_len,
             chat_template=t.chat_template)
    if args.detector == "crossfit":  # the halves' models depend on every training flag
        s["train_flags"] = args.train_flags
    return s


def crossfit_experts(args, convs, compute, log):
    """Fine-tune a model on each half of the dialogues (a deviation from the paper); returns the dialogue -> half
    map and the two adapters, the model of half h being the expert for the other half."""
    if len(convs) < 2:
        raise RobustFTError("--detector crossfit needs at least 2 dialogues")
    perm = np.random.default_rng([args.train.seed, 18]).permutation(len(convs))
    half = np.zeros(len(convs), dtype=int)
    half[perm[len(convs) // 2:]] = 1
    adapters = []
    for h in (0, 1):
        data, out = os.path.join(args.out, f"half-{h}.jsonl"), os.path.join(args.out, f"crossfit-{h}")
        save_jsonl([c for c, g in zip(convs, half) if g == h], data)
        log(f"robustft: crossfit: fine-tuning on half {h} ({int((half == h).sum())} dialogues) -> {out}")
        add_training(compute, train_counted(["--model", args.model, "--data", data, "--out", out,
                                             *args.train_flags], out))
        adapters.append(os.path.join(out, "adapter"))
    return half, adapters


def detect_and_relabel(args, convs, log):
    """Steps 1-5 -> (per-turn records, compute). Each record: conv, msg, turn, label and every model output."""
    compute, t = Compute(), args.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    turns = [dict(conv=ci, msg=i, turn=sum(x["role"] == "assistant" for x in c["messages"][:i + 1]))
             for ci, c in enumerate(convs) for i, m in enumerate(c["messages"])
             if m["role"] == "assistant" and m.get("train", True)]
    if not turns:
        raise RobustFTError(f"{args.data}: no supervised assistant turn to check")
    base, template = load(args.model, None, DTYPES[t.dtype], device, t.chat_template)
    if args.detector == "crossfit":
        half, adapters = crossfit_experts(args, convs, compute, log)
        models = [load(args.model, a, DTYPES[t.dtype], device, t.chat_template)[0] for a in adapters]
        groups = [(models[1 - h], [j for j, r in enumerate(turns) if half[r["conv"]] == h]) for h in (0, 1)]
    else:
        groups = [(base, list(range(len(turns))))]
    for r in turns:
        r["label"] = convs[r["conv"]]["messages"][r["msg"]]["content"]
    query = [convs[r["conv"]]["messages"][:r["msg"]] for r in turns]
    for net, idx in groups:  # Eqs. 1-3
        qs = [query[j] for j in idx]
        base_out = answers(net, template, qs, args.max_new_tokens, args.gen_batch_size, compute)
        _, reas = reasoning_answers(net, template, qs, args.reflect, args, compute)
        for j, b, a in zip(idx, base_out, reas):
            turns[j].update(base=b, reasoning=a, clean=is_reliable(turns[j]["label"], b, a))
    log(f"robustft: checker: {sum(r['clean'] for r in turns)} of {len(turns)} turns clean")
    clean = [j for j, r in enumerate(turns) if r["clean"]]
    noisy = [j for j, r in enumerate(turns) if not r["clean"]]
    vecs = embed(base, template, [transcript(q) for q in query], t.max_len, args.gen_batch_size, compute)
    conv = np.array([r["conv"] for r in turns])
    for j, nb in zip(noisy, nearest(vecs[noisy], vecs[clean], args.k, conv[noisy], conv[clean])):  # Eq. 4
        turns[j]["neighbours"] = [clean[c] for c in nb]
    for net, idx in groups:  # Eqs. 5-7
        idx = [j for j in idx if not turns[j]["clean"]]
        chats = []
        for j in idx:
            ex = "".join(f"Example {e}:\n{transcript(query[c])}\nCorrect reply: {turns[c]['label']}\n\n"
                         for e, c in enumerate(turns[j]["neighbours"], 1))
            chats.append(with_question(query[j], CONTEXT.format(examples=ex, question=query[j][-1]["content"])))
        cont = answers(net, template, chats, args.max_new_tokens, args.gen_batch_size, compute)
        reviews = answers(net, template, [with_question(query[j], REVIEW.format(
            question=query[j][-1]["content"], reasoning=turns[j]["reasoning"], context=c))
            for j, c in zip(idx, cont)], args.max_new_tokens, args.gen_batch_size, compute)
        ent = entropies(net, template, chats, cont, args.gen_batch_size, compute)
        for j, c, rv, e in zip(idx, cont, reviews, ent):
            new = extract_answer(rv) or c.strip()
            turns[j].update(context=c, review=rv, relabel=new, entropy=float(e) if new and math.isfinite(e) else None)
    return turns, compute


def rate(pairs):
    """Fraction of true values, None when there are none."""
    pairs = list(pairs)
    return sum(pairs) / len(pairs) if pairs else None


def report(turns, convs, refined, compute):
    """Counts and, where the data carries them, the noise-label and reference scores (see the module docstring)."""
    noisy = [r for r in turns if not r["clean"]]
    rep = dict(dialogues=len(convs), turns=len(turns), clean=len(turns) - len(noisy), detected=len(noisy),
               relabeled=sum(r["entropy"] is not None for r in noisy),
               selected=sum(r.get("selected", False) for r in noisy),
               dropped=sum(not r.get("selected", False) for r in noisy))

    def msg(r):  # the message a turn record stands for
        return convs[r["conv"]]["messages"][r["msg"]]

    def right(text, r):  # whether text matches the turn's reference
        return bool(answer_matches(text, msg(r)["reference"]))
    lab = [(not r["clean"], bool(msg(r)["noisy"]), msg(r).get("noise_type")) for r in turns if "noisy" in msg(r)]
    tp = sum(d and n for d, n, _ in lab)
    rep.update(precision=tp / sum(d for d, _, _ in lab) if any(d for d, _, _ in lab) else None,
               recall=tp / sum(n for _, n, _ in lab) if any(n for _, n, _ in lab) else None,
               recall_by_type={k: rate(d for d, n, t in lab if n and t == k)
                               for k in sorted({t for _, n, t in lab if n and t})} if lab else None)
    ref = [r for r in turns if "reference" in msg(r)]
    sup = [m for c in refined for m in c["messages"] if m["role"] == "assistant" and m.get("train", True)
           and "reference" in m]
    rep.update(  # label_accuracy first: the key a reader looking for "the final set's label accuracy" meets first
        label_accuracy=rate(answer_matches(m["content"], m["reference"]) for m in sup) if ref else None,
        original_label_accuracy=rate(right(r["label"], r) for r in ref),
        relabel_accuracy=rate(right(r["relabel"], r) for r in ref if not r["clean"] and r["entropy"] is not None),
        selected_accuracy=rate(right(r["relabel"], r) for r in ref if r.get("selected")),
        prediction_accuracy={k: rate(right(r[k], r) for r in ref if k in r)
                             for k in ("base", "reasoning", "context", "relabel")} if ref else None)
    rep["compute"] = {k: int(v) for k, v in compute.items()}
    return rep


def main(argv=None):
    """Refine --data, fine-tune on the result; returns the report (also OUT/report.json)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    log, t0 = print, time.time()
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise RobustFTError(f"--out {args.out}: cannot be created ({e})") from None
    convs = load_conversations(args.data, on_bad_sample=args.train.on_bad_sample)
    cache, want = os.path.join(args.out, "refine.json"), settings(args)
    prev = json.loads(Path(cache).read_text()) if os.path.isfile(cache) else None
    if prev is not None and prev.get("settings") == want and "--no-resume" not in args.train_flags:
        log(f"robustft: {cache} holds this refinement: reused")
        turns, compute, t_refine = prev["records"], Compute(), prev["seconds"]
        compute.update(prev["compute"])
    else:
        turns, compute = detect_and_relabel(args, convs, log)
        t_refine = round(time.time() - t0, 1)
        noisy = [j for j, r in enumerate(turns) if not r["clean"]]
        for j in select_lowest([turns[j]["entropy"] if turns[j]["entropy"] is not None else math.inf
                                for j in noisy], args.keep):  # Eq. 8
            turns[noisy[j]]["selected"] = True
        Path(cache).write_text(json.dumps({"settings": want, "records": turns, "compute": compute,
                                           "seconds": t_refine}))
    refined = refine(convs, {(r["conv"], r["msg"]): r["relabel"] if r.get("selected") else None
                             for r in turns if not r["clean"]})
    data = os.path.join(args.out, "train.jsonl")
    save_jsonl(refined, data)
    rep = report(turns, convs, refined, compute)
    log(f"robustft: {rep['detected']} of {rep['turns']} turns detected, {rep['relabeled']} relabeled, "
        f"{rep['selected']} selected -> {data}")
    final = os.path.join(args.out, "final")
    t_train = add_training(compute, train_counted(["--model", args.model, "--data", data, "--out", final,
                                                   *args.train_flags], final))
    shutil.copytree(os.path.join(final, "adapter"), os.path.join(args.out, "adapter"), dirs_exist_ok=True)
    rep["compute"] = {k: int(v) for k, v in compute.items()}
    rep["training"] = {k: v for k, v in json.loads(Path(final, "report.json").read_text()).items()
                       if k != "most_down_weighted"}  # a list of per-unit records; train.py's report keeps it
    rep["wall_s"] = {"refine": t_refine, "train": t_train}
    Path(args.out, "report.json").write_text(json.dumps(rep, indent=1, default=float) + "\n")
    log(f"robustft: detection precision {fmt(rep['precision'])} recall {fmt(rep['recall'])}; label accuracy "
        f"{fmt(rep['original_label_accuracy'])} -> {fmt(rep['label_accuracy'])}; adapter in "
        f"{os.path.join(args.out, 'adapter')}")
    return rep


def fmt(x):
    """x to three decimals, "-" for None."""
    if x is None:
        return "-"
    return f"{x:.3f}"


def cli(argv=None):
    """main() as a command, as the other baselines run (baselines.cli): one-line errors, exit 2; Ctrl-C, exit 130."""
    baselines.cli("robustft.py", main, argv)


if __name__ == "__main__":
    cli()
