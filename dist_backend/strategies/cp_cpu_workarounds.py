"""Three small patches that let diffusers' context parallelism run on CPU ranks over gloo.

Checked against diffusers 0.42.1 and torch 2.13.0+cpu. Each patch wraps one diffusers function, takes our path only
in the CPU situation it fixes, and otherwise calls the original unchanged, so CUDA/NCCL ranks behave exactly as
stock diffusers. `install_cpu_workarounds()` is called by a rank at runtime (never at import) and is idempotent.

Why each patch exists (all three were reproduced on this machine before writing them):

1. `ModelMixin._resolve_parallel_config` computes `torch.device(type, rank % torch.accelerator.device_count())`
   before it looks at the mesh we pass, so a host without an accelerator dies with ZeroDivisionError (device count
   0). Passing our own mesh does not avoid it. The device it computes is only stored (`_device`; read by tensor
   parallel loading, never by context parallel), so while the original runs we count a CPU-only host as one
   device. `torch._C._get_accelerator().type` is "cpu" on such a host, so the resulting device is `cpu:0`.
2. Ring attention needs each partial result's log-sum-exp, and the native backend's forward op refuses
   `return_lse=True` ("Native attention does not support return_lse=True"). On CPU only the native backend runs
   (the others need CUDA kernels), so Ring, ring_anything and ring×ulysses could not run at all. torch's CPU flash
   kernel `aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask, scale)
   -> (out, logsumexp)` returns both; it takes (B, H, S, D) and returns out (B, H, S, D) and lse (B, H, S) in
   float32, and accepts an additive float mask of the query's dtype (not a bool mask), so we convert bool masks.
3. `*_anything` modes gather outputs with `dist.all_gather` into tensors of different sizes, which gloo rejects
   ("ProcessGroupGloo::allgather: invalid tensor size") when the token count does not divide the CP degree. We pad
   to the largest share, gather, and trim. (The attention-mask gather in diffusers' Ulysses-anything path already
   pads to the largest share in 0.42.1, so it needs no patch; plain Ulysses gathers equal shares.)
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

CHECKED_DIFFUSERS_VERSION = "0.42.1"
_PATCH_MARK = "_distdiff_original"  # attribute on each wrapper holding the function it wraps
_install_lock = threading.Lock()
_device_count_lock = threading.Lock()


def install_cpu_workarounds() -> None:
    """Install the three CPU patches into diffusers (idempotent; safe to call on CUDA ranks, where they delegate).

    Call it on every rank before `enable_parallelism`; it never runs at import time.
    """
    import diffusers

    with _install_lock:
        _patch_resolve_parallel_config()
        _patch_native_forward_op()
        _patch_all_gather_anything()
    if diffusers.__version__ != CHECKED_DIFFUSERS_VERSION:
        logger.debug(
            "CP CPU workarounds were checked against diffusers %s; running %s",
            CHECKED_DIFFUSERS_VERSION,
            diffusers.__version__,
        )


def workarounds_installed() -> bool:
    """True once all three patches are in place (tests and diagnostics use it)."""
    from diffusers.hooks import context_parallel as cp_hooks
    from diffusers.models import attention_dispatch
    from diffusers.models.modeling_utils import ModelMixin

    return all(
        hasattr(fn, _PATCH_MARK)
        for fn in (
            ModelMixin._resolve_parallel_config,
            attention_dispatch._native_attention_forward_op,
            cp_hooks._all_gather_anything,
        )
    )


# --- 1. device count on a host without accelerator -------------------------------------------------------------


def _patch_resolve_parallel_config() -> None:
    from diffusers.models.modeling_utils import ModelMixin

    original = ModelMixin._resolve_parallel_config
    if hasattr(original, _PATCH_MARK):
        return

    @functools.wraps(original)
    def resolve_parallel_config(self: Any, config: Any) -> Any:
        import torch

        if torch.accelerator.device_count() > 0:
            return original(self, config)  # an accelerator host: stock behaviour
        # CPU-only host: diffusers divides by the device count (0). Count the host as one device only while the
        # original runs; the lock keeps two threads from restoring each other's value.
        with _device_count_lock:
            real_device_count = torch.accelerator.device_count
            torch.accelerator.device_count = lambda: 1
            try:
                return original(self, config)
            finally:
                torch.accelerator.device_count = real_device_count

    setattr(resolve_parallel_config, _PATCH_MARK, original)
    ModelMixin._resolve_parallel_config = resolve_parallel_config


# --- 2. an LSE-returning attention op for CPU tensors ----------------------------------------------------------


def _patch_native_forward_op() -> None:
    from diffusers.models import attention_dispatch

    original = attention_dispatch._native_attention_forward_op
    if hasattr(original, _PATCH_MARK):
        return

    @functools.wraps(original)
    def native_attention_forward_op(
        ctx: Any,
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> Any:
        if not return_lse or query.device.type != "cpu":
            # Ulysses (no LSE) and every CUDA tensor: the stock op, unchanged.
            return original(
                ctx,
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale,
                enable_gqa,
                return_lse,
                _save_ctx=_save_ctx,
                _parallel_config=_parallel_config,
            )
        if _save_ctx:
            # The same fields the stock op saves, so diffusers' native backward op still finds what it reads.
            ctx.save_for_backward(query, key, value)
            ctx.attn_mask = attn_mask
            ctx.dropout_p = dropout_p
            ctx.is_causal = is_causal
            ctx.scale = scale
            ctx.enable_gqa = enable_gqa
        return cpu_attention_with_lse(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )

    setattr(native_attention_forward_op, _PATCH_MARK, original)
    attention_dispatch._native_attention_forward_op = native_attention_forward_op


def cpu_attention_with_lse(
    query: Any,
    key: Any,
    value: Any,
    *,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Any, Any]:
    """Attention on CPU tensors in diffusers' layout: q/k/v (B, S, H, D) -> (out (B, S, H, D), lse (B, S, H)).

    lse is float32 (the kernel's choice), which is what Ring's merge wants anyway.
    """
    import torch

    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # The CPU flash kernel takes only additive masks of the query's dtype. finfo.min rather than -inf: a
            # ring step whose KV chunk is fully masked for a row then yields a very negative (finite) LSE that the
            # merge weighs as ~0, instead of NaN.
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            attn_mask = additive.masked_fill(~attn_mask, torch.finfo(q.dtype).min)
        else:
            attn_mask = attn_mask.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)


# --- 3. uneven all_gather on gloo ------------------------------------------------------------------------------


def _patch_all_gather_anything() -> None:
    from diffusers.hooks import context_parallel as cp_hooks
    from diffusers.utils.torch_utils import maybe_allow_in_graph

    original = cp_hooks._all_gather_anything
    if hasattr(original, _PATCH_MARK):
        return

    @maybe_allow_in_graph  # as the original, so torch.compile treats it the same way
    def all_gather_anything(tensor: Any, dim: int, group: Any) -> Any:
        if tensor.device.type != "cpu":
            return original(tensor, dim, group)  # NCCL gathers uneven shares itself
        return all_gather_padded(tensor, dim=dim, group=group)

    # No functools.wraps here: `__wrapped__` could lead torch.compile back to the unpatched function.
    all_gather_anything.__doc__ = original.__doc__
    setattr(all_gather_anything, _PATCH_MARK, original)
    cp_hooks._all_gather_anything = all_gather_anything


def all_gather_padded(tensor: Any, *, dim: int, group: Any) -> Any:
    """Concatenate every rank's `tensor` along `dim` when the ranks' sizes along `dim` differ (gloo-safe).

    NOTE: two collectives (sizes, then data), entered by every rank of `group` in the same order whatever its
    share, so no rank can skip one and hang the others.
    """
    import torch
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import gather_size_by_comm

    tensor = tensor.contiguous()
    sizes = gather_size_by_comm(tensor.shape[dim], group)
    largest = max(sizes)
    if tensor.shape[dim] < largest:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = largest - tensor.shape[dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)
