"""Wan 2.1 / 2.2's original transformer layout (the files ComfyUI's docs list: `wan2.1_t2v_*.safetensors`) <->
diffusers' WanTransformer3DModel names, and the UMT5 tokenizer ComfyUI's text-encoder files carry inside them
(`spiece_model`). The VAE (`wan_2.1_vae.safetensors`) is the one Qwen-Image has too: `wan_vae_layout`.

The transformer goes through diffusers' own `convert_wan_transformer_to_diffusers` (pure renaming, any size);
`diffusers_to_wan_transformer` is only its inverse, for writing test fixtures.
"""

from __future__ import annotations

import torch

from .wan_checks import SPIECE_KEY  # noqa: F401 - re-exported: the tensor's name belongs to this layout


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
