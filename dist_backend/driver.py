"""Host side of the sidecar: one call goes to every rank, every rank answers, the host waits with deadlines,
relays progress, forwards cancel requests and turns any rank failure into one typed error."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import launcher, protocol
from .beat import beat_interval
from .channel import ChannelClosed, ChannelTimeout, FrameTooLarge, ProtocolError, wait_readable
from .cluster import LOCAL, ClusterConfig, is_local
from .config import SessionConfig
from .errors import REMOTE_TYPES, Cancelled, RankError, RankTimeout, SidecarError
from .status import RankPlace

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
# Gets the leader's preview latent (a small CPU float16 tensor, see FamilyAdapter.denoise) just before the progress
# call of the same step, so a host can show both together (ComfyUI: ProgressBar.update_absolute(value, total, image)).
PreviewFn = Callable[["torch.Tensor"], None]
CancelFn = Callable[[], bool]
# After one rank fails, how long the others get to reach a step boundary and answer before we call them stuck
# (capped at heartbeat_timeout_s: peers of a failed rank in a CP group wait in a collective that never completes).
FAILURE_GRACE_S = 5.0
# After the caller cancels a stage that cannot stop midway (only denoise checks for cancel, at step boundaries), how
# long it may still run before every rank is stopped instead. A load is cut short: a half-loaded model is worth
# nothing and the next load starts over anyway. Encode and decode take seconds and may finish: stopping the ranks
# would throw the loaded model away and cost a full reload. Tests lower these to exercise both outcomes.
CANCEL_GRACE_S = {protocol.Op.LOAD: 1.0}
CANCEL_GRACE_DEFAULT_S = 30.0
# After a release or restart asks a running call to stop (Sidecar.request_abort, from another thread), how long the
# ranks get to leave at their next step boundary before every rank is stopped instead.
ABORT_GRACE_S = 1.0
# How long the host waits to hand a rank a cancel or shutdown frame. Tiny frames: only a rank that stopped reading
# with a full socket buffer (stopped, or hung for long) takes longer, and the heartbeat deadline judges that one.
_CONTROL_SEND_S = 1.0
# Frame limit of a call whose caller gave no result size (load, ping, unload): control messages, error tracebacks.
CONTROL_FRAME_BYTES = 16 * 1024 * 1024 + 65536
# How long a rank whose channel closed gets to be reaped, so the error can name it and its exit code or signal.
_EXIT_WAIT_S = 2.0
# Beats a rank may miss (one every beat.beat_interval) and still count as beating when a deadline is judged.
_MISSED_BEATS = 2
_POLL_S = 0.05


class Sidecar:
    """A live set of rank processes for one SessionConfig."""

    def __init__(self, config: SessionConfig, *, cluster: ClusterConfig | None = None) -> None:
        self.config = config
        self._ids = itertools.count(1)
        self._launched = launcher.launch(config, cluster=cluster)
        self.broken = False
        self._closed = False
        self._settled = True  # every rank has answered the current call (so the ranks are idle and consistent)
        self._abort_reason: str | None = None  # set by request_abort, from any thread
        self.calls = 0
        # What the status panel shows per rank, read from other threads (whole-dict copies, atomic under the GIL):
        # each rank's last (done, total) step of the call in progress (empty between calls and in stages without
        # steps), and its CUDA [allocated, reserved] bytes from its last beat (kept between calls; none on CPU).
        self.rank_steps: dict[int, tuple[int, int]] = {}
        self.rank_gpu_memory: dict[int, tuple[int, int]] = {}
        # Each rank's resident memory as it read it itself (READY, then every beat): the head cannot read a node's.
        self.rank_rss: dict[int, int] = {p.rank: int(p.ready["rss"]) for p in self._launched.processes
                                         if p.ready.get("rss")}

    @property
    def start_seconds(self) -> float:
        return self._launched.started_s

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._launched.processes if is_local(p.popen)]  # remote pids are other machines'

    @property
    def rank_places(self) -> list[RankPlace]:
        """Where every rank runs (local or on a node), in rank order, as each rank reported it."""
        return [RankPlace(rank=p.rank, node=getattr(p, "node", "") or LOCAL, hostname=p.ready.get("hostname"),
                          pid=p.popen.pid, device=p.ready.get("device")) for p in self._launched.processes]

    @property
    def log_dir(self):
        return self._launched.log_dir

    def alive(self) -> bool:
        return not self.broken and not self._closed and all(p.popen.poll() is None for p in self._launched.processes)

    def request_abort(self, reason: str) -> None:
        """Ask the call in progress (if any; it runs on another thread) to stop: the ranks get a cancel and leave at
        their next step boundary, and within ABORT_GRACE_S the call raises Cancelled(reason), having stopped every
        rank if they did not leave. Only sets a flag: safe from any thread, never blocks (ComfyUI's event loop
        calls it through Session.close)."""
        self._abort_reason = reason

    def call(
        self, op: protocol.Op, payloads: list[dict[str, Any]], *, on_progress: ProgressFn | None = None,
        on_preview: PreviewFn | None = None, should_cancel: CancelFn | None = None, stepped: bool = False,
        result_bytes: int | None = None,
    ) -> list[Any]:
        """Send `op` with payloads[r] to rank r; return every rank's result, in rank order. Large result tensors
        view the rank's shared arena and stay valid only until the next call: copy what you keep.
        Every rank beats while it works, so silence longer than heartbeat_timeout_s means a stopped rank in every
        stage. `stepped` calls also report each step: no step (and no weights being loaded) for that long means a
        rank hung between steps (in a collective, say). `result_bytes` bounds one rank's answer: no frame above
        it (or SessionConfig.max_frame_bytes when set) is ever allocated."""
        if not self.alive():
            raise SidecarError("the sidecar is not running (a rank died or it was closed); start a new session")
        if self._abort_reason is not None:
            raise Cancelled(f"{op} not started: {self._abort_reason}")
        if len(payloads) != self.config.world_size:
            raise AssertionError(f"{len(payloads)} payloads for {self.config.world_size} ranks")
        cfg = self.config
        call_id = next(self._ids)
        self.calls += 1
        # Encode every frame before sending any: a payload that cannot cross must not leave some ranks mid-call.
        frames = [protocol.encode({**payload, "op": op, "id": call_id}) for payload in payloads]
        limit = cfg.max_frame_bytes or max(CONTROL_FRAME_BYTES, CONTROL_FRAME_BYTES + (result_bytes or 0))
        self._settled = False
        self.rank_steps = {}
        procs = self._launched.processes
        try:
            for proc, frame in zip(procs, frames):
                proc.channel.max_frame_bytes = limit
                try:
                    proc.channel.send(frame, timeout=cfg.heartbeat_timeout_s)
                except ChannelTimeout:  # a stopped rank whose socket buffer is full takes nothing
                    self.broken = True
                    raise proc.unanswered(phase=f"{op} (sending the call)", seconds=cfg.heartbeat_timeout_s,
                                          setting="heartbeat_timeout_s") from None
                except ChannelClosed:  # the rank died between calls
                    self.broken = True
                    raise proc.died(phase=op, returncode=_wait_exit(proc.popen, _EXIT_WAIT_S)) from None
            return self._collect(op, call_id, on_progress, on_preview, should_cancel, stepped)
        except BaseException as exc:
            # Whatever left a rank mid-call (a rank died, hung, broke the protocol, a stage was cut short, or the host
            # itself was interrupted while waiting) leaves the process group unusable: stop every rank now so
            # nothing waits in a collective, and let the next call start a fresh sidecar. Errors raised after every
            # rank answered (a rank's exception, Cancelled at a step boundary) keep the sidecar.
            if self.broken or not self._settled:
                self.broken = True
                self.close()
            if self._abort_reason is not None and isinstance(exc, (SidecarError, ProtocolError)):
                # Ranks killed by a release that could not wait: say so, not "rank 0 died".
                raise Cancelled(f"{op} stopped: {self._abort_reason}") from exc
            raise
        finally:
            self.rank_steps = {}  # no step is current once the call is over (the next stage may have none)

    def kill(self) -> None:
        """SIGKILL every rank now, from any thread (a release that cannot wait for the running call): the call's
        own thread then sees the ranks gone, stops the rest and raises."""
        for proc in self._launched.processes:
            if not is_local(proc.popen):
                continue  # a node's rank: its pid is another machine's; closing its channel stops it
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _collect(self, op, call_id, on_progress, on_preview, should_cancel, stepped) -> list[Any]:
        cfg = self.config
        procs = self._launched.processes
        results: dict[int, Any] = {}
        errors: dict[int, dict] = {}  # in arrival order: the first is the root cause, later ones its consequences
        progress: dict[int, tuple[int, int]] = {}
        start = time.monotonic()
        last_heard = {p.rank: start for p in procs}  # any frame: the rank process runs (its beat thread beats)
        last_step = {p.rank: start for p in procs}  # stepped calls: a step, or a beat that says weights are loading
        cancel_sent = False
        failure_at: float | None = None  # when the first error arrived
        cancelled_at: float | None = None  # when the caller's should_cancel first said True
        aborted_at: float | None = None  # when request_abort (release / restart) was first seen
        failure_grace = min(FAILURE_GRACE_S, cfg.heartbeat_timeout_s)
        cancel_grace = CANCEL_GRACE_S.get(op, CANCEL_GRACE_DEFAULT_S)
        # An exception raised by the caller's own hooks (ComfyUI's progress bar raises its interrupt exception
        # from update_absolute) must not leave ranks mid-call: cancel them, wait until all stopped, then re-raise.
        hook_error: BaseException | None = None
        while len(results) + len(errors) < len(procs):
            now = time.monotonic()
            if aborted_at is None and self._abort_reason is not None:
                aborted_at = now
            if not cancel_sent:
                wants_cancel = bool(errors) or hook_error is not None or aborted_at is not None
                if not wants_cancel and should_cancel is not None:
                    try:
                        wants_cancel = bool(should_cancel())
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the ranks have stopped
                        hook_error, wants_cancel = exc, True
                    if wants_cancel and hook_error is None:
                        cancelled_at = now
                if wants_cancel:
                    self._send_cancel(call_id)
                    cancel_sent = True
            pending = [p for p in procs if p.rank not in results and p.rank not in errors]
            for proc in pending:
                code = proc.popen.poll()
                if code is not None:
                    self.broken = True
                    raise proc.died(phase=op, returncode=code)
            if aborted_at is not None and now - aborted_at > ABORT_GRACE_S:
                self.broken = True
                raise Cancelled(f"{op} stopped: {self._abort_reason}; the ranks did not reach a step boundary within "
                                f"{ABORT_GRACE_S:g} s, so every rank was stopped")
            if failure_at is not None and now - failure_at > failure_grace:
                # The other ranks did not reach a step boundary: they wait in a collective for the failed one.
                self.broken = True
                raise self._first_error(op, errors)
            if cancelled_at is not None and not stepped and now - cancelled_at > cancel_grace:
                self.broken = True
                raise Cancelled(f"{op} cancelled; it was still running {cancel_grace:g} s after the request, so every "
                                "rank was stopped (the next call starts a fresh sidecar and reloads the model)")
            if now - start > cfg.call_timeout_s:
                self.broken = True
                raise RankTimeout(rank=pending[0].rank, phase=op, seconds=cfg.call_timeout_s, setting="call_timeout_s")
            # Silence after an error is its consequence (CP peers wait in a collective for the failed rank), so the
            # deadlines below only judge calls without errors; the failure grace above bounds the rest.
            if not errors:
                self._check_deadlines(op, pending, now, last_heard, last_step if stepped else None)
            ready = wait_readable([p.channel for p in pending], _POLL_S)
            for proc in pending:
                if proc.channel not in ready:
                    continue
                try:
                    frame = proc.channel.recv(timeout=cfg.heartbeat_timeout_s)
                except ChannelClosed:
                    # The channel closes as the process exits, a moment before it can be reaped: wait for the exit
                    # so the error names this rank and how it ended.
                    self.broken = True
                    raise proc.died(phase=op, returncode=_wait_exit(proc.popen, _EXIT_WAIT_S)) from None
                except ChannelTimeout:  # announced a frame, then stopped sending it
                    self.broken = True
                    raise RankTimeout(rank=proc.rank, phase=f"{op} (mid-frame)", seconds=cfg.heartbeat_timeout_s,
                                      setting="heartbeat_timeout_s") from None
                except FrameTooLarge as exc:
                    self.broken = True
                    raise ProtocolError(f"rank {proc.rank} during {op}: {exc}") from None
                message = protocol.decode(frame, arena=proc.arena)
                last_heard[proc.rank] = time.monotonic()
                if not isinstance(message, dict) or message.get("id") != call_id:
                    raise ProtocolError(f"rank {proc.rank} sent an unexpected message during {op}")
                event = message.get("event")
                if event == protocol.Event.ALIVE:  # from the rank's beat thread: the process runs
                    if message.get("gpu_memory"):
                        self.rank_gpu_memory[proc.rank] = tuple(int(b) for b in message["gpu_memory"][:2])
                    if message.get("rss"):
                        self.rank_rss = {**self.rank_rss, proc.rank: int(message["rss"])}
                    if message.get("loading"):
                        last_step[proc.rank] = last_heard[proc.rank]  # weights loading: no step is due yet
                    continue
                if event == protocol.Event.HEARTBEAT:
                    last_step[proc.rank] = last_heard[proc.rank]
                    self.rank_steps[proc.rank] = (int(message["done"]), int(message["total"]))
                    continue  # a CP non-leader's step: alive, but its progress is its leader's
                if event == protocol.Event.PROGRESS:
                    last_step[proc.rank] = last_heard[proc.rank]
                    progress[proc.rank] = self.rank_steps[proc.rank] = (int(message["done"]), int(message["total"]))
                    preview = message.get("preview")
                    if hook_error is None:
                        try:
                            if preview is not None and on_preview is not None:
                                on_preview(preview)
                            if on_progress is not None:
                                on_progress(sum(d for d, _ in progress.values()),
                                            sum(t for _, t in progress.values()))
                        except BaseException as exc:  # noqa: BLE001 - re-raised once the ranks have stopped
                            hook_error = exc
                elif message.get("ok"):
                    results[proc.rank] = message.get("result")
                else:
                    errors[proc.rank] = message.get("error") or {}
                    if failure_at is None:
                        failure_at = time.monotonic()
        self._settled = True
        if hook_error is not None:
            raise hook_error
        if aborted_at is not None and (errors or cancelled_at is not None):
            raise Cancelled(f"{op} stopped: {self._abort_reason}")
        if errors:
            raise self._first_error(op, errors)
        if cancelled_at is not None:
            # The call finished before it could stop (a stage without step boundaries, or the last step): the ranks
            # are idle and hold a complete result, but the caller asked to stop, so it gets Cancelled, not a result.
            raise Cancelled(f"{op} cancelled; every rank finished the stage and is idle")
        return [results[p.rank] for p in procs]

    def _check_deadlines(self, op: str, pending, now: float, last_heard: dict, last_step: dict | None) -> None:
        """A timeout for a rank that stopped beating (in any stage), or, in a stepped call, that beats but has
        made no step and loaded no weights for heartbeat_timeout_s (hung in a collective or between steps).
        Which rank is named: one that stopped beating, if any (its peers beat on while they wait for it in a
        collective, and stop stepping when it does, so the step clock alone may blame a waiter, even the head's
        own rank when a node's link is cut); else the one heard from least recently (its peers waiting in a
        collective for it reached the step it never did, so they spoke later). A node's rank that stopped beating
        is NodeLost naming the node and all its ranks."""
        cfg = self.config
        quiet = min(pending, key=lambda p: last_heard[p.rank])
        quiet_s = now - last_heard[quiet.rank]
        for clock in (last_heard, last_step):
            if clock is None:
                continue
            late = min(pending, key=lambda p: clock[p.rank])
            if now - clock[late.rank] > cfg.heartbeat_timeout_s:
                self.broken = True
                if quiet_s > _MISSED_BEATS * beat_interval(cfg.heartbeat_timeout_s):
                    raise quiet.unanswered(phase=op, seconds=cfg.heartbeat_timeout_s, setting="heartbeat_timeout_s",
                                           silent_s=quiet_s)
                raise late.unanswered(phase=op, seconds=cfg.heartbeat_timeout_s, setting="heartbeat_timeout_s")

    def _first_error(self, op: str, errors: dict[int, dict]) -> Exception:
        """The one error to raise: the first real failure to arrive (a rank's peers that waited for it may report
        their own timeouts later), or Cancelled when every rank that answered stopped on request."""
        real = [r for r, e in errors.items() if e.get("type") != "Cancelled"]
        if not real:
            return Cancelled(f"{op} cancelled; every rank stopped at the same step")
        return self._remote_error(real[0], errors[real[0]])

    def _remote_error(self, rank: int, error: dict) -> Exception:
        exc_type = str(error.get("type", "Exception"))
        message = str(error.get("message", ""))
        cls = REMOTE_TYPES.get(exc_type)
        if cls is not None and cls is not Cancelled:
            exc = cls(message)
            exc.rank = rank  # type: ignore[attr-defined]
            exc.remote_traceback = error.get("traceback", "")  # type: ignore[attr-defined]
            return exc
        return RankError(rank=rank, phase=str(error.get("phase", "?")), exc_type=exc_type, message=message,
                         remote_traceback=str(error.get("traceback", "")))

    def _send_cancel(self, call_id: int) -> None:
        frame = protocol.encode({"op": protocol.Op.CANCEL, "id": call_id})
        for proc in self._launched.processes:
            try:
                proc.channel.send(frame, timeout=_CONTROL_SEND_S)
            except ChannelTimeout:
                self.broken = True  # part of a frame may be out: this channel is out of step for good
            except ChannelClosed:
                pass

    def close(self) -> None:
        """Stop every rank (idempotent)."""
        if self._closed:
            return
        self._closed = True
        launched = self._launched
        for proc in launched.processes:
            if proc.channel is not None and proc.popen.poll() is None:
                try:
                    proc.channel.send(protocol.encode({"op": protocol.Op.SHUTDOWN, "id": 0}), timeout=_CONTROL_SEND_S)
                except (ChannelClosed, ChannelTimeout):
                    pass  # the escalation below stops it
        # A broken sidecar's ranks are stuck or half-way through a call: waiting long for them gains nothing.
        # Logs of a failed sidecar stay on disk (errors point at them); a clean close removes them.
        failed = self.broken or any(p.popen.poll() not in (None, 0) for p in launched.processes)
        launcher.stop(launched, grace_s=1.0 if self.broken else 5.0, remove_logs=not failed)

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def _wait_exit(popen: subprocess.Popen, seconds: float) -> int | None:
    try:
        return popen.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None

