"""Flux from single files (the layouts ComfyUI users have) through the real sidecar, against the tiny diffusers
folder's pipeline in one process: the same latents bit for bit for fp32 files, and for fp8 files the same as the
folder's pipeline with the same dequantised weights (quantised here by the fixture, not by the loader)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.files import ModelFiles
from dist_backend.files.assemble import enable_fp8_storage
from dist_backend.files.tiny_files import quantise, write_flux_files
from dist_backend.images import to_uint8
from tests.dist.engine_cases import generate_once, reference, reference_images

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def flux_files(tiny_dirs, tmp_path_factory):
    """storage -> ModelFiles of the tiny Flux model (configs and tokenizers borrowed from its diffusers folder)."""
    root = tmp_path_factory.mktemp("flux-files")
    out = {}
    for storage, comfy_prefix in (("fp32", True), ("fp8", False), ("scaled_fp8", True)):
        paths = write_flux_files(tiny_dirs["flux"], root / storage, storage=storage, comfy_prefix=comfy_prefix)
        out[storage] = ModelFiles(family="flux", configs=str(tiny_dirs["flux"]), **paths)
    return out


# Linear weights the original Flux layout stores fused (one tensor, so one scale in a scaled fp8 file).
_FUSED = (re.compile(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)\.weight$"),
          re.compile(r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)\.weight$"),
          re.compile(r"single_transformer_blocks\.(\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)\.weight$"))


def _scale_group(key: str) -> str:
    for index, rx in enumerate(_FUSED):
        m = rx.match(key)
        if m and not (index < 2 and key.startswith("single_")):
            return f"{index}:{m.group(1)}"
    return key


def dequantised_pipe(pipe, *, scaled: bool):
    """The folder's pipeline with the transformer's and T5's linear weights replaced by their fp8 round trip, as
    the fp8 fixture files hold them (see tiny_files._fp8_candidate); a fused group shares one scale."""
    pipe = copy.deepcopy(pipe)
    for name in ("transformer", "text_encoder_2"):
        module = getattr(pipe, name)
        state = module.state_dict()
        keys = [k for k, t in state.items()
                if k.endswith(".weight") and t.ndim == 2 and k not in ("shared.weight", "encoder.embed_tokens.weight")]
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(_scale_group(key) if name == "transformer" else key, []).append(key)
        for members in groups.values():
            fused = torch.cat([state[k].flatten() for k in members])
            _, scale = quantise(fused, scaled=scaled)
            for key in members:
                t = state[key].float()
                q = (t / scale).to(torch.float8_e4m3fn) if scale is not None else t.to(torch.float8_e4m3fn)
                state[key] = q.float() * scale if scale is not None else q.float()
        module.load_state_dict(state)
    return pipe


def test_fp32_files_with_comfy_prefix_give_the_folder_latents_on_two_ranks(flux_files, tiny_pipes):
    # The weights are bit-identical to the folder's (tests/unit/test_single_file.py); the latents can differ in
    # the last bit because CPU matmul kernels round differently for differently aligned weight memory (measured
    # 2.4e-7 between folder and files on the same ranks), so the bound is the dp test's.
    latents, images, _ = generate_once(SessionConfig(world_size=2, threads_per_rank=1), flux_files["fp32"], "flux",
                                       PROMPTS, seed=3)
    expected = reference(tiny_pipes, "flux", PROMPTS, seed=3)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] fp32 files, dp2: max abs latent diff vs the folder in one process = {diff:.3e}")
    assert diff <= 1e-6
    assert torch.equal(to_uint8(images), reference_images(tiny_pipes, "flux", expected))


def test_scaled_fp8_files_under_ulysses_equal_the_dequantised_weights_in_one_process(flux_files, tiny_pipes):
    latents, _, modes = generate_once(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1),
                                      flux_files["scaled_fp8"], "flux", PROMPTS[:1], seed=4)
    assert modes == ["ulysses", "ulysses"]
    expected = reference({"flux": dequantised_pipe(tiny_pipes["flux"], scaled=True)}, "flux", PROMPTS[:1], seed=4)
    plain = reference(tiny_pipes, "flux", PROMPTS[:1], seed=4)
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] scaled fp8 files, ulysses2: max abs latent diff vs dequantised one process = {diff:.3e}; "
          f"fp8 vs fp32 weights: {float((expected - plain).abs().max()):.3e}")
    assert diff <= 1e-4
    assert float((expected - plain).abs().max()) > 1e-3, "the fp8 round trip must change the result (else the test is blind)"


def test_fp8_storage_keeps_fp8_weights_and_equals_layerwise_casting_in_one_process(flux_files, tiny_pipes):
    # Staged offload: every stage loads its part from the files again, so the files path of Residency is used too.
    files = ModelFiles(**{**flux_files["fp8"].to_message(), "weights": "fp8"})
    latents, _, _ = generate_once(SessionConfig(world_size=2, threads_per_rank=1, offload="staged"), files, "flux",
                                  PROMPTS, seed=5)
    pipe = dequantised_pipe(tiny_pipes["flux"], scaled=False)
    unstored = reference({"flux": pipe}, "flux", PROMPTS, seed=5)
    enable_fp8_storage(pipe.transformer, compute_dtype=torch.float32)
    expected = reference({"flux": pipe}, "flux", PROMPTS, seed=5)
    # fp8 storage also rounds the biases and the other layers' weights to fp8: a different result (else blind).
    assert float((expected - unstored).abs().max()) > 1e-4
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] fp8 storage (layerwise casting), dp2: max abs latent diff vs one process = {diff:.3e}")
    assert diff <= 1e-6
