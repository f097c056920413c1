"""Reading a corpus as the corpus grows (100k vs 1M JSONL passages of 100 words): ragkit's checked reader
against the floor, side by side in one run.

ragkit decodes every line itself (so that Latin-1, UTF-16 or binary input is an error naming its file and
line, issue 17.5) and checks each passage's fields. The floor is what any reader must do: Python's text
mode and `json.loads` per line, no checks. Each step runs in its own process, so its peak RSS is its own;
the floor's peak is the same flat line (neither holds the corpus).

    python benchmarks/corpus_read.py [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from _common import REPO, hardware, print_table, write_result

WORK = REPO / "benchmarks" / ".work" / "corpus_read"
STEP = """
import json, sys, time
path, which = sys.argv[1], sys.argv[2]
from ragkit.io.corpus import iter_passages_with_lines  # imported before the clock starts, in both steps
began = time.perf_counter()
n = 0
if which == "ragkit":
    for _ in iter_passages_with_lines(path):
        n += 1
else:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                json.loads(line)
                n += 1
seconds = time.perf_counter() - began
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rows": n, "seconds": seconds, "peak_rss": peak}))
"""


def make_corpus(path: Path, n: int) -> None:
    if path.exists():
        return
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            text = " ".join(rng.choices(words, k=100))
            handle.write(json.dumps({"id": str(i), "title": f"t{i}", "text": text}) + "\n")


def measure(path: Path, which: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(path), which], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    args = parser.parse_args()
    rows, results = [], {}
    for n in (int(s) for s in args.sizes.split(",")):
        path = WORK / f"corpus-{n}.jsonl"
        make_corpus(path, n)
        floor, ours = measure(path, "floor"), measure(path, "ragkit")
        assert floor["rows"] == ours["rows"] == n
        results[n] = {"floor": floor, "ragkit": ours, "bytes": path.stat().st_size,
                      "ratio_seconds": ours["seconds"] / floor["seconds"]}
        rows.append([f"{n:,}", f"{floor['seconds']:.2f}", f"{ours['seconds']:.2f}", f"{results[n]['ratio_seconds']:.2f}",
                     f"{floor['peak_rss'] / 2**20:.0f}", f"{ours['peak_rss'] / 2**20:.0f}",
                     f"{n / ours['seconds']:,.0f}"])
    print_table("corpus read: ragkit's checked reader vs text mode + json.loads",
                ["passages", "floor s", "ragkit s", "ratio", "floor MiB", "ragkit MiB", "ragkit passages/s"], rows)
    write_result("corpus_read", {"hardware": hardware(), "sizes": results})


if __name__ == "__main__":
    main()
