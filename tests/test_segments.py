"""Segments: a change costs the change, base + deltas search like one index, compaction, streaming builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ragkit.errors import InputError
from ragkit.index import Index
from ragkit.index.sparse import SparseConfig
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

from conftest import unit_vectors

DIM = 16
ENC = EncoderInfo("test-encoder", DIM, True, 64, "f" * 32)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def passages(n: int, prefix: str = "p", seed: int = 0) -> list[Passage]:
    rng = np.random.default_rng(seed)
    return [Passage(f"{prefix}{i}", " ".join(rng.choice(WORDS, 6)), f"t{i}") for i in range(n)]


def inodes(version_dir: Path) -> set[int]:
    return {p.stat().st_ino for p in version_dir.rglob("*") if p.is_file()}


def new_bytes(version_dir: Path, before: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """Bytes this version wrote itself (files that are not hard links to the previous version's)."""
    return sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file() and p.stat().st_ino not in before)


def apply_changes(index: Index, x: np.ndarray, ps: list[Passage]) -> dict[str, tuple[Passage, np.ndarray]]:
    """A run of removes, upserts and adds; returns what a fresh index should hold (id -> passage, vector)."""
    live = {p.id: (p, v) for p, v in zip(ps, x)}
    index.remove(["p0", "p5", "p9"])
    for pid in ("p0", "p5", "p9"):
        live.pop(pid)
    fresh = unit_vectors(6, DIM, seed=11)
    batch = [Passage("p1", "replaced one", "T"), Passage("p2", "replaced two", "T")] + passages(4, "n", seed=3)
    index.upsert(batch, fresh, ENC)
    live.update({p.id: (p, v) for p, v in zip(batch, fresh)})
    index.remove(["n0", "p3"])
    live.pop("n0")
    live.pop("p3")
    more = unit_vectors(3, DIM, seed=12)
    batch = passages(3, "m", seed=4)
    index.upsert(batch, more, ENC)
    live.update({p.id: (p, v) for p, v in zip(batch, more)})
    return live


def results(index: Index, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    return [[(h.id, round(h.score, 4)) for h in row] for row in index.search(queries, k)]


@pytest.mark.parametrize("spec", ["flat", "hnsw:M=16,ef_search=512"])
def test_base_plus_deltas_search_like_a_fresh_index(tmp_path: Path, spec: str) -> None:
    x, ps = unit_vectors(300, DIM), passages(300)
    index = Index.build(tmp_path / "idx", ps, x, ENC, spec=spec)
    live = apply_changes(index, x, ps)
    assert index.info()["segments"] > 1 and index.info()["tombstones"] > 0
    from ragkit.index.vectors import is_hnsw

    assert not any(is_hnsw(s.faiss) for s in index.segments[1:] if s.meta.vectors)  # HNSW deltas are flat
    fresh = Index.build(tmp_path / "fresh", [p for p, _ in live.values()], np.stack([v for _, v in live.values()]),
                        ENC, spec=spec)
    queries = unit_vectors(20, DIM, seed=7)
    assert results(index, queries, 10) == results(fresh, queries, 10)
    assert len(index) == len(fresh) == len(live)
    before = results(index, queries, 10)
    index.compact()
    assert index.info()["segments"] == 1 and index.info()["tombstones"] == 0
    assert results(index, queries, 10) == before
    assert results(Index.open(tmp_path / "idx"), queries, 10) == before


@pytest.mark.parametrize("spec", ["ivf-pq:nlist=8,m=4,nprobe=4", "IVF8,SQ8", "PQ4", "HNSW8,SQ8"])
def test_coded_deltas_equal_one_index_of_the_same_training(tmp_path: Path, spec: str) -> None:
    """Deltas start from the base's trained template, so they hold the codes one index of that training holds."""
    import faiss

    x, ps = unit_vectors(400, DIM), passages(400)
    index = Index.build(tmp_path / "idx", ps, x, ENC, spec=spec)
    live = apply_changes(index, x, ps)
    one = faiss.read_index(str(index.version_dir / "template.faiss"))
    vids = index._live_vids_for(list(live))
    by_vid = {vid: pid for pid, vid in vids.items()}
    order = sorted(vids.values())
    one.add_with_ids(np.stack([live[by_vid[v]][1] for v in order]).astype(np.float32), np.asarray(order, np.int64))
    from ragkit.index.vectors import set_search_params

    set_search_params(one, {**index.spec.search_params(), "efSearch": 400})
    index.set_search_params(ef_search=400)  # HNSW exact on 400 vectors: the graphs then agree
    queries = unit_vectors(15, DIM, seed=7)
    scores, ids = one.search(queries, 10)
    expected = [[(by_vid[int(v)], round(float(s), 4)) for s, v in zip(rs, rv)] for rs, rv in zip(scores, ids)]
    got = results(index, queries, 10)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]  # ties may order either way
    assert [[s for _, s in r] for r in got] == [[s for _, s in r] for r in expected]
    before = results(index, queries, 10)
    index.compact()
    index.set_search_params(ef_search=400)
    assert index.info()["segments"] == 1
    assert [sorted(r) for r in results(index, queries, 10)] == [sorted(r) for r in before]


def test_sparse_side_matches_a_fresh_build_after_changes(tmp_path: Path) -> None:
    x, ps = unit_vectors(200, DIM), passages(200)
    index = Index.build(tmp_path / "idx", ps, x, ENC, sparse=SparseConfig())
    live = apply_changes(index, x, ps)
    fresh = Index.build(tmp_path / "fresh", [p for p, _ in live.values()], np.stack([v for _, v in live.values()]),
                        ENC, sparse=SparseConfig())
    queries = ["alpha beta", "replaced", "kappa mu eta"]
    ours = [[(h.id, round(h.score, 4)) for h in row] for row in index.search_sparse(queries, 10)]
    theirs = [[(h.id, round(h.score, 4)) for h in row] for row in fresh.search_sparse(queries, 10)]
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs]
    assert ours[1][0][0] in ("p1", "p2")


def bm25s_reference(live: list[Passage], queries: list[str], k: int, config: SparseConfig) -> list[list[tuple[str, float]]]:
    """bm25s itself over the live passages: what a fresh build of them returns (k + 10 deep, for ties)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(config.stemmer) if config.stemmer else None
    retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    retriever.index(bm25s.tokenize([f"{p.title} {p.text}".strip() for p in live], stopwords=config.stopwords,
                                   stemmer=stemmer, show_progress=False), show_progress=False)
    rows, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords=config.stopwords, stemmer=stemmer,
                                                     show_progress=False), k=min(k + 10, len(live)), show_progress=False)
    return [[(live[int(r)].id, float(v)) for r, v in zip(rr, vv) if v > 0] for rr, vv in zip(rows, scores)]


def assert_same_ranking(ours: list[list], theirs: list[list], k: int) -> None:
    """Equal scores at every rank, and the same ids above the last score tied at the cut (ties order either way)."""
    for mine, ref in zip(ours, theirs):
        assert np.allclose([s for _, s in mine], [s for _, s in ref[:k]], rtol=1e-5, atol=1e-6)
        if len(ref) > len(mine):
            cut = ref[len(mine) - 1][1] if mine else float("inf")
            sure = {i for i, s in ref if s > cut + 1e-5}
            assert sure <= {i for i, _ in mine}
        else:
            assert {i for i, _ in mine} == {i for i, _ in ref}


@pytest.mark.parametrize("config", [SparseConfig(), SparseConfig(k1=0.9, b=0.4, stemmer=None)])
def test_the_segmented_bm25_side_scores_as_bm25s_on_the_live_passages(tmp_path: Path, config: SparseConfig) -> None:
    """Through adds, upserts, removes (tombstones in every segment) and a compaction, every search equals bm25s
    built afresh over the passages alive at that moment: N, df and avgdl are the live ones."""
    rng = np.random.default_rng(5)
    x, ps = unit_vectors(300, DIM), passages(300)
    ps[7] = Passage("p7", "", "")  # an empty document counts in N and avgdl, as in bm25s
    ps[8] = Passage("p8", "beta beta beta beta", "beta")
    index = Index.build(tmp_path / "idx", ps, x, ENC, sparse=config)
    live = {p.id: p for p in ps}
    queries = ["alpha beta", "kappa mu eta", "beta beta", "zeta", "nothing here", "Theta THETA iota lambda"]

    def check() -> None:
        alive = list(live.values())
        theirs = bm25s_reference(alive, queries, 10, config)
        ours = [[(h.id, h.score) for h in row] for row in index.search_sparse(queries, 10)]
        assert_same_ranking(ours, theirs, 10)

    check()
    for step in range(4):
        gone = [f"p{i}" for i in rng.choice(300, 12, replace=False)] + [f"s{step - 1}-{i}" for i in range(2)]
        index.remove([g for g in gone if g in live])
        for g in gone:
            live.pop(g, None)
        batch = passages(5, f"s{step}-", seed=20 + step) + [Passage("p1", f"replaced {step} alpha", "T")]
        index.upsert(batch, unit_vectors(len(batch), DIM, seed=30 + step), ENC)
        live.update({p.id: p for p in batch})
        check()
    assert index.info()["segments"] > 2
    index.compact()
    assert index.info()["segments"] == 1
    check()


def test_a_change_to_an_index_with_a_bm25_side_writes_only_its_own_part(tmp_path: Path) -> None:
    written = {}
    for n in (2_000, 20_000):
        index = Index.build(tmp_path / f"idx{n}", passages(n), unit_vectors(n, DIM), ENC, sparse=SparseConfig())
        base_part = (index.version_dir / index.manifest["segments"][0]["sparse"]).stat().st_ino
        seen = inodes(index.version_dir)
        index.upsert(passages(10, "new"), unit_vectors(10, DIM, seed=2), ENC)
        added = new_bytes(index.version_dir, seen)
        seen = inodes(index.version_dir)
        index.remove([f"p{i}" for i in range(10)])
        written[n] = (added, new_bytes(index.version_dir, seen))
        assert (index.version_dir / index.manifest["segments"][0]["sparse"]).stat().st_ino == base_part
        assert not (index.version_dir / "sparse").exists()
    for small, large in zip(written[2_000], written[20_000]):
        assert large < 1.2 * small + 1024 and large < 64 * 1024


def test_new_bm25_parameters_keep_the_parts_and_a_new_tokenisation_rewrites_them(tmp_path: Path) -> None:
    ps = passages(200)
    index = Index.build(tmp_path / "idx", ps, unit_vectors(200, DIM), ENC, sparse=SparseConfig())
    part = lambda: (index.version_dir / index.manifest["segments"][0]["sparse"]).stat().st_ino  # noqa: E731
    before = part()
    tuned = SparseConfig(k1=1.2, b=0.5)
    index.add_sparse(tuned)
    assert part() == before  # k1 and b are applied at query time
    queries = ["alpha beta gamma", "mu"]
    assert_same_ranking([[(h.id, h.score) for h in r] for r in index.search_sparse(queries, 10)],
                        bm25s_reference(ps, queries, 10, tuned), 10)
    index.add_sparse(SparseConfig(stemmer=None))
    assert part() != before


def test_an_index_of_the_older_bm25_layout_searches_and_moves_to_parts_on_its_next_change(tmp_path: Path) -> None:
    """Before per-segment parts, each version held one bm25s folder (VERSION/sparse/, vids.npy)."""
    import bm25s
    import Stemmer

    from ragkit.io.atomic import sha256_file

    ps = passages(120)
    x = unit_vectors(120, DIM)
    index = Index.build(tmp_path / "idx", ps, x, ENC, sparse=SparseConfig())
    queries = ["alpha beta", "kappa"]
    want = [[(h.id, h.score) for h in r] for r in index.search_sparse(queries, 20)]  # deeper: ties at the cut
    # rewrite this version as the older layout wrote it
    version, manifest = index.version_dir, json.loads((index.version_dir / "manifest.json").read_text())
    for segment in manifest["segments"]:
        manifest["files"].pop(segment.pop("sparse"))
        (version / f"{segment['name']}.bm25.npz").unlink()
    folder = version / "sparse"
    folder.mkdir()
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(bm25s.tokenize([f"{p.title} {p.text}" for p in ps], stopwords="en",
                                   stemmer=Stemmer.Stemmer("english"), show_progress=False), show_progress=False)
    retriever.save(str(folder))
    np.save(folder / "vids.npy", np.arange(1, 121, dtype=np.int64))
    for f in folder.iterdir():
        manifest["files"][f"sparse/{f.name}"] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (version / "manifest.json").write_text(json.dumps(manifest))
    old = Index.open(tmp_path / "idx")
    assert_same_ranking([[(h.id, h.score) for h in r] for r in old.search_sparse(queries, 10)], want, 10)
    old.remove(["p0"])
    assert not (old.version_dir / "sparse").exists()
    assert all(s.get("sparse") for s in old.manifest["segments"] if s["passages"])
    assert "p0" not in {h.id for r in old.search_sparse(queries, 10) for h in r}


def test_a_change_writes_what_changed_not_the_index(tmp_path: Path) -> None:
    written = {}
    for n in (2_000, 20_000):
        x = unit_vectors(n, DIM)
        index = Index.build(tmp_path / f"idx{n}", passages(n), x, ENC)
        base = new_bytes(index.version_dir)
        seen = inodes(index.version_dir)
        index.upsert(passages(10, "new"), unit_vectors(10, DIM, seed=2), ENC)
        added = new_bytes(index.version_dir, seen)
        seen = inodes(index.version_dir)
        index.remove([f"p{i}" for i in range(10)])
        removed = new_bytes(index.version_dir, seen)
        written[n] = (base, added, removed)
        assert index.info()["segments"] == 3 and len(index) == n
    assert written[20_000][0] > 5 * written[2_000][0]  # the builds scale with N ...
    for small, large in zip(written[2_000][1:], written[20_000][1:]):
        assert large < 1.2 * small + 1024 and large < 64 * 1024  # ... a change does not


def test_deltas_fold_past_the_threshold_and_base_stays(tmp_path: Path) -> None:
    from ragkit.index.index import MAX_DELTAS

    index = Index.build(tmp_path / "idx", passages(500), unit_vectors(500, DIM), ENC, spec="hnsw:M=8")
    base_file = index.version_dir / index.manifest["segments"][0]["vectors"]
    inode = base_file.stat().st_ino
    compacted = []
    for r in range(MAX_DELTAS + 1):
        compacted.append(index.upsert(passages(5, f"r{r}-"), unit_vectors(5, DIM, seed=r), ENC).compacted)
    assert compacted == [False] * MAX_DELTAS + [True]
    assert index.info()["segments"] == 2 and len(index) == 500 + 5 * (MAX_DELTAS + 1)
    assert (index.version_dir / index.manifest["segments"][0]["vectors"]).stat().st_ino == inode  # base untouched
    [[hit]] = index.search(unit_vectors(5, DIM, seed=3)[:1], k=1)
    assert hit.id == "r3-0"


def test_a_reader_keeps_its_version_while_writers_publish(tmp_path: Path) -> None:
    x = unit_vectors(100, DIM)
    Index.build(tmp_path / "idx", passages(100), x, ENC)
    reader = Index.open(tmp_path / "idx")  # its Faiss files are not read yet
    writer = Index.open(tmp_path / "idx")
    writer.remove(["p0", "p1"])
    writer.upsert([Passage("p2", "new text")], x[2:3], ENC)
    writer.compact()  # the reader's version folder is gone now
    assert not reader.version_dir.exists()
    [[a], [b], [c]] = reader.search(x[:3], k=1)
    assert (a.id, b.id, c.id, c.text) == ("p0", "p1", "p2", passages(100)[2].text)
    assert len(reader) == 100 and len(Index.open(tmp_path / "idx")) == 98


def test_streamed_build_names_a_duplicate_line(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": i % 3 if i == 4 else i, "text": f"t{i}"}) for i in range(6)) + "\n")
    with pytest.raises(InputError, match=r"c.jsonl:5.*duplicate id '1'"):
        with Index.create(tmp_path / "idx", ENC, source=str(corpus)) as build:
            build.add(passages(4, "x"), unit_vectors(4, DIM))  # fine
            from ragkit.io.corpus import iter_passages_with_lines

            rows = list(iter_passages_with_lines(corpus))
            build.add([p for _, p in rows], unit_vectors(6, DIM), lines=[n for n, _ in rows])
    assert not Index.exists(tmp_path / "idx")
    assert [p.name for p in (tmp_path / "idx").iterdir()] in ([], [".lock"])


def test_format1_index_still_opens_and_upgrades_on_write(tmp_path: Path) -> None:
    import sqlite3

    import faiss

    root, version = tmp_path / "old", tmp_path / "old" / "v000001"
    version.mkdir(parents=True)
    x = unit_vectors(20, DIM)
    conn = sqlite3.connect(version / "passages.sqlite")
    conn.executescript("CREATE TABLE passages (vid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                       "title TEXT NOT NULL, text TEXT NOT NULL, metadata TEXT NOT NULL);"
                       "CREATE TABLE tombstones (vid INTEGER PRIMARY KEY);")
    conn.executemany("INSERT INTO passages (id, title, text, metadata) VALUES (?, '', ?, '{}')",
                     [(f"p{i}", f"text {i}") for i in range(20)])
    conn.execute("DELETE FROM passages WHERE id = 'p3'")
    conn.commit()
    conn.close()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(x, np.arange(1, 21, dtype=np.int64))
    flat.remove_ids(faiss.IDSelectorBatch(np.asarray([4], np.int64)))
    faiss.write_index(flat, str(version / "vectors.faiss"))
    files = {n: {"bytes": (version / n).stat().st_size, "sha256": ""} for n in ("vectors.faiss", "passages.sqlite")}
    manifest = {"format": "ragkit-index", "format_version": 1, "encoder": ENC.to_json(), "metric": "ip",
                "spec": "flat", "spec_requested": "flat", "factory": "Flat", "removes_in_place": True,
                "counts": {"passages": 19, "vectors": 19, "tombstones": 0}, "files": files, "version": 1,
                "created_at": "", "updated_at": ""}
    (version / "manifest.json").write_text(json.dumps(manifest))
    os.symlink("v000001", root / "current")
    index = Index.open(root)
    assert len(index) == 19 and [[h.id for h in r] for r in index.search(x[5:6], 1)] == [["p5"]]
    index.upsert([Passage("p3", "back")], x[3:4], ENC)
    index.remove(["p7"])
    again = Index.open(root)
    assert again.manifest["format_version"] == 2 and len(again) == 19
    assert [[h.id for h in r] for r in again.search(x[3:4], 1)] == [["p3"]]
    assert "p7" not in {h.id for h in again.search(x[7:8], 19)[0]}


RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from ragkit.index import Index
    from ragkit.embeddings import open_shards
    shards = open_shards(sys.argv[1])
    with Index.create(sys.argv[2], shards.encoder) as build:
        for block, vectors, lines, source, _ in shards.blocks():
            build.add(block, vectors, lines=lines, source=source)
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def _write_shard(folder: Path, n: int, dim: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "embeddings-00000-of-00001.npy", rng.standard_normal((n, dim)).astype(np.float16))
    text = "word " * 150
    with open(folder / "passages-00000-of-00001.jsonl", "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"d{i}", "title": "", "text": text + str(i)}) + "\n")
    enc = EncoderInfo("synthetic", dim, True, None, "s" * 32)
    (folder / "shard-00000-of-00001.json").write_text(json.dumps({
        "encoder": enc.to_json(), "dtype": "float16", "rows": n, "corpus_rows": n, "range": [0, n], "shard_id": 0,
        "num_shards": 1, "embeddings": "embeddings-00000-of-00001.npy", "passages": "passages-00000-of-00001.jsonl"}))


def test_build_memory_grows_with_the_index_not_the_corpus(tmp_path: Path) -> None:
    """Three times the passages (of 750 bytes each) cost the Faiss index's growth, not the corpus's (which held
    in memory, as before streaming, is 30 MB more)."""
    script = tmp_path / "build.py"
    script.write_text(RSS_SCRIPT)
    peaks = {}
    dim = 32
    for n in (20_000, 60_000):
        _write_shard(tmp_path / f"emb{n}", n, dim)
        out = subprocess.run([sys.executable, str(script), str(tmp_path / f"emb{n}"), str(tmp_path / f"idx{n}")],
                             capture_output=True, text=True, check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] * 1024
        assert len(Index.open(tmp_path / f"idx{n}")) == n
    index_growth = 40_000 * (4 * dim + 48)  # float32 vectors + id map
    corpus_growth = 40_000 * 750
    assert peaks[60_000] - peaks[20_000] < index_growth + corpus_growth / 2, peaks


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    from ragkit.errors import ResourceError

    index = Index.build(tmp_path / "idx", passages(5), unit_vectors(5, DIM), ENC)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "idx" / ".lock").unlink()
    (tmp_path / "idx" / ".lock").symlink_to(precious)
    with pytest.raises(ResourceError, match="writer lock"):
        index.remove(["p1"])
    assert precious.read_text() == "keep me" and len(Index.open(tmp_path / "idx")) == 5


def test_hits_read_after_the_index_changed_still_show_the_version_searched(tmp_path: Path) -> None:
    x, ps = unit_vectors(40, DIM), passages(40)
    index = Index.build(tmp_path / "idx", ps, x, ENC)
    index.search(x[:1], k=1)  # the Faiss file is read now, and carried over by the writes below
    rows = index.search(x[:2], k=2)  # passages not read yet
    index.upsert([Passage("p0", "rewritten")], x[:1], ENC)
    index.remove(["p1"])
    index.compact()
    assert [h.id for h in rows[0]][0] == "p0" and rows[0][0].text == ps[0].text
    assert rows[1][0].id == "p1" and len(rows[1]) == 2
    assert index.segments[0].loaded is False or index.info()["segments"] == 1
    [[hit]] = index.search(x[:1], k=1)
    assert (hit.id, hit.text) == ("p0", "rewritten")
    assert index.search(x[:1], k=1) == [[hit]]


def test_shards_naming_files_outside_their_folder_are_refused(tmp_path: Path) -> None:
    from ragkit.embeddings import open_shards

    _write_shard(tmp_path / "emb", 10, 8)
    meta_path = tmp_path / "emb" / "shard-00000-of-00001.json"
    meta = json.loads(meta_path.read_text())
    meta["embeddings"] = "../../etc/x.npy"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"shard-00000-of-00001.json.*'embeddings'.*not a file name inside"):
        open_shards(tmp_path / "emb")


def test_shards_with_fewer_passages_than_vectors_name_the_file(tmp_path: Path) -> None:
    from ragkit.embeddings import open_shards

    _write_shard(tmp_path / "emb", 10, 8)
    lines = (tmp_path / "emb" / "passages-00000-of-00001.jsonl").read_text().splitlines()
    (tmp_path / "emb" / "passages-00000-of-00001.jsonl").write_text("\n".join(lines[:7]) + "\n")
    with pytest.raises(InputError, match=r"passages-00000-of-00001.jsonl.*7 passages for 10 vectors"):
        with Index.create(tmp_path / "idx", open_shards(tmp_path / "emb").encoder) as build:
            for block, vectors, lines_, source, _ in open_shards(tmp_path / "emb").blocks():
                build.add(block, vectors, lines=lines_, source=source)
    assert not Index.exists(tmp_path / "idx")


@pytest.mark.parametrize("spec", ["ivf-pq:nlist=8,m=4,nprobe=4", "IVF8,Flat", "hnsw:M=16,ef_search=400"])
def test_deltas_merged_in_memory_search_like_a_fresh_open(tmp_path: Path, spec: str) -> None:
    """An open IVF index folds its deltas' lists into the loaded base (HNSW inserts small deltas into its
    graph); searching between changes (the merged base carried over) must equal opening the version afresh."""
    x, ps = unit_vectors(400, DIM), passages(400)
    index = Index.build(tmp_path / "idx", ps, x, ENC, spec=spec)
    queries = unit_vectors(10, DIM, seed=7)
    steps = [lambda: index.upsert(passages(15, "a", seed=1), unit_vectors(15, DIM, seed=1), ENC),
             lambda: index.remove(["p1", "p2", "a3"]),
             lambda: index.upsert([Passage("p4", "changed")] + passages(5, "b", seed=2), unit_vectors(6, DIM, seed=2), ENC),
             lambda: index.compact(),
             lambda: index.upsert(passages(3, "c", seed=3), unit_vectors(3, DIM, seed=3), ENC)]
    for step in steps:
        step()
        got = results(index, queries, 10)
        assert got == results(Index.open(tmp_path / "idx"), queries, 10)
        assert not {"p1", "p2", "a3"} & {pid for row in got for pid, _ in row}
    assert len(index._searchers()) == 1 and index.info()["segments"] == 2


def test_a_corrupted_deletes_file_is_refused_on_open(tmp_path: Path) -> None:
    from ragkit.cli import app
    from typer.testing import CliRunner

    from ragkit.errors import ResourceError

    index = Index.build(tmp_path / "idx", passages(20), unit_vectors(20, DIM), ENC)
    index.remove(["p1", "p2"])
    deletes = index.version_dir / index.manifest["segments"][-1]["deletes"]
    data = bytearray(deletes.read_bytes())
    data[-1] ^= 0xFF  # same size, another vid: p2 would come back
    deletes.write_bytes(bytes(data))
    with pytest.raises(ResourceError, match=r"deletes.npy: checksum mismatch"):
        Index.open(tmp_path / "idx")
    result = CliRunner().invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert result.exit_code == 4 and "checksum mismatch" in result.stderr


def test_crafted_index_folders_pointing_outside_are_refused(tmp_path: Path) -> None:
    from ragkit.errors import ResourceError

    Index.build(tmp_path / "idx", passages(5), unit_vectors(5, DIM), ENC)
    root = tmp_path / "idx"
    elsewhere = tmp_path / "v000009"
    os.rename(root / os.readlink(root / "current"), elsewhere)
    (root / "current").unlink()
    (root / "current").symlink_to("../v000009")
    with pytest.raises(ResourceError, match="not a version folder inside"):
        Index.open(root)
    (root / "current").unlink()
    os.rename(elsewhere, root / "v000001")
    (root / "current").symlink_to("v000001")
    manifest_path = root / "v000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../outside.bin"] = {"bytes": 1, "sha256": ""}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ResourceError, match="not a file inside"):
        Index.open(root)
