"""`python -m dist_backend plan`: print the plan for a model, GPUs and a request without starting anything.

The GPUs come from the flags, or from this machine when it has CUDA devices and no --gpu-memory is given.
Prints the plan as text, or as one JSON line with --json. A model given as single files (--files) is planned from
the configs that loader derives: it plugs in through `model_facts.facts_from_configs`.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers model folder (configs are enough; no weights read)")
    g = parser.add_argument_group("GPUs (default: this machine's)")
    g.add_argument("--gpus", type=int, default=0, help="number of GPUs to use (all of them are used)")
    g.add_argument("--gpu-memory", default="", help="memory of each GPU, e.g. 24GB, 80GB, 48GiB")
    g.add_argument("--interconnect", default="", choices=["", "nvlink", "pcie"],
                   help="how the GPUs talk: NVLink/P2P or only PCIe (default: detected, else pcie)")
    g.add_argument("--gpu-tflops", type=float, default=0.0,
                   help="published dense bf16 TFLOP/s of one GPU (default: the typical GPU of that memory)")
    r = parser.add_argument_group("request")
    r.add_argument("--height", type=int, default=1024)
    r.add_argument("--width", type=int, default=1024)
    r.add_argument("--frames", type=int, default=1, help="frames of a video (Wan: 4k+1)")
    r.add_argument("--images", type=int, default=1, help="images (videos) per call: prompts × images per prompt")
    r.add_argument("--guidance", type=float, default=3.5)
    r.add_argument("--negative-prompt", default=None)
    r.add_argument("--steps", type=int, default=28)
    h = parser.add_argument_group("set by hand (the planner then checks and explains)")
    for name in ("dp", "cfg", "ring", "ulysses", "gpus-per-rank"):
        h.add_argument(f"--{name}", type=int, default=None)
    h.add_argument("--offload", default=None, choices=["resident", "staged"])
    h.add_argument("--weights", default=None, choices=["bf16", "fp8"])
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")


def gpus_from_args(args: argparse.Namespace):
    """`Gpus` from the flags; from this machine when no memory is given."""
    from .hardware import Gpus, detect_gpus, parse_memory

    if not args.gpu_memory:
        found = detect_gpus()
        count = args.gpus or found.count
        return Gpus(count=count, memory=found.memory, interconnect=args.interconnect or found.interconnect,
                    flops=args.gpu_tflops * 1e12 or found.flops, name=found.name)
    if args.gpus < 1:
        raise ConfigError("--gpus N is needed with --gpu-memory (how many GPUs of that size)")
    return Gpus(count=args.gpus, memory=parse_memory(args.gpu_memory), interconnect=args.interconnect or "pcie",
                flops=args.gpu_tflops * 1e12)


def plan_from_args(args: argparse.Namespace):
    from .model_facts import read_model_facts
    from .planner import Hand, Request, plan

    request = Request(height=args.height, width=args.width, frames=args.frames, images=args.images,
                      guidance=args.guidance, negative_prompt=args.negative_prompt, steps=args.steps)
    hand = Hand(dp=args.dp, cfg=args.cfg, ring=args.ring, ulysses=args.ulysses, gpus_per_rank=args.gpus_per_rank,
                offload=args.offload, weights=args.weights)
    return plan(model=read_model_facts(args.model), gpus=gpus_from_args(args), request=request, hand=hand)


def cmd_plan(args: argparse.Namespace) -> int:
    result = plan_from_args(args)
    print(json.dumps(result.to_dict()) if args.json else result.describe(), flush=True)  # noqa: T201 (a CLI)
    return 0


# -- generate --auto --------------------------------------------------------------------------------------------

def auto_session_config(args: argparse.Namespace):
    """(SessionConfig, Plan) for `generate --auto`: the planner fills dp, ring, ulysses and gpus_per_rank for
    `--world-size` devices (CUDA: GPUs of this machine, or the `--gpus` listed; CPU: rank processes). A degree given with a value other
    than its default counts as set by hand; the rest (device, dtype, attention backend, threads) comes from the
    flags as without --auto."""
    import os

    from ..config import SessionConfig, parse_gpu_ids
    from .hardware import Gpus, detect_gpus
    from .model_facts import read_model_facts
    from .planner import Hand, Request, plan, session_kwargs

    if args.model is None:
        # The planner reads a diffusers folder's configs; single files (--files) have no hook here yet.
        raise ConfigError("--auto plans from a diffusers folder's configs: give --model DIR (not --files), or set "
                          "the degrees by hand")
    hand = {k: v for k, v in (("dp", args.dp), ("cfg", args.cfg), ("ring", args.ring), ("ulysses", args.ulysses),
                              ("gpus_per_rank", args.gpus_per_rank)) if v not in (0, 1)}
    if args.offload != "resident":
        hand["offload"] = args.offload
    ids = parse_gpu_ids(getattr(args, "gpus", ""), name="--gpus")
    if ids and args.world_size not in (1, len(ids)):
        raise ConfigError(f"--world-size {args.world_size} with --gpus {','.join(map(str, ids))} ({len(ids)} GPUs): "
                          "under --auto the planner uses every listed GPU; drop --world-size or list "
                          f"{args.world_size} GPUs")
    if args.device == "cuda":
        found = detect_gpus(ids or None)  # the listed GPUs' memory and links, not the machine's first ones
        gpus = Gpus(count=len(ids) or args.world_size, memory=found.memory, interconnect=found.interconnect,
                    flops=found.flops, name=found.name)
    else:
        # CPU ranks: the cost model is the GPUs' and says nothing true about CPU speed; what the plan gives here
        # is a layout the engine can run. Each rank process counts as one device with its share of the RAM.
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        gpus = Gpus(count=args.world_size, memory=ram // args.world_size, name="CPU rank", flops=1e12)
        hand.update(gpus_per_rank=1, weights="bf16")
    request = Request(height=args.height, width=args.width, frames=args.num_frames,
                      images=len(args.prompt) * args.images_per_prompt, guidance=args.guidance,
                      negative_prompt=args.negative_prompt, steps=args.steps)
    chosen = plan(model=read_model_facts(args.model), gpus=gpus, request=request, hand=Hand(**hand))
    kwargs = session_kwargs(chosen, device=args.device, dtype=args.dtype)
    config = SessionConfig(**kwargs, gpu_ids=ids, attention_backend=args.attention_backend,
                           threads_per_rank=args.threads_per_rank,
                           max_memory=args.max_memory if chosen.gpus_per_rank > 1 else "", compile=args.compile,
                           cache=args.cache, cache_threshold=args.cache_threshold)
    return config, chosen
