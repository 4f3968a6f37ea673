"""Comparison feedback for ILR and DPO: one interface, five comparators, both-order averaging, realized accuracy.

A comparator answers one query: given a dialogue context (the messages up to and including the user turn) and two
candidate replies A and B, the probability that A is the better reply, a float in [0, 1] (0.5: no preference).

    oracle      the benchmark's reference answer decides (the "reference" field of the assistant message, as
                support/synth.py writes it): 1 or 0 where exactly one side matches it (eval.answer_matches), else 0.5.
                The upper bound; always called an oracle.
    sim:P       a simulated unreliable comparator: where exactly one side is right it prefers that side with
                probability P, with a confidence drawn uniformly (p in (0.5, 1] for the preferred side), so that
                a quantile of p (ILR's alpha cap) is meaningful; else 0.5. The draw is a deterministic function of
                (seed, context, unordered pair), so asking again or in the other order gives the same judgment: a
                simulated annotator's error belongs to the pair, it is not cancelled by repeating the question.
    format      a verifier that needs no reference and checks only the form of a reply, as a hurried annotator
                would: on the synthetic benchmark a counter reply must be an integer and a shopping-list reply a
                ", "-separated list of items the user named (or "(empty)"); elsewhere a non-empty single line.
                1 / 0 where exactly one side passes, else 0.5. It catches off-topic and most truncated replies and
                is blind to plausible wrong values.
    local:DIR   a local checkpoint as pairwise judge (tools/judge.LocalJudge): p = P(A) + P(tie) / 2.
    http:NAME   an OpenAI-compatible endpoint (tools/judge.HTTPJudge; $RESURE_JUDGE_URL, $RESURE_JUDGE_KEY):
                verdict A -> 1, B -> 0, tie or unparsable -> 0.5. Judgments are cached in OUT/judge_cache.jsonl.
The judges see the dialogue and the two replies, never a reference. References are read only by oracle and
sim:P (their definition) and by realized_accuracy (evaluation); the methods themselves never read them.

Feedback.compare asks a comparator in both orders and averages, p = (p(a, b) + 1 - p(b, a)) / 2, which cancels
a judge's position bias; each order is one query, counted in Feedback.queries.
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
    """The true answer stored with an assistant message, or None (evaluation and simulated feedback only)."""
    ref = turn.get("reference") if isinstance(turn, dict) else None
    return ref if isinstance(ref, str) else None


class Oracle:
    needs_reference = True

    def __init__(self):
        self.name = "oracle"

    def __call__(self, context, a, b, turn):
        ref = reference(turn)
        ra, rb = answer_matches(a, ref), answer_matches(b, ref)
        return 0.5 if ra == rb else float(ra)


class Simulated:
    needs_reference = True

    def __init__(self, p, seed=0):
        if not (isinstance(p, float) and 0 <= p <= 1):
            raise FeedbackError(f"--feedback sim:P needs 0 <= P <= 1, got {p!r}")
        self.p, self.seed, self.name = p, seed, f"sim:{p:g}"

    def __call__(self, context, a, b, turn):
        ref = reference(turn)
        ra, rb = answer_matches(a, ref), answer_matches(b, ref)
        if ra == rb:
            return 0.5
        key = json.dumps([self.seed, [m["content"] for m in context], sorted([a, b])])
        h = hashlib.sha256(key.encode()).digest()
        u_right, u_conf = (int.from_bytes(h[i:i + 8], "big") / 2.0 ** 64 for i in (0, 8))
        conf = 0.5 * (1.0 - u_conf)                                      # in (0, 0.5]: never exactly a tie
        p_right = 0.5 + conf if u_right < self.p else 0.5 - conf        # P(the right side is better)
        return p_right if ra else 1.0 - p_right


WORD = re.compile(r"[a-z]+")


def form_ok(context, reply):
    """The form check of the `format` comparator (see the module docstring): no reference, only the dialogue."""
    reply = reply.strip()
    first = next((m["content"].lower() for m in context if m["role"] == "user"), "")
    if "counter" in first:
        return re.fullmatch(r"-?\d+", reply) is not None
    if "shopping list" in first:
        named = {w for m in context if m["role"] == "user" for w in WORD.findall(m["content"].lower())}
        items = reply.split(", ")
        return reply == "(empty)" or (all(i in named for i in items) and len(set(items)) == len(items))
    return bool(reply) and "\n" not in reply


class Format:
    needs_reference = False

    def __init__(self):
        self.name = "format"

    def __call__(self, context, a, b, turn):
        oa, ob = form_ok(context, a), form_ok(context, b)
        return 0.5 if oa == ob else float(oa)


class Judge:
    """scripts/judge.py's LocalJudge or HTTPJudge behind the comparator interface, through a JudgeCache."""
    needs_reference = False

    def __init__(self, judge, cache_path=None, prompt_tokens=None):
        from scripts.judge import JudgeCache
        self.judge, self.name, self.cache = judge, judge.id, JudgeCache(cache_path)
        self.prompt_tokens, self.forward_tokens, self.unparsed = prompt_tokens, 0, 0

    def __call__(self, context, a, b, turn):
        from scripts.judge import judge_prompt
        if not context or context[-1]["role"] != "user":
            raise FeedbackError("a judged reply must follow a user message")
        question = {"turns": [context[-1]["content"]], "context": context[:-1]}  # no reference: the method's view
        messages = judge_prompt("pair", self.judge.backend, question, [a], 0, [b])
        hits = self.cache.hits
        r = self.cache.get(self.judge, "pair", messages, {"kind": "pair"})
        if self.prompt_tokens and self.cache.hits == hits:  # a local forward pass actually ran
            self.forward_tokens += self.prompt_tokens(messages)
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
        try:
            p = float(arg)
        except ValueError:
            raise FeedbackError(f"--feedback {spec}: P must be a number in [0, 1]") from None
        if not math.isfinite(p):
            raise FeedbackError(f"--feedback {spec}: P must be a number in [0, 1]")
        return Simulated(p, seed)
    cache = os.path.join(out_dir, "judge_cache.jsonl") if out_dir else None
    if kind == "local" and arg:
        if not os.path.isdir(arg):
            raise FeedbackError(f"--feedback {spec}: {arg} is not a folder")
        from eval import load
        from scripts.judge import LocalJudge
        net, template = load(arg, device=device)

        def count(messages):  # the prompt tokens one judgment reads
            return len(template.encode_prompt(messages))
        return Judge(LocalJudge(net, template, os.path.basename(os.path.normpath(arg))), cache, count)
    if kind == "http" and arg:
        from scripts.judge import HTTPJudge
        return Judge(HTTPJudge(arg), cache)
    raise FeedbackError(f"--feedback {spec!r}: expected oracle, sim:P, format, local:DIR or http:NAME")


class Feedback:
    """A comparator asked in both orders; queries counts the questions asked (two per comparison)."""

    def __init__(self, comparator):
        self.comparator, self.name, self.queries = comparator, comparator.name, 0

    @property
    def needs_reference(self):
        return self.comparator.needs_reference

    @property
    def forward_tokens(self):
        return getattr(self.comparator, "forward_tokens", 0)

    def compare(self, context, a, b, turn):
        """P(a is better than b), averaged over both presentation orders."""
        self.queries += 2
        p_ab, p_ba = self.comparator(context, a, b, turn), self.comparator(context, b, a, turn)
        return (p_ab + 1.0 - p_ba) / 2.0


def check_references(convs, targets, feedback, path):
    """Refuse data a reference-reading comparator cannot judge: every target turn needs a "reference" string."""
    if not feedback.needs_reference:
        return
    for ci, mi in targets:
        if reference(convs[ci]["messages"][mi]) is None:
            raise FeedbackError(f"{path}: --feedback {feedback.name} needs a 'reference' on every trained assistant "
                                f"turn; conversation {ci} message {mi} has none")


def realized_accuracy(decisions):
    """How often the comparator favoured the right side where exactly one side is right (evaluation: reads the
    references). decisions: (turn, a, b, p) with p = P(a better). Returns counts and accuracy = right / informative
    (a tie counts as not right), or None when no decision had a reference."""
    out, seen = {"informative": 0, "right": 0, "wrong": 0, "tie": 0}, False
    for turn, a, b, p in decisions:
        ref = reference(turn)
        if ref is None:
            continue
        seen = True
        ra, rb = answer_matches(a, ref), answer_matches(b, ref)
        if ra == rb:
            continue
        out["informative"] += 1
        toward = p if ra else 1.0 - p                                    # the probability given to the right side
        out["right" if toward > 0.5 else "wrong" if toward < 0.5 else "tie"] += 1
    if not seen:
        return None
    out["accuracy"] = out["right"] / out["informative"] if out["informative"] else None
    return out
