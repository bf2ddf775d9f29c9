"""Latent input through the real sidecar: img2img (a ComfyUI LATENT + denoise < 1) against the family's diffusers
img2img pipeline in one process (strength=denoise, generator seeded seed + j), under data parallel, Ulysses and
Ring; an empty latent at denoise 1.0 against the run without a latent; bad latents refused before any call."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError
from dist_backend.images import to_uint8
from dist_backend.session import Session
from tests.dist.engine_cases import (
    GUIDANCE, STEPS, format_of, prompts_with_text_length, reference, reference_images,
)
from tests.helpers import wait_no_ranks

TOL = 1e-4
DENOISE = 0.6
CONFIGS = {"dp2": dict(world_size=2), "ulysses2": dict(world_size=2, ulysses=2), "ring2": dict(world_size=2, ring=2)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def session(request):
    session = Session(SessionConfig(threads_per_rank=1, **CONFIGS[request.param]))
    yield request.param, session
    session.close()
    assert not wait_no_ranks(), "ranks left after the session closed"


def image_latents(tiny_pipes, family: str, count: int) -> torch.Tensor:
    """ComfyUI LATENTs of real images: the pipeline's own results for other prompts (raw VAE space)."""
    return reference(tiny_pipes, family, ["a house by a lake", "a mountain road"][:count], seed=40)


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_img2img_equals_diffusers_img2img(session, family, tiny_dirs, tiny_pipes):
    name, s = session
    count = s.config.dp * 2 if name == "dp2" else 1
    if family == "qwenimage":
        prompts = prompts_with_text_length(tiny_pipes[family], divisible_by=s.config.cp_degree, count=count)
    else:
        prompts = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "two cats"][:count]
    s.load(tiny_dirs[family])
    cond = s.encode(prompts)
    # dp: one latent per image (image j gets latent j); CP: one latent, the ComfyUI default of a 1-image batch.
    init = image_latents(tiny_pipes, family, 2 if count > 1 else 1)
    if count > 1:
        init = init.repeat(count // 2, *[1] * (init.dim() - 1))
    got = s.denoise(cond, seed=21, steps=STEPS, guidance=GUIDANCE[family], latent=init, denoise=DENOISE)
    expected = reference(tiny_pipes, family, prompts, seed=21, denoise=DENOISE, init=init)
    diff = float((got - expected).abs().max())
    print(f"\n[measured] {family} img2img {name}: latents {tuple(got.shape)} max abs diff vs diffusers img2img = "
          f"{diff:.3e}")
    assert got.shape == expected.shape == init.shape
    assert diff <= TOL
    txt2img = reference(tiny_pipes, family, prompts[:1], seed=21)
    assert float((got[:1] - txt2img).abs().max()) > 1e-2, "img2img must differ from text-to-image"
    if name != "dp2":
        assert set(s.last_cp_modes) <= {name[:-1], name[:-1] + "_anything"}, s.last_cp_modes


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["dp2"], indirect=True)
def test_empty_latent_sets_the_size_and_equals_the_run_without_one(session, tiny_dirs, tiny_pipes):
    name, s = session
    prompts = ["a red fox in the snow", "a lighthouse at dusk"]
    for family, empty, size in (
        ("flux", torch.zeros(1, 16, 6, 8), dict(height=48, width=64)),  # Empty SD3 Latent Image 64 × 48
        ("qwenimage", torch.zeros(1, 16, 6, 8), dict(height=48, width=64)),  # the same node, for Qwen-Image
        ("wan", torch.zeros(1, 16, 2, 8, 8), dict(height=64, width=64, num_frames=5)),  # Empty Hunyuan Latent Video
    ):
        s.load(tiny_dirs[family])
        cond = s.encode(prompts)
        # The latent's size wins over width/height; its 16 channels fit the tiny Flux VAE's 4, as in ComfyUI.
        with_latent = s.denoise(cond, seed=4, steps=2, guidance=GUIDANCE[family], latent=empty, height=1024,
                                width=1024)
        without = s.denoise(cond, seed=4, steps=2, guidance=GUIDANCE[family], **size)
        assert with_latent.shape[0] == 2 and with_latent.shape[-2:] == empty.shape[-2:], family
        assert torch.equal(with_latent, without), family


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["dp2"], indirect=True)
def test_decode_takes_any_comfyui_latent_and_bad_latents_are_refused(session, tiny_dirs, tiny_pipes):
    name, s = session
    s.load(tiny_dirs["qwenimage"])
    raw = image_latents(tiny_pipes, "qwenimage", 2)  # [2, 16, 1, 8, 8]
    images = s.decode(raw)
    assert torch.equal(to_uint8(images), reference_images(tiny_pipes, "qwenimage", raw))
    assert torch.equal(s.decode(raw[:, :, 0]), images)  # the 4-D form ComfyUI's Empty SD3 Latent Image gives
    cond = s.encode(["a red fox in the snow"])
    calls = s._sidecar.calls
    for kwargs, words in (
        (dict(latent=raw, denoise=0.5, images_per_prompt=3), r"latent batch has 2 images, but prompts × "
                                                             r"images_per_prompt = 1 × 3 = 3"),
        (dict(denoise=0.5, height=64, width=64), "connect a latent"),
        (dict(latent=raw, denoise=1.5), r"denoise must be a number in \(0, 1\]"),
        (dict(latent=torch.zeros(1, 16, 2, 8, 8), denoise=0.5), "encode each image on its own"),
    ):
        with pytest.raises(ConfigError, match=words):
            s.denoise(cond, seed=1, steps=STEPS, guidance=1.0, **kwargs)
    with pytest.raises(ConfigError, match="a qwenimage LATENT is"):
        s.decode(torch.zeros(1, 4, 8, 8))  # an empty latent goes to a sampler; VAE Decode needs its channels
    s.load(tiny_dirs["wan"])
    cond = s.encode(["a river"])
    calls = s._sidecar.calls
    with pytest.raises(ConfigError, match="not supported for Wan"):
        s.denoise(cond, seed=1, steps=STEPS, guidance=1.0, latent=torch.zeros(1, 16, 2, 8, 8), denoise=0.5)
    assert s._sidecar.calls == calls, "refused before any call"
