"""Data parallel: 2 ranks × 1 thread making 2 images (one prompt each) vs 1 rank × 1 thread making both in sequence
(target ≥ 1.8×), and vs 1 rank × 2 threads (`threads_per_rank=2`), all through `Session.generate`.

    python -m bench.data_parallel [--steps 4] [--size 384]

The three sidecars stay up side by side (idle ranks sleep in a blocking read) and are timed in turn, A B C A B C,
so that load from other users of the machine falls on all three alike. The images must be identical (the seed
contract makes image j depend only on its prompt and seed + j).
"""

from __future__ import annotations

from bench._common import bench_pipeline, cpu_seconds, environment, finish, interleaved, median, parse_args

NAME = "data_parallel"
PROMPTS = ["a red house", "a blue tree"]


def main() -> int:
    args = parse_args(NAME, __doc__, extra=lambda p: (
        p.add_argument("--steps", type=int, default=4),
        p.add_argument("--size", type=int, default=384),
    ))
    from dist_backend import Session, SessionConfig

    env = environment()
    model_dir = str(bench_pipeline("step"))
    settings = dict(seed=11, steps=args.steps, guidance=3.5, height=args.size, width=args.size)
    configs = {
        "2 ranks × 1 thread (dp 2)": SessionConfig(world_size=2, threads_per_rank=1),
        "1 rank × 1 thread": SessionConfig(world_size=1, threads_per_rank=1),
        "1 rank × 2 threads": SessionConfig(world_size=1, threads_per_rank=2),
    }
    sessions = {name: Session(config) for name, config in configs.items()}
    images = {}
    try:
        for session in sessions.values():
            session.load(model_dir)

        # CPU seconds of all ranks per generate, next to wall time: threads that spin while waiting for a core
        # held by someone else show up here as CPU burnt for no progress.
        cpu: dict[str, list[float]] = {name: [] for name in sessions}
        denoise_s: dict[str, list[float]] = {name: [] for name in sessions}

        def side(name: str):
            pids = sessions[name].sidecar_pids()

            def run() -> None:
                c0, d0 = sum(cpu_seconds(p) for p in pids), sessions[name].timings.stages.get("denoise", 0.0)
                images[name] = sessions[name].generate(model_dir=model_dir, prompts=PROMPTS, **settings)[1]
                cpu[name].append(sum(cpu_seconds(p) for p in pids) - c0)
                denoise_s[name].append(sessions[name].timings.stages["denoise"] - d0)
            return run

        times = interleaved({n: side(n) for n in sessions}, repeat=args.repeat, warmup=args.warmup)
        denoise = {n: median(v[args.warmup:]) for n, v in denoise_s.items()}
    finally:
        for session in sessions.values():
            session.close()

    configs_names = list(configs)
    dp, seq, threads = configs_names
    reference = images[seq]
    diff = max(float((images[n] - reference).abs().max()) for n in configs_names)
    med = {n: median(t) for n, t in times.items()}
    rows = [
        [f"{seq} / {dp}: generate", med[seq], med[dp], med[seq] / med[dp], "≥ 1.8", med[seq] / med[dp] >= 1.8],
        [f"{seq} / {dp}: denoise stage", denoise[seq], denoise[dp], denoise[seq] / denoise[dp], "", ""],
        [f"{threads} / {dp}: generate", med[threads], med[dp], med[threads] / med[dp], "", ""],
        [f"{threads} / {dp}: denoise stage", denoise[threads], denoise[dp], denoise[threads] / denoise[dp], "", ""],
        *([f"  CPU s of all ranks per generate: {n}", median(cpu[n][args.warmup:]), "", "", "", ""] for n in configs),
        ["images max abs diff between the three", "", "", diff, "0", diff == 0.0],
    ]
    finish(NAME, args, env=env, headers=["measure", "slower s", "dp s", "ratio", "target", "met"], rows=rows,
           data={"settings": settings, "prompts": PROMPTS, "times_s": times, "median_s": med,
                 "denoise_stage_s": denoise, "rank_cpu_s": cpu, "image_max_abs_diff": diff, "model": model_dir})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
