"""Exact re-ranking from vectors kept on disk (`ivf-pq:...,refine=R`) and the HNSW coarse quantiser."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ragkit.errors import UsageError
from ragkit.index.encoder_info import EncoderInfo
from ragkit.index.index import Index
from ragkit.index.spec import HNSW_QUANTIZER_MIN_LISTS, parse_spec, resolve_spec
from ragkit.io.corpus import Passage

DIM = 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def passages(n: int, prefix: str = "p") -> list[Passage]:
    return [Passage(f"{prefix}{i}", f"text {i}", "") for i in range(n)]


ENCODER = EncoderInfo("test", DIM, True, None, "fp")


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return clustered(4000)


def test_refine_is_exact_search_over_the_codes_candidates(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER,
                        spec="ivf-pq:nlist=32,m=4,nprobe=4,refine=40")
    queries = clustered(50, seed=1)
    index.set_search_params(refine=0)
    _, candidates = index._search_codes(queries, 40)
    index.set_search_params(refine=40)
    found = index.search_ids(queries, 10)
    stored = corpus.astype(np.float16).astype(np.float32)  # the exact vectors are kept in float16
    for q, cands, hits in zip(queries, candidates, found):
        cands = cands[cands >= 0]
        exact = stored[cands - 1] @ q  # vids start at 1, in row order
        order = np.argsort(-exact, kind="stable")[:10]
        assert [h[0] for h in hits] == [f"p{int(cands[i]) - 1}" for i in order]
        np.testing.assert_allclose([h[1] for h in hits], exact[order], rtol=1e-5)


def test_refine_recovers_the_recall_the_codes_lose(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER,
                        spec="ivf-pq:nlist=32,m=8,nprobe=32,refine=100")
    queries = clustered(100, seed=2)
    truth = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]

    def recall() -> float:
        found = index.search_ids(queries, 10)
        return float(np.mean([len({int(i[1:]) for i, _ in hits} & set(t.tolist())) / 10
                              for hits, t in zip(found, truth)]))

    refined = recall()
    index.set_search_params(refine=0)
    codes_only = recall()
    assert refined >= 0.98 and codes_only < 0.85, (refined, codes_only)


def write_shards(folder, vectors: np.ndarray, parts: int = 2):
    """A shard set as `ragkit embed --num-shards` writes it, for the given vectors."""
    folder.mkdir()
    bounds = np.linspace(0, len(vectors), parts + 1).astype(int)
    for number in range(parts):
        start, end = int(bounds[number]), int(bounds[number + 1])
        tag = f"{number:05d}-of-{parts:05d}"
        np.save(folder / f"embeddings-{tag}.npy", vectors[start:end].astype(np.float16))
        (folder / f"passages-{tag}.jsonl").write_text(
            "".join(json.dumps({"id": f"p{i}", "title": "", "text": f"text {i}"}) + "\n" for i in range(start, end)))
        (folder / f"shard-{tag}.json").write_text(json.dumps({
            "encoder": ENCODER.to_json(), "dtype": "float16", "rows": end - start, "corpus_rows": len(vectors),
            "range": [start, end], "shard_id": number, "num_shards": parts, "embeddings": f"embeddings-{tag}.npy",
            "passages": f"passages-{tag}.jsonl"}))
    return folder


def test_exact_vectors_are_the_shards_linked_not_copied(tmp_path, corpus):
    from ragkit.embeddings import open_shards

    shards = write_shards(tmp_path / "emb", corpus)
    opened = open_shards(shards)
    with Index.create(tmp_path / "i", opened.encoder, spec="ivf-pq:nlist=32,m=4,nprobe=32,refine=50") as build:
        for block, vectors, lines, source, origin in opened.blocks(size=300):
            build.add(block, vectors, lines=lines, source=source, origin=origin)
    index = build.index
    parts = index.manifest["segments"][0]["exact"]
    assert [(p["first_vid"], p["rows"], p["dtype"]) for p in parts] == [(1, 2000, "float16"), (2001, 2000, "float16")]
    for number, part in enumerate(parts):
        stored = os.stat(index.version_dir / part["file"])
        assert stored.st_ino == os.stat(shards / f"embeddings-{number:05d}-of-00002.npy").st_ino
    query = corpus[2500:2501]
    assert index.search_ids(query, 1)[0][0][0] == "p2500"
    np.testing.assert_array_equal(index.vectors_for_vids(np.array([2501])), corpus[2500:2501].astype(np.float16))


def test_streaming_shards_leaves_no_pages_resident(tmp_path):
    """Each block's pages leave the process once it is handed over (they stay in the page cache): at 21M x 768
    the build's resident memory otherwise grew by every shard page read, 6.7 GiB two minutes in."""
    from ragkit.embeddings import open_shards

    vectors = clustered(60_000)
    shards = write_shards(tmp_path / "emb", vectors, parts=1)
    kept = [v for _, v, _, _, _ in open_shards(shards).blocks(size=10_000)]  # the maps stay alive

    def resident_kib(name: str) -> int:
        total, inside = 0, False
        for line in open("/proc/self/smaps", encoding="utf-8"):
            if not line.split()[0].endswith(":"):  # a mapping's header line: address range ... path
                inside = line.rstrip().endswith(name)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    assert len(kept) == 6
    assert resident_kib("embeddings-00000-of-00001.npy") < 256, "shard pages still resident in the process"


def test_changes_and_compaction_keep_refining(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(3000), corpus[:3000], ENCODER,
                        spec="ivf-pq:nlist=32,m=4,nprobe=32,refine=50")
    index.upsert(passages(1000, prefix="n"), corpus[3000:], ENCODER)
    index.remove([f"p{i}" for i in range(10)])
    probe = corpus[[5, 3500]]
    assert [hits[0][0] for hits in index.search_ids(probe, 1)] != ["p5", "n500"]
    assert index.search_ids(probe, 1)[1][0][0] == "n500"
    assert index.search_ids(probe, 1)[1][0][1] == pytest.approx(1.0, abs=1e-3)  # an exact score, not a PQ one
    index.compact()
    assert len(index.manifest["segments"]) == 1
    assert {p["first_vid"] for p in index.manifest["segments"][0]["exact"]} == {1, 3001}
    hits = index.search_ids(probe, 1)
    assert hits[0][0][0] != "p5" and hits[1][0] == ("n500", pytest.approx(1.0, abs=1e-3))
    assert Index.open(tmp_path / "i").verify() == []


def test_refine_needs_kept_vectors(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=4")
    assert "exact" not in index.manifest["segments"][0]
    with pytest.raises(UsageError, match="keeps no exact vectors"):
        index.set_search_params(refine=20)


def test_spec_parameters_for_scale():
    assert parse_spec("ivf-pq:refine=0,hnsw=0").refine == 0
    with pytest.raises(UsageError, match="refine must be positive"):
        parse_spec("ivf-pq:refine=-3")
    big, _ = resolve_spec(parse_spec("ivf-pq:m=64"), 21_000_000, 768, None)
    assert big.params["hnsw"] == 32 and big.factory(768, 21_000_000).startswith("IVF16384_HNSW32,")
    small, _ = resolve_spec(parse_spec("ivf-pq:nlist=1024"), 100_000, 768, None)
    assert "hnsw" not in small.params and small.factory(768, 100_000) == "IVF1024,PQ192x8"
    assert HNSW_QUANTIZER_MIN_LISTS > 1024


def test_hnsw_coarse_quantiser_builds_and_searches(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER,
                        spec="ivf-pq:nlist=64,m=8,nprobe=64,hnsw=16,refine=100")
    assert index.manifest["factory"] == "IVF64_HNSW16,PQ8x8"
    queries = corpus[:20]
    assert [hits[0][0] for hits in index.search_ids(queries, 1)] == [f"p{i}" for i in range(20)]


def test_cli_refine_on_an_index_without_exact_vectors_is_refused_before_the_model_loads(tmp_path, corpus):
    from typer.testing import CliRunner

    from ragkit.cli import app

    Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=4")
    result = CliRunner().invoke(app, ["index", "search", str(tmp_path / "i"), "--refine", "20"], input="a query\n")
    assert result.exit_code == 2 and "keeps no exact vectors" in result.output  # the model 'test' never loads


def test_a_reader_keeps_its_exact_vectors_after_writers_delete_its_version(tmp_path, corpus):
    Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=8,nprobe=32,refine=50")
    reader = Index.open(tmp_path / "i")
    writer = Index.open(tmp_path / "i")
    writer.remove(["p1"])
    writer.compact()
    assert not reader.version_dir.exists()  # the reader's version folder is gone
    assert reader.search_ids(corpus[[1]], 1)[0][0] == ("p1", pytest.approx(1.0, abs=1e-3))


@pytest.mark.parametrize("text", ["ivf-pq:nlist=16,m=8", "IVF16,PQ8", "PQ8"])
def test_pq_indexes_skip_polysemous_training(text):
    """Faiss' factory turns on polysemous training for 8-bit PQ, a code reordering for a Hamming pre-filter
    ragkit never uses; it was most of an IVF-PQ build's time."""
    import faiss

    from ragkit.index import vectors as fv

    spec = parse_spec(text)
    index = fv.new_index(spec, DIM, 1000, "ip")
    assert faiss.downcast_index(fv.inner_index(index)).do_polysemous_training is False
    assert faiss.downcast_index(faiss.index_factory(DIM, spec.factory(DIM, 1000))).do_polysemous_training is True


def test_a_training_sample_reads_its_rows_not_the_shards_around_them(tmp_path):
    """Rows sampled at random from memory-mapped shards are read without read-around: each fault mapped (and
    read) up to 128 KiB around its row, so a 349k-row sample of 21M x 768 shards read nearly all 32 GB."""
    import os

    from ragkit.index.builder import RowSource

    rows, dim = 200_000, 64  # 25.6 MB of float16, 128 bytes a row
    path = tmp_path / "shard.npy"
    np.save(path, np.zeros((rows, dim), np.float16))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: reads go to the disk
    os.close(fd)

    def disk_reads() -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("read_bytes:"))

    mapped = np.load(path, mmap_mode="r")
    sample = np.sort(np.random.default_rng(0).choice(rows, 500, replace=False))
    before = disk_reads()
    RowSource([mapped[: rows // 2], mapped[rows // 2 :]], dim)[sample]
    read = disk_reads() - before
    if read == 0:
        pytest.skip("this file system does not account reads to the process (or kept the file cached)")
    assert read < 500 * 4096 * 2, f"read {read / 2**20:.1f} MiB for 500 rows of 128 bytes"


def test_tune_pins_new_search_settings_without_rebuilding(tmp_path, corpus):
    root = tmp_path / "i"
    index = Index.build(root, passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=4,nprobe=2,refine=20")
    queries = clustered(30, seed=5)
    index.set_search_params(nprobe=16, refine=200)
    wanted = index.search_ids(queries, 10)
    vectors_before = sorted(p.name for p in index.version_dir.iterdir() if p.suffix == ".faiss")
    index.tune(nprobe=16, refine=200)
    reopened = Index.open(root)
    assert reopened.spec.params == {"nlist": 32, "m": 4, "nprobe": 16, "refine": 200}
    assert reopened.search_ids(queries, 10) == wanted  # the same results as the settings given at search time
    assert sorted(p.name for p in reopened.version_dir.iterdir() if p.suffix == ".faiss") == vectors_before
    reopened.upsert(passages(3, "new"), clustered(3, seed=9), ENCODER)  # changes keep the tuned settings
    assert Index.open(root).spec.params["refine"] == 200


@pytest.mark.parametrize("settings, message", [
    ({"ef_search": 64}, "ef_search"),  # an ivf-pq index has no efSearch
    ({"refine": 0}, "refine=0"),  # it keeps exact vectors: refine stays positive
])
def test_tune_refuses_settings_the_index_cannot_keep(tmp_path, corpus, settings, message):
    index = Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=4,refine=20")
    version = index.version_dir
    with pytest.raises(UsageError, match=message):
        index.tune(**settings)
    assert Index.open(tmp_path / "i").version_dir == version


def test_tune_refuses_refine_without_exact_vectors(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(500), corpus[:500], ENCODER, spec="ivf-pq:nlist=8,m=4")
    with pytest.raises(UsageError, match="keeps no exact vectors"):
        index.tune(refine=100)


def test_index_tune_command(tmp_path, corpus):
    from typer.testing import CliRunner

    from ragkit.cli import app

    Index.build(tmp_path / "i", passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=32,m=4,refine=20")
    runner = CliRunner()
    done = runner.invoke(app, ["index", "tune", str(tmp_path / "i"), "--nprobe", "8", "--refine", "50", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["spec"] == "ivf-pq:m=4,nlist=32,nprobe=8,refine=50"
    refused = runner.invoke(app, ["index", "tune", str(tmp_path / "i"), "--ef-search", "64"])
    assert refused.exit_code == 2 and "ef_search" in refused.output


def test_an_ivf_delta_does_not_copy_the_coarse_quantiser(tmp_path):
    """Issue 26: at 21M x 768 (16,384 lists, HNSW quantiser) every `index add` of 10 passages wrote the
    template's 53 MB quantiser again into its delta. A delta now borrows the template's on read."""
    corpus = clustered(6000)
    root = tmp_path / "i"
    index = Index.build(root, passages(len(corpus)), corpus, ENCODER,
                        spec="ivf-pq:nlist=1024,m=4,nprobe=1024,hnsw=16,refine=100")
    added = clustered(10, seed=11)
    index.upsert(passages(10, "new"), added, ENCODER)
    opened = Index.open(root)
    delta = opened.segments[-1]
    assert delta.meta.shares_quantizer and opened.manifest["format_version"] == 3
    template_bytes = (opened.version_dir / "template.faiss").stat().st_size
    delta_bytes = (opened.version_dir / str(delta.meta.vectors)).stat().st_size
    assert delta_bytes < template_bytes / 4, (delta_bytes, template_bytes)
    hits = opened.search_ids(added, 1)
    assert [h[0][0] for h in hits] == [f"new{i}" for i in range(10)]
    # the delta searched on its own (not merged into the base) finds them too, through the borrowed quantiser
    scores, vids = delta.search(added, 1)
    assert (vids[:, 0] == np.arange(delta.meta.vid_min, delta.meta.vid_max + 1)).all()


def test_deltas_sharing_the_quantiser_compact_and_keep_every_passage(tmp_path):
    corpus = clustered(3000)
    root = tmp_path / "i"
    index = Index.build(root, passages(len(corpus)), corpus, ENCODER, spec="ivf-pq:nlist=64,m=4,nprobe=64,refine=50")
    extra = clustered(90, seed=12)
    for i in range(9):  # past MAX_DELTAS (8): the deltas are folded into one, the base left alone
        index.upsert(passages(10, f"d{i}-"), extra[10 * i : 10 * i + 10], ENCODER)
    opened = Index.open(root)
    assert len(opened.segments) < 10
    assert len(opened) == 3090
    hits = opened.search_ids(extra, 1)
    assert [h[0][0] for h in hits] == [f"d{i // 10}-{i % 10}" for i in range(90)]
    opened.compact()
    assert [h[0][0] for h in Index.open(root).search_ids(extra, 1)] == [h[0][0] for h in hits]


def test_an_index_without_shared_deltas_keeps_format_2(tmp_path, corpus):
    index = Index.build(tmp_path / "i", passages(500), corpus[:500], ENCODER, spec="flat")
    index.upsert(passages(3, "x"), clustered(3, seed=3), ENCODER)
    assert Index.open(tmp_path / "i").manifest["format_version"] == 2  # an older ragkit still reads it


SAMPLE_FROM_CACHED_FILE = """
import sys, numpy as np
from ragkit.index.builder import RowSource
rows, dim = 400_000, 256  # 400 MiB of float32, written just now: in the page cache, as a build's spill is
spill = np.lib.format.open_memmap(sys.argv[1], mode="w+", dtype=np.float32, shape=(rows, dim))
spill[:] = 1.0
spill.flush()
del spill
mapped = np.load(sys.argv[1], mmap_mode="r")
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
import os
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current RSS
before = hwm()
sample = np.sort(np.random.default_rng(0).choice(rows, 70_000, replace=False))  # 17.5%, as 349k of 2M
out = RowSource([mapped], dim)[sample]
print(hwm() - before, out.nbytes)
"""


def test_a_training_sample_from_a_cached_spill_does_not_map_the_whole_file(tmp_path):
    """The released import at 2M x 768 peaked at 8.2 GiB: its 6 GB float32 spill, just written and so in the
    page cache, was mapped whole while the training sample was read (the kernel maps cached pages around
    each fault whatever madvise says), 6 GB of file pages counted as the build's memory."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SAMPLE_FROM_CACHED_FILE, str(tmp_path / "spill.npy")],
                          capture_output=True, text=True)
    if done.returncode != 0 and "clear_refs" in done.stderr:
        pytest.skip("cannot reset the RSS high-water mark here")
    assert done.returncode == 0, done.stderr
    grew, sample_bytes = map(int, done.stdout.split())
    assert grew < sample_bytes + 120 * 2**20, f"peak grew {grew / 2**20:.0f} MiB for a {sample_bytes / 2**20:.0f} MiB sample"
