"""Multi-turn conversations as training examples: each supervised token tagged with its turn.

The idea: render a conversation as text segments tagged 0 (context) or k (the reply of assistant
turn k), tokenize the whole string once, and give each token the tag of the characters it covers.
That yields labels (the token where supervised, -100 elsewhere) and turn_ids (k on turn k's
supervised tokens), so one forward pass gives both the paper's per-dialogue loss and a per-turn
loss (resure.unit_losses). Supervision covers the assistant content and its end-of-turn token;
role headers, Qwen3's empty <think></think> block and the "\n" after <|im_end|> do not.

In reading order: chat templates, examples, batches. Reading and validating conversation files
(the format, the noise labels, the one-line errors) is support/conversations.py; reading a
checkpoint's tokenizer files (its chat template, its special tokens) is support/checkpoint.py.
"""
import argparse
import bisect
import sys
from pathlib import Path

import numpy as np
import torch

from support.checkpoint import (chat_template_text, read_optional_json, special_token_ids,
                                template_by_model_type, template_by_text)
from support.conversations import DataError, load_conversations

# ------------------------------------------------------------------------------------------------
# Chat templates: hand-written, equal to the official jinja templates for plain chats (no tools).

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_SYSTEM = {"qwen2.5": QWEN25_SYSTEM, "smollm2": SMOLLM2_SYSTEM, "chatml": None}
LLAMA3_DATE = "26 Jul 2024"  # the template's own fallback; transformers would use today's date
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Every name a template goes by -> the template.
TEMPLATES = {"qwen2.5": "qwen2.5", "qwen2": "qwen2.5", "qwen": "qwen2.5",
             "smollm2": "smollm2", "smollm": "smollm2", "chatml": "chatml",
             "llama3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3", "llama-3": "llama3",
             "qwen3": "qwen3"}


class ChatTemplate:
    """Renders conversations like the model's official chat template and encodes them with per-turn
    masks. `.tokenizer` is a tokenizers.Tokenizer with its post-processor removed: it never adds
    BOS/EOS itself, the template writes every special token."""

    def __init__(self, name, tokenizer, stop_ids=(), pad_id=None):
        if name.lower() not in TEMPLATES:
            known = ", ".join(sorted(TEMPLATES))
            raise DataError(f"unknown chat template {name!r}; known: {known}")
        self.name = TEMPLATES[name.lower()]
        self.tokenizer = tokenizer
        tokenizer.post_processor = None
        specials = LLAMA3_TOKENS if self.name == "llama3" else CHATML_TOKENS
        for token in specials:
            if tokenizer.token_to_id(token) is None:
                raise DataError(f"chat template {self.name}: the tokenizer has no {token} token")
        self.eot = specials[-1]  # <|eot_id|> or <|im_end|>: ends every turn
        self.eot_id = tokenizer.token_to_id(self.eot)
        self.stop_ids = list(dict.fromkeys([self.eot_id, *stop_ids]))
        self.pad_id = self.eot_id if pad_id is None else pad_id

    @classmethod
    def from_pretrained(cls, model_dir, name=None):
        """The template of a checkpoint folder: its tokenizer.json, the template named or detected,
        the stop and pad ids its files name (support/checkpoint.py)."""
        d = Path(model_dir)
        tokenizer = load_tokenizer(d)
        stops, pad_id = special_token_ids(d, tokenizer)
        return cls(name or detect_template(d), tokenizer, stops, pad_id)

    def segments(self, messages, add_generation_prompt=False, date_string=None,
                 enable_thinking=None):
        """The rendered text as (text, k) segments: k > 0 marks supervised text of assistant turn k
        (a message with "train": false keeps its number k but is context, k = 0)."""
        pieces = self._pieces(messages, add_generation_prompt, date_string, enable_thinking)
        return [segment for piece in pieces for segment in piece]

    def _pieces(self, messages, add_generation_prompt, date_string, enable_thinking):
        """The segments of each message in turn (the first also holds what the template writes
        before any message), and the generation prompt as one more piece when asked for."""
        if not messages:
            raise DataError("cannot render an empty conversation")
        if self.name == "llama3":
            pieces = self._llama3(messages, date_string or LLAMA3_DATE)
            prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        elif self.name == "qwen3":
            pieces = self._qwen3(messages)
            prompt = "<|im_start|>assistant\n"
            if enable_thinking is False:
                prompt += EMPTY_THINK
        else:
            pieces = self._chatml(messages)
            prompt = "<|im_start|>assistant\n"
        if add_generation_prompt:
            pieces.append([(prompt, 0)])
        return pieces

    def _chatml(self, messages):
        pieces = []
        k = 0
        for m in messages:
            if m["role"] == "assistant":
                k += 1
                reply = (m["content"] + "<|im_end|>", _supervised(m, k))
                pieces.append([("<|im_start|>assistant\n", 0), reply, ("\n", 0)])
            else:
                pieces.append([(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0)])
        default_system = CHATML_SYSTEM[self.name]
        if messages[0]["role"] != "system" and default_system is not None:
            pieces[0].insert(0, (f"<|im_start|>system\n{default_system}<|im_end|>\n", 0))
        return pieces

    def _llama3(self, messages, date_string):
        # The system message (stripped, or empty) always opens, after a dated preamble.
        system_first = messages[0]["role"] == "system"
        system = messages[0]["content"].strip() if system_first else ""
        opening = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                   "Cutting Knowledge Date: December 2023\n"
                   f"Today Date: {date_string}\n\n{system}<|eot_id|>")
        pieces = []
        k = 0
        for i, m in enumerate(messages):
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if i == 0 and system_first:
                pieces.append([])  # rendered in the opening
            elif m["role"] == "assistant":
                k += 1
                reply = (m["content"].strip() + "<|eot_id|>", _supervised(m, k))
                pieces.append([(header, 0), reply])
            else:
                pieces.append([(header + m["content"].strip() + "<|eot_id|>", 0)])
        pieces[0].insert(0, (opening, 0))
        return pieces

    def _qwen3(self, messages):
        # Qwen3 drops the reasoning of assistant turns before the last user query and gives the
        # final assistant turn a (possibly empty) <think> block; we render exactly that.
        last_query = _last_query(messages)
        pieces = []
        k = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":  # system, user: verbatim
                pieces.append([(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0)])
                continue
            k += 1
            turn = _supervised(m, k)
            content, reasoning = _split_reasoning(m)
            piece = [("<|im_start|>assistant\n", 0)]
            if i > last_query and (i == len(messages) - 1 or reasoning):
                think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                piece.append((think, 0 if think == EMPTY_THINK else turn))
                content = content.lstrip("\n")
            piece += [(content + "<|im_end|>", turn), ("\n", 0)]
            pieces.append(piece)
        return pieces

    def render(self, messages, add_generation_prompt=False, date_string=None,
               enable_thinking=None):
        """The text of transformers' apply_chat_template(..., tokenize=False) (see LLAMA3_DATE)."""
        segments = self.segments(messages, add_generation_prompt, date_string, enable_thinking)
        return "".join(text for text, _ in segments)

    def encode(self, messages, date_string=None):
        """{"input_ids", "labels", "turn_ids"}: a token is supervised, with its characters' turn,
        when any character it covers is (e.g. Qwen's "\n\n" when a reply starts with "\n")."""
        segments = self.segments(messages, False, date_string)
        text = "".join(t for t, _ in segments)
        char_turn = np.repeat([k for _, k in segments], [len(t) for t, _ in segments])
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        turn_ids = [int(char_turn[a:b].max()) if b > a else 0 for a, b in enc.offsets]
        labels = [t if k else -100 for t, k in zip(enc.ids, turn_ids)]
        return {"input_ids": list(enc.ids), "labels": labels, "turn_ids": turn_ids}

    def turn_starts(self, messages, date_string=None):
        """The number of tokens of encode(messages) before each assistant message."""
        pieces = self._pieces(messages, False, date_string, None)
        char_lengths = [sum(len(text) for text, _ in piece) for piece in pieces]
        char_starts = np.cumsum([0] + char_lengths[:-1])
        text = "".join(text for piece in pieces for text, _ in piece)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        token_starts = [a for a, _ in enc.offsets]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return np.searchsorted(token_starts, char_starts[assistant]).tolist()

    def encode_prompt(self, messages, date_string=None):
        """Ids of the conversation so far and the generation prompt (Qwen3: empty think block)."""
        thinking = False if self.name == "qwen3" else None
        text = self.render(messages, True, date_string, enable_thinking=thinking)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _supervised(message, k):
    """The tag of assistant turn k's reply: k, or 0 (context) where it says "train": false."""
    if message.get("train") is False:
        return 0
    return k


def _last_query(messages):
    """Index of the last user message that is not a tool response (the last message if none)."""
    for i in range(len(messages) - 1, -1, -1):
        text = messages[i]["content"]
        tool_response = text.startswith("<tool_response>") and text.endswith("</tool_response>")
        if messages[i]["role"] == "user" and not tool_response:
            return i
    return len(messages) - 1


def _split_reasoning(message):
    """(content, reasoning) of an assistant message: its reasoning_content, else the <think> block
    its content opens with."""
    content = message["content"]
    reasoning = message.get("reasoning_content") or ""
    if message.get("reasoning_content") is None and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    return content, reasoning


# ------------------------------------------------------------------------------------------------
# Checkpoints: which template they use (their files read by support/checkpoint.py), their tokenizer

def detect_template(model_dir):
    """Template name from the checkpoint's chat template text, else config.json's model_type."""
    text = chat_template_text(model_dir)
    name = template_by_text(text)
    if name:
        return name
    model_type = read_optional_json(Path(model_dir) / "config.json").get("model_type")
    name = template_by_model_type(model_dir, model_type)
    if name is None:
        known = ", ".join(sorted(set(TEMPLATES.values())))
        raise DataError(f"{model_dir}: cannot detect the chat template (no known template text, "
                        f"model_type {model_type!r}); force one of {known}")
    if text:  # a template of its own that none of ours equals: say what is used instead
        print(f"{model_dir}: its chat template is none we know; rendering as {name} (chosen by "
              "model_type and vocabulary; --chat-template forces one)", file=sys.stderr)
    return name


def load_tokenizer(model_dir):
    """The `tokenizers` Tokenizer of a checkpoint folder (its tokenizer.json)."""
    from tokenizers import Tokenizer
    f = Path(model_dir) / "tokenizer.json"
    if not f.is_file():
        raise DataError(f"{f}: no such file (a tokenizer.json is needed)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers has its own exception type for a truncated or foreign file
        first_line = str(e).splitlines()[0][:120]
        raise DataError(f"{f}: not a readable tokenizer.json ({first_line})") from None


# ------------------------------------------------------------------------------------------------
# Examples

class Report(dict):
    """build_examples' counts by name; summary() says them in one line."""

    def summary(self):
        return (f"{self['conversations']} conversations -> {self['examples']} examples "
                f"({self['truncated']} truncated at a turn boundary, {self['dropped']} dropped: "
                f"first turn longer than max_len={self['max_len']}, {self['unsupervised']} with no "
                f"supervised turn); assistant turns kept {self['turns_kept']}, dropped "
                f"{self['turns_dropped']}; {self['tokens']} tokens, {self['supervised_tokens']} "
                "supervised")


def turn_group(turn_ids, labels, max_turn_groups=8):
    """b = the last supervised assistant turn (1-based; 0 if none), capped at max_turn_groups."""
    b = max((int(t) for t, label in zip(turn_ids, labels) if int(label) != -100), default=0)
    if max_turn_groups is None:
        return b
    return min(b, max_turn_groups)


def build_examples(conversations, template, max_len, max_turn_groups=8, free=False):
    """Encode conversations -> (examples, report). Each example: input_ids, labels, turn_ids, group,
    n_turns (assistant turns kept), index, conv_index, meta (see _meta); with free, also "free"
    (see _replies_alone). A conversation longer than max_len loses its trailing turns; one whose
    first turn does not fit is dropped."""
    report = Report(conversations=len(conversations), examples=0, truncated=0, dropped=0,
                    unsupervised=0, turns_kept=0, turns_dropped=0, tokens=0,
                    supervised_tokens=0, max_len=max_len)
    examples = []
    for conv_index, conv in enumerate(conversations):
        messages = conv["messages"]
        n_turns = sum(m["role"] == "assistant" for m in messages)
        enc, k = _fit_turns(template, messages, max_len)
        if k == 0:
            report["dropped"] += 1
            report["turns_dropped"] += n_turns
            continue
        supervised = sum(label != -100 for label in enc["labels"])
        if supervised == 0:
            report["unsupervised"] += 1
            report["turns_dropped"] += n_turns
            continue
        report["truncated"] += k < n_turns
        report["turns_dropped"] += n_turns - k
        report["turns_kept"] += k
        report["tokens"] += len(enc["input_ids"])
        report["supervised_tokens"] += supervised
        group = turn_group(enc["turn_ids"], enc["labels"], max_turn_groups)
        example = {**enc, "group": group, "n_turns": k, "meta": _meta(conv, k),
                   "index": len(examples), "conv_index": conv_index}
        if free:
            example["free"] = _replies_alone(template, messages, k)
        examples.append(example)
    report["examples"] = len(examples)
    return examples, report


def _fit_turns(template, messages, max_len):
    """(encoding, k): the conversation cut after the last assistant turn k whose prefix, rendered
    alone, fits in max_len tokens; (None, 0) if not even the first turn fits. Linear in the
    conversation's length: tokenized whole twice, then a few prefixes of about max_len tokens."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    enc = template.encode(messages)
    if len(enc["input_ids"]) <= max_len:
        return enc, len(assistant)
    # A prefix ending at turn k holds the whole conversation's tokens before turn k (only its last
    # turn may render differently: Qwen3's think block), so a turn that starts at max_len or later
    # never fits.
    k = bisect.bisect_left(template.turn_starts(messages), max_len)
    while k > 0:
        enc = template.encode(messages[:assistant[k - 1] + 1])
        if len(enc["input_ids"]) <= max_len:
            return enc, k
        k -= 1
    return None, 0


def _meta(conv, k):
    """The record's fields but its messages, plus the noise labels of its first k replies."""
    meta = {key: value for key, value in conv.items() if key != "messages"}
    replies = [m for m in conv["messages"] if m["role"] == "assistant"][:k]
    for key in ("noisy", "noise_type"):
        if any(key in m for m in replies):
            meta[key] = [m.get(key) for m in replies]
    return meta


def _replies_alone(template, messages, k):
    """The context-gain view: (turn, input_ids, labels) of each supervised reply among the first k
    assistant turns, after an empty user turn and nothing else."""
    replies = [m for m in messages if m["role"] == "assistant"][:k]
    out = []
    for turn, m in enumerate(replies, 1):
        if m.get("train", True):
            alone = template.encode([{"role": "user", "content": ""}, {**m, "train": True}])
            out.append((turn, alone["input_ids"], alone["labels"]))
    return out


# ------------------------------------------------------------------------------------------------
# Batches

def collate(examples, pad_id):
    """Right-pad examples -> input_ids (pad_id), labels (-100), turn_ids (0), attention_mask [B,T];
    group, index [B]; with "free" examples also free_ids, free_labels, free_mask, free_unit."""
    B = len(examples)
    T = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long),
             "turn_ids": torch.zeros((B, T), dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        for key in ("input_ids", "labels", "turn_ids"):
            batch[key][i, :n] = torch.as_tensor(e[key], dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
    groups = [int(e.get("group", 0)) for e in examples]
    batch["group"] = torch.tensor(groups, dtype=torch.long)
    indices = [int(e.get("index", i)) for i, e in enumerate(examples)]
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    free = [(i, k, ids, labels) for i, e in enumerate(examples)
            for k, ids, labels in e.get("free", ())]
    if free:
        batch.update(_free_batch(free, pad_id))
    return batch


def _free_batch(free, pad_id):
    """The replies scored alone, right-padded: free_ids, free_labels, free_mask [F, T], and
    free_unit [F, 2], the (batch row, turn) of each."""
    T = max(len(ids) for _, _, ids, _ in free)
    rows = {"free_ids": [], "free_labels": [], "free_mask": []}
    for _, _, ids, labels in free:
        pad = T - len(ids)
        rows["free_ids"].append(ids + [pad_id] * pad)
        rows["free_labels"].append(labels + [-100] * pad)
        rows["free_mask"].append([1] * len(ids) + [0] * pad)
    out = {key: torch.tensor(value) for key, value in rows.items()}
    out["free_unit"] = torch.tensor([[row, turn] for row, turn, _, _ in free])
    return out


def epoch_batches(n, global_batch, seed, epoch, lengths=None, drop_last=False):
    """The global batches of one epoch: a permutation of range(n) seeded by (seed, epoch), cut into
    batches of global_batch (the last may be short unless drop_last). With lengths, indices are
    sorted by length inside chunks of 64 batches and the full batches shuffled: less padding."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None:
        order = _longest_first_in_chunks(order, np.asarray(lengths), 64 * global_batch)
    batches = [order[i:i + global_batch].tolist() for i in range(0, n, global_batch)]
    full = len(batches)
    if batches and len(batches[-1]) < global_batch:
        full -= 1
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(full)] + batches[full:]
    if drop_last:
        return batches[:full]
    return batches


def _longest_first_in_chunks(order, lengths, chunk):
    """order with each run of `chunk` indices sorted by length, longest first (ties keep order)."""
    chunks = [order[i:i + chunk] for i in range(0, len(order), chunk)]
    if not chunks:
        return order
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])


def rank_slice(batch, rank, world_size):
    """Rank r's contiguous share of a global batch (the shares, rank-major, are the batch); a short
    batch is split as evenly as possible, earlier ranks getting one more."""
    share, rest = divmod(len(batch), world_size)
    start = rank * share + min(rank, rest)
    return batch[start:start + share + (rank < rest)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate a conversation file (and optionally encode it)")
    check.add_argument("path")
    check.add_argument("--on-bad-sample", default="error", choices=("error", "skip"))
    check.add_argument("--model", help="checkpoint folder: also encode and report truncation")
    check.add_argument("--chat-template")
    check.add_argument("--max-len", type=int, default=1024)
    a = p.parse_args(argv)
    try:
        if a.max_len < 2:
            raise DataError(f"--max-len must be at least 2, got {a.max_len}")
        convs = load_conversations(a.path, on_bad_sample=a.on_bad_sample)
        print(f"{a.path}: {len(convs)} valid conversations")
        if a.model:
            template = ChatTemplate.from_pretrained(a.model, a.chat_template)
            report = build_examples(convs, template, a.max_len)[1]
            print(f"template {template.name}: {report.summary()}")
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
