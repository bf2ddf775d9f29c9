"""Tiny LoRA files for the tiny pipelines, made offline from the shapes in the transformer's safetensors header.

Two layouts that diffusers reads (and converts itself):
- `make_peft_lora`: diffusers/PEFT keys, `transformer.<module>.lora_A.weight` / `.lora_B.weight` (any family);
- `make_kohya_flux_lora`: kohya/sd-scripts keys for Flux, `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (diffusers' `_convert_kohya_flux_lora_to_diffusers` splits the fused qkv).

Weights are drawn from a seeded CPU generator and large enough to change the image visibly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

# Linear layers (by name suffix) a PEFT LoRA covers in each family: attention projections plus the output
# projection, which the context-parallel plan gathers (Flux/Qwen/Wan `proj_out`), so a wrongly placed hook shows.
PEFT_TARGETS = {
    "flux": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "proj_mlp", "proj_out"),
    "qwenimage": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "img_mlp.net.2",
                  "proj_out"),
    "wan": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ffn.net.2", "proj_out"),
}


def transformer_shapes(model_dir: str | Path, component: str = "transformer") -> dict[str, list[int]]:
    """Tensor name -> shape of a component's weights, read from the safetensors header (no weights loaded)."""
    shapes = {}
    for path in sorted((Path(model_dir) / component).glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _save(tensors: dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out


def make_peft_lora(model_dir: str | Path, family: str, out: str | Path, *, seed: int, rank: int = 4,
                   scale: float = 0.3) -> Path:
    """A diffusers/PEFT-format LoRA over PEFT_TARGETS[family] of the tiny transformer in `model_dir`."""
    shapes = transformer_shapes(model_dir)
    gen = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        if not any(module == t or module.endswith("." + t) for t in PEFT_TARGETS[family]):
            continue
        out_features, in_features = shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * scale
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * scale
    assert tensors, f"no target layer of {PEFT_TARGETS[family]} in {model_dir}"
    return _save(tensors, Path(out))


def make_kohya_flux_lora(model_dir: str | Path, out: str | Path, *, seed: int, rank: int = 4,
                         scale: float = 0.3, alpha: float = 2.0, text_encoder: bool = False) -> Path:
    """A kohya-format Flux LoRA on double block 0 (fused img qkv, img proj) and single block 0 (linear2); with
    `text_encoder`, also on the CLIP text encoder's first attention (`lora_te1_...`), which diffusers loads into
    the pipeline's text_encoder."""
    shapes = transformer_shapes(model_dir)
    gen = torch.Generator("cpu").manual_seed(seed)
    dim = shapes["transformer_blocks.0.attn.to_q.weight"][0]
    single_in = shapes["single_transformer_blocks.0.proj_out.weight"][1]
    layers = {  # kohya name -> (out_features, in_features) of the original (BFL) layer
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * dim, dim),
        "lora_unet_double_blocks_0_img_attn_proj": (dim, dim),
        "lora_unet_single_blocks_0_linear2": (dim, single_in),
    }
    if text_encoder:
        clip = transformer_shapes(model_dir, "text_encoder")
        q_proj = next(v for k, v in clip.items() if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
        for proj in ("q_proj", "v_proj", "out_proj"):
            layers[f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"] = tuple(q_proj)
    tensors = {}
    for name, (out_features, in_features) in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * scale
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return _save(tensors, Path(out))


TINY_FLUX_LORAS = {"distdiff-tiny-flux-peft.safetensors": "peft", "distdiff-tiny-flux-kohya.safetensors": "kohya"}
"""The files example_workflows/build.py names (TINY_LORAS) for the tiny Flux pipeline, by layout."""


def write_tiny_flux_loras(model_dir: str | Path, folder: str | Path) -> dict[str, Path]:
    """The example workflows' LoRA files for the tiny Flux pipeline in `model_dir`, written into `folder`
    (a models/loras folder for a ComfyUI server); file name -> path."""
    folder = Path(folder)
    makers = {"peft": lambda out: make_peft_lora(model_dir, "flux", out, seed=1),
              "kohya": lambda out: make_kohya_flux_lora(model_dir, out, seed=2)}
    return {name: makers[layout](folder / name) for name, layout in TINY_FLUX_LORAS.items()}
