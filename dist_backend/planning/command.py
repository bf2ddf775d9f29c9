"""`python -m dist_backend plan`: print the plan for a model, GPUs and a request without starting anything.

The GPUs come from the flags, or from this machine when it has CUDA devices and no --gpu-memory is given.
Prints the plan as text, or as one JSON line with --json. A model given as single files (--files) is planned from
the architecture configs the files loader checks them against (their headers only; `files.files_configs_dir`).
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers model folder (configs are enough; no weights read)")
    source.add_argument("--files", help="single files as generate takes them (transformer=PATH,text_encoder=PATH,...; "
                                        "only their headers are read), with --family")
    parser.add_argument("--family", default=None, help="family of the --files (flux, qwenimage, wan)")
    parser.add_argument("--configs", default=None,
                        help="with --files: a diffusers-layout folder with the architecture configs (default: the "
                             "configs shipped for the model)")
    g = parser.add_argument_group("GPUs (default: this machine's)")
    g.add_argument("--gpus", type=int, default=0, help="number of GPUs to use (all of them are used)")
    g.add_argument("--gpu-memory", default="", help="memory of each GPU, e.g. 24GB, 80GB, 48GiB")
    g.add_argument("--interconnect", default="", choices=["", "nvlink", "pcie"],
                   help="how the GPUs talk: NVLink/P2P or only PCIe (default: detected, else pcie)")
    g.add_argument("--gpu-tflops", type=float, default=0.0,
                   help="published dense bf16 TFLOP/s of one GPU (default: the typical GPU of that memory)")
    g.add_argument("--nodes", type=int, default=1,
                   help="machines the GPUs are spread over evenly (--gpus in all); CP is kept inside a machine")
    g.add_argument("--cluster", default="",
                   help="the machines as generate's --cluster SPEC, e.g. 'local:4, 10.0.0.7:4' (GPUs per machine "
                        "in rank order; --gpus defaults to the sum)")
    r = parser.add_argument_group("request")
    r.add_argument("--height", type=int, default=1024)
    r.add_argument("--width", type=int, default=1024)
    r.add_argument("--frames", type=int, default=1, help="frames of a video (Wan: 4k+1)")
    r.add_argument("--images", type=int, default=1, help="images (videos) per call: prompts × images per prompt")
    r.add_argument("--guidance", type=float, default=3.5)
    r.add_argument("--negative-prompt", default=None)
    r.add_argument("--true-cfg", type=float, default=1.0,
                   help="Flux's true CFG scale (> 1 with --negative-prompt runs two passes per step)")
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

    per_node = machines_from_args(args)
    count = args.gpus or sum(per_node)
    if not args.gpu_memory:
        found = detect_gpus()
        count = count or found.count
        kwargs = dict(memory=found.memory, interconnect=args.interconnect or found.interconnect,
                      flops=args.gpu_tflops * 1e12 or found.flops, name=found.name)
    else:
        if count < 1:
            raise ConfigError("--gpus N is needed with --gpu-memory (how many GPUs of that size)")
        kwargs = dict(memory=parse_memory(args.gpu_memory), interconnect=args.interconnect or "pcie",
                      flops=args.gpu_tflops * 1e12)
    if per_node:
        return Gpus(count=count, per_node=per_node, **kwargs)
    return Gpus.on_machines(nodes=args.nodes, count=count, **kwargs)


def machines_from_args(args: argparse.Namespace) -> tuple[int, ...]:
    """GPUs per machine from --cluster SPEC (empty without it); --nodes then must not disagree."""
    if not args.cluster:
        return ()
    from ..cluster import parse_cluster

    per_node = tuple(n.nproc for n in parse_cluster(args.cluster).nodes)
    if args.nodes not in (1, len(per_node)):
        raise ConfigError(f"--nodes {args.nodes} but --cluster names {len(per_node)} machines; give one of them")
    return per_node


def configs_dir_from_args(args: argparse.Namespace) -> str:
    """The folder of configs the planner reads: --model, or the configs that describe the --files (checked from
    their headers, as the loader checks them; no weight and no tokenizer is read)."""
    if args.files is None:
        if args.family or args.configs:
            raise ConfigError("--family and --configs go with --files (single files); a --model folder has its own")
        return args.model
    from ..files import ModelFiles, files_configs_dir, parse_files_arg

    if not args.family:
        raise ConfigError("--files needs --family (e.g. --family flux)")
    return files_configs_dir(ModelFiles(family=args.family, **parse_files_arg(args.files), configs=args.configs or ""))


def plan_from_args(args: argparse.Namespace):
    from .model_facts import read_model_facts
    from .planner import Hand, Request, plan

    request = Request(height=args.height, width=args.width, frames=args.frames, images=args.images,
                      guidance=args.guidance, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg,
                      steps=args.steps)
    hand = Hand(dp=args.dp, cfg=args.cfg, ring=args.ring, ulysses=args.ulysses, gpus_per_rank=args.gpus_per_rank,
                offload=args.offload, weights=args.weights)
    return plan(model=read_model_facts(configs_dir_from_args(args)), gpus=gpus_from_args(args), request=request,
                hand=hand)


def cmd_plan(args: argparse.Namespace) -> int:
    result = plan_from_args(args)
    print(json.dumps(result.to_dict()) if args.json else result.describe(), flush=True)  # noqa: T201 (a CLI)
    return 0


# -- generate --auto --------------------------------------------------------------------------------------------

def auto_session_config(args: argparse.Namespace):
    """(SessionConfig, Plan) for `generate --auto`: the planner fills dp, ring, ulysses and gpus_per_rank for
    `--world-size` devices (CUDA: GPUs of this machine, or the `--gpus`
    listed; CPU: rank processes). A degree given with a value other
    than its default counts as set by hand; the rest (device, dtype, attention backend, threads) comes from the
    flags as without --auto."""
    from ..cluster import parse_cluster
    from ..config import SessionConfig, parse_gpu_ids
    from .auto import devices
    from .model_facts import read_model_facts
    from .planner import Hand, Request, plan, session_kwargs

    hand = {k: v for k, v in (("dp", args.dp), ("cfg", args.cfg), ("ring", args.ring), ("ulysses", args.ulysses),
                              ("gpus_per_rank", args.gpus_per_rank)) if v not in (0, 1)}
    if args.offload != "resident":
        hand["offload"] = args.offload
    ids = parse_gpu_ids(getattr(args, "gpus", ""), name="--gpus")
    if ids and args.world_size not in (1, len(ids)):
        raise ConfigError(f"--world-size {args.world_size} with --gpus {','.join(map(str, ids))} ({len(ids)} GPUs): "
                          "under --auto the planner uses every listed GPU; drop --world-size or list "
                          f"{args.world_size} GPUs")
    if args.files is not None and args.weights == "fp8":
        hand["weights"] = "fp8"  # single files kept in fp8 (the planner counts their bytes so)
    if args.device != "cuda":
        hand.update(gpus_per_rank=1, weights="bf16")
    # With --cluster the ranks of each machine are its devices (the SPEC counts ranks; CP stays inside one).
    per_node = tuple(n.nproc for n in parse_cluster(args.cluster).nodes) if args.cluster else ()
    if per_node:
        hand.setdefault("gpus_per_rank", 1)  # the SPEC counts ranks: one device each
    gpus = devices(device=args.device, count=len(ids) or args.world_size, per_node=per_node, gpu_ids=ids)
    request = Request(height=args.height, width=args.width, frames=args.num_frames,
                      images=len(args.prompt) * args.images_per_prompt, guidance=args.guidance,
                      negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, steps=args.steps)
    chosen = plan(model=read_model_facts(configs_dir_from_args(args)), gpus=gpus, request=request, hand=Hand(**hand))
    kwargs = session_kwargs(chosen, device=args.device, dtype=args.dtype)
    config = SessionConfig(**kwargs, gpu_ids=ids, attention_backend=args.attention_backend,
                           threads_per_rank=args.threads_per_rank,
                           max_memory=args.max_memory if chosen.gpus_per_rank > 1 else "", compile=args.compile,
                           cache=args.cache, cache_threshold=args.cache_threshold)
    return config, chosen
