"""The Self-RAG critic: its released task prompts, prediction restricted to each task's token group, and
the data-creation step that turns plain (instruction, output) pairs into generator training data.

The instruction strings are the released critic data format (data_creation/critic/gpt4_reward): a critic
trained on the released data (selfrag/self_rag_critic) only answers as published when asked in them.

Labelling works on whole outputs (one segment per example). The paper labels sentence by sentence, with
retrieval decided again for each sentence; docs/selfrag.md says where this differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkit.archs.selfrag.tokens import (
    CRITIC_PROMPT, FULLY, IRRELEVANT, ISREL_GROUP, ISSUP_GROUP, ISUSE_GROUP, NO_RETRIEVAL, NO_SUPPORT, PARTIALLY,
    RELEVANT, RETRIEVAL, evidence_block, reflection_ids,
)

RETRIEVAL_INSTRUCTION = (
    "When provided with instruction, please evaluate whether seeking additional information from external sources "
    "such as the web (e.g., Wikipedia) aids in producing a more comprehensive response. Respond with either "
    "[Retrieval] or [No Retrieval]."
)
RELEVANCE_INSTRUCTION = (
    "When given instruction and evidence, evaluate whether the evidence is relevant to the instruction and provides "
    "valuable information for generating meaningful responses.\n"
    "Use a rating of [Relevant] to indicate relevance and usefulness, and [Irrelevant] to indicate irrelevance."
)
GROUNDNESS_INSTRUCTION = (
    "You will receive an instruction, evidence, and output, and optional preceding sentences.  If the preceding "
    "sentence is given, the output should be the sentence that follows those preceding sentences. Your task is to "
    "evaluate if the output is fully supported by the information provided in the evidence, and provide explanations "
    "on your judgement\n"
    "Use the following entailment scale to generate a score:\n"
    "[Fully supported] - All information in output is supported by the evidence, or extractions from the evidence. "
    "This is only applicable when the output and part of the evidence are almost identical.\n"
    "[Partially supported] - The output is supported by the evidence to some extent, but there is major information "
    "in the output that is not discussed in the evidence. For example, if an instruction asks about two concepts and "
    "the evidence only discusses either of them, it should be considered a [Partially supported].\n"
    "[No support / Contradictory] - The output completely ignores evidence, is unrelated to the evidence, or "
    "contradicts the evidence. This can also happen if the evidence is irrelevant to the instruction.\n\n"
    "Make sure to not use any external information/knowledge to judge whether the output is true or not. Only check "
    "whether the output is supported by the evidence, and not whether the output follows the instructions or not.\n\n"
)
UTILITY_INSTRUCTION = (
    "Given an instruction and an output, rate whether the response appears to be a helpful and informative answer "
    "to the query, from 1 (lowest) - 5 (highest). We call this score perceived utility.\n"
    "[Utility:5]: The response provides a complete, highly detailed, and informative response to the query, fully "
    "satisfying the information needs.\n"
    "[Utility:4]: The response mostly fulfills the need in the query, while there can be some minor improvements "
    "such as discussing more detailed information, having better structure of the response, or improving coherence. \n"
    "[Utility:3]: The response is acceptable, but some major additions or improvements are needed to satisfy users' "
    "needs.\n"
    "[Utility:2]: The response still addresses the main request, but it is not complete or not relevant to the query.\n"
    "[Utility:1]: The response is barely on-topic or completely irrelevant.\n"
)

TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "retrieval": (RETRIEVAL_INSTRUCTION, (RETRIEVAL, NO_RETRIEVAL)),
    "relevance": (RELEVANCE_INSTRUCTION, ISREL_GROUP),
    "groundness": (GROUNDNESS_INSTRUCTION, ISSUP_GROUP),
    "utility": (UTILITY_INSTRUCTION, ISUSE_GROUP),
}


def evidence_text(passage: dict[str, Any]) -> str:
    title = str(passage.get("title") or "").strip()
    return f"{title}\n{passage['text']}" if title else str(passage["text"])


def critic_example(task: str, *, instruction: str, output: str = "", evidence: str = "") -> tuple[str, str]:
    """(instruction, input) of one critic task in the released format."""
    if task == "retrieval":
        return RETRIEVAL_INSTRUCTION, f"Task instruction: {instruction}"
    if task == "relevance":
        return RELEVANCE_INSTRUCTION, f"Task instruction: {instruction}\nEvidence: {evidence}"
    if task == "groundness":
        return GROUNDNESS_INSTRUCTION, f"Task instruction: {instruction}\nOutput: {output}\nEvidence: {evidence}"
    if task == "utility":
        return UTILITY_INSTRUCTION, f"Task instruction: {instruction}\nOutput: {output}"
    raise ValueError(f"unknown critic task {task!r}")


@dataclass
class Judgement:
    token: str
    probs: dict[str, float]  # the task's tokens, normalised over the group


class Critic:
    """A causal LM trained as the critic; each judgement is the most likely token of the task's group at the
    first response position (one batched forward pass, no free generation that could wander off-format)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, name: str = "the critic") -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.ids = reflection_ids(tokenizer, name)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = next(model.parameters()).device

    def judge(self, task: str, items: Sequence[tuple[str, str]]) -> list[Judgement]:
        import torch

        group = TASKS[task][1]
        group_ids = torch.tensor([self.ids.ids[t] for t in group], device=self.device)
        prompts = [CRITIC_PROMPT.format(instruction=i, input=x) for i, x in items]
        out: list[Judgement] = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits[:, -1, :]
            probs = torch.softmax(logits[:, group_ids].float(), dim=-1)
            for row in probs.tolist():
                best = max(range(len(group)), key=lambda k: row[k])
                out.append(Judgement(group[best], dict(zip(group, row))))
        return out


SUPPORT_RANK = {FULLY: 0, PARTIALLY: 1, NO_SUPPORT: 2}


def label_examples(critic: Critic, examples: Sequence[dict[str, Any]], passages: Any, ndocs: int) -> list[dict[str, Any]]:
    """Generator training rows with reflection tokens, from {instruction, input?, output} rows.

    passages(instructions, k) -> list of passage lists. For each example the critic decides retrieval; with
    retrieval, each of the top `ndocs` passages is judged for relevance and, if relevant, for support; the
    best one (relevant, then most supported, then retrieval rank) is written in front of the output.
    """
    queries = [(e["instruction"] + ("\n" + e["input"] if e.get("input") else "")) for e in examples]
    retrieve = critic.judge("retrieval", [critic_example("retrieval", instruction=q) for q in queries])
    utility = critic.judge("utility", [critic_example("utility", instruction=q, output=e["output"])
                                       for q, e in zip(queries, examples)])
    wanted = [i for i, j in enumerate(retrieve) if j.token == RETRIEVAL]
    found = passages([queries[i] for i in wanted], ndocs) if wanted else []
    evidence = {i: ps for i, ps in zip(wanted, found)}
    pairs = [(i, p) for i in wanted for p in evidence[i]]
    relevance = critic.judge("relevance", [critic_example("relevance", instruction=queries[i], evidence=evidence_text(p))
                                           for i, p in pairs])
    relevant = [(i, p) for (i, p), j in zip(pairs, relevance) if j.token == RELEVANT]
    support = critic.judge("groundness", [critic_example("groundness", instruction=queries[i],
                                                         output=examples[i]["output"], evidence=evidence_text(p))
                                          for i, p in relevant])
    support_of = {(i, id(p)): j.token for (i, p), j in zip(relevant, support)}
    rows = []
    for i, example in enumerate(examples):
        labels: dict[str, Any] = {"retrieval": retrieve[i].token, "utility": utility[i].token}
        if retrieve[i].token == NO_RETRIEVAL or not evidence.get(i):
            output = f"{NO_RETRIEVAL}{example['output']}{utility[i].token}"
        else:
            ranked = sorted(range(len(evidence[i])), key=lambda r: (
                (i, id(evidence[i][r])) not in support_of, SUPPORT_RANK.get(support_of.get((i, id(evidence[i][r])), ""), 3), r))
            chosen = evidence[i][ranked[0]]
            sup = support_of.get((i, id(chosen)))
            paragraph = evidence_block(chosen)  # exactly as the generator sees passages at inference
            if sup is None:
                output = f"{paragraph}{IRRELEVANT}{example['output']}{utility[i].token}"
            else:
                output = f"{paragraph}{RELEVANT}{example['output']}{sup}{utility[i].token}"
            labels.update(passage=chosen.get("id"), relevance=RELEVANT if sup else IRRELEVANT, support=sup)
        rows.append({**{k: v for k, v in example.items() if k != "output"}, "output": output, "critic": labels})
    return rows
