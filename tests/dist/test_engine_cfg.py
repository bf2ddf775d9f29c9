"""CFG parallel through the real sidecar (gloo ranks) against the plain diffusers pipeline in one process: the two
guidance branches on the two halves (cfg 2, 2 ranks) and each half a 2-rank Ulysses group (cfg 2 × ulysses 2,
4 ranks), for Qwen-Image and Wan with guidance > 1 and a negative prompt, Flux with true CFG, and the two-expert Wan
2.2 (both experts split, guidance_2 on the low-noise one); calls without CFG are refused before any rank is called.
The session returns ComfyUI LATENTs, so the references go through the family's process_out."""

from __future__ import annotations

import pytest

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.pipelines.tiny import WAN22_BOUNDARY_RATIO
from dist_backend.session import Session

from tests.dist.engine_cases import SIZE, STEPS, format_of
from tests.helpers import wait_no_ranks

TOL = 1e-4
NEGATIVE = "blurry, low quality"
PROMPT = "a red fox in the snow"
# (guidance, true_cfg_scale) per family: each runs real CFG (Flux: true CFG on top of its distilled guidance).
KNOBS = {"qwenimage": (2.5, 1.0), "wan": (3.0, 1.0), "flux": (3.5, 2.0)}
CONFIGS = {"cfg2": dict(world_size=2, cfg=2), "cfg2xulysses2": dict(world_size=4, cfg=2, ulysses=2)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def cfg_session(request):
    session = Session(SessionConfig(threads_per_rank=1, **CONFIGS[request.param]))
    yield request.param, session
    session.close()
    assert not wait_no_ranks(), "ranks left after the session closed"


def _reference(pipes, family: str, *, seed: int):
    """The plain pipeline in this process with the same CFG, as the ComfyUI LATENT the session returns."""
    guidance, true_cfg = KNOBS[family]
    request = ImageRequest(seed=seed, steps=STEPS, guidance=guidance, true_cfg_scale=true_cfg, **SIZE[family])
    return format_of(pipes, family).process_out(
        adapter_for(family).reference(pipes[family], prompt=PROMPT, negative_prompt=NEGATIVE, request=request))


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("cfg_session, family", [
    # Flux true CFG is proven on 2 ranks; the 4-rank composition with Ulysses on Qwen-Image and Wan.
    ("cfg2", "qwenimage"), ("cfg2", "wan"), ("cfg2", "flux"),
    ("cfg2xulysses2", "qwenimage"), ("cfg2xulysses2", "wan"),
], indirect=["cfg_session"])
def test_cfg_parallel_matches_single_process(cfg_session, family, tiny_dirs, tiny_pipes):
    name, session = cfg_session
    guidance, true_cfg = KNOBS[family]
    latents, _ = session.generate(model_dir=tiny_dirs[family], prompts=[PROMPT], negative_prompt=NEGATIVE, seed=5,
                                  steps=STEPS, guidance=guidance, true_cfg_scale=true_cfg, **SIZE[family])
    expected = _reference(tiny_pipes, family, seed=5)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] {family} {name}: latents {tuple(latents.shape)} max abs diff vs one process = {diff:.3e}")
    assert latents.shape == expected.shape
    assert diff <= TOL
    # Each rank computed one transformer forward per step (its branch), not two: the split really ran.
    stats = session.last_cfg_stats
    assert [s["forwards"] for s in stats] == [STEPS] * session.config.world_size, stats
    # One exchange per step, of one prediction (the packed/patched latent shape) per rank.
    assert all(s["exchanges"] == STEPS and s["bytes_sent"] == STEPS * expected.numel() * 4 for s in stats), stats
    if session.config.ulysses > 1:
        assert set(session.last_cp_modes) <= {"ulysses", "ulysses_anything"}, session.last_cp_modes


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("cfg_session", ["cfg2"], indirect=True)  # the refusal is the host's: one config shows it
@pytest.mark.parametrize("family, guidance, true_cfg, negative, words", [
    ("qwenimage", 1.0, 1.0, NEGATIVE, "guidance 1.0 ≤ 1"),
    ("qwenimage", 2.5, 1.0, None, "only with a negative prompt"),
    ("wan", 1.0, 1.0, NEGATIVE, "guidance 1.0 ≤ 1"),
    ("flux", 3.5, 1.0, NEGATIVE, "true CFG is off"),
])
def test_calls_without_cfg_are_refused_before_any_rank(cfg_session, family, guidance, true_cfg, negative, words,
                                                       tiny_dirs):
    name, session = cfg_session
    session.load(tiny_dirs[family])
    cond = session.encode([PROMPT], negative)
    calls = session._sidecar.calls
    with pytest.raises(ConfigError, match="cfg=2") as info:
        session.denoise(cond, seed=1, steps=STEPS, guidance=guidance, true_cfg_scale=true_cfg, **SIZE[family])
    assert words in str(info.value)
    assert session._sidecar.calls == calls  # refused on the host: no rank was called


@pytest.mark.keeps_ranks
def test_cfg_parallel_splits_both_wan22_experts(cfg_session, wan22):
    """Each step calls one expert for both branches; the split wraps both, so cfg 2 (and cfg 2 × ulysses 2) equals
    one process with guidance on the high-noise expert and guidance_2 on the low-noise one."""
    name, session = cfg_session
    folder, pipe = wan22
    pipe.scheduler.set_timesteps(STEPS)  # the tiny scheduler's 3 steps straddle the boundary: both experts run
    boundary = WAN22_BOUNDARY_RATIO * pipe.scheduler.config.num_train_timesteps
    assert (pipe.scheduler.timesteps >= boundary).any() and (pipe.scheduler.timesteps < boundary).any()
    size = SIZE["wan"]
    latents, _ = session.generate(model_dir=folder, prompts=[PROMPT], negative_prompt=NEGATIVE, seed=5, steps=STEPS,
                                  guidance=2.0, guidance_2=4.0, **size)
    request = ImageRequest(seed=5, steps=STEPS, guidance=2.0, guidance_2=4.0, **size)
    expected = format_of({"wan": pipe}, "wan").process_out(
        adapter_for("wan").reference(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, request=request))
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] wan22 two experts {name}: max abs diff vs one process = {diff:.3e}")
    assert diff <= TOL
    stats = session.last_cfg_stats
    assert [s["forwards"] for s in stats] == [STEPS] * session.config.world_size, stats  # one branch per rank
    assert all(s["exchanges"] == STEPS for s in stats), stats
    if session.config.ulysses > 1:
        assert session.last_cp_models == [["transformer", "transformer_2"]] * session.config.world_size
