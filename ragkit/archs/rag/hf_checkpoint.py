"""transformers' RAG checkpoints in and out of ragkit: RagSequenceForGeneration / RagTokenForGeneration folders
(a DPR question encoder + a seq2seq generator, e.g. facebook/rag-sequence-nq) and their RagTokenizer.

In: the question encoder becomes a sentence-transformers query encoder (models/dpr.py, checked to embed as
DPR does), the generator a plain seq2seq folder with the generator tokenizer, and the RagConfig a
RagModelConfig (n_docs, the loss its class names, label smoothing, max_combined_length, and its prompt:
`title / text // question`, as RagRetriever.postprocess_docs builds it), written once as a ragkit RAG
checkpoint in the cache. generate, eval, serve and train then treat it as any ragkit checkpoint, retrieving
from a ragkit index: the generator reads the same context_input_ids and doc_scores that transformers takes
from a custom retriever, so neither HF's RagRetriever nor its datasets index is needed.
Out (`ragkit export`): a ragkit RAG checkpoint whose generator is seq2seq and whose query encoder DPR can
express is saved as the class its loss names, with both tokenizers, and checked to reload.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError, UsageError

CLASSES = {"RagSequenceForGeneration": "sequence", "RagTokenForGeneration": "token"}
HF_PROMPT = "hf-rag"
# what RagTokenForGeneration generates with from its own generation config (not its generator's)
GENERATION_SETTINGS = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")


def _rag_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def hf_rag_class(model: str | Path) -> str | None:
    """The RAG class a transformers RAG checkpoint (folder or hub id) was saved as, else None."""
    from ragkit.models.registry import model_config, resolve

    try:
        ref = resolve(str(model))
    except ResourceError:
        return None
    config = model_config(ref)
    if config.get("model_type") != "rag":
        return None
    names = config.get("architectures") or []
    found = next((n for n in names if n in CLASSES), None)
    if found is None:
        raise UsageError(f"{model}: a RAG checkpoint of class {', '.join(names) or 'unknown'}",
                         hint=f"ragkit reads {' and '.join(CLASSES)} checkpoints.")
    return found


def import_hf_rag(model: str | Path) -> Path:
    """The ragkit RAG checkpoint (rag_config.json, query_encoder/, generator/) made from `model`, converted
    once and cached; its index is not part of it (give --index)."""
    from ragkit.models.registry import conversion_dir, local_folder, resolve

    kind = hf_rag_class(model)
    if kind is None:
        raise ResourceError(f"{model}: not a transformers RAG checkpoint (config.json model_type 'rag')")
    folder = local_folder(resolve(str(model)))
    target = conversion_dir(folder, "hf-rag")
    if not (target / "rag_config.json").exists():
        from ragkit.console import info

        info(f"converting the RAG checkpoint {model} to ragkit's layout once (cached in {target.parent})")
        _convert(folder, kind, target)
    return target


def _tokenizer(folder: Path, part: str) -> Any:
    from transformers import AutoTokenizer

    sub = folder / f"{part}_tokenizer"  # RagTokenizer.save_pretrained's layout
    if not sub.is_dir():
        raise ResourceError(f"{folder}: no {sub.name}/ (RagTokenizer.save_pretrained writes it beside the model)",
                            hint="Save the RagTokenizer into the checkpoint folder.")
    return AutoTokenizer.from_pretrained(sub)


def _convert(folder: Path, kind: str, target: Path) -> None:
    from ragkit.archs.rag.model import RagModelConfig
    from ragkit.io.atomic import staged_dir, write_json
    from ragkit.models.dpr import to_sentence_transformer

    rag = _rag_class(kind).from_pretrained(folder)
    question_encoder, generator = rag.rag.question_encoder, rag.rag.generator
    if type(question_encoder).__name__ != "DPRQuestionEncoder":
        raise UsageError(f"{folder}: its question encoder is a {type(question_encoder).__name__}; ragkit reads DPR ones")
    if not getattr(generator.config, "is_encoder_decoder", False):
        raise UsageError(f"{folder}: its generator {type(generator).__name__} is not a seq2seq model")
    # RagTokenForGeneration generates with the RAG model's generation settings, not the generator's own (e.g.
    # rag-token-nq's BART forces <s> alone, not inside RAG); ragkit decodes with the generator's, so they are
    # copied. RagSequenceForGeneration runs the generator's own generate, with its own settings.
    settings = getattr(rag, "generation_config", None)
    for name in GENERATION_SETTINGS if settings else ():
        value = getattr(settings, name, None)
        if value is not None or name != "decoder_start_token_id":
            setattr(generator.generation_config, name, value)
    config = rag.config
    with staged_dir(target) as tmp:
        with tempfile.TemporaryDirectory() as scratch:
            question_encoder.save_pretrained(scratch)
            _tokenizer(folder, "question_encoder").save_pretrained(scratch)
            to_sentence_transformer(Path(scratch), "DPRQuestionEncoder", tmp / "query_encoder")
        generator.save_pretrained(tmp / "generator")
        _tokenizer(folder, "generator").save_pretrained(tmp / "generator")
        fields = RagModelConfig(
            generator=str(target / "generator"), query_encoder=str(target / "query_encoder"), index="",
            n_docs=int(config.n_docs), loss=CLASSES[kind], label_smoothing=float(config.label_smoothing or 0.0),
            max_source_tokens=int(config.max_combined_length), prompt=HF_PROMPT, title_sep=config.title_sep,
            doc_sep=config.doc_sep, extra={"imported_from": str(folder)})
        write_json(tmp / "rag_config.json", dataclasses.asdict(fields))


def export_hf_rag(checkpoint: Path, output: Path) -> str:
    """Save a ragkit RAG checkpoint as transformers' RAG class for its loss (RagTokenizer beside it); returns
    the class name. The folder appears complete or not at all."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, RagConfig

    from ragkit.archs.rag.model import RagModelConfig
    from ragkit.io.atomic import staged_dir
    from ragkit.models.dpr import to_dpr
    from ragkit.models.lm import refuse_used_folder

    refuse_used_folder(output)
    config = RagModelConfig(**json.loads((checkpoint / "rag_config.json").read_text()))
    if config.prompt != HF_PROMPT:
        raise UsageError(f"{checkpoint} was trained on ragkit's prompt; transformers' RAG builds its generator's "
                         "input as 'title / text // question'", hint="Train with --rag-prompt hf-rag to export it.")
    generator_dir = checkpoint / "generator"
    if (generator_dir / "adapter_config.json").exists():
        raise UsageError(f"{checkpoint}: its generator is a LoRA adapter; transformers' RAG needs full weights",
                         hint="Train without --lora to export as a transformers RAG model.")
    try:
        generator = AutoModelForSeq2SeqLM.from_pretrained(generator_dir)
    except ValueError as exc:
        raise UsageError(f"{checkpoint}: transformers' RAG needs a seq2seq generator (BART, T5); this one is not "
                         f"({str(exc).splitlines()[0]})") from None
    tokenizer = AutoTokenizer.from_pretrained(generator_dir)
    question_encoder, question_tokenizer = to_dpr(SentenceTransformer(str(checkpoint / "query_encoder"), device="cpu"))
    kind = "RagTokenForGeneration" if config.loss == "token" else "RagSequenceForGeneration"
    cls = _rag_class(kind)
    rag_config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=config.n_docs, max_combined_length=config.max_source_tokens,
        label_smoothing=config.label_smoothing, title_sep=config.title_sep, doc_sep=config.doc_sep)
    rag_config.architectures = [kind]
    rag = cls(config=rag_config, question_encoder=question_encoder, generator=generator)
    for name in GENERATION_SETTINGS if config.loss == "token" else ():
        setattr(rag.generation_config, name, getattr(generator.generation_config, name, None))  # as ragkit decoded
    with staged_dir(output) as tmp:
        rag.save_pretrained(tmp)
        question_tokenizer.save_pretrained(tmp / "question_encoder_tokenizer")
        tokenizer.save_pretrained(tmp / "generator_tokenizer")
        cls.from_pretrained(tmp)  # reads back before it is published
    return kind
