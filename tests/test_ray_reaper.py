"""The reaper that a private Ray's driver starts before `ray.init` kills that driver's Ray processes when the
driver dies, however early, and nothing else (issue 17.1; CI stop 35: a driver killed inside `ray.init`
left Ray's DashboardAgent running, because the reaper only started after `ray.init` returned)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragkit.retrieval.ray_reaper import DRIVER_VARIABLE

DRIVER = """
import json, os, subprocess, sys, time
from ragkit.retrieval import loopback
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
older = subprocess.Popen(sleeper, env={**os.environ, "%(var)s": str(os.getpid())})  # before the reaper: not its
time.sleep(0.05)
loopback._reaper()
rays = subprocess.Popen([sys.executable, "-c",  # a Ray process that starts an agent which leaves for init
    "import os, subprocess, sys, time; subprocess.Popen(sys.argv[1:], start_new_session=True); time.sleep(120)",
    *sleeper], env={**os.environ, "%(var)s": str(os.getpid())})
other = subprocess.Popen(sleeper)  # the driver's own child, not Ray's
time.sleep(0.5)
print(json.dumps({"older": older.pid, "ray": rays.pid, "other": other.pid}), flush=True)
time.sleep(120)
""" % {"var": DRIVER_VARIABLE}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _agent_of(rays: int) -> int:
    """The 'agent' the fake Ray process started: a sleeper whose environment carries the driver's mark."""
    deadline = time.time() + 10
    while time.time() < deadline:
        kids = _children(rays)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("the fake Ray process started no agent")


def test_a_killed_driver_takes_its_ray_processes_and_only_those(tmp_path: Path) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    pids = json.loads(driver.stdout.readline())
    agent = _agent_of(pids["ray"])
    time.sleep(0.5)  # the reaper's startup poll is 0.1 s
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and (_alive(pids["ray"]) or _alive(agent)):
            time.sleep(0.1)
        assert not _alive(pids["ray"]) and not _alive(agent), "the driver's Ray processes outlived it"
        assert _alive(pids["other"]), "a child of the driver that is not Ray's was killed"
        assert _alive(pids["older"]), "a process started before the reaper was killed"
    finally:
        for pid in (pids["other"], pids["older"], pids["ray"], agent):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_the_reaper_stays_while_the_driver_lives() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(driver.stdout.readline())
        time.sleep(1.0)
        assert _alive(pids["ray"])
    finally:
        driver.kill()
        driver.wait()
        time.sleep(3)
        for pid in (pids["other"], pids["older"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if not Path("/proc/self/stat").exists():  # the reaper reads /proc
    pytestmark = pytest.mark.skip(reason="no /proc on this system")
