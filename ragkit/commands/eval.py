"""`ragkit eval`: score predictions (stdin / --predictions) or run generation itself; `ragkit eval compare`."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ragkit.commands._common import BatchOpt, DenseWeightOpt, DeviceOpt, FusionOpt, JsonOpt, RetrievalModeOpt, handle_errors
from ragkit.commands.generate import (
    ArchOpt, BackendOpt, BeamOpt, CompatOpt, DepthOpt, DtypeOpt, GroundOpt, IgnoreContOpt, IndexOpt, KOpt, LimitOpt,
    LongFormOpt, MaxNewOpt, ModeOpt, PassagesOpt, PassageWordsOpt, QuantizeOpt, RemoteOpt, SeedOpt, SeqScoreOpt,
    StopOpt, TemplateOpt, TensorParallelOpt, ThresholdOpt, UtilityOpt, WRelOpt, WSupOpt, WUseOpt,
)

app = typer.Typer(no_args_is_help=False)


def _print_metrics(title: str, report: dict[str, Any]) -> None:
    from rich.table import Table

    from ragkit.console import stderr

    table = Table(title=title, title_justify="left")
    for col in ("metric", "mean", "95% CI", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in report["metrics"].items():
        star = " *" if name == report["primary_metric"] else ""
        table.add_row(name + star, f"{m['mean']:.4f}", f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]", str(m["n"]))
    stderr.print(table)


@app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option("--task", help="popqa, triviaqa, nq, arc_c, pubhealth (fever: the Self-RAG scripts' name for it), scifact, asqa, qa (any JSONL with answers), beir, lm (held-out text for a RETRO model).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The task's data file (a BEIR folder for --task beir; a text folder or file for --task lm).")] = None,
    glob: Annotated[str, typer.Option("--glob", help="--task lm: files of a --data folder to read (.jsonl: one document per line).")] = "**/*.txt",
    workdir: Annotated[Path | None, typer.Option("--workdir", help="--task lm: the RETRO work folder to retrieve from (default: the model's).")] = None,
    predictions: Annotated[str | None, typer.Option("--predictions", help="`ragkit generate` (or `ragkit index search` for beir) output; default stdin unless --model is given.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Run generation with this model instead of reading predictions.")] = None,
    arch: ArchOpt = "none",
    index: IndexOpt = None,
    k: KOpt = 5,
    passages: PassagesOpt = "auto",
    split: Annotated[str, typer.Option("--split", help="BEIR qrels split (qrels/SPLIT.tsv).")] = "test",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON report here (per-example rows, aggregates, config).")] = None,
    label: Annotated[str | None, typer.Option("--label", help="Name of this run in comparisons (default: the report's file name).")] = None,
    limit: LimitOpt = 0,
    max_new_tokens: MaxNewOpt = 32,
    stop: StopOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    backend: BackendOpt = "transformers",
    tensor_parallel_size: TensorParallelOpt = 1,
    quantize: QuantizeOpt = "none",
    template: TemplateOpt = None,
    max_passage_words: PassageWordsOpt = 150,
    seed: SeedOpt = 0,
    trust_remote_code: RemoteOpt = False,
    mode: ModeOpt = "adaptive_retrieval",
    threshold: ThresholdOpt = 0.2,
    w_rel: WRelOpt = None,
    w_sup: WSupOpt = None,
    w_use: WUseOpt = None,
    use_groundness: GroundOpt = None,
    use_utility: UtilityOpt = None,
    use_seqscore: SeqScoreOpt = None,
    compat_upstream: CompatOpt = False,
    long_form: LongFormOpt = None,
    beam_width: BeamOpt = 2,
    max_depth: DepthOpt = 6,
    ignore_cont: IgnoreContOpt = False,
    retrieval_mode: RetrievalModeOpt = "dense",
    fusion: FusionOpt = "rrf",
    dense_weight: DenseWeightOpt = 0.5,
    factscore_out: Annotated[Path | None, typer.Option("--factscore-out", help="--task factscore: where to write the generations in FActScore's format ({topic, output} lines; default: beside -o, REPORT.factscore.jsonl).", show_default=False)] = None,
    factscore_db: Annotated[Path | None, typer.Option("--factscore-db", help="--task factscore: FActScore's knowledge source (enwiki-20230401.db); with the factscore package installed, FActScore scores the file.", show_default=False)] = None,
    factscore_model: Annotated[str, typer.Option("--factscore-model", help="--task factscore: FActScore's model_name.")] = "retrieval+ChatGPT",
    sample: Annotated[int, typer.Option("--sample", min=0, help="Score a random sample of this many examples (0: all), weighted so the estimate and its interval are for the whole set.")] = 0,
    stratify: Annotated[str | None, typer.Option("--stratify", help="With --sample: a field of the data rows to stratify by (its values, or quantile bins of a number, e.g. PopQA's pop).", show_default=False)] = None,
    strata: Annotated[int, typer.Option("--strata", min=2, help="With --stratify on a numeric field: quantile bins.")] = 5,
    sample_seed: Annotated[int, typer.Option("--sample-seed", help="With --sample: the sampling seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Score a task: pipe predictions in, or pass --model to generate them here.

    Examples:

      ragkit generate data.jsonl --arch rag --passages ctxs | ragkit eval --task popqa --data data.jsonl

      ragkit eval --task arc_c --data arc_challenge_processed.jsonl --model smollm2-135m -o arc.json

      ragkit eval --task popqa --data popqa_longtail_w_gs.jsonl -m selfrag/selfrag_llama2_7b --arch selfrag --k 10

      ragkit index search idx/ -q scifact/queries.jsonl --k 100 | ragkit eval --task beir --data scifact/

      ragkit eval --task lm --data heldout/ -m runs/retro/final -o lm.json

      ragkit eval --task popqa --data popqa.jsonl -m smollm2-135m --sample 500 --stratify pop   # 500 answered, estimate for all

      ragkit eval compare closed.json rag.json --plot cmp.png
    """
    if ctx.invoked_subcommand is not None:
        return
    with handle_errors():
        from ragkit.archs.options import refuse_unused
        from ragkit.commands._answering import given_flags
        from ragkit.errors import UsageError
        from ragkit.eval.tasks import ALL_TASKS

        if task is None:
            raise UsageError("--task is required", hint=f"One of {', '.join(ALL_TASKS)}.")
        if data is None:
            raise UsageError("--data is required")
        if output is not None and output.is_dir():
            raise UsageError(f"-o {output}: is a directory; give the report's file name (e.g. {output}/report.json)")
        given = given_flags(ctx)
        began = time.perf_counter()
        config: dict[str, Any] = {"task": task, "data": str(data), "label": label, "limit": limit}
        if task == "lm":
            refuse_unused(given, EVAL_LEVEL | LM_OPTIONS | ({"arch"} if arch == "retro" else set()),
                          "--task lm, which scores held-out text under a RETRO checkpoint")
            report, shown = _evaluate_lm(model, data, glob, workdir, batch_size, device, config, began)
        elif task == "beir":
            refuse_unused(given, EVAL_LEVEL | BEIR_OPTIONS, "--task beir, which scores a ranking (--predictions, or "
                          "search --index here)")
            report, shown = _evaluate_beir(data, split, predictions, index, k, limit, device,
                                           (retrieval_mode, fusion, dense_weight), config, began)
        else:
            sampling = (sample, stratify, strata, sample_seed) if sample else None
            if sampling is None and {"stratify", "strata", "sample_seed"} & set(given):
                raise UsageError(f"{next(given[n] for n in ('stratify', 'strata', 'sample_seed') if n in given)}: "
                                 "shapes a sample; give --sample N too")
            factscoring = {"factscore_out", "factscore_db", "factscore_model"} & set(given)
            if factscoring and task != "factscore":
                raise UsageError(f"{given[sorted(factscoring)[0]]}: not used by --task {task} (it is --task factscore's)")
            if task == "factscore" and factscore_out is None and output is None:
                raise UsageError("--task factscore writes the generations for FActScore: give --factscore-out FILE "
                                 "(or -o REPORT, and they go beside it)")
            report, shown = _evaluate_qa(ctx, given, task, data, model, arch, predictions, limit, config, began,
                                         sampling)
            if task == "factscore":
                _factscore(report, factscore_out or output.with_suffix(".factscore.jsonl"), factscore_db,
                           factscore_model)
        if output is not None:
            from ragkit.eval import report as rep

            rep.save_report(output, report)
        _print_metrics(shown, report)
        if as_json:
            sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "rows"}, ensure_ascii=False) + "\n")


# options every task reads; the rest belong to one path: a task's scoring, or the architecture that answers
EVAL_LEVEL = {"task", "data", "output", "label", "as_json"}
LM_OPTIONS = {"model", "workdir", "glob", "batch_size", "device"}
BEIR_OPTIONS = {"predictions", "index", "k", "limit", "split", "device", "retrieval_mode", "fusion", "dense_weight"}
QA_OPTIONS = {"predictions", "limit", "model", "arch", "sample", "stratify", "strata", "sample_seed", "factscore_out",
              "factscore_db", "factscore_model"}  # + the answering architecture's schema with --model
SAMPLING = {"sample", "stratify", "strata", "sample_seed"}


def _evaluate_qa(ctx: typer.Context, given: dict[str, str], task: str, data: Path, model: str | None, arch: str,
                 predictions: str | None, limit: int, config: dict[str, Any], began: float,
                 sampling: tuple[int, str | None, int, int] | None = None) -> tuple[dict[str, Any], str]:
    """A QA task: score predictions read from --predictions / stdin, or answer here with --model; with
    `sampling` (--sample N [--stratify FIELD]), a weighted random sample of the examples only."""
    from ragkit.archs.options import refuse_unused
    from ragkit.errors import UsageError
    from ragkit.eval import report as rep
    from ragkit.eval import runner
    from ragkit.eval.tasks import get_task, load_examples

    the_task = get_task(task)
    if model is None:
        refuse_unused(given, EVAL_LEVEL | {"predictions", "limit", "factscore_out", "factscore_db", "factscore_model"}
                      | SAMPLING, "scoring predictions (they are read, not made)",
                      hint="Give --model to answer here, or drop the generation options.")
        every = load_examples(the_task, data, limit or None)
        examples, drawn = _sampled(every, sampling, str(data))
        source = predictions or "-"
        preds = runner.read_predictions(source)
        # ids are checked against the whole data; a sample scores its own examples (the others may be predicted)
        pairs = runner.match_predictions(every, preds, "<stdin>" if source == "-" else source, str(data))
        if drawn is not None:
            pairs = [(e, p) for e, p in pairs if e.id in drawn.stratum_of]
        config.update(predictions=source)
    else:
        import dataclasses

        from ragkit.commands._answering import answer_in_blocks, prepare
        from ragkit.io.queries import questions_from_examples

        if predictions is not None:
            raise UsageError("--predictions: not used by a run that answers here with --model; give one or the other")
        if arch == "retro":
            raise UsageError("--arch retro continues text rather than answering questions; score it with --task lm")
        architecture, options = prepare(arch, model, ctx, EVAL_LEVEL | QA_OPTIONS)
        examples, drawn = _sampled(load_examples(the_task, data, limit or None), sampling, str(data))
        answerer = architecture.load(model, options)
        questions = questions_from_examples(examples)
        outputs = {r["id"]: (i, r) for i, r in enumerate(answer_in_blocks(questions, answerer, f"{task} ({arch})"),
                                                            start=1)}
        pairs = runner.match_predictions(examples, outputs, "<generated>", str(data))
        config.update(model=model, arch=arch, options=dataclasses.asdict(options))
    rows = runner.score(the_task, pairs)
    if the_task.name == "factscore":  # what FActScore reads with each generation
        by_id = {e.id: e for e in examples}
        for r in rows:
            r.update(topic=by_id[r["id"]].extra["topic"], input=by_id[r["id"]].extra["input"],
                     cat=by_id[r["id"]].extra["cat"])
    extra = ("retrieved",) if rows and "retrieved" in rows[0]["metrics"] else ()
    if drawn is not None:
        from ragkit.eval.sampling import estimate

        missing = sorted({e.id for e in examples} - {r["id"] for r in rows})
        if missing:  # a weighted estimate over a sample with holes would be biased
            raise UsageError(f"sampled example '{missing[0]}' has no prediction ({len(missing)} of {len(examples)} "
                             "missing): a sample's estimate needs every sampled example scored")
        for r in rows:
            r["weight"] = drawn.weight(r["id"])
        metrics = estimate(rows, drawn, the_task.metrics + extra)
        config.update(sampling=drawn.describe())
    else:
        metrics = rep.aggregate(rows, the_task.metrics + extra, the_task.binary + extra)
    if len(rows) < len(examples):
        from ragkit.console import info

        info(f"warning: scored {len(rows)} of {len(examples)} examples (the others have no prediction)")
    report = rep.build_report(task, the_task.primary, metrics, rows, config, {"total_s": time.perf_counter() - began})
    if drawn is not None:
        report["sampling"] = drawn.describe()
        return report, f"{task}: {data} ({len(rows)} sampled of {drawn.population}, estimates for all)"
    return report, f"{task}: {data} ({len(rows)} examples)"


def _factscore(report: dict[str, Any], path: Path, db: Path | None, model_name: str) -> None:
    """Write FActScore's input file; score it with FActScore itself where it can run, else say why not."""
    from ragkit.console import info
    from ragkit.eval import factscore

    rows = [{**r, "output": r["prediction"]} for r in report["rows"]]
    factscore.write_factscore_file(path, rows)
    result = factscore.score(rows, knowledge_source=str(db) if db else None, model_name=model_name)
    report["factscore"] = {**result, "file": str(path), "n": len(rows)}
    if result["scored"]:
        report["metrics"]["factscore"] = {"mean": result["factscore"], "n": len(rows),
                                          "ci95": [result["factscore"], result["factscore"]]}
        info(f"factscore: {result['factscore']:.4f} over {len(rows)} generations ({path})")
    else:
        info(f"factscore: not scored ({result['reason']}); the generations are in {path} for FActScore "
             "(python -m factscore.factscorer --input_path FILE)")


def _sampled(examples: list[Any], sampling: tuple[int, str | None, int, int] | None, source: str) -> tuple[list[Any], Any]:
    if sampling is None:
        return examples, None
    from ragkit.eval.sampling import draw

    n, field, bins, seed = sampling
    drawn = draw(examples, n, field=field, bins=bins, seed=seed, source=source)
    return drawn.examples, drawn


def _evaluate_beir(data: Path, split: str, predictions: str | None, index: Path | None, k: int, limit: int,
                   device: str, retrieval_flags: tuple[str, str, float], config: dict[str, Any],
                   began: float) -> tuple[dict[str, Any], str]:
    """nDCG@10 / recall / MRR of a ranking: `index search` output, or searched here over --index."""
    from ragkit.eval import report as rep
    from ragkit.eval import runner
    from ragkit.retrieval.retriever import RetrievalMode

    retrieval = RetrievalMode.checked(*retrieval_flags)
    queries, qrels = runner.load_beir(data, split)
    if index is not None:
        from ragkit.retrieval import Retriever

        retriever = Retriever(index, device=device, mode=retrieval)
        qids = list(queries)[: limit or None]
        hits = retriever.retrieve([queries[q] for q in qids], max(k, 10))
        run = {q: [h.id for h in row] for q, row in zip(qids, hits)}
        config.update(index=str(index), k=k, embedder=retriever.index.encoder.name,
                      retrieval=dataclasses.asdict(retrieval))
    else:
        run = runner.read_search_run(predictions or "-", qrels)
        config.update(predictions=predictions or "-")
    qrels = {q: r for q, r in qrels.items() if q in run} if limit else qrels
    rows, metrics = runner.score_retrieval(run, qrels, max(k, 10) if index is not None else 100)
    report = rep.build_report("beir", "ndcg@10", metrics, rows, config, {"total_s": time.perf_counter() - began})
    return report, f"beir: {data} ({len(rows)} examples)"


def _evaluate_lm(model: str | None, data: Path, glob: str, workdir: Path | None, batch_size: int, device: str,
                 config: dict[str, Any], began: float) -> tuple[dict[str, Any], str]:
    """Loss, perplexity and bits per byte of held-out text under a RETRO checkpoint, with and without
    its neighbours; the report has one row per document and bootstrap 95% intervals over documents."""
    from ragkit.archs.retro.generate import load_retro
    from ragkit.archs.retro.lm_eval import evaluate
    from ragkit.errors import UsageError
    from ragkit.eval import report as rep

    if model is None:
        raise UsageError("--task lm needs --model (a `ragkit train --arch retro` checkpoint)")
    loaded = load_retro(model, workdir=workdir, device=device)
    result = evaluate(loaded, str(data), glob, batch_size=batch_size, workdir=str(workdir) if workdir else None)
    # the model's own setting is unsuffixed: with neighbours when it has them, else without
    suffixes = {name: "_no_retrieval" if name == "no_retrieval" and "retrieval" in result["results"] else ""
                for name in result["results"]}
    metrics: dict[str, Any] = {}
    for name, scores in result["results"].items():
        suffix = suffixes[name]
        summary = scores.summary()
        for metric in ("loss", "perplexity", "bits_per_byte", "bits_per_token"):
            low, high = scores.interval(metric)
            metrics[metric + suffix] = {"mean": summary[metric], "n": int(len(scores.nll)), "ci95": [low, high]}
    documents = result["heldout"].documents()
    rows = []
    for i, doc in enumerate(documents):
        row: dict[str, Any] = {"id": doc["source"], "tokens": doc["tokens"], "bytes": doc["bytes"], "metrics": {}}
        for name, scores in result["results"].items():
            suffix = suffixes[name]
            if scores.tokens[i]:
                row["metrics"]["loss" + suffix] = scores.nll[i] / scores.tokens[i]
                row["metrics"]["bits_per_byte" + suffix] = scores.nll[i] / math.log(2) / max(doc["bytes"], 1)
        rows.append(row)
    config.update(model=model, workdir=str(workdir or loaded.info["workdir"]), glob=glob,
                  seq_len=result["seq_len"], retrieval=list(result["results"]),
                  predicted_tokens=int(next(iter(result["results"].values())).tokens.sum()))
    report = rep.build_report("lm", "bits_per_byte", metrics, rows, config,
                              {**result["timings"], "total_s": time.perf_counter() - began})
    return report, f"lm: {data} ({len(rows)} documents, {config['predicted_tokens']} tokens)"


@app.command("compare")
def compare(
    reports: Annotated[list[Path], typer.Argument(help="Eval reports (JSON) written with --output.")],
    metric: Annotated[str | None, typer.Option("--metric", help="Metric to plot (default: each report's primary metric).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw a bar chart with 95% intervals to this PNG (needs matplotlib).")] = None,
    paired: Annotated[bool, typer.Option("--paired", help="A/B test of two reports on the same examples: the paired difference of --metric (B - A), its 95% bootstrap interval and a permutation p-value.")] = False,
    resamples: Annotated[int, typer.Option("--resamples", min=100, help="--paired: bootstrap and permutation resamples.")] = 10_000,
    as_json: JsonOpt = False,
) -> None:
    """Print runs side by side (every metric, mean and 95% CI); optionally plot one metric, or A/B test two.

    Examples:

      ragkit eval compare closed.json ctxs.json index.json

      ragkit eval compare k1.json k5.json k10.json --metric match --plot by_k.png

      ragkit eval compare baseline.json tuned.json --paired --metric match
    """
    if paired:
        with handle_errors():
            _paired(reports, metric, resamples, as_json)
        return
    with handle_errors():
        from rich.table import Table

        from ragkit.console import stderr
        from ragkit.eval import report as rep

        loaded = [(rep.label_of(p, r), r) for p in reports for r in [rep.load_report(p)]]
        names = list(dict.fromkeys(m for _, r in loaded for m in r["metrics"]))
        table = Table(title="comparison", title_justify="left")
        table.add_column("run")
        table.add_column("task")
        table.add_column("n", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        for label, r in loaded:
            cells = []
            for name in names:
                m = r["metrics"].get(name)
                cells.append("-" if m is None else f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
            table.add_row(label, r["task"], str(r["n"]), *cells)
        stderr.print(table)
        if plot is not None:
            rep.plot_comparison(loaded, plot, metric)
        if as_json:
            out = {label: {name: m["mean"] for name, m in r["metrics"].items()} for label, r in loaded}
            sys.stdout.write(json.dumps(out) + "\n")


def _paired(reports: list[Path], metric: str | None, resamples: int, as_json: bool) -> None:
    from rich.table import Table

    from ragkit.console import stderr
    from ragkit.errors import UsageError
    from ragkit.eval import report as rep
    from ragkit.eval.paired import paired_test, per_example

    if len(reports) != 2:
        raise UsageError(f"--paired compares two reports (A, then B); got {len(reports)}")
    (pa, a), (pb, b) = [(p, rep.load_report(p)) for p in reports]
    if a["task"] != b["task"]:
        raise UsageError(f"--paired: {pa} is task {a['task']}, {pb} is task {b['task']}")
    name = metric or a["primary_metric"]
    result = paired_test(per_example(a, name, str(pa)), per_example(b, name, str(pb)), name,
                         where=(str(pa), str(pb)), resamples=resamples)
    table = Table(title=f"paired {name}: {rep.label_of(pb, b)} - {rep.label_of(pa, a)} on {result.n} examples",
                  title_justify="left")
    for col in ("A", "B", "B - A", "95% CI", "p"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.mean_a:.4f}", f"{result.mean_b:.4f}", f"{result.difference:+.4f}",
                  f"[{result.ci95[0]:+.4f}, {result.ci95[1]:+.4f}]", f"{result.p_value:.4f}")
    stderr.print(table)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
