"""Node registration, done when ComfyUI first reads NODE_CLASS_MAPPINGS (never at import of the pack)."""

from __future__ import annotations

_routes_added = False


def NODE_CLASS_MAPPINGS():
    from .decode_vae import DecodeVAE
    from .decode_vae_tiled import DecodeVAETiled
    from .encode_on_gpus import EncodeOnGPUs
    from .load_files import LoadFiles
    from .load_sharded import LoadSharded
    from .lora import DistDiffLoRA
    from .parallel_denoise import ParallelDenoise
    from .release_gpus import ReleaseGPUs

    _add_routes()
    # The type ids are part of every saved workflow: never rename them.
    return {"LoadSharded": LoadSharded, "EncodeOnGPUs": EncodeOnGPUs, "ParallelDenoise": ParallelDenoise,
            "DecodeVAE": DecodeVAE, "DistDiffReleaseGPUs": ReleaseGPUs, "DistDiffLoRA": DistDiffLoRA,
            "DistDiffLoadFiles": LoadFiles, "DistDiffDecodeVAETiled": DecodeVAETiled}


def NODE_DISPLAY_NAME_MAPPINGS():
    return {"LoadSharded": "Load Sharded (DistDiff)", "EncodeOnGPUs": "Encode on GPUs (DistDiff)",
            "ParallelDenoise": "Parallel Denoise (DistDiff)", "DecodeVAE": "Decode VAE (DistDiff)",
            "DistDiffReleaseGPUs": "Release GPUs (DistDiff)", "DistDiffLoRA": "LoRA (DistDiff)",
            "DistDiffLoadFiles": "Load Sharded from Files (DistDiff)",
            "DistDiffDecodeVAETiled": "Decode VAE (Tiled) (DistDiff)"}


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

    from .status import add_status_events, status_payload

    routes = PromptServer.instance.routes
    add_status_events()  # the live "distdiff.status" events of the panel

    @routes.post("/distdiff/release")
    async def release(request):
        from ..dist_backend.session import shutdown_all

        _off_the_loop(shutdown_all)
        # Under way: a running call stops at its next step boundary, then the ranks are stopped (seconds at most);
        # GET /distdiff/status shows the sidecar gone.
        return web.json_response({"releasing": True})

    @routes.post("/distdiff/restart")
    async def restart(request):
        from ..dist_backend.session import current_session

        session = current_session()
        if session is None:
            return web.json_response({"restarting": False, "reason": "no sidecar to restart"})
        _off_the_loop(session.restart)
        return web.json_response({"restarting": True})

    @routes.get("/distdiff/status")
    async def status(request):
        return web.json_response(status_payload())

    _routes_added = True


def _off_the_loop(fn) -> None:
    """Start `fn` on a thread of its own and return at once. The release and restart routes answer before the work
    is done: ComfyUI's event loop (its web server, the Cancel button, the websocket) must never wait for ranks. Not
    even an awaited, bounded wait: measured on the 2024 host, a route that awaited the release for at most 0.5 s
    answered after 1.5-1.9 s (while GET /distdiff/status answered in 2 ms just before), as the stopped prompt's
    error handling on ComfyUI's prompt thread competed for the GIL."""
    import logging
    import threading

    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a route has no caller to raise to; the status shows the sidecar state
            logging.getLogger(__name__).exception("DistDiff: %s failed", getattr(fn, "__name__", fn))

    threading.Thread(target=run, name=f"distdiff-{getattr(fn, '__name__', 'route')}", daemon=True).start()
