"""`python -m dist_backend demo`: the tiny Flux-family pipeline on 2 CPU ranks, with Ulysses context parallelism
and with data parallelism, each image checked against the plain diffusers pipeline run in this process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEMO_PROMPTS = ("a red fox in the snow", "a lighthouse at dusk")
DEMO = dict(seed=42, steps=4, guidance=3.5, height=64, width=64)


def default_cache() -> Path:
    return Path(os.environ.get("DISTDIFF_CACHE", Path.home() / ".cache" / "distdiff"))


def reference_latents(model_dir: Path, prompts: tuple[str, ...], *, seed: int, steps: int, guidance: float,
                      height: int, width: int):
    """The plain diffusers pipeline in this process, one call per image with its own seed (the seed contract), as a
    ComfyUI LATENT."""
    import torch
    from diffusers import DiffusionPipeline

    from .latent_format import latent_format
    from .pipelines import adapter_for, read_model_config
    from .pipelines.base import ImageRequest

    info = read_model_config(str(model_dir))
    adapter = adapter_for(info["family"])
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for j, prompt in enumerate(prompts):
        request = ImageRequest(seed=seed + j, steps=steps, guidance=guidance, height=height, width=width)
        out.append(adapter.reference(pipe, prompt=prompt, negative_prompt=None, request=request))
    return latent_format(info).process_out(torch.cat(out))  # ComfyUI's LATENT convention, as the session returns


def run_demo(*, out_dir: str | Path, cache_dir: str | Path | None = None) -> int:
    from .config import SessionConfig
    from .images import image_names, save_pngs
    from .pipelines.tiny import tiny_cached
    from .session import Session

    t_all = time.monotonic()
    model_dir = tiny_cached("flux", Path(cache_dir) if cache_dir else default_cache() / "tiny")
    reference = reference_latents(model_dir, DEMO_PROMPTS, **DEMO)
    rows = []
    runs = (
        ("ulysses", SessionConfig(world_size=2, ulysses=2, threads_per_rank=1)),
        ("data-parallel", SessionConfig(world_size=2, threads_per_rank=1)),
    )
    for name, config in runs:
        session = Session(config)
        try:
            t0 = time.monotonic()
            latents, images = session.generate(model_dir=model_dir, prompts=list(DEMO_PROMPTS), **DEMO)
            seconds = time.monotonic() - t0
        finally:
            session.close()
        paths = save_pngs(images, Path(out_dir) / name, names=image_names(num_images=latents.shape[0], frames=1))
        diff = float((latents - reference).abs().max())
        rows.append({"run": name, "strategy": config.strategy, "ranks": config.world_size,
                     "images": len(paths), "seconds": round(seconds, 2), "max_abs_diff_vs_single": diff,
                     "pngs": paths})
    print(f"DistDiff demo: tiny Flux-family pipeline at {DEMO['width']}×{DEMO['height']}, {DEMO['steps']} steps, "
          f"{len(DEMO_PROMPTS)} prompts, model {model_dir}")
    print(f"{'run':<15}{'strategy':<12}{'ranks':>6}{'images':>8}{'seconds':>9}  max |Δ| vs one process")
    for r in rows:
        print(f"{r['run']:<15}{r['strategy']:<12}{r['ranks']:>6}{r['images']:>8}{r['seconds']:>9.2f}  "
              f"{r['max_abs_diff_vs_single']:.2e}")
    ok = all(r["max_abs_diff_vs_single"] <= 1e-4 for r in rows)
    print(f"PNGs in {Path(out_dir).resolve()}; all within 1e-4 of the single-process pipeline: {ok}; "
          f"total {time.monotonic() - t_all:.1f} s")
    print(json.dumps({"demo": rows, "ok": ok}))
    return 0 if ok else 1
