"""Conversation files: reading, validation with one-line errors, writing. data.py re-exports what it uses.

Format: {"messages": [{"role": "system"|"user"|"assistant", "content": str, ...}], ...} (OpenAI) or ShareGPT
{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}, in JSONL or a JSON array, .gz too; extra
fields are kept. Validation reasons: invalid json, not utf-8, unknown format, empty conversation, unknown role,
non-string content, empty content (a user or assistant message that is blank), roles not alternating (user /
assistant after an optional leading system message), no assistant turn. A bad record is "FILE:LINE: reason:
detail" ("FILE[i]: ..." in a JSON array); on_bad_sample="skip" drops it, counts it per reason and says so in one line.
"""
import gzip
import json
import sys
import zlib
from pathlib import Path

import numpy as np

class DataError(ValueError):
    """Any bad input handled by this module; the message is one line."""


class BadSample(DataError):
    def __init__(self, where, reason, detail):
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: {reason}: {detail}")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _read_bytes(path):
    """The file's bytes (gunzipped for .gz), or one DataError line naming it."""
    try:
        if Path(path).suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{path}: cannot be read, truncated or corrupt ({type(e).__name__}: {e})") from None


def iter_json_records(path):
    """Yield (where, obj) for a JSONL or JSON-array file; obj is a BadSample for a line that does not parse."""
    raw = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
    if raw.lstrip().startswith(b"["):  # one JSON value: nothing can be skipped
        try:
            arr = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise BadSample(f"{path}:{line}", "not utf-8", f"byte {e.start + 1} in a JSON array file") from None
        except json.JSONDecodeError as e:
            raise BadSample(f"{path}:{e.lineno}", "invalid json", f"{e.msg} (column {e.colno}) in JSON array file")
        except RecursionError:
            raise BadSample(str(path), "invalid json", "nested too deeply") from None
        yield from ((f"{path}[{i}]", obj) for i, obj in enumerate(arr))
        return
    for lineno, line in enumerate(raw.split(b"\n"), 1):  # at \n only: U+2028, \x85, ... may sit inside a string
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, BadSample(where, "not utf-8", f"byte {e.start + 1} of the line is not UTF-8")
        except json.JSONDecodeError as e:
            yield where, BadSample(where, "invalid json", f"{e.msg} (column {e.colno})")
        except RecursionError:
            yield where, BadSample(where, "invalid json", "nested too deeply")


def normalize_record(obj, where):
    """Validate one record (OpenAI or ShareGPT) and return it in OpenAI form with extra fields kept."""
    if not isinstance(obj, dict):
        raise BadSample(where, "unknown format", f"record is {type(obj).__name__}, expected an object")
    if "messages" in obj:
        key, rkey, ckey, rolemap = "messages", "role", "content", {r: r for r in ("system", "user", "assistant")}
    elif "conversations" in obj:
        key, rkey, ckey, rolemap = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise BadSample(where, "unknown format", "record has neither 'messages' nor 'conversations'")
    raw = obj[key]
    if not isinstance(raw, list):
        raise BadSample(where, "unknown format", f"'{key}' is {type(raw).__name__}, expected a list")
    if not raw:
        raise BadSample(where, "empty conversation", f"'{key}' is empty")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadSample(where, "unknown format", f"message {i} is {type(m).__name__}, expected an object")
        if rkey not in m or ckey not in m:
            raise BadSample(where, "unknown format", f"message {i} lacks '{rkey}' or '{ckey}'")
        role = rolemap.get(m[rkey]) if isinstance(m[rkey], str) else None
        if role is None:
            raise BadSample(where, "unknown role", f"message {i} has {rkey} {m[rkey]!r}, expected one of "
                                                   f"{', '.join(rolemap)}")
        if not isinstance(m[ckey], str):
            raise BadSample(where, "non-string content", f"message {i} ({role}) content is {type(m[ckey]).__name__}")
        if role != "system" and not m[ckey].strip():
            raise BadSample(where, "empty content", f"message {i} ({role}) is empty")
        if "train" in m and not isinstance(m["train"], bool):
            raise BadSample(where, "unknown format", f"message {i} has train {m['train']!r}, expected true or false")
        extra = {k: v for k, v in m.items() if k not in (rkey, ckey, "role", "content")}
        if "weight" in m and role == "assistant":  # OpenAI's fine-tuning format: weight 0 = context only
            if type(m["weight"]) is not int or m["weight"] not in (0, 1) or m.get("train", m["weight"]) != m["weight"]:
                raise BadSample(where, "unknown format", f"message {i} has weight {m['weight']!r}, expected 0 or 1 "
                                "(and no contrary \"train\")")
            extra["train"] = bool(m["weight"])
        msgs.append({"role": role, "content": m[ckey], **extra})
    off = 1 if msgs[0]["role"] == "system" else 0
    if len(msgs) == off:
        raise BadSample(where, "empty conversation", "only a system message")
    for j, m in enumerate(msgs[off:]):
        if m["role"] != ("user" if j % 2 == 0 else "assistant"):
            raise BadSample(where, "roles not alternating", f"message {j + off} is {m['role']}, expected "
                            f"{'user' if j % 2 == 0 else 'assistant'} (user/assistant alternate after an optional "
                            "leading system message)")
    if len(msgs) - off < 2:
        raise BadSample(where, "no assistant turn", "conversation has no assistant message")
    return {"messages": msgs, **{k: v for k, v in obj.items() if k != key}}


def validate(path, rows, on_bad_sample="error", report=None):
    """normalize_record over (where, obj) rows: "error" raises the first BadSample, "skip" drops and counts it.
    `report` (a dict) gets {"path", "records", "kept", "skipped", "reasons": {reason: n}, "bad": [messages]}."""
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    rep, out = {"path": str(path), "records": 0, "kept": 0, "skipped": 0, "reasons": {}, "bad": []}, []
    for where, obj in rows:
        rep["records"] += 1
        try:
            if isinstance(obj, BadSample):
                raise obj
            out.append(normalize_record(obj, where))
        except BadSample as e:
            if on_bad_sample == "error":
                raise
            rep["skipped"] += 1
            rep["reasons"][e.reason] = rep["reasons"].get(e.reason, 0) + 1
            rep["bad"].append(str(e))
    rep["kept"] = len(out)
    if rep["skipped"]:
        why = ", ".join(f"{r} {n}" for r, n in sorted(rep["reasons"].items()))
        print(f"{path}: kept {rep['kept']} of {rep['records']} records, skipped {rep['skipped']} ({why})",
              file=sys.stderr)
    if report is not None:
        report.update(rep)
    return out


def load_conversations(path, on_bad_sample="error", report=None):
    """Read a JSONL / JSON-array (.gz ok) conversation file -> [{"messages": [...], **extra}] (see validate)."""
    return validate(path, iter_json_records(path), on_bad_sample, report)


def save_jsonl(records, path):
    """Write records as JSONL, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tmp.replace(path)


def read_scores(path, convs):
    """One quality score per conversation (higher is better): a number per line in conversation order, or JSON
    lines {"id", "score"} matched by the conversations' ids."""
    vals = []
    for n, r in enumerate(_read_bytes(path).decode("utf-8", errors="replace").split("\n"), 1):
        if not r.strip():
            continue
        try:
            vals.append(json.loads(r))
        except (ValueError, RecursionError):
            raise DataError(f"{path}:{n}: not a number or a JSON object: {r.strip()[:60]!r}") from None
    if vals and all(isinstance(v, dict) for v in vals):
        ids = [json.dumps(v.get("id"), sort_keys=True) for v in vals]
        if len(set(ids)) < len(ids):
            raise DataError(f"{path}: id {next(i for i in ids if ids.count(i) > 1)} has more than one score")
        vals = [dict(zip(ids, (v.get("score") for v in vals))).get(json.dumps(c.get("id"), sort_keys=True))
                for c in convs]
    elif len(vals) != len(convs):
        raise DataError(f"{path}: {len(vals)} scores for {len(convs)} conversations")
    bad = next((i for i, v in enumerate(vals) if isinstance(v, bool) or not isinstance(v, (int, float))
                or not -1e300 < v < 1e300), None)  # NaN and infinities fail the comparison
    if bad is not None:
        raise DataError(f"{path}: no finite numeric score for conversation {bad} (id {convs[bad].get('id')!r})")
    return np.asarray(vals, dtype=np.float64)
