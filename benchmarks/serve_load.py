"""Load test of `ragkit serve` on localhost: N concurrent clients, p50/p99 latency and QPS, with and without
micro-batching, against in-process `Retriever.retrieve` on the same queries (one at a time, and in blocks
of 64: the floor and the ceiling a server can reach), plus one run during which `ragkit index add`
publishes a new version (nothing may be lost, every response names one version).

The server is the real command (`ragkit serve`, uvicorn, its own process); the clients are asyncio httpx
in this process, so on a 2-core machine they compete with the server for the CPU (written in the table's
notes). Queries are real PopQA questions (../shared/data/popqa). The index holds N passages with
synthetic vectors stamped with the shipped MiniLM's fingerprint, so the server embeds each query with the
real model and searches a real flat or HNSW index; the texts are synthetic (retrieval quality is not what
this measures).

    python benchmarks/serve_load.py [--n 100000] [--spec flat] [--requests 600] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, SHARED_DATA, WORK, hardware, peak_rss_mib, print_table, write_result


def build_index(root: Path, n: int, spec: str) -> Path:
    from ragkit.index import Index
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import Encoder

    target = root / f"serve-{spec}-{n}"
    if (target / "current").exists():
        return target
    info = Encoder("minilm", device="cpu").info
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, info.dim)).astype(np.float32)
    x = centers[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, info.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    words = "river king war city music film science player club book queen poet".split()
    passages = [Passage(f"p{i}", " ".join(words[(i + j) % len(words)] for j in range(40)), f"passage {i}")
                for i in range(n)]
    Index.build(target, passages, x, info, spec=spec)
    return target


def questions(count: int) -> list[str]:
    rows = (json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa.jsonl").open(encoding="utf-8"))
    return [row["question"] for _, row in zip(range(count), rows)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process(index: Path, queries: list[str]) -> dict[str, Any]:
    from ragkit.index import Index
    from ragkit.retrieval.retriever import Retriever

    retriever = Retriever(Index.open(index).load(), device="cpu")
    retriever.retrieve(queries[:8], 10)  # warm-up
    alone, latencies = float("inf"), []
    for _ in range(2):  # the better of two passes (a shared, noisy machine)
        times = []
        t0 = time.perf_counter()
        for q in queries:
            began = time.perf_counter()
            [h.to_json() for h in retriever.retrieve([q], 10)[0]]
            times.append(time.perf_counter() - began)
        if time.perf_counter() - t0 < alone:
            alone, latencies = time.perf_counter() - t0, times
    t0 = time.perf_counter()
    for i in range(0, len(queries), 64):
        [[h.to_json() for h in row] for row in retriever.retrieve(queries[i:i + 64], 10)]
    blocks = time.perf_counter() - t0
    return {"alone_qps": len(queries) / alone, "alone_p50_ms": 1000 * percentile(latencies, 50),
            "alone_p99_ms": 1000 * percentile(latencies, 99), "blocks_qps": len(queries) / blocks}


class Server:
    def __init__(self, index: Path, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "serve", str(index), "--port",
                                         str(self.port), "--device", "cpu", "--timeout", "60", *flags],
                                        stderr=subprocess.PIPE, text=True, cwd=REPO)
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("ragkit serve did not come up")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)


async def load(url: str, queries: list[str], concurrency: int, requests: int, time_limit_s: float,
               during: Any = None) -> dict[str, Any]:
    """`concurrency` clients, each sending one query per request until `requests` are sent (or the time
    limit); with `during`, a blocking callable run meanwhile, the clients keep going until 1 s after it
    returned, however many requests that takes."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    versions: set[int] = set()
    sent = 0
    deadline = time.perf_counter() + time_limit_s
    finished = asyncio.Event()

    def more() -> bool:
        if time.perf_counter() >= deadline:
            return False
        return not finished.is_set() if during is not None else sent < requests

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while more():
            q = queries[sent % len(queries)]
            sent += 1
            began = time.perf_counter()
            response = await http.post(url + "/search", json={"query": q, "k": 10})
            latencies.append(time.perf_counter() - began)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                versions.add(response.json()["version"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await http.post(url + "/search", json={"query": "warm up", "k": 10})
        before = (await http.get(url + "/info")).json()["batching"]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        if during is not None:
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, during)
            await asyncio.sleep(1.0)
            finished.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        after = (await http.get(url + "/info")).json()["batching"]
    batches = after["batches"] - before["batches"] - 1  # less the /info call's own batch
    return {"qps": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "requests": len(latencies), "statuses": statuses,
            "versions": sorted(versions), "batches": batches,
            "mean_batch": round((after["queries"] - before["queries"] - 1) / max(1, batches), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--spec", default="flat")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per run at most")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    WORK.mkdir(parents=True, exist_ok=True)
    index = build_index(WORK, args.n, args.spec)
    queries = questions(args.requests)
    floor = in_process(index, queries)
    rows: list[list[Any]] = [["in-process, one query per call", 1, floor["alone_qps"], floor["alone_p50_ms"],
                              floor["alone_p99_ms"], 1.0, "", ""],
                             ["in-process, 64 per call", 1, floor["blocks_qps"], "", "",
                              floor["blocks_qps"] / floor["alone_qps"], "", ""]]
    runs: list[dict[str, Any]] = []
    for label, flags in (("serve, no micro-batching", ["--max-batch", "1", "--batch-window-ms", "0"]),
                         ("serve, micro-batching (0 ms, 64)", ["--batch-window-ms", "0"]),
                         ("serve, micro-batching (5 ms, 64)", ["--batch-window-ms", "5"])):
        server = Server(index, *flags)
        try:
            for c in levels:
                result = asyncio.run(load(server.url, queries, c, args.requests, args.time_limit))
                runs.append({"server": label, "concurrency": c, **result})
                rows.append([label, c, result["qps"], result["p50_ms"], result["p99_ms"],
                             result["qps"] / floor["alone_qps"], result["mean_batch"],
                             ",".join(f"{k}:{v}" for k, v in sorted(result["statuses"].items()))])
            if label.startswith("serve, micro-batching (0"):
                extra = WORK / "serve-add.jsonl"
                extra.write_text("".join(json.dumps({"id": f"new-{i}", "text": f"added passage {i}"}) + "\n"
                                         for i in range(10)))

                def add() -> None:
                    subprocess.run([sys.executable, "-m", "ragkit.cli", "index", "add", str(index), str(extra),
                                    "--device", "cpu"], check=True, capture_output=True)

                c = max(levels)
                result = asyncio.run(load(server.url, queries, c, args.requests, args.time_limit, during=add))
                runs.append({"server": label + ", index add publishing", "concurrency": c, **result})
                rows.append([label + " + index add", c, result["qps"], result["p50_ms"], result["p99_ms"],
                             result["qps"] / floor["alone_qps"], result["mean_batch"],
                             ",".join(f"{k}:{v}" for k, v in sorted(result["statuses"].items()))
                             + f" versions {result['versions']}"])
                subprocess.run([sys.executable, "-m", "ragkit.cli", "index", "remove", str(index), "--ids",
                                ",".join(f"new-{i}" for i in range(10))], check=True, capture_output=True)
            runs[-1]["server_peak_rss_mib"] = server.peak_rss_mib()
        finally:
            server.stop()
    print_table(f"ragkit serve on localhost: {args.n:,} passages ({args.spec}), MiniLM query encoding, k=10, "
                f"{args.requests} PopQA questions per run",
                ["path", "clients", "QPS", "p50 ms", "p99 ms", "x in-process alone", "mean batch", "statuses"], rows)
    payload = {"hardware": hardware(), "n": args.n, "spec": args.spec, "requests": args.requests,
               "in_process": floor, "runs": runs, "bench_peak_rss_mib": peak_rss_mib(),
               "notes": "clients (asyncio httpx) share the machine's cores with the server"}
    print(f"server peak RSS {[r.get('server_peak_rss_mib') for r in runs if 'server_peak_rss_mib' in r]} MiB; "
          f"wrote {write_result(f'serve_load_{args.spec}_{args.n}', payload)}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
