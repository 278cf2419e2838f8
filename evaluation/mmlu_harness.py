"""MMLU through EleutherAI's lm-evaluation-harness (`lm_eval`), on local data, with our base model + adapter.

The task configurations are the harness's own (`lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml`: its prompt,
description, 5 dev examples taken in order as the shots, and accuracy from the log-likelihoods of " A" to " D").
Only where the documents come from changes: instead of the hub's `cais/mmlu`, each task reads the Hendrycks CSV
files that evaluation.mmlu loads (`--mmlu_dir`), converted to the hub's fields (question, subject, choices,
answer index). The model is the one already in memory (a PeftModel with the checkpoint's adapter), so nothing is
loaded twice. Subjects are scored one at a time and written as they finish: a killed run loses one subject.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from evaluation.mmlu import CHOICES, Question
from evaluation.scores import append_score

logger = logging.getLogger(__name__)


def check_installed() -> None:
    """Fail before any model loads when the harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise SystemExit("MMLU through lm-evaluation-harness needs `pip install lm_eval==0.4.13` (pinned in "
                         "requirements.txt); or score with --mmlu_harness instructeval.") from err


def task_config(subject: str, dev: list[Question], test: list[Question]) -> dict:
    """The harness's configuration for `mmlu_<subject>`, reading our local questions. A subject the harness does not
    know (a local test set of our own) gets the harness's common MMLU template and a description in its form."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    path = folder / f"mmlu_{subject}.yaml"
    if path.exists():
        config = load_yaml(path, resolve_func=True)
    else:
        config = {**load_yaml(folder / "_default_template_yaml", resolve_func=True), "task": f"mmlu_{subject}",
                  "description": f"The following are multiple choice questions (with answers) about "
                                 f"{subject.replace('_', ' ')}.\n\n"}
    config.pop("tag", None)  # groups and tags belong to the harness's index, not to a standalone task

    def documents(**_metadata):
        import datasets

        def split(questions: list[Question]):
            return datasets.Dataset.from_list([
                {"question": q.question, "subject": subject, "choices": list(q.options),
                 "answer": CHOICES.index(q.answer)} for q in questions])
        return datasets.DatasetDict({"test": split(test), "dev": split(dev)})

    return {**config, "dataset_path": f"local:{subject}", "dataset_name": None, "custom_dataset": documents}


def score_subject(lm, subject: str, dev: list[Question], test: list[Question], chosen: list[Question], k: int) -> list[dict]:
    """One harness run over the `chosen` questions of a subject; the harness's per-document records."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    config = task_config(subject, dev, test)
    task = config["task"]
    results = simple_evaluate(model=lm, tasks=[config], num_fewshot=k, samples={task: [q.index for q in chosen]},
                              log_samples=True, task_manager=TaskManager(include_defaults=False),
                              bootstrap_iters=0)
    return results["samples"][task]


def run_mmlu_lm_eval(model, tokenizer, questions: list[Question], dev: dict[str, list[Question]],
                     test: dict[str, list[Question]], out_path: Path, meta: dict, k: int = 5,
                     batch_size: int = 8) -> dict:
    """Score `questions` (those not yet in `out_path`) with the harness; one row per question, as run_mmlu."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    by_subject = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    for subject, chosen in by_subject.items():
        by_index = {q.index: q for q in chosen}
        for sample in score_subject(lm, subject, dev.get(subject, []), test[subject], chosen, k):
            q = by_index[sample["doc_id"]]
            loglikelihoods = [float(value) for value, _ in sample["filtered_resps"]]
            predicted = CHOICES[max(range(len(CHOICES)), key=loglikelihoods.__getitem__)]
            append_score(out_path, {**meta, "question_id": q.question_id, "turn": 1, "category": subject,
                                    "score": float(sample["acc"]), "judgment": predicted, "reference": q.answer,
                                    "loglikelihoods": loglikelihoods})
        logger.info("mmlu %s: %d questions scored with lm-eval", subject, len(chosen))
    return {"scored_now": len(questions)}
