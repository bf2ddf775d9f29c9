"""Our nodes on a real ComfyUI host: every API example workflow runs and its PNG equals the CLI's PNG for the
same settings; progress arrives during ParallelDenoise; interrupt stops the ranks and the queue goes on; a second
run reuses the sidecar; bad input comes back as ComfyUI's execution_error with our message; shutting ComfyUI
down stops every rank."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import rank_processes, wait_no_ranks  # noqa: E402
from tests.lora_fixtures import write_tiny_flux_loras  # noqa: E402

EXAMPLES = REPO_ROOT / "example_workflows"
# Our-nodes-only examples (example_workflows/build.py EXAMPLES); the interop ones run in test_latent_interop.py.
API_FILES = [EXAMPLES / f"{name}.api.json" for name in ("data_parallel", "device_map_staged", "hybrid_dp_ulysses",
                                                        "ring", "ulysses", "cfg_parallel", "regional_compile",
                                                        "step_cache", "single_files")]
TINY_NAME = "distdiff-tiny-flux"
pytestmark = pytest.mark.keeps_ranks  # the module's ComfyUI keeps its sidecar up between tests, on purpose
NODE_TYPES = ("LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE", "DistDiffReleaseGPUs", "DistDiffLoRA",
              "DistDiffLoadFiles", "DistDiffDecodeVAETiled")


@pytest.fixture(scope="module")
def models_root(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers-models")
    (root / TINY_NAME).symlink_to(tiny_dirs["flux"], target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def loras_root(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    write_tiny_flux_loras(tiny_dirs["flux"], root)  # the LoRA files the example workflows name
    return root


# The example's single files (example_workflows/build.py TINY_FILES): written part -> the node input it fills.
_FILE_INPUTS = {"transformer": "diffusion_model", "text_encoder": "text_encoder_1", "text_encoder_2": "text_encoder_2",
                "vae": "vae"}
_FILE_FOLDERS = {"transformer": "diffusion_models", "text_encoder": "text_encoders", "text_encoder_2": "text_encoders",
                 "vae": "vae"}


@pytest.fixture(scope="module")
def files_root(tiny_dirs, tmp_path_factory):
    """ComfyUI model folders holding the tiny Flux as single files (ComfyUI's prefix) under the example's names."""
    from dist_backend.files.tiny_files import write_flux_files

    spec = importlib.util.spec_from_file_location("distdiff_example_build", EXAMPLES / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    root = tmp_path_factory.mktemp("model-files")
    for part, path in write_flux_files(tiny_dirs["flux"], root / "written", storage="fp32", comfy_prefix=True).items():
        (root / _FILE_FOLDERS[part]).mkdir(exist_ok=True)
        Path(path).rename(root / _FILE_FOLDERS[part] / build.TINY_FILES[_FILE_INPUTS[part]])
    return root


def for_tiny_files(prompt: dict, tiny_dir: Path) -> dict:
    """A DistDiffLoadFiles example made to load the tiny model: its architecture and tokenizers are the tiny
    folder's (a real model's come from the shipped configs and this ComfyUI's tokenizers: the paths left empty)."""
    for node in prompt.values():
        if node["class_type"] == "DistDiffLoadFiles":
            node["inputs"].update(tokenizers_path=str(tiny_dir), configs_path=str(tiny_dir))
    return prompt


@pytest.fixture(scope="module")
def server(comfy_module_server_factory, models_root, loras_root, files_root):
    srv = comfy_module_server_factory(model_paths={"diffusers": [str(models_root)], "loras": [str(loras_root)],
                                                   **{f: [str(files_root / f)] for f in set(_FILE_FOLDERS.values())}})
    yield srv
    # ComfyUI's own release route, then the server stops at module teardown; no rank may survive either.
    srv._http("POST", "/distdiff/release", {})
    assert not wait_no_ranks(), "ranks left after /distdiff/release"


def load(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


def node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def output_pixels(server, prompt_id: str) -> list[np.ndarray]:
    from PIL import Image

    outputs = server.history(prompt_id)["outputs"]
    images = [img for out in outputs.values() for img in out.get("images", [])]
    return [np.asarray(Image.open(io.BytesIO(server.view(i["filename"], i["subfolder"], i["type"]))))
            for i in images]


def lora_args(prompt: dict, loras_root: Path) -> list[str]:
    """`--lora FILE:STRENGTH` for each LoRA (DistDiff) node on ParallelDenoise's pipeline path, in chain order."""
    chain = []
    source = prompt[node_id(prompt, "ParallelDenoise")]["inputs"]["pipeline"][0]
    while prompt[source]["class_type"] == "DistDiffLoRA":
        inputs = prompt[source]["inputs"]
        chain.insert(0, f"{loras_root / inputs['lora_name']}:{inputs['strength']}")
        source = inputs["pipeline"][0]
    return [arg for item in chain for arg in ("--lora", item)]


def cli_source(prompt: dict, model_dir: Path, files_root: Path | None) -> tuple[dict, list[str]]:
    """(the loader node's inputs, the CLI's model arguments): --model, or --files for DistDiffLoadFiles."""
    if not any(n["class_type"] == "DistDiffLoadFiles" for n in prompt.values()):
        return prompt[node_id(prompt, "LoadSharded")]["inputs"], ["--model", str(model_dir)]
    load_in = prompt[node_id(prompt, "DistDiffLoadFiles")]["inputs"]
    files = ",".join(f"{part}={files_root / _FILE_FOLDERS[part] / load_in[name]}" for part, name in _FILE_INPUTS.items())
    return load_in, ["--files", files, "--family", load_in["family"], "--tokenizers", load_in["tokenizers_path"],
                     "--configs", load_in["configs_path"]]


def cli_pixels(prompt: dict, model_dir: Path, out: Path, loras_root: Path,
               files_root: Path | None = None, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The CLI run with the workflow's settings (the contract: the node graph and the CLI agree), as ComfyUI's
    SaveImage would write it. SaveImage truncates (uint8(255 × x)) where the CLI's PNGs round like diffusers
    (round(255 × x)), so the comparison uses the CLI's float images, saved next to its PNGs."""
    import torch

    load_in, source = cli_source(prompt, model_dir, files_root)
    den = prompt[node_id(prompt, "ParallelDenoise")]["inputs"]
    prompts = [p.strip() for p in prompt[node_id(prompt, "EncodeOnGPUs")]["inputs"]["prompt"].splitlines() if p.strip()]
    cmd = [sys.executable, "-m", "dist_backend", "generate", *source, "--out", str(out),
           "--seed", str(den["seed"]), "--steps", str(den["steps"]), "--guidance", str(den["guidance"]),
           "--height", str(den["height"]), "--width", str(den["width"]),
           "--images-per-prompt", str(den["images_per_prompt"]),
           "--world-size", str(load_in["ranks"]), "--dp", str(load_in["dp"]), "--ring", str(load_in["ring"]),
           "--ulysses", str(load_in["ulysses"]), "--dtype", load_in["dtype"], "--device", load_in["device"],
           "--offload", load_in["offload"], "--save-tensors", *lora_args(prompt, loras_root),
           "--cfg", str(load_in.get("cfg", 1)), "--true-cfg", str(den.get("true_cfg", 1.0)),
           "--compile", load_in.get("compile", "none"), "--cache", load_in.get("cache", "none"),
           "--cache-threshold", str(load_in.get("cache_threshold", 0.0))]
    negative = prompt[node_id(prompt, "EncodeOnGPUs")]["inputs"].get("negative_prompt", "")
    if negative:  # verbatim, as the node passes it ("" = none)
        cmd += ["--negative-prompt", negative]
    for p in prompts:
        cmd += ["--prompt", p]
    cmd += extra
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    images = torch.load(out / "tensors.pt")["images"].numpy()
    assert len(summary["images"]) == images.shape[0]
    return [np.clip(255.0 * image, 0, 255).astype(np.uint8) for image in images]


def test_nodes_are_registered_with_tooltips_and_descriptions(server):
    info = server.object_info()
    for node in NODE_TYPES:
        assert node in info, f"{node} missing: the pack did not load (see the server log)"
        spec = info[node]
        assert spec["category"] == "DistDiff"
        assert spec["display_name"].endswith("(DistDiff)")
        assert spec["description"]
        for group in ("required", "optional"):
            for name, value in spec["input"].get(group, {}).items():
                assert len(value) > 1 and value[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert TINY_NAME in info["LoadSharded"]["input"]["required"]["model"][0]


@pytest.mark.parametrize("api_file", API_FILES, ids=[p.name.split(".")[0] for p in API_FILES])
def test_example_workflow_matches_the_cli(server, api_file, tiny_dirs, loras_root, files_root, tmp_path_factory):
    prompt = for_tiny_files(load(api_file.name), tiny_dirs["flux"])
    prompt_id, events = server.run(prompt, timeout=240)
    kinds = [e["type"] for e in events]
    assert "execution_error" not in kinds, next(e for e in events if e["type"] == "execution_error")
    denoise = node_id(prompt, "ParallelDenoise")
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == denoise]
    steps = prompt[denoise]["inputs"]["steps"]
    assert progress and progress[-1]["value"] == progress[-1]["max"], "ParallelDenoise sent no per-step progress"
    if server.modern:  # ComfyUI 0.33 drops updates < 0.1 s apart (comfy/utils.py ProgressBar), except first and last
        assert len(progress) >= 2 and progress[0]["value"] < progress[-1]["value"]
    else:
        assert len(progress) >= steps  # one message per step at least
    got = output_pixels(server, prompt_id)
    want = cli_reference(prompt, tiny_dirs["flux"], tmp_path_factory, api_file.name, loras_root, files_root)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.shape == w.shape == (64, 64, 3)
        assert np.array_equal(g, w), f"{api_file.name}: ComfyUI PNG differs from the CLI PNG"


def test_tiled_decode_node_matches_the_cli(server, tiny_dirs, loras_root, tmp_path):
    """Decode VAE (Tiled) on 2 Ulysses ranks, one 128×128 image in 3 × 3 tiles of 64 (split over both ranks) equals
    the CLI's tiled decode with the same tiles (which tests/dist/test_split_decode.py checks against diffusers')."""
    prompt = load("ulysses.api.json")
    prompt["3"]["inputs"].update(width=128, height=128, steps=2)
    prompt["4"] = {"class_type": "DistDiffDecodeVAETiled",
                   "inputs": {"pipeline": ["1", 0], "samples": ["3", 0], "tile_size": 64, "overlap": 16}}
    prompt_id, events = server.run(prompt, timeout=240)
    assert "execution_error" not in [e["type"] for e in events], events
    got = output_pixels(server, prompt_id)
    want = cli_pixels(prompt, tiny_dirs["flux"], tmp_path, loras_root,
                      extra=("--vae-tiling", "on", "--vae-tile-size", "64", "--vae-tile-overlap", "16"))
    assert len(got) == len(want) == 1 and got[0].shape == (128, 128, 3)
    assert np.array_equal(got[0], want[0]), "ComfyUI's tiled decode PNG differs from the CLI's"


def test_strategy_auto_plans_the_layout_explains_it_and_equals_the_manual_run(server, tiny_dirs, loras_root,
                                                                            tmp_path_factory):
    prompt = load("auto_plan.api.json")
    manual = load("ulysses.api.json")  # the same graph with Ulysses 2 set by hand
    loader = node_id(prompt, "LoadSharded")
    assert {k: v for k, v in prompt.items() if k != loader} == {k: v for k, v in manual.items() if k != loader}
    assert prompt[loader]["inputs"]["strategy"] == "auto" and prompt[loader]["inputs"]["ulysses"] == 1
    if server.modern:  # ComfyUI's own text display (Preview as Text) on the plan output
        prompt["90"] = {"class_type": "PreviewAny", "inputs": {"source": [loader, 1]}}
    prompt_id, events = server.run(prompt, timeout=240)
    assert "execution_error" not in [e["type"] for e in events], next(
        (e for e in events if e["type"] == "execution_error"), None)
    status = json.loads(server._http("GET", "/distdiff/status"))
    # One image on 2 CPU ranks: Ulysses 2, and the sidecar runs exactly what was planned.
    assert status["strategy"] == "ulysses2" and status["degrees"]["ulysses"] == 2
    plan = status["plan"]
    assert (plan["strategy"], plan["layout"]) == ("auto", "ulysses2")
    assert any(r.startswith("Ulysses 2: 4 heads divide by 2") for r in plan["reasons"])
    assert plan["planned_for"] == "1 image at 1024×1024, guidance 3.5, no negative prompt"
    if server.modern:
        text = server.history(prompt_id)["outputs"]["90"]["text"][0]
        assert text.startswith("strategy auto: planned at load for ") and "\nplan: ulysses2 on 2 GPUs (2 ranks)" in text
    got = output_pixels(server, prompt_id)
    want = cli_reference(manual, tiny_dirs["flux"], tmp_path_factory, "ulysses.api.json", loras_root)
    assert len(got) == len(want) == 1 and np.array_equal(got[0], want[0]), "auto differs from Ulysses 2 by hand"


_CLI_PIXELS: dict[str, list[np.ndarray]] = {}


def cli_reference(prompt: dict, model_dir: Path, tmp_path_factory, name: str, loras_root: Path,
                  files_root: Path | None = None) -> list[np.ndarray]:
    """The CLI's pixels for an example workflow, computed once per test session: every ComfyUI host is compared
    against the same CLI run (the CLI does not depend on the host, and each run costs a sidecar start)."""
    if name not in _CLI_PIXELS:
        _CLI_PIXELS[name] = cli_pixels(prompt, model_dir, tmp_path_factory.mktemp("cli"), loras_root, files_root)
    return _CLI_PIXELS[name]


def _ranks_of(server) -> set[int]:
    return {p.pid for p in rank_processes()}


def test_second_run_reuses_the_sidecar(server):
    prompt = load("ulysses.api.json")
    server.run(prompt, timeout=120)
    before = _ranks_of(server)
    again = copy.deepcopy(prompt)
    again[node_id(again, "ParallelDenoise")]["inputs"]["seed"] = 43  # new work, same pipeline
    _, events = server.run(again, timeout=120)
    assert "execution_error" not in [e["type"] for e in events]
    assert before and _ranks_of(server) == before, "a second run must not start new rank processes"


def test_interrupt_stops_every_rank_and_the_queue_goes_on(server):
    long = load("ulysses.api.json")
    long[node_id(long, "ParallelDenoise")]["inputs"]["steps"] = 1000
    prompt_id = server.queue(long)
    server.wait_event(prompt_id, "progress", timeout=120)
    t0 = time.monotonic()
    assert server.interrupt() == 200
    events = server.wait(prompt_id, timeout=60)
    stopped = time.monotonic() - t0
    assert "execution_interrupted" in [e["type"] for e in events], [e["type"] for e in events]
    print(f"\n[measured] interrupt -> execution_interrupted in {stopped:.2f} s")
    ranks = [psutil.Process(pid) for pid in _ranks_of(server)]
    for proc in ranks:
        proc.cpu_percent(None)
    time.sleep(1.0)
    busy = {proc.pid: proc.cpu_percent(None) for proc in ranks}
    assert all(v < 50 for v in busy.values()), f"ranks still computing after interrupt: {busy}"
    _, events = server.run(load("ulysses.api.json"), timeout=120)  # the next prompt runs normally
    assert "execution_error" not in [e["type"] for e in events]


def test_bad_input_returns_execution_error_with_our_message(server):
    bad = load("ulysses.api.json")
    bad[node_id(bad, "LoadSharded")]["inputs"]["ranks"] = 3
    prompt_id = server.queue(bad)
    events = server.wait(prompt_id, timeout=60)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors, [e["type"] for e in events]
    assert errors[0]["node_type"] == "LoadSharded"
    assert "world_size (3) is not divisible by cfg (1) × ring (1) × ulysses (2) = 2" in errors[0]["exception_message"]
    # The `gpus` input reaches the config through ComfyUI (the example runs on CPU ranks: no GPU to pick).
    bad = load("ulysses.api.json")
    bad[node_id(bad, "LoadSharded")]["inputs"]["gpus"] = "1, 0"
    errors = [e["data"] for e in server.wait(server.queue(bad), timeout=60) if e["type"] == "execution_error"]
    assert errors and "gpus=1,0 picks CUDA devices, but device is 'cpu'" in errors[0]["exception_message"], errors


def test_a_killed_rank_shows_as_the_node_error_and_the_next_prompt_runs(server):
    long = load("data_parallel.api.json")
    long[node_id(long, "ParallelDenoise")]["inputs"]["steps"] = 1000
    prompt_id = server.queue(long)
    server.wait_event(prompt_id, "progress", timeout=120)
    victim = max(_ranks_of(server))
    os.kill(victim, signal.SIGKILL)
    events = server.wait(prompt_id, timeout=60)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and "died" in errors[0]["exception_message"] and "rank" in errors[0]["exception_message"]
    _, events = server.run(load("data_parallel.api.json"), timeout=180)
    assert "execution_error" not in [e["type"] for e in events], "the next prompt must start a fresh sidecar"
    assert victim not in _ranks_of(server)


@pytest.mark.keeps_ranks
def test_comfyui_shutdown_stops_every_rank(comfy_server_factory, models_root):
    others = {p.pid for p in rank_processes()}  # the module server's sidecar is not this test's
    srv = comfy_server_factory(model_paths={"diffusers": [str(models_root)]})
    srv.run(load("ulysses.api.json"), timeout=120)
    ranks = [p for p in rank_processes() if p.pid not in others]
    assert len(ranks) == 2
    srv.stop()
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived ComfyUI: {[p.pid for p in alive]}"


def _post_timed(server, path: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    answer = json.loads(server._http("POST", path, {}))
    return answer, time.monotonic() - t0


def test_release_during_a_long_denoise_answers_at_once_and_stops_every_rank(server):
    """The release route used to stop the ranks inside ComfyUI's event loop, waiting for the session that the
    running denoise holds: the web server (and its Cancel button) froze until the denoise ended. Now the route
    asks the call to stop and stops the ranks on a worker thread: it answers at once, the prompt ends with a clear
    error, and no rank is left."""
    long = load("ulysses.api.json")
    # 64 images × 1000 steps (the inputs' maxima): minutes of work, so the release lands in the middle of it.
    long[node_id(long, "ParallelDenoise")]["inputs"].update(steps=1000, images_per_prompt=64, seed=7)
    prompt_id = server.queue(long)
    server.wait_event(prompt_id, "progress", timeout=120)
    ranks = _ranks_of(server)
    answer, seconds = _post_timed(server, "/distdiff/release")
    print(f"\n[measured] POST /distdiff/release during a denoise answered in {seconds:.3f} s: {answer}")
    assert seconds < 1.0 and answer == {"releasing": True}
    events = server.wait(prompt_id, timeout=60)
    kinds = [e["type"] for e in events]
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors or "execution_interrupted" in kinds, kinds
    if errors:
        assert errors[0]["node_type"] == "ParallelDenoise" and "released" in errors[0]["exception_message"], errors
    assert ranks and not wait_no_ranks(timeout=15), "ranks left after the release"
    _, events = server.run(load("ulysses.api.json"), timeout=180)  # the next prompt starts a fresh sidecar
    assert "execution_error" not in [e["type"] for e in events]


def test_an_identical_prompt_after_a_restart_reuses_the_cached_outputs(server):
    """Embeddings and latents are plain CPU data that stay valid across a sidecar restart: LoadSharded's IS_CHANGED
    follows its inputs and folder only, so the same prompt after POST /distdiff/restart is served from ComfyUI's
    cache (nothing of ours re-runs) and the restarted ranks are left alone."""
    prompt = load("ulysses.api.json")
    prompt[node_id(prompt, "ParallelDenoise")]["inputs"]["seed"] = 99
    server.run(prompt, timeout=180)
    before = _ranks_of(server)
    answer, seconds = _post_timed(server, "/distdiff/restart")
    print(f"\n[measured] POST /distdiff/restart answered in {seconds:.3f} s: {answer}")
    assert seconds < 1.0 and answer == {"restarting": True}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the restart runs on a worker thread: wait for the new ranks to be ready
        status = json.loads(server._http("GET", "/distdiff/status"))
        if status.get("running") and set(status["pids"]).isdisjoint(before):
            break
        time.sleep(0.2)
    restarted = _ranks_of(server)
    assert restarted and restarted.isdisjoint(before), "the restart did not replace the ranks"
    _, events = server.run(prompt, timeout=180)
    ran = {e["data"].get("node") for e in events if e["type"] == "executing"} - {None}
    ours = {node_id(prompt, t) for t in ("LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE")}
    assert not ran & ours, f"nodes re-ran after a restart: {sorted(ran & ours)}"
    assert _ranks_of(server) == restarted
