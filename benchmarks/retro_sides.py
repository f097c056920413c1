"""One phase of one RETRO implementation, in its own process (so that its peak memory is its own); prints
one JSON line. Run by benchmarks/retro_vs_retro_pytorch.py: ragkit in the project's environment,
retro-pytorch in benchmarks/.envs/retro-pytorch (installed from PyPI).

    python benchmarks/retro_sides.py --impl ragkit|retro-pytorch --phase precompute|train|generate \\
        --data DIR --work DIR --bert MINILM_DIR [--steps N] [--new-tokens N]

Both sides use the same tokenizer and embedding model (all-MiniLM-L6-v2, a BERT: RETRO-pytorch's
pipeline hard-codes a BERT through torch.hub, which this offline machine cannot reach, so its two
loaders are pointed at the local MiniLM and its embedding width set to 384), chunk size, sequence length,
neighbours, model sizes, batch and optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

CHUNK, SEQ, K, EXTRA = 64, 512, 2, 100
DIM, DEC_DEPTH, ENC_DEPTH, HEADS, DIM_HEAD = 384, 6, 2, 6, 64
CCA_1_INDEXED = (3, 6)  # RETRO-pytorch numbers decoder layers from 1; ragkit from 0
BATCH, LR, SEED = 4, 3e-4, 0
VOCAB = 30522  # MiniLM's (uncased BERT) vocabulary


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- ragkit --------------------------------------------------------------------------------------
def ragkit_model():
    import torch

    from ragkit.archs.retro.model import RetroConfig, RetroModel

    torch.manual_seed(SEED)
    return RetroModel(RetroConfig(vocab_size=VOCAB, dim=DIM, dec_depth=DEC_DEPTH, enc_depth=ENC_DEPTH, heads=HEADS,
                                  dim_head=DIM_HEAD, chunk_size=CHUNK, num_neighbors=K,
                                  cross_attn_layers=[i - 1 for i in CCA_1_INDEXED], pad_token_id=None))


def ragkit_data_config(a):
    from ragkit.archs.retro.pipeline import RetroDataConfig

    return RetroDataConfig(data=a.data, workdir=str(a.work), tokenizer=a.bert, embedder=a.bert, index_spec="flat",
                           chunk_size=CHUNK, seq_len=SEQ, num_neighbors=K, extra_neighbors=EXTRA, device="cpu",
                           embed_batch_size=16)


def ragkit_phase(a) -> dict:
    import numpy as np
    import torch

    from ragkit.archs.retro.corpus import RetroSequences, collate, prepare

    if a.phase == "precompute":
        began = time.perf_counter()
        prepared = prepare(ragkit_data_config(a))
        return {"seconds": time.perf_counter() - began, "chunks": len(prepared.corpus)}
    prepared = prepare(ragkit_data_config(a))  # all stages current: only opens them
    model = ragkit_model()
    if a.phase == "train":
        ds = RetroSequences(prepared.corpus, prepared.corpus, seq_len=SEQ, pad_id=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=collate, drop_last=True,
                                             generator=torch.Generator().manual_seed(SEED))
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        return train_loop(model, loader, optimizer, a.steps,
                          lambda b: model(b["input_ids"], retrieved=b["retrieved"], labels=b["labels"]).loss)
    from ragkit.archs.retro.generate import ChunkRetriever, SamplingConfig, sample
    from ragkit.index import Index

    model.eval()
    retriever = ChunkRetriever(prepared.corpus, Index.open(prepared.index_dir), prepared.encoder, prepared.tokenizer, K)
    prompt = [int(t) for t in np.asarray(prepared.corpus.chunks[0, :CHUNK])]
    config = SamplingConfig(max_new_tokens=a.new_tokens, temperature=1.0, top_k=int(0.1 * VOCAB), seed=SEED,
                            stop_at_eos=False)
    sample(model, prompt, SamplingConfig(max_new_tokens=4, temperature=1.0), retriever)  # warm-up
    began = time.perf_counter()
    out = sample(model, prompt, config, retriever)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "new_tokens": len(out.tokens[0]), "tokens_per_s": len(out.tokens[0]) / seconds,
            "retrievals": len(out.retrieved)}


def train_loop(model, loader, optimizer, steps: int, loss_of) -> dict:
    """Two warm-up steps, then `steps` timed ones: forward, backward, clip, AdamW."""
    import torch

    model.train()
    batches = iter(loader)
    losses, timed = [], 0.0
    for step in range(steps + 2):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        began = time.perf_counter()
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= 2:
            timed += time.perf_counter() - began
            losses.append(float(loss))
    tokens = steps * BATCH * SEQ
    return {"seconds": timed, "steps": steps, "tokens_per_s": tokens / timed, "first_loss": losses[0],
            "last_loss": losses[-1], "params": sum(p.numel() for p in model.parameters())}


# -- retro-pytorch -------------------------------------------------------------------------------
def retro_pytorch_wrapper(a):
    import torch
    from transformers import AutoModel, AutoTokenizer

    import retro_pytorch.retrieval as R
    from retro_pytorch import RETRO, TrainingWrapper

    tokenizer = AutoTokenizer.from_pretrained(a.bert)
    bert = AutoModel.from_pretrained(a.bert).eval()
    class Tokenizer:  # transformers 5 dropped batch_encode_plus, which retro-pytorch calls; same semantics
        def batch_encode_plus(self, texts, **kwargs):
            return tokenizer(texts, **kwargs)

    R.get_tokenizer = Tokenizer  # instead of torch.hub's bert-base-cased (no network here)
    R.get_bert = lambda: bert
    R.chunks_to_index_and_embed.__kwdefaults__["embed_dim"] = bert.config.hidden_size  # 384, not BERT's 768
    torch.manual_seed(SEED)
    retro = RETRO(num_tokens=VOCAB, max_seq_len=SEQ, enc_dim=DIM, enc_depth=ENC_DEPTH, dec_dim=DIM,
                  dec_depth=DEC_DEPTH, dec_cross_attn_layers=CCA_1_INDEXED, heads=HEADS, dim_head=DIM_HEAD,
                  chunk_size=CHUNK)
    began = time.perf_counter()
    with torch.no_grad():
        wrapper = TrainingWrapper(retro=retro, knn=K, chunk_size=CHUNK, documents_path=a.data, glob="**/*.txt",
                                  chunks_memmap_path="./train.chunks.dat", seqs_memmap_path="./train.seq.dat",
                                  doc_ids_memmap_path="./train.doc_ids.dat", max_chunks=200_000, max_seqs=20_000,
                                  knn_extra_neighbors=EXTRA, max_index_memory_usage="100m",
                                  current_memory_available="1G")
    return wrapper, time.perf_counter() - began


def retro_pytorch_phase(a) -> dict:
    import contextlib
    import io

    import torch

    a.work.mkdir(parents=True, exist_ok=True)
    os.chdir(a.work)  # it writes ./train.*.dat, ./.tmp/ and ./processed-stats.json into the working directory
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per batch
        wrapper, seconds = retro_pytorch_wrapper(a)
    if a.phase == "precompute":
        return {"seconds": seconds, "chunks": json.loads(Path("processed-stats.json").read_text())["chunks"]}
    retro = wrapper.retro
    if a.phase == "train":
        loader = wrapper.get_dataloader(batch_size=BATCH, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(SEED))
        optimizer = torch.optim.AdamW(retro.parameters(), lr=LR, weight_decay=0.1)
        return train_loop(retro, loader, optimizer, a.steps,
                          lambda b: retro(b[0].long(), b[1].long(), return_loss=True))
    from retro_pytorch.training import top_k

    retro.eval()
    prompt = wrapper.ds[0][0][:CHUNK][None]
    wrapper.max_seq_len = CHUNK + 4 - 1
    with contextlib.redirect_stdout(io.StringIO()):
        wrapper.generate(prompt, filter_fn=top_k, filter_thres=0.9)  # warm-up
        wrapper.max_seq_len = CHUNK + a.new_tokens - 1  # it samples max_seq_len - prompt + 1 tokens
        began = time.perf_counter()
        out = wrapper.generate(prompt, filter_fn=top_k, filter_thres=0.9, temperature=1.0)
        seconds = time.perf_counter() - began
    new = out.shape[1] - CHUNK
    return {"seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ragkit", "retro-pytorch"], required=True)
    parser.add_argument("--phase", choices=["precompute", "train", "generate"], required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--bert", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=192)
    a = parser.parse_args()
    a.data = str(Path(a.data).resolve())
    a.work = a.work.resolve()
    result = ragkit_phase(a) if a.impl == "ragkit" else retro_pytorch_phase(a)
    result.update(impl=a.impl, phase=a.phase, peak_memory_mib=peak_mib())
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
