"""DecodeTiling's validation (no processes): bad tile settings are refused with the rule and the numbers."""

from __future__ import annotations

import pytest

from dist_backend.errors import ConfigError
from dist_backend.tiled_decode import DecodeTiling, VaeTiling


def test_tiling_settings_are_checked_with_the_rule():
    assert DecodeTiling(mode="on", tile_size=512, overlap=128).mode is VaeTiling.ON
    assert DecodeTiling.from_message(DecodeTiling(mode="auto", tile_size=64).to_message()) == \
        DecodeTiling(mode=VaeTiling.AUTO, tile_size=64)
    with pytest.raises(ConfigError, match=r"vae_tiling='sideways' is not one of: off, on, auto"):
        DecodeTiling(mode="sideways")
    with pytest.raises(ConfigError, match=r"tile_size must be 0 \(the VAE's default\) or a multiple of 8 pixels.*60"):
        DecodeTiling(mode="on", tile_size=60)
    with pytest.raises(ConfigError, match=r"below 64 pixels"):
        DecodeTiling(mode="on", tile_size=32)
    with pytest.raises(ConfigError, match=r"overlap 256 must be less than half the tile size \(512 / 2 = 256\)"):
        DecodeTiling(mode="on", tile_size=512, overlap=256)
    with pytest.raises(ConfigError, match=r"needs a tile_size"):
        DecodeTiling(mode="on", overlap=64)
