"""DecodeVAETiled: LATENT -> IMAGE in tiles, like ComfyUI's own "VAE Decode (Tiled)" next to "VAE Decode"."""

from __future__ import annotations

from .common import CATEGORY, PIPELINE
from .decode_vae import decode_on_ranks


class DecodeVAETiled:
    DESCRIPTION = ("Decodes a LATENT in overlapping tiles with diffusers' tiled VAE decode, for outputs whose whole "
                   "decode does not fit a GPU. With fewer images than ranks, one image's tiles are decoded by all "
                   "ranks of its group at once. Tiles change the pixels slightly (seams are blended), like ComfyUI's "
                   "VAE Decode (Tiled); video frames are never split (Wan's VAE is causal in time).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From LoadSharded (the pipeline that made the latents)."}),
                "samples": ("LATENT", {"tooltip": "A ComfyUI LATENT for this model (raw VAE space)."}),
                "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32,
                                      "tooltip": "Pixels per side of a tile."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32,
                                    "tooltip": "Pixels neighbouring tiles share and blend over (less than half a "
                                               "tile; 0 = the VAE's default)."}),
            },
        }

    def decode(self, pipeline, samples, tile_size, overlap):
        from ..dist_backend.tiled_decode import DecodeTiling, VaeTiling

        tiling = DecodeTiling(mode=VaeTiling.ON, tile_size=tile_size, overlap=overlap)  # refused here if invalid
        return (decode_on_ranks(pipeline, samples, tiling=tiling),)
