"""Qwen-Image (QwenImagePipeline): a Qwen2.5-VL text encoder, a packed-latent MMDiT, a causal-3D VAE.

Guidance mapping: `ImageRequest.guidance` -> `true_cfg_scale` (real classifier-free guidance, with the
pipeline's norm rescale). As in diffusers, CFG runs only when guidance > 1 AND a negative prompt is given;
without a negative prompt the pipeline runs a single unguided pass (and logs a warning if guidance > 1).
Qwen-Image's examples use negative_prompt=" " to get CFG with an "empty" negative.

Conditioning keys: "prompt_embeds" [1, T, D] and "prompt_embeds_mask" [1, T] (long), plus
"negative_prompt_embeds" / "negative_prompt_embeds_mask" [1, T', ...] whenever a negative prompt is given.
T is the prompt's own token count (the template's 34-token prefix is dropped, its 5-token suffix kept), so
it varies with the prompt and is often odd; T' differs from T.

Mask behaviour (diffusers 0.42.1): for one prompt the mask is all ones and `encode_prompt` turns it into None,
so the transformer gets NO attention mask; we keep the all-ones mask in the dict so the keys are stable, and the
pipeline drops it again. A padding mask only appears for batched prompts of different lengths, which the
adapter never builds; `uses_attention_mask` reports it if such embeddings are passed in.

Latents: the pipeline draws [1, 1, C, h, w] (a frame axis of 1) and packs 2x2 into tokens; we hand out its
unpacked [1, C, 1, h, w] (normalised; ComfyUI's Qwen-Image LATENT has the same layout). img2img (denoise < 1)
runs QwenImageImg2ImgPipeline on the same modules with image=the normalised init latent, strength=denoise.
"""

from __future__ import annotations

import torch

from . import PIPELINE_CLASSES, Family
from ._common import (
    PackedImageAdapter, component_config, cpu_generator, img2img_pipeline, to_cpu,
    to_device,
)
from .base import ImageRequest, StepCallback

# QwenImagePipeline.__call__'s max_sequence_length default: the text embeddings are cut to this length.
_MAX_SEQUENCE_LENGTH = 512
_MASK_KEYS = ("prompt_embeds_mask", "negative_prompt_embeds_mask")


class QwenImageAdapter(PackedImageAdapter):
    name = "qwenimage"
    pipeline_class_names = PIPELINE_CLASSES[Family.QWENIMAGE]
    is_video = False
    text_components = ("text_encoder",)
    denoise_components = ("transformer",)
    decode_components = ("vae",)

    # -- text ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pipe, *, prompt: str, negative_prompt: str | None, device: torch.device) -> dict[str, torch.Tensor]:
        cond = dict(zip(("prompt_embeds", "prompt_embeds_mask"), self._encode_one(pipe, prompt, device)))
        if negative_prompt is not None:
            # Encoded whenever given: whether CFG runs depends on the guidance, which is per request.
            neg = self._encode_one(pipe, negative_prompt, device)
            cond.update(negative_prompt_embeds=neg[0], negative_prompt_embeds_mask=neg[1])
        return to_cpu(cond)

    @staticmethod
    def _encode_one(pipe, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                          max_sequence_length=_MAX_SEQUENCE_LENGTH)
        if mask is None:  # all tokens valid: the pipeline dropped the mask; restore it so the keys are stable
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    # -- denoise ------------------------------------------------------------------------------------------
    def initial_noise(self, pipe, *, request: ImageRequest, dtype: torch.dtype) -> torch.Tensor:
        """The packed noise [1, h/2*w/2, 4C] the pipeline would draw for `request.seed`, on CPU (see flux.py)."""
        channels = pipe.transformer.config.in_channels // 4
        return pipe.prepare_latents(1, channels, request.height, request.width, dtype, torch.device("cpu"),
                                    cpu_generator(request))

    @torch.no_grad()
    def denoise(self, pipe, *, cond: dict[str, torch.Tensor], request: ImageRequest, device: torch.device,
                on_step: StepCallback | None = None, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        dtype = pipe.transformer.dtype
        c = to_device(cond, device=device, dtype=dtype, keep_dtype=_MASK_KEYS)
        common = dict(
            prompt_embeds=c["prompt_embeds"], prompt_embeds_mask=c["prompt_embeds_mask"],
            negative_prompt_embeds=c.get("negative_prompt_embeds"),
            negative_prompt_embeds_mask=c.get("negative_prompt_embeds_mask"),
            true_cfg_scale=request.guidance, height=request.height, width=request.width,
            num_inference_steps=request.steps, output_type="latent", return_dict=False,
        )

        def to_preview(x: torch.Tensor) -> torch.Tensor:
            # ComfyUI treats Qwen-Image latents as one-frame video ([B, C, 1, h, w], the Wan 2.1 format).
            return pipe._unpack_latents(x, request.height, request.width, pipe.vae_scale_factor)

        packed = self.run_packed(pipe, request=request, device=device, dtype=dtype,
                                 init_image=None if init_latents is None else self._image_arg(init_latents),
                                 on_step=on_step, to_preview=to_preview, **common)
        return self._unpack(pipe, packed, request)

    def reference(self, pipe, *, prompt: str, negative_prompt: str | None, request: ImageRequest,
                  init_latents: torch.Tensor | None = None) -> torch.Tensor:
        common = dict(
            prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=request.guidance,
            height=request.height, width=request.width, num_inference_steps=request.steps,
            generator=cpu_generator(request), output_type="latent", return_dict=False,
        )
        if request.denoise < 1.0:
            from diffusers import QwenImageImg2ImgPipeline

            img2img = QwenImageImg2ImgPipeline.from_pipe(pipe)
            packed = img2img(image=self._image_arg(init_latents), strength=request.denoise, **common)[0]
        else:
            packed = pipe(**common)[0]
        return self._unpack(pipe, packed, request)

    @staticmethod
    def _image_arg(init_latents: torch.Tensor) -> torch.Tensor:
        # diffusers' image processor passes latents through only as a 4-D [B, C, h, w] tensor; the pipeline adds
        # the frame axis back itself.
        return init_latents[:, :, 0]

    @staticmethod
    def _img2img(pipe):
        from diffusers import QwenImageImg2ImgPipeline

        return img2img_pipeline(pipe, QwenImageImg2ImgPipeline,
                                latent_channels=pipe.transformer.config.in_channels // 4)

    @staticmethod
    def _unpack(pipe, packed: torch.Tensor, request: ImageRequest) -> torch.Tensor:
        # [1, C, 1, h, w]: the pipeline's own unpacked layout, which is also ComfyUI's Qwen-Image LATENT layout.
        return pipe._unpack_latents(packed, request.height, request.width, pipe.vae_scale_factor).float().cpu()

    # -- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pipe, *, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        # QwenImagePipeline.__call__ after its loop, from the raw VAE space (latent_format.process_out done).
        vae = pipe.vae
        return self.to_images(pipe, vae.decode(latents.to(device=device, dtype=vae.dtype), return_dict=False)[0])

    def to_images(self, pipe, decoded: torch.Tensor) -> torch.Tensor:
        image = pipe.image_processor.postprocess(decoded[:, :, 0], output_type="pt")
        return image.permute(0, 2, 3, 1).float().cpu()

    # -- planning (json configs only) ---------------------------------------------------------------------
    @staticmethod
    def vae_scale(pipe_config: dict) -> int:
        return 2 ** len(component_config(pipe_config, "vae")["temperal_downsample"])

    def sequence_lengths(self, pipe_config: dict, cond: dict[str, torch.Tensor], *, height: int, width: int,
                         num_frames: int) -> dict[str, int]:
        # _cp_plan splits hidden_states (image tokens) and encoder_hidden_states / its mask (text tokens). The
        # negative prompt is a separate transformer call with its own text length, so it must divide too.
        lengths = {"image": self.image_tokens(pipe_config, height=height, width=width),
                   "text": int(cond["prompt_embeds"].shape[1])}
        if "negative_prompt_embeds" in cond:
            lengths["negative_text"] = int(cond["negative_prompt_embeds"].shape[1])
        return lengths

    def cfg_off_reason(self, cond: dict[str, torch.Tensor], request: ImageRequest) -> str | None:
        # QwenImagePipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt is given.
        if request.guidance <= 1.0:
            return f"guidance {request.guidance} ≤ 1 turns Qwen-Image's true CFG off; set guidance > 1"
        if "negative_prompt_embeds" not in cond:
            return ("Qwen-Image runs CFG only with a negative prompt; give one (\" \" works as an empty negative) "
                    "when encoding")
        return None

    def uses_attention_mask(self, cond: dict[str, torch.Tensor]) -> bool:
        # The pipeline passes a mask to the transformer only when it has a zero (see module docstring).
        return any(k in cond and not bool(cond[k].bool().all()) for k in _MASK_KEYS)
