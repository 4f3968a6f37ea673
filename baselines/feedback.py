"""Comparison feedback for ILR and DPO: one interface, five comparators, both-order averaging,
realized accuracy.

A comparator answers one query: given a dialogue context (the messages up to and including the
user turn) and two candidate replies A and B, the probability that A is the better reply, a float
in [0, 1] (0.5: no preference).

    oracle      the benchmark's reference answer decides (the "reference" field of the assistant
                message, as support/synth.py writes it): 1 or 0 where exactly one side matches it
                (eval.answer_matches), else 0.5. The upper bound; always called an oracle.
    sim:P       a simulated unreliable comparator: where exactly one side is right it prefers that
                side with probability P, with a confidence drawn uniformly (p in (0.5, 1] for the
                preferred side), so that a quantile of p (ILR's alpha cap) is meaningful; else 0.5.
                The draw is a deterministic function of (seed, context, unordered pair), so asking
                again or in the other order gives the same judgment: a simulated annotator's error
                belongs to the pair, it is not cancelled by repeating the question.
    format      a verifier that needs no reference and checks only the form of a reply, as a
                hurried annotator would: on the synthetic benchmark a counter reply must be an
                integer and a shopping-list reply a ", "-separated list of items the user named (or
                "(empty)"); elsewhere a non-empty single line. 1 / 0 where exactly one side passes,
                else 0.5. It catches off-topic and most truncated replies and is blind to plausible
                wrong values.
    local:DIR   a local checkpoint as pairwise judge (scripts/judge.LocalJudge):
                p = P(A) + P(tie) / 2.
    http:NAME   an OpenAI-compatible endpoint (scripts/judge.HTTPJudge; $RESURE_JUDGE_URL,
                $RESURE_JUDGE_KEY): verdict A -> 1, B -> 0, tie or unparsable -> 0.5. Judgments are
                cached in OUT/judge_cache.jsonl.
The judges see the dialogue and the two replies, never a reference. References are read only by
oracle and sim:P (their definition) and by realized_accuracy (evaluation); the methods themselves
never read them.

Feedback.compare asks a comparator in both orders and averages, p = (p(a, b) + 1 - p(b, a)) / 2,
which cancels a judge's position bias; each order is one query, counted in Feedback.queries and
capped by its max_queries (--max-queries).
"""
import hashlib
import json
import math
import os
import re

from eval import answer_matches


class FeedbackError(ValueError):
    """A bad --feedback value or data a comparator cannot use; the message is one line."""


def reference(turn):
    """The true answer stored with an assistant message, or None (evaluation and simulated
    feedback only)."""
    if not isinstance(turn, dict):
        return None
    ref = turn.get("reference")
    if isinstance(ref, str):
        return ref
    return None


class Oracle:
    needs_reference = True

    def __init__(self):
        self.name = "oracle"

    def __call__(self, context, a, b, turn):
        ref = reference(turn)
        a_right = answer_matches(a, ref)
        if a_right == answer_matches(b, ref):
            return 0.5
        return float(a_right)


class Simulated:
    needs_reference = True

    def __init__(self, p, seed=0):
        if not (isinstance(p, float) and 0 <= p <= 1):
            raise FeedbackError(f"--feedback sim:P needs 0 <= P <= 1, got {p!r}")
        self.p = p
        self.seed = seed
        self.name = f"sim:{p:g}"

    def __call__(self, context, a, b, turn):
        ref = reference(turn)
        a_right = answer_matches(a, ref)
        if a_right == answer_matches(b, ref):
            return 0.5
        key = json.dumps([self.seed, [m["content"] for m in context], sorted([a, b])])
        h = hashlib.sha256(key.encode()).digest()
        u_right, u_conf = (int.from_bytes(h[i:i + 8], "big") / 2.0 ** 64 for i in (0, 8))
        conf = 0.5 * (1.0 - u_conf)  # in (0, 0.5]: never exactly a tie
        p_right = 0.5 - conf         # P(the right side is better)
        if u_right < self.p:
            p_right = 0.5 + conf
        if a_right:
            return p_right
        return 1.0 - p_right


WORD = re.compile(r"[a-z]+")


def form_ok(context, reply):
    """The form check of the `format` comparator (see the module docstring): no reference, only
    the dialogue."""
    reply = reply.strip()
    first = next((m["content"].lower() for m in context if m["role"] == "user"), "")
    if "counter" in first:
        return re.fullmatch(r"-?\d+", reply) is not None
    if "shopping list" in first:
        named = set()
        for m in context:
            if m["role"] == "user":
                named.update(WORD.findall(m["content"].lower()))
        items = reply.split(", ")
        if reply == "(empty)":
            return True
        return all(i in named for i in items) and len(set(items)) == len(items)
    return bool(reply) and "\n" not in reply


class Format:
    needs_reference = False

    def __init__(self):
        self.name = "format"

    def __call__(self, context, a, b, turn):
        a_ok = form_ok(context, a)
        if a_ok == form_ok(context, b):
            return 0.5
        return float(a_ok)


class Judge:
    """scripts/judge.py's LocalJudge or HTTPJudge behind the comparator interface, through a
    JudgeCache. forward_tokens counts the prompt tokens of every distinct judgment this run asks,
    read from the cache or not, so that a run resumed after an interruption counts what an
    uninterrupted one does."""
    needs_reference = False

    def __init__(self, judge, cache_path=None, prompt_tokens=None):
        from scripts.judge import JudgeCache
        self.judge = judge
        self.name = judge.id
        self.cache = JudgeCache(cache_path)
        self.prompt_tokens = prompt_tokens  # messages -> tokens (a local judge), or None
        self.forward_tokens = 0
        self.unparsed = 0
        self.asked = set()

    def __call__(self, context, a, b, turn):
        from scripts.judge import judge_prompt
        if not context or context[-1]["role"] != "user":
            raise FeedbackError("a judged reply must follow a user message")
        # no reference: the method's view
        question = {"turns": [context[-1]["content"]], "context": context[:-1]}
        messages = judge_prompt("pair", self.judge.backend, question, [a], 0, [b])
        r = self.cache.get(self.judge, "pair", messages, {"kind": "pair"})
        key = json.dumps(messages, sort_keys=True)
        if self.prompt_tokens and key not in self.asked:
            self.forward_tokens += self.prompt_tokens(messages)
        self.asked.add(key)
        if "probs" in r:
            return float(r["probs"]["A"] + 0.5 * r["probs"]["C"])
        self.unparsed += r.get("verdict") is None
        return {"A": 1.0, "B": 0.0}.get(r.get("verdict"), 0.5)


def make(spec, seed=0, out_dir=None, device="cpu"):
    """The comparator a --feedback value names: oracle, sim:P, format, local:DIR or http:NAME."""
    kind, _, arg = str(spec).partition(":")
    if spec == "oracle":
        return Oracle()
    if spec == "format":
        return Format()
    if kind == "sim" and arg:
        return Simulated(sim_probability(spec, arg), seed)
    cache = None
    if out_dir:
        cache = os.path.join(out_dir, "judge_cache.jsonl")
    if kind == "local" and arg:
        return local_judge(spec, arg, cache, device)
    if kind == "http" and arg:
        from scripts.judge import HTTPJudge
        return Judge(HTTPJudge(arg), cache)
    raise FeedbackError(f"--feedback {spec!r}: expected oracle, sim:P, format, local:DIR or "
                        "http:NAME")


def sim_probability(spec, arg):
    try:
        p = float(arg)
    except ValueError:
        raise FeedbackError(f"--feedback {spec}: P must be a number in [0, 1]") from None
    if not math.isfinite(p):
        raise FeedbackError(f"--feedback {spec}: P must be a number in [0, 1]")
    return p


def local_judge(spec, folder, cache, device):
    """The checkpoint in `folder` as a Judge, counting the prompt tokens each judgment reads."""
    if not os.path.isdir(folder):
        raise FeedbackError(f"--feedback {spec}: {folder} is not a folder")
    from eval import load
    from scripts.judge import LocalJudge
    net, template = load(folder, device=device)

    def count(messages):
        return len(template.encode_prompt(messages))
    name = os.path.basename(os.path.normpath(folder))
    return Judge(LocalJudge(net, template, name), cache, count)


class Feedback:
    """A comparator asked in both orders; queries counts the questions asked (two per
    comparison), at most max_queries of them (0: no cap)."""

    def __init__(self, comparator, max_queries=0):
        self.comparator = comparator
        self.name = comparator.name
        self.queries = 0
        self.max_queries = max_queries

    @property
    def needs_reference(self):
        return self.comparator.needs_reference

    @property
    def forward_tokens(self):
        return getattr(self.comparator, "forward_tokens", 0)

    def can_compare(self):
        """Whether one more comparison (two queries) stays within max_queries."""
        return not self.max_queries or self.queries + 2 <= self.max_queries

    def compare(self, context, a, b, turn):
        """P(a is better than b), averaged over both presentation orders."""
        self.queries += 2
        p_ab = self.comparator(context, a, b, turn)
        p_ba = self.comparator(context, b, a, turn)
        return (p_ab + 1.0 - p_ba) / 2.0


def check_references(convs, targets, feedback, path):
    """Refuse data a reference-reading comparator cannot judge: every target turn needs a
    "reference" string."""
    if not feedback.needs_reference:
        return
    for ci, mi in targets:
        if reference(convs[ci]["messages"][mi]) is None:
            raise FeedbackError(f"{path}: --feedback {feedback.name} needs a 'reference' on every "
                                f"trained assistant turn; conversation {ci} message {mi} has none")


def realized_accuracy(decisions):
    """How often the comparator favoured the right side where exactly one side is right
    (evaluation: reads the references). decisions: (turn, a, b, p) with p = P(a better). Returns
    counts and accuracy = right / informative (a tie counts as not right), or None when no decision
    had a reference."""
    out = {"informative": 0, "right": 0, "wrong": 0, "tie": 0}
    seen = False
    for turn, a, b, p in decisions:
        ref = reference(turn)
        if ref is None:
            continue
        seen = True
        a_right = answer_matches(a, ref)
        if a_right == answer_matches(b, ref):
            continue
        out["informative"] += 1
        toward = p  # the probability given to the right side
        if not a_right:
            toward = 1.0 - p
        if toward > 0.5:
            out["right"] += 1
        elif toward < 0.5:
            out["wrong"] += 1
        else:
            out["tie"] += 1
    if not seen:
        return None
    out["accuracy"] = None
    if out["informative"]:
        out["accuracy"] = out["right"] / out["informative"]
    return out
