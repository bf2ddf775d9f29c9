"""Guidance that does what it says, Wan 2.2's two experts, and live previews, through the real sidecar (gloo ranks),
each against the plain diffusers pipeline in one process (adapter.reference, same options):

- CFG with negative prompts: Flux true CFG, Qwen-Image with its documented " ", Wan; under dp, Ulysses and Ring;
- the tiny two-expert Wan (transformer + transformer_2, boundary_ratio) with guidance_2, under dp, Ulysses and Ring,
  resident and staged, both experts under context parallel;
- previews: only rank 0 sends them, one per step, and the last one of an image is its final latent.
"""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.latent_format import latent_format
from dist_backend.pipelines import adapter_for, read_model_config
from dist_backend.pipelines.base import ImageRequest
from dist_backend.pipelines.tiny import WAN22_BOUNDARY_RATIO
from dist_backend.session import Session

from tests.dist.engine_cases import format_of
from tests.helpers import wait_no_ranks

TOL = 1e-4
STEPS = 3
SIZE = {"flux": dict(height=64, width=64), "qwenimage": dict(height=64, width=64),
        "wan": dict(height=64, width=64, num_frames=5), "wan22": dict(height=64, width=64, num_frames=5)}
# Qwen-Image text lengths: "an old map" 12 tokens, "two cats" 10, " " 6: even, so every 2-rank split is plain.
PROMPTS = ["an old map", "two cats"]
# family -> (negative prompt, denoise options): every one runs CFG (two transformer calls per step).
CFG = {
    "flux": ("blurry", dict(guidance=3.5, true_cfg_scale=2.5)),
    "qwenimage": (" ", dict(guidance=2.5)),  # Qwen-Image's documented negative prompt: kept, so CFG runs
    "wan": ("blurry", dict(guidance=2.0)),
    "wan22": ("blurry", dict(guidance=2.0, guidance_2=4.0)),
}
CONFIGS = {
    "dp2": dict(world_size=2),
    "ulysses2": dict(world_size=2, ulysses=2),
    "ring2": dict(world_size=2, ring=2),
    "dp2-staged": dict(world_size=2, offload="staged"),
    "ulysses2-staged": dict(world_size=2, ulysses=2, offload="staged"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def session(request):
    session = Session(SessionConfig(threads_per_rank=1, **CONFIGS[request.param]))
    yield request.param, session
    session.close()
    assert not wait_no_ranks(), "ranks left after the session closed"


def to_comfy(pipe, family: str, normalised: torch.Tensor) -> torch.Tensor:
    """The adapter's (normalised) reference as the ComfyUI LATENT the session returns."""
    base = "wan" if family == "wan22" else family
    return format_of({base: pipe}, base).process_out(normalised)


def reference(pipe, family: str, prompts: list[str], *, seed: int) -> torch.Tensor:
    """Image j with seed + j, the plain pipeline with the same negative prompt and guidance options, as a ComfyUI
    LATENT."""
    negative, options = CFG[family]
    adapter = adapter_for("wan" if family == "wan22" else family)
    return to_comfy(pipe, family, torch.cat([
        adapter.reference(pipe, prompt=prompt, negative_prompt=negative,
                          request=ImageRequest(seed=seed + j, steps=STEPS, **options, **SIZE[family]))
        for j, prompt in enumerate(prompts)]))


def run(session, model_dir, family: str, prompts: list[str], *, seed: int, **hooks) -> torch.Tensor:
    negative, options = CFG[family]
    session.load(model_dir)
    cond = session.encode(prompts, negative)
    assert cond.negative_prompt == negative  # kept verbatim, whitespace included
    return session.denoise(cond, seed=seed, steps=STEPS, **options, **SIZE[family], **hooks)


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["dp2", "ulysses2", "ring2"], indirect=True)  # staged: see the wan22 test
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_cfg_with_negative_prompt_matches_single_process(session, family, tiny_dirs, tiny_pipes):
    name, session = session
    latents = run(session, tiny_dirs[family], family, PROMPTS, seed=11)
    expected = reference(tiny_pipes[family], family, PROMPTS, seed=11)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] {family} CFG {name}: max abs diff vs one process = {diff:.3e}")
    assert latents.shape == expected.shape
    assert diff <= TOL
    # CFG really ran: the same call without the negative prompt / CFG is a different result.
    adapter = adapter_for(family)
    plain = to_comfy(tiny_pipes[family], family, adapter.reference(
        tiny_pipes[family], prompt=PROMPTS[0], negative_prompt=None,
        request=ImageRequest(seed=11, steps=STEPS, guidance=CFG[family][1]["guidance"], **SIZE[family])))
    assert float((plain - expected[:1]).abs().max()) > 1e-3


@pytest.mark.keeps_ranks
def test_wan22_two_experts_match_single_process(session, wan22):
    name, session = session
    folder, pipe = wan22
    # The tiny scheduler's 3 steps straddle the boundary, so both experts run.
    pipe.scheduler.set_timesteps(STEPS)
    boundary = WAN22_BOUNDARY_RATIO * pipe.scheduler.config.num_train_timesteps
    assert (pipe.scheduler.timesteps >= boundary).any() and (pipe.scheduler.timesteps < boundary).any()
    latents = run(session, folder, "wan22", PROMPTS, seed=5)
    expected = reference(pipe, "wan22", PROMPTS, seed=5)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] wan22 two experts {name}: max abs diff vs one process = {diff:.3e}")
    assert diff <= TOL
    if session.config.cp_degree > 1:  # both experts ran under context parallel on every rank
        assert session.last_cp_models == [["transformer", "transformer_2"]] * session.config.world_size
        assert all(session.last_cp_modes)
    # guidance_2 reaches the low-noise expert: the default (= guidance) gives another result.
    negative, options = CFG["wan22"]
    same = to_comfy(pipe, "wan22", adapter_for("wan").reference(
        pipe, prompt=PROMPTS[0], negative_prompt=negative,
        request=ImageRequest(seed=5, steps=STEPS, guidance=options["guidance"], **SIZE["wan22"])))
    assert float((same - expected[:1]).abs().max()) > 1e-3


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["dp2", "ulysses2"], indirect=True)  # once data parallel, once CP
def test_previews_come_from_rank_0_once_per_step(session, tiny_dirs):
    name, session = session
    previews, order = [], []

    def on_preview(latent):
        previews.append(latent)
        order.append("preview")

    latents = run(session, tiny_dirs["flux"], "flux", PROMPTS, seed=2, on_preview=on_preview,
                  on_progress=lambda done, total: order.append("progress"))
    rank0_images = 1 if name == "dp2" else 2  # dp2: one image per group; ulysses2: one group makes both
    assert len(previews) == rank0_images * STEPS
    assert all(p.dtype == torch.float16 and p.shape == latents[:1].shape for p in previews)
    # Each preview arrives just before the progress call of its step.
    assert all(order[i + 1] == "progress" for i, kind in enumerate(order) if kind == "preview")
    # A flow-matching Euler step's x0 estimate at the last step is the final latent (previews are in the
    # normalised space ComfyUI's previewers take, process_in of the LATENT).
    fmt = latent_format(read_model_config(tiny_dirs["flux"]))
    for k in range(rank0_images):
        final = previews[(k + 1) * STEPS - 1].float()
        assert float((final - fmt.process_in(latents[k:k + 1])).abs().max()) < 1e-2
    # Every k-th step only.
    previews.clear()
    run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], seed=2, on_preview=previews.append, preview_every=2)
    assert len(previews) == 2  # steps 2 and 3 (the last step of an image always has one)
