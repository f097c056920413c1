"""Evaluation tasks: reading each standard file into `Example`s and scoring one prediction.

Formats: Self-RAG's eval files (popqa_longtail_w_gs, triviaqa_test_w_gs, arc_challenge_processed,
health_claims_processed, asqa_eval_gtr_top100), NQ-open, the llm-foundry ARC file, SciFact claims, and
any JSONL with `question` + `answers` (task `qa`). Prompts for arc_c and pubhealth are Self-RAG's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location, UsageError
from ragkit.eval import qa_metrics as qm
from ragkit.io.jsonl import display_name, read_jsonl, read_text

# Self-RAG retrieval_lm/utils.py TASK_INST, for the tasks ragkit formats the same way
ARC_INSTRUCTION = "Given four answer candidates, A, B, C and D, choose the best answer choice."
CLAIM_INSTRUCTION = "Is the following statement correct or not? Say true if it's correct; otherwise say false."
ASQA_INSTRUCTION = (
    "Answer the following question. The question may be ambiguous and have multiple correct answers, "
    "and in that case, you have to provide a long-form answer including all correct answers."
)


@dataclass
class Example:
    id: str
    question: str  # what the reader is asked (task instruction and choices included)
    golds: list[str]
    ctxs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific (choices, label, qa_pairs, ...)
    line: int = 0
    query: str = ""  # what the retriever searches with: the bare question or claim, without instructions
    fields: dict[str, Any] = field(default_factory=dict)  # the row's own scalar fields (pop, prop, ...): eval --stratify
    upstream_text: str | None = None  # the question as the Self-RAG reference scripts write it, where that differs

    def to_generation_row(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "retrieval_query": self.query or self.question,
                "ctxs": self.ctxs}


@dataclass(frozen=True)
class Task:
    name: str
    primary: str
    metrics: tuple[str, ...]
    load_row: Callable[[dict[str, Any], Location], Example]
    score: Callable[[Example, str], dict[str, float]]
    binary: tuple[str, ...] = ()  # metrics that are 0/1 per example (Wilson intervals)
    keep: Callable[[Example], bool] = lambda example: True  # rows outside the task's label space are skipped


def _id(obj: dict[str, Any], where: Location) -> str:
    value = obj.get("id", obj.get("_id", obj.get("question_id")))
    return str(value) if value is not None else str(where.line)


def _require(obj: dict[str, Any], key: str, where: Location, kind: type | tuple[type, ...] = str) -> Any:
    if key not in obj:
        raise InputError(Location(where.path, where.line, key), f"field '{key}' is missing")
    if not isinstance(obj[key], kind):
        raise InputError(Location(where.path, where.line, key), f"field '{key}' has the wrong type ({type(obj[key]).__name__})")
    return obj[key]


def _answers(obj: dict[str, Any], where: Location) -> list[str]:
    for key in ("answers", "answer", "golds", "output", "possible_answers"):
        if key in obj:
            value = obj[key]
            if isinstance(value, str):
                if key == "possible_answers" and value.startswith("["):
                    value = json.loads(value.replace("'", '"'))
                else:
                    value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError(Location(where.path, where.line, key), f"field '{key}' must be a string or a list of strings")
            return value
    raise InputError(Location(where.path, where.line, "answers"), "field 'answers' is missing")


def _question(obj: dict[str, Any], where: Location) -> str:
    for key in ("question", "instruction", "query", "claim"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key]
    raise InputError(Location(where.path, where.line, "question"), "field 'question' is missing")


def _ctxs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    raw = obj.get("ctxs", obj.get("docs", obj.get("top_contexts", []))) or []
    return [c for c in raw if isinstance(c, dict) and "text" in c]


# -- long-form biographies: FActScore (Self-RAG's factscore_unlabeled_alpaca_13b_retrieval.jsonl) ----------
def load_factscore(obj: dict[str, Any], where: Location) -> Example:
    """A row {input, topic, cat?, ctxs?}: `input` is the prompt ("Tell me a bio of X."), `topic` the entity
    FActScore checks the generation's atomic facts against. There is no gold text: the score is FActScore's."""
    prompt = _require(obj, "input", where) if "input" in obj else _question(obj, where)
    topic = _require(obj, "topic", where)
    return Example(_id(obj, where), prompt, [], _ctxs(obj), {"topic": topic, "cat": obj.get("cat"), "input": prompt},
                   line=where.line or 0, query=topic)


def score_factscore(example: Example, prediction: str) -> dict[str, float]:
    """Nothing locally: FActScore scores a whole file with its own model and knowledge source
    (ragkit.eval.factscore); a local number would be an invented one."""
    return {}


# -- open-domain QA ------------------------------------------------------------------------------
def load_qa(obj: dict[str, Any], where: Location) -> Example:
    return Example(_id(obj, where), _question(obj, where), _answers(obj, where), _ctxs(obj), line=where.line or 0)


def score_qa(example: Example, prediction: str) -> dict[str, float]:
    return {
        "match": qm.selfrag_match(prediction, example.golds),
        "match_norm": qm.normalized_match(prediction, example.golds),
        "em": qm.exact_match(prediction, example.golds),
        "f1": qm.token_f1(prediction, example.golds),
    }


# -- ARC-Challenge ---------------------------------------------------------------------------------
def load_arc(obj: dict[str, Any], where: Location) -> Example:
    if "query" in obj and "gold" in obj:  # llm-foundry layout: query "Question: ...", choices list, gold index
        question = str(obj["query"]).removeprefix("Question:").strip()
        texts = _require(obj, "choices", where, list)
        labels = list(qm.CHOICE_LABELS[: len(texts)])
        gold_index = _require(obj, "gold", where, int)
        if not 0 <= gold_index < len(texts):
            raise InputError(Location(where.path, where.line, "gold"), f"gold index {gold_index} out of range")
        answer_key = labels[gold_index]
    else:  # Self-RAG arc_challenge_processed: choices {text, label}, answerKey
        question = _require(obj, "question", where)
        choices = _require(obj, "choices", where, dict)
        texts, labels = list(choices.get("text", [])), [str(x) for x in choices.get("label", [])]
        if len(texts) != len(labels) or not texts:
            raise InputError(Location(where.path, where.line, "choices"), "choices need equal-length text and label lists")
        answer_key = str(_require(obj, "answerKey", where))
    by_letter = {qm.choice_letter(label): text for label, text in zip(labels, texts)}
    ordered = [by_letter.get(letter, "") for letter in "ABCD"] + ([by_letter["E"]] if "E" in by_letter else [])
    # run_short_form.py (line 231) maps only A-D and 1-4, so a fifth choice never reaches its prompt
    upstream = _arc_prompt(question, ordered[:4]) if len(ordered) > 4 else None
    return Example(_id(obj, where), _arc_prompt(question, ordered), [answer_key], _ctxs(obj),
                   {"choices": ordered, "answer_key": answer_key}, line=where.line or 0, query=question,
                   upstream_text=upstream)


def _arc_prompt(question: str, choices: list[str]) -> str:
    shown = "".join(f"\n{letter}: {text}" for letter, text in zip(qm.CHOICE_LABELS, choices))
    return f"{ARC_INSTRUCTION}\n\n### Input:\n{question}{shown}"


def score_arc(example: Example, prediction: str) -> dict[str, float]:
    return {
        "accuracy": qm.choice_accuracy(prediction, example.extra["answer_key"], example.extra["choices"]),
        "match": qm.selfrag_match(prediction, example.golds),  # Self-RAG's own (lenient) scoring
    }


# -- claim verification: PubHealth (Self-RAG format) and SciFact ----------------------------------
def load_pubhealth(obj: dict[str, Any], where: Location) -> Example:
    claim = _question(obj, where)
    golds = [qm.gold_claim_label(a) for a in _answers(obj, where)]
    if golds[0] not in ("true", "false"):
        raise InputError(Location(where.path, where.line, "answers"), f"expected SUPPORTS/REFUTES or true/false, got '{golds[0]}'")
    return Example(_id(obj, where), f"{CLAIM_INSTRUCTION}\n\n## Input:\n\n{claim}", golds, _ctxs(obj),
                   {"label": golds[0]}, line=where.line or 0, query=claim)


def load_scifact(obj: dict[str, Any], where: Location) -> Example:
    claim = _require(obj, "claim", where)
    evidence = _require(obj, "evidence", where, dict)
    labels = {e["label"] for sets in evidence.values() for e in sets}
    if not labels:
        label = "nei"
    elif len(labels) == 1:
        label = qm.gold_claim_label(labels.pop())
    else:
        label = "mixed"
    return Example(_id(obj, where), f"{CLAIM_INSTRUCTION}\n\n## Input:\n\n{claim}", [label], [],
                   {"label": label, "cited_doc_ids": [str(d) for d in obj.get("cited_doc_ids", [])],
                    "evidence_doc_ids": sorted(evidence)}, line=where.line or 0, query=claim)


def score_claim(example: Example, prediction: str) -> dict[str, float]:
    predicted = qm.claim_label(prediction)
    pred_for_match = "true" if "SUPPORTS" in prediction else "false" if "REFUTES" in prediction else prediction
    return {
        "accuracy": float(predicted == example.extra["label"]),
        "match": qm.selfrag_match(pred_for_match, example.golds),
        "answered": float(predicted is not None),
    }


# -- ASQA (ALCE format) ----------------------------------------------------------------------------
def load_asqa(obj: dict[str, Any], where: Location) -> Example:
    question = _require(obj, "question", where)
    pairs = _require(obj, "qa_pairs", where, list)
    groups = [[a for a in p.get("short_answers", []) if isinstance(a, str)] for p in pairs]
    longs = [a["long_answer"] for a in obj.get("annotations", []) if isinstance(a, dict) and a.get("long_answer")]
    if not longs and isinstance(obj.get("answer"), str):
        longs = [obj["answer"]]
    return Example(_id(obj, where) if "id" in obj or "sample_id" not in obj else str(obj["sample_id"]),
                   f"{ASQA_INSTRUCTION}\n\n## Input:\n\n{question}", longs, _ctxs(obj),
                   {"short_answers": groups}, line=where.line or 0, query=question)


def score_asqa(example: Example, prediction: str) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    rouge = max((scorer.score(ref, prediction)["rougeLsum"].fmeasure for ref in example.golds), default=0.0)
    return {"str_em": qm.str_em(prediction, example.extra["short_answers"]), "rougeLsum": rouge}


# -- free text: any JSONL with question + reference answers, scored with BLEU and ROUGE-L -------------
def score_text(example: Example, prediction: str) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in example.golds), default=0.0)
    bleu = sacrebleu.sentence_bleu(prediction, list(example.golds)).score / 100.0
    return {"rougeL": rouge, "bleu": bleu, "f1": qm.token_f1(prediction, example.golds)}


QA_METRICS = ("match", "match_norm", "em", "f1")
TASKS: dict[str, Task] = {
    "qa": Task("qa", "match", QA_METRICS, load_qa, score_qa, ("match", "match_norm", "em")),
    "popqa": Task("popqa", "match", QA_METRICS, load_qa, score_qa, ("match", "match_norm", "em")),
    "triviaqa": Task("triviaqa", "match", QA_METRICS, load_qa, score_qa, ("match", "match_norm", "em")),
    "nq": Task("nq", "em", QA_METRICS, load_qa, score_qa, ("match", "match_norm", "em")),
    "arc_c": Task("arc_c", "accuracy", ("accuracy", "match"), load_arc, score_arc, ("accuracy", "match")),
    "pubhealth": Task("pubhealth", "accuracy", ("accuracy", "match", "answered"), load_pubhealth, score_claim,
                      ("accuracy", "match", "answered")),
    # SciFact dev has SUPPORT / CONTRADICT / NOT ENOUGH INFO; the true/false prompt can only express the
    # first two, so NEI claims (and claims with mixed labels) are skipped and the report says how many remain.
    "scifact": Task("scifact", "accuracy", ("accuracy", "match", "answered"), load_scifact, score_claim,
                    ("accuracy", "match", "answered"), keep=lambda e: e.extra["label"] in ("true", "false")),
    # the Self-RAG scripts' name for the same claim task (run_short_form.py --task fever reads PubHealth)
    "fever": Task("fever", "accuracy", ("accuracy", "match", "answered"), load_pubhealth, score_claim,
                  ("accuracy", "match", "answered")),
    "factscore": Task("factscore", "factscore", (), load_factscore, score_factscore),
    "asqa": Task("asqa", "str_em", ("str_em", "rougeLsum"), load_asqa, score_asqa),
    "text": Task("text", "rougeL", ("rougeL", "bleu", "f1"), load_qa, score_text),
}
RETRIEVAL_TASKS = ("beir",)
LM_TASKS = ("lm",)  # held-out text under a RETRO model (ragkit.archs.retro.lm_eval)
ALL_TASKS = (*TASKS, *RETRIEVAL_TASKS, *LM_TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"--task {name}: unknown task", hint=f"Choose one of {', '.join(ALL_TASKS)}.")
    return TASKS[name]


def iter_examples(task: Task, path: str | Path) -> Iterator[Example]:
    name = display_name(path)
    if str(path).endswith(".json"):  # ALCE ships ASQA as one JSON list (or {"data": [...]})
        data = json.loads(read_text(path))
        rows = data["data"] if isinstance(data, dict) and "data" in data else data
        source: Iterator[tuple[int, dict[str, Any]]] = ((i, r) for i, r in enumerate(rows, start=1))
    else:
        source = read_jsonl(path)
    seen: dict[str, int] = {}
    for lineno, obj in source:
        example = task.load_row(obj, Location(name, lineno))
        example.fields = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool)) and k != "question"}
        if not task.keep(example):
            continue
        if example.id in seen:
            raise InputError(Location(name, lineno, "id"), f"duplicate id '{example.id}' (first on line {seen[example.id]})")
        seen[example.id] = lineno
        yield example


def load_examples(task: Task, path: str | Path, limit: int | None = None) -> list[Example]:
    out = []
    for example in iter_examples(task, path):
        out.append(example)
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(Location(display_name(path)), "empty input: no examples")
    return out
