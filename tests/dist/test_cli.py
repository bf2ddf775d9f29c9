"""The command line as users run it: generate (image and video families), make-tiny, demo, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.dist.engine_cases import format_of, reference

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_wan_writes_one_png_per_frame_and_a_json_summary(tiny_dirs, tiny_pipes, tmp_path):
    done = run_cli("generate", "--model", str(tiny_dirs["wan"]), "--prompt", "a river", "--prompt", "a desert",
                   "--seed", "9", "--steps", "3", "--guidance", "1.0", "--height", "64", "--width", "64",
                   "--num-frames", "5", "--world-size", "2", "--ring", "2", "--out", str(tmp_path), "--save-tensors")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["strategy"] == "ring2" and summary["ranks"] == 2
    assert set(summary["seconds"]) >= {"start", "load", "encode", "denoise", "decode", "total"}
    assert len(summary["images"]) == 2 * 5 and summary["images"][5].endswith("image_0001_frame_0000.png")
    assert Image.open(summary["images"][0]).size == (64, 64)
    latents = torch.load(tmp_path / "tensors.pt")["latents"]
    diff = float((latents - reference(tiny_pipes, "wan", ["a river", "a desert"], seed=9)).abs().max())
    print(f"\n[measured] CLI wan ring2, 2 prompts × 5 frames: max abs diff vs one process = {diff:.3e}")
    assert diff <= 1e-4


def test_make_tiny_and_demo(tmp_path):
    made = run_cli("make-tiny", "--family", "qwenimage", "--out", str(tmp_path / "q"))
    assert made.returncode == 0, made.stderr[-2000:]
    assert (Path(json.loads(made.stdout)["model"]) / "model_index.json").is_file()
    demo = run_cli("demo", "--out", str(tmp_path / "demo"), "--cache", str(tmp_path / "cache"))
    assert demo.returncode == 0, demo.stderr[-3000:]
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    assert result["ok"] and [r["run"] for r in result["demo"]] == ["ulysses", "data-parallel"]
    assert all(Path(p).is_file() for r in result["demo"] for p in r["pngs"])


def test_bad_input_exits_2_with_the_fix_and_starts_nothing(tiny_dirs, tmp_path):
    done = run_cli("generate", "--model", str(tiny_dirs["flux"]), "--prompt", "x", "--world-size", "4", "--dp", "3",
                   "--ulysses", "2", "--height", "64", "--width", "64", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "dp (3) × cfg (1) × ring (1) × ulysses (2) = 6, but world_size is 4" in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, words", [
    (["--gpus", "1"], ["gpus=1 picks CUDA devices, but device is 'cpu'"]),
    (["--auto", "--world-size", "4", "--gpus", "0,1"], ["--world-size 4 with --gpus 0,1 (2 GPUs)"]),
], ids=["cpu", "auto-count"])  # the rules: tests/unit/test_config.py
def test_bad_gpus_exit_2_naming_the_input_before_any_rank(flags, words, tiny_dirs, tmp_path):
    done = run_cli("generate", "--model", str(tiny_dirs["flux"]), "--prompt", "x", "--height", "64", "--width", "64",
                   "--out", str(tmp_path), *flags)
    assert done.returncode == 2, done.stderr
    for word in words:
        assert word in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_cfg_parallel_without_cfg_is_refused_before_any_rank(tiny_dirs, tmp_path):
    done = run_cli("generate", "--model", str(tiny_dirs["flux"]), "--prompt", "x", "--negative-prompt", "y",
                   "--world-size", "2", "--cfg", "2", "--height", "64", "--width", "64", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "cfg=2 (CFG parallel) needs classifier-free guidance" in done.stderr and "true_cfg_scale" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
def test_generate_starts_img2img_from_a_comfyui_latent_file_and_saves_one(tiny_dirs, tiny_pipes, tmp_path):
    """--init-latent (ComfyUI's .latent format) + --denoise runs img2img under Ulysses, equal to diffusers'
    FluxImg2ImgPipeline in one process; --save-latent writes the result in the same format."""
    from dist_backend.latent_file import read_latent_file, write_latent_file

    init = reference(tiny_pipes, "flux", ["a house"], seed=2, size=dict(height=48, width=64))  # [1, 4, 6, 8]
    latent_file = write_latent_file(tmp_path / "init.latent", init)
    done = run_cli("generate", "--model", str(tiny_dirs["flux"]), "--prompt", "a red fox", "--seed", "9",
                   "--steps", "3", "--init-latent", str(latent_file), "--denoise", "0.6", "--world-size", "2",
                   "--ulysses", "2", "--out", str(tmp_path / "b"), "--save-tensors", "--save-latent")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert Image.open(summary["images"][0]).size == (64, 48)  # the latent's size, not --height/--width
    latents = torch.load(tmp_path / "b" / "tensors.pt")["latents"]
    assert torch.equal(read_latent_file(summary["latent"]), latents)
    expected = reference(tiny_pipes, "flux", ["a red fox"], seed=9, denoise=0.6, init=init,
                         size=dict(height=48, width=64))
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] CLI flux img2img ulysses2 from a .latent file: max abs diff vs diffusers img2img = {diff:.3e}")
    assert diff <= 1e-4
    bad = run_cli("generate", "--model", str(tiny_dirs["flux"]), "--prompt", "x", "--init-latent",
                  summary["images"][0], "--denoise", "0.5", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "cannot be read as a ComfyUI .latent file" in bad.stderr


def test_generate_auto_chooses_a_valid_plan_and_equals_one_process(tiny_dirs, tiny_pipes, tmp_path):
    # One image on 2 CPU ranks: nothing for data parallelism, so the planner splits the image (Ulysses: the tiny
    # Flux has 4 heads). The degrees and the reasons come back in the summary.
    done = run_cli("generate", "--auto", "--model", str(tiny_dirs["flux"]), "--prompt", "a cat", "--seed", "5",
                   "--steps", "3", "--guidance", "3.5", "--height", "64", "--width", "64", "--world-size", "2",
                   "--out", str(tmp_path), "--save-tensors")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    plan = summary["plan"]
    assert plan["dp"] * plan["cfg"] * plan["ring"] * plan["ulysses"] * plan["gpus_per_rank"] == 2
    assert (plan["dp"], plan["ulysses"]) == (1, 2) and summary["strategy"] == plan["strategy"] == "ulysses2"
    assert any("4 heads divide by 2" in r for r in plan["reasons"])
    assert plan["vae_tiling"] is False and summary["decode"] == {"tiling": "off", "split": False}  # the plan's choice
    latents = torch.load(tmp_path / "tensors.pt")["latents"]
    diff = float((latents - reference(tiny_pipes, "flux", ["a cat"], seed=5)).abs().max())
    print(f"\n[measured] CLI --auto (ulysses2), tiny flux: max abs diff vs one process = {diff:.3e}")
    assert diff <= 1e-4


def test_guidance_flags_reach_the_pipeline(tiny_dirs, tiny_pipes, tmp_path):
    """--true-cfg (Flux true CFG, with a negative prompt) and --guidance-2 (Wan 2.2 A14B's second expert, on the tiny
    two-expert model made by make-tiny --family wan22) equal the plain pipeline with the same options."""
    from diffusers import DiffusionPipeline

    from dist_backend.pipelines import adapter_for
    from dist_backend.pipelines.base import ImageRequest

    made = run_cli("make-tiny", "--family", "wan22", "--out", str(tmp_path / "wan22"))
    assert made.returncode == 0, made.stderr[-2000:]
    wan22 = DiffusionPipeline.from_pretrained(tmp_path / "wan22")
    wan22.set_progress_bar_config(disable=True)
    cases = [
        ("flux", tiny_dirs["flux"], tiny_pipes["flux"], ["--guidance", "3.5", "--true-cfg", "2.5"],
         dict(guidance=3.5, true_cfg_scale=2.5), {}),
        ("wan", tmp_path / "wan22", wan22, ["--guidance", "2.0", "--guidance-2", "4.0", "--num-frames", "5"],
         dict(guidance=2.0, guidance_2=4.0), dict(num_frames=5)),
    ]
    for family, model, pipe, flags, options, size in cases:
        out = tmp_path / f"out-{family}"
        done = run_cli("generate", "--model", str(model), "--prompt", "a river", "--negative-prompt", "blurry",
                       "--seed", "4", "--steps", "3", "--height", "64", "--width", "64", *flags, "--out", str(out),
                       "--save-tensors")
        assert done.returncode == 0, done.stderr[-3000:]
        latents = torch.load(out / "tensors.pt")["latents"]
        expected = format_of({family: pipe}, family).process_out(adapter_for(family).reference(
            pipe, prompt="a river", negative_prompt="blurry",
            request=ImageRequest(seed=4, steps=3, height=64, width=64, **options, **size)))
        diff = float((latents - expected).abs().max())
        print(f"\n[measured] CLI {family} {' '.join(flags)}: max abs diff vs one process = {diff:.3e}")
        assert diff <= 1e-4


def test_generate_from_single_files_and_a_wrong_file_is_refused_before_start(tiny_dirs, tiny_pipes, tmp_path):
    from dist_backend.files.tiny_files import write_flux_files

    paths = write_flux_files(tiny_dirs["flux"], tmp_path / "files", storage="fp32", comfy_prefix=True)
    files = ",".join(f"{part}={path}" for part, path in paths.items())
    args = ("generate", "--family", "flux", "--configs", str(tiny_dirs["flux"]), "--prompt", "a cat", "--seed", "2",
            "--steps", "3", "--height", "64", "--width", "64", "--world-size", "1", "--save-tensors")
    done = run_cli(*args, "--files", files, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    latents = torch.load(tmp_path / "out" / "tensors.pt")["latents"]
    assert float((latents - reference(tiny_pipes, "flux", ["a cat"], seed=2)).abs().max()) <= 1e-6
    wrong = files.replace(f"transformer={paths['transformer']}", f"transformer={paths['vae']}")
    bad = run_cli(*args, "--files", wrong, "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert f"transformer file '{paths['vae']}' is an image VAE" in bad.stderr and "expects a Flux transformer" in bad.stderr
    assert not (tmp_path / "bad").exists()
