"""The planner's cost model: every constant in one place, each with its source, and the few formulas that use them.

Time of one transformer pass on one rank (no overlap of compute and communication, as in diffusers' CP today):

    pass(N) = max(flops_share / (peak × MATMUL_OF_PEAK × efficiency(tokens per rank)) + bytes / bandwidth
                  + collectives × COLLECTIVE_LATENCY_S,
                  layers × EAGER_ISSUE_S_PER_BLOCK)

- flops come from the transformer's own shapes at the asked size (`model_facts.TransformerShape.flops`);
- the efficiency curve and the Ring penalty are the H100 shares measured by `bench/gpu_model.py`
  (docs/PERFORMANCE.md §7, bench/results/gpu_model-2026-11-24.json), read as a fraction of the measured bf16
  matmul peak, so a GPU with another published peak scales by that peak;
- bytes per rank per pass are the formulas `bench/context_parallel.py` checks against counted bytes (§5);
- the eager floor is the CPU time to issue one forward measured in the same GPU runs: beyond ~4 ranks an eager
  step cannot get shorter than the host needs to launch its kernels (§7, "eager").

Memory per GPU is weights (meta-model bytes, `model_facts`) + activations + a reserve. The activation factors
are estimates from the models' shapes, not measurements (no GPU was lent when they were written); they are kept
deliberately on the safe side and named here so that one measurement can replace them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

# -- compute -----------------------------------------------------------------------------------------------------

MATMUL_OF_PEAK = 770e12 / 989e12
"""Large bf16 matmul measured on the H100 SXM (764–779 TFLOP/s, §7) over its published dense peak (989 TFLOP/s):
what a GPU reaches of its data-sheet figure on the best case."""

EFFICIENCY_BY_TOKENS = ((576, 0.35), (1152, 0.46), (2304, 0.48), (4608, 0.54))
"""(tokens per rank, fraction of the measured matmul peak) of a whole FLUX.1-dev step with Ulysses layout copies,
CUDA graphs (§7: 1 GPU 0.54 of peak at 4608 tokens; Ulysses shares 0.48 / 0.46 / 0.35 at N = 2 / 4 / 8). Between
points: linear in log(tokens); below the first point it scales down with the tokens; above the last it stays."""

RING_PENALTY = {1: 1.0, 2: 0.45 / 0.48, 4: 0.37 / 0.46, 8: 0.23 / 0.35}
"""Ring's share efficiency over Ulysses' at the same tokens per rank (§7: 0.45 vs 0.48, 0.37 vs 0.46, 0.23 vs 0.35):
chunked attention with the float32 log-sum-exp merge. Degrees in between use the next measured one."""

EAGER_ISSUE_S_PER_BLOCK = 0.078 / 57
"""CPU time to issue one transformer block of an eager diffusers forward (§7 eager: the N = 4 and 8 Ulysses shares
took 80.3 / 74.9 ms of CPU issue time for FLUX.1-dev's 57 blocks, equal to their device time: launch-bound)."""

# -- communication -----------------------------------------------------------------------------------------------

INTER_NODE_BANDWIDTH = 12.5e9
"""Bytes per second each way between two machines of a cluster: a 100 Gb/s network (InfiniBand EDR or 100 GbE,
12.5 GB/s line rate, published). 36× below NVLink and half of PCIe 4.0: why the planner keeps context parallelism
(which moves activations every layer) inside a machine and lets dp (nothing during the steps) and CFG (one
prediction per step) cross machines. A slower network (10 GbE: 1.25 GB/s) only strengthens that."""

NETWORK = "network"
"""The `BANDWIDTH` key of the link between machines (not a `hardware.Interconnect`: a machine's GPUs never use it)."""

BANDWIDTH = {"nvlink": 450e9, "pcie": 25e9, NETWORK: INTER_NODE_BANDWIDTH}
"""Bytes per second each way per GPU, by `hardware.Interconnect` value, and NETWORK between machines. NVLink 4 on
H100 SXM: 900 GB/s both ways (published); PCIe 4.0 x16: about 25 GB/s achieved of 32 GB/s. The same figures as
`bench/gpu_model.py`'s predictions."""

COLLECTIVE_LATENCY_S = 15e-6
"""Fixed cost of one NCCL collective inside a step (bench/gpu_model.py `--alpha-us`, the value §7 predicts with)."""

# -- memory ------------------------------------------------------------------------------------------------------

RESERVE_BYTES = 1_500_000_000
"""Per GPU, never available to weights: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, allocator slack.
Estimate (a CUDA context alone is 0.3–0.6 GB on recent GPUs)."""

DENOISE_ACTIVATION_WIDTHS = 20
"""Live activation bytes per token of a transformer pass, in units of hidden size × element size: residual,
Q/K/V, attention output, the MLP's expanded hidden (4×) and its activation, concatenations. Estimate from the
block shapes, rounded up."""

VAE_ACTIVATION_WIDTHS = 10
"""Live bytes per output pixel (per frame in flight) of a VAE decode in units of the decoder's full-resolution
channels × element size (the up-blocks at full size hold a few feature maps at once, plus GroupNorm's temporaries).
Checked against `bench/vae_decode_memory.py` (docs/PERFORMANCE.md, "VAE decode memory": peak RSS of the real
FLUX.1 and Wan 2.1 VAE architectures decoding on CPU in float32): the growth from 128² to 256² is 4.3 kB per pixel
(Flux, 128 channels) and 5.6 kB per pixel-frame (Wan, 192 channels) in float32, i.e. 8.4 and 7.3 widths, with
fixed overheads on top at small sizes; 10 keeps the planner on the safe side of both."""

VAE_TILE = 512
"""Pixels per side of a tile when the planner (or `vae_tiling` auto) tiles a decode; tiles overlap by a quarter,
diffusers' default ratio. Between diffusers' defaults for Wan (256) and Flux (its sample_size, 1024)."""

LOAD_BYTES_PER_S = 5e9
"""Weights moved from the page cache to a GPU per second when staged offload reloads a component on every call.
Estimate between a CPU load from mapped files (7.6 GB/s, §6) and PCIe's 25 GB/s; not yet measured on a GPU."""

# -- GPUs --------------------------------------------------------------------------------------------------------

TYPICAL_GPUS = ((24, "RTX 4090", 165e12), (48, "L40S", 362e12), (80, "H100 SXM", 989e12), (141, "H200", 989e12))
"""(GB of memory, name, published dense bf16 FLOP/s) assumed for a GPU of that memory when its compute is not
given: the most common card of each size (NVIDIA data sheets; the 4090's figure is with float32 accumulation)."""

KNOWN_GPUS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "RTX 6000 Ada": 364e12,
              "A6000": 155e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "A10": 125e12, "L4": 121e12}
"""Published dense bf16 FLOP/s by a part of the device name torch reports (NVIDIA data sheets)."""

FP8_WORTH_MENTIONING = 1.2
"""A bf16 plan mentions the fp8 layout it passed over when that one is predicted at least this much faster."""

SPEEDUP_WARNING = 1.1
"""A plan on several GPUs whose predicted speedup over one GPU is below this gets a warning naming the cause."""

NEAR_TIE = 0.03
"""Candidates within this fraction of the fastest count as equally fast; the simplest of them is chosen."""


def vae_decode_bytes(*, channels: int, height: int, width: int, frames: int, temporal: int,
                     tile: int | None, element: int = 2) -> int:
    """Activation bytes of one VAE decode of a height × width output (`frames` frames; 1 for images), whole or in
    tiles of `tile` pixels per side. A causal video VAE decodes one latent frame (`temporal` output frames) at a
    time, so at most that many frames are in flight; tiles are decoded one after another, so one tile's area counts."""
    in_flight = min(frames, temporal)
    area = min(height, tile) * min(width, tile) if tile else height * width
    return int(in_flight * area * channels * element * VAE_ACTIVATION_WIDTHS)


def decode_needs_tiles(*, whole: int, memory: int, vae_weights: int) -> bool:
    """The planner's rule: tile when a whole decode's activations do not fit one GPU beside the VAE's weights."""
    return whole > memory - RESERVE_BYTES - vae_weights


def typical_gpu(memory_bytes: int) -> tuple[str, float]:
    """(name, FLOP/s) of the typical GPU with this much memory: the largest class that is not larger."""
    chosen = TYPICAL_GPUS[0]
    for gb, name, flops in TYPICAL_GPUS:
        if memory_bytes >= gb * 0.95e9:
            chosen = (gb, name, flops)
    return chosen[1], chosen[2]


def efficiency(tokens_per_rank: float, *, ring: int = 1) -> float:
    """Fraction of the matmul peak a pass reaches at this many tokens per rank (see EFFICIENCY_BY_TOKENS)."""
    points = EFFICIENCY_BY_TOKENS
    xs = [math.log(t) for t, _ in points]
    x = math.log(max(tokens_per_rank, 1.0))
    if x <= xs[0]:
        value = points[0][1] * tokens_per_rank / points[0][0]
    elif x >= xs[-1]:
        value = points[-1][1]
    else:
        i = bisect.bisect_right(xs, x)
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        value = points[i - 1][1] + w * (points[i][1] - points[i - 1][1])
    penalty = RING_PENALTY[min((d for d in RING_PENALTY if d >= ring), default=max(RING_PENALTY))]
    return value * penalty


def cp_bytes_per_pass(*, layers: int, tokens: int, hidden: int, ring: int, ulysses: int, element: int = 2) -> float:
    """Bytes one rank receives per transformer pass (bench/context_parallel.py's formulas, checked there against
    counted bytes). Ulysses over u ranks: 4 all-to-alls (Q, K, V, O) of the local shard, each sending (u-1)/u of
    it. Ring over r ranks: one all-gather of the other r-1 ranks' K and V shards. Ring × Ulysses: Ulysses within
    each ring slice of the sequence, then Ring's gather of the rank's heads."""
    local = tokens / (ring * ulysses) * hidden * element
    ulysses_bytes = 4 * (ulysses - 1) / ulysses * local if ulysses > 1 else 0.0
    ring_bytes = 2 * (ring - 1) * local if ring > 1 else 0.0
    return layers * (ulysses_bytes + ring_bytes)


def cfg_exchange_time(*, tokens: int, values_per_token: int, link: str, element: int = 2) -> float:
    """Seconds per image-step of CFG parallel's exchange: one all_gather over the pair, in which each rank receives
    the other half's noise prediction (`strategies/cfg_parallel.py`)."""
    return tokens * values_per_token * element / BANDWIDTH[str(getattr(link, "value", link))] + COLLECTIVE_LATENCY_S


def cp_collectives_per_pass(*, layers: int, ring: int, ulysses: int) -> int:
    """Collectives per pass: Ulysses 4 all-to-alls per attention layer, Ring 2 gathers (K, V)."""
    return layers * ((4 if ulysses > 1 else 0) + (2 if ring > 1 else 0))


@dataclass(frozen=True, kw_only=True)
class PassTime:
    """Seconds of one transformer pass on one rank, split by cause."""

    compute: float
    communication: float
    floor: float
    """The eager launch floor; the pass takes max(compute + communication, floor)."""

    @property
    def total(self) -> float:
        return max(self.compute + self.communication, self.floor)


def pass_time(*, flops: float, tokens_per_rank: float, layers: int, comm_bytes: float, collectives: int,
              peak_flops: float, interconnect: str, ring: int) -> PassTime:
    """One pass of `flops` (this rank's share) at `tokens_per_rank`, moving `comm_bytes` in `collectives`."""
    compute = flops / (peak_flops * MATMUL_OF_PEAK * efficiency(tokens_per_rank, ring=ring))
    bandwidth = BANDWIDTH[str(getattr(interconnect, "value", interconnect))]
    communication = comm_bytes / bandwidth + collectives * COLLECTIVE_LATENCY_S if collectives else 0.0
    return PassTime(compute=compute, communication=communication, floor=layers * EAGER_ISSUE_S_PER_BLOCK)
