"""Cancel through the real sidecar. Denoise stops every rank at the same step boundary and keeps the sidecar.
Load, encode and decode have no step boundary: the host waits a grace (driver.CANCEL_GRACE_S) for the stage to
finish, keeping the sidecar, or else stops every rank; either way the call raises Cancelled and nothing is left
half-loaded: the next call works."""

from __future__ import annotations

import time

import pytest
import torch

from dist_backend import driver
from dist_backend.errors import Cancelled

from tests.dist.reliability_cases import LONG_STEPS, PROMPTS, SHORT, SIZE, AtStep, gone_within, measured, session


def test_cancel_denoise_and_a_short_decode_keep_the_sidecar(tiny_dirs):
    s = session(ulysses=2)  # the cancel decision is an all_reduce inside the CP group: both ranks leave together
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS[:1])
        before = s.denoise(cond, **SHORT)
        images = s.decode(before)
        pids = s.sidecar_pids()

        asked = AtStep(5, lambda: None)
        with pytest.raises(Cancelled, match="every rank stopped at the same step"):
            s.denoise(cond, seed=1, steps=LONG_STEPS, guidance=3.5, on_progress=asked,
                      should_cancel=lambda: asked.fired_at is not None, **SIZE)
        measured("cancel during denoise (ulysses2) -> Cancelled, sidecar kept", time.monotonic() - asked.fired_at)

        # A decode of a few ms finishes well inside the grace: Cancelled, and the ranks stay as they were.
        with pytest.raises(Cancelled, match="finished the stage"):
            s.decode(before, should_cancel=lambda: True)

        assert s.sidecar_pids() == pids and s.starts == 1
        assert torch.equal(s.denoise(cond, **SHORT), before)
        assert torch.equal(s.decode(before), images)
    finally:
        s.close()


def test_cancel_a_long_load_stops_the_ranks_and_the_next_load_works(tiny_dirs, tmp_path):
    s = session(fault="rank0:load:sleep60", once=tmp_path / "fired")  # a load that would take a minute
    try:
        s.sidecar  # start the ranks first, so the cancel below lands in the load itself
        pids = s.sidecar_pids()
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="every rank was stopped"):
            s.load(tiny_dirs["flux"], should_cancel=lambda: True)
        seconds = time.monotonic() - t0
        measured(f"cancel during a long load -> Cancelled, ranks stopped (grace {driver.CANCEL_GRACE_S['load']} s)",
                 seconds)
        assert seconds < driver.CANCEL_GRACE_S["load"] + 5
        assert gone_within(pids, 1.0) is not None and not s.alive()
        assert s._model_dir is None  # the session holds no model it could reload half-way
        _, images = s.generate(model_dir=tiny_dirs["flux"], prompts=PROMPTS[:1], **SHORT)
        assert images.shape == (1, 64, 64, 3) and s.starts == 2
    finally:
        s.close()


def test_cancel_a_long_decode_stops_the_ranks_and_the_next_decode_works(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "CANCEL_GRACE_DEFAULT_S", 1.0)  # default 30 s: a real decode may well finish
    s = session(fault="rank1:decode:sleep60", once=tmp_path / "fired")
    try:
        s.load(tiny_dirs["flux"])
        latents = s.denoise(s.encode(PROMPTS), **SHORT)
        pids = s.sidecar_pids()
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="every rank was stopped"):
            s.decode(latents, should_cancel=lambda: True)
        measured("cancel during a long decode -> Cancelled, ranks stopped (grace lowered to 1 s)",
                 time.monotonic() - t0)
        assert gone_within(pids, 1.0) is not None
        images = s.decode(latents)  # a fresh sidecar, the model reloaded by the session
        assert images.shape == (2, 64, 64, 3) and s.starts == 2
    finally:
        s.close()
