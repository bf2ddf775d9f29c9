"""The Session's status board (what the ComfyUI panel shows) follows a real 2-rank sidecar: starting, loading,
running with the step counter moving, ready with the stage timings, failed with the killed rank's log tail, none
after close."""

from __future__ import annotations

import os
import signal

import pytest

from dist_backend.errors import RankDied
from dist_backend.status import SidecarState, subscribe, unsubscribe

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
        s.denoise(cond, seed=3, steps=4, guidance=3.5, **SIZE)
        states = [snap.state for snap in seen]
        assert states[:3] == [SidecarState.STARTING, SidecarState.READY, SidecarState.LOADING]
        steps = [snap.step for snap in seen if snap.stage == "denoise" and snap.step]
        assert steps[-1] == (8, 8) and len({d for d, _ in steps}) >= 2  # two images × 4 steps, counter moved
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

        s.denoise(cond, **SHORT)  # heals: a fresh sidecar, and the failure is over
        assert s.status.snapshot.state is SidecarState.READY and s.status.snapshot.failure is None
        s.close()
        assert s.status.snapshot.state is SidecarState.NONE
    finally:
        unsubscribe(record)
        s.close()
