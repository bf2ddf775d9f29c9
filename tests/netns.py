"""Extra "machines" on one host for the multi-node tests: Linux network namespaces, each plugged by a veth pair
into a bridge in this (root) namespace that holds the head's address, like machines on one switch. Private
addresses of a subnet no real network uses here; no traffic leaves the host. Unplugging a machine removes its
veth pair (`ip link del`: the cable pulled); the head's address stays on the bridge, so the next session can
listen again and wait for the node.

Needs root and iproute2 (`why_no_netns` says why not). Used by tests/dist/test_multinode.py and the ComfyUI
cluster test. A bridged network passes node-to-node traffic through netfilter's FORWARD chain when
br_netfilter is loaded: a host whose FORWARD policy drops (Docker sets that) would cut the nodes off each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def why_no_netns() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@dataclass
class Machine:
    """Namespace `ns` with `address` on its end of a veth pair plugged into the network's bridge."""

    ns: str
    address: str
    host_if: str
    node_if: str
    bridge: str
    log_dir: Path
    join: subprocess.Popen | None = None
    join_head: str = ""
    _logs: int = 0

    def plug(self) -> None:
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if)
        ip("link", "set", self.node_if, "netns", self.ns)
        ip("link", "set", self.host_if, "master", self.bridge)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.ns, "addr", "add", f"{self.address}/24", "dev", self.node_if)
        ip("-n", self.ns, "link", "set", self.node_if, "up")

    def unplug(self) -> None:
        """Pull the cable: both ends of the veth pair go, nothing is closed or told."""
        ip("link", "del", self.host_if)

    @property
    def plugged(self) -> bool:
        return ip("link", "show", self.host_if, check=False).returncode == 0

    def pids(self) -> list[int]:
        """Live processes in the namespace (`join`, torchrun's agent, the ranks)."""
        out = ip("netns", "pids", self.ns, check=False).stdout.split()
        alive = []
        for pid in map(int, out):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive

    def ranks(self) -> list[int]:
        """The node's rank processes (not its torchrun agent, whose command line names the module too)."""
        return [p for p in self.pids() if "dist_backend.join_rank" in cmdline(p)
                and "torch.distributed.run" not in cmdline(p)]

    def only_join_left(self) -> bool:
        """Its ranks and torchrun are gone; `join` waits for the head's next session."""
        pids = self.pids()
        return bool(pids) and all("dist_backend join" in cmdline(p) for p in pids)

    def start_join(self, head: str, token: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
        """`python -m dist_backend join` in the namespace; its output goes to a log file (read it with `output`)."""
        self._logs += 1
        log = open(self.log_dir / f"join-{self.ns}-{self._logs}.log", "w+")  # noqa: SIM115 - kept by the Popen
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "dist_backend", "join", "--head", head,
             "--token-file", str(token), "--nproc-per-node", str(nproc), *extra],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), DISTDIFF_LOG_LEVEL="INFO"),
            stdout=log, stderr=subprocess.STDOUT, text=True)
        popen.log = log  # type: ignore[attr-defined]
        return popen

    def ensure_join(self, head: str, token: Path, *, nproc: int = 1) -> subprocess.Popen:
        """This machine's serving `join` (one session after another), started if it is not running."""
        if self.join is None or self.join.poll() is not None or self.join_head != head:
            self.stop_join()
            self.join, self.join_head = self.start_join(head, token, "--wait", "600", nproc=nproc), head
        return self.join

    def stop_join(self) -> None:
        if self.join is not None and self.join.poll() is None:
            self.join.send_signal(signal.SIGTERM)
            try:
                self.join.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.join.kill()
                self.join.wait(timeout=15)
        self.join = None

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def output(popen: subprocess.Popen) -> str:
    popen.log.flush()  # type: ignore[attr-defined]
    popen.log.seek(0)  # type: ignore[attr-defined]
    return popen.log.read()  # type: ignore[attr-defined]


@dataclass
class Network:
    """A bridge with the head's address and `machines` plugged into it."""

    bridge: str
    head: str
    machines: list[Machine]

    def close(self) -> None:
        for machine in self.machines:
            machine.stop_join()
            machine.kill_all()
            ip("netns", "del", machine.ns, check=False)  # removes its veth pair with it
            ip("link", "del", machine.host_if, check=False)
        ip("link", "del", self.bridge, check=False)


def make_network(*, tag: int, machines: int, log_dir: Path) -> Network:
    """Bridge `ddb<tag>` with 10.231.<tag % 250>.1 and `machines` namespaces .2, .3, … plugged into it."""
    subnet = f"10.231.{tag % 250}"
    bridge = f"ddb{tag}"
    net = Network(bridge=bridge, head=f"{subnet}.1", machines=[])
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{net.head}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i in range(1, machines + 1):
            machine = Machine(ns=f"distdiff-node-{tag}-{i}", address=f"{subnet}.{i + 1}", host_if=f"ddh{tag}n{i}",
                              node_if=f"ddn{tag}n{i}", bridge=bridge, log_dir=log_dir)
            ip("netns", "add", machine.ns)
            net.machines.append(machine)
            ip("-n", machine.ns, "link", "set", "lo", "up")  # torchrun's own rendezvous runs on the node's loopback
            machine.plug()
    except BaseException:
        net.close()
        raise
    return net


@contextmanager
def namespace_network(*, tag: int, machines: int, log_dir: Path) -> Iterator[Network]:
    """A module fixture's network: skips the tests with the reason where namespaces cannot be made here, and
    removes the bridge and the namespaces afterwards."""
    import pytest

    why = why_no_netns()
    if why:
        pytest.skip(why)
    net = make_network(tag=tag, machines=machines, log_dir=log_dir)
    try:
        yield net
    finally:
        net.close()
