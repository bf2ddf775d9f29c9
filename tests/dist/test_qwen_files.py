"""Qwen-Image from single files (ComfyUI's layouts) through the real sidecar, against the tiny diffusers folder's
pipeline in one process: fp32 files give the folder's latents bit for bit under data parallel; ComfyUI's scaled
fp8 files, kept in fp8 (`weights: fp8`), equal the folder's pipeline with the same dequantised weights and the same
layerwise casting under Ulysses (quantised here by the fixture, not by the loader)."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.files import ModelFiles
from dist_backend.files.assemble import enable_fp8_storage
from dist_backend.files.tiny_files import write_qwenimage_files
from dist_backend.images import to_uint8
from tests.dist.engine_cases import (generate_once, prompts_with_text_length, reference, reference_images,
                                     with_file_weights)

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def qwen_files(tiny_dirs, tmp_path_factory):
    """storage -> ModelFiles of the tiny Qwen-Image (configs and tokenizer borrowed from its diffusers folder)."""
    root = tmp_path_factory.mktemp("qwen-files")
    return {storage: ModelFiles(family="qwenimage", configs=str(tiny_dirs["qwenimage"]),
                                **write_qwenimage_files(tiny_dirs["qwenimage"], root / storage, storage=storage,
                                                        comfy_prefix=True))
            for storage in ("fp32", "scaled_fp8")}


def test_fp32_files_with_comfy_prefix_give_the_folder_latents_on_two_ranks(qwen_files, tiny_pipes):
    latents, images, _ = generate_once(SessionConfig(world_size=2, threads_per_rank=1), qwen_files["fp32"],
                                       "qwenimage", PROMPTS, seed=3)
    expected = reference(tiny_pipes, "qwenimage", PROMPTS, seed=3)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] qwen-image fp32 files, dp2: max abs latent diff vs the folder in one process = {diff:.3e}")
    # Bit for bit: the weights are (tests/unit/test_qwen_single_file.py), and so is every latent here (Flux's files can
    # differ in the last bit, see tests/dist/test_files.py; Qwen-Image's measured none).
    assert torch.equal(latents, expected)
    assert torch.equal(to_uint8(images), reference_images(tiny_pipes, "qwenimage", expected))


def test_scaled_fp8_files_kept_in_fp8_under_ulysses_equal_the_same_weights_in_one_process(qwen_files, tiny_pipes):
    prompts = prompts_with_text_length(tiny_pipes["qwenimage"], divisible_by=2, count=1)
    files = ModelFiles(**{**qwen_files["scaled_fp8"].to_message(), "weights": "fp8"})
    latents, _, modes = generate_once(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1), files, "qwenimage",
                                      prompts, seed=4)
    assert set(modes) <= {"ulysses", "ulysses_anything"}
    # The weights the fixture files hold: 2-D weights but the token embedding; lm_head is not in the files, and
    # only the logits read it.
    pipe = with_file_weights(tiny_pipes["qwenimage"], parts=("transformer", "text_encoder"), storage="scaled_fp8",
                             keep=("embed_tokens.weight", "lm_head.weight"))
    dequantised = reference({"qwenimage": pipe}, "qwenimage", prompts, seed=4)
    enable_fp8_storage(pipe.transformer, compute_dtype=torch.float32)
    expected = reference({"qwenimage": pipe}, "qwenimage", prompts, seed=4)
    plain = reference(tiny_pipes, "qwenimage", prompts, seed=4)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] qwen-image scaled fp8 files in fp8 storage, ulysses2: max abs latent diff vs one process = "
          f"{diff:.3e}; fp8 vs fp32 weights: {float((dequantised - plain).abs().max()):.3e}; fp8 storage vs "
          f"dequantised: {float((expected - dequantised).abs().max()):.3e}")
    assert diff <= 1e-4
    # Else the test is blind: the fp8 round trip and the fp8 storage each change the result.
    assert float((dequantised - plain).abs().max()) > 1e-3
    assert float((expected - dequantised).abs().max()) > 1e-4
