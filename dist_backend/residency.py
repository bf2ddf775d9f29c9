"""Which pipeline components are in memory on this rank, and the staged load/free of the guide.

Heavy components (those with weights) are loaded one at a time, each straight onto the rank's device, before the
next one is read: `<ModelClass>.from_pretrained(subfolder=..., device_map={"": device})` for a diffusers folder
(diffusers and transformers read the safetensors memory-mapped and place tensor by tensor), or
`files.assemble.load_files_component` for single files (memory-mapped with `safe_open`, converted tensor by tensor on
the device). So a rank's host memory never holds more than the mapped pages of the file being read plus one tensor
in conversion, and on the CPU, where the compute dtype equals the file's, the weights stay the mapped file pages
themselves: N ranks share one copy in the page cache (bench/host_memory.py measures it). The pipeline around them
(tokenizers, scheduler) comes from `DiffusionPipeline.from_pretrained` with the heavy components passed in, so
diffusers keeps doing the library-specific work; we only decide what is resident when.
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
        self.load_log: list[tuple[str, str]] = []  # (component, device it landed on), in the order they were read

    def ensure(self, needed: Iterable[str]) -> Any:
        """Load what `needed` lacks; return the pipeline. Components not asked for are left as they are."""
        needed = {c for c in needed if c in self.heavy}
        missing = needed - self.loaded
        if self.pipe is not None and not missing:
            return self.pipe
        with self._loading():
            return self._load(missing)

    def _load(self, missing: set[str]) -> Any:
        built: dict[str, Any] = {}
        for name in (c for c in self.heavy if c in missing):  # the stage order: encoders, denoiser, VAE
            module = self._read_component(name)
            module.eval().requires_grad_(False)
            built[name] = module
            # What was placed, in order: each component is on its device before the next one is read.
            self.load_log.append((name, str(next(module.parameters()).device)))
        if self.pipe is None:
            self.pipe = self._shell(built)
            self.pipe.set_progress_bar_config(disable=True)  # progress goes to the host, not to the rank's log
        else:
            self.pipe.register_modules(**built)
        self.loaded |= missing
        for name in missing:
            self.load_counts[name] = self.load_counts.get(name, 0) + 1
        return self.pipe

    def _read_component(self, name: str) -> torch.nn.Module:
        if self.files_info is not None:
            from .files.assemble import load_files_component

            return load_files_component(self.files_info, name, dtype=self.dtype, device=self.device)
        # device_map sharding over this rank's GPUs when planned, else the whole component on the rank's device.
        kwargs = self._load_kwargs(name) or {"device_map": {"": str(self.device)}}
        log.info("loading %s from %s (%s)", name, self.model_dir, kwargs)
        return load_component(self.model_dir, name, dtype=self.dtype, **kwargs)

    def _shell(self, built: dict[str, Any]) -> Any:
        """The pipeline object with `built` in it and the other heavy components None (loaded later, if staged)."""
        given = {c: built.get(c) for c in self.heavy}
        if self.files_info is not None:
            from .files.assemble import files_pipeline

            return files_pipeline(self.files_info, built=given)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(self.model_dir, dtype=self.dtype, **given)

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
