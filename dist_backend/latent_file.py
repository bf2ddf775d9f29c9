"""ComfyUI's `.latent` files (Save Latent / Load Latent): a safetensors file with the LATENT's samples under
"latent_tensor" and an empty "latent_format_version_0" marker. Files without the marker predate it and hold SD1.5
latents scaled by 0.18215, which no family here uses, so they are refused."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError

_KEY = "latent_tensor"
_MARKER = "latent_format_version_0"


def write_latent_file(path: str | Path, samples: torch.Tensor) -> Path:
    """Write `samples` (a ComfyUI LATENT's samples) as ComfyUI's Save Latent does."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({_KEY: samples.detach().to("cpu").contiguous(), _MARKER: torch.tensor([])}, str(path))
    return path


def read_latent_file(path: str | Path) -> torch.Tensor:
    """The samples of a `.latent` file, as ComfyUI's Load Latent reads them (float32). ConfigError naming the file
    when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        data = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"latent file {str(path)!r} cannot be read as a ComfyUI .latent file (safetensors): "
                          f"{exc}; save it with ComfyUI's Save Latent or with --save-latent") from None
    if _KEY not in data:
        raise ConfigError(f"latent file {str(path)!r} has no {_KEY!r} tensor; it is not a ComfyUI .latent file")
    if _MARKER not in data:
        raise ConfigError(f"latent file {str(path)!r} is an old (pre-2023) SD1.5 .latent file without "
                          f"{_MARKER!r}; re-save the latent with a current ComfyUI")
    return data[_KEY].float()
