"""fp8 weight storage (`weights: fp8`, diffusers' layerwise casting) vs the compute dtype: transformer weight bytes
and the time of one transformer forward, Flux-shaped ("load" bench shape, hidden 768), 256 image + 32 text tokens.

    python -m bench.fp8_weights [--threads 1] [--dtype bfloat16]
"""

from __future__ import annotations

import torch

from dist_backend.files.assemble import enable_fp8_storage

from ._common import BENCH_TRANSFORMERS, environment, finish, interleaved, median, parse_args


def _extra(parser) -> None:
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    from diffusers import FluxTransformer2DModel

    args = parse_args("fp8_weights", __doc__, extra=_extra)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shape = dict(BENCH_TRANSFORMERS["load"], in_channels=16, joint_attention_dim=32, pooled_projection_dim=32,
                 guidance_embeds=True)
    torch.manual_seed(0)
    plain = FluxTransformer2DModel(**shape).to(dtype).eval()
    fp8 = FluxTransformer2DModel(**shape).to(dtype).eval()
    fp8.load_state_dict(plain.state_dict())
    enable_fp8_storage(fp8, compute_dtype=dtype)  # what `weights: fp8` does
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 256, 16, generator=gen).to(dtype),
                  encoder_hidden_states=torch.randn(1, 32, 32, generator=gen).to(dtype),
                  pooled_projections=torch.randn(1, 32, generator=gen).to(dtype),
                  timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype),
                  img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(32, 3), return_dict=False)

    def run(model):
        with torch.inference_mode():
            return model(**inputs)[0]

    diff = float((run(plain).float() - run(fp8).float()).abs().max())
    times = interleaved({"compute": lambda: run(plain), "fp8": lambda: run(fp8)}, repeat=args.repeat,
                        warmup=args.warmup)
    t_plain, t_fp8 = median(times["compute"]), median(times["fp8"])
    b_plain, b_fp8 = _weight_bytes(plain), _weight_bytes(fp8)
    rows = [[f"{args.dtype} weights", round(b_plain / 2**20, 1), round(t_plain * 1e3, 1), 1.0, 1.0],
            ["fp8 storage (layerwise casting)", round(b_fp8 / 2**20, 1), round(t_fp8 * 1e3, 1),
             round(b_fp8 / b_plain, 3), round(t_fp8 / t_plain, 3)]]
    finish("fp8_weights", args, env=environment(),
           headers=["transformer weights", "MiB", "forward ms (median)", "memory ratio", "time ratio"], rows=rows,
           data={"times_s": times, "weight_bytes": {"compute": b_plain, "fp8": b_fp8}, "max_abs_output_diff": diff})
    print(f"max abs output difference fp8 vs {args.dtype}: {diff:.3e}")


if __name__ == "__main__":
    main()
