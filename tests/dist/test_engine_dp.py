"""Data parallel and staged offload through the real sidecar, against the plain pipeline in one process."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError, ModelError
from dist_backend.images import to_uint8
from dist_backend.session import Session
from tests.dist.engine_cases import generate, reference, reference_images
from tests.helpers import rank_processes

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_three_prompts_on_two_ranks_equal_their_single_process_images(family, tiny_dirs, tiny_pipes):
    session = Session(SessionConfig(world_size=2, threads_per_rank=1))
    try:
        latents, images = generate(session, tiny_dirs[family], family, PROMPTS, seed=11)
    finally:
        session.close()
    expected = reference(tiny_pipes, family, PROMPTS, seed=11)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] {family} dp2, 3 prompts: max abs latent diff vs one process = {diff:.3e}")
    assert diff <= 1e-6
    got, want = to_uint8(images), reference_images(tiny_pipes, family, expected)
    assert got.shape == want.shape
    assert torch.equal(got, want), "each image must equal its single-process image"


def test_images_per_prompt_follow_the_seed_contract(tiny_dirs, tiny_pipes):
    session = Session(SessionConfig(world_size=2, threads_per_rank=1))
    try:
        latents, _ = generate(session, tiny_dirs["flux"], "flux", PROMPTS[:2], seed=100, images_per_prompt=2)
    finally:
        session.close()
    expected = reference(tiny_pipes, "flux", PROMPTS[:2], seed=100, images_per_prompt=2)
    assert latents.shape[0] == 4
    assert float((latents - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("parallel", [dict(), dict(ulysses=2)], ids=["dp2", "ulysses2"])
def test_staged_offload_gives_the_resident_images(parallel, tiny_dirs):
    results = {}
    for offload in ("resident", "staged"):
        session = Session(SessionConfig(world_size=2, offload=offload, threads_per_rank=1, **parallel))
        try:
            results[offload] = generate(session, tiny_dirs["flux"], "flux", PROMPTS[:2], seed=5)
            # A second round reloads what staged freed (CP is enabled again on the fresh transformer) and must
            # still give the same result.
            again = generate(session, tiny_dirs["flux"], "flux", PROMPTS[:2], seed=5)
            assert torch.equal(again[0], results[offload][0])
            if parallel:
                assert session.last_cp_modes == ["ulysses", "ulysses"], session.last_cp_modes
        finally:
            session.close()
    assert torch.equal(results["staged"][0], results["resident"][0])
    assert torch.equal(to_uint8(results["staged"][1]), to_uint8(results["resident"][1]))


def test_the_sidecar_stays_up_between_calls_and_is_replaced_when_the_config_changes(tiny_dirs):
    from dist_backend.session import get_session, shutdown_all

    try:
        first = get_session(SessionConfig(world_size=2, threads_per_rank=1))
        generate(first, tiny_dirs["flux"], "flux", PROMPTS[:1], seed=1)
        pids = first.sidecar_pids()
        again = get_session(SessionConfig(world_size=2, threads_per_rank=1))
        generate(again, tiny_dirs["flux"], "flux", PROMPTS[:1], seed=2)
        assert again is first and again.sidecar_pids() == pids and first.starts == 1
        other = get_session(SessionConfig(world_size=1, threads_per_rank=1))
        assert other is not first and not first.alive()
        assert not set(pids) & {p.pid for p in rank_processes()}, "the replaced sidecar's ranks must be gone"
    finally:
        shutdown_all()


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(world_size=3, ulysses=3), ConfigError, "attention heads"),
    (dict(world_size=2, ulysses=2), ModelError, "does not exist"),
])
def test_invalid_input_is_refused_before_any_rank_starts(kwargs, error, words, tiny_dirs, tmp_path):
    session = Session(SessionConfig(threads_per_rank=1, **kwargs))
    model = tiny_dirs["flux"] if error is ConfigError else tmp_path / "missing"
    with pytest.raises(error, match=words):
        session.load(model)
    assert session.starts == 0 and not rank_processes()


def test_bad_denoise_input_is_refused_before_the_call(tiny_dirs):
    session = Session(SessionConfig(world_size=1, threads_per_rank=1))
    try:
        session.load(tiny_dirs["flux"])
        cond = session.encode(["a dog"])
        calls = session._sidecar.calls
        for kwargs, words in ((dict(height=60), "height"), (dict(steps=0), "steps"), (dict(seed=-1), "seed")):
            args = dict(seed=1, steps=2, guidance=3.5, height=64, width=64) | kwargs
            with pytest.raises(ConfigError, match=words):
                session.denoise(cond, **args)
        with pytest.raises(ConfigError, match="prompts is empty"):
            session.encode([])
        assert session._sidecar.calls == calls
    finally:
        session.close()
