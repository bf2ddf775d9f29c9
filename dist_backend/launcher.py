"""Start and stop the rank processes (host side).

Ranks start as `python -m dist_backend.worker` with the package's parent folder on PYTHONPATH: ComfyUI imports
this pack under a path-derived module name, so nothing of ours could be unpickled in a multiprocessing child.
The session secret travels in a file readable only by its owner (0600, in a 0700 folder), removed once every rank
is in; ranks get only its path, so it is on no command line and in no environment block.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import arena as arenas
from .arena import Arena
from .channel import Channel, ChannelTimeout, Listener, new_secret
from .config import SessionConfig
from .errors import RankDied, RankTimeout
from . import protocol

log = logging.getLogger(__name__)
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
LOG_DIR_PREFIX = "distdiff-ranks-"
# A failed sidecar keeps its rank logs (its error points at them) this long; the next launch removes older ones.
FAILED_LOGS_KEEP_S = 24 * 3600.0
# Allocator settings a host process may carry that its ranks should not inherit: ComfyUI (and some of its packs)
# set cudaMallocAsync for themselves, and ranks that load whole models with it have run out of memory. A rank gets
# it only when the user asks (SessionConfig.env).
_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@dataclass
class RankProcess:
    rank: int
    popen: subprocess.Popen
    log_path: Path
    channel: Channel | None = None
    arena: Arena | None = None  # shared memory the rank writes large results into (see arena.py)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Launched:
    processes: list[RankProcess]
    listener: Listener
    log_dir: Path
    started_s: float = field(default=0.0)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(config: SessionConfig) -> Launched:
    """Start every rank and wait until all are connected, authenticated and in the process group."""
    from .worker import (ENV_CONFIG, ENV_HOST_ADDR, ENV_HOST_PORT, ENV_MASTER_PORT, ENV_PARENT_PID, ENV_RANK,
                         ENV_SECRET_FILE, ENV_ARENA_FD)

    t0 = time.monotonic()
    remove_old_logs()
    secret = new_secret()
    listener = Listener(config.host, 0)
    # The host's pid in the name: a folder whose host still runs is never swept, however old.
    log_dir = Path(tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}-"))
    master_port = _free_port(config.host)
    base_env = rank_base_env(config)
    base_env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, base_env.get("PYTHONPATH", "")) if p)
    base_env.update({
        ENV_SECRET_FILE: str(_write_secret(log_dir / "secret", secret)),
        ENV_CONFIG: config.to_json(),
        ENV_HOST_ADDR: listener.address[0],
        ENV_HOST_PORT: str(listener.address[1]),
        ENV_MASTER_PORT: str(master_port),
        ENV_PARENT_PID: str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
        # One process per rank already: keep each rank's own thread pools to its share of the cores.
        "OMP_NUM_THREADS": str(config.rank_threads()),
    })
    if _is_loopback(config.host) and sys.platform.startswith("linux"):
        # gloo binds its pair sockets to the address the hostname resolves to, NCCL its bootstrap and proxy sockets
        # to the first network interface (seen on the H100 machine): keep them on loopback like everything else of
        # a single-machine sidecar, unless the user chose. NCCL moves data over P2P/NVLink/SHM on one machine.
        base_env.setdefault("GLOO_SOCKET_IFNAME" if config.device.value == "cpu" else "NCCL_SOCKET_IFNAME", "lo")
    processes: list[RankProcess] = []
    launched = Launched(processes=processes, listener=listener, log_dir=log_dir)
    try:
        for rank in range(config.world_size):
            env = dict(base_env, **{ENV_RANK: str(rank)})
            arena = Arena.create(f"distdiff-rank{rank}") if arenas.supported() else None
            if arena is not None:
                env[ENV_ARENA_FD] = str(arena.fd)
            log_path = log_dir / f"rank{rank}.log"
            with open(log_path, "wb") as log_file:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "dist_backend.worker"],
                    env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    cwd=PACKAGE_PARENT, start_new_session=True,  # our own group: we signal it, a terminal's ^C doesn't
                    pass_fds=(arena.fd,) if arena is not None else (),
                )
            processes.append(RankProcess(rank=rank, popen=popen, log_path=log_path, arena=arena))
        _handshake(launched, secret, config)
    except BaseException:
        stop(launched, grace_s=2.0)
        raise
    finally:
        # Every rank is in (or start-up failed): nobody may connect any more, so stop listening. A late connect is
        # then refused by the OS, and no byte from it is ever read; a listener kept open would queue connections in
        # its backlog (no one accepts them) or need a thread that parses hostile handshakes for the sidecar's life.
        listener.close()
        (log_dir / "secret").unlink(missing_ok=True)
    del secret
    launched.started_s = time.monotonic() - t0
    return launched


def rank_base_env(config: SessionConfig) -> dict[str, str]:
    """The host's environment, less what ranks must not inherit, plus the user's SessionConfig.env."""
    env = dict(os.environ)
    asked = dict(config.env)
    for name in _ALLOC_CONF_VARS:
        if "cudamallocasync" in env.get(name, "").lower() and name not in asked:
            log.info("ranks do not inherit %s=%s (set it in SessionConfig.env to pass it on)", name, env.pop(name))
    env.update(asked)
    return env


def remove_old_logs(*, now: float | None = None, keep_s: float = FAILED_LOGS_KEEP_S) -> list[Path]:
    """Remove the log folders of failed sidecars (clean closes remove their own) untouched for `keep_s`, unless the
    host that made them still runs. Only our user's folders in the temp dir. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{LOG_DIR_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            newest = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])
        except OSError:
            continue
        if now - newest < keep_s or _host_runs(folder.name[len(LOG_DIR_PREFIX):].split("-", 1)[0]):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _host_runs(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False  # a folder from before the pid was in the name
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _handshake(launched: Launched, secret: bytes, config: SessionConfig) -> None:
    deadline = time.monotonic() + config.start_timeout_s
    by_rank = {p.rank: p for p in launched.processes}
    pending = set(by_rank)
    while pending:
        _check_alive(launched.processes, phase="start")
        try:
            channel = launched.listener.accept(secret, timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except ChannelTimeout:
            if time.monotonic() > deadline:
                raise RankTimeout(rank=min(pending), phase="start (connect)", seconds=config.start_timeout_s,
                                  setting="start_timeout_s") from None
            continue
        hello = protocol.decode(channel.recv(timeout=5.0))
        rank = hello.get("rank") if isinstance(hello, dict) else None
        if hello.get("event") != protocol.Event.HELLO or rank not in pending:
            channel.close()
            continue
        by_rank[rank].channel = channel
        pending.discard(rank)
    # Every rank now joins the process group and reports ready.
    for proc in launched.processes:
        while True:
            _check_alive(launched.processes, phase="start (process group)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankTimeout(rank=proc.rank, phase="start (process group)", seconds=config.start_timeout_s,
                                  setting="start_timeout_s")
            if proc.channel.poll(min(0.2, remaining)):
                message = protocol.decode(proc.channel.recv(timeout=remaining))
                if message.get("event") == protocol.Event.READY:
                    break


def _write_secret(path: Path, secret: bytes) -> Path:
    """Create `path` with mode 0600 from the start (no window with wider rights) and write the secret in hex."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret.hex())
    return path


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_alive(processes: list[RankProcess], *, phase: str) -> None:
    for proc in processes:
        code = proc.popen.poll()
        if code is not None:
            raise RankDied(rank=proc.rank, phase=phase, returncode=code,
                           detail=f"its log ({proc.log_path}) ends with:\n{proc.log_tail()}")


def stop(launched: Launched, *, grace_s: float = 5.0, remove_logs: bool = False) -> None:
    """Stop every rank: close channels (ranks exit on EOF), then SIGTERM, then SIGKILL; reap all."""
    for proc in launched.processes:
        if proc.channel is not None:
            proc.channel.close()
            proc.channel = None
    _wait_all(launched.processes, grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in launched.processes if p.popen.poll() is None]
        if not alive:
            break
        for proc in alive:
            try:
                os.killpg(proc.popen.pid, sig)
                if sig == signal.SIGTERM:  # a stopped (SIGSTOP) rank acts on SIGTERM only once resumed
                    os.killpg(proc.popen.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        _wait_all(alive, grace_s if sig == signal.SIGTERM else 10.0)
    launched.listener.close()
    for proc in launched.processes:
        if proc.arena is not None:
            proc.arena.close()  # the kernel frees the memory once the rank's end is closed too
            proc.arena = None
    if remove_logs:
        shutil.rmtree(launched.log_dir, ignore_errors=True)


def _wait_all(processes: list[RankProcess], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
