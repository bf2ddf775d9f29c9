"""What the status panel shows (web/distdiff.js): the live sidecar, one row per rank, the last failure and the
last run's stage timings. Pushed as the websocket event ``distdiff.status`` on every change of the engine's
StatusBoard (at most every PUSH_INTERVAL_S during a stage), and answered by GET /distdiff/status. The panel's
Restart button is POST /distdiff/restart; its Release GPUs button is the existing POST /distdiff/release.

Nothing secret: the model is named by its folder's last part, no token, no secret path, no environment."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

EVENT = "distdiff.status"
PUSH_INTERVAL_S = 0.2  # progress comes once per step; the browser needs no more than a few frames a second

_push_lock = threading.Lock()
_last_push = 0.0
_last_key = None


def status_payload() -> dict:
    from ..dist_backend.session import current_session
    from ..dist_backend.status import SidecarState

    session = current_session()
    if session is None:
        return {"state": SidecarState.NONE.value, "ranks": [], "running": False}
    snap = session.status.snapshot
    cfg = session.config
    alive = session.alive()
    pids = session.sidecar_pids() if alive else []
    state = snap.state if alive or snap.state in (SidecarState.FAILED, SidecarState.STARTING) else SidecarState.NONE
    # Every rank, the head's and the nodes', as each reported itself (node, hostname, pid on its machine, device,
    # memory); a failed sidecar's last rows carry the error on the ranks it names.
    ranks = [row.to_json() for row in session.rank_statuses()] if alive or state is SidecarState.FAILED else []
    return {
        "state": state.value,
        "running": alive,  # kept for older callers of this route
        "model": snap.model, "family": snap.family,
        "strategy": cfg.strategy,
        "degrees": {"world_size": cfg.world_size, "dp": cfg.dp, "cfg": cfg.cfg, "ring": cfg.ring,
                    "ulysses": cfg.ulysses, "gpus_per_rank": cfg.gpus_per_rank},
        "device": cfg.device.value,
        "starts": session.starts,
        "stage": snap.stage,
        "step": list(snap.step) if snap.step else None,
        "ranks": ranks,
        "pids": pids,
        "failure": None if snap.failure is None or state is not SidecarState.FAILED else {
            "rank": snap.failure.rank, "node": snap.failure.node, "ranks": list(snap.failure.ranks),
            "phase": snap.failure.phase, "error": snap.failure.error, "log_tail": list(snap.failure.log_tail)},
        "last_seconds": dict(snap.last_seconds),
        "seconds": dict(session.timings.stages),
        "last_run": dict(session.last_run),  # cfg degree, compile, cache and forwards skipped by the last denoise
        "loras": [{"file": os.path.basename(spec.path), "strength": spec.strength} for spec in session.loras],
        "plan": snap.plan,  # strategy manual/auto, the layout and its reasons (planning.auto.LoaderPlan.summary)
    }


def push(snapshot) -> None:
    """StatusBoard subscriber: send the payload to every browser. State changes go out at once; step updates of
    the same stage at most every PUSH_INTERVAL_S (the last step of a stage always: the stage ends with a push)."""
    global _last_push, _last_key
    from server import PromptServer

    key = (snapshot.state, snapshot.stage, snapshot.failure)
    now = time.monotonic()
    with _push_lock:
        if key == _last_key and now - _last_push < PUSH_INTERVAL_S:
            return
        _last_push, _last_key = now, key
    PromptServer.instance.send_sync(EVENT, status_payload())


def add_status_events() -> None:
    """Every StatusBoard change pushed to the browsers (the routes are in registry.py)."""
    from ..dist_backend.status import subscribe

    subscribe(push)
