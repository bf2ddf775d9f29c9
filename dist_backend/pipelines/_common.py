"""Small helpers shared by the family adapters (size checks, step callbacks, tensor moves)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError, ModelError
from .base import FamilyAdapter, ImageRequest, StepCallback


def nearest_multiple(value: int, multiple: int, *, offset: int = 0) -> int:
    """The value of the form k*multiple + offset (k >= 1, or k >= 0 when offset > 0) nearest to `value`."""
    k = round((value - offset) / multiple)
    return max(k, 0 if offset > 0 else 1) * multiple + offset


def check_multiple(name: str, value: int, multiple: int, *, why: str) -> None:
    """ConfigError naming `name` and the nearest valid value unless `value` is a positive multiple of `multiple`."""
    if value >= multiple and value % multiple == 0:
        return
    raise ConfigError(
        f"{name} {value} must be a positive multiple of {multiple} ({why}); the nearest valid {name} is "
        f"{nearest_multiple(value, multiple)}"
    )


def check_single_frame(family: str, num_frames: int) -> None:
    if num_frames != 1:
        raise ConfigError(f"num_frames {num_frames} is not supported: {family} makes still images; use num_frames 1")


def component_config(pipe_config: dict, name: str) -> dict:
    """The json config of component `name` from `read_model_config`'s result."""
    try:
        return pipe_config["components"][name]
    except KeyError:
        raise ModelError(
            f"model folder {pipe_config.get('model_dir', '?')!r} has no {name!r} component, which this family needs"
        ) from None


def cpu_generator(request: ImageRequest) -> torch.Generator:
    """The seed contract: every image's noise comes from a CPU generator seeded with its own seed.

    A CPU generator gives the same numbers on every machine and every rank (whatever device the model is on),
    which is what makes context-parallel ranks agree and results reproducible across hosts.
    """
    return torch.Generator("cpu").manual_seed(request.seed)


def step_callback(on_step: StepCallback | None, total: int, *, start: torch.Tensor | None,
                  to_preview: Callable[[torch.Tensor], torch.Tensor]):
    """A diffusers `callback_on_step_end` that reports (i + 1, total, preview=fn); exceptions (Cancelled) propagate.

    `start` is the latent the loop starts from (as the pipeline holds it, e.g. packed), None when the pipeline makes
    it internally (img2img noises the image latent itself): the first step then has no preview. `to_preview` turns a latent
    in that form into the family's preview layout. `fn()` computes the x0 estimate of the step just done only when
    called (see `x0_estimate`); keeping the previous step's latent costs a reference, not a copy (schedulers return
    new tensors).
    """
    state = {"before": start}

    def callback(pipe, i, t, callback_kwargs):
        before, after = state["before"], callback_kwargs["latents"]
        state["before"] = after
        if on_step is not None:
            preview = None if before is None else (lambda: to_preview(x0_estimate(pipe.scheduler, before, after)))
            on_step(i + 1, total, preview=preview)
        return {}  # change nothing: the pipeline pops "latents" etc. from what we return

    return callback


def x0_estimate(scheduler, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The step's estimate of the clean latent x0, what ComfyUI's samplers preview.

    Multistep solvers that predict x0 (UniPC and DPM-Solver with predict_x0, Wan's default) keep it: the last entry
    of `model_outputs`. A flow-matching Euler step (Flux, Qwen-Image) goes from x at sigma s to x' at sigma s' along
    the velocity v = (x' - x) / (s' - s), and x0 = x - s·v = (s'·x - s·x') / (s' - s), exactly what the step implied
    (true CFG included). `scheduler.step_index` has already moved past the step that was just taken.
    """
    outputs = getattr(scheduler, "model_outputs", None)
    if getattr(scheduler.config, "predict_x0", False) and outputs and outputs[-1] is not None:
        return outputs[-1]
    index = scheduler.step_index - 1
    s, s_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    return (s_next * before - s * after) / (s_next - s)


def to_device(cond: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype,
              keep_dtype: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Move the embeddings to the transformer's device and dtype (masks in `keep_dtype` keep theirs)."""
    return {k: v.to(device=device) if k in keep_dtype else v.to(device=device, dtype=dtype) for k, v in cond.items()}


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


def text_length_cap(tokenizer, *, pipeline_default: int) -> int:
    """The text length the pipeline pads to: its own default, or less if the tokenizer says it cannot take more.

    Real checkpoints' tokenizers allow at least the default, so this is the plain pipeline behaviour there;
    the tiny test pipelines declare a short `model_max_length` to keep the text sequence small.
    """
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(pipeline_default, int(limit)) if limit else pipeline_default


class PackedImageAdapter(FamilyAdapter):
    """Image families whose latents are packed 2×2 into transformer tokens (Flux, Qwen-Image): the size rules and
    the image token count follow from the VAE's scale factor, which each family reads from its own VAE config."""

    @staticmethod
    def vae_scale(pipe_config: dict) -> int:
        raise NotImplementedError

    def check_size(self, pipe_config: dict, *, height: int, width: int, num_frames: int) -> None:
        vae_scale = self.vae_scale(pipe_config)
        why = f"VAE scale factor {vae_scale} x 2x2 latent packing"
        check_multiple("height", height, vae_scale * 2, why=why)
        check_multiple("width", width, vae_scale * 2, why=why)
        check_single_frame(self.name, num_frames)

    def image_tokens(self, pipe_config: dict, *, height: int, width: int) -> int:
        per_token = self.vae_scale(pipe_config) * 2
        return (height // per_token) * (width // per_token)

    def run_packed(self, pipe, *, request: ImageRequest, device: torch.device, dtype: torch.dtype,
                   init_image: torch.Tensor | None, on_step: StepCallback | None,
                   to_preview: Callable[[torch.Tensor], torch.Tensor], **call) -> torch.Tensor:
        """One packed latent: from the seed's noise (drawn once on CPU, passed as `latents=`), or with
        request.denoise < 1 img2img from `init_image` through the family's img2img pipeline (`self._img2img`).
        img2img draws its noise inside the pipeline from the CPU generator: the same numbers on every rank
        (randn_tensor draws on the generator's device, then moves), as the plain img2img call draws them; its
        first step then has no preview (the start latent is made inside the pipeline)."""
        steps = steps_run(request.steps, request.denoise)
        if request.denoise < 1.0:
            return self._img2img(pipe)(image=init_image.to(device, dtype), strength=request.denoise,
                                       generator=cpu_generator(request),
                                       callback_on_step_end=step_callback(on_step, steps, start=None,
                                                                          to_preview=to_preview), **call)[0]
        latents = self.initial_noise(pipe, request=request, dtype=dtype).to(device)
        return pipe(latents=latents, callback_on_step_end=step_callback(on_step, steps, start=latents,
                                                                        to_preview=to_preview), **call)[0]


def steps_run(steps: int, denoise: float) -> int:
    """How many of `steps` an img2img run with strength `denoise` executes: the arithmetic of diffusers'
    `get_timesteps` (Flux / Qwen-Image img2img): it skips the first int(steps − steps × denoise) steps."""
    init_timestep = min(steps * denoise, steps)
    return steps - int(max(steps - init_timestep, 0))


def img2img_pipeline(pipe, cls, *, latent_channels: int):
    """The family's img2img pipeline `cls` sharing `pipe`'s loaded modules (no weights copied).

    Its constructor takes the latent channel count from the VAE, which is absent while staged offload keeps only
    the transformer loaded (it then assumes 16): set it from the transformer instead, so latents passed as
    `image=` are recognised as latents (diffusers' VaeImageProcessor passes through a tensor with that many
    channels) and never sent to a VAE encode.
    """
    from diffusers.image_processor import VaeImageProcessor

    img2img = cls.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    if img2img.latent_channels != latent_channels:
        img2img.latent_channels = latent_channels
        img2img.image_processor = VaeImageProcessor(vae_scale_factor=img2img.vae_scale_factor * 2,
                                                    vae_latent_channels=latent_channels)
    return img2img
