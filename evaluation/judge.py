"""LLM judging through any OpenAI-compatible chat-completions endpoint, resumable and rate-limit tolerant.

Judgments are appended to a JSONL file as they arrive, one line per (question_id, turn); a rerun skips keys
already present, so a killed run never pays twice. A reply whose score cannot be parsed is stored with
score -1 and its raw text: it counts as judged (not re-requested) and is left out of every mean.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

FAILED = -1.0
# FastChat's rule: "[[x]]" first, then a single-bracket "[x]" as a fallback.
SCORE_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))
RETRYABLE_STATUS = {408, 409, 429}


def parse_score(text: str) -> float:
    """The rating in a judge reply, or -1 when there is none."""
    for pattern in SCORE_PATTERNS:
        match = pattern.search(text or "")
        if match:
            return float(match.group(1))
    return FAILED


@dataclass(frozen=True)
class JudgeRequest:
    """One thing to grade: the chat messages for an LLM judge, and the answer itself for rule graders."""
    question_id: str
    turn: int
    prompt_name: str
    system: str
    user: str
    temperature: float
    answer: str = ""
    category: str = ""
    language: str = ""


@dataclass(frozen=True)
class JudgeConfig:
    model: str = "gpt-4-1106-preview"  # the paper's MT-Bench judge ("GPT-4-Turbo")
    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL or api.openai.com)
    max_tokens: int = 2048
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0


class JudgeError(RuntimeError):
    """A request that failed for good (retries exhausted or a non-retryable error)."""


def _is_retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code in RETRYABLE_STATUS or err.status_code >= 500)


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMJudge:
    def __init__(self, config: JudgeConfig):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise SystemExit(
                "LLM judging needs an API key in the environment: `export OPENAI_API_KEY=...` (for a local "
                "vLLM/llama.cpp server that ignores keys, any value such as `EMPTY`). Set it before rerunning; "
                "no answers were generated.")
        self.config = config
        # Retries are ours (below): the client's own would hide 429/5xx from the backoff cap and the counters.
        self.client = openai.OpenAI(api_key=key, base_url=config.base_url, max_retries=0, timeout=config.timeout_s)
        self.retries = 0  # counted across worker threads, for the final log line
        self._lock = threading.Lock()

    def _once(self, system: str, user: str, temperature: float, max_tokens: int) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        reply = self.client.chat.completions.create(model=self.config.model, messages=messages,
                                                    temperature=temperature, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    def complete(self, system: str, user: str, temperature: float, max_tokens: int | None = None) -> str:
        """The judge's reply, retrying 429, 5xx, timeouts and connection errors with capped exponential backoff."""
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            try:
                return self._once(system, user, temperature, max_tokens or cfg.max_tokens)
            except Exception as err:  # noqa: BLE001 - classified just below
                if not _is_retryable(err) or attempt == cfg.max_retries:
                    raise JudgeError(f"{type(err).__name__}: {err}") from err
                delay = _retry_after(err) or cfg.backoff_s * 2 ** attempt * (1 + random.random() / 4)
                with self._lock:
                    self.retries += 1
                logger.warning("judge request failed (%s); retry %d in %.1fs", type(err).__name__, attempt + 1,
                               min(delay, cfg.max_backoff_s))
                time.sleep(min(delay, cfg.max_backoff_s))
        raise AssertionError("unreachable")

    def preflight(self) -> None:
        """One tiny request, so a wrong key, URL or model fails before any (slow) generation."""
        import openai

        where = self.config.base_url or "the OpenAI API"
        try:
            self.complete("", "Reply with the word OK.", 0.0, max_tokens=5)
        except JudgeError as err:
            cause = err.__cause__
            if isinstance(cause, openai.AuthenticationError):
                fix = "the key was rejected: set OPENAI_API_KEY to a valid key for this endpoint"
            elif isinstance(cause, openai.NotFoundError):
                fix = f"check --judge_model ({self.config.model!r}) and that --judge_base_url ends in /v1"
            elif isinstance(cause, openai.APIConnectionError):
                fix = "start the judge server or fix --judge_base_url (e.g. http://127.0.0.1:8000/v1)"
            else:
                fix = "check --judge_base_url, --judge_model and the server's log"
            raise SystemExit(f"The judge endpoint {where} is not usable ({err}); {fix}. No answers were generated."
                             ) from err

    def grade(self, request: JudgeRequest) -> tuple[float, str]:
        text = self.complete(request.system, request.user, request.temperature)
        return parse_score(text), text


def read_judgments(path: Path) -> list[dict]:
    """Judgment rows of a file; for a repeated key the last row wins (a re-judged failure replaces it)."""
    if not path.exists():
        return []
    rows: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(row["question_id"], row["turn"])] = row
    return list(rows.values())


def judge_all(requests: Iterable[JudgeRequest], grade: Callable[[JudgeRequest], tuple[float, str]], out_path: Path,
              meta: dict, concurrency: int = 1, rejudge_failures: bool = False) -> dict:
    """Grade every request not yet in `out_path`, appending rows as they arrive. Returns counts."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["question_id"], r["turn"]) for r in read_judgments(out_path)
            if not (rejudge_failures and r["score"] == FAILED)}
    todo = [r for r in requests if (r.question_id, r.turn) not in done]
    counts = {"skipped": len(done), "judged": 0, "unparseable": 0, "errors": 0}
    lock = threading.Lock()

    def run(request: JudgeRequest) -> None:
        score, text = grade(request)
        row = {**meta, **asdict(request), "score": score, "judgment": text, "tstamp": time.time()}
        for bulky in ("system", "user", "answer"):  # the prompt is reproducible from the answers file
            row.pop(bulky)
        with lock, open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["judged"] += 1
            counts["unparseable"] += score == FAILED

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(run, r): r for r in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except JudgeError as err:
                counts["errors"] += 1
                r = futures[future]
                logger.error("judging question %s turn %d failed: %s (rerun to retry)", r.question_id, r.turn, err)
    return counts
