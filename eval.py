"""Evaluation: per-turn loss, multi-turn generation in FastChat's format, synthetic accuracy, LLM judging, Spearman.

    python eval.py loss     --model M [--adapter A] --data convs.jsonl [--out loss.json]
    python eval.py generate --model M [--adapter A] --questions question.jsonl --out answers.jsonl
    python eval.py accuracy --model M [--adapter A] --data test.jsonl
    python eval.py judge    --questions question.jsonl --answers a.jsonl [--answers-b b.jsonl]
                            (--judge-model DIR | --judge-url URL --judge-name gpt-4o) [--cache judge_cache.jsonl]
    python eval.py spearman --x 1,2,3,1,2,3 --y 6.1,5.8,5.2,6.0,5.9,5.0

Answer files are FastChat's model-answer JSONL, one line per question:
    {"question_id": 81, "answer_id": "...", "model_id": "m", "choices": [{"index": 0, "turns": ["..", ".."]}],
     "tstamp": 1700000000.0}
The HTTP judge reads RESURE_JUDGE_URL and RESURE_JUDGE_KEY (else OPENAI_API_KEY) when the flags are left out.
Errors are one line on stderr: exit code 2 for bad input, 1 when the judge backend fails.
"""
import argparse
import hashlib
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from data import (BadSample, ChatTemplate, answer_matches, build_examples, collate, iter_json_records,
                  load_conversations, save_jsonl)
from lora import load_adapter, merge_lora
from model import Transformer, generate


class EvalError(ValueError):
    """Bad input: a missing or malformed file, an impossible setting."""


class JudgeError(EvalError):
    """The judge backend failed: network errors after all retries, an HTTP error, a malformed reply."""


def read_jsonl(path):
    """The JSON objects of a .jsonl file (or a JSON array; .gz too), read as data.py reads conversation files."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    rows = []
    for where, obj in iter_json_records(path):
        if isinstance(obj, BadSample):
            raise EvalError(f"{where}: invalid JSON ({obj.detail})")
        if not isinstance(obj, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def load(model_dir, adapter=None, dtype="float32", device="cpu", chat_template=None):
    """model.py Transformer (+ LoRA adapter, merged for speed) and data.py ChatTemplate, ready for inference."""
    if not os.path.isdir(model_dir):
        raise EvalError(f"--model {model_dir}: not a folder")
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if adapter:
        merge_lora(load_adapter(model, adapter))
    return model.eval(), ChatTemplate.from_pretrained(model_dir, name=chat_template)


def _device(model):
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# per-turn loss

@torch.no_grad()
def per_turn_loss(model, examples, batch_size=8, pad_id=0, max_turn_groups=None):
    """Mean token loss, token count and perplexity per turn depth (assistant turn 1..N) and overall.

    Token losses come from model.token_losses; a supervised token (label != -100) belongs to depth turn_ids[t],
    capped at max_turn_groups when given (deeper turns share the last depth, as ReSURE's turn groups do).
    Means are over tokens, not samples."""
    sums, counts, dev, was_training = {}, {}, _device(model), model.training
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


# ---------------------------------------------------------------------------------------------------------------
# generation

@torch.no_grad()
def _generate_texts(model, template, prompts, batch_size=8, max_new_tokens=256, temperature=0.0, top_p=1.0,
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
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    rows = read_jsonl(path)
    if rows and "turns" in rows[0]:
        for i, q in enumerate(rows, 1):
            t = q.get("turns")
            if "question_id" not in q or not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
                raise EvalError(f"{path}:{i}: a question needs question_id and turns, a non-empty list of strings")
            q.setdefault("category", "")
            q.setdefault("context", [])
        return rows
    out = []
    for i, c in enumerate(load_conversations(path)):
        msgs = c["messages"]
        end = len(msgs) if msgs[-1]["role"] == "user" else \
            max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"question_id": c.get("id", i), "category": c.get("category", "dialogue"),
                    "turns": [msgs[end - 1]["content"]], "context": msgs[:end - 1]})
    return out


def answer_record(question_id, model_id, turns):
    """One FastChat model-answer line; answer_id is a hash of its content, so reruns give the same ids."""
    h = hashlib.sha256(json.dumps([question_id, model_id, turns]).encode()).hexdigest()[:22]
    return {"question_id": question_id, "answer_id": h, "model_id": model_id,
            "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}


def read_answers(path):
    """{question_id: [answer per turn]} from a FastChat model-answer file (first choice, as FastChat reads it)."""
    out = {}
    for i, r in enumerate(read_jsonl(path), 1):
        try:
            qid, turns = r["question_id"], r["choices"][0]["turns"]
            assert isinstance(turns, list) and all(isinstance(t, str) for t in turns)
        except (KeyError, IndexError, TypeError, AssertionError):
            raise EvalError(f"{path}:{i}: not a model answer (needs question_id and choices[0].turns, a list of "
                            "strings)") from None
        if qid in out:
            raise EvalError(f"{path}:{i}: a second answer to question_id {qid!r}")
        out[qid] = turns
    return out


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
        texts, n = _generate_texts(model, template, prompts, batch_size, max_new_tokens, temperature, top_p, seed)
        n_new += n
        for i, t in zip(todo, texts):
            answers[i].append(t)
    dt = time.perf_counter() - t0
    records = [answer_record(q["question_id"], model_id, a) for q, a in zip(questions, answers)]
    return records, {"new_tokens": n_new, "seconds": dt, "tokens_per_s": n_new / dt if dt > 0 else float("nan")}


# ---------------------------------------------------------------------------------------------------------------
# exact-match accuracy on the synthetic benchmark

def accuracy(model, template, conversations, batch_size=8, max_new_tokens=32, max_turn_groups=None):
    """Exact-match accuracy per turn depth and overall (greedy decoding).

    Assistant turn k is predicted from the conversation up to user turn k with the REFERENCE earlier assistant
    answers in context (teacher forcing of the history), so each depth measures that turn alone, not the errors
    of earlier turns. The reference of a turn is its "reference" field when present (data.py synth writes the
    true answer there), else its content. A prediction is correct when data.answer_matches accepts it."""
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
    preds, _ = _generate_texts(model, template, prompts, batch_size, max_new_tokens)
    per = {}
    for d, p, r in zip(depths, preds, refs):
        c = per.setdefault(d, [0, 0])
        c[0] += bool(answer_matches(p, r))
        c[1] += 1
    correct, total = sum(c[0] for c in per.values()), sum(c[1] for c in per.values())
    return {"overall": correct / total if total else float("nan"), "correct": correct, "total": total,
            "per_turn": {d: {"accuracy": c[0] / c[1], "correct": c[0], "total": c[1]} for d, c in sorted(per.items())}}


# ---------------------------------------------------------------------------------------------------------------
# judging: prompts written for this project on the paper's criteria

JUDGE_SYSTEM = "You are a careful, impartial judge of conversations between a user and an AI assistant."
CRITERIA = """Judge it on four criteria:
- Faithfulness: it agrees with everything established earlier in the dialogue (facts, names, numbers, the user's
  corrections and constraints) and does not contradict itself.
- Appropriateness: it does what the user's last message asks, in a fitting tone and format.
- Naturalness: it reads as a fluent, coherent reply at this point of the conversation.
- Completeness: it answers every part of the request, without padding."""
SINGLE = """Rate the assistant's LAST reply in the conversation below on a scale of 1 to 10.
{criteria}
Scale: 1-3 wrong, off-topic or unusable; 4-6 partly right or clearly flawed; 7-8 good with minor issues;
9-10 excellent.{ref_note}
{how}

{dialogue}{reference}"""
PAIR = """Compare the LAST replies of two assistants, A and B, in the two conversations below (the user's messages
are the same; each assistant's earlier replies are its own).
{criteria}
Do not let the order in which they are shown or the length of the replies sway you.{ref_note}
{how}

[Conversation with assistant A]
{dialogue_a}

[Conversation with assistant B]
{dialogue_b}{reference}"""
FORM = {"single": 'the rating in exactly this form: "Rating: [[N]]"',
        "pair": 'the verdict in exactly this form: "Verdict: [[A]]" if A is better, "Verdict: [[B]]" if B is better, '
                '"Verdict: [[C]]" for a tie'}


def _dialogue(question, answers, k):
    lines = [f"### {m['role'].capitalize()}:\n{m['content']}" for m in question.get("context", [])]
    for u, a in zip(question["turns"][:k + 1], answers[:k + 1]):
        lines += [f"### User:\n{u}", f"### Assistant:\n{a}"]
    return "\n\n".join(lines)


def judge_prompt(kind, backend, question, answers, k, answers_b=None):
    """Chat messages asking for a 1-10 rating of turn k (0-based) or an A/B/tie verdict on it."""
    ref = (question.get("reference") or [])[k:k + 1]
    how = ("Reply with only " if backend == "local" else "Explain briefly, then end with ") + FORM[kind] + "."
    fill = dict(criteria=CRITERIA, how=how,
                ref_note=" A reference answer to the last message is given; use it to check correctness." if ref
                else "", reference=f"\n\n[Reference answer to the last message]\n{ref[0]}" if ref else "")
    if kind == "single":
        text = SINGLE.format(dialogue=_dialogue(question, answers, k), **fill)
    else:
        text = PAIR.format(dialogue_a=_dialogue(question, answers, k),
                           dialogue_b=_dialogue(question, answers_b, k), **fill)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}]


CHOICES = {"single": [str(n) for n in range(1, 11)], "pair": ["A", "B", "C"]}
PREFIX = {"single": "Rating: [[", "pair": "Verdict: [["}


def parse_verdict(kind, reply):
    """Strict: every "[[...]]" in the reply must be the same valid choice; else None."""
    found = set(re.findall(r"\[\[\s*([^\[\]]*?)\s*\]\]", reply))
    if len(found) != 1 or next(iter(found)) not in CHOICES[kind]:
        return None
    return next(iter(found))


class LocalJudge:
    """A local checkpoint as judge: its reply is forced to start with 'Rating: [[' (or 'Verdict: [[') and each
    choice c is scored by the probability of the tokens of c + ']]' (so '1' and '10' compete fairly), from one
    prompt forward whose KV cache is then shared by all choices. Single: score = probability-weighted mean
    rating; pair: the most probable of A / B / C (tie)."""
    backend = "local"

    def __init__(self, model, template, name):
        self.model, self.template, self.id = model, template, f"local:{name}"

    @torch.no_grad()
    def __call__(self, kind, messages):
        enc, dev, n = self.template.tokenizer.encode, _device(self.model), len(CHOICES[kind])
        prompt = self.template.encode_prompt(messages) + enc(PREFIX[kind], add_special_tokens=False).ids
        conts = [enc(c + "]]", add_special_tokens=False).ids for c in CHOICES[kind]]
        m = max(map(len, conts))
        cache = self.model.new_cache(1, len(prompt) + m)
        first = self.model.lm_head(self.model.hidden_states(torch.tensor([prompt], device=dev), cache=cache)[:, -1])
        cache.expand(n)  # the prompt's cache, one row per choice
        ids = torch.tensor([c + [self.template.pad_id] * (m - len(c)) for c in conts], device=dev)
        rest = [self.model(ids[:, :-1], cache=cache)] if m > 1 else []
        logits = torch.cat([first.expand(n, -1)[:, None], *rest], 1)
        logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
        real = torch.arange(m, device=dev) < torch.tensor([len(c) for c in conts], device=dev)[:, None]
        logp = torch.where(real, logp, 0.0).sum(1)
        probs = dict(zip(CHOICES[kind], torch.softmax(logp, 0).tolist()))
        if kind == "single":
            return {"score": sum(int(c) * x for c, x in probs.items()), "probs": probs}
        return {"verdict": max(probs, key=probs.get), "probs": probs}


class HTTPJudge:
    """Any OpenAI-compatible /chat/completions endpoint through urllib. URL and key from arguments or the
    environment (RESURE_JUDGE_URL; RESURE_JUDGE_KEY, else OPENAI_API_KEY). Network errors, timeouts, HTTP 429
    and 5xx are retried with exponential backoff; other HTTP errors and malformed replies fail at once."""
    backend = "http"

    def __init__(self, name, url=None, key=None, timeout=60.0, retries=4, backoff=2.0, max_tokens=512):
        url = (url or os.environ.get("RESURE_JUDGE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.key = key or os.environ.get("RESURE_JUDGE_KEY") or os.environ.get("OPENAI_API_KEY")
        if retries < 0:
            raise EvalError(f"retries must be >= 0, got {retries}")  # a bad setting (exit 2), not a judge failure
        self.name, self.timeout, self.retries, self.backoff = name, timeout, retries, backoff
        self.max_tokens = max_tokens
        self.id = f"http:{self.url}:{name}"

    def chat(self, messages):
        body = json.dumps({"model": self.name, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
                    raise JudgeError(f"{self.url}: HTTP {e.code} {e.reason}: {detail}") from None
                err = f"HTTP {e.code} {e.reason}"
                ra = (e.headers or {}).get("Retry-After", "")
                wait = max(wait, float(ra)) if ra.replace(".", "", 1).isdigit() else wait
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated bodies
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.retries:
                raise JudgeError(f"{self.url}: no reply after {attempt + 1} attempts (last: {err})")
            time.sleep(wait)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            assert isinstance(content, str)
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            raise JudgeError(f"{self.url}: malformed reply, expected JSON with choices[0].message.content: "
                             f"{raw[:200]!r}") from None
        return content

    def __call__(self, kind, messages):
        reply = self.chat(messages)
        v = parse_verdict(kind, reply)
        if kind == "single":
            return {"score": None if v is None else float(v), "reply": reply}
        return {"verdict": v, "reply": reply}


class JudgeCache:
    """Judgments in a JSONL file, keyed by a hash of (judge id, prompt messages), and the prompt holds the question
    and the answers; each line is appended and flushed at once, so an interrupted run resumes where it stopped."""

    def __init__(self, path):
        self.path, self.data = path, {}
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                raw = f.read()
            lines = raw.split(b"\n")
            for i, line in enumerate(lines, 1):
                try:
                    if line.strip():
                        r = json.loads(line)
                        self.data[r["key"]] = r["result"]
                except (ValueError, KeyError, TypeError):
                    if i < len(lines):  # only an unterminated last line (a killed run) is forgiven, and cut off
                        raise EvalError(f"{path}:{i}: not a judge-cache line") from None
                    print(f"{path}:{i}: dropping a half-written last line", file=sys.stderr)
                    with open(path, "r+b") as f:
                        f.truncate(len(raw) - len(line))
        self.hits = 0

    def get(self, judge, kind, messages, meta):
        key = hashlib.sha256(json.dumps([judge.id, kind, messages], sort_keys=True).encode()).hexdigest()
        if key in self.data:
            self.hits += 1
            return self.data[key]
        result = judge(kind, messages)
        self.data[key] = result
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "judge": judge.id, **meta, "result": result}) + "\n")
        return result


def _pairs(questions, *answer_sets):
    """(question, k) for every turn that every answer file answers; the rest is counted as missing."""
    todo, missing = [], 0
    for q in questions:
        for k in range(len(q["turns"])):
            if all(len(a.get(q["question_id"], [])) > k for a in answer_sets):
                todo.append((q, k))
            else:
                missing += 1
    return todo, missing


def judge_single(judge, questions, answers, cache=None):
    """1-10 rating of every answered turn: mean overall and per turn, plus unparsed/missing counts."""
    cache = cache or JudgeCache(None)
    todo, missing = _pairs(questions, answers)
    scores = {}
    for q, k in todo:
        r = cache.get(judge, "single", judge_prompt("single", judge.backend, q, answers[q["question_id"]], k),
                      {"question_id": q["question_id"], "turn": k + 1, "kind": "single"})
        scores.setdefault(k + 1, []).append(r["score"])
    ok = [s for v in scores.values() for s in v if s is not None]
    return {"score": float(np.mean(ok)) if ok else float("nan"), "judged": len(ok),
            "per_turn": {t: float(np.mean([s for s in v if s is not None] or [np.nan])) for t, v in scores.items()},
            "unparsed": sum(s is None for v in scores.values() for s in v), "missing": missing,
            "cache_hits": cache.hits}


def judge_pairwise(judge, questions, answers_a, answers_b, cache=None):
    """A vs B on every turn both answer, judged in both orders; a win needs both orders to agree (a disagreement
    or a tie in either order is a tie, as in FastChat), which cancels position bias."""
    cache = cache or JudgeCache(None)
    todo, missing = _pairs(questions, answers_a, answers_b)
    out = {"win": 0, "tie": 0, "loss": 0, "unparsed": 0, "missing": missing}
    for q, k in todo:
        qa, qb = answers_a[q["question_id"]], answers_b[q["question_id"]]
        meta = {"question_id": q["question_id"], "turn": k + 1, "kind": "pair"}
        v1 = cache.get(judge, "pair", judge_prompt("pair", judge.backend, q, qa, k, qb), meta)["verdict"]
        v2 = cache.get(judge, "pair", judge_prompt("pair", judge.backend, q, qb, k, qa), meta)["verdict"]
        if v1 is None or v2 is None:
            out["unparsed"] += 1
            continue
        g1, g2 = {"A": "win", "B": "loss", "C": "tie"}[v1], {"A": "loss", "B": "win", "C": "tie"}[v2]
        out[g1 if g1 == g2 else "tie"] += 1
    n = out["win"] + out["tie"] + out["loss"]
    out["win_rate"] = out["win"] / n if n else float("nan")
    out["win_rate_ties_half"] = (out["win"] + 0.5 * out["tie"]) / n if n else float("nan")
    out["cache_hits"] = cache.hits
    return out


# ---------------------------------------------------------------------------------------------------------------
# Spearman (Table 4 analogue), numpy only

def rankdata(a):
    """Ranks 1..n, ties get the mean of the ranks they span (scipy's 'average')."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(a))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


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


# ---------------------------------------------------------------------------------------------------------------
# command line

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cmd = {c: sub.add_parser(c).add_argument for c in ("loss", "generate", "accuracy", "judge", "spearman")}
    for c in ("loss", "generate", "accuracy", "judge"):
        a = cmd[c]
        if c != "judge":
            a("--model", required=True, help="Hugging Face folder")
            a("--adapter", help="LoRA adapter folder (PEFT format)")
            a("--chat-template", help="force a template name (see data.py)")
            a("--batch-size", type=int, default=8)
        a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        a("--out", help="output file (generate: answers .jsonl; others: results .json)")
    for c in ("loss", "accuracy"):
        cmd[c]("--data", required=True, help="conversations (loss) or data.py synth's test.jsonl (accuracy)")
        cmd[c]("--on-bad-sample", choices=["error", "skip"], default="error")
    cmd["loss"]("--max-len", type=int, default=2048)
    cmd["loss"]("--max-turn-groups", type=int, default=None, help="cap the turn depth (default: none)")
    cmd["accuracy"]("--max-new-tokens", type=int, default=32)
    a = cmd["generate"]
    a("--questions", required=True, help="MT-Bench question.jsonl or a conversation file")
    a("--model-id", help="model_id in the answer file (default: model folder name, + adapter name)")
    a("--max-new-tokens", type=int, default=512)
    a("--temperature", type=float, default=0.0)
    a("--top-p", type=float, default=1.0)
    a("--seed", type=int, default=None)
    a = cmd["judge"]
    a("--questions", required=True, help="the questions the answer files answer")
    a("--answers", required=True, help="FastChat answer file to grade (model A in pairwise mode)")
    a("--answers-b", help="second answer file: pairwise A vs B instead of single grading")
    a("--judge-model", help="local judge: a Hugging Face folder run through model.py")
    a("--judge-name", help="HTTP judge: model name sent to the endpoint, e.g. gpt-4o")
    a("--judge-url", help="OpenAI-compatible base URL (default: $RESURE_JUDGE_URL, else api.openai.com/v1)")
    a("--judge-key", help="API key (default: $RESURE_JUDGE_KEY, else $OPENAI_API_KEY)")
    a("--timeout", type=float, default=60.0)
    a("--retries", type=int, default=4)
    a("--cache", default="judge_cache.jsonl", help="judgment cache (resume without paying twice); '' for none")
    cmd["spearman"]("--x", required=True, help="settings as ordinal numbers, e.g. 1,2,3 for H, H+N, H+N+L")
    cmd["spearman"]("--y", required=True, help="scores, same length")
    args = p.parse_args(argv)

    if args.cmd == "spearman":
        return print(json.dumps({"spearman": spearman(_numbers(args.x, "--x"), _numbers(args.y, "--y"))}))
    if args.cmd == "judge":
        questions, ans = read_questions(args.questions), read_answers(args.answers)
        if args.judge_model:
            model, template = load(args.judge_model, None, args.dtype, args.device)
            judge = LocalJudge(model, template, os.path.abspath(args.judge_model))
        elif args.judge_name:
            judge = HTTPJudge(args.judge_name, args.judge_url, args.judge_key, args.timeout, args.retries)
        else:
            raise EvalError("judge: give --judge-model DIR (local judge) or --judge-name NAME (HTTP endpoint)")
        cache = JudgeCache(args.cache or None)
        return _emit(judge_pairwise(judge, questions, ans, read_answers(args.answers_b), cache) if args.answers_b
                     else judge_single(judge, questions, ans, cache), args.out)

    data = read_questions(args.questions) if args.cmd == "generate" else \
        load_conversations(args.data, on_bad_sample=args.on_bad_sample)
    if not data:
        raise EvalError(f"{args.questions if args.cmd == 'generate' else args.data}: nothing to evaluate")
    model, template = load(args.model, args.adapter, args.dtype, args.device, args.chat_template)
    if args.cmd == "generate":
        model_id = args.model_id or "-".join(os.path.basename(os.path.normpath(d)) for d in (args.model, args.adapter)
                                             if d)
        out = args.out or f"{model_id}.jsonl"
        records, st = generate_answers(model, template, data, model_id, args.batch_size, args.max_new_tokens,
                                       args.temperature, args.top_p, args.seed)
        save_jsonl(records, out)
        return print(f"{len(records)} answers -> {out}: {st['new_tokens']} new tokens in {st['seconds']:.1f}s "
                     f"({st['tokens_per_s']:.1f} tokens/s)")
    if args.cmd == "accuracy":
        res = accuracy(model, template, data, args.batch_size, args.max_new_tokens)
        for d, r in list(res["per_turn"].items()) + [("all", {"accuracy": res["overall"], **res})]:
            print(f"turn {d:>3}  exact match {r['accuracy']:.3f}  ({r['correct']}/{r['total']})")
        return _emit(res, args.out)
    examples, report = build_examples(data, template, args.max_len, args.max_turn_groups or 8)
    print(f"data: {report.summary()}")
    res = per_turn_loss(model, examples, args.batch_size, template.pad_id, args.max_turn_groups)
    for d, r in list(res["per_turn"].items()) + [("all", res["overall"])]:
        print(f"turn {d:>3}  loss {r['loss']:.4f}  ppl {r['ppl']:10.3f}  tokens {r['tokens']}")
    _emit(res, args.out)


def cli(argv=None):
    """main() with failures reported in one line: exit code 2 for bad input, 1 when the judge backend fails."""
    try:
        main(argv)
        return 0
    except (ValueError, OSError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, JudgeError) else 2


if __name__ == "__main__":
    sys.exit(cli())
