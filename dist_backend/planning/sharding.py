"""device_map sharding of one rank's components over its GPUs: the plan (pure, see placement.py) for
a model folder, and the per-component `from_pretrained` keyword arguments that realise it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Offload, SessionConfig


def stage_map(adapter) -> dict[str, str]:
    return {**{c: "encode" for c in adapter.text_components}, **{c: "denoise" for c in adapter.denoise_components},
            **{c: "decode" for c in adapter.decode_components}}


def plan_for_model(model_dir: str, *, config: SessionConfig, adapter, budgets: dict[int, int], models: set[str]):
    """The placement plan of `model_dir`'s weighted components over budgets {local GPU: bytes}. Raises
    ConfigError with the arithmetic when a stage does not fit; runs on meta-device models (no weights read)."""
    import torch

    from .placement import build_meta_models, component_sizes, plan_placement

    dtype = getattr(torch, config.dtype.value)
    stages = {c: s for c, s in stage_map(adapter).items() if c in models}
    sizes = {c: n for c, n in component_sizes(model_dir, dtype=dtype).items() if c in stages}
    meta = {c: m for c, m in build_meta_models(model_dir, dtype=dtype).items() if c in stages}
    return plan_placement(sizes=sizes, budgets=budgets, policy=config.device_map.value,
                          staged=config.offload is Offload.STAGED, stage_of=stages, meta_models=meta)


def rank_budgets(config: SessionConfig, gpus: tuple[int, ...]) -> dict[int, int]:
    """max_memory when given, else 90 % of what each of the rank's GPUs has free now (activations need the rest)."""
    from .placement import parse_max_memory

    if config.max_memory:
        return parse_max_memory(config.max_memory)
    import torch

    return {local: int(torch.cuda.mem_get_info(cuda)[0] * 0.9) for local, cuda in enumerate(gpus)}


def load_kwargs_for(plan, adapter, gpus: tuple[int, ...]) -> Callable[[str], dict[str, Any]]:
    from .placement import to_diffusers_kwargs

    stages = stage_map(adapter)

    def kwargs(name: str) -> dict[str, Any]:
        return to_diffusers_kwargs(plan, stage=stages[name], component=name, device_ids=gpus)

    return kwargs
