"""Repeated use leaks nothing on the host: 50 generate calls in one sidecar, then 10 sidecar restarts (half clean
closes, half after a rank was SIGKILLed between calls). Open file descriptors, threads, child processes, /dev/shm
segments and rank log folders are counted before and after, in the same state (a live 2-rank sidecar)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import tempfile
import time

import psutil

from dist_backend.launcher import LOG_DIR_PREFIX

from tests.dist.reliability_cases import PROMPTS, SHORT, measured, session

CALLS = 50
RESTARTS = 10
# A descriptor or two may be transiently open in the host for reasons outside the engine (a log handler rotating,
# psutil's own /proc reads); the engine's per-sidecar descriptors (2 channels + listener + 2 log files) would show
# up as 5 per restart, 50 in all, so a slack of 2 cannot hide a per-restart leak.
FD_SLACK = 2


def _snapshot() -> dict[str, int]:
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": me.num_threads(),
        "children": len(me.children(recursive=True)),
        "shm": len(os.listdir("/dev/shm")),
        # This process's sidecars only (the host's pid is in the folder name): other test runs on the machine
        # make and sweep their own.
        "rank_log_dirs": len(glob.glob(os.path.join(tempfile.gettempdir(), f"{LOG_DIR_PREFIX}{os.getpid()}-*"))),
    }


def _assert_no_growth(before: dict, after: dict, *, log_dirs: int = 0) -> None:
    assert after["fds"] <= before["fds"] + FD_SLACK, (before, after)
    assert after["threads"] == before["threads"], (before, after)
    assert after["children"] == before["children"], (before, after)
    assert after["shm"] <= before["shm"], (before, after)
    assert after["rank_log_dirs"] == before["rank_log_dirs"] + log_dirs, (before, after)


def test_fifty_calls_and_ten_restarts_leak_nothing(tiny_dirs):
    s = session()
    kept_logs = []
    try:
        s.generate(model_dir=tiny_dirs["flux"], prompts=PROMPTS, **SHORT)  # warm-up: imports, thread pools
        base = _snapshot()
        t0 = time.monotonic()
        for i in range(CALLS):
            s.generate(model_dir=tiny_dirs["flux"], prompts=PROMPTS, **{**SHORT, "seed": i, "steps": 1})
        measured(f"{CALLS} generate calls (2 images, 1 step) in one sidecar", time.monotonic() - t0)
        _assert_no_growth(base, _snapshot())
        assert s.starts == 1
        s.close()

        # Restarts without a model: the start is what is repeated (a reload would only add the same load each time).
        r = session()
        r.sidecar.call("ping", [{}, {}])
        base = _snapshot()
        t0 = time.monotonic()
        for i in range(RESTARTS):
            pids = r.sidecar_pids()
            if i % 2:
                kept_logs.append(str(r.sidecar.log_dir))  # a failed sidecar's logs are kept on purpose
                os.kill(pids[1], signal.SIGKILL)
                deadline = time.monotonic() + 5  # until the host can reap it, so the next call sees it is dead
                while r.alive() and time.monotonic() < deadline:
                    time.sleep(0.02)
            else:
                r.close()
            assert [x["rank"] for x in r.sidecar.call("ping", [{}, {}])] == [0, 1]  # a fresh sidecar answers
            assert set(r.sidecar_pids()).isdisjoint(pids)
        measured(f"{RESTARTS} sidecar restarts (2 ranks, no model)", time.monotonic() - t0)
        assert r.starts == RESTARTS + 1
        _assert_no_growth(base, _snapshot(), log_dirs=len(kept_logs))
        r.close()
    finally:
        s.close()
        for folder in kept_logs:
            shutil.rmtree(folder, ignore_errors=True)
