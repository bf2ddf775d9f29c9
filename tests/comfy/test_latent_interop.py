"""Our LATENT with ComfyUI's own nodes, on a host that has its Flux-era latent nodes (ComfyUI 0.33):
ParallelDenoise -> ComfyUI's Load VAE + VAE Decode equals our DecodeVAE (within 2 levels); Empty SD3 Latent Image
-> ParallelDenoise equals the run without a latent; Load Image -> VAE Encode -> ParallelDenoise (denoise 0.6)
equals diffusers' FluxImg2ImgPipeline in one process. The two interop example workflows run as shipped.

The model is the tiny Flux with the real FLUX.1 VAE architecture (random weights, `make_tiny("flux-realvae")`,
built once into the cache): ComfyUI's VAE loader builds only real architectures."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import wait_no_ranks  # noqa: E402

EXAMPLES = REPO_ROOT / "example_workflows"
# keeps_ranks: the module's ComfyUI keeps its sidecar up between tests, on purpose. modern_host: the 2024 host lacks
# the Flux-era nodes these workflows use (EmptySD3LatentImage, a VAE loader that reads the 16-channel Flux VAE), so
# its runs are deselected (tests/comfy/conftest.py).
pytestmark = [pytest.mark.keeps_ranks, pytest.mark.modern_host]
# Nodes of ComfyUI itself that these workflows use (another host given by DISTDIFF_COMFYUI_DIR may lack them).
NEEDED = ("EmptySD3LatentImage", "VAELoader", "VAEEncode", "VAEDecode", "LoadImage", "SaveLatent")


def _build():
    spec = importlib.util.spec_from_file_location("distdiff_example_build", EXAMPLES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build()


@pytest.fixture(scope="module")
def real_vae_dir():
    from dist_backend.demo import default_cache
    from dist_backend.pipelines.tiny import tiny_cached

    return tiny_cached("flux-realvae", default_cache() / "tiny")  # ~160 MB, built once per machine


@pytest.fixture(scope="module")
def real_vae_pipe(real_vae_dir):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(real_vae_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def server(comfy_module_server_factory, real_vae_dir, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop-models")
    (root / "diffusers").mkdir()
    (root / "vae").mkdir()
    (root / "diffusers" / BUILD.REAL_VAE_MODEL).symlink_to(real_vae_dir, target_is_directory=True)
    for family in ("qwenimage", "wan"):
        (root / "diffusers" / f"distdiff-tiny-{family}").symlink_to(tiny_dirs[family], target_is_directory=True)
    (root / "vae" / BUILD.REAL_VAE_FILE).symlink_to(real_vae_dir / "vae" / "diffusion_pytorch_model.safetensors")
    srv = comfy_module_server_factory(model_paths={"diffusers": [str(root / "diffusers")],
                                                   "vae": [str(root / "vae")]})
    missing = [n for n in NEEDED if not srv.object_info(n)]
    if missing:
        pytest.skip(f"this ComfyUI lacks {missing}: these workflows need a Flux-era host (ComfyUI 0.33)")
    _input_picture().save(srv.root / "input" / BUILD.INPUT_IMAGE)
    yield srv
    srv._http("POST", "/distdiff/release", {})
    assert not wait_no_ranks(), "ranks left after /distdiff/release"


def _input_picture():
    """A 64 × 64 picture with structure (a gradient and a disc), so VAE Encode gives a non-trivial latent."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    disc = ((x - 40) ** 2 + (y - 24) ** 2 < 150)[..., None]
    rgb = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1) * ~disc + np.array([250, 220, 40]) * disc
    return Image.fromarray(rgb.astype(np.uint8))


def run_ok(server, prompt: dict, timeout: float = 400) -> dict:
    prompt_id, events = server.run(prompt, timeout=timeout)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message", errors[0])
    return server.history(prompt_id)["outputs"]


def pixels(server, outputs: dict, node: str) -> np.ndarray:
    from PIL import Image

    image = outputs[node]["images"][0]
    return np.asarray(Image.open(io.BytesIO(server.view(image["filename"], image["subfolder"], image["type"]))))


def saved_latent(server, outputs: dict, node: str):
    from dist_backend.latent_file import read_latent_file

    entry = outputs[node]["latents"][0]
    return read_latent_file(server.root / "output" / entry["subfolder"] / entry["filename"])


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.api.json").read_text())


def node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def test_comfyuis_vae_decode_of_our_latent_equals_decode_vae(server):
    prompt = example("comfy_vae_decode")  # ParallelDenoise -> ComfyUI's Load VAE + VAE Decode -> Save Image
    load, denoise = node_id(prompt, "LoadSharded"), node_id(prompt, "ParallelDenoise")
    comfy_save = node_id(prompt, "SaveImage")
    prompt["90"] = {"class_type": "DecodeVAE", "inputs": {"pipeline": [load, 0], "samples": [denoise, 0]}}
    prompt["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "ours"}}
    outputs = run_ok(server, prompt)
    theirs, ours = pixels(server, outputs, comfy_save), pixels(server, outputs, "91")
    levels = int(np.abs(theirs.astype(int) - ours.astype(int)).max())
    print(f"\n[measured] ComfyUI VAE Decode vs DecodeVAE of the same LATENT: max {levels} levels")
    assert theirs.shape == ours.shape == (64, 64, 3)
    assert levels <= 2
    assert ours.std() > 5  # a real picture, not a flat one: the comparison can fail


def test_empty_sd3_latent_equals_the_run_without_a_latent(server):
    prompt = example("comfy_vae_decode")
    denoise = node_id(prompt, "ParallelDenoise")
    plain = copy.deepcopy(prompt[denoise])
    plain["inputs"].update(width=64, height=48)
    prompt[denoise]["inputs"].update(width=1024, height=1024)  # the latent's size wins
    prompt["80"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}}
    prompt[denoise]["inputs"]["latent"] = ["80", 0]
    prompt["81"] = plain
    prompt["82"] = {"class_type": "SaveLatent", "inputs": {"samples": [denoise, 0], "filename_prefix": "empty"}}
    prompt["83"] = {"class_type": "SaveLatent", "inputs": {"samples": ["81", 0], "filename_prefix": "plain"}}
    outputs = run_ok(server, prompt)
    with_empty, without = saved_latent(server, outputs, "82"), saved_latent(server, outputs, "83")
    assert tuple(with_empty.shape) == (1, 16, 6, 8)
    assert (with_empty == without).all()


@pytest.mark.parametrize("family, empty_node, inputs, layout", [
    # ComfyUI's own Qwen-Image workflows start from Empty SD3 Latent Image (4-D); its sampler returns 5-D.
    ("qwenimage", "EmptySD3LatentImage", dict(width=64, height=48, batch_size=1), (1, 16, 1, 6, 8)),
    ("wan", "EmptyHunyuanLatentVideo", dict(width=64, height=48, length=5, batch_size=1), (1, 16, 2, 6, 8)),
])
def test_comfyuis_empty_latents_set_the_size_for_qwen_image_and_wan(server, family, empty_node, inputs, layout):
    prompt = example("comfy_vae_decode")
    for drop in ("VAELoader", "VAEDecode", "SaveImage"):  # these tiny models' VAEs are not ComfyUI-loadable
        del prompt[node_id(prompt, drop)]
    prompt[node_id(prompt, "LoadSharded")]["inputs"].update(model=f"distdiff-tiny-{family}")
    denoise = node_id(prompt, "ParallelDenoise")
    prompt[denoise]["inputs"].update(guidance=1.0, width=64, height=48, num_frames=inputs.get("length", 1))
    plain = copy.deepcopy(prompt[denoise])
    prompt[denoise]["inputs"].update(width=1024, height=1024, num_frames=1)  # the latent's size wins
    prompt["80"] = {"class_type": empty_node, "inputs": inputs}
    prompt[denoise]["inputs"]["latent"] = ["80", 0]
    prompt["81"] = plain
    prompt["82"] = {"class_type": "SaveLatent", "inputs": {"samples": [denoise, 0], "filename_prefix": "empty"}}
    prompt["83"] = {"class_type": "SaveLatent", "inputs": {"samples": ["81", 0], "filename_prefix": "plain"}}
    outputs = run_ok(server, prompt)
    with_empty, without = saved_latent(server, outputs, "82"), saved_latent(server, outputs, "83")
    assert tuple(with_empty.shape) == layout
    assert (with_empty == without).all()


def test_img2img_workflow_equals_diffusers_img2img(server, real_vae_pipe):
    from tests.dist.engine_cases import reference

    prompt = example("img2img")  # Load Image -> Load VAE + VAE Encode -> ParallelDenoise (0.6, Ulysses 2)
    encode, denoise = node_id(prompt, "VAEEncode"), node_id(prompt, "ParallelDenoise")
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [encode, 0], "filename_prefix": "init"}}
    prompt["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [denoise, 0], "filename_prefix": "out"}}
    outputs = run_ok(server, prompt)
    init, got = saved_latent(server, outputs, "90"), saved_latent(server, outputs, "91")
    settings = prompt[denoise]["inputs"]
    text = prompt[node_id(prompt, "EncodeOnGPUs")]["inputs"]["prompt"]
    expected = reference({"flux": real_vae_pipe}, "flux", [text], seed=settings["seed"],
                         denoise=settings["denoise"], init=init, size=dict(height=64, width=64),
                         steps=settings["steps"], guidance=settings["guidance"])
    diff = float((got - expected).abs().max())
    print(f"\n[measured] img2img workflow (VAE Encode -> ParallelDenoise 0.6, ulysses2) vs diffusers "
          f"FluxImg2ImgPipeline: max abs latent diff {diff:.3e}")
    assert got.shape == init.shape == (1, 16, 8, 8)
    assert diff <= 1e-4
    assert float((got - init).abs().max()) > 1e-2  # denoised, not passed through
    assert pixels(server, outputs, node_id(prompt, "SaveImage")).shape == (64, 64, 3)
