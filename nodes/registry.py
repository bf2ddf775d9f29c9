"""Node registration, done when ComfyUI first reads NODE_CLASS_MAPPINGS (never at import of the pack)."""

from __future__ import annotations

_routes_added = False


def NODE_CLASS_MAPPINGS():
    from .decode_vae import DecodeVAE
    from .encode_on_gpus import EncodeOnGPUs
    from .load_sharded import LoadSharded
    from .parallel_denoise import ParallelDenoise
    from .release_gpus import ReleaseGPUs

    _add_routes()
    # The type ids are part of every saved workflow: never rename them.
    return {"LoadSharded": LoadSharded, "EncodeOnGPUs": EncodeOnGPUs, "ParallelDenoise": ParallelDenoise,
            "DecodeVAE": DecodeVAE, "DistDiffReleaseGPUs": ReleaseGPUs}


def NODE_DISPLAY_NAME_MAPPINGS():
    return {"LoadSharded": "Load Sharded (DistDiff)", "EncodeOnGPUs": "Encode on GPUs (DistDiff)",
            "ParallelDenoise": "Parallel Denoise (DistDiff)", "DecodeVAE": "Decode VAE (DistDiff)",
            "DistDiffReleaseGPUs": "Release GPUs (DistDiff)"}


# How long the release / restart routes wait for the work they started before answering: the work runs on a worker
# thread (a running call stops at its next step boundary, ranks are stopped; a restart also reloads the model), and
# ComfyUI's event loop (its web server, the Cancel button, the websocket) must never wait for ranks.
_ROUTE_WAIT_S = 0.5


def _add_routes() -> None:
    """POST /distdiff/release, POST /distdiff/restart and GET /distdiff/status on ComfyUI's server (when one runs)."""
    global _routes_added
    if _routes_added:
        return
    try:
        from server import PromptServer
    except ImportError:  # not inside ComfyUI (e.g. a test importing the nodes)
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    from aiohttp import web

    from .status import status_payload

    routes = PromptServer.instance.routes

    @routes.post("/distdiff/release")
    async def release(request):
        from ..dist_backend.session import shutdown_all

        done = await _off_the_loop(shutdown_all)
        # released: every rank is already stopped; otherwise it is under way (GET /distdiff/status tells).
        return web.json_response({"released": done})

    @routes.post("/distdiff/restart")
    async def restart(request):
        from ..dist_backend.session import current_session

        session = current_session()
        if session is None:
            return web.json_response({"restarted": False, "reason": "no sidecar to restart"})
        done = await _off_the_loop(session.restart)
        return web.json_response({"restarted": done})

    @routes.get("/distdiff/status")
    async def status(request):
        return web.json_response(status_payload())

    _routes_added = True


async def _off_the_loop(fn) -> bool:
    """Run `fn` on a worker thread; True when it finished within _ROUTE_WAIT_S (it goes on either way)."""
    import asyncio
    import logging

    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a route has no caller to raise to; the status shows the sidecar state
            logging.getLogger(__name__).exception("DistDiff: %s failed", getattr(fn, "__name__", fn))

    future = asyncio.get_running_loop().run_in_executor(None, run)
    try:
        await asyncio.wait_for(asyncio.shield(future), _ROUTE_WAIT_S)
        return True
    except asyncio.TimeoutError:
        return False
