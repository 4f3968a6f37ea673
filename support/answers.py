"""FastChat's question and answer files: the checks of their records, and the answer file that
an interrupted `eval.py generate` continues where it stopped.

An answer line is {"question_id": 81, "answer_id": "..", "model_id": "m", "choices": [{"index": 0,
"turns": [".."]}], "tstamp": 1700000000.0, "producer": {"base_fingerprint": "..", ...}}.
answer_file asks a function it is given (eval.py's generation) for one batch of questions at a
time and rewrites the file whole after each batch. A rerun continues only the answers of the same
Producer: the weights, chat template, dtype and generation settings; another producer's file is
refused in one line. The record checks raise the error class their caller passes, so that each
program reports bad input in its own terms.
"""
import dataclasses
import hashlib
import json
import os
import reprlib

from support.cli import UsageError
from support.conversations import BadSample, iter_json_records, normalize_record
from support.conversations import save_jsonl


class AnswerFileError(UsageError):
    """An answer file that cannot be continued; the message is one line naming the file."""


def read_objects(path, error):
    """(where, object) for each record of a .jsonl file (or a JSON array; .gz too), read as
    support/conversations.py reads them; bad JSON or a record that is not an object is `error`."""
    rows = []
    for where, obj in iter_json_records(path):
        if isinstance(obj, BadSample):
            raise error(f"{where}: invalid JSON ({obj.detail})")
        if not isinstance(obj, dict):
            raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, obj))
    return rows


def check_question_id(where, qid, error):
    """A question_id is an integer or a non-empty string, as in FastChat's files."""
    if qid is None:
        raise error(f"{where}: question_id is missing")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise error(f"{where}: question_id {reprlib.repr(qid)} is not an integer or a string")
    if isinstance(qid, str) and not qid.strip():
        raise error(f"{where}: question_id is an empty string")


def check_texts(where, field, value, error, blank_ok=False):
    """`field` is a non-empty list of strings, none of them blank unless blank_ok."""
    if value is None:
        raise error(f"{where}: {field} is missing")
    if not isinstance(value, list) or not value:
        found = reprlib.repr(value)
        raise error(f"{where}: {field} is {found}, expected a non-empty list of strings")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise error(f"{where}: {field}[{i}] is {reprlib.repr(text)}, expected a string")
        if not blank_ok and not text.strip():
            raise error(f"{where}: {field}[{i}] is blank")


ROLES = ("system", "user", "assistant")


def is_message(m):
    """A {role, content} message, as a question's context holds them."""
    return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)


def check_category(where, category, error):
    if not isinstance(category, str):
        raise error(f"{where}: category is {reprlib.repr(category)}, expected a string")


def file_question(where, record, error):
    """An MT-Bench question ({"question_id", "turns", "category"?, "reference"?, "context"?}) with
    every field checked, category and context filled in."""
    check_question_id(where, record.get("question_id"), error)
    check_texts(where, "turns", record.get("turns"), error)
    check_category(where, record.get("category", ""), error)
    if record.get("reference") is not None:  # MT-Bench leaves some turns' reference blank
        check_texts(where, "reference", record["reference"], error, blank_ok=True)
    context = record.get("context", [])
    if not isinstance(context, list) or not all(is_message(m) for m in context):
        raise error(f"{where}: context must be a list of {{role, content}} messages")
    return {"category": "", "context": [], **record}


def conversation_question(where, record, index, error):
    """A conversation as a question: the user turn before its final assistant turn (or its last
    message, a user's), with the dialogue before it as context; its id is "id", else its index."""
    conversation = normalize_record(record, where)
    messages = conversation["messages"]
    end = len(messages)
    if messages[-1]["role"] == "assistant":
        end -= 1
    category = conversation.get("category", "dialogue")
    check_category(where, category, error)
    question_id = conversation.get("id", index)
    check_question_id(where, question_id, error)
    return {"question_id": question_id, "category": category,
            "turns": [messages[end - 1]["content"]], "context": messages[:end - 1]}


@dataclasses.dataclass
class Producer:
    """What makes an answer file's answers; every answer line records it."""
    model_id: str
    base_fingerprint: str       # model.py's fingerprint of the base model's config and weights
    adapter_sha256: str | None  # of adapter_model.safetensors; None without an adapter
    chat_template: str
    dtype: str
    batch_size: int             # the seed of each batch of questions depends on it
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def short_hash(self):
        """8 hex digits of the whole producer, for the default answer file's name."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def producer_change(theirs, mine):
    """What differs between the producer a file records and this run's, in a few words."""
    if not isinstance(theirs, dict):
        return "an answer that does not record its producer"
    changed = []
    for key in sorted(theirs.keys() | mine.keys()):
        old = str(theirs.get(key))[:16]
        new = str(mine.get(key))[:16]
        if old != new:
            changed.append(f"{key} {old} in the file, {new} now")
    return "answers of another producer (" + "; ".join(changed) + ")"


def answers_so_far(out, producer):
    """{question_id: record} of the answers OUT holds ({} without OUT); each must be producer's."""
    if not os.path.exists(out):
        return {}
    mine = dataclasses.asdict(producer)
    done = {}
    for where, record in read_objects(out, AnswerFileError):
        if record.get("producer") != mine:
            change = producer_change(record.get("producer"), mine)
            raise AnswerFileError(f"{where}: {change}; give another --out")
        qid = record.get("question_id")
        check_question_id(where, qid, AnswerFileError)
        if qid in done:
            raise AnswerFileError(f"{where}: a second answer to question_id {reprlib.repr(qid)}")
        done[qid] = record
    return done


def answer_file(questions, out, producer, answer):
    """Answers to `questions` in OUT, producer.batch_size at a time: answer(batch, start) gives the
    FastChat records and the stats of the batch that starts at question `start`. OUT is rewritten
    whole (atomically) after each batch; a rerun keeps the answers OUT holds and asks only for the
    batches still missing. Answers to questions not asked this time stay."""
    done = answers_so_far(out, producer)
    order = {q["question_id"]: n for n, q in enumerate(questions)}
    if done:
        answered = len(order.keys() & done.keys())
        print(f"{out}: {answered} of {len(order)} questions answered already, continuing")
    new_tokens = 0
    seconds = 0.0
    size = producer.batch_size
    for start in range(0, len(questions), size):
        todo = [q for q in questions[start:start + size] if q["question_id"] not in done]
        if not todo:  # this batch was answered before: nothing to generate or write
            continue
        records, stats = answer(todo, start)
        for record in records:
            record["producer"] = dataclasses.asdict(producer)
            done[record["question_id"]] = record
        new_tokens += stats["new_tokens"]
        seconds += stats["seconds"]
        ordered = sorted(done.values(), key=lambda r: order.get(r["question_id"], len(order)))
        save_jsonl(ordered, out)
    rate = new_tokens / max(seconds, 1e-9)
    print(f"{len(questions)} answers -> {out}: {new_tokens} new tokens in {seconds:.1f}s "
          f"({rate:.1f} tokens/s)")
