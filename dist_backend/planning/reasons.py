"""The plan's reasons in plain sentences: what decided each degree, the memory, the predicted speed, the warnings,
and the refusal when nothing fits. Kept apart from the search (`planner`) so each reads on its own."""

from __future__ import annotations

import math

from ..config import Offload
from . import costs
from .hardware import Gpus, Interconnect
from .layout import Candidate, Costed, Hand, Plan, Request, WeightStorage, strategy_name
from .meta_sizes import human_bytes
from .model_facts import VARIABLE_TEXT_TOKENS, ModelFacts, padded


class Explainer:
    """Sentences about a costed candidate. Mixed into the planner's per-call context, which provides the facts
    below and `weights(layout)`, `denoise_activations(layout)`, `decode_activations(tiled=...)`, `lengths()`,
    `cp_link(layout)`, `cfg_link(layout)` (the link each exchange crosses: the machine's, or costs.NETWORK)."""

    model: ModelFacts
    gpus: Gpus
    request: Request
    true_cfg: bool
    image_tokens: int
    text_tokens: int | None
    split_tokens: int
    gpu_name: str
    peak: float
    single: float
    """Predicted seconds per step of the whole call on one GPU."""

    def explain(self, c: Costed, *, hand: Hand, rejected: dict[Candidate, str], bf16_fits: bool,
                faster_fp8: Costed | None) -> Plan:
        lay, m, r, g = c.layout, self.model, self.request, self.gpus
        given = hand.given()
        by_hand = lambda name: " (set by hand)" if name in given else ""  # noqa: E731
        link = "NVLink" if g.interconnect is Interconnect.NVLINK else "PCIe"
        size = f"{r.width}×{r.height}" + (f"×{r.frames} frames" if m.is_video else "")
        reasons = [
            f"GPUs: {g.count} × {human_bytes(g.memory)} over {link}"
            + (f" inside each of {g.nodes} machines ({' + '.join(map(str, g.per_node))} GPUs), a "
               f"{costs.INTER_NODE_BANDWIDTH / 1e9:g} GB/s network between them" if g.nodes > 1 else "")
            + f"; compute of a {self.gpu_name} "
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
            scale = (f"true_cfg {r.true_cfg:g}, a negative prompt" if m.guidance_distilled else
                     f"guidance {r.guidance:g}" + (", a negative prompt" if m.cfg_needs_negative else ""))
            if lay.cfg > 1:
                reasons.append(f"CFG 2{by_hand('cfg')}: the call uses true CFG ({scale}), so the positive and "
                               "negative passes of each step run on two ranks at once.")
            else:
                reasons.append(f"CFG not split{by_hand('cfg')}: the call uses true CFG ({scale}), and each rank runs "
                               "both passes of a step.")
        elif m.guidance_distilled:
            why = f"true_cfg {r.true_cfg:g}" + (" without a negative prompt" if r.true_cfg > 1 else "")
            reasons.append(f"CFG 1: {m.name}'s guidance is distilled into the model (one pass per step); its true "
                           f"CFG runs only with true_cfg > 1 and a negative prompt ({why}).")
        else:
            why = ("no negative prompt" if m.cfg_needs_negative and r.negative_prompt is None
                   else f"guidance {r.guidance:g} ≤ 1")
            reasons.append(f"CFG 1: the call runs no true CFG ({why}), one pass per step.")
        # context parallel
        reasons.append(self._cp_sentence(lay, by_hand, ring_by_hand="ring" in given))
        if g.nodes > 1:
            reasons.append(self._machines_sentence(lay, link))
        # sharding
        if lay.gpus_per_rank > 1:
            reasons.append(f"device_map over {lay.gpus_per_rank} GPUs per rank{by_hand('gpus_per_rank')}: "
                           "the model only fits split by layers; this makes it fit, not faster.")
        # memory
        tiers = self._memory_sentence(c, bf16_fits=bf16_fits, rejected=rejected, by_hand=by_hand, given=given)
        reasons.extend(tiers)
        # time
        speedup = self.single / c.step
        over = "the network" if costs.NETWORK in (self.cp_link(lay), self.cfg_link(lay) if lay.cfg > 1 else "") \
            else link
        parts = [f"compute {c.compute:.2f} s", f"communication {c.communication:.3f} s over {over}"]
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
        if self.cp_link(lay) == costs.NETWORK:
            warnings.append(f"context-parallel groups of {lay.cp} ranks span machines: their attention exchange "
                            f"crosses the {costs.INTER_NODE_BANDWIDTH / 1e9:g} GB/s network every layer; give each "
                            f"machine a multiple of {lay.cp} GPUs to keep them inside one")
        if g.count > 1 and speedup < costs.SPEEDUP_WARNING:
            warnings.append(f"predicted speedup {speedup:.2f}× is below {costs.SPEEDUP_WARNING}×: "
                            + self._slow_cause(c, link) + alternative)
        return Plan(dp=lay.dp, cfg=lay.cfg, ring=lay.ring, ulysses=lay.ulysses, gpus_per_rank=lay.gpus_per_rank,
                    offload=lay.offload, weights=lay.weights, vae_tiling=c.tiling, gpus=g.count,
                    memory_used=c.memory, memory_budget=g.memory, step_seconds=c.step,
                    single_gpu_step_seconds=self.single, reasons=tuple(reasons), warnings=tuple(warnings),
                    hand_set=tuple(sorted(given)))

    def _cp_sentence(self, lay: Candidate, by_hand, *, ring_by_hand: bool) -> str:
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

    def _machines_sentence(self, lay: Candidate, link: str) -> str:
        g = self.gpus
        net = f"{costs.INTER_NODE_BANDWIDTH / 1e9:g} GB/s"
        slower = costs.BANDWIDTH[g.interconnect.value] / costs.INTER_NODE_BANDWIDTH
        head = f"Machines: {g.nodes} ({' + '.join(map(str, g.per_node))} GPUs); "
        if lay.cp > 1 and self.cp_link(lay) == costs.NETWORK:
            return (head + f"context parallel {lay.cp} spans machines (no layout keeping it inside one is predicted "
                    f"faster), so its exchange crosses the {net} network every layer.")
        across = [name for name, degree, link_of in (("data parallel", lay.dp, None), ("CFG", lay.cfg, self.cfg_link))
                  if degree > 1 and (link_of is None or link_of(lay) == costs.NETWORK)]
        inside = (f"context parallel stays inside each machine ({lay.cp} ranks per group)" if lay.cp > 1 else
                  "no context parallelism, so no attention exchange crosses machines")
        spans = (f"{' and '.join(across)} span{'s' if len(across) == 1 else ''} the machines" if across else
                 "nothing spans the machines")
        return (head + f"{inside}, and {spans}: context parallel moves activations every layer, which the {net} "
                f"network between machines carries {slower:.0f}× slower than {link}, while data parallel exchanges "
                "nothing during the steps and CFG one prediction per step.")

    def _memory_sentence(self, c: Costed, *, bf16_fits: bool, rejected: dict[Candidate, str], by_hand,
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
        resident = Candidate(lay.dp, lay.cfg, lay.ring, lay.ulysses, lay.gpus_per_rank, Offload.RESIDENT, lay.weights)
        if staged and resident in rejected:
            out.append(f"Staged{by_hand('offload')}: resident does not fit: {rejected[resident]}.")
        if lay.weights is WeightStorage.FP8:
            bf16 = Candidate(lay.dp, lay.cfg, lay.ring, lay.ulysses, lay.gpus_per_rank, lay.offload, WeightStorage.BF16)
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

    def _slow_cause(self, c: Costed, link: str) -> str:
        lay = c.layout
        causes = []
        if c.communication > 0.25 * c.compute:
            link = "the network between machines" if costs.NETWORK in (self.cp_link(lay), self.cfg_link(lay)) else link
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



def nothing_fits(ctx: Explainer, hand: Hand, rejected: dict[Candidate, str]) -> str:
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
