"""eval.py: per-turn loss, generation, answer files, accuracy, judging (local SmolLM2 and HTTP), Spearman."""
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as E
from scripts import judge as J
from support import answers as A
from support.conversations import save_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Spearman

@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_spearman_matches_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9, 40, 200):
        for _ in range(20):
            x = rng.integers(0, 4, n).astype(float)  # heavy ties, like settings H / H+N / H+N+L
            y = np.round(rng.normal(size=n), 1) if n > 5 else rng.integers(0, 3, n).astype(float)
            np.testing.assert_allclose(E.rankdata(y), rankdata(y), rtol=0, atol=0)
            want = spearmanr(x, y).statistic
            got = E.spearman(x, y)
            if np.isnan(want):
                assert np.isnan(got)
            else:
                assert got == pytest.approx(want, abs=1e-12)
    assert E.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(E.EvalError, match="same length"):
        E.spearman([1, 2, 3], [1, 2])
    with pytest.raises(E.EvalError, match="finite"):
        E.spearman([1, 2, float("nan")], [1, 2, 3])


def run(cli, args):
    """A command line's cli(argv) in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def run_cli(*args):
    """eval.py's command line in this process (the script entry point itself is checked once, below)."""
    return run(E.cli, args)


def run_judge(*args):
    """scripts/judge.py's command line in this process."""
    return run(J.cli, args)


def test_cli_spearman():
    r = run_cli("spearman", "--x", "1,1,2,2,3,3", "--y", "6.0,6.2,5.5,5.9,5.1,5.0")
    assert r.returncode == 0, r.stderr
    from scipy.stats import spearmanr
    want = spearmanr([1, 1, 2, 2, 3, 3], [6.0, 6.2, 5.5, 5.9, 5.1, 5.0]).statistic
    assert json.loads(r.stdout)["spearman"] == pytest.approx(want)


def test_cli_spearman_refuses_a_value_that_is_not_a_number():
    r = subprocess.run([sys.executable, "eval.py", "spearman", "--x", "1,2,3", "--y", "1,2,x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # the script itself: exit 2, one line
    assert r.returncode == 2
    assert r.stderr == "eval.py: error: --y '1,2,x': value 3 ('x') is not a number\n"


@pytest.mark.parametrize("x, y, flag, position", [
    ("1,2,,3", "5,6,7", "--x", 3),      # dropped, the 3 would be paired with the 7 of setting 4
    ("1,2,3", "5,,6,7", "--y", 2),
    ("1,2,3,", "5,6,7", "--x", 4),
    (" ,1,2,3", "5,6,7", "--x", 1),
])
def test_cli_spearman_refuses_an_empty_value(x, y, flag, position):
    r = run_cli("spearman", "--x", x, "--y", y)
    assert r.returncode == 2
    assert r.stdout == ""  # no coefficient from misaligned lists
    value = x if flag == "--x" else y
    assert r.stderr == f"eval.py: error: {flag} {value!r}: value {position} is empty\n"


def test_cli_usage_errors_are_one_line():
    r = run_cli("spearman", "--x", "1,2")
    assert r.returncode == 2
    assert r.stderr == "eval.py: error: the following arguments are required: --y (see --help)\n"
    r = run_cli("generate", "--model", "m", "--questions", "q.jsonl", "--top-p", "0")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "argument --top-p: must be > 0 and <= 1, got 0" in r.stderr


def test_judge_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": [\n')
    r = run_judge("--questions", bad, "--answers", bad, "--judge-name", "x", "--cache", "")
    assert r.returncode == 2
    assert r.stderr.startswith(f"scripts/judge.py: error: {bad}:2: invalid JSON")
    assert r.stderr.count("\n") == 1
    r = run_judge("--questions", bad)
    assert r.returncode == 2
    assert r.stderr == ("scripts/judge.py: error: the following arguments are required: --answers "
                        "(see --help)\n")
    with pytest.raises(E.EvalError, match="nope.jsonl: no such file"):
        E.read_questions(str(tmp_path / "nope.jsonl"))


def test_judge_script_runs_as_a_program(tmp_path):
    """python scripts/judge.py: its own imports work from the script's folder; errors are one line."""
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    r = subprocess.run([sys.executable, "scripts/judge.py", "--questions", str(q), "--answers", str(q),
                        "--judge-name", "x", "--cache", ""], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr == (f"scripts/judge.py: error: {q}:1: not a model answer: choices must be a non-empty "
                        "list of objects\n")


# ---------------------------------------------------------------------------------------------------------------
# answer files and questions

def test_answer_file_roundtrip_in_fastchat_format(tmp_path, fixtures_dir):
    ref = [json.loads(line) for line in open(fixtures_dir / "mt_bench/reference_answer/gpt-4.jsonl")]
    recs = [E.answer_record(r["question_id"], "tiny", r["choices"][0]["turns"]) for r in ref[:5]]
    recs.append(E.answer_record(7, "tiny", ["ünïcode ✓\u2028\r\n```py\nprint(1)\n```", ""]))
    path = tmp_path / "sub" / "answers.jsonl"
    save_jsonl(recs, path)
    lines = path.read_bytes().decode("utf-8").split("\n")[:-1]  # one object per \n-terminated line
    assert len(lines) == len(recs)
    for line, rec in zip(lines, recs):
        row = json.loads(line)
        assert row == rec
        # the same keys and types as FastChat's own answer file
        assert set(row) == set(ref[0])
        assert set(row["choices"][0]) == set(ref[0]["choices"][0])
        assert [type(row[k]) for k in sorted(row)] == [type(ref[0][k]) for k in sorted(ref[0])]
        assert row["choices"][0]["index"] == 0
    back = J.read_answers(path)
    assert back == {r["question_id"]: r["choices"][0]["turns"] for r in recs}
    # FastChat's own file reads the same way
    fastchat = J.read_answers(fixtures_dir / "mt_bench/reference_answer/gpt-4.jsonl")
    assert fastchat[101] == ref[0]["choices"][0]["turns"]
    assert E.answer_record(1, "m", ["a"])["answer_id"] == E.answer_record(1, "m", ["a"])["answer_id"]


@pytest.mark.parametrize("record, message", [
    ({"question_id": 3, "choices": [{"turns": "x"}]},
     "choices[0].turns is 'x', expected a non-empty list of strings"),
    ({"question_id": 3, "choices": [{"turns": []}]},
     "choices[0].turns is [], expected a non-empty list of strings"),
    ({"question_id": 3, "choices": [{"turns": ["a", 5]}]}, "choices[0].turns[1] is 5, expected a string"),
    ({"question_id": 3, "choices": [{"index": 0}]}, "choices[0].turns is missing"),
    ({"question_id": 3, "choices": []}, "not a model answer: choices must be a non-empty list of objects"),
    ({"question_id": 3, "choices": ["x"]}, "not a model answer: choices must be a non-empty list of objects"),
    ({"question_id": 3, "choices": {"turns": ["x"]}}, "not a model answer: choices must be a non-empty list "
                                                      "of objects"),
    ({"question_id": 3}, "not a model answer: choices must be a non-empty list of objects"),
    ({"choices": [{"turns": ["x"]}]}, "question_id is missing"),
    ({"question_id": True, "choices": [{"turns": ["x"]}]}, "question_id True is not an integer or a string"),
    ({"question_id": 3.0, "choices": [{"turns": ["x"]}]}, "question_id 3.0 is not an integer or a string"),
    ({"question_id": " ", "choices": [{"turns": ["x"]}]}, "question_id is an empty string"),
    ({"question_id": 101, "choices": [{"turns": ["x"]}]}, "a second answer to question_id 101"),
])
def test_read_answers_checks_every_field(tmp_path, record, message):
    bad = tmp_path / "bad.jsonl"
    first = E.answer_record(101, "m", ["fine"])
    bad.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as e:
        J.read_answers(bad)
    assert str(e.value) == f"{bad}:2: {message}"


def test_read_answers_keeps_an_empty_answer(tmp_path):
    path = tmp_path / "a.jsonl"
    save_jsonl([E.answer_record(1, "m", ["", "two"])], path)
    assert J.read_answers(path) == {1: ["", "two"]}


def test_read_mt_bench_questions(fixtures_dir):
    qs = E.read_questions(str(fixtures_dir / "mt_bench/question.jsonl"))
    raw = [json.loads(line) for line in open(fixtures_dir / "mt_bench/question.jsonl")]
    assert len(qs) == 80
    assert [q["turns"] for q in qs] == [r["turns"] for r in raw]
    assert [q["context"] for q in qs] == [[]] * 80
    assert [q.get("reference") for q in qs] == [r.get("reference") for r in raw]
    assert [q["category"] for q in qs] == [r["category"] for r in raw]


@pytest.mark.parametrize("record, message", [
    ({"question_id": 2, "turns": []}, "turns is [], expected a non-empty list of strings"),
    ({"question_id": 2, "turns": "hi"}, "turns is 'hi', expected a non-empty list of strings"),
    ({"question_id": 2, "turns": ["hi", " \n"]}, "turns[1] is blank"),
    ({"question_id": 2, "turns": ["hi", None]}, "turns[1] is None, expected a string"),
    ({"question_id": 2, "turns": None}, "turns is missing"),
    ({"question_id": None, "turns": ["hi"]}, "question_id is missing"),
    ({"question_id": "", "turns": ["hi"]}, "question_id is an empty string"),
    ({"question_id": False, "turns": ["hi"]}, "question_id False is not an integer or a string"),
    ({"question_id": 1.0, "turns": ["hi"]}, "question_id 1.0 is not an integer or a string"),
    ({"question_id": [1], "turns": ["hi"]}, "question_id [1] is not an integer or a string"),
    ({"question_id": 1, "turns": ["hi"]}, "question_id 1 is repeated"),
    ({"question_id": 2, "turns": ["hi"], "category": 3}, "category is 3, expected a string"),
    ({"question_id": 2, "turns": ["hi"], "reference": "x"}, "reference is 'x', expected a non-empty list"),
    ({"question_id": 2, "turns": ["hi"], "reference": []}, "reference is [], expected a non-empty list"),
    ({"question_id": 2, "turns": ["hi"], "reference": [4]}, "reference[0] is 4, expected a string"),
    ({"question_id": 2, "turns": ["hi"], "context": [{"role": "robot", "content": "x"}]},
     "context must be a list of {role, content} messages"),
    ({"question_id": 2, "turns": ["hi"], "context": "x"}, "context must be a list of {role, content} messages"),
])
def test_question_files_are_checked_field_by_field(tmp_path, record, message):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(E.EvalError) as e:
        E.read_questions(str(q))
    assert str(e.value).startswith(f"{q}:2: {message}")


def test_conversation_files_as_questions_are_checked(tmp_path):
    f = tmp_path / "c.jsonl"
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    for extra, message in (({"id": 1.5}, "question_id 1.5 is not an integer or a string"),
                           ({"id": ""}, "question_id is an empty string"),
                           ({"category": ["x"]}, "category is ['x'], expected a string")):
        f.write_text(json.dumps(conv) + "\n" + json.dumps({**conv, **extra}) + "\n")
        with pytest.raises(E.EvalError) as e:
            E.read_questions(str(f))
        assert str(e.value) == f"{f}:2: {message}"
    f.write_text(json.dumps({"id": "a", **conv}) + "\n" + json.dumps({"id": "a", **conv}) + "\n")
    with pytest.raises(E.EvalError, match="c.jsonl:2: question_id 'a' is repeated"):
        E.read_questions(str(f))


# ---------------------------------------------------------------------------------------------------------------
# HTTP judge against a scripted local server

class Server:
    """OpenAI-compatible stub on 127.0.0.1: each request takes the next scripted action
    (("ok", content) | ("status", code) | ("sleep", seconds) | ("raw", bytes)); with the script empty: ok."""

    def __init__(self, default="Rating: [[7]]"):
        self.script, self.requests, self.default = [], [], default
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                kind, val = srv.script.pop(0) if srv.script else ("ok", srv.default)
                if kind == "sleep":
                    threading.Event().wait(val)
                    kind, val = "ok", srv.default
                if kind in ("redirect", "echo"):  # a redirect elsewhere; an error whose body echoes the request
                    self.send_response(302 if kind == "redirect" else val)
                    self.send_header("Location", val) if kind == "redirect" else None
                    self.end_headers()
                    self.wfile.write(f"bad request {self.path} {self.headers.get('Authorization')}".encode())
                    return
                if kind == "status":
                    self.send_response(val)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope"}}')
                    return
                out = val if kind == "raw" else json.dumps(
                    {"choices": [{"index": 0, "message": {"role": "assistant", "content": val}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


MSGS = [{"role": "user", "content": "Rate this."}]


def test_http_judge_url_key_from_env_and_request(server, monkeypatch):
    monkeypatch.setenv("RESURE_JUDGE_URL", server.url)
    monkeypatch.setenv("RESURE_JUDGE_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    j = J.HTTPJudge("judge-1", timeout=5, retries=0)
    assert j("single", MSGS) == {"score": 7.0, "reply": "Rating: [[7]]"}
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1"
    assert req["body"]["messages"] == MSGS
    assert req["body"]["temperature"] == 0
    monkeypatch.delenv("RESURE_JUDGE_KEY")  # $OPENAI_API_KEY is for OpenAI's own endpoint only, never this one
    J.HTTPJudge("judge-1", timeout=5, retries=0).chat(MSGS)
    assert server.requests[1]["auth"] is None
    assert J.HTTPJudge("judge-1", url="https://api.openai.com/v1").key == "sk-other"
    assert J.HTTPJudge("judge-1", url="https://api.openai.com.evil.example/v1").key is None
    J.HTTPJudge("judge-1", url=server.url + "/chat/completions", key="flag", timeout=5).chat(MSGS)  # flags win
    assert server.requests[2]["auth"] == "Bearer flag"
    assert server.requests[2]["path"] == "/v1/chat/completions"


def test_http_judge_never_stores_or_prints_a_key_in_the_url(server, tmp_path):
    """A key passed in the URL's query string reaches the server, but not the cache, the results or an error."""
    url = server.url + "?api-version=1&api-key=SECRET123"
    j = J.HTTPJudge("j", url=url, timeout=5, retries=0)
    cache = tmp_path / "cache.jsonl"
    J.judge_single(j, QUESTIONS, GOOD, J.JudgeCache(str(cache)))
    assert server.requests[0]["path"] == "/v1/chat/completions?api-version=1&api-key=SECRET123"
    assert "SECRET123" not in cache.read_text()
    assert "SECRET123" not in j.id
    server.script = [("status", 401)]
    with pytest.raises(J.JudgeError) as e:
        j.chat(MSGS)
    assert "SECRET123" not in str(e.value)
    assert "127.0.0.1" in str(e.value)
    with pytest.raises(J.JudgeError) as e:
        J.HTTPJudge("j", url="http://127.0.0.1:9/v1?key=SECRET123", timeout=0.5, retries=0).chat(MSGS)
    assert "SECRET123" not in str(e.value)


def test_cli_judge_with_a_key_in_the_url_writes_it_nowhere(server, tmp_path):
    q = tmp_path / "q.jsonl"
    a = tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "context"}) + "\n" for x in QUESTIONS))
    save_jsonl([E.answer_record(k, "good", v) for k, v in GOOD.items()], a)
    out = tmp_path / "results" / "r.json"
    r = run_judge("--questions", q, "--answers", a, "--judge-name", "j", "--judge-url",
                  server.url + "?api-key=SECRET123", "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(server.requests) == 4
    assert "SECRET123" not in r.stdout + r.stderr
    for f in out.parent.iterdir():
        assert "SECRET123" not in f.read_text(), f


MALFORMED_URLS = [
    "http://user:SECRET123@/v1",                  # credentials, no host (an unset variable)
    "http://SECRET123@/v1",
    "http://user:SECRET123@127.0.0.1:9/v1",       # credentials with a host
    "https://SECRET123:@127.0.0.1/v1",
    "http://user:SECRET123@[::1]:9/v1",
    "user:SECRET123@127.0.0.1/v1",                # no scheme
    "127.0.0.1:9/v1?key=SECRET123",
    "//127.0.0.1:9/v1?key=SECRET123",
    "ftp://127.0.0.1/v1?key=SECRET123",
    "http:///v1?key=SECRET123",                   # no host, a key in the query
    "http://:9/v1?key=SECRET123",
    "http://127.0.0.1:SECRET123/v1",              # bad port
    "http://127.0.0.1:99999/v1?key=SECRET123",
    "http://127.0.0.1:0/v1?key=SECRET123",
    "http://[::1/v1?key=SECRET123",
    "http://127.0.0.1:9/v 1?key=SECRET123",       # spaces and control characters
    "http://127.0.0.1:9/v1?key=SECRET123 ",
    " http://user:SECRET123@127.0.0.1:9/v1",
    "http://127.0.0.1:9/v1?key=SECRET123\n",
    "http://127.0.0.1:9/v1?key=SECRET123\x00",
    "http://127.0.0.1:9/vé?key=SECRET123",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_a_malformed_judge_url_is_refused_without_showing_it(url, tmp_path, monkeypatch):
    with pytest.raises(J.JudgeSetupError) as e:
        J.HTTPJudge("j", url=url, key="sk-KEY456", timeout=1, retries=0)
    assert "SECRET" not in str(e.value)
    assert "KEY456" not in str(e.value)
    assert str(e.value).startswith("--judge-url: ")
    from_variable = "\x00" not in url  # an environment variable cannot hold a NUL
    if from_variable:
        monkeypatch.setenv("RESURE_JUDGE_URL", url)
        with pytest.raises(J.JudgeSetupError) as e:
            J.HTTPJudge("j", timeout=1, retries=0)
        assert "SECRET" not in str(e.value)
        assert str(e.value).startswith("$RESURE_JUDGE_URL: ")
    # the command line: one line, exit 2, nothing written, on the flag and on the variable
    q = tmp_path / "q.jsonl"
    a = tmp_path / "a.jsonl"
    q.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    save_jsonl([E.answer_record(1, "m", ["yo"])], a)
    out = tmp_path / "out" / "r.json"
    for flags in (("--judge-url", url), ())[:1 + from_variable]:
        r = run_judge("--questions", q, "--answers", a, "--judge-name", "j", "--judge-key", "sk-KEY456",
                      "--out", out, *flags)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1
        assert "SECRET" not in r.stdout + r.stderr
        assert "KEY456" not in r.stdout + r.stderr
        assert list(out.parent.iterdir()) == []


def test_a_judge_url_with_user_info_says_where_the_key_goes():
    with pytest.raises(J.JudgeSetupError) as e:
        J.HTTPJudge("j", url="http://user:SECRET123@/v1")
    assert str(e.value) == ("--judge-url: user info (user:password@) is not supported; give the key with "
                            "--judge-key or $RESURE_JUDGE_KEY (the URL is not shown: it may hold a key)")


def test_http_judge_redacts_echoed_keys_and_refuses_redirects(server):
    """A server that echoes the request (path with its query key, Authorization) into an error body, and one that
    redirects the request (with its key) to another address."""
    j = J.HTTPJudge("j", url=server.url + "?api-key=SECRET123", key="sk-KEY456", timeout=5, retries=0)
    server.script = [("echo", 400)]
    with pytest.raises(J.JudgeError) as e:
        j.chat(MSGS)
    assert "HTTP 400" in str(e.value)
    assert "SECRET123" not in str(e.value)
    assert "KEY456" not in str(e.value)
    other = Server()
    try:
        server.script = [("redirect", other.url + "/chat/completions")]
        with pytest.raises(J.JudgeError, match="HTTP 302"):
            j.chat(MSGS)
        assert other.requests == []  # the key never reached the other address
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


def test_cli_judge_writes_nothing_into_the_working_directory(server, tmp_path, monkeypatch):
    work = tmp_path / "work"
    res = tmp_path / "results"
    work.mkdir()
    monkeypatch.chdir(work)
    q = tmp_path / "q.jsonl"
    a = tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "context"}) + "\n" for x in QUESTIONS))
    save_jsonl([E.answer_record(k, "good", v) for k, v in GOOD.items()], a)
    r = run_judge("--questions", q, "--answers", a, "--judge-name", "j", "--judge-url", server.url,
                  "--out", res / "r.json")
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in res.iterdir()) == ["judge_cache.jsonl", "r.json"]


def test_negative_retries_is_bad_input():
    with pytest.raises(ValueError, match="0 <= retries <= 100") as e:
        J.HTTPJudge("m", url="http://127.0.0.1:9", retries=-1)
    assert not isinstance(e.value, J.JudgeError)  # exit 2 (bad input), not 1 (the backend failed)


def test_http_judge_timeouts_and_retries_with_backoff(server, monkeypatch):
    waits = []
    real_sleep = time.sleep

    def sleep(seconds):
        waits.append(seconds)
        real_sleep(seconds)
    monkeypatch.setattr(J.time, "sleep", sleep)
    j = J.HTTPJudge("j", url=server.url, timeout=0.3, retries=3, backoff=0.01)
    server.script = [("sleep", 1.0), ("status", 500), ("status", 429), ("ok", "Fine. Rating: [[9]]")]
    assert j("single", MSGS)["score"] == 9.0
    assert len(server.requests) == 4
    assert waits == [0.01, 0.02, 0.04]
    # every attempt times out: a one-line error naming the URL, the attempts and the last error
    server.script = [("sleep", 1.0)] * 3
    j = J.HTTPJudge("j", url=server.url, timeout=0.2, retries=2, backoff=0.01)
    with pytest.raises(J.JudgeError, match=r"no reply after 3 attempts \(last: .*timed out") as ei:
        j.chat(MSGS)
    assert "\n" not in str(ei.value)
    assert server.url in str(ei.value)
    # a client error is not retried
    n = len(server.requests)
    server.script = [("status", 401)]
    with pytest.raises(J.JudgeError, match="HTTP 401"):
        j.chat(MSGS)
    assert len(server.requests) == n + 1
    # nobody listening
    with pytest.raises(J.JudgeError, match="no reply after 2 attempts"):
        J.HTTPJudge("j", url="http://127.0.0.1:9/v1", timeout=0.5, retries=1, backoff=0.01).chat(MSGS)


def test_http_judge_malformed_reply(server):
    j = J.HTTPJudge("j", url=server.url, timeout=5, retries=2, backoff=0.01)
    for raw in (b"<html>bad gateway</html>", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}'):
        server.script = [("raw", raw)]
        n = len(server.requests)
        with pytest.raises(J.JudgeError, match="malformed reply, expected JSON with choices") as ei:
            j.chat(MSGS)
        assert "\n" not in str(ei.value)
        assert len(server.requests) == n + 1  # not retried
    # a well-formed reply without a strict verdict is unparsed (None), never guessed
    for reply in ("I'd say 8.", "Rating: [[8]] ... or maybe [[6]]", "Rating: [[11]]", "Rating: [[0]]"):
        server.script = [("ok", reply)]
        assert j("single", MSGS)["score"] is None
    server.script = [("ok", "A is clearer. Verdict: [[A]]")]
    assert j("pair", MSGS)["verdict"] == "A"
    assert J.parse_verdict("single", "Rating: [[ 10 ]]") == "10"
    assert J.parse_verdict("pair", "[[B]] then [[B]]") == "B"
    assert J.parse_verdict("pair", "[[D]]") is None


QUESTIONS = [{"question_id": 1, "category": "x", "turns": ["Name a fruit.", "And a colour?"], "context": []},
             {"question_id": 2, "category": "x", "turns": ["2+2?", "Times 3?"], "context": [],
              "reference": ["4", "12"]}]
GOOD = {1: ["An apple.", "Red."], 2: ["4", "12"]}
BAD = {1: ["A chair.", "Seven."], 2: ["5", "15"]}


def test_judge_cache_resumes_without_paying_twice(server, tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    j = J.HTTPJudge("j", url=server.url, timeout=5, retries=0, backoff=0.01)
    server.script = [("ok", "Rating: [[8]]"), ("ok", "Rating: [[5]]"), ("status", 401)]
    with pytest.raises(J.JudgeError):  # interrupted after two paid judgments
        J.judge_single(j, QUESTIONS, GOOD, J.JudgeCache(str(cache_path)))
    assert len(cache_path.read_text().splitlines()) == 2
    assert len(server.requests) == 3
    server.script = [("ok", "Rating: [[3]]"), ("ok", "no verdict here")]
    with open(cache_path, "a") as f:
        f.write('{"key": "abc", "res')  # a half-written line from a killed run
    res = J.judge_single(j, QUESTIONS, GOOD, J.JudgeCache(str(cache_path)))
    assert len(server.requests) == 5  # only the two missing judgments were requested
    assert res["cache_hits"] == 2
    assert res["judged"] == 3
    assert res["unparsed"] == 1
    assert res["missing"] == 0
    # judged in order q1t1=8, q1t2=5, q2t1=3, q2t2=unparsed
    assert res["score"] == pytest.approx(16 / 3)
    assert res["per_turn"] == {1: 5.5, 2: 5.0}
    assert all(json.loads(line)["key"] for line in cache_path.read_text().splitlines())  # the torn line is gone
    res2 = J.judge_single(j, QUESTIONS, GOOD, J.JudgeCache(str(cache_path)))
    assert len(server.requests) == 5
    assert res2["cache_hits"] == 4
    assert res2["score"] == res["score"]
    # other answers or another judge are other keys
    J.judge_single(j, QUESTIONS, BAD, J.JudgeCache(str(cache_path)))
    assert len(server.requests) == 9
    # the question and the answers are in the prompt the judge saw
    text = server.requests[-1]["body"]["messages"][1]["content"]
    for part in ("Times 3?", "15", "Reference answer", "12"):
        assert part in text
    bad = tmp_path / "bad_cache.jsonl"
    bad.write_text('garbage\n{"key": "k", "result": {}}\n')
    with pytest.raises(ValueError, match="bad_cache.jsonl:1: not a judge-cache line"):
        J.JudgeCache(str(bad))


def test_cli_judge_http_pairwise_resumes(server, tmp_path):
    q = tmp_path / "q.jsonl"
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    cache = tmp_path / "cache.jsonl"
    q.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "context"}) + "\n" for x in QUESTIONS))
    save_jsonl([E.answer_record(k, "good", v) for k, v in GOOD.items()], a)
    save_jsonl([E.answer_record(k, "bad", v) for k, v in BAD.items()], b)
    server.default = "Verdict: [[C]]"
    server.script = [("ok", "Verdict: [[A]]"), ("ok", "[[B]]"), ("status", 503), ("ok", "[[A]]"), ("ok", "[[A]]")]
    args = ("--questions", q, "--answers", a, "--answers-b", b, "--judge-name", "j",
            "--judge-url", server.url, "--cache", cache, "--retries", "2", "--out", tmp_path / "r.json")
    r = run_judge(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # q1t1: A then B (both orders pick GOOD) = win; q1t2: A, A = position bias = tie; q2: C, C = ties
    assert (res["win"], res["tie"], res["loss"], res["missing"]) == (1, 3, 0, 0)
    assert len(server.requests) == 9
    assert json.loads((tmp_path / "r.json").read_text()) == res
    r = run_judge(*args)  # everything cached: no request paid twice
    assert r.returncode == 0
    assert len(server.requests) == 9
    assert json.loads(r.stdout)["cache_hits"] == 8
    server.script = [("raw", b"oops")]
    r = run_judge(*args[:-4], "--cache", "")
    assert r.returncode == 1
    assert "malformed reply" in r.stderr
    assert r.stderr.count("\n") == 1


def test_cli_judge_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    save_jsonl([E.answer_record(1, "m", ["yo"])], tmp_path / "a.jsonl")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(J, "judge_single", interrupted)
    r = run_judge("--questions", q, "--answers", tmp_path / "a.jsonl", "--judge-name", "j", "--judge-url",
                  "http://127.0.0.1:9/v1", "--cache", "")
    assert r.returncode == 130
    assert r.stderr == ("scripts/judge.py: interrupted (the cache keeps every judgment made; the same command "
                        "continues)\n")


class StubJudge:
    """Prefers the conversation whose answers are from GOOD; with bias=True always says A (position bias)."""
    backend = "http"
    id = "stub"

    def __init__(self, bias=False):
        self.bias = bias
        self.calls = 0

    def __call__(self, kind, messages):
        self.calls += 1
        if self.bias:
            return {"verdict": "A"}
        text = messages[1]["content"]
        a = text.split("[Conversation with assistant A]")[1].split("[Conversation with assistant B]")[0]
        good = any(g in a for g in ("apple", "Red.")) or "### Assistant:\n4" in a
        return {"verdict": "A" if good else "B"}


def test_pairwise_both_orders_cancel_position_bias():
    j = StubJudge()
    res = J.judge_pairwise(j, QUESTIONS, GOOD, BAD)
    assert (res["win"], res["tie"], res["loss"], res["win_rate"]) == (4, 0, 0, 1.0)
    assert j.calls == 8
    res = J.judge_pairwise(StubJudge(), QUESTIONS, BAD, GOOD)
    assert (res["win"], res["tie"], res["loss"]) == (0, 0, 4)
    res = J.judge_pairwise(StubJudge(bias=True), QUESTIONS, GOOD, BAD)
    assert (res["win"], res["tie"], res["loss"], res["win_rate_ties_half"]) == (0, 4, 0, 0.5)
    res = J.judge_pairwise(StubJudge(), QUESTIONS, GOOD, {1: ["A chair."]})  # B lacks 3 turns: counted
    assert res["missing"] == 3
    assert res["win"] == 1


# ---------------------------------------------------------------------------------------------------------------
# a tiny random llama with SmolLM2's tokenizer and chat template

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    import shutil
    import transformers
    d = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / f, d / f)
    model, template = E.load(str(d))
    return d, hf, model, template


CONVS = [
    {"messages": [{"role": "user", "content": "Start a counter at 12 and reply with its value only."},
                  {"role": "assistant", "content": "12"}, {"role": "user", "content": "Add 3."},
                  {"role": "assistant", "content": "15"}, {"role": "user", "content": "Minus 4."},
                  {"role": "assistant", "content": "11"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo ✓ — 1+1?"},
                  {"role": "assistant", "content": "2, of course.\n```py\nprint(1 + 1)\n```"}]},
    {"messages": [{"role": "user", "content": "Keep a shopping list. Start with milk."},
                  {"role": "assistant", "content": "milk"}, {"role": "user", "content": "Add eggs."},
                  {"role": "assistant", "content": "milk, eggs"}, {"role": "user", "content": "Drop milk."},
                  {"role": "assistant", "content": "eggs"}, {"role": "user", "content": "Add tea."},
                  {"role": "assistant", "content": "eggs, tea"}]},
]


def test_per_turn_loss_equals_hand_computation(tiny):
    from data import build_examples
    _, hf, model, template = tiny
    examples, _ = build_examples(CONVS, template, max_len=512)
    # oracle: transformers' logits of each conversation alone, cross-entropy by hand in float64, per turn depth
    want = {None: {}, 2: {}}
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        for t in range(1, len(ex["input_ids"])):
            if ex["labels"][t] != -100:
                nll = -logp[t - 1, ex["labels"][t]].item()
                for cap in want:
                    d = min(ex["turn_ids"][t], cap or 99)
                    s, n = want[cap].get(d, (0.0, 0))
                    want[cap][d] = (s + nll, n + 1)
    assert sorted(want[None]) == [1, 2, 3, 4]
    assert sorted(want[2]) == [1, 2]
    for cap, w in want.items():
        got = E.per_turn_loss(model, examples, batch_size=2, pad_id=template.pad_id, max_turn_groups=cap)
        assert sorted(got["per_turn"]) == sorted(w)
        for d, (s, n) in w.items():
            r = got["per_turn"][d]
            assert r["tokens"] == n
            assert r["loss"] == pytest.approx(s / n, rel=1e-5)
            assert r["ppl"] == pytest.approx(np.exp(s / n), rel=1e-5)
        total = sum(s for s, _ in w.values())
        tokens = sum(n for _, n in w.values())
        assert got["overall"]["tokens"] == tokens
        assert got["overall"]["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_cli_loss_table_and_json(tiny, tmp_path):
    d, _, model, template = tiny
    f = tmp_path / "convs.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in CONVS))
    r = run_cli("loss", "--model", d, "--data", f, "--out", tmp_path / "loss.json")
    assert r.returncode == 0, r.stderr
    assert "turn   4" in r.stdout
    assert "turn all" in r.stdout
    from data import build_examples
    want = E.per_turn_loss(model, build_examples(CONVS, template, 2048)[0], pad_id=template.pad_id)
    got = json.loads((tmp_path / "loss.json").read_text())
    assert got["overall"] == pytest.approx(want["overall"], rel=1e-5)
    assert sorted(got["per_turn"]) == ["1", "2", "3", "4"]
    for k, v in want["per_turn"].items():
        assert got["per_turn"][str(k)] == pytest.approx(v, rel=1e-5)
    r = run_cli("loss", "--model", tmp_path / "nothing", "--data", f)
    assert r.returncode == 2
    assert r.stderr == f"eval.py: error: --model {tmp_path / 'nothing'}: not a folder\n"
    f.write_text(json.dumps(CONVS[0]) + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = run_cli("loss", "--model", d, "--data", f)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "convs.jsonl:2: unknown role" in r.stderr


def without(records, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


def test_generate_answers_equal_model_generate_and_roundtrip(tiny, tmp_path, fixtures_dir):
    import model as M
    d, _, model, template = tiny
    questions = E.read_questions(str(fixtures_dir / "mt_bench/question.jsonl"))[:3]
    conv_file = tmp_path / "convs.jsonl"
    open_end = {"messages": CONVS[2]["messages"][:5]}  # ends with the user's "Drop milk."
    conv_file.write_text("".join(json.dumps(c) + "\n" for c in ({"id": "c1", **CONVS[0]}, CONVS[1], open_end)))
    conv_qs = E.read_questions(str(conv_file))
    assert [q["question_id"] for q in conv_qs] == ["c1", 1, 2]
    assert [q["turns"] for q in conv_qs] == [["Minus 4."], ["Héllo ✓ — 1+1?"], ["Drop milk."]]
    assert conv_qs[0]["context"] == CONVS[0]["messages"][:4]
    assert conv_qs[2]["context"] == open_end["messages"][:4]
    questions += conv_qs
    recs, stats = E.generate_answers(model, template, questions, "tiny", batch_size=2, max_new_tokens=6)
    # oracle: model.generate one prompt at a time, each turn with the model's own earlier answers in context
    n_new = 0
    for q, rec in zip(questions, recs):
        msgs = list(q["context"])
        want = []
        for u in q["turns"]:
            msgs.append({"role": "user", "content": u})
            out = M.generate(model, [template.encode_prompt(msgs)], max_new_tokens=6,
                             stop_ids=template.stop_ids, pad_id=template.pad_id)[0]
            n_new += len(out)
            want.append(template.tokenizer.decode(out, skip_special_tokens=True).strip())
            msgs.append({"role": "assistant", "content": want[-1]})
        assert rec["question_id"] == q["question_id"]
        assert rec["model_id"] == "tiny"
        assert rec["choices"] == [{"index": 0, "turns": want}]
    assert stats["new_tokens"] == n_new
    assert stats["tokens_per_s"] > 0
    assert any(len(t) > 0 for r in recs for t in r["choices"][0]["turns"])
    # CLI: same answers in the documented file format, each with its producer
    out = tmp_path / "answers.jsonl"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({k: q[k] for k in ("question_id", "category", "turns")}) + "\n"
                             for q in questions[:3]))
    r = run_cli("generate", "--model", d, "--questions", qfile, "--out", out, "--max-new-tokens", "6",
                "--model-id", "tiny", "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert without(rows, "tstamp", "producer") == without(recs[:3], "tstamp")
    assert rows[0]["producer"] == {"model_id": "tiny", "base_fingerprint": model.fingerprint,
                                   "adapter_sha256": None, "chat_template": template.name, "dtype": "float32",
                                   "batch_size": 3, "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0,
                                   "seed": None}
    assert all(row["producer"] == rows[0]["producer"] for row in rows)
    assert J.read_answers(out) == {rec["question_id"]: rec["choices"][0]["turns"] for rec in recs[:3]}


def producer(model_id="tiny", **changes):
    settings = dict(model_id=model_id, base_fingerprint="0123456789abcdef", adapter_sha256=None,
                    chat_template="chatml", dtype="float32", batch_size=2, max_new_tokens=5, temperature=0.0,
                    top_p=1.0, seed=None)
    return A.Producer(**{**settings, **changes})


def answering(model, template):
    """The function `eval.py generate` gives answer_file, on producer()'s settings (unseeded)."""
    def answer(batch, start):
        return E.generate_answers(model, template, batch, "tiny", batch_size=2, max_new_tokens=5)
    return answer


def test_generate_saves_each_batch_and_a_rerun_continues(tiny, tmp_path, fixtures_dir, monkeypatch, capsys):
    """An interrupted `eval.py generate` keeps the batches it finished; the same command continues from them and
    ends with the answers of an uninterrupted run, in question order."""
    d, _, model, template = tiny
    questions = E.read_questions(str(fixtures_dir / "mt_bench/question.jsonl"))[:5]
    want = E.generate_answers(model, template, questions, "tiny", batch_size=2, max_new_tokens=5)[0]
    out = tmp_path / "a.jsonl"
    real = E.generate_answers
    calls = []

    def stops_at_third_batch(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(E, "generate_answers", stops_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        A.answer_file(questions, str(out), producer(), answering(model, template))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert without(kept, "tstamp", "producer") == without(want[:4], "tstamp")  # two finished batches, whole
    calls.clear()

    def counted(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)
    monkeypatch.setattr(E, "generate_answers", counted)
    A.answer_file(questions, str(out), producer(), answering(model, template))
    assert "a.jsonl: 4 of 5 questions answered already, continuing" in capsys.readouterr().out
    assert calls == [1]  # only the fifth question was asked again; answered batches are not even called
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert without(rows, "tstamp", "producer") == without(want, "tstamp")
    assert rows[:4] == kept  # the earlier answers are kept as they were, tstamp too
    # Ctrl-C in the command itself: one line, exit 130, nothing half-written
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    fresh = tmp_path / "b.jsonl"
    assert E.cli(["generate", "--model", str(d), "--questions", str(fixtures_dir / "mt_bench/question.jsonl"),
                  "--out", str(fresh), "--model-id", "tiny"]) == 130
    assert capsys.readouterr().err == ("eval.py: interrupted (generate keeps the answers it wrote; the same "
                                       "command continues)\n")
    assert not fresh.exists()


@pytest.mark.parametrize("change, named", [
    ({"model_id": "other"}, "model_id tiny in the file, other now"),
    ({"adapter_sha256": "f" * 64}, "adapter_sha256 None in the file, ffffffffffffffff now"),
    ({"base_fingerprint": "fedcba9876543210"},
     "base_fingerprint 0123456789abcdef in the file, fedcba9876543210 now"),
    ({"max_new_tokens": 6}, "max_new_tokens 5 in the file, 6 now"),
    ({"temperature": 0.7, "seed": 1}, "seed None in the file, 1 now; temperature 0.0 in the file, 0.7 now"),
    ({"batch_size": 3}, "batch_size 2 in the file, 3 now"),
    ({"chat_template": "llama3"}, "chat_template chatml in the file, llama3 now"),
    ({"dtype": "bfloat16"}, "dtype float32 in the file, bfloat16 now"),
])
def test_answer_file_of_another_producer_is_refused(tiny, tmp_path, change, named, monkeypatch):
    _, _, model, template = tiny
    questions = [{"question_id": 1, "turns": ["Hi."], "context": []},
                 {"question_id": 2, "turns": ["Bye."], "context": []}]
    out = tmp_path / "a.jsonl"
    A.answer_file(questions[:1], str(out), producer(), answering(model, template))
    before = out.read_bytes()
    calls = []
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: calls.append(a))
    with pytest.raises(A.AnswerFileError) as e:
        A.answer_file(questions, str(out), producer(**change), answering(model, template))
    assert str(e.value) == f"{out}:1: answers of another producer ({named}); give another --out"
    assert calls == []
    assert out.read_bytes() == before


def test_answer_file_without_producers_is_refused(tiny, tmp_path, fixtures_dir):
    """A FastChat answer file (or one of another program) records no producer: it is not continued."""
    _, _, model, template = tiny
    out = tmp_path / "gpt-4.jsonl"
    out.write_bytes((fixtures_dir / "mt_bench/reference_answer/gpt-4.jsonl").read_bytes())
    questions = E.read_questions(str(fixtures_dir / "mt_bench/question.jsonl"))[:1]
    with pytest.raises(A.AnswerFileError) as e:
        A.answer_file(questions, str(out), producer(), answering(model, template))
    assert str(e.value) == f"{out}:1: an answer that does not record its producer; give another --out"


def make_adapter(folder, base_dir, seed):
    """A LoRA adapter on the tiny model, written as train.py writes one, with random B (not zero) so that it
    changes the answers."""
    import lora
    model, _ = E.load(str(base_dir))
    lora.apply_lora(model, r=2, alpha=4, dropout=0.0, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora.lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=generator) * 2.0)
    lora.save_adapter(model, str(folder), str(base_dir))
    return folder


def adapter_sha256(adapter):
    import hashlib
    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()


def producer_of(answer_file):
    return json.loads(answer_file.read_text().splitlines()[0])["producer"]


def test_generate_keys_the_answer_file_by_the_adapter(tiny, tmp_path, monkeypatch):
    """Two runs' adapters in folders of the same name (run1/adapter, run2/adapter): `generate` without --out
    writes each one's answers to its own file, and the second adapter's file holds the second adapter's
    answers, not the first one's."""
    d = tiny[0]
    first = make_adapter(tmp_path / "run1" / "adapter", d, seed=1)
    second = make_adapter(tmp_path / "run2" / "adapter", d, seed=2)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t, "And then?"]}) + "\n"
                         for i, t in enumerate(["Name a fruit.", "Count to three.", "Say hi."])))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    command = ("generate", "--model", d, "--questions", q, "--max-new-tokens", "4")
    for adapter in (first, second):
        r = run_cli(*command, "--adapter", adapter)
        assert r.returncode == 0, r.stderr
        assert "answered already" not in r.stdout
    files = sorted(work.iterdir())
    by_adapter = {producer_of(f)["adapter_sha256"]: f for f in files}
    assert sorted(by_adapter) == sorted([adapter_sha256(first), adapter_sha256(second)])
    answers = []
    for adapter in (first, second):
        path = by_adapter[adapter_sha256(adapter)]
        assert path.name.startswith(f"{d.name}-adapter-")
        # oracle: the same questions answered by the base model with this adapter, loaded afresh
        model, template = E.load(str(d), str(adapter))
        questions = E.read_questions(str(q))
        want = E.generate_answers(model, template, questions, f"{d.name}-adapter", max_new_tokens=4)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert without(rows, "tstamp", "producer") == without(want, "tstamp")
        answers.append([row["choices"] for row in rows])
    # the adapters answer differently: a file shared by both would have held wrong answers for one
    assert answers[0] != answers[1]
    # the same command again continues its own file
    r = run_cli(*command, "--adapter", second)
    assert r.returncode == 0, r.stderr
    assert "3 of 3 questions answered already, continuing" in r.stdout
    assert sorted(work.iterdir()) == files
    # the second adapter on the first one's file: refused in one line, the file untouched
    taken = by_adapter[adapter_sha256(first)]
    before = taken.read_bytes()
    r = run_cli(*command, "--adapter", second, "--out", taken)
    assert r.returncode == 2
    assert r.stderr == (f"eval.py: error: {taken}:1: answers of another producer (adapter_sha256 "
                        f"{adapter_sha256(first)[:16]} in the file, {adapter_sha256(second)[:16]} now); "
                        "give another --out\n")
    assert taken.read_bytes() == before


SYNTH = [  # as support/synth.py writes them; the second dialogue's first reply is noisy, its reference is the truth
    {"id": "t0", "messages": [
        {"role": "user", "content": "Start a counter at 12 and reply with its value only."},
        {"role": "assistant", "content": "12", "reference": "12"}, {"role": "user", "content": "Add 3."},
        {"role": "assistant", "content": "15", "reference": "15"}, {"role": "user", "content": "Minus 4."},
        {"role": "assistant", "content": "11", "reference": "11"}]},
    {"id": "t1", "messages": [
        {"role": "user", "content": "Start a shopping list with milk and reply with the whole list only."},
        {"role": "assistant", "content": "soap", "reference": "milk", "noisy": True},
        {"role": "user", "content": "Add eggs."},
        {"role": "assistant", "content": "milk, eggs", "reference": "milk, eggs"}]},
    {"id": "t2", "messages": [
        {"role": "user", "content": "Start a counter at 40 and reply with its value only."},
        {"role": "assistant", "content": "40"}, {"role": "user", "content": "Plus 2."},
        {"role": "assistant", "content": "42"}]},
]
# predicted reply per (dialogue, turn): right, right in another spelling, or wrong
PRED = {("t0", 1): "12", ("t0", 2): "16", ("t0", 3): "11.",
        ("t1", 1): " Milk. ", ("t1", 2): "eggs, milk",
        ("t2", 1): "41", ("t2", 2): "42"}


def test_accuracy_exact_on_hand_made_file(tiny, monkeypatch, tmp_path):
    d, _, model, template = tiny
    # the prompt of turn k must hold the REFERENCE answers of turns < k (teacher-forced history)
    expected = {}
    for c in SYNTH:
        msgs = [dict(m, content=m.get("reference", m["content"])) for m in c["messages"]]
        for k, i in enumerate([i for i, m in enumerate(msgs) if m["role"] == "assistant"], 1):
            expected[tuple(template.encode_prompt(msgs[:i]))] = PRED[c["id"], k]
    calls = []

    def fake_generate(model_, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, stop_ids=(), pad_id=0,
                      seed=None):
        calls.append((len(prompts), max_new_tokens, temperature))
        return [template.tokenizer.encode(expected[tuple(p)], add_special_tokens=False).ids for p in prompts]
    monkeypatch.setattr(E, "generate", fake_generate)
    res = E.accuracy(model, template, SYNTH, batch_size=3, max_new_tokens=7)
    assert calls == [(3, 7, 0.0), (3, 7, 0.0), (1, 7, 0.0)]
    assert res["per_turn"] == {1: {"accuracy": 2 / 3, "correct": 2, "total": 3},
                               2: {"accuracy": 1 / 3, "correct": 1, "total": 3},
                               3: {"accuracy": 1.0, "correct": 1, "total": 1}}
    assert (res["overall"], res["correct"], res["total"]) == (4 / 7, 4, 7)
    capped = E.accuracy(model, template, SYNTH, max_turn_groups=2)
    assert capped["per_turn"][2] == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert capped["overall"] == 4 / 7
    # the CLI on the real tiny model runs end to end
    f = tmp_path / "test.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in SYNTH))
    r = run_cli("accuracy", "--model", str(d), "--data", str(f), "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["total"] == 7
    assert set(out["per_turn"]) == {"1", "2", "3"}


@pytest.mark.parametrize("reference", [5, " ", ["12"], None])
def test_accuracy_refuses_a_reference_that_is_not_text(tiny, tmp_path, reference):
    """A blank reference would count an empty reply as right."""
    f = tmp_path / "test.jsonl"
    bad = json.loads(json.dumps(SYNTH[0]))
    bad["messages"][3]["reference"] = reference
    f.write_text(json.dumps(SYNTH[1]) + "\n" + json.dumps(bad) + "\n")
    r = run_cli("accuracy", "--model", tiny[0], "--data", f)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"eval.py: error: {f}")
    assert "message 3" in r.stderr
    assert f"reference {reference!r}" in r.stderr or f"reference is {reference!r}" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# the local judge on the real SmolLM2-135M-Instruct

@pytest.mark.slow
def test_local_judge_on_smollm2(smollm2_dir, tmp_path):
    import transformers
    model, template = E.load(str(smollm2_dir))
    judge = J.LocalJudge(model, template, "smollm2")
    q = {"question_id": 1, "category": "geo", "turns": ["What is the capital of France?"], "context": []}
    msgs = J.judge_prompt("single", "local", q, ["The capital of France is Paris."], 0)
    prompt = template.encode_prompt(msgs) + template.tokenizer.encode("Rating: [[", add_special_tokens=False).ids
    text = template.tokenizer.decode(prompt, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nRating: [[")
    assert "Paris" in text
    assert "Faithfulness" in text
    # oracle: transformers scores each choice's whole sequence "<prompt>Rating: [[<n>]]" teacher forced
    # (on a short prompt, to keep ten full forward passes cheap)
    short = [{"role": "user", "content": "Rate this answer to 'Capital of France?': 'Paris.'"}]
    res = judge("single", short)
    prompt = template.encode_prompt(short) + template.tokenizer.encode("Rating: [[", add_special_tokens=False).ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    logp = {}
    for n in range(1, 11):
        cont = template.tokenizer.encode(f"{n}]]", add_special_tokens=False).ids
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([prompt + cont])).logits[0].double(), -1)
        logp[str(n)] = sum(lp[len(prompt) - 1 + i, c].item() for i, c in enumerate(cont))
    z = np.logaddexp.reduce(list(logp.values()))
    want = {k: float(np.exp(v - z)) for k, v in logp.items()}
    assert res["probs"] == pytest.approx(want, abs=2e-4)
    assert res["score"] == pytest.approx(sum(int(k) * p for k, p in want.items()), abs=2e-3)
    # pairwise, both orders, through the cache
    cache = J.JudgeCache(str(tmp_path / "cache.jsonl"))
    good, bad = {1: ["The capital of France is Paris."]}, {1: ["Bananas are yellow."]}
    out = J.judge_pairwise(judge, [q], good, bad, cache)
    assert out["win"] + out["tie"] + out["loss"] == 1
    assert out["unparsed"] == 0
    lines = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert sum(line["result"]["probs"].values()) == pytest.approx(1)
    v1, v2 = (x["result"]["verdict"] for x in lines)
    assert out["win"] == (v1 == "A" and v2 == "B")
    assert out["loss"] == (v1 == "B" and v2 == "A")
    again = J.judge_pairwise(judge, [q], good, bad, J.JudgeCache(str(tmp_path / "cache.jsonl")))
    assert again == dict(out, cache_hits=2)


def test_answer_matching():
    assert E.answer_matches("  42. ", "42")
    assert E.answer_matches("Milk,eggs", "milk, eggs")
    assert E.answer_matches("milk ,  eggs\n", "milk, eggs")
    assert not E.answer_matches("43", "42")
    assert not E.answer_matches("milk, eggs, tea", "milk, eggs")
    assert not E.answer_matches("The answer is 42", "42")
    assert not E.answer_matches("", "42")
    assert E.normalize_answer(" A,B ,  c. ") == "a, b, c"
