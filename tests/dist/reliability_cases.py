"""Shared pieces of the reliability tests (faults, bad input, security, soak): a 2-rank CPU session on the tiny
Flux pipeline, fault injection through the rank environment, and a trigger that acts at a given denoise step."""

from __future__ import annotations

import time

import psutil

from dist_backend.config import SessionConfig
from dist_backend.faults import ENV_FAULT, ENV_FAULT_ONCE
from dist_backend.session import Session

SIZE = dict(height=64, width=64)
SHORT = dict(seed=11, steps=2, guidance=3.5, **SIZE)
# Far more steps than a test waits for (~1 ms each at 64×64): the fault must end the call, not the step count.
LONG_STEPS = 20_000
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]  # two, so each data-parallel rank has an image


def session(*, fault: str = "", once=None, **config) -> Session:
    """A 2-rank CPU session (one torch thread per rank: the machine has 2 cores). `fault` is a DISTDIFF_FAULT spec;
    with `once` (a path) it fires once in all, so the sidecar that replaces the faulty one works."""
    env = ()
    if fault:
        env = ((ENV_FAULT, fault),) + (((ENV_FAULT_ONCE, str(once)),) if once else ())
    return Session(SessionConfig(world_size=2, threads_per_rank=1, env=env, **config))


class AtStep:
    """An on_progress hook that runs `action` once, when the leaders' summed progress reaches `step`, and records
    when (time.monotonic) it did; the time to detect a fault is measured from there."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.fired_at = step, action, None

    def __call__(self, done: int, total: int) -> None:
        if self.fired_at is None and done >= self.step:
            self.fired_at = time.monotonic()
            self.action()


def gone_within(pids, seconds: float) -> float | None:
    """Seconds until none of `pids` runs (a zombie counts as gone: it holds no memory, socket or GPU), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not any(_running(pid) for pid in pids):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def measured(what: str, seconds: float) -> None:
    """One line per figure; docs/RELIABILITY.md quotes them (run pytest with -s to see them)."""
    print(f"\n[measured] {what}: {seconds:.3f} s")
