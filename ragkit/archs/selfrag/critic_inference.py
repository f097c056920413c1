"""The Self-RAG critic's inference entry: each row (a question / instruction, with `output` and passages
where the task needs them) judged for one critic task, the answer being the most likely reflection token of
that task's group and the group's probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ragkit.errors import UsageError
from ragkit.io.queries import Question


@dataclass
class CriticOptions:
    what: ClassVar[str] = "--arch selfrag-critic, which judges each row for --critic-task"

    critic_task: str = "retrieval"  # retrieval, relevance, groundness or utility
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    trust_remote_code: bool = False

    def check(self) -> None:
        from ragkit.archs.selfrag.critic import TASKS
        from ragkit.models.lm import check_loading

        if self.critic_task not in TASKS:
            raise UsageError(f"--critic-task {self.critic_task}: expected one of {', '.join(TASKS)}")
        check_loading(dtype=self.dtype, quantize=self.quantize)


class CriticAnswerer:
    def __init__(self, critic: Any, options: CriticOptions) -> None:
        self.critic, self.options = critic, options
        self.device = critic.device

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from ragkit.archs.selfrag.critic import critic_example, evidence_text
        from ragkit.errors import InputError, Location

        task = self.options.critic_task
        items = []
        for q in questions:
            evidence = evidence_text(q.ctxs[0]) if q.ctxs else ""
            if task in ("relevance", "groundness") and not evidence:
                raise InputError(Location("<input>", None, "ctxs"), f"row '{q.id}': --critic-task {task} judges a "
                                 "passage; give ctxs (or hits)")
            output = q.extra.get("output", "")
            if task in ("groundness", "utility") and not (isinstance(output, str) and output.strip()):
                raise InputError(Location("<input>", None, "output"), f"row '{q.id}': --critic-task {task} judges "
                                 "an answer; give its output")
            items.append(critic_example(task, instruction=q.text, output=output, evidence=evidence))
        judged = self.critic.judge(task, items)
        return [{"id": q.id, "question": q.text, "task": task, "output": j.token, "probs": j.probs,
                 **({"response": q.extra["output"]} if "output" in q.extra else {}),
                 **{k: v for k, v in q.extra.items() if k != "output"}} for q, j in zip(questions, judged)]


def load(model: str, options: CriticOptions) -> CriticAnswerer:
    from ragkit.archs.selfrag.critic import Critic
    from ragkit.archs.selfrag.loading import load_causal_lm

    lm, tokenizer = load_causal_lm(model, device=options.device, dtype=options.dtype, merge_lora=True,
                                   quantize=options.quantize, trust_remote_code=options.trust_remote_code)
    return CriticAnswerer(Critic(lm, tokenizer, batch_size=options.batch_size, name=model), options)
