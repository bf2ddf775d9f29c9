"""Host side of the sidecar: one call goes to every rank, every rank answers, the host waits with deadlines,
relays progress, forwards cancel requests and turns any rank failure into one typed error."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from . import launcher, protocol
from .channel import ChannelClosed, ProtocolError
from .config import SessionConfig
from .errors import REMOTE_TYPES, Cancelled, RankDied, RankError, RankTimeout, SidecarError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
# After one rank fails, how long the others get to reach a step boundary and answer before we call them stuck.
FAILURE_GRACE_S = 5.0
_POLL_S = 0.05


class Sidecar:
    """A live set of rank processes for one SessionConfig."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._ids = itertools.count(1)
        self._launched = launcher.launch(config)
        self.broken = False
        self._closed = False
        self.calls = 0

    @property
    def start_seconds(self) -> float:
        return self._launched.started_s

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._launched.processes]

    @property
    def log_dir(self):
        return self._launched.log_dir

    def alive(self) -> bool:
        return not self.broken and not self._closed and all(p.popen.poll() is None for p in self._launched.processes)

    def call(
        self, op: str, payloads: list[dict[str, Any]], *, on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None, stepped: bool = False,
    ) -> list[Any]:
        """Send `op` with payloads[r] to rank r; return every rank's result, in rank order.
        `stepped` calls send progress after each step, so silence longer than heartbeat_timeout_s means a hang."""
        if not self.alive():
            raise SidecarError("the sidecar is not running (a rank died or it was closed); start a new session")
        if len(payloads) != self.config.world_size:
            raise AssertionError(f"{len(payloads)} payloads for {self.config.world_size} ranks")
        call_id = next(self._ids)
        self.calls += 1
        procs = self._launched.processes
        try:
            for proc, payload in zip(procs, payloads):
                proc.channel.send(protocol.encode({**payload, "op": op, "id": call_id}))
            return self._collect(op, call_id, on_progress, should_cancel, stepped)
        except (SidecarError, ProtocolError) as exc:
            # A rank that died, hung or broke the protocol leaves the process group unusable: stop every rank
            # now so nothing waits in a collective, and let the next call start a fresh sidecar.
            if not isinstance(exc, RankError) or self.broken:
                self.close()
            if isinstance(exc, ChannelClosed):
                dead = next((p for p in procs if p.popen.poll() is not None), None)
                raise RankDied(rank=dead.rank if dead else -1, phase=op,
                               returncode=dead.popen.returncode if dead else None,
                               detail=dead.log_tail() if dead else str(exc)) from None
            raise

    def _collect(self, op, call_id, on_progress, should_cancel, stepped) -> list[Any]:
        cfg = self.config
        procs = self._launched.processes
        results: dict[int, Any] = {}
        errors: dict[int, dict] = {}
        progress: dict[int, tuple[int, int]] = {}
        start = time.monotonic()
        last_heard = {p.rank: start for p in procs}
        cancel_sent = False
        failure_at: float | None = None
        # An exception raised by the caller's own hooks (ComfyUI's progress bar raises its interrupt exception
        # from update_absolute) must not leave ranks mid-call: cancel them, wait until all stopped, then re-raise.
        hook_error: BaseException | None = None
        while len(results) + len(errors) < len(procs):
            now = time.monotonic()
            if not cancel_sent:
                wants_cancel = bool(errors) or hook_error is not None
                if not wants_cancel and should_cancel is not None:
                    try:
                        wants_cancel = bool(should_cancel())
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the ranks have stopped
                        hook_error, wants_cancel = exc, True
                if wants_cancel:
                    self._send_cancel(call_id)
                    cancel_sent = True
                    failure_at = now if errors else None
            pending = [p for p in procs if p.rank not in results and p.rank not in errors]
            for proc in pending:
                code = proc.popen.poll()
                if code is not None:
                    self.broken = True
                    raise RankDied(rank=proc.rank, phase=op, returncode=code, detail=proc.log_tail())
            if failure_at is not None and now - failure_at > FAILURE_GRACE_S:
                # The other ranks did not reach a step boundary: they wait in a collective for the failed one.
                self.broken = True
                raise self._remote_error(min(errors), errors[min(errors)])
            if now - start > cfg.call_timeout_s:
                self.broken = True
                raise RankTimeout(rank=pending[0].rank, phase=op, seconds=cfg.call_timeout_s, setting="call_timeout_s")
            if stepped:
                silent = min(pending, key=lambda p: last_heard[p.rank])
                if now - last_heard[silent.rank] > cfg.heartbeat_timeout_s:
                    self.broken = True
                    raise RankTimeout(rank=silent.rank, phase=op, seconds=cfg.heartbeat_timeout_s,
                                      setting="heartbeat_timeout_s")
            ready = _select([p.channel for p in pending], _POLL_S)
            for proc in pending:
                if proc.channel not in ready:
                    continue
                message = protocol.decode(proc.channel.recv(timeout=cfg.heartbeat_timeout_s))
                last_heard[proc.rank] = time.monotonic()
                if not isinstance(message, dict) or message.get("id") != call_id:
                    raise ProtocolError(f"rank {proc.rank} sent an unexpected message during {op}")
                if message.get("event") == "progress":
                    progress[proc.rank] = (int(message["done"]), int(message["total"]))
                    if on_progress is not None and hook_error is None:
                        try:
                            on_progress(sum(d for d, _ in progress.values()), sum(t for _, t in progress.values()))
                        except BaseException as exc:  # noqa: BLE001 - re-raised once the ranks have stopped
                            hook_error = exc
                elif message.get("ok"):
                    results[proc.rank] = message.get("result")
                else:
                    errors[proc.rank] = message.get("error") or {}
        if hook_error is not None:
            raise hook_error
        if errors:
            types = {e.get("type") for e in errors.values()}
            if types == {"Cancelled"}:
                raise Cancelled(f"{op} cancelled; every rank stopped at the same step")
            first = min((r for r, e in errors.items() if e.get("type") != "Cancelled"), default=min(errors))
            raise self._remote_error(first, errors[first])
        return [results[p.rank] for p in procs]

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
        frame = protocol.encode({"op": "cancel", "id": call_id})
        for proc in self._launched.processes:
            try:
                proc.channel.send(frame)
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
                    proc.channel.send(protocol.encode({"op": "shutdown", "id": 0}))
                except ChannelClosed:
                    pass
        launcher.stop(launched, grace_s=5.0)

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def _select(channels, timeout: float):
    import select

    readable, _, _ = select.select(channels, [], [], timeout)
    return set(readable)
