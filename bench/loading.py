"""Loading: N ranks each loading one checkpoint (the "load" op every rank runs) vs one rank (target ≤ 1.25×), and a
rank's load vs reading the same bytes from the page cache in this process.

    python -m bench.loading [--world-sizes 1 2] [--profile]

The checkpoint is the bench "load" Flux pipeline (~330 MB float32, mostly one transformer safetensors file). Each
timed load follows an untimed "unload" op, so every rank builds the pipeline again (safetensors maps the files rather
than reading them: docs/PERFORMANCE.md §6); the files stay in the page cache (warm-up reads them). Sidecars for every
world size stay up side by side and are timed in turn with the page-cache read.
`--profile` prints a cProfile excerpt of the same load done in this process (`DiffusionPipeline.from_pretrained`).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path

from bench._common import bench_pipeline, environment, finish, folder_bytes, median, parse_args

NAME = "loading"


def read_folder(path: Path) -> int:
    """Every file's bytes into fresh memory (what a loader that copies the bytes must at least do)."""
    total = 0
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as fh:
                total += len(fh.read())
    return total


def in_process(model_dir: Path, *, touch: bool) -> float:
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    if touch:
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            for param in getattr(pipe, name).parameters():
                float(param.detach().reshape(-1)[::1024].sum())  # one float per 4 KiB page
    return time.perf_counter() - t0


def profile_in_process(model_dir: Path) -> str:
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    profiler = cProfile.Profile()
    profiler.runcall(DiffusionPipeline.from_pretrained, str(model_dir))
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(12)
    return buf.getvalue()


def main() -> int:
    args = parse_args(NAME, __doc__, repeat=9, extra=lambda p: (
        p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2]),
        p.add_argument("--profile", action="store_true"),
    ))
    from dist_backend import Session, SessionConfig

    env = environment()
    model_dir = bench_pipeline("load")
    nbytes = folder_bytes(model_dir)
    sessions = {w: Session(SessionConfig(world_size=w, threads_per_rank=1)) for w in args.world_sizes}
    try:
        sidecars = {w: s.sidecar for w, s in sessions.items()}  # start them all first: starting is not loading

        def load(w: int) -> float:
            sidecars[w].call("unload", [{}] * w)  # untimed: drop the pipeline so the load really loads
            t0 = time.perf_counter()
            sidecars[w].call("load", [{"model_dir": str(model_dir)}] * w)
            return time.perf_counter() - t0

        def read() -> float:
            t0 = time.perf_counter()
            read_folder(model_dir)
            return time.perf_counter() - t0

        sides = {f"load, {w} rank(s)": (lambda w=w: load(w)) for w in args.world_sizes}
        sides["page-cache read of the same files"] = read
        # safetensors maps the file and diffusers keeps the mapped tensors, so a load reads almost nothing; the
        # bytes are faulted in at first use. These two sides, in this process, show how much that defers.
        sides["from_pretrained in this process"] = lambda: in_process(model_dir, touch=False)
        sides["from_pretrained + touch every weight page"] = lambda: in_process(model_dir, touch=True)
        wall: dict[str, list[float]] = {k: [] for k in sides}
        for rep in range(args.warmup + args.repeat):  # A B C A B C: load from others falls on every side alike
            for key, fn in sides.items():
                elapsed = fn()
                if rep >= args.warmup:
                    wall[key].append(elapsed)
    finally:
        for session in sessions.values():
            session.close()
    med = {k: median(v) for k, v in wall.items()}
    base_key = f"load, {args.world_sizes[0]} rank(s)"
    read = med["page-cache read of the same files"]
    rows = []
    for w in args.world_sizes:
        key = f"load, {w} rank(s)"
        ratio, is_base = med[key] / med[base_key], w == args.world_sizes[0]
        rows.append([key, med[key], nbytes / med[key] / 1e9, ratio, "" if is_base else "≤ 1.25",
                     "" if is_base else ratio <= 1.25])
        rows.append([f"  {key} / page-cache read", "", "", med[key] / read, "", ""])
    rows.append(["page-cache read of the same files", read, nbytes / read / 1e9, "", "", ""])
    for key in ("from_pretrained in this process", "from_pretrained + touch every weight page"):
        rows.append([f"{key} / page-cache read", med[key], nbytes / med[key] / 1e9, med[key] / read, "", ""])
    profile = profile_in_process(model_dir) if args.profile else ""
    if profile:
        print(f"== cProfile, DiffusionPipeline.from_pretrained in this process, 1 thread ==\n{profile}")
    finish(NAME, args, env=env, headers=["measure", "s", "GB/s", "ratio", "target", "met"], rows=rows,
           data={"model": str(model_dir), "bytes": nbytes, "times_s": wall, "median_s": med, "profile": profile})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
