"""Shared inputs of the engine tests: prompts, sizes per family, and the single-process references."""

from __future__ import annotations

import torch

from dist_backend.images import to_uint8
from dist_backend.latent_format import LatentFormat, latent_format
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest

SIZE = {"flux": dict(height=64, width=64), "qwenimage": dict(height=64, width=64),
        "wan": dict(height=64, width=64, num_frames=5)}
STEPS = 3
GUIDANCE = {"flux": 3.5, "qwenimage": 1.0, "wan": 1.0}
# Prompts whose Qwen-Image text length is a multiple of 4 work under every split; odd ones need an uneven mode.
CANDIDATES = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an old map", "two cats",
              "a green hill under clouds", "a small boat")


def qwen_text_length(pipe, prompt: str) -> int:
    adapter = adapter_for("qwenimage")
    return int(adapter.encode(pipe, prompt=prompt, negative_prompt=None, device=torch.device("cpu"))
               ["prompt_embeds"].shape[1])


def prompts_with_text_length(pipe, *, divisible_by: int, odd: bool = False, count: int = 1) -> list[str]:
    """Prompts whose Qwen-Image text length is (or, with odd=True, is not) a multiple of `divisible_by`."""
    chosen = [p for p in CANDIDATES if (qwen_text_length(pipe, p) % divisible_by == 0) != odd]
    assert len(chosen) >= count, f"no {count} candidate prompts with the wanted text length"
    return chosen[:count]


def format_of(pipes, family: str) -> LatentFormat:
    """The family's LATENT format, from the loaded pipeline's VAE config (as the engine reads it from the folder)."""
    return latent_format({"family": family, "components": {"vae": dict(pipes[family].vae.config)}})


def reference(pipes, family: str, prompts: list[str], *, seed: int, images_per_prompt: int = 1,
              denoise: float = 1.0, init: torch.Tensor | None = None, size: dict | None = None,
              steps: int = STEPS, guidance: float | None = None) -> torch.Tensor:
    """The plain diffusers pipeline in this process, image j with seed + j (the seed contract), as a ComfyUI
    LATENT (the normalised result through the family's process_out). With denoise < 1: the family's img2img
    pipeline from `init` (a ComfyUI LATENT, raw space; one latent for all images or one per image)."""
    adapter = adapter_for(family)
    fmt = format_of(pipes, family)
    out = []
    for p, prompt in enumerate(prompts):
        for k in range(images_per_prompt):
            j = p * images_per_prompt + k
            request = ImageRequest(seed=seed + j, steps=steps, guidance=GUIDANCE[family] if guidance is None
                                   else guidance, denoise=denoise,
                                   **(size or SIZE[family]))
            image = None if init is None else fmt.process_in(init[j if init.shape[0] > 1 else 0:][:1])
            out.append(adapter.reference(pipes[family], prompt=prompt, negative_prompt=None, request=request,
                                         init_latents=image))
    return fmt.process_out(torch.cat(out))


def reference_images(pipes, family: str, latents: torch.Tensor) -> torch.Tensor:
    """Each image decoded on its own (from a ComfyUI LATENT), as the plain pipeline does for a one-image call."""
    adapter = adapter_for(family)
    return to_uint8(torch.cat([adapter.decode(pipes[family], latents=latents[i:i + 1], device=torch.device("cpu"))
                               for i in range(latents.shape[0])]))


def generate(session, model_dir, family: str, prompts: list[str], *, seed: int, images_per_prompt: int = 1):
    return session.generate(model_dir=model_dir, prompts=prompts, seed=seed, steps=STEPS,
                            guidance=GUIDANCE[family], images_per_prompt=images_per_prompt, **SIZE[family])


def generate_once(config, model, family: str, prompts: list[str], *, seed: int):
    """(latents, images, the CP modes it ran) of one `generate` on a fresh Session of `config`, closed after."""
    from dist_backend.session import Session

    session = Session(config)
    try:
        latents, images = generate(session, model, family, prompts, seed=seed)
        return latents, images, session.last_cp_modes
    finally:
        session.close()


def with_file_weights(pipe, *, parts: tuple[str, ...], storage: str, keep: tuple[str, ...] = ()):
    """A copy of a folder's pipeline holding the weights the single-file fixtures of `storage` hold for `parts`
    (tiny_files): fp16 rounds every tensor; scaled_fp8 replaces each linear weight (2-D, name not ending in `keep`)
    by its scaled fp8 round trip, one scale per tensor. (Flux's files fuse layers, so share scales: test_files.)"""
    import copy

    from dist_backend.files.tiny_files import quantise

    pipe = copy.deepcopy(pipe)
    for name in parts:
        module = getattr(pipe, name)
        if module is None:  # Wan 2.1 has no transformer_2
            continue
        state = module.state_dict()
        for key, t in state.items():
            if storage == "fp16":
                state[key] = t.half().float()
            elif key.endswith(".weight") and t.ndim == 2 and not key.endswith(keep):
                q, scale = quantise(t, scaled=True)
                state[key] = q.float() * scale
        module.load_state_dict(state)
    return pipe
