"""Qwen-Image's single files as ComfyUI has them <-> the diffusers / transformers models QwenImagePipeline uses.

- The diffusion model (`qwen_image_fp8_e4m3fn.safetensors`, `qwen_image_bf16.safetensors`) already has
  diffusers' QwenImageTransformer2DModel names (diffusers' own single-file mapping for it is the identity), only
  optionally under ComfyUI's `model.diffusion_model.` prefix, which `detect` strips.
- The text encoder (`qwen_2.5_vl_7b[_fp8_scaled].safetensors`) is Qwen2.5-VL in the original checkpoint layout
  (`model.layers.*`, `visual.*`, as ComfyUI's `comfy/text_encoders/llama.py` `Qwen25_7BVLI` names it, and as
  transformers still saves it); transformers 5's Qwen2_5_VLForConditionalGeneration holds the language model
  under `model.language_model.` and the vision tower under `model.visual.`. ComfyUI's model has no `lm_head`, so
  files saved from ComfyUI lack it; the pipeline only reads hidden states (never the logits), see assemble.
- The VAE (`qwen_image_vae.safetensors`) is the Wan 2.1 VAE in its original layout: `wan_vae_layout`.

This module also has the few shapes that fix each architecture, checked on the host against the configs.
"""

from __future__ import annotations

from ..errors import ModelError
from .detect import FileInfo, count_blocks
from .wan_vae_layout import vae_shape_checks

# (original checkpoint prefix, transformers 5 prefix) of Qwen2_5_VLForConditionalGeneration's tensors.
_TEXT_ENCODER_PREFIXES = (("model.", "model.language_model."), ("visual.", "model.visual."), ("lm_head.", "lm_head."))
LM_HEAD = "lm_head.weight"


def text_encoder_to_transformers(sd: dict, *, path: str = "?") -> dict:
    """An original-layout Qwen2.5-VL state dict -> Qwen2_5_VLForConditionalGeneration's names. Consumes `sd`."""
    out = {}
    for name in list(sd):
        for orig, ours in _TEXT_ENCODER_PREFIXES:
            if name.startswith(orig):
                out[ours + name[len(orig):]] = sd.pop(name)
                break
    if sd:
        raise ModelError(f"{path!r} has tensors a Qwen2.5-VL text encoder does not have ({', '.join(sorted(sd)[:5])}"
                         f"{' …' if len(sd) > 5 else ''}); it is another model this pack cannot load")
    return out


def transformers_to_text_encoder(sd: dict) -> dict:
    """The inverse of `text_encoder_to_transformers` (for writing files in ComfyUI's layout, e.g. test fixtures)."""
    out = {}
    for name, t in sd.items():
        orig, ours = next((o, n) for o, n in _TEXT_ENCODER_PREFIXES if name.startswith(n))
        out[orig + name[len(ours):]] = t
    return out


def _text_config(config: dict) -> dict:
    # transformers 5 nests the language model's settings under "text_config"; the Hub's config.json has them flat.
    return config.get("text_config") or config


def qwen_shape_checks(infos: dict[str, FileInfo], components: dict) -> list[tuple[FileInfo, str, object, object]]:
    """(file, what, found in the file, what the config says) for each shape that fixes the architecture."""
    t, tcfg = infos["transformer"], components["transformer"]
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    e, ecfg = infos["text_encoder"], components["text_encoder"]
    text, vision = _text_config(ecfg), ecfg.get("vision_config") or {}
    patch = vision.get("patch_size", 14)
    return [
        (t, "img_in.weight shape", t.shapes.get("img_in.weight"), (inner, tcfg["in_channels"])),
        (t, "txt_in.weight shape", t.shapes.get("txt_in.weight"), (inner, tcfg["joint_attention_dim"])),
        (t, "number of transformer blocks", count_blocks(t.shapes, "transformer_blocks"), tcfg["num_layers"]),
        (e, "token embedding shape", e.shapes.get("model.embed_tokens.weight"),
         (text["vocab_size"], text["hidden_size"])),
        (e, "number of layers", count_blocks(e.shapes, "model.layers"), text["num_hidden_layers"]),
        (e, "vision tower's patch embedding shape", e.shapes.get("visual.patch_embed.proj.weight"),
         (vision.get("hidden_size"), vision.get("in_channels", 3), vision.get("temporal_patch_size", 2), patch, patch)),
        *vae_shape_checks(infos["vae"], components["vae"]),
    ]
