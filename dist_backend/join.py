"""`python -m dist_backend join`: lend this machine's ranks to a head on another machine (node side).

One join serves one session at a time: it connects to the head's listener, proves the token, learns which global
ranks it runs, and starts them with torchrun (torch.distributed.run, one node, c10d rendezvous on this machine's
loopback) running `dist_backend.join_rank`. Each rank then proves the token itself and joins the process group
through rank 0's store on the head. When the session ends (the head closes its channels) the ranks exit, torchrun
exits, and join waits for the head's next session (unless --once).

Who stops whom: the head closes a rank's channel -> the rank exits; the head closes the node's channel -> join stops
torchrun if its ranks have not left within a grace; join dies -> torchrun gets SIGTERM (PR_SET_PDEATHSIG) -> torchrun
stops its ranks; torchrun dies -> its ranks see their parent change and exit. The link to the head is cut -> the
ranks' and join's connections fail within heartbeat_timeout_s (TCP keepalive and user timeout, see
channel.fail_when_unreachable) -> the ranks exit, torchrun exits, join waits for the head again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from . import protocol
from .channel import Channel, ChannelClosed, ChannelTimeout, client_connect, fail_when_unreachable
from .cluster import interface_of, parse_address, read_token
from .errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
ENV_FIRST_RANK = "DISTDIFF_FIRST_RANK"
ENV_DEVICE = "DISTDIFF_JOIN_DEVICE"
RETRY_S = 0.5  # between connection attempts while the head is not listening (between its sessions)
STOP_GRACE_S = 5.0  # after the head closed the node's channel, before join stops torchrun itself
EXIT_REFUSED = 3


class JoinRefused(ConfigError):
    """The head did not take this node: wrong token, a node it does not expect, or a different rank count."""


def run_join(*, head: str, token_file: str | Path, nproc: int, device: str | None = None, wait_s: float = 3600.0,
             once: bool = False) -> int:
    """Serve sessions of the head until it refuses us, waiting for a head stops after `wait_s`, or (with `once`)
    after one session. Returns the process exit code."""
    host, port = parse_address(head, what="--head")
    if type(nproc) is not int or nproc < 1:
        raise ConfigError(f"--nproc-per-node must be an integer ≥ 1, got {nproc!r}")
    token_path = Path(token_file).resolve()
    token = read_token(token_path)  # 0600 or refused, before anything connects
    code = 0
    while True:
        channel, assignment = _wait_for_head(host, port, token, nproc=nproc, wait_s=wait_s)
        if channel is None:
            log.error("no session of the head at %s:%d within %g s; giving up", host, port, wait_s)
            return code or 1
        if device is not None and _config_device(assignment) != device:
            channel.close()
            raise JoinRefused(f"the head runs device={_config_device(assignment)!r} but this join was started with "
                              f"--device {device}")
        code = _run_agent(channel, assignment, token_path=token_path, nproc=nproc)
        if once:
            return code


def _config_device(assignment: dict) -> str:
    return json.loads(assignment["config"]).get("device", "cpu")


def _wait_for_head(host: str, port: int, token: bytes, *, nproc: int, wait_s: float):
    """(channel, assignment) from the head's next session, or (None, None) after wait_s. A head that does not accept
    our token or this node raises JoinRefused: retrying cannot help."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            channel = client_connect(host, port, token, timeout=10.0)
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout, ChannelTimeout):
            time.sleep(RETRY_S)  # no session listening now
            continue
        except OSError as exc:  # unreachable network etc.: the link may come up later
            log.debug("connect to %s:%d: %s", host, port, exc)
            time.sleep(RETRY_S)
            continue
        except ChannelClosed:
            raise JoinRefused(f"the head at {host}:{port} closed the connection at the token check: this node's "
                              "token file differs from the head's") from None
        except ProtocolError as exc:
            raise JoinRefused(f"{host}:{port} failed the token check ({exc}); is it the DistDiff head?") from None
        channel.send(protocol.encode({"event": protocol.Event.JOIN, "nproc": nproc, "pid": os.getpid(),
                                      "hostname": socket.gethostname()}))
        try:
            reply = protocol.decode(channel.recv(timeout=30.0))
        except (ChannelClosed, ChannelTimeout):
            channel.close()
            time.sleep(RETRY_S)  # the head's session ended (or started without us) while we joined
            continue
        if not isinstance(reply, dict) or reply.get("event") != protocol.Event.ASSIGN:
            channel.close()
            reason = reply.get("reason") if isinstance(reply, dict) else None
            raise JoinRefused(f"the head refused this node: {reason or 'unexpected answer'}")
        return channel, reply
    return None, None


def _run_agent(channel: Channel, assignment: dict, *, token_path: Path, nproc: int) -> int:
    """torchrun for this session's ranks; returns its exit code. Stops it when the head closes our channel."""
    from .worker import ENV_CONFIG, ENV_HOST_ADDR, ENV_HOST_PORT, ENV_MASTER_PORT, ENV_SECRET_FILE

    first, world = int(assignment["first_rank"]), int(assignment["world_size"])
    own_address = channel.sock.getsockname()[0]
    # A head behind a cut link never closes this channel: let the kernel fail it (then we stop torchrun).
    fail_when_unreachable(channel.sock, float(json.loads(assignment["config"]).get("heartbeat_timeout_s", 60.0)))
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in assignment.get("env", [])})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    env.update({
        ENV_SECRET_FILE: str(token_path),  # its path only; each rank reads and proves it
        ENV_CONFIG: str(assignment["config"]),
        ENV_HOST_ADDR: str(assignment["host"]),
        ENV_HOST_PORT: str(assignment["port"]),
        ENV_MASTER_PORT: str(assignment["master_port"]),
        ENV_FIRST_RANK: str(first),
        ENV_DEVICE: _config_device(assignment),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
    })
    # gloo/NCCL bind their sockets to the interface that reaches the head, not the hostname's or the first one.
    ifname = interface_of(own_address)
    env.setdefault("GLOO_SOCKET_IFNAME" if env[ENV_DEVICE] == "cpu" else "NCCL_SOCKET_IFNAME", ifname)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        # The agent's own rendezvous stays on this machine: global ranks come from the head over the authenticated
        # channel, so no agent store needs to be reachable from elsewhere.
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", uuid.uuid4().hex,
        "--max-restarts", "0", "--monitor-interval", "0.5",
        "--module", "dist_backend.join_rank",
    ]
    log.info("joined as ranks %d–%d of %d; starting torchrun (gloo/NCCL on %s)", first, first + nproc - 1, world,
             ifname)
    agent = subprocess.Popen(command, env=env, cwd=PACKAGE_PARENT, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)
    head_gone_at: float | None = None
    try:
        while agent.poll() is None:
            if head_gone_at is None and channel.poll(0.5):
                # The head sends nothing on this channel: readable means it closed (session over, or head gone).
                head_gone_at = time.monotonic()
                log.info("the head closed this node's channel; waiting for the ranks to leave")
            elif head_gone_at is not None:
                if time.monotonic() - head_gone_at > STOP_GRACE_S:
                    _stop(agent)
                    break
                time.sleep(0.2)
    except BaseException:
        _stop(agent)
        raise
    finally:
        channel.close()
    code = agent.wait()
    log.info("torchrun exited with code %d", code)
    return code


def _stop(agent: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its ranks), SIGKILL it after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if agent.poll() is not None:
            return
        agent.send_signal(sig)
        try:
            agent.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """torchrun gets SIGTERM when join dies (join is single-threaded here, so the thread caveat of
    PR_SET_PDEATHSIG, see worker._watch_parent, does not apply)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
