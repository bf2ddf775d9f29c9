"""Which pipeline components are in memory on this rank, and the staged load/free of the guide.

Loading goes through `DiffusionPipeline.from_pretrained` with the unwanted heavy components passed as None, so
diffusers keeps doing the library-specific work (dtype, safetensors, tokenizers, schedulers); we only decide
what is resident when. A model given as single files (`files_info`, see dist_backend.files) is built by
`files.assemble.load_files_pipeline` instead, with the same "only these heavy components" contract.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


class Residency:
    """The rank's pipeline object and the set of heavy components currently loaded into it."""

    def __init__(
        self, model_dir: str, *, heavy: Iterable[str], dtype: torch.dtype, device: torch.device,
        load_kwargs: Callable[[str], dict[str, Any]] | None = None, files_info: dict[str, Any] | None = None,
        loading: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model_dir = model_dir  # for single files: the ModelFiles key (a name, not a path)
        self.files_info = files_info
        self.heavy = tuple(heavy)
        self.dtype = dtype
        self.device = device
        self._load_kwargs = load_kwargs or (lambda name: {})
        self._loading = loading or contextlib.nullcontext  # entered around every load (the rank's beats report it)
        self.pipe = None
        self.loaded: set[str] = set()
        self.load_counts: dict[str, int] = {}  # component -> times read from disk (tests prove what was not reloaded)

    def ensure(self, needed: Iterable[str]) -> Any:
        """Load what `needed` lacks; return the pipeline. Components not asked for are left as they are."""
        needed = {c for c in needed if c in self.heavy}
        missing = needed - self.loaded
        if self.pipe is not None and not missing:
            return self.pipe
        with self._loading():
            return self._load(missing)

    def _load(self, missing: set[str]) -> Any:
        if self.files_info is not None:
            from .files.assemble import load_files_pipeline

            log.info("loading %s from single files", sorted(missing) or "pipeline shell")
            fresh = load_files_pipeline(self.files_info, components=missing, dtype=self.dtype)
        else:
            fresh = self._from_folder(missing)
        fresh.set_progress_bar_config(disable=True)  # progress goes to the host, not to the rank's log
        for name in missing:
            module = getattr(fresh, name)
            if not getattr(module, "hf_device_map", None):  # device_map-placed modules are already where they go
                module.to(self.device)
            module.eval().requires_grad_(False)
        if self.pipe is None:
            self.pipe = fresh
        else:
            self.pipe.register_modules(**{name: getattr(fresh, name) for name in missing})
        self.loaded |= missing
        for name in missing:
            self.load_counts[name] = self.load_counts.get(name, 0) + 1
        return self.pipe

    def _from_folder(self, missing: set[str]) -> Any:
        from diffusers import DiffusionPipeline

        skip: dict[str, Any] = {c: None for c in self.heavy if c not in missing}
        for name in missing:
            # A pipeline-level from_pretrained takes one string device_map for all components, so a component
            # with its own placement (device_map sharding over this rank's GPUs) is loaded alone and passed in.
            kwargs = self._load_kwargs(name)
            if kwargs:
                skip[name] = load_component(self.model_dir, name, dtype=self.dtype, **kwargs)
        log.info("loading %s from %s", sorted(missing) or "pipeline shell", self.model_dir)
        return DiffusionPipeline.from_pretrained(self.model_dir, dtype=self.dtype, **skip)

    def release(self, names: Iterable[str]) -> None:
        """Drop components from memory (staged offload). The next `ensure` that needs them reloads them."""
        drop = [n for n in names if n in self.loaded]
        if not drop or self.pipe is None:
            return
        self.pipe.register_modules(**{name: None for name in drop})
        self.loaded -= set(drop)
        free_memory(self.device)
        log.info("released %s", drop)

    def close(self) -> None:
        self.pipe = None
        self.loaded.clear()
        free_memory(self.device)


def load_component(model_dir: str, name: str, *, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """One component by the library and class model_index.json names for it."""
    import importlib
    import json
    import os

    with open(os.path.join(model_dir, "model_index.json"), encoding="utf-8") as f:
        library, class_name = json.load(f)[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(model_dir, subfolder=name, dtype=dtype, **kwargs)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
