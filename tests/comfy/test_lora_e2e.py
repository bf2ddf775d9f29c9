"""A LoRA chain on a real ComfyUI host: LoadSharded -> LoRA (DistDiff) -> LoRA (DistDiff) -> EncodeOnGPUs ->
ParallelDenoise -> DecodeVAE -> SaveImage (example_workflows/lora_chain) gives the image of diffusers in one process
with the same LoRAs (`load_lora_weights` + `set_adapters`), through ComfyUI's own PNG conversion; a strength change
runs on the same rank processes; the graph without the LoRA nodes gives the base model's image again."""

from __future__ import annotations

import copy
import io
import json
import sys

import numpy as np
import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import rank_processes, wait_no_ranks  # noqa: E402
from tests.lora_fixtures import write_tiny_flux_loras  # noqa: E402

pytestmark = pytest.mark.keeps_ranks  # the module's ComfyUI keeps its sidecar up between runs, on purpose
WORKFLOW = REPO_ROOT / "example_workflows" / "lora_chain.api.json"


@pytest.fixture(scope="module")
def setup(comfy_module_server_factory, tiny_dirs, tmp_path_factory):
    models = tmp_path_factory.mktemp("lora-e2e-models")
    (models / "distdiff-tiny-flux").symlink_to(tiny_dirs["flux"], target_is_directory=True)
    folder = tmp_path_factory.mktemp("lora-e2e-loras")
    loras = write_tiny_flux_loras(tiny_dirs["flux"], folder)
    (folder / "distdiff-broken.safetensors").write_bytes(b"\x00" * 4)  # listed by ComfyUI, refused by us
    server = comfy_module_server_factory(model_paths={"diffusers": [str(models)], "loras": [str(folder)]})
    yield server, loras
    server._http("POST", "/distdiff/release", {})
    assert not wait_no_ranks(), "ranks left after /distdiff/release"


def comfy_pixels(server, prompt: dict) -> np.ndarray:
    from PIL import Image

    prompt_id, events = server.run(prompt, timeout=240)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert not errors, errors[0].get("exception_message")
    outputs = server.history(prompt_id)["outputs"]
    (image,) = [img for out in outputs.values() for img in out.get("images", [])]
    return np.asarray(Image.open(io.BytesIO(server.view(image["filename"], image["subfolder"], image["type"]))))


def diffusers_pixels(model_dir, prompt: dict, loras: dict) -> np.ndarray:
    """diffusers in this process with the workflow's LoRA nodes as adapters, saved the way ComfyUI's SaveImage
    saves (uint8(clip(255 x)))."""
    import torch
    from diffusers import DiffusionPipeline

    from dist_backend.latent_format import latent_format
    from dist_backend.pipelines import adapter_for
    from dist_backend.pipelines.base import ImageRequest

    nodes = {v["class_type"]: v["inputs"] for v in prompt.values() if v["class_type"] != "DistDiffLoRA"}
    chain = [v["inputs"] for k, v in sorted(prompt.items(), key=lambda kv: int(kv[0]))
             if v["class_type"] == "DistDiffLoRA"]
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for index, lora in enumerate(chain):
        pipe.load_lora_weights(str(loras[lora["lora_name"]]), adapter_name=f"ref{index}")
    if chain:
        pipe.set_adapters([f"ref{i}" for i in range(len(chain))], [lora["strength"] for lora in chain])
    den = nodes["ParallelDenoise"]
    adapter = adapter_for("flux")
    request = ImageRequest(seed=den["seed"], steps=den["steps"], guidance=den["guidance"], height=den["height"],
                           width=den["width"])
    normalised = adapter.reference(pipe, prompt=nodes["EncodeOnGPUs"]["prompt"], negative_prompt=None,
                                   request=request)
    latents = latent_format({"family": "flux", "components": {"vae": dict(pipe.vae.config)}}).process_out(normalised)
    with torch.inference_mode():
        image = adapter.decode(pipe, latents=latents, device=torch.device("cpu"))[0].numpy()
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def without_loras(prompt: dict) -> dict:
    """The same graph with the LoRA nodes taken out (every pipeline input back on LoadSharded)."""
    plain = {k: copy.deepcopy(v) for k, v in prompt.items() if v["class_type"] != "DistDiffLoRA"}
    load = next(k for k, v in plain.items() if v["class_type"] == "LoadSharded")
    for node in plain.values():
        if "pipeline" in node["inputs"]:
            node["inputs"]["pipeline"] = [load, 0]
    return plain


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    # Latents agree to ~1e-7; a pixel whose 255·x lies that close to an integer can truncate one level apart.
    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
    print(f"\n[measured] {what}: max level difference vs diffusers = {diff}")
    assert got.shape == want.shape == (64, 64, 3)
    assert diff <= 1, f"{what}: ComfyUI image differs from diffusers by {diff} levels"


def test_lora_chain_workflow_equals_diffusers(setup, tiny_dirs):
    server, loras = setup
    prompt = json.loads(WORKFLOW.read_text())
    assert [v["class_type"] for v in prompt.values()].count("DistDiffLoRA") == 2
    got = comfy_pixels(server, prompt)
    want = diffusers_pixels(tiny_dirs["flux"], prompt, loras)
    assert_close(got, want, "lora_chain workflow")
    status = json.loads(server._http("GET", "/distdiff/status"))
    assert status["loras"] == [{"file": "distdiff-tiny-flux-peft.safetensors", "strength": 0.8},
                               {"file": "distdiff-tiny-flux-kohya.safetensors", "strength": -0.6}], status
    base = diffusers_pixels(tiny_dirs["flux"], without_loras(prompt), loras)
    assert np.abs(want.astype(int) - base.astype(int)).max() > 8, "the LoRAs changed nothing: this proves nothing"

    ranks = {p.pid for p in rank_processes()}
    changed = copy.deepcopy(prompt)
    lora_node = next(k for k, v in changed.items() if v["class_type"] == "DistDiffLoRA")
    changed[lora_node]["inputs"]["strength"] = -1.5
    assert_close(comfy_pixels(server, changed), diffusers_pixels(tiny_dirs["flux"], changed, loras),
                 "strength changed to -1.5")
    assert ranks and {p.pid for p in rank_processes()} == ranks, "a strength change must not restart the ranks"

    assert_close(comfy_pixels(server, without_loras(prompt)), base, "LoRA nodes removed")


def test_bad_lora_file_is_the_nodes_error(setup, tiny_dirs):
    server, _ = setup
    prompt = json.loads(WORKFLOW.read_text())
    lora_node = next(k for k, v in prompt.items() if v["class_type"] == "DistDiffLoRA")
    prompt[lora_node]["inputs"]["lora_name"] = "distdiff-broken.safetensors"
    prompt_id = server.queue(prompt)
    errors = [e["data"] for e in server.wait(prompt_id, timeout=120) if e["type"] == "execution_error"]
    assert errors and errors[0]["node_type"] == "DistDiffLoRA", errors
    assert "distdiff-broken.safetensors" in errors[0]["exception_message"]
