"""Context parallel through the real sidecar (gloo ranks) against the plain diffusers pipeline in one process:
2-rank Ulysses, 2-rank Ring, 4-rank 2×2 ring×ulysses, 4-rank 2 dp × 2 ulysses, for Flux, Qwen-Image and Wan."""

from __future__ import annotations

import pytest

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError, UnsupportedError
from dist_backend.session import Conditioning, Session

from tests.helpers import wait_no_ranks
from tests.dist.engine_cases import generate, prompts_with_text_length, reference

TOL = 1e-4
CONFIGS = {
    "ulysses2": dict(world_size=2, ulysses=2),
    "ring2": dict(world_size=2, ring=2),
    "ring2xulysses2": dict(world_size=4, ring=2, ulysses=2),
    "dp2xulysses2": dict(world_size=4, ulysses=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def cp_session(request):
    session = Session(SessionConfig(threads_per_rank=1, **CONFIGS[request.param]))
    yield request.param, session
    session.close()
    assert not wait_no_ranks(), "ranks left after the session closed"


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_cp_matches_single_process(cp_session, family, tiny_dirs, tiny_pipes):
    name, session = cp_session
    cfg = session.config
    count = cfg.dp  # one image per data-parallel group
    if family == "qwenimage":
        prompts = prompts_with_text_length(tiny_pipes[family], divisible_by=cfg.cp_degree, count=count)
    else:
        prompts = ["a red fox in the snow", "a lighthouse at dusk"][:count]
    latents, images = generate(session, tiny_dirs[family], family, prompts, seed=7)
    expected = reference(tiny_pipes, family, prompts, seed=7)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] {family} {name}: latents {tuple(latents.shape)} max abs diff vs one process = {diff:.3e}")
    assert latents.shape == expected.shape
    assert diff <= TOL
    expected_mode = {"ulysses2": "ulysses", "ring2": "ring", "ring2xulysses2": "ring×ulysses",
                     "dp2xulysses2": "ulysses"}[name]
    assert set(session.last_cp_modes) <= {expected_mode, expected_mode.split("×")[0] + "_anything"}, \
        session.last_cp_modes  # CP really ran on every rank
    assert images.dtype.is_floating_point and images.min() >= 0 and images.max() <= 1


@pytest.mark.keeps_ranks
def test_odd_qwen_text_lengths(cp_session, tiny_dirs, tiny_pipes):
    """Odd text lengths run in diffusers' uneven modes for one CP method; ring × ulysses refuses them up front."""
    name, session = cp_session
    cfg = session.config
    prompts = prompts_with_text_length(tiny_pipes["qwenimage"], divisible_by=2, odd=True, count=cfg.dp)
    if cfg.ring > 1 and cfg.ulysses > 1:
        session.load(tiny_dirs["qwenimage"])
        calls = session._sidecar.calls
        cond = session.encode(prompts)
        with pytest.raises(ConfigError, match=r"not divisible by ring×ulysses = 2×2 = 4"):
            session.denoise(cond, seed=3, steps=2, guidance=1.0, height=64, width=64)
        assert session._sidecar.calls == calls + 1  # the encode only: denoise was refused before any call
        return
    latents, _ = generate(session, tiny_dirs["qwenimage"], "qwenimage", prompts, seed=3)
    diff = float((latents - reference(tiny_pipes, "qwenimage", prompts, seed=3)).abs().max())
    print(f"\n[measured] qwenimage odd text {name}: max abs diff = {diff:.3e}")
    assert diff <= TOL


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("cp_session", ["ring2", "ring2xulysses2"], indirect=True)
def test_masked_qwen_batch_under_ring_is_refused(cp_session, tiny_dirs):
    name, session = cp_session
    session.load(tiny_dirs["qwenimage"])
    cond = session.encode(["a red fox in the snow"])
    embeds = dict(cond.embeds[0])
    mask = embeds["prompt_embeds_mask"].clone()
    mask[:, -2:] = 0  # a padded prompt, as in a batch of prompts of different lengths
    embeds["prompt_embeds_mask"] = mask
    padded = Conditioning(model_dir=cond.model_dir, family=cond.family, prompts=cond.prompts,
                          negative_prompt=None, embeds=(embeds,))
    calls = session._sidecar.calls
    with pytest.raises(UnsupportedError, match="Ring attention"):
        session.denoise(padded, seed=1, steps=2, guidance=1.0, height=64, width=64)
    assert session._sidecar.calls == calls
