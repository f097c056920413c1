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
- a row for 21M x 768 (psgs_w100 with Contriever) from `ragkit index plan`;
- with a BM25 side (`--sparse`): add/remove of 10 (time, bytes written) against a bm25s rebuild over every
  passage (what each change cost when the side was one bm25s index), and BM25 search QPS against plain bm25s
  over the same passages, with how many scores agree.
Each measured step runs in its own process, so peak RSS is that step's. The vectors are random (search
quality is benchmarks/search_speed.py's business); the passages' text is random words.

    python benchmarks/scale.py [--sizes 100000,1000000] [--parts index,embed,sparse] [--keep]
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


def add_and_remove_10(idx: Path, folder: Path, n: int) -> dict[str, Any]:
    """`ragkit index add` of 10 new passages (folder/new.jsonl) and `remove` of 10 old ones: time and bytes written."""
    out: dict[str, Any] = {}
    new = folder / "new.jsonl"
    new.write_text("".join(json.dumps({"id": f"new{i}", "title": "New", "text": f"a new passage number {i}"}) + "\n" for i in range(10)))
    before = inodes(idx)
    out["add10"] = measured(["ragkit", "index", "add", str(idx), str(new)])
    out["add10"]["bytes_written"] = written_since(idx, before)
    before = inodes(idx)
    out["remove10"] = measured(["ragkit", "index", "remove", str(idx), "--ids", ",".join(f"d{i}" for i in range(0, n, n // 10))])
    out["remove10"]["bytes_written"] = written_since(idx, before)
    return out


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

    out.update(add_and_remove_10(idx, folder, n))
    script = folder / "raw_add.py"
    script.write_text(RAW_FAISS_ADD)
    out["faiss_rewrite_add10"] = measured([str(script), str(folder / "raw.faiss")])
    out["faiss_rewrite_add10"]["bytes_written"] = (folder / "raw.faiss.new").stat().st_size
    out["compact"] = measured(["ragkit", "index", "compact", str(idx)])
    print(f"[{n:,}] add10 {out['add10']['seconds']:.1f}s ({out['add10']['bytes_written']:,} B), "
          f"remove10 {out['remove10']['seconds']:.1f}s, compact {out['compact']['seconds']:.1f}s", file=sys.stderr)
    return out


BM25S_REBUILD = """
import json, sys, time, bm25s, Stemmer
texts = [(lambda r: f"{r['title']} {r['text']}")(json.loads(line)) for line in open(sys.argv[1])]
retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False),
                show_progress=False)
"""

SPARSE_SEARCH = """
import json, sys, time, bm25s, Stemmer
from ragkit.index import Index
queries = json.load(open(sys.argv[2]))
index = Index.open(sys.argv[1]).load()
began = time.perf_counter()
ours = index.search_sparse(queries, 10)
ragkit_s = time.perf_counter() - began
texts, ids = [], []
for line in open(sys.argv[3]):
    row = json.loads(line)
    texts.append(f"{row['title']} {row['text']}")
    ids.append(row["id"])
stemmer = Stemmer.Stemmer("english")
retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False)
began = time.perf_counter()
rows, scores = retriever.retrieve(tokens, k=10, show_progress=False, n_threads=1)
bm25s_s = time.perf_counter() - began
same = sum(abs(h.score - float(s)) < 1e-4 * max(1.0, abs(float(s))) for q, r in enumerate(ours)
           for h, s in zip(r, scores[q]))
json.dump({"queries": len(queries), "ragkit_qps": len(queries) / ragkit_s, "bm25s_qps": len(queries) / bm25s_s,
           "equal_scores": same, "compared": sum(len(r) for r in ours)}, open(sys.argv[4], "w"))
"""


def run_sparse(n: int, encoder: dict[str, Any]) -> dict[str, Any]:
    """An index with a BM25 side: build, add/remove 10 (time and bytes), against what a change cost when the side
    was one bm25s index rebuilt from every passage; search QPS against plain bm25s over the same passages."""
    folder = WORK / f"sparse{n}"
    shutil.rmtree(folder, ignore_errors=True)
    make_shards(folder / "emb", n, encoder["dim"], encoder)
    idx = folder / "idx"
    out: dict[str, Any] = {"n": n}
    out["build"] = measured(["ragkit", "index", "build", "--embeddings", str(folder / "emb"), "-o", str(idx), "--sparse"])
    out["build"]["disk_bytes"] = disk(idx)
    out.update(add_and_remove_10(idx, folder, n))
    passages = folder / "emb" / "passages-00000-of-00001.jsonl"
    script = folder / "bm25s_rebuild.py"
    script.write_text(BM25S_REBUILD)
    out["bm25s_rebuild"] = measured([str(script), str(passages)])
    rng = np.random.default_rng(3)
    queries = [" ".join(f"w{i}" for i in rng.integers(0, 20_000, 3)) for _ in range(500)]
    (folder / "queries.json").write_text(json.dumps(queries))
    script = folder / "sparse_search.py"
    script.write_text(SPARSE_SEARCH)
    # the index searched after the changes; bm25s over the passages it holds now (the 10 removed left out)
    removed = {f"d{i}" for i in range(0, n, n // 10)}
    live = folder / "live.jsonl"
    with open(passages) as source, open(live, "w") as target:
        target.writelines(line for line in source if json.loads(line)["id"] not in removed)
        target.writelines((folder / "new.jsonl").read_text())
    measured([str(script), str(idx), str(folder / "queries.json"), str(live), str(folder / "search.json")])
    out["search"] = json.loads((folder / "search.json").read_text())
    print(f"[{n:,}] sparse: build {out['build']['seconds']:.1f}s, add10 {out['add10']['seconds']:.1f}s "
          f"({out['add10']['bytes_written']:,} B) vs bm25s rebuild {out['bm25s_rebuild']['seconds']:.1f}s; "
          f"QPS {out['search']['ragkit_qps']:.0f} vs bm25s {out['search']['bm25s_qps']:.0f}", file=sys.stderr)
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
    parser.add_argument("--parts", default="index,embed,sparse", help="comma-separated: index, embed, sparse")
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
    if "sparse" in parts:
        sparse = [run_sparse(n, encoder) for n in sizes]
        print_table("index with a BM25 side: a change against the old per-change bm25s rebuild; search against bm25s",
                    ["passages", "build s", "build peak GiB", "add10 s", "add10 MiB", "remove10 s", "remove10 MiB",
                     "bm25s rebuild s", "ragkit QPS", "bm25s QPS", "equal scores"],
                    [[f"{r['n']:,}", r["build"]["seconds"], r["build"]["peak_rss"] / 2**30, r["add10"]["seconds"],
                      r["add10"]["bytes_written"] / 2**20, r["remove10"]["seconds"], r["remove10"]["bytes_written"] / 2**20,
                      r["bm25s_rebuild"]["seconds"], r["search"]["ragkit_qps"], r["search"]["bm25s_qps"],
                      f"{r['search']['equal_scores']}/{r['search']['compared']}"] for r in sparse])
        previous["sparse"] = sparse
        if len(sparse) >= 2:
            previous.setdefault("ratios", {})[f"sparse_add10_{sparse[-1]['n']}_over_{sparse[0]['n']}"] = (
                sparse[-1]["add10"]["seconds"] / sparse[0]["add10"]["seconds"])
    if "index" not in parts:
        previous["embed"] = embeds
        write_result("scale", previous)
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
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
    path = write_result("scale", {"hardware": hw, "runs": runs, "ratios": {**previous.get("ratios", {}), **ratios},
                                  "wikipedia_plan": wiki, "embed": embeds, "sparse": previous.get("sparse", [])})
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
