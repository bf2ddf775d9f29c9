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


def _add_routes() -> None:
    """POST /distdiff/release and GET /distdiff/status on ComfyUI's server (when one is running)."""
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

    from .status import add_panel_routes, status_payload

    routes = PromptServer.instance.routes
    add_panel_routes(routes)  # POST /distdiff/restart, and the live "distdiff.status" events

    @routes.post("/distdiff/release")
    async def release(request):
        from ..dist_backend.session import shutdown_all

        shutdown_all()
        return web.json_response({"released": True})

    @routes.get("/distdiff/status")
    async def status(request):
        return web.json_response(status_payload())

    _routes_added = True
