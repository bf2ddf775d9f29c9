"""Sidecar overhead: `Session.generate` through a world_size=1 sidecar vs the same diffusers pipeline called in this
process, same model (bench "step" Flux: a step takes ≥ 50 ms), same settings and thread count. Target ≤ 1.02.

    python -m bench.sidecar_overhead [--steps 8] [--size 384] [--threads 1] [--rounds 3]

Both sides do the same work: encode, denoise (from the same seed), VAE decode to float32 images. The in-process side
is the adapter's `reference` (the plain `pipe(prompt=..., generator=...)` call) followed by the adapter's decode,
which is what the rank runs after its own denoise. The images of the two sides are compared as a sanity check.

Why rounds: on this machine the same computation runs a steady few per cent faster or slower in one process than in
another (memory layout, neighbours' load), which is more than the 2 % being measured. Each round starts a fresh rank
and loads a fresh in-process pipeline; the headline is the median over rounds of each round's median-of-pairs ratio.
CPU seconds (host + rank vs this process) are recorded next to wall time: they move less with other users' load.
"""

from __future__ import annotations

import time

import torch

from bench._common import bench_pipeline, cpu_seconds, environment, finish, interleaved, median, parse_args

NAME = "sidecar_overhead"


def one_round(args, model_dir: str, settings: dict, prompt: str) -> dict:
    from diffusers import DiffusionPipeline

    from dist_backend import Session, SessionConfig
    from dist_backend.latent_format import latent_format
    from dist_backend.pipelines.base import ImageRequest
    from dist_backend.pipelines.flux import FluxAdapter

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    adapter, request = FluxAdapter(), ImageRequest(**settings)
    fmt = latent_format({"family": "flux", "components": {"vae": dict(pipe.vae.config)}})
    session = Session(SessionConfig(world_size=1, threads_per_rank=args.threads))
    out: dict[str, torch.Tensor] = {}
    cpu: dict[str, list[float]] = {"sidecar": [], "in_process": []}
    try:
        session.load(model_dir)
        rank_pid = session.sidecar_pids()[0]

        def sidecar() -> None:
            c0 = time.process_time() + cpu_seconds(rank_pid)
            out["sidecar"] = session.generate(model_dir=model_dir, prompts=[prompt], **settings)[1]
            cpu["sidecar"].append(time.process_time() + cpu_seconds(rank_pid) - c0)

        def in_process() -> None:
            c0 = time.process_time()
            with torch.inference_mode():
                latents = adapter.reference(pipe, prompt=prompt, negative_prompt=None, request=request)
                raw = fmt.process_out(latents)  # the in-process run decodes the same raw latent the session does
                out["in_process"] = adapter.decode(pipe, latents=raw, device=torch.device("cpu"))
            cpu["in_process"].append(time.process_time() - c0)

        before = dict(session.timings.stages)
        times = interleaved({"sidecar": sidecar, "in_process": in_process}, repeat=args.repeat, warmup=args.warmup)
        runs = args.repeat + args.warmup
        stages = {k: (session.timings.stages[k] - before.get(k, 0.0)) / runs for k in ("encode", "denoise", "decode")}
    finally:
        session.close()
    return {"times_s": times, "cpu_s": {k: v[args.warmup:] for k, v in cpu.items()}, "stage_s": stages,
            "paired_ratio": median([s / i for s, i in zip(times["sidecar"], times["in_process"])]),
            "image_max_abs_diff": float((out["sidecar"] - out["in_process"]).abs().max())}


def main() -> int:
    args = parse_args(NAME, __doc__, repeat=5, extra=lambda p: (
        p.add_argument("--steps", type=int, default=8),
        p.add_argument("--size", type=int, default=384, help="image height = width in pixels"),
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads on both sides (1: on a shared 2-core box 2 threads are slower and noisier)"),
        p.add_argument("--rounds", type=int, default=3, help="fresh rank + fresh in-process pipeline per round"),
    ))
    env = environment()
    model_dir = str(bench_pipeline("step"))
    settings = dict(seed=7, steps=args.steps, guidance=3.5, height=args.size, width=args.size)
    torch.set_num_threads(args.threads)
    rounds = [one_round(args, model_dir, settings, "a red house") for _ in range(args.rounds)]

    pooled = {k: [t for r in rounds for t in r["times_s"][k]] for k in ("sidecar", "in_process")}
    cpu = {k: median([t for r in rounds for t in r["cpu_s"][k]]) for k in ("sidecar", "in_process")}
    med = {k: median(v) for k, v in pooled.items()}
    per_round = [r["paired_ratio"] for r in rounds]
    headline = median(per_round)
    stages = {k: median([r["stage_s"][k] for r in rounds]) for k in ("encode", "denoise", "decode")}
    diff = max(r["image_max_abs_diff"] for r in rounds)
    step_ms = 1000 * stages["denoise"] / args.steps
    rows = [
        ["generate, 1 image: median over rounds of paired ratios", "", "", headline, "≤ 1.02", headline <= 1.02],
        ["  per-round ratios", " / ".join(f"{x:.3f}" for x in per_round), "", "", "", ""],
        ["  all samples pooled: medians", med["sidecar"], med["in_process"], med["sidecar"] / med["in_process"],
         "", ""],
        ["  CPU seconds per generate (host + rank)", cpu["sidecar"], cpu["in_process"],
         cpu["sidecar"] / cpu["in_process"], "", ""],
        ["  sidecar stages encode/denoise/decode s", " / ".join(f"{stages[k]:.3f}" for k in stages), "", "", "", ""],
        [f"  step {step_ms:.0f} ms (≥ 50 wanted); image max abs diff", "", "", diff, "< 1e-5", diff < 1e-5],
    ]
    finish(NAME, args, env=env, headers=["measure", "sidecar s", "in-process s", "ratio", "target", "met"], rows=rows,
           data={"settings": settings, "threads": args.threads, "rounds": rounds, "ratio": headline,
                 "pooled_median_s": med, "cpu_median_s": cpu, "model": model_dir})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
