"""CFG parallel: the two guidance branches of every step run at the same time on the two halves of a data-parallel
group, and one exchange of the noise prediction gives both results to both halves.

diffusers' pipelines (Flux true CFG, Qwen-Image, Wan) call the transformer twice per step: first with the prompt
("cond"), then with the negative prompt ("uncond"), on the same latents; they combine the two predictions and step
the scheduler only after the second call. `split_cfg` wraps the transformer's forward for the duration of one
denoise so that, on each half:

- half 0 computes the cond call and returns its result; its uncond call computes nothing and returns the
  uncond prediction received from half 1;
- half 1 returns, from the cond call, an empty tensor without computing; its uncond call computes the uncond
  prediction (it holds the negative inputs only then) and fills that empty tensor in place with the cond prediction
  received from half 0. The pipeline does not look at the cond prediction before the uncond call returns, so it sees
  the filled tensor.

So half 0's cond forward and half 1's uncond forward run at the same time, then both halves exchange their
prediction once per step (an all_gather over the 2-rank `cfg` group; each rank sends one prediction and receives
one). Everything after the second call (the CFG combination, Qwen-Image's norm rescale, the scheduler step) runs
unchanged on every rank with identical inputs, so every rank of the group holds the same latents.

We wrap the whole forward (the context-parallel hooks included): each half is one CP group, and rank k of half 0
exchanges with rank k of half 1, both holding the full (gathered) prediction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedError

log = logging.getLogger(__name__)

__all__ = ["CfgStats", "split_cfg"]


@dataclass
class CfgStats:
    """What the split did during one denoise (read by tests and the bench)."""

    exchanges: int = 0
    """Completed cond/uncond pairs (one per step)."""
    bytes_sent: int = 0
    """Bytes this rank contributed to the exchanges: one noise prediction per step."""
    forwards: int = 0
    """Transformer forwards this rank really computed (one per step, not two)."""
    shapes: list[tuple[int, ...]] = field(default_factory=list)


class _CfgForward:
    """The replacement forward of one transformer on one rank (see the module docstring)."""

    def __init__(self, forward, *, group, cfg_rank: int, stats: CfgStats) -> None:
        self.forward = forward
        self.group = group
        self.cfg_rank = cfg_rank
        self.stats = stats
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (cond hidden_states, result/placeholder)

    def __call__(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if kwargs.get("return_dict", True):
            # Our adapters' pipelines all pass return_dict=False; the tuple is what we hand back below.
            raise UnsupportedError("CFG parallel needs the pipeline to call the transformer with return_dict=False")
        if self.pending is None:
            return self._cond(hidden, args, kwargs)
        return self._uncond(hidden, args, kwargs)

    def _cond(self, hidden, args, kwargs):
        if self.cfg_rank == 0:
            out = self.forward(*args, **kwargs)[0]
            self.stats.forwards += 1
        else:
            out = hidden.new_empty(0)  # filled in place at the uncond call
        self.pending = (hidden, out)
        return (out,)

    def _uncond(self, hidden, args, kwargs):
        cond_hidden, held = self.pending
        self.pending = None
        if hidden is not cond_hidden:
            # The pipeline did not call cond then uncond on the same latents (e.g. a family whose second call is
            # something else): exchanging would mix unrelated predictions.
            raise UnsupportedError(
                "CFG parallel expects the pipeline to call the transformer for the conditional, then the "
                "unconditional branch on the same latents; this pipeline did not. Use cfg=1 for it."
            )
        mine = held if self.cfg_rank == 0 else self.forward(*args, **kwargs)[0]
        if self.cfg_rank == 1:
            self.stats.forwards += 1
        mine = mine.contiguous()
        flat = mine.new_empty(2 * mine.numel())  # gloo gathers into the concatenation along dim 0
        # NOTE: symmetric: both halves reach this all_gather exactly once per step (the second transformer call of
        # the step, which every rank makes because every rank runs the same pipeline loop on the same inputs).
        torch.distributed.all_gather_into_tensor(flat, mine.view(-1), group=self.group)
        both = flat.view(2, *mine.shape)
        self.stats.exchanges += 1
        self.stats.bytes_sent += mine.numel() * mine.element_size()
        self.stats.shapes.append(tuple(mine.shape))
        if self.cfg_rank == 0:
            return (both[1],)
        if held.dtype != mine.dtype:
            raise UnsupportedError(f"CFG parallel: the prediction dtype {mine.dtype} differs from the latents' "
                                   f"{held.dtype}; use cfg=1 for this pipeline")
        held.resize_(mine.shape).copy_(both[0])
        return (mine,)


@contextlib.contextmanager
def split_cfg(transformers, *, group, cfg_rank: int) -> Iterator[CfgStats]:
    """Within the block, each transformer in `transformers` (None entries skipped) computes only its half's branch.

    `group` is the 2-rank process group pairing this rank with its counterpart in the other half (the mesh's "cfg"
    dimension) and `cfg_rank` this rank's index in it (0: cond, 1: uncond). Every rank of both halves must enter the
    block around the same pipeline call with identical inputs. The original forwards are restored on exit.
    """
    if cfg_rank not in (0, 1):
        raise ValueError(f"cfg_rank must be 0 or 1, got {cfg_rank}")
    stats = CfgStats()
    saved = []
    try:
        for model in transformers:
            if model is None:
                continue
            had_own = "forward" in model.__dict__  # diffusers' hook registry installs an instance-level forward
            saved.append((model, had_own, model.__dict__.get("forward")))
            model.forward = _CfgForward(model.forward, group=group, cfg_rank=cfg_rank, stats=stats)
        yield stats
    finally:
        for model, had_own, forward in reversed(saved):
            if had_own:
                model.forward = forward
            else:
                del model.forward
    log.debug("CFG split: %d exchanges, %d forwards, %d bytes sent", stats.exchanges, stats.forwards,
              stats.bytes_sent)
