"""bench/real_noise.py's data: MT-Bench-101 dialogues split by seed, and noise of five kinds
injected into a share of the training replies, each labelled on its message ("noisy", "noise_type",
"reference" = the original reply):
    off_topic            a reply taken from another dialogue
    shuffled             the reply's words in a random order
    truncated            the reply cut at a word boundary between 30 % and 70 % of its characters
    echo                 the reply repeats the user's turn before it
    wrong_same_dialogue  another turn's reply of the same dialogue (plausible, on topic, wrong)
"""
import copy
from pathlib import Path

import numpy as np

from scripts.convert import from_mtbench101
from support.conversations import iter_json_records, validate

KINDS = ("off_topic", "shuffled", "truncated", "echo", "wrong_same_dialogue")
# the most constrained kinds choose their turns first
CHOOSING_ORDER = ("wrong_same_dialogue", "truncated", "shuffled", "echo", "off_topic")
ROOT = Path(__file__).resolve().parents[1]
MTBENCH101 = ROOT.parent / "shared" / "fixtures" / "mt_bench_101" / "mtbench101.jsonl"


class BenchError(ValueError):
    pass


def load_mtbench101(path=None):
    """MT-Bench-101 as conversations (scripts/convert.py, validated by data.py), the dialogues with
    at least two assistant turns."""
    path = str(path or MTBENCH101)
    records = ((where, from_mtbench101(obj, i))
               for i, (where, obj) in enumerate(iter_json_records(path)))
    convs = validate(path, records)
    return [c for c in convs if sum(m["role"] == "assistant" for m in c["messages"]) >= 2]


def split(convs, sizes, seed):
    """Disjoint random subsets of the given sizes (a seeded permutation); a dialogue whose first
    user message already appeared in an earlier subset is skipped, so no held-out dialogue repeats a
    training one's opening."""
    order = np.random.default_rng([seed, 1]).permutation(len(convs))
    seen = set()
    parts = []
    pos = 0
    for n in sizes:
        part = []
        while len(part) < n and pos < len(order):
            c = convs[order[pos]]
            pos += 1
            if c["messages"][0]["content"] not in seen:
                part.append(c)
        seen |= {c["messages"][0]["content"] for c in part}
        if len(part) < n:
            raise BenchError(f"only {len(part)} dialogues left for a subset of {n}")
        parts.append(part)
    return parts


def eligible(kind, conv, j, asst):
    """Can turn j (index into the dialogue's assistant messages asst) carry this kind of noise?"""
    text = conv["messages"][asst[j]]["content"]
    words = text.split()
    if kind == "shuffled":
        return len(set(words)) >= 3
    if kind == "truncated":
        return len(words) >= 4
    if kind == "echo":
        return conv["messages"][asst[j] - 1]["content"].strip() != text.strip()
    if kind == "wrong_same_dialogue":
        return any(conv["messages"][i]["content"] != text for i in asst if i != asst[j])
    return True


def inject(convs, rate, kinds=KINDS, seed=0):
    """A copy of convs where round(rate * assistant turns) replies are replaced by noise, the kinds
    in equal shares (the first kinds get the remainder); every assistant message is labelled noisy,
    noise_type (None when clean) and reference (its original reply). Deterministic given seed. A
    kind takes only turns it can change (shuffled: >= 3 distinct words, truncated: >= 4 words,
    wrong_same_dialogue: another turn with another reply)."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds) or not 0 <= rate <= 1:
        raise BenchError(f"inject: kinds must be distinct names of {KINDS} and 0 <= rate <= 1, got "
                         f"{kinds}, {rate}")
    out = copy.deepcopy(convs)
    asst = [[i for i, m in enumerate(c["messages"]) if m["role"] == "assistant"] for c in out]
    turns = [(ci, j) for ci, a in enumerate(asst) for j in range(len(a))]
    for ci, a in enumerate(asst):
        for i in a:
            m = out[ci]["messages"][i]
            m.update(noisy=False, noise_type=None, reference=m["content"])
    rng = np.random.default_rng([seed, 2])
    n = int(round(rate * len(turns)))
    quota = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    taken = {}
    for kind in sorted(kinds, key=CHOOSING_ORDER.index):  # each from its own seeded order
        got = 0
        for t in rng.permutation(len(turns)):
            if got == quota[kind]:
                break
            ci, j = turns[t]
            if (ci, j) not in taken and eligible(kind, out[ci], j, asst[ci]):
                taken[(ci, j)] = kind
                got += 1
        if got < quota[kind]:
            raise BenchError(f"inject: only {got} turns can take {kind} noise, {quota[kind]} asked")
    for (ci, j), kind in sorted(taken.items()):
        m = out[ci]["messages"][asst[ci][j]]
        m.update(content=noise(kind, out, ci, j, asst, rng), noisy=True, noise_type=kind)
    return out


def noise(kind, convs, ci, j, asst, rng):
    """The noisy reply of kind for assistant turn j of dialogue ci (built from original replies)."""
    msgs = convs[ci]["messages"]
    ref = msgs[asst[ci][j]]["reference"]
    if kind == "echo":
        return msgs[asst[ci][j] - 1]["content"]
    if kind == "shuffled":
        words = ref.split()
        while True:  # >= 3 distinct words: a permutation other than the original exists
            perm = [words[i] for i in rng.permutation(len(words))]
            if perm != words:
                return " ".join(perm)
    if kind == "truncated":
        return truncate(ref, rng)
    if kind == "wrong_same_dialogue":
        others = [msgs[i]["reference"] for i in asst[ci] if msgs[i]["reference"] != ref]
        return others[int(rng.integers(len(others)))]
    return off_topic(convs, ci, ref, asst, rng)


def truncate(ref, rng):
    """ref cut at a space between 30 % and 70 % of its characters (a strict prefix); with long
    words, at the middle word boundary."""
    cuts = [p for p in range(len(ref))
            if ref[p].isspace() and 0.3 * len(ref) <= p <= 0.7 * len(ref) and ref[:p].strip()]
    if not cuts:
        cuts = [p for p in range(1, len(ref)) if ref[p].isspace() and ref[:p].strip()]
        cuts = [cuts[len(cuts) // 2]]
    return ref[:cuts[int(rng.integers(len(cuts)))]].rstrip()


def off_topic(convs, ci, ref, asst, rng):
    """A reply of another dialogue with another opening (and another text than ref)."""
    opening = convs[ci]["messages"][0]["content"]
    for _ in range(10000):
        cj = int(rng.integers(len(convs)))
        other = convs[cj]["messages"]
        reply = other[asst[cj][int(rng.integers(len(asst[cj])))]]["reference"]
        if cj != ci and other[0]["content"] != opening and reply != ref:
            return reply
    raise BenchError("inject: off_topic needs dialogues with other openings and other replies")
