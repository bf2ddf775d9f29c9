"""What the launcher tidies before it starts ranks: log folders of failed sidecars older than the keep time (whose
host is gone), and allocator settings ranks must not inherit from ComfyUI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_backend import launcher
from dist_backend.config import SessionConfig


def _folder(name: str, age_s: float) -> Path:
    folder = Path(tempfile.gettempdir()) / name
    folder.mkdir()
    log = folder / "rank0.log"
    log.write_text("failed\n")
    then = time.time() - age_s
    for path in (log, folder):
        os.utime(path, (then, then))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_old_failed_sidecar_logs_are_removed_and_the_rest_kept():
    keep = launcher.FAILED_LOGS_KEEP_S
    tag = f"{os.getpid()}x{time.monotonic_ns()}"  # unique names: other test runs share the temp dir
    dead = _dead_pid()
    old_dead = _folder(f"{launcher.LOG_DIR_PREFIX}{dead}-old{tag}", keep + 60)
    old_legacy = _folder(f"{launcher.LOG_DIR_PREFIX}legacy{tag}", keep + 60)  # made before the pid was in the name
    recent_dead = _folder(f"{launcher.LOG_DIR_PREFIX}{dead}-new{tag}", keep - 600)
    old_alive = _folder(f"{launcher.LOG_DIR_PREFIX}{os.getpid()}-alive{tag}", keep + 60)  # its host (we) still runs
    try:
        removed = launcher.remove_old_logs()
        assert old_dead in removed and old_legacy in removed
        assert not old_dead.exists() and not old_legacy.exists()
        assert recent_dead.exists() and old_alive.exists()
    finally:
        for folder in (recent_dead, old_alive, old_dead, old_legacy):
            for f in folder.glob("*") if folder.exists() else ():
                f.unlink()
            if folder.exists():
                folder.rmdir()


def test_ranks_do_not_inherit_cuda_malloc_async_unless_asked(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync,expandable_segments:False")
    env = launcher.rank_base_env(SessionConfig())
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env
    asked = launcher.rank_base_env(SessionConfig(env=(("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync"),)))
    assert asked["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # other settings pass through
    assert launcher.rank_base_env(SessionConfig())["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
