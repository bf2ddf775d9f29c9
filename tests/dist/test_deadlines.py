"""No wait without a deadline, in every stage (real gloo ranks on the tiny Flux pipeline):

* a rank that stops (a real SIGSTOP, injected at the start of load, encode or decode, where no step is ever
  reported) is named within heartbeat_timeout_s, not after call_timeout_s: its beat thread stops with it;
* a weights reload longer than heartbeat_timeout_s inside a staged denoise is healthy and finishes (the beats
  say "loading", so no step is due);
* the host's send to a stopped rank whose socket buffer is full gives up at the deadline;
* an authenticated peer announcing a frame far above what the call can return is refused before the host
  allocates it.
Fault points and actions: dist_backend/faults.py."""

from __future__ import annotations

import resource
import threading
import time

import pytest
import torch

from dist_backend import faults
from dist_backend.errors import ProtocolError, RankTimeout

from tests.dist.reliability_cases import PROMPTS, SHORT, gone_within, measured, session

HEARTBEAT_S = 2.0
CALL_TIMEOUT_S = 600.0  # far above what any of these tests waits: only the heartbeat may end the call


@pytest.mark.parametrize("stage", ["load", "encode", "decode"])
def test_a_stopped_rank_is_found_within_the_heartbeat_in_every_stage(tiny_dirs, tmp_path, stage):
    s = session(fault=f"rank1:{stage}:stop", once=tmp_path / "fired", heartbeat_timeout_s=HEARTBEAT_S,
                call_timeout_s=CALL_TIMEOUT_S)
    try:
        s.sidecar  # ranks up first: the clock below is the stage's own
        if stage != "load":
            s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS) if stage == "decode" else None
        latents = s.denoise(cond, **SHORT) if stage == "decode" else None
        pids = s.sidecar_pids()
        run = {"load": lambda: s.load(tiny_dirs["flux"]), "encode": lambda: s.encode(PROMPTS),
               "decode": lambda: s.decode(latents)}[stage]
        t0 = time.monotonic()
        with pytest.raises(RankTimeout) as info:
            run()
        seconds = time.monotonic() - t0
        measured(f"SIGSTOP of rank 1 at the start of {stage} (heartbeat {HEARTBEAT_S:g} s) -> RankTimeout", seconds)
        assert info.value.rank == 1 and info.value.phase == stage and "heartbeat_timeout_s" in str(info.value)
        assert HEARTBEAT_S <= seconds < HEARTBEAT_S + 4
        assert gone_within(pids, 5.0) is not None  # the stopped rank too (SIGCONT + SIGTERM, then SIGKILL)
    finally:
        s.close()


def test_a_staged_reload_longer_than_the_heartbeat_is_not_a_hang(tiny_dirs, tmp_path):
    """Staged offload reloads the transformer inside denoise, before its first step. Rank 1's reload is made to take
    2.5 × the heartbeat deadline: the rank keeps beating ("loading"), the call succeeds with the same latents."""
    sleep_s = 2.5 * HEARTBEAT_S
    s = session(offload="staged", fault=f"rank1:denoise_load:sleep{sleep_s:g}", once=tmp_path / "fired",
                heartbeat_timeout_s=HEARTBEAT_S)
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS)
        t0 = time.monotonic()
        slow = s.denoise(cond, **SHORT)  # the fault fires in this call's reload only
        seconds = time.monotonic() - t0
        measured(f"staged denoise whose reload sleeps {sleep_s:g} s (heartbeat {HEARTBEAT_S:g} s) -> finished", seconds)
        assert seconds >= sleep_s and s.starts == 1
        assert torch.equal(s.denoise(cond, **SHORT), slow)
    finally:
        s.close()


def test_a_send_to_a_stopped_rank_with_a_full_buffer_gives_up_at_the_deadline():
    """Rank 1 is stopped between calls; the next call carries 32 MB per rank, more than the socket buffers take.
    Without a send deadline the host would block in sendall for ever (before any receive deadline starts)."""
    import os
    import signal

    s = session(heartbeat_timeout_s=HEARTBEAT_S, call_timeout_s=CALL_TIMEOUT_S)
    try:
        sidecar = s.sidecar
        pids = s.sidecar_pids()
        os.kill(pids[1], signal.SIGSTOP)
        blob = torch.zeros(8 * 1024 * 1024)  # 32 MB
        outcome: list = []

        def call() -> None:
            try:
                outcome.append(sidecar.call("ping", [{"blob": blob}, {"blob": blob}]))
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
                outcome.append(exc)

        t0 = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(HEARTBEAT_S + 10)
        seconds = time.monotonic() - t0
        assert not worker.is_alive(), "the host is still blocked sending to a stopped rank"
        measured(f"send of 32 MB to a stopped rank (heartbeat {HEARTBEAT_S:g} s) -> RankTimeout", seconds)
        err = outcome[0]
        assert isinstance(err, RankTimeout) and err.rank == 1 and "sending the call" in err.phase, err
        assert seconds < HEARTBEAT_S + 5
        assert gone_within(pids, 5.0) is not None
    finally:
        s.close()


def test_an_authenticated_peer_cannot_make_the_host_allocate_a_huge_frame(tiny_dirs, tmp_path):
    """Rank 1 (authenticated: it is our own rank) announces a 1 GiB frame in answer to a decode of two 64×64 images.
    The decode's limit is sized from its largest possible answer (a few MiB here), so the host refuses the frame
    head unread: a ProtocolError at once, no 1 GiB buffer (the old fixed 8 GiB cap let it through)."""
    s = session(fault="rank1:decode:oversize", once=tmp_path / "fired", heartbeat_timeout_s=HEARTBEAT_S)
    try:
        s.load(tiny_dirs["flux"])
        latents = s.denoise(s.encode(PROMPTS), **SHORT)
        pids = s.sidecar_pids()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.monotonic()
        with pytest.raises(ProtocolError) as info:
            s.decode(latents)
        seconds = time.monotonic() - t0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
        measured(f"rank announces a {faults.OVERSIZE_BYTES >> 20} MiB frame during decode -> refused unread", seconds)
        assert f"announced a {faults.OVERSIZE_BYTES}-byte frame" in str(info.value) and "rank 1" in str(info.value)
        assert "limit" in str(info.value)
        assert seconds < 5  # the decode itself, then refused on its head (not a wait for the bytes)
        assert grown < faults.OVERSIZE_BYTES // 4, f"the host's peak memory grew by {grown >> 20} MiB"
        assert gone_within(pids, 5.0) is not None
        assert s.decode(latents).shape == (2, 64, 64, 3)  # the next call gets a fresh sidecar
    finally:
        s.close()


def test_close_from_another_thread_stops_a_call_that_has_no_step_boundary(tiny_dirs, tmp_path):
    """What the release route does: Session.close on another thread while a decode (no step boundary; made to take
    a minute) holds the session. close returns within the abort grace, the decode raises Cancelled naming the
    release, and no rank is left."""
    from dist_backend import driver
    from dist_backend.errors import Cancelled

    s = session(fault="rank1:decode:sleep60", once=tmp_path / "fired")
    try:
        s.load(tiny_dirs["flux"])
        latents = s.denoise(s.encode(PROMPTS), **SHORT)
        pids = s.sidecar_pids()
        outcome: list = []

        def decode() -> None:
            try:
                outcome.append(s.decode(latents))
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
                outcome.append(exc)

        worker = threading.Thread(target=decode, daemon=True)
        worker.start()
        time.sleep(1.0)  # the decode is under way (rank 1 sleeps in it)
        t0 = time.monotonic()
        s.close()
        seconds = time.monotonic() - t0
        worker.join(10)
        measured("Session.close from another thread during a long decode -> returned", seconds)
        assert seconds < driver.ABORT_GRACE_S + 4
        assert isinstance(outcome[0], Cancelled) and "released" in str(outcome[0]), outcome
        assert gone_within(pids, 5.0) is not None and not s.alive()
    finally:
        s.close()
