"""Conversation data for ReSURE: reading, validation, chat templates with per-turn masks, batching, and a
synthetic noisy multi-turn benchmark.

Formats. A conversation is a dict {"messages": [{"role": "system"|"user"|"assistant", "content": str, ...}], ...}
(OpenAI form). Files are JSONL or a JSON array (optionally .gz); each record is OpenAI `messages` or ShareGPT
`conversations` ([{"from": "system"|"human"|"gpt", "value": str}]), detected per record. Extra record fields (id,
source, ...) and extra message fields are kept. Per-turn noise labels live inside the assistant message:
{"role": "assistant", "content": "17", "noisy": true, "noise_type": "wrong", "reference": "15"}.

Validation (one-line errors "FILE:LINE: reason: detail", or "FILE[i]: ..." for JSON arrays): invalid json,
unknown format, empty conversation, unknown role, non-string content, empty content (a user/assistant message
that is empty or whitespace only: an empty assistant turn would teach the model to stop at once), roles not
alternating (user/assistant after an optional leading system message), no assistant turn. A conversation may end
with a user message (it is kept, unsupervised). on_bad_sample="error" raises BadSample on the first bad record;
"skip" drops bad records, counts them per reason in `report` (a dict you pass) and prints one line to stderr.

Supervision boundary: labels cover the assistant content and its end-of-turn token (<|im_end|> / <|eot_id|>);
the role header, Qwen3's empty <think></think> block and the "\n" after <|im_end|> are context, not targets.
Labels are computed from character offsets of the whole-string tokenization, so a token carrying any supervised
character is supervised (e.g. Qwen's "\n\n" when a reply starts with "\n"); ids always equal tokenizing the
rendered string at once. labels/turn_ids are aligned with input_ids (unshifted; the loss shifts).

Loss units. unit="dialogue" (the paper's sample) and unit="turn" use the same examples: turn_ids[t] = k (1-based
assistant turn) on the supervised tokens of turn k, 0 elsewhere, so a per-turn loss is one forward pass masked by
turn_ids == k (no duplicated context). group = index of the last supervised turn, capped at max_turn_groups.

Synthetic benchmark: `python data.py synth --out DIR` (see synth()).
"""
import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer


# ----------------------------------------------------------------------------------------------------------------
# errors and reading

class DataError(ValueError):
    """Any bad input handled by this module; the message is one line."""


class BadSample(DataError):
    def __init__(self, where, reason, detail):
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: {reason}: {detail}")


REASONS = ("invalid json", "unknown format", "empty conversation", "unknown role", "non-string content",
           "empty content", "roles not alternating", "no assistant turn")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _open(path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def iter_json_records(path):
    """Yield (where, obj) for a JSONL or JSON-array file; obj is a BadSample for an unparseable line."""
    with _open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:  # the whole file is one value: nothing can be skipped
            raise BadSample(f"{path}:{e.lineno}", "invalid json", f"{e.msg} (column {e.colno}) in JSON array file")
        for i, obj in enumerate(arr):
            yield f"{path}[{i}]", obj
        return
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028, \x85, ... may sit in a string
        if not line.strip():
            continue  # blank lines are not records
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadSample(where, "invalid json", f"{e.msg} (column {e.colno})")


def normalize_record(obj, where):
    """Validate one record (OpenAI or ShareGPT) and return it in OpenAI form with extra fields kept."""
    if not isinstance(obj, dict):
        raise BadSample(where, "unknown format", f"record is {type(obj).__name__}, expected an object")
    if "messages" in obj:
        key, rkey, ckey, rolemap = "messages", "role", "content", {r: r for r in ROLES}
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
            raise BadSample(where, "unknown role",
                            f"message {i} has {rkey} {m[rkey]!r}, expected one of {', '.join(rolemap)}")
        content = m[ckey]
        if not isinstance(content, str):
            raise BadSample(where, "non-string content", f"message {i} ({role}) content is {type(content).__name__}")
        if role != "system" and not content.strip():
            raise BadSample(where, "empty content", f"message {i} ({role}) is empty")
        extra = {k: v for k, v in m.items() if k not in (rkey, ckey, "role", "content")}
        msgs.append({"role": role, "content": content, **extra})
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body:
        raise BadSample(where, "empty conversation", "only a system message")
    off = len(msgs) - len(body)
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadSample(where, "roles not alternating",
                            f"message {j + off} is {m['role']}, expected {want} "
                            f"(user/assistant alternate after an optional leading system message)")
    if len(body) < 2:
        raise BadSample(where, "no assistant turn", "conversation has no assistant message")
    return {"messages": msgs, **{k: v for k, v in obj.items() if k != key}}


def _validate_all(path, rows, on_bad_sample, report):
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
        print(f"{path}: kept {rep['kept']} of {rep['records']} records, skipped {rep['skipped']} ({why})",
              file=sys.stderr)
    if report is not None:
        report.update(rep)
    return out


def load_conversations(path, on_bad_sample="error", report=None):
    """Read JSONL / JSON-array (.gz ok) conversations -> list of {"messages": [...], **extra}.
    on_bad_sample: "error" raises BadSample on the first bad record; "skip" skips it. If `report` (a dict) is
    given it is filled with {"path", "records", "kept", "skipped", "reasons": {reason: n}, "bad": [messages]}."""
    return _validate_all(path, iter_json_records(path), on_bad_sample, report)


def save_jsonl(records, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# conversions of public dialogue sets (both default to skipping, and reporting, malformed rows)

def from_mtbench101(path, on_bad_sample="skip", report=None):
    """MT-Bench-101 JSONL {"task", "id", "history": [{"user", "bot"}]} -> conversations (source "mt-bench-101")."""
    def rows():
        for where, obj in iter_json_records(path):
            if isinstance(obj, dict) and isinstance(obj.get("history"), list):
                hist = obj["history"]
                if not all(isinstance(h, dict) and "user" in h and "bot" in h for h in hist):
                    obj = BadSample(where, "unknown format", "history entries must be {'user', 'bot'} objects")
                else:
                    msgs = [m for h in hist for m in ({"role": "user", "content": h["user"]},
                                                      {"role": "assistant", "content": h["bot"]})]
                    extra = {k: v for k, v in obj.items() if k != "history"}
                    obj = {"messages": msgs, **extra, "source": "mt-bench-101"}
            elif not isinstance(obj, BadSample):
                obj = BadSample(where, "unknown format", "record has no 'history' list")
            yield where, obj
    return _validate_all(path, rows(), on_bad_sample, report)


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ?")


def from_hh_rlhf(path, on_bad_sample="skip", report=None, field="chosen"):
    """Anthropic HH-RLHF (.jsonl.gz) {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."} -> conversations.
    Split on "\\n\\nHuman: " / "\\n\\nAssistant: ", strip each turn; id = "hh-<0-based row>". Rows with two
    consecutive Assistant turns fail "roles not alternating", an empty Assistant turn fails "empty content"."""
    def rows():
        for row, (where, obj) in enumerate(iter_json_records(path)):
            if not isinstance(obj, BadSample):
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    obj = BadSample(where, "unknown format", f"record has no string '{field}'")
                else:
                    parts = _HH_SPLIT.split(text)
                    if parts[0].strip():
                        obj = BadSample(where, "unknown format", "text before the first 'Human:'")
                    else:
                        role = {"Human": "user", "Assistant": "assistant"}
                        msgs = [{"role": role[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
                        obj = {"messages": msgs, "id": f"hh-{row}", "source": "hh-rlhf"}
            yield where, obj
    return _validate_all(path, rows(), on_bad_sample, report)


# ----------------------------------------------------------------------------------------------------------------
# chat templates (hand-written; equal to the official jinja templates for plain conversations, no tools)

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_DATE = "26 Jul 2024"  # the template's own fallback; transformers would use today's date instead
TEMPLATES = {"qwen2.5": "qwen2.5", "qwen2": "qwen2.5", "qwen": "qwen2.5", "smollm2": "smollm2", "smollm": "smollm2",
             "chatml": "chatml", "llama3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3", "llama-3": "llama3",
             "qwen3": "qwen3"}
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _read_json(path):
    if not Path(path).is_file():
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid json: {e.msg} (column {e.colno})")


def detect_template(model_dir):
    """Template name from the checkpoint's chat template text, else config.json model_type."""
    d = Path(model_dir)
    text = (d / "chat_template.jinja").read_text(encoding="utf-8") if (d / "chat_template.jinja").is_file() else None
    if text is None:
        t = _read_json(d / "tokenizer_config.json").get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        text = t if isinstance(t, str) else ""
    if "<|start_header_id|>" in text and "Cutting Knowledge Date" in text:
        return "llama3"
    if "<|im_start|>" in text:
        if "<think>" in text or "reasoning_content" in text:
            return "qwen3"
        if "You are Qwen, created by Alibaba Cloud" in text:
            return "qwen2.5"
        return "smollm2" if "SmolLM" in text else "chatml"
    mt = _read_json(d / "config.json").get("model_type")
    if mt in ("qwen2", "qwen3"):
        return {"qwen2": "qwen2.5", "qwen3": "qwen3"}[mt]
    if mt == "llama" and (d / "tokenizer.json").is_file():
        vocab = (d / "tokenizer.json").read_text(encoding="utf-8")
        if '"<|start_header_id|>"' in vocab:
            return "llama3"
        if '"<|im_start|>"' in vocab:
            return "chatml"
    raise DataError(f"{model_dir}: cannot detect the chat template (no known template text, model_type {mt!r}); "
                    f"force one of {', '.join(sorted(set(TEMPLATES.values())))}")


class ChatTemplate:
    """Renders conversations like the model's official chat template and encodes them with per-turn masks.
    `.tokenizer` is a tokenizers.Tokenizer with its post-processor removed: it never adds BOS/EOS itself, the
    template writes every special token."""

    def __init__(self, name, tokenizer, stop_ids=None, pad_id=None):
        name = name.lower()
        if name not in TEMPLATES:
            raise DataError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
        self.name = TEMPLATES[name]
        tokenizer.post_processor = None
        self.tokenizer = tokenizer
        self.eot = "<|eot_id|>" if self.name == "llama3" else "<|im_end|>"
        specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] \
            if self.name == "llama3" else ["<|im_start|>", "<|im_end|>"]
        for s in specials:
            if tokenizer.token_to_id(s) is None:
                raise DataError(f"chat template {self.name}: the tokenizer has no {s} token")
        self.eot_id = tokenizer.token_to_id(self.eot)
        self.stop_ids = list(dict.fromkeys([self.eot_id] + list(stop_ids or [])))
        self.pad_id = self.eot_id if pad_id is None else pad_id

    @classmethod
    def from_pretrained(cls, model_dir, name=None):
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise DataError(f"{model_dir}: no tokenizer.json")
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        name = name or detect_template(d)
        stops = []
        for cfg in (_read_json(d / "generation_config.json"), _read_json(d / "config.json")):
            e = cfg.get("eos_token_id")
            stops += e if isinstance(e, list) else [e] if isinstance(e, int) else []
        pad = _read_json(d / "tokenizer_config.json").get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = tok.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            pad_id = _read_json(d / "generation_config.json").get("pad_token_id")
        return cls(name, tok, stop_ids=stops, pad_id=pad_id)

    # -- rendering: a list of (text, turn) segments; turn k > 0 marks supervised text of assistant turn k
    def segments(self, messages, add_generation_prompt=False, date_string=None, enable_thinking=None):
        if not messages:
            raise DataError("cannot render an empty conversation")
        if self.name == "llama3":
            return self._llama3(messages, add_generation_prompt, date_string or LLAMA3_DATE)
        if self.name == "qwen3":
            return self._qwen3(messages, add_generation_prompt, enable_thinking)
        default = {"qwen2.5": QWEN25_SYSTEM, "smollm2": SMOLLM2_SYSTEM, "chatml": None}[self.name]
        segs = []
        if messages[0]["role"] != "system" and default is not None:
            segs.append((f"<|im_start|>system\n{default}<|im_end|>\n", 0))
        k = 0
        for m in messages:
            if m["role"] == "assistant":
                k += 1
                segs += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>", k), ("\n", 0)]
            else:
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
        if add_generation_prompt:
            segs.append(("<|im_start|>assistant\n", 0))
        return segs

    def _llama3(self, messages, add_generation_prompt, date_string):
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        segs = [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>", 0)]
        k = 0
        for m in messages:
            head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                k += 1
                segs += [(head, 0), (m["content"].strip() + "<|eot_id|>", k)]
            else:
                segs.append((head + m["content"].strip() + "<|eot_id|>", 0))
        if add_generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", 0))
        return segs

    def _qwen3(self, messages, add_generation_prompt, enable_thinking):
        # Qwen3 drops the reasoning of assistant turns before the last user message and gives the final
        # assistant turn a (possibly empty) <think> block; we render exactly that.
        segs = []
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            c = messages[i]["content"]
            tool = c.startswith("<tool_response>") and c.endswith("</tool_response>")
            if messages[i]["role"] == "user" and not tool:
                last_query = i
                break
        k = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":  # system, user: verbatim
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
                continue
            k += 1
            content, reasoning = m["content"], ""
            if m.get("reasoning_content") is not None:
                reasoning = m["reasoning_content"]
            elif "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            segs.append(("<|im_start|>assistant\n", 0))
            if i > last_query and (i == len(messages) - 1 or reasoning):
                think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                segs.append((think, 0 if think == EMPTY_THINK else k))
                content = content.lstrip("\n")
            segs += [(content + "<|im_end|>", k), ("\n", 0)]
        if add_generation_prompt:
            segs.append(("<|im_start|>assistant\n" + (EMPTY_THINK if enable_thinking is False else ""), 0))
        return segs

    def render(self, messages, add_generation_prompt=False, date_string=None, enable_thinking=None):
        """The text transformers' apply_chat_template(..., tokenize=False) gives (Llama-3 date: see LLAMA3_DATE)."""
        return "".join(t for t, _ in self.segments(messages, add_generation_prompt, date_string, enable_thinking))

    def encode(self, messages, date_string=None):
        """-> {"input_ids", "labels", "turn_ids"} (python lists of equal length), see the module docstring."""
        segs = self.segments(messages, False, date_string)
        text = "".join(t for t, _ in segs)
        char_turn = np.zeros(len(text) + 1, dtype=np.int64)
        pos = 0
        for t, k in segs:
            char_turn[pos:pos + len(t)] = k
            pos += len(t)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        labels, turn_ids = [], []
        for tid, (a, b) in zip(enc.ids, enc.offsets):
            k = int(char_turn[a:b].max()) if b > a else 0
            labels.append(tid if k else -100)
            turn_ids.append(k)
        return {"input_ids": list(enc.ids), "labels": labels, "turn_ids": turn_ids}

    def encode_prompt(self, messages, date_string=None):
        """Ids of the conversation so far plus the generation prompt (Qwen3: non-thinking, empty think block)."""
        text = self.render(messages, True, date_string, enable_thinking=False if self.name == "qwen3" else None)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# examples: turn groups, truncation at turn boundaries

class Report(dict):
    """Counts from build_examples; summary() is a one-line description."""

    def summary(self):
        return (f"{self['conversations']} conversations -> {self['examples']} examples "
                f"({self['truncated']} truncated at a turn boundary, {self['dropped']} dropped: first turn longer "
                f"than max_len={self['max_len']}); assistant turns kept {self['turns_kept']}, dropped "
                f"{self['turns_dropped']}; {self['tokens']} tokens, {self['supervised_tokens']} supervised")


def turn_group(turn_ids, labels, max_turn_groups=8):
    """b = index of the last supervised assistant turn (1-based), capped at max_turn_groups; 0 if none."""
    b = max((int(t) for t, l in zip(turn_ids, labels) if int(l) != -100), default=0)
    return min(b, max_turn_groups)


def build_examples(conversations, template, max_len, max_turn_groups=8):
    """Encode conversations -> (examples, report). Each example: input_ids, labels, turn_ids, group, n_turns,
    index (position in examples), conv_index (position in conversations), meta (record fields except messages,
    plus per-kept-assistant-turn lists "noisy" / "noise_type" when the messages carry them).
    A conversation longer than max_len loses its trailing turns; one whose first assistant turn does not fit is
    dropped. Both loss units use these examples (resure.unit_losses splits turns with turn_ids)."""
    rep = Report(conversations=len(conversations), examples=0, truncated=0, dropped=0, turns_kept=0,
                 turns_dropped=0, tokens=0, supervised_tokens=0, max_len=max_len)
    examples = []
    for ci, conv in enumerate(conversations):
        msgs = conv["messages"]
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not asst:
            raise DataError(f"conversation {ci}: no assistant turn")
        enc, k = template.encode(msgs), len(asst)
        if len(enc["input_ids"]) > max_len:
            ends = [max(i for i, t in enumerate(enc["turn_ids"]) if t == j) + 1 for j in range(1, k + 1)]
            k = sum(e <= max_len for e in ends)
            while k > 0:  # re-encode the cut conversation (Qwen3 renders its last turn differently)
                enc = template.encode(msgs[:asst[k - 1] + 1])
                if len(enc["input_ids"]) <= max_len:
                    break
                k -= 1
            if k == 0:
                rep["dropped"] += 1
                rep["turns_dropped"] += len(asst)
                continue
            rep["truncated"] += 1
            rep["turns_dropped"] += len(asst) - k
        meta = {key: v for key, v in conv.items() if key != "messages"}
        kept = [msgs[i] for i in asst[:k]]
        for key in ("noisy", "noise_type"):
            if any(key in m for m in kept):
                meta[key] = [m.get(key) for m in kept]
        examples.append({**enc, "group": turn_group(enc["turn_ids"], enc["labels"], max_turn_groups),
                         "n_turns": k, "meta": meta, "index": len(examples), "conv_index": ci})
        rep["turns_kept"] += k
        rep["tokens"] += len(enc["input_ids"])
        rep["supervised_tokens"] += sum(l != -100 for l in enc["labels"])
    rep["examples"] = len(examples)
    return examples, rep


# ----------------------------------------------------------------------------------------------------------------
# batching

def collate(examples, pad_id):
    """Right-pad examples -> input_ids (pad_id), labels (-100), turn_ids (0), attention_mask [B,T]; group, index [B]."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "labels": torch.full((B, T), -100, dtype=torch.long),
           "turn_ids": torch.zeros((B, T), dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        for key in ("input_ids", "labels", "turn_ids"):
            out[key][i, :n] = torch.as_tensor(e[key], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
    out["group"] = torch.tensor([int(e.get("group", 0)) for e in examples], dtype=torch.long)
    out["index"] = torch.tensor([int(e.get("index", i)) for i, e in enumerate(examples)], dtype=torch.long)
    return out


class Sampler:
    """Deterministic distributed batch sampler. Each epoch is a list of global batches of batch_size*world_size
    indices (a permutation seeded by (seed, epoch)); rank r takes the r-th contiguous slice of each, so at every
    step the rank batches concatenated rank-major equal the 1-process batch of size batch_size*world_size.
    A last partial global batch is split as evenly as possible (earlier ranks get one more; a rank can get an
    empty list if it has fewer items than ranks), so every rank has the same number of batches.
    group_by_length (a list of n lengths): inside mega-chunks of 64 global batches indices are sorted by length,
    then full batches are shuffled. Resume: state_dict()["position"] = batches already consumed this epoch."""

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=42, shuffle=True, drop_last=False,
                 group_by_length=None):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad sampler setup: rank={rank}, world_size={world_size}, batch_size={batch_size}")
        if group_by_length is not None and len(group_by_length) != n:
            raise ValueError(f"group_by_length has {len(group_by_length)} lengths for {n} samples")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.lengths = None if group_by_length is None else np.asarray(group_by_length)
        self.epoch, self.position = 0, 0

    @property
    def global_batch_size(self):
        return self.batch_size * self.world_size

    def __len__(self):
        G = self.global_batch_size
        return self.n // G if self.drop_last else -(-self.n // G)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def global_batches(self, epoch=None):
        epoch, G = self.epoch if epoch is None else epoch, self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.lengths is not None:
            M = 64 * G
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                    for c in (order[i:i + M] for i in range(0, self.n, M))] or [order])
        batches = [order[i:i + G].tolist() for i in range(0, self.n, G)]
        if self.drop_last and batches and len(batches[-1]) < G:
            batches.pop()
        if self.lengths is not None and self.shuffle:
            nfull = len(batches) - (1 if batches and len(batches[-1]) < G else 0)
            batches = [batches[i] for i in rng.permutation(nfull)] + batches[nfull:]
        return batches

    def rank_slice(self, batch, rank=None):
        r = self.rank if rank is None else rank
        q, rem = divmod(len(batch), self.world_size)
        start = r * q + min(r, rem)
        return batch[start:start + q + (r < rem)]

    def __iter__(self):
        batches = self.global_batches()
        for k in range(self.position, len(batches)):
            self.position = k + 1
            yield self.rank_slice(batches[k])
        self.position = 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "global_batch_size": self.global_batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "group_by_length": self.lengths is not None}

    def load_state_dict(self, state):
        for key in ("seed", "n", "global_batch_size", "shuffle", "drop_last", "group_by_length"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has {mine!r}")
        self.epoch, self.position = state["epoch"], state["position"]


# ----------------------------------------------------------------------------------------------------------------
# synthetic noisy multi-turn benchmark
#
# Two tasks with state accumulated over turns; each user message is one instruction, each assistant reply is the
# current state (a number, or a comma-separated list), exact-match checkable:
#   counter: "Keep a counter and reply with its value only. Start at 23." -> "23"; "Add 4." -> "27"; ...
#   list:    "Keep a shopping list and reply with the whole list only. Start with milk." -> "milk"; "Add tea." ...
# Noise per assistant turn (noise_type): "wrong" (a plausible wrong state), "off_topic" (a reply taken from a
# dialogue of the other task), "truncated" (the reply cut inside a word), "state_error" (a wrong state that the
# following turns build on: they are consistent with it, labelled "propagated" while they differ from the truth).
# Every assistant message carries noisy, noise_type and reference (the true answer). The train tiers H/N/L share
# the same dialogues and differ only in injected noise; test.jsonl is clean and disjoint from train.

SYNTH_RATES = {"H": 0.0, "N": 0.2, "L": 0.5}  # per-turn injection rates; realized noisy turns ~24% / ~54%
SYNTH_KINDS = {"wrong": 0.3, "off_topic": 0.2, "truncated": 0.2, "state_error": 0.3}
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


def normalize_answer(text):
    """Canonical form for exact match: trimmed, lower case, no trailing period, single spaces, ", " separators."""
    t = " ".join(str(text).strip().lower().split()).rstrip(".").strip()
    return ", ".join(p.strip() for p in t.split(","))


def answer_matches(pred, ref):
    return normalize_answer(pred) == normalize_answer(ref)


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
    if profile not in ("flat", "late", "early"):
        raise DataError(f"profile must be flat, late or early, got {profile!r}")
    if not 1 <= min_turns <= max_turns or not tasks or set(tasks) - {"counter", "list"} \
            or set(kinds) - set(SYNTH_KINDS):
        raise DataError("synth: need 1 <= min_turns <= max_turns, tasks from counter/list, kinds from "
                        + ", ".join(SYNTH_KINDS))
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
            raise DataError("synth: cannot find enough test dialogues disjoint from train; use fewer")
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


# ----------------------------------------------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic noisy multi-turn benchmark")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-test", type=int, default=200)
    s.add_argument("--min-turns", type=int, default=2)
    s.add_argument("--max-turns", type=int, default=5)
    for tier, r in SYNTH_RATES.items():
        s.add_argument(f"--rate-{tier}", type=float, default=r, help=f"per-turn noise rate of tier {tier}")
    s.add_argument("--profile", default="late", choices=("flat", "late", "early"))
    s.add_argument("--tasks", default="counter,list")
    c = sub.add_parser("convert", help="convert public dialogues to OpenAI-form JSONL")
    c.add_argument("--format", required=True, choices=("hh", "mtbench101"))
    c.add_argument("--on-bad-sample", default="skip", choices=("error", "skip"))
    c.add_argument("inp")
    c.add_argument("out")
    k = sub.add_parser("check", help="validate a conversation file (and optionally encode it)")
    k.add_argument("path")
    k.add_argument("--on-bad-sample", default="error", choices=("error", "skip"))
    k.add_argument("--model", help="checkpoint folder: also encode and report truncation")
    k.add_argument("--chat-template", default=None)
    k.add_argument("--max-len", type=int, default=1024)
    a = p.parse_args(argv)
    try:
        if a.cmd == "synth":
            meta = synth(a.out, a.seed, a.n_train, a.n_test, a.min_turns, a.max_turns,
                         {t: getattr(a, f"rate_{t}") for t in SYNTH_RATES}, a.profile, None, tuple(a.tasks.split(",")))
            for tier, st in meta["tiers"].items():
                print(f"train_{tier}.jsonl: {st['dialogues']} dialogues, {st['turns']} turns, "
                      f"noisy {st['noisy_fraction']:.1%} {st['by_kind']}")
            print(f"test.jsonl: {a.n_test} clean dialogues -> {a.out}")
        elif a.cmd == "convert":
            fn = from_hh_rlhf if a.format == "hh" else from_mtbench101
            convs = fn(a.inp, on_bad_sample=a.on_bad_sample)
            save_jsonl(convs, a.out)
            print(f"{a.out}: {len(convs)} conversations")
        else:
            convs = load_conversations(a.path, on_bad_sample=a.on_bad_sample)
            print(f"{a.path}: {len(convs)} valid conversations")
            if a.model:
                tpl = ChatTemplate.from_pretrained(a.model, a.chat_template)
                print(f"template {tpl.name}: " + build_examples(convs, tpl, a.max_len)[1].summary())
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
