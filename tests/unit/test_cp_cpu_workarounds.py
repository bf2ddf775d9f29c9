"""The CPU workarounds for diffusers' context parallelism, in one process (the multi-rank effect is in tests/dist)."""

from __future__ import annotations

import pytest
import torch

from dist_backend.errors import ConfigError
from dist_backend.strategies.cp_cpu_workarounds import (
    cpu_attention_with_lse,
    install_cpu_workarounds,
    workarounds_installed,
)


def _qkv(seed: int = 0, *, batch: int = 2, sq: int = 7, skv: int = 5, heads: int = 3, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, s, heads, dim, generator=gen) for s in (sq, skv, skv))  # diffusers layout (B, S, H, D)


def _reference(query, key, value, bias):
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    return (scores.softmax(-1) @ v).permute(0, 2, 1, 3), torch.logsumexp(scores, -1).permute(0, 2, 1)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_cpu_attention_with_lse_matches_softmax_attention(mask_kind):
    query, key, value = _qkv()
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]  # (B, 1, 1, S_kv)
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) if mask_kind != "none" else torch.zeros(1)
    mask = {"none": None, "bool": keep, "float": bias}[mask_kind]
    out, lse = cpu_attention_with_lse(query, key, value, attn_mask=mask)
    ref_out, ref_lse = _reference(query, key, value, bias)
    assert out.shape == query.shape and lse.shape == query.shape[:3] and lse.dtype == torch.float32
    assert (out - ref_out).abs().max() < 1e-5
    assert (lse - ref_lse).abs().max() < 1e-5


def test_install_is_idempotent_and_leaves_the_plain_path_alone():
    from diffusers.models import attention_dispatch

    install_cpu_workarounds()
    patched = attention_dispatch._native_attention_forward_op
    install_cpu_workarounds()
    assert workarounds_installed() and attention_dispatch._native_attention_forward_op is patched

    class Ctx:  # stands in for the autograd context diffusers passes
        def save_for_backward(self, *tensors):
            self.saved = tensors

    query, key, value = _qkv(1)
    original = patched._distdiff_original
    # Without return_lse the wrapper must be the stock op, bit for bit; with it, it returns (out, lse).
    assert torch.equal(patched(Ctx(), query, key, value), original(Ctx(), query, key, value))
    out, lse = patched(Ctx(), query, key, value, None, 0.0, False, None, False, True)
    assert torch.allclose(out, original(Ctx(), query, key, value), atol=1e-6)
    assert lse.shape == query.shape[:3]


def test_build_mesh_checks_the_world_size():
    import torch.distributed as dist

    from dist_backend.strategies.context_parallel import build_mesh

    if dist.is_initialized():
        pytest.skip("another test left a default process group behind")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match=r"dp \(2\) × cfg \(1\) × ring \(1\) × ulysses \(2\) = 4, but world_size is 1"):
            build_mesh(device_type="cpu", dp=2, ring=1, ulysses=2)
        mesh = build_mesh(device_type="cpu", dp=1, ring=1, ulysses=1)
        assert mesh.mesh_dim_names == ("dp", "cfg", "ring", "ulysses") and tuple(mesh["ring", "ulysses"].shape) == (1, 1)
    finally:
        dist.destroy_process_group()
