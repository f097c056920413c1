"""Kill a private Ray session once the process that started it is gone: `python -m ragkit.retrieval.ray_reaper`.

Started by `loopback.init_private_ray` with a pipe on stdin whose other end only the driver holds, so
end-of-file means the driver exited, however it died. Ray's gcs_server and raylet share the driver's
fate already; its agents (dashboard and runtime-env agents, reparented to init) wait 60 s trying to
report to the dead GCS, and this kills them at once. While the driver lives, the reaper keeps a list of
the session's processes (those the driver started, their descendants, anything naming the session
folder), each with its start time, so that a pid reused by another program is never touched.
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


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/PID/stat, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _names_session(pid: int, session: str) -> bool:
    try:
        return session.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _raylet_of(pid: int) -> int | None:
    """RAY_RAYLET_PID from a process's environment: Ray's agents carry it (their command lines are overwritten
    by their process titles, so they do not name the session folder)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    value = next((e[len(b"RAY_RAYLET_PID="):] for e in environ if e.startswith(b"RAY_RAYLET_PID=")), None)
    return int(value) if value and value.isdigit() else None


def track(session: str, known: set[Process], raylets: set[int] = frozenset()) -> set[Process]:  # type: ignore[assignment]
    """`known` plus every live process whose parent is known or whose command line names `session`, and with
    `raylets` (the final sweep) every process whose environment names one of them as its raylet: the agents
    that a raylet which already died had started, reparented to init before this process first saw them (a
    driver killed in Ray's first second left them running for 60 s)."""
    me = os.getpid()
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            stat = _stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    found = set(known)
    grew = True
    while grew:  # descendants of descendants
        pids = {pid for pid, _ in found}
        new = {(pid, start) for pid, (ppid, start) in stats.items()
               if (pid, start) not in found and (ppid in pids or _names_session(pid, session)
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
    session = argv[0]
    given = {int(p) for p in argv[1:]}  # the session's processes when the driver started this (its raylet among them)
    known = {(pid, stat[1]) for pid in given if (stat := _stat(pid)) is not None}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the driver
    started = time.monotonic()
    while True:
        known = alive(track(session, known))
        # the agents that outlive the driver are started in Ray's first seconds: watched closely then (a driver
        # killed within a 1 s poll of their start left them untracked once the raylet, their parent, was gone)
        poll = STARTUP_POLL_S if time.monotonic() - started < STARTUP_S else POLL_S
        ready, _, _ = select.select([0], [], [], poll)  # fd 0: the pipe from the driver
        if ready and not os.read(0, 65536):
            break  # end of file: the driver is gone
    reap(track(session, known, given | {pid for pid, _ in known}))


if __name__ == "__main__":
    main(sys.argv[1:])
