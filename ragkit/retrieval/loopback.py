"""Keep a private local Ray on 127.0.0.1: every listener bound to loopback, nothing left after the driver.

Ray 2.60 gives no bind setting for its gRPC servers: gcs_server, the raylet, every worker and the driver
listen on the wildcard address ('::', i.e. every interface), and `ray.init(_node_ip_address="127.0.0.1")`
is rewritten to the machine's routable IP (`services.resolve_ip_for_localhost`). Ray's token
authentication is on by default, but an index server reachable from the network should not depend on
one token. So for the private cluster ragkit:

- makes Ray advertise 127.0.0.1 (Ray's own switch for laptops, `ENABLE_RAY_CLUSTER=False`), so that
  every address Ray hands out, and the runtime-env agent's socket, are loopback;
- preloads a ten-line `bind()` wrapper (`LD_PRELOAD`) into Ray's processes that turns a wildcard bind
  into a loopback bind (0.0.0.0 -> 127.0.0.1, :: -> ::ffff:127.0.0.1, which still accepts the IPv4
  connections Ray makes). Written by hand because neither Ray nor gRPC has the option; compiled once
  with the system C compiler into ragkit's cache. The driver is an already-running process, so the
  commands that start a private Ray re-execute themselves with the wrapper (`reexec_with_loopback`)
  before they load anything;
- starts a reaper that outlives the driver: when the driver dies (even by SIGKILL), it kills the
  Ray processes of that session. Ray's own agents wait 60 s trying to report to the dead GCS.

Without a C compiler the wrapper cannot be built: ragkit says so once and runs on Ray's token
authentication alone. Connecting to an existing cluster (`--ray-address`, $RAY_ADDRESS) changes nothing
there: securing that cluster is its operator's job (docs/security.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ragkit.console import info
from ragkit.retrieval.ray_reaper import DRIVER_VARIABLE

_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* ragkit: bind wildcard listeners of a private Ray to loopback (see ragkit/retrieval/loopback.py). */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&v4, sizeof v4);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        memcpy(&v6, addr, sizeof v6);
        if (!memcmp(&v6.sin6_addr, &in6addr_any, sizeof in6addr_any)) {
            static const unsigned char mapped_loopback[16] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff,127,0,0,1};
            memcpy(&v6.sin6_addr, mapped_loopback, sizeof mapped_loopback);
            return real_bind(fd, (const struct sockaddr *)&v6, sizeof v6);
        }
    }
    return real_bind(fd, addr, len);
}
"""

_MARKER = "RAGKIT_LOOPBACK_REEXEC"
_warned = False
_may_reexec = False  # only the `ragkit` program restarts itself, never a process that runs `app` in-process


def allow_reexec() -> None:
    global _may_reexec
    _may_reexec = True


def shim_path() -> Path | None:
    """The compiled wrapper (built on first use), or None where it cannot be built (not Linux, no compiler)."""
    if not sys.platform.startswith("linux"):
        return None
    from ragkit.models.registry import cache_root

    key = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:12]
    target = cache_root() / "lib" / f"ragkit-loopback-{key}.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "loopback.c", Path(tmp) / "loopback.so"
        source.write_text(_SHIM_SOURCE)
        done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source), "-ldl"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or not built.is_file():
            return None
        os.replace(built, target)  # atomic: a concurrent build only ever sees a whole file
    return target


def _with_preload(env: dict[str, str], shim: Path) -> dict[str, str]:
    env = dict(env)
    env["LD_PRELOAD"] = ":".join([str(shim), *[p for p in env.get("LD_PRELOAD", "").split(":") if p]])
    return env


def _warn_unbound(reason: str) -> None:
    global _warned
    if not _warned:
        info(f"warning: the private Ray's listeners stay on every interface ({reason}); Ray's token authentication "
             "still applies. See docs/security.md.")
        _warned = True


def reexec_with_loopback() -> None:
    """Restart this command with the wrapper preloaded, so the driver's own Ray listener is loopback too.

    Called by commands that will start a private Ray, before they read input or load a model; returns
    at once when already preloaded, when the command runs inside another program (tests, notebooks:
    `init_private_ray` then warns about the driver's listener), or when the wrapper cannot be built."""
    if not _may_reexec:
        return
    shim = shim_path()
    if shim is None:
        _warn_unbound("no C compiler to build the bind wrapper")
        return
    if _preloaded_in_this_process(shim) or os.environ.get(_MARKER) == "1":  # the marker: never loop
        return
    env = _with_preload(os.environ, shim)  # type: ignore[arg-type]
    env[_MARKER] = "1"
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def _advertise_loopback() -> None:
    from ray._private import ray_constants  # Ray's own localhost switch

    ray_constants.ENABLE_RAY_CLUSTER = False  # node IP = 127.0.0.1, as on a laptop


def split_address(address: str) -> tuple[str, str]:
    """(host, port text) of a Ray address `HOST:PORT`, `ray://HOST:PORT` or `[IPv6]:PORT` (port "" without one)."""
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    return (host.strip("[]"), port) if colon else (target.strip("[]"), "")


def prepare_connect(address: str) -> None:
    """Before `ray.init(address=...)`: a driver joining a loopback cluster (a ragkit private Ray, e.g. from
    another rank of the same job) must call itself 127.0.0.1 too, or Ray finds no raylet of its node."""
    host, _ = split_address(address)
    if host in ("127.0.0.1", "localhost", "::1"):
        _advertise_loopback()


def init_private_ray(ray: object, num_cpus: int | None) -> None:
    """`ray.init` of a local cluster advertising and listening on 127.0.0.1 only, reaped with the driver."""
    _advertise_loopback()
    shim = shim_path()
    changed = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the localhost switch again, in Ray's children
               DRIVER_VARIABLE: str(os.getpid())}  # how the reaper knows this driver's Ray processes
    if shim is not None:
        changed["LD_PRELOAD"] = _with_preload(os.environ, shim)["LD_PRELOAD"]  # type: ignore[arg-type]
        if not _preloaded_in_this_process(shim):
            _warn_unbound("this Python process was not started with the bind wrapper; "
                          "only the driver's listener is affected")
    else:
        _warn_unbound("no C compiler to build the bind wrapper")
    saved = {key: os.environ.get(key) for key in changed}
    reaper = _reaper()  # before ray.init: a driver killed inside it must not leave Ray's agents behind
    os.environ.update(changed)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="ragkit",  # type: ignore[attr-defined]
                 ignore_reinit_error=True, log_to_driver=False)
    finally:  # only what was set here: Ray itself exports RAY_AUTH_MODE for the driver's children
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _private_token()
    _announce_session(reaper)


def _private_token() -> None:
    """Ray writes its cluster token (~/.ray/auth_token) with the umask (often 0644): keep it to this user."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):
        if token.is_file() and not token.is_symlink() and token.stat().st_mode & 0o077:
            token.chmod(0o600)


def _preloaded_in_this_process(shim: Path) -> bool:
    """Whether the wrapper is mapped into this process (LD_PRELOAD at exec time, not just in os.environ)."""
    try:
        return str(shim) in Path("/proc/self/maps").read_text()
    except OSError:
        return False


_reaper_process: subprocess.Popen[bytes] | None = None  # kept: it holds the pipe's write end


def _reaper() -> subprocess.Popen[bytes]:
    """This process's `ragkit.retrieval.ray_reaper` (spawned once): it waits for this process to end and then
    kills the Ray processes this process started."""
    global _reaper_process
    if _reaper_process is None or _reaper_process.poll() is not None:
        _reaper_process = subprocess.Popen(
            # run as a file, not `-m ragkit.retrieval.ray_reaper`: it needs only the standard library, and the
            # package's imports (Faiss, NumPy: ~1 s, ~100 MB) would stay resident as long as the driver lives
            [sys.executable, "-I", str(Path(__file__).with_name("ray_reaper.py")), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return _reaper_process


def _announce_session(reaper: subprocess.Popen[bytes]) -> None:
    """Tell the reaper the session folder, which Ray's later processes name on their command lines."""
    import ray

    node = ray._private.worker._global_node  # Ray exposes no public handle on the local node
    if node is None or reaper.stdin is None:
        return
    with contextlib.suppress(OSError):
        reaper.stdin.write(f"session {node.get_session_dir_path()}\n".encode("utf-8", "surrogateescape"))
        reaper.stdin.flush()
