"""VAE decode of large outputs: what a whole decode costs in memory, and what splitting one image's tiles buys.

    python -m bench.vae_decode [--size 256] [--tile 128] [--skip-memory]

1. Memory (checks `planning.costs.VAE_ACTIVATION_WIDTHS`): the real FLUX.1 and Wan 2.1 VAE architectures (configs in
   tests/data/models, random weights, float32, one CPU thread) decode at 128² and 256² (Wan: 2 latent frames = 5
   frames) in a fresh process each; the peak RSS over the decode (VmHWM after resetting it) less the RSS before.
   The growth between the two sizes per output pixel (per frame in flight for Wan: 4) is the figure to compare with
   the planner's 10 × channels × element bytes; the small size carries fixed overheads.
2. Split decode: one `--size`² Flux image (the tiny pipeline with the real FLUX.1 VAE architecture) decoded in tiles
   of `--tile` through 2 ranks × 1 thread (Ulysses 2: the image's tiles split over both) vs 1 rank × 1 thread (the
   same tiled decode on one rank), interleaved; images must be identical. Also the whole (untiled) decode on 1 rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench._common import cache_root, environment, finish, interleaved, median, parse_args

NAME = "vae_decode"
MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
CHANNELS = {"flux": 128, "wan": 192}  # the decoders' full-resolution channels (model_facts.vae_geometry)


def child_memory(kind: str, size: int) -> dict:
    """Runs in its own process: peak RSS growth of one decode."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.set_num_threads(1)
    folder = {"wan": "wan2.1-t2v-14b", "flux": "flux1-dev"}[kind]
    config = json.loads((MODELS / folder / "vae" / "config.json").read_text())
    if kind == "wan":
        vae, z = AutoencoderKLWan.from_config(config).eval(), torch.randn(1, 16, 2, size // 8, size // 8)
    else:
        vae, z = AutoencoderKL.from_config(config).eval(), torch.randn(1, 16, size // 8, size // 8)
    status = Path(f"/proc/{os.getpid()}/status")

    def field(name: str) -> int:
        return int(status.read_text().split(f"{name}:")[1].split()[0]) * 1024

    Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = field("VmRSS")
    with torch.inference_mode():
        out = vae.decode(z).sample
    return {"kind": kind, "size": size, "out": list(out.shape), "peak_growth_bytes": field("VmHWM") - before}


def memory_rows() -> tuple[list, dict]:
    found = {}
    for kind in ("flux", "wan"):
        for size in (128, 256):
            done = subprocess.run([sys.executable, "-m", "bench.vae_decode", "--child-memory", kind, str(size)],
                                  capture_output=True, text=True, timeout=900, check=True)
            found[(kind, size)] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for kind in ("flux", "wan"):
        in_flight = 4 if kind == "wan" else 1
        small, big = (found[(kind, s)]["peak_growth_bytes"] for s in (128, 256))
        per_pixel = (big - small) / ((256**2 - 128**2) * in_flight)
        widths = per_pixel / (CHANNELS[kind] * 4)
        rows += [[f"{kind} VAE peak growth 128² / 256² (MB)", small / 1e6, big / 1e6, "", ""],
                 [f"{kind} bytes per output pixel{' per frame in flight' if kind == 'wan' else ''} (fp32)",
                  per_pixel, "", f"{widths:.2f} widths", "≤ 10 (planner)"]]
    return rows, {f"{k}-{s}": v for (k, s), v in found.items()}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child-memory":
        print(json.dumps(child_memory(sys.argv[2], int(sys.argv[3]))))  # noqa: T201 (a child's answer)
        return 0
    args = parse_args(NAME, __doc__, extra=lambda p: (
        p.add_argument("--size", type=int, default=256),
        p.add_argument("--tile", type=int, default=128),
        p.add_argument("--skip-memory", action="store_true"),
    ))
    import torch

    from dist_backend import Session, SessionConfig
    from dist_backend.pipelines.tiny import tiny_cached
    from dist_backend.tiled_decode import DecodeTiling, VaeTiling

    env = environment()
    rows, memory = ([], {}) if args.skip_memory else memory_rows()
    model_dir = str(tiny_cached("flux-realvae", cache_root() / "tiny"))
    latents = torch.randn(1, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(3))
    tiling = DecodeTiling(mode=VaeTiling.ON, tile_size=args.tile, overlap=args.tile // 4)
    sessions = {"2 ranks (split)": Session(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1)),
                "1 rank": Session(SessionConfig(world_size=1, threads_per_rank=1))}
    images, split = {}, {}
    try:
        for session in sessions.values():
            session.load(model_dir)

        def side(name: str):
            def run() -> None:
                images[name] = sessions[name].decode(latents, tiling=tiling)
                split[name] = sessions[name].last_decode["split"]
            return run

        times = interleaved({n: side(n) for n in sessions}, repeat=args.repeat, warmup=args.warmup)
        whole = interleaved({"whole": lambda: images.__setitem__("whole", sessions["1 rank"].decode(latents))},
                            repeat=args.repeat, warmup=args.warmup)["whole"]
    finally:
        for session in sessions.values():
            session.close()
    med = {n: median(t) for n, t in times.items()}
    two, one = list(sessions)
    diff = float((images[two] - images[one]).abs().max())
    rows += [
        [f"tiled decode {args.size}² in tiles of {args.tile}: {one} / {two}", med[one], med[two], med[one] / med[two],
         "≈ 2 (2 ranks)"],
        ["  split over ranks (2 ranks; 1 rank)", split[two], split[one], "", ""],
        ["  whole decode on 1 rank (s)", median(whole), "", "", ""],
        ["  max abs diff 2 ranks vs 1 rank (tiled)", diff, "", "", "0"],
        ["  max abs diff tiled vs whole (random VAE)", float((images[one] - images["whole"]).abs().max()), "", "", ""],
    ]
    finish(NAME, args, env=env, headers=["measure", "a", "b", "ratio", "target"], rows=rows,
           data={"memory": memory, "times_s": times, "whole_s": whole, "median_s": med, "max_abs_diff": diff,
                 "model": model_dir, "tiling": tiling.to_message()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
