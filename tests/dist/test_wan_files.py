"""Wan 2.1 from single files (the original layouts of ComfyUI's files, the tokenizer inside the umt5 file) through
the real sidecar, against the tiny diffusers folder's pipeline in one process: Wan 2.2 A14B's two expert files in
fp16 give the latents of the folder with its weights rounded to fp16, under dp; Wan 2.1 scaled fp8 files under
Ulysses give the latents of the folder with the same dequantised weights (quantised here by the fixture, not by the
loader)."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.files import ModelFiles
from dist_backend.files.tiny_files import write_wan_files
from tests.dist.engine_cases import generate_once, reference, with_file_weights

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


# The weights the fixture files hold (UMT5's token embedding keeps its dtype, see tiny_files._fp8_candidate).
_PARTS = ("transformer", "transformer_2", "text_encoder")
_KEEP = ("shared.weight", "embed_tokens.weight")


def test_wan22_expert_files_in_fp16_give_the_fp16_folder_latents_on_two_ranks(wan_files, wan22):
    """Both experts run (3 steps cross the boundary, see pipelines.tiny.WAN22_BOUNDARY_RATIO)."""
    latents, _, _ = generate_once(SessionConfig(world_size=2, threads_per_rank=1), wan_files["wan22_fp16"], "wan",
                                  PROMPTS, seed=3)
    pipe = with_file_weights(wan22[1], parts=(*_PARTS, "vae"), storage="fp16")
    expected = reference({"wan": pipe}, "wan", PROMPTS, seed=3)
    plain = reference({"wan": wan22[1]}, "wan", PROMPTS, seed=3)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] Wan 2.2 two-expert fp16 files, dp2: max abs latent diff vs the fp16-rounded folder in one process = "
          f"{diff:.3e}; fp16 vs fp32 weights: {float((expected - plain).abs().max()):.3e}")
    assert torch.equal(latents, expected)  # bit for bit (measured 0.0 on 2 CPU cores)
    assert float((expected - plain).abs().max()) > 1e-6, "fp16 rounding must change the result (else the test is blind)"


def test_scaled_fp8_files_under_ulysses_equal_the_dequantised_weights_in_one_process(wan_files, tiny_pipes):
    latents, _, modes = generate_once(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1),
                                      wan_files["scaled_fp8"], "wan", PROMPTS[:1], seed=4)
    assert modes == ["ulysses", "ulysses"]
    pipe = with_file_weights(tiny_pipes["wan"], parts=_PARTS, storage="scaled_fp8", keep=_KEEP)
    expected = reference({"wan": pipe}, "wan", PROMPTS[:1], seed=4)
    plain = reference(tiny_pipes, "wan", PROMPTS[:1], seed=4)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] Wan scaled fp8 files, ulysses2: max abs latent diff vs dequantised one process = {diff:.3e}; "
          f"fp8 vs fp32 weights: {float((expected - plain).abs().max()):.3e}")
    assert diff <= 1e-4
    assert float((expected - plain).abs().max()) > 1e-3, "the fp8 round trip must change the result (else the test is blind)"
