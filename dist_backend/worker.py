"""Rank process: `python -m dist_backend.worker`, started by the host's launcher (never imported by ComfyUI).

Lifecycle: connect to the host and prove the session secret, join the torch.distributed process group, report
ready, then answer calls until the host says shutdown or goes away. A watchdog thread ends the process when the
host process dies, so no rank outlives the host by more than a second or two.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

ENV_SECRET_FILE = "DISTDIFF_SECRET_FILE"
ENV_ARENA_FD = "DISTDIFF_ARENA_FD"
ENV_RANK = "DISTDIFF_RANK"
ENV_CONFIG = "DISTDIFF_CONFIG"
ENV_HOST_ADDR = "DISTDIFF_HOST_ADDR"
ENV_HOST_PORT = "DISTDIFF_HOST_PORT"
ENV_MASTER_PORT = "DISTDIFF_MASTER_PORT"
ENV_PARENT_PID = "DISTDIFF_PARENT_PID"
ENV_LOCAL_GPUS = "DISTDIFF_LOCAL_GPUS"  # set by join_rank: a joined node's GPU indices, not the global rank's
ENV_NODE_RANK = "DISTDIFF_NODE_RANK"  # set by join_rank: this rank runs on a joined node, not on the head's machine

EXIT_PARENT_GONE = 70
log = logging.getLogger("dist_backend.worker")


def _watch_parent(parent_pid: int) -> None:
    """End this rank when the host dies. Polls getppid: re-parenting is the one signal that works whatever thread
    of the host started us (PR_SET_PDEATHSIG fires when the starting *thread* exits, which ComfyUI's may do)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(EXIT_PARENT_GONE)
            time.sleep(0.5)

    threading.Thread(target=watch, name="distdiff-parent-watch", daemon=True).start()


def _rendezvous_store(config, rank: int, port: int):
    """The TCPStore the process group meets through, its server (rank 0) listening on config.host only.

    `init_method="tcp://host:port"` makes torch's store server listen on every interface (`::`), and the store
    has no authentication; binding the socket ourselves and handing it over keeps it on loopback. Its own
    deadline is start_timeout_s: ranks start seconds apart, which must not count against the collective timeout."""
    import socket

    import torch.distributed as dist

    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, port))
        sock.listen(128)
        listen_fd = sock.detach()  # the store's server owns the descriptor from here on
    return dist.TCPStore(config.host, port, config.world_size, rank == 0,
                         timedelta(seconds=config.start_timeout_s), master_listen_fd=listen_fd)


def main() -> int:
    # The secret comes in a 0600 file the host deletes once every rank is in; only its path is in our environment.
    with open(os.environ.pop(ENV_SECRET_FILE), encoding="ascii") as f:
        secret = bytes.fromhex(f.read().strip())
    rank = int(os.environ[ENV_RANK])
    logging.basicConfig(
        level=os.environ.get("DISTDIFF_LOG_LEVEL", "INFO"),
        format=f"[distdiff rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _watch_parent(int(os.environ[ENV_PARENT_PID]))

    from .config import SessionConfig

    config = SessionConfig.from_json(os.environ[ENV_CONFIG])
    from . import protocol
    from .channel import ChannelClosed, client_connect, fail_when_unreachable

    channel = client_connect(os.environ[ENV_HOST_ADDR], int(os.environ[ENV_HOST_PORT]), secret,
                             timeout=config.start_timeout_s)
    del secret
    if ENV_NODE_RANK in os.environ:  # a node's rank: its host is on another machine, behind a link that may go
        fail_when_unreachable(channel.sock, config.heartbeat_timeout_s)
    channel.send(protocol.encode({"event": protocol.Event.HELLO, "rank": rank, "pid": os.getpid()}))

    import torch
    import torch.distributed as dist

    torch.set_num_threads(config.rank_threads())
    if config.device.value == "cuda":
        gpus = config.rank_gpus(rank)
        if os.environ.get(ENV_LOCAL_GPUS):
            gpus = tuple(int(g) for g in os.environ[ENV_LOCAL_GPUS].split(","))
        torch.cuda.set_device(gpus[0])
        beat_gpus = tuple(gpus)
        device = torch.device("cuda", gpus[0])
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        beat_gpus = ()
    dist.init_process_group(
        backend,
        store=_rendezvous_store(config, rank, int(os.environ[ENV_MASTER_PORT])),
        rank=rank,
        world_size=config.world_size,
        # A collective that waits longer than this raises instead of hanging forever. Twice the heartbeat: the
        # host notices a silent rank first and names it; a peer's collective timeout would only blame the waiter.
        timeout=timedelta(seconds=2 * config.heartbeat_timeout_s),
        **({"device_id": device} if backend == "nccl" else {}),
    )
    from .arena import Arena
    from .beat import Beater, beat_interval, own_rss
    from .rank_engine import RankEngine

    arena = Arena(int(os.environ[ENV_ARENA_FD])) if ENV_ARENA_FD in os.environ else None

    beater = Beater(channel, interval=beat_interval(config.heartbeat_timeout_s), gpus=beat_gpus)
    engine = RankEngine(config=config, rank=rank, device=device, channel=channel, beater=beater, gpus=beat_gpus)
    # Where this rank runs, as it sees it: the status panel's row, the same for a local rank and a node's.
    channel.send(protocol.encode({"event": protocol.Event.READY, "rank": rank, "hostname": socket.gethostname(),
                                  "device": ",".join(f"cuda:{g}" for g in beat_gpus) or "cpu", "rss": own_rss()}))
    log.info("ready: %s, device %s, %d threads", config.strategy, device, torch.get_num_threads())

    try:
        while True:
            try:
                # Idle wait between calls has no deadline on purpose: the sidecar stays up until the host says
                # shutdown or closes the channel (which also happens when the host dies).
                frame = channel.recv(timeout=None)
            except ChannelClosed:
                log.info("host closed the channel; exiting")
                return 0
            message = protocol.decode(frame)
            op = message.get("op") if isinstance(message, dict) else None
            call_id = message.get("id") if isinstance(message, dict) else None
            if op == protocol.Op.CANCEL:
                continue  # a cancel that arrived after its call finished
            if op == protocol.Op.SHUTDOWN:
                channel.send(protocol.encode({"id": call_id, "ok": True, "result": None}))
                return 0
            beater.begin(call_id)  # the host hears from this rank during the whole call, whatever the stage
            try:
                result = engine.handle(op, message)
                reply = {"id": call_id, "ok": True, "result": result}
            except BaseException as exc:  # every failure goes back to the host as a typed error
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.error("%s failed: %s: %s", op, type(exc).__name__, exc)
                reply = {"id": call_id, "ok": False, "error": {
                    "type": type(exc).__name__, "message": str(exc), "phase": str(op),
                    "traceback": traceback.format_exc(),
                }}
            beater.end()
            channel.send(protocol.encode(reply, arena=arena))
    finally:
        beater.close()
        engine.close()
        channel.close()
        # No destroy_process_group(): it can block on peers that are already gone; exiting frees everything.


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
