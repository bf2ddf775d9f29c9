"""Build a pipeline on a rank from single files (`files.read_files_config`'s info): each file is memory-mapped
(safetensors `safe_open`), its tensors renamed to the diffusers / transformers layout, fp8 weights dequantised,
and loaded into a model made on the meta device from the architecture config. Light parts (tokenizers,
scheduler) come from their folders. Nothing is downloaded.

fp8: a float8_e4m3fn / e5m2 tensor is upcast in float32, multiplied by its layer's `scale_weight` when the file
is ComfyUI's scaled fp8, then cast to the compute dtype (`dequantise`). With `weights: fp8` the transformer is
then stored in float8_e4m3fn and upcast per layer at each forward (diffusers' `enable_layerwise_casting`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ModelError
from .detect import SCALED_FP8_KEY, FileKind

log = logging.getLogger(__name__)

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Tensors some real files carry that the transformers model has no place for (CLIP-L's projection head).
# ComfyUI's umt5_xxl files also carry their tokenizer (a sentencepiece model as a uint8 tensor).
_IGNORED = {FileKind.CLIP_TEXT: ("text_projection.weight", "logit_scale", "embeddings.position_ids"),
            FileKind.UMT5_ENCODER: ("spiece_model",)}


# Layers that keep the compute dtype under `weights: fp8`: the small input embedders and the output layers, as
# diffusers' defaults intend. Not "norm": `model.enable_layerwise_casting` adds Flux's own skip pattern "norm",
# which also keeps the AdaLN modulation linears (norm1.linear, ~1/3 of FLUX.1's weights) in bf16: 0.64 of the
# memory instead of 0.50 (FLUX.1-dev on the meta device: 22.2 GiB bf16, 14.1 vs 11.1 GiB). ComfyUI's fp8 files
# hold those layers in fp8 too. Qwen-Image's input layers are img_in / txt_in (and txt_norm); Wan's are its
# embedders (diffusers' own Wan skip list: patch_embedding, condition_embedder).
FP8_SKIP_PATTERN = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "^proj_out$",
                    "^img_in$", "^txt_in$", "^txt_norm$", "patch_embedding", "condition_embedder")


def enable_fp8_storage(model: torch.nn.Module, *, compute_dtype: torch.dtype) -> None:
    """Store the transformer's Linear / Conv weights in float8_e4m3fn, upcast per layer at each forward."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=FP8_SKIP_PATTERN)


def dequantise(state: dict[str, torch.Tensor], *, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """fp8 tensors -> `dtype` (times their layer's `scale_weight`, ComfyUI's scaled fp8); others cast to `dtype`.
    `scale_weight` / `scale_input` entries are consumed. The one definition of the numerics (tests use it too).

    Each tensor goes to `device` before it is converted: on a GPU the converted copy is made there, one tensor at a
    time, so host memory holds only the memory-mapped file pages, never a converted copy of the whole part. On the
    CPU a tensor already in `dtype` stays the memory-mapped one (no copy; ranks share its pages)."""
    out = {}
    for name, t in state.items():
        if name.endswith((".scale_weight", ".scale_input")):
            continue
        if t.dtype in _FP8:
            w = t.to(device).to(torch.float32)
            scale = state.get(name[: -len("weight")] + "scale_weight") if name.endswith(".weight") else None
            if scale is not None:
                w = w * scale.to(device=device, dtype=torch.float32)
            out[name] = w.to(dtype)
        else:
            out[name] = t.to(device=device, dtype=dtype)
    return out


def read_state(file: dict) -> dict[str, torch.Tensor]:
    """The part's tensors under its prefix (prefix removed, marker key dropped), memory-mapped from the file."""
    from safetensors import safe_open

    prefix = file["prefix"]
    out = {}
    with safe_open(file["path"], framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.startswith(prefix) and key[len(prefix):] != SCALED_FP8_KEY:
                out[key[len(prefix):]] = f.get_tensor(key)
    return out


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], *, path: str, allow_missing: Iterable[str] = ()):
    """Load `state` into the meta-device `model` (assign: no copy); every parameter must come from the file."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in set(allow_missing)]
    if missing or result.unexpected_keys:
        raise ModelError(f"{path!r} does not fit the architecture: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}; the file is of another model version or damaged")
    return model


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (position ids) real
        return factory()


def _check_no_meta(model: torch.nn.Module, path: str) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelError(f"{path!r} lacks tensors {left[:5]}; the file is of another model version or damaged")


def _model_class(info: dict, name: str):
    """The class model_index.json names for component `name` (diffusers or transformers)."""
    import importlib

    library, class_name = info["model_index"][name]
    return getattr(importlib.import_module(library), class_name)


def load_transformer(info: dict, *, dtype: torch.dtype, part: str = "transformer",
                     device: torch.device | str = "cpu") -> torch.nn.Module:
    """The diffusion model (`part`: transformer, or Wan 2.2's second expert transformer_2)."""
    from .flux_layout import flux_to_diffusers
    from .wan_layout import wan_transformer_to_diffusers

    file = info["files"][part]
    state = dequantise(read_state(file), dtype=dtype, device=device)
    if file["kind"] == FileKind.FLUX_TRANSFORMER_BFL.value:
        state = flux_to_diffusers(state, path=file["path"])
    elif file["kind"] == FileKind.WAN_TRANSFORMER.value:
        state = wan_transformer_to_diffusers(state)
    # QWENIMAGE_TRANSFORMER files have diffusers' names already (see qwen_layout).
    cls = _model_class(info, part)
    model = _empty(lambda: cls.from_config(info["components"][part]))
    _fill(model, state, path=file["path"])
    _check_no_meta(model, file["path"])
    model.to(device)  # the buffers made outside the file (the parameters are there already)
    model.eval().requires_grad_(False)  # built, not loaded by from_pretrained: train mode would keep dropout on
    if info["weights"] == "fp8":
        enable_fp8_storage(model, compute_dtype=dtype)
    return model


def load_vae(info: dict, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.nn.Module:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .wan_vae_layout import wan_vae_to_diffusers

    file = info["files"]["vae"]
    config = info["components"]["vae"]
    state = dequantise(read_state(file), dtype=dtype, device=device)
    if file["kind"] == FileKind.LDM_VAE.value:
        state = convert_ldm_vae_checkpoint(state, dict(config))
    elif file["kind"] == FileKind.WAN_VAE.value:
        state = wan_vae_to_diffusers(state, config=config, path=file["path"])
    cls = _model_class(info, "vae")
    model = _empty(lambda: cls.from_config(config))
    _fill(model, state, path=file["path"])
    _check_no_meta(model, file["path"])
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(info: dict, part: str, *, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> torch.nn.Module:
    file = info["files"][part]
    kind = FileKind(file["kind"])
    # CLIPTextModel, T5EncoderModel, UMT5EncoderModel, Qwen2_5_VLForConditionalGeneration: each with its config.
    cls = _model_class(info, part)
    config = cls.config_class(**info["components"][part])
    state = dequantise(read_state(file), dtype=dtype, device=device)
    for name in _IGNORED.get(kind, ()):
        state.pop(name, None)
    if kind is FileKind.QWEN25_VL:
        from .qwen_layout import LM_HEAD, text_encoder_to_transformers

        state = text_encoder_to_transformers(state, path=file["path"])
        if LM_HEAD not in state:
            # Files saved from ComfyUI have no lm_head (its model has none). QwenImagePipeline reads the hidden
            # states only, never the logits, so the head shares the token embedding instead of taking memory.
            state[LM_HEAD] = state["model.language_model.embed_tokens.weight"]
    model = _empty(lambda: cls(config))
    # T5 / UMT5 files keep the embedding once (shared.weight); the encoder's copy is tied to it below.
    _fill(model, state, path=file["path"], allow_missing=("encoder.embed_tokens.weight",))
    model.tie_weights()
    _check_no_meta(model, file["path"])
    model.to(device)  # the buffers made outside the file (position ids)
    if dtype == torch.float16:
        # As transformers' from_pretrained does: T5's feed-forward output ("wo") overflows in float16.
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, module in model.named_modules():
            if name.split(".")[-1] in keep:
                module.to(torch.float32)
    return model.eval().requires_grad_(False)


def load_tokenizers(info: dict) -> dict[str, Any]:
    import transformers

    out = {}
    for name, folder in info["tokenizers"].items():
        class_name = info["model_index"].get(name, (None, None))[1]
        if folder.endswith(".safetensors"):  # the text-encoder file carries its own tokenizer (ComfyUI's umt5_xxl)
            out[name] = _file_tokenizer(info, folder)
        elif class_name == "CLIPTokenizer":
            # ComfyUI's CLIP tokenizer says model_max_length 8192; the text encoder has 77 positions.
            limit = info["components"]["text_encoder"]["max_position_embeddings"]
            out[name] = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=limit)
        elif class_name == "Qwen2Tokenizer":  # as QwenImagePipeline.from_pretrained loads it
            out[name] = transformers.Qwen2Tokenizer.from_pretrained(folder)
        else:
            out[name] = transformers.AutoTokenizer.from_pretrained(folder)
    return out


def _file_tokenizer(info: dict, path: str):
    """The sentencepiece tokenizer inside a UMT5 text-encoder file (`spiece_model`, as ComfyUI reads it)."""
    from pathlib import Path

    from safetensors import safe_open

    from ..pipelines import _read_json
    from .wan_layout import SPIECE_KEY, spiece_tokenizer

    with safe_open(path, framework="pt", device="cpu") as f:
        proto = f.get_tensor(SPIECE_KEY).numpy().tobytes()
    # The text length the pipeline pads to: the configs' tokenizer says it where there is one (a diffusers folder
    # given as configs); else 512, WanPipeline's max_sequence_length.
    config = Path(info["configs_dir"]) / "tokenizer" / "tokenizer_config.json"
    limit = _read_json(config).get("model_max_length", 512) if config.is_file() else 512
    return spiece_tokenizer(proto, max_length=int(min(limit, 512)))


def load_files_component(info: dict, name: str, *, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> torch.nn.Module:
    """One heavy component built from its file, already on `device`."""
    log.info("loading %s from %s onto %s", name, info["files"][name]["path"], device)
    if name.startswith("transformer"):
        return load_transformer(info, dtype=dtype, part=name, device=device)
    if name == "vae":
        return load_vae(info, dtype=dtype, device=device)
    return load_text_encoder(info, name, dtype=dtype, device=device)


def files_pipeline(info: dict, *, built: dict[str, Any]):
    """The family's pipeline (model_index.json's class) around already built heavy components (`built`; the
    others None) and the light parts (tokenizers, scheduler) from their folders."""
    import diffusers

    index = info["model_index"]
    heavy = {name: built.get(name) for name in info["models"]}
    scheduler = _model_class(info, "scheduler").from_config(info["components"]["scheduler"])
    # The pipeline's own settings in model_index.json (Wan: boundary_ratio, expand_timesteps) and the components
    # it lists as absent (Wan 2.1: transformer_2 null).
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None and k not in heavy}
    pipeline = getattr(diffusers, index["_class_name"])
    return pipeline(scheduler=scheduler, **load_tokenizers(info), **heavy, **absent, **settings)


def load_files_pipeline(info: dict, *, components: Iterable[str], dtype: torch.dtype,
                        device: torch.device | str = "cpu"):
    """The family's pipeline with the heavy `components` built from their files (one after the other, each on
    `device` before the next file is read), the others None."""
    wanted = set(components)
    built = {name: load_files_component(info, name, dtype=dtype, device=device)
             for name in info["models"] if name in wanted}
    return files_pipeline(info, built=built)
