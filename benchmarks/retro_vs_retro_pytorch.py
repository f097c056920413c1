"""ragkit's RETRO beside RETRO-pytorch (PyPI `retro-pytorch`, in its own environment) at the same config and
data: neighbour precompute time (text -> chunks -> embeddings -> index -> neighbours), training tokens/s and
peak memory, generation tokens/s (ragkit: KV cache; RETRO-pytorch: the whole model re-run per token), and
the ratios. Each phase of each implementation runs in a fresh process (benchmarks/retro_sides.py).

Data: the 60 WikiText-2 validation articles (../shared/data/lm_text), one file per article. Tokenizer and
embedder: all-MiniLM-L6-v2 (a BERT, as RETRO-pytorch's pipeline requires). Model: dim 384, 6 decoder
layers with CCA at 3 and 6 (1-indexed), 2 encoder layers, 6 heads of 64, chunk 64, sequence 512, K = 2,
batch 4, AdamW 3e-4.

    python benchmarks/retro_vs_retro_pytorch.py [--steps 10] [--new-tokens 192]

The retro-pytorch environment is made once at benchmarks/.envs/retro-pytorch:
    python -m venv benchmarks/.envs/retro-pytorch
    benchmarks/.envs/retro-pytorch/bin/pip install torch==2.13.0 retro-pytorch==0.3.9 transformers==5.23.0 "pyarrow<18"
(autofaiss pins numpy < 2, so pyarrow must be one built for numpy 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _common import REPO, hardware, print_table, write_result
from retro_data import wikitext_articles

WORK = REPO / "benchmarks" / ".work" / "retro_vs_retro_pytorch"
PEER_PYTHON = REPO / "benchmarks" / ".envs" / "retro-pytorch" / "bin" / "python"


def side(impl: str, phase: str, data: Path, bert: str, steps: int, new_tokens: int) -> dict:
    python = sys.executable if impl == "ragkit" else str(PEER_PYTHON)
    cmd = [python, str(REPO / "benchmarks" / "retro_sides.py"), "--impl", impl, "--phase", phase, "--data", str(data),
           "--work", str(WORK / impl), "--bert", bert, "--steps", str(steps), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=192)
    a = parser.parse_args()
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: make the retro-pytorch environment first (see this file's docstring)")
    from ragkit.models.registry import resolve

    bert = resolve("minilm").location
    shutil.rmtree(WORK, ignore_errors=True)
    data = WORK / "articles"
    data.mkdir(parents=True)
    for i, text in enumerate(wikitext_articles()):
        (data / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    peer_version = subprocess.run([str(PEER_PYTHON), "-c", "import importlib.metadata as m; print(m.version('retro-pytorch'))"],
                                  capture_output=True, text=True).stdout.strip()
    results: dict[str, dict[str, dict]] = {}
    for impl in ("ragkit", "retro-pytorch"):
        results[impl] = {phase: side(impl, phase, data, bert, a.steps, a.new_tokens)
                         for phase in ("precompute", "train", "generate")}
    r, p = results["ragkit"], results["retro-pytorch"]
    rows = [
        ["neighbour precompute (s)", r["precompute"]["seconds"], p["precompute"]["seconds"],
         p["precompute"]["seconds"] / r["precompute"]["seconds"]],
        ["precompute peak memory (MiB)", r["precompute"]["peak_memory_mib"], p["precompute"]["peak_memory_mib"],
         p["precompute"]["peak_memory_mib"] / r["precompute"]["peak_memory_mib"]],
        ["training tokens/s", r["train"]["tokens_per_s"], p["train"]["tokens_per_s"],
         r["train"]["tokens_per_s"] / p["train"]["tokens_per_s"]],
        ["training peak memory (MiB)", r["train"]["peak_memory_mib"], p["train"]["peak_memory_mib"],
         p["train"]["peak_memory_mib"] / r["train"]["peak_memory_mib"]],
        ["generation tokens/s", r["generate"]["tokens_per_s"], p["generate"]["tokens_per_s"],
         r["generate"]["tokens_per_s"] / p["generate"]["tokens_per_s"]],
    ]
    print_table(f"RETRO: ragkit vs retro-pytorch {peer_version} ({r['precompute']['chunks']} chunks, "
                f"{a.steps} training steps, {a.new_tokens} generated tokens)",
                ["measure", "ragkit", "retro-pytorch", "ragkit advantage (x)"], rows)
    path = write_result("retro_vs_retro_pytorch", {
        "hardware": hardware(), "peer": f"retro-pytorch {peer_version}", "steps": a.steps, "new_tokens": a.new_tokens,
        "data": "WikiText-2 validation, 60 articles, one file each", "results": results,
        "table": [dict(zip(["measure", "ragkit", "retro_pytorch", "ragkit_advantage"], row)) for row in rows],
        "note": "advantage = peer/ragkit for seconds and memory, ragkit/peer for rates; both at the same config",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
