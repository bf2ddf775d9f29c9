"""LoRA adapters through diffusers' own loaders: the host checks the files, every rank makes its pipeline hold
exactly the wanted set.

diffusers reads and converts every layout it knows for the family (diffusers/PEFT, kohya/sd-scripts, XLabs,
the original trainers'); we only decide *when* and *which*:

- `lora_specs` (host, no torch): each file exists, is a whole safetensors file whose tensor names look like a
  LoRA, the strength is finite; the same file twice becomes one adapter with the strengths added (a LoRA's
  delta is linear in its strength); strength 0 is dropped. Each file gets an adapter name derived from its path,
  size and mtime, so every rank names it the same and an edited file is loaded again.
- `sync_loras` (rank): `delete_adapters` for what is no longer wanted, `load_lora_weights` for what is missing,
  `set_adapters(names, strengths)`; the base weights are never touched, so removing every LoRA gives the base
  model's exact output and a strength change costs no reload. Context parallelism is disabled first when the
  adapters change, because diffusers must wrap the layers before its CP hooks are placed (see ../shared/FACTS.md;
  RankEngine._set_cp_mode enables CP again at the next denoise).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "distdiff_"
"""Adapters this engine manages carry this prefix; others (none today) are left alone."""
_FIX = "give a LoRA .safetensors file (diffusers/PEFT or kohya layout) made for this model family"


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """One LoRA of the wanted set, as checked on the host and sent to every rank."""

    path: str
    """Absolute path of the .safetensors file (ranks read it themselves)."""
    strength: float
    """The adapter weight given to diffusers' set_adapters; may be negative."""
    name: str
    """Adapter name: ADAPTER_PREFIX + a digest of path, size and mtime (the same on every rank)."""

    def to_message(self) -> dict[str, Any]:
        return {"path": self.path, "strength": self.strength, "name": self.name}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> LoraSpec:
        return cls(path=str(message["path"]), strength=float(message["strength"]), name=str(message["name"]))


def lora_specs(loras: Iterable[tuple[str | os.PathLike, float]]) -> tuple[LoraSpec, ...]:
    """Check (path, strength) pairs on the host and return the wanted set in order (first appearance of a file).

    Raises ConfigError naming the file for: a missing file, a file that is not a whole safetensors file, a
    safetensors file without LoRA tensors (e.g. a full checkpoint), a strength that is not a finite number.
    """
    from .pipelines import check_safetensors

    merged: dict[str, list] = {}  # real path -> [strength, size, mtime_ns]
    for index, item in enumerate(loras):
        try:
            raw_path, strength = item
        except (TypeError, ValueError):
            raise ConfigError(f"LoRA {index}: expected a (path, strength) pair, got {item!r}") from None
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ConfigError(f"LoRA {str(raw_path)!r}: strength must be a finite number, got {strength!r}")
        path = Path(raw_path).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"LoRA file {str(path)!r} does not exist; {_FIX}")
        if path.suffix.lower() != ".safetensors":
            raise ConfigError(f"LoRA file {str(path)!r} is not a .safetensors file (pickled .bin/.pt LoRAs are not "
                              f"loaded, they can run code); {_FIX}")
        try:
            header = check_safetensors(path, fix=_FIX)
        except ModelError as exc:
            raise ConfigError(f"LoRA file {exc}") from None
        names = [k for k in header if k != "__metadata__"]
        if not any("lora" in k.lower() for k in names):
            sample = ", ".join(names[:3]) or "none"
            raise ConfigError(f"LoRA file {str(path)!r} holds no LoRA layers: none of its {len(names)} tensor names "
                              f"contains 'lora' (first ones: {sample}); it looks like a full checkpoint. {_FIX}")
        stat = path.stat()
        key = str(path)
        if key in merged:
            merged[key][0] += float(strength)
        else:
            merged[key] = [float(strength), stat.st_size, stat.st_mtime_ns]
    specs = []
    for path, (strength, size, mtime) in merged.items():
        if strength == 0.0:
            continue  # no effect: not worth loading
        digest = hashlib.sha1(f"{path}|{size}|{mtime}".encode()).hexdigest()[:16]
        specs.append(LoraSpec(path=path, strength=strength, name=ADAPTER_PREFIX + digest))
    return tuple(specs)


def loaded_adapters(pipe) -> set[str]:
    """Our adapter names present in any LoRA-loadable component of `pipe` (diffusers' own bookkeeping)."""
    found: set[str] = set()
    for names in pipe.get_list_adapters().values():
        found.update(n for n in names if n.startswith(ADAPTER_PREFIX))
    return found


def sync_loras(pipe, *, specs: tuple[LoraSpec, ...], before_change: Callable[[], None]) -> bool:
    """Make the pipeline's transformer (and whatever other component diffusers loads the file into) hold exactly
    `specs` with their strengths. Returns True when anything changed.

    `before_change` runs once before the first change (the engine disables context parallelism there). A file
    that fails to load raises ModelError naming it; the caller must then treat the components as dirty (a failed
    diffusers load may have left partial state) and reload them.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return False  # staged offload: applied when the denoise stage loads the transformer again
    wanted = {s.name: s for s in specs}
    loaded = loaded_adapters(pipe)
    state = (tuple(s.name for s in specs), tuple(s.strength for s in specs))
    if loaded == set(wanted) and getattr(transformer, "_distdiff_lora_state", None) == state:
        return False
    before_change()
    stale = sorted(loaded - set(wanted))
    if stale:
        pipe.delete_adapters(stale)
        log.info("LoRA: removed %d adapter(s)", len(stale))
    for spec in specs:
        if spec.name in loaded:
            continue
        try:
            pipe.load_lora_weights(spec.path, adapter_name=spec.name)
        except Exception as exc:  # noqa: BLE001 - any loader failure is this file's fault; re-raised with its name
            absent = [c for c in getattr(pipe, "_lora_loadable_modules", ()) if c.startswith("text_encoder")
                      and getattr(pipe, c, None) is None]
            hint = (f" If the file also changes {', '.join(absent)}: offload=staged does not keep text encoders "
                    "loaded with the transformer, use offload=resident for such LoRAs." if absent else "")
            raise ModelError(f"LoRA file {spec.path!r} does not fit this {type(transformer).__name__} "
                             f"({type(exc).__name__}: {str(exc)[:500]}); {_FIX}.{hint}") from exc
        if spec.name not in loaded_adapters(pipe):
            # diffusers only warns when no key matched a layer of any component; an adapter that changes nothing
            # would be a silent no-op.
            raise ModelError(f"LoRA file {spec.path!r} has no layer that matches this {type(transformer).__name__}; "
                             f"{_FIX}")
        log.info("LoRA: loaded %s as %s", spec.path, spec.name)
    if specs:
        pipe.set_adapters([s.name for s in specs], [s.strength for s in specs])
    transformer._distdiff_lora_state = state
    return True
