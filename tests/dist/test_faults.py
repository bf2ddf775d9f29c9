"""Faults in real rank processes (gloo, CPU): a rank killed, stopped, hung in a collective or raising on its own;
each call fails fast with one typed error naming the rank, no rank is left behind, and the same Session heals.
Cancel and the death of the host are in test_cancel.py and test_host_death.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dist_backend.errors import RankDied, RankError, RankTimeout

from tests.dist.reliability_cases import LONG_STEPS, PROMPTS, SHORT, SIZE, AtStep, gone_within, measured, session


def _heals(s, cond, before: torch.Tensor, old_pids: list[int]) -> None:
    """The next call on the same Session starts a fresh sidecar (model reloaded) and gives the same latents."""
    assert gone_within(old_pids, 5.0) is not None, "a rank of the failed sidecar is still running"
    starts = s.starts
    again = s.denoise(cond, **SHORT)
    assert s.starts == starts + 1 and set(s.sidecar_pids()).isdisjoint(old_pids)
    assert torch.equal(again, before)


def test_sigkill_mid_denoise(tiny_dirs):
    """Rank 1 of a 2-rank Ulysses group is SIGKILLed while rank 0 waits for it in the step's all_to_all."""
    s = session(ulysses=2)
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS[:1])
        before = s.denoise(cond, **SHORT)
        pids = s.sidecar_pids()
        kill = AtStep(5, lambda: os.kill(pids[1], signal.SIGKILL))
        with pytest.raises(RankDied) as info:
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=kill, **SIZE)
        seconds = time.monotonic() - kill.fired_at
        measured("SIGKILL of rank 1 mid-denoise (ulysses2) -> RankDied, all ranks stopped", seconds)
        assert info.value.rank == 1 and info.value.returncode == -signal.SIGKILL
        assert "rank 1 died during denoise (signal 9)" in str(info.value)
        assert seconds < 10
        assert not s.alive() and gone_within(pids, 0.5) is not None  # already reaped when the call returned
        _heals(s, cond, before, pids)
    finally:
        s.close()


def test_sigstop_rank_is_a_timeout(tiny_dirs):
    """A stopped rank (SIGSTOP) sends nothing: RankTimeout after heartbeat_timeout_s, and a stopped process is
    still stopped for good (SIGTERM is delivered with SIGCONT, SIGKILL after the grace)."""
    s = session(heartbeat_timeout_s=2.0)  # dp2: each rank denoises its own image, no collective in the way
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS)
        before = s.denoise(cond, **SHORT)
        pids = s.sidecar_pids()
        stop = AtStep(5, lambda: os.kill(pids[1], signal.SIGSTOP))
        with pytest.raises(RankTimeout) as info:
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=stop, **SIZE)
        seconds = time.monotonic() - stop.fired_at
        measured("SIGSTOP of rank 1 mid-denoise (dp2, heartbeat 2 s) -> RankTimeout, all ranks stopped", seconds)
        assert info.value.rank == 1 and info.value.phase == "denoise"
        assert "heartbeat_timeout_s" in str(info.value)
        assert 2.0 <= seconds < 2.0 + 5
        _heals(s, cond, before, pids)
    finally:
        s.close()


def test_rank_hangs_where_its_peer_waits_in_a_collective(tiny_dirs, tmp_path):
    """Rank 1 sleeps at step 5 (injected); rank 0 waits for it in the step's collective. The host names rank 1,
    the silent one, not rank 0 (whose collective times out only later, at 2 × heartbeat_timeout_s)."""
    s = session(ulysses=2, heartbeat_timeout_s=2.0, fault="rank1:denoise_step5:hang", once=tmp_path / "fired")
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS[:1])
        before = s.denoise(cond, **SHORT)  # 2 steps: the step-5 fault does not fire yet
        pids = s.sidecar_pids()
        seen = AtStep(5, lambda: None)
        with pytest.raises(RankTimeout) as info:
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=seen, **SIZE)
        seconds = time.monotonic() - seen.fired_at
        measured("rank 1 hangs at step 5, rank 0 in a collective (ulysses2, heartbeat 2 s) -> RankTimeout", seconds)
        assert info.value.rank == 1
        assert seconds < 2.0 + 5
        _heals(s, cond, before, pids)
    finally:
        s.close()


@pytest.mark.parametrize("strategy", ["ulysses2", "dp2"])
def test_exception_on_one_rank(tiny_dirs, tmp_path, strategy):
    """An out-of-memory error raised on rank 1 only, at step 5. Under Ulysses rank 0 would wait in a collective
    for ever: the host gives it the failure grace, then stops every rank. Under data parallel rank 0 stops at its
    next step boundary and the sidecar is kept. Either way the host raises ONE RankError, with rank 1's traceback."""
    ulysses = 2 if strategy == "ulysses2" else 1
    s = session(ulysses=ulysses, heartbeat_timeout_s=3.0, fault="rank1:denoise_step5:raise_oom",
                once=tmp_path / "fired")
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS[: 2 // ulysses])
        before = s.denoise(cond, **SHORT)
        pids = s.sidecar_pids()
        seen = AtStep(5, lambda: None)
        with pytest.raises(RankError) as info:
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=seen, **SIZE)
        seconds = time.monotonic() - seen.fired_at
        measured(f"OutOfMemoryError on rank 1 at step 5 ({strategy}) -> RankError", seconds)
        err = info.value
        assert err.rank == 1 and err.phase == "denoise" and err.exc_type == "OutOfMemoryError"
        assert "injected fault" in err.message and "hint: lower width/height" in str(err)
        assert "faults.py" in err.remote_traceback and "OutOfMemoryError" in err.remote_traceback
        assert seconds < 10
        if strategy == "ulysses2":
            assert not s.alive()  # rank 0 was stuck in a collective: every rank was stopped
            _heals(s, cond, before, pids)
        else:
            assert s.sidecar_pids() == pids  # both ranks answered: nothing to restart
            assert torch.equal(s.denoise(cond, **SHORT), before) and s.starts == 1
    finally:
        s.close()
