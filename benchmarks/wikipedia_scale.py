"""psgs_w100's size (21M passages x 768 dims) built, searched, changed and served on this machine, measured.

Unattended and resumable by stage: each stage records its figures in WORK/state.json when it finishes and
is not redone; the results so far are written to benchmarks/results/wikipedia_scale.json after every stage.
Intermediates are deleted once no later stage needs them, and each stage prints the disk it uses.

Stages:
  corpus    N synthetic passages (random words, --words each) as corpus.jsonl
  shards    their 768-d float16 embedding shards, written by ragkit's own `embed_shard` (the code path of
            `ragkit embed --num-shards`) with a synthetic encoder (below) in place of the model; the exact
            top-10 of 1,000 held-out queries is computed as the vectors are produced (inner product over the
            float16 values stored), so no second pass over 32 GB is needed
  build     `ragkit index build --embeddings DIR --spec SPEC --max-memory M` in its own process: wall time,
            peak RSS, bytes on disk, beside `ragkit index plan`'s estimates for the same spec
  tune      an auto-built index whose pinned search settings predate auto's current ones (AUTO_NPROBE,
            AUTO_REFINE in ragkit/index/spec.py) gets them with `ragkit index tune` (search-time settings:
            the build does not depend on them, so the results are those of a fresh build)
  search    recall@10 against the exact top-10, one-query latency (p50/p99) and batch QPS, at the default
            settings and along nprobe x refine
  model     a random-weight 2-layer BERT of width 768 (sentence-transformers, mean pooling, normalised) is
            recorded in the shards as their embedder, so that the commands that embed text (`index add`,
            `serve`) run their whole path on this index; its vectors are not the generator's, so recall is
            measured on the generator's queries (stage search), and add/serve measure cost, not quality
  lookup    the passage store at this size: one query's 10 hits with their passages (id, title, text read
            from SQLite) against the same search returning ids only, p50/p99 over 200 queries
  change    `ragkit index add` / `index remove` of 10 passages (wall, peak RSS, bytes the process wrote),
            and the time a bare `import torch, sentence_transformers` takes (the add's fixed cost; noisy on
            this VM, in the JSON only)
  serve     `ragkit serve` on it: time until /health answers, resident memory, p50/p99 at 8 clients
  released  the released-embedding import at size: the generator's first --released-rows rows written as
            Contriever's `passages_XX` pickles (float32, 4 files) beside a psgs_w100-style TSV, imported
            by `ragkit index build TSV --embeddings DIR --spec auto --max-memory 2G` in its own process
            (peak RSS against the largest file's size; bytes written), recall@10 of its default search
            against the exact top-10 over those rows; the files and the index are deleted afterwards

The synthetic encoder stands in for Contriever's structure, not its values: a passage's vector is a point of
a 64-dimensional latent space (one of 4,096 clusters, sizes Zipf-distributed, so a few are huge and most are
small; a within-cluster spread of 0.6 of the centres' scale) mapped into 768 dims by a fixed random matrix
with a decaying spectrum (singular values ~ i^-0.5), plus isotropic noise of 0.05 per dimension so the
vectors are full rank, then normalised. Queries come from the same generator (rows N..N+999 of it).

    python benchmarks/wikipedia_scale.py [--passages 21000000] [--stages corpus,shards,build,...] [--spec S]
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

from _common import REPO, WORK as WORK_ROOT, hardware, print_table, write_result

DIM = 768
LATENT = 64
CLUSTERS = 4096
QUERIES = 1000
K = 10
CHUNK = 1024  # the generator draws rows in aligned chunks of this many, seeded by chunk number
STAGES = ("corpus", "shards", "model", "build", "tune", "search", "lookup", "change", "serve", "released")

MEASURE = """
import runpy, sys, json, time, os
began = time.perf_counter()
code = 0
sys.argv = sys.argv[1:]
try:
    from ragkit.cli import app
    app(sys.argv[1:], standalone_mode=False)
except SystemExit as exc:
    code = exc.code or 0
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
written = next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("write_bytes:"))
with open(os.environ["MEASURE_OUT"], "w") as handle:
    json.dump({"seconds": time.perf_counter() - began, "peak_rss": peak, "write_bytes": written, "code": code}, handle)
"""


class Generator:
    """Vectors with real embeddings' structure (see the module docstring); row r is the same whatever the
    order rows are asked for in."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
        weights = 1.0 / np.arange(1, CLUSTERS + 1) ** 1.1
        self.cumulative = np.cumsum(weights / weights.sum())
        basis, _ = np.linalg.qr(rng.standard_normal((DIM, LATENT)))
        spectrum = (1.0 / np.sqrt(np.arange(1, LATENT + 1))).astype(np.float32)
        self.mix = (basis.T * spectrum[:, None]).astype(np.float32) * np.sqrt(DIM / LATENT)  # (LATENT, DIM)

    def chunk(self, number: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, number])
        cluster = np.searchsorted(self.cumulative, rng.random(CHUNK))
        cluster = np.minimum(cluster, CLUSTERS - 1)
        latent = self.centres[cluster] + 0.6 * rng.standard_normal((CHUNK, LATENT), dtype=np.float32)
        x = latent @ self.mix + 0.05 * rng.standard_normal((CHUNK, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, start: int, end: int) -> np.ndarray:
        first, last = start // CHUNK, (end - 1) // CHUNK
        block = np.concatenate([self.chunk(c) for c in range(first, last + 1)])
        return block[start - first * CHUNK : end - first * CHUNK]


def merge_top_k(top_scores: np.ndarray, top_rows: np.ndarray, scores: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The running exact top-K of each query (scores, row numbers), merged with a new block's `scores` for its
    `rows` (unordered within the K; the caller sorts once at the end)."""
    all_scores = np.concatenate([top_scores, scores], axis=1)
    all_rows = np.concatenate([top_rows, np.broadcast_to(rows, scores.shape)], axis=1)
    best = np.argpartition(-all_scores, K - 1, axis=1)[:, :K]
    return np.take_along_axis(all_scores, best, 1), np.take_along_axis(all_rows, best, 1)


class SyntheticEncoder:
    """Duck-types ragkit.models.encoder.Encoder for `embed_shard`: the passage's row number is in its title,
    its vector is the generator's row. Keeps the running exact top-k of the held-out queries over the float16
    values that go to disk."""

    def __init__(self, generator: Generator, queries: np.ndarray) -> None:
        from ragkit.index.encoder_info import EncoderInfo

        self.generator = generator
        self.info = EncoderInfo("synthetic-contriever-like", DIM, True, 512, f"synthetic-{generator.seed}", "mean")
        self.queries = queries
        self.top_scores = np.full((len(queries), K), -np.inf, np.float32)
        self.top_rows = np.full((len(queries), K), -1, np.int64)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        rows = np.array([int(t.split(" ", 2)[1]) for t in texts])
        start, end = int(rows[0]), int(rows[-1]) + 1
        assert end - start == len(rows), "rows arrive in order"
        vectors = self.generator.rows(start, end).astype(np.float16)
        self.top_scores, self.top_rows = merge_top_k(self.top_scores, self.top_rows,
                                                     self.queries @ vectors.astype(np.float32).T, rows)
        return vectors


def disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.passages
        self.work = Path(args.work or WORK_ROOT / f"wikipedia_scale_{self.n}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.generator = Generator(seed=0)

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state, indent=2))
        free = shutil.disk_usage(self.work).free
        print(f"[disk] work folder {gib(disk(self.work))}, free {gib(free)}", file=sys.stderr, flush=True)
        write_result(f"wikipedia_scale_{self.n}" if self.n != 21_000_000 else "wikipedia_scale",
                     {"benchmark": "wikipedia_scale", "passages": self.n, "dim": DIM, "hardware": hardware(),
                      "stages": self.state})

    @property
    def corpus(self) -> Path:
        return self.work / "corpus.jsonl"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def index(self) -> Path:
        return self.work / "index"

    def queries(self) -> np.ndarray:
        return self.generator.rows(self.n, self.n + QUERIES).astype(np.float16).astype(np.float32)

    # -- stages ------------------------------------------------------------------------------------------
    def stage_corpus(self) -> dict[str, Any]:
        words = self.args.words
        free = shutil.disk_usage(self.work).free
        rng = np.random.default_rng(1)
        vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 10)))
                               for _ in range(20_000)])
        line_bytes = 60 + words * 7
        need = self.n * (DIM * 2 + 3 * line_bytes)  # shards + corpus + shard passages + store
        if need > free:
            raise SystemExit(f"not enough disk: need ~{gib(need)} for {self.n} passages of {words} words, "
                             f"{gib(free)} free; use --words fewer")
        began = time.perf_counter()
        part = self.corpus.with_suffix(".partial")
        with open(part, "w", encoding="utf-8") as out:
            for start in range(0, self.n, 100_000):
                end = min(self.n, start + 100_000)
                picks = vocabulary[np.random.default_rng([2, start]).integers(0, len(vocabulary), (end - start, words))]
                out.write("".join(json.dumps({"id": f"w{r}", "title": f"Passage {r}", "text": " ".join(row)}) + "\n"
                                  for r, row in zip(range(start, end), picks.tolist())))
        os.replace(part, self.corpus)
        return {"seconds": time.perf_counter() - began, "words_per_passage": words, "bytes": disk(self.corpus)}

    def stage_shards(self) -> dict[str, Any]:
        from ragkit.embeddings import embed_shard

        num = self.args.num_shards
        queries = self.queries()
        exact_dir = self.work / "exact"
        exact_dir.mkdir(exist_ok=True)
        began = time.perf_counter()
        for shard in range(num):
            done = exact_dir / f"shard-{shard}.npz"
            if done.exists():
                continue
            encoder = SyntheticEncoder(self.generator, queries)
            result = embed_shard(encoder, self.corpus, self.shards, shard_id=shard, num_shards=num,  # type: ignore[arg-type]
                                 corpus_rows=self.n, batch_size=4096)
            if result.resumed_from:  # the accumulated top-k misses the rows of the earlier run: recompute
                encoder = SyntheticEncoder(self.generator, queries)
                for begin in range(result.start, result.end, 4096):
                    end = min(result.end, begin + 4096)
                    encoder.encode([f"Passage {r} x" for r in range(begin, end)])
            np.savez(done, scores=encoder.top_scores, rows=encoder.top_rows)
            print(f"[shards] shard {shard + 1}/{num} done at {time.perf_counter() - began:.0f} s", file=sys.stderr,
                  flush=True)
        scores = np.concatenate([np.load(exact_dir / f"shard-{s}.npz")["scores"] for s in range(num)], axis=1)
        rows = np.concatenate([np.load(exact_dir / f"shard-{s}.npz")["rows"] for s in range(num)], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        np.savez(self.work / "exact.npz", scores=np.take_along_axis(scores, order, 1),
                 rows=np.take_along_axis(rows, order, 1), queries=queries)
        self.corpus.unlink()  # the shards hold the passages now
        return {"seconds": time.perf_counter() - began, "num_shards": num, "bytes": disk(self.shards),
                "vector_bytes": sum(p.stat().st_size for p in self.shards.glob("*.npy"))}

    def measured(self, argv: list[str]) -> dict[str, Any]:
        out = self.work / "measure.json"
        env = {**os.environ, "MEASURE_OUT": str(out), "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", MEASURE, "ragkit", *argv], env=env, text=True,
                              capture_output=True)
        result = json.loads(out.read_text()) if out.exists() else {"code": proc.returncode}
        result["stderr_tail"] = proc.stderr[-2000:]
        out.unlink(missing_ok=True)
        if result.get("code"):
            raise SystemExit(f"ragkit {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        return result

    def stage_build(self) -> dict[str, Any]:
        if self.index.exists():
            shutil.rmtree(self.index)  # a build killed half-way left nothing published; start again
        argv = ["index", "build", "-o", str(self.index), "--embeddings", str(self.shards), "--spec", self.args.spec,
                "--max-memory", self.args.max_memory]
        if self.args.max_build_time:
            argv += ["--max-build-time", self.args.max_build_time]
        result = self.measured(argv)
        from ragkit.index.index import Index

        info = Index.open(self.index).info()
        plan = subprocess.run([sys.executable, "-m", "ragkit.cli", "index", "plan", "--passages", str(self.n),
                               "--dim", str(DIM), "--max-memory", self.args.max_memory, "--json"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        from ragkit.index.build_time import phases
        from ragkit.index.plan import build_bytes
        from ragkit.index.spec import parse_spec

        built = parse_spec(info["spec"])
        estimate = {"build_bytes": build_bytes(built, self.n, DIM), "phases": phases(built, self.n, DIM)}
        estimate["build_seconds"] = sum(estimate["phases"].values())
        return {**result, "spec": info.get("spec"), "estimate": estimate, "index_bytes": disk(self.index), "argv": argv,
                "plan": json.loads(plan.stdout) if plan.returncode == 0 else plan.stderr[-500:]}

    def stage_tune(self) -> dict[str, Any]:
        from ragkit.index.index import Index
        from ragkit.index.spec import AUTO_NPROBE, AUTO_REFINE

        index = Index.open(self.index)
        spec = index.spec
        wanted = {"nprobe": AUTO_NPROBE, "refine": AUTO_REFINE}
        if (index.manifest.get("spec_requested") != "auto" or spec.kind != "ivf-pq"
                or all(spec.params.get(k) == v for k, v in wanted.items())):
            return {"spec": spec.text, "tuned": False}
        result = self.measured(["index", "tune", str(self.index), "--nprobe", str(AUTO_NPROBE),
                                "--refine", str(AUTO_REFINE)])
        return {**result, "before": spec.text, "spec": Index.open(self.index).spec.text, "tuned": True}

    def stage_search(self) -> dict[str, Any]:
        from ragkit.index.index import Index

        exact = np.load(self.work / "exact.npz")
        queries, truth = exact["queries"], exact["rows"]
        index = Index.open(self.index, threads=2)
        rows = []

        def measure(label: str) -> dict[str, Any]:
            index.search_ids(queries[:5], K)  # warm
            began = time.perf_counter()
            found = index.search_ids(queries, K)
            batch_seconds = time.perf_counter() - began
            recall = float(np.mean([len({int(i[1:]) for i, _ in hits} & set(t.tolist())) / K
                                    for hits, t in zip(found, truth)]))
            single = []
            for q in queries[:200]:
                began = time.perf_counter()
                index.search_ids(q[None, :], K)
                single.append(time.perf_counter() - began)
            row = {"settings": label, "recall_at_10": recall, "p50_ms": 1000 * float(np.percentile(single, 50)),
                   "p99_ms": 1000 * float(np.percentile(single, 99)), "batch_qps": len(queries) / batch_seconds}
            rows.append(row)
            print(f"[search] {row}", file=sys.stderr, flush=True)
            return row

        default = measure(f"default ({index.spec.text})")
        if not index.exact:
            for nprobe in (8, 16, 32, 64, 128):
                index.set_search_params(nprobe=nprobe)
                measure(f"nprobe={nprobe}")
            return {"default": default, "curve": rows}
        index.set_search_params(refine=0)
        measure("nprobe=64,refine=0 (the codes alone)")
        for nprobe in (16, 32, 64, 128):
            for refine in (100, 200, 400, 1000):
                index.set_search_params(nprobe=nprobe, refine=refine)
                measure(f"nprobe={nprobe},refine={refine}")
        return {"default": default, "curve": rows}


    def stage_lookup(self) -> dict[str, Any]:
        from ragkit.index.index import Index

        queries = np.load(self.work / "exact.npz")["queries"][:200]
        index = Index.open(self.index, threads=2)
        for q in queries:  # every query once first: the exact vectors it re-ranks are then in the page cache for both
            [(h.id, h.title, h.text) for row in index.search(q[None, :], K) for h in row]
        ids_only, passages = [], []
        for q in queries:  # alternated, so that neither side is measured in a quieter moment of this shared machine
            began = time.perf_counter()
            index.search_ids(q[None, :], K)
            ids_only.append(1000 * (time.perf_counter() - began))
            began = time.perf_counter()
            [(h.id, h.title, h.text) for row in index.search(q[None, :], K) for h in row]
            passages.append(1000 * (time.perf_counter() - began))
        store_bytes = sum(p.stat().st_size for p in index.version_dir.glob("*.sqlite"))
        return {"ids_p50_ms": float(np.percentile(ids_only, 50)), "ids_p99_ms": float(np.percentile(ids_only, 99)),
                "passages_p50_ms": float(np.percentile(passages, 50)),
                "passages_p99_ms": float(np.percentile(passages, 99)), "store_bytes": store_bytes}

    def stage_model(self) -> dict[str, Any]:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_encoder

        from ragkit.models.encoder import Encoder

        folder = build_tiny_encoder(self.work / "model", hidden=DIM)
        info = Encoder(str(folder), device="cpu").info
        for meta_path in sorted(self.shards.glob("shard-*.json")):
            meta = json.loads(meta_path.read_text())
            meta["encoder"] = info.to_json()
            meta_path.write_text(json.dumps(meta, indent=2))
        return {"model": str(folder), "fingerprint": info.fingerprint}

    def stage_change(self) -> dict[str, Any]:
        """Add 10 new passages, remove 10 that are live, remove the 10 added: each in its own process. Ids are
        chosen afresh on every run, so a redone stage measures the same work (not a replace, not a miss)."""
        from ragkit.index.index import Index

        index = Index.open(self.index)
        run = int(index.manifest["version"])
        added = [f"new-{run}-{i}" for i in range(10)]
        additions = self.work / "add.jsonl"
        additions.write_text("".join(json.dumps({"id": pid, "title": "Added", "text": f"added passage {pid}"}) + "\n"
                                     for pid in added))
        live: list[str] = []
        for offset in range(run, self.n, 7919):  # 10 live passages spread over the collection
            wanted = [f"w{(offset + j * (self.n // 10)) % self.n}" for j in range(10)]
            if len(index.get(wanted)) == 10:
                live = wanted
                break
        del index
        out: dict[str, Any] = {}
        out["add"] = self.measured(["index", "add", str(self.index), str(additions), "--device", "cpu"])
        out["remove"] = self.measured(["index", "remove", str(self.index), "--ids", ",".join(live)])
        out["remove_added"] = self.measured(["index", "remove", str(self.index), "--ids", ",".join(added)])
        for step in ("add", "remove", "remove_added"):
            assert "missing=0" in out[step]["stderr_tail"] or step == "add", out[step]["stderr_tail"]
        assert "added=10" in out["add"]["stderr_tail"], out["add"]["stderr_tail"]
        seconds = []
        for _ in range(2):  # the add's fixed cost; the second run, with the files in the page cache as the add had
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, sentence_transformers"], check=True)
            seconds.append(time.perf_counter() - began)
        out["import_seconds"] = seconds[-1]
        out["after"] = {k: v for k, v in Index.open(self.index).info().items()
                        if k in ("passages", "tombstones", "segments", "bytes_on_disk")}
        return out

    def stage_serve(self) -> dict[str, Any]:
        import asyncio

        sys.path.insert(0, str(REPO / "benchmarks"))
        from serve_load import Server, load

        began = time.perf_counter()
        server = Server(self.index, "--threads", "2")
        opened = time.perf_counter() - began
        rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{server.process.pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
        try:
            words = ["who", "wrote", "river", "city", "music", "born", "what", "where"]
            queries = [" ".join(words[(i + j) % len(words)] for j in range(6)) + f" {i}" for i in range(400)]
            result = asyncio.run(load(server.url, queries, 8, 400, 300.0))
            result["server_peak_rss"] = server.peak_rss_mib() * 2**20
        finally:
            server.stop()
        return {"open_seconds": opened, "rss_after_open": rss, "clients": 8, **result}


    def stage_released(self) -> dict[str, Any]:
        import pickle

        rows, files = self.args.released_rows, 4
        folder = self.work / "released"
        shutil.rmtree(folder, ignore_errors=True)
        embeddings = folder / "embeddings"
        embeddings.mkdir(parents=True)
        queries = self.queries()
        best_scores = np.full((len(queries), K), -np.inf, np.float32)
        best_rows = np.full((len(queries), K), -1, np.int64)
        began = time.perf_counter()
        per_file = -(-rows // files)
        rng = np.random.default_rng(3)
        vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 10)))
                               for _ in range(5_000)])
        with open(folder / "psgs.tsv", "w", encoding="utf-8") as tsv:
            tsv.write("id\ttext\ttitle\n")
            for f in range(files):
                start, end = f * per_file, min(rows, (f + 1) * per_file)
                vectors = np.empty((end - start, DIM), np.float32)
                for b in range(start, end, 65_536):  # exact top-k merged block by block (bounded memory)
                    block = self.generator.rows(b, min(end, b + 65_536))
                    vectors[b - start : b - start + len(block)] = block
                    best_scores, best_rows = merge_top_k(best_scores, best_rows, queries @ block.T,
                                                         np.arange(b, b + len(block)))
                ids = [str(r + 1) for r in range(start, end)]  # psgs_w100's ids count from 1
                with open(embeddings / f"passages_{f:02d}", "wb") as handle:
                    pickle.dump((ids, vectors), handle, protocol=4)
                del vectors
                words = vocabulary[np.random.default_rng([4, f]).integers(0, len(vocabulary), (end - start, 12))]
                tsv.write("".join(f"{r + 1}\t{' '.join(w)}\tPassage {r}\n" for r, w in zip(range(start, end),
                                                                                        words.tolist())))
        written = time.perf_counter() - began
        largest = max(p.stat().st_size for p in embeddings.iterdir())
        out = folder / "index"
        argv = ["index", "build", str(folder / "psgs.tsv"), "--embeddings", str(embeddings), "-o", str(out),
                "--model", str(self.work / "model" / "st"), "--spec", "auto", "--max-memory", "2G"]
        result = self.measured(argv)
        from ragkit.index.index import Index

        index = Index.open(out, threads=2)
        found = index.search_ids(queries, K)
        recall = float(np.mean([len({int(i) - 1 for i, _ in hits} & set(t.tolist())) / K
                                for hits, t in zip(found, best_rows)]))
        summary = {**result, "rows": rows, "files": files, "largest_file_bytes": largest, "write_files_seconds": written,
                   "spec": index.spec.text, "recall_at_10": recall, "index_bytes": disk(out), "argv": argv}
        del index
        shutil.rmtree(folder)
        return summary

    def report(self) -> None:
        """The goals of issue 26 beside what this run measured (stages not run yet show as -)."""
        st = self.state
        build, search, change, serve = (st.get(k, {}) for k in ("build", "search", "change", "serve"))
        plan_row = build.get("estimate", {})

        def val(x: Any, fmt: str) -> str:
            return "-" if x is None else fmt.format(x)

        rows = [
            ["build from shards on disk: peak RSS", "<= 12 GiB", gib(build["peak_rss"]) if "peak_rss" in build else "-"],
            ["build wall time", "<= 2 h", val(build.get("seconds") and build["seconds"] / 60, "{:.1f} min")],
            ["plan's estimate for that spec: build RAM / time", "within 30%",
             f"{gib(plan_row['build_bytes'])} / {plan_row['build_seconds'] / 60:.1f} min" if plan_row else "-"],
            ["serve: RSS after open / time to open", "<= 8 GiB / <= 60 s",
             f"{gib(serve['rss_after_open'])} / {serve['open_seconds']:.1f} s" if serve else "-"],
            ["recall@10, default settings", ">= 0.95", val(search.get("default", {}).get("recall_at_10"), "{:.4f}")],
            ["one query, k=10, 2 threads: p50 / p99", "p50 <= 30 ms",
             f"{search['default']['p50_ms']:.1f} / {search['default']['p99_ms']:.1f} ms" if search else "-"],
            ["serve, 8 clients: p50 / p99", "",
             f"{serve['p50_ms']:.1f} / {serve['p99_ms']:.1f} ms" if serve else "-"],
            ["index add of 10: wall / written", "<= 10 s, <= 50 MB",
             f"{change['add']['seconds']:.1f} s / {change['add']['write_bytes'] / 1e6:.2f} MB" if change else "-"],
            ["released import (Contriever pickles): peak RSS / largest file", "one file + the index",
             f"{gib(st['released']['peak_rss'])} / {gib(st['released']['largest_file_bytes'])}"
             if "released" in st else "-"],
            ["index remove of 10: wall / written", "<= 10 s, <= 50 MB",
             f"{change['remove']['seconds']:.1f} s / {change['remove']['write_bytes'] / 1e6:.2f} MB" if change else "-"],
        ]
        spec = st.get("tune", {}).get("spec") or build.get("spec", "-")
        print_table(f"{self.n:,} x {DIM} on this machine, spec {spec}", ["measure", "goal", "measured"],
                    rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=21_000_000)
    parser.add_argument("--words", type=int, default=16, help="words per synthetic passage (psgs_w100 has 100)")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--spec", default="auto")
    parser.add_argument("--max-memory", default="12G")
    parser.add_argument("--max-build-time", default=None)
    parser.add_argument("--released-rows", type=int, default=2_000_000, help="rows of the released-import stage")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--redo", default="", help="stages to run again even if finished")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    run = Run(args)
    redo = set(filter(None, args.redo.split(",")))
    for stage in args.stages.split(","):
        if stage in run.state and stage not in redo:
            print(f"[{stage}] done before: {run.state[stage]}", file=sys.stderr)
            continue
        print(f"[{stage}] starting", file=sys.stderr, flush=True)
        run.state[stage] = getattr(run, f"stage_{stage}")()
        run.save()
        print(f"[{stage}] {run.state[stage]}", file=sys.stderr, flush=True)
    run.report()


if __name__ == "__main__":
    main()
