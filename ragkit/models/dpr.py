"""DPR encoders (e.g. facebook/dpr-question_encoder-single-nq-base, dpr-ctx_encoder-*) as ragkit embedders.

A DPR checkpoint is a BERT whose [CLS] state, optionally projected, is the embedding. transformers opens it
as DPRQuestionEncoder / DPRContextEncoder, whose output sentence-transformers cannot pool, so ragkit converts
it once into a sentence-transformers folder (the same BERT weights, CLS pooling, the projection as a Dense
layer without activation), cached like the GGUF conversions, and checks on a probe text that the converted
model embeds exactly as DPR does. Embed, index, RAG training and serving then treat it as any embedder. DPR
vectors are compared by inner product unnormalised: build with --no-normalize. `to_dpr` goes back the other
way, for exporting a RAG checkpoint as transformers' RagSequenceForGeneration / RagTokenForGeneration.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError, UsageError
from ragkit.models.registry import ModelRef, conversion_dir, local_folder, materialize, model_config

ENCODER_ATTRS = {"DPRQuestionEncoder": "question_encoder", "DPRContextEncoder": "ctx_encoder"}
PROBE = "Who wrote the Origin of Species? Charles Darwin, 1859."


def dpr_class(ref: ModelRef) -> str | None:
    """DPRQuestionEncoder / DPRContextEncoder when `ref` is a DPR encoder checkpoint, else None."""
    config = model_config(ref)
    if config.get("model_type") != "dpr":
        return None
    names = config.get("architectures") or []
    kind = next((n for n in names if n in ENCODER_ATTRS), None)
    if kind is None:
        raise UsageError(f"{ref.name}: a DPR checkpoint of class {', '.join(names) or 'unknown'} is not an encoder",
                         hint="Use a DPRQuestionEncoder or DPRContextEncoder checkpoint (a DPRReader reads, it does not embed).")
    return kind




def embedder_location(ref: ModelRef) -> str:
    """What SentenceTransformer(...) opens for `ref`: the model itself, or its cached conversion when DPR."""
    location = materialize(ref)
    kind = dpr_class(ref)
    if kind is None:
        return location
    folder = local_folder(ref)
    target = conversion_dir(folder, "dpr")
    if not (target / "modules.json").exists():
        from ragkit.console import info

        info(f"converting the DPR encoder {ref.name} to a sentence-transformers folder once (cached in {target.parent})")
        to_sentence_transformer(folder, kind, target)
    return str(target)


def _modules() -> Any:
    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def _bert_config(dpr_config: Any) -> Any:
    from transformers import BertConfig

    fields = dpr_config.to_dict()
    for key in ("model_type", "architectures", "projection_dim", "transformers_version"):
        fields.pop(key, None)
    return BertConfig(**fields)


def to_sentence_transformer(folder: Path, kind: str, target: Path) -> None:
    """Write `folder`'s DPR encoder as a sentence-transformers model at `target` (atomically, checked)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertModel, DPRContextEncoder, DPRQuestionEncoder

    from ragkit.io.atomic import staged_dir

    cls = DPRQuestionEncoder if kind == "DPRQuestionEncoder" else DPRContextEncoder
    dpr = cls.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = getattr(dpr, ENCODER_ATTRS[kind])
    # with a pooler (zeros, never used: CLS pooling reads the last hidden state), since AutoModel builds
    # BertModel with one and would otherwise fill it randomly on every load, changing the fingerprint
    bert = BertModel(_bert_config(dpr.config), add_pooling_layer=True)
    missing, unexpected = bert.load_state_dict(encoder.bert_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ResourceError(f"{folder}: unexpected DPR weights ({', '.join([*unexpected, *missing][:4])})")
    with torch.no_grad():
        for p in bert.pooler.parameters():
            p.zero_()
    modules = _modules()
    with tempfile.TemporaryDirectory() as scratch:
        bert.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        max_len = min(int(tokenizer.model_max_length or 512), int(dpr.config.max_position_embeddings))
        layers = [modules.Transformer(scratch, max_seq_length=max_len)]
        layers.append(modules.Pooling(bert.config.hidden_size, pooling_mode="cls"))
        if getattr(encoder, "projection_dim", 0) > 0:
            proj = encoder.encode_proj
            layers.append(modules.Dense(proj.in_features, proj.out_features, bias=True,
                                        activation_function=torch.nn.Identity(),
                                        init_weight=proj.weight.detach().clone(), init_bias=proj.bias.detach().clone()))
        model = SentenceTransformer(modules=layers, device="cpu")
        with staged_dir(target) as tmp:
            model.save(str(tmp))
            _check_same(SentenceTransformer(str(tmp), device="cpu"), dpr, tokenizer, str(folder))


def _check_same(model: Any, dpr: Any, tokenizer: Any, name: str) -> None:
    """The converted model must embed the probe as DPR's own pooler_output does."""
    import numpy as np
    import torch

    with torch.no_grad():
        want = dpr(**tokenizer([PROBE], return_tensors="pt")).pooler_output[0].numpy()
    got = model.encode([PROBE], convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False)[0]
    if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise ResourceError(f"{name}: the converted encoder embeds differently from DPR "
                            f"(max difference {float(np.abs(got - want).max()):.2e})")


def to_dpr(model: Any, kind: str = "DPRQuestionEncoder") -> tuple[Any, Any]:
    """A sentence-transformers model that DPR can express (a BERT, CLS pooling, optionally a Dense layer
    without activation, no normalisation) as a DPR encoder and its tokenizer; anything else is refused."""
    import torch
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    layers = list(model)
    names = [type(m).__name__ for m in layers]
    transformer = layers[0]
    bert = getattr(transformer, "auto_model", None)
    if bert is None or type(bert).__name__ != "BertModel":
        raise UsageError(f"a DPR encoder is a BERT; this query encoder is {type(bert).__name__} ({', '.join(names)})")
    pooling = layers[1] if len(layers) > 1 else None
    mode = getattr(pooling, "pooling_mode", None)
    if type(pooling).__name__ != "Pooling" or (mode != "cls" and list(mode or ()) != ["cls"]):
        raise UsageError(f"a DPR encoder pools by CLS; this query encoder's modules are {', '.join(names)}",
                         hint="Train from a CLS-pooled encoder (--pooling cls, e.g. a DPR question encoder).")
    rest = layers[2:]
    dense = rest[0] if rest and type(rest[0]).__name__ == "Dense" else None
    if rest[1 if dense is not None else 0:] or (dense is not None and not isinstance(dense.activation_function, torch.nn.Identity)):
        raise UsageError(f"DPR cannot express this query encoder's modules ({', '.join(names)}): it has no "
                         "normalisation or activated projection")
    fields = {k: v for k, v in bert.config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    config = DPRConfig(**fields, projection_dim=dense.linear.out_features if dense is not None else 0)
    config.architectures = [kind]
    cls = DPRQuestionEncoder if kind == "DPRQuestionEncoder" else DPRContextEncoder
    dpr = cls(config).eval()
    encoder = getattr(dpr, ENCODER_ATTRS[kind])
    encoder.bert_model.load_state_dict({k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")},
                                       strict=True)  # DPR's BERT has no pooler
    if dense is not None:
        encoder.encode_proj.load_state_dict(dense.linear.state_dict())
    tokenizer = transformer.tokenizer
    _check_same(model, dpr, tokenizer, "the query encoder")
    return dpr, tokenizer
