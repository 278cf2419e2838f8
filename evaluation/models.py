"""What to evaluate: the base model and LoRA checkpoints, loaded once and swapped adapter by adapter.

A training run writes OUTPUT_DIR/args.json and OUTPUT_DIR/checkpoint-<round>/ (a PEFT adapter); evaluation
defaults the base model, quantisation and prompt template from that args.json, so answers use the template
the model was trained with.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from utils.files import write_json_atomic
from utils.model import load_base_model, load_tokenizer
from utils.templates import check_template

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "alpaca"  # the paper's answer scripts use the Alpaca prompt


@dataclass(frozen=True)
class Target:
    model_id: str  # names the answer and judgment files
    checkpoint: str | None  # None: the base model without an adapter
    template: str


def run_args(checkpoint: str) -> dict:
    """The training run's args.json (in the checkpoint's run directory, or the checkpoint itself), or {}."""
    for candidate in (Path(checkpoint).parent / "args.json", Path(checkpoint) / "args.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return {}


@dataclass
class ScoringTarget:
    run: dict  # the training run's args.json, {} for a bare base model
    template: str
    test: list[dict]
    model: object
    tokenizer: object


def scoring_target(checkpoint: str | None, base_model: str | None, template: str | None, dataset: str | None,
                   default_dataset: str, per_task: int | None) -> ScoringTarget:
    """What the offline scorers (exact match, preference pairs) need: the run's settings, the dataset's held-out
    samples (the first `per_task` of each task), and the base model with the checkpoint's adapter."""
    from data import load_federated_dataset
    from data.synthetic import balanced_subset

    run = run_args(checkpoint) if checkpoint else {}
    name = dataset or run.get("dataset", default_dataset)
    options = {k: v for k, v in run.items() if k.startswith("synthetic_")}
    test = balanced_subset(load_federated_dataset(name, **options).test, per_task)
    if not test:
        raise SystemExit(f"Dataset {name} has no held-out test samples to score.")
    base = base_model or run.get("model_name_or_path", "smollm2")
    model = load_base_model(base)
    if checkpoint:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, checkpoint)
    return ScoringTarget(run, template or run.get("template", DEFAULT_TEMPLATE), test, model, load_tokenizer(base))


def add_scoring_args(parser, default_dataset: str) -> None:
    """The command-line options of an offline scorer: which run, model, template and held-out samples."""
    parser.add_argument("--checkpoint", help="a checkpoint-<round> folder of a training run")
    parser.add_argument("--base_model", help="default: the run's model_name_or_path, else smollm2")
    parser.add_argument("--template", help="default: the run's template, else alpaca")
    parser.add_argument("--dataset", help=f"default: the run's dataset, else {default_dataset}")
    parser.add_argument("--per_task", type=int, help="score only the first N held-out samples of each task")
    parser.add_argument("--output", help="write the scores as JSON here")
    parser.set_defaults(default_dataset=default_dataset)


def scoring_target_from_args(args) -> ScoringTarget:
    return scoring_target(args.checkpoint, args.base_model, args.template, args.dataset, args.default_dataset,
                          args.per_task)


def report_scores(scores: dict, output: str | None) -> dict:
    print(json.dumps(scores, indent=2))
    if output:
        write_json_atomic(output, scores, indent=2)
    return scores


def model_id_for(checkpoint: str | None, base_model: str) -> str:
    if checkpoint is None:
        return "base_" + Path(base_model.rstrip("/")).name
    path = Path(checkpoint.rstrip("/")).resolve()
    run = path.parent
    # A --client_groups run keeps one adapter per group in RUN/group-<name>/: the run's name keeps ids unique.
    prefix = f"{run.parent.name}_" if run.name.startswith("group-") else ""
    return f"{prefix}{run.name}_{path.name}"


def resolve(base_model: str | None, checkpoints: list[str], template: str | None,
            include_base: bool) -> tuple[dict, list[Target]]:
    """The base-model settings and the ordered targets; --template overrides each run's own template."""
    runs = [run_args(c) for c in checkpoints]
    trained_on = {r.get("model_name_or_path") for r in runs if r.get("model_name_or_path")}
    if base_model is None and len(trained_on) > 1:
        raise SystemExit(f"The checkpoints were trained on different base models {sorted(trained_on)}: "
                         "evaluate them in separate invocations or pass --base_model.")
    base = base_model or (trained_on.pop() if trained_on else "smollm2")
    first = runs[0] if runs else {}
    # The training seq_length is not carried over: it is no limit on evaluation prompts, and as the tokenizer's
    # model_max_length it only produced misleading "longer than the specified maximum" warnings.
    settings = {"model_name_or_path": base, "load_in_8bit": bool(first.get("load_in_8bit")),
                "load_in_4bit": bool(first.get("load_in_4bit"))}
    targets = [Target(model_id_for(None, base), None, check_template(template or DEFAULT_TEMPLATE))] \
        if include_base or not checkpoints else []
    for checkpoint, args in zip(checkpoints, runs):
        if not Path(checkpoint).is_dir():
            raise SystemExit(f"--checkpoints {checkpoint} is not a directory (expected OUTPUT_DIR/checkpoint-N).")
        chosen = check_template(template or args.get("template") or DEFAULT_TEMPLATE)
        targets.append(Target(model_id_for(checkpoint, base), checkpoint, chosen))
    return settings, targets


def iter_models(settings: dict, targets: list[Target]) -> Iterator[tuple[Target, object, object]]:
    """(target, model, tokenizer) for each target; the base weights are loaded once, adapters swapped in."""
    tokenizer = load_tokenizer(settings["model_name_or_path"])
    model = load_base_model(settings["model_name_or_path"], settings["load_in_8bit"], settings["load_in_4bit"])
    peft_model, loaded = None, None
    for target in targets:
        if target.checkpoint is None:
            if peft_model is None:
                yield target, model, tokenizer
            else:
                with peft_model.disable_adapter():
                    yield target, peft_model, tokenizer
            continue
        name = target.model_id
        if peft_model is None:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, target.checkpoint, adapter_name=name)
        else:
            peft_model.load_adapter(target.checkpoint, adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.delete_adapter(loaded)  # keep one adapter in memory at a time
        loaded = name
        logger.info("evaluating %s (adapter %s, template %s)", name, target.checkpoint, target.template)
        yield target, peft_model, tokenizer
