"""Wan 2.x text-to-video (WanPipeline): a UMT5 text encoder, a 3D-patch DiT, a causal-3D VAE.

Guidance mapping: `ImageRequest.guidance` -> `guidance_scale`, classic CFG: when > 1 every step runs the
transformer twice, once with the negative prompt ("" when none is given, as diffusers does).

Wan 2.2 A14B has two experts: `transformer` denoises the high-noise steps (timestep >= boundary_ratio × 1000) and
`transformer_2` the rest, the switch made by WanPipeline itself from model_index.json's `boundary_ratio`. Both are
denoise components (loaded, staged and put under context parallel together); `ImageRequest.guidance_2` ->
`guidance_scale_2`, the low-noise expert's CFG scale (None: the same as `guidance`, diffusers' default). Wan 2.1
folders list `transformer_2` as null, so it is simply absent there.

Conditioning keys: always "prompt_embeds" and "negative_prompt_embeds" [1, L, D], padded to L (512 for the
real models). The negative is always encoded because `encode` does not know the guidance; it costs one extra
text-encoder pass and is unused when guidance <= 1.

Latents: [1, C, F', h, w] with F' = (num_frames - 1) / 4 + 1, drawn in float32 like the pipeline does
(normalised; ComfyUI's Wan LATENT has the same layout in the raw space, see latent_format.py).
Context parallelism: the transformer's `_cp_plan` splits only the video tokens (hidden_states after patch
embedding, the rotary embeddings, and the per-token timestep of Wan 2.2 TI2V); the text is not split.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from . import PIPELINE_CLASSES, Family
from ._common import (
    check_multiple, component_config, cpu_generator, nearest_multiple, step_callback, text_length_cap, to_cpu,
)
from .base import FamilyAdapter, ImageRequest, StepCallback

# WanPipeline.__call__'s max_sequence_length default.
_UMT5_DEFAULT_LENGTH = 512
# WanPipeline.check_inputs refuses sizes that are not multiples of 16, whatever the VAE.
_PIPELINE_MULTIPLE = 16


class WanAdapter(FamilyAdapter):
    name = "wan"
    pipeline_class_names = PIPELINE_CLASSES[Family.WAN]
    is_video = True
    text_components = ("text_encoder",)
    # Only weight-bearing components are listed (tokenizers and the scheduler are always loaded). The engine keeps
    # only those the folder has (read_model_config's "models"): Wan 2.1 lists transformer_2 as null.
    denoise_components = ("transformer", "transformer_2")
    decode_components = ("vae",)

    # -- text ---------------------------------------------------------------------------------------------
    def max_sequence_length(self, pipe) -> int:
        """UMT5 length the text is padded to (512 for the real models; 32 for the tiny test pipeline)."""
        return text_length_cap(getattr(pipe, "tokenizer", None), pipeline_default=_UMT5_DEFAULT_LENGTH)

    @torch.no_grad()
    def encode(self, pipe, *, prompt: str, negative_prompt: str | None, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, negative = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=True,
            num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length(pipe), device=device,
        )
        return to_cpu({"prompt_embeds": embeds, "negative_prompt_embeds": negative})

    # -- denoise ------------------------------------------------------------------------------------------
    @staticmethod
    def _transformer(pipe):
        return pipe.transformer if pipe.transformer is not None else pipe.transformer_2

    def initial_noise(self, pipe, *, request: ImageRequest) -> torch.Tensor:
        """The noise [1, C, F', h, w] the pipeline would draw for `request.seed` (float32, CPU generator), on CPU."""
        channels = self._transformer(pipe).config.in_channels
        return pipe.prepare_latents(1, channels, request.height, request.width, request.num_frames, torch.float32,
                                    torch.device("cpu"), cpu_generator(request))

    @torch.no_grad()
    def denoise(self, pipe, *, cond: dict[str, torch.Tensor], request: ImageRequest, device: torch.device,
                on_step: StepCallback | None = None, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        self.check_denoise(request.denoise)
        # The pipeline casts the embeddings to the transformer dtype itself; keep latents float32 like it does.
        latents = self.initial_noise(pipe, request=request).to(device)
        video = pipe(
            prompt_embeds=cond["prompt_embeds"].to(device),
            negative_prompt_embeds=cond["negative_prompt_embeds"].to(device),
            guidance_scale=request.guidance, **self._guidance_2(pipe, request), height=request.height,
            width=request.width, num_frames=request.num_frames, num_inference_steps=request.steps, latents=latents,
            output_type="latent", return_dict=False,
            callback_on_step_end=step_callback(on_step, request.steps, start=latents,
                                               to_preview=lambda x: x[:, :, :1]),  # previewers show frame 0 only
        )[0]
        return video.float().cpu()

    def reference(self, pipe, *, prompt: str, negative_prompt: str | None, request: ImageRequest,
                  init_latents: torch.Tensor | None = None) -> torch.Tensor:
        self.check_denoise(request.denoise)
        video = pipe(
            prompt=prompt, negative_prompt=negative_prompt, guidance_scale=request.guidance,
            **self._guidance_2(pipe, request), height=request.height, width=request.width,
            num_frames=request.num_frames, num_inference_steps=request.steps, generator=cpu_generator(request),
            max_sequence_length=self.max_sequence_length(pipe), output_type="latent", return_dict=False,
        )[0]
        return video.float().cpu()

    def cfg_off_reason(self, cond: dict[str, torch.Tensor], request: ImageRequest) -> str | None:
        # WanPipeline: do_classifier_free_guidance = guidance_scale > 1 (the negative is always encoded, "" if none).
        if request.guidance <= 1.0:
            return f"guidance {request.guidance} ≤ 1 turns Wan's CFG off; set guidance > 1"
        return None

    @staticmethod
    def _guidance_2(pipe, request: ImageRequest) -> dict:
        """guidance_scale_2 for a two-expert pipeline; nothing otherwise (WanPipeline refuses it without a boundary,
        and Session refuses guidance_2 for such a model before any rank starts)."""
        if pipe.config.boundary_ratio is None:
            return {}
        return {"guidance_scale_2": request.guidance_2}

    # -- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pipe, *, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        # WanPipeline.__call__ after its loop, from the raw VAE space (latent_format.process_out already done).
        vae = pipe.vae
        return self.to_images(pipe, vae.decode(latents.to(device=device, dtype=vae.dtype), return_dict=False)[0])

    def to_images(self, pipe, decoded: torch.Tensor) -> torch.Tensor:
        frames = pipe.video_processor.postprocess_video(decoded, output_type="pt")  # [B, F, 3, H, W]
        b, f, c, h, w = frames.shape
        return frames.permute(0, 1, 3, 4, 2).reshape(b * f, h, w, c).float().cpu()

    @staticmethod
    def check_denoise(denoise: float) -> None:
        """Wan has no image-to-video from a latent here: diffusers' WanVideoToVideoPipeline takes pixel frames and
        VAE-encodes them itself (its `latents=` skips the noising), so there is no latent img2img to be equal to."""
        if denoise < 1.0:
            raise ConfigError(f"denoise {denoise} < 1 (video-to-video) is not supported for Wan: diffusers' "
                              "WanVideoToVideoPipeline starts from pixel frames, not from a LATENT; use denoise 1.0 "
                              "(an empty latent then only sets width, height and frames)")

    # -- planning (json configs only) ---------------------------------------------------------------------
    @staticmethod
    def _geometry(pipe_config: dict) -> tuple[int, int, tuple[int, int, int]]:
        vae = component_config(pipe_config, "vae")
        name = "transformer" if "transformer" in pipe_config["components"] else "transformer_2"
        patch = tuple(component_config(pipe_config, name).get("patch_size", (1, 2, 2)))
        return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4)), patch

    def check_size(self, pipe_config: dict, *, height: int, width: int, num_frames: int) -> None:
        spatial, temporal, patch = self._geometry(pipe_config)
        for name, value, p in (("height", height, patch[1]), ("width", width, patch[2])):
            multiple = math.lcm(spatial * p, _PIPELINE_MULTIPLE)
            check_multiple(name, value, multiple,
                           why=f"VAE scale factor {spatial} x patch {p}, and WanPipeline needs multiples of 16")
        if num_frames < 1 or (num_frames - 1) % temporal:
            nearest = nearest_multiple(num_frames, temporal, offset=1)
            raise ConfigError(f"num_frames {num_frames} must be {temporal}k+1 (the VAE compresses time by "
                              f"{temporal}, keeping the first frame); the nearest valid num_frames is {nearest}")

    def sequence_lengths(self, pipe_config: dict, cond: dict[str, torch.Tensor], *, height: int, width: int,
                         num_frames: int) -> dict[str, int]:
        spatial, temporal, (pt, ph, pw) = self._geometry(pipe_config)
        frames = (num_frames - 1) // temporal + 1
        tokens = (frames // pt) * (height // spatial // ph) * (width // spatial // pw)
        return {"video": tokens}
