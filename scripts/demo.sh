#!/usr/bin/env bash
# The main job of `make run`: index the shipped sample corpus with the shipped MiniLM embedder and answer
# the sample questions with their top passages.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGKIT="${VENV:-.venv}/bin/ragkit"
OUT=.ragkit-demo
"$RAGKIT" index build examples/sample/passages.jsonl -o "$OUT/index" --model minilm --spec flat --overwrite
"$RAGKIT" index info "$OUT/index"
"$RAGKIT" index search "$OUT/index" --k 3 --queries examples/sample/queries.jsonl > "$OUT/hits.jsonl"
"$RAGKIT" index search "$OUT/index" --k 3 --queries examples/sample/queries.jsonl --format table
# Retrieve-then-read with the shipped SmolLM2-135M-Instruct (its GGUF is converted once and cached).
"$RAGKIT" generate examples/sample/queries.jsonl --arch rag --index "$OUT/index" --k 3 --table > "$OUT/answers.jsonl"
"$RAGKIT" eval --task popqa --data examples/sample/queries.jsonl --predictions "$OUT/answers.jsonl" -o "$OUT/report.json"
echo "ragkit demo: hits in $OUT/hits.jsonl, answers in $OUT/answers.jsonl, scores in $OUT/report.json" >&2
