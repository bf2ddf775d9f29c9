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
from .channel import Channel, ChannelClosed, ChannelTimeout, Listener, new_secret
from .cluster import ClusterConfig, NodeLost, NodeTimeout, RemoteProcess, interface_of, is_local, read_token
from .config import SessionConfig
from .errors import ConfigError, ProtocolError, RankDied, RankTimeout, SidecarError
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
    ready: dict = field(default_factory=dict)
    """The rank's READY message: its hostname, device and memory as it reported them (the status panel's row)."""

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def died(self, *, phase: str, returncode: int | None) -> RankDied:
        """The error for this rank having gone away (its exit seen, or its channel closed)."""
        return RankDied(rank=self.rank, phase=phase, returncode=returncode,
                        detail=f"its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def unanswered(self, *, phase: str, seconds: float, setting: str, silent_s: float | None = None) -> SidecarError:
        """The error for this rank missing a deadline. `silent_s`: how long nothing at all came from it, when it
        also stopped beating (not only stepping)."""
        return RankTimeout(rank=self.rank, phase=phase, seconds=seconds, setting=setting)


@dataclass
class RemoteRank(RankProcess):
    """A rank on another machine, started by that node's torchrun agent (see cluster.py and join.py)."""

    node: str = ""
    node_ranks: tuple[int, ...] = ()
    """Every rank of its node: they stop together (one agent, one link), so errors name them all."""

    def log_tail(self, lines: int = 15) -> str:
        return f"(its log is on node {self.node}, in the output of `python -m dist_backend join`)"

    def died(self, *, phase: str, returncode: int | None) -> RankDied:
        return NodeLost(node=self.node, ranks=self.node_ranks, rank=self.rank, phase=phase)

    def unanswered(self, *, phase: str, seconds: float, setting: str, silent_s: float | None = None) -> SidecarError:
        if silent_s is not None:  # not even beats: the node's link or the machine, not a slow step
            return NodeLost(node=self.node, ranks=self.node_ranks, rank=self.rank, phase=phase, silent_s=silent_s)
        return RankTimeout(rank=self.rank, phase=f"{phase} on node {self.node}", seconds=seconds, setting=setting)


@dataclass
class Launched:
    processes: list[RankProcess]
    listener: Listener
    log_dir: Path
    started_s: float = field(default=0.0)
    nodes: dict[str, Channel] = field(default_factory=dict)
    """Control channel of each joined node's `join` process, by node address: closing it stops that node's agent."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(config: SessionConfig, *, cluster: ClusterConfig | None = None) -> Launched:
    """Start every local rank, wait until all ranks (the nodes' too, with a cluster) are connected, authenticated
    and in the process group."""
    from .worker import (ENV_CONFIG, ENV_HOST_ADDR, ENV_HOST_PORT, ENV_MASTER_PORT, ENV_PARENT_PID, ENV_RANK,
                         ENV_SECRET_FILE, ENV_ARENA_FD)

    t0 = time.monotonic()
    remove_old_logs()
    if cluster is None:
        secret, local_ranks = new_secret(), config.world_size
        listener = Listener(config.host, 0)
    else:
        # The cluster's token replaces the per-session secret: the nodes' ranks must prove it too.
        cluster.check(world_size=config.world_size, host=config.host)
        secret, local_ranks = read_token(cluster.token_file), cluster.spec.local_ranks
        try:
            listener = Listener(cluster.listen_host, cluster.listen_port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {cluster.listen_host}:{cluster.listen_port}: {exc.strerror}; name an "
                              "address of this machine and a free port (--listen)") from None
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
    elif cluster is not None:
        # Across machines the data plane must still stay on the named network: bind it to the listen address's
        # interface (gloo would pick the hostname's address, NCCL the first interface).
        base_env.setdefault("GLOO_SOCKET_IFNAME" if config.device.value == "cpu" else "NCCL_SOCKET_IFNAME",
                            interface_of(cluster.listen_host))
    processes: list[RankProcess] = []
    launched = Launched(processes=processes, listener=listener, log_dir=log_dir)
    try:
        for rank in range(local_ranks):
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
        _handshake(launched, secret, config, cluster=cluster, master_port=master_port)
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


def _handshake(launched: Launched, secret: bytes, config: SessionConfig, *, cluster: ClusterConfig | None = None,
               master_port: int = 0) -> None:
    # Local ranks get start_timeout_s to connect, the nodes' ranks join_timeout_s; the process group waits for both.
    t0 = time.monotonic()
    local_deadline = t0 + config.start_timeout_s
    join_deadline = t0 + (cluster.join_timeout_s if cluster is not None else config.start_timeout_s)
    deadline = max(local_deadline, join_deadline)
    by_rank = {p.rank: p for p in launched.processes}
    pending = set(range(config.world_size))
    while pending:
        _check_alive(launched.processes, phase="start")
        _check_nodes(launched, cluster, pending)
        try:
            channel = launched.listener.accept(secret, timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except ChannelTimeout:
            now = time.monotonic()
            if cluster is not None and now > join_deadline:
                for node in cluster.spec.remote:
                    if pending & set(node.ranks):
                        raise NodeTimeout(node=node, missing=sorted(pending & set(node.ranks)),
                                          seconds=cluster.join_timeout_s,
                                          listen=f"{cluster.listen_host}:{cluster.listen_port}") from None
            local_pending = sorted(r for r in pending if r in by_rank and by_rank[r].channel is None)
            if now > local_deadline and local_pending:
                raise RankTimeout(rank=local_pending[0], phase="start (connect)",
                                  seconds=config.start_timeout_s, setting="start_timeout_s") from None
            continue
        try:
            hello = protocol.decode(channel.recv(timeout=5.0))
        except ProtocolError:
            channel.close()
            continue
        if not isinstance(hello, dict):
            channel.close()
            continue
        peer = channel.sock.getpeername()[0]
        if cluster is not None and hello.get("event") == protocol.Event.JOIN:
            _admit_node(launched, channel, hello, peer=peer, config=config, cluster=cluster, master_port=master_port)
            continue
        rank = hello.get("rank")
        if hello.get("event") != protocol.Event.HELLO or rank not in pending:
            channel.close()
            continue
        if rank in by_rank:
            by_rank[rank].channel = channel
        else:
            node = cluster.spec.node_of(rank) if cluster is not None else None
            if node is None or node.local or node.host != peer or node.host not in launched.nodes:
                log.warning("refused a hello for rank %s from %s: not a rank of a joined node there", rank, peer)
                channel.close()
                continue
            by_rank[rank] = RemoteRank(rank=rank, popen=RemoteProcess(pid=int(hello.get("pid", 0))),
                                       log_path=launched.log_dir / f"rank{rank}.log", channel=channel, node=node.host,
                                       node_ranks=tuple(node.ranks))
            launched.processes.append(by_rank[rank])
        pending.discard(rank)
    launched.processes.sort(key=lambda p: p.rank)  # callers index payloads by rank
    # Every rank now joins the process group and reports ready.
    for proc in launched.processes:
        while True:
            _check_alive(launched.processes, phase="start (process group)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankTimeout(rank=proc.rank, phase="start (process group)", seconds=config.start_timeout_s,
                                  setting="start_timeout_s")
            if proc.channel.poll(min(0.2, remaining)):
                try:
                    message = protocol.decode(proc.channel.recv(timeout=remaining))
                except ChannelClosed:  # a node's rank (whose exit we cannot see) or a local one about to be reaped
                    raise proc.died(phase="start (process group)", returncode=proc.popen.poll()) from None
                if message.get("event") == protocol.Event.READY:
                    proc.ready = message
                    break


def _admit_node(launched: Launched, channel: Channel, hello: dict, *, peer: str, config: SessionConfig,
                cluster: ClusterConfig, master_port: int) -> None:
    """A node's `join` proved the token: tell it which ranks it runs and how they meet us, or why not."""
    node = cluster.spec.node_at(peer)
    reason = None
    if node is None:
        reason = f"{peer} is not a node of this cluster ({cluster.spec.text()})"
    elif node.host in launched.nodes:
        reason = f"node {peer} has already joined this session"
    elif hello.get("nproc") != node.nproc:
        reason = f"the cluster expects {node.nproc} ranks from {peer}, but its join offers {hello.get('nproc')!r}"
    if reason is not None:
        log.warning("refused a join: %s", reason)
        try:
            channel.send(protocol.encode({"event": protocol.Event.REFUSED, "reason": reason}))
        finally:
            channel.close()
        return
    channel.send(protocol.encode({
        "event": protocol.Event.ASSIGN, "first_rank": node.first_rank, "nproc": node.nproc, "world_size": config.world_size,
        "config": config.to_json(), "host": cluster.listen_host, "port": cluster.listen_port,
        "master_port": master_port, "env": [list(kv) for kv in config.env],
    }))
    launched.nodes[node.host] = channel
    log.info("%s joined", node.describe())


def _check_nodes(launched: Launched, cluster: ClusterConfig | None, pending: set[int]) -> None:
    """A joined node whose agent went away before all its ranks connected (torchrun failed to start them)."""
    if cluster is None:
        return
    for host, channel in list(launched.nodes.items()):
        if channel.poll(0.0):
            node = cluster.spec.node_at(host)
            missing = sorted(pending & set(node.ranks))
            if missing:
                raise NodeLost(node=host, ranks=tuple(node.ranks), rank=missing[0], phase="start")


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
    for channel in launched.nodes.values():
        channel.close()  # the node's `join` stops its agent if its ranks have not left by themselves
    launched.nodes.clear()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Only our own children are signalled: a remote rank's pid is another machine's.
        alive = [p for p in launched.processes if is_local(p.popen) and p.popen.poll() is None]
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
