"""What the planner knows about a model, read from its configs only (no weight is read, none need exist).

`facts_from_configs` builds `ModelFacts` from a pipeline's model_index.json, its components' config.json and
their byte sizes; `read_model_facts` does that for a diffusers folder, sizing each component on the meta device
(`meta_sizes`). Another source of configs (single files, say) plugs in by calling `facts_from_configs` with
its own configs and sizes.

The transformer's FLOPs per pass come from its block shapes, counted the way `bench/gpu_model.py` counts them with
hooks (FLUX.1-dev at 1024²: 59.5 TFLOP linear + 14.9 TFLOP attention; `facts.shape.flops` gives the same).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..pipelines import Family, adapter_for, family_of

VARIABLE_TEXT_TOKENS = 128
"""Text tokens assumed for the cost of a family whose text length follows the prompt (Qwen-Image: the prompt's own
tokens, up to 512): about a 100-word prompt. Only the cost uses it; divisibility is never assumed."""

_TEXT_TOKENS = {Family.FLUX: (512, "tokenizer_2"), Family.WAN: (512, "tokenizer"), Family.QWENIMAGE: (None, "")}
"""Text tokens per pass and the tokenizer that may cap them: FluxPipeline and WanPipeline pad to
max_sequence_length 512, or less when the tokenizer's model_max_length is smaller (the adapters' `text_length_cap`);
Qwen-Image does not pad."""

_STAGES = {"encode": "text_components", "denoise": "denoise_components", "decode": "decode_components"}


@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """The dimensions of the denoising transformer that set its cost."""

    kind: str
    """"mmdit" (joint attention over image + text: Flux, Qwen-Image) or "dit_cross" (self-attention over video
    tokens, cross-attention to the text: Wan)."""
    layers: int
    """Attention layers per pass (Flux: double + single blocks)."""
    heads: int
    head_dim: int
    mlp_hidden: int
    """Width of the MLP's hidden layer."""

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def flops(self, *, image_tokens: int, text_tokens: int) -> tuple[float, float]:
        """(linear, attention) FLOPs of one pass at batch 1, 2 FLOPs per multiply-add."""
        d, L = self.hidden, self.layers
        if self.kind == "mmdit":
            # Every block (double: image and text streams; single: fused) costs 3d² (QKV) + d² (out) + 2·d·mlp per
            # token; joint attention over S = image + text tokens: Q·Kᵀ and P·V.
            s = image_tokens + text_tokens
            linear = 2 * L * s * (4 * d * d + 2 * d * self.mlp_hidden)
            attention = 4 * L * s * s * d
        else:
            # Self-attention QKVO 4d² + cross-attention Q, O 2d² + FFN 2·d·ffn per video token; cross K, V 2d² per
            # text token; self-attention over the video tokens, cross-attention to the text.
            linear = 2 * L * (image_tokens * (6 * d * d + 2 * d * self.mlp_hidden) + text_tokens * 2 * d * d)
            attention = 4 * L * image_tokens * (image_tokens + text_tokens) * d
        return float(linear), float(attention)


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """A pipeline as the planner sees it."""

    name: str
    """The folder's name, for messages."""
    family: Family
    class_name: str
    weights: Mapping[str, int]
    """Bytes per weighted component in bf16 (as `from_pretrained(dtype=bfloat16)` holds it)."""
    fp8_weights: Mapping[str, int]
    """Bytes of each denoise component with fp8 storage (diffusers' layerwise casting: Linear/Conv/Embedding
    weights in float8 except the model's skip patterns); other components are not cast."""
    stage_of: Mapping[str, str]
    """Weighted component -> "encode" | "denoise" | "decode"."""
    shape: TransformerShape
    text_tokens: int | None
    """Text tokens per pass; None when the prompt decides (see VARIABLE_TEXT_TOKENS)."""
    text_is_split: bool
    """Whether context parallelism splits the text tokens too (joint attention) or only the image/video tokens."""
    guidance_distilled: bool
    """Flux: guidance is an embedding of a distilled model; the engine never runs true CFG for it."""
    cfg_needs_negative: bool
    """Qwen-Image runs true CFG only when a negative prompt is given; Wan whenever guidance > 1."""
    cp_supported: bool
    """The transformer class has a diffusers context-parallel plan."""
    vae_scale: int
    vae_temporal: int
    """Frames per latent frame (video; 1 for images)."""
    patch: tuple[int, int, int]
    """(frames, height, width) latent cells per token."""
    vae_channels: int
    """The VAE decoder's channels at full resolution (its activation memory scales with them)."""
    configs: Mapping[str, Mapping[str, Any]]
    """Each component's json config (the adapters' size checks read them)."""

    @property
    def is_video(self) -> bool:
        return self.family is Family.WAN

    def tokens(self, *, height: int, width: int, frames: int = 1) -> int:
        """Image (video) tokens of one pass at this size."""
        pf, ph, pw = self.patch
        latent_frames = (frames - 1) // self.vae_temporal + 1 if self.is_video else 1
        return (latent_frames // pf) * (height // self.vae_scale // ph) * (width // self.vae_scale // pw)

    def true_cfg(self, *, guidance: float, negative_prompt: str | None, true_cfg_scale: float = 1.0) -> bool:
        """Whether this call runs two transformer passes per step (the engine's adapters' `cfg_off_reason` rule):
        Flux when true_cfg_scale > 1 with a negative prompt (its `guidance` is distilled, one pass); Qwen-Image
        when guidance > 1 with a negative prompt; Wan when guidance > 1."""
        if self.guidance_distilled:
            return true_cfg_scale > 1.0 and negative_prompt is not None
        if self.cfg_needs_negative and negative_prompt is None:
            return False
        return guidance > 1.0

    def check_true_cfg(self, true_cfg_scale: float) -> None:
        """true_cfg_scale is Flux's; the engine refuses it for the other families (session.check_guidance)."""
        if true_cfg_scale != 1.0 and not self.guidance_distilled:
            raise ConfigError(f"true_cfg {true_cfg_scale:g} is Flux's true CFG scale; {self.name} "
                              f"({self.family.value}) takes its CFG scale from guidance: leave true_cfg at 1")

    @property
    def prediction_values_per_token(self) -> int:
        """Values of the noise prediction per image token (what a CFG-parallel pair exchanges each step): the
        latent's channels × the patch cells of a token (Flux and Qwen-Image take packed 2×2 × 16 = 64 channels as
        their in_channels; Wan takes 16 and patches 1×2×2 itself)."""
        channels = int(self.configs.get("transformer", {}).get("in_channels", 64))
        pf, ph, pw = self.patch
        return channels * pf * ph * pw if self.is_video else channels

    def check_size(self, *, height: int, width: int, frames: int) -> None:
        """The family adapter's own size rule (ConfigError naming the nearest valid value)."""
        adapter_for(self.family).check_size({"components": dict(self.configs), "model_dir": self.name},
                                            height=height, width=width, num_frames=frames)


def read_model_facts(model_dir: str | Path) -> ModelFacts:
    """`ModelFacts` of a diffusers folder from its json files; weights are sized on meta-device models, so a
    folder of configs only (no safetensors) plans the same as the downloaded model."""
    import torch

    from .meta_sizes import build_meta_models, module_bytes

    root = Path(model_dir).expanduser()
    index = _json(root / "model_index.json")
    configs = {name: _json(root / name / "config.json") for name, spec in index.items()
               if _is_component(name, spec) and (root / name / "config.json").is_file()}
    tokenizers = {name: _json(root / name / "tokenizer_config.json") for name, spec in index.items()
                  if _is_component(name, spec) and (root / name / "tokenizer_config.json").is_file()}
    models = build_meta_models(root, dtype=torch.bfloat16)
    sizes = {name: module_bytes(m) for name, m in models.items()}
    fp8 = {name: fp8_bytes(m) for name, m in models.items()}
    return facts_from_configs(name=root.name, model_index=index, configs=configs, sizes=sizes, fp8_sizes=fp8,
                              tokenizer_configs=tokenizers)


def facts_from_configs(*, name: str, model_index: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]],
                       sizes: Mapping[str, int], fp8_sizes: Mapping[str, int],
                       tokenizer_configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFacts:
    """`ModelFacts` from a pipeline's model_index.json, its components' configs, their bf16 / fp8 byte sizes and,
    when known, its tokenizers' tokenizer_config.json (a model_max_length below the pipeline's default caps the
    text, as in the tiny test pipelines)."""
    from ..strategies.context_parallel import CP_MODEL_CLASSES

    class_name = model_index.get("_class_name")
    family = family_of(str(class_name))
    adapter = adapter_for(family)
    stage_of = {c: stage for stage, attr in _STAGES.items() for c in getattr(adapter, attr) if c in sizes}
    for extra in sizes:  # Wan 2.2 A14B's transformer_2 runs in the denoise stage with the first one
        stage_of.setdefault(extra, "denoise" if extra.startswith("transformer") else "encode")
    denoise = [c for c, s in stage_of.items() if s == "denoise"]
    if "transformer" not in configs:
        raise ModelError(f"{name!r} has no transformer/config.json; the planner needs the transformer's shape")
    t = configs["transformer"]
    transformer_class = model_index.get("transformer", [None, None])[1]
    vae = configs.get("vae", {})
    if family is Family.WAN:
        shape = TransformerShape(kind="dit_cross", layers=int(t["num_layers"]), heads=int(t["num_attention_heads"]),
                                 head_dim=int(t["attention_head_dim"]), mlp_hidden=int(t["ffn_dim"]))
        patch = tuple(int(p) for p in t.get("patch_size", (1, 2, 2)))
    else:
        layers = int(t["num_layers"]) + int(t.get("num_single_layers", 0))
        heads, head_dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
        shape = TransformerShape(kind="mmdit", layers=layers, heads=heads, head_dim=head_dim,
                                 mlp_hidden=4 * heads * head_dim)
        patch = (1, 2, 2)  # 2×2 latent packing
    scale, temporal, channels = vae_geometry(family, vae)
    text_tokens, tokenizer = _TEXT_TOKENS[family]
    limit = (tokenizer_configs or {}).get(tokenizer, {}).get("model_max_length")
    if text_tokens is not None and isinstance(limit, int) and 0 < limit < text_tokens:
        text_tokens = limit
    return ModelFacts(
        name=name, family=family, class_name=str(class_name), weights=dict(sizes),
        fp8_weights={c: int(fp8_sizes.get(c, sizes[c])) for c in denoise}, stage_of=stage_of, shape=shape,
        text_tokens=text_tokens, text_is_split=family is not Family.WAN,
        guidance_distilled=family is Family.FLUX, cfg_needs_negative=family is Family.QWENIMAGE,
        cp_supported=transformer_class in CP_MODEL_CLASSES, vae_scale=scale, vae_temporal=temporal,
        patch=patch, vae_channels=channels, configs={k: dict(v) for k, v in configs.items()},
    )


def vae_geometry(family: Family, vae: Mapping[str, Any]) -> tuple[int, int, int]:
    """(spatial scale, frames per latent frame, decoder channels at full resolution) from the VAE's config."""
    if family is Family.WAN:
        # The last up-stage doubles base_dim before the output conv.
        return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4)), \
            int(vae.get("base_dim", 96)) * 2
    if family is Family.QWENIMAGE:
        return 2 ** len(vae["temperal_downsample"]), 1, int(vae.get("base_dim", 96)) * 2
    return 2 ** (len(vae["block_out_channels"]) - 1), 1, int(vae["block_out_channels"][0])


def fp8_bytes(model) -> int:
    """Bytes of a (meta) model once diffusers' `enable_layerwise_casting(storage_dtype=float8)` has cast it: the
    parameters of supported leaf layers whose name matches no skip pattern (diffusers' defaults, the model's
    `_skip_layerwise_casting_patterns` and its float32 modules) take 1 byte per element. Non-diffusers models
    (text encoders) are returned unchanged."""
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS, DEFAULT_SKIP_MODULES_PATTERN

    from .meta_sizes import module_bytes

    total = module_bytes(model)
    if not hasattr(type(model), "_skip_layerwise_casting_patterns"):
        return total
    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *(type(model)._skip_layerwise_casting_patterns or ()),
                *(type(model)._keep_in_fp32_modules or ()))
    saved = 0
    for name, module in model.named_modules():
        if not isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS) or any(re.search(p, name) for p in patterns):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.element_size() > 1:
                saved += param.numel() * (param.element_size() - 1)
    return total - saved


def padded(length: int, degree: int) -> int:
    """The length each of `degree` ranks handles × degree (the "anything" modes pad a ragged last shard)."""
    return math.ceil(length / degree) * degree


def _is_component(name: str, spec: Any) -> bool:
    return not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} cannot be read ({exc}); point at a diffusers model folder (the one with "
                         "model_index.json)") from None
    if not isinstance(data, dict):
        raise ModelError(f"{str(path)!r} is not a json object")
    return data
