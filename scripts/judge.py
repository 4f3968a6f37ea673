"""LLM judges for answer files (eval.py generate writes them): prompts on the paper's criteria,
a local checkpoint or an OpenAI-compatible endpoint as the judge, a resumable cache, single grading
and pairwise comparison.

    python scripts/judge.py --questions q.jsonl --answers a.jsonl [--answers-b b.jsonl]
                            (--judge-model DIR | --judge-name NAME [--judge-url URL]) [--out r.json]

Credentials: $OPENAI_API_KEY is sent only to OpenAI's own endpoint (api.openai.com); any other
--judge-url takes its key from --judge-key or $RESURE_JUDGE_KEY only. A URL's query string (where
some services put a key) is never written to the cache, the logs or an error message; a URL with
user info (user:password@) is refused, and an error about a malformed URL never shows the URL.
Errors are one line on stderr: exit code 2 for bad input, 1 when the judge fails, 130 on Ctrl-C.
"""
import argparse
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval import load, read_jsonl, read_questions  # noqa: E402
from support.answers import check_question_id, check_texts  # noqa: E402
from support.cli import check_paths  # noqa: E402


class JudgeError(ValueError):
    """The judge backend failed: network errors after all retries, an HTTP error, a malformed
    reply."""
    exit_code = 1


class JudgeSetupError(ValueError):
    """A bad judge setting, answer file or cache file (bad input, exit code 2)."""


# --- the judge URL: checked before use, never shown whole ---
def split_judge_url(url, source):
    """urlsplit of an http(s) URL with a host, or a JudgeSetupError naming `source` (the flag or
    variable the URL came from) and what is wrong, without any part of the URL."""
    hidden = "(the URL is not shown: it may hold a key)"
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise JudgeSetupError(f"{source}: holds a space, a control or non-ASCII character {hidden}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise JudgeSetupError(f"{source}: malformed host or port {hidden}") from None
    if parts.scheme not in ("http", "https"):
        raise JudgeSetupError(f"{source}: needs to start with http:// or https:// {hidden}")
    if "@" in parts.netloc:
        raise JudgeSetupError(f"{source}: user info (user:password@) is not supported; give the "
                              f"key with --judge-key or $RESURE_JUDGE_KEY {hidden}")
    if not parts.hostname:
        raise JudgeSetupError(f"{source}: has no host {hidden}")
    if port == 0:
        raise JudgeSetupError(f"{source}: port 0, expected 1 to 65535 {hidden}")
    return parts


def public_url(parts):
    """The checked URL without path parameters, query string and fragment: what may be stored or
    printed."""
    path = parts.path.split(";")[0]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def secrets_in(parts, key):
    """The strings that must never be written: the key and the URL's private parts (path
    parameters, query string, fragment) and their values; those under 4 characters are too short to
    find in a text without mangling it (e.g. api-version=1)."""
    params = parts.path.partition(";")[2]
    found = [key, parts.query, parts.fragment, params]
    for text in (parts.query, params):
        found += [value for _, value in urllib.parse.parse_qsl(text.replace(";", "&"))]
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to another address: refuse it (HTTP error
    3xx)."""

    def redirect_request(self, *args, **kwargs):
        return None


# --- prompts ---
JUDGE_SYSTEM = ("You are a careful, impartial judge of conversations between a user and an AI "
                "assistant.")
# The prompts' text is what the judge reads and what the cache keys hold: a line ending in a
# backslash continues on the next line of the source, not of the prompt.
CRITERIA = """Judge it on four criteria:
- Faithfulness: it agrees with everything established earlier in the dialogue (facts, names, \
numbers, the user's
  corrections and constraints) and does not contradict itself.
- Appropriateness: it does what the user's last message asks, in a fitting tone and format.
- Naturalness: it reads as a fluent, coherent reply at this point of the conversation.
- Completeness: it answers every part of the request, without padding."""
SINGLE = """Rate the assistant's LAST reply in the conversation below on a scale of 1 to 10.
{criteria}
Scale: 1-3 wrong, off-topic or unusable; 4-6 partly right or clearly flawed; 7-8 good with minor \
issues;
9-10 excellent.{ref_note}
{how}

{dialogue}{reference}"""
PAIR = """Compare the LAST replies of two assistants, A and B, in the two conversations below \
(the user's messages
are the same; each assistant's earlier replies are its own).
{criteria}
Do not let the order in which they are shown or the length of the replies sway you.{ref_note}
{how}

[Conversation with assistant A]
{dialogue_a}

[Conversation with assistant B]
{dialogue_b}{reference}"""
FORM = {"single": 'the rating in exactly this form: "Rating: [[N]]"',
        "pair": 'the verdict in exactly this form: "Verdict: [[A]]" if A is better, '
                '"Verdict: [[B]]" if B is better, "Verdict: [[C]]" for a tie'}
REF_NOTE = " A reference answer to the last message is given; use it to check correctness."


def _dialogue(question, answers, k):
    lines = [f"### {m['role'].capitalize()}:\n{m['content']}" for m in question.get("context", [])]
    for user, answer in zip(question["turns"][:k + 1], answers[:k + 1]):
        lines.append(f"### User:\n{user}")
        lines.append(f"### Assistant:\n{answer}")
    return "\n\n".join(lines)


def judge_prompt(kind, backend, question, answers, k, answers_b=None):
    """Chat messages asking for a 1-10 rating of turn k (0-based) or an A/B/tie verdict on it."""
    if backend == "local":
        how = "Reply with only " + FORM[kind] + "."
    else:
        how = "Explain briefly, then end with " + FORM[kind] + "."
    fill = {"criteria": CRITERIA, "how": how, "ref_note": "", "reference": ""}
    reference = (question.get("reference") or [])[k:k + 1]
    if reference:
        fill["ref_note"] = REF_NOTE
        fill["reference"] = f"\n\n[Reference answer to the last message]\n{reference[0]}"
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


# --- judges ---
class LocalJudge:
    """A local checkpoint as judge: its reply is forced to start with 'Rating: [[' (or
    'Verdict: [[') and each choice c is scored by the probability of the tokens of c + ']]' (so '1'
    and '10' compete fairly), from one prompt forward whose KV cache is then shared by all choices.
    Single: score = probability-weighted mean rating; pair: the most probable of A / B / C (tie)."""
    backend = "local"

    def __init__(self, model, template, name):
        self.model = model
        self.template = template
        self.id = f"local:{name}"

    def tokens(self, text):
        return self.template.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def __call__(self, kind, messages):
        device = self.model.lm_head.weight.device
        choices = CHOICES[kind]
        prompt = self.template.encode_prompt(messages) + self.tokens(PREFIX[kind])
        continuations = [self.tokens(c + "]]") for c in choices]
        width = max(len(c) for c in continuations)
        # the prompt once; its cache, copied for every choice, then reads the choices side by side
        cache = self.model.new_cache(1, len(prompt) + width)
        hidden = self.model.hidden_states(torch.tensor([prompt], device=device), cache=cache)
        first = self.model.lm_head(hidden[:, -1])                      # [1, V]
        cache = cache.expand(len(choices))
        padded = [c + [self.template.pad_id] * (width - len(c)) for c in continuations]
        ids = torch.tensor(padded, device=device)                     # [choices, width]
        logits = first.expand(len(choices), -1)[:, None]
        if width > 1:
            logits = torch.cat([logits, self.model(ids[:, :-1], cache=cache)], 1)
        logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
        lengths = torch.tensor([len(c) for c in continuations], device=device)
        real = torch.arange(width, device=device) < lengths[:, None]
        logp = torch.where(real, logp, 0.0).sum(1)
        probs = dict(zip(choices, torch.softmax(logp, 0).tolist()))
        if kind == "single":
            return {"score": sum(int(c) * p for c, p in probs.items()), "probs": probs}
        return {"verdict": max(probs, key=probs.get), "probs": probs}


class HTTPJudge:
    """Any OpenAI-compatible /chat/completions endpoint through urllib. URL from the argument, else
    $RESURE_JUDGE_URL, else OpenAI's; key from the argument, else $RESURE_JUDGE_KEY, else (OpenAI's
    endpoint only) $OPENAI_API_KEY. Network errors, timeouts, HTTP 429 and 5xx are retried with
    exponential backoff; other HTTP errors and malformed replies fail at once."""
    backend = "http"

    def __init__(self, name, url=None, key=None, timeout=60.0, retries=4, backoff=2.0,
                 max_tokens=512):
        if url:
            parts = split_judge_url(url, "--judge-url")
        elif os.environ.get("RESURE_JUDGE_URL"):
            parts = split_judge_url(os.environ["RESURE_JUDGE_URL"], "$RESURE_JUDGE_URL")
        else:
            parts = split_judge_url("https://api.openai.com/v1", "the default judge URL")
        if not 0 <= retries <= 100 or not 0 < timeout <= 3600:
            raise JudgeSetupError(f"need 0 <= retries <= 100 and 0 < timeout <= 3600, got "
                                  f"{retries} and {timeout}")
        path = parts.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        parts = parts._replace(path=path)
        self.url = parts.geturl()       # may hold a key in its query string: never shown
        self.shown = public_url(parts)  # what may be stored or printed
        openai = parts.hostname == "api.openai.com" and parts.scheme == "https"
        self.key = key or os.environ.get("RESURE_JUDGE_KEY")
        if not self.key and openai:
            self.key = os.environ.get("OPENAI_API_KEY")
        self.secrets = secrets_in(parts, self.key)
        self.name = name
        self.id = f"http:{self.shown}:{name}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.opener = urllib.request.build_opener(NoRedirect)

    def redact(self, text):
        text = text.replace(self.url, self.shown)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def post(self, body, headers):
        """The raw reply to one POST, after the retries that network errors, 429 and 5xx allow."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                with self.opener.open(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
                    message = f"{self.shown}: HTTP {e.code} {e.reason}: {detail}"
                    raise JudgeError(self.redact(message)) from None
                error = f"HTTP {e.code} {e.reason}"
                retry_after = (e.headers or {}).get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, ...
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.retries:
                raise JudgeError(self.redact(f"{self.shown}: no reply after {attempt + 1} attempts "
                                             f"(last: {error})"))
            time.sleep(wait)

    def chat(self, messages):
        body = json.dumps({"model": self.name, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        raw = self.post(body, headers)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(self.redact(f"{self.shown}: malformed reply, expected JSON with "
                                         f"choices[0].message.content: {raw[:200]!r}"))
        return content

    def __call__(self, kind, messages):
        reply = self.chat(messages)
        verdict = parse_verdict(kind, reply)
        if kind == "pair":
            return {"verdict": verdict, "reply": reply}
        score = None
        if verdict is not None:
            score = float(verdict)
        return {"score": score, "reply": reply}


# --- the cache and the two ways of judging ---
class JudgeCache:
    """Judgments in a JSONL file, keyed by a hash of (judge id, prompt messages), and the prompt
    holds the question and the answers; each line is appended and flushed at once, so an interrupted
    run resumes where it stopped."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        self.hits = 0
        if path:  # usable before the first judgment is paid for
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                open(path, "a").close()
            except OSError as e:
                raise JudgeSetupError(f"--cache {path}: cannot be written ({e.strerror})") from None
            self.read()

    def read(self):
        with open(self.path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.data[record["key"]] = record["result"]
            except (ValueError, KeyError, TypeError, RecursionError):
                if i < len(lines):  # only an unterminated last line (a killed run) is forgiven
                    raise JudgeSetupError(f"{self.path}:{i}: not a judge-cache line") from None
                print(f"{self.path}:{i}: dropping a half-written last line", file=sys.stderr)
                with open(self.path, "r+b") as f:
                    f.truncate(len(raw) - len(line))

    def get(self, judge, kind, messages, meta):
        text = json.dumps([judge.id, kind, messages], sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self.data:
            self.hits += 1
            return self.data[key]
        result = judge(kind, messages)
        self.data[key] = result
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                line = {"key": key, "judge": judge.id, **meta, "result": result}
                f.write(json.dumps(line) + "\n")
        return result


def _pairs(questions, *answer_sets):
    """(question, k) for every turn that every answer file answers; the rest counts as missing."""
    todo = []
    missing = 0
    for q in questions:
        for k in range(len(q["turns"])):
            if all(len(a.get(q["question_id"], [])) > k for a in answer_sets):
                todo.append((q, k))
            else:
                missing += 1
    return todo, missing


def mean(scores):
    """The mean of the parsed scores (None: unparsed), nan when there is none."""
    parsed = [s for s in scores if s is not None]
    if not parsed:
        return float("nan")
    return float(np.mean(parsed))


def judge_single(judge, questions, answers, cache=None):
    """A 1-10 rating of every answered turn: the mean overall and per turn, unparsed, missing."""
    cache = cache or JudgeCache(None)
    todo, missing = _pairs(questions, answers)
    scores = {}
    for q, k in todo:
        messages = judge_prompt("single", judge.backend, q, answers[q["question_id"]], k)
        meta = {"question_id": q["question_id"], "turn": k + 1, "kind": "single"}
        scores.setdefault(k + 1, []).append(cache.get(judge, "single", messages, meta)["score"])
    every = [s for turn in scores.values() for s in turn]
    return {"score": mean(every), "judged": sum(s is not None for s in every),
            "per_turn": {t: mean(turn) for t, turn in scores.items()},
            "unparsed": sum(s is None for s in every), "missing": missing, "cache_hits": cache.hits}


# a verdict on (A, B) and on the swapped order (B, A), each as A's outcome
FIRST_ORDER = {"A": "win", "B": "loss", "C": "tie"}
SWAPPED_ORDER = {"A": "loss", "B": "win", "C": "tie"}


def judge_pairwise(judge, questions, answers_a, answers_b, cache=None):
    """A vs B on every turn both answer, judged in both orders; a win needs both orders to agree (a
    disagreement or a tie in either order is a tie, as in FastChat), which cancels position bias."""
    cache = cache or JudgeCache(None)
    todo, missing = _pairs(questions, answers_a, answers_b)
    out = {"win": 0, "tie": 0, "loss": 0, "unparsed": 0, "missing": missing}
    for q, k in todo:
        a = answers_a[q["question_id"]]
        b = answers_b[q["question_id"]]
        meta = {"question_id": q["question_id"], "turn": k + 1, "kind": "pair"}
        first = cache.get(judge, "pair", judge_prompt("pair", judge.backend, q, a, k, b), meta)
        swapped = cache.get(judge, "pair", judge_prompt("pair", judge.backend, q, b, k, a), meta)
        if first["verdict"] is None or swapped["verdict"] is None:
            out["unparsed"] += 1
            continue
        outcome = FIRST_ORDER[first["verdict"]]
        if outcome != SWAPPED_ORDER[swapped["verdict"]]:
            outcome = "tie"
        out[outcome] += 1
    n = out["win"] + out["tie"] + out["loss"]
    out["win_rate"] = out["win"] / n if n else float("nan")
    out["win_rate_ties_half"] = (out["win"] + 0.5 * out["tie"]) / n if n else float("nan")
    out["cache_hits"] = cache.hits
    return out


def read_answers(path):
    """{question_id: [answer per turn]} from a FastChat model-answer file (its first choice, as
    FastChat reads it), every field read checked; an answer may be empty, its list of turns not."""
    answers = {}
    for where, record in read_jsonl(path):
        qid = record.get("question_id")
        check_question_id(where, qid, JudgeSetupError)
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise JudgeSetupError(f"{where}: not a model answer: choices must be a non-empty list "
                                  "of objects")
        check_texts(where, "choices[0].turns", choices[0].get("turns"), JudgeSetupError,
                    blank_ok=True)
        if qid in answers:
            raise JudgeSetupError(f"{where}: a second answer to question_id {qid!r}")
        answers[qid] = choices[0]["turns"]
    return answers


# --- command line ---
class Parser(argparse.ArgumentParser):
    """argparse whose errors are JudgeSetupErrors: one line, no usage block."""

    def error(self, message):
        raise JudgeSetupError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(prog="scripts/judge.py", description="grade answer files with an LLM judge")
    add = p.add_argument
    add("--questions", required=True, help="the questions the answer files answer")
    add("--answers", required=True, help="FastChat answer file to grade (model A in pairwise mode)")
    add("--answers-b", help="second answer file: pairwise A vs B instead of single grading")
    add("--judge-model", help="local judge: a Hugging Face folder run through model.py")
    add("--judge-name", help="HTTP judge: model name sent to the endpoint, e.g. gpt-4o")
    add("--judge-url", help="OpenAI-compatible base URL (default: $RESURE_JUDGE_URL, else "
                            "api.openai.com/v1)")
    add("--judge-key", help="API key (default: $RESURE_JUDGE_KEY; $OPENAI_API_KEY only for "
                            "api.openai.com)")
    add("--timeout", type=float, default=60.0)
    add("--retries", type=int, default=4)
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--out", help="results .json")
    add("--cache", default=None, help="judgment cache, to resume without paying twice (default: "
        "judge_cache.jsonl beside --out, else in the working directory; '' for none)")
    args = p.parse_args(argv)
    device = args.device if args.judge_model else None
    check_paths(device, args.out, (args.questions, args.answers, args.answers_b))
    return args


def make_judge(args):
    if args.judge_model:
        model, template = load(args.judge_model, None, args.dtype, args.device)
        return LocalJudge(model, template, os.path.abspath(args.judge_model))
    if args.judge_name:
        return HTTPJudge(args.judge_name, args.judge_url, args.judge_key, args.timeout,
                         args.retries)
    raise JudgeSetupError("give --judge-model DIR (a local judge) or --judge-name NAME (an HTTP "
                          "endpoint)")


def cache_path(args):
    """--cache; by default judge_cache.jsonl beside --out, so that nothing is written into the
    working directory then, else in the working directory; None for no cache."""
    if args.cache is not None:
        return args.cache or None
    if args.out:
        return os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")
    return "judge_cache.jsonl"


def main(argv=None):
    """Single grading of --answers, or --answers vs --answers-b judged in both orders."""
    args = parse_args(argv)
    questions = read_questions(args.questions)
    answer_sets = [read_answers(args.answers)]
    if args.answers_b:
        answer_sets.append(read_answers(args.answers_b))
    if not _pairs(questions, *answer_sets)[0]:
        raise JudgeSetupError(f"nothing to judge: no question of {args.questions} is answered in "
                              "every answer file")
    judge = make_judge(args)
    cache = JudgeCache(cache_path(args))
    if args.answers_b:
        result = judge_pairwise(judge, questions, *answer_sets, cache)
    else:
        result = judge_single(judge, questions, answer_sets[0], cache)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


def cli(argv=None):
    """main() with failures reported in one line; returns the exit code: 0, 2 for bad input, 1 when
    the judge fails, 130 when interrupted."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"scripts/judge.py: error: {lines[0]}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except (RuntimeError, MemoryError) as e:  # the local judge's model failed (e.g. out of memory)
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"scripts/judge.py: error: the judge failed: {lines[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scripts/judge.py: interrupted (the cache keeps every judgment made; the same "
              "command continues)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
