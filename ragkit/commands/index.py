"""`ragkit index build|add|remove|search|info`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ragkit.commands._common import (BatchOpt, DenseWeightOpt, DeviceOpt, EfSearchOpt, EncoderBackendOpt, FusionOpt, JsonOpt,
                                     NprobeOpt, PoolingOpt, RefineOpt, ThreadsOpt, WaitOpt, handle_errors)

if TYPE_CHECKING:
    from ragkit.models.encoder import Encoder

app = typer.Typer(help="Build, change, search and inspect a ragkit index (one directory).", no_args_is_help=True)

IndexDir = Annotated[Path, typer.Argument(help="Index directory.")]


@contextlib.contextmanager
def _embedding_progress(encoder: "Encoder", total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr fed by `on_block(n)` callbacks, and the throughput line after it."""
    from ragkit.console import info, progress
    from ragkit.models.encoder import Throughput

    meter = Throughput()
    with progress() as bar:
        task = bar.add_task("embed", total=total, rate="")

        def step(n: int) -> None:
            meter.add(n)
            bar.update(task, advance=n, rate=f"{meter.rate:.0f}/s")

        yield step
    info(f"embedded {meter.count} passages in {meter.seconds:.1f}s ({meter.rate:.1f} passages/s, {encoder.device})")


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    from ragkit.console import info

    if as_json:
        sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
    else:
        info(" ".join(f"{k}={v}" for k, v in summary.items()))


@app.command("build")
def build(
    output: Annotated[Path, typer.Option("--output", "-o", help="Index directory to create (required).")],
    corpus: Annotated[str | None, typer.Argument(help="Corpus: JSONL, BEIR folder/corpus.jsonl, DPR TSV, or - for stdin.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Embedder: hub id, local folder or alias (minilm).")] = "minilm",
    spec: Annotated[str, typer.Option("--spec", help="flat, hnsw[:M=32,ef_search=128], ivf-pq[:nlist=,m=,nprobe=,hnsw=,refine=], auto, or a Faiss factory string. ivf-pq's refine=R keeps the vectors on disk and re-ranks R candidates exactly; hnsw=M (default 32 from 4096 lists, 0 = exact) is its coarse quantiser.")] = "flat",
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="Memory budget for the vectors, e.g. 2G (auto picks within it; default half the RAM).")] = None,
    max_build_time: Annotated[str | None, typer.Option("--max-build-time", help="Build-time budget, e.g. 45m or 2h: auto picks an index whose estimated build (`ragkit index plan`) fits; another spec over it is refused. Default: none.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="ip (inner product; cosine when normalised) or l2.")] = "ip",
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help="Use precomputed shards from `ragkit embed` instead of embedding CORPUS; or a folder of released Contriever/DPR embeddings (passages_XX, read without running pickle code), matched by id to CORPUS, embedder named by --model.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise embeddings.")] = True,
    query_model: Annotated[str | None, typer.Option("--query-model", help="A separate query encoder, recorded with the index so that searches use it (a DPR pair: --model the context encoder, --query-model the question encoder, --no-normalize). Default: --model embeds queries too.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index (atomically).")] = False,
    sparse: Annotated[bool, typer.Option("--sparse", help="Also build a BM25 side (bm25s) for --retrieval-mode sparse|hybrid, kept in step with add/remove.")] = False,
    bm25_k1: Annotated[float, typer.Option("--bm25-k1", min=0.0, help="BM25 k1 (with --sparse).")] = 1.5,
    bm25_b: Annotated[float, typer.Option("--bm25-b", min=0.0, max=1.0, help="BM25 b (with --sparse).")] = 0.75,
    backend: EncoderBackendOpt = "torch",
    pooling: PoolingOpt = "model",
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build an index from a corpus (embedding it) or from precomputed embedding shards.

    Examples:

      ragkit index build passages.jsonl -o idx/

      ragkit index build corpus.jsonl -o idx/ --spec auto --max-memory 2G

      ragkit index build --embeddings emb/ -o idx/ --spec hnsw:M=32

      cat corpus.jsonl | ragkit index build - -o idx/

      ragkit index build corpus.jsonl -o idx/ --sparse      # dense + BM25, for hybrid search

      ragkit index build psgs_w100.tsv --embeddings wikipedia_embeddings/ -m facebook/contriever --no-normalize -o idx/

      ragkit index build psgs_w100.tsv -m facebook/dpr-ctx_encoder-single-nq-base --query-model facebook/dpr-question_encoder-single-nq-base --no-normalize -o idx/
    """
    with handle_errors():
        from ragkit.errors import UsageError
        from ragkit.index import Index, parse_memory, parse_spec
        from ragkit.index.sparse import SparseConfig
        from ragkit.io.corpus import resolve_corpus_path
        from ragkit.io.jsonl import display_name
        from ragkit.embeddings import build_index
        from ragkit.models.encoder import Encoder, resolve_device, with_query_encoder

        from ragkit.index.layout import refuse_if_busy

        from ragkit.index.build_time import parse_duration

        parsed = parse_spec(spec)
        budget = parse_memory(max_memory)
        seconds = parse_duration(max_build_time)
        Index.check_target(output, metric=metric, overwrite=overwrite)  # before a model loads or a line is read
        refuse_if_busy(output, wait)
        from ragkit.index.released import import_released, released_files

        released = embeddings is not None and bool(released_files(embeddings))
        if released and corpus is None:
            raise UsageError(f"--embeddings {embeddings} holds released embeddings (passages_XX): give the passage "
                             "file they embed as CORPUS (e.g. psgs_w100.tsv), and the embedder with --model")
        if not released and (corpus is None) == (embeddings is None):
            raise UsageError("give either CORPUS or --embeddings DIR (exactly one), or CORPUS with --embeddings DIR of "
                             "released embeddings")
        faiss_device = resolve_device(device)
        options = dict(spec=parsed, metric=metric, max_memory=budget, max_build_time=seconds, overwrite=overwrite,
                       threads=threads or None,
                       device=faiss_device, sparse=SparseConfig(k1=bm25_k1, b=bm25_b) if sparse else None)
        query_encoder = (Encoder(query_model, device=faiss_device, normalize=normalize, backend=backend)
                         if query_model else None)
        if released:
            assert corpus is not None and embeddings is not None
            encoder_info = with_query_encoder(
                Encoder(model, device=faiss_device, normalize=normalize, backend=backend, pooling=pooling).info,
                query_encoder)
            with Index.create(output, encoder_info, source=display_name(resolve_corpus_path(corpus)), **options) as build:
                import_released(build, corpus, embeddings)
            index = build.index
        elif embeddings is not None:
            from ragkit.embeddings import open_shards

            if pooling != "model":
                raise UsageError(f"--pooling {pooling}: `ragkit embed` shards record how they were pooled; "
                                 "give --pooling to `ragkit embed`")
            shards = open_shards(embeddings)
            if query_encoder is not None and query_encoder.normalize != shards.encoder.normalize:
                raise UsageError(f"--query-model: the shards in {embeddings} were embedded with normalize="
                                 f"{shards.encoder.normalize}; give the same --normalize/--no-normalize")
            record = with_query_encoder(shards.encoder, query_encoder)
            with Index.create(output, record, source=str(embeddings), **options) as build:
                for block, vectors, lines, source, origin in shards.blocks():
                    build.add(block, vectors, lines=lines, source=source, origin=origin)
            index = build.index
        else:
            assert corpus is not None
            _refuse_too_small_for(parsed, corpus)  # before the model loads and the corpus is embedded
            encoder = Encoder(model, device=faiss_device, normalize=normalize, backend=backend, pooling=pooling)
            with _embedding_progress(encoder, None) as step:
                index = build_index(output, corpus, encoder, batch_size=batch_size, on_block=step,
                                    query_encoder=query_encoder, **options)
        assert index is not None
        summary = {k: index.info()[k] for k in ("path", "passages", "spec", "factory", "dim", "embedder", "bytes_on_disk")}
        if index.manifest.get("auto_reason"):
            summary["auto"] = index.manifest["auto_reason"]
        if index.manifest.get("build_phases"):  # seconds per phase, beside `index plan`'s estimate
            phases = index.manifest["build_phases"]
            summary["phases"] = phases if as_json else ",".join(f"{k}:{v:.0f}s" for k, v in phases.items())
        _print_summary(summary, as_json)


def _refuse_too_small_for(spec: Any, corpus: str) -> None:
    """IVF-PQ trains on at least MIN_PQ_TRAIN vectors: look at that many passages (not the whole corpus) first."""
    import itertools

    from ragkit.index.spec import MIN_PQ_TRAIN, check_trainable
    from ragkit.io.corpus import iter_passages_with_lines

    if spec.kind != "ivf-pq" or corpus == "-":
        return
    seen = sum(1 for _ in itertools.islice(iter_passages_with_lines(corpus, allow_empty=True), MIN_PQ_TRAIN))
    check_trainable(spec, seen)


@app.command("add")
def add(
    index_dir: IndexDir,
    corpus: Annotated[str, typer.Argument(help="Passages to add; an existing id is replaced (upsert). - for stdin.")],
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Add or replace passages by id, embedding them with the index's own model.

    Examples:

      ragkit index add idx/ new_passages.jsonl

      cat fixes.jsonl | ragkit index add idx/ -
    """
    with handle_errors():
        from ragkit.index import Index
        from ragkit.io.corpus import read_passages
        from ragkit.models.encoder import Encoder

        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        refuse_if_busy(index.root, wait)  # before reading and embedding; a writer that sneaks in after is rebased over
        passages = read_passages(corpus)
        encoder = Encoder.for_index(index, device=device)
        with _embedding_progress(encoder, len(passages)) as step:
            vectors = encoder.encode([p.embedding_text() for p in passages], batch_size=batch_size, on_block=step)
        report = index.upsert(passages, vectors, encoder.info)
        _print_summary(
            {"added": report.added, "replaced": report.replaced, "passages": len(index), "compacted": report.compacted},
            as_json,
        )


@app.command("remove")
def remove(
    index_dir: IndexDir,
    ids: Annotated[str | None, typer.Option("--ids", help="Comma-separated passage ids.")] = None,
    ids_file: Annotated[str | None, typer.Option("--ids-file", help="File with one id per line (or JSONL with `id`); - for stdin.")] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove passages by id (ids that are not there are reported, not an error).

    Examples:

      ragkit index remove idx/ --ids doc1,doc7

      ragkit index remove idx/ --ids-file stale_ids.txt
    """
    with handle_errors():
        from ragkit.console import info
        from ragkit.errors import UsageError
        from ragkit.index import Index

        wanted: list[str] = []
        if ids:
            wanted += [i.strip() for i in ids.split(",") if i.strip()]
        if ids_file:
            wanted += _read_ids(ids_file)
        if not wanted:
            raise UsageError("give --ids a,b,c or --ids-file FILE")
        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        refuse_if_busy(index.root, wait)
        report = index.remove(wanted)
        if report.missing:
            shown = ", ".join(report.missing[:5]) + (" ..." if len(report.missing) > 5 else "")
            info(f"warning: {len(report.missing)} id(s) not in the index: {shown}")
        _print_summary(
            {"removed": report.removed, "missing": len(report.missing), "passages": len(index), "compacted": report.compacted},
            as_json,
        )


def _read_ids(path: str) -> list[str]:
    """One id per line, or JSONL objects with `id`."""
    from ragkit.errors import InputError, Location
    from ragkit.io.jsonl import display_name, iter_records

    out = []
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            out.append(record)
        elif "id" in record:
            out.append(str(record["id"]))
        else:
            raise InputError(Location(display_name(path), lineno, "id"), "field 'id' is missing")
    return out


@app.command("search")
def search(
    index_dir: IndexDir,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Hits per query.")] = 10,
    queries: Annotated[str, typer.Option("--queries", "-q", help="Queries file (JSONL with query/question, or plain lines); - for stdin.")] = "-",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Query embedder; must be the model that built the index, or its recorded query encoder (default: that model).")] = None,
    ef_search: EfSearchOpt = 0,
    nprobe: NprobeOpt = 0,
    refine: RefineOpt = -1,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    output_format: Annotated[str, typer.Option("--format", help="jsonl (one line per query on stdout) or table (human, on stdout).")] = "jsonl",
    mode: Annotated[str, typer.Option("--mode", help="dense (embedder + Faiss), sparse (BM25 side) or hybrid (both, fused).")] = "dense",
    fusion: FusionOpt = "rrf",
    dense_weight: DenseWeightOpt = 0.5,
    backend: EncoderBackendOpt = "torch",
) -> None:
    """Search with queries from stdin or a file; one JSONL line of hits per query on stdout.

    Examples:

      cat queries.jsonl | ragkit index search idx/ --k 5

      echo "who wrote Hamlet" | ragkit index search idx/ --format table

      ragkit index search idx/ -q questions.jsonl --k 20 --nprobe 32 > hits.jsonl

      ragkit index search idx/ -q questions.jsonl --mode hybrid --fusion rrf --dense-weight 0.5
    """
    with handle_errors():
        from ragkit.errors import UsageError
        from ragkit.index import Index
        from ragkit.io.jsonl import batches_as_ready
        from ragkit.io.queries import iter_queries
        from ragkit.models.encoder import resolve_device
        from ragkit.retrieval.retriever import RetrievalMode, Retriever

        if output_format not in ("jsonl", "table"):
            raise UsageError(f"--format {output_format}: expected jsonl or table")
        torch_device = resolve_device(device)
        index = Index.open(index_dir, device=torch_device, threads=threads or None)
        index.set_search_params(ef_search=ef_search or None, nprobe=nprobe or None, refine=None if refine < 0 else refine)
        retriever = Retriever(index, model=model, device=torch_device, batch_size=batch_size,
                              mode=RetrievalMode.checked(mode, fusion, dense_weight, mode_flag="--mode"), backend=backend)

        count = 0

        def flush(block: list[Any]) -> None:
            nonlocal count
            for query, hits in zip(block, retriever.retrieve([q.text for q in block], k)):
                count += 1
                row = {"id": query.id if query.id is not None else str(count), "query": query.text, **query.extra,
                       "hits": [h.to_json() for h in hits]}
                if output_format == "jsonl":
                    sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    _print_table(row)
            sys.stdout.flush()

        for block in batches_as_ready(iter_queries(queries), 256):  # a pause in the input answers at once
            flush(block)


def _print_table(row: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{row['query']}", title_justify="left", show_lines=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("id")
    table.add_column("passage", overflow="fold")
    for hit in row["hits"]:
        text = (hit["title"] + ": " if hit["title"] else "") + hit["text"]
        table.add_row(str(hit["rank"]), f"{hit['score']:.3f}", hit["id"], text[:300] + ("…" if len(text) > 300 else ""))
    Console(highlight=False).print(table)


@app.command("refresh")
def refresh(
    index_dir: IndexDir,
    model: Annotated[str, typer.Option("--model", "-m", help="The new embedder (e.g. a `ragkit train --arch embedder` checkpoint's embedder/ folder).")],
    query_model: Annotated[str | None, typer.Option("--query-model", help="Its separate query encoder (required when the index records one, e.g. a DPR pair). Default: --model embeds queries too.")] = None,
    backend: EncoderBackendOpt = "torch",
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-embed every passage with a new embedder and swap the vectors in place (same spec, same ids).

    Streamed with progress; crash-safe: the old version serves searches until the new one is complete.

    Examples:

      ragkit index refresh idx/ --model runs/embedder/final/embedder
    """
    with handle_errors():
        from ragkit.console import info, progress
        from ragkit.index import Index
        from ragkit.errors import UsageError
        from ragkit.models.encoder import Encoder, Throughput, resolve_device, with_query_encoder

        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        if index.encoder.query is not None and query_model is None:
            raise UsageError(f"{index.root} embeds its queries with a separate model ({index.encoder.query.name}): "
                             "give --query-model (that one or a new one) with the new passage embedder")
        refuse_if_busy(index.root, wait)
        encoder = Encoder(model, device=resolve_device(device), normalize=index.encoder.normalize, backend=backend)
        query = (Encoder(query_model, device=encoder.device, normalize=index.encoder.normalize, backend=backend)
                 if query_model else None)
        record = with_query_encoder(encoder.info, query)
        meter = Throughput()
        with progress() as bar:
            task = bar.add_task("re-embed", total=len(index), rate="")

            def encode(texts: list[str]) -> Any:
                vectors = encoder.encode(texts, batch_size=batch_size)
                meter.add(len(texts))
                bar.update(task, advance=len(texts), rate=f"{meter.rate:.1f} passages/s")
                return vectors

            count = index.refresh(encode, record)
        info(f"re-embedded {count} passages in {meter.seconds:.1f}s ({meter.rate:.1f} passages/s)")
        _print_summary({k: index.info()[k] for k in ("path", "version", "passages", "embedder", "dim", "spec")}, as_json)


@app.command("sparse")
def sparse_cmd(
    index_dir: IndexDir,
    bm25_k1: Annotated[float, typer.Option("--bm25-k1", min=0.0, help="BM25 k1.")] = 1.5,
    bm25_b: Annotated[float, typer.Option("--bm25-b", min=0.0, max=1.0, help="BM25 b.")] = 0.75,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Give an existing index a BM25 side (or rebuild it with new parameters), as a new atomic version.

    Examples:

      ragkit index sparse idx/

      ragkit index sparse idx/ --bm25-k1 0.9 --bm25-b 0.4
    """
    with handle_errors():
        from ragkit.index import Index
        from ragkit.index.sparse import SparseConfig

        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        refuse_if_busy(index.root, wait)
        index.add_sparse(SparseConfig(k1=bm25_k1, b=bm25_b))
        _print_summary({k: index.info()[k] for k in ("path", "version", "passages", "sparse", "bytes_on_disk")}, as_json)


@app.command("tune")
def tune_cmd(
    index_dir: IndexDir,
    ef_search: EfSearchOpt = 0,
    nprobe: NprobeOpt = 0,
    refine: RefineOpt = -1,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pin new default search settings in the index (a new atomic version; nothing is rebuilt).

    Every later search, `ragkit serve` and Ray actors use them. They only change how a search runs, so an
    index built before a default changed gets exactly the new default's results.

    Examples:

      ragkit index tune wiki/ --nprobe 64 --refine 400

      ragkit index tune idx/ --ef-search 256
    """
    with handle_errors():
        from ragkit.index import Index
        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        refuse_if_busy(index.root, wait)
        index.tune(ef_search=ef_search or None, nprobe=nprobe or None, refine=None if refine < 0 else refine)
        _print_summary({k: index.info()[k] for k in ("path", "version", "spec")}, as_json)


@app.command("compact")
def compact_cmd(index_dir: IndexDir, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Fold the delta segments back into one base and drop tombstones (a new atomic version).

    Changes (add, remove) write small delta segments; ragkit folds them by itself past 8 deltas (the base
    untouched) or once a fifth of the vectors are dead or the deltas outgrow the base (everything).

    Examples:

      ragkit index compact idx/
    """
    with handle_errors():
        import time

        from ragkit.index import Index

        from ragkit.index.layout import refuse_if_busy

        index = Index.open(index_dir)
        refuse_if_busy(index.root, wait)
        before = index.info()
        began = time.perf_counter()
        index.compact()
        after = index.info()
        _print_summary({"path": after["path"], "version": after["version"], "passages": after["passages"],
                        "segments_before": before["segments"], "segments": after["segments"],
                        "tombstones_dropped": before["tombstones"], "seconds": round(time.perf_counter() - began, 2)},
                       as_json)


@app.command("plan")
def plan_cmd(
    corpus: Annotated[str | None, typer.Argument(help="Corpus to size (its passages are counted and their text measured); or give --passages.")] = None,
    passages: Annotated[int, typer.Option("--passages", "-n", min=0, help="Number of passages (0: count CORPUS or --embeddings).")] = 0,
    dim: Annotated[int, typer.Option("--dim", min=0, help="Vector dimension (0: from --embeddings, else --model's).")] = 0,
    model: Annotated[str, typer.Option("--model", "-m", help="Embedder whose dimension to use when --dim is not given.")] = "minilm",
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help="Size precomputed shards from `ragkit embed`.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="Memory budget, e.g. 64G (default: half the RAM).")] = None,
    max_build_time: Annotated[str | None, typer.Option("--max-build-time", help="Build-time budget for auto, e.g. 2h (default: none).")] = None,
    passage_bytes: Annotated[int, typer.Option("--passage-bytes", min=1, help="Average stored bytes per passage when no CORPUS is read (600: a 100-word passage).")] = 600,
    as_json: JsonOpt = False,
) -> None:
    """Estimate, for each index spec, the RAM to build, the RAM to serve and the disk, what fits
    --max-memory, what `--spec auto` takes and when to shard across Ray actors; builds nothing.

    Examples:

      ragkit index plan --passages 21000000 --dim 768 --max-memory 64G

      ragkit index plan corpus.jsonl --model minilm

      ragkit index plan --embeddings emb/ --max-memory 8G --json
    """
    with handle_errors():
        from ragkit.console import stderr
        from ragkit.errors import UsageError
        from ragkit.index import parse_memory
        from ragkit.index.plan import plan, render

        n = passages
        text_bytes = passage_bytes
        if embeddings is not None:
            from ragkit.embeddings import open_shards

            shards = open_shards(embeddings)
            n = n or shards.rows
            dim = dim or shards.encoder.dim
        if corpus is not None and not n:
            from ragkit.io.corpus import iter_passages_with_lines

            total = 0
            for _, p in iter_passages_with_lines(corpus):
                n += 1
                total += len(p.id) + len(p.title.encode()) + len(p.text.encode()) + 2
            text_bytes = max(1, total // max(1, n))
        if not n:
            raise UsageError("give --passages N, a CORPUS or --embeddings DIR")
        if not dim:
            from ragkit.models.encoder import Encoder

            dim = Encoder(model, device="cpu").info.dim
        from ragkit.index.build_time import parse_duration

        result = plan(n, dim, max_memory=parse_memory(max_memory), max_seconds=parse_duration(max_build_time),
                      passage_bytes=text_bytes)
        if as_json:
            sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
            return
        stderr.print(render(result))
        for line in result["advice"]:
            stderr.print(f"- {line}")


@app.command("info")
def info_cmd(
    index_dir: IndexDir,
    as_json: JsonOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's sha256 against the manifest.")] = False,
) -> None:
    """Describe an index: counts, spec, embedder, size on disk.

    Examples:

      ragkit index info idx/

      ragkit index info idx/ --json | jq .passages
    """
    with handle_errors():
        from rich.table import Table

        from ragkit.console import stderr
        from ragkit.errors import ResourceError
        from ragkit.index import Index

        index = Index.open(index_dir)
        details = index.info()
        if verify:
            bad = index.verify()
            if bad:
                raise ResourceError(f"{index.version_dir}: checksum mismatch in {', '.join(bad)}")
            details["verified"] = True
        if as_json:
            sys.stdout.write(json.dumps(details, ensure_ascii=False) + "\n")
            return
        table = Table(title=str(index_dir), show_header=False, title_justify="left")
        for key, value in details.items():
            table.add_row(key, str(value))
        stderr.print(table)
