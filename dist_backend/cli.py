"""Command line: generate, plan, join, make-token, make-tiny, demo. Prints one JSON summary line on stdout; logs go
to stderr."""

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
        world_size=args.world_size, dp=args.dp, cfg=args.cfg, ring=args.ring, ulysses=args.ulysses,
        gpus_per_rank=args.gpus_per_rank, gpu_ids=args.gpus, device=args.device, device_map=args.device_map,
        max_memory=args.max_memory, dtype=args.dtype, attention_backend=args.attention_backend,
        offload=args.offload, threads_per_rank=args.threads_per_rank, compile=args.compile, cache=args.cache,
        cache_threshold=args.cache_threshold,
    )


def _model_from_args(args: argparse.Namespace):
    """A diffusers folder (--model) or single files (--files with --family)."""
    from .errors import ConfigError
    from .files import ModelFiles, parse_files_arg

    if args.files is None:
        for flag in ("family", "tokenizers", "configs"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag} goes with --files (single files); a --model folder has its own")
        return args.model
    if not args.family:
        raise ConfigError("--files needs --family (e.g. --family flux)")
    return ModelFiles(family=args.family, **parse_files_arg(args.files), tokenizers=args.tokenizers or "",
                      configs=args.configs or "", weights=args.weights)
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
    g.add_argument("--dp", type=int, default=0, help="data-parallel degree (0 = world / (cfg × ring × ulysses))")
    g.add_argument("--cfg", type=int, default=1, choices=[1, 2],
                   help="CFG-parallel degree: 2 computes the prompt and negative-prompt branches on two halves at once")
    g.add_argument("--ring", type=int, default=1, help="Ring-attention degree")
    g.add_argument("--ulysses", type=int, default=1, help="Ulysses-attention degree")
    g.add_argument("--gpus-per-rank", type=int, default=1, help="GPUs per rank (device_map sharding)")
    g.add_argument("--gpus", default="", metavar="0,1,...",
                   help="CUDA devices the ranks use, in rank order: exactly world-size × gpus-per-rank of them "
                        "(default: 0 … world-size × gpus-per-rank − 1; with --auto: the planner plans for these)")
    g.add_argument("--device-map", default="none", choices=["none", "balanced", "auto"])
    g.add_argument("--max-memory", default="", help="per-GPU budget within a rank, e.g. 0=16GB,1=16GB")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--attention-backend", default="", help="diffusers attention backend (default: native)")
    g.add_argument("--offload", default="resident", choices=["resident", "staged"])
    g.add_argument("--threads-per-rank", type=int, default=0, help="CPU threads per rank (0 = cores / world)")
    g.add_argument("--compile", default="none", choices=["none", "regional"],
                   help="regional: torch.compile the transformer's repeated block once (first call pays the compile)")
    g.add_argument("--cache", default="none", choices=["none", "first_block", "taylorseer", "magcache"],
                   help="step caching with diffusers' cache hooks (faster, not exact)")
    g.add_argument("--cache-threshold", type=float, default=0.0,
                   help="first_block / magcache threshold (0 = diffusers' default; higher skips more)")


def cmd_generate(args: argparse.Namespace) -> int:
    from .images import image_names, save_pngs
    from .latent_file import read_latent_file, write_latent_file
    from .session import Session

    plan = None
    if args.auto:  # the planner fills the degrees (validated, and the plan checked, before any rank starts)
        from .planning.command import auto_session_config

        config, plan = auto_session_config(args)
    else:
        config = _config_from_args(args)  # validated here, before any rank starts
    cluster = _cluster_from_args(args)
    if cluster is not None:
        import dataclasses

        config = dataclasses.replace(config, host=cluster.listen_host)
    model = _model_from_args(args)
    init = read_latent_file(args.init_latent) if args.init_latent else None
    tiling = _tiling_from_args(args, plan)  # validated before any rank starts
    session = Session(config, cluster=cluster)
    t0 = time.monotonic()
    try:
        latents, images = session.generate(
            model_dir=model, prompts=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
            steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
            images_per_prompt=args.images_per_prompt, num_frames=args.num_frames, latent=init, denoise=args.denoise,
            loras=args.lora, true_cfg_scale=args.true_cfg, guidance_2=args.guidance_2, tiling=tiling,
        )
    finally:
        session.close()
    frames = images.shape[0] // latents.shape[0]  # a latent's size wins over --num-frames
    names = image_names(num_images=latents.shape[0], frames=frames)
    paths = save_pngs(images, args.out, names=names)
    if args.save_tensors:
        import torch

        torch.save({"latents": latents, "images": images}, Path(args.out) / "tensors.pt")
    latent_path = str(write_latent_file(Path(args.out) / "latents.latent", latents)) if args.save_latent else None
    summary = {
        "strategy": config.strategy, "ranks": config.world_size, "device": config.device.value,
        **session.last_run,  # cfg degree, compile and graphs compiled, cache and forwards skipped
        "decode": session.last_decode,  # VAE tiling on/off and whether one output's tiles were split over ranks
        "seconds": {**session.timings.stages, "total": round(time.monotonic() - t0, 4)},
        "loras": [[spec.path, spec.strength] for spec in session.loras],
        "images": paths, **({"latent": latent_path} if latent_path else {}),
    }
    if plan is not None:
        summary["plan"] = plan.to_dict()
    print(json.dumps(summary), flush=True)
    return 0


def _tiling_from_args(args: argparse.Namespace, plan):
    """--vae-tiling / --vae-tile-size / --vae-tile-overlap; with --auto and --vae-tiling auto, the plan decides."""
    from .tiled_decode import DecodeTiling, VaeTiling

    tiling = DecodeTiling(mode=args.vae_tiling, tile_size=args.vae_tile_size, overlap=args.vae_tile_overlap)
    if plan is not None and tiling.mode is VaeTiling.AUTO:
        from .planning.layout import decode_tiling

        return decode_tiling(plan) if not tiling.tile_size else DecodeTiling(
            mode=VaeTiling.ON if plan.vae_tiling else VaeTiling.OFF, tile_size=tiling.tile_size,
            overlap=tiling.overlap)
    return tiling


def parse_lora(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (FILE, STRENGTH); the strength defaults to 1.0 and may be negative. Only a suffix
    that parses as a number is a strength, so paths with colons work."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0
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
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers model folder (model_index.json inside)")
    source.add_argument("--files", help="single files instead of a folder: transformer=PATH,text_encoder=PATH,"
                                        "text_encoder_2=PATH,vae=PATH (ComfyUI's diffusion_models / text_encoders / "
                                        "vae files, fp16 or fp8; Wan 2.2 A14B: transformer=HIGH_NOISE,"
                                        "transformer_2=LOW_NOISE)")
    gen.add_argument("--family", default=None, help="family of the --files (flux, qwenimage, wan)")
    gen.add_argument("--tokenizers", default=None,
                     help="with --files: a ComfyUI folder (its comfy/ tokenizers) or a diffusers folder to take the "
                          "tokenizers from (default: --configs)")
    gen.add_argument("--configs", default=None,
                     help="with --files: a diffusers-layout folder with the architecture configs (default: the "
                          "configs shipped for the model)")
    gen.add_argument("--weights", default="compute", choices=["compute", "fp8"],
                     help="with --files: transformer weights in the compute dtype, or kept in fp8 (layerwise casting)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    gen.add_argument("--negative-prompt", default=None,
                     help="used by Qwen-Image and Wan CFG and by Flux true CFG; kept verbatim (\" \" is one)")
    gen.add_argument("--seed", type=int, default=0, help="image j (prompt-major) uses seed + j")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=3.5,
                     help="Flux: embedded guidance; Qwen-Image: true CFG scale; Wan: CFG scale")
    gen.add_argument("--true-cfg", type=float, default=1.0,
                     help="Flux only: true CFG scale (> 1 needs --negative-prompt; doubles the transformer calls)")
    gen.add_argument("--guidance-2", type=float, default=None,
                     help="Wan 2.2 A14B only: CFG scale of the low-noise expert (default: --guidance)")
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--num-frames", type=int, default=1, help="frames for a video family (Wan: 4k+1)")
    gen.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="FILE[:STRENGTH]",
                     help="a LoRA .safetensors file and its strength (default 1.0, may be negative); repeat to "
                          "chain several")
    gen.add_argument("--out", required=True, help="folder for the PNGs")
    gen.add_argument("--save-tensors", action="store_true",
                     help="also write tensors.pt: the latents and the float images before PNG rounding")
    gen.add_argument("--save-latent", action="store_true",
                     help="also write latents.latent, ComfyUI's Save Latent format (raw VAE space; Load Latent reads it)")
    gen.add_argument("--init-latent", default=None, metavar="FILE.latent",
                     help="start from this ComfyUI .latent file (Save Latent, or --save-latent); its size wins over "
                          "--height/--width/--num-frames; one latent for every image or one per image")
    gen.add_argument("--denoise", type=float, default=1.0,
                     help="with --init-latent: img2img strength in (0, 1] (diffusers' strength; 1.0 = from noise)")
    v = gen.add_argument_group("VAE decode (like ComfyUI's VAE Decode (Tiled))")
    v.add_argument("--vae-tiling", default="auto", choices=["off", "on", "auto"],
                   help="decode in tiles (diffusers' enable_tiling): auto = only when the planner's estimate of a "
                        "whole decode does not fit a rank's device; with fewer images than ranks, one image's tiles "
                        "are decoded by all ranks of its group")
    v.add_argument("--vae-tile-size", type=int, default=0,
                   help="pixels per tile side (multiple of 8; 0 = the VAE's default, or 512 when auto tiles)")
    v.add_argument("--vae-tile-overlap", type=int, default=0,
                   help="pixels neighbouring tiles blend over (multiple of 8, < tile size / 2; 0 = default)")
    add_parallel_args(gen)
    gen.add_argument("--auto", action="store_true",
                     help="let the planner choose dp, ring, ulysses and gpus_per_rank for --world-size devices "
                          "(degrees given with other than their default are kept); the plan goes into the summary")
    g = gen.add_argument_group("ranks on other machines (each runs `python -m dist_backend join`)")
    g.add_argument("--cluster", default="", help="nodes and their ranks in rank order, e.g. 'local:2, 10.0.0.7:4' "
                   "(--world-size must equal the sum)")
    g.add_argument("--listen", default="", help="ADDR:PORT the head listens on for the nodes (one address)")
    g.add_argument("--token-file", default="", help="file (mode 0600) with the cluster token (make-token)")
    g.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for every node to join")
    gen.set_defaults(func=cmd_generate)

    from .planning.command import add_plan_args, cmd_plan

    plan = sub.add_parser("plan", help="print the parallel layout for a model and GPUs, starting nothing")
    add_plan_args(plan)
    plan.set_defaults(func=cmd_plan)

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
    tiny.add_argument("--family", required=True, choices=["flux", "qwenimage", "wan", "wan22"],
                      help="wan22: Wan with two experts (transformer_2, boundary_ratio) like Wan 2.2 A14B")
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
