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
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Used by families with true CFG (Qwen-Image, Wan, Flux with true_cfg)."}),
            },
        }

    def encode(self, pipeline, prompt, negative_prompt=""):
        prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
        session = pipeline.session()
        cond = run_cancellable(lambda: session.encode(prompts, negative_prompt.strip() or None,
                                                      should_cancel=comfy_should_cancel()))
        return (cond,)
