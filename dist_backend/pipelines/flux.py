"""FLUX.1 (FluxPipeline): CLIP + T5 text encoders, a packed-latent MMDiT, a 16-channel AutoencoderKL.

Guidance mapping: `ImageRequest.guidance` -> `guidance_scale`, the embedded (distilled) guidance fed to the
transformer; it is ignored by models without guidance embeddings (schnell). True CFG is the separate per-request
`ImageRequest.true_cfg_scale` -> `true_cfg_scale`, default 1.0 = off, because FLUX.1 is guidance-distilled and a
negative prompt would double the cost for no benefit. With a scale > 1 and a negative prompt the pipeline runs
true CFG exactly as diffusers does.

Conditioning keys: "prompt_embeds" [1, T, 4096], "pooled_prompt_embeds" [1, 768], plus
"negative_prompt_embeds" and "negative_pooled_prompt_embeds" whenever a negative prompt was given: whether true
CFG uses them depends on the per-request scale, which `encode` does not know.

Latents: the pipeline works on 2x2-packed tokens [1, h/2*w/2, 4C]; we hand out the unpacked [1, C, h, w]
(normalised; the Session turns it into ComfyUI's raw LATENT with `latent_format`). img2img (denoise < 1) runs
FluxImg2ImgPipeline on the same modules with image=the normalised init latent and strength=denoise.
"""

from __future__ import annotations

import torch

from . import PIPELINE_CLASSES, Family
from ._common import (
    PackedImageAdapter, component_config, cpu_generator, img2img_pipeline,
    text_length_cap, to_cpu, to_device,
)
from .base import ImageRequest, StepCallback

# FluxPipeline.__call__'s max_sequence_length default (and its maximum).
_T5_DEFAULT_LENGTH = 512


class FluxAdapter(PackedImageAdapter):
    name = "flux"
    pipeline_class_names = PIPELINE_CLASSES[Family.FLUX]
    is_video = False
    text_components = ("text_encoder", "text_encoder_2")
    denoise_components = ("transformer",)
    decode_components = ("vae",)

    # -- text ---------------------------------------------------------------------------------------------
    def max_sequence_length(self, pipe) -> int:
        """T5 length the text is padded to (512 for the real models; 32 for the tiny test pipeline)."""
        return text_length_cap(getattr(pipe, "tokenizer_2", None), pipeline_default=_T5_DEFAULT_LENGTH)

    @torch.no_grad()
    def encode(self, pipe, *, prompt: str, negative_prompt: str | None, device: torch.device) -> dict[str, torch.Tensor]:
        length = self.max_sequence_length(pipe)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                               num_images_per_prompt=1, max_sequence_length=length)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if negative_prompt is not None:
            neg, neg_pooled, _ = pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=device,
                                                    num_images_per_prompt=1, max_sequence_length=length)
            cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return to_cpu(cond)

    def cfg_off_reason(self, cond: dict[str, torch.Tensor], request: ImageRequest) -> str | None:
        # FluxPipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt is given; the embedded guidance
        # (guidance_scale) of the distilled models is one transformer call, not CFG.
        scale = request.true_cfg_scale
        if scale <= 1.0:
            return (f"Flux's true CFG is off (true_cfg_scale {scale} ≤ 1; guidance {request.guidance} is the "
                    "distilled guidance, a single pass); set true_cfg_scale > 1 and give a negative prompt")
        if "negative_prompt_embeds" not in cond:
            return "Flux's true CFG runs only with a negative prompt; give one when encoding"
        return None

    # -- denoise ------------------------------------------------------------------------------------------
    def initial_noise(self, pipe, *, request: ImageRequest, dtype: torch.dtype) -> torch.Tensor:
        """The packed noise [1, h/2*w/2, 4C] the pipeline would draw for `request.seed`, on CPU.

        Uses the pipeline's own prepare_latents with the CPU generator, so it is the same tensor on every rank
        and the same as a plain `pipe(generator=...)` call (which draws in the prompt embeddings' dtype).
        """
        channels = pipe.transformer.config.in_channels // 4
        latents, _ = pipe.prepare_latents(1, channels, request.height, request.width, dtype, torch.device("cpu"),
                                          cpu_generator(request))
        return latents

    @torch.no_grad()
    def denoise(self, pipe, *, cond: dict[str, torch.Tensor], request: ImageRequest, device: torch.device,
                on_step: StepCallback | None = None, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        dtype = pipe.transformer.dtype
        c = to_device(cond, device=device, dtype=dtype)
        common = dict(
            prompt_embeds=c["prompt_embeds"], pooled_prompt_embeds=c["pooled_prompt_embeds"],
            negative_prompt_embeds=c.get("negative_prompt_embeds"),
            negative_pooled_prompt_embeds=c.get("negative_pooled_prompt_embeds"),
            true_cfg_scale=request.true_cfg_scale, guidance_scale=request.guidance,
            height=request.height, width=request.width, num_inference_steps=request.steps,
            output_type="latent", return_dict=False,
        )
        packed = self.run_packed(pipe, request=request, device=device, dtype=dtype, init_image=init_latents,
                                 on_step=on_step, to_preview=lambda x: self._unpack(pipe, x, request), **common)
        return self._unpack(pipe, packed, request)

    def reference(self, pipe, *, prompt: str, negative_prompt: str | None, request: ImageRequest,
                  init_latents: torch.Tensor | None = None) -> torch.Tensor:
        common = dict(
            prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=request.true_cfg_scale,
            guidance_scale=request.guidance, height=request.height, width=request.width,
            num_inference_steps=request.steps, generator=cpu_generator(request),
            max_sequence_length=self.max_sequence_length(pipe), output_type="latent", return_dict=False,
        )
        if request.denoise < 1.0:
            from diffusers import FluxImg2ImgPipeline

            img2img = FluxImg2ImgPipeline.from_pipe(pipe)
            packed = img2img(image=init_latents, strength=request.denoise, **common)[0]
        else:
            packed = pipe(**common)[0]
        return self._unpack(pipe, packed, request)

    @staticmethod
    def _img2img(pipe):
        from diffusers import FluxImg2ImgPipeline

        return img2img_pipeline(pipe, FluxImg2ImgPipeline, latent_channels=pipe.transformer.config.in_channels // 4)

    @staticmethod
    def _unpack(pipe, packed: torch.Tensor, request: ImageRequest) -> torch.Tensor:
        return pipe._unpack_latents(packed, request.height, request.width, pipe.vae_scale_factor).float().cpu()

    # -- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pipe, *, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        # FluxPipeline.__call__ after its loop, from the raw VAE space (latent_format.process_out already done).
        vae = pipe.vae
        return self.to_images(pipe, vae.decode(latents.to(device=device, dtype=vae.dtype), return_dict=False)[0])

    def to_images(self, pipe, decoded: torch.Tensor) -> torch.Tensor:
        image = pipe.image_processor.postprocess(decoded, output_type="pt")
        return image.permute(0, 2, 3, 1).float().cpu()

    # -- planning (json configs only) ---------------------------------------------------------------------
    @staticmethod
    def vae_scale(pipe_config: dict) -> int:
        return 2 ** (len(component_config(pipe_config, "vae")["block_out_channels"]) - 1)

    def sequence_lengths(self, pipe_config: dict, cond: dict[str, torch.Tensor], *, height: int, width: int,
                         num_frames: int) -> dict[str, int]:
        # _cp_plan splits hidden_states/img_ids (image tokens) and encoder_hidden_states/txt_ids (text tokens);
        # the negative text has the same padded length.
        return {"image": self.image_tokens(pipe_config, height=height, width=width),
                "text": int(cond["prompt_embeds"].shape[1])}
