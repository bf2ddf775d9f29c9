"""Control path: what one call and one result hand-off cost, measured through the engine's own code.

    python -m bench.control_path [--pings 500] [--profile]

1. Round trip of an empty call (`Sidecar.call("ping", ...)`) to every rank of a live sidecar, world_size 1 and 2:
   p50 and p99 over --pings calls (target p50 ≤ 1 ms).
2. Hand-off of a result batch from a rank to the host: a rank-like process started here with an inherited arena
   (as the launcher starts a rank) connects with the real handshake (`channel.client_connect`) and answers each
   request with exactly what worker.main sends (`protocol.encode(reply, arena=arena)` then `Channel.send`); the
   host reads it with `Channel.recv` + `protocol.decode(frame, arena=...)` as `Sidecar._collect` does, then copies
   it with `torch.cat` as `Session` does ("engine path"). Batches: images 4 × 1024 × 1024 × 3 float32 (50 MB) and
   Flux 1024² latents 4 × 16 × 128 × 128 float32 (4 MB). Reported as GB/s over a plain memcpy of the same bytes
   into a preallocated buffer (target ≥ 0.5×), next to its pieces and to the same frame forced through the socket
   (no arena: the path before the arena existed).

`--profile` adds cProfile excerpts of both sides of the 50 MB hand-off (the rank side's comes back over the channel).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time

import numpy as np
import torch

from bench._common import environment, finish, median, parse_args, percentile

NAME = "control_path"
SHAPES = {"images": (4, 1024, 1024, 3), "latents": (4, 16, 128, 128)}
ENV_SECRET = "DISTDIFF_BENCH_SECRET"
ENV_ARENA_FD = "DISTDIFF_BENCH_ARENA_FD"


# -- rank-like peer (runs as `python -m bench.control_path --peer HOST PORT`) ----------------------------------------
def peer(host: str, port: int) -> int:
    from dist_backend import protocol
    from dist_backend.channel import ChannelClosed, client_connect

    channel = client_connect(host, port, bytes.fromhex(os.environ.pop(ENV_SECRET)), timeout=60)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.rand(shape, generator=gen) for k, shape in SHAPES.items()}  # a rank's finished result
    frames = {k: protocol.encode({"id": 0, "ok": True, "result": {k: t}}) for k, t in tensors.items()}
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    from dist_backend.arena import Arena

    arena = Arena(int(os.environ[ENV_ARENA_FD]))  # inherited from the host, exactly as a rank gets it
    while True:
        try:
            request = protocol.decode(channel.recv(timeout=None))
        except ChannelClosed:
            return 0
        what, mode, call_id = request.get("what"), request.get("mode"), request.get("id")
        if mode == "stop":
            text = ""
            if profiler is not None:
                buf = io.StringIO()
                pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(8)
                text = buf.getvalue()
            channel.send(protocol.encode({"id": call_id, "ok": True, "result": {"profile": text}}))
            return 0
        if mode == "frame":  # what worker.main does with a result: encode, send
            if profiler is not None and what == "images":
                profiler.enable()
            channel.send(protocol.encode({"id": call_id, "ok": True, "result": {what: tensors[what]}}))
            if profiler is not None:
                profiler.disable()
        elif mode == "raw":  # the socket alone: the same bytes, encoded once up front
            channel.send(frames[what])
        elif mode == "engine":  # what worker.main does today: large tensors into the rank's arena, offsets on the socket
            channel.send(protocol.encode({"id": call_id, "ok": True, "result": {what: tensors[what]}}, arena=arena))


# -- host ------------------------------------------------------------------------------------------------------------
def ping_round_trips(world_size: int, pings: int, warmup: int) -> dict:
    from dist_backend import Session, SessionConfig

    session = Session(SessionConfig(world_size=world_size, threads_per_rank=1))
    try:
        sidecar = session.sidecar
        payloads = [{}] * world_size
        for _ in range(warmup):
            sidecar.call("ping", payloads)
        times = []
        for _ in range(pings):
            t0 = time.perf_counter()
            sidecar.call("ping", payloads)
            times.append(time.perf_counter() - t0)
    finally:
        session.close()
    return {"p50_ms": 1000 * median(times), "p99_ms": 1000 * percentile(times, 99), "n": pings}


def handoff(repeat: int, warmup: int, profile: bool) -> tuple[dict, str]:
    from dist_backend import protocol
    from dist_backend.channel import Listener, new_secret

    from dist_backend.arena import Arena

    secret = new_secret()
    listener = Listener("127.0.0.1", 0)
    arena = Arena.create("distdiff-bench")  # as the launcher does for each rank
    cmd = [sys.executable, "-m", "bench.control_path", "--peer", *map(str, listener.address)]
    proc = subprocess.Popen(cmd + (["--profile"] if profile else []), pass_fds=(arena.fd,),
                            env={**os.environ, ENV_SECRET: secret.hex(), ENV_ARENA_FD: str(arena.fd)})
    channel = listener.accept(secret, timeout=120)
    ids = iter(range(1, 1 << 30))

    def request(what: str, mode: str):
        channel.send(protocol.encode({"what": what, "mode": mode, "id": next(ids)}))
        return channel.recv(timeout=120)

    results: dict = {}
    host_profile = cProfile.Profile() if profile else None
    gen = torch.Generator().manual_seed(1)
    for what, shape in SHAPES.items():
        src = torch.rand(shape, generator=gen)
        nbytes = src.nbytes
        dst = torch.empty_like(src)
        message = {"id": 1, "ok": True, "result": {what: src}}
        frame = protocol.encode(message)
        def engine() -> torch.Tensor:  # Sidecar._collect's decode, then Session's own copy (torch.cat)
            return torch.cat([protocol.decode(request(what, "engine"), arena=arena)["result"][what]])

        sides = {
            "memcpy (preallocated)": lambda: np.copyto(dst.numpy(), src.numpy()),
            "clone (fresh allocation)": lambda: src.clone(),
            "protocol.encode": lambda: protocol.encode(message),
            "protocol.decode": lambda: protocol.decode(frame),
            "socket only (pre-encoded frame)": lambda: request(what, "raw"),
            "through the socket (encode, send, recv, decode)": lambda: protocol.decode(request(what, "frame")),
            "engine path (rank copies into its arena, host torch.cat)": engine,
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        for rep in range(warmup + repeat):
            for key, fn in sides.items():  # interleaved, so machine load hits every piece alike
                profiling = host_profile is not None and what == "images" and key.startswith("engine path") and rep >= warmup
                if profiling:
                    host_profile.enable()
                out = None  # free the previous side's result now, not inside the next side's timing
                t0 = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - t0
                if profiling:
                    host_profile.disable()
                if rep >= warmup:
                    times[key].append(elapsed)
            # The peer draws its own tensor, so check the last result's form, not its values.
            assert tuple(out.shape) == shape and out.dtype == torch.float32, (out.shape, out.dtype)
        results[what] = {"shape": list(shape), "nbytes": nbytes,
                         "median_s": {k: median(v) for k, v in times.items()}, "times_s": times}
    channel.send(protocol.encode({"what": "", "mode": "stop", "id": 0}))
    peer_profile = protocol.decode(channel.recv(timeout=60))["result"]["profile"]
    proc.wait(timeout=30)
    listener.close()
    arena.close()
    text = ""
    if host_profile is not None:
        buf = io.StringIO()
        pstats.Stats(host_profile, stream=buf).sort_stats("tottime").print_stats(8)
        text = (f"== host side (recv + decode), {repeat} × 50 MB ==\n{buf.getvalue()}\n"
                f"== rank side (encode + send) ==\n{peer_profile}")
    return results, text


def main() -> int:
    if len(sys.argv) >= 4 and sys.argv[1] == "--peer":
        return peer(sys.argv[2], int(sys.argv[3]))
    args = parse_args(NAME, __doc__, repeat=9, extra=lambda p: (
        p.add_argument("--pings", type=int, default=500),
        p.add_argument("--profile", action="store_true", help="print cProfile excerpts of the 50 MB hand-off"),
        p.add_argument("--peer", nargs=2, help=argparse.SUPPRESS),  # the rank-like side, handled above
    ))
    env = environment()
    pings = {w: ping_round_trips(w, args.pings, warmup=50) for w in (1, 2)}
    hand, profile_text = handoff(args.repeat, max(1, args.warmup), args.profile)
    rows = []  # ratio column: p50 over the 1 ms target for pings, GB/s over memcpy's for hand-offs
    for w, r in pings.items():
        rows.append([f"ping round trip, {w} rank(s): p50 / p99 ms", f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f}",
                     r["p50_ms"] / 1.0, "p50 ≤ 1 ms", r["p50_ms"] <= 1.0])
    for what, r in hand.items():
        med = r["median_s"]
        gbs = {k: r["nbytes"] / v / 1e9 for k, v in med.items()}
        base = gbs["memcpy (preallocated)"]
        r["GBps"] = gbs
        for key in med:
            is_path = key.startswith("engine path")
            rows.append([f"{what} {r['nbytes'] / 1e6:.1f} MB: {key}", f"{1000 * med[key]:.2f} ms, {gbs[key]:.2f} GB/s",
                         gbs[key] / base, "≥ 0.5× memcpy" if is_path else "",
                         (gbs[key] / base >= 0.5) if is_path else ""])
    if profile_text:
        print(profile_text)
    finish(NAME, args, env=env, headers=["measure", "value", "ratio", "target", "met"], rows=rows,
           data={"pings": pings, "handoff": hand, "profile": profile_text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
