"""Judging against a real OpenAI-compatible HTTP server on loopback, with scripted replies.

The server runs in a thread of the test process and speaks chat-completions; the openai client talks to it
over TCP. Answers are written as JSONL files the way the answer stage writes them, so these tests need no
model; each answer text carries a marker "ANS-<question>-t<turn>" that the server uses to pick its reply.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evaluation import run as eval_run
from evaluation.benchmarks import BENCHMARKS
from evaluation.data import load_judge_prompts
from evaluation.judge import JudgeConfig, LLMJudge, parse_score, read_judgments
from evaluation.prompts import PAPER_REFUSALS

from conftest import SHARED_EVAL_DATA, needs_eval_data

ROOT = Path(__file__).resolve().parents[1]
EVAL_DATA = SHARED_EVAL_DATA
ANSWER_MARK = re.compile(r"ANS-([\w-]+?)-t(\d)")


def request_key(body: dict) -> str:
    """What a request judges: the last answer marker in its prompt, "<question>-t<turn>"."""
    marks = ANSWER_MARK.findall(body["messages"][-1]["content"])
    return f"{marks[-1][0]}-t{marks[-1][1]}" if marks else "preflight"


def _constrained(text: str) -> str:
    """What a server enforcing the judgment schema returns: the scripted reply's rating (else 5) as JSON."""
    found = re.search(r"\[\[(\d+(?:\.\d+)?)\]\]", text)
    return json.dumps({"explanation": "as scripted", "rating": float(found.group(1)) if found else 5})


def llama_cpp_python(response_format: dict | None, text: str) -> tuple[int, str]:
    """llama-cpp-python 0.3's server: type "text" or "json_object" (with an optional "schema" it enforces); any
    other type fails its request validation, reported as HTTP 500."""
    if response_format is None or response_format["type"] == "text":
        return 200, text
    if response_format["type"] != "json_object":
        return 500, ("[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                     "'msg': \"Input should be 'text' or 'json_object'\"}]")
    return 200, _constrained(text) if "schema" in response_format else json.dumps({"text": text})


def vllm(response_format: dict | None, text: str) -> tuple[int, str]:
    """vLLM's server (llama-server and SGLang alike): "json_schema" with json_schema.schema enforced; a bare
    "json_object" gives some JSON object, not the judgment's schema; anything else is a 400."""
    kind = (response_format or {"type": "text"})["type"]
    if kind == "text":
        return 200, text
    if kind == "json_schema" and "schema" in response_format.get("json_schema", {}):
        return 200, _constrained(text)
    if kind == "json_object":
        return 200, json.dumps({"text": text})
    return 400, f"response_format: type {kind!r} is not supported"


DIALECTS = {"llama-cpp-python": llama_cpp_python, "vllm": vllm}


class ScriptedServer:
    """POST /v1/chat/completions answered by `reply(key, calls) -> (status, text, delay_s)`.

    `served_model`: the model id the server reports in replies and lists at GET /v1/models (default: it echoes
    the requested name and has no model list, as some servers do). `dialect`: how it checks `response_format`
    (DIALECTS; None takes anything and ignores it). `slots`: how many requests it works on at
    once (others wait in its queue, as on a one-slot llama.cpp server). A client that closes its connection
    while the reply is being "generated" is noticed and recorded in `cancelled`, as a real server stops there.
    """

    def __init__(self, reply, served_model: str | None = None, slots: int | None = None, dialect: str | None = None):
        self.reply, self.requests, self.calls, self.lock = reply, [], Counter(), threading.Lock()
        self.dialect = dialect
        self.cancelled, self.started = [], {}
        self.served_model = served_model
        self.slots = threading.Semaphore(slots) if slots else None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models" and server.served_model:
                    self.send_json(200, {"object": "list", "data": [
                        {"id": server.served_model, "object": "model", "created": 0, "owned_by": "test"}]})
                else:
                    self.send_json(404, {"error": {"message": "no model list", "type": "scripted", "code": 404}})

            def client_left(self, seconds: float) -> bool:
                """Wait up to `seconds` (as if generating); True as soon as the client closes the connection."""
                readable, _, _ = select.select([self.connection], [], [], seconds)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = request_key(body)
                if server.slots:
                    server.slots.acquire()
                try:
                    with server.lock:
                        server.requests.append(body)
                        server.started.setdefault(key, time.monotonic())
                        calls = server.calls[key]
                        server.calls[key] += 1
                    status, text, delay = server.reply(key, calls)
                    if server.dialect and status == 200:
                        status, text = DIALECTS[server.dialect](body.get("response_format"), text)
                    if delay and self.client_left(delay):
                        with server.lock:
                            server.cancelled.append(key)
                        return
                finally:
                    if server.slots:
                        server.slots.release()
                message = {"role": "assistant", "content": text}
                self.send_json(status, {"id": "x", "object": "chat.completion", "created": 0,
                                        "model": server.served_model or body["model"],
                                        "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
                               if status == 200 else {"error": {"message": text, "type": "scripted", "code": status}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def judged(self) -> list[str]:
        return [k for k in map(request_key, self.requests) if k != "preflight"]


def rating_reply(key: str, calls: int):
    return 200, f"Reasonable answer. Rating: [[{7 if key.endswith('t1') else 5}]]", 0.0


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def write_answers(out: Path, benchmark: str, model_id: str, items) -> None:
    path = out / benchmark / "answers" / f"{model_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for item in items:
            turns = [f"answer ANS-{item.question_id}-t{t + 1}" for t in range(len(item.turns))]
            f.write(json.dumps({"question_id": item.question_id, "turns": turns}) + "\n")


def judge_cli(out: Path, url: str, benchmarks: list[str], *extra: str) -> None:
    eval_run.main(["--stage", "judge", "--output_dir", str(out), "--eval_data_dir", str(EVAL_DATA),
                   "--judge_base_url", url, "--judge_model", "judge-x", "--judge_backoff", "0.01",
                   "--benchmarks", *benchmarks, *extra])


def test_parse_score_follows_fastchat_rule():
    assert parse_score("Explanation... Rating: [[8]]") == 8.0
    assert parse_score("Rating: [[7.5]] and later [[2]]") == 7.5
    assert parse_score("no double brackets, Rating: [6]") == 6.0
    assert parse_score("Rating: 7/10") == -1
    assert parse_score("") == -1


@needs_eval_data
def test_mtbench_prompts_sent_and_scores_parse(tmp_path):
    items = BENCHMARKS["mtbench"].load(EVAL_DATA)
    chosen = [next(i for i in items if i.category == "writing"), next(i for i in items if i.category == "math")]
    write_answers(tmp_path, "mtbench", "m1", chosen)
    with ScriptedServer(rating_reply) as server:
        judge_cli(tmp_path, server.url, ["mtbench"])
    prompts = load_judge_prompts(EVAL_DATA)
    sent = {request_key(b): b for b in server.requests}
    assert set(sent) == {"preflight"} | {f"{i.question_id}-t{t}" for i in chosen for t in (1, 2)}
    writing, math = chosen
    expected = {
        f"{writing.question_id}-t1": ("single-v1", dict(question=writing.turns[0], answer=f"answer ANS-{writing.question_id}-t1")),
        f"{math.question_id}-t1": ("single-math-v1", dict(question=math.turns[0], answer=f"answer ANS-{math.question_id}-t1",
                                                          ref_answer_1=math.references[0])),
        f"{math.question_id}-t2": ("single-math-v1-multi-turn", dict(
            question_1=math.turns[0], answer_1=f"answer ANS-{math.question_id}-t1", question_2=math.turns[1],
            answer_2=f"answer ANS-{math.question_id}-t2", ref_answer_1=math.references[0],
            ref_answer_2=math.references[1])),
    }
    for key, (name, fields) in expected.items():
        body = sent[key]
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 2048
        assert body["messages"] == [{"role": "system", "content": prompts[name]["system_prompt"]},
                                    {"role": "user", "content": prompts[name]["prompt_template"].format(**fields)}]
    assert "single-v1-multi-turn" in {r["prompt_name"] for r in read_judgments(
        tmp_path / "mtbench" / "judgments" / "m1__judge-x.jsonl")}
    rows = read_judgments(tmp_path / "mtbench" / "judgments" / "m1__judge-x.jsonl")
    assert sorted((r["turn"], r["score"]) for r in rows) == [(1, 7.0), (1, 7.0), (2, 5.0), (2, 5.0)]


@needs_eval_data
def test_malformed_ratings_stored_as_minus_one_and_excluded(tmp_path):
    from evaluation.show_results import report

    items = BENCHMARKS["vicuna"].load(EVAL_DATA)[:4]
    write_answers(tmp_path, "vicuna", "m1", items)
    replies = {items[0].question_id: "Good. Rating: 8 out of 10", items[1].question_id: "Rating: [9]"}

    def reply(key, calls):
        return 200, replies.get(key.rsplit("-t", 1)[0], "Fine. Rating: [[6]]"), 0.0

    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["vicuna"])
    body = next(b for b in server.requests if request_key(b) != "preflight")
    assert body["temperature"] == 0.2  # the paper's Vicuna judge temperature
    rows = {r["question_id"]: r for r in read_judgments(tmp_path / "vicuna" / "judgments" / "m1__judge-x.jsonl")}
    assert rows[items[0].question_id]["score"] == -1
    assert rows[items[0].question_id]["judgment"] == "Good. Rating: 8 out of 10"
    assert rows[items[1].question_id]["score"] == 9.0
    text = report(tmp_path)
    assert "| m1 | 7.00 |" in text  # mean of 9, 6, 6: the -1 is left out
    assert "| m1 | 3/1 |" in text  # 3 scored, 1 unparseable


@needs_eval_data
def test_429_500_and_slow_replies_are_retried(tmp_path):
    items = BENCHMARKS["chatbot"].load(EVAL_DATA)[:3]
    write_answers(tmp_path, "chatbot", "m1", items)
    flaky, slow = f"{items[0].question_id}-t1", f"{items[1].question_id}-t1"

    def reply(key, calls):
        if key == flaky and calls < 2:
            return (429, "rate limited", 0.0) if calls == 0 else (500, "server error", 0.0)
        if key == slow and calls == 0:
            return 200, "Rating: [[1]]", 600.0  # no reply until the client gives up: must be retried
        return rating_reply(key, calls)

    # A 4 s timeout: the stuck request is given up whatever the machine's load, and no prompt reply is.
    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["chatbot"], "--judge_timeout", "4", "--judge_concurrency", "3")
    assert server.calls[flaky] == 3 and server.calls[slow] == 2 and server.cancelled == [slow]
    rows = read_judgments(tmp_path / "chatbot" / "judgments" / "m1__judge-x.jsonl")
    assert sorted(r["score"] for r in rows) == [7.0, 7.0, 7.0]


@needs_eval_data
def test_retries_are_capped(tmp_path):
    items = BENCHMARKS["chatbot"].load(EVAL_DATA)[:2]
    write_answers(tmp_path, "chatbot", "m1", items)
    broken = f"{items[0].question_id}-t1"

    def reply(key, calls):
        return (503, "overloaded", 0.0) if key == broken else rating_reply(key, calls)

    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["chatbot"], "--judge_max_retries", "2")
    assert server.calls[broken] == 3  # the first try and two retries, then given up
    rows = read_judgments(tmp_path / "chatbot" / "judgments" / "m1__judge-x.jsonl")
    assert [r["question_id"] for r in rows] == [items[1].question_id]  # the failure is not recorded: a rerun retries


@needs_eval_data
def test_killed_run_resumes_without_rejudging(tmp_path):
    items = BENCHMARKS["wildchat"].load(EVAL_DATA)[:8]
    write_answers(tmp_path, "wildchat", "m1", items)
    out = tmp_path / "wildchat" / "judgments" / "m1__judge-x.jsonl"
    answered, holding = [], threading.Event()
    holding.set()

    def reply(key, calls):
        """The first three questions are answered; while `holding`, the others hang until the client is gone."""
        if key != "preflight" and len(answered) < 3 and key not in answered:
            answered.append(key)
        held = holding.is_set() and key not in answered and key != "preflight"
        return 200, "Rating: [[4]]", 600.0 if held else 0.0

    with ScriptedServer(reply) as server:
        cmd = [sys.executable, "-m", "evaluation.run", "--stage", "judge", "--output_dir", str(tmp_path),
               "--eval_data_dir", str(EVAL_DATA), "--judge_base_url", server.url, "--judge_model", "judge-x",
               "--benchmarks", "wildchat", "--judge_concurrency", "1"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "k"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120  # a wait for the third judgment, not a margin
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # while it waits for the fourth reply
        proc.wait()
        holding.clear()
        before = {r["question_id"] for r in read_judgments(out)}
        assert len(before) == 3
        first_run = len(server.judged())
        judge_cli(tmp_path, server.url, ["wildchat"])
        rerun = server.judged()[first_run:]
    assert not {k.rsplit("-t", 1)[0] for k in rerun} & before  # nothing judged twice
    assert sorted(r["question_id"] for r in read_judgments(out)) == sorted(i.question_id for i in items)
    assert len(out.read_text().splitlines()) == 8


@needs_eval_data
def test_missing_key_fails_before_generation(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    # A base model path that does not exist: had generation started, the error would be a model-loading one.
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        eval_run.main(["--base_model", str(tmp_path / "no-model"), "--benchmarks", "vicuna",
                       "--eval_data_dir", str(EVAL_DATA), "--output_dir", str(tmp_path)])
    assert not (tmp_path / "vicuna").exists()


def test_unreachable_endpoint_fails_with_fix():
    judge = LLMJudge(JudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.01, timeout_s=2))
    with pytest.raises(SystemExit, match="start the judge server or fix --judge_base_url"):
        judge.preflight()


@needs_eval_data
def test_advbench_rule_reproduces_fused_comma_quirk(tmp_path):
    items = BENCHMARKS["advbench"].load(EVAL_DATA)[:4]
    answers = ["No, I'm not able to help with that.", "I'm not able to do this.", "Sure, here is how.",
               "I'm sorry, but that is against the law."]
    path = tmp_path / "advbench" / "answers" / "m1.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"question_id": i.question_id, "turns": [a]}) + "\n"
                            for i, a in zip(items, answers)))
    scores = {}
    for rule in ("paper", "corrected"):
        eval_run.main(["--stage", "judge", "--benchmarks", "advbench", "--advbench_judge", rule,
                       "--eval_data_dir", str(EVAL_DATA), "--output_dir", str(tmp_path)])
        rows = read_judgments(tmp_path / "advbench" / "judgments" / f"m1__rule-{rule}.jsonl")
        scores[rule] = [r["score"] for r in sorted(rows, key=lambda r: int(r["question_id"]))]
    assert "No,I'm not able to" in PAPER_REFUSALS and len(PAPER_REFUSALS) == 35
    assert scores["paper"] == [0.0, 0.0, 0.0, 1.0]  # the fused phrase never matches a normal "No, I'm ..."
    assert scores["corrected"] == [1.0, 1.0, 0.0, 1.0]
    assert items[0].turns[0] + "." == BENCHMARKS["advbench"].instruction(items[0].turns[0])


@needs_eval_data
def test_aya_reference_prompt_and_per_language_table(tmp_path):
    from evaluation.show_results import report

    items = BENCHMARKS["aya"].load(EVAL_DATA)
    chosen = [i for i in items if i.language in ("English", "French")][::10]
    write_answers(tmp_path, "aya", "m1", chosen)

    def reply(key, calls):  # English items score 8, French 4
        return 200, f"Rating: [[{8 if key.startswith('English') else 4}]]", 0.0

    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["aya"])
    body = next(b for b in server.requests if request_key(b) != "preflight")
    item = next(i for i in chosen if request_key(body).startswith(i.question_id + "-"))
    assert item.references[0] in body["messages"][1]["content"]
    assert "[[rating]]" in body["messages"][1]["content"] and body["temperature"] == 0.2
    text = report(tmp_path)
    assert "| English | French | All |" in text
    assert "| m1 | 8.00 | 4.00 | 6.00 |" in text


@needs_eval_data
def test_eval_data_from_dir_or_cache(tmp_path, monkeypatch):
    from evaluation.data import data_file

    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "eval_data" / "vicuna" / "question.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_text((EVAL_DATA / "vicuna" / "question.jsonl").read_text())
    assert data_file("vicuna/question.jsonl") == cached  # no download once cached
    assert data_file("vicuna/question.jsonl", EVAL_DATA) == EVAL_DATA / "vicuna" / "question.jsonl"
    # A folder holding only some files serves those; each other file comes from the cache, then the source.
    partial = tmp_path / "partial"
    (partial / "advbench").mkdir(parents=True)
    (partial / "advbench" / "advbench.csv").write_text("goal,target\nDo harm,Sure\n")
    assert data_file("advbench/advbench.csv", partial) == partial / "advbench" / "advbench.csv"
    assert data_file("vicuna/question.jsonl", partial) == cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # neither folder nor cache: the download is refused at once
    with pytest.raises(SystemExit, match="aya_evaluation/test_datasets.json.*--eval_data_dir"):
        data_file("ref_gpt4/aya_testset.json", partial)


# --- judge identity, settings, structured output, parsers, timeouts, subsets (issue 17) ----------------------
def _one_vicuna(tmp_path, n=2):
    items = BENCHMARKS["vicuna"].load(EVAL_DATA)[:n]
    write_answers(tmp_path, "vicuna", "m1", items)
    return items


@needs_eval_data
@pytest.mark.parametrize("served, listed", [("local-model.gguf", False), ("judge-x", True), (None, None)])
def test_judge_name_checked_against_model_list_and_recorded(tmp_path, caplog, served, listed):
    _one_vicuna(tmp_path)
    with ScriptedServer(rating_reply, served_model=served) as server:
        if listed is False:  # a name the endpoint does not list is refused before anything is judged
            with pytest.raises(SystemExit, match="does not list --judge_model 'judge-x'.*'local-model.gguf'.*"
                                                 "--judge_allow_unlisted"):
                judge_cli(tmp_path, server.url, ["vicuna"])
            assert not server.judged()
        with caplog.at_level("WARNING", logger="evaluation.judge"):
            judge_cli(tmp_path, server.url, ["vicuna"], "--judge_max_tokens", "300",
                      *(["--judge_allow_unlisted"] if listed is False else []))
    assert all(body["max_tokens"] == 300 for body in server.requests if request_key(body) != "preflight")
    warnings = " ".join(r.getMessage() for r in caplog.records)
    if listed is None:
        assert "does not list its models" in warnings
    elif listed:
        assert "does not list" not in warnings
    rows = read_judgments(tmp_path / "vicuna" / "judgments" / "m1__judge-x.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["judge_endpoint"] == server.url and row["judge_model"] == "judge-x"
        assert row["judge_reported_model"] == (served or "judge-x")  # what each reply said
        assert row["judge_model_listed"] is listed
        assert row["judge_settings"] == {"judge_model": "judge-x", "response_format": "text", "max_tokens": 300,
                                         "parser": "fastchat"}
    from evaluation.show_results import report

    flags = {False: "| local-model.gguf **(!)** | no **(!)** |", True: "| judge-x | yes |",
             None: "| judge-x | unknown |"}
    assert f"| vicuna | judge-x | judge-x {flags[listed]} text | fastchat | 300 |" in report(tmp_path)


@needs_eval_data
@pytest.mark.parametrize("dialect, chosen", [("llama-cpp-python", "json_object"), ("vllm", "json_schema")])
def test_auto_response_format_picks_the_form_the_server_follows(tmp_path, dialect, chosen):
    from evaluation.judge import RESPONSE_FORMATS

    items = _one_vicuna(tmp_path)

    def reply(key, calls):  # what the judge "means"; the dialect turns it into schema JSON
        return 200, f"Rating: [[{4 if key.startswith(items[0].question_id) else 9}]]", 0.0

    with ScriptedServer(reply, dialect=dialect) as server:
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_response_format", "auto")
    judged = [b for b in server.requests if request_key(b) != "preflight"]
    assert judged and all(b["response_format"] == RESPONSE_FORMATS[chosen] for b in judged)
    rows = {r["question_id"]: r for r in read_judgments(tmp_path / "vicuna" / "judgments" / "m1__judge-x.jsonl")}
    assert rows[items[0].question_id]["score"] == 4.0 and rows[items[1].question_id]["score"] == 9.0
    assert json.loads(rows[items[0].question_id]["judgment"])["rating"] == 4.0
    assert rows[items[0].question_id]["judge_settings"]["response_format"] == chosen  # what was used
    assert rows[items[0].question_id]["judge_patience"]["response_format_asked"] == "auto"


@needs_eval_data
def test_refused_response_format_names_the_one_that_fits_at_once(tmp_path):
    _one_vicuna(tmp_path)
    with ScriptedServer(rating_reply, dialect="llama-cpp-python") as server:
        start = time.monotonic()
        with pytest.raises(SystemExit, match="refuses --judge_response_format json_schema: use "
                                             "--judge_response_format json_object"):
            judge_cli(tmp_path, server.url, ["vicuna"], "--judge_response_format", "json_schema",
                      "--judge_backoff", "2")
        took = time.monotonic() - start
    forms = [(b.get("response_format") or {}).get("type") for b in server.requests]
    assert forms.count("json_schema") == 1  # a refusal is not retried (a retry would also wait 2 s)
    assert took < 2 and not server.judged()
    with ScriptedServer(rating_reply, dialect="vllm") as server:
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_response_format", "json_schema")
    assert [r["score"] for r in read_judgments(tmp_path / "vicuna" / "judgments" / "m1__judge-x.jsonl")] == [7.0] * 2


def test_lenient_parser_forms():
    from evaluation.judge import parse_score_lenient, parse_structured

    assert parse_score_lenient("Good answer.\nRating: 7") == 7.0
    assert parse_score_lenient("I'd give it a score of 6.5 overall.") == 6.5
    assert parse_score_lenient("**Score**: 8") == 8.0
    assert parse_score_lenient("Overall 9/10, and step 3 out of 5.") == 9.0
    assert parse_score_lenient("Rating: 3 at first, but on reflection Rating: 5") == 5.0  # the verdict comes last
    assert parse_score_lenient("Still [[2]] wins over Rating: 8") == 2.0  # FastChat's form first
    assert parse_score_lenient("Rating: 70") == -1 and parse_score_lenient("no number") == -1
    # A scale or a range is not a verdict (a small judge echoing the rubric).
    assert parse_score_lenient("[Rating: 1-4]") == -1 and parse_score_lenient("Score: 1 to 10") == -1
    assert parse_score_lenient("Rate on a scale of 1-10/10. Rating: 1-4, then Rating: 6") == 6.0
    assert parse_score_lenient("a 1-10/10 scale") == -1
    assert parse_structured('{"explanation": "x", "rating": 3}', parse_score) == 3.0
    assert parse_structured("not JSON, Rating: [[5]]", parse_score) == 5.0
    assert parse_structured('{"rating": "high"}', parse_score) == -1


@needs_eval_data
def test_lenient_parser_scores_what_fastchat_leaves_out(tmp_path):
    from evaluation.show_results import report

    items = BENCHMARKS["vicuna"].load(EVAL_DATA)[:2]
    for parser in ("fastchat", "lenient"):
        write_answers(tmp_path / parser, "vicuna", "m1", items)
    with ScriptedServer(lambda key, calls: (200, "Helpful and correct.\nRating: 7", 0.0)) as server:
        for parser in ("fastchat", "lenient"):
            judge_cli(tmp_path / parser, server.url, ["vicuna"], "--judge_parser", parser)
    scores = {parser: [r["score"] for r in read_judgments(tmp_path / parser / "vicuna" / "judgments" /
                                                          "m1__judge-x.jsonl")] for parser in ("fastchat", "lenient")}
    assert scores == {"fastchat": [-1.0, -1.0], "lenient": [7.0, 7.0]}
    strict_report = report(tmp_path / "fastchat")  # the unparseable share is printed per benchmark, flagged
    assert "| vicuna | judge-x | 2 | 2 | 100.0% **(!)** |" in strict_report
    assert "| vicuna | judge-x | 2 | 0 | 0.0% |" in report(tmp_path / "lenient")


@needs_eval_data
def test_timeout_does_not_count_time_queued_behind_own_requests(tmp_path):
    items = BENCHMARKS["chatbot"].load(EVAL_DATA)[:12]
    write_answers(tmp_path, "chatbot", "m1", items)
    # One slot, 0.5 s per reply, a 4 s timeout, 12 requests at once: the last one waits 5.5 s in the server's
    # queue and answers at 6 s. Counted from sending, four of them would time out; none may. (A reply may come
    # 3.5 s late on a loaded machine before the test fails without a bug.)
    with ScriptedServer(lambda key, calls: (200, "Rating: [[5]]", 0.5), slots=1) as server:
        judge_cli(tmp_path, server.url, ["chatbot"], "--judge_timeout", "4", "--judge_concurrency", "12",
                  "--judge_max_retries", "0")
    assert sorted(server.judged()) == sorted(f"{i.question_id}-t1" for i in items)  # each asked once
    assert not server.cancelled
    rows = read_judgments(tmp_path / "chatbot" / "judgments" / "m1__judge-x.jsonl")
    assert [r["score"] for r in rows] == [5.0] * 12


@needs_eval_data
def test_request_given_up_is_cancelled_at_the_server(tmp_path):
    items = BENCHMARKS["chatbot"].load(EVAL_DATA)[:2]
    write_answers(tmp_path, "chatbot", "m1", items)
    stuck = f"{items[0].question_id}-t1"

    def reply(key, calls):
        return (200, "Rating: [[1]]", 60.0) if key == stuck else (200, "Rating: [[6]]", 0.0)

    with ScriptedServer(reply) as server:
        start = time.monotonic()
        judge_cli(tmp_path, server.url, ["chatbot"], "--judge_timeout", "1", "--judge_max_retries", "1")
        took = time.monotonic() - start
        deadline = time.monotonic() + 60  # a wait for the event, not a margin: it ends when the server saw both
        while server.cancelled.count(stuck) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert took < 20  # the client gave up after about 1 s per try, not 60
    assert server.cancelled.count(stuck) == 2  # both tries were abandoned, and the server was told
    rows = read_judgments(tmp_path / "chatbot" / "judgments" / "m1__judge-x.jsonl")
    assert [r["question_id"] for r in rows] == [items[1].question_id]


def test_stratified_subset_balances_and_is_seeded():
    from evaluation.subsets import stratified_subset

    entries = [(s, i) for s, n in (("a", 10), ("b", 10), ("c", 2)) for i in range(n)]
    chosen = stratified_subset(entries, 9, seed=1, stratum=lambda e: e[0])
    assert Counter(s for s, _ in chosen) == {"a": 4, "b": 3, "c": 2} or \
        Counter(s for s, _ in chosen) == {"a": 3, "b": 4, "c": 2}  # c runs out; a and b share the rest
    assert chosen == sorted(chosen)  # original order kept
    assert stratified_subset(entries, 9, seed=1, stratum=lambda e: e[0]) == chosen
    assert stratified_subset(entries, 9, seed=2, stratum=lambda e: e[0]) != chosen
    assert stratified_subset(entries, None, seed=1) == entries and len(stratified_subset(entries, 5, 0)) == 5


@needs_eval_data
def test_limit_takes_balanced_seeded_subsets_and_records_them(tmp_path):
    benches = ["mtbench", "vicuna", "aya"]
    loaded = {name: BENCHMARKS[name].load(EVAL_DATA) for name in benches}
    for name, items in loaded.items():
        write_answers(tmp_path, name, "m1", items)  # every question answered; --limit picks which are judged
    with ScriptedServer(rating_reply) as server:
        judge_cli(tmp_path, server.url, benches, "--limit", "16", "--subset_seed", "3")
    judged = {k.rsplit("-t", 1)[0] for k in server.judged()}
    records = {name: json.loads((tmp_path / name / "subset.json").read_text()) for name in benches}
    by_id = {name: {i.question_id: i for i in items} for name, items in loaded.items()}
    for name in benches:
        assert len(records[name]["question_ids"]) == 16 and records[name]["seed"] == 3
        assert judged >= set(records[name]["question_ids"])
    mt = [by_id["mtbench"][q] for q in records["mtbench"]["question_ids"]]
    assert Counter(i.category for i in mt) == {c: 2 for c in {i.category for i in loaded["mtbench"]}}
    assert any("[The Start of Reference Answer]" in b["messages"][-1]["content"] for b in server.requests)
    aya = [by_id["aya"][q] for q in records["aya"]["question_ids"]]
    assert Counter(i.language for i in aya) == {lang: 2 for lang in {i.language for i in loaded["aya"]}}
    vicuna = Counter(by_id["vicuna"][q].category for q in records["vicuna"]["question_ids"])
    assert len(vicuna) == 9 and max(vicuna.values()) == 2  # 16 over 9 categories: one or two each
    assert records["mtbench"]["per_stratum"] == {c: 2 for c in records["mtbench"]["per_stratum"]}
    assert len(judged) == 48  # nothing outside the subsets was judged
    # The same seed picks the same questions; another seed other ones.
    again = tmp_path / "again"
    ids = lambda seed: [i.question_id for i in eval_run.select(
        "aya", loaded["aya"], lambda i: i.question_id, BENCHMARKS["aya"].stratum,
        eval_run.parse_args(["--limit", "16", "--subset_seed", str(seed), "--output_dir", str(again)]))]
    assert ids(3) == records["aya"]["question_ids"] and ids(4) != ids(3)


@needs_eval_data
def test_judge_stage_and_finished_answers_load_no_model(tmp_path):
    items = BENCHMARKS["vicuna"].load(EVAL_DATA)
    missing = str(tmp_path / "no-such-model")  # loading it would stop the run with a model-loading error
    write_answers(tmp_path, "vicuna", f"base_{Path(missing).name}", items)
    with ScriptedServer(rating_reply) as server:
        for stage in ("judge", "all"):
            judge_cli(tmp_path, server.url, ["vicuna"], "--stage", stage, "--base_model", missing,
                      "--include_base", "--limit", "2", "--subset_seed", "0")
    rows = read_judgments(tmp_path / "vicuna" / "judgments" / "base_no-such-model__judge-x.jsonl")
    assert len(rows) == 2 and len(server.judged()) == 2  # judged once; the second stage found it done


# --- judgments keyed by their settings; per-request timeouts; patient pre-flight (issue 25) -------------------
@needs_eval_data
def test_changed_settings_make_new_judgments_and_a_parser_change_asks_no_one(tmp_path):
    from evaluation.show_results import report

    _one_vicuna(tmp_path)
    path = tmp_path / "vicuna" / "judgments" / "m1__judge-x.jsonl"
    with ScriptedServer(lambda key, calls: (200, "Helpful.\nRating: 7", 0.0)) as server:
        judge_cli(tmp_path, server.url, ["vicuna"])
        asked = len(server.judged())
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_parser", "lenient")  # the stored replies re-read
        assert len(server.judged()) == asked == 2
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_parser", "lenient")  # nothing new to do
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_max_tokens", "300")  # a new reply is needed
        assert len(server.judged()) == 4
    rows = read_judgments(path)
    by_settings = Counter((r["judge_settings"]["parser"], r["judge_settings"]["max_tokens"], r["score"]) for r in rows)
    assert by_settings == {("fastchat", 2048, -1.0): 2, ("lenient", 2048, 7.0): 2, ("fastchat", 300, -1.0): 2}
    assert {r.get("reparsed_from") for r in rows if r["judge_settings"]["parser"] == "lenient"} == {"fastchat"}
    text = report(tmp_path)  # three columns, each with its settings
    columns = re.findall(r"Vicuna \[judge-x #(\w{6})\]", text.split("\n\n")[1])
    assert len(set(columns)) == 3
    settings_lines = [line for line in text.splitlines()
                      if line.startswith("| vicuna | judge-x #") and line.count(" | ") == 8]
    assert sorted(line.split(" | ")[6:8] for line in settings_lines) == [["fastchat", "2048"], ["fastchat", "300"],
                                                                          ["lenient", "2048"]]


@needs_eval_data
def test_rejudge_failures_rereads_with_the_new_parser_then_asks_for_the_rest(tmp_path):
    items = _one_vicuna(tmp_path)
    say = {items[0].question_id: "Helpful.\nRating: 7", items[1].question_id: "Helpful."}

    def reply(key, calls):  # the second answer gets a rating only when asked again
        return 200, say[key.rsplit("-t", 1)[0]] if calls == 0 else "Rating: [[3]]", 0.0

    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["vicuna"])
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_parser", "lenient", "--rejudge_failures")
    assert Counter(server.judged()) == {f"{items[0].question_id}-t1": 1, f"{items[1].question_id}-t1": 2}
    lenient = {r["question_id"]: r["score"] for r in read_judgments(tmp_path / "vicuna" / "judgments" /
                                                                      "m1__judge-x.jsonl")
               if r["judge_settings"]["parser"] == "lenient"}
    assert lenient == {items[0].question_id: 7.0, items[1].question_id: 3.0}


def test_a_request_held_up_by_another_client_times_out_alone(tmp_path):
    """A one-slot server busy with another client's request for 3.5 s: of four requests sent together with a
    2.5 s timeout only the oldest times out; the next one's clock starts then, and the server is free again
    before it runs out. (Counted from the last reply to this run, as before, all four timed out at 2.5 s.)"""
    from evaluation.judge import JudgeRequest, judge_all
    import urllib.request

    def reply(key, calls):
        return 200, "Rating: [[6]]", 3.5 if key == "other-t1" else 0.1

    with ScriptedServer(reply, slots=1) as server:
        judge = LLMJudge(JudgeConfig(model="judge-x", base_url=server.url, timeout_s=2.5, max_retries=0))

        def other_client():
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "ANS-other-t1"}]}).encode()
            with suppress(OSError):
                urllib.request.urlopen(urllib.request.Request(server.url + "/chat/completions", body,
                                                              {"Content-Type": "application/json"}), timeout=30)
        threading.Thread(target=other_client, daemon=True).start()
        while "other-t1" not in server.started:
            time.sleep(0.01)
        requests = [JudgeRequest(f"q{i}", 1, "p", "", f"answer ANS-q{i}-t1", 0.0) for i in range(4)]
        try:
            counts = judge_all(requests, judge.grade, tmp_path / "j.jsonl", {}, concurrency=4)
        finally:
            judge.close()
    assert counts["errors"] == 1 and counts["judged"] == 3
    assert [r["score"] for r in read_judgments(tmp_path / "j.jsonl")] == [6.0] * 3


def test_preflight_waits_for_a_busy_server_within_its_bound():
    def reply(key, calls):  # the first two pre-flight requests wait 3 s, longer than the 1 s timeout
        return 200, "OK", 3.0 if calls < 2 else 0.0

    with ScriptedServer(reply) as server:
        patient = LLMJudge(JudgeConfig(model="judge-x", base_url=server.url, timeout_s=1.0, max_retries=0,
                                       backoff_s=0.01, preflight_s=30))
        try:
            patient.preflight()  # timeouts of 1 s, then 2 s, then 4 s: the third try is answered
        finally:
            patient.close()
        assert server.calls["preflight"] == 3
        hasty = LLMJudge(JudgeConfig(model="judge-x", base_url=server.url, timeout_s=1.0, max_retries=0,
                                     backoff_s=0.01, preflight_s=0.5))
        server.calls.clear()
        try:
            with pytest.raises(SystemExit, match="is not usable.*JudgeTimeout"):
                hasty.preflight()
        finally:
            hasty.close()


@needs_eval_data
def test_authors_prompts_read_from_their_script_or_own_wording_labelled(tmp_path, monkeypatch):
    from evaluation.judge import prompt_hash

    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = BENCHMARKS["chatbot"].load(EVAL_DATA)[:1]
    write_answers(tmp_path, "chatbot", "m1", items)
    path = tmp_path / "chatbot" / "judgments" / "m1__judge-x.jsonl"
    with ScriptedServer(rating_reply) as server:
        judge_cli(tmp_path, server.url, ["chatbot"])  # offline, no copy: this project's wording, labelled
        fallback = read_judgments(path)
        assert [r["prompt_source"] for r in fallback] == ["own wording (fallback)"]
        # The authors' script as their repository has it at the pinned commit, in the cache (a stand-in text).
        system, template = "SYSTEM-S", "[Instruction]\nT-MARK {question}\n[A]\n{answer}\n[/A]"
        script = tmp_path / "cache" / "eval_data" / "fedllm_bench" / "gen_judge_bench.py"
        script.parent.mkdir(parents=True)
        script.write_text(f"import json\ntemplate = {template!r}\n"
                          f"messages = [{{'role': 'system', 'content': {system!r}}},\n"
                          "            {'role': 'user', 'content': 'x'}]\n")
        judge_cli(tmp_path, server.url, ["chatbot"])  # another prompt: a new judgment, not the old one reused
    body = server.requests[-1]
    assert body["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": template.format(
        question=items[0].turns[0], answer=f"answer ANS-{items[0].question_id}-t1")}]
    rows = read_judgments(path)
    assert len(rows) == 2 and len(server.judged()) == 2
    authors = next(r for r in rows if r["prompt_source"] != "own wording (fallback)")
    assert authors["prompt_source"] == "FedLLM-Bench gen_judge_bench.py@02cc268"
    assert authors["prompt_hash"] == prompt_hash(system, template) != fallback[0]["prompt_hash"]


@needs_eval_data
def test_each_benchmark_judged_by_the_authors_judge_and_turn_one_only(tmp_path):
    items = BENCHMARKS["mtbench"].load(EVAL_DATA)[:2]
    write_answers(tmp_path, "mtbench", "m1", items)
    _one_vicuna(tmp_path)
    with ScriptedServer(rating_reply) as server:  # it echoes the model asked for and lists none
        eval_run.main(["--stage", "judge", "--output_dir", str(tmp_path), "--eval_data_dir", str(EVAL_DATA),
                       "--judge_base_url", server.url, "--judge_backoff", "0.01", "--judge_turns", "1",
                       "--benchmarks", "mtbench", "vicuna"])
    asked = Counter((b["model"], request_key(b).rsplit("-t", 1)[1]) for b in server.requests
                    if request_key(b) != "preflight")
    assert asked == {("gpt-4-1106-preview", "1"): 2, ("gpt-4", "1"): 2}  # no MT-Bench turn 2
    assert len(read_judgments(tmp_path / "mtbench" / "judgments" / "m1__gpt-4-1106-preview.jsonl")) == 2
    assert len(read_judgments(tmp_path / "vicuna" / "judgments" / "m1__gpt-4.jsonl")) == 2
    with pytest.raises(SystemExit, match="--judge_models 'mt=x' is not BENCH=MODEL"):
        eval_run.main(["--stage", "judge", "--judge_models", "mt=x", "--output_dir", str(tmp_path)])


@needs_eval_data
def test_run_all_dry_run_counts_judge_calls_and_judges_turn_one_where_only_it_is_read(tmp_path, capsys):
    from reproduce.__main__ import main as run_all

    run_all(["--dry-run", "--only", "table4,table8", "--eval_data_dir", str(EVAL_DATA),
             "--results_dir", str(tmp_path), "--judge_base_url", "http://127.0.0.1:9/v1"])
    out = capsys.readouterr().out
    evaluations = [line for line in out.splitlines() if "-m evaluation.run" in line and "mtbench" in line]
    single = [line for line in evaluations if "fed-wildchat__" in line]
    multi = [line for line in evaluations if "fed-wildchat-mt__" in line]
    assert single and multi and "--judge_model" not in out  # each benchmark gets the authors' judge
    assert all("--judge_turns 1" in line for line in single)  # Table 4 reads MT-1 of single-turn runs
    assert not any("--judge_turns" in line for line in multi)  # ... and MT-2 of multi-turn runs
    # Table 8: 7 models on MT-Bench turn 1 = 7 x 80 calls.
    assert "table8: 560 judge calls" in out
    total = re.search(r"all tables: (\d+) judge calls.*; (\d+) calls if every MT-Bench turn 2 were judged", out)
    turn1_models = len({line.split("--checkpoints ")[1].split()[0] for line in evaluations
                        if "--judge_turns 1" in line})
    assert int(total.group(2)) - int(total.group(1)) == 80 * turn1_models
