"""ParallelDenoise: embeddings -> ComfyUI LATENT, on all ranks, with per-step progress and Cancel."""

from __future__ import annotations

from .common import CATEGORY, CONDITIONING, PIPELINE, comfy_should_cancel, run_cancellable
from .progress import ComfyProgress

# guidance_2's "unset" value: a FLOAT input needs a number; below 0 means "the same as guidance".
SAME_AS_GUIDANCE = -1.0


class ParallelDenoise:
    DESCRIPTION = ("Denoises images × prompts on the ranks: data parallel splits images between groups, context "
                   "parallel splits each image's tokens. Image j (prompt-major) uses seed + j, so results equal the "
                   "plain diffusers pipeline with that seed. Output is ComfyUI's own LATENT (the VAE's raw space, the "
                   "layout ComfyUI's VAE Decode takes for this model). Connect a latent for image-to-image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "denoise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From LoadSharded."}),
                "conditioning": (CONDITIONING, {"tooltip": "From EncodeOnGPUs (same pipeline)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Image j (prompt-major) uses seed + j with torch.Generator('cpu')."}),
                "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images for each prompt."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 1000, "tooltip": "Denoise steps."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Flux: embedded (distilled) guidance, no negative prompt needed; "
                                                  "Qwen-Image: true CFG scale (> 1 with a negative prompt, e.g. ' '); "
                                                  "Wan: CFG scale (> 1 uses the negative prompt, or '')."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Width in pixels."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Height in pixels."}),
            },
            "optional": {
                "num_frames": ("INT", {"default": 1, "min": 1, "max": 1025, "step": 4,
                                       "tooltip": "Video families (Wan): frames, 4k+1. Ignored (must be 1) for images."}),
                "latent": ("LATENT", {"tooltip": (
                    "Optional start latent (Empty SD3 Latent Image, Empty Hunyuan Latent Video, VAE Encode, …). "
                    "When connected, its size wins over width, height and num_frames. As in KSampler, the latent "
                    "batch is the image batch: a 1-image latent is used for every image, or give exactly prompts × "
                    "images_per_prompt latents (image j gets latent j); other counts are refused.")}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "1.0: start from noise (the latent only sets the size). Below 1: image-to-image from the "
                    "latent, equal to diffusers' img2img pipeline with strength = denoise: of `steps`, the first "
                    "int(steps − steps × denoise) are skipped. Flux and Qwen-Image; Wan needs 1.0.")}),
                "true_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Flux only: true CFG scale; > 1 needs a negative prompt and runs the "
                                                  "transformer twice per step. 1 = off. Other families: leave at 1."}),
                "guidance_2": ("FLOAT", {"default": SAME_AS_GUIDANCE, "min": SAME_AS_GUIDANCE, "max": 100.0,
                                         "step": 0.1,
                                         "tooltip": "Wan 2.2 A14B only: CFG scale of the low-noise expert "
                                                    "(transformer_2). -1 = same as guidance."}),
            },
        }

    def denoise(self, pipeline, conditioning, seed, images_per_prompt, steps, guidance, width, height, num_frames=1,
                latent=None, denoise=1.0, true_cfg=1.0, guidance_2=SAME_AS_GUIDANCE):
        checked = self._check_plan(pipeline, conditioning, images_per_prompt=images_per_prompt, steps=steps,
                                   guidance=guidance, width=width, height=height, num_frames=num_frames,
                                   latent=latent, true_cfg=true_cfg)
        session = pipeline.session()
        if checked is not None:
            session.status.set_plan(checked.summary())
        # A hint: the engine reports the real total (img2img runs fewer steps).
        progress = ComfyProgress(len(conditioning.prompts) * images_per_prompt * steps, family=pipeline.family)
        latents = run_cancellable(lambda: session.denoise(
            conditioning, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
            images_per_prompt=images_per_prompt, num_frames=num_frames,
            latent=None if latent is None else latent["samples"], denoise=denoise, true_cfg_scale=true_cfg,
            guidance_2=None if guidance_2 < 0 else guidance_2, on_progress=progress.update,
            on_preview=progress.preview if progress.previews else None, should_cancel=comfy_should_cancel()))
        return ({"samples": latents},)

    @staticmethod
    def _check_plan(pipeline, conditioning, *, images_per_prompt, steps, guidance, width, height, num_frames, latent,
                    true_cfg):
        """strategy auto: refuse a request the loaded layout cannot run or fit (before any rank works on it); both
        strategies: the LoaderPlan with what the planner says about this request (for the log and the panel)."""
        from ..dist_backend.errors import ConfigError
        from ..dist_backend.planning.auto import call_request, check_request

        loaded = pipeline.plan
        if loaded is None or loaded.facts is None or not conditioning.prompts:
            return None  # no plan, a manual layout whose model the planner could not read, or no prompt
        try:
            request = call_request(loaded.facts, height=height, width=width, num_frames=num_frames,
                                   images=len(conditioning.prompts) * images_per_prompt, guidance=guidance,
                                   negative_prompt=conditioning.negative_prompt, true_cfg=true_cfg, steps=steps,
                                   latent_shape=None if latent is None else tuple(latent["samples"].shape))
        except ConfigError:
            return None  # bad input: the engine's own checks refuse it, in their words
        return check_request(loaded, request)
