"""The UI-format example workflows in the real graph editor (headless Chromium): each opens with every node known,
the editor turns it into exactly our API-format file, our JS extension is loaded, and one runs from the browser.
The DistDiff status panel opens on both frontends (sidebar tab on the modern one, floating panel on the legacy
one); on the modern host it follows a run live (step counter moves), shows a killed rank's error with its log,
Restart brings fresh ranks, and Release empties it. A screenshot of the panel during a run is written under the test's tmp dir (and, with
DISTDIFF_UPDATE_SCREENSHOTS=1, to docs/images/panel.png, linked from the README)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import wait_no_ranks  # noqa: E402
from tests.lora_fixtures import write_tiny_flux_loras  # noqa: E402

EXAMPLES = REPO_ROOT / "example_workflows"
NAMES = ("data_parallel", "ulysses", "ring", "device_map_staged", "hybrid_dp_ulysses", "cfg_parallel",
         "regional_compile", "step_cache", "lora_chain", "auto_plan")
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
    # The modern frontend opens a templates dialog over the canvas on a user's first visit; this user has been here.
    settings = server.root / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
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


PANEL = ".distdiff-panel"


def _open_panel(page) -> None:
    """The sidebar tab on the modern frontend (its toggle command, as the sidebar button runs it), the floating
    panel on the legacy one."""
    if page.evaluate("!!app.extensionManager?.registerSidebarTab"):
        page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.distdiff-status')")
    else:
        page.evaluate("window.distdiffOpenFloating()")
    page.wait_for_selector(f"{PANEL} .distdiff-state", timeout=30_000)


def _close_panel(page) -> None:
    if page.evaluate("!!app.extensionManager?.registerSidebarTab"):
        page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.distdiff-status')")
    else:
        page.evaluate("window.distdiffOpenFloating()")  # toggles
    page.wait_for_selector(PANEL, state="detached", timeout=10_000)


def _panel_step(page) -> int | None:
    text = page.text_content(f"{PANEL} .distdiff-total-step") or ""
    return int(text.split("/")[0]) if "/" in text else None


def test_status_panel_opens(editor):
    server, page, errors = editor
    _open_panel(page)
    state = page.text_content(f"{PANEL} .distdiff-state")
    assert state in ("none", "ready"), state  # earlier tests of this module may have left a ready sidecar
    assert page.is_visible(f"{PANEL} .distdiff-release") and page.is_visible(f"{PANEL} .distdiff-restart")
    _close_panel(page)
    assert not [e for e in errors if "distdiff" in e.lower()], errors


@pytest.mark.modern_host
def test_status_panel_follows_a_run_a_killed_rank_restart_and_release(editor, tmp_path):
    server, page, _ = editor
    page.set_viewport_size({"width": 1500, "height": 900})
    _open_panel(page)
    long = json.loads((EXAMPLES / "data_parallel.api.json").read_text())
    # The node's maximum of steps, at 512 × 512 so that a step takes long enough on a fast machine to watch it
    # (the run is killed long before it ends).
    long["3"]["inputs"].update(steps=1000, height=512, width=512)
    prompt_id = server.queue(long)
    page.wait_for_function(f"document.querySelector('{PANEL} .distdiff-state')?.textContent === 'running' && "
                           f"document.querySelectorAll('{PANEL} .distdiff-rank').length === 2", timeout=180_000)
    first = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the step counter moves while the ranks denoise
        step = _panel_step(page)
        first = step if first is None else first
        if first is not None and step is not None and step > first + 1:
            break
        time.sleep(0.2)
    assert first is not None and _panel_step(page) > first + 1, "the panel's step counter did not move"
    rows = page.eval_on_selector_all(f"{PANEL} .distdiff-rank", "rs => rs.map(r => r.innerText)")
    assert all("cpu" in r and "MiB" in r and "denoise" in r for r in rows), rows
    # Each row shows its own rank's step, and it moves too.
    own = "rs => rs.map(r => parseInt(r.querySelector('.distdiff-rank-step')?.textContent ?? 'NaN'))"
    before = page.eval_on_selector_all(f"{PANEL} .distdiff-rank", own)
    assert len(before) == 2 and all(k >= 1 for k in before), rows
    page.wait_for_function(f"(old) => ({own})([...document.querySelectorAll('{PANEL} .distdiff-rank')])"
                           ".every((k, i) => k > old[i])", arg=before, timeout=30_000)
    assert page.text_content(f"{PANEL} .distdiff-strategy").startswith("dp2")
    # The loader's plan (strategy manual: the degrees as set, explained), folded under one line.
    assert page.text_content(f"{PANEL} .distdiff-plan summary").startswith("plan (manual): dp2")
    assert "Data parallel 2 (set by hand)" in page.text_content(f"{PANEL} .distdiff-plan ul")
    shot = tmp_path / "panel.png"
    page.locator(PANEL).screenshot(path=str(shot))
    assert shot.stat().st_size > 5_000
    if os.environ.get("DISTDIFF_UPDATE_SCREENSHOTS"):
        shutil.copy(shot, REPO_ROOT / "docs" / "images" / "panel.png")

    status = json.loads(server._http("GET", "/distdiff/status"))
    victim = next(r["pid"] for r in status["ranks"] if r["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    server.wait(prompt_id, timeout=60)
    page.wait_for_selector(f"{PANEL} .distdiff-state-failed", timeout=30_000)
    failure = page.text_content(f"{PANEL} .distdiff-failure")
    assert "rank 1 failed during denoise" in failure and "signal 9" in failure, failure
    assert page.text_content(f"{PANEL} .distdiff-log").strip(), "the killed rank's log tail is missing"
    # The failed sidecar's rows stay, the killed rank's with its error.
    assert page.eval_on_selector_all(f"{PANEL} .distdiff-rank-failed", "rs => rs.map(r => r.dataset.rank)") == ["1"]

    # A seed no earlier test used: ComfyUI must not answer from its cache (our loaders' IS_CHANGED follows the
    # model's files, not the sidecar, so an identical prompt that already ran would start no rank).
    again = json.loads((EXAMPLES / "data_parallel.api.json").read_text())
    again["3"]["inputs"]["seed"] = 90_001
    _, events = server.run(again, timeout=180)
    assert "execution_error" not in [e["type"] for e in events]
    page.wait_for_function(f"document.querySelector('{PANEL} .distdiff-state')?.textContent === 'ready'",
                           timeout=30_000)
    assert page.eval_on_selector_all(f"{PANEL} .distdiff-rank", "rs => rs.length") == 2
    assert page.text_content(f"{PANEL} .distdiff-timings").count("denoise") == 1

    before = json.loads(server._http("GET", "/distdiff/status"))["pids"]
    t0 = time.monotonic()
    assert json.loads(server._http("POST", "/distdiff/restart", {}))["restarting"] is True
    assert time.monotonic() - t0 < 2.0, "the restart route must answer at once (the restart runs off the loop)"
    page.wait_for_function(  # fresh rank processes, the model loaded again
        "(old) => { const rows = [...document.querySelectorAll('.distdiff-panel .distdiff-rank')];"
        " return document.querySelector('.distdiff-panel .distdiff-state')?.textContent === 'ready' &&"
        " rows.length === 2 && rows.every(r => !old.includes(Number(r.children[2].textContent))); }",
        arg=before, timeout=120_000)
    page.click(f"{PANEL} .distdiff-release")
    page.wait_for_function(f"document.querySelector('{PANEL} .distdiff-state')?.textContent === 'none' && "
                           f"!document.querySelector('{PANEL} .distdiff-rank')", timeout=30_000)
    assert not wait_no_ranks(), "ranks left after Release in the panel"
    _close_panel(page)
