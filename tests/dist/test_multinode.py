"""Ranks on another "machine": a Linux network namespace joined to this one by a veth pair (private addresses, no
traffic leaves the host). The head (a Session in this test process, root namespace) listens on its veth address;
`python -m dist_backend join` runs inside the namespace and starts the remote rank with torchrun.

Needs root and `ip` (iproute2); skipped with the reason otherwise. Marked `multinode`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_backend.cluster import ClusterConfig, NodeLost, NodeTimeout, parse_cluster, write_token
from dist_backend.config import SessionConfig
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.session import Session

from tests.dist.engine_cases import format_of

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
STEPS, GUIDANCE, SIZE = 2, 3.5, dict(height=64, width=64)
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
TAG = os.getpid() % 10000
NS = f"distdiff-node-{TAG}"
SUBNET = f"10.231.{TAG % 250}"
HEAD, NODE = f"{SUBNET}.1", f"{SUBNET}.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _why_no_netns() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def ns_pids() -> list[int]:
    out = _ip("netns", "pids", NS, check=False).stdout.split()
    return [int(p) for p in out if psutil.pid_exists(int(p))
            and psutil.Process(int(p)).status() != psutil.STATUS_ZOMBIE]


def remote_ranks() -> list[int]:
    """The node's rank processes (not its torchrun agent, whose command line names the module too)."""
    return [p for p in ns_pids() if "dist_backend.join_rank" in _cmdline(p) and "torch.distributed.run" not in
            _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def listening(pids: list[int], *, namespace: str | None) -> list[str]:
    """Local addresses of the TCP sockets `pids` listen on, as `ss` sees them in their network namespace."""
    command = ["ss", "-Hltnp"] if namespace is None else ["ip", "netns", "exec", namespace, "ss", "-Hltnp"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)]


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def netns():
    """One extra "machine": namespace NS with NODE on its end of a veth pair, HEAD on ours."""
    why = _why_no_netns()
    if why:
        pytest.skip(why)
    host_if, node_if = f"ddh{TAG}", f"ddn{TAG}"
    _ip("netns", "add", NS)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
        _ip("link", "set", node_if, "netns", NS)
        _ip("addr", "add", f"{HEAD}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", NS, "addr", "add", f"{NODE}/24", "dev", node_if)
        _ip("-n", NS, "link", "set", node_if, "up")
        _ip("-n", NS, "link", "set", "lo", "up")  # torchrun's own rendezvous runs on the node's loopback
        yield NS
    finally:
        for pid in ns_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "del", NS, check=False)  # removes the veth pair with it
        _ip("link", "del", host_if, check=False)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    return write_token(tmp_path_factory.mktemp("token") / "cluster.token")


@pytest.fixture(scope="module")
def cluster(netns, token_file) -> ClusterConfig:
    with socket.socket() as s:
        s.bind((HEAD, 0))
        port = s.getsockname()[1]
    return ClusterConfig(spec=parse_cluster(f"local:1, {NODE}:1"), listen_host=HEAD, listen_port=port,
                         token_file=token_file, join_timeout_s=120.0)


def start_join(cluster: ClusterConfig, token: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", NS, sys.executable, "-m", "dist_backend", "join",
         "--head", f"{HEAD}:{cluster.listen_port}", "--token-file", str(token), "--nproc-per-node", "1", *extra],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), DISTDIFF_LOG_LEVEL="INFO"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def node(cluster, token_file):
    """The node's `join`, serving one head session after another for the whole module."""
    join = start_join(cluster, token_file, "--wait", "300")
    yield join
    if join.poll() is None:
        join.send_signal(signal.SIGTERM)
        try:
            join.wait(timeout=15)
        except subprocess.TimeoutExpired:
            join.kill()


def session_for(cluster: ClusterConfig, **kwargs) -> Session:
    return Session(SessionConfig(world_size=2, threads_per_rank=1, host=cluster.listen_host, **kwargs),
                   cluster=cluster)


def reference(tiny_pipes, prompts: list[str], *, seed: int) -> torch.Tensor:
    """The one-process pipeline, image j with seed + j, as the ComfyUI LATENT the session returns."""
    adapter = adapter_for("flux")
    return format_of(tiny_pipes, "flux").process_out(torch.cat([
        adapter.reference(tiny_pipes["flux"], prompt=p, negative_prompt=None,
                          request=ImageRequest(seed=seed + j, steps=STEPS, guidance=GUIDANCE, **SIZE))
        for j, p in enumerate(prompts)]))


def generate(session: Session, model_dir, prompts, *, seed: int, steps: int = STEPS, **kwargs):
    return session.generate(model_dir=model_dir, prompts=prompts, seed=seed, steps=steps, guidance=GUIDANCE,
                            **SIZE, **kwargs)


def test_dp2_across_machines_equals_one_process_and_a_wrong_token_is_refused(cluster, node, tiny_dirs, tiny_pipes,
                                                                            tmp_path):
    wrong = write_token(tmp_path / "wrong.token")
    intruder = start_join(cluster, wrong, "--once", "--wait", "60")  # retries until the head listens, then refused
    session = session_for(cluster)
    t0 = time.monotonic()
    try:
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS, seed=5)
        seconds = time.monotonic() - t0
    finally:
        session.close()
    out, _ = intruder.communicate(timeout=60)
    assert intruder.returncode == 3, out
    assert "token" in out and wrong.read_text().strip() not in out
    diff = float((latents - reference(tiny_pipes, PROMPTS, seed=5)).abs().max())
    print(f"\n[measured] dp2 over 2 namespaces: generate incl. start {seconds:.1f} s, max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_ulysses2_a_killed_remote_rank_is_named_then_the_node_rejoins_and_equals_one_process(
        cluster, node, token_file, tiny_dirs, tiny_pipes):
    heartbeat = 10.0
    token = token_file.read_text().strip()
    session = session_for(cluster, ulysses=2, heartbeat_timeout_s=heartbeat)
    killed_at: list[float] = []

    def kill_remote_rank(done: int, total: int) -> None:
        if done >= 1 and not killed_at:
            for pid in remote_ranks():
                os.kill(pid, signal.SIGKILL)  # only the rank: its torchrun agent must notice and leave by itself
            killed_at.append(time.monotonic())

    try:
        with pytest.raises(NodeLost) as lost:
            generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=9, steps=400, on_progress=kill_remote_rank)
        detected = time.monotonic() - killed_at[0]
        assert lost.value.node == NODE and lost.value.rank == 1 and NODE in str(lost.value)
        assert detected < heartbeat
        assert not session.sidecar_pids()  # the head's own rank was stopped
        # The node's torchrun saw its rank die and exited; join waits for the head's next session.
        assert wait_until(lambda: all("dist_backend join" in _cmdline(p) for p in ns_pids()), 20), \
            [_cmdline(p) for p in ns_pids()]
        # The next call starts a fresh sidecar, the node joins it again, and the result is the one-process result.
        t0 = time.monotonic()
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=9)
        rejoin = time.monotonic() - t0
        assert session.last_cp_modes and all(session.last_cp_modes), session.last_cp_modes
        # The node's join, torchrun agent and rank are all up now: the token is on no command line or environment.
        pids = ns_pids()
        names = [_cmdline(pid) for pid in pids]
        assert remote_ranks() and any("torch.distributed.run" in n for n in names)
        for pid in pids + session.sidecar_pids() + [os.getpid()]:
            assert token not in _cmdline(pid)
            assert token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        # Every socket our ranks listen on is on the named network: the head's rank (its store, gloo) on HEAD, the
        # node's rank (gloo) on NODE. torchrun's agent listens on every interface (torch's TCPStore; documented).
        head_rank = listening(session.sidecar_pids(), namespace=None)
        node_rank = listening(remote_ranks(), namespace=NS)
        assert head_rank and all(a == HEAD for a in head_rank), head_rank
        assert node_rank and all(a == NODE for a in node_rank), node_rank
    finally:
        session.close()
    # Closing the head's channels is what releases the remote rank too: the node is back to waiting, alone.
    assert wait_until(lambda: all("dist_backend join" in _cmdline(p) for p in ns_pids()), 20), \
        [_cmdline(p) for p in ns_pids()]
    diff = float((latents - reference(tiny_pipes, PROMPTS[:1], seed=9)).abs().max())
    print(f"\n[measured] ulysses2, remote rank SIGKILLed mid-denoise: NodeLost after {detected:.2f} s; "
          f"rejoin + generate {rejoin:.1f} s, max abs diff vs one process {diff:.2e}")
    assert diff <= 1e-4
    # Stopping join stops everything it started: nothing is left in the namespace.
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=15)
    assert wait_until(lambda: not ns_pids(), 15), [_cmdline(p) for p in ns_pids()]


def test_a_node_that_never_joins_is_named_and_a_join_from_elsewhere_is_refused(tmp_path, tiny_dirs):
    """Needs no namespace: the head listens on loopback for node 127.0.0.2, which never comes; a join with the right
    token from 127.0.0.1 (not a node of the cluster) is told why and exits 3."""
    token = write_token(tmp_path / "t.token")
    cluster = ClusterConfig(spec=parse_cluster("local:1, 127.0.0.2:1"), listen_host="127.0.0.1", listen_port=_port(),
                            token_file=token, join_timeout_s=12.0)
    stranger = subprocess.Popen(
        [sys.executable, "-m", "dist_backend", "join", "--head", f"127.0.0.1:{cluster.listen_port}", "--token-file",
         str(token), "--nproc-per-node", "1", "--once", "--wait", "60"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    session = Session(SessionConfig(world_size=2, threads_per_rank=1), cluster=cluster)
    t0 = time.monotonic()
    try:
        with pytest.raises(NodeTimeout) as err:
            session.load(tiny_dirs["flux"])
    finally:
        session.close()
        out, _ = stranger.communicate(timeout=60)
    assert err.value.node == "127.0.0.2" and err.value.ranks == [1]
    assert "dist_backend join --head 127.0.0.1:" in str(err.value) and time.monotonic() - t0 < 30
    assert not session.sidecar_pids()
    assert stranger.returncode == 3 and "127.0.0.1 is not a node of this cluster" in out, out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
