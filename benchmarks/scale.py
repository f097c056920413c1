"""Index cost as the corpus grows: 100k vs 1M synthetic passages (100 words each, precomputed 384-d float16
embedding shards, as `ragkit embed` writes them).

For each size, side by side with raw Faiss on the same vectors:
- `ragkit index build --embeddings` wall time and peak RSS, against raw Faiss reading the same .npy and
  building the same flat index (no passages, no ids: the floor);
- `ragkit index add` of 10 passages (the CLI, embedding them with MiniLM) and `ragkit index remove` of 10:
  wall time and bytes written, against what an index without segments does (read the whole Faiss index,
  add, write it back);
- `ragkit index compact` after those changes;
- `ragkit embed` with a tiny 2-layer test encoder (so that the encoder costs little and the data path
  shows): wall time and peak RSS at each size (flat in corpus size is the goal), and a run killed with
  SIGKILL half-way then started again: the resumed files must equal an uninterrupted run's, byte for byte;
- a row for 21M x 768 (psgs_w100 with Contriever) from `ragkit index plan`.
Each measured step runs in its own process, so peak RSS is that step's. The vectors are random (search
quality is benchmarks/search_speed.py's business); the passages' text is random words.

    python benchmarks/scale.py [--sizes 100000,1000000] [--parts index,embed] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, hardware, print_table, write_result

WORK = REPO / "benchmarks" / ".work" / "scale"
MEASURE = """
import runpy, sys, json, time, os
began = time.perf_counter()
code = 0
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "ragkit":
        from ragkit.cli import app
        app(sys.argv[1:], standalone_mode=False)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open(os.environ["MEASURE_OUT"], "w") as handle:
    json.dump({"seconds": time.perf_counter() - began, "peak_rss": peak, "code": code}, handle)
"""

RAW_FAISS_BUILD = """
import sys, numpy as np, faiss
x = np.load(sys.argv[1], mmap_mode="r")
index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
for start in range(0, len(x), 100_000):
    block = np.ascontiguousarray(x[start:start + 100_000], dtype=np.float32)
    index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
faiss.write_index(index, sys.argv[2])
"""

RAW_FAISS_ADD = """
import sys, numpy as np, faiss
index = faiss.read_index(sys.argv[1])
x = np.random.default_rng(1).standard_normal((10, index.d)).astype(np.float32)
index.add_with_ids(x, np.arange(10**9, 10**9 + 10, dtype=np.int64))
faiss.write_index(index, sys.argv[1] + ".new")
"""


def measured(args: list[str]) -> dict[str, Any]:
    out = WORK / "measure.json"
    env = {**os.environ, "MEASURE_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env, capture_output=True, text=True)
    result = json.loads(out.read_text())
    if proc.returncode or result["code"]:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return result


def make_shards(folder: Path, n: int, dim: int, encoder: dict[str, Any]) -> None:
    """One shard of n random 100-word passages and unit vectors, written in blocks."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(20_000)])
    vectors = np.lib.format.open_memmap(folder / "embeddings-00000-of-00001.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    with open(folder / "passages-00000-of-00001.jsonl", "w") as handle:
        for start in range(0, n, 50_000):
            size = min(50_000, n - start)
            x = rng.standard_normal((size, dim)).astype(np.float32)
            vectors[start : start + size] = x / np.linalg.norm(x, axis=1, keepdims=True)
            texts = rng.choice(words, (size, 100))
            handle.writelines(json.dumps({"id": f"d{start + i}", "title": f"T{start + i}", "text": " ".join(t)}) + "\n"
                              for i, t in enumerate(texts))
    vectors.flush()
    (folder / "shard-00000-of-00001.json").write_text(json.dumps({
        "encoder": encoder, "dtype": "float16", "rows": n, "corpus_rows": n, "range": [0, n], "shard_id": 0,
        "num_shards": 1, "embeddings": "embeddings-00000-of-00001.npy", "passages": "passages-00000-of-00001.jsonl"}))


def written_since(index_dir: Path, before: set[int]) -> int:
    current = index_dir / os.readlink(index_dir / "current")
    return sum(p.stat().st_size for p in current.rglob("*") if p.is_file() and p.stat().st_ino not in before)


def inodes(index_dir: Path) -> set[int]:
    current = index_dir / os.readlink(index_dir / "current")
    return {p.stat().st_ino for p in current.rglob("*") if p.is_file()}


def disk(index_dir: Path) -> int:
    current = index_dir / os.readlink(index_dir / "current")
    return sum(p.stat().st_size for p in current.rglob("*") if p.is_file())


def run_size(n: int, encoder: dict[str, Any]) -> dict[str, Any]:
    folder = WORK / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    make_shards(folder / "emb", n, encoder["dim"], encoder)
    print(f"[{n:,}] made shards in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    out: dict[str, Any] = {"n": n}
    idx = folder / "idx"
    out["build"] = measured(["ragkit", "index", "build", "--embeddings", str(folder / "emb"), "-o", str(idx)])
    out["build"]["disk_bytes"] = disk(idx)
    out["build"]["vectors_bytes"] = n * encoder["dim"] * 4
    script = folder / "raw_build.py"
    script.write_text(RAW_FAISS_BUILD)
    out["faiss_build"] = measured([str(script), str(folder / "emb" / "embeddings-00000-of-00001.npy"), str(folder / "raw.faiss")])
    print(f"[{n:,}] build {out['build']['seconds']:.1f}s vs faiss {out['faiss_build']['seconds']:.1f}s", file=sys.stderr)

    new = folder / "new.jsonl"
    new.write_text("".join(json.dumps({"id": f"new{i}", "title": "New", "text": f"a new passage number {i}"}) + "\n" for i in range(10)))
    before = inodes(idx)
    out["add10"] = measured(["ragkit", "index", "add", str(idx), str(new)])
    out["add10"]["bytes_written"] = written_since(idx, before)
    before = inodes(idx)
    out["remove10"] = measured(["ragkit", "index", "remove", str(idx), "--ids", ",".join(f"d{i}" for i in range(0, n, n // 10))])
    out["remove10"]["bytes_written"] = written_since(idx, before)
    script = folder / "raw_add.py"
    script.write_text(RAW_FAISS_ADD)
    out["faiss_rewrite_add10"] = measured([str(script), str(folder / "raw.faiss")])
    out["faiss_rewrite_add10"]["bytes_written"] = (folder / "raw.faiss.new").stat().st_size
    out["compact"] = measured(["ragkit", "index", "compact", str(idx)])
    print(f"[{n:,}] add10 {out['add10']['seconds']:.1f}s ({out['add10']['bytes_written']:,} B), "
          f"remove10 {out['remove10']['seconds']:.1f}s, compact {out['compact']['seconds']:.1f}s", file=sys.stderr)
    return out


def run_embed(n: int, tiny: Path) -> dict[str, Any]:
    """`ragkit embed` of n short passages with the tiny encoder: uninterrupted, then killed and resumed."""
    import hashlib
    import signal

    folder = WORK / f"embed{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.array("the river city king old war film song team north south music".split())
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w") as handle:
        for start in range(0, n, 100_000):
            texts = rng.choice(words, (min(100_000, n - start), 20))
            handle.writelines(json.dumps({"id": f"e{start + i}", "text": " ".join(t)}) + "\n" for i, t in enumerate(texts))
    args = ["ragkit", "embed", str(corpus), "-m", str(tiny), "--device", "cpu", "--checkpoint-rows", "8192"]
    out: dict[str, Any] = {"n": n, "whole": measured([*args, "-o", str(folder / "whole")])}
    proc = subprocess.Popen([sys.executable, "-m", "ragkit.cli", *args[1:], "-o", str(folder / "resumed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(out["whole"]["seconds"] / 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    progress = folder / "resumed" / ".progress-00000-of-00001.json"
    out["killed_at_rows"] = json.loads(progress.read_text())["rows_done"] if progress.exists() else 0
    out["resume"] = measured([*args, "-o", str(folder / "resumed")])

    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if not p.name.startswith(".")}

    out["resumed_identical"] = digest(folder / "whole") == digest(folder / "resumed")
    print(f"[embed {n:,}] {out['whole']['seconds']:.1f}s, peak {out['whole']['peak_rss'] / 2**20:.0f} MiB; killed at "
          f"{out['killed_at_rows']:,}, resumed in {out['resume']['seconds']:.1f}s, identical={out['resumed_identical']}",
          file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--parts", default="index,embed", help="index, embed or both")
    parser.add_argument("--keep", action="store_true", help="keep the generated data under benchmarks/.work/scale")
    args = parser.parse_args()
    from ragkit.index.plan import plan
    from ragkit.models.encoder import Encoder

    WORK.mkdir(parents=True, exist_ok=True)
    encoder = Encoder("minilm", device="cpu").info.to_json()  # `index add` embeds with the index's own model
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = set(args.parts.split(","))
    previous = json.loads((REPO / "benchmarks" / "results" / "scale.json").read_text()) if (REPO / "benchmarks" / "results" / "scale.json").exists() else {}
    embeds = previous.get("embed", [])
    if "embed" in parts:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_encoder  # the test suite's tiny encoder, built from a config

        tiny = build_tiny_encoder(WORK / "tiny-encoder")
        embeds = [run_embed(n, tiny) for n in sizes]
        print_table("ragkit embed, tiny 2-layer encoder (32-d): cost by corpus size",
                    ["passages", "wall s", "peak MiB", "killed at row", "resume s", "identical bytes"],
                    [[f"{e['n']:,}", e["whole"]["seconds"], e["whole"]["peak_rss"] / 2**20, e["killed_at_rows"],
                      e["resume"]["seconds"], e["resumed_identical"]] for e in embeds])
    if "index" not in parts:
        previous["embed"] = embeds
        write_result("scale", previous)
        return
    runs = [run_size(n, encoder) for n in sizes]
    gib = 2**30
    rows = []
    for r in runs:
        rows.append([f"{r['n']:,}", r["build"]["seconds"], r["build"]["peak_rss"] / gib, r["faiss_build"]["seconds"],
                     r["faiss_build"]["peak_rss"] / gib, r["build"]["disk_bytes"] / gib, r["add10"]["seconds"],
                     r["add10"]["bytes_written"] / 2**20, r["faiss_rewrite_add10"]["seconds"],
                     r["faiss_rewrite_add10"]["bytes_written"] / 2**20, r["remove10"]["seconds"],
                     r["remove10"]["bytes_written"] / 2**20, r["compact"]["seconds"]])
    hw = hardware()
    print_table(f"Index cost by corpus size — {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB",
                ["passages", "build s", "build peak GiB", "faiss build s", "faiss peak GiB", "disk GiB", "add10 s",
                 "add10 MiB written", "faiss rewrite s", "faiss rewrite MiB", "remove10 s", "remove10 MiB", "compact s"],
                rows)
    ratios = {}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        ratios = {f"add10_{large['n']}_over_{small['n']}": large["add10"]["seconds"] / small["add10"]["seconds"],
                  f"remove10_{large['n']}_over_{small['n']}": large["remove10"]["seconds"] / small["remove10"]["seconds"]}
        print(json.dumps(ratios))
    for r in runs:
        r["build"]["peak_over_vectors_plus_1gib"] = r["build"]["peak_rss"] / (r["build"]["vectors_bytes"] + gib)
    wiki = plan(21_000_000, 768, max_memory=64 * gib)
    print_table("21M x 768 (psgs_w100, Contriever), budget 64 GiB — from `ragkit index plan`",
                ["spec", "build GiB", "serve GiB", "disk GiB", "fits"],
                [[c["spec"], c["build_bytes"] / gib, c["serve_bytes"] / gib, c["disk_bytes"] / gib, c["fits"]]
                 for c in wiki["candidates"]])
    path = write_result("scale", {"hardware": hw, "runs": runs, "ratios": ratios, "wikipedia_plan": wiki,
                                  "embed": embeds})
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
