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

from ..config import Offload
from ..errors import ConfigError
from . import costs
from .hardware import Gpus
from .layout import Candidate, Costed, Hand, Plan, Request, WeightStorage, session_kwargs
from .meta_sizes import human_bytes
from .model_facts import VARIABLE_TEXT_TOKENS, ModelFacts, padded
from .reasons import Explainer, nothing_fits

__all__ = ["Hand", "Plan", "Request", "WeightStorage", "plan", "session_kwargs"]


def plan(*, model: ModelFacts, gpus: Gpus, request: Request, hand: Hand | None = None) -> Plan:
    """The fastest layout that fits (see the module docstring); ConfigError with the arithmetic when none does."""
    hand = hand or Hand()
    model.check_size(height=request.height, width=request.width, frames=request.frames)
    model.check_true_cfg(request.true_cfg)
    ctx = _Context(model=model, gpus=gpus, request=request)
    rejected: dict[Candidate, str] = {}
    costed: list[Costed] = []
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
        raise ConfigError(nothing_fits(ctx, hand, rejected))
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
                        yield Candidate(dp, cfg, ring, cp // ring, gpr, offload, weights)


def _matches(layout: Candidate, hand: Hand) -> bool:
    return all(getattr(layout, k) == v for k, v in hand.given().items())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Context(Explainer):
    """The facts of one planning call and the per-layout checks and costs (its sentences: `reasons.Explainer`)."""

    def __init__(self, *, model: ModelFacts, gpus: Gpus, request: Request) -> None:
        self.model, self.gpus, self.request = model, gpus, request
        self.true_cfg = model.true_cfg(guidance=request.guidance, negative_prompt=request.negative_prompt,
                                       true_cfg_scale=request.true_cfg)
        self.image_tokens = model.tokens(height=request.height, width=request.width, frames=request.frames)
        self.text_tokens = model.text_tokens
        self.cost_text = model.text_tokens if model.text_tokens is not None else VARIABLE_TEXT_TOKENS
        self.split_tokens = self.image_tokens + (self.cost_text if model.text_is_split else 0)
        if gpus.flops:
            self.gpu_name, self.peak = gpus.name or "GPU", gpus.flops
        else:
            self.gpu_name, self.peak = costs.typical_gpu(gpus.memory)
        self.single = self._pass(Candidate(1, 1, 1, 1, 1, Offload.RESIDENT, WeightStorage.BF16)).total \
            * self.passes(1) * request.images

    # -- can it run at all --------------------------------------------------------------------------------------
    def cannot_run(self, lay: Candidate) -> str:
        """Why the engine cannot run this layout for this request ("" when it can)."""
        from ..strategies.context_parallel import check_heads

        m = self.model
        if lay.gpus_per_rank > 1 and self.gpus.spans_machines(lay.gpus_per_rank):
            return (f"device_map needs each rank's {lay.gpus_per_rank} GPUs on one machine, and the machines have "
                    f"{' + '.join(map(str, self.gpus.per_node))} GPUs")
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
    def weights(self, lay: Candidate) -> dict[str, int]:
        w = dict(self.model.weights)
        if lay.weights is WeightStorage.FP8:
            w.update(self.model.fp8_weights)
        return w

    def denoise_activations(self, lay: Candidate) -> int:
        tokens = padded(self.split_tokens, lay.cp) // lay.cp + (0 if self.model.text_is_split else self.cost_text)
        return int(tokens * self.model.shape.hidden * 2 * costs.DENOISE_ACTIVATION_WIDTHS)

    def decode_activations(self, *, tiled: bool) -> int:
        r, m = self.request, self.model
        return costs.vae_decode_bytes(channels=m.vae_channels, height=r.height, width=r.width,
                                      frames=r.frames if m.is_video else 1, temporal=m.vae_temporal,
                                      tile=costs.VAE_TILE if tiled else None)

    def fit(self, lay: Candidate) -> tuple[int, bool] | str:
        """(bytes on the fullest GPU, VAE tiling) when the layout fits, else the arithmetic of why not."""
        from .placement import plan_placement

        sizes = self.weights(lay)
        room = self.gpus.memory - costs.RESERVE_BYTES
        act = {"encode": 0, "denoise": self.denoise_activations(lay), "decode": self.decode_activations(tiled=False)}
        tiling = False
        if costs.decode_needs_tiles(whole=act["decode"], memory=self.gpus.memory, vae_weights=sizes.get("vae", 0)):
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
    def cp_link(self, lay: Candidate) -> str:
        """The link a CP group's exchange crosses: the network when the group spans machines (the mesh is dp-major,
        so a group is ring × ulysses consecutive ranks), else the machine's interconnect."""
        if lay.cp > 1 and self.gpus.spans_machines(lay.cp * lay.gpus_per_rank):
            return costs.NETWORK
        return self.gpus.interconnect.value

    def cfg_link(self, lay: Candidate) -> str:
        """The link between the two CFG halves of a group (cfg × ring × ulysses consecutive ranks)."""
        if self.gpus.spans_machines(lay.cfg * lay.cp * lay.gpus_per_rank):
            return costs.NETWORK
        return self.gpus.interconnect.value

    def passes(self, cfg: int) -> int:
        """Transformer passes per step on one rank for one image."""
        return 2 // cfg if self.true_cfg else 1

    def _pass(self, lay: Candidate) -> costs.PassTime:
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
                               peak_flops=self.peak, interconnect=self.cp_link(lay), ring=lay.ring)

    def cost(self, lay: Candidate, *, memory: int, tiling: bool) -> Costed:
        one = self._pass(lay)
        images = math.ceil(self.request.images / lay.dp)
        per_group = images * self.passes(lay.cfg)
        exchange = 0.0
        if lay.cfg > 1:
            exchange = images * costs.cfg_exchange_time(tokens=self.image_tokens,
                                                        values_per_token=self.model.prediction_values_per_token,
                                                        link=self.cfg_link(lay))
        # device_map sharding runs a pass's layers one GPU after another: no faster than one GPU.
        step = one.total * per_group + exchange
        reload = 0.0
        if lay.offload is Offload.STAGED:
            moved = sum(b for c, b in self.weights(lay).items() if self.model.stage_of[c] != "decode")
            reload = moved / lay.gpus_per_rank / costs.LOAD_BYTES_PER_S / self.request.steps
        return Costed(lay, step=step, compute=one.compute * per_group,
                      communication=one.communication * per_group + exchange,
                      floor=one.floor * per_group, memory=memory, tiling=tiling, reload=reload,
                      idle=max(0, lay.dp - self.request.images))
