"""The device_map sharding plan of one rank that owns several GPUs (`gpus_per_rank` > 1), as pure functions.

The guide's recipe: text encoders with `device_map="balanced"` + `max_memory`, the transformer with
`device_map="auto"` + `max_memory`, the VAE on one device; with staged offload each stage (encode, denoise,
decode) is freed before the next loads, so each stage may use the whole budget. We do not hand those strings to
diffusers. We decide the placement here, from sizes and made-up or real budgets, and hand diffusers explicit maps:

- diffusers' pipeline-level "balanced" was seen to drop components that do not fit (its CPU entry is
  overwritten, FACTS.md); this planner places every component or raises with the arithmetic, never drops one;
- diffusers' model-level "auto" re-derives a map with `get_balanced_memory` and sends what does not fit to
  "disk" (then fails asking for an offload folder); an explicit map is exactly what was planned and tested;
- no machine here has two GPUs, so the decision must be testable without them (accelerate sizes meta models).

On a rank without GPUs (empty budgets) the plan collapses to "cpu": every component loads whole on the CPU with
no device_map at all (`to_diffusers_kwargs` returns {}). We do not pass `device_map="balanced"` on CPU: diffusers
then loads everything on the CPU anyway (FACTS.md), and RAM is not budgeted here.

Meta-model helpers (`component_sizes`, `build_meta_models`, `split_module`) live in `meta_sizes`.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..config import DeviceMapPolicy
from ..errors import ConfigError
from .hardware import SIZE_UNITS
from .meta_sizes import (  # re-exported: one import site for the loader
    build_meta_model, build_meta_models, cast_like_loader, component_sizes, human_bytes as _human, infer_split,
    module_bytes_per_device, split_module,
)

log = logging.getLogger(__name__)

__all__ = [
    "Stage", "ComponentPlacement", "StagePlan", "PlacementPlan", "parse_max_memory", "format_max_memory",
    "plan_placement", "to_diffusers_kwargs", "component_sizes", "build_meta_model", "build_meta_models",
    "cast_like_loader", "split_module",
]

_EXAMPLE = 'write GPU=SIZE pairs separated by commas, e.g. "0=16GB,1=16GB" (units GB, GiB, MB, MiB, or plain bytes)'
_TOKEN = re.compile(r"^\s*(\d+)\s*=\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class Stage(str, enum.Enum):
    """A step of one call; with staged offload only the components of the running stage are in memory."""

    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"


@dataclass(frozen=True, kw_only=True)
class ComponentPlacement:
    """Where one pipeline component goes."""

    component: str
    """Pipeline attribute ("transformer", "text_encoder_2", ...)."""
    stage: Stage
    """The stage that uses it."""
    size: int
    """Bytes of its weights in the load dtype."""
    device: int | str | None
    """Local GPU index holding it whole, "cpu" when the plan collapsed to CPU, None when split over GPUs."""
    used: dict[int, int]
    """Bytes it puts on each local GPU (an in-order estimate when split without a meta model)."""
    device_map: dict[str, int] | None = None
    """Split with a meta model: accelerate's map, module path -> local GPU index; every parameter is covered."""
    max_memory: dict[int, int] | None = None
    """Split: bytes per local GPU this component may take (what its stage had left for it)."""

    @property
    def split(self) -> bool:
        return self.device is None


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """The components of one stage and the GPU memory in use while it runs."""

    stage: Stage
    components: tuple[ComponentPlacement, ...]
    used: dict[int, int]
    """Bytes on each local GPU while this stage runs (resident: every component of every stage)."""


@dataclass(frozen=True, kw_only=True)
class PlacementPlan:
    """The whole plan of one rank. Every component given to `plan_placement` is in exactly one stage."""

    policy: DeviceMapPolicy
    staged: bool
    budgets: dict[int, int]
    """Bytes per local GPU (empty: the CPU plan)."""
    stages: tuple[StagePlan, ...]
    """Stages in run order; stages without components are left out."""

    @property
    def on_cpu(self) -> bool:
        return not self.budgets

    def component(self, name: str) -> ComponentPlacement:
        for stage in self.stages:
            for placed in stage.components:
                if placed.component == name:
                    return placed
        raise KeyError(f"{name!r} is not in this plan; it has {sorted(self.components())}")

    def components(self) -> list[str]:
        return [p.component for s in self.stages for p in s.components]

    def describe(self) -> str:
        """One line per component, for logs and error reports."""
        lines = [f"placement ({self.policy.value}, {'staged' if self.staged else 'resident'}, "
                 f"{_offer(self.budgets) if self.budgets else 'cpu'}):"]
        for stage in self.stages:
            for p in stage.components:
                if p.split:
                    where = "split " + " + ".join(f"GPU {g}: {_human(b)}" for g, b in sorted(p.used.items()))
                else:
                    where = f"GPU {p.device}" if isinstance(p.device, int) else str(p.device)
                lines.append(f"  {stage.stage.value:<7} {p.component:<16} {_human(p.size):>9} -> {where}")
        return "\n".join(lines)


# -- max_memory text ------------------------------------------------------------------------------------------

def parse_max_memory(text: str) -> dict[int, int]:
    """"0=16GB,1=16GiB" -> {0: 16_000_000_000, 1: 17_179_869_184}: bytes per local GPU index (as the rank sees
    its GPUs). GB/MB are powers of ten and GiB/MiB powers of two, as in accelerate; units are case-insensitive
    and always bytes (accelerate reads a lower-case "Gb" as bits; nobody means that for a GPU budget). A number
    without a unit is bytes. The budget is for weights: leave room for activations below the card's size.
    An empty text means no budget given ({}). Raises ConfigError naming the bad token."""
    budgets: dict[int, int] = {}
    for token in text.split(","):
        if not token.strip():  # "" and a trailing comma mean nothing more
            continue
        match = _TOKEN.match(token)
        unit = match and SIZE_UNITS.get(match.group(3).upper())
        if not match or unit is None:
            raise ConfigError(f"max_memory: cannot read {token.strip()!r}; {_EXAMPLE}")
        gpu, number = int(match.group(1)), Decimal(match.group(2))
        value = number * unit
        if value != value.to_integral_value():
            raise ConfigError(f"max_memory: {token.strip()!r} is not a whole number of bytes; {_EXAMPLE}")
        if value <= 0:
            raise ConfigError(f"max_memory: {token.strip()!r} gives GPU {gpu} no memory; leave GPU {gpu} out "
                              f"instead; {_EXAMPLE}")
        if gpu in budgets:
            raise ConfigError(f"max_memory: GPU {gpu} is given twice ({token.strip()!r}); {_EXAMPLE}")
        budgets[gpu] = int(value)
    return budgets


def format_max_memory(budgets: Mapping[int, int]) -> str:
    """The inverse of `parse_max_memory`: the largest unit that states each budget exactly."""
    parts = []
    for gpu, size in sorted(budgets.items()):
        unit = next((u for u in ("GiB", "GB", "MiB", "MB") if size % SIZE_UNITS[u.upper()] == 0), "")
        parts.append(f"{gpu}={size // SIZE_UNITS[unit.upper()]}{unit}")
    return ",".join(parts)


# -- the plan -------------------------------------------------------------------------------------------------

def plan_placement(
    *, sizes: Mapping[str, int], budgets: Mapping[int, int], policy: DeviceMapPolicy | str, staged: bool,
    stage_of: Mapping[str, Stage | str], meta_models: Mapping[str, Any] | None = None,
) -> PlacementPlan:
    """Place every component of `sizes` (bytes in the load dtype) on the local GPUs of `budgets` (bytes each).

    Staged: each stage is placed alone with the full budgets. Resident: all components at once. Within a pool the
    largest component goes first; it goes whole to one GPU when one has room ("balanced": the GPU with the most
    room left; "auto": the lowest index with room); otherwise it is split by layer over the room that is left.
    A split uses accelerate on `meta_models[name]` (see `split_module`) when given, and records an exact map;
    without it the split is planned on its size alone and loaded with device_map="auto" + max_memory, which is
    safe only as the last split of its pool (ValueError otherwise). `stage_of` may name weightless components
    (tokenizers); every component of `sizes` must be in it. Raises ConfigError with the arithmetic when a
    stage does not fit."""
    policy = _policy(policy)
    budgets = {int(g): int(b) for g, b in sorted(budgets.items())}
    if any(b <= 0 for b in budgets.values()) or any(g < 0 for g in budgets):
        raise ConfigError(f"max_memory: every GPU index must be ≥ 0 and every budget > 0, got {budgets}")
    stages = _stages(sizes, stage_of)
    meta_models = meta_models or {}
    if not budgets:
        plans = [StagePlan(stage=st, used={}, components=tuple(
            ComponentPlacement(component=c, stage=st, size=int(sizes[c]), device="cpu", used={}) for c in names))
            for st, names in stages.items()]
        return PlacementPlan(policy=policy, staged=staged, budgets={}, stages=tuple(plans))
    if staged:
        plans = []
        for st, names in stages.items():
            placed, used = _place_pool(names, stage_of={c: st for c in names}, sizes=sizes, budgets=budgets,
                                       policy=policy, staged=True, meta_models=meta_models, label=f"{st.value} stage")
            plans.append(StagePlan(stage=st, components=tuple(placed), used=used))
    else:
        every = [c for names in stages.values() for c in names]
        owner = {c: st for st, names in stages.items() for c in names}
        placed, used = _place_pool(every, stage_of=owner, sizes=sizes, budgets=budgets, policy=policy,
                                   staged=False, meta_models=meta_models, label="keeping every component resident")
        plans = [StagePlan(stage=st, used=used, components=tuple(p for p in placed if p.stage is st))
                 for st in stages]
    plan = PlacementPlan(policy=policy, staged=staged, budgets=budgets, stages=tuple(plans))
    # Our invariant, not a user error: nothing dropped, nothing over budget.
    assert sorted(plan.components()) == sorted(sizes), (plan.components(), sorted(sizes))
    assert all(s.used.get(g, 0) <= b for s in plan.stages for g, b in budgets.items()), plan.describe()
    log.info("%s", plan.describe())
    return plan


def _place_pool(names, *, stage_of, sizes, budgets, policy, staged, meta_models, label):
    """Place `names` together on `budgets`; return (placements, bytes used per GPU)."""
    total = sum(int(sizes[c]) for c in names)
    if total > sum(budgets.values()):
        raise ConfigError(f"{label}: {_needs(names, sizes)}; {_offer(budgets)}; {_fix(staged)}")
    free = dict(budgets)
    order = sorted(names, key=lambda c: (-int(sizes[c]), c))
    placed: dict[str, ComponentPlacement] = {}
    to_split = []
    for c in order:
        size = int(sizes[c])
        fits = [g for g in free if free[g] >= size]
        if not fits:
            to_split.append(c)
            continue
        gpu = min(fits, key=lambda g: (-free[g], g)) if policy is DeviceMapPolicy.BALANCED else min(fits)
        free[gpu] -= size
        placed[c] = ComponentPlacement(component=c, stage=stage_of[c], size=size, device=gpu, used={gpu: size})
    # Exact splits first: their use is known to the byte, so an estimated split (at most one) gets what is left.
    to_split.sort(key=lambda c: c not in meta_models)
    for i, c in enumerate(to_split):
        size, room = int(sizes[c]), {g: b for g, b in free.items() if b > 0}
        if size > sum(room.values()):
            raise ConfigError(f"{label}: {c} needs {_human(size)}; after placing the rest, {_offer(room, 'have')}"
                              f" left; {_fix(staged)}")
        if c in meta_models:
            device_map, used = _exact_split(c, meta_models[c], size=size, room=room, policy=policy,
                                            staged=staged, label=label)
        else:
            if i != len(to_split) - 1:
                raise ValueError(f"{c} and {to_split[i + 1]} must both be split in the {label} plan; pass "
                                 f"meta_models[{c!r}] so its exact use is known before the next one is placed")
            device_map, used = None, _fill_in_order(size, room)
        for g, b in used.items():
            free[g] -= b
        placed[c] = ComponentPlacement(component=c, stage=stage_of[c], size=size, device=None, used=used,
                                       device_map=device_map, max_memory=room)
    in_use = {g: budgets[g] - free[g] for g in budgets}
    return [placed[c] for c in names], in_use


def _exact_split(name, model, *, size, room, policy, staged, label):
    """accelerate's map for `model` over `room`; ConfigError with the arithmetic when any part spills."""
    device_map, why = infer_split(model, budgets=room, balanced=policy is DeviceMapPolicy.BALANCED)
    if device_map is None or any(not isinstance(d, int) for d in device_map.values()):
        detail = why or "accelerate could not fit it by whole layers"
        raise ConfigError(f"{label}: {name} needs {_human(size)} and {_offer(room, 'have')} left, but {detail}; "
                          f"{_fix(staged)}")
    used = module_bytes_per_device(model, device_map)
    assert all(used.get(g, 0) <= b for g, b in room.items()), (used, room)  # accelerate keeps each cap
    return dict(device_map), used


def _fill_in_order(size: int, room: Mapping[int, int]) -> dict[int, int]:
    used, left = {}, size
    for g, b in sorted(room.items()):
        used[g] = min(b, left)
        left -= used[g]
    return {g: b for g, b in used.items() if b}


def _stages(sizes: Mapping[str, int], stage_of: Mapping[str, Stage | str]) -> dict[Stage, list[str]]:
    missing = sorted(set(sizes) - set(stage_of))
    if missing:
        raise ConfigError(f"components {missing} have weights but no stage; say which of "
                          f"{[s.value for s in Stage]} uses each, so none is left out of the plan")
    out: dict[Stage, list[str]] = {st: [] for st in Stage}
    for c in sizes:
        try:
            out[Stage(stage_of[c])].append(c)
        except ValueError:
            raise ConfigError(f"stage {stage_of[c]!r} of {c!r} is not one of {[s.value for s in Stage]}") from None
        if int(sizes[c]) < 0:
            raise ConfigError(f"size of {c!r} is negative ({sizes[c]})")
    return {st: names for st, names in out.items() if names}


def _policy(policy: DeviceMapPolicy | str) -> DeviceMapPolicy:
    try:
        value = DeviceMapPolicy(policy)
    except ValueError:
        value = None
    if value not in (DeviceMapPolicy.BALANCED, DeviceMapPolicy.AUTO):
        raise ConfigError(f"device_map={policy!r} has no placement plan; use 'balanced' or 'auto' "
                          "('none' puts each component whole on the rank's first device)")
    return value


# -- what diffusers / transformers get ------------------------------------------------------------------------

def to_diffusers_kwargs(plan: PlacementPlan, *, stage: Stage | str, component: str,
                        device_ids: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Keyword arguments for `<ModelClass>.from_pretrained(model_dir, subfolder=component, dtype=...)`
    (diffusers ModelMixin or transformers PreTrainedModel, one component at a time: a pipeline-level
    `from_pretrained` takes one device_map for all components) that load `component` as planned.

    Whole on a GPU: {"device_map": {"": i}}. Split with a meta model: {"device_map": {module path: i, ...}}
    (accelerate's form; an explicit dict is used as given, so max_memory would be ignored and is not passed).
    Split on size alone: {"device_map": "auto", "max_memory": {i: bytes}} (the library then derives the map).
    CPU plan: {} (load normally). `i` is the local GPU index, which is the CUDA index when the rank's
    CUDA_VISIBLE_DEVICES lists only its own GPUs; otherwise pass `device_ids` (CUDA index of each local GPU)."""
    placed = plan.component(component)
    if placed.stage is not Stage(stage):
        raise ValueError(f"{component} is planned for the {placed.stage.value} stage, not {Stage(stage).value}")
    if plan.on_cpu:
        return {}

    def dev(i: int) -> int:
        return device_ids[i] if device_ids is not None else i

    if not placed.split:
        return {"device_map": {"": dev(placed.device)}}
    if placed.device_map is not None:
        return {"device_map": {k: dev(v) for k, v in placed.device_map.items()}}
    return {"device_map": "auto", "max_memory": {dev(g): b for g, b in placed.max_memory.items()}}


# -- messages -------------------------------------------------------------------------------------------------

def _offer(budgets: Mapping[int, int], verb: str = "offer") -> str:
    gpus = sorted(budgets)
    if len(gpus) == 1:
        return f"GPU {gpus[0]} {verb + 's' if verb == 'offer' else 'has'} {_human(budgets[gpus[0]])}"
    sizes = [budgets[g] for g in gpus]
    each = f"{len(gpus)}×{_human(sizes[0])}" if len(set(sizes)) == 1 else " + ".join(_human(s) for s in sizes)
    return f"GPUs {','.join(map(str, gpus))} {verb} {each} = {_human(sum(sizes))}"


def _needs(names, sizes) -> str:
    if len(names) == 1:
        return f"{names[0]} needs {_human(int(sizes[names[0]]))}"
    parts = " + ".join(f"{c} {_human(int(sizes[c]))}" for c in sorted(names, key=lambda c: -int(sizes[c])))
    return f"{parts} = {_human(sum(int(sizes[c]) for c in names))}"


def _fix(staged: bool) -> str:
    return "raise max_memory, add gpus_per_rank" + ("" if staged else ", or use offload='staged'")
