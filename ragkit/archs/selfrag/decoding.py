"""Self-RAG inference over a transformers model: adaptive retrieval, short-form passage scoring, and
long-form segment-level beam search (Asai et al. 2023; the reference run_short_form / run_long_form_static).

Batched where the reference loops: the retrieval decisions of a block of questions take one forward pass,
and every (question, passage) continuation of the block is generated in shared left-padded batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkit.errors import InputError, Location, UsageError
from ragkit.io.passages import passage_json as _passage_json
from ragkit.archs.selfrag.scoring import (
    ScoringConfig,
    StepOutput,
    aggregate,
    continue_retrieving,
    decide_retrieval,
    score_candidate,
)
from ragkit.archs.selfrag.tokens import (
    NO_RETRIEVAL,
    RETRIEVAL,
    clean_answer,
    evidence_block,
    generator_prompt,
    reflection_ids,
)
from ragkit.archs.selfrag import upstream as reference

MODES = ("adaptive_retrieval", "always_retrieve", "no_retrieval")


@dataclass(frozen=True)
class SelfRagConfig:
    mode: str = "adaptive_retrieval"
    threshold: float | None = 0.2  # None: retrieve iff the model writes [Retrieval]
    ndocs: int = 10
    max_new_tokens: int = 100
    batch_size: int = 8
    closed: bool = False  # arc_c / pubhealth: sum scores per distinct answer
    long_form: bool = False
    beam_width: int = 2
    max_depth: int = 6
    ignore_cont: bool = False  # long form: drop segments judged [No support / Contradictory]
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: expected one of {', '.join(MODES)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0 and not self.scoring.compat_upstream:
            raise UsageError(f"--threshold {self.threshold}: expected a probability in [0, 1]")
        if self.ndocs < 1 or self.beam_width < 1 or self.max_depth < 2:
            raise UsageError("--k/--ndocs and --beam-width must be >= 1, --max-depth >= 2")
        self.scoring.weights(long_form=self.long_form)  # refuses what the reference long form would ignore


@dataclass
class SelfRagQuestion:
    id: str
    instruction: str
    passages: Callable[[], list[dict[str, Any]]]  # fetched only if the model decides to retrieve
    extra: dict[str, Any] = field(default_factory=dict)


class SelfRagDecoder:
    """Greedy Self-RAG decoding with a causal LM that has the reflection vocabulary."""

    def __init__(self, model: Any, tokenizer: Any, config: SelfRagConfig, *, name: str = "the model") -> None:
        config.validate()
        if getattr(model.config, "is_encoder_decoder", False):
            raise UsageError("--arch selfrag needs a causal (decoder-only) model")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.ids = reflection_ids(tokenizer, name)
        self.tracked = sorted(set(self.ids.all_ids))
        self.device = next(model.parameters()).device
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.calls = 0  # generation batches run (for tests and benchmarks)

    # -- one batched greedy generation, keeping what scoring needs ---------------------------------
    def step(self, prompts: Sequence[str], max_new_tokens: int, *, stop_at_retrieval: bool = False) -> list[StepOutput]:
        import torch

        outputs: list[StepOutput | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        eos = self.tokenizer.eos_token_id
        stop_ids = [eos] + ([self.ids.ids[RETRIEVAL]] if stop_at_retrieval else [])
        tracked = torch.tensor(self.tracked, device=self.device)
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            enc = self.tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True).to(self.device)
            self.calls += 1
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=stop_ids,
                )
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            logprobs = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in out.logits], dim=1)  # B, T, V
            chosen = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # B, T
            reflection = logprobs[:, :, tracked]  # B, T, R
            for b, i in enumerate(rows):
                ids = new[b].tolist()
                end = next((t + 1 for t, tok in enumerate(ids) if tok in stop_ids), len(ids))
                ids = ids[:end]
                text_ids = ids[:-1] if ids and ids[-1] == eos else ids
                outputs[i] = StepOutput(
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=False),
                    token_ids=ids,
                    logprobs=[dict(zip(self.tracked, reflection[b, t].tolist())) for t in range(end)],
                    cumulative_logprob=float(chosen[b, :end].sum()),
                    plain_text=self._plain(enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist(), ids),
                )
        return [o for o in outputs if o is not None]

    def _plain(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The reference's view of a continuation (compat_upstream only; empty otherwise)."""
        if not self.config.scoring.compat_upstream:
            return ""
        return reference.vllm_plain_text(self.tokenizer, prompt_ids, new_ids)

    def prompt(self, question: SelfRagQuestion) -> str:
        return generator_prompt(question.instruction)

    # -- short form (run_short_form) --------------------------------------------------------------
    def decide(self, prompts: list[str]) -> list[tuple[bool, float | None]]:
        cfg = self.config
        if cfg.mode == "always_retrieve":
            return [(True, None)] * len(prompts)
        if cfg.mode == "no_retrieval":
            return [(False, None)] * len(prompts)
        # only the first position matters when a threshold is set; the text is needed without one
        steps = self.step(prompts, 1 if cfg.threshold is not None else cfg.max_new_tokens)
        return [decide_retrieval(s.logprobs[0] if s.logprobs else {}, s.text, self.ids, cfg.threshold,
                                 compat_upstream=cfg.scoring.compat_upstream) for s in steps]

    def short_form(self, questions: Sequence[SelfRagQuestion]) -> list[dict[str, Any]]:
        cfg = self.config
        began = time.perf_counter()
        prompts = [self.prompt(q) for q in questions]
        decisions = self.decide(prompts)
        jobs: list[tuple[int, int, str]] = []  # (question, passage index, prompt)
        passages: list[list[dict[str, Any]]] = [[] for _ in questions]
        for qi, (q, (retrieve, _)) in enumerate(zip(questions, decisions)):
            if retrieve:
                passages[qi] = _checked_passages(q, q.passages()[: cfg.ndocs])
                jobs += [(qi, pi, prompts[qi] + evidence_block(p)) for pi, p in enumerate(passages[qi])]
            else:
                jobs.append((qi, -1, prompts[qi] + NO_RETRIEVAL))
        steps = self.step([j[2] for j in jobs], cfg.max_new_tokens)
        per_question: list[list[tuple[int, StepOutput]]] = [[] for _ in questions]
        for (qi, pi, _), s in zip(jobs, steps):
            per_question[qi].append((pi, s))
        seconds = (time.perf_counter() - began) / max(1, len(questions))
        rows = []
        for qi, q in enumerate(questions):
            retrieve, prob = decisions[qi]
            candidates = [self._candidate(pi, s, retrieve) for pi, s in per_question[qi]]
            best = self._choose(candidates, per_question[qi]) if retrieve else 0
            rows.append({
                "id": q.id, "question": q.instruction, "output": candidates[best]["answer"],
                "raw_output": candidates[best]["raw"], "retrieved": retrieve, "retrieve_prob": prob,
                "passages": [_passage_json(p) for p in passages[qi]], "candidates": candidates,
                "timings": {"generate_s": seconds}, **q.extra,
            })
        return rows

    def _candidate(self, passage: int, s: StepOutput, retrieved: bool) -> dict[str, Any]:
        cfg = self.config
        if cfg.scoring.compat_upstream:
            answer = reference.candidate_answer(s.plain_text, retrieved=retrieved, closed=cfg.closed)
        else:
            answer = clean_answer(s.text)
        cand: dict[str, Any] = {"passage": passage if passage >= 0 else None, "raw": s.text, "answer": answer}
        if passage >= 0:
            cand["scores"] = score_candidate(s, self.ids, cfg.scoring).to_json()
        return cand

    def _choose(self, candidates: list[dict[str, Any]], steps: list[tuple[int, StepOutput]]) -> int:
        scores = [c["scores"]["final"] for c in candidates]
        if self.config.scoring.compat_upstream:  # grouped on the reference's post-processing, not ragkit's
            return reference.choose([s.plain_text for _, s in steps], scores, closed=self.config.closed)
        return aggregate([c["answer"] for c in candidates], scores, closed=self.config.closed)

    # -- long form (run_long_form_static): segment-level beam search ------------------------------
    def _segment(self, s: StepOutput) -> str:
        """A continuation's text, with [No Retrieval] rewritten where retrieval should continue, cut at the
        next [Retrieval] (everything after belongs to the next segment)."""
        text = s.text
        if NO_RETRIEVAL in text and self.config.threshold is not None:
            positions = [t for t, tok in enumerate(s.token_ids) if tok == self.ids.ids[NO_RETRIEVAL]]
            pieces = text.split(NO_RETRIEVAL)
            rebuilt = ""
            for n, piece in enumerate(pieces[:-1]):
                retrieve = n < len(positions) and continue_retrieving(s.logprobs[positions[n]], self.ids,
                                                                      self.config.threshold)
                rebuilt += piece + (RETRIEVAL if retrieve else NO_RETRIEVAL)
            text = rebuilt + pieces[-1]
        return text

    def long_form(self, question: SelfRagQuestion) -> dict[str, Any]:
        cfg = self.config
        upstream = cfg.scoring.compat_upstream
        began = time.perf_counter()
        prompt = self.prompt(question)
        retrieve, prob = True, None
        if cfg.mode == "no_retrieval":
            retrieve = False
        elif cfg.mode == "adaptive_retrieval":
            if upstream:
                # the reference retrieves when the first 25 greedy tokens do NOT contain [Retrieval]
                first = self.step([prompt], 25)[0]
                head = first.text.split("\n\n")[0]
                if RETRIEVAL not in head:
                    retrieve = True
                elif cfg.threshold is None:
                    retrieve = False
                else:
                    retrieve, prob = decide_retrieval(first.logprobs[0], head, self.ids, cfg.threshold)
            else:
                retrieve, prob = self.decide([prompt])[0]
        if not retrieve:
            s = self.step([prompt + NO_RETRIEVAL], cfg.max_new_tokens)[0]
            text = s.text.split("\n\n")[0]
            return {"id": question.id, "question": question.instruction, "output": clean_answer(text, upstream=upstream),
                    "raw_output": text, "retrieved": False, "retrieve_prob": prob, "segments": [], "passages": [],
                    "timings": {"generate_s": time.perf_counter() - began}, **question.extra}
        ctxs = _checked_passages(question, question.passages()[: cfg.ndocs])
        # node: prompt, pred, processed, score, ctx, parent
        tree: list[dict[str, Any]] = [{"prompt": prompt, "pred": RETRIEVAL, "processed": "", "score": None,
                                       "ctx": None, "parent": None}]
        levels: list[list[int]] = [[0]]
        for _depth in range(1, cfg.max_depth):
            expand = [n for n in levels[-1] if RETRIEVAL in tree[n]["pred"]]
            if not expand or any(tree[n]["pred"] == "" for n in levels[-1]):
                break
            bases = [tree[n]["prompt"] + tree[n]["processed"] for n in expand]
            steps = self.step([b + evidence_block(c) for b in bases for c in ctxs], cfg.max_new_tokens,
                              stop_at_retrieval=not upstream)
            children = []
            for k, s in enumerate(steps):
                parent = expand[k // len(ctxs)]
                pred = self._segment(s)
                score = score_candidate(s, self.ids, cfg.scoring, long_form=True).final
                parent_score = tree[parent]["score"]
                tree.append({"prompt": bases[k // len(ctxs)], "pred": pred,
                             "processed": pred[: pred.index(RETRIEVAL)] if RETRIEVAL in pred else pred,
                             "score": score * parent_score if parent_score is not None else score,
                             "ctx": k % len(ctxs), "parent": parent})
                children.append(len(tree) - 1)
            children.sort(key=lambda n: -tree[n]["score"])
            levels.append(children[: cfg.beam_width])
        path, node = [], levels[-1][0] if len(levels) > 1 else None
        while node is not None and node != 0:
            path.append(node)
            node = tree[node]["parent"]
        path.reverse()
        segments = [{"text": tree[n]["processed"], "passage": tree[n]["ctx"], "score": tree[n]["score"]} for n in path
                    if not (cfg.ignore_cont and "[No support / Contradictory]" in tree[n]["processed"])]
        raw = " ".join(s["text"] for s in segments)
        return {"id": question.id, "question": question.instruction,
                "output": " ".join(clean_answer(s["text"], upstream=upstream) for s in segments).strip(),
                "raw_output": raw, "retrieved": True, "retrieve_prob": prob, "segments": segments,
                "passages": [_passage_json(p) for p in ctxs], "timings": {"generate_s": time.perf_counter() - began},
                **question.extra}

    def answer(self, questions: Sequence[SelfRagQuestion]) -> list[dict[str, Any]]:
        if self.config.long_form:
            return [self.long_form(q) for q in questions]
        return self.short_form(questions)


def _checked_passages(question: SelfRagQuestion, passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not passages:
        raise InputError(Location("<input>", None, "ctxs"),
                         f"question '{question.id}' needs passages to retrieve but has none",
                         hint="Give rows with ctxs, or --index DIR, or --mode no_retrieval.")
    for p in passages:
        if not isinstance(p.get("text"), str) or not p["text"].strip():
            raise InputError(Location("<input>", None, "ctxs"), f"question '{question.id}': a passage has no text")
    return passages





class VLLMSelfRagDecoder(SelfRagDecoder):
    """The same decoding with vLLM generating (GPU serving throughput): each continuation comes back with the
    top `logprobs` log-probabilities per position, as the reference scripts request them."""

    def __init__(self, llm: Any, config: SelfRagConfig, *, name: str = "the model", logprobs: int = 5000,
                 device: str = "cuda") -> None:
        config.validate()
        self.llm, self.config, self.logprobs = llm, config, logprobs
        self.tokenizer = llm.get_tokenizer()
        self.ids = reflection_ids(self.tokenizer, name)
        self.tracked = sorted(set(self.ids.all_ids))
        self.device = device
        self.calls = 0

    def step(self, prompts: Sequence[str], max_new_tokens: int, *, stop_at_retrieval: bool = False) -> list[StepOutput]:
        from vllm import SamplingParams

        stop_ids = [self.ids.ids[RETRIEVAL]] if stop_at_retrieval else []
        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, logprobs=self.logprobs,
                                skip_special_tokens=False, stop_token_ids=stop_ids or None)
        self.calls += 1
        outputs = []
        for r in self.llm.generate(list(prompts), params, use_tqdm=False):
            step = vllm_step_output(r.outputs[0], self.tokenizer.eos_token, tokenizer=self.tokenizer)
            step.plain_text = self._plain(list(r.prompt_token_ids or []), step.token_ids)
            outputs.append(step)
        return outputs


def vllm_step_output(completion: Any, eos_token: str | None, *, tokenizer: Any = None) -> StepOutput:
    """A vLLM CompletionOutput as a StepOutput: per position {token id: log-prob} (Logprob objects or floats).

    With the tokenizer, the text is decoded from the token ids exactly as the transformers decoder does (ids up
    to the end-of-sequence token, reflection tokens kept): vLLM's incremental detokenisation writes the text
    as it continues the prompt (a word-level tokenizer's first word gains a space), so segments would differ
    between backends by more than the model's choice."""
    positions = []
    for entry in completion.logprobs or []:
        positions.append({int(t): float(getattr(v, "logprob", v)) for t, v in entry.items()})
    if tokenizer is not None:
        ids = list(completion.token_ids)
        if ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
    else:
        text = completion.text
        if eos_token and text.endswith(eos_token):
            text = text[: -len(eos_token)]
    return StepOutput(text=text, token_ids=list(completion.token_ids), logprobs=positions,
                      cumulative_logprob=float(completion.cumulative_logprob or 0.0))
