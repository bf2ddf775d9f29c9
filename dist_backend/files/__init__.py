"""Models as ComfyUI users keep them: one .safetensors file per part (diffusion model, text encoders, VAE).

`ModelFiles` names the files; `read_files_config` checks them on the host from their headers alone and returns
the same `info` dict `pipelines.read_model_config` returns for a diffusers folder (plus where each file, config
and tokenizer is), so size, CP and request checks work unchanged. The ranks build the pipeline from that info
(`files.assemble`), each reading the files itself with memory mapping; the host never loads weights.

Architecture configs come from small json files shipped with the pack (`pipelines/configs/<model>/`, laid out
like a diffusers folder without weights) or from any diffusers-layout folder given as `configs`; tokenizers
from the ComfyUI install (its `comfy/` folder bundles them) or from a diffusers folder. Nothing is downloaded.

Supported: Flux (FLUX.1 dev / schnell; `flux_layout`), Qwen-Image (ComfyUI's qwen_image_*, qwen_2.5_vl_7b*,
qwen_image_vae files; `qwen_layout`) and Wan text-to-video (Wan 2.1 1.3B / 14B, Wan 2.2 A14B with its two
experts; `wan_layout`, `wan_checks`). Qwen-Image's and Wan's VAE is the same Wan 2.1 VAE (`wan_vae_layout`).
Other Wan variants (image-to-video, TI2V) are refused naming the fix: load those from a diffusers folder.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..pipelines import Family, _component_config, _read_json
from .detect import DESCRIPTIONS, FileInfo, FileKind, count_blocks, inspect_file
from .qwen_layout import qwen_shape_checks
from .wan_checks import SPIECE_KEY, shipped_wan_model, wan_shape_checks

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


class WeightStorage(str, enum.Enum):
    """How the transformer's weights are held in memory."""

    COMPUTE = "compute"
    """In the compute dtype (fp8 files are dequantised once, at load)."""
    FP8 = "fp8"
    """float8_e4m3fn, upcast per layer at each forward (diffusers' layerwise casting): about half the memory."""

    def __str__(self) -> str:
        return self.value


# Which parts each family has, and what each part's file may be.
PARTS: dict[Family, dict[str, tuple[FileKind, ...]]] = {
    Family.FLUX: {"transformer": (FileKind.FLUX_TRANSFORMER_BFL, FileKind.FLUX_TRANSFORMER_DIFFUSERS),
                  "text_encoder": (FileKind.CLIP_TEXT,), "text_encoder_2": (FileKind.T5_ENCODER,),
                  "vae": (FileKind.LDM_VAE, FileKind.DIFFUSERS_VAE)},
    Family.QWENIMAGE: {"transformer": (FileKind.QWENIMAGE_TRANSFORMER,), "text_encoder": (FileKind.QWEN25_VL,),
                       "vae": (FileKind.WAN_VAE,)},
    Family.WAN: {"transformer": (FileKind.WAN_TRANSFORMER,), "text_encoder": (FileKind.UMT5_ENCODER,),
                 "vae": (FileKind.WAN_VAE,), "transformer_2": (FileKind.WAN_TRANSFORMER,)},
}
# Parts a family may go without: Wan 2.2 A14B has a second expert (transformer_2, the low-noise one), Wan 2.1 not.
# Whether it must be there is the architecture's (configs) model_index.json: transformer_2 null or not.
OPTIONAL_PARTS = {Family.WAN: ("transformer_2",)}
# What users call each part (ComfyUI's folder and the usual file), for messages.
PART_HINTS = {
    "transformer": "the diffusion model (models/diffusion_models, e.g. flux1-dev.safetensors)",
    "text_encoder": "the first text encoder (models/text_encoders, e.g. clip_l.safetensors)",
    "text_encoder_2": "the second text encoder (models/text_encoders, e.g. t5xxl_fp16.safetensors)",
    "vae": "the VAE (models/vae, e.g. ae.safetensors)",
    "transformer_2": "the second diffusion model (Wan 2.2 A14B's low-noise expert, "
                     "e.g. wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors)",
}
# The same, for families whose usual files are others than Flux's.
PART_HINTS_OF = {
    Family.QWENIMAGE: {
        "transformer": "the diffusion model (models/diffusion_models, e.g. qwen_image_fp8_e4m3fn.safetensors)",
        "text_encoder": "the text encoder (models/text_encoders, e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors)",
        "vae": "the VAE (models/vae, e.g. qwen_image_vae.safetensors)",
    },
    Family.WAN: {
        "transformer": "the diffusion model (models/diffusion_models, e.g. wan2.1_t2v_1.3B_fp16.safetensors; Wan "
                       "2.2 A14B: the high-noise expert, e.g. wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors)",
        "text_encoder": "the text encoder (models/text_encoders, e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors)",
        "vae": "the VAE (models/vae, e.g. wan_2.1_vae.safetensors)",
    },
}
# Tokenizer folders: in a diffusers folder, and in a ComfyUI install (relative to its root).
_TOKENIZER_DIRS = {
    "tokenizer": ("tokenizer", "comfy/sd1_tokenizer", "sd1_tokenizer"),
    "tokenizer_2": ("tokenizer_2", "comfy/text_encoders/t5_tokenizer", "text_encoders/t5_tokenizer"),
}
_TOKENIZER_OF = {Family.FLUX: {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"},
                 Family.QWENIMAGE: {"text_encoder": "tokenizer"},
                 Family.WAN: {"text_encoder": "tokenizer"}}
# Where a family's tokenizer lies when it is not where _TOKENIZER_DIRS says: Qwen-Image's "tokenizer" is Qwen2.5's,
# which ComfyUI bundles under text_encoders/qwen25_tokenizer; Wan's UMT5 one is "tokenizer" in a diffusers folder,
# but ComfyUI bundles none: it reads the one inside the umt5_xxl file (see _find_tokenizers).
_TOKENIZER_DIRS_OF = {
    Family.QWENIMAGE: {"tokenizer": ("tokenizer", "comfy/text_encoders/qwen25_tokenizer",
                                     "text_encoders/qwen25_tokenizer")},
    Family.WAN: {"tokenizer": ("tokenizer",)},
}


@dataclass(frozen=True, kw_only=True)
class ModelFiles:
    """A model given as single files. Equal instances are the same model (the session does not reload it)."""

    family: str
    """Pipeline family: flux, qwenimage or wan."""
    transformer: str
    """The diffusion model file (Flux: BFL layout; Qwen-Image: qwen_image_*; Wan: wan2.1_t2v_*, or Wan 2.2 A14B's
    high-noise expert; optionally with ComfyUI's `model.diffusion_model.` prefix)."""
    vae: str
    """The VAE file (Flux: ae.safetensors; Qwen-Image: qwen_image_vae.safetensors; Wan: wan_2.1_vae.safetensors)."""
    text_encoder: str = ""
    """The first text encoder file (Flux: clip_l.safetensors; Qwen-Image: qwen_2.5_vl_7b[_fp8_scaled]; Wan:
    umt5_xxl_*)."""
    text_encoder_2: str = ""
    """The second text encoder file, for families with two (Flux: t5xxl_fp16 / t5xxl_fp8_e4m3fn[_scaled])."""
    transformer_2: str = ""
    """The second diffusion model, for Wan 2.2 A14B (the low-noise expert; `transformer` is the high-noise one)."""
    tokenizers: str = ""
    """A ComfyUI folder (its comfy/ tokenizers) or a diffusers folder (tokenizer/, tokenizer_2/); "" = `configs`."""
    configs: str = ""
    """A diffusers-layout folder whose components' config.json describe the architectures; "" = the configs
    shipped with the pack for the model the transformer file is (e.g. flux-dev)."""
    weights: WeightStorage = WeightStorage.COMPUTE
    """How the transformer's weights are held in memory."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "weights", WeightStorage(str(self.weights)))
        except ValueError:
            raise ConfigError(f"weights={self.weights!r} is not one of: "
                              f"{', '.join(w.value for w in WeightStorage)}") from None
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "transformer_2", "tokenizers", "configs"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a path string, got {type(value).__name__}")
            if value.strip():
                object.__setattr__(self, name, str(Path(value.strip()).expanduser().resolve()))

    def parts(self) -> dict[str, str]:
        """part -> path of every file given."""
        return {p: getattr(self, p) for p in ("transformer", "text_encoder", "text_encoder_2", "vae", "transformer_2")
                if getattr(self, p)}

    def to_message(self) -> dict:
        return {**asdict(self), "weights": self.weights.value}

    @classmethod
    def from_message(cls, message: dict) -> ModelFiles:
        return cls(**message)

    @property
    def key(self) -> str:
        """A string that names this model the way a folder path names a diffusers model."""
        return "files:" + json.dumps(self.to_message(), sort_keys=True)


def parse_files_arg(text: str) -> dict[str, str]:
    """The CLI's `--files transformer=PATH,text_encoder=PATH,...` -> {part: path}."""
    parts = {}
    for item in (s for s in text.split(",") if s.strip()):
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise ConfigError(f"--files entry {item!r} is not PART=PATH (e.g. transformer=/models/flux1-dev.safetensors)")
        if name not in PART_HINTS:
            raise ConfigError(f"--files part {name!r} is unknown; parts: {', '.join(PART_HINTS)}")
        parts[name] = path.strip()
    return parts


def read_source(source) -> tuple[dict, dict]:
    """(info, load message) for a diffusers folder path or a ModelFiles; checks on the host, reads no weights."""
    from ..pipelines import read_model_config

    if isinstance(source, ModelFiles):
        return read_files_config(source), {"files": source.to_message()}
    model_dir = str(Path(source).expanduser().resolve())
    return read_model_config(model_dir), {"model_dir": model_dir}


def read_files_config(files: ModelFiles) -> dict:
    """Check `files` from their headers and return the engine's `info` (see `pipelines.read_model_config`), with
    "files" ({part: FileInfo message}), "tokenizers" ({name: folder, or the text-encoder file that carries it}),
    "configs_dir" and "weights" added.

    Raises ModelError naming the file and what was expected for: a missing, truncated or corrupt file, a file
    of another part or family, a file whose shapes do not match the architecture config, a missing tokenizer;
    ConfigError for a missing or extra part.
    """
    family, infos, configs_dir, model_index, components = _checked(files)
    tokenizers = _find_tokenizers(family, files, configs_dir, infos)
    return {"family": family, "class_name": model_index["_class_name"], "model_dir": files.key,
            "model_index": model_index, "components": components, "models": list(infos),
            "files": {part: info.to_message() for part, info in infos.items()}, "tokenizers": tokenizers,
            "configs_dir": str(configs_dir), "weights": files.weights.value}


def files_configs_dir(files: ModelFiles) -> str:
    """The folder of architecture configs that describes `files`, after the same header checks as
    `read_files_config` but without looking for tokenizers: what the planner reads (it needs no tokenizer)."""
    return str(_checked(files)[2])


def _checked(files: ModelFiles) -> tuple[Family, dict[str, FileInfo], Path, dict, dict]:
    """(family, {part: FileInfo}, configs folder, model_index, component configs) of `files`, checked from their
    headers against the family's parts and the architecture configs."""
    try:
        family = Family(str(files.family))
    except ValueError:
        raise ConfigError(f"unknown family {files.family!r}; choose one of {', '.join(f.value for f in Family)}") from None
    expected = PARTS[family]
    given = files.parts()
    for part in given:
        if part not in expected:
            raise ConfigError(f"{family.value} has no {part}; it takes {', '.join(expected)} (leave {part} empty)")
    infos: dict[str, FileInfo] = {}
    for part, kinds in expected.items():
        if part not in given and part in OPTIONAL_PARTS.get(family, ()):
            continue
        if part not in given:
            raise ConfigError(f"{family.value} needs {_hint(family, part)}; {part} is empty")
        info = inspect_file(given[part], role=part)
        if info.kind not in kinds:
            want = " or ".join(DESCRIPTIONS[k] for k in kinds)
            raise ModelError(f"{part} file {info.path!r} is {info.description}, but {family.value} expects "
                             f"{want} there; pick {_hint(family, part)}")
        infos[part] = info
    configs_dir = Path(files.configs) if files.configs else CONFIGS_ROOT / _shipped_model(family, infos)
    _check_optional_parts(family, infos, configs_dir)
    model_index, components = _read_configs(configs_dir, parts=list(infos))
    _check_shapes(family, infos, components, configs_dir)
    return family, infos, configs_dir, model_index, components


def _hint(family: Family, part: str) -> str:
    return PART_HINTS_OF.get(family, {}).get(part, PART_HINTS[part])


def _shipped_model(family: Family, infos: dict[str, FileInfo]) -> str:
    if family is Family.FLUX:
        shapes = infos["transformer"].shapes
        guidance = "guidance_in.in_layer.weight" in shapes or \
            "time_text_embed.guidance_embedder.linear_1.weight" in shapes
        return "flux-dev" if guidance else "flux-schnell"
    if family is Family.QWENIMAGE:
        return "qwen-image"  # Qwen-Image and Qwen-Image-2512 share the architecture
    if family is Family.WAN:
        return shipped_wan_model(infos)
    raise AssertionError(family)


def _check_optional_parts(family: Family, infos: dict[str, FileInfo], configs_dir: Path) -> None:
    """An optional part is there exactly when the architecture has it (model_index.json lists it, not as null)."""
    index_path = configs_dir / "model_index.json"
    if family not in OPTIONAL_PARTS or not index_path.is_file():
        return  # _read_configs names a missing model_index.json
    index = _read_json(index_path)
    for part in OPTIONAL_PARTS[family]:
        wanted = isinstance(index.get(part), list) and index[part][0] is not None
        if wanted and part not in infos:
            raise ConfigError(f"the configs in {str(configs_dir)!r} describe a model with {part}: give "
                              f"{_hint(family, part)} (node: diffusion_model_2), or the configs of a model without it")
        if part in infos and not wanted:
            raise ConfigError(f"{part} is given ({infos[part].path!r}) but the configs in {str(configs_dir)!r} "
                              f"describe a model without it (Wan 2.1 has one diffusion model; Wan 2.2 A14B two); "
                              f"leave {part} empty, or give the configs of a two-expert model")


def _read_configs(configs_dir: Path, *, parts: list[str]) -> tuple[dict, dict]:
    index_path = configs_dir / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"configs folder {str(configs_dir)!r} has no model_index.json; give a diffusers-layout "
                         "folder (the configs are read from its component folders)")
    index = _read_json(index_path)
    components = {}
    for name in (*parts, "scheduler"):
        folder = configs_dir / name
        config = _component_config(folder) if folder.is_dir() else {}
        if not config:
            raise ModelError(f"configs folder {str(configs_dir)!r} has no config for {name} ({folder}); give a "
                             "diffusers-layout folder of the same model")
        components[name] = config
    return index, components


def _mismatch(info: FileInfo, what: str, found, config_value, configs_dir: Path) -> ModelError:
    return ModelError(f"{info.path!r} does not match the architecture config in {str(configs_dir)!r}: its {what} is "
                      f"{found}, the config says {config_value}; it is another model size or variant. Give the "
                      "configs of this model (configs / --configs: a diffusers-layout folder of it)")


def _check_shapes(family: Family, infos: dict[str, FileInfo], components: dict, configs_dir: Path) -> None:
    """The few shapes that fix each architecture, against the configs (so a wrong file fails here, not on a rank)."""
    checks = {Family.FLUX: _flux_shape_checks, Family.QWENIMAGE: qwen_shape_checks, Family.WAN: wan_shape_checks}
    for info, what, found, want in checks[family](infos, components):
        found = tuple(found) if isinstance(found, (list, tuple)) else found
        want = tuple(want) if isinstance(want, (list, tuple)) else want
        if found != want:
            raise _mismatch(info, what, found, want, configs_dir)


def _flux_shape_checks(infos: dict[str, FileInfo], components: dict) -> list[tuple[FileInfo, str, object, object]]:
    t, cfg = infos["transformer"], components["transformer"]
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if t.kind is FileKind.FLUX_TRANSFORMER_BFL:
        checks = (("img_in.weight shape", t.shapes.get("img_in.weight"), (inner, cfg["in_channels"])),
                  ("txt_in.weight shape", t.shapes.get("txt_in.weight"), (inner, cfg["joint_attention_dim"])),
                  ("number of double blocks", count_blocks(t.shapes, "double_blocks"), cfg["num_layers"]),
                  ("number of single blocks", count_blocks(t.shapes, "single_blocks"), cfg["num_single_layers"]),
                  ("guidance embedder", "guidance_in.in_layer.weight" in t.shapes, bool(cfg.get("guidance_embeds"))))
    else:
        checks = (("x_embedder.weight shape", t.shapes.get("x_embedder.weight"), (inner, cfg["in_channels"])),
                  ("number of double blocks", count_blocks(t.shapes, "transformer_blocks"), cfg["num_layers"]),
                  ("number of single blocks", count_blocks(t.shapes, "single_transformer_blocks"),
                   cfg["num_single_layers"]))
    v, vcfg = infos["vae"], components["vae"]
    checks_v = (("encoder.conv_in.weight rows", (v.shapes.get("encoder.conv_in.weight") or (None,))[0],
                 vcfg["block_out_channels"][0]),
                ("encoder.conv_out.weight rows (2 × latent channels)",
                 (v.shapes.get("encoder.conv_out.weight") or (None,))[0], 2 * vcfg["latent_channels"]))
    c, ccfg = infos["text_encoder"], components["text_encoder"]
    checks_c = (("token embedding shape", c.shapes.get("embeddings.token_embedding.weight"),
                 (ccfg["vocab_size"], ccfg["hidden_size"])),
                ("number of layers", count_blocks(c.shapes, "encoder.layers"), ccfg["num_hidden_layers"]))
    e, ecfg = infos["text_encoder_2"], components["text_encoder_2"]
    checks_e = (("shared embedding shape", e.shapes.get("shared.weight"), (ecfg["vocab_size"], ecfg["d_model"])),
                ("number of blocks", count_blocks(e.shapes, "encoder.block"), ecfg["num_layers"]))
    return [(info, *check) for info, group in ((t, checks), (v, checks_v), (c, checks_c), (e, checks_e))
            for check in group]


def _find_tokenizers(family: Family, files: ModelFiles, configs_dir: Path,
                     infos: dict[str, FileInfo]) -> dict[str, str]:
    """{tokenizer name: folder, or the text-encoder file that carries it}."""
    roots = [Path(files.tokenizers)] if files.tokenizers else [configs_dir]
    found = {}
    for part, name in _TOKENIZER_OF[family].items():
        if SPIECE_KEY in infos[part].shapes:
            # As ComfyUI does: the file's own tokenizer (umt5_xxl files carry it), which cannot be the wrong one.
            found[name] = infos[part].path
            continue
        dirs = _TOKENIZER_DIRS_OF.get(family, {}).get(name) or _TOKENIZER_DIRS[name]
        for root in roots:
            for rel in dirs:
                folder = root / rel
                if folder.is_dir() and (any(folder.glob("tokenizer*.json")) or (folder / "vocab.json").is_file()):
                    found[name] = str(folder)
                    break
            if name in found:
                break
        if name not in found:
            where = str(roots[0])
            if family is Family.WAN:
                raise ModelError(f"no {name} for {part}: {infos[part].path!r} does not carry one (no "
                                 f"{SPIECE_KEY!r} tensor, as ComfyUI's umt5_xxl files have) and {where!r} has no "
                                 f"{', '.join(dirs)} folder. Use ComfyUI's umt5_xxl file, or give tokenizers = a "
                                 "diffusers folder of Wan")
            raise ModelError(f"no {name} (for {part}) in {where!r}: expected one of "
                             f"{', '.join(dirs)} there. Give tokenizers = the ComfyUI folder (its "
                             "comfy/ folder bundles the tokenizers) or a diffusers folder of the model")
    return found
