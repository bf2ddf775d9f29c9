"""What every benchmark shares: arguments, medians, the environment record, the JSON file and the final table,
and the bench-sized Flux pipelines (tiny text encoders and VAE from `make_tiny`, a bigger random transformer).

Rules the benchmarks follow (docs/PERFORMANCE.md): every number is a ratio of two things measured in the same run,
each side the median of ≥ 5 timed repetitions after warm-up, sides interleaved where they can be (A B A B ...) so
that load from other users of the machine hits both alike; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCH_MODEL_VERSION = 1


def parse_args(name: str, description: str, *, repeat: int = 5,
               extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--out", default=None, help=f"JSON path (default bench/results/{name}-<date>.json)")
    parser.add_argument("--repeat", type=int, default=repeat, help="timed repetitions per side (median; ≥ 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.repeat < 5:
        parser.error(f"--repeat {args.repeat}: the rules ask for the median of at least 5")
    quiet()
    return args


def quiet() -> None:
    """Silence library progress bars and warnings in this process, so the table stays readable."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
    except ImportError:  # the GPU machine may lack transformers-dependent parts; nothing to silence then
        pass


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 500 samples p99 is the 5th largest, no interpolation."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return float(ordered[index])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(sides: dict[str, Callable[[], Any]], *, repeat: int, warmup: int) -> dict[str, list[float]]:
    """Time every side `repeat` times in the order A B C A B C ..., after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            times[name].append(timed(fn)[0])
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 10 ms ticks), children not included."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def environment() -> dict[str, Any]:
    import torch

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def finish(name: str, args, *, env: dict[str, Any], headers: Sequence[str], rows: Sequence[Sequence[Any]],
           data: dict[str, Any]) -> Path:
    """Write the JSON record, then print the table (last, so it is what a log tail shows)."""
    env = dict(env, loadavg_end=[round(x, 2) for x in os.getloadavg()])
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}-{_dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "environment": env, "args": vars(args), "headers": list(headers),
              "rows": [list(r) for r in rows], **data}
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"\n# {name}: {env['date']}, {env['cores']} cores ({env['cpu']}), load {env['loadavg_start']} -> "
          f"{env['loadavg_end']}, torch {env['torch']}, diffusers {env['diffusers']}; JSON: {out}")
    print(table(headers, rows), flush=True)
    return out


# -- bench-sized Flux pipelines ----------------------------------------------------------------------------------

# Transformer shapes. The text side must match make_tiny's encoders (T5 d_model 32, CLIP projection 32) and the
# input channels its VAE (4 latent channels × 2×2 packing); head_dim = sum(axes_dims_rope).
BENCH_TRANSFORMERS: dict[str, dict[str, Any]] = {
    # A step at 256×256 (256 image + 32 text tokens) takes ~0.1 s on 2 cores: big enough that per-call overheads
    # of a few ms would show, small enough for ≥ 5 repetitions of several configurations in a minute.
    "step": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                 axes_dims_rope=(8, 28, 28)),
    # ~300 MB of float32 weights, so that load time is dominated by reading tensors, not by Python.
    "load": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=12,
                 axes_dims_rope=(8, 28, 28)),
}


def cache_root() -> Path:
    return Path(os.environ.get("DISTDIFF_CACHE", Path.home() / ".cache" / "distdiff")) / "bench"


def bench_pipeline(kind: str) -> Path:
    """A FluxPipeline folder: make_tiny's text encoders, tokenizers, VAE and scheduler, with the transformer replaced
    by BENCH_TRANSFORMERS[kind] (random weights, seed 0). Built once, atomically (temp folder, then rename)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from dist_backend.pipelines.tiny import make_tiny

    final = cache_root() / f"flux-{kind}-v{BENCH_MODEL_VERSION}"
    marker = final / ".bench_complete"
    if marker.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_tiny("flux", tmp, seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, joint_attention_dim=32,
                                                 pooled_projection_dim=32, guidance_embeds=True,
                                                 **BENCH_TRANSFORMERS[kind])
        shutil.rmtree(tmp / "transformer")
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        marker_tmp = tmp / ".bench_complete"
        marker_tmp.write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
