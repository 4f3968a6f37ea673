"""Multi-turn conversations as training examples: every supervised token tagged with the assistant turn it is in.

The idea: render a conversation as text segments tagged 0 (context) or k (the reply of assistant turn k), tokenize
the whole string once, and give each token the tag of the characters it covers. That yields labels (the token
where supervised, -100 elsewhere) and turn_ids (k on turn k's supervised tokens), so one forward pass gives both
the paper's per-dialogue loss and a per-turn loss (resure.unit_losses). Supervision covers the assistant content
and its end-of-turn token; role headers, Qwen3's empty <think></think> block and the "\n" after <|im_end|> do not.
In reading order: chat templates, examples, batches; reading and validating files is support/conversations.py.

Format: {"messages": [{"role": "system"|"user"|"assistant", "content": str, ...}], ...} (OpenAI) or ShareGPT
{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}, in JSONL or a JSON array, .gz too; extra
fields are kept. An assistant message may carry "train": false (context only; OpenAI's "weight": 0 means the same)
and noise labels ("noisy", "noise_type", "reference"). Bad records give one-line errors "FILE:LINE: reason: detail";
with on_bad_sample="skip" they are dropped, counted per reason and reported in one line.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from support.checkpoint import read_json
from support.conversations import DataError, load_conversations


# Chat templates, hand-written and equal to the official jinja templates for plain conversations (no tools).
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_DATE = "26 Jul 2024"  # the template's own fallback; transformers would use today's date instead
TEMPLATES = {"qwen2.5": "qwen2.5", "qwen2": "qwen2.5", "qwen": "qwen2.5", "smollm2": "smollm2", "smollm": "smollm2",
             "chatml": "chatml", "llama3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3", "llama-3": "llama3",
             "qwen3": "qwen3"}
EMPTY_THINK = "<think>\n\n</think>\n\n"


def detect_template(model_dir):
    """Template name from the checkpoint's chat template text, else config.json model_type."""
    d = Path(model_dir)
    text = (d / "chat_template.jinja").read_text(encoding="utf-8") if (d / "chat_template.jinja").is_file() else None
    if text is None:
        t = (read_json(d / "tokenizer_config.json", DataError) if (d / "tokenizer_config.json").is_file() else
             {}).get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        text = t if isinstance(t, str) else ""
    if "<|start_header_id|>" in text and "Cutting Knowledge Date" in text:
        return "llama3"
    if "<|im_start|>" in text:
        if "<think>" in text or "reasoning_content" in text:
            return "qwen3"
        return "qwen2.5" if "You are Qwen, created by Alibaba Cloud" in text else \
            "smollm2" if "SmolLM" in text else "chatml"
    mt = (read_json(d / "config.json", DataError) if (d / "config.json").is_file() else {}).get("model_type")
    name = {"qwen2": "qwen2.5", "qwen3": "qwen3"}.get(mt)
    if mt == "llama" and (d / "tokenizer.json").is_file():
        vocab = (d / "tokenizer.json").read_text(encoding="utf-8", errors="replace")
        name = next((n for s, n in (('"<|start_header_id|>"', "llama3"), ('"<|im_start|>"', "chatml")) if s in vocab),
                    None)
    if name and text:  # a template of its own that none of ours equals: say what is used instead
        print(f"{model_dir}: its chat template is none we know; rendering as {name} (chosen by model_type and "
              "vocabulary; --chat-template forces one)", file=sys.stderr)
    if name:
        return name
    raise DataError(f"{model_dir}: cannot detect the chat template (no known template text, model_type {mt!r}); "
                    f"force one of {', '.join(sorted(set(TEMPLATES.values())))}")


def load_tokenizer(model_dir):
    """The `tokenizers` Tokenizer of a checkpoint folder (its tokenizer.json)."""
    from tokenizers import Tokenizer
    f = Path(model_dir) / "tokenizer.json"
    if not f.is_file():
        raise DataError(f"{f}: no such file (a tokenizer.json is needed)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises its own exception type for a truncated or foreign file
        raise DataError(f"{f}: not a readable tokenizer.json ({str(e).splitlines()[0][:120]})") from None


class ChatTemplate:
    """Renders conversations like the model's official chat template and encodes them with per-turn masks.
    `.tokenizer` is a tokenizers.Tokenizer with its post-processor removed: it never adds BOS/EOS itself, the
    template writes every special token."""

    def __init__(self, name, tokenizer, stop_ids=(), pad_id=None):
        if name.lower() not in TEMPLATES:
            raise DataError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
        self.name, self.tokenizer = TEMPLATES[name.lower()], tokenizer
        tokenizer.post_processor = None
        self.eot = "<|eot_id|>" if self.name == "llama3" else "<|im_end|>"
        for s in ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] \
                if self.name == "llama3" else ["<|im_start|>", "<|im_end|>"]:
            if tokenizer.token_to_id(s) is None:
                raise DataError(f"chat template {self.name}: the tokenizer has no {s} token")
        self.eot_id = tokenizer.token_to_id(self.eot)
        self.stop_ids = list(dict.fromkeys([self.eot_id, *stop_ids]))
        self.pad_id = self.eot_id if pad_id is None else pad_id

    @classmethod
    def from_pretrained(cls, model_dir, name=None):
        """The template of a checkpoint folder: its tokenizer.json, the template named or detected, stop ids (the
        end-of-turn token, eos_token_id of generation_config.json and config.json, tokenizer_config's eos_token)."""
        d = Path(model_dir)
        tok = load_tokenizer(d)
        cfgs = [read_json(d / f, DataError) if (d / f).is_file() else {}
                for f in ("generation_config.json", "config.json", "tokenizer_config.json")]
        stops = [i for c in cfgs[:2] for i in (c.get("eos_token_id") if isinstance(c.get("eos_token_id"), list)
                                             else [c.get("eos_token_id")]) if isinstance(i, int)]
        eos, pad = ((x.get("content") if isinstance(x, dict) else x) for x in (cfgs[2].get("eos_token"),
                                                                               cfgs[2].get("pad_token")))
        stops += [tok.token_to_id(eos)] if isinstance(eos, str) and tok.token_to_id(eos) is not None else []
        pad_id = tok.token_to_id(pad) if isinstance(pad, str) else None
        vocab = cfgs[1].get("vocab_size")
        if isinstance(vocab, int) and tok.get_vocab_size(with_added_tokens=True) > vocab:
            raise DataError(f"{d / 'tokenizer.json'}: {tok.get_vocab_size(with_added_tokens=True)} token ids, but "
                            f"config.json has vocab_size {vocab}: the tokenizer does not belong to this model")
        return cls(name or detect_template(d), tok, stops, cfgs[0].get("pad_token_id") if pad_id is None else pad_id)

    def segments(self, messages, add_generation_prompt=False, date_string=None, enable_thinking=None):
        """The rendered text as (text, k) segments: k > 0 marks supervised text of assistant turn k. An assistant
        message with "train": false keeps its number k but is rendered as context (k = 0)."""
        if not messages:
            raise DataError("cannot render an empty conversation")
        if self.name == "llama3":
            segs = self._llama3(messages, add_generation_prompt, date_string or LLAMA3_DATE)
        elif self.name == "qwen3":
            segs = self._qwen3(messages, add_generation_prompt, enable_thinking)
        else:
            segs = self._chatml(messages, add_generation_prompt)
        off = {k for k, m in enumerate((m for m in messages if m["role"] == "assistant"), 1) if m.get("train") is False}
        return [(t, 0 if k in off else k) for t, k in segs]

    def _chatml(self, messages, add_generation_prompt):
        default = {"qwen2.5": QWEN25_SYSTEM, "smollm2": SMOLLM2_SYSTEM, "chatml": None}[self.name]
        segs, k = [], 0
        if messages[0]["role"] != "system" and default is not None:
            segs.append((f"<|im_start|>system\n{default}<|im_end|>\n", 0))
        for m in messages:
            if m["role"] == "assistant":
                k += 1
                segs += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>", k), ("\n", 0)]
            else:
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
        return segs + ([("<|im_start|>assistant\n", 0)] if add_generation_prompt else [])

    def _llama3(self, messages, add_generation_prompt, date_string):
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        segs, k = [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>", 0)], 0
        for m in messages:
            head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                k += 1
                segs += [(head, 0), (m["content"].strip() + "<|eot_id|>", k)]
            else:
                segs.append((head + m["content"].strip() + "<|eot_id|>", 0))
        return segs + ([("<|start_header_id|>assistant<|end_header_id|>\n\n", 0)] if add_generation_prompt else [])

    def _qwen3(self, messages, add_generation_prompt, enable_thinking):
        # Qwen3 drops the reasoning of assistant turns before the last user message and gives the final
        # assistant turn a (possibly empty) <think> block; we render exactly that.
        last_query = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user" and not (
            messages[i]["content"].startswith("<tool_response>") and messages[i]["content"].endswith(
                "</tool_response>"))), len(messages) - 1)
        segs, k = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":  # system, user: verbatim
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
                continue
            k += 1
            content, reasoning = m["content"], m.get("reasoning_content") or ""
            if m.get("reasoning_content") is None and "</think>" in content:
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
        """-> {"input_ids", "labels", "turn_ids"}, lists of equal length: a token is supervised, with the turn of
        its characters, when any character it covers is (e.g. Qwen's "\n\n" when a reply starts with "\n")."""
        segs = self.segments(messages, False, date_string)
        text = "".join(t for t, _ in segs)
        char_turn = np.repeat([k for _, k in segs] + [0], [len(t) for t, _ in segs] + [1])
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        turn_ids = [int(char_turn[a:b].max()) if b > a else 0 for a, b in enc.offsets]
        labels = [t if k else -100 for t, k in zip(enc.ids, turn_ids)]
        return {"input_ids": list(enc.ids), "labels": labels, "turn_ids": turn_ids}

    def encode_prompt(self, messages, date_string=None):
        """Ids of the conversation so far plus the generation prompt (Qwen3: non-thinking, empty think block)."""
        text = self.render(messages, True, date_string, enable_thinking=False if self.name == "qwen3" else None)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class Report(dict):  # counts from build_examples; summary() says them in one line
    def summary(self):
        return (f"{self['conversations']} conversations -> {self['examples']} examples "
                f"({self['truncated']} truncated at a turn boundary, {self['dropped']} dropped: first turn longer "
                f"than max_len={self['max_len']}, {self['unsupervised']} with no supervised turn); assistant turns "
                f"kept {self['turns_kept']}, dropped {self['turns_dropped']}; {self['tokens']} tokens, "
                f"{self['supervised_tokens']} supervised")


def turn_group(turn_ids, labels, max_turn_groups=8):
    """b = index of the last supervised assistant turn (1-based), capped at max_turn_groups; 0 if none."""
    b = max((int(t) for t, label in zip(turn_ids, labels) if int(label) != -100), default=0)
    return b if max_turn_groups is None else min(b, max_turn_groups)


def build_examples(conversations, template, max_len, max_turn_groups=8, free=False):
    """Encode conversations -> (examples, report). Each example: input_ids, labels, turn_ids, group, n_turns (the
    assistant turns kept), index (position in examples), conv_index (position in conversations), meta (record
    fields except messages, plus per-kept-assistant-turn lists "noisy" / "noise_type" where messages carry them);
    with free, also "free": (turn, input_ids, labels) of each supervised reply after an empty user turn alone.
    A conversation longer than max_len loses its trailing turns; one whose first turn does not fit is dropped."""
    rep = Report(conversations=len(conversations), examples=0, truncated=0, dropped=0, unsupervised=0, turns_kept=0,
                 turns_dropped=0, tokens=0, supervised_tokens=0, max_len=max_len)
    examples = []
    for ci, conv in enumerate(conversations):
        msgs = conv["messages"]
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        enc, k = template.encode(msgs), len(asst)
        while k > 0 and len(enc["input_ids"]) > max_len:  # re-encode the cut conversation (Qwen3 renders its
            k -= 1                                         # last turn differently)
            enc = template.encode(msgs[:asst[k - 1] + 1]) if k else enc
        if k == 0 or all(label == -100 for label in enc["labels"]):
            rep["dropped" if k == 0 else "unsupervised"] += 1
            rep["turns_dropped"] += len(asst)
            continue
        rep["truncated"] += k < len(asst)
        rep["turns_dropped"] += len(asst) - k
        meta = {key: v for key, v in conv.items() if key != "messages"}
        for key in ("noisy", "noise_type"):
            if any(key in msgs[i] for i in asst[:k]):
                meta[key] = [msgs[i].get(key) for i in asst[:k]]
        examples.append({**enc, "group": turn_group(enc["turn_ids"], enc["labels"], max_turn_groups),
                         "n_turns": k, "meta": meta, "index": len(examples), "conv_index": ci})
        if free:  # the context-gain view: the same reply tokens with no dialogue before them
            alone = [(j, template.encode([{"role": "user", "content": ""}, {**msgs[i], "train": True}]))
                     for j, i in enumerate(asst[:k], 1) if msgs[i].get("train", True)]
            examples[-1]["free"] = [(j, e["input_ids"], e["labels"]) for j, e in alone]
        rep["turns_kept"] += k
        rep["tokens"] += len(enc["input_ids"])
        rep["supervised_tokens"] += sum(label != -100 for label in enc["labels"])
    rep["examples"] = len(examples)
    return examples, rep


def collate(examples, pad_id):
    """Right-pad examples -> input_ids (pad_id), labels (-100), turn_ids (0), attention_mask [B,T]; group, index [B]."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "labels": torch.full((B, T), -100, dtype=torch.long),
           "turn_ids": torch.zeros((B, T), dtype=torch.long), "attention_mask": torch.zeros((B, T), dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        for key in ("input_ids", "labels", "turn_ids"):
            out[key][i, :n] = torch.as_tensor(e[key], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
    out["group"] = torch.tensor([int(e.get("group", 0)) for e in examples], dtype=torch.long)
    out["index"] = torch.tensor([int(e.get("index", i)) for i, e in enumerate(examples)], dtype=torch.long)
    free = [(i, k, ids, lab) for i, e in enumerate(examples) for k, ids, lab in e.get("free", ())]
    if free:  # free_unit: (batch row, turn) of each reply scored alone
        T = max(len(f[2]) for f in free)
        out.update(free_ids=torch.tensor([f[2] + [pad_id] * (T - len(f[2])) for f in free]),
                   free_labels=torch.tensor([f[3] + [-100] * (T - len(f[3])) for f in free]),
                   free_mask=torch.tensor([[1] * len(f[2]) + [0] * (T - len(f[2])) for f in free]),
                   free_unit=torch.tensor([f[:2] for f in free]))
    return out


def epoch_batches(n, global_batch, seed, epoch, lengths=None, drop_last=False):
    """The global batches of one epoch: a permutation of range(n) seeded by (seed, epoch), cut into batches of
    global_batch (the last may be short unless drop_last). With lengths, indices are sorted by length inside
    chunks of 64 batches and the full batches shuffled, which cuts padding while keeping the order random."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None:
        lengths, chunk = np.asarray(lengths), 64 * global_batch
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in (order[i:i + chunk] for i in range(0, n, chunk))] or [order])
    batches = [order[i:i + global_batch].tolist() for i in range(0, n, global_batch)]
    full = len(batches) - (1 if batches and len(batches[-1]) < global_batch else 0)
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(full)] + batches[full:]
    return batches[:full] if drop_last else batches


def rank_slice(batch, rank, world_size):
    """Rank r's contiguous share of a global batch, so that the ranks' shares concatenated rank-major are the
    batch; a short batch is split as evenly as possible (earlier ranks get one more)."""
    q, rem = divmod(len(batch), world_size)
    start = rank * q + min(rank, rem)
    return batch[start:start + q + (rank < rem)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("check", help="validate a conversation file (and optionally encode it)")
    k.add_argument("path")
    k.add_argument("--on-bad-sample", default="error", choices=("error", "skip"))
    k.add_argument("--model", help="checkpoint folder: also encode and report truncation")
    k.add_argument("--chat-template")
    k.add_argument("--max-len", type=int, default=1024)
    a = p.parse_args(argv)
    try:
        if a.max_len < 2:
            raise DataError(f"--max-len must be at least 2, got {a.max_len}")
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
