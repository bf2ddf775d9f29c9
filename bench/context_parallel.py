"""Context parallel proxy on CPU: one forward of a Flux-shaped transformer at 4096 image tokens (+ 64 text), 2 ranks ×
1 thread with Ulysses and with Ring vs 1 rank × 1 thread, and the bytes each method moves per forward, counted at
the collectives and set next to the formula.

    python -m bench.context_parallel [--repeat 5] [--layers 1 1] [--heads 4] [--head-dim 64]

Ranks are processes started here with torch.distributed gloo; CP is switched on with the engine's own
`build_mesh` + `enable_context_parallel` (which installs the CPU workarounds Ring needs). Fewer layers and a smaller
hidden size than FLUX.1 keep a run to a minute on 2 cores; the sequence length is the real one for 1024² images.
The single-rank process runs before and after the 2-rank one and its samples are pooled, so slow drift of the
machine's load does not all land on one side. Every rank checks its output against the single-rank output.

Bytes per forward and rank (P ranks, L attention layers, S joint tokens, hidden size d, e bytes per element):
  Ulysses: 4 all-to-alls (Q, K, V before attention, O after) of the local shard S/P × d, each sending (P-1)/P of it:
           L × 4 × (P-1)/P × S/P × d × e
  Ring:    one all-gather of the local K and V shards (diffusers gathers them up front, then rotates locally):
           L × 2 × (P-1) × S/P × d × e
  both:    plus the final all-gather of the image-token output, (P-1) × (S_image/P) × out_channels × e.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import environment, finish, median, parse_args

NAME = "context_parallel"
IMAGE_TOKENS, TEXT_TOKENS, IN_CHANNELS, TEXT_DIM, POOLED_DIM = 4096, 64, 16, 32, 32


def _model(args):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    axes = (args.head_dim // 8, args.head_dim * 7 // 16, args.head_dim * 7 // 16)  # sums to head_dim, all even
    return FluxTransformer2DModel(
        patch_size=1, in_channels=IN_CHANNELS, num_layers=args.layers[0], num_single_layers=args.layers[1],
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=axes,
    ).eval()


def _inputs():
    import torch

    gen = torch.Generator().manual_seed(1)
    side = int(IMAGE_TOKENS ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(1, IMAGE_TOKENS, IN_CHANNELS, generator=gen),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen),
        "pooled_projections": torch.randn(1, POOLED_DIM, generator=gen),
        "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
        "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT_TOKENS, 3), "return_dict": False,
    }


class ByteCounter:
    """Counts bytes each rank RECEIVES in the collectives diffusers' CP uses, by wrapping the functional collectives
    it looks up at call time (`funcol.all_to_all_single`, `funcol.all_gather_tensor`). Bench-only instrumentation."""

    def __init__(self, world: int) -> None:
        import torch.distributed._functional_collectives as funcol

        self.funcol, self.world, self.bytes, self.calls = funcol, world, 0, 0
        self.originals = {n: getattr(funcol, n) for n in ("all_to_all_single", "all_gather_tensor")}

    def __enter__(self):
        a2a, gather = self.originals["all_to_all_single"], self.originals["all_gather_tensor"]

        def all_to_all_single(x, *a, **k):
            self.bytes += x.numel() * x.element_size() * (self.world - 1) // self.world
            self.calls += 1
            return a2a(x, *a, **k)

        def all_gather_tensor(x, *a, **k):
            self.bytes += x.numel() * x.element_size() * (self.world - 1)
            self.calls += 1
            return gather(x, *a, **k)

        self.funcol.all_to_all_single, self.funcol.all_gather_tensor = all_to_all_single, all_gather_tensor
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.funcol, name, fn)


def worker(args) -> int:
    """One rank (RANK / WORLD_SIZE / MASTER_* in the environment). Prints `RESULT <json>` on its last line."""
    import torch
    import torch.distributed as dist

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' funcol.all_gather_tensor deprecation
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, inputs = _model(args), _inputs()
    reference_path = Path(args.reference)

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    def timed_forwards():
        forward()  # warm-up (and, under CP, the first call that sets up the hooks' state)
        times = []
        for _ in range(args.repeat):
            if world > 1:
                dist.barrier()  # start together: the step time is the slower rank's
            t0 = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - t0)
        return times, out

    result = {"rank": rank, "world": world}
    if world == 1:
        if args.profile:
            result["profile"] = {"single": _profiled(forward)}
        times, out = timed_forwards()
        if not reference_path.exists():
            torch.save(out, reference_path)
        result["single"] = {"times_s": times, "max_abs_diff": float((out - torch.load(reference_path)).abs().max())}
    else:
        from dist_backend.strategies.context_parallel import (build_mesh, disable_context_parallel,
                                                              enable_context_parallel)

        dist.init_process_group("gloo", rank=rank, world_size=world)
        reference = torch.load(reference_path)
        lengths = {"image tokens": IMAGE_TOKENS, "text tokens": TEXT_TOKENS}
        for method in ("ulysses", "ring"):
            ring, ulysses = (world, 1) if method == "ring" else (1, world)
            mesh = build_mesh(device_type="cpu", dp=1, ring=ring, ulysses=ulysses)
            enable_context_parallel(model, ring=ring, ulysses=ulysses, mesh=mesh, seq_lengths=lengths)
            forward()  # warm-up outside the counter
            with ByteCounter(world) as counter:
                forward()
            if args.profile and rank == 0:
                result.setdefault("profile", {})[method] = _profiled(forward)
            elif args.profile:
                forward()  # the peer of the profiled forward (collectives need both ranks)
            times, out = timed_forwards()
            result[method] = {"times_s": times, "bytes": counter.bytes, "collectives": counter.calls,
                              "max_abs_diff": float((out - reference).abs().max())}
            disable_context_parallel(model)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _profiled(fn) -> str:
    """cProfile of one call, top entries by own time (the excerpt docs/PERFORMANCE.md quotes)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(10)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args, reference: Path) -> list[dict]:
    port = _free_port()
    cmd = [sys.executable, "-m", "bench.context_parallel", "--worker", "--reference", str(reference),
           "--repeat", str(args.repeat), "--layers", *map(str, args.layers), "--heads", str(args.heads),
           "--head-dim", str(args.head_dim)] + (["--profile"] if args.profile else [])
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    # A rank that dies leaves its peers waiting in a collective: stop them all at the first failure.
    deadline = time.monotonic() + 1800
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            codes = [p.wait() for p in procs]
            raise RuntimeError(f"{world}-rank run failed (exit codes {codes})" if failed else "timed out")
        time.sleep(0.2)
    results = []
    for proc in procs:
        if proc.returncode:
            raise RuntimeError(f"a {world}-rank worker exited with {proc.returncode}")
        lines = proc.stdout.read().splitlines()
        line = next(x for x in reversed(lines) if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def main() -> int:
    def extra(p):
        p.add_argument("--layers", type=int, nargs=2, default=[1, 1], metavar=("DOUBLE", "SINGLE"))
        p.add_argument("--heads", type=int, default=4)
        p.add_argument("--head-dim", type=int, default=64)
        p.add_argument("--profile", action="store_true", help="print a cProfile excerpt of one forward per config")
        p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank, started by launch()
        p.add_argument("--reference", default="", help=argparse.SUPPRESS)

    args = parse_args(NAME, __doc__, repeat=7, extra=extra)
    if args.worker:
        return worker(args)
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.pt"
        first = launch(1, args, reference)[0]
        cp = launch(2, args, reference)
        last = launch(1, args, reference)[0]
    if args.profile:
        for name, text in {**first.get("profile", {}), **cp[0].get("profile", {})}.items():
            print(f"== cProfile, one forward, {name} (rank 0) ==\n{text}")
    single = first["single"]["times_s"] + last["single"]["times_s"]
    t_single = median(single)
    world, layers = 2, sum(args.layers)
    tokens, hidden, elt = IMAGE_TOKENS + TEXT_TOKENS, args.heads * args.head_dim, 4
    output_gather = (world - 1) * IMAGE_TOKENS // world * IN_CHANNELS * elt
    formula = {
        "ulysses": layers * 4 * (world - 1) / world * tokens / world * hidden * elt + output_gather,
        "ring": layers * 2 * (world - 1) * tokens / world * hidden * elt + output_gather,
    }
    rows = [["1 rank × 1 thread", f"{t_single:.3f}", 1.0, "", "", "", first["single"]["max_abs_diff"]]]
    data = {"single_times_s": single, "methods": {},
            "profiles": {**first.get("profile", {}), **cp[0].get("profile", {})},
            "model": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                      "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "dtype": "float32"}}
    for method in ("ulysses", "ring"):
        # Per forward the slower rank decides; take each repetition's max over ranks, then the median.
        per_rep = [max(r[method]["times_s"][i] for r in cp) for i in range(args.repeat)]
        t = median(per_rep)
        measured = cp[0][method]["bytes"]
        diff = max(r[method]["max_abs_diff"] for r in cp)
        rows.append([f"2 ranks × 1 thread, {method}", f"{t:.3f}", t_single / t, f"{measured / 1e6:.3f}",
                     f"{formula[method] / 1e6:.3f}", cp[0][method]["collectives"], diff])
        data["methods"][method] = {"times_s": per_rep, "speedup": t_single / t, "bytes_measured": measured,
                                   "bytes_formula": formula[method], "collectives": cp[0][method]["collectives"],
                                   "max_abs_diff": diff}
    finish(NAME, args, env=env, rows=rows, data=data, headers=[
        "config", "forward s", "speedup", "MB recv/rank (counted)", "MB (formula)", "collectives", "max abs diff"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
