"""Rank side: a thread that tells the host "this process runs" while a call is in progress, whatever the main
thread is doing (loading weights, encoding, decoding, waiting in a collective).

What a beat proves, and what it does not: it comes from a second thread, so it proves the process is scheduled and
the interpreter is not frozen — a SIGSTOPped rank, a rank paused by the OOM killer's freezer, or a load stuck in a
page fault of a dead filesystem while holding the GIL all stop beating, and the host names that rank after
heartbeat_timeout_s in every stage. It does not prove the main thread advances: a rank hung inside a collective
keeps beating. That case is caught by the step deadline of a denoise (the host also wants a step, or a beat that
says weights are loading, every heartbeat_timeout_s) and by torch.distributed's collective timeout
(2 × heartbeat_timeout_s); load, encode and decode run no collective. A long but healthy load beats throughout and
is never killed for being long (call_timeout_s still bounds the whole call).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from . import protocol

log = logging.getLogger(__name__)
# Beats per heartbeat deadline: a rank under heavy CPU contention may be late for a few and still be in time.
BEATS_PER_DEADLINE = 4
MAX_INTERVAL_S = 5.0
EXIT_HOST_GONE = 71  # worker.EXIT_PARENT_GONE is 70


def beat_interval(heartbeat_timeout_s: float) -> float:
    return min(MAX_INTERVAL_S, heartbeat_timeout_s / BEATS_PER_DEADLINE)


def own_rss() -> int | None:
    """Resident memory of this process in bytes, None where it cannot be read. The rank reads its own: the head
    cannot read a remote rank's /proc, so the status panel takes every rank's memory from its own report."""
    try:
        with open("/proc/self/statm", "rb") as f:  # Linux: one small read, cheap enough for every beat
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # memory is informative only


class Beater:
    """Sends ``{"id": call, "event": "alive", "loading": bool, "rss": bytes}`` at `begin` and then every `interval`
    seconds until `end`, with ``"gpu_memory": [allocated, reserved]`` (bytes, summed over `gpus`) on a CUDA rank:
    the status panel's memory column. One read of /proc/self/statm and two of the caching allocator's counters,
    cheap enough for every beat."""

    def __init__(self, channel, *, interval: float, gpus: tuple[int, ...] = ()) -> None:
        self._channel = channel
        self._interval = interval
        self._gpus = gpus  # the CUDA device indices this rank uses (empty on CPU)
        self._lock = threading.Lock()  # guards _call_id: once end() returns, no beat of that call can follow
        self._call_id = None
        self._loading = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="distdiff-beat", daemon=True)
        self._thread.start()

    def begin(self, call_id) -> None:
        with self._lock:
            self._call_id = call_id
            self._loading = 0
        self._wake.set()  # beat at once: every call, even a short one, brings the rank's memory up to date

    def end(self) -> None:
        """Stop beating for the current call; call before sending its answer (a beat after the answer would reach
        the host as a stray message of a finished call)."""
        with self._lock:
            self._call_id = None

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Marks weights being loaded: the host then expects no denoise step, only beats. Beats at once, so a
        load that starts just before a step deadline is not judged by the step before it."""
        with self._lock:
            self._loading += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._loading -= 1

    def close(self) -> None:
        self._stopped = True
        self.end()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._interval)
            self._wake.clear()
            memory = self._gpu_memory() if self._gpus else None
            rss = own_rss()
            with self._lock:
                if self._call_id is None or self._stopped:
                    continue
                message = {"id": self._call_id, "event": protocol.Event.ALIVE, "loading": self._loading > 0}
                if memory is not None:
                    message["gpu_memory"] = memory
                if rss is not None:
                    message["rss"] = rss
                frame = protocol.encode(message)
                try:
                    self._channel.send(frame)
                except Exception:  # noqa: BLE001 - the host is gone or unreachable
                    # Nothing this call computes can be delivered any more. The main thread may be in a collective
                    # with a peer that is gone too (a node whose link was cut) and would only leave it at the
                    # collective timeout, so the process ends here.
                    log.error("the host no longer takes beats (channel closed or unreachable); exiting")
                    logging.shutdown()
                    os._exit(EXIT_HOST_GONE)

    def _gpu_memory(self) -> list[int] | None:
        """[allocated, reserved] bytes of this rank's CUDA devices, or None if they cannot be read (a beat must
        go out regardless: it is what proves the process runs)."""
        import torch

        try:
            return [sum(torch.cuda.memory_allocated(g) for g in self._gpus),
                    sum(torch.cuda.memory_reserved(g) for g in self._gpus)]
        except Exception:  # noqa: BLE001 - memory is informative only
            log.debug("GPU memory not read", exc_info=True)
            return None
