"""The engine's CUDA path (NCCL process group, components on the GPU, bf16) against the plain pipeline on the same
GPU. Marked gpu: runs on the device machine when one is lent (one GPU there, so one rank)."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.latent_format import latent_format
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.session import Session

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
@pytest.mark.parametrize("offload", ["resident", "staged"])
def test_cuda_rank_matches_the_pipeline_on_the_same_gpu(family, dtype, offload, tiny_dirs):
    from diffusers import DiffusionPipeline

    size = dict(height=64, width=64, num_frames=5 if family == "wan" else 1)
    guidance = 3.5 if family == "flux" else 1.0
    session = Session(SessionConfig(world_size=1, device="cuda", dtype=dtype, offload=offload))
    try:
        latents, images = session.generate(model_dir=tiny_dirs[family], prompts=PROMPTS, seed=3, steps=3,
                                           guidance=guidance, **size)
    finally:
        session.close()
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family], dtype=getattr(torch, dtype)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(family)
    expected = torch.cat([adapter.reference(pipe, prompt=p, negative_prompt=None,
                                            request=ImageRequest(seed=3 + j, steps=3, guidance=guidance, **size))
                          for j, p in enumerate(PROMPTS)])
    expected = latent_format({"family": family, "components": {"vae": dict(pipe.vae.config)}}).process_out(
        expected.float().cpu())
    diff = float((latents.float() - expected.float()).abs().max())
    print(f"\n[measured] cuda {family} {dtype} {offload}: max abs diff vs pipeline on the same GPU = {diff:.3e}")
    assert diff <= (1e-4 if dtype == "float32" else 2e-2)
    assert images.shape[0] == len(PROMPTS) * size["num_frames"]
