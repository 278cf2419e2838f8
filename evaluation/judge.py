"""LLM judging through any OpenAI-compatible chat-completions endpoint, resumable and rate-limit tolerant.

Judgments are appended to a JSONL file as they arrive, one line per (question_id, turn); a rerun skips keys
already present, so a killed run never pays twice. A reply whose score cannot be parsed is stored with
score -1 and its raw text: it counts as judged (not re-requested) and is left out of every mean.

Requests run on one asyncio loop in a background thread, so a request given up on (timed out, or the run
stopped) is cancelled: its connection is closed, which tells vLLM and llama.cpp servers to stop generating.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

FAILED = -1.0
# FastChat's rule: "[[x]]" first, then a single-bracket "[x]" as a fallback.
SCORE_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))
# The lenient parser's extra forms, tried after FastChat's and taking the last occurrence (the verdict comes last):
# "Rating: 7", "score of 7.5", "**Score**: 8", then "7/10" or "7 out of 10".
LENIENT_PATTERNS = (
    re.compile(r"\b(?:rating|score)\**\s*(?:is|of|=|:)?\s*\**\s*:?\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
)
LENIENT_RANGE = (0.0, 10.0)  # every rubric here rates 1-10 (AdvBench's LLM judge 0/1)
RETRYABLE_STATUS = {408, 409, 429}

# Structured output: the OpenAI `response_format` JSON schema, which vLLM and llama.cpp servers also accept.
JUDGMENT_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "judgment", "strict": True, "schema": {
        "type": "object",
        "properties": {"explanation": {"type": "string"}, "rating": {"type": "number"}},
        "required": ["explanation", "rating"], "additionalProperties": False}},
}
RESPONSE_FORMATS = {"text": None, "json_schema": JUDGMENT_SCHEMA}


def parse_score(text: str) -> float:
    """The rating in a judge reply, or -1 when there is none (FastChat's rule, the paper's protocol)."""
    for pattern in SCORE_PATTERNS:
        match = pattern.search(text or "")
        if match:
            return float(match.group(1))
    return FAILED


def parse_score_lenient(text: str) -> float:
    """FastChat's rule, else the last "Rating: x" / "score of x", else the last "x/10" / "x out of 10", kept only
    within 0-10. For small judges that ignore the [[x]] format; off by default."""
    score = parse_score(text)
    if score != FAILED:
        return score
    for pattern in LENIENT_PATTERNS:
        values = [float(v) for v in pattern.findall(text or "")]
        values = [v for v in values if LENIENT_RANGE[0] <= v <= LENIENT_RANGE[1]]
        if values:
            return values[-1]
    return FAILED


PARSERS: dict[str, Callable[[str], float]] = {"fastchat": parse_score, "lenient": parse_score_lenient}


def parse_structured(text: str, fallback: Callable[[str], float]) -> float:
    """The `rating` of a JSON reply (structured output); a reply that is not such JSON goes to `fallback`."""
    try:
        value = json.loads(text)["rating"]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else FAILED
    except (ValueError, TypeError, KeyError):
        return fallback(text)


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
    timeout_s: float = 120.0  # per request, not counting time queued behind this run's own requests
    response_format: str = "text"  # a key of RESPONSE_FORMATS
    parser: str = "fastchat"  # a key of PARSERS

    def settings(self) -> dict:
        """What decides the judgments besides the prompts (recorded in every judgment row)."""
        return {"max_tokens": self.max_tokens, "response_format": self.response_format, "parser": self.parser,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries}


class JudgeError(RuntimeError):
    """A request that failed for good (retries exhausted or a non-retryable error)."""


class JudgeTimeout(Exception):
    """A request got no reply within the timeout (see LLMJudge._attempt); it was cancelled."""


def _is_retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (JudgeTimeout, openai.APIConnectionError)):  # APIConnectionError includes APITimeoutError
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
        for name, value, choices in (("--judge_response_format", config.response_format, RESPONSE_FORMATS),
                                     ("--judge_parser", config.parser, PARSERS)):
            if value not in choices:
                raise SystemExit(f"{name} {value!r} is unknown: use one of {', '.join(choices)}.")
        self.config = config
        self.parse = PARSERS[config.parser]
        # Retries are ours (below): the client's own would hide 429/5xx from the backoff cap and the counters.
        # The read timeout is ours too (_attempt): httpx's would count time queued behind our own requests.
        self.client = openai.AsyncOpenAI(api_key=key, base_url=config.base_url, max_retries=0,
                                         timeout=openai.Timeout(None, connect=config.timeout_s))
        self.endpoint = str(self.client.base_url).rstrip("/")
        self.listed_models: list[str] | None = None  # what GET /models lists, None if it cannot be read
        self.reported_model: str | None = None  # the `model` field of the preflight reply
        self.retries = 0  # counted across worker threads, for the final log line
        self._lock = threading.Lock()
        # The loop's own state: touched only from the loop thread, so it needs no lock.
        self._in_flight = 0
        self._last_reply = time.monotonic()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="judge-loop", daemon=True).start()

    # --- one HTTP request, on the loop ---------------------------------------------------------------------
    async def _create(self, messages: list[dict], temperature: float, max_tokens: int):
        extra = {}
        if RESPONSE_FORMATS[self.config.response_format] is not None:
            extra["response_format"] = RESPONSE_FORMATS[self.config.response_format]
        return await self.client.chat.completions.create(model=self.config.model, messages=messages,
                                                         temperature=temperature, max_tokens=max_tokens, **extra)

    async def _attempt(self, messages: list[dict], temperature: float, max_tokens: int):
        """One request, timed out when the server has finished none of this run's requests for timeout_s since
        it was sent: a request queued behind our own earlier ones keeps waiting while those complete. A hard cap
        of timeout_s per request in flight ahead of it (and itself) stops one stuck request from waiting forever.
        A timed-out request is cancelled, which closes its connection."""
        timeout = self.config.timeout_s
        sent = time.monotonic()
        cap = sent + timeout * (1 + self._in_flight)
        self._in_flight += 1
        task = asyncio.ensure_future(self._create(messages, temperature, max_tokens))
        self._tasks.add(task)
        try:
            while True:
                deadline = min(max(sent, self._last_reply) + timeout, cap)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    task.cancel()
                    with suppress(asyncio.CancelledError, Exception):
                        await task
                    raise JudgeTimeout(f"no reply within {timeout:g}s of the server's last reply to this run")
                done, _ = await asyncio.wait({task}, timeout=remaining)
                if done:
                    self._last_reply = time.monotonic()  # an error status is a reply too: the server is working
                    return task.result()
        finally:
            self._in_flight -= 1
            self._tasks.discard(task)
            if not task.done():  # this coroutine itself was cancelled (close())
                task.cancel()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # --- the blocking interface used by worker threads ----------------------------------------------------
    def _once(self, system: str, user: str, temperature: float, max_tokens: int):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._run(self._attempt(messages, temperature, max_tokens))

    def _reply(self, system: str, user: str, temperature: float, max_tokens: int | None = None):
        """The judge's full reply, retrying 429, 5xx, timeouts and connection errors with capped exponential
        backoff."""
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

    def complete(self, system: str, user: str, temperature: float, max_tokens: int | None = None) -> str:
        """The text of the judge's reply (see _reply for the retries)."""
        return self._reply(system, user, temperature, max_tokens).choices[0].message.content or ""

    async def _list_models(self) -> list[str]:
        return [m.id async for m in self.client.models.list()]

    def check_model(self) -> None:
        """Warn when the endpoint's model list lacks --judge_model: a server that answers any model name (as
        llama.cpp's does) would otherwise leave judgments labelled with a judge that did not make them."""
        try:
            self.listed_models = self._run(self._list_models())
        except Exception as err:  # noqa: BLE001 - any failure only means the name cannot be checked
            logger.warning("The judge endpoint %s does not list its models (%s: %s), so the judge name %r cannot be "
                           "checked; its reply reports model %r.", self.endpoint, type(err).__name__, err,
                           self.config.model, self.reported_model)
            return
        if self.config.model not in self.listed_models:
            logger.warning("The judge endpoint %s does not list --judge_model %r (it lists %s); judgments are "
                           "labelled with that name but come from whatever model the server runs. Pass one of the "
                           "listed ids as --judge_model.", self.endpoint, self.config.model,
                           ", ".join(map(repr, self.listed_models)) or "none")

    def preflight(self) -> None:
        """One tiny request, so a wrong key, URL or model fails before any (slow) generation; then the judge's
        identity is checked against the endpoint's model list."""
        import openai

        where = self.config.base_url or "the OpenAI API"
        try:
            reply = self._reply("", "Reply with the word OK.", 0.0, max_tokens=5)
        except JudgeError as err:
            cause = err.__cause__
            if isinstance(cause, openai.AuthenticationError):
                fix = "the key was rejected: set OPENAI_API_KEY to a valid key for this endpoint"
            elif isinstance(cause, openai.NotFoundError):
                fix = f"check --judge_model ({self.config.model!r}) and that --judge_base_url ends in /v1"
            elif isinstance(cause, openai.APIConnectionError):
                fix = "start the judge server or fix --judge_base_url (e.g. http://127.0.0.1:8000/v1)"
            elif isinstance(cause, openai.BadRequestError) and self.config.response_format != "text":
                fix = ("the endpoint may not accept structured output: drop --judge_response_format (or try "
                       "--judge_parser lenient)")
            else:
                fix = "check --judge_base_url, --judge_model and the server's log"
            raise SystemExit(f"The judge endpoint {where} is not usable ({err}); {fix}. No answers were generated."
                             ) from err
        self.reported_model = reply.model
        self.check_model()

    def identity(self) -> dict:
        """Who judged, as recorded in every judgment row: the endpoint, the model asked for, the model the server
        reported and whether its model list names it (None: the list could not be read), and the settings."""
        listed = None if self.listed_models is None else self.config.model in self.listed_models
        return {"judge_endpoint": self.endpoint, "judge_model": self.config.model,
                "judge_reported_model": self.reported_model, "judge_model_listed": listed,
                "judge_settings": self.config.settings()}

    def grade(self, request: JudgeRequest) -> tuple[float, str]:
        text = self.complete(request.system, request.user, request.temperature)
        if self.config.response_format == "json_schema":
            return parse_structured(text, self.parse), text
        return self.parse(text), text

    def close(self) -> None:
        """Cancel requests still in flight (closing their connections) and stop the loop."""
        async def shutdown():
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.client.close()

        if self._loop.is_running():
            with suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)


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

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(run, r): r for r in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except JudgeError as err:
                counts["errors"] += 1
                r = futures[future]
                logger.error("judging question %s turn %d failed: %s (rerun to retry)", r.question_id, r.turn, err)
    finally:
        # On Ctrl-C or a crash, requests not yet sent are dropped; LLMJudge.close() cancels those in flight.
        pool.shutdown(wait=False, cancel_futures=True)
    return counts
