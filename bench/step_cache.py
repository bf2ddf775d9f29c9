"""Step caching on CPU: the bench "step" Flux pipeline (bench/_common.py) denoised in this process without a cache
and with each of diffusers' caches at its default threshold, through the engine's `step_cache` (the same code the
ranks run): forwards skipped, time per image, and the decoded image's PSNR against the uncached image, so a user can
judge the trade.

    python -m bench.step_cache [--repeat 5] [--steps 20] [--size 256]

Sides run interleaved; one process, 1 thread (caching does not depend on the number of ranks: under CP the
first-block decision is the group's, proven equal to one process by tests/dist/test_engine_cache.py).
"""

from __future__ import annotations

import math
from functools import partial

from bench._common import bench_pipeline, environment, finish, interleaved, median, parse_args

NAME = "step_cache"
PROMPT = "a red fox in the snow"
MODES = ("none", "first_block", "taylorseer", "magcache")


def _extra(parser) -> None:
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)


def main() -> int:
    import torch
    from diffusers import DiffusionPipeline

    from dist_backend.pipelines import adapter_for
    from dist_backend.pipelines.base import ImageRequest
    from dist_backend.strategies.step_cache import step_cache

    args = parse_args(NAME, __doc__, extra=_extra)
    env = environment()
    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(bench_pipeline("step"))
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for("flux")
    request = ImageRequest(seed=0, steps=args.steps, guidance=3.5, height=args.size, width=args.size)
    out, skipped = {}, {}

    def run(mode: str) -> None:
        with torch.inference_mode(), step_cache(pipe.transformer, mode=mode, threshold=0.0, steps=args.steps) as st:
            out[mode] = adapter.reference(pipe, prompt=PROMPT, negative_prompt=None, request=request)
        skipped[mode] = (st.skipped, st.forwards) if st is not None else (0, args.steps)

    times = interleaved({m: partial(run, m) for m in MODES}, repeat=args.repeat, warmup=args.warmup)
    with torch.inference_mode():
        images = {m: adapter.decode(pipe, latents=out[m], device=torch.device("cpu")) for m in MODES}
    base = median(times["none"])
    rows, data = [], {"seconds": times, "skipped": skipped, "psnr_db": {}}
    for mode in MODES:
        mse = float(((images[mode] - images["none"]) ** 2).mean())
        psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        data["psnr_db"][mode] = psnr
        rows.append([mode, f"{skipped[mode][0]}/{skipped[mode][1]}", round(median(times[mode]), 3),
                     round(base / median(times[mode]), 3), "exact" if math.isinf(psnr) else round(psnr, 1)])
    finish(NAME, args, env=env, data=data,
           headers=["cache (default threshold)", "forwards skipped", "s/image", "speedup", "PSNR dB vs none"],
           rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
