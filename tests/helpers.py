"""Helpers shared by the tests (importable as tests.helpers)."""

from __future__ import annotations

import time

import psutil


def rank_processes() -> list[psutil.Process]:
    """Every live DistDiff rank process on this machine started by this test run (same session user)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "dist_backend.worker" in cmd and proc.status() != psutil.STATUS_ZOMBIE:
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
