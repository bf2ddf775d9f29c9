"""What the status route reports: the live sidecar, its ranks and its timings (no secrets)."""

from __future__ import annotations

import os


def status_payload() -> dict:
    from ..dist_backend.session import current_session

    session = current_session()
    if session is None:
        return {"running": False}
    alive = session.alive()
    return {
        "running": alive,
        "strategy": session.config.strategy,
        "ranks": session.config.world_size,
        "device": session.config.device.value,
        "starts": session.starts,
        "pids": session.sidecar_pids() if alive else [],
        "seconds": dict(session.timings.stages),
        "last_run": dict(session.last_run),  # cfg degree, compile, cache and forwards skipped by the last denoise
        "loras": [{"file": os.path.basename(spec.path), "strength": spec.strength} for spec in session.loras],
    }
