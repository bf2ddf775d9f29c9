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


def test_ranks_use_exactly_the_listed_gpus_and_load_each_component_onto_them(tiny_dirs):
    """The `gpus` list (SessionConfig.gpu_ids): rank r runs on the r-th listed GPU, and every component is read
    straight onto it. With two or more GPUs the list is given out of order (last, first), so the default
    mapping (rank r on GPU r) would fail."""
    count = torch.cuda.device_count()
    ids = (count - 1, 0) if count >= 2 else (0,)
    session = Session(SessionConfig(world_size=len(ids), device="cuda", dtype="bfloat16", gpu_ids=ids))
    try:
        session.load(tiny_dirs["flux"])
        pings = session.sidecar.call("ping", [{}] * len(ids))
    finally:
        session.close()
    assert [p["device"] for p in pings] == [f"cuda:{g}" for g in ids]
    for ping, gpu in zip(pings, ids):
        assert ping["load_log"] == [[c, f"cuda:{gpu}"] for c in ("text_encoder", "text_encoder_2", "transformer",
                                                                   "vae")]
