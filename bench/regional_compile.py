"""Regional compilation on CPU (inductor): the bench "step" Flux pipeline's transformer, eager vs
`compile_repeated_blocks` (through the engine's `compile_regions`), in this process with 1 thread: the first
compiled call (compile included), then the steady step time of both, interleaved, and the compiled output's
difference from eager.

    python -m bench.regional_compile [--repeat 5] [--steps 4] [--size 256]

The first call is timed once (it is a one-off by definition); the inductor cache on disk (/tmp/torchinductor_*)
makes a second run of this bench compile faster, so the first-call number is for a cold cache only when that folder
was empty (recorded in the JSON).
"""

from __future__ import annotations

import glob
import time
from functools import partial

from bench._common import bench_pipeline, environment, finish, interleaved, median, parse_args

NAME = "regional_compile"
PROMPT = "a red fox in the snow"


def _extra(parser) -> None:
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)


def main() -> int:
    import torch
    from diffusers import DiffusionPipeline

    from dist_backend.pipelines import adapter_for
    from dist_backend.pipelines.base import ImageRequest
    from dist_backend.strategies.regional_compile import compile_regions, graphs_compiled

    args = parse_args(NAME, __doc__, extra=_extra)
    env = environment()
    cold_cache = not glob.glob("/tmp/torchinductor_*/fxgraph")
    torch.set_num_threads(1)
    pipes = {}
    for side in ("eager", "regional"):
        pipes[side] = DiffusionPipeline.from_pretrained(bench_pipeline("step"))
        pipes[side].set_progress_bar_config(disable=True)
    adapter = adapter_for("flux")
    request = ImageRequest(seed=0, steps=args.steps, guidance=3.5, height=args.size, width=args.size)
    out = {}

    def run(side: str) -> None:
        with torch.inference_mode():
            out[side] = adapter.reference(pipes[side], prompt=PROMPT, negative_prompt=None, request=request)

    compile_regions(pipes["regional"].transformer)
    before = graphs_compiled()
    first = time.perf_counter()
    run("regional")
    first = time.perf_counter() - first
    graphs = graphs_compiled() - before
    times = interleaved({s: partial(run, s) for s in pipes}, repeat=args.repeat, warmup=args.warmup)
    recompiled = graphs_compiled() - before - graphs
    diff = float((out["regional"] - out["eager"]).abs().max())
    eager, compiled = median(times["eager"]), median(times["regional"])
    rows = [["eager", round(eager / args.steps, 4), "", 1.0, ""],
            ["regional compile", round(compiled / args.steps, 4), round(first, 1), round(eager / compiled, 3),
             f"{diff:.1e}"]]
    finish(NAME, args, env=env, rows=rows,
           headers=["side", "s/step (steady)", "first call s (incl. compile)", "speedup", "max |Δlatent| vs eager"],
           data={"seconds": times, "first_call_s": first, "graphs_compiled": graphs,
                 "graphs_recompiled_in_timed_calls": recompiled, "inductor_cache_was_cold": cold_cache})
    print(f"graphs compiled on the first call: {graphs}; recompiled during the timed calls: {recompiled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
