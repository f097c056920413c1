"""An unreachable Ray address is refused at once (issue 27.8: ray.init retried it for 6.5 minutes, one core
busy, before a ConnectionError that ended as exit 1)."""

from __future__ import annotations

import socket
import time

import pytest

from ragkit.errors import ResourceError, UsageError
from ragkit.retrieval.ray_retriever import check_reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_closed_address_is_a_resource_error_within_seconds(form: str) -> None:
    address = form.format(port=_closed_port())
    began = time.monotonic()
    with pytest.raises(ResourceError, match="Ray cluster at .*refused") as caught:
        check_reachable(address)
    assert time.monotonic() - began < 10
    assert caught.value.exit_code == 4 and address in str(caught.value)


def test_a_listening_address_passes_and_auto_is_left_to_ray() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")


def test_a_malformed_port_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="HOST:PORT"):
        check_reachable("127.0.0.1:gcs")


def test_the_command_line_exits_4_without_starting_anything(tmp_path) -> None:
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from ragkit.cli import app
    from conftest import make_passages, write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(20))
    began = time.monotonic()
    result = CliRunner().invoke(app, ["embed", str(corpus), "-o", str(tmp_path / "emb"), "--ray",
                                      "--ray-address", f"127.0.0.1:{_closed_port()}", "--device", "cpu"])
    assert result.exit_code == 4, result.output
    assert "Ray cluster at" in result.output and time.monotonic() - began < 60
