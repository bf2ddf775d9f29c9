"""CFG parallel on CPU: a Qwen-Image-shaped pipeline with true CFG (guidance > 1, a negative prompt), denoised through
the real sidecar by 2 ranks × 1 thread with cfg = 2 vs 1 rank × 1 thread (target ≥ 1.8×), vs 1 rank × 2 threads
(the same cores), and vs 2-rank Ulysses, in one run; plus the bytes each cfg rank sends per step, counted at the
exchange and set next to the formula.

    python -m bench.cfg_parallel [--repeat 5] [--steps 3] [--size 512] [--layers 4]

The pipeline is make_tiny's Qwen-Image (text encoder, VAE, scheduler) with a bigger random transformer (hidden
256 = 4 heads × 64, `--layers` blocks), built into the bench cache on first use. Sides run interleaved
(A B C D A B C D ...); the timed call is `Session.denoise` of one image (the prompt is encoded once per side).
Every side's latents are checked against the 1-rank side's.

Bytes per step and cfg rank (S image tokens, C = 4 × out_channels values per packed token, e bytes per element):
  CFG parallel: one all_gather of the rank's noise prediction over the 2-rank cfg group: sends S × C × e.
  Ulysses (P = 2, formula only, counted by bench.context_parallel): per forward L × 4 × (P-1)/P × S_joint/P × d × e,
  two forwards per step (cond and uncond), S_joint = image + text tokens, d = hidden size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

from bench._common import cache_root, environment, finish, interleaved, median, parse_args

NAME = "cfg_parallel"
PROMPT, NEGATIVE, GUIDANCE = "a red fox in the snow", "blurry, low quality", 4.0
HEADS, HEAD_DIM, OUT_CHANNELS = 4, 64, 16


def _extra(parser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="denoise steps per timed call")
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (16 px per token)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the bench Qwen-Image")


def bench_qwen_pipeline(layers: int) -> Path:
    """make_tiny's Qwen-Image with a transformer of `layers` blocks, hidden HEADS × HEAD_DIM (seed 0); built once."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from dist_backend.pipelines.tiny import make_tiny

    final = cache_root() / f"qwenimage-cfg-l{layers}-v1"
    if (final / ".bench_complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_tiny("qwenimage", tmp, seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=OUT_CHANNELS, num_layers=layers,
                attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
                axes_dims_rope=(16, 24, 24),  # sums to HEAD_DIM
            )
        shutil.rmtree(tmp / "transformer")
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        (tmp / ".bench_complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / ".bench_complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main() -> int:
    import torch

    from dist_backend.config import SessionConfig
    from dist_backend.session import Session

    args = parse_args(NAME, __doc__, extra=_extra)
    env = environment()
    model = bench_qwen_pipeline(args.layers)
    configs = {
        "1 rank × 1 thread": dict(world_size=1, threads_per_rank=1),
        "1 rank × 2 threads": dict(world_size=1, threads_per_rank=2),
        "cfg2 (2 ranks × 1 thread)": dict(world_size=2, cfg=2, threads_per_rank=1),
        "ulysses2 (2 ranks × 1 thread)": dict(world_size=2, ulysses=2, threads_per_rank=1),
    }
    sessions = {name: Session(SessionConfig(**kw)) for name, kw in configs.items()}
    latents: dict[str, torch.Tensor] = {}
    try:
        conds = {}
        for name, session in sessions.items():
            session.load(model)
            conds[name] = session.encode([PROMPT], NEGATIVE)

        def run(name: str) -> None:
            latents[name] = sessions[name].denoise(conds[name], seed=0, steps=args.steps, guidance=GUIDANCE,
                                                   height=args.size, width=args.size)

        times = interleaved({name: partial(run, name) for name in sessions}, repeat=args.repeat, warmup=args.warmup)
        cfg_stats = sessions["cfg2 (2 ranks × 1 thread)"].last_cfg_stats
    finally:
        for session in sessions.values():
            session.close()

    base_name = "1 rank × 1 thread"
    base = median(times[base_name])
    image_tokens = (args.size // 16) ** 2
    text_tokens = int(conds[base_name].embeds[0]["prompt_embeds"].shape[1])
    neg_tokens = int(conds[base_name].embeds[0]["negative_prompt_embeds"].shape[1])
    formula_cfg = image_tokens * 4 * OUT_CHANNELS * 4
    counted_cfg = [s["bytes_sent"] / args.steps for s in cfg_stats]
    hidden = HEADS * HEAD_DIM
    formula_ulysses = sum(args.layers * 4 * 0.5 * (image_tokens + t) / 2 * hidden * 4 for t in (text_tokens, neg_tokens))
    rows = []
    for name in sessions:
        diff = float((latents[name] - latents[base_name]).abs().max())
        per_step = {"cfg2 (2 ranks × 1 thread)": counted_cfg[0], "ulysses2 (2 ranks × 1 thread)": formula_ulysses}
        rows.append([name, round(median(times[name]) / args.steps, 4), round(base / median(times[name]), 3),
                     f"{diff:.1e}", int(per_step.get(name, 0))])
    data = {
        "seconds": times, "image_tokens": image_tokens, "text_tokens": [text_tokens, neg_tokens],
        "bytes_per_step": {"cfg_counted_per_rank": counted_cfg, "cfg_formula": formula_cfg,
                           "ulysses_formula": formula_ulysses},
        "target": "cfg2 ≥ 1.8× vs 1 rank × 1 thread",
    }
    finish(NAME, args, env=env, data=data, rows=rows,
           headers=["side", "s/step", f"speedup vs {base_name}", "max |Δlatent|", "bytes sent/step/rank"])
    print(f"cfg bytes/step/rank counted {counted_cfg} vs formula S×C×e = {image_tokens}×{4 * OUT_CHANNELS}×4 = "
          f"{formula_cfg}; Ulysses (formula) {int(formula_ulysses)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
