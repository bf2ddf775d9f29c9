"""Live previews: `Session.denoise` with a preview every step vs without, same model (bench "step" Flux), same seed,
same sidecar. Target: ≤ 1.02 (previews cost < 2 % of a step).

    python -m bench.previews [--steps 8] [--size 384] [--threads 1] [--repeat 5]

The preview side does all that a ComfyUI host would: the rank computes the x0 estimate, unpacks it, sends it as
float16 with its progress message; the host turns it into an RGB image the way ComfyUI's Latent2RGB previewer does
(a linear map of the channels, uint8, PIL image) and encodes it as JPEG like ComfyUI's server (which does that on
its own thread; here it is on the caller's, an upper bound). Sides are interleaved (A B A B ...); the headline is the
median of the paired ratios. The latents of both sides are compared: previews must not change the result.
"""

from __future__ import annotations

import io

import torch

from bench._common import bench_pipeline, environment, finish, interleaved, median, parse_args

NAME = "previews"


def host_preview(factors: torch.Tensor, sink: dict):
    """What ComfyUI's Latent2RGBPreviewer + its server do with a preview latent, minus the websocket send."""
    from PIL import Image

    def on_preview(latent: torch.Tensor) -> None:
        x0 = latent.float()[0]
        rgb = torch.nn.functional.linear(x0.movedim(0, -1), factors)
        image = Image.fromarray(((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy())
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sink["previews"] = sink.get("previews", 0) + 1
        sink["latent_bytes"] = latent.numel() * latent.element_size()
        sink["jpeg_bytes"] = buffer.tell()

    return on_preview


def main() -> int:
    args = parse_args(NAME, __doc__, repeat=5, extra=lambda p: (
        p.add_argument("--steps", type=int, default=8),
        p.add_argument("--size", type=int, default=384, help="image height = width in pixels"),
        p.add_argument("--threads", type=int, default=1, help="torch threads of the rank and of this process"),
    ))
    from dist_backend import Session, SessionConfig

    env = environment()
    model_dir = str(bench_pipeline("step"))
    torch.set_num_threads(args.threads)
    settings = dict(seed=7, steps=args.steps, guidance=3.5, height=args.size, width=args.size)
    session = Session(SessionConfig(world_size=1, threads_per_rank=args.threads))
    out: dict[str, torch.Tensor] = {}
    sink: dict = {}
    try:
        session.load(model_dir)
        cond = session.encode(["a red house"])
        channels = session.denoise(cond, **{**settings, "steps": 1}).shape[1]
        factors = torch.randn(3, channels, generator=torch.Generator().manual_seed(0)) * 0.1
        on_preview = host_preview(factors, sink)
        times = interleaved({
            "without": lambda: out.__setitem__("without", session.denoise(cond, **settings)),
            "with": lambda: out.__setitem__("with", session.denoise(cond, **settings, on_preview=on_preview)),
        }, repeat=args.repeat, warmup=args.warmup)
    finally:
        session.close()
    ratio = median([w / wo for w, wo in zip(times["with"], times["without"])])
    step_ms = {k: 1000 * median(v) / args.steps for k, v in times.items()}
    diff = float((out["with"] - out["without"]).abs().max())
    runs = args.repeat + args.warmup
    rows = [
        ["denoise with / without previews (median of paired ratios)", step_ms["with"], step_ms["without"], ratio,
         "≤ 1.02", ratio <= 1.02],
        ["  previews per run (one per step)", sink.get("previews", 0) / runs, "", "", args.steps,
         sink.get("previews", 0) == runs * args.steps],
        ["  preview latent bytes / JPEG bytes", sink.get("latent_bytes"), sink.get("jpeg_bytes"), "", "", ""],
        ["  latents max abs diff with vs without", "", "", diff, "0", diff == 0.0],
    ]
    finish(NAME, args, env=env, headers=["measure", "with ms/step", "without ms/step", "ratio", "target", "met"],
           rows=rows, data={"settings": settings, "threads": args.threads, "times_s": times, "ratio": ratio,
                            "step_ms": step_ms, "model": model_dir, **sink})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
