"""Wan 2.1 from single files (the original layouts of ComfyUI's files, the tokenizer inside the umt5 file) through
the real sidecar, against the tiny diffusers folder's pipeline in one process: Wan 2.2 A14B's two expert files in
fp16 give the latents of the folder with its weights rounded to fp16, under dp; Wan 2.1 scaled fp8 files under
Ulysses give the latents of the folder with the same dequantised weights (quantised here by the fixture, not by the
loader)."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.files import ModelFiles
from dist_backend.files.tiny_files import quantise, write_wan_files
from dist_backend.session import Session
from tests.dist.engine_cases import generate, reference

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def wan_files(tiny_dirs, wan22, tmp_path_factory):
    """name -> ModelFiles of the tiny Wan 2.1 (scaled fp8) and Wan 2.2 (two experts, fp16, ComfyUI's prefix);
    architecture configs borrowed from the folders; the tokenizer is the sentencepiece model inside the umt5 file,
    as in ComfyUI's."""
    root = tmp_path_factory.mktemp("wan-files")
    out = {}
    for name, folder, storage, comfy_prefix in (("wan22_fp16", wan22[0], "fp16", True),
                                                ("scaled_fp8", tiny_dirs["wan"], "scaled_fp8", False)):
        paths = write_wan_files(folder, root / name, storage=storage, comfy_prefix=comfy_prefix)
        out[name] = ModelFiles(family="wan", configs=str(folder), **paths)
    return out


def rounded_pipe(pipe, *, storage: str):
    """The folder's pipeline with the weights the files hold: fp16 (every part), or for scaled fp8 the fp8 round
    trip of the transformer's and UMT5's linear weights (one scale per tensor: the original Wan layout fuses none)."""
    pipe = copy.deepcopy(pipe)
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        module = getattr(pipe, name)
        if module is None:
            continue
        state = module.state_dict()
        for key, t in state.items():
            if storage == "fp16":
                state[key] = t.half().float()
            elif name != "vae" and key.endswith(".weight") and t.ndim == 2 and \
                    key not in ("shared.weight", "encoder.embed_tokens.weight"):
                q, scale = quantise(t, scaled=True)
                state[key] = q.float() * scale
        module.load_state_dict(state)
    return pipe


def test_wan22_expert_files_in_fp16_give_the_fp16_folder_latents_on_two_ranks(wan_files, wan22):
    """Both experts run (3 steps cross the boundary, see pipelines.tiny.WAN22_BOUNDARY_RATIO)."""
    session = Session(SessionConfig(world_size=2, threads_per_rank=1))
    try:
        latents, _ = generate(session, wan_files["wan22_fp16"], "wan", PROMPTS, seed=3)
    finally:
        session.close()
    expected = reference({"wan": rounded_pipe(wan22[1], storage="fp16")}, "wan", PROMPTS, seed=3)
    plain = reference({"wan": wan22[1]}, "wan", PROMPTS, seed=3)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] Wan 2.2 two-expert fp16 files, dp2: max abs latent diff vs the fp16-rounded folder in one process = "
          f"{diff:.3e}; fp16 vs fp32 weights: {float((expected - plain).abs().max()):.3e}")
    assert torch.equal(latents, expected)  # bit for bit (measured 0.0 on 2 CPU cores)
    assert float((expected - plain).abs().max()) > 1e-6, "fp16 rounding must change the result (else the test is blind)"


def test_scaled_fp8_files_under_ulysses_equal_the_dequantised_weights_in_one_process(wan_files, tiny_pipes):
    session = Session(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1))
    try:
        latents, _ = generate(session, wan_files["scaled_fp8"], "wan", PROMPTS[:1], seed=4)
        assert session.last_cp_modes == ["ulysses", "ulysses"]
    finally:
        session.close()
    expected = reference({"wan": rounded_pipe(tiny_pipes["wan"], storage="scaled_fp8")}, "wan", PROMPTS[:1], seed=4)
    plain = reference(tiny_pipes, "wan", PROMPTS[:1], seed=4)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] Wan scaled fp8 files, ulysses2: max abs latent diff vs dequantised one process = {diff:.3e}; "
          f"fp8 vs fp32 weights: {float((expected - plain).abs().max()):.3e}")
    assert diff <= 1e-4
    assert float((expected - plain).abs().max()) > 1e-3, "the fp8 round trip must change the result (else the test is blind)"
