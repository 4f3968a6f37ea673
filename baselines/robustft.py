"""RobustFT (arXiv 2412.14922) as a baseline: repair a noisy SFT set before training, then
fine-tune with the core.

    python baselines/robustft.py --model DIR --data train.jsonl --out runs/robustft --k 3 \\
        --keep 0.5 --reflect 4 [--detector base|crossfit] [training flags as in train.py]

The unit is one assistant turn; its query is the dialogue before it, with the dialogue's own
earlier turns as they are labelled. Every step runs the model being fine-tuned (model.py), greedy:
  1. base prediction y^ = M(q) (Eq. 1), and a reasoning-enhanced prediction (Eq. 2): --reflect n
     generations, the first reasons step by step, each later one reflects on the one before and
     answers again; the answer is the line after "Answer:".
  2. Checker (Eq. 3): a turn is clean when both predictions match its label
     (eval.answer_matches, as the authors' code checks); the rest is the potential-noise set.
  3. For each potentially noisy turn, the --k clean turns of other dialogues whose queries are
     nearest by cosine similarity of the model's own mean-pooled final hidden states (Eq. 4) go
     into the prompt as examples, and the model answers again: y^cont (Eq. 5).
  4. Review (Eq. 6): the model, shown the reasoning and the context answers, gives the new label.
  5. Selection (Eqs. 7-8): the mean negative log-probability of y^cont under the model that wrote
     it; the lowest --keep fraction of the potential-noise set keeps its new label, the rest stays
     as context with "train": false.
  6. Fine-tuning (Eq. 9) on the clean turns plus the selected relabels: train.main on
     OUT/train.jsonl (--method sft unless given), the training flags passed through.
--detector base runs all of this literally with the base model. --detector crossfit (a deviation,
not the paper): the dialogues are split in two halves, a model is fine-tuned on each half with the
same training flags, and every step for a turn (1-2 and 4-5) is run by the model fine-tuned on the
other half; retrieval keeps the base encoder.

Writes in OUT, each file whole (baselines/__init__.py):
  train.jsonl      the refined conversations: a selected turn has the new label as content and
                   "original_content", "robustft": "relabeled" (its noise labels, where the data
                   has a reference, re-derived from it); a dropped turn has "train": false and
                   "robustft": "dropped"; everything else is unchanged
  refine.json      the settings, one record per checked turn (predictions, neighbours, entropy,
                   decision) and the refinement's compute; a rerun with the same settings reuses
                   it, a damaged one is computed again
  half-0.jsonl, half-1.jsonl, crossfit-0/, crossfit-1/   (crossfit) the halves and their train.py
                   runs
  final/           the train.py run on train.jsonl; adapter/ is a copy of final/adapter (PEFT
                   format, eval.py reads it)
  report.json      turns, clean, detected, relabeled (a non-empty new label), selected, dropped;
                   where the data has noise labels: precision, recall (of detection against
                   "noisy") and recall_by_type; where it has references: relabel_accuracy
                   (relabeled turns), selected_accuracy, label_accuracy (supervised turns of
                   train.jsonl), original_label_accuracy (supervised turns of --data),
                   prediction_accuracy (base, reasoning, context, review); "compute" with integer
                   keys trainings, optimizer_steps, train_tokens (tokens of every training batch),
                   generated_tokens, forward_tokens (prompt tokens read by generation, encoder and
                   entropy-scoring tokens), comparisons (always 0); "training" (train.py's report,
                   without its per-unit list), "wall_s" (seconds of the refinement when it was
                   computed, the halves' trainings included, and of the final training in this
                   command). None where a quantity has nothing to count.
main(argv) -> that report dict. Single process only (no torchrun). Bad input: one line on stderr,
exit 2; a signal: one line naming what was kept, exit 130 / 143, and the same command continues.
The references of the data are read only for the report, never by the method.
"""
import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import baselines  # noqa: E402
from baselines import BaselineError, Parser, device, new_compute, train_run  # noqa: E402
from baselines import training_args  # noqa: E402
from data import collate  # noqa: E402
from eval import answer_matches, generate_texts, load  # noqa: E402
from support.checkpoint import read_json  # noqa: E402
from support.conversations import load_conversations, save_jsonl  # noqa: E402
from support.runs import Progress, copy_folder, dump, read_state, stops_reported  # noqa: E402

REASON = ("{question}\n\nThink step by step about the conversation so far, then give your final "
          "reply on its own last line, starting with \"Answer: \".")
REFLECT = ("Reflect on your reasoning above: check every step against the conversation and correct "
           "any mistake. Then give your final reply on its own last line, starting with "
           "\"Answer: \".")
CONTEXT = ("Here are examples of conversations and their correct replies.\n\n{examples}Reply to "
           "the following message in the same way.\n\n{question}")
REVIEW = ("{question}\n\nTwo replies to this message were proposed.\n1. Reasoning-enhanced reply: "
          "{reasoning}\n2. Context-enhanced reply: {context}\nReview them and give the correct "
          "reply on its own last line, starting with \"Answer: \".")
PROG = "robustft.py"


class RobustFTError(BaselineError):
    """Bad input or an impossible setting; the message is one line."""


def parse_args(argv):
    p = Parser(prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False,
               epilog="Every other flag is a training flag of train.py, passed to each training.")
    add = p.add_argument
    add("--model", required=True, help="Hugging Face folder of the model to fine-tune")
    add("--data", required=True, help="noisy training conversations")
    add("--out", required=True, help="output folder")
    add("--k", type=int, default=3, help="clean examples retrieved per noisy turn (Eq. 4)")
    add("--keep", type=float, default=0.5,
        help="beta: fraction of the potential-noise set kept, lowest entropy")
    add("--reflect", type=int, default=4,
        help="n: generations of the reasoning-enhanced prediction (Eq. 2)")
    add("--detector", choices=["base", "crossfit"], default="base",
        help="base: the paper, the model itself; crossfit: models fine-tuned on the other half "
             "(a deviation)")
    add("--max-new-tokens", type=int, default=32, help="tokens of a base, context or review answer")
    add("--reason-tokens", type=int, default=128,
        help="tokens of each reasoning or reflection generation")
    add("--gen-batch-size", type=int, default=8)
    args, rest = p.parse_known_args(argv)
    for name in ("k", "reflect", "max_new_tokens", "reason_tokens", "gen_batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise RobustFTError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.keep) and 0 < args.keep <= 1):
        raise RobustFTError(f"--keep must be in (0, 1], got {args.keep}")
    # the training flags are checked before any work; train.py's own errors become ours
    args.train_argv, args.train = training_args(args.model, args.data, rest)
    args.train_flags = rest
    if not os.path.isdir(args.model):
        raise RobustFTError(f"--model {args.model}: not a folder")
    if not os.path.isfile(args.data):
        raise RobustFTError(f"--data {args.data}: no such file")
    return args


# -------------------------------------------------------------------------------------------------
# the method's pieces, each checked by hand in tests/test_robustft.py

def answer_lines(text):
    """The non-empty lines of text, stripped of spaces and quoting or emphasis marks."""
    stripped = (line.strip(" \t*\"'`") for line in text.splitlines())
    return [line for line in stripped if line]


def extract_answer(text):
    """The reply after the last "Answer:" (its first non-empty line), else the last non-empty
    line before it."""
    hits = list(re.finditer(r"(?i)answer\s*:", text))
    if not hits:
        before = answer_lines(text)
        return before[-1] if before else ""
    after = answer_lines(text[hits[-1].end():])
    if after:
        return after[0]
    before = answer_lines(text[:hits[-1].start()])
    return before[-1] if before else ""


def is_reliable(label, base_pred, reasoning_pred):
    """Eq. 3: a label is reliable when both predictions agree with it."""
    return bool(answer_matches(base_pred, label) and answer_matches(reasoning_pred, label))


def unit_rows(vectors):
    """float64 rows of unit length (a zero row stays zero)."""
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
    return torch.nn.functional.normalize(x, dim=-1)


def nearest(queries, pool, k, query_groups=None, pool_groups=None, chunk=1024):
    """Eq. 4: for each query vector, the indices of its k most cosine-similar pool vectors, most
    similar first (ties: the lower index), never one of the query's own group (here: its
    dialogue)."""
    q = unit_rows(queries)
    p = unit_rows(pool)
    out = []
    for a in range(0, len(q), chunk):
        rows = q[a:a + chunk]
        if len(p):
            sim = (rows @ p.reshape(len(p), -1).T).numpy()
        else:
            sim = np.zeros((len(rows), 0))
        if query_groups is not None:
            same = np.equal.outer(np.asarray(query_groups)[a:a + chunk], np.asarray(pool_groups))
            sim[same] = -np.inf
        for row in sim:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([int(j) for j in order if np.isfinite(row[j])])
    return out


def select_lowest(entropies, keep):
    """Eq. 8: the floor(keep * n) turns of lowest entropy, in that order (ties: lower index);
    non-finite never."""
    e = np.asarray(entropies, dtype=np.float64)
    order = [int(i) for i in np.argsort(e, kind="stable") if np.isfinite(e[i])]
    return order[:int(math.floor(keep * len(e) + 1e-9))]


def transcript(messages):
    """A dialogue as plain text, one "Role: content" line block per message (the examples' and
    encoder's form)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def relabeled(message, new, references):
    """message with the new label, the old one kept as original_content."""
    m = {**message, "content": new, "original_content": message["content"],
         "robustft": "relabeled"}
    if references and "reference" in m:
        # the noise labels describe the content: re-derived for the report
        m["noisy"] = not answer_matches(new, m["reference"])
        m["noise_type"] = "relabeled" if m["noisy"] else None
    return m


def refine(convs, decisions, references=True):
    """Copies of convs with decisions applied: {(conv, message index): new label} relabels,
    {(...): None} drops (context only). Every other message, and every other field of a changed
    one, is left as it was."""
    out = []
    for ci, conv in enumerate(convs):
        msgs = list(conv["messages"])
        for i, m in enumerate(msgs):
            if (ci, i) not in decisions:
                continue
            new = decisions[ci, i]
            if new is None:
                msgs[i] = {**m, "train": False, "robustft": "dropped"}
            else:
                msgs[i] = relabeled(m, new, references)
        out.append({**conv, "messages": msgs})
    return out


# -------------------------------------------------------------------------------------------------
# model calls

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
    """Eq. 2: n generations, M_Reas(q, M_Refl(M_Reas(q, ...))); returns (final outputs, extracted
    answers)."""
    first = [with_question(q, REASON.format(question=q[-1]["content"])) for q in queries]
    outs = answers(net, template, first, args.reason_tokens, args.gen_batch_size, compute)
    for _ in range(n - 1):
        chats = [c + [{"role": "assistant", "content": o}, {"role": "user", "content": REFLECT}]
                 for c, o in zip(first, outs)]
        outs = answers(net, template, chats, args.reason_tokens, args.gen_batch_size, compute)
    return outs, [extract_answer(o) for o in outs]


@torch.no_grad()
def embed(net, template, texts, max_len, batch_size, compute):
    """The encoder of Eq. 4: final-normed hidden states mean-pooled over each text's tokens (its
    last max_len)."""
    dev = next(net.parameters()).device
    out = []
    ids = []
    for text in texts:
        tokens = template.tokenizer.encode(text, add_special_tokens=False).ids[-max_len:]
        ids.append(tokens or [template.pad_id])
    compute["forward_tokens"] += sum(map(len, ids))
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        T = max(map(len, chunk))
        x = torch.tensor([r + [template.pad_id] * (T - len(r)) for r in chunk], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], device=dev)
        h = net.hidden_states(x, mask).float()
        out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    if not out:
        return np.zeros((0, net.config.hidden_size))
    return torch.cat(out).numpy()


def as_context(messages):
    """messages with every assistant turn unsupervised."""
    return [{**m, "train": False} if m["role"] == "assistant" else m for m in messages]


@torch.no_grad()
def entropies(net, template, chats, replies, batch_size, compute):
    """Eq. 7: the mean negative log-probability of each reply's tokens (and its end-of-turn token)
    after its chat; inf for an empty reply."""
    dev = next(net.parameters()).device
    out = np.full(len(chats), np.inf)
    ok = [i for i, r in enumerate(replies) if r.strip()]
    encs = {}
    for i in ok:
        reply = {"role": "assistant", "content": replies[i]}
        encs[i] = template.encode(as_context(chats[i]) + [reply])
    compute["forward_tokens"] += sum(len(e["input_ids"]) for e in encs.values())
    ok.sort(key=lambda i: -len(encs[i]["input_ids"]))
    for j in range(0, len(ok), batch_size):
        idx = ok[j:j + batch_size]
        b = collate([encs[i] for i in idx], template.pad_id)
        labels = b["labels"].to(dev)
        ids = b["input_ids"].to(dev)
        tok = net.token_losses(ids, labels, b["attention_mask"].to(dev)).double()
        sup = (labels != -100).double()
        sup[:, 0] = 0  # token_losses scores nothing at t = 0
        means = (tok * sup).sum(1) / sup.sum(1).clamp(min=1)
        for i, v in zip(idx, means.tolist()):
            out[i] = v
    return out


# -------------------------------------------------------------------------------------------------
# the pipeline

def settings(args):
    """What refine.json's records depend on: a rerun with other settings computes them again."""
    t = args.train
    s = dict(model=os.path.abspath(args.model), data_sha256=file_sha256(args.data), k=args.k,
             keep=args.keep, reflect=args.reflect, detector=args.detector,
             max_new_tokens=args.max_new_tokens, reason_tokens=args.reason_tokens, seed=t.seed,
             dtype=t.dtype, max_len=t.max_len, chat_template=t.chat_template)
    if args.detector == "crossfit":  # the halves' models depend on every training flag
        s["train_flags"] = args.train_flags
    return s


def crossfit_experts(args, convs, compute, progress):
    """Fine-tune a model on each half of the dialogues (a deviation from the paper); returns the
    dialogue -> half map and the two adapters, the model of half h being the expert for the other
    half."""
    if len(convs) < 2:
        raise RobustFTError("--detector crossfit needs at least 2 dialogues")
    perm = np.random.default_rng([args.train.seed, 18]).permutation(len(convs))
    half = np.zeros(len(convs), dtype=int)
    half[perm[len(convs) // 2:]] = 1
    adapters = []
    for h in (0, 1):
        data = os.path.join(args.out, f"half-{h}.jsonl")
        out = os.path.join(args.out, f"crossfit-{h}")
        save_jsonl([c for c, g in zip(convs, half) if g == h], data)
        log(f"crossfit: fine-tuning on half {h} ({int((half == h).sum())} dialogues) -> {out}")
        progress.start(f"training crossfit-{h}", Path(out))
        train_run(args.train_argv, data, out, compute, log=log)
        progress.done(out)
        adapters.append(os.path.join(out, "adapter"))
    return half, adapters


def detect_and_relabel(args, convs, progress):
    """Steps 1-5 -> (per-turn records, compute). Each record: conv, msg, turn, label and every
    model output."""
    compute = new_compute()
    t = args.train
    turns = []
    for ci, c in enumerate(convs):
        for i, m in enumerate(c["messages"]):
            if m["role"] == "assistant" and m.get("train", True):
                depth = sum(x["role"] == "assistant" for x in c["messages"][:i + 1])
                turns.append(dict(conv=ci, msg=i, turn=depth))
    if not turns:
        raise RobustFTError(f"{args.data}: no supervised assistant turn to check")
    progress.start("checking and relabeling the turns")
    base, template = load(args.model, None, t.dtype, device(), t.chat_template)
    groups = [(base, list(range(len(turns))))]
    if args.detector == "crossfit":
        half, adapters = crossfit_experts(args, convs, compute, progress)
        models = [load(args.model, a, t.dtype, device(), t.chat_template)[0] for a in adapters]
        groups = []
        for h in (0, 1):
            mine = [j for j, r in enumerate(turns) if half[r["conv"]] == h]
            groups.append((models[1 - h], mine))
    progress.start("checking and relabeling the turns")
    for r in turns:
        r["label"] = convs[r["conv"]]["messages"][r["msg"]]["content"]
    query = [convs[r["conv"]]["messages"][:r["msg"]] for r in turns]
    for net, idx in groups:
        check(net, template, [query[j] for j in idx], [turns[j] for j in idx], args, compute)
    log(f"checker: {sum(r['clean'] for r in turns)} of {len(turns)} turns clean")
    clean = [j for j, r in enumerate(turns) if r["clean"]]
    noisy = [j for j, r in enumerate(turns) if not r["clean"]]
    texts = [transcript(q) for q in query]
    vecs = embed(base, template, texts, t.max_len, args.gen_batch_size, compute)
    conv = np.array([r["conv"] for r in turns])
    neighbours = nearest(vecs[noisy], vecs[clean], args.k, conv[noisy], conv[clean])  # Eq. 4
    for j, nb in zip(noisy, neighbours):
        turns[j]["neighbours"] = [clean[c] for c in nb]
    for net, idx in groups:
        idx = [j for j in idx if not turns[j]["clean"]]
        relabel(net, template, idx, turns, query, args, compute)
    return turns, compute


def check(net, template, queries, records, args, compute):
    """Eqs. 1-3 for the turns `records` (their queries): base and reasoning predictions, clean."""
    base_out = answers(net, template, queries, args.max_new_tokens, args.gen_batch_size, compute)
    _, reasoning = reasoning_answers(net, template, queries, args.reflect, args, compute)
    for r, b, a in zip(records, base_out, reasoning):
        r.update(base=b, reasoning=a, clean=is_reliable(r["label"], b, a))


def relabel(net, template, idx, turns, query, args, compute):
    """Eqs. 5-7 for the noisy turns idx: the context answer, the review (the new label) and the
    context answer's entropy."""
    chats = []
    for j in idx:
        examples = ""
        for e, c in enumerate(turns[j]["neighbours"], 1):
            examples += (f"Example {e}:\n{transcript(query[c])}\nCorrect reply: "
                         f"{turns[c]['label']}\n\n")
        prompt = CONTEXT.format(examples=examples, question=query[j][-1]["content"])
        chats.append(with_question(query[j], prompt))
    context = answers(net, template, chats, args.max_new_tokens, args.gen_batch_size, compute)
    review_chats = []
    for j, c in zip(idx, context):
        prompt = REVIEW.format(question=query[j][-1]["content"], reasoning=turns[j]["reasoning"],
                               context=c)
        review_chats.append(with_question(query[j], prompt))
    reviews = answers(net, template, review_chats, args.max_new_tokens, args.gen_batch_size,
                      compute)
    entropy = entropies(net, template, chats, context, args.gen_batch_size, compute)
    for j, c, review, e in zip(idx, context, reviews, entropy):
        new = extract_answer(review) or c.strip()
        usable = bool(new) and math.isfinite(e)
        turns[j].update(context=c, review=review, relabel=new,
                        entropy=float(e) if usable else None)


def rate(pairs):
    """Fraction of true values, None when there are none."""
    pairs = list(pairs)
    return sum(pairs) / len(pairs) if pairs else None


def detection_scores(turns, message):
    """Precision and recall of detection against the data's noise labels, and recall per noise
    type (None without noise labels)."""
    labels = []
    for r in turns:
        m = message(r)
        if "noisy" in m:
            labels.append((not r["clean"], bool(m["noisy"]), m.get("noise_type")))
    detected = sum(d for d, _, _ in labels)
    noisy = sum(n for _, n, _ in labels)
    hits = sum(d and n for d, n, _ in labels)
    by_type = None
    if labels:
        kinds = sorted({t for _, n, t in labels if n and t})
        by_type = {k: rate(d for d, n, t in labels if n and t == k) for k in kinds}
    return dict(precision=hits / detected if detected else None,
                recall=hits / noisy if noisy else None, recall_by_type=by_type)


def report(turns, convs, refined, compute):
    """Counts and, where the data carries them, the noise-label and reference scores (see the
    module docstring)."""
    noisy = [r for r in turns if not r["clean"]]
    selected = sum(r.get("selected", False) for r in noisy)
    rep = dict(dialogues=len(convs), turns=len(turns), clean=len(turns) - len(noisy),
               detected=len(noisy), relabeled=sum(r["entropy"] is not None for r in noisy),
               selected=selected, dropped=len(noisy) - selected)

    def msg(r):  # the message a turn record stands for
        return convs[r["conv"]]["messages"][r["msg"]]

    def right(text, r):  # whether text matches the turn's reference
        return bool(answer_matches(text, msg(r)["reference"]))
    rep.update(detection_scores(turns, msg))
    ref = [r for r in turns if "reference" in msg(r)]
    supervised = [m for c in refined for m in c["messages"]
                  if m["role"] == "assistant" and m.get("train", True) and "reference" in m]
    relabeled_turns = [r for r in ref if not r["clean"] and r["entropy"] is not None]
    # label_accuracy first: the key a reader looking for the final set's label accuracy meets first
    rep["label_accuracy"] = None
    if ref:
        rep["label_accuracy"] = rate(answer_matches(m["content"], m["reference"])
                                     for m in supervised)
    rep.update(original_label_accuracy=rate(right(r["label"], r) for r in ref),
               relabel_accuracy=rate(right(r["relabel"], r) for r in relabeled_turns),
               selected_accuracy=rate(right(r["relabel"], r) for r in ref if r.get("selected")))
    rep["prediction_accuracy"] = None
    if ref:
        rep["prediction_accuracy"] = {k: rate(right(r[k], r) for r in ref if k in r)
                                      for k in ("base", "reasoning", "context", "relabel")}
    rep["compute"] = {k: int(v) for k, v in compute.items()}
    return rep


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_refinement(path, want):
    """refine.json's (records, compute, seconds) when it holds this refinement, else None; a
    damaged one is named in one line and computed again."""
    cache = read_state(path, log)
    if cache is None or cache.get("settings") != want:
        return None
    try:
        compute = {**new_compute(), **cache["compute"]}
        return list(cache["records"]), compute, float(cache["seconds"])
    except (KeyError, TypeError, ValueError) as e:
        log(f"{path}: not a refinement record ({type(e).__name__}: {e}); computed again")
        return None


def refinement(args, convs, progress):
    """Steps 1-5 and the selection (Eq. 8), or refine.json's when it holds them: (records,
    compute, seconds)."""
    t0 = time.time()
    path = os.path.join(args.out, "refine.json")
    want = settings(args)
    if "--no-resume" not in args.train_flags:
        cached = cached_refinement(path, want)
        if cached is not None:
            log(f"{path} holds this refinement: reused")
            return cached
    turns, compute = detect_and_relabel(args, convs, progress)
    seconds = round(time.time() - t0, 1)
    noisy = [j for j, r in enumerate(turns) if not r["clean"]]
    scores = [turns[j]["entropy"] for j in noisy]
    scores = [math.inf if e is None else e for e in scores]
    for j in select_lowest(scores, args.keep):  # Eq. 8
        turns[noisy[j]]["selected"] = True
    dump({"settings": want, "records": turns, "compute": compute, "seconds": seconds}, path)
    progress.done(path)
    return turns, compute, seconds


def main(argv=None):
    """Refine --data, fine-tune on the result; returns the report (also OUT/report.json)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise RobustFTError(f"--out {args.out}: cannot be created ({e})") from None
    convs = load_conversations(args.data, on_bad_sample=args.train.on_bad_sample)
    with stops_reported(Progress(Path(args.out))) as progress:
        rep = refine_and_train(args, convs, progress)
    log(f"detection precision {fmt(rep['precision'])} recall {fmt(rep['recall'])}; label "
        f"accuracy {fmt(rep['original_label_accuracy'])} -> {fmt(rep['label_accuracy'])}; "
        f"adapter in {os.path.join(args.out, 'adapter')}")
    return rep


def refine_and_train(args, convs, progress):
    """The refinement, train.jsonl, the final training, OUT/adapter and OUT/report.json."""
    turns, compute, t_refine = refinement(args, convs, progress)
    decisions = {}
    for r in turns:
        if not r["clean"]:
            decisions[r["conv"], r["msg"]] = r["relabel"] if r.get("selected") else None
    refined = refine(convs, decisions)
    data = os.path.join(args.out, "train.jsonl")
    save_jsonl(refined, data)
    progress.done(data)
    rep = report(turns, convs, refined, compute)
    log(f"{rep['detected']} of {rep['turns']} turns detected, {rep['relabeled']} relabeled, "
        f"{rep['selected']} selected -> {data}")
    final = os.path.join(args.out, "final")
    t0 = time.time()
    progress.start("training final", Path(final))
    train_run(args.train_argv, data, final, compute, log=log)
    progress.done(final)
    t_train = round(time.time() - t0, 1)
    progress.start("copying the adapter")
    copy_folder(os.path.join(final, "adapter"), os.path.join(args.out, "adapter"))
    rep["compute"] = {k: int(v) for k, v in compute.items()}
    # most_down_weighted: a list of per-unit records; train.py's report keeps it
    training = read_json(os.path.join(final, "report.json"), RobustFTError)
    rep["training"] = {k: v for k, v in training.items() if k != "most_down_weighted"}
    rep["wall_s"] = {"refine": t_refine, "train": t_train}
    progress.start("writing report.json")
    dump(rep, os.path.join(args.out, "report.json"))
    return rep


def log(message):
    print(f"robustft: {message}", flush=True)


def fmt(x):
    """x to three decimals, "-" for None."""
    if x is None:
        return "-"
    return f"{x:.3f}"


def cli(argv=None):
    """main() as a command, as the other baselines run (baselines.cli): one-line errors, exit 2;
    a signal, one line naming what was kept, exit 130 / 143."""
    baselines.cli(PROG, main, argv)


if __name__ == "__main__":
    cli()
