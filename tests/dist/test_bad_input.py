"""Bad input through the public entry points (Session, CLI): whatever can be known up front is refused with a clear
error before any rank starts (`session.starts == 0`, no rank process); what only a rank can find out comes back
as one typed error and leaves the sidecar usable. The checks themselves are unit-tested in tests/unit
(test_config, test_model_dir, test_cp_config, test_families); here they are proven to run first. Ring with a
padded batch (UnsupportedError) is in tests/dist/test_engine_cp.py."""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError, ModelError, RankError
from dist_backend.session import Session

from tests.dist.reliability_cases import PROMPTS, SHORT, session
from tests.helpers import rank_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def flux_copy(tiny_dirs, tmp_path) -> Path:
    """A private copy of the tiny Flux folder that a test may damage (~0.7 MB)."""
    return Path(shutil.copytree(tiny_dirs["flux"], tmp_path / "flux"))


def _damage(folder: Path, how: str) -> Path:
    if how == "missing":
        return folder / "nope"
    if how == "not diffusers":
        (folder / "model_index.json").unlink()
    elif how == "truncated weights":
        (weights,) = (folder / "transformer").glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "corrupt weights":
        (weights,) = (folder / "vae").glob("*.safetensors")
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32  # inside the JSON header
        weights.write_bytes(bytes(data))
    elif how == "unsupported pipeline":
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionXLPipeline"
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _refused_before_start(config: dict, call, error, *words) -> None:
    s = Session(SessionConfig(world_size=2, threads_per_rank=1, **config))
    with pytest.raises(error) as info:
        call(s)
    s.close()
    assert s.starts == 0 and not rank_processes(), "a rank was started for input that was known to be bad"
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("how, words", [
    ("missing", ["does not exist"]),
    ("not diffusers", ["no model_index.json"]),
    ("truncated weights", ["truncated", "download the model again"]),
    ("corrupt weights", ["corrupt header"]),
    ("unsupported pipeline", ["StableDiffusionXLPipeline", "FluxPipeline"]),
])
def test_bad_model_folder(flux_copy, how, words):
    folder = _damage(flux_copy, how)
    _refused_before_start({}, lambda s: s.load(folder), ModelError, *words)


def test_cp_on_a_transformer_without_cp_plan(flux_copy):
    """A Flux pipeline whose transformer class (as written in model_index.json) has no diffusers _cp_plan."""
    index = json.loads((flux_copy / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (flux_copy / "model_index.json").write_text(json.dumps(index))
    _refused_before_start(dict(ulysses=2), lambda s: s.load(flux_copy), ModelError,
                          "SD3Transformer2DModel", "no context-parallel plan", "data parallel")


def test_more_ranks_than_devices(tiny_dirs):
    """device='cuda' on this machine, which has none (heads vs Ulysses degree: tests/dist/test_engine_dp.py)."""
    _refused_before_start(dict(device="cuda"), lambda s: s.load(tiny_dirs["flux"]), ConfigError,
                          "no usable CUDA device")


@pytest.mark.parametrize("config, words", [
    (dict(world_size=3, ulysses=2), ["world_size (3) is not divisible by cfg (1) × ring (1) × ulysses (2) = 2"]),
    (dict(world_size=4, dp=3, ulysses=2), ["dp (3) × cfg (1) × ring (1) × ulysses (2) = 6, but world_size is 4"]),
    (dict(dtype="float16"), ["float16", "device='cpu'"]),  # a dtype this device cannot run
])
def test_config_refused_at_construction(config, words):
    with pytest.raises(ConfigError) as info:
        SessionConfig(**config)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(height=72), ["height 72 must be a positive multiple of 16", "nearest valid height is 64"]),
    (dict(width=40), ["width 40 must be a positive multiple of 16"]),
    (dict(steps=0), ["steps must be an integer ≥ 1, got 0"]),
    (dict(prompts=[]), ["prompts is empty"]),
    (dict(seed=-1), ["seed must be a non-negative integer"]),
    # image j uses seed + j: the last image's seed must still fit torch's 64-bit generator seed
    (dict(seed=2**64 - 2, images_per_prompt=3), ["seed (18446744073709551614) + prompts (1) × images_per_prompt (3) "
                                                 "− 1 = 18446744073709551616 is over 2^64 − 1",
                                                 "use a seed ≤ 18446744073709551613"]),
])
def test_generate_refuses_bad_arguments_before_starting_ranks(tiny_dirs, kwargs, words):
    args = dict(model_dir=tiny_dirs["flux"], prompts=PROMPTS[:1], **SHORT)
    args.update(kwargs)
    _refused_before_start({}, lambda s: s.generate(**args), ConfigError, *words)


def _cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_backend", "generate", "--prompt", "a fox", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("model, args, words", [  # degrees that do not multiply: tests/dist/test_cli.py
    ("flux", ["--height", "72", "--width", "64"], ["ConfigError", "height 72 must be a positive multiple"]),
    ("missing", [], ["ModelError", "does not exist"]),
])
def test_cli_exit_code_2_and_message(tiny_dirs, tmp_path, model, args, words):
    """Exit code 2, the message on stderr, no traceback, nothing on stdout."""
    folder = tiny_dirs["flux"] if model == "flux" else tmp_path / "missing"
    out = _cli(tmp_path / "out", "--model", str(folder), "--world-size", "2", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout == "" and all(w in out.stderr for w in words), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_what_only_a_rank_can_find_is_one_typed_error_and_the_sidecar_lives(tiny_dirs):
    """Embeddings of the wrong width pass the host's checks (it checks sequence lengths, not the text encoder's
    width); every rank's transformer raises. The host raises one RankError (the first to arrive, with its
    traceback) and the sidecar stays up. (Latents of the wrong channel count no longer reach a rank: the LATENT
    boundary refuses them on the host, checked below.)"""
    s = session()
    try:
        s.load(tiny_dirs["flux"])
        pids = s.sidecar_pids()
        cond = s.encode(PROMPTS[:1])
        wrong = dataclasses.replace(cond, embeds=tuple({**e, "prompt_embeds": e["prompt_embeds"][..., :-1]}
                                                       for e in cond.embeds))
        with pytest.raises(RankError) as info:
            s.denoise(wrong, **SHORT)
        assert info.value.rank in (0, 1) and info.value.phase == "denoise"
        assert "Traceback" in info.value.remote_traceback
        assert s.sidecar_pids() == pids
        with pytest.raises(ConfigError, match="channels"):
            s.decode(torch.zeros(2, 3, 8, 8))  # the host's LATENT check: no call is sent
        assert s.sidecar_pids() == pids
        _, images = s.generate(model_dir=tiny_dirs["flux"], prompts=PROMPTS[:1], **SHORT)
        assert images.shape == (1, 64, 64, 3) and s.starts == 1
    finally:
        s.close()
