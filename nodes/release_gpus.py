"""ReleaseGPUs: stop the rank sidecar and free every GPU it holds (ComfyUI has no hook for packs to do this)."""

from __future__ import annotations

from .common import CATEGORY


class ReleaseGPUs:
    DESCRIPTION = ("Stops the DistDiff rank processes and frees their GPUs. The next LoadSharded run starts them "
                   "again. Also available as POST /distdiff/release.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "release"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "after": ("*", {"tooltip": "Optional: connect any output to release only after that node ran."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run when queued

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None):
        # `after` takes any type ("*"): asking for input_types makes ComfyUI skip its type check of the link
        # (modern ComfyUI), so any output can be wired in.
        return True

    def release(self, after=None):
        from ..dist_backend.session import shutdown_all

        shutdown_all()  # runs on ComfyUI's prompt thread, like every node: no DistDiff call is running now
        return {}
