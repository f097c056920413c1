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
                           ({"arch": "selfrag"}, "--model"), ({"index": ["a", "b"]}, "--shards"),
                           ({"shards": True}, "--shards: 1 index folder")]:  # one shard hung (issue 27.4)
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
        # json.dumps' ASCII escapes, so that a body may carry a lone surrogate as clients send it (\\ud800)
        return await asyncio.gather(*(client.post(path, content=json.dumps(b), headers={"content-type": "application/json"})
                                      for b in bodies))


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


@pytest.mark.parametrize("window_ms", [0, 200])
def test_one_bad_query_fails_alone_never_its_batch(built: dict[str, Path], window_ms: int) -> None:
    """A lone surrogate (not encodable text) is refused with 422 naming the field before it joins a batch; the
    good requests that share its rounds are all answered (issue 27.1: 20 of 30 failed, 30 of 30 at 200 ms)."""
    app = create_app(ServeConfig(index=[str(built["dense"])], device="cpu", batch_window_ms=window_ms))
    try:
        for _ in range(3):
            bodies = [{"query": f"alpha {i}"} for i in range(6)] + [{"query": "x \ud800"}]
            codes = [r.status_code for r in asyncio.run(_concurrent(app, bodies))]
            assert codes == [200] * 6 + [422], codes
        generate_like = asyncio.run(_concurrent(app, [{"queries": ["alpha", {"query": "b", "note": "\udfff"}]}]))[0]
        assert generate_like.status_code == 422 and generate_like.json()["error"]["field"] == "queries[1].note"
    finally:
        app.state.server.close()


def test_a_batch_that_raises_is_retried_request_by_request() -> None:
    """Whatever slips past validation: the batch's requests are retried one by one, so only the culprit fails."""
    from ragkit.serve.batcher import MicroBatcher

    def handle(payloads: list[str]) -> list[str]:
        if "poison" in payloads:
            raise ValueError("poisoned batch")
        return [p.upper() for p in payloads]

    gate = threading.Event()
    batcher = MicroBatcher(lambda p: (gate.wait(5), handle(p))[1], window_s=0.2, max_batch=64, max_pending=64)
    try:
        futures = [batcher.submit(p) for p in ("a", "b", "poison", "c")]
        gate.set()
        assert [f.result(5) for i, f in enumerate(futures) if i != 2] == ["A", "B", "C"]
        with pytest.raises(ValueError, match="poisoned"):
            futures[2].result(5)
        assert batcher.stats.largest == 4  # they did share one batch
    finally:
        batcher.close()


def test_api_docs_are_served_from_the_package_not_a_cdn(built: dict[str, Path]) -> None:
    """FastAPI's default /docs page loads Swagger UI from a public CDN (issue 27.13)."""
    import re

    with client_for(built["dense"]) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text) + re.findall(r"url: '([^']+)'", page.text)
        assert sources and all(s.startswith("/") for s in sources), sources  # this origin only
        for asset in sources:
            assert client.get(asset).status_code == 200, asset
        assert "swagger" in client.get("/static/swagger/swagger-ui-bundle.js").text.lower()[:5000]


def _ragkit(*args: object, timeout: int = 120) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ragkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr


def test_hot_reload_under_load_each_request_sees_one_version(built: dict[str, Path], tmp_path: Path) -> None:
    """`ragkit index add` and `remove` (real writer processes) publish while requests keep coming: every
    request is answered, and the new passage is in a response exactly when its version holds it."""
    import shutil

    index = tmp_path / "live"
    shutil.copytree(built["hybrid"], index, symlinks=True)
    new = {"id": "fresh-1", "title": "fresh", "text": "unmistakable zebra quartz nebula passage"}
    write_jsonl(tmp_path / "new.jsonl", [new])
    app = create_app(ServeConfig(index=[str(index)], device="cpu", reload_interval_s=0.1, batch_window_ms=2))
    seen: list[tuple[int, str, bool, bool, int]] = []  # (version, mode, fresh on top, fresh anywhere, status)

    async def load(stop: threading.Event) -> None:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            while not stop.is_set():
                modes = ("dense", "hybrid", "sparse")
                bodies = [{"queries": [new["text"], "alpha beta"], "k": 3, "mode": mode} for mode in modes]
                for mode, r in zip(modes, await asyncio.gather(*(client.post("/search", json=b) for b in bodies))):
                    if r.status_code != 200:
                        seen.append((-1, mode, False, False, r.status_code))
                        continue
                    body = r.json()
                    ids = [[h["id"] for h in row["hits"]] for row in body["results"]]
                    seen.append((body["version"], mode, ids[0][:1] == ["fresh-1"],
                                 any("fresh-1" in row for row in ids), 200))
                await asyncio.sleep(0.01)

    def writer(stop: threading.Event) -> None:
        try:
            time.sleep(0.3)
            _ragkit("index", "add", index, tmp_path / "new.jsonl", "--device", "cpu")
            time.sleep(0.6)
            _ragkit("index", "remove", index, "--ids", "fresh-1")
            time.sleep(0.6)
        finally:
            stop.set()

    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(stop,))
    thread.start()
    try:
        asyncio.run(load(stop))
    finally:
        thread.join()
        reloads = app.state.server.backend.reloads
        app.state.server.close()
    statuses = {row[-1] for row in seen}
    assert statuses == {200}, statuses  # nothing dropped
    versions = {row[0] for row in seen}
    assert versions >= {1, 2, 3}, versions  # the server followed both changes without a restart
    assert reloads == 2
    for version, mode, top, anywhere, _ in seen:
        # both queries of a request searched one version: only version 2 holds the new passage, and there
        # BM25 (alone or fused) ranks it first for its own words
        assert anywhere <= (version == 2), (version, mode)
        if version == 2 and mode != "dense":
            assert top, (version, mode)


def _drop_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "timings"} for row in rows]


def test_generate_reads_the_served_hits_like_ragkit_generate(built: dict[str, Path], tiny_lm_path: Path) -> None:
    import ragkit

    config = ServeConfig(index=[str(built["hybrid"])], device="cpu", model=str(tiny_lm_path), k=3, max_new_tokens=6)
    questions = [{"id": "a", "question": "alpha beta gamma"}, {"id": "b", "question": "delta epsilon"}]
    with TestClient(create_app(config)) as client:
        served = client.post("/generate", json={"queries": questions, "mode": "hybrid"})
        assert served.status_code == 200, served.text
        body = served.json()
        hits = client.post("/search", json={"queries": questions, "k": 3, "mode": "hybrid"}).json()["results"]
        fewer = client.post("/generate", json={"query": "alpha", "k": 1}).json()["results"][0]
        assert len(fewer["passages"]) == 1
        too_many = client.post("/generate", json={"query": "alpha", "k": 4})
        assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "k"
        info = client.get("/info").json()["generation"]
        assert info["model"] == str(tiny_lm_path) and info["retrieves"] is True
    # what `ragkit generate --arch rag --passages hits` answers for the rows `index search` printed
    answerer = ragkit.load("rag", str(tiny_lm_path), passages="ctxs", k=3, max_new_tokens=6, device="cpu")
    expected = answerer.answer([{**q, "hits": row["hits"]} for q, row in zip(questions, hits)])
    assert body["version"] == 1
    assert _drop_timings(body["results"]) == _drop_timings(expected)
    assert [p["id"] for p in body["results"][0]["passages"]] == [h["id"] for h in hits[0]["hits"]]


def test_chat_completions_answer_with_their_passages_and_refuse_what_they_cannot_honour(
        built: dict[str, Path], tiny_lm_path: Path) -> None:
    config = ServeConfig(index=[str(built["dense"])], device="cpu", model=str(tiny_lm_path), k=2, max_new_tokens=5)
    with TestClient(create_app(config)) as client:
        chat = client.post("/v1/chat/completions", json={
            "model": str(tiny_lm_path), "messages": [{"role": "user", "content": "alpha beta"}], "temperature": 0})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        generated = client.post("/generate", json={"query": "alpha beta"}).json()["results"][0]
        message = body["choices"][0]["message"]
        assert body["object"] == "chat.completion" and message["role"] == "assistant"
        assert message["content"] == generated["output"]
        assert [c["id"] for c in message["context"]["citations"]] == [p["id"] for p in generated["passages"]]
        assert client.get("/v1/models").json()["data"][0]["id"] == str(tiny_lm_path)
        parts = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "alpha beta"}]}]})
        assert parts.json()["choices"][0]["message"]["content"] == generated["output"]
        for body, field in [
            ({"messages": [{"role": "user", "content": "q"}], "stream": True}, "stream"),
            ({"messages": [{"role": "user", "content": "q"}], "n": 2}, "n"),
            ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 100}, "max_tokens"),
            ({"messages": [{"role": "user", "content": "q"}], "temperature": 0.7}, "temperature"),
            ({"messages": [{"role": "user", "content": "q"}], "tools": []}, "tools"),
            ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]}, "messages"),
            ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
            ({"model": "gpt-4", "messages": [{"role": "user", "content": "q"}]}, "model"),
            ({"messages": "hello"}, "messages"),
        ]:
            refused = client.post("/v1/chat/completions", json=body)
            assert 400 <= refused.status_code < 500 and refused.json()["error"]["field"] == field, (body, refused.text)
        assert client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "q"}], "max_tokens": 5}).status_code == 200
    with client_for(built["dense"]) as search_only:
        missing = search_only.post("/generate", json={"query": "q"})
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "model"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    import ipaddress

    found = set()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.add(str(ipaddress.ip_address(words)))
    return found


class LiveServer:
    """`ragkit serve` as its own process on a free port."""

    def __init__(self, *args: object) -> None:
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "serve", *map(str, args),
                                         "--port", str(self.port), "--device", "cpu"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.time() + 90
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ragkit serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("ragkit serve did not answer /health within 90 s")

    def stop(self) -> tuple[int, str]:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=30)
        except Exception:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def test_the_command_listens_on_loopback_only_and_stops_cleanly_on_sigterm(built: dict[str, Path]) -> None:
    import httpx

    server = LiveServer(built["dense"])
    try:
        assert _listening_addresses(server.port) == {"127.0.0.1"}
        assert httpx.post(server.url + "/search", json={"query": "alpha", "k": 2}).json()["results"][0]["hits"]
        assert httpx.post(server.url + "/search", content=b"{nope").status_code == 422
    finally:
        code, err = server.stop()
    # uvicorn shuts down gracefully (lifespan end: workers joined), then re-raises SIGTERM as its exit status
    assert code == -15 and "serve: stopped (1 index requests answered in 1 batches)" in err, (code, err)
    assert "Traceback" not in err
    assert f"http://127.0.0.1:{server.port}/ " in err


def test_the_command_refuses_bad_setups_with_exit_codes(built: dict[str, Path], tmp_path: Path) -> None:
    missing = run_cli("serve", tmp_path / "nothing-here", "--port", _free_port())
    assert missing.exit_code == 4 and "not a ragkit index" in missing.stderr
    assert run_cli("serve", built["dense"], "--port", "0").exit_code == 2
    shards = run_cli("serve", built["dense"], built["hybrid"])
    assert shards.exit_code == 2 and "--shards" in shards.stderr
    assert run_cli("serve", built["dense"], "--max-new-tokens", "8").exit_code == 2  # generation needs --model


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    """Debian's headless Chromium through its chromedriver (apt-get install chromium chromium-driver)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_search_page_in_a_real_browser(browser: Any, tmp_path: Path, tiny_encoder_path: Path) -> None:
    """Type a query, pick hybrid, search: the page shows the hits /search returns (rank, score, title, text,
    id, both sides' ranks); a passage holding markup is shown as text, never run; a link with ?q= searches."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    hostile = {"id": "hostile", "title": "<b>bold</b>",
               "text": "alpha beta <img src=x onerror=\"window.pwned=1\"> <script>window.pwned=2</script>"}
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(30) + [hostile])
    index = tmp_path / "idx"
    assert run_cli("index", "build", corpus, "-o", index, "--model", tiny_encoder_path, "--device", "cpu",
                   "--sparse").exit_code == 0
    server = LiveServer(index)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: "31 passages" in d.find_element(By.ID, "about").text)
        box = browser.find_element(By.ID, "q")
        box.send_keys("alpha beta")
        Select(browser.find_element(By.ID, "mode")).select_by_value("hybrid")
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.hit")) == 5)
        expected = httpx.post(server.url + "/search", json={"query": "alpha beta", "k": 5, "mode": "hybrid"}).json()
        shown = [{"id": li.get_attribute("data-id"), "rank": li.find_element(By.CLASS_NAME, "rank").text,
                  "score": li.find_element(By.CLASS_NAME, "score").text,
                  "text": li.find_element(By.CLASS_NAME, "text").text,
                  "ranks": li.find_element(By.CLASS_NAME, "ranks").text}
                 for li in browser.find_elements(By.CSS_SELECTOR, "#results li.hit")]
        side = lambda r: "–" if r is None else f"#{r}"  # noqa: E731
        assert shown == [{"id": h["id"], "rank": f"#{h['rank']}", "score": f"{h['score']:.4f}", "text": h["text"],
                          "ranks": f"dense {side(h['ranks']['dense'])} · sparse {side(h['ranks']['sparse'])}"}
                         for h in expected["results"][0]["hits"]]
        assert "hostile" in [s["id"] for s in shown]  # BM25 finds it for "alpha beta"
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements(By.CSS_SELECTOR, "#results img, #results script, #results b")
        assert "5 hits" in browser.find_element(By.ID, "status").text
        assert "q=alpha+beta" in browser.current_url  # the search is a shareable link
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        from PIL import Image

        image = Image.open(shot).convert("L")
        assert image.size[0] >= 800
        assert len(set(image.getdata())) > 8  # text was drawn, not a blank page

        browser.get(server.url + "/?q=alpha+beta&k=2&mode=sparse")
        wait.until(lambda d: "hits in" in d.find_element(By.ID, "status").text)
        sparse = httpx.post(server.url + "/search", json={"query": "alpha beta", "k": 2, "mode": "sparse"}).json()
        assert [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#results li.hit")] == \
            [h["id"] for h in sparse["results"][0]["hits"]] == ["hostile"]  # BM25: no other passage has the words
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no failed loads, no JS errors
    finally:
        server.stop()


def test_replicas_and_shards_on_ray_serve_what_one_process_serves(built: dict[str, Path], tmp_path: Path,
                                                                  tiny_encoder_path: Path) -> None:
    """--replicas 2 over the index, --shards over its two halves (a private local Ray): the same dense hits
    as the in-process server; an add to a shard is served without a restart (each actor follows its index)."""
    ray = pytest.importorskip("ray")
    passages = make_passages(60)
    halves = []
    for i, part in enumerate((passages[:30], passages[30:])):
        corpus = write_jsonl(tmp_path / f"half-{i}.jsonl", part)
        assert run_cli("index", "build", corpus, "-o", tmp_path / f"shard-{i}", "--model", tiny_encoder_path,
                       "--device", "cpu").exit_code == 0
        halves.append(str(tmp_path / f"shard-{i}"))
    body = {"queries": QUESTIONS, "k": 6}
    with client_for(built["dense"]) as local:
        expected = local.post("/search", json=body).json()
    try:
        for options in ({"index": [str(built["dense"])], "replicas": 2}, {"index": halves, "shards": True}):
            app = create_app(ServeConfig(device="cpu", **options))
            with TestClient(app) as client:
                served = client.post("/search", json=body).json()
                assert_same_rows([served], [expected])
                assert client.post("/search", json={**body, "mode": "hybrid"}).json()["error"]["field"] == "mode"
                top = expected["results"][0]["hits"][0]
                assert client.get(f"/passages/{top['id']}").json()["text"] == top["text"]
                info = client.get("/info").json()
                assert info["layout"].startswith("ray: ") and len(info["shards"]) == 2
                if options.get("shards"):
                    new = {"id": "fresh-1", "title": "fresh", "text": "unmistakable zebra quartz nebula"}
                    write_jsonl(tmp_path / "new.jsonl", [new])
                    _ragkit("index", "add", halves[1], tmp_path / "new.jsonl", "--device", "cpu")
                    assert client.get("/passages/fresh-1").json()["text"] == new["text"]
                    versions = sorted(s["version"] for s in client.get("/info").json()["shards"])
                    assert versions == [1, 2]
    finally:
        ray.shutdown()


def test_a_refreshed_index_is_served_with_its_new_embedder(built: dict[str, Path], tmp_path: Path,
                                                           other_tiny_encoder_path: Path) -> None:
    """`ragkit index refresh --model NEW` re-embeds the served index: the server loads NEW for queries
    (vectors of the old model would not match) and answers what `index search` answers on the new version."""
    import shutil

    index = tmp_path / "live"
    shutil.copytree(built["dense"], index, symlinks=True)
    app = create_app(ServeConfig(index=[str(index)], device="cpu", reload_interval_s=0.1))
    with TestClient(app) as client:
        before = client.post("/search", json={"queries": QUESTIONS, "k": 4}).json()
        _ragkit("index", "refresh", index, "--model", other_tiny_encoder_path, "--device", "cpu")
        time.sleep(0.5)
        after = client.post("/search", json={"queries": [{"id": f"q{i}", "query": q} for i, q in enumerate(QUESTIONS)],
                                             "k": 4}).json()
        assert after["version"] == before["version"] + 1
        assert client.get("/info").json()["index"]["embedder"] == str(other_tiny_encoder_path)
    assert_same_rows([after], [{"version": after["version"], "results": cli_rows(index, QUESTIONS, "--k", 4)}])
    assert [h["id"] for h in after["results"][0]["hits"]] != [h["id"] for h in before["results"][0]["hits"]] or \
        [h["score"] for h in after["results"][0]["hits"]] != [h["score"] for h in before["results"][0]["hits"]]


RENAMED = {"timeout": "timeout_s", "reload_interval": "reload_interval_s"}


def _serve_options() -> list[Any]:
    import typer.main

    from ragkit.cli import app

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return [p for p in command.params if p.param_type_name == "option" and p.name != "help"]


def test_every_serve_flag_reaches_the_config_with_its_value_and_shows_its_default(
        built: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import ragkit.serve.app as serve_app

    defaults = ServeConfig()
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    changed = {"host": "127.0.0.2", "port": 8123, "api_key": "x" * 20, "embedder": "minilm", "encoder_backend": "int8",
               "device": "cpu", "threads": 1, "batch_window_ms": 3.0, "max_batch": 7, "max_pending": 999,
               "max_queries": 9, "max_k": 11, "max_query_chars": 99, "max_body_bytes": 5000, "timeout": 4.0,
               "max_connections": 13, "reload_interval": 0.5, "replicas": 0, "shards": True, "ray_address": "auto",
               "model": "smollm2", "arch": "selfrag", "k": 2, "max_new_tokens": 9, "generator_backend": "vllm",
               "dtype": "float16", "generate_batch_window_ms": 1.0, "generate_max_batch": 3}
    options = _serve_options()
    assert {p.name for p in options} == set(changed)  # a new flag must be added here (and to ServeConfig)
    for p in options:
        field = RENAMED.get(p.name, p.name)
        assert field in fields, p.name
        if p.default is not None:
            assert p.default == getattr(defaults, field), p.name
    seen: list[ServeConfig] = []
    monkeypatch.setattr(serve_app, "run", seen.append)
    monkeypatch.delenv("RAGKIT_API_KEY", raising=False)
    for p in options:
        value = changed[p.name]
        if p.name == "replicas":
            argv, value = ["--replicas", "2"], 2
        elif p.is_flag:
            argv = [p.opts[0]]
        else:
            argv = [p.opts[0], str(value)]
        extra = [] if p.name in ("model",) else (["--model", "smollm2"] if p.name in (
            "arch", "k", "max_new_tokens", "generator_backend", "dtype", "generate_batch_window_ms",
            "generate_max_batch") else [])
        indexes = [built["dense"], built["hybrid"]] if p.name == "shards" else [built["dense"]]
        result = run_cli("serve", *indexes, *argv, *extra)
        assert result.exit_code == 0, (p.name, result.stderr)
        assert getattr(seen[-1], RENAMED.get(p.name, p.name)) == value, p.name
    assert run_cli("serve", built["dense"], "--bogus").exit_code == 2


def test_generate_with_a_self_rag_model_scores_the_served_passages(built: dict[str, Path],
                                                                   tiny_selfrag_path: Path) -> None:
    """--arch selfrag: the served hits are the candidates Self-RAG reads (when it decides to retrieve), the
    rows equal ragkit.load("selfrag") on the same hits."""
    import ragkit

    config = ServeConfig(index=[str(built["dense"])], device="cpu", model=str(tiny_selfrag_path), arch="selfrag",
                         k=2, max_new_tokens=4)
    questions = [{"id": "a", "question": "alpha beta gamma"}, {"id": "b", "question": "delta epsilon"}]
    with TestClient(create_app(config)) as client:
        served = client.post("/generate", json={"queries": questions})
        assert served.status_code == 200, served.text
        hits = client.post("/search", json={"queries": questions, "k": 2}).json()["results"]
        assert client.get("/info").json()["generation"]["arch"] == "selfrag"
    answerer = ragkit.load("selfrag", str(tiny_selfrag_path), passages="ctxs", k=2, max_new_tokens=4, device="cpu",
                           batch_size=8)
    expected = answerer.answer([{**q, "hits": row["hits"]} for q, row in zip(questions, hits)])
    assert _drop_timings(served.json()["results"]) == _drop_timings(expected)
