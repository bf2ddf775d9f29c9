"""Ranks on other machines (head side): the cluster SPEC, the token file, and the ranks that join over the network.

A SPEC lists the machines and how many ranks each gives, in rank order: `local:2, 10.0.0.7:4` means ranks 0–1 are
started by this process (as on one machine) and ranks 2–5 by `python -m dist_backend join` on 10.0.0.7, whose
torchrun agent starts them. The head knows a node by the source address of its connection, so name each node by
the address the head sees (no NAT in between).

The token file holds the cluster's shared secret in hex. Every connection (node agent and each rank) answers the
HMAC challenge of channel.py with it before a byte it sends is decoded. Only its path travels (flags, environment);
its content is on no command line, in no log and in no status.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, RankDied, SidecarError

LOCAL = "local"
MIN_TOKEN_BYTES = 16


@dataclass(frozen=True, kw_only=True)
class ClusterNode:
    host: str
    """"local" (ranks started by the head itself) or the IP address the head sees the node's connections from."""
    nproc: int
    """Ranks this node gives."""
    first_rank: int
    """Global rank of its first process; its ranks are first_rank .. first_rank + nproc - 1."""

    @property
    def local(self) -> bool:
        return self.host == LOCAL

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.nproc)

    def describe(self) -> str:
        last = self.first_rank + self.nproc - 1
        return f"node {self.host} (rank{'s' if self.nproc > 1 else ''} {self.first_rank}" + \
            (f"–{last})" if self.nproc > 1 else ")")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    nodes: tuple[ClusterNode, ...]

    @property
    def world_size(self) -> int:
        return sum(n.nproc for n in self.nodes)

    @property
    def local_ranks(self) -> int:
        return sum(n.nproc for n in self.nodes if n.local)

    @property
    def remote(self) -> tuple[ClusterNode, ...]:
        return tuple(n for n in self.nodes if not n.local)

    def node_of(self, rank: int) -> ClusterNode:
        return next(n for n in self.nodes if rank in n.ranks)

    def node_at(self, address: str) -> ClusterNode | None:
        return next((n for n in self.remote if n.host == address), None)

    def groups_across_nodes(self, group_size: int) -> list[tuple[list[int], list[str]]]:
        """Consecutive rank groups of `group_size` (the context-parallel groups: the mesh is dp-major) that span
        more than one node, with those nodes. CP exchanges activations every step; dp only at the end."""
        out = []
        for start in range(0, self.world_size, group_size):
            ranks = list(range(start, min(start + group_size, self.world_size)))
            hosts = list(dict.fromkeys(self.node_of(r).host for r in ranks))
            if len(hosts) > 1:
                out.append((ranks, hosts))
        return out

    def text(self) -> str:
        return ", ".join(f"{n.host}:{n.nproc}" for n in self.nodes)


def parse_cluster(text: str) -> ClusterSpec:
    """`local:2, 10.0.0.7:4` -> ClusterSpec. `local` may appear once and must come first (the head's ranks are the
    first ranks: rank 0 hosts the process group's store on the head's address)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("cluster is empty; write it as `local:2, 10.0.0.7:4` (node:ranks, comma-separated)")
    nodes: list[ClusterNode] = []
    first = 0
    for index, item in enumerate(part.strip() for part in text.split(",")):
        host, sep, count = item.rpartition(":")
        host = host.strip()
        if not sep or not host:
            raise ConfigError(f"cluster entry {index + 1} {item!r} is not NODE:RANKS (e.g. `local:2` or `10.0.0.7:4`)")
        try:
            nproc = int(count)
        except ValueError:
            raise ConfigError(f"cluster entry {item!r}: ranks {count!r} is not an integer") from None
        if nproc < 1:
            raise ConfigError(f"cluster entry {item!r}: a node gives at least 1 rank, got {nproc}")
        if host == LOCAL:
            if index != 0:
                raise ConfigError(f"cluster {text!r}: `local` must be the first entry (the head's ranks are ranks 0…)")
        else:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"cluster entry {item!r}: {host!r} is neither `local` nor an IP address (the head "
                                  "knows a node by the address its connections come from)") from None
            if address.version != 4:
                raise ConfigError(f"cluster entry {item!r}: only IPv4 node addresses are supported")
            host = str(address)
        if any(n.host == host for n in nodes):
            raise ConfigError(f"cluster {text!r} names {host} twice; give each node once with its total ranks")
        nodes.append(ClusterNode(host=host, nproc=nproc, first_rank=first))
        first += nproc
    if nodes[0].local is False:
        raise ConfigError(f"cluster {text!r} has no `local` entry; the head runs rank 0 itself, start with `local:N`")
    if len(nodes) == 1:
        raise ConfigError(f"cluster {text!r} names no other machine; drop --cluster to run on this one")
    return ClusterSpec(nodes=tuple(nodes))


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How the head meets ranks on other machines."""

    spec: ClusterSpec
    listen_host: str
    """The head's address on the network the nodes share; its listener, rank 0's store and gloo bind to it only."""
    listen_port: int
    """Port of the head's listener, the one `join --head HOST:PORT` names."""
    token_file: Path
    """File (mode 0600) with the shared token in hex; every node's `join` reads its own copy."""
    join_timeout_s: float = 300.0
    """How long the head waits for every node to join (their ranks start, import torch, connect)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_file", Path(self.token_file))
        try:
            address = ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise ConfigError(f"listen address {self.listen_host!r} is not an IP address; name the head's address on "
                              "the nodes' network (e.g. 10.0.0.1:29600)") from None
        if address.is_unspecified:
            raise ConfigError(f"listen address {self.listen_host} binds every interface; name one address")
        if type(self.listen_port) is not int or not 0 < self.listen_port < 65536:
            raise ConfigError(f"listen port must be 1–65535, got {self.listen_port!r}")
        if not (isinstance(self.join_timeout_s, (int, float)) and self.join_timeout_s > 0):
            raise ConfigError(f"join_timeout_s must be a positive number of seconds, got {self.join_timeout_s!r}")

    def check(self, *, world_size: int, host: str) -> None:
        """The session's config must match the SPEC: ranks add up and the head binds the listen address."""
        if world_size != self.spec.world_size:
            terms = " + ".join(str(n.nproc) for n in self.spec.nodes)
            raise ConfigError(f"cluster {self.spec.text()!r} gives {terms} = {self.spec.world_size} ranks, but "
                              f"world_size is {world_size}; make them equal")
        if host != self.listen_host:
            raise ConfigError(f"SessionConfig.host is {host!r} but the cluster listens on {self.listen_host!r}; set "
                              "host to the listen address (rank 0's store must be reachable from the nodes)")


def parse_address(text: str, *, what: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} {text!r} is not ADDRESS:PORT (e.g. 10.0.0.1:29600)")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port!r} is not an integer") from None
    if not 0 < number < 65536:
        raise ConfigError(f"{what} {text!r}: port must be 1–65535")
    return host, number


def read_token(path: str | Path) -> bytes:
    """The token's bytes, refused unless the file is a regular file readable by its owner only (0600 or 0400)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror}; create it with `python -m dist_backend make-token "
                          f"--out {path}`") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"token file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(f"token file {path} has mode {stat.S_IMODE(info.st_mode):04o}; anyone but its owner could "
                          f"read it. Run `chmod 600 {path}`")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        token = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"token file {path} does not hold a hex token; create one with `python -m dist_backend "
                          f"make-token --out {path}`") from None  # the content itself is never shown
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"token in {path} has {len(token)} bytes, fewer than {MIN_TOKEN_BYTES}; make a new one")
    return token


def write_token(path: str | Path) -> Path:
    """A new random 32-byte token, in a file created 0600 (never wider, not even for a moment)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


def interface_of(address: str) -> str:
    """Name of the network interface that holds `address` (for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), so gloo's
    data plane binds there and nowhere else. Linux only (SIOCGIFADDR)."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    raise ConfigError(f"no network interface of this machine has the address {address}; name one of its own "
                      "addresses (see `ip -4 addr`)")


# -- ranks that live on another machine ---------------------------------------------------------------------------
class NodeLost(RankDied):
    """Ranks on another machine went away. Either a control channel closed (the node's processes died or were
    killed, or its torchrun agent stopped) or every message from the node stopped for heartbeat_timeout_s (its
    link is down, or the machine froze): its peers cannot go on. Names the node and all of its ranks: they run or
    fail together (one torchrun agent, one link)."""

    def __init__(self, *, node: str, ranks: tuple[int, ...] | list[int], rank: int, phase: str,
                 silent_s: float | None = None) -> None:
        self.node = node
        self.ranks = list(ranks)
        self.rank = rank  # the rank seen lost first (the one whose channel closed, or the longest silent)
        self.phase = phase
        self.silent_s = silent_s
        """None: a channel closed. Else how long nothing came from the node (heartbeat_timeout_s or more)."""
        self.returncode = None  # its exit code is on the node
        self.detail = f"(its log is on node {node}, in the output of `python -m dist_backend join`)"
        which = _rank_list(self.ranks)
        if silent_s is None:
            how = (f"rank {rank}'s control channel closed (the node's processes died or were killed, or its join "
                   "stopped)")
        else:
            how = (f"nothing came from {which} for {silent_s:.1f} s (heartbeat_timeout_s): its link is down or the "
                   "machine stopped")
        SidecarError.__init__(
            self,
            f"node {node} ({which}) was lost during {phase}: {how}. Every other rank was stopped; the next call "
            f"waits up to join_timeout_s for the node to join again")


def _rank_list(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}–{ranks[-1]}"
    return f"ranks {', '.join(map(str, ranks))}"


class NodeTimeout(SidecarError, TimeoutError):
    """A node named in the cluster did not join before join_timeout_s."""

    def __init__(self, *, node: ClusterNode, missing: list[int], seconds: float, listen: str) -> None:
        self.node = node.host
        self.ranks = missing
        super().__init__(
            f"{node.describe()} did not join within {seconds:g} s (join_timeout_s): ranks {missing} never connected. "
            f"On {node.host} run `python -m dist_backend join --head {listen} --token-file FILE --nproc-per-node "
            f"{node.nproc}` and check that it reaches {listen}")


class RemoteProcess:
    """Stands in for the Popen of a rank on another machine: we cannot poll or wait for it, only see its channel
    close. Never signalled (its pid is another machine's)."""

    def __init__(self, *, pid: int) -> None:
        self.pid = pid
        self.returncode = None

    def poll(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> None:  # noqa: ARG002 - nothing to wait for here
        return None


def is_local(popen) -> bool:
    return isinstance(popen, subprocess.Popen)
