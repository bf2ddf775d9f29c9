"""Model folders: read_model_config's checks (no weights loaded), the registry, and the tiny-pipeline builder."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dist_backend.errors import ConfigError, ModelError
from dist_backend.pipelines import Family, adapter_for, check_safetensors, load_pipeline, read_model_config


@pytest.fixture
def flux_copy(tiny_dirs, tmp_path) -> Path:
    """A private copy of the tiny Flux folder (~0.7 MB) that a test may damage."""
    return Path(shutil.copytree(tiny_dirs["flux"], tmp_path / "flux"))


def transformer_weights(folder: Path) -> Path:
    (path,) = sorted((folder / "transformer").glob("*.safetensors"))
    return path


def test_reads_a_valid_folder(tiny_dirs):
    cfg = read_model_config(tiny_dirs["flux"])
    assert cfg["family"] is Family.FLUX and cfg["class_name"] == "FluxPipeline"
    assert cfg["components"]["transformer"]["num_attention_heads"] == 4
    assert cfg["components"]["vae"]["block_out_channels"] == [8, 8, 8, 8]
    assert "shift" in cfg["components"]["scheduler"]
    assert sorted(cfg["models"]) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    wan = read_model_config(tiny_dirs["wan"])
    assert wan["family"] is Family.WAN and "transformer_2" not in wan["components"]  # null in model_index.json


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_model_config(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no model_index.json"):
        read_model_config(tmp_path)


def test_unsupported_pipeline_class(flux_copy):
    index = json.loads((flux_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (flux_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as info:
        read_model_config(flux_copy)
    message = str(info.value)
    assert "StableDiffusionXLPipeline" in message
    assert all(name in message for name in ("FluxPipeline", "QwenImagePipeline", "WanPipeline"))


def test_missing_component_folder(flux_copy):
    shutil.rmtree(flux_copy / "vae")
    with pytest.raises(ModelError, match=r"vae.*missing.*download the model again"):
        read_model_config(flux_copy)


def test_component_without_weights(flux_copy):
    transformer_weights(flux_copy).unlink()
    with pytest.raises(ModelError, match="no weights"):
        read_model_config(flux_copy)


def test_truncated_safetensors(flux_copy):
    path = transformer_weights(flux_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # an interrupted download
    with pytest.raises(ModelError, match="truncated") as info:
        read_model_config(flux_copy)
    assert path.name in str(info.value) and "download the model again" in str(info.value)


def test_truncated_inside_header(flux_copy):
    path = transformer_weights(flux_copy)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ModelError, match="truncated"):
        check_safetensors(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelError, match="truncated"):
        check_safetensors(path)


@pytest.mark.parametrize("damage", ["garbage_json", "huge_length", "no_offsets"])
def test_corrupt_header(flux_copy, damage):
    path = transformer_weights(flux_copy)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if damage == "garbage_json":
        data[8:8 + n] = b"\xff" * n
    elif damage == "huge_length":
        data[:8] = struct.pack("<Q", 1 << 40)
    else:
        header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode().ljust(n)
        data[8:8 + n] = header
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt header"):
        read_model_config(flux_copy)


def test_registry_and_unknown_family():
    assert Family("wan") is Family.WAN and str(Family.FLUX) == "flux"
    assert json.dumps(Family.QWENIMAGE) == '"qwenimage"'
    with pytest.raises(ConfigError, match="flux, qwenimage, wan"):
        adapter_for("sdxl")


def test_import_is_light():
    """Importing the registry starts nothing heavy: neither torch nor diffusers."""
    code = "import sys, dist_backend.pipelines; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_load_pipeline_only_asked_components(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["qwenimage"], components={"vae"})
    assert pipe.vae is not None and pipe.transformer is None and pipe.text_encoder is None
    assert pipe.tokenizer is not None and pipe.scheduler is not None  # light components always come along


# -- tiny builder -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_make_tiny_is_deterministic(tmp_path, family):
    from dist_backend.pipelines.tiny import make_tiny

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    a = files(make_tiny(family, tmp_path / "a", seed=3))
    b = files(make_tiny(family, tmp_path / "b", seed=3))
    c = files(make_tiny(family, tmp_path / "c", seed=4))
    assert a == b  # weights, tokenizers and configs, byte for byte
    weights = [k for k in a if k.startswith("transformer/") and k.endswith(".safetensors")]
    assert weights and all(a[k] != c[k] for k in weights)
    assert sum(len(v) for v in a.values()) < 4 * 1024 * 1024  # "a few MB at most"


def test_tiny_cached_is_atomic_and_reused(tmp_path, monkeypatch):
    """Racing callers all get the complete folder; one build wins the rename, the others' copies are removed."""
    from dist_backend.pipelines import tiny

    builds = []

    def fake_make_tiny(family, out_dir, *, seed=0):  # the protocol under test, not the (tested) builder
        builds.append(seed)
        Path(out_dir, "model_index.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(tiny, "make_tiny", fake_make_tiny)
    results, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(tiny.tiny_cached("flux", tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and len(set(results)) == 1
    final = results[0]
    assert (final / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temp folders left behind
    n = len(builds)
    assert tiny.tiny_cached("flux", tmp_path) == final and len(builds) == n  # reused, not rebuilt
