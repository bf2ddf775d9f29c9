"""Step caching through diffusers' own cache hooks (`model.enable_cache` with `FirstBlockCacheConfig`,
`TaylorSeerCacheConfig`, `MagCacheConfig`): a transformer forward reuses cached block outputs instead of computing
them when the cache decides the step changes little. We write no cache; we make its decision safe under context
parallelism and count what it skipped.

Which decisions depend on the data (checked against diffusers 0.42.1):
- first_block: after the first block, `FBCHeadBlockHook._should_compute_remaining_blocks` compares the relative
  absmean change of that block's residual with the threshold. Under CP each rank holds only its token shard, so
  each rank would measure its own change and could decide differently: one rank runs the remaining blocks (and their
  attention collectives) while its peer skips them, a hang or a wrong image. `install_group_decision` replaces
  that one method with the same measurement over the whole CP group: the sums of |Δresidual| and |residual| are
  all-reduced before dividing (the ratio of means is the ratio of sums, so no counts are needed), which is the
  one-process value up to summation order, and every rank gets the same boolean.
- taylorseer: a fixed schedule (warm-up steps, then a full compute every `cache_interval` steps); nothing to agree on.
- magcache: a fixed schedule too, from precomputed magnitude ratios (diffusers ships them for Flux only:
  `FLUX_MAG_RATIOS`), interpolated to the call's step count.
So only first_block needs the group decision; all three are counted the same way (forwards whose blocks were skipped).

The cache is enabled per image (fresh state, as a plain pipeline call with `enable_cache` has) and removed after.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import CacheMode
from ..errors import ConfigError, UnsupportedError

log = logging.getLogger(__name__)

__all__ = ["CacheStats", "cache_config_for", "check_cache_family", "group_relative_change", "step_cache"]

_FBC_LEADER = "fbc_leader_block_hook"  # diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK
_MAG_LEADER = "mag_cache_leader_block_hook"  # diffusers.hooks.mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK


DEFAULT_THRESHOLDS = {CacheMode.FIRST_BLOCK: 0.05, CacheMode.MAGCACHE: 0.06}
"""diffusers' defaults (FirstBlockCacheConfig.threshold, MagCacheConfig.threshold); 0 in our config means these."""


@dataclass
class CacheStats:
    forwards: int = 0
    """Decisions taken (one per transformer forward)."""
    skipped: int = 0
    """Forwards in which the cache skipped the blocks (reused or predicted their output)."""


def check_cache_family(mode: CacheMode, family: str) -> None:
    """ConfigError for a cache the model family cannot use (the config checks the rest), before any rank starts."""
    if CacheMode(mode) is CacheMode.MAGCACHE and str(family) != "flux":
        raise ConfigError(f"cache='magcache' needs magnitude ratios calibrated for the model; diffusers ships them for "
                          f"Flux only and this model is {family}: use cache='first_block' or 'taylorseer'")


def cache_config_for(mode: CacheMode, *, threshold: float, steps: int):
    """The diffusers cache config for `mode` (None for NONE). `threshold` 0 = diffusers' default."""
    mode = CacheMode(mode)
    if mode is CacheMode.NONE:
        return None
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if mode is CacheMode.FIRST_BLOCK:
        return FirstBlockCacheConfig(threshold=threshold or DEFAULT_THRESHOLDS[mode])
    if mode is CacheMode.MAGCACHE:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(threshold=threshold or DEFAULT_THRESHOLDS[mode], num_inference_steps=steps,
                              mag_ratios=FLUX_MAG_RATIOS)
    return TaylorSeerCacheConfig()


def group_relative_change(residual: torch.Tensor, previous: torch.Tensor, group) -> float:
    """mean|residual − previous| / mean|previous| over the whole CP group (each rank passes its shard).

    NOTE: symmetric: every rank of the CP group calls this once per transformer forward (the first block runs on
    every rank, and this runs right after it), so the all_reduce cannot be left waiting.
    """
    sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).to(torch.float64)
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    return float(sums[0] / sums[1])


def _leader_hooks(model, name: str):
    """(module, hook) for every module of `model` whose diffusers hook registry holds a hook named `name`."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(name) if registry is not None else None
        if hook is not None:
            yield module, hook


def _count_first_block(model, stats: CacheStats, group) -> None:
    """Replace the leader hook's decision by the group decision (counted)."""
    hooks = list(_leader_hooks(model, _FBC_LEADER))
    if len(hooks) != 1:
        raise UnsupportedError(f"expected one first-block-cache leader hook on {type(model).__name__}, found "
                               f"{len(hooks)}; this diffusers version is not supported for cache='first_block'")
    hook = hooks[0][1]

    @torch.compiler.disable
    def decide(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        compute = previous is None or group_relative_change(residual, previous, group) > hook.threshold
        stats.forwards += 1
        stats.skipped += not compute
        return compute

    hook._should_compute_remaining_blocks = decide


def _count_magcache(model, stats: CacheStats):
    """Count MagCache's own decision after each leader-block forward (its registry captured new_forward already, so
    a torch forward hook on the leader block reads the state it just set). Returns the hook handle."""
    hooks = list(_leader_hooks(model, _MAG_LEADER))
    if len(hooks) != 1:
        raise UnsupportedError(f"expected one MagCache leader hook on {type(model).__name__}, found {len(hooks)}")
    module, hook = hooks[0]

    def counted(_module, _args, _output):
        stats.forwards += 1
        stats.skipped += not hook.state_manager.get_state().should_compute

    return module.register_forward_hook(counted)


def _count_taylorseer(model, stats: CacheStats) -> None:
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook

    hooks = [h for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
             for h in m._diffusers_hook.hooks.values() if isinstance(h, TaylorSeerCacheHook)]
    if not hooks:
        raise UnsupportedError(f"TaylorSeer found no module to cache in {type(model).__name__}")
    hook = hooks[0]  # every hook follows the same schedule; the first one counts the forwards
    measure = hook._measure_should_compute

    def counted():
        compute, state = measure()
        stats.forwards += 1
        stats.skipped += not compute
        return compute, state

    hook._measure_should_compute = counted


@contextlib.contextmanager
def step_cache(model, *, mode: CacheMode, threshold: float, steps: int, group=None) -> Iterator[CacheStats | None]:
    """Within the block `model` caches steps per `mode` (diffusers' hooks, fresh state), with the first-block
    decision taken over `group` (the CP group; None in one process). Yields the skip counter; removes the cache on
    exit. Enable it after context parallelism, so the cache hooks see the sharded block inputs."""
    mode = CacheMode(mode)
    if mode is CacheMode.NONE:
        yield None
        return
    stats = CacheStats()
    handle = None
    try:
        model.enable_cache(cache_config_for(mode, threshold=threshold, steps=steps))
    except IndexError:  # diffusers pops a tail block from the blocks after the first: there is none
        raise UnsupportedError(f"cache={mode.value!r} needs a transformer with at least 2 blocks; "
                               f"{type(model).__name__} has 1: use cache='none'") from None
    try:
        if mode is CacheMode.FIRST_BLOCK:
            _count_first_block(model, stats, group)
        elif mode is CacheMode.MAGCACHE:
            handle = _count_magcache(model, stats)
        else:
            _count_taylorseer(model, stats)
        yield stats
    finally:
        if handle is not None:
            handle.remove()
        model.disable_cache()
    log.debug("cache %s: skipped %d of %d forwards", mode.value, stats.skipped, stats.forwards)
