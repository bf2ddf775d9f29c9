"""Flux's original (Black Forest Labs) transformer layout <-> diffusers' FluxTransformer2DModel names, and the
LDM VAE layout of `ae.safetensors` <-> diffusers' AutoencoderKL names. One table, used in both directions.

Why our own transformer converter: diffusers' `convert_flux_transformer_checkpoint_to_diffusers` has the width
of FLUX.1 written into it (`inner_dim = 3072`), so it cannot read any other width (our tiny test files). Ours
takes the width from the file and is checked against diffusers' converter on a checkpoint with FLUX.1's real
row counts (tests/unit/test_single_file.py). The VAE goes through diffusers' own `convert_ldm_vae_checkpoint`,
which reads its sizes from the config; `vae_to_ldm` is only its inverse, for writing test fixtures.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError

_EMBEDDERS = (
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
)
_GUIDANCE = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
# Linear layers (weight and bias) of one double block / one single block.
_DOUBLE_LINEAR = (
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
)
_DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
_SINGLE_LINEAR = (("modulation.lin", "norm.linear"), ("linear2", "proj_out"))
_SINGLE_NORMS = (("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"))
_FINAL_NORM = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) in BFL, (scale, shift) here


def block_count(names, pattern: str) -> int:
    """Number of blocks `pattern.N.` in `names` (highest index + 1; 0 when none)."""
    rx = re.compile(re.escape(pattern) + r"\.(\d+)\.")
    found = [int(m.group(1)) for n in names if (m := rx.match(n))]
    return max(found) + 1 if found else 0


def _pairs(num_double: int, num_single: int, guidance: bool) -> list[tuple[str, str]]:
    """(BFL name, diffusers name) of every tensor that maps one to one."""
    pairs = []
    for bfl, ours in (*_EMBEDDERS, *(_GUIDANCE if guidance else ())):
        pairs += [(f"{bfl}.weight", f"{ours}.weight"), (f"{bfl}.bias", f"{ours}.bias")]
    for i in range(num_double):
        for bfl, ours in _DOUBLE_LINEAR:
            for p in ("weight", "bias"):
                pairs.append((f"double_blocks.{i}.{bfl}.{p}", f"transformer_blocks.{i}.{ours}.{p}"))
        pairs += [(f"double_blocks.{i}.{bfl}", f"transformer_blocks.{i}.{ours}") for bfl, ours in _DOUBLE_NORMS]
    for i in range(num_single):
        for bfl, ours in _SINGLE_LINEAR:
            for p in ("weight", "bias"):
                pairs.append((f"single_blocks.{i}.{bfl}.{p}", f"single_transformer_blocks.{i}.{ours}.{p}"))
        pairs += [(f"single_blocks.{i}.{bfl}", f"single_transformer_blocks.{i}.{ours}") for bfl, ours in _SINGLE_NORMS]
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_to_diffusers(sd: dict[str, torch.Tensor], *, path: str = "?") -> dict[str, torch.Tensor]:
    """A BFL-layout Flux transformer state dict (no prefix) -> FluxTransformer2DModel's names. Consumes `sd`."""
    num_double, num_single = block_count(sd, "double_blocks"), block_count(sd, "single_blocks")
    guidance = "guidance_in.in_layer.weight" in sd
    inner = sd["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    try:
        for bfl, ours in _pairs(num_double, num_single, guidance):
            out[ours] = sd.pop(bfl)
        for i in range(num_double):
            for p in ("weight", "bias"):
                for stream, names in (("img", ("to_q", "to_k", "to_v")),
                                      ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                    for name, part in zip(names, sd.pop(f"double_blocks.{i}.{stream}_attn.qkv.{p}").chunk(3, dim=0)):
                        out[f"transformer_blocks.{i}.attn.{name}.{p}"] = part
        for i in range(num_single):
            for p in ("weight", "bias"):
                fused = sd.pop(f"single_blocks.{i}.linear1.{p}")
                parts = fused.split((inner, inner, inner, fused.shape[0] - 3 * inner), dim=0)
                for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                    out[f"single_transformer_blocks.{i}.{name}.{p}"] = part
        for p in ("weight", "bias"):
            out[f"{_FINAL_NORM[1]}.{p}"] = _swap_halves(sd.pop(f"{_FINAL_NORM[0]}.{p}"))
    except KeyError as exc:
        raise ModelError(f"{path!r} is not a whole Flux transformer: tensor {exc.args[0]!r} is missing; "
                         "the file is damaged or of another model, download it again") from None
    if sd:
        raise ModelError(f"{path!r} has tensors a Flux transformer does not have ({', '.join(sorted(sd)[:5])}"
                         f"{' …' if len(sd) > 5 else ''}); it is a variant this pack cannot load")
    return out


def diffusers_to_flux(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `flux_to_diffusers` (for writing files in the original layout, e.g. test fixtures)."""
    sd = dict(sd)
    num_double, num_single = block_count(sd, "transformer_blocks"), block_count(sd, "single_transformer_blocks")
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    out = {bfl: sd.pop(ours) for bfl, ours in _pairs(num_double, num_single, guidance)}
    for i in range(num_double):
        for p in ("weight", "bias"):
            for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                out[f"double_blocks.{i}.{stream}_attn.qkv.{p}"] = torch.cat(
                    [sd.pop(f"transformer_blocks.{i}.attn.{n}.{p}") for n in names], dim=0)
    for i in range(num_single):
        for p in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(
                [sd.pop(f"single_transformer_blocks.{i}.{n}.{p}") for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                               "proj_mlp")], dim=0)
    for p in ("weight", "bias"):
        out[f"{_FINAL_NORM[0]}.{p}"] = _swap_halves(sd.pop(f"{_FINAL_NORM[1]}.{p}"))
    assert not sd, f"unmapped diffusers Flux tensors: {sorted(sd)}"
    return out


# -- VAE ------------------------------------------------------------------------------------------------------
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_ldm(sd: dict[str, torch.Tensor], *, num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the LDM layout of `ae.safetensors` (attention as 1x1 convolutions).
    The inverse of diffusers' `convert_ldm_vae_checkpoint`; used to write test fixtures."""
    out = {}
    for name, t in sd.items():
        new = name
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for ours, ldm in _VAE_ATTN:
                new = new.replace(f".attn_1.{ours}.", f".attn_1.{ldm}.")
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[new] = t
    return out
