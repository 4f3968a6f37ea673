"""The synthetic noisy multi-turn benchmark: exact-match checkable dialogues with per-turn noise labels.

Two tasks with state accumulated over turns; each user message is one instruction, each assistant reply is the
current state (a number, or a comma-separated list):
  counter: "Keep a counter and reply with its value only. Start at 23." -> "23"; "Add 4." -> "27"; ...
  list:    "Keep a shopping list and reply with the whole list only. Start with milk." -> "milk"; "Add tea." ...
Noise per assistant turn (noise_type): "wrong" (a plausible wrong state), "off_topic" (a reply taken from a
dialogue of the other task), "truncated" (the reply cut inside a word), "state_error" (a wrong state that the
following turns build on: they are consistent with it, labelled "propagated" while they differ from the truth),
and, only when asked for in kinds (it is not in the default mix), "echo" (the reply repeats the user's message,
exactly or as a near copy: lower case, or without its final period).
Every assistant message carries noisy, noise_type and reference (the true answer), in data.py's conversation
format. The train tiers H/N/L share the same dialogues and differ only in injected noise; test.jsonl is clean
and disjoint from train.

    python support/synth.py --out DIR [--seed 42 --n-train 2000 --n-test 200 --rate-N 0.2 ...]
"""
import argparse
import json
import random
import sys
from pathlib import Path


class SynthError(ValueError):
    """A setting the generator cannot honour; the message is one line."""


def save_jsonl(records, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


SYNTH_RATES = {"H": 0.0, "N": 0.2, "L": 0.5}  # per-turn injection rates; realized noisy turns ~24% / ~54%
SYNTH_KINDS = {"wrong": 0.3, "off_topic": 0.2, "truncated": 0.2, "state_error": 0.3}
KINDS = (*SYNTH_KINDS, "echo")  # echo is opt-in, so the default mix (and its files) stays what it was
ITEMS = ("milk", "eggs", "bread", "rice", "tea", "jam", "fish", "soap", "salt", "corn", "beans", "apples")
PHRASES = {
    ("counter", "start"): ("Keep a counter and reply with its value only. Start at {}.",
                           "Start a counter at {} and reply with its value only."),
    ("counter", "add"): ("Add {}.", "Increase it by {}.", "Plus {}."),
    ("counter", "sub"): ("Subtract {}.", "Decrease it by {}.", "Minus {}."),
    ("list", "start"): ("Keep a shopping list and reply with the whole list only. Start with {}.",
                        "Start a shopping list with {} and reply with the whole list only."),
    ("list", "add"): ("Add {}.", "Also add {}.", "Put {} on the list."),
    ("list", "remove"): ("Remove {}.", "Take {} off the list.", "Drop {}."),
}


def _apply(task, state, op, arg):
    if op == "start":
        return arg if task == "counter" else [arg]
    if task == "counter":
        return state + arg if op == "add" else state - arg
    if op == "add":
        return state if arg in state else state + [arg]
    return [x for x in state if x != arg]


def _show(task, state):
    return str(state) if task == "counter" else (", ".join(state) or "(empty)")


def _make_dialogue(rng, task, n_turns):
    if task == "counter":
        v = rng.randint(10, 60)
        ops = [("start", v)]
        for _ in range(n_turns - 1):
            op = rng.choice([o for o, ok in (("add", v < 99), ("sub", v > 10)) if ok])
            d = rng.randint(1, min(9, 99 - v if op == "add" else v - 10))
            v = v + d if op == "add" else v - d
            ops.append((op, d))
    else:
        cur = [rng.choice(ITEMS)]
        ops = [("start", cur[0])]
        for _ in range(n_turns - 1):
            op = "add" if len(cur) < 2 or (len(cur) < 4 and rng.random() < 0.6) else "remove"
            x = rng.choice([i for i in ITEMS if i not in cur]) if op == "add" else rng.choice(cur)
            cur = cur + [x] if op == "add" else [i for i in cur if i != x]
            ops.append((op, x))
    users = [rng.choice(PHRASES[task, op]).format(arg) for op, arg in ops]
    return {"task": task, "ops": ops, "users": users}


def _corrupt(task, state, rng, avoid):
    """A state near `state` whose shown form is not in `avoid` (None if none found)."""
    for _ in range(50):
        if task == "counter":
            new = state + rng.choice((-1, 1)) * rng.randint(1, 9)
            if new < 0:
                continue
        else:
            how = rng.choice(("replace", "drop", "extra"))
            others = [i for i in ITEMS if i not in state]
            if how == "replace" and state:
                new = list(state)
                new[rng.randrange(len(new))] = rng.choice(others)
            elif how == "drop" and len(state) >= 2:
                new = list(state)
                del new[rng.randrange(len(new))]
            else:
                new = state + [rng.choice(others)]
        if _show(task, new) not in avoid:
            return new
    return None


def _truncate(text, rng, avoid):
    cuts = [c for c in range(1, len(text)) if text[c - 1].isalnum() and text[c].isalnum() and text[:c] not in avoid]
    return text[:rng.choice(cuts)] if cuts else None


def _turn_rate(rate, profile, k, n):
    """Injection probability of assistant turn k (1-based) of n; the profiles keep the mean rate (before the cap)."""
    w = {"flat": 1.0, "late": 2 * k / (n + 1), "early": 2 * (n + 1 - k) / (n + 1)}[profile]
    return min(1.0, rate * w)


def _echo(user, rng, avoid):
    """The user's message as the reply: exactly, in lower case, or without its final period."""
    forms = [user, user.lower(), user.rstrip(".")]
    cand = [f for i, f in enumerate(forms) if f and f not in avoid and f not in forms[:i]]
    return rng.choice(cand) if cand else None


def _noisy_turns(dlg, rate, profile, kinds, rng, pool):
    """Assistant messages of one dialogue with noise injected (pool: task -> clean replies of all dialogues)."""
    task, ops, n = dlg["task"], dlg["ops"], len(dlg["ops"])
    true = shown = None  # the true state, and the state the dialogue's replies build on
    out = []
    for k, (op, arg) in enumerate(ops, 1):
        true, shown = _apply(task, true, op, arg), _apply(task, shown, op, arg)
        ref, reply, kind = _show(task, true), _show(task, shown), None
        if rng.random() < _turn_rate(rate, profile, k, n):
            choices = [(c, w) for c, w in kinds.items() if w > 0 and (c != "state_error" or k < n)]
            kind = rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0] if choices else None
            avoid, new = {ref, reply}, None
            if kind == "truncated":
                new = _truncate(reply, rng, avoid)
            elif kind == "echo":
                new = _echo(dlg["users"][k - 1], rng, avoid)
            elif kind == "off_topic":
                cand = [r for r in sum((v for t, v in pool.items() if t != task), []) if r not in avoid] \
                    or [r for r in pool[task] if r not in avoid]
                new = rng.choice(cand) if cand else None
            if new is None and kind is not None:  # wrong, state_error, or the fallback of truncated / off_topic
                kind = "state_error" if kind == "state_error" else "wrong"
                state = _corrupt(task, shown, rng, avoid)
                if state is not None:
                    new = _show(task, state)
                    shown = state if kind == "state_error" else shown
            if new is None:
                kind = None
            else:
                reply = new
        if kind is None and reply != ref:
            kind = "propagated"
        out.append({"role": "assistant", "content": reply, "noisy": kind is not None, "noise_type": kind,
                    "reference": ref})
    return out


def _record(rid, tier, dlg, assistants):
    msgs = [m for u, a in zip(dlg["users"], assistants) for m in ({"role": "user", "content": u}, a)]
    return {"id": rid, "source": "synth", "task": dlg["task"], "tier": tier,
            "n_noisy": sum(a["noisy"] for a in assistants), "messages": msgs}


def synth(out_dir, seed=42, n_train=2000, n_test=200, min_turns=2, max_turns=5, rates=None, profile="late",
          kinds=None, tasks=("counter", "list")):
    """Write train_H.jsonl, train_N.jsonl, train_L.jsonl (same dialogues, noise at rates[tier] per assistant turn,
    shaped by profile "flat" | "late" | "early") and a clean test.jsonl; returns (and writes synth_meta.json)
    the settings and realized noise statistics. Deterministic given the arguments."""
    rates = dict(SYNTH_RATES if rates is None else rates)
    kinds = dict(SYNTH_KINDS if kinds is None else kinds)
    if n_train < 1 or n_test < 0 or any(not 0 <= r <= 1 for r in rates.values()) or \
            any(not w >= 0 for w in kinds.values()):
        raise SynthError(f"synth: need n_train >= 1, n_test >= 0, rates in [0, 1] and kind weights >= 0, got "
                         f"n_train={n_train}, n_test={n_test}, rates={rates}, kinds={kinds}")
    if profile not in ("flat", "late", "early"):
        raise SynthError(f"profile must be flat, late or early, got {profile!r}")
    if not 1 <= min_turns <= max_turns or not tasks or set(tasks) - {"counter", "list"} \
            or set(kinds) - set(KINDS):
        raise SynthError("synth: need 1 <= min_turns <= max_turns, tasks from counter/list, kinds from "
                        + ", ".join(KINDS))
    out_dir = Path(out_dir)
    rng = random.Random(f"synth-{seed}-dialogues")
    train = [_make_dialogue(rng, rng.choice(tasks), rng.randint(min_turns, max_turns)) for _ in range(n_train)]
    seen = {tuple(d["users"]) for d in train}
    test, trng, tries = [], random.Random(f"synth-{seed}-test"), 0
    while len(test) < n_test:
        d = _make_dialogue(trng, trng.choice(tasks), trng.randint(min_turns, max_turns))
        tries += 1
        if tuple(d["users"]) not in seen:
            seen.add(tuple(d["users"]))
            test.append(d)
        elif tries > 100 * (n_test + 10):
            raise SynthError("synth: cannot find enough test dialogues disjoint from train; use fewer")
    pool = {t: sorted({_show(t, s) for d in train if d["task"] == t for s in _states(d)}) for t in tasks}
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "min_turns": min_turns, "max_turns": max_turns,
            "rates": rates, "profile": profile, "kinds": kinds, "tasks": list(tasks), "tiers": {}}
    for tier, rate in rates.items():
        trng2 = random.Random(f"synth-{seed}-noise-{tier}")
        recs = [_record(f"train-{i:05d}", tier, d, _noisy_turns(d, rate, profile, kinds, trng2, pool))
                for i, d in enumerate(train)]
        save_jsonl(recs, out_dir / f"train_{tier}.jsonl")
        meta["tiers"][tier] = _noise_stats(recs)
    clean = {k: 0.0 for k in kinds}
    recs = [_record(f"test-{i:05d}", "test", d, _noisy_turns(d, 0.0, "flat", clean, trng, pool))
            for i, d in enumerate(test)]
    save_jsonl(recs, out_dir / "test.jsonl")
    (out_dir / "synth_meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _states(dlg):
    s = None
    for op, arg in dlg["ops"]:
        s = _apply(dlg["task"], s, op, arg)
        yield s


def _noise_stats(recs):
    turns = [(k, m) for r in recs for k, m in enumerate((m for m in r["messages"] if m["role"] == "assistant"), 1)]
    by_kind, by_turn = {}, {}
    for k, m in turns:
        if m["noisy"]:
            by_kind[m["noise_type"]] = by_kind.get(m["noise_type"], 0) + 1
        n, x = by_turn.get(k, (0, 0))
        by_turn[k] = (n + 1, x + m["noisy"])
    noisy = sum(m["noisy"] for _, m in turns)
    return {"dialogues": len(recs), "turns": len(turns), "noisy_turns": noisy,
            "noisy_fraction": round(noisy / max(1, len(turns)), 4),
            "noisy_dialogues": sum(r["n_noisy"] > 0 for r in recs), "by_kind": by_kind,
            "noisy_fraction_by_turn": {k: round(x / n, 4) for k, (n, x) in sorted(by_turn.items())}}


def parse_kinds(text):
    """"wrong=0.3,echo=0.2" -> {"wrong": 0.3, "echo": 0.2}; None -> None (the default mix)."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise SynthError(f"--kinds: {part!r} is not NAME=WEIGHT") from None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--min-turns", type=int, default=2)
    p.add_argument("--max-turns", type=int, default=5)
    for tier, r in SYNTH_RATES.items():
        p.add_argument(f"--rate-{tier}", type=float, default=r, help=f"per-turn noise rate of tier {tier}")
    p.add_argument("--profile", default="late", choices=("flat", "late", "early"))
    p.add_argument("--tasks", default="counter,list")
    p.add_argument("--kinds", help="noise kinds and weights, e.g. wrong=0.3,off_topic=0.2,echo=0.2 (default: "
                   + ",".join(f"{k}={w}" for k, w in SYNTH_KINDS.items()) + "; echo is only used when named)")
    a = p.parse_args(argv)
    try:
        meta = synth(a.out, a.seed, a.n_train, a.n_test, a.min_turns, a.max_turns,
                     {t: getattr(a, f"rate_{t}") for t in SYNTH_RATES}, a.profile, parse_kinds(a.kinds),
                     tuple(a.tasks.split(",")))
    except (SynthError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    for tier, st in meta["tiers"].items():
        print(f"train_{tier}.jsonl: {st['dialogues']} dialogues, {st['turns']} turns, "
              f"noisy {st['noisy_fraction']:.1%} {st['by_kind']}")
    print(f"test.jsonl: {a.n_test} clean dialogues -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
