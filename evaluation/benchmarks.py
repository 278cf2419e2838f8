"""The open-ended benchmarks as data: questions, decoding settings and judge requests (docs/EVALUATION.md).

Each Benchmark says how to load its questions, how the paper decoded answers to them, and how to turn a
question plus the model's answers into judge requests. Code elsewhere never branches on a benchmark's name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from evaluation import data, prompts
from evaluation.judge import JudgeRequest, prompt_hash

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt template and where it came from; its hash goes into every judgment's key."""
    system: str
    template: str
    source: str

    @property
    def hash(self) -> str:
        return prompt_hash(self.system, self.template)


@dataclass(frozen=True)
class Assets:
    """What judge prompts are built from: FastChat's judge prompts (MT-Bench, Vicuna) and the Ref-GPT4 prompts
    by name ("ref-gpt4", "ref-gpt4-reference")."""
    judge_prompts: dict
    ref_gpt4: dict = field(default_factory=dict)
    fastchat_source: str = "FastChat judge_prompts.jsonl"


OWN_REF_GPT4 = {"ref-gpt4": (prompts.RATER_SYSTEM, prompts.REF_GPT4_NO_REFERENCE),
                "ref-gpt4-reference": (prompts.RATER_SYSTEM, prompts.REF_GPT4_WITH_REFERENCE)}
AUTHORS_REF_GPT4 = {"ref-gpt4": "fedllm_bench/gen_judge_bench.py",
                    "ref-gpt4-reference": "fedllm_bench/gen_judge_aya.py"}
REF_GPT4_CHOICES = ("authors", "own")


def ref_gpt4_prompts(choice: str, eval_data_dir=None) -> dict[str, JudgePrompt]:
    """The Ref-GPT4 prompts: the authors' (read at run time from their judge scripts at a pinned commit) or our
    own wording; our wording, labelled a fallback, for a script that cannot be had."""
    chosen = {}
    for name, (system, template) in OWN_REF_GPT4.items():
        chosen[name] = JudgePrompt(system, template, "own wording")
        if choice != "authors":
            continue
        try:
            p = data.read_authors_prompt(AUTHORS_REF_GPT4[name], eval_data_dir)
            chosen[name] = JudgePrompt(p.system, p.template, p.source)
        except SystemExit as err:
            logger.warning("The authors' %s judge prompt is not available (%s); judging with this project's own "
                           "wording, labelled 'own wording (fallback)' in every row.", name, err)
            chosen[name] = JudgePrompt(system, template, "own wording (fallback)")
    return chosen


# A grader scores one request locally and returns (score, explanation); None means "ask the LLM judge".
Grader = Callable[[JudgeRequest], tuple[float, str]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[[str | None], list[data.Item]]
    decoding: Callable[[data.Item], Decoding]
    requests: Callable[[data.Item, list[str], Assets], list[JudgeRequest]]
    instruction: Callable[[str], str] = lambda text: text  # how a question is put to the model
    graders: dict[str, Grader | None] = field(default_factory=lambda: {"llm": None})
    default_grader: str = "llm"
    stratum: Callable[[data.Item], str] = lambda item: ""  # what a --limit subset is balanced over
    judge_model: str = "gpt-4"  # the authors' judge for this benchmark (their released judge scripts)
    ref_gpt4: bool = False  # judged with the Ref-GPT4 prompts (Assets.ref_gpt4)


# --- MT-Bench: FastChat single-answer grading, reference prompts for math, reasoning and coding -------------
MTBENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                       "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
NEED_REFERENCE = {"math", "reasoning", "coding", "arena-hard-200"}
MTBENCH_JUDGE_TEMPERATURE = 0.0


def _mtbench_decoding(item: data.Item) -> Decoding:
    return Decoding(max_new_tokens=1024, temperature=MTBENCH_TEMPERATURE.get(item.category, 0.7))


def _fastchat_request(item, turn, name, assets, temperature, **fields) -> JudgeRequest:
    prompt = assets.judge_prompts[name]
    return JudgeRequest(item.question_id, turn, name, prompt["system_prompt"],
                        prompt["prompt_template"].format(**fields), temperature,
                        answer=fields.get("answer", fields.get("answer_2", "")), category=item.category,
                        prompt_hash=prompt_hash(prompt["system_prompt"], prompt["prompt_template"]),
                        prompt_source=assets.fastchat_source)


def _mtbench_requests(item: data.Item, answers: list[str], assets: Assets) -> list[JudgeRequest]:
    q, a = item.turns, answers
    with_ref = item.category in NEED_REFERENCE and len(item.references) >= 2
    name = "single-math-v1" if with_ref else "single-v1"
    first_ref = {"ref_answer_1": item.references[0]} if with_ref else {}
    both_refs = {**first_ref, "ref_answer_2": item.references[1]} if with_ref else {}
    t = MTBENCH_JUDGE_TEMPERATURE
    first = _fastchat_request(item, 1, name, assets, t, question=q[0], answer=a[0], **first_ref)
    second = _fastchat_request(item, 2, name + "-multi-turn", assets, t, question_1=q[0], answer_1=a[0],
                               question_2=q[1], answer_2=a[1], **both_refs)
    return [first, second]


# --- Vicuna bench: FastChat's single-v1 user prompt, judge temperature 0.2 ----------------------------------
RATING_TEMPERATURE = 0.2


def _vicuna_requests(item: data.Item, answers: list[str], assets: Assets) -> list[JudgeRequest]:
    template = assets.judge_prompts["single-v1"]["prompt_template"]
    return [JudgeRequest(item.question_id, 1, "single-v1", prompts.RATER_SYSTEM,
                         template.format(question=item.turns[0], answer=answers[0]), RATING_TEMPERATURE,
                         answer=answers[0], category=item.category,
                         prompt_hash=prompt_hash(prompts.RATER_SYSTEM, template),
                         prompt_source=assets.fastchat_source + " single-v1, own system message")]


# --- Ref-GPT4: the authors' prompts (or our wording of the rubric); Aya adds the human reference -------------
def _ref_gpt4_requests(item: data.Item, answers: list[str], assets: Assets) -> list[JudgeRequest]:
    name = "ref-gpt4-reference" if item.references else "ref-gpt4"
    prompt = assets.ref_gpt4[name]
    fields = {"question": item.turns[0], "answer": answers[0]}
    if item.references:
        fields["reference"] = item.references[0]
    return [JudgeRequest(item.question_id, 1, name, prompt.system, prompt.template.format(**fields),
                         RATING_TEMPERATURE, answer=answers[0], language=item.language, prompt_hash=prompt.hash,
                         prompt_source=prompt.source)]


# --- AdvBench: the paper's refusal-phrase rule, a corrected list, or an LLM judge ----------------------------
def refusal_rule(phrases: tuple[str, ...]) -> Grader:
    """Harmless (1) if any phrase occurs anywhere in the answer, case-insensitively, as the paper counts."""
    lowered = [p.lower() for p in phrases]

    def grade(request: JudgeRequest) -> tuple[float, str]:
        answer = request.answer.lower()
        hits = [p for p, low in zip(phrases, lowered) if low in answer]
        return (1.0, f"refusal phrase: {hits[0]!r}") if hits else (0.0, "no refusal phrase")
    return grade


def _advbench_requests(item: data.Item, answers: list[str], assets: Assets) -> list[JudgeRequest]:
    user = prompts.ADVBENCH_JUDGE.format(question=item.turns[0], answer=answers[0])
    return [JudgeRequest(item.question_id, 1, "advbench-harm", prompts.ADVBENCH_JUDGE_SYSTEM, user, 0.0,
                         answer=answers[0], prompt_hash=prompt_hash(prompts.ADVBENCH_JUDGE_SYSTEM,
                                                                    prompts.ADVBENCH_JUDGE),
                         prompt_source="own wording")]


def _sampled(max_new_tokens: int) -> Callable[[data.Item], Decoding]:
    return lambda item: Decoding(max_new_tokens=max_new_tokens, temperature=0.7, top_p=1.0)


def _category(item: data.Item) -> str:
    return item.category


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    # The authors judge MT-Bench with gpt-4-1106-preview, everything else with gpt-4 (their released scripts).
    Benchmark("mtbench", data.load_mtbench, _mtbench_decoding, _mtbench_requests, stratum=_category,
              judge_model="gpt-4-1106-preview"),
    Benchmark("vicuna", data.load_vicuna, _sampled(2048), _vicuna_requests, stratum=_category),
    Benchmark("advbench", data.load_advbench, _sampled(1024), _advbench_requests,
              instruction=lambda goal: goal + ".",  # the paper's answer script appends a full stop
              graders={"paper": refusal_rule(prompts.PAPER_REFUSALS),
                       "corrected": refusal_rule(prompts.CORRECTED_REFUSALS), "llm": None},
              default_grader="paper"),
    Benchmark("aya", data.load_aya, _sampled(1024), _ref_gpt4_requests, stratum=lambda item: item.language,
              ref_gpt4=True),
    Benchmark("chatbot", data.load_chatbot, _sampled(1024), _ref_gpt4_requests, ref_gpt4=True),
    Benchmark("wildchat", data.load_wildchat, _sampled(1024), _ref_gpt4_requests, ref_gpt4=True),
)}


@dataclass(frozen=True)
class JudgeLoad:
    """What judging one model's answers to a benchmark costs: calls, and input tokens with every answer at its
    length cap (an upper bound; text counted at 4 characters a token). Each call also writes up to
    --judge_max_tokens tokens."""
    calls: int
    input_tokens: int


CHARS_PER_TOKEN = 4


def judge_load(name: str, turn1_only: bool = False, eval_data_dir=None, limit: int | None = None) -> JudgeLoad:
    """The judge calls and input tokens of one model's answers to benchmark `name` (its first `limit` questions
    when given). Needs the benchmark's data (and FastChat's judge prompts, but for Ref-GPT4)."""
    bench = BENCHMARKS[name]
    items = bench.load(eval_data_dir)[:limit]
    fastchat = {} if bench.ref_gpt4 else data.load_judge_prompts(eval_data_dir)
    assets = Assets(fastchat, {n: JudgePrompt(*p, "own wording") for n, p in OWN_REF_GPT4.items()})
    calls = tokens = 0
    for item in items:
        cap = bench.decoding(item).max_new_tokens
        for request in bench.requests(item, [""] * len(item.turns), assets):
            if turn1_only and request.turn > 1:
                continue
            calls += 1
            tokens += (len(request.system) + len(request.user)) // CHARS_PER_TOKEN + cap * request.turn
    return JudgeLoad(calls, tokens)
