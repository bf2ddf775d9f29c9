"""Ranks on other "machines": Linux network namespaces plugged into a bridge that holds the head's address (see
tests/netns.py; private addresses, no traffic leaves the host). The head (a Session in this test process, root
namespace) listens on the bridge; `python -m dist_backend join` runs inside each namespace and starts its ranks
with torchrun.

Needs root and `ip` (iproute2); skipped with the reason otherwise. Marked `multinode`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dist_backend.cluster import ClusterConfig, NodeLost, NodeTimeout, parse_cluster, write_token
from dist_backend.config import SessionConfig
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.session import Session

from tests.dist.engine_cases import format_of
from tests.netns import Machine, cmdline, namespace_network, output, wait_until

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
STEPS, GUIDANCE, SIZE = 2, 3.5, dict(height=64, width=64)
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
TAG = os.getpid() % 10000


def listening(pids: list[int], *, namespace: str | None) -> list[str]:
    """Local addresses of the TCP sockets `pids` listen on, as `ss` sees them in their network namespace."""
    command = ["ss", "-Hltnp"] if namespace is None else ["ip", "netns", "exec", namespace, "ss", "-Hltnp"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """Two extra "machines" on the head's bridge, for the whole module (each test starts the joins it needs)."""
    with namespace_network(tag=TAG, machines=2, log_dir=tmp_path_factory.mktemp("joins")) as net:
        yield net


@pytest.fixture(scope="module")
def m1(network) -> Machine:
    return network.machines[0]


@pytest.fixture(scope="module")
def m2(network) -> Machine:
    return network.machines[1]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    return write_token(tmp_path_factory.mktemp("token") / "cluster.token")


@pytest.fixture(scope="module")
def port(network) -> int:
    """The head's listen port for every cluster of the module: one serving `join` per machine serves them all."""
    with socket.socket() as s:
        s.bind((network.head, 0))
        return s.getsockname()[1]


def cluster_of(network, port: int, token_file: Path, spec: str, **kwargs) -> ClusterConfig:
    return ClusterConfig(spec=parse_cluster(spec), listen_host=network.head, listen_port=port, token_file=token_file,
                         **{"join_timeout_s": 120.0, **kwargs})


@pytest.fixture(scope="module")
def cluster(network, port, token_file, m1) -> ClusterConfig:
    return cluster_of(network, port, token_file, f"local:1, {m1.address}:1")


@pytest.fixture
def node(network, port, token_file, m1):
    """Machine 1's `join`, serving one head session after another (kept across tests while it runs)."""
    return m1.ensure_join(f"{network.head}:{port}", token_file)


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


def test_dp2_across_machines_equals_one_process_and_a_wrong_token_is_refused(cluster, node, m1, tiny_dirs,
                                                                            tiny_pipes, tmp_path):
    wrong = write_token(tmp_path / "wrong.token")
    # Retries until the head listens, then is refused.
    intruder = m1.start_join(f"{cluster.listen_host}:{cluster.listen_port}", wrong, "--once", "--wait", "60")
    session = session_for(cluster)
    seen: list[tuple[list, list[int], list[int]]] = []  # the panel's rows at each step, the node's and head's pids

    def panel_rows(done: int, total: int) -> None:
        seen.append((session.rank_statuses(), m1.ranks(), session.sidecar_pids()))

    t0 = time.monotonic()
    try:
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS, seed=5, on_progress=panel_rows)
        seconds = time.monotonic() - t0
        idle = session.rank_statuses()
    finally:
        session.close()
    intruder.wait(timeout=60)
    # The status panel has a row for the node's rank as for the head's: the node's address from the SPEC, the
    # pid of the rank process on that machine (namespaces share the pid and UTS namespaces: we can check it),
    # the memory the rank reported itself, and its own step.
    rows, node_pids, head_pids = seen[-1]
    head, remote = rows
    assert (head.node, head.remote, remote.node, remote.remote) == ("local", False, m1.address, True), rows
    assert remote.pid in node_pids and head_pids == [head.pid], (rows, node_pids, head_pids)
    assert remote.hostname == socket.gethostname() and remote.device == "cpu"
    assert remote.rss_bytes > 50 << 20 and head.rss_bytes > 50 << 20, rows
    assert remote.stage == "denoise" and remote.step is not None and remote.step[1] == STEPS, rows
    assert remote.to_json()["node"] == m1.address and remote.to_json()["remote"] is True
    assert [(r.node, r.pid, r.stage) for r in idle] == [("local", head.pid, None), (m1.address, remote.pid, None)]
    assert all(r.rss_bytes > 50 << 20 for r in idle), idle
    out = output(intruder)
    assert intruder.returncode == 3, out
    assert "token" in out and wrong.read_text().strip() not in out
    diff = float((latents - reference(tiny_pipes, PROMPTS, seed=5)).abs().max())
    print(f"\n[measured] dp2 over 2 namespaces: generate incl. start {seconds:.1f} s, max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_ulysses2_a_killed_remote_rank_is_named_then_the_node_rejoins_and_equals_one_process(
        cluster, node, m1, token_file, tiny_dirs, tiny_pipes):
    heartbeat = 10.0
    token = token_file.read_text().strip()
    session = session_for(cluster, ulysses=2, heartbeat_timeout_s=heartbeat)
    killed_at: list[float] = []

    def kill_remote_rank(done: int, total: int) -> None:
        if done >= 1 and not killed_at:
            for pid in m1.ranks():
                os.kill(pid, signal.SIGKILL)  # only the rank: its torchrun agent must notice and leave by itself
            killed_at.append(time.monotonic())

    try:
        with pytest.raises(NodeLost) as lost:
            generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=9, steps=400, on_progress=kill_remote_rank)
        detected = time.monotonic() - killed_at[0]
        assert lost.value.node == m1.address and lost.value.rank == 1 and lost.value.ranks == [1]
        assert m1.address in str(lost.value) and lost.value.silent_s is None
        assert detected < heartbeat
        assert not session.sidecar_pids()  # the head's own rank was stopped
        # The panel keeps the failed sidecar's rows: the node's rank carries the NodeLost naming the node.
        rows = session.rank_statuses()
        assert [(r.rank, r.node) for r in rows] == [(0, "local"), (1, m1.address)] and rows[0].error is None
        assert rows[1].error.startswith(f"NodeLost: node {m1.address} (rank 1) was lost during denoise"), rows
        assert session.status.snapshot.failure.node == m1.address
        # The node's torchrun saw its rank die and exited; join waits for the head's next session.
        assert wait_until(m1.only_join_left, 20), [cmdline(p) for p in m1.pids()]
        # The next call starts a fresh sidecar, the node joins it again, and the result is the one-process result.
        t0 = time.monotonic()
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=9)
        rejoin = time.monotonic() - t0
        assert session.last_cp_modes and all(session.last_cp_modes), session.last_cp_modes
        # The node's join, torchrun agent and rank are all up now: the token is on no command line or environment.
        pids = m1.pids()
        names = [cmdline(pid) for pid in pids]
        assert m1.ranks() and any("torch.distributed.run" in n for n in names)
        for pid in pids + session.sidecar_pids() + [os.getpid()]:
            assert token not in cmdline(pid)
            assert token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        # Every socket our ranks listen on is on the named network: the head's rank (its store, gloo) on HEAD, the
        # node's rank (gloo) on NODE. torchrun's agent listens on every interface (torch's TCPStore; documented).
        head_rank = listening(session.sidecar_pids(), namespace=None)
        node_rank = listening(m1.ranks(), namespace=m1.ns)
        assert head_rank and all(a == cluster.listen_host for a in head_rank), head_rank
        assert node_rank and all(a == m1.address for a in node_rank), node_rank
    finally:
        session.close()
    # Closing the head's channels is what releases the remote rank too: the node is back to waiting, alone.
    assert wait_until(m1.only_join_left, 20), [cmdline(p) for p in m1.pids()]
    diff = float((latents - reference(tiny_pipes, PROMPTS[:1], seed=9)).abs().max())
    print(f"\n[measured] ulysses2, remote rank SIGKILLed mid-denoise: NodeLost after {detected:.2f} s; "
          f"rejoin + generate {rejoin:.1f} s, max abs diff vs one process {diff:.2e}")
    assert diff <= 1e-4
    # Stopping join stops everything it started: nothing is left in the namespace.
    m1.stop_join()
    assert wait_until(lambda: not m1.pids(), 15), [cmdline(p) for p in m1.pids()]


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


def test_a_cut_link_is_a_node_lost_naming_the_node_within_the_heartbeat_and_the_next_run_waits_for_the_node(
        cluster, node, m1, tiny_dirs, tiny_pipes):
    """Ulysses 2 across the machines; the node's cable is pulled (its veth pair removed) at step 1 of 400. Nothing
    closes: only the silence tells. The head must name the node, not its own rank that waits for it in a
    collective; the node's rank and torchrun must leave by themselves; the next run waits for the node."""
    heartbeat = 6.0
    session = session_for(cluster, ulysses=2, heartbeat_timeout_s=heartbeat)
    cut_at: list[float] = []

    def cut(done: int, total: int) -> None:
        if done >= 1 and not cut_at:
            m1.unplug()
            cut_at.append(time.monotonic())

    replug = threading.Timer(3.0, m1.plug)
    try:
        with pytest.raises(NodeLost) as lost:
            generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=13, steps=400, on_progress=cut)
        detected = time.monotonic() - cut_at[0]
        assert lost.value.node == m1.address and lost.value.ranks == [1], str(lost.value)
        # Named at the deadline: silent for (about) a heartbeat; the rest is stopping the head's rank (1 s grace).
        assert lost.value.silent_s > heartbeat / 2 and "link is down" in str(lost.value)
        assert detected <= heartbeat + 2.5, detected
        assert not session.sidecar_pids()  # the head's own rank was stopped
        # The node's connections to the head fail within about a heartbeat (keepalive, TCP user timeout): its rank
        # and torchrun leave, join waits for the head again.
        assert wait_until(m1.only_join_left, 3 * heartbeat), [cmdline(p) for p in m1.pids()]
        left = time.monotonic() - cut_at[0]
        # The next run waits for the node: its cable goes back in 3 s after the run started.
        t0 = time.monotonic()
        replug.start()
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS[:1], seed=13)
        waited = time.monotonic() - t0
        assert waited > 3.0 and session.last_cp_modes and all(session.last_cp_modes)
    finally:
        replug.cancel()
        if replug.ident is not None:
            replug.join()
        session.close()
        if not m1.plugged:
            m1.plug()
    diff = float((latents - reference(tiny_pipes, PROMPTS[:1], seed=13)).abs().max())
    print(f"\n[measured] ulysses2, link cut mid-denoise (heartbeat {heartbeat:g} s): NodeLost after {detected:.2f} s; "
          f"node's rank and torchrun gone after {left:.1f} s; next run incl. rejoin {waited:.1f} s, max abs diff "
          f"{diff:.2e}")
    assert diff <= 1e-4



def test_three_machines_dp_and_ulysses_equal_one_process_then_a_killed_node_is_named(
        network, port, token_file, m1, m2, tiny_dirs, tiny_pipes):
    """Head ranks 0–1, machine 1 rank 2, machine 2 rank 3: dp 2 × ulysses 2, so one Ulysses group is the head's and
    the other spans the two joined machines (their attention exchange goes node to node). Then every process of
    machine 2 (join, torchrun, rank) is SIGKILLed mid-denoise."""
    cluster3 = cluster_of(network, port, token_file, f"local:2, {m1.address}:1, {m2.address}:1")
    head = f"{network.head}:{port}"
    m1.ensure_join(head, token_file)
    m2.ensure_join(head, token_file)
    session = Session(SessionConfig(world_size=4, dp=2, ulysses=2, threads_per_rank=1, host=network.head,
                                    heartbeat_timeout_s=30.0), cluster=cluster3)
    killed_at: list[float] = []

    def kill_machine2(done: int, total: int) -> None:
        if done >= 1 and not killed_at:
            m2.kill_all()
            killed_at.append(time.monotonic())

    try:
        t0 = time.monotonic()
        latents, _ = generate(session, tiny_dirs["flux"], PROMPTS, seed=21)
        seconds = time.monotonic() - t0
        assert session.last_cp_modes and all(session.last_cp_modes), session.last_cp_modes
        with pytest.raises(NodeLost) as lost:
            generate(session, tiny_dirs["flux"], PROMPTS, seed=21, steps=400, on_progress=kill_machine2)
        detected = time.monotonic() - killed_at[0]
        assert lost.value.node == m2.address and lost.value.ranks == [3] and lost.value.silent_s is None
        assert m2.address in str(lost.value) and detected < 5.0
        assert not session.sidecar_pids()  # the head's ranks were stopped
    finally:
        session.close()
    assert not m2.pids()
    # Machine 1's rank lost its peers: it stopped, so did its torchrun; its join waits for the next session.
    assert wait_until(m1.only_join_left, 20), [cmdline(p) for p in m1.pids()]
    diff = float((latents - reference(tiny_pipes, PROMPTS, seed=21)).abs().max())
    print(f"\n[measured] dp2 × ulysses2 over 3 namespaces: generate incl. start {seconds:.1f} s, max abs diff "
          f"{diff:.2e}; machine 2 SIGKILLed: NodeLost after {detected:.2f} s")
    assert diff <= 1e-4
