"""What a Session is doing, as a typed snapshot that a status panel can show (no ComfyUI, no processes here).

The Session owns one :class:`StatusBoard` and tells it when a stage starts, moves a step, ends or fails; every
change calls the subscribers (the ComfyUI glue pushes it to the browser, see nodes/status.py). Subscribers run on
the thread that changed the state (the one running the call), so they must be quick and must not raise.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)
LOCAL_NODE = "local"  # cluster.LOCAL: the head's own ranks (no import of cluster here: this module is pure data)


class SidecarState(str, enum.Enum):
    """The sidecar's state as a user sees it."""

    NONE = "none"  # no rank process (never started, released, or replaced)
    STARTING = "starting"  # rank processes are starting and connecting
    LOADING = "loading"  # ranks are loading the model
    READY = "ready"  # ranks are up and idle, a model is loaded
    RUNNING = "running"  # a stage (encode, denoise, decode) is running
    FAILED = "failed"  # the last call failed in the sidecar (a rank died, hung or raised); the next call restarts


@dataclass(frozen=True, kw_only=True)
class RankFailure:
    """Why the last call failed, as the host saw it."""

    rank: int | None
    """The rank the error names (None when the sidecar as a whole failed)."""
    phase: str
    """The stage or start phase it failed in."""
    error: str
    """The error type and message."""
    log_tail: tuple[str, ...] = ()
    """The last lines of that rank's log (or its remote traceback)."""
    node: str | None = None
    """The machine whose ranks were lost (NodeLost, NodeTimeout: its address in the cluster SPEC), else None."""
    ranks: tuple[int, ...] = ()
    """Every rank the error names (all of a lost node's ranks; else the one rank, if any)."""


@dataclass(frozen=True, kw_only=True)
class StatusSnapshot:
    state: SidecarState = SidecarState.NONE
    stage: str | None = None
    """The stage running now (start, load, encode, denoise, decode), None when idle."""
    step: tuple[int, int] | None = None
    """(done, total) of the running stage's progress, summed over the ranks, as the progress events report it."""
    model: str | None = None
    """The loaded model folder's name (its last path part: no full paths leave the host)."""
    family: str | None = None
    failure: RankFailure | None = None
    last_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each stage took the last time it ran."""
    plan: dict | None = None
    """The loader's plan (planning.auto.LoaderPlan.summary: strategy, layout, summary, reasons, warnings, what it
    was planned for, what the planner said about the last request); None when no loader planned."""
    updated: float = 0.0
    """time.time() of this snapshot."""


@dataclass(frozen=True, kw_only=True)
class RankPlace:
    """Where a rank runs, as the rank itself reported it when it joined the process group (its READY message):
    the same for a rank the head started and one a node's torchrun started."""

    rank: int
    node: str = LOCAL_NODE
    """"local" (started by the head) or the node's address as the cluster SPEC names it."""
    hostname: str | None = None
    """The rank's machine's hostname (socket.gethostname() on that machine)."""
    pid: int
    """The rank's process id on its own machine (a remote rank's pid means nothing on the head)."""
    device: str | None = None
    """"cpu", or the CUDA devices of that machine ("cuda:0,cuda:1"; a node numbers its own GPUs)."""


@dataclass(frozen=True, kw_only=True)
class RankStatus:
    """One rank's row of the panel."""

    rank: int
    pid: int
    stage: str | None
    """The stage running now (every rank runs the session's stage), None when idle."""
    step: tuple[int, int] | None
    """This rank's last (done, total) step of the running stage, None before its first step or in a stage without
    steps. A data-parallel rank counts its own images' steps; the ranks of a CP group count the same steps."""
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    """CUDA memory of the rank's devices from its last beat (None on CPU, or before its first beat)."""
    node: str = LOCAL_NODE
    hostname: str | None = None
    device: str | None = None
    """See RankPlace."""
    rss_bytes: int | None = None
    """Resident memory of the rank process, as the rank read it itself (READY, then every beat), None where it
    cannot read it: the one source for local and remote ranks (the head cannot see another machine's /proc)."""
    error: str | None = None
    """Why this rank is gone, on the rows of a failed sidecar: the error that named it (a lost node's NodeLost
    names the node on each of its ranks' rows), None for the ranks that were only stopped because of it."""

    @property
    def remote(self) -> bool:
        return self.node != LOCAL_NODE

    def to_json(self) -> dict:
        """The row as the panel's JSON (GET /distdiff/status, the distdiff.status event): builtins only."""
        return {"rank": self.rank, "node": self.node, "hostname": self.hostname, "remote": self.remote,
                "pid": self.pid, "device": self.device, "stage": self.stage,
                "step": list(self.step) if self.step else None, "rss_bytes": self.rss_bytes,
                "gpu_allocated_bytes": self.gpu_allocated_bytes, "gpu_reserved_bytes": self.gpu_reserved_bytes,
                "error": self.error}


def rank_statuses(snapshot: StatusSnapshot, *, places: list[RankPlace], steps: dict[int, tuple[int, int]],
                  gpu_memory: dict[int, tuple[int, int]], rss: dict[int, int],
                  errors: dict[int, str] | None = None) -> list[RankStatus]:
    """The panel's rows from the board's snapshot and the per-rank records of the driver (Sidecar.rank_places,
    rank_steps, rank_gpu_memory, rank_rss), plus, for a failed sidecar, the error of each rank it names."""
    rows = []
    for place in places:
        allocated, reserved = gpu_memory.get(place.rank, (None, None))
        rows.append(RankStatus(rank=place.rank, pid=place.pid, node=place.node, hostname=place.hostname,
                               device=place.device, stage=snapshot.stage,
                               step=steps.get(place.rank) if snapshot.stage is not None else None,
                               gpu_allocated_bytes=allocated, gpu_reserved_bytes=reserved,
                               rss_bytes=rss.get(place.rank), error=(errors or {}).get(place.rank)))
    return rows


Subscriber = Callable[[StatusSnapshot], None]
_subscribers: list[Subscriber] = []
_subscribers_lock = threading.Lock()


def subscribe(fn: Subscriber) -> None:
    """Call ``fn(snapshot)`` on every change of any Session's board (idempotent for the same ``fn``)."""
    with _subscribers_lock:
        if fn not in _subscribers:
            _subscribers.append(fn)


def unsubscribe(fn: Subscriber) -> None:
    with _subscribers_lock:
        if fn in _subscribers:
            _subscribers.remove(fn)


class StatusBoard:
    """The mutable side: the Session calls these, readers take :attr:`snapshot` (immutable)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = StatusSnapshot(updated=time.time())

    @property
    def snapshot(self) -> StatusSnapshot:
        return self._snapshot

    def set_state(self, state: SidecarState, **changes) -> None:
        self._update(state=state, **changes)

    def begin(self, stage: str, *, state: SidecarState = SidecarState.RUNNING) -> float:
        """A stage starts; returns its start time for :meth:`end`."""
        self._update(state=state, stage=stage, step=None)
        return time.monotonic()

    def set_plan(self, plan: dict | None) -> None:
        """The plan of the layout this session runs (the loader's, then re-checked per request)."""
        self._update(plan=plan)

    def step(self, done: int, total: int) -> None:
        self._update(step=(int(done), int(total)))

    def end(self, stage: str, started: float, **changes) -> None:
        """The stage ended normally: the sidecar is ready again and an earlier failure is over."""
        seconds = dict(self._snapshot.last_seconds, **{stage: round(time.monotonic() - started, 3)})
        self._update(state=SidecarState.READY, stage=None, failure=None, last_seconds=seconds, **changes)

    def fail(self, failure: RankFailure) -> None:
        self._update(state=SidecarState.FAILED, stage=None, failure=failure)

    def _update(self, **changes) -> None:
        with self._lock:
            self._snapshot = snapshot = replace(self._snapshot, updated=time.time(), **changes)
        with _subscribers_lock:
            subscribers = list(_subscribers)
        for fn in subscribers:
            try:
                fn(snapshot)
            except Exception:  # a panel must never break a run
                log.exception("status subscriber %r failed", fn)


def failure_from(error: BaseException, *, phase: str, lines: int = 12) -> RankFailure:
    """The failure to show for ``error``: its rank, phase and message, and the last lines of the rank's log
    (RankDied carries them in ``detail``) or of its remote traceback (RankError)."""
    tail = getattr(error, "detail", "") or getattr(error, "remote_traceback", "") or ""
    rank = getattr(error, "rank", None)
    node = getattr(error, "node", None)  # NodeLost, NodeTimeout
    ranks = tuple(getattr(error, "ranks", None) or ([] if rank is None else [rank]))
    return RankFailure(rank=rank, phase=getattr(error, "phase", None) or phase,
                       error=f"{type(error).__name__}: {error}",
                       log_tail=tuple(tail.strip().splitlines()[-lines:]) if tail.strip() else (),
                       node=node if isinstance(node, str) else None, ranks=ranks)
