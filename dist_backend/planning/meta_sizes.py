"""Sizes and layer splits of pipeline components, computed on the meta device: no weight is read or allocated.

A component is rebuilt from its config json under `accelerate.init_empty_weights()` and its tensors are then
cast the way `from_pretrained(dtype=...)` will cast them, so accelerate's size arithmetic
(`compute_module_sizes`, `infer_auto_device_map`) sees the bytes the real load will take. Building even a 12B
transformer this way takes well under a second. torch, diffusers, transformers and accelerate are imported inside
the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported inside the functions, as the package promises (see __init__)
    import torch

log = logging.getLogger(__name__)

_LIBRARIES = ("diffusers", "transformers")


def component_sizes(model_dir: str | Path, *, dtype: torch.dtype | str) -> dict[str, int]:
    """Bytes per weight-holding component of the diffusers folder `model_dir` once loaded with
    `dtype=dtype` (floating tensors converted to `dtype`, except the modules the library keeps in float32;
    integer tensors unchanged; tied weights counted once). Tokenizers and schedulers are not listed."""
    return {name: module_bytes(model) for name, model in build_meta_models(model_dir, dtype=dtype).items()}


def build_meta_models(model_dir: str | Path, *, dtype: torch.dtype | str) -> dict[str, torch.nn.Module]:
    """Every weight-holding component of `model_dir` (model_index.json) as a meta-device model in load dtype."""
    models = {}
    for name, entry in _model_index(model_dir).items():
        cls = _component_class(model_dir, name, entry)
        if cls is not None:
            models[name] = build_meta_model(model_dir, name, dtype=dtype)
    return models


def build_meta_model(model_dir: str | Path, component: str, *, dtype: torch.dtype | str) -> torch.nn.Module:
    """One component (a diffusers ModelMixin or a transformers PreTrainedModel) built from its config on the meta
    device and cast like `from_pretrained(dtype=dtype)` would cast it."""
    from accelerate import init_empty_weights

    index = _model_index(model_dir)
    if component not in index:
        raise ModelError(f"{component!r} is not a component of {str(model_dir)!r}; it has {sorted(index)}")
    cls = _component_class(model_dir, component, index[component])
    if cls is None:
        raise ModelError(f"{component!r} in {str(model_dir)!r} holds no weights ({index[component][1]})")
    folder = Path(model_dir) / component
    try:
        with init_empty_weights():
            if _is_diffusers_model(cls):
                model = cls.from_config(cls.load_config(str(folder)))
            else:
                model = cls._from_config(cls.config_class.from_pretrained(str(folder)), dtype=_torch_dtype(dtype))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot build {component!r} ({cls.__name__}) from {str(folder)!r}: {exc}") from exc
    if not _is_diffusers_model(cls):
        # transformers ties shared embeddings after loading the weights, not in __init__; tie here so the tied
        # copy is counted once, as it will be once loaded.
        model.tie_weights()
    return cast_like_loader(model, dtype=dtype)


def cast_like_loader(model: torch.nn.Module, *, dtype: torch.dtype | str) -> torch.nn.Module:
    """Cast the floating tensors of a (meta) model in place as `from_pretrained(dtype=dtype)` leaves them.

    Parameters go to `dtype`, except those the library keeps in float32: diffusers' `_keep_in_fp32_modules`
    for every dtype, transformers' `_keep_in_fp32_modules` for float16 only and `_keep_in_fp32_modules_strict`
    for float16/bfloat16 (a module matches when its name is a component of the dotted path, diffusers' rule).
    diffusers casts buffers too, but not its non-persistent ones when it keeps some modules in float32 (it then
    casts only what the checkpoint holds). transformers buffers are left as built: `build_meta_model` builds
    them under the load dtype, as transformers does. Assigning `.data` keeps tied parameters tied."""
    import torch

    dtype = _torch_dtype(dtype)
    keep = _fp32_modules(model, dtype)
    diffusers_model = _is_diffusers_model(type(model))

    def cast(name: str, tensor: torch.Tensor) -> None:
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)

    for name, param in model.named_parameters():
        cast(name, param)
    if diffusers_model:
        for prefix, module in model.named_modules():
            for name, buffer in module.named_buffers(recurse=False):
                if not keep or name not in module._non_persistent_buffers_set:
                    cast(f"{prefix}.{name}" if prefix else name, buffer)
    return model


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each shared tensor once)."""
    return sum(module_bytes_per_device(model, {"": 0}).values())


def module_bytes_per_device(model: torch.nn.Module, device_map: Mapping[str, Any]) -> dict[Any, int]:
    """Bytes each device of `device_map` (module path -> device, accelerate's form) receives. Each tensor goes to
    the device of its longest listed prefix, as diffusers resolves it when loading; computed here without
    accelerate, so tests can check accelerate's result independently."""
    used: dict[Any, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        path = name
        while path not in device_map:
            assert path, f"{name} has no device in the map; diffusers would refuse to load it"
            path = path.rpartition(".")[0]
        device = device_map[path]
        used[device] = used.get(device, 0) + tensor.numel() * tensor.element_size()
    return used


def split_module(meta_model: torch.nn.Module, *, budgets: Mapping[int, int], balanced: bool = True
                 ) -> dict[str, int | str]:
    """Split `meta_model` by layer over local GPUs with `budgets` bytes each, with accelerate's
    `infer_auto_device_map(meta_model, max_memory=..., no_split_module_classes=<the model's _no_split_modules>)`.
    `balanced` first evens the caps with `get_balanced_memory` (what diffusers does for device_map="auto");
    otherwise GPUs fill in index order. The model's tensor dtypes must be the load dtypes (`cast_like_loader`).
    Returns module path -> local GPU index; raises ConfigError when any part would have to leave the GPUs."""
    device_map, why = infer_split(meta_model, budgets=budgets, balanced=balanced)
    if device_map is None or any(not isinstance(d, int) for d in device_map.values()):
        raise ConfigError(f"{type(meta_model).__name__} needs {human_bytes(module_bytes(meta_model))} but "
                          f"{why or 'does not fit'}; raise max_memory or add gpus_per_rank")
    return device_map


def infer_split(model: torch.nn.Module, *, budgets: Mapping[int, int], balanced: bool = True
                ) -> tuple[dict[str, int | str] | None, str]:
    """(accelerate's map, "") when the model fits the GPUs; (map with "disk" entries or None, why) otherwise."""
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    no_split = _no_split_classes(model)
    if no_split is None:
        return None, f"{type(model).__name__} declares no _no_split_modules, so it cannot be split by layer"
    room = {int(g): int(b) for g, b in sorted(budgets.items()) if b > 0}
    if not room:
        return None, "no GPU has room left"
    # Without a "cpu" entry accelerate sends whatever does not fit to "disk", which is how we detect a misfit.
    attempts = [get_balanced_memory(model, max_memory=dict(room), no_split_module_classes=no_split)] \
        if balanced and len(room) > 1 else []
    attempts.append(dict(room))  # balancing can cost a fit that filling in order finds
    for max_memory in attempts:
        device_map = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
        if all(isinstance(d, int) for d in device_map.values()):
            return device_map, ""
    sizes = compute_module_sizes(model)
    blocks = [sizes[n] for n, m in model.named_modules() if n and type(m).__name__ in no_split]
    largest = max(blocks, default=0)
    return device_map, (f"it splits only between whole {'/'.join(sorted(no_split))} blocks (largest "
                        f"{human_bytes(largest)}) and accelerate keeps room for the largest layer on GPU {min(room)}")


# -- helpers --------------------------------------------------------------------------------------------------

def _no_split_classes(model: torch.nn.Module) -> list[str] | None:
    getter = getattr(model, "_get_no_split_modules", None)  # diffusers: collects submodels' lists, as it loads
    if getter is not None:
        try:
            return list(getter("auto"))
        except ValueError:  # a submodel declares none: diffusers itself refuses device_map for it
            return None
    classes = getattr(model, "_no_split_modules", None)  # transformers: already collected on the instance
    return None if classes is None else list(classes)


def _fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    import torch

    if _is_diffusers_model(type(model)):
        return set(type(model)._keep_in_fp32_modules or ())
    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def _is_diffusers_model(cls: type) -> bool:
    # By name, so that casting a model does not import diffusers.
    return any(c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers") for c in cls.__mro__)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(getattr(dtype, "value", dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'")
    return value


def _model_index(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} cannot be read ({exc}); point at a diffusers pipeline folder") from None
    return {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}


def _component_class(model_dir: str | Path, name: str, entry: list) -> type | None:
    """The torch module class of a component, or None for weightless ones (tokenizer, scheduler, None)."""
    import torch

    library, class_name = entry
    if library is None or class_name is None:
        return None
    modules = [library] if library in _LIBRARIES else [f"diffusers.pipelines.{library}", library]
    for module_name in modules:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if cls is not None:
            break
    else:
        raise ModelError(f"{name!r} in {str(model_dir)!r} names {library}.{class_name}, which is not installed")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None
    if not (_is_diffusers_model(cls) or hasattr(cls, "config_class")):
        raise ModelError(f"{name!r} ({class_name}) is neither a diffusers nor a transformers model; "
                         "its size cannot be known without loading it")
    return cls


def human_bytes(n: int) -> str:
    """23802816640 -> "23.8 GB": three significant digits, decimal units (as GPU vendors and accelerate's "GB")."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            x = n / scale
            return f"{x:.3g} {unit}" if x < 1000 else f"{x:.0f} {unit}"
    return f"{n} bytes"
