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
echo "ragkit demo: hits as JSONL in $OUT/hits.jsonl" >&2
