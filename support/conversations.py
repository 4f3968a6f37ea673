"""Conversation files: reading, validation with one-line errors, writing.

Format: {"messages": [{"role": "system"|"user"|"assistant", "content": str, ...}], ...} (OpenAI)
or ShareGPT {"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}, in JSONL or a
JSON array, .gz too; extra fields are kept. A message's optional fields have fixed types: "train"
and "noisy" true or false, "noise_type" and "reasoning_content" a string or null, "reference" a
string, and an assistant message's "weight" 0 or 1 (OpenAI's fine-tuning format; 0 means "train":
false).

Validation reasons: invalid json; not utf-8 (bytes, or a string holding a lone surrogate such as
"\\ud800", which JSON accepts but no Unicode text holds); unknown format (an optional field of the
wrong type too); empty conversation; unknown role; non-string content; empty content (a user or
assistant message that is blank); roles not alternating (user / assistant after an optional
leading system message); no assistant turn. A bad record is "FILE:LINE: reason: detail"
("FILE[i]: ..." in a JSON array); on_bad_sample="skip" drops it, counts it per reason and says so
in one line.
"""
import gzip
import json
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Any bad input handled by this module; the message is one line."""


class BadSample(DataError):
    def __init__(self, where, reason, detail):
        self.where = where
        self.reason = reason
        self.detail = detail
        super().__init__(f"{where}: {reason}: {detail}")


OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# The list of messages of each format -> its role key, content key and roles.
FORMATS = {"messages": ("role", "content", OPENAI_ROLES),
           "conversations": ("from", "value", SHAREGPT_ROLES)}
# The optional message fields the code reads: name -> (accepted types, what an error expects).
FIELD_TYPES = {"train": ((bool,), "true or false"),
               "noisy": ((bool,), "true or false"),
               "noise_type": ((str, type(None)), "a string or null"),
               "reference": ((str,), "a string"),
               "reasoning_content": ((str, type(None)), "a string or null")}


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
        why = f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot be read, truncated or corrupt ({why})") from None


def iter_json_records(path):
    """Yield (where, obj) for a JSONL or JSON-array file; obj is a BadSample for a line that does
    not parse."""
    raw = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
    if raw.lstrip().startswith(b"["):
        yield from _json_array_records(path, raw)
        return
    # Records end at \n only: U+2028, \x85, ... may sit raw inside a string.
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            detail = f"byte {e.start + 1} of the line is not UTF-8"
            yield where, BadSample(where, "not utf-8", detail)
        except json.JSONDecodeError as e:
            yield where, BadSample(where, "invalid json", f"{e.msg} (column {e.colno})")
        except RecursionError:
            yield where, BadSample(where, "invalid json", "nested too deeply")


def _json_array_records(path, raw):
    """(where, obj) of each element of a JSON array file: one JSON value, so nothing can be
    skipped."""
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        detail = f"byte {e.start + 1} in a JSON array file"
        raise BadSample(f"{path}:{line}", "not utf-8", detail) from None
    except json.JSONDecodeError as e:
        detail = f"{e.msg} (column {e.colno}) in JSON array file"
        raise BadSample(f"{path}:{e.lineno}", "invalid json", detail) from None
    except RecursionError:
        raise BadSample(str(path), "invalid json", "nested too deeply") from None
    for i, obj in enumerate(records):
        yield f"{path}[{i}]", obj


def normalize_record(obj, where):
    """Validate one record (OpenAI or ShareGPT) and return it in OpenAI form with extra fields
    kept."""
    if not isinstance(obj, dict):
        detail = f"record is {type(obj).__name__}, expected an object"
        raise BadSample(where, "unknown format", detail)
    key = next((k for k in FORMATS if k in obj), None)
    if key is None:
        detail = "record has neither 'messages' nor 'conversations'"
        raise BadSample(where, "unknown format", detail)
    role_key, content_key, roles = FORMATS[key]
    raw = obj[key]
    if not isinstance(raw, list):
        detail = f"'{key}' is {type(raw).__name__}, expected a list"
        raise BadSample(where, "unknown format", detail)
    if not raw:
        raise BadSample(where, "empty conversation", f"'{key}' is empty")
    messages = [_message(m, i, where, role_key, content_key, roles) for i, m in enumerate(raw)]
    _check_turns(messages, where)
    record = {"messages": messages, **{k: v for k, v in obj.items() if k != key}}
    _check_unicode(record, where)
    return record


def _message(m, i, where, role_key, content_key, roles):
    """Message i of a record in OpenAI form ({"role", "content", **extra}), checked field by
    field."""
    if not isinstance(m, dict):
        detail = f"message {i} is {type(m).__name__}, expected an object"
        raise BadSample(where, "unknown format", detail)
    if role_key not in m or content_key not in m:
        detail = f"message {i} lacks '{role_key}' or '{content_key}'"
        raise BadSample(where, "unknown format", detail)
    role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
    if role is None:
        detail = f"message {i} has {role_key} {m[role_key]!r}, expected one of {', '.join(roles)}"
        raise BadSample(where, "unknown role", detail)
    content = m[content_key]
    if not isinstance(content, str):
        detail = f"message {i} ({role}) content is {type(content).__name__}"
        raise BadSample(where, "non-string content", detail)
    if role != "system" and not content.strip():
        raise BadSample(where, "empty content", f"message {i} ({role}) is empty")
    for field, (types, expected) in FIELD_TYPES.items():
        if field in m and not isinstance(m[field], types):
            detail = f"message {i} has {field} {m[field]!r}, expected {expected}"
            raise BadSample(where, "unknown format", detail)
    extra = {k: v for k, v in m.items() if k not in (role_key, content_key, "role", "content")}
    if "weight" in m and role == "assistant":  # OpenAI's fine-tuning format: 0 = context only
        weight = m["weight"]
        if type(weight) is not int or weight not in (0, 1) or m.get("train", weight) != weight:
            detail = f'message {i} has weight {weight!r}, expected 0 or 1 (and no contrary "train")'
            raise BadSample(where, "unknown format", detail)
        extra["train"] = bool(weight)
    return {"role": role, "content": content, **extra}


def _check_turns(messages, where):
    """User and assistant alternate after an optional leading system message, and an assistant
    answers at least once."""
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) == first:
        raise BadSample(where, "empty conversation", "only a system message")
    for j, m in enumerate(messages[first:]):
        expected = "assistant" if j % 2 else "user"
        if m["role"] != expected:
            detail = (f"message {j + first} is {m['role']}, expected {expected} (user/assistant "
                      "alternate after an optional leading system message)")
            raise BadSample(where, "roles not alternating", detail)
    if len(messages) - first < 2:
        raise BadSample(where, "no assistant turn", "conversation has no assistant message")


def _lone_surrogate(obj):
    """The first lone surrogate in obj's strings (keys included), or None."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return e.object[e.start]
    return None


def _check_unicode(record, where):
    """Refuse a string holding a lone surrogate ("\\ud800" is valid JSON but no Unicode text: the
    tokenizer and every UTF-8 writer fail on it), naming the message that holds it."""
    char = _lone_surrogate(record)
    if char is None:
        return
    detail = f"holds the lone surrogate \\u{ord(char):04x}, which no UTF-8 text can carry"
    for i, m in enumerate(record["messages"]):
        if _lone_surrogate(m) is not None:
            raise BadSample(where, "not utf-8", f"message {i} ({m['role']}) {detail}")
    raise BadSample(where, "not utf-8", f"a field of the record {detail}")


def validate(path, rows, on_bad_sample="error", report=None):
    """normalize_record over (where, obj) rows: "error" raises the first BadSample, "skip" drops
    and counts it. `report` (a dict) gets {"path", "records", "kept", "skipped",
    "reasons": {reason: n}, "bad": [messages]}."""
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    rep = {"path": str(path), "records": 0, "kept": 0, "skipped": 0, "reasons": {}, "bad": []}
    out = []
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
        print(f"{path}: kept {rep['kept']} of {rep['records']} records, skipped "
              f"{rep['skipped']} ({why})", file=sys.stderr)
    if report is not None:
        report.update(rep)
    return out


def load_conversations(path, on_bad_sample="error", report=None):
    """Read a JSONL / JSON-array (.gz ok) conversation file -> [{"messages": [...], **extra}]
    (see validate)."""
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
    """One quality score per conversation (higher is better): a number per line in conversation
    order, or JSON lines {"id", "score"} matched by the conversations' ids."""
    vals = []
    text = _read_bytes(path).decode("utf-8", errors="replace")
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            vals.append(json.loads(line))
        except (ValueError, RecursionError):
            shown = line.strip()[:60]
            raise DataError(f"{path}:{n}: not a number or a JSON object: {shown!r}") from None
    if vals and all(isinstance(v, dict) for v in vals):
        vals = _scores_by_id(path, vals, convs)
    elif len(vals) != len(convs):
        raise DataError(f"{path}: {len(vals)} scores for {len(convs)} conversations")
    for i, v in enumerate(vals):
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not -1e300 < v < 1e300:  # NaN and infinities fail the comparison
            raise DataError(f"{path}: no finite numeric score for conversation {i} "
                            f"(id {convs[i].get('id')!r})")
    return np.asarray(vals, dtype=np.float64)


def _scores_by_id(path, rows, convs):
    """The "score" of each conversation's "id" among {"id", "score"} rows (None where it has
    none)."""
    ids = [json.dumps(r.get("id"), sort_keys=True) for r in rows]
    counts = Counter(ids)
    repeated = next((i for i in ids if counts[i] > 1), None)
    if repeated is not None:
        raise DataError(f"{path}: id {repeated} has more than one score")
    score = dict(zip(ids, (r.get("score") for r in rows)))
    return [score.get(json.dumps(c.get("id"), sort_keys=True)) for c in convs]
