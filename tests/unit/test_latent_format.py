"""The LATENT boundary (dist_backend/latent_format.py) against ComfyUI 0.33's own comfy/latent_formats.py, with the
real FLUX.1 / Qwen-Image / Wan 2.1 VAE configs (tests/unit/data/vae_configs, the json of the released models)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from dist_backend.errors import ConfigError
from dist_backend.latent_format import latent_format

DATA = Path(__file__).parent / "data" / "vae_configs"
REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = "comfyui-0.33.0-783545f.tar.gz"
# family -> (VAE config file, ComfyUI latent format class ComfyUI's model definition uses for it)
CASES = {"flux": ("flux.1.json", "Flux"), "qwenimage": ("qwen-image.json", "Wan21"), "wan": ("wan2.1.json", "Wan21")}


def _snapshot() -> Path:
    candidates = [Path(os.environ["DISTDIFF_SHARED"]) / "comfyui"] if os.environ.get("DISTDIFF_SHARED") else []
    candidates += [REPO.parent / "shared" / "comfyui", Path("/work/shared/comfyui")]
    for folder in candidates:
        if (folder / SNAPSHOT).is_file():
            return folder / SNAPSHOT
    pytest.fail(f"ComfyUI 0.33 source snapshot {SNAPSHOT} not found in {[str(c) for c in candidates]} "
                "(set $DISTDIFF_SHARED to the folder holding comfyui/)", pytrace=False)


@pytest.fixture(scope="module")
def comfy_formats(tmp_path_factory):
    """ComfyUI 0.33's comfy.latent_formats, imported from the snapshot (it needs only torch)."""
    root = tmp_path_factory.mktemp("comfy033")
    with tarfile.open(_snapshot()) as tar:
        for name in ("latent_formats.py", "nested_tensor.py"):
            member = tar.getmember(f"ComfyUI/comfy/{name}")
            (root / "comfy").mkdir(exist_ok=True)
            (root / "comfy" / name).write_bytes(tar.extractfile(member).read())
    (root / "comfy" / "__init__.py").write_text("")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "comfy" or k.startswith("comfy.")}
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("comfy.latent_formats")
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _info(family: str) -> dict:
    vae = json.loads((DATA / CASES[family][0]).read_text())
    return {"family": family, "model_dir": f"<{family} test config>", "components": {"vae": vae}}


@pytest.mark.parametrize("family", list(CASES))
def test_process_in_and_out_equal_comfyuis(family, comfy_formats):
    ours = latent_format(_info(family))
    theirs = getattr(comfy_formats, CASES[family][1])()
    assert ours.channels == theirs.latent_channels == 16
    assert ours.spatial == theirs.spacial_downscale_ratio == 8
    if family == "wan":
        assert ours.temporal == theirs.temporal_downscale_ratio == 4
    shape = (2, 16, 6, 8) if family == "flux" else (2, 16, 3 if family == "wan" else 1, 6, 8)
    raw = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    normalised = ours.process_in(raw)
    # ComfyUI writes the same maps with other rounding (z * std + mean vs diffusers' z / (1 / std) + mean).
    torch.testing.assert_close(normalised, theirs.process_in(raw), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.process_out(normalised), theirs.process_out(normalised), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.process_out(normalised), raw, rtol=1e-6, atol=1e-5)
    assert float((normalised - raw).abs().max()) > 0.1  # the map is not the identity: the test can fail


def test_process_out_is_the_pipelines_own_arithmetic():
    """Decoding our latents must stay bit-identical to the plain pipeline: the same float32 ops, in order."""
    z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    fmt = latent_format(_info("qwenimage"))
    mean = torch.tensor(fmt.mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(fmt.std).view(1, 16, 1, 1, 1)
    assert torch.equal(fmt.process_out(z), z / inv_std + mean)  # QwenImagePipeline.__call__
    flux = latent_format(_info("flux"))
    assert torch.equal(flux.process_out(z[:, :, 0]), z[:, :, 0] / 0.3611 + 0.1159)  # FluxPipeline.__call__


def test_layouts_are_comfyuis():
    flux, qwen, wan = (latent_format(_info(f)) for f in ("flux", "qwenimage", "wan"))
    # Flux: [B,16,h,w]; ComfyUI's VAE Decode also takes a one-frame 5-D latent.
    assert flux.to_layout(torch.zeros(2, 16, 8, 8)).shape == (2, 16, 8, 8)
    assert flux.to_layout(torch.zeros(2, 16, 1, 8, 8)).shape == (2, 16, 8, 8)
    # Qwen-Image: 5-D with one frame (ComfyUI's sampler output and VAE Encode); Empty SD3 Latent Image's 4-D form.
    assert qwen.to_layout(torch.zeros(2, 16, 8, 8)).shape == (2, 16, 1, 8, 8)
    assert qwen.to_layout(torch.zeros(1, 16, 1, 8, 8)).shape == (1, 16, 1, 8, 8)
    assert wan.to_layout(torch.zeros(1, 16, 2, 8, 8)).shape == (1, 16, 2, 8, 8)
    assert wan.pixel_size(torch.zeros(1, 16, 2, 8, 6)) == {"height": 64, "width": 48, "num_frames": 5}
    assert qwen.pixel_size(torch.zeros(1, 16, 1, 8, 6)) == {"height": 64, "width": 48, "num_frames": 1}
    with pytest.raises(ConfigError, match=r"a flux LATENT is \[B, 16, H/8, W/8\]"):
        flux.to_layout(torch.zeros(1, 4, 8, 8))  # an SD1.5 latent
    with pytest.raises(ConfigError, match="encode each image on its own"):
        qwen.to_layout(torch.zeros(1, 16, 2, 8, 8))
    with pytest.raises(ConfigError, match=r"a wan LATENT is \[B, 16, F', H/8, W/8\]"):
        wan.to_layout(torch.zeros(1, 16, 8, 8))


def test_an_empty_latent_fits_any_channel_count_when_sampled():
    """ComfyUI's sampler gives an all-zero latent the model's channels (comfy.sample.fix_empty_latent_channels)."""
    flux = latent_format(_info("flux"))
    assert flux.to_layout(torch.zeros(2, 4, 8, 8), sampling=True).shape == (2, 16, 8, 8)
    with pytest.raises(ConfigError, match="16 channels"):
        flux.to_layout(torch.zeros(2, 4, 8, 8))  # VAE Decode needs them
    with pytest.raises(ConfigError, match="16 channels"):
        flux.to_layout(torch.ones(2, 4, 8, 8), sampling=True)  # not empty: a latent of another model
