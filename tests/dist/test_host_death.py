"""When the host process dies (SIGKILL: no atexit, no finally), every rank exits by itself within a few seconds:
a busy rank through its parent watchdog (worker._watch_parent) or the channel's EOF at its next step, an idle
rank through the EOF of its channel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dist_backend.faults import ENV_FAULT, ENV_FAULT_ONCE

from tests.dist.reliability_cases import gone_within, measured

ROOT = Path(__file__).resolve().parents[2]
HOST_SCRIPT = """
import sys, time
from dist_backend.config import SessionConfig
from dist_backend.session import Session
s = Session(SessionConfig(world_size=2, threads_per_rank=1))
s.generate(model_dir=sys.argv[1], prompts=["a fox"], seed=1, steps=2, guidance=3.5, height=64, width=64)
print("idle", flush=True)
time.sleep(600)
"""


def _ranks_of(host: subprocess.Popen, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert host.poll() is None, f"the host exited early: {host.communicate()[1][-2000:]}"
        ranks = [p.pid for p in psutil.Process(host.pid).children()
                 if "dist_backend.worker" in _cmdline(p)]
        if len(ranks) == count:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _kill_and_time(host: subprocess.Popen, ranks: list[int], what: str) -> None:
    os.kill(host.pid, signal.SIGKILL)
    host.wait(10)
    seconds = gone_within(ranks, 10.0)
    measured(f"host SIGKILLed ({what}) -> every rank exited by itself", seconds if seconds is not None else 99)
    assert seconds is not None and seconds < 5, f"ranks {ranks} outlived their host"


def test_cli_killed_mid_denoise(tiny_dirs, tmp_path):
    marker = tmp_path / "step5"
    # A no-op fault at step 5 whose once-file tells the test that rank 1 is inside the denoise loop.
    env = dict(os.environ, **{ENV_FAULT: "rank1:denoise_step5:sleep0", ENV_FAULT_ONCE: str(marker)})
    cli = subprocess.Popen(
        [sys.executable, "-m", "dist_backend", "generate", "--model", str(tiny_dirs["flux"]), "--prompt", "a fox",
         "--prompt", "a boat", "--steps", "100000", "--height", "64", "--width", "64", "--world-size", "2",
         "--threads-per-rank", "1", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = _ranks_of(cli, 2)
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and cli.poll() is None, "rank 1 never reached step 5"
            time.sleep(0.05)
        _kill_and_time(cli, ranks, "CLI generate, mid-denoise")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_host_script_killed_while_idle(tiny_dirs):
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, str(tiny_dirs["flux"])], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ranks = _ranks_of(host, 2)
        assert host.stdout.readline().strip() == "idle", host.communicate()[1][-2000:]
        _kill_and_time(host, ranks, "script holding a Session, idle between calls")
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
