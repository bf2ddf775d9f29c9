"""Host-side context-parallel checks, run before any rank starts or any call is sent: the model family has a
CP plan, its heads split over the Ulysses degree, and a request's sequences split over ring × ulysses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ModelError
from .context_parallel import CP_MODEL_CLASSES, check_heads, cp_config_for, refuse_ring_with_mask


def check_cp_supported(info: Mapping[str, Any], *, ring: int, ulysses: int) -> None:
    """ModelError when the pipeline's transformer has no diffusers CP plan; ConfigError when its heads cannot be
    split over `ulysses`. `info` is `pipelines.read_model_config(...)`."""
    spec = info["model_index"].get("transformer")
    class_name = spec[1] if isinstance(spec, list) and len(spec) == 2 else None
    if class_name not in CP_MODEL_CLASSES:
        raise ModelError(
            f"{info['class_name']} uses transformer {class_name!r}, which has no context-parallel plan in diffusers; "
            f"ring/ulysses > 1 needs one of: {', '.join(CP_MODEL_CLASSES)}. Use data parallel (dp) for this model."
        )
    heads = info["components"].get("transformer", {}).get("num_attention_heads")
    if isinstance(heads, int):
        # A single CP method runs in diffusers' "anything" mode when needed, which also pads odd head counts.
        check_heads(heads, ulysses, anything=ring == 1)


def check_sequences(lengths: Mapping[str, int], *, ring: int, ulysses: int, uses_mask: bool, what: str) -> None:
    """Refuse what would fail mid-forward or be silently wrong: Ring with a padding mask, and lengths that
    ring × ulysses cannot split (both degrees > 1 have no uneven mode in diffusers)."""
    refuse_ring_with_mask(ring=ring, uses_mask=uses_mask, what=what)
    cp_config_for(ring=ring, ulysses=ulysses, mesh=None, seq_lengths={f"{k} tokens of {what}": v
                                                                       for k, v in lengths.items()})
