"""Index specs: parsing, factory strings, memory estimates and `auto` under budgets."""

from __future__ import annotations

import pytest

from ragkit.errors import UsageError
from ragkit.index.spec import (
    IndexSpec,
    choose_auto,
    default_nlist,
    default_pq_m,
    estimate_memory,
    parse_memory,
    parse_spec,
    resolve_spec,
)


@pytest.mark.parametrize(
    "text, kind, params, factory",
    [
        ("flat", "flat", {}, "Flat"),
        ("hnsw", "hnsw", {}, "HNSW32,Flat"),
        ("hnsw:M=16,ef_search=64", "hnsw", {"M": 16, "ef_search": 64}, "HNSW16,Flat"),
        ("ivf-pq:nlist=64,m=8", "ivf-pq", {"nlist": 64, "m": 8}, "IVF64,PQ8x8"),
        ("IVF256,SQ8", "factory", {}, "IVF256,SQ8"),
        ("PQ16", "factory", {}, "PQ16"),
    ],
)
def test_parse(text: str, kind: str, params: dict, factory: str) -> None:
    spec = parse_spec(text)
    assert spec.kind == kind and spec.params == params
    assert spec.factory(384, 10_000) == factory


@pytest.mark.parametrize("text", ["hnsw32", "bogus", "hnsw:M=abc", "ivf-pq:foo=1", "IVF12,Bogus99", "flat:x=1", "IDMap,Flat"])
def test_bad_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_spec(text)


def test_hnsw_cannot_remove_in_place_flat_and_ivf_can() -> None:
    assert not parse_spec("hnsw").removes_in_place
    assert not parse_spec("HNSW32,Flat").removes_in_place
    assert parse_spec("flat").removes_in_place and parse_spec("ivf-pq").removes_in_place


@pytest.mark.parametrize("text, expected", [("2G", 2 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000)])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


def test_parse_memory_rejects_garbage() -> None:
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory("lots")


def test_defaults_are_sane() -> None:
    assert default_nlist(1_000_000) == 4096  # 4·sqrt(1e6) = 4000 -> nearest power of two
    assert default_nlist(1000) == 25  # capped so each list has 39 training points
    assert default_pq_m(384) == 96 and default_pq_m(768) == 192 and 100 % default_pq_m(100) == 0


def test_auto_small_corpus_is_flat() -> None:
    assert choose_auto(5_000, 384, 2 * 2**30).spec.kind == "flat"


def test_auto_large_corpus_with_room_is_hnsw() -> None:
    choice = choose_auto(1_000_000, 384, 4 * 2**30)
    assert choice.spec.kind == "hnsw"
    assert estimate_memory(choice.spec, 1_000_000, 384) <= 4 * 2**30


def test_auto_flat_that_does_not_fit_moves_on() -> None:
    # 50k x 384 floats is ~75 MiB: a 40 MiB budget cannot hold flat or HNSW
    choice = choose_auto(50_000, 384, 40 * 2**20)
    assert choice.spec.kind == "ivf-pq"
    assert estimate_memory(choice.spec, 50_000, 384) <= 40 * 2**20


def test_auto_tight_budget_picks_largest_pq_that_fits() -> None:
    budget = 200 * 2**20
    choice = choose_auto(10_000_000, 384, budget)
    m = choice.spec.params["m"]
    assert choice.spec.kind == "ivf-pq" and 384 % m == 0
    assert estimate_memory(choice.spec, 10_000_000, 384) <= budget
    bigger = [d for d in range(m + 1, 193) if 384 % d == 0]
    assert all(estimate_memory(IndexSpec("ivf-pq", {"nlist": choice.spec.params["nlist"], "m": d}), 10_000_000, 384) > budget for d in bigger)


def test_auto_impossible_budget_says_what_is_needed() -> None:
    with pytest.raises(UsageError, match="too small") as err:
        choose_auto(10_000_000, 384, 2**20)
    assert err.value.hint and "needs" in err.value.hint


def test_resolve_pins_ivf_parameters_and_checks_budget() -> None:
    spec, _ = resolve_spec(parse_spec("ivf-pq"), 20_000, 64, None)
    assert spec.params == {"nlist": default_nlist(20_000), "m": 16, "nprobe": 16}
    with pytest.raises(UsageError, match="over --max-memory"):
        resolve_spec(parse_spec("flat"), 1_000_000, 384, 2**20)
    with pytest.raises(UsageError, match="at least 256 vectors"):
        resolve_spec(parse_spec("ivf-pq"), 100, 64, None)


def test_factory_strings_are_checked_for_syntax_then_for_the_dimension_at_build(tmp_path) -> None:
    import numpy as np

    from ragkit.errors import UsageError
    from ragkit.index import Index
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import EncoderInfo

    assert parse_spec("PQ48x8").factory_string == "PQ48x8"  # fits 384-d MiniLM vectors; 64 % 48 != 0 once refused it
    with pytest.raises(UsageError, match="Faiss rejects"):
        parse_spec("PQ48x8,Bogus")
    vectors = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    passages = [Passage(f"p{i}", "text") for i in range(300)]
    with pytest.raises(UsageError, match="does not fit 32-dimensional"):
        Index.build(tmp_path / "x", passages, vectors, EncoderInfo("m", 32, True, None, "f"), spec="PQ48x8")
