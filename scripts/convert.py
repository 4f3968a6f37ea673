"""Public multi-turn dialogue sets -> the conversation format (OpenAI `messages`).

Each converter maps one parsed record to a conversation, or to a string saying what is wrong with
it; this program reads the file, validates what comes out (support/conversations.py) and counts
(or refuses) the rest:

    python scripts/convert.py --format hh|mtbench101 IN OUT.jsonl [--on-bad-sample error|skip]
"""
import argparse
import os
import re
import sys

HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def from_mtbench101(obj, row):
    """MT-Bench-101 {"task", "id", "history": [{"user", "bot"}]} -> a conversation (source
    "mt-bench-101")."""
    if not isinstance(obj, dict) or not isinstance(obj.get("history"), list):
        return "record has no 'history' list"
    if not all(isinstance(h, dict) and "user" in h and "bot" in h for h in obj["history"]):
        return "history entries must be {'user', 'bot'} objects"
    msgs = []
    for h in obj["history"]:
        msgs.append({"role": "user", "content": h["user"]})
        msgs.append({"role": "assistant", "content": h["bot"]})
    extra = {k: v for k, v in obj.items() if k != "history"}
    return {"messages": msgs, **extra, "source": "mt-bench-101"}


def from_hh_rlhf(obj, row, field="chosen"):
    """Anthropic HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."} -> a conversation,
    id "hh-<row>". Turns are split on "\\n\\nHuman: " / "\\n\\nAssistant: " and stripped; a row
    with two Assistant turns in a row then fails validation as "roles not alternating", an empty
    Assistant turn as "empty content"."""
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return f"record has no string '{field}'"
    parts = HH_SPLIT.split(text)
    if parts[0].strip():
        return "text before the first 'Human:'"
    msgs = [{"role": HH_ROLES[speaker], "content": turn.strip()}
            for speaker, turn in zip(parts[1::2], parts[2::2])]
    return {"messages": msgs, "id": f"hh-{row}", "source": "hh-rlhf"}


CONVERTERS = {"hh": from_hh_rlhf, "mtbench101": from_mtbench101}


def convert(path, fmt, on_bad_sample="skip", report=None):
    """A public dialogue file -> validated conversations (bad rows counted and reported as
    support.conversations.validate does)."""
    from support.conversations import BadSample, iter_json_records, validate

    def rows():
        for row, (where, obj) in enumerate(iter_json_records(path)):
            if isinstance(obj, BadSample):
                yield where, obj
                continue
            rec = CONVERTERS[fmt](obj, row)
            if isinstance(rec, str):
                rec = BadSample(where, "unknown format", rec)
            yield where, rec
    return validate(path, rows(), on_bad_sample, report)


def main(argv=None):
    from support.conversations import DataError, save_jsonl
    p = argparse.ArgumentParser(prog="scripts/convert.py",
                                description="convert public dialogues to OpenAI-form JSONL")
    p.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    p.add_argument("--on-bad-sample", default="skip", choices=("error", "skip"))
    p.add_argument("inp")
    p.add_argument("out")
    a = p.parse_args(argv)
    try:
        convs = convert(a.inp, a.format, on_bad_sample=a.on_bad_sample)
        if not convs:
            raise DataError(f"{a.inp}: no conversation could be converted; {a.out} not written")
        save_jsonl(convs, a.out)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {len(convs)} conversations")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
