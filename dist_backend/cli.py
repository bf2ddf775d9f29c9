"""Command line: generate, join, make-token, make-tiny, demo. Prints one JSON summary line on stdout; logs go to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import ConfigError, DistDiffError


def _config_from_args(args: argparse.Namespace):
    from .config import SessionConfig

    return SessionConfig(
        world_size=args.world_size, dp=args.dp, ring=args.ring, ulysses=args.ulysses,
        gpus_per_rank=args.gpus_per_rank, device=args.device, device_map=args.device_map,
        max_memory=args.max_memory, dtype=args.dtype, attention_backend=args.attention_backend,
        offload=args.offload, threads_per_rank=args.threads_per_rank,
    )


def _cluster_from_args(args: argparse.Namespace):
    """ClusterConfig from --cluster/--listen/--token-file, or None without --cluster."""
    from .cluster import ClusterConfig, parse_address, parse_cluster

    if not args.cluster:
        if args.listen or args.token_file:
            raise ConfigError("--listen and --token-file only make sense with --cluster")
        return None
    if not args.listen or not args.token_file:
        raise ConfigError("--cluster needs --listen ADDR:PORT (the head's address on the nodes' network) and "
                          "--token-file FILE (mode 0600, the same token as on every node)")
    host, port = parse_address(args.listen, what="--listen")
    return ClusterConfig(spec=parse_cluster(args.cluster), listen_host=host, listen_port=port,
                         token_file=args.token_file, join_timeout_s=args.join_timeout)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--world-size", type=int, default=1, help="number of rank processes")
    g.add_argument("--dp", type=int, default=0, help="data-parallel degree (0 = world / (ring × ulysses))")
    g.add_argument("--ring", type=int, default=1, help="Ring-attention degree")
    g.add_argument("--ulysses", type=int, default=1, help="Ulysses-attention degree")
    g.add_argument("--gpus-per-rank", type=int, default=1, help="GPUs per rank (device_map sharding)")
    g.add_argument("--device-map", default="none", choices=["none", "balanced", "auto"])
    g.add_argument("--max-memory", default="", help="per-GPU budget within a rank, e.g. 0=16GB,1=16GB")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--attention-backend", default="", help="diffusers attention backend (default: native)")
    g.add_argument("--offload", default="resident", choices=["resident", "staged"])
    g.add_argument("--threads-per-rank", type=int, default=0, help="CPU threads per rank (0 = cores / world)")


def cmd_generate(args: argparse.Namespace) -> int:
    from .images import image_names, save_pngs
    from .session import Session

    config = _config_from_args(args)  # validated here, before any rank starts
    cluster = _cluster_from_args(args)
    if cluster is not None:
        import dataclasses

        config = dataclasses.replace(config, host=cluster.listen_host)
    session = Session(config, cluster=cluster)
    t0 = time.monotonic()
    try:
        latents, images = session.generate(
            model_dir=args.model, prompts=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
            steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
            images_per_prompt=args.images_per_prompt, num_frames=args.num_frames,
        )
    finally:
        session.close()
    names = image_names(num_images=latents.shape[0], frames=args.num_frames)
    paths = save_pngs(images, args.out, names=names)
    if args.save_tensors:
        import torch

        torch.save({"latents": latents, "images": images}, Path(args.out) / "tensors.pt")
    summary = {
        "strategy": config.strategy, "ranks": config.world_size, "device": config.device.value,
        "seconds": {**session.timings.stages, "total": round(time.monotonic() - t0, 4)},
        "images": paths,
    }
    print(json.dumps(summary), flush=True)
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from .join import EXIT_REFUSED, JoinRefused, run_join

    if "DISTDIFF_LOG_LEVEL" not in os.environ:
        logging.getLogger("dist_backend").setLevel(logging.INFO)  # a long-running command: say when it joins

    try:
        return run_join(head=args.head, token_file=args.token_file, nproc=args.nproc_per_node, device=args.device,
                        wait_s=args.wait, once=args.once)
    except JoinRefused as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def cmd_make_token(args: argparse.Namespace) -> int:
    from .cluster import write_token

    try:
        path = write_token(args.out)
    except FileExistsError:
        raise ConfigError(f"{args.out} exists; a token is never overwritten (remove it first)") from None
    print(json.dumps({"token_file": str(path)}), flush=True)  # the path, never the token
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .pipelines.tiny import make_tiny

    path = make_tiny(args.family, args.out, seed=args.seed)
    print(json.dumps({"family": args.family, "model": str(path)}), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, cache_dir=args.cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run a local diffusers pipeline over N rank processes")
    gen.add_argument("--model", required=True, help="diffusers model folder (model_index.json inside)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--seed", type=int, default=0, help="image j (prompt-major) uses seed + j")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=3.5)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--num-frames", type=int, default=1, help="frames for a video family (Wan: 4k+1)")
    gen.add_argument("--out", required=True, help="folder for the PNGs")
    gen.add_argument("--save-tensors", action="store_true",
                     help="also write tensors.pt: the latents and the float images before PNG rounding")
    add_parallel_args(gen)
    g = gen.add_argument_group("ranks on other machines (each runs `python -m dist_backend join`)")
    g.add_argument("--cluster", default="", help="nodes and their ranks in rank order, e.g. 'local:2, 10.0.0.7:4' "
                   "(--world-size must equal the sum)")
    g.add_argument("--listen", default="", help="ADDR:PORT the head listens on for the nodes (one address)")
    g.add_argument("--token-file", default="", help="file (mode 0600) with the cluster token (make-token)")
    g.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for every node to join")
    gen.set_defaults(func=cmd_generate)

    join = sub.add_parser("join", help="give this machine's ranks to a head on another machine (starts torchrun)")
    join.add_argument("--head", required=True, help="ADDR:PORT the head listens on (its --listen)")
    join.add_argument("--token-file", required=True, help="file (mode 0600) with the cluster token")
    join.add_argument("--nproc-per-node", type=int, required=True, help="ranks this machine runs")
    join.add_argument("--device", default=None, choices=["cpu", "cuda"], help="refuse a head that runs another")
    join.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for the head's next session")
    join.add_argument("--once", action="store_true", help="serve one session, then exit with torchrun's code")
    join.set_defaults(func=cmd_join)

    token = sub.add_parser("make-token", help="write a new random cluster token into a new 0600 file")
    token.add_argument("--out", required=True)
    token.set_defaults(func=cmd_make_token)

    tiny = sub.add_parser("make-tiny", help="build a tiny random-weight pipeline offline")
    tiny.add_argument("--family", required=True, choices=["flux", "qwenimage", "wan"])
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)

    demo = sub.add_parser("demo", help="tiny Flux on 2 CPU ranks: Ulysses and data parallel, checked")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--cache", default=None, help="cache folder for the tiny model (default ~/.cache/distdiff)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DISTDIFF_LOG_LEVEL", "WARNING"),
                        format="[distdiff] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistDiffError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
