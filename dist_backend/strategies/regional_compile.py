"""Regional compilation: diffusers' `compile_repeated_blocks` (torch.compile of the transformer's repeated block
class, e.g. FluxTransformerBlock, compiled once and reused by every block) applied on each rank after context
parallelism is enabled, so the traced graph contains the CP collectives of the block's attention.

The compiled code lives on the model (`module.compile` keeps it in `_compiled_call_impl`) and in dynamo's cache, so
it survives between calls while the transformer stays loaded. What makes dynamo compile again: a new input shape
(image size, frames, a prompt with another text length; from the second distinct shape on dynamo marks the
changing dimensions dynamic and compiles one more general graph), another dtype, a change of CP mode (we reset
dynamo then, see `reset_compiled`), and a reload of the transformer (staged offload, another model). `graphs_compiled`
counts graphs so callers can see when that happened.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MARK = "_distdiff_regional_compile"


def compile_regions(model) -> bool:
    """Compile `model`'s repeated blocks unless done already; True when this call set it up. Compilation itself
    happens lazily at the first forward."""
    if getattr(model, _MARK, False):
        return False
    blocks = getattr(model, "_repeated_blocks", None)
    if not blocks:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{type(model).__name__} declares no repeated blocks (_repeated_blocks), so regional "
                               "compilation cannot apply to it; use compile='none'")
    model.compile_repeated_blocks()
    setattr(model, _MARK, True)
    log.info("regional compile set up on %s (%s)", type(model).__name__, ", ".join(blocks))
    return True


def is_compiled(model) -> bool:
    return bool(getattr(model, _MARK, False))


def reset_compiled() -> None:
    """Drop every compiled graph of this process (the modules recompile at their next forward). Used when the CP
    hooks around the blocks change, so no graph traced with the old ones is reused."""
    import torch

    torch._dynamo.reset()


def graphs_compiled() -> int:
    """Graphs dynamo compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
