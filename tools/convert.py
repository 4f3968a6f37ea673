"""Public multi-turn dialogue sets -> data.py's conversation format (OpenAI `messages`).

Each converter maps one parsed record to a conversation, or to a string saying what is wrong with it; data.py's
`convert` reads the file, validates what comes out and counts (or refuses) the rest:

    python data.py convert --format hh|mtbench101 IN OUT.jsonl [--on-bad-sample error|skip]
"""
import re

HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ?")


def from_mtbench101(obj, row):
    """MT-Bench-101 {"task", "id", "history": [{"user", "bot"}]} -> a conversation (source "mt-bench-101")."""
    if not isinstance(obj, dict) or not isinstance(obj.get("history"), list):
        return "record has no 'history' list"
    if not all(isinstance(h, dict) and "user" in h and "bot" in h for h in obj["history"]):
        return "history entries must be {'user', 'bot'} objects"
    msgs = [m for h in obj["history"] for m in ({"role": "user", "content": h["user"]},
                                                 {"role": "assistant", "content": h["bot"]})]
    return {"messages": msgs, **{k: v for k, v in obj.items() if k != "history"}, "source": "mt-bench-101"}


def from_hh_rlhf(obj, row, field="chosen"):
    """Anthropic HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."} -> a conversation, id "hh-<row>".
    Turns are split on "\\n\\nHuman: " / "\\n\\nAssistant: " and stripped; a row with two Assistant turns in a row
    then fails validation as "roles not alternating", an empty Assistant turn as "empty content"."""
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return f"record has no string '{field}'"
    parts = HH_SPLIT.split(text)
    if parts[0].strip():
        return "text before the first 'Human:'"
    role = {"Human": "user", "Assistant": "assistant"}
    return {"messages": [{"role": role[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])],
            "id": f"hh-{row}", "source": "hh-rlhf"}


CONVERTERS = {"hh": from_hh_rlhf, "mtbench101": from_mtbench101}
