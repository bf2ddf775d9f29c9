"""Helpers shared by the tests (importable as tests.helpers)."""

from __future__ import annotations

import time

import psutil


def rank_processes(*, everywhere: bool = False) -> list[psutil.Process]:
    """Live DistDiff rank processes started by this test process (its descendants), or, with everywhere=True, on
    the whole machine (for tests whose host process is another one). Other test runs on the same machine do not
    disturb the default."""
    if everywhere:
        candidates = list(psutil.process_iter())
    else:
        candidates = psutil.Process().children(recursive=True)
    found = []
    for proc in candidates:
        try:
            if "dist_backend.worker" in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_ranks(timeout: float = 15.0, *, ignore: set[int] = frozenset()) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in rank_processes() if p.pid not in ignore]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
