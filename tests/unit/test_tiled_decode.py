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
    with pytest.raises(ConfigError, match=r"overlap 40 / tile_size 96 = 0.41666.* not exact in binary.* 24 or 12"):
        DecodeTiling(mode="on", tile_size=96, overlap=40)  # diffusers would stride 6 latents and crop 7
    with pytest.raises(ConfigError, match=r"needs a tile_size"):
        DecodeTiling(mode="on", overlap=64)


def test_auto_tiles_when_the_planners_estimate_does_not_fit_a_cpu_rank():
    """CPU ranks share the RAM (as generate --auto plans them): Wan 2.1's VAE at 1280×720 × 81 frames in float32
    needs 4 frames × 1280 × 720 × 192 channels × 4 bytes × 10 = 28.3 GB, more than a rank's share here; 64×64 not."""
    import json
    import os
    from pathlib import Path

    from dist_backend.config import SessionConfig
    from dist_backend.planning import costs
    from dist_backend.session import decode_fits

    vae = json.loads((Path(__file__).parents[1] / "data/models/wan2.1-t2v-14b/vae/config.json").read_text())
    info = {"family": "wan", "components": {"vae": vae}}
    config = SessionConfig(world_size=2, ulysses=2)
    share = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    whole = costs.vae_decode_bytes(channels=192, height=720, width=1280, frames=81, temporal=4, tile=None, element=4)
    assert whole == 4 * 1280 * 720 * 192 * 4 * 10
    assert decode_fits(info, config=config, height=720, width=1280, frames=81) == (whole <= share - costs.RESERVE_BYTES)
    assert decode_fits(info, config=config, height=64, width=64, frames=5)
