"""Tiny single-file models in the layouts ComfyUI users have, written from a tiny diffusers folder
(`pipelines.tiny.make_tiny`), so a file-loaded pipeline can be compared with the folder-loaded one.

Layouts as in the real files: the Flux transformer in BFL names (optionally under ComfyUI's
`model.diffusion_model.` prefix), clip_l under `text_model.`, t5xxl in transformers' names (one `shared.weight`),
ae.safetensors in the LDM VAE layout; Qwen-Image's transformer in diffusers' names (optionally under the prefix),
qwen_2.5_vl in the original Qwen2.5-VL layout without lm_head (as ComfyUI saves it); Wan's transformer in its
original layout (`wan_layout`), umt5_xxl with its `spiece_model` tokenizer inside; Qwen-Image's and Wan's VAE in
the original Wan layout (`wan_vae_layout`). Storage variants: fp32, fp16, fp8 (float8_e4m3fn linear weights) and
scaled_fp8 (ComfyUI's: fp8 weight / scale, a float32 `scale_weight` per layer and a `scaled_fp8` marker key).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value


class Storage(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    FP8 = "fp8"
    SCALED_FP8 = "scaled_fp8"

    def __str__(self) -> str:
        return self.value


def quantise(t: torch.Tensor, *, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 tensor, float32 scale or None). Scaled: the tensor's absolute maximum maps to FP8_MAX."""
    t = t.float()
    if not scaled:
        return t.to(torch.float8_e4m3fn), None
    scale = (t.abs().max() / FP8_MAX).clamp(min=1e-12).reshape(())
    return (t / scale).to(torch.float8_e4m3fn), scale


# Token embeddings keep their dtype in the real fp8 files (T5's, Qwen2.5-VL's).
_EMBEDDINGS = ("shared.weight", "model.embed_tokens.weight")


def _fp8_candidate(name: str, t: torch.Tensor) -> bool:
    # Like the real fp8 files: the matrices of linear layers; biases, norms and token embeddings keep their dtype.
    return name.endswith(".weight") and t.ndim == 2 and name not in _EMBEDDINGS


def _store(sd: dict[str, torch.Tensor], storage: Storage, *, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if storage in (Storage.FP8, Storage.SCALED_FP8) and _fp8_candidate(name, t):
            q, scale = quantise(t, scaled=storage is Storage.SCALED_FP8)
            out[prefix + name] = q
            if scale is not None:
                out[prefix + name[: -len("weight")] + "scale_weight"] = scale
                out[prefix + name[: -len("weight")] + "scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[prefix + name] = t.to(torch.float16 if storage is Storage.FP16 else torch.float32).contiguous()
    if storage is Storage.SCALED_FP8:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _component(tiny_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = sorted((tiny_dir / name).glob("*.safetensors"))
    return load_file(path)


def write_flux_files(tiny_dir: str | Path, out_dir: str | Path, *, storage: Storage | str = Storage.FP32,
                     comfy_prefix: bool = False) -> dict[str, str]:
    """Write flux1 (transformer), clip_l, t5xxl and ae files of the tiny Flux folder; return {part: path}.
    fp8 storages apply to the transformer and T5 (as the real fp8 files); CLIP and the VAE use fp16 for the
    fp16 storage and fp32 otherwise."""
    from .flux_layout import diffusers_to_flux, vae_to_ldm

    storage = Storage(str(storage))
    tiny_dir, out = Path(tiny_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = Storage.FP16 if storage is Storage.FP16 else Storage.FP32
    vae_levels = len(json.loads((tiny_dir / "vae" / "config.json").read_text())["block_out_channels"])
    tag = f"{storage.value}{'_comfy' if comfy_prefix else ''}"
    tensors = {
        "transformer": _store(diffusers_to_flux(_component(tiny_dir, "transformer")), storage,
                              prefix="model.diffusion_model." if comfy_prefix else ""),
        "text_encoder": _store(_component(tiny_dir, "text_encoder"), plain, prefix="text_model."),
        "text_encoder_2": _store(_component(tiny_dir, "text_encoder_2"), storage),
        "vae": _store(vae_to_ldm(_component(tiny_dir, "vae"), num_levels=vae_levels), plain),
    }
    names = {"transformer": f"flux1-tiny-{tag}.safetensors", "text_encoder": f"clip_l-tiny-{plain.value}.safetensors",
             "text_encoder_2": f"t5xxl-tiny-{storage.value}.safetensors", "vae": f"ae-tiny-{plain.value}.safetensors"}
    return _save(tensors, names, out)


def _wan_vae(tiny_dir: Path, storage: Storage) -> dict[str, torch.Tensor]:
    """The tiny folder's VAE in the original Wan 2.1 layout (qwen_image_vae / wan_2.1_vae files)."""
    from .wan_vae_layout import diffusers_to_wan_vae

    config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    return _store(diffusers_to_wan_vae(_component(tiny_dir, "vae"), config=config), storage)


def _save(tensors: dict[str, dict[str, torch.Tensor]], names: dict[str, str], out: Path) -> dict[str, str]:
    """Write each part's tensors to out/names[part]; return {part: path}."""
    from safetensors.torch import save_file

    paths = {}
    for part, sd in tensors.items():
        paths[part] = str(out / names[part])
        save_file(sd, paths[part])
    return paths


def write_qwenimage_files(tiny_dir: str | Path, out_dir: str | Path, *, storage: Storage | str = Storage.FP32,
                          comfy_prefix: bool = False) -> dict[str, str]:
    """Write qwen_image (transformer), qwen_2.5_vl (text encoder) and qwen_image_vae files of the tiny Qwen-Image
    folder; return {part: path}. fp8 storages apply to the transformer and the text encoder (as ComfyUI's
    qwen_image_fp8_e4m3fn and qwen_2.5_vl_7b_fp8_scaled); the VAE uses fp16 for the fp16 storage, fp32 otherwise."""
    from .qwen_layout import LM_HEAD

    storage = Storage(str(storage))
    tiny_dir, out = Path(tiny_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = Storage.FP16 if storage is Storage.FP16 else Storage.FP32
    # transformers saves Qwen2.5-VL in the original layout already (model.*, visual.*, lm_head).
    text_encoder = {k: t for k, t in _component(tiny_dir, "text_encoder").items() if k != LM_HEAD}
    tag = f"{storage.value}{'_comfy' if comfy_prefix else ''}"
    tensors = {
        "transformer": _store(_component(tiny_dir, "transformer"), storage,
                              prefix="model.diffusion_model." if comfy_prefix else ""),
        "text_encoder": _store(text_encoder, storage),
        "vae": _wan_vae(tiny_dir, plain),
    }
    names = {"transformer": f"qwen_image-tiny-{tag}.safetensors",
             "text_encoder": f"qwen_2.5_vl-tiny-{storage.value}.safetensors",
             "vae": f"qwen_image_vae-tiny-{plain.value}.safetensors"}
    return _save(tensors, names, out)


def spiece_model_of(tokenizer_dir: str | Path) -> bytes:
    """A sentencepiece model (serialised proto) with the pieces and scores of a Unigram tokenizer.json (the tiny
    folders' T5 / UMT5 tokenizer): what ComfyUI's umt5_xxl files carry as their `spiece_model` tensor.
    Needs sentencepiece's protobuf module (test fixtures only)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    special = {t["content"] for t in spec.get("added_tokens", [])}
    unk = spec["model"].get("unk_id")
    proto = pb.ModelProto()
    for index, (piece, score) in enumerate(spec["model"]["vocab"]):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = (pb.ModelProto.SentencePiece.UNKNOWN if index == unk else
                      pb.ModelProto.SentencePiece.CONTROL if piece in special else pb.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.bos_id = 0, 1, -1
    proto.trainer_spec.unk_id = unk
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def write_wan_files(tiny_dir: str | Path, out_dir: str | Path, *, storage: Storage | str = Storage.FP32,
                    comfy_prefix: bool = False, spiece: bool = True) -> dict[str, str]:
    """Write wan2.1 (transformer; and transformer_2 for a two-expert folder), umt5_xxl and wan_2.1_vae files of a
    tiny Wan folder in the original layouts; return {part: path}. The umt5 file carries the folder's tokenizer as
    ComfyUI's do (`spiece_model`, unless `spiece` is False). fp8 storages apply to the transformers and UMT5."""
    from .wan_layout import SPIECE_KEY, diffusers_to_wan_transformer

    storage = Storage(str(storage))
    tiny_dir, out = Path(tiny_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = Storage.FP16 if storage is Storage.FP16 else Storage.FP32
    tag = f"{storage.value}{'_comfy' if comfy_prefix else ''}"
    prefix = "model.diffusion_model." if comfy_prefix else ""
    umt5 = _component(tiny_dir, "text_encoder")
    umt5.pop("encoder.embed_tokens.weight", None)  # the real files keep the tied embedding once (shared.weight)
    umt5 = _store(umt5, storage)
    if spiece:
        umt5[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_model_of(tiny_dir / "tokenizer")), dtype=torch.uint8)
    tensors = {
        "transformer": _store(diffusers_to_wan_transformer(_component(tiny_dir, "transformer")), storage, prefix=prefix),
        "text_encoder": umt5,
        "vae": _wan_vae(tiny_dir, plain),
    }
    names = {"transformer": f"wan2.1-tiny-{tag}.safetensors", "text_encoder": f"umt5-tiny-{storage.value}.safetensors",
             "vae": f"wan_2.1_vae-tiny-{plain.value}.safetensors"}
    if (tiny_dir / "transformer_2").is_dir():  # Wan 2.2 A14B: high-noise and low-noise experts
        tensors["transformer_2"] = _store(diffusers_to_wan_transformer(_component(tiny_dir, "transformer_2")),
                                          storage, prefix=prefix)
        names["transformer"] = f"wan2.2-tiny-high-noise-{tag}.safetensors"
        names["transformer_2"] = f"wan2.2-tiny-low-noise-{tag}.safetensors"
    return _save(tensors, names, out)
