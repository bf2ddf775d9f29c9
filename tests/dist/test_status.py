"""The Session's status board (what the ComfyUI panel shows) follows a real 2-rank sidecar: starting, loading,
running with the step counter moving (each rank's row its own step), ready with the stage timings, failed with the
killed rank's log tail, none after close."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from dist_backend.cluster import NodeLost
from dist_backend.errors import RankDied
from dist_backend.status import (RankPlace, RankStatus, SidecarState, StatusSnapshot, failure_from, rank_statuses,
                                 subscribe, unsubscribe)

from tests.dist.reliability_cases import LONG_STEPS, PROMPTS, SHORT, SIZE, AtStep, session


def test_status_board_follows_a_run_a_killed_rank_and_close(tiny_dirs):
    s = session()  # dp2
    seen = []
    record = lambda snap: seen.append(snap)  # noqa: E731 - a subscriber is any callable
    subscribe(record)
    try:
        assert s.status.snapshot.state is SidecarState.NONE
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS)
        rows = []  # the panel's rows at every progress event of the denoise
        s.denoise(cond, seed=3, steps=4, guidance=3.5, on_progress=lambda d, t: rows.append(s.rank_statuses()),
                  **SIZE)
        states = [snap.state for snap in seen]
        assert states[:3] == [SidecarState.STARTING, SidecarState.READY, SidecarState.LOADING]
        steps = [snap.step for snap in seen if snap.stage == "denoise" and snap.step]
        assert steps[-1] == (8, 8) and len({d for d, _ in steps}) >= 2  # two images × 4 steps, counter moved
        pids = s.sidecar_pids()
        for rank in (0, 1):  # each dp rank denoises its own image: its own step counter, 1 / 4 up to 4 / 4
            mine = [row[rank] for row in rows if row[rank].step is not None]
            assert all((r.rank, r.pid, r.stage, r.step[1]) == (rank, pids[rank], "denoise", 4) for r in mine), mine
            assert [r.step[0] for r in mine] == sorted(r.step[0] for r in mine) and len(mine) >= 2, mine
            assert mine[-1].step[0] - mine[0].step[0] >= 1, f"rank {rank}'s step did not move: {mine}"
            assert mine[-1].gpu_allocated_bytes is None  # CPU ranks report no GPU memory
            # Each rank reported its own place and memory (READY, then its beats): the head's machine, its pid.
            assert all((r.node, r.hostname, r.device, r.remote) == ("local", socket.gethostname(), "cpu", False)
                       and r.rss_bytes > 50 << 20 for r in mine), mine
        assert max(row[r].step for row in rows for r in (0, 1) if row[r].step) == (4, 4)
        assert [(r.stage, r.step) for r in s.rank_statuses()] == [(None, None)] * 2  # idle: no current step
        done = s.status.snapshot
        assert done.state is SidecarState.READY and done.stage is None and done.failure is None
        assert (done.model, done.family) == (os.path.basename(tiny_dirs["flux"]), "flux")
        assert set(done.last_seconds) == {"start", "load", "encode", "denoise"}

        pids = s.sidecar_pids()
        kill = AtStep(3, lambda: os.kill(pids[1], signal.SIGKILL))
        with pytest.raises(RankDied):
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=kill, **SIZE)
        failed = s.status.snapshot
        assert failed.state is SidecarState.FAILED and failed.failure.rank == 1
        assert failed.failure.phase == "denoise" and "RankDied" in failed.failure.error
        assert failed.failure.log_tail, "the failed rank's log tail is missing"
        # The failed sidecar's rows stay: the killed rank's carries its error, the one stopped because of it none.
        assert [(r.rank, r.pid, r.error is not None) for r in s.rank_statuses()] == [
            (0, pids[0], False), (1, pids[1], True)]
        assert "RankDied" in s.rank_statuses()[1].error

        s.denoise(cond, **SHORT)  # heals: a fresh sidecar, and the failure is over
        assert s.status.snapshot.state is SidecarState.READY and s.status.snapshot.failure is None
        s.close()
        assert s.status.snapshot.state is SidecarState.NONE
    finally:
        unsubscribe(record)
        s.close()


def test_rank_rows_pair_the_driver_records_with_the_stage():
    """The rows' pure part: each rank's own step while a stage runs (none when idle), CUDA memory where a rank
    beat it (the beats of a CUDA rank carry it; CPU ranks none), RSS as each rank reported it."""
    steps, memory, rss = {0: (3, 8), 1: (2, 8)}, {1: (5 << 20, 8 << 20)}, {0: 7 << 20}
    places = [RankPlace(rank=0, pid=101, hostname="head", device="cpu"),
              RankPlace(rank=1, pid=102, node="10.0.0.7", hostname="m1", device="cuda:0")]
    running = rank_statuses(StatusSnapshot(stage="denoise"), places=places, steps=steps, gpu_memory=memory, rss=rss)
    assert running == [
        RankStatus(rank=0, pid=101, stage="denoise", step=(3, 8), hostname="head", device="cpu", rss_bytes=7 << 20),
        RankStatus(rank=1, pid=102, stage="denoise", step=(2, 8), gpu_allocated_bytes=5 << 20,
                   gpu_reserved_bytes=8 << 20, node="10.0.0.7", hostname="m1", device="cuda:0")]
    idle = rank_statuses(StatusSnapshot(), places=places, steps=steps, gpu_memory=memory, rss=rss)
    assert [(r.stage, r.step, r.gpu_reserved_bytes) for r in idle] == [(None, None, None), (None, None, 8 << 20)]


def test_rows_and_a_lost_node_serialise_for_the_panel():
    """What GET /distdiff/status and the distdiff.status event carry per rank: builtins only (a JSON round trip
    keeps it), the node's address and hostname, the pid flagged as the node's, and after a NodeLost the error
    naming the node on every row of that node (and only there)."""
    lost = NodeLost(node="10.0.0.7", ranks=(1, 2), rank=2, phase="denoise")
    failure = failure_from(lost, phase="denoise")
    assert (failure.node, failure.ranks, failure.rank) == ("10.0.0.7", (1, 2), 2)
    places = [RankPlace(rank=0, pid=101, hostname="head", device="cpu")] + [
        RankPlace(rank=r, pid=200 + r, node="10.0.0.7", hostname="m1", device="cpu") for r in (1, 2)]
    rows = rank_statuses(StatusSnapshot(), places=places, steps={}, gpu_memory={}, rss={0: 1 << 30, 1: 2 << 30},
                         errors={r: failure.error for r in failure.ranks})
    payload = json.loads(json.dumps([row.to_json() for row in rows]))
    assert payload[0] == {"rank": 0, "node": "local", "hostname": "head", "remote": False, "pid": 101,
                          "device": "cpu", "stage": None, "step": None, "rss_bytes": 1 << 30,
                          "gpu_allocated_bytes": None, "gpu_reserved_bytes": None, "error": None}
    assert [(r["node"], r["hostname"], r["remote"], r["pid"], r["rss_bytes"]) for r in payload[1:]] == [
        ("10.0.0.7", "m1", True, 201, 2 << 30), ("10.0.0.7", "m1", True, 202, None)]
    for row in payload[1:]:
        assert row["error"].startswith("NodeLost: node 10.0.0.7 (ranks 1–2) was lost during denoise"), row
    running = rank_statuses(StatusSnapshot(stage="denoise"), places=places, steps={1: (3, 4)}, gpu_memory={},
                            rss={})
    assert running[1].to_json()["step"] == [3, 4] and running[0].to_json()["step"] is None


def test_a_cp_non_leader_row_shows_its_own_step(tiny_dirs):
    """ulysses2: rank 1 sends no progress (its leader does), only its per-step heartbeat; its row still moves."""
    s = session(ulysses=2)
    try:
        s.load(tiny_dirs["flux"])
        rows = []
        s.denoise(s.encode(PROMPTS[:1]), seed=3, steps=4, guidance=3.5,
                  on_progress=lambda d, t: rows.append(s.rank_statuses()), **SIZE)
        follower = [row[1].step for row in rows if row[1].step is not None]
        assert len({done for done, _ in follower}) >= 2 and {t for _, t in follower} == {4}, follower
    finally:
        s.close()
