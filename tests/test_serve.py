"""`ragkit serve`: the HTTP API over an index (same rows as `ragkit index search`), its bounds and errors,
micro-batching, hot reload under load, generation and the OpenAI-compatible route, the CLI's listener."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import make_passages, run_cli, write_jsonl

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from ragkit.serve import ServeConfig, create_app  # noqa: E402

QUESTIONS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa", "who wrote the book"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path) -> dict[str, Path]:
    """One index with a BM25 side (hybrid and sparse work) and one without; the searches of the CLI."""
    root = tmp_path_factory.mktemp("serve")
    corpus = write_jsonl(root / "corpus.jsonl", make_passages(60))
    hybrid, dense = root / "hybrid-idx", root / "dense-idx"
    assert run_cli("index", "build", corpus, "-o", hybrid, "--model", tiny_encoder_path, "--device", "cpu",
                   "--sparse").exit_code == 0
    assert run_cli("index", "build", corpus, "-o", dense, "--model", tiny_encoder_path, "--device", "cpu").exit_code == 0
    return {"hybrid": hybrid, "dense": dense, "root": root}


def cli_rows(index: Path, queries: list[str], *extra: object) -> list[dict[str, Any]]:
    result = run_cli("index", "search", index, "--device", "cpu", *extra,
                     input_="\n".join(json.dumps({"id": f"q{i}", "query": q}) for i, q in enumerate(queries)) + "\n")
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def client_for(index: Path, **options: Any) -> TestClient:
    return TestClient(create_app(ServeConfig(index=[str(index)], device="cpu", **options)))


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_returns_the_rows_index_search_prints(built: dict[str, Path], mode: str) -> None:
    expected = cli_rows(built["hybrid"], QUESTIONS, "--k", 4, "--mode", mode)
    with client_for(built["hybrid"]) as client:
        response = client.post("/search", json={"queries": [{"id": f"q{i}", "query": q} for i, q in enumerate(QUESTIONS)],
                                                "k": 4, "mode": mode})
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["version"] == 1
    assert body["results"] == expected
    if mode == "hybrid":  # both sides' ranks travel with each fused hit
        ranks = [h["ranks"] for row in body["results"] for h in row["hits"]]
        assert all(set(r) == {"dense", "sparse"} for r in ranks) and any(r["sparse"] is not None for r in ranks)


def test_one_query_passages_info_health(built: dict[str, Path]) -> None:
    with client_for(built["hybrid"]) as client:
        one = client.post("/search", json={"query": "alpha beta", "k": 3}).json()
        assert [r["id"] for r in one["results"]] == ["1"] and len(one["results"][0]["hits"]) == 3
        top = one["results"][0]["hits"][0]
        passage = client.get(f"/passages/{top['id']}").json()
        assert (passage["id"], passage["text"], passage["title"]) == (top["id"], top["text"], top["title"])
        missing = client.get("/passages/no-such-id")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"
        info = client.get("/info").json()
        assert info["index"]["passages"] == 60 and info["sparse"] is True and info["version"] == 1
        assert info["batching"]["requests"] >= 2 and info["generation"] is None
        assert client.get("/health").json() == {"status": "ok", "version": 1}
        page = client.get("/")
        assert page.status_code == 200 and "ragkit search" in page.text
        assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"query": "a", "k": 101}, 422, "k"),
    ({"query": "a", "k": 0}, 422, "k"),
    ({"query": "a", "top_k": 3}, 422, "top_k"),
    ({"query": "a", "mode": "fuzzy"}, 422, "mode"),
    ({"query": "a", "dense_weight": 2}, 422, "dense_weight"),
    ({}, 422, "queries"),
    ({"query": "a", "queries": ["b"]}, 422, "queries"),
    ({"queries": []}, 422, "queries"),
    ({"queries": ["ok", {"title": "no text"}]}, 422, "queries[1]"),
    ({"queries": ["ok", "   "]}, 422, "queries[1]"),
    ({"queries": ["q"] * 65}, 413, "queries"),
    ({"query": "x" * 4097}, 413, "query"),
    ({"query": "a", "mode": "sparse"}, 422, "mode"),  # the dense-only index has no BM25 side
])
def test_bad_requests_are_4xx_naming_the_field_and_the_server_goes_on(built: dict[str, Path], body: dict,
                                                                       status: int, field: str) -> None:
    with client_for(built["dense"]) as client:
        response = client.post("/search", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["field"] == field and error["message"]
        assert client.post("/search", json={"query": "alpha", "k": 2}).status_code == 200


def test_malformed_json_oversized_bodies_and_api_keys(built: dict[str, Path]) -> None:
    key = "k" * 24
    with client_for(built["dense"], api_key=key, max_body_bytes=2048) as client:
        assert client.get("/health").status_code == 200  # for load balancers
        assert client.get("/").status_code == 200  # the page asks for the key itself
        denied = client.post("/search", json={"query": "alpha"})
        assert denied.status_code == 401 and denied.json()["error"]["field"] == "api_key"
        assert client.post("/search", json={"query": "alpha"}, headers={"x-api-key": "wrong" * 5}).status_code == 401
        auth = {"authorization": f"Bearer {key}"}
        assert client.post("/search", json={"query": "alpha"}, headers=auth).status_code == 200
        assert client.get("/info", headers={"x-api-key": key}).status_code == 200
        broken = client.post("/search", content=b'{"query": "alpha", ', headers={**auth, "content-type": "application/json"})
        assert broken.status_code == 422
        big = client.post("/search", json={"query": "a" * 3000}, headers=auth)
        assert big.status_code == 413 and big.json()["error"]["field"] == "body"

        def chunks():  # no content-length: the guard counts the streamed bytes
            yield b'{"query": "'
            for _ in range(10):
                yield b"a" * 500
            yield b'"}'

        streamed = client.post("/search", content=chunks(), headers={**auth, "content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/search", json={"query": "alpha"}, headers=auth).status_code == 200


def test_short_api_keys_and_bad_config_are_refused_before_loading(built: dict[str, Path]) -> None:
    from ragkit.errors import UsageError

    for options, words in [({"api_key": "short"}, "--api-key"), ({"port": 0}, "--port"),
                           ({"max_batch": 0}, "--max-batch"), ({"host": "not a host"}, "--host"),
                           ({"arch": "selfrag"}, "--model"), ({"index": ["a", "b"]}, "--shards")]:
        config = ServeConfig(**{"index": [str(built["dense"])], **options})
        with pytest.raises(UsageError, match=words.replace("-", r"\-")):
            config.check()


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Equal rows, scores to float32 rounding: a query padded inside a batch gets the same hits, but its
    vector may differ in the last bits from the one it gets alone."""
    def without_scores(body: dict) -> Any:
        return [[{k: v for k, v in h.items() if k != "score"} for h in row["hits"]] for row in body["results"]]

    assert [without_scores(b) for b in got] == [without_scores(b) for b in want]
    for b, w in zip(got, want):
        for row_b, row_w in zip(b["results"], w["results"]):
            assert [h["score"] for h in row_b["hits"]] == pytest.approx([h["score"] for h in row_w["hits"]], abs=1e-5)
        assert {k: v for k, v in b.items() if k != "results"} == {k: v for k, v in w.items() if k != "results"}


async def _concurrent(app: Any, bodies: list[dict], path: str = "/search") -> list[Any]:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_answered_as_alone(built: dict[str, Path]) -> None:
    bodies = [{"queries": [{"id": str(i), "query": QUESTIONS[i % 5] + f" {i}"}], "k": 3 + i % 3,
               "mode": ("dense", "hybrid", "sparse")[i % 3]} for i in range(24)]
    alone = create_app(ServeConfig(index=[str(built["hybrid"])], device="cpu", max_batch=1, batch_window_ms=0))
    batched = create_app(ServeConfig(index=[str(built["hybrid"])], device="cpu", batch_window_ms=50, max_batch=64))
    try:
        one_by_one = asyncio.run(_concurrent(alone, bodies))
        together = asyncio.run(_concurrent(batched, bodies))
        assert_same_rows([r.json() for r in together], [r.json() for r in one_by_one])
        stats_alone = alone.state.server.search_batcher.stats
        stats = batched.state.server.search_batcher.stats
        assert stats_alone.batches == 24 and stats_alone.largest == 1
        assert stats.batches < 24 and stats.largest > 1, stats
    finally:
        alone.state.server.close()
        batched.state.server.close()


def test_timeouts_and_back_pressure_answer_json_and_the_server_recovers(built: dict[str, Path]) -> None:
    app = create_app(ServeConfig(index=[str(built["dense"])], device="cpu", timeout_s=0.2, max_pending=64,
                                 max_queries=64))
    server = app.state.server
    real = server.backend.handle
    gate = threading.Event()

    def stuck(jobs: list[Any]) -> list[Any]:
        gate.wait(5)
        return real(jobs)

    server.backend.handle = stuck
    server.search_batcher.handle = stuck
    try:
        with TestClient(app) as client:
            slow = client.post("/search", json={"query": "alpha"})
            assert slow.status_code == 504 and slow.json()["error"]["field"] == "timeout"
            responses = asyncio.run(_concurrent(app, [{"queries": ["alpha"] * 40}] * 3))
            codes = [r.status_code for r in responses]  # 40 wait, the next 40 fit (max_pending 64) no more
            assert 503 in codes and set(codes) <= {503, 504}, codes
            busy = next(r for r in responses if r.status_code == 503)
            assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]
            gate.set()
            server.search_batcher.handle = real
            time.sleep(0.3)
            assert client.post("/search", json={"query": "alpha"}).status_code == 200
    finally:
        gate.set()
        server.close()


def test_a_crash_inside_a_batch_is_a_500_for_that_batch_only(built: dict[str, Path]) -> None:
    app = create_app(ServeConfig(index=[str(built["dense"])], device="cpu"))
    server = app.state.server
    real = server.search_batcher.handle
    calls = {"n": 0}

    def flaky(jobs: list[Any]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(jobs)

    server.search_batcher.handle = flaky
    with TestClient(app, raise_server_exceptions=False) as client:  # as a real client sees it
        crashed = client.post("/search", json={"query": "alpha"})
        assert crashed.status_code == 500 and "boom" in crashed.json()["error"]["message"]
        assert client.post("/search", json={"query": "alpha"}).status_code == 200
