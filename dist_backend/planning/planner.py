"""strategy = auto: choose the parallel layout for a model, a set of GPUs and a request, and say why.

`plan(model=..., gpus=..., request=..., hand=...)` is a pure function of data (`ModelFacts`, `Gpus`, `Request`,
`Hand`): it starts nothing and reads no weight. It tries every layout the engine can run on exactly `gpus.count`
GPUs (dp × cfg × ring × ulysses ranks × gpus_per_rank GPUs each, resident or staged, bf16 or fp8 weights), drops
those that cannot run or do not fit, predicts the denoise time of the rest with the cost model (`costs`), and
returns the fastest as a frozen `Plan`, preferring bf16 over fp8 whenever bf16 fits, and the simplest layout
among near ties. Degrees set by hand (`Hand`) are kept; the planner then only checks and explains them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..config import Offload
from ..errors import ConfigError
from . import costs
from .hardware import Gpus, Interconnect
from .layout import Hand, Plan, Request, WeightStorage, session_kwargs, strategy_name
from .meta_sizes import human_bytes
from .model_facts import VARIABLE_TEXT_TOKENS, ModelFacts, padded

__all__ = ["Hand", "Plan", "Request", "WeightStorage", "plan", "session_kwargs"]

# -- the search -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    dp: int
    cfg: int
    ring: int
    ulysses: int
    gpus_per_rank: int
    offload: Offload
    weights: WeightStorage

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses


@dataclass(frozen=True)
class _Costed:
    layout: _Layout
    step: float
    compute: float
    communication: float
    floor: float
    memory: int
    tiling: bool
    reload: float
    idle: int
    """Data-parallel groups without an image."""

    @property
    def total(self) -> float:
        return self.step + self.reload

    @property
    def simplicity(self) -> tuple:
        lay = self.layout
        return (lay.weights is WeightStorage.FP8, self.idle, lay.offload is Offload.STAGED, lay.gpus_per_rank,
                lay.ring, lay.ulysses, lay.cfg)


def plan(*, model: ModelFacts, gpus: Gpus, request: Request, hand: Hand | None = None) -> Plan:
    """The fastest layout that fits (see the module docstring); ConfigError with the arithmetic when none does."""
    hand = hand or Hand()
    model.check_size(height=request.height, width=request.width, frames=request.frames)
    ctx = _Context(model=model, gpus=gpus, request=request)
    rejected: dict[_Layout, str] = {}
    costed: list[_Costed] = []
    for layout in _layouts(gpus.count, true_cfg=ctx.true_cfg):
        if not _matches(layout, hand):
            continue
        why = ctx.cannot_run(layout)
        if why:
            rejected[layout] = why
            continue
        fit = ctx.fit(layout)
        if isinstance(fit, str):
            rejected[layout] = fit
            continue
        costed.append(ctx.cost(layout, memory=fit[0], tiling=fit[1]))
    if not costed:
        raise ConfigError(_nothing_fits(ctx, hand, rejected))
    bf16 = [c for c in costed if c.layout.weights is WeightStorage.BF16]
    pool = bf16 or costed
    best = min(c.total for c in pool)
    chosen = min((c for c in pool if c.total <= best * (1 + costs.NEAR_TIE)), key=lambda c: c.simplicity)
    faster_fp8 = min((c for c in costed if c.layout.weights is WeightStorage.FP8), key=lambda c: c.total,
                     default=None)
    if faster_fp8 is not None and faster_fp8.total * costs.FP8_WORTH_MENTIONING > chosen.total:
        faster_fp8 = None  # not worth mentioning
    return ctx.explain(chosen, hand=hand, rejected=rejected, bf16_fits=bool(bf16), faster_fp8=faster_fp8)


def _layouts(count: int, *, true_cfg: bool):
    for gpr in _divisors(count):
        ranks = count // gpr
        for cfg in ((1, 2) if true_cfg else (1,)):
            if ranks % cfg:
                continue
            for dp in _divisors(ranks // cfg):
                cp = ranks // cfg // dp
                for ring in _divisors(cp):
                    if gpr > 1 and cp > 1:
                        continue  # CP needs each rank's transformer on one GPU (SessionConfig's rule)
                    for offload, weights in itertools.product(Offload, WeightStorage):
                        yield _Layout(dp, cfg, ring, cp // ring, gpr, offload, weights)


def _matches(layout: _Layout, hand: Hand) -> bool:
    return all(getattr(layout, k) == v for k, v in hand.given().items())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Context:
    """The facts of one planning call, and the per-layout checks, costs and sentences."""

    def __init__(self, *, model: ModelFacts, gpus: Gpus, request: Request) -> None:
        self.model, self.gpus, self.request = model, gpus, request
        self.true_cfg = model.true_cfg(guidance=request.guidance, negative_prompt=request.negative_prompt)
        self.image_tokens = model.tokens(height=request.height, width=request.width, frames=request.frames)
        self.text_tokens = model.text_tokens
        self.cost_text = model.text_tokens if model.text_tokens is not None else VARIABLE_TEXT_TOKENS
        self.split_tokens = self.image_tokens + (self.cost_text if model.text_is_split else 0)
        if gpus.flops:
            self.gpu_name, self.peak = gpus.name or "GPU", gpus.flops
        else:
            self.gpu_name, self.peak = costs.typical_gpu(gpus.memory)
        self.single = self._pass(_Layout(1, 1, 1, 1, 1, Offload.RESIDENT, WeightStorage.BF16)).total \
            * self.passes(1) * request.images

    # -- can it run at all --------------------------------------------------------------------------------------
    def cannot_run(self, lay: _Layout) -> str:
        """Why the engine cannot run this layout for this request ("" when it can)."""
        from ..strategies.context_parallel import check_heads

        m = self.model
        if lay.cp > 1 and not m.cp_supported:
            return f"{m.class_name}'s transformer has no context-parallel plan in diffusers"
        if lay.ulysses > 1:
            try:
                check_heads(m.shape.heads, lay.ulysses, anything=lay.ring == 1)
            except ConfigError as exc:
                return str(exc)
        if lay.ring > 1 and lay.ulysses > 1:
            if m.text_is_split and self.text_tokens is None:
                return (f"ring × ulysses needs every sequence to divide by {lay.cp}, and {m.name}'s text length "
                        "follows the prompt (diffusers has no uneven mode for ring × ulysses)")
            for what, length in self.lengths().items():
                if length % lay.cp:
                    return (f"ring {lay.ring} × ulysses {lay.ulysses}: {length} {what} tokens do not divide by "
                            f"{lay.cp} (no uneven mode for ring × ulysses)")
        return ""

    def lengths(self) -> dict[str, int]:
        out = {("video" if self.model.is_video else "image"): self.image_tokens}
        if self.model.text_is_split and self.text_tokens is not None:
            out["text"] = self.text_tokens
        return out

    # -- memory -------------------------------------------------------------------------------------------------
    def weights(self, lay: _Layout) -> dict[str, int]:
        w = dict(self.model.weights)
        if lay.weights is WeightStorage.FP8:
            w.update(self.model.fp8_weights)
        return w

    def denoise_activations(self, lay: _Layout) -> int:
        tokens = padded(self.split_tokens, lay.cp) // lay.cp + (0 if self.model.text_is_split else self.cost_text)
        return int(tokens * self.model.shape.hidden * 2 * costs.DENOISE_ACTIVATION_WIDTHS)

    def decode_activations(self, *, tiled: bool) -> int:
        r = self.request
        frames = min(r.frames, self.model.vae_temporal) if self.model.is_video else 1
        area = min(r.height, costs.VAE_TILE) * min(r.width, costs.VAE_TILE) if tiled else r.height * r.width
        return int(frames * area * self.model.vae_channels * 2 * costs.VAE_ACTIVATION_WIDTHS)

    def fit(self, lay: _Layout) -> tuple[int, bool] | str:
        """(bytes on the fullest GPU, VAE tiling) when the layout fits, else the arithmetic of why not."""
        from .placement import plan_placement

        sizes = self.weights(lay)
        room = self.gpus.memory - costs.RESERVE_BYTES
        act = {"encode": 0, "denoise": self.denoise_activations(lay), "decode": self.decode_activations(tiled=False)}
        tiling = False
        if act["decode"] > room - sizes.get("vae", 0):
            tiling, act["decode"] = True, self.decode_activations(tiled=True)
        # Activations live next to the weights of their stage; resident, every stage's weights stay, so the
        # largest activation must fit beside all of them.
        need = max(act.values()) if lay.offload is Offload.RESIDENT else None
        worst = 0
        stages = ("encode", "denoise", "decode")
        for stage in stages if need is None else ("all",):
            a = act[stage] if need is None else need
            budget = room - a
            if budget <= 0:
                return (f"{stage} activations {human_bytes(a)} leave no room on a {human_bytes(self.gpus.memory)} "
                        f"GPU ({human_bytes(costs.RESERVE_BYTES)} reserved)")
            # Staged: the engine frees text encoders after encode and transformers after denoise; the VAE stays.
            names = {c: s for c, s in self.model.stage_of.items() if need is not None or s in (stage, "decode")}
            pool = {c: sizes[c] for c in names}
            budgets = {i: budget for i in range(lay.gpus_per_rank)}
            try:
                # One pool at a time with its own activations: staged=True names the stage in the message.
                placed = plan_placement(sizes=pool, budgets=budgets, policy="balanced", staged=need is None,
                                        stage_of=names)
                used = max(max(s.used.values(), default=0) for s in placed.stages)
            except ConfigError as exc:
                return (f"{lay.weights.value} weights: {exc} (each GPU {human_bytes(self.gpus.memory)} − "
                        f"{human_bytes(costs.RESERVE_BYTES)} reserve − {human_bytes(a)} activations = "
                        f"{human_bytes(budget)} for weights)")
            except ValueError:
                # Two components must both be split by layer: the loader plans that exactly on meta models
                # (sharding.plan_for_model); here the sum over the rank's GPUs decides, spread evenly.
                total = sum(pool.values())
                if total > budget * lay.gpus_per_rank:
                    return (f"{lay.weights.value} weights: {' + '.join(human_bytes(b) for b in pool.values())} = "
                            f"{human_bytes(total)} > {lay.gpus_per_rank} × {human_bytes(budget)} for weights")
                used = -(-total // lay.gpus_per_rank)
            worst = max(worst, used + a + costs.RESERVE_BYTES)
        return worst, tiling

    # -- time ---------------------------------------------------------------------------------------------------
    def passes(self, cfg: int) -> int:
        """Transformer passes per step on one rank for one image."""
        return 2 // cfg if self.true_cfg else 1

    def _pass(self, lay: _Layout) -> costs.PassTime:
        m, cp = self.model, lay.cp
        linear, attention = m.shape.flops(image_tokens=self.image_tokens, text_tokens=self.cost_text)
        # The "anything" modes pad a ragged shard; padded heads cost attention on the padding too.
        grow = padded(self.split_tokens, cp) / self.split_tokens
        heads = m.shape.heads
        head_grow = padded(heads, lay.ulysses) / heads if lay.ring == 1 else 1.0
        flops = (linear * grow + attention * grow * grow * head_grow) / cp
        tokens_per_rank = padded(self.split_tokens, cp) / cp
        comm = costs.cp_bytes_per_pass(layers=m.shape.layers, tokens=padded(self.split_tokens, cp),
                                       hidden=m.shape.hidden, ring=lay.ring, ulysses=lay.ulysses)
        return costs.pass_time(flops=flops, tokens_per_rank=tokens_per_rank, layers=m.shape.layers, comm_bytes=comm,
                               collectives=costs.cp_collectives_per_pass(layers=m.shape.layers, ring=lay.ring,
                                                                         ulysses=lay.ulysses),
                               peak_flops=self.peak, interconnect=self.gpus.interconnect, ring=lay.ring)

    def cost(self, lay: _Layout, *, memory: int, tiling: bool) -> _Costed:
        one = self._pass(lay)
        per_group = math.ceil(self.request.images / lay.dp) * self.passes(lay.cfg)
        # device_map sharding runs a pass's layers one GPU after another: no faster than one GPU.
        step = one.total * per_group
        reload = 0.0
        if lay.offload is Offload.STAGED:
            moved = sum(b for c, b in self.weights(lay).items() if self.model.stage_of[c] != "decode")
            reload = moved / lay.gpus_per_rank / costs.LOAD_BYTES_PER_S / self.request.steps
        return _Costed(lay, step=step, compute=one.compute * per_group, communication=one.communication * per_group,
                       floor=one.floor * per_group, memory=memory, tiling=tiling, reload=reload,
                       idle=max(0, lay.dp - self.request.images))

    # -- sentences ----------------------------------------------------------------------------------------------
    def explain(self, c: _Costed, *, hand: Hand, rejected: dict[_Layout, str], bf16_fits: bool,
                faster_fp8: _Costed | None) -> Plan:
        lay, m, r, g = c.layout, self.model, self.request, self.gpus
        given = hand.given()
        by_hand = lambda name: " (set by hand)" if name in given else ""  # noqa: E731
        link = "NVLink" if g.interconnect is Interconnect.NVLINK else "PCIe"
        size = f"{r.width}×{r.height}" + (f"×{r.frames} frames" if m.is_video else "")
        reasons = [
            f"GPUs: {g.count} × {human_bytes(g.memory)} over {link}; compute of a {self.gpu_name} "
            f"({self.peak / 1e12:.0f} TFLOP/s bf16 published) assumed.",
            f"Request: {r.images} {'video' if m.is_video else 'image'}{'s' if r.images > 1 else ''} at {size}, "
            f"{self.image_tokens} {'video' if m.is_video else 'image'} tokens + "
            + (f"{self.text_tokens} text tokens" if self.text_tokens is not None else
               f"a prompt-length text (about {VARIABLE_TEXT_TOKENS} tokens assumed for the cost)")
            + f"; {m.shape.heads} heads of {m.shape.head_dim}.",
        ]
        # data parallel
        if lay.dp > 1:
            idle = lay.dp - r.images if lay.dp > r.images else 0
            reasons.append(f"Data parallel {lay.dp}{by_hand('dp')}: {r.images} images split over {lay.dp} groups"
                           + (f" ({idle} groups idle)" if idle else f", {math.ceil(r.images / lay.dp)} per group")
                           + "; no communication during the steps.")
        else:
            reasons.append(f"No data parallelism{by_hand('dp')}: "
                           + (f"one {'video' if m.is_video else 'image'}, nothing to split." if r.images == 1 else
                              "the GPUs do more for each image than for separate images."))
        # CFG
        if self.true_cfg:
            if lay.cfg > 1:
                reasons.append(f"CFG 2{by_hand('cfg')}: the call uses true CFG (guidance {r.guidance:g}"
                               + (", a negative prompt" if m.cfg_needs_negative else "")
                               + "), so the positive and negative passes of each step run on two ranks at once.")
            else:
                reasons.append(f"CFG not split{by_hand('cfg')}: the call uses true CFG, and each rank runs both "
                               "passes of a step.")
        elif m.guidance_distilled:
            reasons.append(f"CFG 1: {m.name}'s guidance is distilled into the model (one pass per step).")
        else:
            why = ("no negative prompt" if m.cfg_needs_negative and r.negative_prompt is None
                   else f"guidance {r.guidance:g} ≤ 1")
            reasons.append(f"CFG 1: the call runs no true CFG ({why}), one pass per step.")
        # context parallel
        reasons.append(self._cp_sentence(lay, by_hand, ring_by_hand="ring" in given))
        # sharding
        if lay.gpus_per_rank > 1:
            reasons.append(f"device_map over {lay.gpus_per_rank} GPUs per rank{by_hand('gpus_per_rank')}: "
                           "the model only fits split by layers; this makes it fit, not faster.")
        # memory
        tiers = self._memory_sentence(c, bf16_fits=bf16_fits, rejected=rejected, by_hand=by_hand, given=given)
        reasons.extend(tiers)
        # time
        speedup = self.single / c.step
        parts = [f"compute {c.compute:.2f} s", f"communication {c.communication:.3f} s over {link}"]
        if c.floor >= c.compute + c.communication:
            parts.append(f"bound by the {c.floor:.2f} s the host needs to launch an eager step's kernels")
        reasons.append(f"Predicted step {c.step:.2f} s for the whole call ({', '.join(parts)}) against "
                       f"{self.single:.2f} s on one {self.gpu_name}: {speedup:.2f}×"
                       + (f"; staged reloads add about {c.reload * r.steps:.1f} s per call" if c.reload else "")
                       + ".")
        alternative = ""
        if faster_fp8 is not None:
            f = faster_fp8.layout
            alternative = f"; fp8 weights would allow {strategy_name(f)} at {self.single / faster_fp8.step:.2f}×"
            reasons.append(f"bf16 kept: fp8 storage would allow {strategy_name(f)} ({f.offload.value}) at "
                           f"{self.single / faster_fp8.step:.2f}×, but changes the numerics; choose weights 'fp8' "
                           "by hand for it.")
        warnings = []
        if g.count > 1 and speedup < costs.SPEEDUP_WARNING:
            warnings.append(f"predicted speedup {speedup:.2f}× is below {costs.SPEEDUP_WARNING}×: "
                            + self._slow_cause(c, link) + alternative)
        return Plan(dp=lay.dp, cfg=lay.cfg, ring=lay.ring, ulysses=lay.ulysses, gpus_per_rank=lay.gpus_per_rank,
                    offload=lay.offload, weights=lay.weights, vae_tiling=c.tiling, gpus=g.count,
                    memory_used=c.memory, memory_budget=g.memory, step_seconds=c.step,
                    single_gpu_step_seconds=self.single, reasons=tuple(reasons), warnings=tuple(warnings),
                    hand_set=tuple(sorted(given)))

    def _cp_sentence(self, lay: _Layout, by_hand, *, ring_by_hand: bool) -> str:
        m = self.model
        heads = m.shape.heads
        lengths = self.lengths()
        tokens = " + ".join(f"{n} {w}" for w, n in lengths.items())
        if lay.cp == 1:
            if lay.gpus_per_rank > 1:
                why = "each rank's transformer spans several GPUs, and context parallelism needs it on one"
            elif self.request.images > 1 or lay.cfg > 1:
                why = "the GPUs are used better for separate images or CFG branches"
            else:
                why = "one GPU per image is predicted as fast"
            return f"No context parallelism{by_hand('ulysses')}: {why}; Ring not needed."
        uneven = [w for w, n in lengths.items() if n % lay.cp]
        text_note = ("" if not m.text_is_split or self.text_tokens is not None else
                     "; the text length follows the prompt, so an odd one runs in diffusers' uneven mode")
        if lay.ring == 1:
            head_note = (f"{heads} heads divide by {lay.ulysses}" if heads % lay.ulysses == 0 else
                         f"{heads} heads do not divide by {lay.ulysses} (padded to {padded(heads, lay.ulysses)} in "
                         "ulysses_anything mode)")
            split = (f"{tokens} tokens divide by {lay.cp}" if not uneven else
                     f"{' and '.join(uneven)} tokens do not divide by {lay.cp} (uneven mode pads them)")
            return f"Ulysses {lay.ulysses}{by_hand('ulysses')}: {head_note}, {split}{text_note}; Ring not needed."
        if lay.ulysses == 1:
            split = (f"{tokens} tokens divide by {lay.ring}" if not uneven else
                     f"{' and '.join(uneven)} tokens do not divide by {lay.ring} (ring_anything pads them)")
            why = (f"Ulysses {lay.ring} cannot split {heads} heads" if heads % lay.ring else
                   "Ring was set by hand" if ring_by_hand else "Ring is predicted faster here")
            return f"Ring {lay.ring}{by_hand('ring')}: {split}{text_note}; {why}."
        return (f"Ulysses {lay.ulysses} × Ring {lay.ring}{by_hand('ulysses')}: {heads} heads divide by {lay.ulysses} "
                f"but not by {lay.cp}, so the other factor {lay.ring} is Ring; {tokens} tokens divide by {lay.cp}.")

    def _memory_sentence(self, c: _Costed, *, bf16_fits: bool, rejected: dict[_Layout, str], by_hand,
                         given: dict) -> list[str]:
        lay, m = c.layout, self.model
        w = self.weights(lay)
        text = sum(b for k, b in w.items() if m.stage_of[k] == "encode")
        denoise = sum(b for k, b in w.items() if m.stage_of[k] == "denoise")
        out = []
        staged = lay.offload is Offload.STAGED
        held = ", with the text encoders staged (loaded for encode, freed before denoise)" if staged else \
            ", every component resident"
        out.append(f"Fits: {human_bytes(c.memory)} of {human_bytes(self.gpus.memory)} per GPU{held}; weights: "
                   f"transformer{'s' if len([k for k in w if m.stage_of[k] == 'denoise']) > 1 else ''} "
                   f"{human_bytes(denoise)} ({lay.weights.value}), text encoders {human_bytes(text)}, activations "
                   f"{human_bytes(self.denoise_activations(lay))} while denoising, "
                   f"{human_bytes(costs.RESERVE_BYTES)} reserve.")
        resident = _Layout(lay.dp, lay.cfg, lay.ring, lay.ulysses, lay.gpus_per_rank, Offload.RESIDENT, lay.weights)
        if staged and resident in rejected:
            out.append(f"Staged{by_hand('offload')}: resident does not fit: {rejected[resident]}.")
        if lay.weights is WeightStorage.FP8:
            bf16 = _Layout(lay.dp, lay.cfg, lay.ring, lay.ulysses, lay.gpus_per_rank, lay.offload, WeightStorage.BF16)
            if "weights" in given:
                out.append("fp8 weights (set by hand): stored in float8, computed in bf16.")
            elif not bf16_fits:
                out.append("fp8 weights: no layout fits in bf16 on these GPUs"
                           + (f" ({rejected[bf16]})" if bf16 in rejected else "") + ".")
        if c.tiling:
            out.append(f"VAE tiling: decoding a whole {self.request.width}×{self.request.height} output would need "
                       f"{human_bytes(self.decode_activations(tiled=False))} of activations; tiles of "
                       f"{costs.VAE_TILE}² need {human_bytes(self.decode_activations(tiled=True))}.")
        return out

    def _slow_cause(self, c: _Costed, link: str) -> str:
        lay = c.layout
        causes = []
        if c.communication > 0.25 * c.compute:
            causes.append(f"interconnect: {link} moves this layout's tensors in {c.communication:.3f} s per step "
                          f"against {c.compute:.2f} s of compute")
        if lay.cp > 1 and self.split_tokens / lay.cp < 1152:
            causes.append(f"too few tokens: {self.split_tokens} tokens over {lay.cp} ranks leaves "
                          f"{self.split_tokens // lay.cp} per rank, where the GPU runs far below its peak")
        if c.floor >= c.compute + c.communication:
            causes.append("launch-bound: the step is bound by the host launching kernels (eager diffusers), "
                          "not by the GPU")
        if any(n % lay.cp for n in self.lengths().values()) and lay.cp > 1:
            causes.append("uneven lengths: a sequence does not divide by the CP degree and is padded")
        if lay.gpus_per_rank > 1:
            causes.append(f"the model needs {lay.gpus_per_rank} GPUs per rank just to fit, and device_map runs "
                          "its layers one GPU after another")
        if lay.dp > self.request.images:
            causes.append(f"only {self.request.images} images for {lay.dp} data-parallel groups")
        return "; ".join(causes) or "the work does not split further on these GPUs"


def _nothing_fits(ctx: _Context, hand: Hand, rejected: dict[_Layout, str]) -> str:
    g, m = ctx.gpus, ctx.model
    given = hand.given()
    what = (", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in given.items()) or "any layout")
    if not rejected:
        return (f"no layout with {what} multiplies to {g.count} GPUs (dp × cfg × ring × ulysses × gpus_per_rank "
                f"must equal {g.count}{'; cfg 2 needs a call with true CFG' if given.get('cfg') == 2 else ''})")
    # The layout closest to fitting: the most GPUs per rank, staged, fp8.
    best = max(rejected, key=lambda lay: (lay.gpus_per_rank, lay.offload is Offload.STAGED,
                                          lay.weights is WeightStorage.FP8, -lay.cp))
    return (f"{m.name} does not fit {g.count} × {human_bytes(g.memory)} GPUs with {what}: even "
            f"gpus_per_rank={best.gpus_per_rank}, {best.offload.value}, {best.weights.value}: {rejected[best]}")
