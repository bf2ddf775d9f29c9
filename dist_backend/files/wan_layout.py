"""Wan 2.1 / 2.2's original layouts (the files ComfyUI's docs list: `wan2.1_t2v_*.safetensors`,
`wan_2.1_vae.safetensors`) <-> diffusers' WanTransformer3DModel and AutoencoderKLWan names, and the UMT5
tokenizer ComfyUI's text-encoder files carry inside them (`spiece_model`).

The transformer goes through diffusers' own `convert_wan_transformer_to_diffusers` (pure renaming, any size);
`diffusers_to_wan_transformer` is only its inverse, for writing test fixtures.

Why our own VAE converter: diffusers' `convert_wan_vae_to_diffusers` has the real VAE's decoder layout written
into it (upsampler at flat indices 3, 7, 11, i.e. `num_res_blocks` 2), so it cannot read another depth (our tiny
test files). Ours takes the depth from the config and is checked against diffusers' converter on a VAE with the
real depth (tests/unit/test_wan_files.py).
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError
from .wan_checks import SPIECE_KEY  # noqa: F401 - re-exported: the tensor's name belongs to this layout

# Residual block names: original (`residual.N`, `shortcut`) -> diffusers.
_RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_VAE_FIXED = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."),
              ("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
              ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
              ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
              ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
              ("decoder.middle.1.", "decoder.mid_block.attentions.0."))
_ORIG_BLOCK = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.*)$")
_DIFF_BLOCK = re.compile(r"^(encoder|decoder)\.(?:down_blocks\.(\d+)|mid_block\.resnets\.(\d+)|"
                         r"up_blocks\.(\d+)\.(?:resnets\.(\d+)|(upsamplers)\.0))\.(.*)$")


def _residual(rest: str, *, inverse: bool = False) -> str:
    for orig, ours in _RESIDUAL:
        a, b = (ours, orig) if inverse else (orig, ours)
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest  # resample.1.*, time_conv.* keep their names


def _vae_key(key: str, *, num_res_blocks: int) -> str:
    for orig, ours in _VAE_FIXED:
        if key.startswith(orig):
            return ours + key[len(orig):]
    m = _ORIG_BLOCK.match(key)
    if not m:
        return key
    side, kind, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if kind == "middle":  # 0 and 2 are residual blocks (1, the attention, is in _VAE_FIXED)
        return f"{side}.mid_block.resnets.{index // 2}.{_residual(rest)}"
    if kind == "downsamples":  # diffusers keeps the encoder's flat list (residual blocks and resamplers)
        return f"{side}.down_blocks.{index}.{_residual(rest)}"
    # The decoder's flat list: per level num_res_blocks + 1 residual blocks, then an upsampler (not after the last).
    level, j = divmod(index, num_res_blocks + 2)
    if j <= num_res_blocks:
        return f"{side}.up_blocks.{level}.resnets.{j}.{_residual(rest)}"
    return f"{side}.up_blocks.{level}.upsamplers.0.{rest}"


def _vae_key_inverse(key: str, *, num_res_blocks: int) -> str:
    for orig, ours in _VAE_FIXED:
        if key.startswith(ours):
            return orig + key[len(ours):]
    m = _DIFF_BLOCK.match(key)
    if not m:
        return key
    side, down, mid, up, resnet, upsampler, rest = m.groups()
    if down is not None:
        return f"{side}.downsamples.{down}.{_residual(rest, inverse=True)}"
    if mid is not None:
        return f"{side}.middle.{2 * int(mid)}.{_residual(rest, inverse=True)}"
    base = int(up) * (num_res_blocks + 2)
    if upsampler:
        return f"{side}.upsamples.{base + num_res_blocks + 1}.{rest}"
    return f"{side}.upsamples.{base + int(resnet)}.{_residual(rest, inverse=True)}"


def wan_vae_to_diffusers(sd: dict[str, torch.Tensor], *, num_res_blocks: int, path: str = "?") -> dict[str, torch.Tensor]:
    """An original-layout Wan VAE state dict (no prefix) -> AutoencoderKLWan's names."""
    out = {}
    for key, t in sd.items():
        name = _vae_key(key, num_res_blocks=num_res_blocks)
        if name in out:
            raise ModelError(f"{path!r} has two tensors for {name!r}; it is not a Wan 2.1 VAE of this depth")
        out[name] = t
    return out


def diffusers_to_wan_vae(sd: dict[str, torch.Tensor], *, num_res_blocks: int) -> dict[str, torch.Tensor]:
    """The inverse of `wan_vae_to_diffusers` (for writing files in the original layout, e.g. test fixtures)."""
    return {_vae_key_inverse(k, num_res_blocks=num_res_blocks): t for k, t in sd.items()}


def is_diffusers_transformer(names) -> bool:
    """A Wan transformer file already in diffusers' names (some repackaged files are)."""
    return "condition_embedder.time_proj.weight" in names


def wan_transformer_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout Wan transformer state dict (ComfyUI's prefix removed or not) -> diffusers' names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if is_diffusers_transformer(sd):
        return sd
    return convert_wan_transformer_to_diffusers(dict(sd))


# diffusers -> original, applied in order (the inverse of diffusers' rename table for the text-to-video model).
_TRANSFORMER_INVERSE = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the cross-attention norm: norm3 in the original blocks, norm2 in diffusers'
)


def diffusers_to_wan_transformer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `wan_transformer_to_diffusers` for the text-to-video model (for writing test fixtures)."""
    out = {}
    for key, t in sd.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("proj_out."):
            key = "head.head." + key[len("proj_out."):]
        elif key.endswith(".scale_shift_table"):
            key = key[: -len("scale_shift_table")] + "modulation"
        for ours, orig in _TRANSFORMER_INVERSE:
            key = key.replace(ours, orig)
        out[key] = t
    return out


def spiece_tokenizer(model_proto: bytes, *, max_length: int):
    """The transformers UMT5 tokenizer for a sentencepiece model (ComfyUI keeps it inside umt5_xxl files).
    Written to a temporary folder because transformers builds its fast tokenizer from a `spiece.model` file."""
    import json
    import tempfile
    from pathlib import Path

    import transformers

    with tempfile.TemporaryDirectory(prefix="distdiff-spiece-") as folder:
        Path(folder, "spiece.model").write_bytes(model_proto)
        # extra_ids 0: ComfyUI's tokenizer (the sentencepiece model alone) has no <extra_id_N> tokens either.
        Path(folder, "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "T5Tokenizer", "model_max_length": max_length, "extra_ids": 0}))
        return transformers.AutoTokenizer.from_pretrained(folder)
