"""The UI-format example workflows in the real graph editor (headless Chromium): each opens with every node known,
the editor turns it into exactly our API-format file, our JS extension is loaded, and one runs from the browser."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import wait_no_ranks  # noqa: E402
from tests.lora_fixtures import write_tiny_flux_loras  # noqa: E402

EXAMPLES = REPO_ROOT / "example_workflows"
NAMES = ("data_parallel", "ulysses", "ring", "device_map_staged", "hybrid_dp_ulysses", "cfg_parallel",
         "regional_compile", "step_cache", "lora_chain")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

if CHROMIUM is None and not os.environ.get("CI"):
    # Outside CI a developer may lack Chromium; CI installs it (.ci/run), so there a missing browser fails.
    pytest.skip("needs Chromium (apt-get install chromium); CI installs it", allow_module_level=True)
pytestmark = pytest.mark.keeps_ranks


@pytest.fixture(scope="module")
def editor(comfy_module_server_factory, tiny_dirs, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Chromium is not installed: apt-get install chromium"
    models = tmp_path_factory.mktemp("editor-models")
    (models / "distdiff-tiny-flux").symlink_to(tiny_dirs["flux"], target_is_directory=True)
    loras = tmp_path_factory.mktemp("editor-loras")
    write_tiny_flux_loras(tiny_dirs["flux"], loras)  # the files the LoRA example's combo boxes name
    server = comfy_module_server_factory(model_paths={"diffusers": [str(models)], "loras": [str(loras)]})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                     env={**os.environ, "HOME": str(tmp_path_factory.mktemp("chromium-home"))})
        page = browser.new_page()
        # Only the local server may be reached: the closed network here, and no calls home from a test.
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                   else route.abort())
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
        yield server, page, errors
        browser.close()
    server._http("POST", "/distdiff/release", {})
    assert not wait_no_ranks(), "ranks left after /distdiff/release"


def test_our_extension_is_loaded(editor):
    _, page, errors = editor
    assert page.evaluate("app.extensions.some(e => e.name === 'distdiff.status')")
    assert not [e for e in errors if "distdiff" in e.lower()], errors


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_opens_and_becomes_our_api_workflow(editor, name):
    _, page, _ = editor
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = json.loads((EXAMPLES / f"{name}.api.json").read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", ui)
    types = page.evaluate("app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(v["class_type"] for v in api.values())
    unknown = page.evaluate("app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert not unknown, f"the editor does not know {unknown}"
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    for node_id, node in api.items():
        assert output[node_id]["class_type"] == node["class_type"]
        assert output[node_id]["inputs"] == node["inputs"], f"{name}: node {node_id} differs in the editor"


def test_a_workflow_runs_from_the_browser(editor):
    server, page, _ = editor
    ui = json.loads((EXAMPLES / "data_parallel.json").read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", ui)
    before = json.loads(server._http("GET", "/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 180
    entry = None
    while entry is None and time.monotonic() < deadline:  # history gets the prompt when it has finished
        time.sleep(0.5)
        history = json.loads(server._http("GET", "/history"))
        entry = next((v for k, v in history.items() if k not in before and v.get("status", {}).get("completed")
                      is not None), None)
    assert entry is not None, "the prompt queued from the browser did not finish within 180 s"
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 3  # three prompts, one image each
