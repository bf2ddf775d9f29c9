"""Test-only fault injection on a rank, inert unless the environment asks for it.

The reliability tests (tests/dist/test_faults.py) need faults that the host cannot cause from outside: a rank
that raises at a given step, hangs where its peers wait in a collective, exits, or makes a stage slow. They set,
through ``SessionConfig(env=...)``:

    DISTDIFF_FAULT=rank<R>:<op>[_step<N>|_load]:<action>   e.g. rank1:denoise_step5:raise_oom, rank0:load:sleep3
        op      a call name (load, encode, denoise, decode); _step<N> fires at that denoise step boundary, _load
                when the call starts loading weights (staged offload reloads), neither when the call starts
        action  hang (the main thread sleeps forever; the process and its beat thread run on) | sleep<S> (sleep
                S seconds, then carry on) | raise_oom | exit | stop (SIGSTOP this whole process, as a freeze
                from outside would) | oversize (send the host the head of a 1 GiB frame, then hang)
    DISTDIFF_FAULT_ONCE=<path>   optional: fire only if <path> can still be created, so the fault fires once
                                 in all, not once per sidecar (the restarted sidecar must work)

Why environment variables and not an op: the fault must be in place before the rank does anything, must not
widen the control protocol, and can never be switched on by a peer on the channel.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import time
from dataclasses import dataclass

ENV_FAULT = "DISTDIFF_FAULT"
ENV_FAULT_ONCE = "DISTDIFF_FAULT_ONCE"
EXIT_FAULT = 3
_SPEC = re.compile(r"^rank(\d+):([a-z]+)(?:_step(\d+)|_(load))?:(hang|raise_oom|exit|stop|oversize|sleep[0-9.]+)$")
OVERSIZE_BYTES = 1024**3  # under channel.MAX_FRAME_BYTES: only a per-call limit refuses it


@dataclass(frozen=True)
class Fault:
    op: str
    step: int | None
    load: bool
    action: str
    once_path: str

    def at(self, op: str | None, step: int | None = None, *, load: bool = False, channel=None) -> None:
        """Call at every fault point; does something only at the one it names. `channel`: the rank's channel to
        the host (the start of a call passes it, for `oversize`)."""
        if op != self.op or step != self.step or load != self.load:
            return
        if self.once_path:
            try:
                os.close(os.open(self.once_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if self.action == "hang":
            while True:  # a rank that never reaches its next collective or message
                time.sleep(3600)
        if self.action.startswith("sleep"):
            time.sleep(float(self.action[5:]))
        elif self.action == "raise_oom":
            import torch

            raise torch.OutOfMemoryError(f"injected fault: out of memory at {op} step {step}")
        elif self.action == "exit":
            os._exit(EXIT_FAULT)
        elif self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.action == "oversize" and channel is not None:
            with channel._send_lock:  # a frame head the host must refuse unread, then nothing more
                channel.sock.sendall(struct.pack("<Q", OVERSIZE_BYTES) + b"x" * 64)
                while True:
                    time.sleep(3600)


def from_env(rank: int) -> Fault | None:
    """The fault this rank must inject, or None (always None unless DISTDIFF_FAULT is set)."""
    spec = os.environ.get(ENV_FAULT, "")
    if not spec:
        return None
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"{ENV_FAULT}={spec!r} is not rank<R>:<op>[_step<N>|_load]:"
                         "hang|sleep<S>|raise_oom|exit|stop|oversize")
    if int(match[1]) != rank:
        return None
    return Fault(op=match[2], step=int(match[3]) if match[3] else None, load=bool(match[4]), action=match[5],
                 once_path=os.environ.get(ENV_FAULT_ONCE, ""))
