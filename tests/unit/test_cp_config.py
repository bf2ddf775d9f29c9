"""Context-parallel choices that need no rank processes: mode selection, head checks, refusals, the CPU op."""

from __future__ import annotations

import pytest
import torch

from dist_backend.errors import ConfigError, ModelError, UnsupportedError
from dist_backend.strategies.context_parallel import (
    check_heads,
    cp_config_for,
    enable_context_parallel,
    refuse_ring_with_mask,
)


def _mode(config) -> tuple[int, int, bool, bool]:
    return config.ring_degree, config.ulysses_degree, config.ulysses_anything, config.ring_anything


@pytest.mark.parametrize(
    ("ring", "ulysses", "lengths", "heads", "expected"),
    [
        (1, 2, {"image tokens": 4096, "text tokens": 512}, 24, (1, 2, False, False)),
        (2, 1, {"image tokens": 4096, "text tokens": 512}, 24, (2, 1, False, False)),
        (2, 2, {"image tokens": 4096, "text tokens": 512}, 24, (2, 2, False, False)),
        (1, 2, {"image tokens": 4096, "text tokens": 13}, 24, (1, 2, True, False)),  # Qwen-Image prompt length
        (2, 1, {"image tokens": 4095}, 24, (2, 1, False, True)),
        (1, 8, {"image tokens": 4096}, 30, (1, 8, True, False)),  # heads alone: 30 on 8 ranks, padded to 32
        (1, 2, {"image tokens": 4096}, 3, (1, 2, True, False)),
        (2, 1, {"image tokens": 4096}, 3, (2, 1, False, False)),  # Ring never splits heads
        (1, 3, {"image tokens": 4095}, None, (1, 3, False, False)),
    ],
)
def test_cp_config_for_picks_the_mode(ring, ulysses, lengths, heads, expected):
    config = cp_config_for(ring=ring, ulysses=ulysses, mesh=None, seq_lengths=lengths, num_heads=heads)
    assert _mode(config) == expected


def test_ring_x_ulysses_with_an_uneven_length_explains_the_arithmetic():
    with pytest.raises(ConfigError) as info:
        cp_config_for(ring=2, ulysses=2, mesh=None, seq_lengths={"image tokens": 4095, "text tokens": 512})
    message = str(info.value)
    assert "image tokens 4095 not divisible by ring×ulysses = 2×2 = 4" in message
    assert "4095 % 4 = 3" in message and "single CP method" in message and "multiple of 4" in message


def test_ring_x_ulysses_with_uneven_heads_is_refused():
    with pytest.raises(ConfigError, match="24 attention heads are not divisible by ulysses = 5"):
        cp_config_for(ring=2, ulysses=5, mesh=None, seq_lengths={"image tokens": 4000}, num_heads=24)


@pytest.mark.parametrize(
    ("ring", "ulysses", "lengths", "match"),
    [
        (1, 1, {"image tokens": 16}, "not context parallelism"),
        (0, 2, {"image tokens": 16}, "must both be ≥ 1"),
        (1, 4, {"image tokens": 16, "text tokens": 3}, "text tokens = 3 is shorter than ring×ulysses = 1×4 = 4"),
    ],
)
def test_cp_config_for_refuses(ring, ulysses, lengths, match):
    with pytest.raises(ConfigError, match=match):
        cp_config_for(ring=ring, ulysses=ulysses, mesh=None, seq_lengths=lengths)


@pytest.mark.parametrize(
    ("heads", "ulysses", "plain_ok", "anything_ok"),
    [
        (24, 1, True, True),
        (24, 2, True, True),
        (24, 8, True, True),
        (3, 2, False, True),  # pad 1 < 2 heads per rank
        (30, 8, False, True),  # pad 2 < 4 heads per rank
        (6, 4, False, False),  # pad 2 = 2 heads per rank: the last rank would hold only padding
        (12, 8, False, False),
        (30, 16, False, False),
    ],
)
def test_check_heads(heads, ulysses, plain_ok, anything_ok):
    for anything, ok in ((False, plain_ok), (True, anything_ok)):
        if ok:
            check_heads(heads, ulysses, anything=anything)
        else:
            with pytest.raises(ConfigError, match=f"{heads} attention heads"):
                check_heads(heads, ulysses, anything=anything)


def test_refuse_ring_with_mask():
    refuse_ring_with_mask(ring=1, uses_mask=True, what="a batch of prompts of different lengths")
    refuse_ring_with_mask(ring=4, uses_mask=False, what="one prompt")
    with pytest.raises(UnsupportedError, match="a batch of prompts of different lengths needs an attention padding"):
        refuse_ring_with_mask(ring=2, uses_mask=True, what="a batch of prompts of different lengths")


def test_enable_context_parallel_refuses_a_model_without_plan_and_ignores_1x1():
    model = torch.nn.Linear(2, 2)
    enable_context_parallel(model, ring=1, ulysses=1, mesh=None, seq_lengths={"image tokens": 16})  # no-op
    with pytest.raises(ModelError, match="Linear has no context-parallel plan.*FluxTransformer2DModel"):
        enable_context_parallel(model, ring=1, ulysses=2, mesh=None, seq_lengths={"image tokens": 16})


def test_import_is_light():
    """Importing the strategy imports neither torch nor diffusers and patches nothing (STYLE: nothing at import)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, dist_backend.strategies.context_parallel; "
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.stdout.strip() == "[]"
