"""Host memory of N CPU ranks loading one pipeline: peak summed Pss (and RSS) of the rank processes while they load
and run once (every weight page read), 2 ranks vs 1 rank (target ≤ 1.3× where the compute dtype equals the files').

    python -m bench.host_memory [--dtypes float32 bfloat16] [--world-sizes 1 2]
    python -m bench.host_memory --device cuda --world-sizes 1 --dtypes bfloat16   # GPU machine: host peak of a rank

The model is the bench "load" Flux pipeline (~330 MB, float32 files). Each repetition starts a fresh sidecar, runs
the tiny Flux once and unloads it (so every rank has imported and initialised everything: the baseline), samples every
rank's /proc/<pid>/status (VmRSS, RssAnon, RssFile) and /proc/<pid>/smaps_rollup (Pss) every --interval s while it
loads the bench model and runs one 1-step 64×64 generate (2 prompts, so with 2 data-parallel ranks each rank encodes,
denoises and decodes one: each reads every weight), and reports the peak of the per-instant sums (total) and that
peak minus the baseline sums (what loading the model added; the columns without "total"). **Pss is the target's
measure**: a page mapped by k processes counts 1/k in each, so the sum over ranks counts a page shared through the
page cache once. Summed RSS counts it once per rank and is shown for comparison; RssAnon is the ranks' private
memory (converted weights land there). The target is on the added Pss: the baseline (interpreter, torch, diffusers,
~0.2–0.3 GB per rank) is per process whatever the loader does.

float32 files loaded as float32: the weights stay the memory-mapped file pages (one copy for all ranks). bfloat16
compute: every rank converts, so each holds its own bfloat16 copy (half the file's bytes) in private memory.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from bench._common import bench_pipeline, environment, finish, folder_bytes, median, parse_args

NAME = "host_memory"
TARGET = 1.3
MiB = 2**20


def sample(pid: int) -> dict[str, int]:
    """Bytes: VmRSS, RssAnon, RssFile (status) and Pss (smaps_rollup) of one process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) * 1024
    return out


class Sampler:
    """Peak of the summed figures over `pids`, sampled from a thread until stopped."""

    def __init__(self, pids: list[int], *, interval: float) -> None:
        self.pids, self.interval = pids, interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-memory-sampler", daemon=True)

    def total(self) -> dict[str, int]:
        sums: dict[str, int] = {}
        for pid in self.pids:
            for key, value in sample(pid).items():
                sums[key] = sums.get(key, 0) + value
        return sums

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.total().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)


def run_once(session, model_dir: Path) -> None:
    session.generate(model_dir=model_dir, prompts=["a red fox", "a lighthouse"], seed=1, steps=1, guidance=3.5,
                     height=64, width=64)


def one_run(model_dir: Path, *, warm_dir: Path, world_size: int, dtype: str, device: str,
            interval: float) -> dict[str, int]:
    from dist_backend import Session, SessionConfig

    session = Session(SessionConfig(world_size=world_size, dtype=dtype, device=device, threads_per_rank=1))
    try:
        # The baseline: ranks that have imported and run everything once (libraries, kernels) on the tiny model of
        # the same family, then dropped it. What is left to measure is what the bench model's weights add.
        run_once(session, warm_dir)
        session.sidecar.call("unload", [{}] * world_size)
        pids = session.sidecar.pids
        sampler = Sampler(pids, interval=interval)
        idle = sampler.total()
        with sampler:
            run_once(session, model_dir)
        return {**{f"peak_{k}": v for k, v in sampler.peak.items()}, **{f"idle_{k}": v for k, v in idle.items()},
                "samples": sampler.samples}
    finally:
        session.close()


def main() -> int:
    from dist_backend.pipelines.tiny import make_tiny

    args = parse_args(NAME, __doc__, repeat=5, extra=lambda p: (
        p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2]),
        p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"]),
        p.add_argument("--interval", type=float, default=0.02, help="seconds between samples"),
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="cuda: one rank per GPU (use --world-sizes 1 on a 1-GPU machine); the host peak is then "
                            "compared with the largest component, the most a rank should hold while reading"),
    ))
    env = environment()
    model_dir = bench_pipeline("load")
    warm_dir = make_tiny("flux", Path(tempfile.mkdtemp(prefix="distdiff-host-memory-")) / "tiny", seed=0)
    nbytes = folder_bytes(model_dir)
    largest = max(f.stat().st_size for f in model_dir.rglob("*.safetensors"))  # the transformer's file
    sides = [(d, w) for d in args.dtypes for w in args.world_sizes]
    runs: dict[str, list[dict[str, int]]] = {f"{d}, {w} rank(s)": [] for d, w in sides}
    for rep in range(args.warmup + args.repeat):  # sides interleaved: the box's other load falls on each alike
        for dtype, w in sides:
            result = one_run(model_dir, warm_dir=warm_dir, world_size=w, dtype=dtype, device=args.device, interval=args.interval)
            if rep >= args.warmup:
                runs[f"{dtype}, {w} rank(s)"].append(result)

    def med(key: str, measure: str) -> float:
        """Median over repetitions of peak − baseline for `measure` (bytes)."""
        return median([r[f"peak_{measure}"] - r[f"idle_{measure}"] for r in runs[key]])

    rows = []
    for dtype in args.dtypes:
        base = f"{dtype}, {args.world_sizes[0]} rank(s)"
        for w in args.world_sizes:
            key = f"{dtype}, {w} rank(s)"
            pss, rss, anon = med(key, "Pss"), med(key, "VmRSS"), med(key, "RssAnon")
            ratio = pss / med(base, "Pss")
            is_base = w == args.world_sizes[0]
            same = dtype == "float32"  # the bench files are float32
            total = median([r["peak_Pss"] for r in runs[key]])
            rows.append([key, total / MiB, pss / MiB, rss / MiB, anon / MiB, pss / largest, ratio, rss / med(base, "VmRSS"),
                         "" if is_base or not same else f"≤ {TARGET}", "" if is_base or not same else ratio <= TARGET])
    idle = {key: median([r["idle_Pss"] for r in rs]) / MiB for key, rs in runs.items()}
    finish(NAME, args, env=env,
           headers=["side", "peak Pss MiB (total)", "Pss MiB", "RSS MiB", "RssAnon MiB", "Pss / largest",
                    "Pss ratio", "RSS ratio", "target", "met"], rows=rows,
           data={"model": str(model_dir), "bytes": nbytes, "file_MiB": nbytes / MiB, "largest_file_MiB": largest / MiB,
                 "device": args.device, "idle_Pss_MiB": idle, "runs": runs})
    print(f"model files: {nbytes / MiB:.1f} MiB (float32), largest {largest / MiB:.1f} MiB; baseline Pss (MiB): "
          + ", ".join(f"{k}: {v:.0f}" for k, v in idle.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
