"""`ragkit eval --task lm`: loss, perplexity and bits per byte of held-out text, with retrieval on and off.

Held-out files are chunked with the model's tokenizer and their chunks' neighbours searched in the work
folder's index (ragkit.archs.retro.corpus.prepare_heldout). Sequences tile each document, so every token but the
document's first (the start token) is predicted exactly once. Bits per byte divide the summed negative
log-likelihood (in bits) by the UTF-8 bytes of the documents: comparable across tokenizers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ragkit.archs.retro.corpus import RetroCorpus, RetroSequences, collate, prepare_heldout
from ragkit.archs.retro.generate import LoadedRetro


@dataclass
class LmScores:
    nll: np.ndarray  # per document, nats
    tokens: np.ndarray  # predicted tokens per document
    bytes: np.ndarray  # UTF-8 bytes per document

    def summary(self) -> dict[str, float]:
        nll, tokens, size = float(self.nll.sum()), float(self.tokens.sum()), float(self.bytes.sum())
        loss = nll / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
                "bits_per_byte": nll / math.log(2) / size if size else float("nan"),
                "bits_per_token": loss / math.log(2) if tokens else float("nan")}

    def interval(self, metric: str, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
        """95% percentile bootstrap over documents of the corpus-level metric."""
        n = len(self.nll)
        if n < 2:
            value = self.summary()[metric]
            return (value, value)
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(resamples):
            pick = rng.integers(0, n, n)
            values.append(LmScores(self.nll[pick], self.tokens[pick], self.bytes[pick]).summary()[metric])
        low, high = np.percentile(values, [2.5, 97.5])
        return (float(low), float(high))


@torch.no_grad()
def score(model: Any, sequences: RetroSequences, corpus: RetroCorpus, *, batch_size: int = 8,
          retrieval: bool = True) -> LmScores:
    device = next(model.parameters()).device
    documents = corpus.documents()
    nll = np.zeros(len(documents))
    tokens = np.zeros(len(documents), dtype=np.int64)
    sizes = np.asarray([d["bytes"] for d in documents], dtype=np.float64)
    for start in range(0, len(sequences), batch_size):
        picked = range(start, min(start + batch_size, len(sequences)))
        fetched = [sequences.rows(i) for i in picked]
        batch = collate([sequences.item(tokens, rows) for tokens, rows in fetched])
        # each position's next token, the last one from the chunk's stored continuation (m + 1 tokens)
        targets = torch.as_tensor(np.stack([tokens[:, 1:].reshape(-1) for tokens, _ in fetched]))
        logits = model(batch["input_ids"].to(device),
                       retrieved=batch["retrieved"].to(device) if retrieval and "retrieved" in batch else None).logits
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1).to(device),
                                 reduction="none").reshape(targets.shape).cpu()
        valid = targets.ge(0)
        for row, i in enumerate(picked):
            doc = int(corpus.doc_ids[int(corpus.seq_starts[i])])
            nll[doc] += float(losses[row][valid[row]].sum())
            tokens[doc] += int(valid[row].sum())
    return LmScores(nll, tokens, sizes)


def evaluate(loaded: LoadedRetro, data: str, glob: str, *, batch_size: int = 8,
             workdir: str | None = None) -> dict[str, Any]:
    """Scores with the neighbours (when the model has CCA layers and a work folder) and without them."""
    cfg = loaded.model.config
    seq_len = int(loaded.info.get("seq_len", 8 * cfg.chunk_size))
    retriever = loaded.retriever
    with_retrieval = retriever is not None
    folder = workdir or loaded.info["workdir"]
    began = time.perf_counter()
    from ragkit.archs.retro.pipeline import end_of_document_id, tokenizer_fingerprint

    heldout = prepare_heldout(data, glob, folder, loaded.tokenizer, tokenizer_fingerprint(loaded.tokenizer),
                              chunk_size=cfg.chunk_size, seq_len=seq_len, retriever=retriever)
    prepared_s = time.perf_counter() - began
    results: dict[str, LmScores] = {}
    timings = {"prepare_s": prepared_s}
    for name, use in (("retrieval", True), ("no_retrieval", False)):
        if use and not with_retrieval:
            continue
        sequences = RetroSequences(heldout, loaded.corpus, seq_len=seq_len, pad_id=end_of_document_id(loaded.tokenizer),
                                   with_neighbours=use)
        began = time.perf_counter()
        results[name] = score(loaded.model, sequences, heldout, batch_size=batch_size, retrieval=use)
        timings[f"{name}_s"] = time.perf_counter() - began
    return {"results": results, "timings": timings, "heldout": heldout, "seq_len": seq_len}
