"""The harness against a real ComfyUI, with built-in nodes and a throw-away custom node package only
(independent of our pack). One server for the whole module keeps it to one ~4 s start."""

from __future__ import annotations

import io
import textwrap

import pytest
from PIL import Image

from harness import PromptRejected

# Written into the server's custom_nodes/: proves custom packages load, and gives a node that reports
# progress and honours interrupts the way ours must (ProgressBar + throw_exception_if_processing_interrupted).
PROBE_PACKAGE = textwrap.dedent('''
    """Throw-away custom nodes written by tests/comfy/test_harness_smoke.py."""
    import time

    import comfy.model_management
    import comfy.utils


    class HarnessProbeSleep:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
                                 "seconds": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0})}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "harness_probe"

        @classmethod
        def IS_CHANGED(cls, **kwargs):
            return float("nan")  # never equal to itself: ComfyUI re-runs the node instead of caching it

        def run(self, steps, seconds):
            pbar = comfy.utils.ProgressBar(steps)
            for i in range(steps):
                time.sleep(seconds)
                comfy.model_management.throw_exception_if_processing_interrupted()
                pbar.update_absolute(i + 1)
            return {"ui": {"steps": [steps]}, "result": (steps,)}


    class HarnessProbeFail:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"message": ("STRING", {"default": "boom"})}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "harness_probe"

        def run(self, message):
            raise ValueError(message)


    class HarnessProbeSpawn:
        """Starts a child process that outlives the node, like a pack's worker ranks."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "harness_probe"

        def run(self):
            import subprocess, sys
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            return {"ui": {"pid": [child.pid]}}


    NODE_CLASS_MAPPINGS = {"HarnessProbeSleep": HarnessProbeSleep, "HarnessProbeFail": HarnessProbeFail,
                           "HarnessProbeSpawn": HarnessProbeSpawn}
    NODE_DISPLAY_NAME_MAPPINGS = {"HarnessProbeSleep": "Harness probe: sleep"}
''')


@pytest.fixture(scope="module")
def probe_pack(tmp_path_factory):
    pack = tmp_path_factory.mktemp("probe") / "harness_probe"
    pack.mkdir()
    (pack / "__init__.py").write_text(PROBE_PACKAGE)
    return pack


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A models folder outside ComfyUI with one (fake) diffusers model, found by its model_index.json."""
    models = tmp_path_factory.mktemp("models")
    (models / "tiny-pipe").mkdir()
    (models / "tiny-pipe" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return models


@pytest.fixture(scope="module")
def server(comfy_module_server_factory, probe_pack, diffusers_dir):
    return comfy_module_server_factory(with_pack=False, custom_nodes={"harness_probe": probe_pack},
                                       model_paths={"diffusers": [diffusers_dir]})


def test_empty_image_is_saved_and_served(server):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 32, "batch_size": 1, "color": 0x3366CC}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}},
    }
    prompt_id, events = server.run(prompt, timeout=30)

    assert [e["type"] for e in events if e["type"] in ("execution_error", "execution_interrupted")] == []
    executed = [e["data"] for e in events if e["type"] == "executed"]
    assert [e["node"] for e in executed] == ["2"]
    (image,) = executed[0]["output"]["images"]
    assert server.history(prompt_id)["status"]["status_str"] == "success"

    png = Image.open(io.BytesIO(server.view(image["filename"], image["subfolder"], image["type"])))
    assert png.size == (64, 32)
    assert png.convert("RGB").getpixel((10, 5)) == (0x33, 0x66, 0xCC)
    # The overlay keeps outputs out of the shared ComfyUI tree.
    assert (server.root / "output" / image["subfolder"] / image["filename"]).is_file()
    assert not (server.comfy_dir / "output" / image["filename"]).exists()


def test_custom_node_package_is_listed(server):
    info = server.object_info()
    assert info["HarnessProbeSleep"]["category"] == "harness_probe"
    assert info["HarnessProbeSleep"]["display_name"] == "Harness probe: sleep"
    assert info["HarnessProbeSleep"]["input"]["required"]["steps"][0] == "INT"
    assert server.object_info("HarnessProbeFail")["HarnessProbeFail"]["output"] == ["INT"]
    assert "SaveImage" in info  # built-ins still there


def test_extra_diffusers_path_is_scanned(server):
    # DiffusersLoader lists the sub-folders of every "diffusers" path that hold a model_index.json.
    (choices,) = server.object_info("DiffusersLoader")["DiffusersLoader"]["input"]["required"]["model_path"]
    assert "tiny-pipe" in choices


def test_progress_events_are_relayed(server):
    # 0.15 s a step: ComfyUI 0.33 drops a progress update that comes < 0.1 s after the last one it sent
    # (comfy/utils.py PROGRESS_THROTTLE_MIN_INTERVAL), except the first and the last.
    _, events = server.run({"1": {"class_type": "HarnessProbeSleep", "inputs": {"steps": 3, "seconds": 0.15}}})
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "1"), (2, 3, "1"), (3, 3, "1")]


def test_interrupt_endpoint_and_cancel(server):
    assert server.interrupt() == 200  # idle: the flag is reset when the next prompt starts
    _, events = server.run({"1": {"class_type": "HarnessProbeSleep", "inputs": {"steps": 2, "seconds": 0.0}}})
    assert "execution_interrupted" not in [e["type"] for e in events]

    prompt_id = server.queue({"1": {"class_type": "HarnessProbeSleep", "inputs": {"steps": 2000, "seconds": 0.01}}})
    server.wait_event(prompt_id, "progress", timeout=30)
    assert server.interrupt() == 200
    events = server.wait(prompt_id, timeout=30)
    (stopped,) = [e["data"] for e in events if e["type"] == "execution_interrupted"]
    assert stopped["node_type"] == "HarnessProbeSleep"
    assert len([e for e in events if e["type"] == "progress"]) < 2000


def test_node_error_becomes_execution_error(server):
    prompt_id, events = server.run({"1": {"class_type": "HarnessProbeFail", "inputs": {"message": "probe boom"}}})
    (error,) = [e["data"] for e in events if e["type"] == "execution_error"]
    assert (error["node_id"], error["node_type"]) == ("1", "HarnessProbeFail")
    # Newer ComfyUI ends exception_message with a newline.
    assert (error["exception_type"], error["exception_message"].strip()) == ("ValueError", "probe boom")
    assert server.history(prompt_id)["status"]["status_str"] == "error"


def test_invalid_prompt_is_rejected(server):
    with pytest.raises(PromptRejected) as rejected:
        server.queue({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})  # no images
    assert rejected.value.body["error"]["type"] == "prompt_outputs_failed_validation"
    (node_error,) = rejected.value.body["node_errors"]["1"]["errors"]
    assert node_error["type"] == "required_input_missing"


def test_stop_leaves_no_child_behind(comfy_server_factory, probe_pack):
    server = comfy_server_factory(with_pack=False, custom_nodes={"harness_probe": probe_pack})
    _, events = server.run({"1": {"class_type": "HarnessProbeSpawn", "inputs": {}}})
    (pid,) = [e["data"]["output"]["pid"][0] for e in events if e["type"] == "executed"]
    assert _running(pid)
    server.stop()
    assert not server.alive() and not _running(pid)


def _running(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 in a container may never reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
