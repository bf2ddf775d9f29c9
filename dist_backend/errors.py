"""Typed errors. Every error that crosses a process boundary is one of these, so the host can re-raise it
as the same type with the rank, the phase and the remote traceback attached."""

from __future__ import annotations


class DistDiffError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DistDiffError, ValueError):
    """Bad user input found before (or instead of) starting ranks. The message names the input and the fix."""


class ModelError(DistDiffError, ValueError):
    """The model folder is missing, not a diffusers layout, corrupt, or of a family we cannot run as asked."""


class UnsupportedError(DistDiffError, ValueError):
    """A combination that would run but give a silently wrong result (for example Ring with a padding mask)."""


class ProtocolError(DistDiffError):
    """A control message that does not decode, or a peer that did not prove the session secret."""


class Cancelled(DistDiffError):
    """The caller asked to stop; every rank left at the same step boundary."""


class SidecarError(DistDiffError):
    """The sidecar as a whole failed: a rank died, did not start, or the channel broke."""


class RankError(SidecarError):
    """An exception raised on a rank, re-raised on the host with its type name, message and traceback."""

    def __init__(self, *, rank: int, phase: str, exc_type: str, message: str, remote_traceback: str = "") -> None:
        self.rank = rank
        self.phase = phase
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"rank {rank} failed during {phase}: {exc_type}: {message}{_hint(exc_type, message)}")


class RankDied(SidecarError):
    """A rank process exited (crash, kill, OOM killer) while the host was waiting on it."""

    def __init__(self, *, rank: int, phase: str, returncode: int | None, detail: str = "") -> None:
        self.rank = rank
        self.phase = phase
        self.returncode = returncode
        self.detail = detail  # the end of its log, for a status panel
        how = f"exit code {returncode}" if returncode is None or returncode >= 0 else f"signal {-returncode}"
        super().__init__(
            f"rank {rank} died during {phase} ({how}){': ' + detail if detail else ''}. "
            "Every other rank was stopped; the next call starts a fresh sidecar."
        )


class RankTimeout(SidecarError, TimeoutError):
    """A rank did not answer within its deadline (hung collective, stopped process, deadlock)."""

    def __init__(self, *, rank: int | None, phase: str, seconds: float, setting: str) -> None:
        self.rank = rank
        self.phase = phase
        self.seconds = seconds
        who = f"rank {rank}" if rank is not None else "the sidecar"
        super().__init__(
            f"{who} gave no answer during {phase} within {seconds:g} s ({setting}). Every rank was stopped; "
            f"raise {setting} if this step is legitimately that slow."
        )


def _hint(exc_type: str, message: str) -> str:
    """A short fix for errors users meet often; empty when we have nothing useful to add."""
    text = f"{exc_type} {message}".lower()
    if "out of memory" in text or "outofmemory" in text:
        return " (hint: lower width/height or images per prompt, use offload='staged', or add ranks/gpus_per_rank)"
    if "divisible" in text:
        return " (hint: choose a width/height or degree so the sequence splits evenly, or use ulysses_anything)"
    return ""


# Every type a rank may report by name; the host maps the name back to the class (unknown names become RankError).
REMOTE_TYPES: dict[str, type[DistDiffError]] = {
    cls.__name__: cls for cls in (ConfigError, ModelError, UnsupportedError, Cancelled, ProtocolError)
}
