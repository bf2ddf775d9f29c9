"""ParallelDenoise's progress bar and live preview: the engine's preview latents go through ComfyUI's own previewer
(`latent_preview.get_previewer`, so the host's preview method setting — none, latent-to-RGB factors, TAESD — is
respected) and reach the page the way ComfyUI's samplers send theirs (`ProgressBar.update_absolute(..., preview)`,
which the server resizes to its preview size)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# ComfyUI's latent format (comfy/latent_formats.py) of each family's models, as comfy/supported_models.py assigns
# them: Qwen-Image uses Wan 2.1's. A Wan VAE with 48 channels is Wan 2.2 TI2V's (format Wan22).
_LATENT_FORMATS = {"flux": "Flux", "qwenimage": "Wan21", "wan": "Wan21"}
_WAN22_CHANNELS = 48


def latent_format_for(family: str, channels: int):
    """ComfyUI's latent format object for `family` with `channels` latent channels, or None when this ComfyUI has no
    such format (the 2024 builds predate Flux and Wan) or its channels differ (e.g. the tiny test models)."""
    import comfy.latent_formats

    name = "Wan22" if family == "wan" and channels == _WAN22_CHANNELS else _LATENT_FORMATS.get(family)
    cls = getattr(comfy.latent_formats, name, None) if name else None
    if cls is None:
        return None
    fmt = cls()
    return fmt if getattr(fmt, "latent_channels", None) == channels else None


class ComfyProgress:
    """Moves the running node's progress bar; with `previews`, shows each preview latent with the step it belongs
    to. The previewer is made at the first preview, when the latent's channel count is known."""

    def __init__(self, total: int, *, family: str) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.family = family
        self._previewer = None
        self._checked = False
        self._pending = None  # the preview image of the step whose progress comes next

    @property
    def previews(self) -> bool:
        """Whether the host wants previews at all (ComfyUI's --preview-method / the page's setting for this run)."""
        from comfy.cli_args import LatentPreviewMethod, args

        return args.preview_method != LatentPreviewMethod.NoPreviews

    def preview(self, latent) -> None:
        import torch

        if not self._checked:
            self._checked = True
            self._previewer = self._make_previewer(int(latent.shape[1]))
        if self._previewer is not None:
            import comfy.model_management

            x0 = latent.to(comfy.model_management.get_torch_device(), torch.float32)
            self._pending = self._previewer.decode_latent_to_preview_image("JPEG", x0)

    def update(self, done: int, total: int) -> None:
        pending, self._pending = self._pending, None
        self.bar.update_absolute(done, total, pending)

    def _make_previewer(self, channels: int):
        import comfy.model_management
        import latent_preview

        fmt = latent_format_for(self.family, channels)
        if fmt is None:
            log.info("DistDiff: no ComfyUI latent format for %s latents with %d channels; progress without preview",
                     self.family, channels)
            return None
        return latent_preview.get_previewer(comfy.model_management.get_torch_device(), fmt)
