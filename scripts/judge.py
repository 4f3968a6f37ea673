"""LLM judges for answer files (eval.py generate writes them): prompts on the paper's criteria, a local checkpoint or an
OpenAI-compatible endpoint as the judge, a resumable cache, single grading and pairwise comparison.

Credentials: $OPENAI_API_KEY is sent only to OpenAI's own endpoint (api.openai.com); any other --judge-url takes
its key from --judge-key or $RESURE_JUDGE_KEY only. A URL's query string and user info (where some services
put a key) are never written to the cache, the logs or an error message.
"""
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch


class JudgeError(ValueError):
    """The judge backend failed: network errors after all retries, an HTTP error, a malformed reply."""
    exit_code = 1


class JudgeSetupError(ValueError):
    """A bad judge setting or cache file (bad input, exit code 2)."""


def public_url(url):
    """url without user info, path parameters, query string and fragment: what may be stored or printed."""
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else
                                    p.netloc, p.path, "", "", ""))


def secrets_in(url, key):
    """The strings that must never be written: the key, and every value of the URL that is not its public part."""
    p = urllib.parse.urlparse(url)
    found = [key, p.username, p.password, p.params, *(v for _, v in urllib.parse.parse_qsl(p.query + "&" + p.params))]
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to another address: refuse it (HTTP error 3xx)."""

    def redirect_request(self, *args, **kwargs):
        return None


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
        enc, dev, n = self.template.tokenizer.encode, self.model.lm_head.weight.device, len(CHOICES[kind])
        prompt = self.template.encode_prompt(messages) + enc(PREFIX[kind], add_special_tokens=False).ids
        conts = [enc(c + "]]", add_special_tokens=False).ids for c in CHOICES[kind]]
        m = max(map(len, conts))
        cache = self.model.new_cache(1, len(prompt) + m)
        first = self.model.lm_head(self.model.hidden_states(torch.tensor([prompt], device=dev), cache=cache)[:, -1])
        cache.k, cache.v = ([t.expand(n, -1, -1, -1).clone() for t in kv] for kv in (cache.k, cache.v))
        cache.valid, cache.next_pos = cache.valid.expand(n, -1).clone(), cache.next_pos.expand(n).clone()
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
    """Any OpenAI-compatible /chat/completions endpoint through urllib. URL from the argument, else
    $RESURE_JUDGE_URL, else OpenAI's; key from the argument, else $RESURE_JUDGE_KEY, else (OpenAI's endpoint only)
    $OPENAI_API_KEY. Network errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff; other HTTP
    errors and malformed replies fail at once."""
    backend = "http"

    def __init__(self, name, url=None, key=None, timeout=60.0, retries=4, backoff=2.0, max_tokens=512):
        p = urllib.parse.urlsplit(url or os.environ.get("RESURE_JUDGE_URL") or "https://api.openai.com/v1")
        if p.scheme not in ("http", "https") or not p.hostname:
            raise JudgeSetupError(f"judge URL {public_url(p.geturl())!r} is not an http(s) URL")
        if not 0 <= retries <= 100 or not 0 < timeout <= 3600:
            raise JudgeSetupError(f"need 0 <= retries <= 100 and 0 < timeout <= 3600, got {retries} and {timeout}")
        path = p.path.rstrip("/")
        self.url = p._replace(path=path if path.endswith("/chat/completions") else path + "/chat/completions").geturl()
        self.shown = public_url(self.url)  # what may be stored or printed; self.url may hold a key
        openai = p.hostname == "api.openai.com" and p.scheme == "https"
        self.key = key or os.environ.get("RESURE_JUDGE_KEY") or (os.environ.get("OPENAI_API_KEY") if openai else None)
        self.name, self.timeout, self.retries, self.backoff = name, timeout, retries, backoff
        self.max_tokens = max_tokens
        self.id, self.secrets = f"http:{self.shown}:{name}", secrets_in(self.url, self.key)
        self.opener = urllib.request.build_opener(NoRedirect)

    def redact(self, text):
        for s in self.secrets:
            text = text.replace(s, "***")
        return text.replace(self.url, self.shown)

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
                with self.opener.open(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = self.redact(e.read()[:200].decode(errors="replace").replace("\n", " "))
                    raise JudgeError(f"{self.shown}: HTTP {e.code} {e.reason}: {detail}") from None
                err = f"HTTP {e.code} {e.reason}"
                ra = (e.headers or {}).get("Retry-After", "")
                wait = max(wait, float(ra)) if ra.replace(".", "", 1).isdigit() else wait
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated bodies
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            err = self.redact(err)
            if attempt == self.retries:
                raise JudgeError(f"{self.shown}: no reply after {attempt + 1} attempts (last: {err})")
            time.sleep(wait)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            assert isinstance(content, str)
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            raise JudgeError(f"{self.shown}: malformed reply, expected JSON with choices[0].message.content: "
                             + self.redact(repr(raw[:200]))) from None
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
        if path:  # usable before the first judgment is paid for
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                open(path, "a").close()
            except OSError as e:
                raise JudgeSetupError(f"--cache {path}: cannot be written ({e.strerror})") from None
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                raw = f.read()
            lines = raw.split(b"\n")
            for i, line in enumerate(lines, 1):
                try:
                    if line.strip():
                        r = json.loads(line)
                        self.data[r["key"]] = r["result"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    if i < len(lines):  # only an unterminated last line (a killed run) is forgiven, and cut off
                        raise JudgeSetupError(f"{path}:{i}: not a judge-cache line") from None
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


def read_answers(path):
    """{question_id: [answer per turn]} from a FastChat model-answer file (first choice, as FastChat reads it)."""
    from eval import read_jsonl
    out = {}
    for where, r in read_jsonl(path):
        try:
            qid, turns = r["question_id"], r["choices"][0]["turns"]
            assert isinstance(turns, list) and all(isinstance(t, str) for t in turns)
        except (KeyError, IndexError, TypeError, AssertionError):
            raise JudgeSetupError(f"{where}: not a model answer (needs question_id and choices[0].turns, a list of "
                                  "strings)") from None
        if qid in out:
            raise JudgeSetupError(f"{where}: a second answer to question_id {qid!r}")
        out[qid] = turns
    return out


def main(argv=None):
    """`python scripts/judge.py ...`: single grading, or A vs B judged in both orders."""
    import argparse
    from eval import load, read_questions
    from support.cli import check_paths
    p = argparse.ArgumentParser(prog="scripts/judge.py", description="grade answer files with an LLM judge")
    add = p.add_argument
    add("--questions", required=True, help="the questions the answer files answer")
    add("--answers", required=True, help="FastChat answer file to grade (model A in pairwise mode)")
    add("--answers-b", help="second answer file: pairwise A vs B instead of single grading")
    add("--judge-model", help="local judge: a Hugging Face folder run through model.py")
    add("--judge-name", help="HTTP judge: model name sent to the endpoint, e.g. gpt-4o")
    add("--judge-url", help="OpenAI-compatible base URL (default: $RESURE_JUDGE_URL, else api.openai.com/v1)")
    add("--judge-key", help="API key (default: $RESURE_JUDGE_KEY; $OPENAI_API_KEY only for api.openai.com)")
    add("--timeout", type=float, default=60.0)
    add("--retries", type=int, default=4)
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--out", help="results .json")
    add("--cache", default=None, help="judgment cache, to resume without paying twice (default: judge_cache.jsonl "
        "beside --out, else in the working directory; '' for none)")
    args = p.parse_args(argv)
    check_paths(args.device if args.judge_model else None, args.out, (args.questions, args.answers, args.answers_b))
    questions, answers = read_questions(args.questions), read_answers(args.answers)
    answers_b = read_answers(args.answers_b) if args.answers_b else None
    if not _pairs(questions, answers, *([answers_b] if answers_b else []))[0]:
        raise JudgeSetupError(f"nothing to judge: no question of {args.questions} is answered in every answer file")
    if args.judge_model:
        model, template = load(args.judge_model, None, args.dtype, args.device)
        judge = LocalJudge(model, template, os.path.abspath(args.judge_model))
    elif args.judge_name:
        judge = HTTPJudge(args.judge_name, args.judge_url, args.judge_key, args.timeout, args.retries)
    else:
        raise JudgeSetupError("judge: give --judge-model DIR (local judge) or --judge-name NAME (HTTP endpoint)")
    cache = args.cache
    if cache is None:  # beside --out when given: nothing is written into the working directory then
        cache = os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl") if args.out else \
            "judge_cache.jsonl"
    cache = JudgeCache(cache or None)
    res = judge_pairwise(judge, questions, answers, answers_b, cache) if answers_b else \
        judge_single(judge, questions, answers, cache)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"judge: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("judge: interrupted (the cache keeps every judgment made; the same command continues)", file=sys.stderr)
        sys.exit(130)
