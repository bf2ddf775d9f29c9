"""DecodeVAE: LATENT -> IMAGE ([B, H, W, 3] float32 in 0..1) on the ranks, for SaveImage/PreviewImage."""

from __future__ import annotations

from .common import CATEGORY, PIPELINE, comfy_should_cancel, run_cancellable


class DecodeVAE:
    DESCRIPTION = ("Decodes any LATENT of this model's family (ParallelDenoise's, ComfyUI's VAE Encode's, a loaded one) "
                   "with the pipeline's VAE on the ranks (batch split over them). Video: frames in order. Like "
                   "ComfyUI's VAE Decode it falls back to tiles when a whole decode would not fit the GPU (the "
                   "planner's estimate); Decode VAE (Tiled) chooses the tiles.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From LoadSharded (the pipeline that made the latents)."}),
                "samples": ("LATENT", {"tooltip": "A ComfyUI LATENT for this model (raw VAE space), e.g. from ParallelDenoise or VAE Encode."}),
            },
        }

    def decode(self, pipeline, samples):
        from ..dist_backend.tiled_decode import DecodeTiling, VaeTiling

        return (decode_on_ranks(pipeline, samples, tiling=DecodeTiling(mode=VaeTiling.AUTO)),)


def decode_on_ranks(pipeline, samples, *, tiling):
    """The IMAGE of a LATENT, decoded on the pipeline's ranks with `tiling` (a dist_backend DecodeTiling)."""
    session = pipeline.session()
    return run_cancellable(lambda: session.decode(samples["samples"], tiling=tiling,
                                                  should_cancel=comfy_should_cancel()))
