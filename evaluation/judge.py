"""LLM judging through any OpenAI-compatible chat-completions endpoint, resumable and rate-limit tolerant.

Judgments are appended to a JSONL file as they arrive. A judgment is keyed by what produced it: the question,
the turn, the judge's settings (model, response format, max tokens, parser, prompt source) and the hash of the
prompt template. A rerun with the same settings skips what is there, so a killed run never pays twice; a
change of settings makes new judgments beside the old ones (show_results gives each its own column). A change
of parser alone re-reads the stored replies without asking the judge again. A reply whose score cannot be
parsed is stored with score -1 and its raw text: it counts as judged and is left out of every mean.

Requests run on one asyncio loop in a background thread, so a request given up on (timed out, or the run
stopped) is cancelled: its connection is closed, which tells vLLM and llama.cpp servers to stop generating.
"""
from __future__ import annotations

import asyncio
import hashlib
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
# A number that is a verdict, not the start of a range or a scale ("1-4", "1 to 10", "[Rating: 1-10]").
_VERDICT = r"(\d+(?:\.\d+)?)(?![\d.])(?!\s*(?:-|–|to)\s*\d)"
# The lenient parser's extra forms, tried after FastChat's and taking the last occurrence (the verdict comes last):
# "Rating: 7", "score of 7.5", "**Score**: 8", then "7/10" or "7 out of 10".
LENIENT_PATTERNS = (
    re.compile(r"\b(?:rating|score)\**\s*(?:is|of|=|:)?\s*\**\s*:?\s*" + _VERDICT, re.IGNORECASE),
    re.compile(r"(?<![\d.\-–])(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
)
LENIENT_RANGE = (0.0, 10.0)  # every rubric here rates 1-10 (AdvBench's LLM judge 0/1)
RETRYABLE_STATUS = {408, 409, 429}

# Structured output. The schema of a judgment, and the two dialects servers take it in.
JUDGMENT_JSON = {
    "type": "object",
    "properties": {"explanation": {"type": "string"}, "rating": {"type": "number"}},
    "required": ["explanation", "rating"], "additionalProperties": False}
RESPONSE_FORMATS = {
    "text": None,
    # OpenAI's form, which vLLM, llama.cpp's llama-server and SGLang take too.
    "json_schema": {"type": "json_schema", "json_schema": {"name": "judgment", "strict": True,
                                                           "schema": JUDGMENT_JSON}},
    # llama-cpp-python's form: its server refuses "json_schema" ("Input should be 'text' or 'json_object'").
    "json_object": {"type": "json_object", "schema": JUDGMENT_JSON},
}
AUTO = "auto"  # probe the structured forms in this order at the pre-flight, else plain text
PROBE_ORDER = ("json_schema", "json_object")
# What a server says when it refuses a response_format: such an error is not retried.
FORMAT_REFUSAL = re.compile(r"response_format|json_schema|json_object|'text'", re.IGNORECASE)
PROBE_PROMPT = ('Rate this answer to "What is 2+2?": "4". Reply with JSON only: {"explanation": "<three words>", '
                '"rating": <a number from 1 to 10>}.')


def parse_score(text: str) -> float:
    """The rating in a judge reply, or -1 when there is none (FastChat's rule, the paper's protocol)."""
    for pattern in SCORE_PATTERNS:
        match = pattern.search(text or "")
        if match:
            return float(match.group(1))
    return FAILED


def parse_score_lenient(text: str) -> float:
    """FastChat's rule, else the last "Rating: x" / "score of x", else the last "x/10" / "x out of 10", kept only
    within 0-10; a range such as "Rating: 1-4" is not a verdict. For small judges that ignore the [[x]] format."""
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
    except (ValueError, TypeError, KeyError):
        return fallback(text)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else FAILED


def prompt_hash(system: str, template: str) -> str:
    """The identity of a judge prompt template (system message and user template), recorded in every row."""
    return hashlib.sha256(f"{system}\n\x00\n{template}".encode()).hexdigest()[:16]


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
    prompt_hash: str = ""  # of the template the user message was filled from (prompt_hash())
    prompt_source: str = ""  # where that template came from, e.g. "FastChat judge_prompts.jsonl"


@dataclass(frozen=True)
class JudgeConfig:
    model: str = "gpt-4-1106-preview"  # the paper's MT-Bench judge ("GPT-4-Turbo")
    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL or api.openai.com)
    max_tokens: int = 2048
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0  # per request, counted once it is the oldest of this run's requests in flight
    preflight_s: float = 600.0  # how long the pre-flight keeps retrying a busy (timing-out, 5xx, 429) server
    response_format: str = "text"  # a key of RESPONSE_FORMATS, or "auto"
    parser: str = "fastchat"  # a key of PARSERS
    allow_unlisted: bool = False  # judge under a name the endpoint's model list lacks


class JudgeError(RuntimeError):
    """A request that failed for good (retries exhausted or a non-retryable error)."""


class FormatRefused(JudgeError):
    """The server refused the response_format (an error that retrying cannot fix)."""


class JudgeTimeout(Exception):
    """A request got no reply within the timeout (see LLMJudge._attempt); it was cancelled."""


def _is_retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (JudgeTimeout, openai.APIConnectionError)):  # APIConnectionError includes APITimeoutError
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code in RETRYABLE_STATUS or err.status_code >= 500)


def _refuses_format(err: Exception) -> bool:
    import openai

    return isinstance(err, openai.APIStatusError) and err.status_code >= 400 and bool(FORMAT_REFUSAL.search(str(err)))


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class _InFlight:
    """A request of this run in flight; `head` is set once it is the oldest one (its clock starts then)."""
    task: asyncio.Task
    head: asyncio.Event


class LLMJudge:
    def __init__(self, config: JudgeConfig):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise SystemExit(
                "LLM judging needs an API key in the environment: `export OPENAI_API_KEY=...` (for a local "
                "vLLM/llama.cpp server that ignores keys, any value such as `EMPTY`). Set it before rerunning; "
                "no answers were generated.")
        for name, value, choices in (("--judge_response_format", config.response_format, [*RESPONSE_FORMATS, AUTO]),
                                     ("--judge_parser", config.parser, PARSERS)):
            if value not in choices:
                raise SystemExit(f"{name} {value!r} is unknown: use one of {', '.join(choices)}.")
        self.config = config
        self.parse = PARSERS[config.parser]
        # "auto" is settled by the pre-flight's probe; until then requests go out as plain text.
        self.response_format = "text" if config.response_format == AUTO else config.response_format
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
        self._queue: list[_InFlight] = []  # this run's requests in flight, oldest first
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="judge-loop", daemon=True).start()

    # --- one HTTP request, on the loop ---------------------------------------------------------------------
    async def _create(self, messages: list[dict], temperature: float, max_tokens: int, response_format: str):
        extra = {}
        if RESPONSE_FORMATS[response_format] is not None:
            extra["response_format"] = RESPONSE_FORMATS[response_format]
        return await self.client.chat.completions.create(model=self.config.model, messages=messages,
                                                         temperature=temperature, max_tokens=max_tokens, **extra)

    def _promote(self) -> None:
        if self._queue:
            self._queue[0].head.set()

    async def _attempt(self, messages: list[dict], temperature: float, max_tokens: int, response_format: str,
                       timeout: float):
        """One request. Its timeout runs from the moment it is the oldest of this run's requests in flight: a
        request queued behind our own earlier ones waits while those are served, and one slow request times
        out alone instead of taking every request sent with it along. A timed-out request is cancelled, which
        closes its connection."""
        task = asyncio.ensure_future(self._create(messages, temperature, max_tokens, response_format))
        entry = _InFlight(task, asyncio.Event())
        self._queue.append(entry)
        self._promote()
        head = asyncio.ensure_future(entry.head.wait())
        try:
            await asyncio.wait({task, head}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if not done:
                    task.cancel()
                    with suppress(asyncio.CancelledError, Exception):
                        await task
                    raise JudgeTimeout(f"no reply within {timeout:g}s of being this run's oldest request")
            return task.result()
        finally:
            head.cancel()
            self._queue.remove(entry)
            self._promote()
            if not task.done():  # this coroutine itself was cancelled (close())
                task.cancel()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # --- the blocking interface used by worker threads ----------------------------------------------------
    def _reply(self, system: str, user: str, temperature: float, max_tokens: int | None = None,
               response_format: str | None = None, patience_s: float | None = None):
        """The judge's full reply, retrying 429, 5xx, timeouts and connection errors with capped exponential
        backoff, at most max_retries times; with `patience_s` (the pre-flight) a busy server's timeouts, 429s
        and 5xx are retried until that much time has passed, each timeout twice as long as the one before.
        A refused response_format is not retried (FormatRefused)."""
        import openai

        cfg = self.config
        response_format = response_format or self.response_format
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        give_up = time.monotonic() + patience_s if patience_s else 0.0
        timeout = cfg.timeout_s
        attempt = 0
        while True:
            try:
                return self._run(self._attempt(messages, temperature, max_tokens or cfg.max_tokens,
                                               response_format, timeout))
            except Exception as err:  # noqa: BLE001 - classified just below
                if response_format != "text" and _refuses_format(err):
                    raise FormatRefused(f"{type(err).__name__}: {err}") from err
                delay = min(_retry_after(err) or cfg.backoff_s * 2 ** attempt * (1 + random.random() / 4),
                            cfg.max_backoff_s)
                # A refused connection is no busy server: it gets max_retries, not the pre-flight's patience.
                patient = not isinstance(err, openai.APIConnectionError) and time.monotonic() + delay < give_up
                if not _is_retryable(err) or (attempt >= cfg.max_retries and not patient):
                    raise JudgeError(f"{type(err).__name__}: {err}") from err
                if patient and isinstance(err, JudgeTimeout):
                    timeout = max(min(timeout * 2, give_up - time.monotonic() - delay), cfg.timeout_s)
                with self._lock:
                    self.retries += 1
                logger.warning("judge request failed (%s); retry %d in %.1fs", type(err).__name__, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1

    def complete(self, system: str, user: str, temperature: float, max_tokens: int | None = None) -> str:
        """The text of the judge's reply (see _reply for the retries)."""
        return self._reply(system, user, temperature, max_tokens).choices[0].message.content or ""

    async def _list_models(self) -> list[str]:
        return [m.id async for m in self.client.models.list()]

    def check_model(self) -> None:
        """Refuse a --judge_model the endpoint's model list lacks (unless allowed): a server that answers any
        model name (as llama.cpp's do) would otherwise leave judgments labelled with a judge that did not make
        them. An endpoint without a list only gets a warning."""
        try:
            self.listed_models = self._run(self._list_models())
        except Exception as err:  # noqa: BLE001 - any failure only means the name cannot be checked
            logger.warning("The judge endpoint %s does not list its models (%s: %s), so the judge name %r cannot be "
                           "checked; its reply reports model %r.", self.endpoint, type(err).__name__, err,
                           self.config.model, self.reported_model)
            return
        if self.config.model in self.listed_models:
            return
        listed = ", ".join(map(repr, self.listed_models)) or "none"
        if not self.config.allow_unlisted:
            raise SystemExit(f"The judge endpoint {self.endpoint} does not list --judge_model {self.config.model!r} "
                             f"(it lists {listed}): pass one of those as --judge_model, or add "
                             "--judge_allow_unlisted to judge under this name anyway. No answers were generated.")
        logger.warning("The judge endpoint %s does not list --judge_model %r (it lists %s); judging under that name "
                       "as --judge_allow_unlisted asks. Rows record the model each reply reports.", self.endpoint,
                       self.config.model, listed)

    def _probe(self, response_format: str) -> str:
        """How the endpoint treats a response format: "refused", "ignored" (accepted, but the reply is not a
        judgment as JSON) or "followed"."""
        try:
            reply = self._reply("", PROBE_PROMPT, 0.0, max_tokens=256, response_format=response_format,
                                patience_s=self.config.preflight_s)
        except FormatRefused:
            return "refused"
        followed = parse_structured(reply.choices[0].message.content or "", lambda text: FAILED) != FAILED
        return "followed" if followed else "ignored"

    def _settle_format(self) -> None:
        """Resolve "auto" to the first structured form the endpoint follows (else text); refuse an explicit
        form the endpoint refuses, with one line naming the form that fits."""
        wanted = self.config.response_format
        if wanted == "text":
            return
        if wanted == AUTO:
            found = {}
            for form in PROBE_ORDER:
                found[form] = self._probe(form)
                if found[form] == "followed":
                    self.response_format = form
                    break
            logger.info("judge %s at %s: response format %s (probed: %s)", self.config.model, self.endpoint,
                        self.response_format, ", ".join(f"{k} {v}" for k, v in found.items()))
            return
        verdict = self._probe(wanted)
        if verdict == "ignored":
            logger.warning("The judge endpoint %s accepts --judge_response_format %s but its reply is not the "
                           "judgment as JSON; replies fall back to --judge_parser %s.", self.endpoint, wanted,
                           self.config.parser)
        if verdict == "refused":
            fits = next((f for f in PROBE_ORDER if f != wanted and self._probe(f) == "followed"), "text")
            raise SystemExit(f"The judge endpoint {self.endpoint} refuses --judge_response_format {wanted}: use "
                             f"--judge_response_format {fits}" + (" (or auto)" if fits != "text" else
                                                                  " (it takes no structured form)") +
                             ". No answers were generated.")

    def preflight(self) -> None:
        """A tiny request, so a wrong key, URL or model fails before any (slow) generation; then the judge's
        identity is checked against the endpoint's model list and the response format settled. A busy server
        is waited for (timeouts, 429 and 5xx retried for up to --judge_preflight_timeout)."""
        import openai

        where = self.config.base_url or "the OpenAI API"
        try:
            reply = self._reply("", "Reply with the word OK.", 0.0, max_tokens=5, response_format="text",
                                patience_s=self.config.preflight_s)
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
        self.reported_model = reply.model
        self.check_model()
        self._settle_format()

    def settings(self) -> dict:
        """What decides a judgment besides its prompt: part of every judgment's key."""
        return {"judge_model": self.config.model, "response_format": self.response_format,
                "max_tokens": self.config.max_tokens, "parser": self.config.parser}

    def identity(self) -> dict:
        """Who judged, as recorded in every judgment row: the endpoint, the model asked for and whether the
        endpoint's model list names it (None: the list could not be read), and how patiently it was asked."""
        listed = None if self.listed_models is None else self.config.model in self.listed_models
        return {"judge_endpoint": self.endpoint, "judge_model": self.config.model, "judge_model_listed": listed,
                "judge_patience": {"timeout_s": self.config.timeout_s, "max_retries": self.config.max_retries,
                                   "response_format_asked": self.config.response_format}}

    def parse_reply(self, text: str) -> float:
        """The score of a reply: JSON's `rating` under structured output, else the parser's reading."""
        return parse_structured(text, self.parse) if self.response_format != "text" else self.parse(text)

    def grade(self, request: JudgeRequest) -> tuple[float, str, dict]:
        reply = self._reply(request.system, request.user, request.temperature)
        text = reply.choices[0].message.content or ""
        return self.parse_reply(text), text, {"judge_reported_model": reply.model}

    def close(self) -> None:
        """Cancel requests still in flight (closing their connections) and stop the loop."""
        async def shutdown():
            tasks = [entry.task for entry in self._queue]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.close()

        if self._loop.is_running():
            with suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def judgment_key(row: dict) -> tuple:
    """What makes two rows the same judgment: question, turn, judge settings and prompt template."""
    return row["question_id"], row["turn"], _canonical(row.get("judge_settings") or {}), row.get("prompt_hash", "")


def reply_key(row: dict) -> tuple:
    """What makes two judge replies interchangeable: the judgment key without the parser that read the reply."""
    settings = {k: v for k, v in (row.get("judge_settings") or {}).items() if k != "parser"}
    return row["question_id"], row["turn"], _canonical(settings), row.get("prompt_hash", "")


def read_judgments(path: Path) -> list[dict]:
    """Judgment rows of a file; for a repeated judgment key the last row wins (a re-judged failure replaces it)."""
    if not path.exists():
        return []
    rows: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[judgment_key(row)] = row
    return list(rows.values())


def judge_all(requests: Iterable[JudgeRequest], grade: Callable[[JudgeRequest], tuple], out_path: Path,
              meta: dict, concurrency: int = 1, rejudge_failures: bool = False, settings: dict | None = None,
              reparse: Callable[[str], float] | None = None) -> dict:
    """Grade every request whose judgment is not yet in `out_path`, appending rows as they arrive.

    `settings` (an LLM judge's LLMJudge.settings()) is part of each judgment's key, with the request's prompt
    hash; `reparse` reads a stored reply, so a judgment that differs from a stored one only by its parser is
    made from the stored reply, without asking the judge. `grade` returns (score, text) or (score, text, fields
    to record). Returns counts."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_judgments(out_path)
    judged = {judgment_key(r): r for r in rows}
    replies = {reply_key(r): r for r in rows if r.get("judgment")}
    counts = {"skipped": 0, "reparsed": 0, "judged": 0, "unparseable": 0, "errors": 0}
    lock = threading.Lock()

    def write(request: JudgeRequest, score: float, text: str, extra: dict) -> None:
        row = {**meta, **asdict(request), "judge_settings": settings or {}, **extra, "score": score,
               "judgment": text, "tstamp": time.time()}
        for bulky in ("system", "user", "answer"):  # the prompt is reproducible from the answers file
            row.pop(bulky)
        with lock, open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["unparseable"] += score == FAILED

    todo = []
    for request in requests:
        probe = {"question_id": request.question_id, "turn": request.turn, "judge_settings": settings or {},
                 "prompt_hash": request.prompt_hash}
        row = judged.get(judgment_key(probe))
        if row is not None and not (rejudge_failures and row["score"] == FAILED):
            counts["skipped"] += 1
            continue
        stored = replies.get(reply_key(probe)) if reparse else None
        if row is None and stored is not None:  # only the parser changed: read the stored reply again
            score = reparse(stored["judgment"])
            if score != FAILED or not rejudge_failures:
                write(request, score, stored["judgment"], {"judge_reported_model": stored.get("judge_reported_model"),
                                                           "reparsed_from": stored["judge_settings"]["parser"]})
                counts["reparsed"] += 1
                continue
        todo.append(request)

    def run(request: JudgeRequest) -> None:
        score, text, *extra = grade(request)
        write(request, score, text, extra[0] if extra else {})
        with lock:
            counts["judged"] += 1

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
