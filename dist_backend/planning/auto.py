"""strategy = auto on a loader (the ComfyUI loader nodes; the CLI's `generate --auto` shares `devices`): plan at
load, before the request is known, and re-check every real request against the loaded layout.

A loader fixes the layout (rank processes, degrees, offload) when it loads the model, but the request (size,
frames, images, CFG) comes later, at ParallelDenoise. Changing the layout then would restart the ranks and reload
the model on every request that plans differently, so the loader plans for the family's usual call
(`LOAD_REQUESTS`) and `check_request` then looks at each real request: it refuses one that the loaded layout cannot
run or that does not fit (naming the fix) before any rank works on it, and warns when the planner would choose a
clearly faster layout for it. With strategy manual the degrees are the user's: the plan only explains them, and
the per-request check only warns.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from ..pipelines import Family
from .hardware import Gpus
from .layout import Hand, Plan, Request

log = logging.getLogger(__name__)

FASTER_WORTH_WARNING = 1.2
"""A request for which the planner predicts another layout at least this much faster than the loaded one gets a
warning naming that layout (re-planning costs a model reload, so small gains are not worth mentioning)."""

LOAD_REQUESTS = {
    # The call a loader plans for, by family: ParallelDenoise's default size (Wan: its usual 832×480, 81 frames),
    # one image, and the family's usual guidance: Flux's distilled guidance (no true CFG), Qwen-Image's true CFG
    # with a negative prompt (its documented " "), Wan's CFG (guidance > 1 always uses its negative prompt).
    Family.FLUX: Request(height=1024, width=1024, guidance=3.5),
    Family.QWENIMAGE: Request(height=1024, width=1024, guidance=4.0, negative_prompt=" "),
    Family.WAN: Request(height=480, width=832, frames=81, guidance=5.0),
}


class Strategy(str, enum.Enum):
    """How a loader's degrees are decided."""

    MANUAL = "manual"  # as set; the planner explains them
    AUTO = "auto"  # the planner chooses what was left at its default


def devices(*, device: str, count: int, per_node: tuple[int, ...] = (), gpu_ids: tuple[int, ...] = ()) -> Gpus:
    """The `count` devices a plan is for: this machine's CUDA GPUs (their memory, link and compute), or CPU rank
    processes, each counted as a device with its share of the RAM. The cost model is the GPUs'; on CPU it says
    nothing true about speed, and what a plan gives there is a layout the engine can run. `gpu_ids`: the GPUs a
    user picked (the `gpus` input); their memory and links are read, not the machine's first ones."""
    from .hardware import detect_gpus

    if device == "cuda":
        found = detect_gpus(gpu_ids or None)
        return Gpus(count=count, memory=found.memory, interconnect=found.interconnect, flops=found.flops,
                    name=found.name, per_node=per_node)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Gpus(count=count, memory=ram // count, name="CPU rank", flops=1e12, per_node=per_node)


def describe_request(request: Request, *, video: bool) -> str:
    what = "video" if video else "image"
    size = f"{request.width}×{request.height}" + (f"×{request.frames} frames" if video else "")
    cfg = [f"guidance {request.guidance:g}"]
    if request.true_cfg != 1.0:
        cfg.append(f"true_cfg {request.true_cfg:g}")
    cfg.append("a negative prompt" if request.negative_prompt is not None else "no negative prompt")
    return f"{request.images} {what}{'s' if request.images > 1 else ''} at {size}, {', '.join(cfg)}"


@dataclass(frozen=True, kw_only=True)
class LoaderPlan:
    """What a loader decided and why: the plan (None when a manual layout is one the planner cannot explain),
    the text of its `plan` output, and what `check_request` needs later."""

    strategy: Strategy
    plan: Plan | None
    text: str
    gpus: Gpus | None
    hand: Hand
    """Settings set by hand (auto), or the whole layout (manual)."""
    request: Request
    """The request it was planned for (LOAD_REQUESTS)."""
    facts: object = field(compare=False, repr=False)
    """The model's `ModelFacts`."""
    notes: tuple[str, ...] = ()
    """What the last `check_request` said about the last request (shown by the status panel)."""

    def summary(self) -> dict:
        """The plan for the status route: strategy, layout, the text's first line, reasons, warnings."""
        p = self.plan
        return {"strategy": self.strategy.value, "layout": p.strategy if p else None,
                "summary": self.text.splitlines()[0], "reasons": list(p.reasons) if p else [],
                "warnings": list(p.warnings) if p else self.text.splitlines()[1:],
                "planned_for": describe_request(self.request, video=bool(self.facts and self.facts.is_video)),
                "last_request": list(self.notes)}


def plan_loader(*, facts: Callable[[], object], strategy: Strategy | str, device: str, count: int, hand: Hand,
                per_node: tuple[int, ...] = (), gpu_ids: tuple[int, ...] = ()) -> LoaderPlan:
    """The loader's plan for `count` devices; `facts()` gives the model's `ModelFacts` (read here, once).

    AUTO: the planner chooses every setting `hand` leaves None and refuses (ConfigError with the arithmetic) when
    nothing fits. MANUAL: `hand` holds the whole layout; the plan explains it, or the text says why the planner
    would not run it or could not read the model. A manual load always goes on: the engine checks its own rules,
    and the planner's memory model is an estimate."""
    from .planner import plan

    strategy = Strategy(getattr(strategy, "value", strategy))
    cpu_note = ("; CPU ranks count as devices with their share of the RAM, and the predicted times are the GPU "
                "cost model's, not a CPU's" if device != "cuda" else "")
    if strategy is Strategy.AUTO:
        model = facts()
        gpus = devices(device=device, count=count, per_node=per_node, gpu_ids=gpu_ids)
        request = LOAD_REQUESTS[model.family]
        chosen = plan(model=model, gpus=gpus, request=request, hand=hand)
        head = (f"strategy auto: planned at load for {model.name}'s usual call "
                f"({describe_request(request, video=model.is_video)}); ParallelDenoise re-checks every request "
                f"against this layout{cpu_note}.")
        return LoaderPlan(strategy=strategy, plan=chosen, text=f"{head}\n{chosen.describe()}", gpus=gpus, hand=hand,
                          request=request, facts=model)
    # Explaining a manual layout must never stop its load: whatever fails here becomes a line of the text.
    try:
        model = facts()
    except Exception as exc:  # noqa: BLE001 - any reader error of any model folder
        return LoaderPlan(strategy=strategy, plan=None, text=f"strategy manual: the layout as set{cpu_note}.\n"
                          f"  ! the planner could not read this model ({type(exc).__name__}: {exc})", gpus=None,
                          hand=hand, request=Request(), facts=None)
    request = LOAD_REQUESTS[model.family]
    gpus = None
    try:
        gpus = devices(device=device, count=count, per_node=per_node, gpu_ids=gpu_ids)
        chosen = plan(model=model, gpus=gpus, request=request, hand=hand)
    except Exception as exc:  # noqa: BLE001 - the planner's refusal (DistDiffError) or a gap in its model
        return LoaderPlan(strategy=strategy, plan=None, text=f"strategy manual: the layout as set{cpu_note}.\n"
                          f"  ! the planner would not run it for {model.name}'s usual call "
                          f"({describe_request(request, video=model.is_video)}): {exc}", gpus=gpus, hand=hand,
                          request=request, facts=model)
    head = (f"strategy manual: the layout as set, explained for {model.name}'s usual call "
            f"({describe_request(request, video=model.is_video)}){cpu_note}.")
    return LoaderPlan(strategy=strategy, plan=chosen, text=f"{head}\n{chosen.describe()}", gpus=gpus, hand=hand,
                      request=request, facts=model)


def call_request(facts, *, height: int, width: int, num_frames: int, images: int, guidance: float,
                 negative_prompt: str | None, true_cfg: float, steps: int,
                 latent_shape: tuple[int, ...] | None = None) -> Request:
    """The `Request` of one denoise call; a start latent's shape (ComfyUI layout: [B, C, h, w], [B, C, 1, h, w] or
    Wan's [B, C, F', h, w]) sets the size, as it does in `Session.denoise`."""
    if latent_shape is not None:
        height, width = latent_shape[-2] * facts.vae_scale, latent_shape[-1] * facts.vae_scale
        if facts.is_video and len(latent_shape) == 5:
            num_frames = (latent_shape[2] - 1) * facts.vae_temporal + 1
    return Request(height=int(height), width=int(width), frames=int(num_frames), images=int(images),
                   guidance=float(guidance), negative_prompt=negative_prompt, true_cfg=float(true_cfg),
                   steps=int(steps))


def check_request(loaded: LoaderPlan, request: Request) -> LoaderPlan:
    """Check one real request against the loaded layout; returns the LoaderPlan with `notes` about it.

    AUTO: ConfigError when the loaded layout cannot run this request or does not fit it, naming the request it
    was planned for and the fix. Both strategies: a note (and a logged warning) when the planner predicts another
    layout at least FASTER_WORTH_WARNING× faster for this request."""
    from .planner import plan

    facts, p = loaded.facts, loaded.plan
    if p is None:
        return replace(loaded, notes=())
    try:
        facts.check_size(height=request.height, width=request.width, frames=request.frames)
        facts.check_true_cfg(request.true_cfg)
    except ConfigError:
        return replace(loaded, notes=())  # bad input: the engine's own check refuses it next, in its words
    this = describe_request(request, video=facts.is_video)
    layout = Hand(dp=p.dp, cfg=p.cfg, ring=p.ring, ulysses=p.ulysses, gpus_per_rank=p.gpus_per_rank,
                  offload=p.offload, weights=p.weights)
    try:
        checked = plan(model=facts, gpus=loaded.gpus, request=request, hand=layout)
    except ConfigError as exc:
        if loaded.strategy is Strategy.MANUAL:
            note = f"the planner predicts the layout set by hand will not run this request ({this}): {exc}"
            log.warning("%s", note)
            return replace(loaded, notes=(note,))
        raise ConfigError(
            f"strategy auto chose {p.strategy} at load for {facts.name}'s usual call "
            f"({describe_request(loaded.request, video=facts.is_video)}); this request ({this}) does not run on "
            f"it: {exc}. Change the request to fit that plan, or set the degrees by hand on the loader "
            "(strategy manual, or change dp / cfg / ring / ulysses from their defaults)") from None
    notes = list(checked.warnings)
    try:
        best = plan(model=facts, gpus=loaded.gpus, request=request, hand=loaded.hand)
    except ConfigError:
        best = None
    if best is not None and best.strategy != checked.strategy \
            and best.step_seconds * FASTER_WORTH_WARNING <= checked.step_seconds:
        notes.append(f"for this request ({this}) the planner predicts {best.strategy} "
                     f"{checked.step_seconds / best.step_seconds:.2f}× faster than the loaded {checked.strategy}; "
                     "set those degrees on the loader to use it (a reload)")
    for note in notes:
        log.warning("%s", note)
    return replace(loaded, notes=tuple(notes))
