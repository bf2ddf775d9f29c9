"""EncodeOnGPUs: prompts -> embeddings, computed on the ranks, returned to ComfyUI (CPU) so it can cache them."""

from __future__ import annotations

from .common import CATEGORY, CONDITIONING, PIPELINE, comfy_should_cancel, run_cancellable


class EncodeOnGPUs:
    DESCRIPTION = ("Encodes prompts with the pipeline's text encoders on the ranks (prompts split over them). "
                   "One prompt per line makes a prompt list; ParallelDenoise makes images for every prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From LoadSharded."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "One prompt per line; empty lines are ignored."}),
            },
            "optional": {
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Kept verbatim; empty = none. Qwen-Image: needed for CFG (guidance > 1); its "
                               "documented ' ' (one space) counts. Wan: used when guidance > 1. Flux: used only "
                               "with true_cfg > 1."}),
            },
        }

    def encode(self, pipeline, prompt, negative_prompt=""):
        prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
        session = pipeline.session()
        # Verbatim, not stripped: " " is Qwen-Image's documented negative prompt; only "" means none.
        cond = run_cancellable(lambda: session.encode(prompts, negative_prompt or None,
                                                      should_cancel=comfy_should_cancel()))
        return (cond,)
