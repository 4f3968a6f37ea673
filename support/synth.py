"""The synthetic noisy multi-turn benchmark: exact-match checkable dialogues, per-turn noise labels.

Two tasks with state accumulated over turns; each user message is one instruction, each assistant
reply is the current state (a number, or a comma-separated list):
  counter: "Keep a counter and reply with its value only. Start at 23." -> "23"; "Add 4." -> "27"
  list:    "Keep a shopping list and reply with the whole list only. Start with milk." -> "milk";
           "Add tea." -> "milk, tea"
Noise per assistant turn (noise_type): "wrong" (a plausible wrong state), "off_topic" (a reply
taken from a dialogue of the other task), "truncated" (the reply cut inside a word),
"state_error" (a wrong state that the following turns build on: they are consistent with it,
labelled "propagated" while they differ from the truth), and, only when asked for in kinds (it is
not in the default mix), "echo" (the reply repeats the user's message, exactly or as a near copy:
lower case, or without its final period).
Every assistant message carries noisy, noise_type and reference (the true answer), in the
conversation format of support/conversations.py. The train tiers H/N/L share the same dialogues
and differ only in injected noise; test.jsonl is clean and disjoint from train.

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


# Per-turn injection rates; the realized noisy turns are about 24 % (N) and 54 % (L).
SYNTH_RATES = {"H": 0.0, "N": 0.2, "L": 0.5}
SYNTH_KINDS = {"wrong": 0.3, "off_topic": 0.2, "truncated": 0.2, "state_error": 0.3}
KINDS = (*SYNTH_KINDS, "echo")  # echo is opt-in: the default mix and its files leave it out
TASKS = ("counter", "list")
PROFILES = ("flat", "late", "early")
ITEMS = ("milk", "eggs", "bread", "rice", "tea", "jam", "fish", "soap", "salt", "corn", "beans",
         "apples")
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
    """The state after one instruction."""
    if op == "start":
        return arg if task == "counter" else [arg]
    if task == "counter":
        return state + arg if op == "add" else state - arg
    if op == "add":
        return state if arg in state else state + [arg]
    return [x for x in state if x != arg]


def _show(task, state):
    """A state as the assistant writes it."""
    if task == "counter":
        return str(state)
    return ", ".join(state) or "(empty)"


def _counter_ops(rng, n_turns):
    value = rng.randint(10, 60)
    ops = [("start", value)]
    for _ in range(n_turns - 1):
        op = rng.choice([o for o, ok in (("add", value < 99), ("sub", value > 10)) if ok])
        room = 99 - value if op == "add" else value - 10
        step = rng.randint(1, min(9, room))
        value = value + step if op == "add" else value - step
        ops.append((op, step))
    return ops


def _list_ops(rng, n_turns):
    items = [rng.choice(ITEMS)]
    ops = [("start", items[0])]
    for _ in range(n_turns - 1):
        grow = len(items) < 2 or (len(items) < 4 and rng.random() < 0.6)
        if grow:
            item = rng.choice([i for i in ITEMS if i not in items])
            items = items + [item]
            ops.append(("add", item))
        else:
            item = rng.choice(items)
            items = [i for i in items if i != item]
            ops.append(("remove", item))
    return ops


def _make_dialogue(rng, task, n_turns):
    ops = _counter_ops(rng, n_turns) if task == "counter" else _list_ops(rng, n_turns)
    users = [rng.choice(PHRASES[task, op]).format(arg) for op, arg in ops]
    return {"task": task, "ops": ops, "users": users}


def _near_state(task, state, rng):
    """A state one small edit away from `state` (None where the edit does not apply)."""
    if task == "counter":
        new = state + rng.choice((-1, 1)) * rng.randint(1, 9)
        return new if new >= 0 else None
    how = rng.choice(("replace", "drop", "extra"))
    others = [i for i in ITEMS if i not in state]
    if how == "replace" and state:
        new = list(state)
        new[rng.randrange(len(new))] = rng.choice(others)
        return new
    if how == "drop" and len(state) >= 2:
        new = list(state)
        del new[rng.randrange(len(new))]
        return new
    return state + [rng.choice(others)]


def _corrupt(task, state, rng, avoid):
    """A state near `state` whose shown form is not in `avoid` (None if none found)."""
    for _ in range(50):
        new = _near_state(task, state, rng)
        if new is not None and _show(task, new) not in avoid:
            return new
    return None


def _truncate(text, rng, avoid):
    """text cut inside a word, at a cut not in `avoid` (None if there is none)."""
    cuts = [c for c in range(1, len(text))
            if text[c - 1].isalnum() and text[c].isalnum() and text[:c] not in avoid]
    return text[:rng.choice(cuts)] if cuts else None


def _turn_rate(rate, profile, k, n):
    """Injection probability of assistant turn k (1-based) of n; the profiles keep the mean rate
    (before the cap)."""
    weight = {"flat": 1.0, "late": 2 * k / (n + 1), "early": 2 * (n + 1 - k) / (n + 1)}[profile]
    return min(1.0, rate * weight)


def _echo(user, rng, avoid):
    """The user's message as the reply: exactly, in lower case, or without its final period."""
    forms = [user, user.lower(), user.rstrip(".")]
    cand = [f for i, f in enumerate(forms) if f and f not in avoid and f not in forms[:i]]
    return rng.choice(cand) if cand else None


def _off_topic(task, rng, avoid, pool):
    """A clean reply of the other task's dialogues (of this task's where none differs)."""
    cand = [r for t, replies in pool.items() if t != task for r in replies if r not in avoid]
    if not cand:
        cand = [r for r in pool[task] if r not in avoid]
    return rng.choice(cand) if cand else None


def _draw_kind(kinds, rng, last_turn):
    """A noise kind by weight; state_error only where a later turn can build on it."""
    choices = [(c, w) for c, w in kinds.items() if w > 0 and (c != "state_error" or not last_turn)]
    if not choices:
        return None
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _noisy_turns(dlg, rate, profile, kinds, rng, pool):
    """Assistant messages of one dialogue with noise injected (pool: task -> clean replies of all
    dialogues)."""
    task = dlg["task"]
    ops = dlg["ops"]
    true = None  # the true state
    shown = None  # the state the dialogue's replies build on
    out = []
    for k, (op, arg) in enumerate(ops, 1):
        true = _apply(task, true, op, arg)
        shown = _apply(task, shown, op, arg)
        ref = _show(task, true)
        reply = _show(task, shown)
        kind = None
        if rng.random() < _turn_rate(rate, profile, k, len(ops)):
            kind = _draw_kind(kinds, rng, k == len(ops))
            avoid = {ref, reply}
            new = None
            if kind == "truncated":
                new = _truncate(reply, rng, avoid)
            elif kind == "echo":
                new = _echo(dlg["users"][k - 1], rng, avoid)
            elif kind == "off_topic":
                new = _off_topic(task, rng, avoid, pool)
            if new is None and kind is not None:  # wrong, state_error, or a fallback to wrong
                kind = "state_error" if kind == "state_error" else "wrong"
                state = _corrupt(task, shown, rng, avoid)
                if state is not None:
                    new = _show(task, state)
                    if kind == "state_error":
                        shown = state
            if new is None:
                kind = None
            else:
                reply = new
        if kind is None and reply != ref:
            kind = "propagated"
        out.append({"role": "assistant", "content": reply, "noisy": kind is not None,
                    "noise_type": kind, "reference": ref})
    return out


def _record(rid, tier, dlg, assistants):
    msgs = [m for u, a in zip(dlg["users"], assistants)
            for m in ({"role": "user", "content": u}, a)]
    return {"id": rid, "source": "synth", "task": dlg["task"], "tier": tier,
            "n_noisy": sum(a["noisy"] for a in assistants), "messages": msgs}


def _check_settings(n_train, n_test, min_turns, max_turns, rates, profile, kinds, tasks):
    if n_train < 1 or n_test < 0 or any(not 0 <= r <= 1 for r in rates.values()) \
            or any(not w >= 0 for w in kinds.values()):
        raise SynthError(f"synth: need n_train >= 1, n_test >= 0, rates in [0, 1] and kind "
                         f"weights >= 0, got n_train={n_train}, n_test={n_test}, rates={rates}, "
                         f"kinds={kinds}")
    if profile not in PROFILES:
        raise SynthError(f"profile must be flat, late or early, got {profile!r}")
    if not 1 <= min_turns <= max_turns or not tasks or set(tasks) - set(TASKS) \
            or set(kinds) - set(KINDS):
        raise SynthError("synth: need 1 <= min_turns <= max_turns, tasks from counter/list, "
                         "kinds from " + ", ".join(KINDS))


def _test_dialogues(seed, n_test, min_turns, max_turns, tasks, seen):
    """n_test dialogues none of whose user turns repeat a train dialogue's, and their generator."""
    rng = random.Random(f"synth-{seed}-test")
    test = []
    tries = 0
    while len(test) < n_test:
        d = _make_dialogue(rng, rng.choice(tasks), rng.randint(min_turns, max_turns))
        tries += 1
        if tuple(d["users"]) not in seen:
            seen.add(tuple(d["users"]))
            test.append(d)
        elif tries > 100 * (n_test + 10):
            raise SynthError("synth: cannot find enough test dialogues disjoint from train; "
                             "use fewer")
    return test, rng


def synth(out_dir, seed=42, n_train=2000, n_test=200, min_turns=2, max_turns=5, rates=None,
          profile="late", kinds=None, tasks=TASKS):
    """Write train_H.jsonl, train_N.jsonl, train_L.jsonl (same dialogues, noise at rates[tier] per
    assistant turn, shaped by profile "flat" | "late" | "early") and a clean test.jsonl; returns
    (and writes synth_meta.json) the settings and realized noise statistics. Deterministic given
    the arguments."""
    rates = dict(SYNTH_RATES if rates is None else rates)
    kinds = dict(SYNTH_KINDS if kinds is None else kinds)
    _check_settings(n_train, n_test, min_turns, max_turns, rates, profile, kinds, tasks)
    out_dir = Path(out_dir)
    rng = random.Random(f"synth-{seed}-dialogues")
    train = [_make_dialogue(rng, rng.choice(tasks), rng.randint(min_turns, max_turns))
             for _ in range(n_train)]
    seen = {tuple(d["users"]) for d in train}
    test, test_rng = _test_dialogues(seed, n_test, min_turns, max_turns, tasks, seen)
    pool = {t: sorted({_show(t, s) for d in train if d["task"] == t for s in _states(d)})
            for t in tasks}
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "min_turns": min_turns,
            "max_turns": max_turns, "rates": rates, "profile": profile, "kinds": kinds,
            "tasks": list(tasks), "tiers": {}}
    for tier, rate in rates.items():
        noise_rng = random.Random(f"synth-{seed}-noise-{tier}")
        recs = [_record(f"train-{i:05d}", tier, d,
                        _noisy_turns(d, rate, profile, kinds, noise_rng, pool))
                for i, d in enumerate(train)]
        save_jsonl(recs, out_dir / f"train_{tier}.jsonl")
        meta["tiers"][tier] = _noise_stats(recs)
    clean = {k: 0.0 for k in kinds}
    recs = [_record(f"test-{i:05d}", "test", d, _noisy_turns(d, 0.0, "flat", clean, test_rng, pool))
            for i, d in enumerate(test)]
    save_jsonl(recs, out_dir / "test.jsonl")
    (out_dir / "synth_meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _states(dlg):
    state = None
    for op, arg in dlg["ops"]:
        state = _apply(dlg["task"], state, op, arg)
        yield state


def _noise_stats(recs):
    turns = [(k, m) for r in recs
             for k, m in enumerate((m for m in r["messages"] if m["role"] == "assistant"), 1)]
    by_kind = {}
    by_turn = {}  # turn -> (turns, noisy turns)
    for k, m in turns:
        if m["noisy"]:
            by_kind[m["noise_type"]] = by_kind.get(m["noise_type"], 0) + 1
        n, noisy = by_turn.get(k, (0, 0))
        by_turn[k] = (n + 1, noisy + m["noisy"])
    noisy = sum(m["noisy"] for _, m in turns)
    fraction_by_turn = {k: round(x / n, 4) for k, (n, x) in sorted(by_turn.items())}
    return {"dialogues": len(recs), "turns": len(turns), "noisy_turns": noisy,
            "noisy_fraction": round(noisy / max(1, len(turns)), 4),
            "noisy_dialogues": sum(r["n_noisy"] > 0 for r in recs), "by_kind": by_kind,
            "noisy_fraction_by_turn": fraction_by_turn}


def parse_kinds(text):
    """"wrong=0.3,echo=0.2" -> {"wrong": 0.3, "echo": 0.2}; None -> None (the default mix)."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight)
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
        p.add_argument(f"--rate-{tier}", type=float, default=r,
                       help=f"per-turn noise rate of tier {tier}")
    p.add_argument("--profile", default="late", choices=PROFILES)
    p.add_argument("--tasks", default="counter,list")
    default_mix = ",".join(f"{k}={w}" for k, w in SYNTH_KINDS.items())
    p.add_argument("--kinds", help="noise kinds and weights, e.g. wrong=0.3,off_topic=0.2,echo=0.2 "
                                   f"(default: {default_mix}; echo is only used when named)")
    a = p.parse_args(argv)
    rates = {t: getattr(a, f"rate_{t}") for t in SYNTH_RATES}
    try:
        meta = synth(a.out, a.seed, a.n_train, a.n_test, a.min_turns, a.max_turns, rates,
                     a.profile, parse_kinds(a.kinds), tuple(a.tasks.split(",")))
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
