"""What a single .safetensors file is, from its header alone (key names, shapes, dtypes): which model part of
which family, in which layout, under which key prefix, and whether its weights are fp8 (plain or ComfyUI's
"scaled" fp8). Reads no weights, imports no torch."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..pipelines import check_safetensors

FIX_DAMAGED = "the file is damaged or was cut off; download it again"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALED_FP8_KEY = "scaled_fp8"  # ComfyUI's marker key (after the model prefix) for per-layer `scale_weight` files
COMFY_QUANT_SUFFIX = ".comfy_quant"  # newer ComfyUI's per-layer quantisation settings (weight_scale, block formats)


class FileKind(str, enum.Enum):
    """A (model part, layout) a file can hold. Serialises as its value."""

    FLUX_TRANSFORMER_BFL = "flux_transformer_bfl"
    FLUX_TRANSFORMER_DIFFUSERS = "flux_transformer_diffusers"
    QWENIMAGE_TRANSFORMER = "qwenimage_transformer"
    WAN_TRANSFORMER = "wan_transformer"
    LDM_VAE = "ldm_vae"
    DIFFUSERS_VAE = "diffusers_vae"
    WAN_VAE = "wan_vae"
    CLIP_TEXT = "clip_text"
    T5_ENCODER = "t5_encoder"
    UMT5_ENCODER = "umt5_encoder"
    QWEN25_VL = "qwen25_vl"

    def __str__(self) -> str:
        return self.value


# (kind, a key only that layout has (after the prefix), what to call it in messages); the first match wins, so
# more specific markers come first.
_MARKERS: tuple[tuple[FileKind, str, str], ...] = (
    (FileKind.FLUX_TRANSFORMER_BFL, "double_blocks.0.img_attn.qkv.weight",
     "a Flux transformer (original BFL layout, e.g. flux1-dev.safetensors)"),
    (FileKind.FLUX_TRANSFORMER_DIFFUSERS, "single_transformer_blocks.0.attn.to_q.weight",
     "a Flux transformer (diffusers layout)"),
    (FileKind.QWENIMAGE_TRANSFORMER, "txt_norm.weight",
     "a Qwen-Image transformer (e.g. qwen_image_fp8_e4m3fn.safetensors)"),
    (FileKind.WAN_TRANSFORMER, "patch_embedding.weight", "a Wan transformer"),
    (FileKind.LDM_VAE, "encoder.down.0.block.0.conv1.weight", "an image VAE (LDM layout, e.g. ae.safetensors)"),
    (FileKind.DIFFUSERS_VAE, "encoder.down_blocks.0.resnets.0.conv1.weight", "an image VAE (diffusers layout)"),
    (FileKind.WAN_VAE, "decoder.head.0.gamma", "a Wan / Qwen-Image video VAE"),
    (FileKind.CLIP_TEXT, "encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder"),
    (FileKind.T5_ENCODER, "encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder"),
    # The whole checkpoint (model.*, visual.*, lm_head) is the part, so the marker includes "model.".
    (FileKind.QWEN25_VL, "model.layers.0.mlp.gate_proj.weight",
     "a Qwen2.5-VL text encoder (e.g. qwen_2.5_vl_7b.safetensors)"),
)
DESCRIPTIONS = {kind: what for kind, _, what in _MARKERS}
DESCRIPTIONS[FileKind.UMT5_ENCODER] = "a UMT5 text encoder (umt5_xxl, Wan)"


@dataclass(frozen=True, kw_only=True)
class FileInfo:
    """One file's header, understood."""

    path: str
    kind: FileKind
    prefix: str
    """Prefix of every key of the part (e.g. ComfyUI's "model.diffusion_model."), "" when none."""
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    """Tensor name (prefix removed) -> shape, for the tensors under the prefix."""
    dtypes: dict[str, int]
    """safetensors dtype name -> number of tensors of that dtype."""
    scaled_fp8: bool
    """ComfyUI's scaled fp8: a `scaled_fp8` marker and a `scale_weight` per fp8 layer."""

    @property
    def fp8(self) -> bool:
        return any(d in self.dtypes for d in FP8_DTYPES)

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.kind]

    def to_message(self) -> dict:
        return {"path": self.path, "kind": self.kind.value, "prefix": self.prefix, "fp8": self.fp8,
                "scaled_fp8": self.scaled_fp8}


def inspect_file(path: str | Path, *, role: str) -> FileInfo:
    """Read `path`'s header and tell what it holds. `role` names the input in messages (e.g. "vae").
    ModelError naming the file for a missing, truncated or corrupt file, or one this pack does not know."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{role} file {str(path)!r} does not exist; pick a file from the model folders "
                         "(or give an existing path)")
    if path.suffix != ".safetensors":
        raise ModelError(f"{role} file {str(path)!r} is not a .safetensors file; this loader reads safetensors "
                         "files only (convert .ckpt/.pt/.gguf files, or use the matching loader)")
    header = check_safetensors(path, fix=FIX_DAMAGED)
    names = [k for k in header if k != "__metadata__"]
    for kind, marker, _ in _MARKERS:
        prefix = _prefix_of(names, marker)
        if prefix is None:
            continue
        shapes = {k[len(prefix):]: tuple(header[k]["shape"]) for k in names if k.startswith(prefix)}
        if kind is FileKind.T5_ENCODER and _is_umt5(shapes):
            kind = FileKind.UMT5_ENCODER
        dtypes: dict[str, int] = {}
        for k in names:
            dtypes[header[k]["dtype"]] = dtypes.get(header[k]["dtype"], 0) + 1
        if any(k.endswith(COMFY_QUANT_SUFFIX) for k in shapes):
            raise ModelError(f"{role} file {str(path)!r} is {DESCRIPTIONS[kind]} in ComfyUI's mixed-precision "
                             "quantised format (per-layer 'comfy_quant' settings), which this pack does not read; pick "
                             "the bf16 / fp16, fp8_e4m3fn or fp8 scaled file of the model")
        scaled = SCALED_FP8_KEY in shapes
        if scaled:
            del shapes[SCALED_FP8_KEY]
        return FileInfo(path=str(path), kind=kind, prefix=prefix, shapes=shapes, dtypes=dtypes, scaled_fp8=scaled)
    sample = ", ".join(names[:4]) or "no tensors"
    raise ModelError(f"{role} file {str(path)!r} is not a model part this pack knows (first keys: {sample}); "
                     "pick a diffusion model, text encoder or VAE file of a supported family")


def _prefix_of(names: list[str], marker: str) -> str | None:
    for name in names:
        if name.endswith(marker):
            prefix = name[: -len(marker)]
            if prefix == "" or prefix.endswith("."):
                return prefix
    return None


def _is_umt5(shapes: dict[str, tuple[int, ...]]) -> bool:
    # UMT5 has a relative attention bias in every block, T5 only in the first.
    return "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes


def count_blocks(shapes: dict, pattern: str) -> int:
    rx = re.compile(re.escape(pattern) + r"\.(\d+)\.")
    found = [int(m.group(1)) for n in shapes if (m := rx.match(n))]
    return max(found) + 1 if found else 0
