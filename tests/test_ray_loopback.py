"""A private local Ray listens on 127.0.0.1 only and does not outlive the command that started it (issue 17.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_passages, write_jsonl
from ragkit.retrieval.loopback import shim_path

RAGKIT = [sys.executable, "-m", "ragkit.cli"]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

needs_shim = pytest.mark.skipif(shim_path() is None, reason="no C compiler to build the bind wrapper")

PROBE = """
import json, socket
out = {}
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"), (socket.AF_INET, "192.0.2.1")):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        out[host] = s.getsockname()[0]
    except OSError as e:
        out[host] = "error"
print(json.dumps(out))
"""


@needs_shim
def test_the_bind_wrapper_turns_wildcard_binds_into_loopback_and_leaves_others_alone() -> None:
    import json

    env = {**os.environ, "LD_PRELOAD": str(shim_path())}
    plain = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    wrapped = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                        env=env).stdout)
    assert plain["0.0.0.0"] == "0.0.0.0" and plain["::"] == "::"
    assert wrapped["0.0.0.0"] == "127.0.0.1"
    assert wrapped["::"] == "::ffff:127.0.0.1"
    assert wrapped["192.0.2.1"] == plain["192.0.2.1"]  # a specific address is the caller's choice: untouched


@needs_shim
def test_a_v4_mapped_loopback_listener_accepts_ipv4_connections() -> None:
    """gRPC binds '::' dual-stack; rewritten to ::ffff:127.0.0.1 it must still take Ray's 127.0.0.1 clients."""
    code = ("import socket\ns=socket.socket(socket.AF_INET6)\ns.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
            "s.bind(('::',0)); s.listen(1); print(s.getsockname()[1], flush=True); c,_=s.accept(); c.sendall(b'ok')\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "LD_PRELOAD": str(shim_path())})
    try:
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(2) == b"ok"
    finally:
        server.kill()
        server.wait()


def _tree(root: int) -> list:
    import psutil

    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


@pytest.mark.slow
@needs_shim
def test_a_private_ray_listens_on_loopback_only_and_dies_with_its_driver(tmp_path: Path,
                                                                        tiny_encoder_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(60_000))
    driver = subprocess.Popen([*RAGKIT, "embed", str(corpus), "-o", str(tmp_path / "emb"), "-m", str(tiny_encoder_path),
                               "--device", "cpu", "--num-shards", "4", "--ray", "--ray-actors", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    listeners: dict[tuple[int, str], set[str]] = {}
    seen: dict[int, str] = {}
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        for proc in _tree(driver.pid):
            try:
                name = proc.name()
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listeners.setdefault((proc.pid, name), set()).add(conn.laddr.ip)
                seen[proc.pid] = name
            except psutil.Error:
                continue
        names = " ".join(name for (_, name) in listeners)
        if "gcs_server" in names and "raylet" in names and "ray::" in names and driver.pid in {p for p, _ in listeners}:
            break
        time.sleep(0.3)
    assert driver.poll() is None, driver.stderr.read()
    assert any(pid == driver.pid for pid, _ in listeners), listeners  # the driver's own core-worker server
    outside = {key: ips for key, ips in listeners.items() if not ips <= LOOPBACK}
    assert not outside, f"listening beyond loopback: {outside}"

    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)  # the cluster's secret, this user's only

    driver.send_signal(signal.SIGKILL)
    driver.wait()
    seen.update({p.pid: p.name() for p in _tree(driver.pid)})
    deadline = time.time() + 10
    alive = []
    while time.time() < deadline:
        alive = [f"{pid} {name}" for pid, name in seen.items() if pid != driver.pid and psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.25)
    assert not alive, f"Ray processes outlived the killed driver by 10 s: {alive}"


def _raylet_children(raylets: set[int]) -> list[str]:
    """Live processes whose environment names one of `raylets` as their raylet (Ray's agents and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(e.startswith(b"RAY_RAYLET_PID=") and e[15:].isdigit() and int(e[15:]) in raylets
                                for e in environ):
            found.append(f"{entry.name} {(entry / 'comm').read_text().strip() if (entry / 'comm').exists() else ''}")
    return found


@pytest.mark.slow
def test_a_driver_killed_inside_ray_init_leaves_no_ray_process() -> None:
    """CI stop 35: the reaper started only after ray.init returned, so a driver killed inside it left Ray's
    DashboardAgent running (60 s, then it gives up on the dead GCS by itself)."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    driver = subprocess.Popen([sys.executable, "-c", "import ray, time\nfrom ragkit.retrieval.loopback import "
                               "init_private_ray\ninit_private_ray(ray, 1)\ntime.sleep(300)\n"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    raylets: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and not raylets:
        for proc in _tree(driver.pid):
            try:
                seen[proc.pid] = proc.name()
                if "raylet" in proc.name():
                    raylets.add(proc.pid)
            except psutil.Error:
                continue
        time.sleep(0.05)
    assert raylets, "the driver started no raylet"
    time.sleep(0.3)  # inside ray.init: the raylet is starting its agents
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    alive: list[str] = []
    while time.time() < deadline:
        alive = [f"{pid} {name}" for pid, name in seen.items() if pid != driver.pid and psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and "ray_reaper" not in
                 " ".join(psutil.Process(pid).cmdline())]
        alive += _raylet_children(raylets)
        if not alive:
            break
        time.sleep(0.25)
    assert not alive, f"Ray processes outlived a driver killed inside ray.init by 10 s: {alive}"
