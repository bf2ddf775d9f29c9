"""Cold start: the first call of a new sidecar (rank processes started, torch imported, authenticated, process group
up, ready, one call answered) vs a second call with the same config, through `get_session(config)` twice.

    python -m bench.cold_start [--repeat 5] [--world-sizes 1 2]

Target: first call ≤ 5 s on CPU. Next to it, the floor no launcher can beat: a bare `python -c "import torch"`
process (a rank must import torch before it can join a process group), timed in the same run.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench._common import environment, finish, median, parse_args

NAME = "cold_start"


def first_and_second(world_size: int) -> dict[str, float]:
    from dist_backend import SessionConfig
    from dist_backend.session import get_session, shutdown_all

    config = SessionConfig(world_size=world_size, threads_per_rank=1)
    payloads = [{}] * world_size
    try:
        t0 = time.perf_counter()
        session = get_session(config)
        session.sidecar.call("ping", payloads)  # starts the ranks: the cold path
        t1 = time.perf_counter()
        again = get_session(SessionConfig(world_size=world_size, threads_per_rank=1))  # equal config: same sidecar
        again.sidecar.call("ping", payloads)
        t2 = time.perf_counter()
        assert again is session and session.starts == 1, "an equal config must reuse the live sidecar"
        start = session.sidecar.start_seconds
    finally:
        shutdown_all()
    return {"first_s": t1 - t0, "second_s": t2 - t1, "launcher_start_s": start}


def import_torch() -> float:
    """Until a fresh interpreter has imported torch and says so (not until it exits: exit alone costs ~0.2 s)."""
    code = "import sys, torch, torch.distributed; sys.stdout.write('x'); sys.stdout.flush()"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.read(1) == b"x"
    elapsed = time.perf_counter() - t0
    proc.wait()
    return elapsed


def main() -> int:
    args = parse_args(NAME, __doc__,
                      extra=lambda p: p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2]))
    env = environment()
    for _ in range(args.warmup):  # page cache warm for torch's shared libraries, as on any used machine
        first_and_second(1)
    runs: dict[str, list] = {f"ws{w}": [] for w in args.world_sizes}
    floor: list[float] = []
    for _ in range(args.repeat):
        floor.append(import_torch())
        for w in args.world_sizes:
            runs[f"ws{w}"].append(first_and_second(w))
    rows = [["python -c 'import torch' (floor)", median(floor), "", "", ""]]
    summary = {}
    for key, results in runs.items():
        first = median([r["first_s"] for r in results])
        second = median([r["second_s"] for r in results])
        summary[key] = {"first_s": first, "second_s": second, "first_over_floor": first / median(floor)}
        rows.append([f"world_size {key[2:]}: first call s (ratio to 5 s target)", first, first / 5.0, "≤ 5 s",
                     first <= 5.0])
        rows.append([f"world_size {key[2:]}: second call ms (ratio to first)", 1000 * second, second / first, "", ""])
        rows.append([f"world_size {key[2:]}: first call / import-torch floor", "", first / median(floor), "", ""])
    finish(NAME, args, env=env, headers=["measure", "value", "ratio", "target", "met"], rows=rows,
           data={"runs": runs, "import_torch_s": floor, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
