"""Guidance options a family would silently ignore are refused before any rank starts, with the fix in the message;
the negative prompt is kept verbatim (only "" means none)."""

from __future__ import annotations

import pytest

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError
from dist_backend.pipelines import read_model_config
from dist_backend.session import Session, _negative, check_guidance


@pytest.mark.parametrize("family, options, match", [
    ("qwenimage", dict(true_cfg_scale=2.0), "Flux's true CFG scale; qwenimage takes its CFG scale from guidance"),
    ("wan", dict(true_cfg_scale=1.5), "Flux's true CFG scale; wan takes"),
    ("flux", dict(true_cfg_scale=2.0, negative_prompt=None), "needs a negative prompt"),
    ("flux", dict(guidance_2=3.0, negative_prompt="x"), "no second expert"),
    ("wan", dict(guidance_2=3.0), "no second expert"),
    ("flux", dict(true_cfg_scale=-1.0, negative_prompt="x"), "true_cfg_scale must be a number ≥ 0"),
])
def test_refused_before_any_rank_starts(tiny_dirs, family, options, match):
    options = {"negative_prompt": "blurry", "true_cfg_scale": 1.0, "guidance_2": None, **options}
    with pytest.raises(ConfigError, match=match):
        check_guidance(read_model_config(tiny_dirs[family]), **options)
    session = Session(SessionConfig(world_size=1))
    with pytest.raises(ConfigError, match=match):
        session.generate(model_dir=tiny_dirs[family], prompts=["a cat"], seed=0, steps=1, guidance=1.0,
                         height=64, width=64, num_frames=5 if family == "wan" else 1, **options)
    assert session.starts == 0


def test_accepted_options(tiny_dirs):
    check_guidance(read_model_config(tiny_dirs["flux"]), negative_prompt=" ", true_cfg_scale=3.0, guidance_2=None)
    check_guidance(read_model_config(tiny_dirs["qwenimage"]), negative_prompt=None, true_cfg_scale=1.0,
                   guidance_2=None)


def test_negative_prompt_is_kept_verbatim():
    assert _negative(" ") == " "
    assert _negative("  blurry \n") == "  blurry \n"
    assert _negative("") is None and _negative(None) is None
