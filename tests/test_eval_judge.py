"""Judging against a real OpenAI-compatible HTTP server on loopback, with scripted replies.

The server runs in a thread of the test process and speaks chat-completions; the openai client talks to it
over TCP. Answers are written as JSONL files the way the answer stage writes them, so these tests need no
model; each answer text carries a marker "ANS-<question>-t<turn>" that the server uses to pick its reply.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
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


class ScriptedServer:
    """POST /v1/chat/completions answered by `reply(key, calls) -> (status, text, delay_s)`."""

    def __init__(self, reply):
        self.reply, self.requests, self.calls, self.lock = reply, [], Counter(), threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = request_key(body)
                with server.lock:
                    server.requests.append(body)
                    calls = server.calls[key]
                    server.calls[key] += 1
                status, text, delay = server.reply(key, calls)
                time.sleep(delay)
                message = {"role": "assistant", "content": text}
                payload = ({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
                           if status == 200 else {"error": {"message": text, "type": "scripted", "code": status}})
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

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
            return 200, "Rating: [[1]]", 3.0  # longer than the client timeout: must be retried
        return rating_reply(key, calls)

    with ScriptedServer(reply) as server:
        judge_cli(tmp_path, server.url, ["chatbot"], "--judge_timeout", "1", "--judge_concurrency", "3")
    assert server.calls[flaky] == 3 and server.calls[slow] == 2
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
    with ScriptedServer(lambda key, calls: (200, "Rating: [[4]]", 0.3)) as server:
        cmd = [sys.executable, "-m", "evaluation.run", "--stage", "judge", "--output_dir", str(tmp_path),
               "--eval_data_dir", str(EVAL_DATA), "--judge_base_url", server.url, "--judge_model", "judge-x",
               "--benchmarks", "wildchat", "--judge_concurrency", "1"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "k"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {r["question_id"] for r in read_judgments(out)}
        assert 3 <= len(before) < 8
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
    with pytest.raises(SystemExit, match="has no vicuna/question.jsonl"):
        data_file("vicuna/question.jsonl", tmp_path / "empty")
