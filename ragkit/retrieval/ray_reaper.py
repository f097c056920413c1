"""Kill a private Ray session once the process that started it is gone: `python -I ray_reaper.py PID` (this file;
standard library only).

Started by `loopback.init_private_ray` *before* `ray.init`, with a pipe on stdin whose other end only the
driver (PID) holds, so end-of-file means the driver exited, however it died, even inside `ray.init`
(a driver killed there left Ray's agents running when the reaper only started after it). Ray's
gcs_server and raylet share the driver's fate already; its agents (dashboard and runtime-env agents,
reparented to init) wait 60 s trying to report to the dead GCS, and this kills them at once.

While the driver lives, the reaper keeps a list of the session's processes, each with its start time, so
that a pid reused by another program is never touched: every process whose environment carries
`RAGKIT_RAY_DRIVER=PID` (set by the driver around `ray.init`, so Ray's processes and the workers and
agents they start inherit it), their descendants, and, once the driver writes `session FOLDER` lines on
the pipe after `ray.init`, anything naming that folder. The driver's other children are left alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

Process = tuple[int, int]  # pid, start time in clock ticks since boot
STARTUP_S, STARTUP_POLL_S, POLL_S = 30.0, 0.1, 1.0
DRIVER_VARIABLE = "RAGKIT_RAY_DRIVER"  # in the environment of every Ray process a ragkit driver started


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _variable(pid: int, name: bytes) -> bytes | None:
    """One variable of a process's environment as it was started (Ray's agents overwrite their command lines
    with process titles, so they name no session folder; their environment still says whose they are)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = name + b"="
    return next((e[len(prefix):] for e in environ if e.startswith(prefix)), None)


def _raylet_of(pid: int) -> int | None:
    value = _variable(pid, b"RAY_RAYLET_PID")
    return int(value) if value and value.isdigit() else None


def track(driver: int, since: int, sessions: set[str], known: set[Process],
          raylets: set[int] = frozenset()) -> set[Process]:  # type: ignore[assignment]
    """`known` plus every live process started at or after `since` whose environment names `driver` as its
    DRIVER_VARIABLE, a child of a known process, or one naming one of `sessions` on its command line; with
    `raylets` (the final sweep) also every process whose environment names one of them as its raylet."""
    me = os.getpid()
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            stat = _stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    names = [s.encode() for s in sessions]
    mark = str(driver).encode()
    found = set(known)
    grew = True
    while grew:  # descendants of descendants
        pids = {pid for pid, _ in found}
        new = {(pid, start) for pid, (ppid, start) in stats.items()
               if (pid, start) not in found and (
                   ppid in pids
                   or (start >= since and _variable(pid, DRIVER_VARIABLE.encode()) == mark)
                   or (names and any(name in _cmdline(pid) for name in names))
                   or (raylets and _raylet_of(pid) in raylets))}
        found |= new
        grew = bool(new)
    return found


def alive(processes: set[Process]) -> set[Process]:
    return {(pid, start) for pid, start in processes if (_stat(pid) or (0, -1))[1] == start}


def reap(processes: set[Process], grace_s: float = 2.0) -> None:
    """SIGTERM the processes still alive (same pid and start time), SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in alive(processes):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and alive(processes) and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    driver = int(argv[0])
    since = (_stat(os.getpid()) or (0, 0))[1]  # Ray's processes start after this one: an older pid was reused
    sessions: set[str] = set()
    known: set[Process] = set()
    pending = b""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the driver
    started = time.monotonic()
    while True:
        known = alive(track(driver, since, sessions, known))
        # the agents that outlive the driver are started in Ray's first seconds: watched closely then (a driver
        # killed within a 1 s poll of their start left them untracked once the raylet, their parent, was gone)
        poll = STARTUP_POLL_S if time.monotonic() - started < STARTUP_S or not sessions else POLL_S
        ready, _, _ = select.select([0], [], [], poll)  # fd 0: the pipe from the driver
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            break  # end of file: the driver is gone
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.startswith(b"session "):
                sessions.add(line[len(b"session "):].decode("utf-8", "surrogateescape"))
                started = time.monotonic()  # this session's agents start now
    known = track(driver, since, sessions, known)
    reap(track(driver, since, sessions, known, {pid for pid, _ in known}))


if __name__ == "__main__":
    main(sys.argv[1:])
