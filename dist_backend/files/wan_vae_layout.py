"""The Wan 2.1 VAE's original layout (the one `qwen_image_vae.safetensors` and `wan_2.1_vae.safetensors` have,
and ComfyUI's `comfy/ldm/wan/vae.py` reads) <-> diffusers' AutoencoderKLQwenImage / AutoencoderKLWan names.
One set of rules, used in both directions.

Why our own converter: diffusers' `convert_wan_vae_to_diffusers` has the real VAE's block layout written into it
(the decoder's flat `upsamples.N` index → up block is a fixed table for two residual blocks per level), so it
cannot read another layout (our tiny test files have one). Ours takes the layout from the VAE config
(`num_res_blocks`, `dim_mult`) and is checked against diffusers' converter on the real layout's names
(tests/unit/test_qwen_single_file.py, with the shipped Qwen-Image and Wan 2.1 VAE configs).

Also the few shapes of such a file checked on the host against the VAE config (`vae_shape_checks`), for both
families that use it.
"""

from __future__ import annotations

import re

from ..errors import ModelError
from .detect import FileInfo, count_blocks

# Inside a residual block: (original, diffusers). The original block is Sequential(norm, SiLU, conv, norm, SiLU,
# Dropout, conv) plus a 1x1x1 shortcut.
_RESIDUAL = ((".residual.0.gamma", ".norm1.gamma"), (".residual.2.", ".conv1."), (".residual.3.gamma", ".norm2.gamma"),
             (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut."))
# Whole-name prefixes outside the down / up block lists: (original, diffusers).
_FIXED = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."),
          ("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
          ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
          ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
          ("encoder.middle.0.", "encoder.mid_block.resnets.0."), ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
          ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
          ("decoder.middle.0.", "decoder.mid_block.resnets.0."), ("decoder.middle.2.", "decoder.mid_block.resnets.1."),
          ("decoder.middle.1.", "decoder.mid_block.attentions.0."))


def _decoder_blocks(config: dict) -> list[str]:
    """The diffusers prefix of each entry of the original decoder's flat `upsamples` list, in order: per level
    `num_res_blocks + 1` residual blocks, then an upsampler except after the last level."""
    levels, per_level = len(config["dim_mult"]), int(config["num_res_blocks"]) + 1
    out = []
    for i in range(levels):
        out += [f"decoder.up_blocks.{i}.resnets.{j}." for j in range(per_level)]
        if i != levels - 1:
            out.append(f"decoder.up_blocks.{i}.upsamplers.0.")
    return out


def _check_config(config: dict) -> None:
    if config.get("attn_scales"):
        raise ModelError(f"a Wan-layout VAE with attention in its down/up blocks (attn_scales "
                         f"{config['attn_scales']}) is not supported; the Wan 2.1 / Qwen-Image VAE has none")


def wan_vae_to_diffusers(sd: dict, *, config: dict, path: str = "?") -> dict:
    """An original-layout Wan VAE state dict (no prefix) -> diffusers' names for the VAE `config` describes."""
    _check_config(config)
    blocks = _decoder_blocks(config)
    out = {}
    for name, t in sd.items():
        new = _rename_block(name, blocks, path=path)
        for orig, ours in _RESIDUAL:
            new = new.replace(orig, ours)
        out[new] = t
    return out


def _rename_block(name: str, blocks: list[str], *, path: str) -> str:
    if m := re.match(r"encoder\.downsamples\.(\d+)\.", name):
        return f"encoder.down_blocks.{m.group(1)}." + name[m.end():]
    if m := re.match(r"decoder\.upsamples\.(\d+)\.", name):
        index = int(m.group(1))
        if index >= len(blocks):
            raise ModelError(f"{path!r} has {name!r}, but the VAE config has {len(blocks)} decoder blocks; the file "
                             "is another VAE (Wan 2.2's?) or damaged")
        return blocks[index] + name[m.end():]
    for orig, ours in _FIXED:
        if name.startswith(orig):
            return ours + name[len(orig):]
    return name


def diffusers_to_wan_vae(sd: dict, *, config: dict) -> dict:
    """The inverse of `wan_vae_to_diffusers` (for writing files in the original layout, e.g. test fixtures)."""
    _check_config(config)
    blocks = {prefix: i for i, prefix in enumerate(_decoder_blocks(config))}
    out = {}
    for name, t in sd.items():
        for orig, ours in _RESIDUAL:  # first: only residual blocks have these, and "encoder.conv1." must stay
            name = name.replace(ours, orig)
        new = None
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.", name):
            new = f"encoder.downsamples.{m.group(1)}." + name[m.end():]
        elif m := re.match(r"decoder\.up_blocks\.\d+\.(resnets\.\d+|upsamplers\.0)\.", name):
            new = f"decoder.upsamples.{blocks[m.group(0)]}." + name[m.end():]
        else:
            for orig, ours in _FIXED:
                if name.startswith(ours):
                    new = orig + name[len(ours):]
                    break
        out[new or name] = t
    return out


def vae_shape_checks(v: FileInfo, config: dict) -> list[tuple[FileInfo, str, object, object]]:
    """(file, what, found in the file, what the config says) for the shapes that fix the VAE's architecture."""
    return [
        (v, "encoder.conv1.weight rows (base channels)", (v.shapes.get("encoder.conv1.weight") or (None,))[0],
         config["base_dim"]),
        (v, "encoder.head.2.weight rows (2 × latent channels)", (v.shapes.get("encoder.head.2.weight") or (None,))[0],
         2 * config["z_dim"]),
        (v, "number of decoder blocks", count_blocks(v.shapes, "decoder.upsamples"), len(_decoder_blocks(config))),
    ]
