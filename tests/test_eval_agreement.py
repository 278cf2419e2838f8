"""evaluation.agreement: two judges (real HTTP servers on loopback) score the same answers; their agreement is
checked against values worked out by hand, and the statistics against scipy's."""
from __future__ import annotations

import json
import random

import pytest
from scipy import stats

from evaluation import agreement
from evaluation import run as eval_run
from evaluation.benchmarks import BENCHMARKS

from conftest import SHARED_EVAL_DATA as EVAL_DATA, needs_eval_data
from test_eval_judge import ScriptedServer, api_key  # noqa: F401 - the fixture sets OPENAI_API_KEY

# Judge A's scores of models m1 and m2 on four questions; judge B agrees up to a shift, or reverses everything.
A = {"m1": [2, 4, 6, 8], "m2": [3, 3, 7, 9]}


def _judge(tmp_path, name: str, score) -> None:
    items = BENCHMARKS["vicuna"].load(EVAL_DATA)[:4]
    out = tmp_path / name
    for model in A:
        path = out / "vicuna" / "answers" / f"{model}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"question_id": item.question_id,
                                            "turns": [f"answer ANS-{model}_{i}-t1"]}) + "\n"
                                for i, item in enumerate(items)))

    def reply(key, calls):
        if key == "preflight":
            return 200, "OK", 0.0
        model, index = key.rsplit("-t", 1)[0].split("_")
        return 200, f"Rating: [[{score(A[model][int(index)])}]]", 0.0

    with ScriptedServer(reply) as server:
        eval_run.main(["--stage", "judge", "--output_dir", str(out), "--eval_data_dir", str(EVAL_DATA),
                       "--judge_base_url", server.url, "--judge_model", name, "--benchmarks", "vicuna"])


@needs_eval_data
def test_agreement_of_two_loopback_judges(tmp_path, capsys):
    _judge(tmp_path, "judge-a", lambda s: s)
    _judge(tmp_path, "judge-shift", lambda s: s + 1)
    _judge(tmp_path, "judge-reverse", lambda s: 11 - s)
    agreement.main([str(tmp_path / "judge-a"), str(tmp_path / "judge-shift"), "--bootstrap", "200"])
    shifted = capsys.readouterr().out
    # Same order, one point apart: correlations 1, difference 1, every pair ordered alike (intervals degenerate).
    assert "| vicuna | 8 | 4 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | " \
           "1.000 [1.000, 1.000] |" in shifted
    a = agreement.read_side(str(tmp_path / "judge-a"), None)
    b = agreement.read_side(str(tmp_path / "judge-reverse"), None)
    point = agreement.agreement(agreement.compare(a, b)["vicuna"])
    # |A - (11 - A)| = |2A - 11| over 2,4,6,8,3,3,7,9 = 7,3,1,5,5,5,3,7: mean 4.5; m1 < m2 on q1, q3, q4 and
    # m1 > m2 on q2 for A, all reversed for B: no pair agrees.
    assert point == agreement.Agreement(8, 4, -1.0, -1.0, 4.5, 0.0)


def test_statistics_match_scipy_with_ties():
    rng = random.Random(3)
    x = [rng.randint(1, 10) for _ in range(60)]
    y = [v + rng.choice([-2, -1, 0, 0, 1, 3]) for v in x]
    assert agreement.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert agreement.kendall(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)  # tau-b
    assert agreement.spearman([1, 1, 1], [1, 2, 3]) is None  # a constant judge has no rank correlation


def test_fastchat_single_answer_judgments_are_read_as_mtbench(tmp_path):
    gpt4 = tmp_path / "gpt-4_single.jsonl"  # FastChat's model_judgment/gpt-4_single.jsonl shape
    rows = [{"question_id": 81 + i, "model": "vicuna-13b-v1.3", "judge": ["gpt-4", "single-v1"], "score": s,
             "turn": 1, "user_prompt": "...", "judgment": "..."} for i, s in enumerate([9, 4, -1, 7])]
    gpt4.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = agreement.read_side(str(gpt4), None)
    assert scores == {("mtbench", "vicuna-13b-v1.3", "81", 1): 9.0, ("mtbench", "vicuna-13b-v1.3", "82", 1): 4.0,
                      ("mtbench", "vicuna-13b-v1.3", "84", 1): 7.0}  # the unparseable -1 left out
    with pytest.raises(SystemExit, match="no answer in common"):
        agreement.report(scores, {("vicuna", "m", "1", 1): 3.0})
