"""The CUDA side of the CP strategy, in one process on the device machine (marked gpu; skipped without CUDA).

Multi-rank CUDA CP cannot run on the lent machine: it has one GPU, NCCL refuses two ranks of one communicator on
the same GPU, and two gloo ranks sharing cuda:0 died with SIGSEGV in the first collective of a Ring forward
(torch 2.11+cu130).
What is checked here is that our CPU workarounds stay out of CUDA's way and that CUDA misuse is refused up front.
The CPU multi-rank tests (tests/dist) also pass on that GPU host, where diffusers' own device computation runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dist_backend.errors import ConfigError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the device machine)"),
]


class _Ctx:  # stands in for the autograd context diffusers passes to forward ops
    def save_for_backward(self, *tensors):
        self.saved = tensors


def test_cpu_lse_op_leaves_cuda_tensors_to_stock_diffusers():
    from diffusers.models import attention_dispatch

    from dist_backend.strategies.cp_cpu_workarounds import install_cpu_workarounds

    install_cpu_workarounds()
    patched = attention_dispatch._native_attention_forward_op
    original = patched._distdiff_original
    query, key, value = (torch.randn(1, 6, 2, 8, device="cuda") for _ in range(3))
    assert torch.equal(patched(_Ctx(), query, key, value), original(_Ctx(), query, key, value))
    with pytest.raises(ValueError, match="does not support return_lse=True"):  # stock refusal, not our CPU op
        patched(_Ctx(), query, key, value, None, 0.0, False, None, False, True)


def test_ring_with_native_backend_on_cuda_is_refused_up_front():
    from diffusers import FluxTransformer2DModel

    from dist_backend.strategies.context_parallel import enable_context_parallel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    ).to("cuda")  # fmt: skip
    mesh = SimpleNamespace(mesh_dim_names=("ring", "ulysses"), shape=(2, 1))  # refused before any collective
    with pytest.raises(ConfigError, match="ring = 2 on cuda needs an attention backend that returns the log-sum-exp"):
        enable_context_parallel(model, ring=2, ulysses=1, mesh=mesh, seq_lengths={"image tokens": 16},
                                attention_backend="native")  # fmt: skip
    assert model._parallel_config is None

