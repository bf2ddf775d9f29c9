"""GPU mode: what one GPU computes for a FLUX.1-dev-shaped transformer step, and what context parallelism over N GPUs
should buy, predicted from one GPU's measured share plus Ulysses / Ring byte counts at NVLink and PCIe bandwidth.

    python -m bench.gpu_model [--attention flash|cudnn] [--cuda-graphs] [--profile-degree N] [--repeat 10]

Without a CUDA device it says so and exits 0 (`--device cpu --shape tiny` runs the same code on CPU, as a check).

Model: FluxTransformer2DModel with FLUX.1-dev's dimensions (19 double + 38 single blocks, hidden 3072 = 24 heads ×
128), random bf16 weights built on the GPU (no download). Step at 1024²: 4096 image + 512 text tokens, batch 1.

One rank's share at N = 2, 4, 8 is timed by running the whole model on S/N tokens with its attention replaced by what
that rank really computes (the communication itself is left out and modelled below):
- Ulysses: the layout changes around the all-to-alls (same copies as diffusers), then attention over all S tokens
  with H/N heads. A [B, S/N, H, D] shard and a [B, S, H/N, D] one have the same number of elements, so the rank's
  own data, reshaped, has exactly the shape and cost of the exchanged data.
- Ring: N attention calls of the S/N local queries against S/N keys each (the local K/V stand in for the ones
  received), each returning its log-sum-exp, merged in float32 as diffusers' ring does.
Every method runs its attention on one kernel, flash (default) or cuDNN (`--attention cudnn`, what SDPA picks on an
H100), both returning the LSE that Ring needs, so the methods compare like for like. `--cuda-graphs` times graph
replays instead of eager forwards (no Python or launch gaps: a stand-in for a compiled model); the "CPU issue ms"
column shows when an eager forward is launch-bound (issue time ≈ device time). FLOPs are counted exactly (hooks on
every Linear + the attention shapes above), and set against a large bf16 matmul timed in the same run.

Prediction per N: step(N) = share(N) + bytes(N) / bandwidth + collectives × latency, with no overlap (diffusers'
Ulysses waits for each all-to-all; its Ring gathers K/V before the first chunk). Bytes per rank per step, L = 57
attention layers, S = 4608 joint tokens, d = 3072, 2 bytes: Ulysses L × 4 × (N-1)/N × S/N × d × 2 (4 all-to-alls:
Q, K, V, O); Ring L × 2 × (N-1) × S/N × d × 2 (the other N-1 ranks' K and V shards). Anchors: xDiT on H100,
compiled: 1.60× at N = 2, 2.64× at N = 4.

CFG parallel (true-CFG step = 2 forwards): cfg2 on 2 GPUs = one full forward each + one exchange of the prediction
(S_img × in_channels × 2 bytes); cfg2 × ulysses N on 2N GPUs = the Ulysses share at N + its bytes + that exchange;
both against one GPU doing the two forwards.
"""

from __future__ import annotations

import contextlib
import time

from bench._common import environment, finish, median, parse_args

NAME = "gpu_model"
SHAPES = {
    "flux-dev": dict(model=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64,
                                axes_dims_rope=(16, 56, 56)), image_tokens=4096, text_tokens=512, matmul=8192),
    "tiny": dict(model=dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=8,
                            joint_attention_dim=32, pooled_projection_dim=16, in_channels=16, axes_dims_rope=(4, 6, 6)),
                 image_tokens=256, text_tokens=64, matmul=512),
}
DEGREES = (2, 4, 8)
LINKS = {"NVLink (450 GB/s)": 450e9, "PCIe (25 GB/s)": 25e9}
ANCHORS = {2: 1.60, 4: 2.64}  # xDiT, H100, compiled
GOALS = {2: 1.75, 4: 3.0, 8: 4.8}


class Attention:
    """Stands in for diffusers' `dispatch_attention_fn` inside the Flux processors (q, k, v: [B, S, H, D])."""

    def __init__(self, torch, kernel: str = "flash") -> None:
        self.torch = torch
        self.kernel = kernel
        self.mode, self.degree = "full", 1
        self.flops = 0
        self.count = False

    def _flash(self, q, k, v, lse: bool = True):
        """[B, H, S, D] -> (out [B, H, S, D], lse [B, H, S] natural log, float32) on the chosen kernel."""
        ops = self.torch.ops.aten
        if q.device.type != "cuda":
            return ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        if self.kernel == "cudnn":
            out = ops._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, False, False)
            return out[0], (out[1].reshape(out[0].shape[:3]) if lse else None)  # some versions add a trailing 1
        out = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        return out[0], out[1]

    def _count(self, batch, heads, sq, skv, dim, times=1):
        if self.count:
            self.flops += 4 * batch * heads * sq * skv * dim * times  # Q·K^T and P·V, 2 FLOPs per multiply-add

    def __call__(self, query, key, value, attn_mask=None, *args, **kwargs):
        torch = self.torch
        assert attn_mask is None, "Flux passes no mask at batch 1"
        B, s, H, D = query.shape
        n = self.degree
        if self.mode == "ulysses":
            # Before the all-to-all: [B, s, H, D] -> [n, s, B, H/n, D]; after it: [B, n·s, H/n, D] (diffusers' copies).
            def to_heads(x):
                x = x.reshape(B, s, n, H // n, D).permute(2, 1, 0, 3, 4).contiguous()
                return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()

            q, k, v = (to_heads(x).transpose(1, 2) for x in (query, key, value))
            out = self._flash(q, k, v, lse=False)[0].transpose(1, 2)  # [B, n·s, H/n, D]
            self._count(B, H // n, n * s, n * s, D)
            out = out.reshape(B, n, s, H // n, D).permute(1, 3, 0, 2, 4).contiguous()
            return out.flatten(0, 1).permute(1, 2, 0, 3).contiguous()  # [B, s, H, D]
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if self.mode == "full":
            self._count(B, H, s, s, D)
            return self._flash(q, k, v, lse=False)[0].transpose(1, 2)
        # ring: gathered K/V buffer (what all_gather writes), then n chunks merged by log-sum-exp in float32
        torch.cat([key.flatten(), value.flatten()]).repeat(n)  # the memory traffic of building the gathered buffer
        out = ring_merge(torch, [self._flash(q, k, v) for _ in range(n)])
        self._count(B, H, s, s, D, times=n)
        return out.to(query.dtype).transpose(1, 2)


def ring_merge(torch, parts):
    """Combine per-chunk (out, lse) into the attention over all chunks, in float32 (the update diffusers' ring uses)."""
    out = lse = None
    for o, l in parts:
        o, l = o.float(), l.float().unsqueeze(-1)
        if out is None:
            out, lse = o, l
        else:
            out = out - torch.sigmoid(l - lse) * (out - o)
            lse = lse - torch.nn.functional.logsigmoid(lse - l)
    return out


def check_kernel(torch, attention: Attention, device, dtype, heads: int, dim: int) -> dict:
    """The kernel against plain SDPA, and Ring's chunked merge against attention over the whole sequence."""
    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, heads, 512, dim, generator=gen, device=device, dtype=dtype) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    whole = attention._flash(q, k, v)[0].float()
    chunks = ring_merge(torch, [attention._flash(q, kc, vc) for kc, vc in zip(k.chunk(4, 2), v.chunk(4, 2))])
    rel = lambda x: float((x - expected).norm() / expected.norm())  # noqa: E731
    return {"kernel_rel_err": rel(whole), "ring_merge_rel_err": rel(chunks)}


def build(torch, shape: dict, device, dtype):
    """The transformer with random weights made directly on `device` in `dtype` (meta first: no fp32 copy)."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(patch_size=1, guidance_embeds=True, **shape["model"])
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.01, generator=gen)
            else:
                p.fill_(1.0)  # norm scales
    return model


def inputs(torch, shape: dict, image_tokens: int, text_tokens: int, device, dtype) -> dict:
    cfg = shape["model"]
    gen = torch.Generator(device=device).manual_seed(1)
    side = int(shape["image_tokens"] ** 0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return {
        "hidden_states": torch.randn(1, image_tokens, cfg["in_channels"], generator=gen, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=gen, device=device,
                                             dtype=dtype),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=gen, device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": ids.reshape(-1, 3)[:image_tokens], "txt_ids": torch.zeros(text_tokens, 3, device=device),
        "return_dict": False,
    }


def timer(torch, device, repeat: int, warmup: int, host: list | None = None):
    """Device time per call (CUDA events), and in `host` the time the CPU took to issue the call: when the two are
    equal the GPU waited for the CPU (launch-bound), which is what compilation or CUDA graphs remove."""
    def run(fn) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                if host is not None:
                    host.append(time.perf_counter() - t0)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times
    return run


def graphed(torch, model, kwargs):
    """The forward captured as a CUDA graph (static inputs): replays cost no Python and no per-kernel launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(**kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model(**kwargs)
    return graph


def profile(torch, fn, graph) -> str:
    """torch.profiler table of one forward, by device time (the excerpt docs/PERFORMANCE.md quotes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode(), torch_profile(activities=activities) as prof:
        (graph.replay if graph is not None else fn)()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60)


def linear_flop_counter(torch, model, box: list):
    def hook(module, args, output):
        x = args[0]
        box[0] += 2 * (x.numel() // module.in_features) * module.in_features * module.out_features
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def main() -> int:
    args = parse_args(NAME, __doc__, repeat=10, extra=lambda p: (
        p.add_argument("--device", default="cuda", choices=["cuda", "cpu"]),
        p.add_argument("--shape", default="flux-dev", choices=sorted(SHAPES)),
        p.add_argument("--alpha-us", type=float, default=15.0, help="latency per collective in the prediction"),
        p.add_argument("--attention", default="flash", choices=["flash", "cudnn"],
                       help="CUDA attention kernel for every method (both return the LSE Ring needs)"),
        p.add_argument("--cuda-graphs", action="store_true",
                       help="time CUDA-graph replays (no launch overhead; stands in for a compiled model)"),
        p.add_argument("--profile-degree", type=int, default=0,
                       help="print a torch.profiler excerpt of the Ulysses share at this N"),
    ))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_model: no CUDA device here; GPU mode skipped (use --device cpu --shape tiny to check the script)")
        return 0
    from diffusers.models.transformers import transformer_flux

    env = environment()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    run = timer(torch, device, args.repeat, max(args.warmup, 2))

    # Peak: a large matmul in the same dtype, same run.
    n = shape["matmul"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n**3 / median(run(lambda: a @ b))
    del a, b

    model = build(torch, shape, device, dtype)
    attention = Attention(torch, args.attention)
    heads_, dim_ = shape["model"]["num_attention_heads"], shape["model"]["attention_head_dim"]
    try:
        kernel_check = check_kernel(torch, attention, device, dtype, heads_, dim_)
    except Exception as exc:  # e.g. no cuDNN attention in this build: fall back rather than lose the run
        kernel_check = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if "error" in kernel_check or kernel_check["ring_merge_rel_err"] > 2e-2:
        print(f"attention kernel {args.attention} failed its check ({kernel_check}); using flash")
        attention.kernel = args.attention = "flash"
        kernel_check = check_kernel(torch, attention, device, dtype, heads_, dim_)
    original = transformer_flux.dispatch_attention_fn
    transformer_flux.dispatch_attention_fn = attention
    cfg = shape["model"]
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    heads, hidden = cfg["num_attention_heads"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s_img, s_txt = shape["image_tokens"], shape["text_tokens"]
    seq = s_img + s_txt
    measured = {}

    def measure(label: str, mode: str, degree: int):
        attention.mode, attention.degree = mode, degree
        kwargs = inputs(torch, shape, s_img // degree, s_txt // degree, device, dtype)
        box = [0]
        hooks = linear_flop_counter(torch, model, box)
        attention.flops, attention.count = 0, True
        with torch.inference_mode():
            model(**kwargs)
        for h in hooks:
            h.remove()
        attention.count = False
        flops = box[0] + attention.flops
        host: list[float] = []
        graph, graph_error = None, None
        if args.cuda_graphs and device.type == "cuda":
            try:
                graph = graphed(torch, model, kwargs)
            except Exception as exc:  # record it and time eagerly: a number with a note beats no number
                graph_error = f"{type(exc).__name__}: {exc}"[:300]
        timed = timer(torch, device, args.repeat, max(args.warmup, 2), host)
        with torch.inference_mode():
            times = timed(graph.replay if graph is not None else lambda: model(**kwargs))
        if args.profile_degree == degree and mode == "ulysses":
            measured["profile"] = profile(torch, lambda: model(**kwargs), graph)
        del graph
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = median(times)
        measured[label] = {"mode": mode, "degree": degree, "times_s": times, "median_s": t, "flops": flops,
                           "tflops": flops / t / 1e12, "attention_flops": attention.flops,
                           "host_issue_s": median(host) if host else None,
                           "graph": graph_error or bool(args.cuda_graphs)}

    # The stand-in must compute what diffusers computes: one forward each way, same inputs.
    check_inputs = inputs(torch, shape, s_img, s_txt, device, dtype)
    with torch.inference_mode():
        transformer_flux.dispatch_attention_fn = original
        expected = model(**check_inputs)[0].float()
        transformer_flux.dispatch_attention_fn = attention
        got = model(**check_inputs)[0].float()
    check = {"max_abs_diff": float((got - expected).abs().max()),
             "rel_l2": float((got - expected).norm() / expected.norm())}
    del check_inputs, expected, got
    # Attention alone at the full sequence: the flash kernel used here vs whatever SDPA picks by default.
    q = torch.randn(1, heads, seq, cfg["attention_head_dim"], device=device, dtype=dtype)
    attn_alone = {"flash_s": median(run(lambda: attention._flash(q, q, q))),
                  "sdpa_default_s": median(run(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)))}
    del q

    try:
        measure("full", "full", 1)
        for n_ in DEGREES:
            if heads % n_ or s_img % n_ or s_txt % n_:
                continue
            measure(f"ulysses{n_}", "ulysses", n_)
            measure(f"ring{n_}", "ring", n_)
            measure(f"local{n_}", "full", n_)  # S/N tokens attending only to themselves: the no-attention-growth floor
    finally:
        transformer_flux.dispatch_attention_fn = original
    profile_text = measured.pop("profile", "")
    if profile_text:
        print(f"== torch.profiler, Ulysses share at N = {args.profile_degree} ==\n{profile_text}")

    full = measured["full"]["median_s"]
    host_ms = lambda m: f"{1000 * m['host_issue_s']:.1f}" if m["host_issue_s"] is not None else ""  # noqa: E731
    rows = [["1 GPU, full step", "", f"{1000 * full:.1f}", host_ms(measured["full"]),
             f"{measured['full']['tflops']:.3g}", f"{measured['full']['tflops'] * 1e12 / peak:.2f}",
             "", "", "", "", ""]]
    predictions = {}
    for n_ in DEGREES:
        if f"ulysses{n_}" not in measured:
            continue
        shard = seq / n_ * hidden * 2  # bytes of one rank's Q (or K, V, O) per layer
        comm = {"ulysses": (layers * 4 * (n_ - 1) / n_ * shard, layers * 4),
                "ring": (layers * 2 * (n_ - 1) * shard, layers)}
        for method in ("ulysses", "ring"):
            m = measured[f"{method}{n_}"]
            nbytes, collectives = comm[method]
            speed = {}
            for link, bw in LINKS.items():
                step = m["median_s"] + nbytes / bw + collectives * args.alpha_us * 1e-6
                speed[link] = full / step
            predictions[f"{method}{n_}"] = {"bytes_per_rank": nbytes, "collectives": collectives, "speedup": speed}
            rows.append([f"N={n_} {method}: one rank's share", n_, f"{1000 * m['median_s']:.1f}", host_ms(m),
                         f"{m['tflops']:.3g}", f"{m['tflops'] * 1e12 / peak:.2f}", f"{nbytes / 1e6:.4g}",
                         *(f"{v:.2f}" for v in speed.values()), ANCHORS.get(n_, ""), GOALS[n_]])
        local = measured[f"local{n_}"]
        rows.append([f"N={n_} floor: S/N tokens, local attention only", n_, f"{1000 * local['median_s']:.1f}",
                     host_ms(local), f"{local['tflops']:.3g}", f"{local['tflops'] * 1e12 / peak:.2f}", "", "", "", "",
                     ""])
    # CFG parallel (a true-CFG step = two forwards on one GPU): each half computes one forward (alone, or its CP
    # share), then the halves exchange one noise prediction [S_img, in_channels] (one all_gather). Speedup is against
    # one GPU doing both forwards. No new measurement: it reuses the shares above.
    pred_bytes = s_img * cfg["in_channels"] * 2
    halves = {1: (full, 0.0, 0)}
    for n_ in DEGREES:
        if f"ulysses{n_}" in measured:
            halves[n_] = (measured[f"ulysses{n_}"]["median_s"], predictions[f"ulysses{n_}"]["bytes_per_rank"],
                          predictions[f"ulysses{n_}"]["collectives"])
    for n_, (share, cp_bytes, cp_collectives) in halves.items():
        speed = {link: 2 * full / (share + (cp_bytes + pred_bytes) / bw + (cp_collectives + 1) * args.alpha_us * 1e-6)
                 for link, bw in LINKS.items()}
        label = "cfg2" if n_ == 1 else f"cfg2×ulysses{n_}"
        predictions[label] = {"gpus": 2 * n_, "bytes_per_rank": cp_bytes + pred_bytes,
                              "collectives": cp_collectives + 1, "speedup_vs_1gpu_cfg_step": speed}
        rows.append([f"{label} ({2 * n_} GPUs): one forward each + 1 exchange, vs 2 forwards on 1 GPU", 2 * n_,
                     f"{1000 * share:.1f}", "", "", "", f"{(cp_bytes + pred_bytes) / 1e6:.4g}",
                     *(f"{v:.2f}" for v in speed.values()), "", ""])
    headers = ["config", "N", "ms", "CPU issue ms", "TFLOP/s", "of peak", "MB/rank/step",
               *(f"speedup {k}" for k in LINKS),
               "xDiT anchor", "goal"]
    print(f"kernel {args.attention}: rel err vs SDPA {kernel_check['kernel_rel_err']:.2g}, ring merge of 4 chunks "
          f"{kernel_check['ring_merge_rel_err']:.2g}; CUDA graphs {args.cuda_graphs}; host issue time of the eager "
          f"step {1000 * (measured['full']['host_issue_s'] or 0):.1f} ms vs device {1000 * full:.1f} ms")
    print(f"stand-in attention vs diffusers' own, full step: max abs diff {check['max_abs_diff']:.3g}, "
          f"rel L2 {check['rel_l2']:.3g}; attention alone at S={seq}: flash {1000 * attn_alone['flash_s']:.2f} ms, "
          f"default SDPA {1000 * attn_alone['sdpa_default_s']:.2f} ms (× {layers} layers per step)")
    print(f"matmul peak {peak / 1e12:.4g} TFLOP/s ({n}³ {dtype}); prediction = share + bytes/bandwidth + "
          f"collectives × {args.alpha_us:g} µs, no overlap")
    finish(NAME, args, env=env, headers=headers, rows=rows, data={
        "shape": args.shape, "dtype": str(dtype), "matmul_peak_tflops": peak / 1e12, "measured": measured,
        "predictions": predictions, "links_Bps": LINKS, "alpha_us": args.alpha_us, "anchors": ANCHORS,
        "goals": GOALS, "check_vs_diffusers_attention": check, "kernel_check": kernel_check,
        "attention_kernel": args.attention, "cuda_graphs": args.cuda_graphs, "profile": profile_text,
        "attention_alone": attn_alone, "sequence": {"image": s_img, "text": s_txt}, "attention_layers": layers,
    })
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
