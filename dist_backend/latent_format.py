"""The LATENT format boundary: the ONE place where latents cross between diffusers' space and ComfyUI's.

ComfyUI's LATENT `samples` are in the VAE's *raw* space (what its VAE Encode returns and VAE Decode takes); its
samplers apply `latent_format.process_in` before the model and `process_out` after (`comfy/latent_formats.py`).
diffusers' `output_type="latent"` and the `image=` latents of its img2img pipelines are the *normalised* space
instead. The engine's adapters work in diffusers' space; everything that crosses to the user (Session.denoise's
result, Session.decode's input, an img2img init latent) is in ComfyUI's. The pair of functions per family is
`LatentFormat.process_in(raw) -> normalised` and `process_out(normalised) -> raw`, with numbers read from the
model folder's VAE config, so it needs no weights and runs on the host:

* Flux (AutoencoderKL): `scaling_factor`, `shift_factor`: normalised = (raw − shift) × scale (ComfyUI's `Flux`).
* Qwen-Image and Wan (Wan 2.1 VAE): per-channel `latents_mean` / `latents_std`: normalised = (raw − mean) / std
  (ComfyUI's `Wan21`, which ComfyUI also uses for Qwen-Image).

The arithmetic is written exactly as the diffusers pipelines write it (`z / scale + shift`; `z / (1 / std) +
mean`), so decoding our own latents gives bit-identical float32 images to the plain pipeline; ComfyUI writes the
same maps with other rounding (`z * std + mean`), equal to float32 precision (tests/unit/test_latent_format.py).

Layout (checked on ComfyUI 0.33's own nodes, see the test): Flux `[B, 16, H/8, W/8]`; Qwen-Image `[B, 16, 1, H/8,
W/8]` (its sampler and VAE Encode give 5-D: ComfyUI's Qwen-Image uses the 3-D Wan 2.1 latent format; the 4-D
`[B, 16, H/8, W/8]` of Empty SD3 Latent Image is accepted and gets the frame axis, as ComfyUI's sampler does);
Wan `[B, 16, F', H/8, W/8]` with F' = (frames − 1) / 4 + 1. These are also diffusers' own unpacked layouts, so
the layout mapping is the identity apart from that accepted 4-D form (and a 5-D single-frame latent for Flux, which
ComfyUI's VAE Decode also accepts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError, ModelError


@dataclass(frozen=True, kw_only=True)
class LatentFormat:
    """One family's LATENT convention, from its VAE config."""

    family: str
    """"flux" | "qwenimage" | "wan"."""
    channels: int
    """Latent channels of the VAE."""
    video: bool
    """True when the LATENT has a frame axis: [B, C, F', h, w] (Qwen-Image: F' = 1 always)."""
    spatial: int
    """Pixels per latent cell along height and width."""
    temporal: int
    """Frames per latent frame after the first (Wan: 4; 1 for still-image families)."""
    scale: float | None = None
    """Flux: the VAE's scaling_factor (None for per-channel families)."""
    shift: float | None = None
    """Flux: the VAE's shift_factor."""
    mean: tuple[float, ...] | None = None
    """Qwen-Image / Wan: the VAE's latents_mean, one per channel."""
    std: tuple[float, ...] | None = None
    """Qwen-Image / Wan: the VAE's latents_std, one per channel."""

    # -- the pair ------------------------------------------------------------------------------------------------
    def process_in(self, raw: torch.Tensor) -> torch.Tensor:
        """ComfyUI's raw VAE space -> diffusers' normalised space (what the transformer denoises)."""
        if self.scale is not None:
            return (raw - self.shift) * self.scale  # FluxImg2ImgPipeline._encode_vae_image
        mean, inv_std = self._stats(raw)
        return (raw - mean) * inv_std  # QwenImageImg2ImgPipeline._encode_vae_image

    def process_out(self, normalised: torch.Tensor) -> torch.Tensor:
        """diffusers' normalised space -> ComfyUI's raw VAE space (what VAE Decode takes)."""
        if self.scale is not None:
            return (normalised / self.scale) + self.shift  # FluxPipeline.__call__ before vae.decode
        mean, inv_std = self._stats(normalised)
        return normalised / inv_std + mean  # QwenImagePipeline / WanPipeline.__call__ before vae.decode

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Built as diffusers builds them (float32 tensors of the config lists, 1 / std taken in float32), so the
        # rounding is the pipeline's own.
        view = (1, self.channels, 1, 1, 1)[: like.dim()]
        mean = torch.tensor(self.mean).view(view).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.std).view(view).to(like.device, like.dtype)
        return mean, inv_std

    # -- the layout ----------------------------------------------------------------------------------------------
    def to_layout(self, samples: object, *, what: str = "latent", sampling: bool = False) -> torch.Tensor:
        """Any LATENT `samples` ComfyUI itself accepts for this family -> this family's layout (a float32 CPU
        copy): Flux [B, C, h, w]; Qwen-Image [B, C, 1, h, w]; Wan [B, C, F', h, w]. ConfigError otherwise.
        `sampling`: the latent goes to a sampler, which (as in ComfyUI) takes an empty one with any channel count."""
        if not isinstance(samples, torch.Tensor):
            raise ConfigError(f"{what} must be a tensor (a ComfyUI LATENT's 'samples'), got {type(samples).__name__}")
        shape = tuple(samples.shape)
        if sampling and samples.dim() >= 2 and samples.shape[1] != self.channels and not bool(samples.any()):
            # An empty latent carries only a size: ComfyUI's sampler gives it the model's channel count
            # (comfy.sample.fix_empty_latent_channels), so Empty Latent Image's 4 channels work for any model.
            samples = samples.new_zeros((samples.shape[0], self.channels, *samples.shape[2:]))
        if samples.dim() == 5 and not self.video and shape[2] == 1:
            samples = samples[:, :, 0]  # a single-frame 5-D latent; ComfyUI's VAE Decode takes it the same way
        elif samples.dim() == 4 and self.video and self.family == "qwenimage":
            samples = samples.unsqueeze(2)  # Empty SD3 Latent Image's 4-D form; ComfyUI's sampler does the same
        wanted = self.describe()
        if samples.dim() != (5 if self.video else 4) or samples.shape[0] < 1 or samples.shape[1] != self.channels:
            raise ConfigError(f"{what} has shape {list(shape)}, but a {self.family} LATENT is {wanted} with B ≥ 1 "
                              f"(C = {self.channels} channels of this model's VAE)")
        if self.family == "qwenimage" and samples.shape[2] != 1:
            raise ConfigError(
                f"{what} has shape {list(shape)}: {samples.shape[2]} latent frames, but Qwen-Image makes still "
                "images ([B, C, 1, h, w]). ComfyUI's VAE Encode turns a batch of images into one video for this "
                "VAE: encode each image on its own and join them with Latent Batch")
        if any(n < 1 for n in samples.shape):
            raise ConfigError(f"{what} has shape {list(shape)} with an empty axis; it holds no latent")
        return samples.detach().to("cpu", torch.float32).contiguous()

    def describe(self) -> str:
        if self.family == "qwenimage":
            return f"[B, {self.channels}, 1, H/{self.spatial}, W/{self.spatial}]"
        if self.video:
            return f"[B, {self.channels}, F', H/{self.spatial}, W/{self.spatial}]"
        return f"[B, {self.channels}, H/{self.spatial}, W/{self.spatial}]"

    def pixel_size(self, latent: torch.Tensor) -> dict[str, int]:
        """height, width and num_frames of the images a latent in this layout decodes to."""
        height, width = latent.shape[-2] * self.spatial, latent.shape[-1] * self.spatial
        frames = (latent.shape[2] - 1) * self.temporal + 1 if self.family == "wan" else 1
        return {"height": int(height), "width": int(width), "num_frames": int(frames)}


def latent_format(info: dict) -> LatentFormat:
    """The LATENT format of the model described by `pipelines.read_model_config(...)` (json configs only)."""
    family = str(info["family"])
    vae = info.get("components", {}).get("vae")
    if not vae:
        raise ModelError(f"model folder {info.get('model_dir', '?')!r} has no vae component; its LATENT format "
                         "comes from the VAE's config.json")
    try:
        if family == "flux":
            return LatentFormat(family=family, channels=int(vae["latent_channels"]), video=False,
                                spatial=2 ** (len(vae["block_out_channels"]) - 1), temporal=1,
                                scale=float(vae["scaling_factor"]), shift=float(vae.get("shift_factor") or 0.0))
        channels = int(vae["z_dim"])
        mean, std = tuple(float(v) for v in vae["latents_mean"]), tuple(float(v) for v in vae["latents_std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the vae config of {info.get('model_dir', '?')!r} lacks {exc} (needed for the LATENT "
                         "format); download the model again") from None
    if len(mean) != channels or len(std) != channels:
        raise ModelError(f"the vae config of {info.get('model_dir', '?')!r} has {len(mean)} latents_mean and "
                         f"{len(std)} latents_std values for z_dim {channels}; download the model again")
    spatial = int(vae.get("scale_factor_spatial") or 2 ** len(vae["temperal_downsample"]))
    temporal = int(vae.get("scale_factor_temporal") or 2 ** sum(bool(t) for t in vae["temperal_downsample"]))
    return LatentFormat(family=family, channels=channels, video=True, spatial=spatial,
                        temporal=temporal if family == "wan" else 1, mean=mean, std=std)


def pair_with_images(latent: torch.Tensor, *, prompts: int, images_per_prompt: int) -> list[torch.Tensor]:
    """One latent per image (prompt-major), the way ComfyUI's KSampler pairs a LATENT batch with its conditioning:
    the latent batch IS the batch. A 1-image latent is used for every image; a batch of exactly prompts ×
    images_per_prompt latents gives image j latent j; anything else is refused (ComfyUI would silently repeat)."""
    images = prompts * images_per_prompt
    count = latent.shape[0]
    if count not in (1, images):
        raise ConfigError(
            f"the latent batch has {count} images, but prompts × images_per_prompt = {prompts} × {images_per_prompt} "
            f"= {images}: give one latent (used for every image) or exactly {images} (image j gets latent j), "
            "or set images_per_prompt so that the counts match")
    return [latent[(j if count == images else 0):][:1] for j in range(images)]
