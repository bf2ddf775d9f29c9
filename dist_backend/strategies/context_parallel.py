"""Context parallelism (Ring / Ulysses attention) through diffusers' own `ContextParallelConfig` and
`model.enable_parallelism`; we write no attention kernels of our own.

The engine builds ONE DeviceMesh of shape (dp, cfg, ring, ulysses) named ("dp", "cfg", "ring", "ulysses") with
`build_mesh`; each (dp, cfg) slice is an independent CP group (cfg = 2: the two halves compute the two guidance
branches of one image), and `mesh["ring", "ulysses"]` is what diffusers gets. What this module adds around diffusers (checked against 0.42.1):

- `cp_config_for` picks plain / `ulysses_anything` / `ring_anything` from the sequence lengths the request will
  split, and refuses up front what diffusers would only reject mid-forward (or, for ring×ulysses, not at all).
- `check_heads` says whether Ulysses can split the attention heads.
- `refuse_ring_with_mask` refuses Ring with a padding mask, which diffusers computes silently wrong.
- `enable_context_parallel` sets the attention backend, installs the CPU workarounds and enables CP.

Nothing happens at import: torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError, UnsupportedError
from ..config import WireEnum
from .cp_cpu_workarounds import install_cpu_workarounds

if TYPE_CHECKING:
    import torch
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "CP_MODEL_CLASSES",
    "MESH_DIM_NAMES",
    "build_mesh",
    "check_heads",
    "cp_config_for",
    "cp_mode",
    "cp_submesh",
    "disable_context_parallel",
    "enable_context_parallel",
    "install_cpu_workarounds",
    "refuse_ring_with_mask",
]

logger = logging.getLogger(__name__)

MESH_DIM_NAMES = ("dp", "cfg", "ring", "ulysses")
"""Names of the engine's one device mesh, outermost first: data parallel, CFG parallel, then the two CP dimensions."""

CP_MODEL_CLASSES = (
    "FluxTransformer2DModel",
    "Flux2Transformer2DModel",
    "QwenImageTransformer2DModel",
    "WanTransformer3DModel",
    "LTXVideoTransformer3DModel",
    "LTX2VideoTransformer3DModel",
    "ChronoEditTransformer3DModel",
    "HeliosTransformer3DModel",
    "MiniMaxH3Transformer3DModel",
)
"""Transformer classes with a `_cp_plan` in diffusers 0.42.1 (the check itself reads `_cp_plan`, so newer ones work)."""


def check_heads(num_heads: int, ulysses: int, *, anything: bool = False) -> None:
    """Raise ConfigError when Ulysses with `ulysses` ranks cannot split `num_heads` attention heads.

    Plain Ulysses needs `num_heads % ulysses == 0`. `ulysses_anything` pads the heads up to a multiple of the degree
    and gives the padding to the last rank, which must keep at least one real head (diffusers asserts
    `pad < padded_heads / ulysses`): 3 heads on 2 ranks work, 6 heads on 4 ranks do not.
    """
    if ulysses <= 1 or num_heads % ulysses == 0:
        return
    if anything:
        pad = ulysses - num_heads % ulysses
        local = (num_heads + pad) // ulysses
        if pad < local:
            return
        raise ConfigError(
            f"{num_heads} attention heads cannot be split over ulysses = {ulysses} ranks even with ulysses_anything: "
            f"padding to {num_heads + pad} heads gives {local} per rank, and the last rank would hold {pad} "
            f"padding heads ({pad} ≥ {local}). Use a ulysses degree that divides {num_heads}, or Ring."
        )
    raise ConfigError(
        f"{num_heads} attention heads are not divisible by ulysses = {ulysses} ({num_heads} % {ulysses} = "
        f"{num_heads % ulysses}). Use a ulysses degree that divides {num_heads}"
        + (", or ring instead" if ulysses > 1 else "")
        + "."
    )


def _divisor_hint(name: str, degree: int) -> str:
    """How to make a token count divisible: image/video tokens follow the size, text tokens the prompt."""
    lowered = name.lower()
    if "image" in lowered or "video" in lowered or "latent" in lowered:
        return (
            f"choose width/height so that the {name} are a multiple of {degree} (e.g. a width that is a multiple "
            f"of {16 * degree} px where one token covers 16×16 px, as in Flux, Qwen-Image and Wan)"
        )
    return f"pad or truncate the {name} to a multiple of {degree}"


def cp_config_for(
    *,
    ring: int,
    ulysses: int,
    mesh: DeviceMesh | None,
    seq_lengths: Mapping[str, int],
    num_heads: int | None = None,
) -> ContextParallelConfig:
    """The diffusers ContextParallelConfig for this request, choosing the mode from the lengths it splits.

    Args:
        ring: Ring degree (≥ 1).
        ulysses: Ulysses degree (≥ 1); ring × ulysses must be > 1.
        mesh: the (ring, ulysses) mesh (see `cp_submesh`), or None to let diffusers build one over all ranks.
        seq_lengths: every sequence length the model's `_cp_plan` splits in any call of this request, by a
            user-facing name, e.g. {"image tokens": 4096, "text tokens": 512, "negative text tokens": 7}.
        num_heads: attention heads, checked against the Ulysses degree when given.

    A length that does not divide ring × ulysses selects `ulysses_anything` (ring == 1) or `ring_anything`
    (ulysses == 1); with both degrees > 1 diffusers has no uneven mode, so that is a ConfigError with the arithmetic.
    """
    from diffusers import ContextParallelConfig

    if ring < 1 or ulysses < 1:
        raise ConfigError(f"ring ({ring}) and ulysses ({ulysses}) must both be ≥ 1")
    degree = ring * ulysses
    if degree == 1:
        raise ConfigError("ring = ulysses = 1 is not context parallelism; do not call cp_config_for for it")
    for name, length in seq_lengths.items():
        if length < degree:
            raise ConfigError(
                f"{name} = {length} is shorter than ring×ulysses = {ring}×{ulysses} = {degree}: "
                "every CP rank needs at least one token. Use fewer CP ranks."
            )
    uneven = {name: length for name, length in seq_lengths.items() if length % degree}
    heads_uneven = num_heads is not None and ulysses > 1 and num_heads % ulysses != 0

    if not uneven and not heads_uneven:
        return ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh)

    if ring > 1 and ulysses > 1:
        if heads_uneven:
            check_heads(num_heads, ulysses)  # raises with the head arithmetic
        name, length = next(iter(uneven.items()))
        raise ConfigError(
            f"{name} {length} not divisible by ring×ulysses = {ring}×{ulysses} = {degree} "
            f"({length} % {degree} = {length % degree}); diffusers' uneven modes work with one CP method only. "
            f"Either {_divisor_hint(name, degree)}, or use a single CP method (ring = 1 or ulysses = 1)."
        )
    if ulysses > 1:
        if num_heads is not None:
            check_heads(num_heads, ulysses, anything=True)
        logger.info("CP: ulysses_anything (ulysses=%d) for uneven %s", ulysses, uneven or f"heads={num_heads}")
        return ContextParallelConfig(ulysses_degree=ulysses, ulysses_anything=True, mesh=mesh)
    logger.info("CP: ring_anything (ring=%d) for uneven %s", ring, uneven)
    return ContextParallelConfig(ring_degree=ring, ring_anything=True, mesh=mesh)


def refuse_ring_with_mask(*, ring: int, uses_mask: bool, what: str) -> None:
    """Raise UnsupportedError when Ring attention would see a padding mask.

    `uses_mask` means a mask with at least one padded (False/0) position. An all-ones mask is harmless to plain Ring
    but must still be passed as None: ring_anything raises on any mask, and diffusers' Qwen-Image pipeline itself
    turns an all-ones mask into None (so one prompt per call never has a mask).

    diffusers' Ring passes each rank's local mask slice to the attention of *every* KV chunk it receives, so with
    padding (e.g. a Qwen-Image batch of prompts of different lengths) the result is silently wrong; ring_anything
    raises instead. Measured with diffusers 0.42.1 (tiny Qwen-Image: 2 layers, 4 heads, float32; a batch of prompts
    of 5 and 8 tokens padded to 8; ring = 2 over gloo): max abs diff 1.5e-2 against one process for outputs of
    magnitude ≤ 1.6 (about 1 %), with no error raised; the same batch under Ulysses: 3e-7; Ring without a mask:
    ≤ 5e-7.
    tests/dist/test_cp_transformer.py::test_ring_with_padding_mask_is_wrong_in_diffusers re-measures it.
    """
    if ring > 1 and uses_mask:
        raise UnsupportedError(
            f"{what} needs an attention padding mask, and Ring attention (ring = {ring}) applies such a mask "
            "wrongly in diffusers (a silently wrong image, no error). Use ulysses instead of ring, or send one "
            "prompt per call (a single prompt needs no padding mask)."
        )


def build_mesh(*, device_type: str, dp: int, ring: int, ulysses: int, cfg: int = 1) -> DeviceMesh:
    """The engine's one DeviceMesh over all ranks: shape (dp, cfg, ring, ulysses), named MESH_DIM_NAMES.

    Must be called by every rank with the same arguments (it creates process groups: a collective). Ranks are laid
    out dp-major, so ranks [k·cfg·ring·ulysses, (k+1)·cfg·ring·ulysses) form data-parallel group k; inside it, each
    cfg half of ring·ulysses consecutive ranks is one CP group, and `mesh["cfg"]` pairs the ranks of the two halves
    that hold the same token shard (see strategies/cfg_parallel.py).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    for name, value in (("dp", dp), ("cfg", cfg), ("ring", ring), ("ulysses", ulysses)):
        if value < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {value}")
    world_size = dist.get_world_size()
    if dp * cfg * ring * ulysses != world_size:
        raise ConfigError(
            f"dp ({dp}) × cfg ({cfg}) × ring ({ring}) × ulysses ({ulysses}) = {dp * cfg * ring * ulysses}, "
            f"but world_size is {world_size}"
        )
    return init_device_mesh(device_type, (dp, cfg, ring, ulysses), mesh_dim_names=MESH_DIM_NAMES)


def cp_submesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ("ring", "ulysses") part of `mesh` (the engine's 3-D mesh, or already a 2-D CP mesh)."""
    names = tuple(mesh.mesh_dim_names or ())
    if names == ("ring", "ulysses"):
        return mesh
    if "ring" not in names or "ulysses" not in names:
        raise ConfigError(f"the device mesh needs 'ring' and 'ulysses' dimensions, got {names}")
    return mesh["ring", "ulysses"]


def enable_context_parallel(
    transformer: torch.nn.Module,
    *,
    ring: int,
    ulysses: int,
    mesh: DeviceMesh,
    seq_lengths: Mapping[str, int],
    attention_backend: str | None = None,
) -> None:
    """Make `transformer` compute its attention sharded over the (ring, ulysses) part of `mesh`.

    Every rank of the CP group must call this with the same arguments (diffusers creates process groups), after
    loading LoRAs/adapters and setting attention processors (swapping them afterwards gives wrong output), and
    every rank of a CP group must then feed identical inputs. The model's forward signature is unchanged.

    Args:
        transformer: a diffusers transformer whose class has a `_cp_plan` (see CP_MODEL_CLASSES).
        ring, ulysses: CP degrees; both 1 leaves the model untouched.
        mesh: the engine mesh from `build_mesh` (or its ("ring", "ulysses") submesh).
        seq_lengths: every sequence length the plan will split, by name (see `cp_config_for`).
        attention_backend: diffusers backend name for CUDA (e.g. "flash", "_native_cudnn"); None keeps the model's
            backend on CUDA. CPU parameters always use "native", the only backend that runs on CPU.
    """
    if ring * ulysses == 1:
        logger.debug("CP: ring = ulysses = 1, model left as is")
        return
    plan = getattr(type(transformer), "_cp_plan", None)
    if not plan:
        raise ModelError(
            f"{type(transformer).__name__} has no context-parallel plan in diffusers, so it cannot run with "
            f"ring/ulysses > 1. Supported: {', '.join(CP_MODEL_CLASSES)}. Use data parallel (dp) for this model."
        )
    submesh = cp_submesh(mesh)
    if tuple(submesh.shape) != (ring, ulysses):
        raise ConfigError(f"mesh (ring, ulysses) shape is {tuple(submesh.shape)}, but ring={ring}, ulysses={ulysses}")
    num_heads = getattr(transformer.config, "num_attention_heads", None)
    config = cp_config_for(ring=ring, ulysses=ulysses, mesh=submesh, seq_lengths=seq_lengths, num_heads=num_heads)

    device_type = next(transformer.parameters()).device.type
    if device_type == "cpu":
        backend = "native"
        if attention_backend not in (None, "native"):
            logger.warning("CP: attention backend %r does not run on CPU; using 'native'", attention_backend)
    else:
        backend = attention_backend
        if ring > 1 and (backend or _model_attention_backend(transformer)) == "native":
            # Stock diffusers would fail only at the first forward ("Native attention does not support
            # return_lse=True"): Ring merges partial results by their log-sum-exp. Our CPU op covers CPU only.
            raise ConfigError(
                f"ring = {ring} on {device_type} needs an attention backend that returns the log-sum-exp; 'native' "
                "does not. Use attention_backend='_native_cudnn' or '_native_flash' (bf16/fp16), 'flash' "
                "(flash-attn installed), or ulysses instead of ring."
            )
    if backend is not None:
        transformer.set_attention_backend(backend)
    install_cpu_workarounds()  # inert on CUDA tensors; needed before enable_parallelism on a CPU-only host
    transformer.enable_parallelism(config=config)
    logger.info(
        "CP enabled on %s: ring=%d ulysses=%d anything=%s backend=%s",
        type(transformer).__name__,
        ring,
        ulysses,
        config.ring_anything or config.ulysses_anything,
        backend or "model default",
    )


def _model_attention_backend(transformer: torch.nn.Module) -> str:
    """The backend the model's attention processors use now (their own setting, else diffusers' active one)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        chosen = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if chosen is not None:
            return getattr(chosen, "value", str(chosen))
    return _AttentionBackendRegistry.get_active_backend()[0].value


def disable_context_parallel(transformer: torch.nn.Module) -> None:
    """Undo `enable_context_parallel`: the model computes alone again and may be given another CP config.

    diffusers 0.42.1 has no public way back (`enable_parallelism` refuses a second call), so without this a new
    ring/ulysses choice would mean reloading the weights. We remove the hooks diffusers registered from the plan
    (its own `remove_context_parallel`) and clear the config it stored on the model and its attention processors.
    Every rank of the CP group must call it at the same point, before any further forward.
    """
    from diffusers.hooks.context_parallel import remove_context_parallel
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    parallel = getattr(transformer, "_parallel_config", None)
    if parallel is None or parallel.context_parallel_config is None:
        return
    remove_context_parallel(transformer, type(transformer)._cp_plan)
    for module in transformer.modules():
        if isinstance(module, (Attention, MochiAttention, AttentionModuleMixin)):
            if getattr(module.processor, "_parallel_config", None) is not None:
                module.processor._parallel_config = None
    transformer._parallel_config = None
    logger.info("CP disabled on %s", type(transformer).__name__)


class CPMode(WireEnum):
    """How context parallelism runs on a transformer (reported by every rank after a denoise)."""

    ULYSSES = "ulysses"
    RING = "ring"
    RING_ULYSSES = "ring×ulysses"
    ULYSSES_ANYTHING = "ulysses_anything"  # diffusers' uneven Ulysses (odd lengths or heads)
    RING_ANYTHING = "ring_anything"  # diffusers' uneven Ring

    @classmethod
    def of(cls, config: Any) -> "CPMode":
        """The mode of a diffusers ContextParallelConfig."""
        if config.ring_anything:
            return cls.RING_ANYTHING
        if config.ulysses_anything:
            return cls.ULYSSES_ANYTHING
        if config.ring_degree > 1 and config.ulysses_degree > 1:
            return cls.RING_ULYSSES
        return cls.RING if config.ring_degree > 1 else cls.ULYSSES


def cp_mode(transformer: Any) -> CPMode | None:
    """The CP mode enabled on `transformer`, or None when CP is not enabled."""
    parallel = getattr(transformer, "_parallel_config", None)
    config = getattr(parallel, "context_parallel_config", None)
    return None if config is None else CPMode.of(config)
