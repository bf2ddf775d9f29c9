"""Float images <-> PNG files, rounding exactly like diffusers' `numpy_to_pil` so PNGs match the plain pipeline."""

from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] float in 0..1 -> uint8, as diffusers does: (x * 255).round()."""
    return (images.detach().to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)


def save_pngs(images: torch.Tensor, out_dir: str | Path, *, names: list[str]) -> list[str]:
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(names) != images.shape[0]:
        raise AssertionError(f"{len(names)} names for {images.shape[0]} images")
    paths = []
    for array, name in zip(to_uint8(images).numpy(), names):
        path = out / name
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def image_names(*, num_images: int, frames: int) -> list[str]:
    """Prompt-major image names; a video's frames are consecutive."""
    if frames <= 1:
        return [f"image_{j:04d}.png" for j in range(num_images)]
    return [f"image_{j:04d}_frame_{f:04d}.png" for j in range(num_images) for f in range(frames)]
