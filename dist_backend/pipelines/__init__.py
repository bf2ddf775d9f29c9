"""Pipeline families: which diffusers pipelines we run, how a model folder is checked, and how it is loaded.

Importing this package is cheap: it imports neither torch nor diffusers. Adapters are imported on first use
by `adapter_for`, and `read_model_config` reads only json files and safetensors headers.
"""

from __future__ import annotations

import enum
import json
import logging
import struct
from pathlib import Path

from ..errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


class Family(str, enum.Enum):
    """A pipeline family we have an adapter for. Serialises as its value."""

    FLUX = "flux"
    QWENIMAGE = "qwenimage"
    WAN = "wan"

    def __str__(self) -> str:
        return self.value


# model_index.json "_class_name" values each family accepts. The adapters take theirs from here.
PIPELINE_CLASSES: dict[Family, tuple[str, ...]] = {
    Family.FLUX: ("FluxPipeline",),
    Family.QWENIMAGE: ("QwenImagePipeline",),
    Family.WAN: ("WanPipeline",),
}

_ADAPTERS = {
    Family.FLUX: (".flux", "FluxAdapter"),
    Family.QWENIMAGE: (".qwenimage", "QwenImageAdapter"),
    Family.WAN: (".wan", "WanAdapter"),
}

# Files whose json describes a component, in the order we look for them.
_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
# A safetensors header larger than this is not a header (real ones are well under 10 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def family_of(class_name: str) -> Family:
    """The family whose pipeline class is `class_name`; ModelError listing the supported classes otherwise."""
    for family, names in PIPELINE_CLASSES.items():
        if class_name in names:
            return family
    supported = ", ".join(f"{n} ({f.value})" for f, names in PIPELINE_CLASSES.items() for n in names)
    raise ModelError(f"pipeline class {class_name!r} is not supported; supported pipelines: {supported}")


def adapter_for(family: Family | str):
    """A new adapter (`FamilyAdapter`) for `family`; imports its module on first use."""
    import importlib

    try:
        fam = Family(str(family))
    except ValueError:
        raise ConfigError(
            f"unknown family {family!r}; choose one of {', '.join(f.value for f in Family)}"
        ) from None
    module_name, class_name = _ADAPTERS[fam]
    return getattr(importlib.import_module(module_name, __name__), class_name)()


def read_model_config(model_dir: str | Path) -> dict:
    """Check a diffusers model folder without loading weights and return what the engine plans with.

    Returns {"family": Family, "class_name": str, "model_dir": str, "model_index": dict,
    "components": {name: config dict}, "models": [names]} where each config is the component's json
    (config.json for models, scheduler_config.json, tokenizer_config.json, ...; {} when it has none) and
    "models" lists the components with weights (those with a config.json). Components that model_index.json
    lists as null (e.g. Wan 2.1's transformer_2) are left out of both.

    Raises ModelError naming the path and the fix for: a missing folder, no model_index.json, an unsupported
    pipeline class, a missing component folder, a model component without weights, and a truncated or corrupt
    .safetensors file.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelError(f"model folder {str(root)!r} does not exist; give the path of a diffusers model folder "
                         "(the one that contains model_index.json)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{str(root)!r} is not a diffusers model folder: it has no model_index.json. Point to the folder "
            "saved by save_pretrained / downloaded from the Hub in diffusers layout (single-file checkpoints "
            "are not supported)"
        )
    index = _read_json(index_path)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"{str(index_path)!r} has no \"_class_name\"; the file is damaged, download it again")
    family = family_of(class_name)

    components: dict[str, dict] = {}
    models: list[str] = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue  # private keys, config values (e.g. boundary_ratio) and absent optional components
        folder = root / name
        if not folder.is_dir():
            raise ModelError(
                f"component folder {str(folder)!r} ({spec[1]}) listed in model_index.json is missing; "
                "the download is incomplete, download the model again"
            )
        components[name] = _component_config(folder)
        if (folder / "config.json").is_file():
            _check_weights(folder)
            models.append(name)
    return {"family": family, "class_name": class_name, "model_dir": str(root), "model_index": index,
            "components": components, "models": models}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{str(path)!r} is not valid json ({exc}); download the model again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{str(path)!r} is not a json object; download the model again")
    return data


def _component_config(folder: Path) -> dict:
    for name in _CONFIG_FILES:
        if (folder / name).is_file():
            return _read_json(folder / name)
    return {}


def _check_weights(folder: Path) -> None:
    """A model component (it has config.json) needs weights; every safetensors file there must be whole."""
    st_files = sorted(folder.glob("*.safetensors"))
    for index_file in folder.glob("*.safetensors.index.json"):
        for shard in sorted(set(_read_json(index_file).get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                raise ModelError(f"weight shard {str(folder / shard)!r} named in {index_file.name} is missing; "
                                 "the download is incomplete, download the model again")
    if not st_files and not any(folder.glob("*.bin")) and not any(folder.glob("*.gguf")):
        raise ModelError(f"component folder {str(folder)!r} has a config.json but no weights "
                         "(*.safetensors or *.bin); the download is incomplete, download the model again")
    for path in st_files:
        check_safetensors(path)


def check_safetensors(path: str | Path, *, fix: str = "download the model again") -> dict:
    """Raise ModelError if `path` is not a whole safetensors file; return its header (tensor name -> spec).

    The format is an 8-byte little-endian header length, a json header mapping tensor names to
    {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), then the data.
    A file shorter than header end + the largest offset end was cut off (interrupted download). Only the header
    is read, never the weights. `fix` ends each message (what the user should do about it).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{str(path)!r} does not exist or is not a file; {fix}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{str(path)!r} is truncated ({size} bytes, shorter than the 8-byte header length); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES:
            raise ModelError(f"{str(path)!r} has a corrupt header (it claims {header_len} header bytes); "
                             f"it is not a safetensors file or is damaged; {fix}")
        if 8 + header_len > size:
            raise ModelError(f"{str(path)!r} is truncated: {size} bytes, but its header alone needs "
                             f"8 + {header_len} bytes; {fix}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a json object")
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"{str(path)!r} has a corrupt header ({exc}); {fix}") from None
    needed = 8 + header_len + data_end
    if size < needed:
        raise ModelError(f"{str(path)!r} is truncated: {size} bytes, but its header says the data ends at byte "
                         f"8 + {header_len} + {data_end} = {needed}; {fix}")
    return header


def load_pipeline(model_dir: str | Path, *, components: set[str] | frozenset[str] | None = None, dtype=None,
                  device_map: str | dict | None = None, max_memory: dict | None = None):
    """Load the pipeline in `model_dir` with only the weight-bearing `components` (None: all of them).

    Model components (those with weights, `read_model_config(...)["models"]`) not asked for are passed as None,
    so their weights are never read. Light components (tokenizers, the scheduler) are always loaded. Asked-for
    components the folder does not have are skipped (an adapter may list optional ones). `dtype`,
    `device_map` and `max_memory` go to `DiffusionPipeline.from_pretrained` unchanged when given.

    NOTE: a pipeline loaded without its VAE uses the default VAE scale factor (8; Wan: 8 spatial, 4 temporal),
    so use `read_model_config` (the VAE's config json) for size checks, not the partial pipeline.
    """
    from diffusers import DiffusionPipeline

    cfg = read_model_config(model_dir)
    models = set(cfg["models"])
    kwargs: dict = {}
    if components is not None:
        # The folder, not the adapter, says which components exist (e.g. Wan 2.2's optional transformer_2).
        missing = set(components) - models
        if missing:
            logger.debug("%s has no model components %s; not loading them", cfg["model_dir"], sorted(missing))
        kwargs.update({name: None for name in models - set(components)})
    if dtype is not None:
        kwargs["dtype"] = dtype  # diffusers 0.42 deprecates torch_dtype= (it warns) in favour of dtype=
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    logger.info("loading %s from %s (components: %s)", cfg["class_name"], cfg["model_dir"],
                "all" if components is None else sorted(components))
    return DiffusionPipeline.from_pretrained(cfg["model_dir"], **kwargs)
