"""What the engine needs from a pipeline family. One adapter per family (flux, qwenimage, wan) hides the
differences between diffusers pipelines: how prompts become embeddings, how one image is denoised from a seed,
how latents are packed, and how the VAE turns latents into pixels.

All tensors returned by an adapter are CPU tensors (they cross process boundaries and ComfyUI caches them).
The adapter never touches torch.distributed: the engine decides who runs what.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Called by the adapter after every denoise step as on_step(steps_done, total_steps, preview=fn): `fn()` returns the
# step's preview latent (see `FamilyAdapter.denoise`), computed only when called, so a step nobody previews costs
# nothing. It may raise dist_backend.errors.Cancelled to abort the denoise loop.
PreviewThunk = Callable[[], torch.Tensor]
StepCallback = Callable[..., None]


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """One image (or one video) to make: the unit of data parallelism and of the seed contract."""

    seed: int
    """The generator seed for this image: torch.Generator("cpu").manual_seed(seed) draws its initial noise."""
    steps: int
    """Number of denoise steps."""
    guidance: float
    """The family's guidance knob (Flux: embedded guidance_scale; Qwen-Image: true_cfg_scale; Wan: guidance_scale)."""
    true_cfg_scale: float = 1.0
    """Flux only: its true CFG scale (> 1 with a negative prompt runs the transformer twice per step). 1.0 = off.
    Qwen-Image and Wan take their CFG scale from `guidance`."""
    guidance_2: float | None = None
    """Wan 2.2 A14B only (two experts, `boundary_ratio`): guidance_scale_2, the CFG scale of the low-noise expert
    (transformer_2). None = the same as `guidance` (diffusers' default)."""
    height: int
    """Output height in pixels."""
    width: int
    """Output width in pixels."""
    num_frames: int = 1
    """Frames for a video family; 1 for image families."""
    denoise: float = 1.0
    """img2img strength in (0, 1]: diffusers' `strength`. 1.0 starts from pure noise (text-to-image); below 1 the
    adapter starts from the `init_latents` given to `denoise`, noised to the step where the schedule starts."""


class FamilyAdapter(abc.ABC):
    """Family-specific glue around a loaded diffusers pipeline."""

    name: str  # "flux" | "qwenimage" | "wan"
    pipeline_class_names: tuple[str, ...]  # model_index.json "_class_name" values this adapter accepts
    is_video: bool = False
    text_components: tuple[str, ...]  # pipeline attributes used only by encode (freed by staged offload)
    denoise_components: tuple[str, ...]  # usually ("transformer",)
    decode_components: tuple[str, ...]  # usually ("vae",)

    @abc.abstractmethod
    def encode(self, pipe, *, prompt: str, negative_prompt: str | None, device: torch.device) -> dict[str, torch.Tensor]:
        """Embeddings of one prompt (batch 1) and, when the family uses it, its negative prompt, as a flat dict
        of CPU tensors. Keys are family-specific (e.g. "prompt_embeds", "pooled_prompt_embeds",
        "negative_prompt_embeds"); the same dict is passed back to `denoise`."""

    @abc.abstractmethod
    def denoise(
        self, pipe, *, cond: dict[str, torch.Tensor], request: ImageRequest, device: torch.device,
        on_step: StepCallback | None = None, init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise one image from `request.seed`; return diffusers' NORMALISED latent, unpacked, as a CPU float32
        tensor in the family's layout (`latent_format.LatentFormat`: Flux [1, C, h, w], Qwen-Image [1, C, 1, h, w],
        Wan [1, C, F', h, w]). With request.denoise < 1, `init_latents` (normalised, same layout, batch 1) is the
        image to start from (img2img). Must equal `reference` for the same inputs.

        `on_step(done, total, preview=fn)` after each step; `fn()` gives the step's estimate of the final latent
        (x0) in the space the model denoises in (diffusers' normalised latents, which is ComfyUI's `process_in`
        space), in the layout ComfyUI's previewers take for the family: Flux [1, C, h, w]; Qwen-Image and Wan
        [1, C, 1, h, w] (the first latent frame: previewers show only that one). `preview` is None for a step whose
        estimate cannot be formed (img2img's first step: the pipeline noises the image latent internally)."""

    @abc.abstractmethod
    def decode(self, pipe, *, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        """RAW VAE-space latents (ComfyUI's LATENT convention) in the family's layout -> float32 images in 0..1 on
        CPU, [B, H, W, 3] (video: [B*F, H, W, 3], frames of each video consecutive)."""

    @abc.abstractmethod
    def to_images(self, pipe, decoded: torch.Tensor) -> torch.Tensor:
        """The VAE's output (`vae.decode(...)[0]`, e.g. assembled from tiles decoded on several ranks) -> images as
        `decode` returns them: the second half of `decode`."""

    @abc.abstractmethod
    def reference(self, pipe, *, prompt: str, negative_prompt: str | None, request: ImageRequest,
                  init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """The plain diffusers call of the seed contract, in this process:
        pipe(prompt=..., generator=torch.Generator("cpu").manual_seed(request.seed), ..., output_type="latent"),
        unpacked exactly like `denoise` returns (normalised). With request.denoise < 1 it is the family's img2img
        pipeline called with image=init_latents and strength=request.denoise. Used by tests and by users."""

    @abc.abstractmethod
    def check_size(self, pipe_config: dict, *, height: int, width: int, num_frames: int) -> None:
        """Raise dist_backend.errors.ConfigError naming the input and the nearest valid value when height/width/
        num_frames are not what the VAE and patching need. `pipe_config` is read from the model folder's json
        files (no weights loaded), see `read_model_config`."""

    @abc.abstractmethod
    def sequence_lengths(self, pipe_config: dict, cond: dict[str, torch.Tensor], *, height: int, width: int,
                         num_frames: int) -> dict[str, int]:
        """Lengths of the sequences the transformer's context-parallel plan splits, e.g.
        {"image": 4096, "text": 512}: used to check divisibility by the CP degree before starting."""

    @abc.abstractmethod
    def cfg_off_reason(self, cond: dict[str, torch.Tensor], request: ImageRequest) -> str | None:
        """None when the pipeline will run classifier-free guidance for this call (two transformer calls per step:
        the prompt, then the negative prompt); otherwise why not, as a sentence fragment naming the input to change
        (CFG parallel refuses such a call)."""

    def check_denoise(self, denoise: float) -> None:
        """Raise ConfigError when this family cannot start from a latent at `denoise` < 1 (img2img)."""

    def cp_models(self, pipe) -> dict[str, torch.nn.Module]:
        """The loaded models that run under context parallel, by component name: every denoise component the
        pipeline has (one transformer; Wan 2.2 A14B's two experts)."""
        return {name: model for name in self.denoise_components
                if (model := getattr(pipe, name, None)) is not None}

    def uses_attention_mask(self, cond: dict[str, torch.Tensor]) -> bool:
        """True when the transformer will get a padding mask for these embeddings (Ring would be silently wrong)."""
        return False
