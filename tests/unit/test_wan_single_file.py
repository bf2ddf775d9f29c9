"""Wan 2.1 from single files: the original transformer layout against diffusers' own converter (the VAE's, shared
with Qwen-Image: tests/unit/test_qwen_single_file.py), the assembled pipeline
(weights and the tokenizer carried inside the umt5 file) against the tiny diffusers folder, and detection of bad
input from headers only."""

from __future__ import annotations

import pytest
import torch

from dist_backend.errors import ConfigError, ModelError
from dist_backend.files import ModelFiles, parse_files_arg, read_files_config
from dist_backend.files.detect import FileInfo, FileKind
from dist_backend.files.tiny_files import write_flux_files, write_wan_files

PROMPTS = ("a red fox in the snow", "A  Lighthouse, at dusk!", "ünïcode ok")


@pytest.fixture(scope="module")
def files(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-files")
    return {storage: write_wan_files(tiny_dirs["wan"], root / storage, storage=storage, comfy_prefix=prefix)
            for storage, prefix in (("fp32", False), ("fp16", True))}


def wan(paths, tiny_dirs, **overrides) -> ModelFiles:
    return ModelFiles(**{"family": "wan", "configs": str(tiny_dirs["wan"]), **paths, **overrides})


def test_each_part_is_recognised_from_its_header(files):
    from dist_backend.files.detect import inspect_file

    t = inspect_file(files["fp16"]["transformer"], role="transformer")
    assert (t.kind, t.prefix) == (FileKind.WAN_TRANSFORMER, "model.diffusion_model.")
    assert inspect_file(files["fp32"]["transformer"], role="transformer").prefix == ""
    e = inspect_file(files["fp16"]["text_encoder"], role="text_encoder")
    assert e.kind is FileKind.UMT5_ENCODER and "spiece_model" in e.shapes
    assert inspect_file(files["fp16"]["vae"], role="vae").kind is FileKind.WAN_VAE


def test_the_transformer_inverse_round_trips_through_diffusers_converter(tiny_pipes):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from dist_backend.files.wan_layout import diffusers_to_wan_transformer

    ours = tiny_pipes["wan"].transformer.state_dict()
    original = diffusers_to_wan_transformer(ours)
    assert {"head.modulation", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.self_attn.q.weight",
            "blocks.0.cross_attn.o.weight", "time_projection.1.weight", "text_embedding.0.weight"} <= original.keys()
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_assembled_weights_and_tokenizer_equal_the_folder(storage, files, tiny_dirs, tiny_pipes):
    """fp32 files: the folder's weights bit for bit; fp16 files: the folder's weights rounded to fp16, bit for bit.
    The tokenizer comes from the umt5 file's own sentencepiece model (tokenizers not given)."""
    from dist_backend.files.assemble import load_files_pipeline

    info = read_files_config(wan(files[storage], tiny_dirs))
    assert info["tokenizers"] == {"tokenizer": files[storage]["text_encoder"]}
    pipe = load_files_pipeline(info, components=info["models"], dtype=torch.float32)
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer_2 is None
    for name in info["models"]:
        want, got = getattr(tiny_pipes["wan"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        if storage == "fp16":
            want = {k: v.half().float() for k, v in want.items()}
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert not getattr(pipe, name).training
    folder_tok = tiny_pipes["wan"].tokenizer
    assert pipe.tokenizer.model_max_length == folder_tok.model_max_length == 32
    for prompt in PROMPTS:
        assert pipe.tokenizer(prompt).input_ids == folder_tok(prompt).input_ids


def test_a_wan_vae_given_as_the_diffusion_model_is_refused_naming_the_file(files, tiny_dirs):
    paths = files["fp32"]
    with pytest.raises(ModelError, match=r"transformer file .*wan_2.1_vae-tiny.* is a Wan / Qwen-Image video VAE, but "
                                         r"wan expects a Wan transformer there; pick the diffusion model .*wan2.1_t2v"):
        read_files_config(wan({**paths, "transformer": paths["vae"]}, tiny_dirs))


def test_flux_files_with_family_wan_are_refused_naming_the_file(files, tiny_dirs, tmp_path):
    flux = write_flux_files(tiny_dirs["flux"], tmp_path, storage="fp32")
    with pytest.raises(ModelError, match=r"flux1-tiny-fp32.* is a Flux transformer .* but wan expects a Wan transformer"):
        read_files_config(wan({**files["fp32"], "transformer": flux["transformer"]}, tiny_dirs))
    with pytest.raises(ModelError, match=r"t5xxl-tiny.* is a T5 text encoder, but wan expects a UMT5 .*umt5_xxl"):
        read_files_config(wan({**files["fp32"], "text_encoder": flux["text_encoder_2"]}, tiny_dirs))
    # And the other way: a Wan transformer with family flux.
    with pytest.raises(ModelError, match=r"wan2.1-tiny.* is a Wan transformer, but flux expects"):
        read_files_config(ModelFiles(family="flux", configs=str(tiny_dirs["flux"]),
                                     **{**flux, "transformer": files["fp32"]["transformer"]}))


def test_a_umt5_file_without_its_tokenizer_needs_a_tokenizer_folder(tiny_dirs, tmp_path):
    paths = write_wan_files(tiny_dirs["wan"], tmp_path / "w", storage="fp32", spiece=False)
    with pytest.raises(ModelError, match=r"no tokenizer for text_encoder: .*umt5-tiny.* does not carry one .*"
                                         r"'spiece_model'.* has no tokenizer folder"):
        read_files_config(wan(paths, tiny_dirs, tokenizers=str(tmp_path)))  # tmp_path: no tokenizer folder
    info = read_files_config(wan(paths, tiny_dirs))  # the folder given as configs has tokenizer/
    assert info["tokenizers"] == {"tokenizer": str(tiny_dirs["wan"] / "tokenizer")}


def test_tiny_files_without_configs_have_no_shipped_config_and_say_so(files):
    with pytest.raises(ModelError, match=r"Wan transformer of width 32, which has no shipped config .*1536 = "
                                         r"wan2.1-t2v-1.3b, 5120 = wan2.1-t2v-14b.*give configs"):
        read_files_config(ModelFiles(family="wan", **files["fp32"]))


def _info(shapes: dict, kind=FileKind.WAN_TRANSFORMER) -> FileInfo:
    return FileInfo(path="/m/x.safetensors", kind=kind, prefix="", shapes=shapes, dtypes={}, scaled_fp8=False)


def test_the_shipped_config_is_picked_from_the_transformer_width_and_i2v_is_refused():
    from dist_backend.files.wan_checks import shipped_wan_model

    assert shipped_wan_model({"transformer": _info({"patch_embedding.weight": (1536, 16, 1, 2, 2)})}) == "wan2.1-t2v-1.3b"
    assert shipped_wan_model({"transformer": _info({"patch_embedding.weight": (5120, 16, 1, 2, 2)})}) == "wan2.1-t2v-14b"
    with pytest.raises(ModelError, match="36 input channels; single files are supported for the text-to-video"):
        shipped_wan_model({"transformer": _info({"patch_embedding.weight": (5120, 36, 1, 2, 2)})})


@pytest.mark.parametrize("model", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_the_shipped_configs_describe_the_real_models(model):
    """Built on the meta device: Wan 2.1 T2V 1.3B / 14B, the umt5-xxl encoder and the Wan 2.1 VAE."""
    import json

    import transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from dist_backend.files import CONFIGS_ROOT

    root = CONFIGS_ROOT / model
    cfg = {name: json.loads((root / name / "config.json").read_text()) for name in ("transformer", "vae", "text_encoder")}
    with torch.device("meta"):
        models = {"transformer": WanTransformer3DModel.from_config(cfg["transformer"]),
                  "vae": AutoencoderKLWan.from_config(cfg["vae"]),
                  "text_encoder": transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg["text_encoder"]))}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert round(counts["transformer"] / 1e9, 2) == (1.42 if model == "wan2.1-t2v-1.3b" else 14.29)
    assert round(counts["text_encoder"] / 1e9, 2) == 5.68
    assert round(counts["vae"] / 1e6, 1) == 126.9
    assert json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "UniPCMultistepScheduler"


def test_wan22_takes_its_second_expert_exactly_when_the_configs_have_one(wan22, files, tiny_dirs, tmp_path):
    paths = write_wan_files(wan22[0], tmp_path / "w22", storage="fp32")
    assert set(paths) == {"transformer", "transformer_2", "text_encoder", "vae"}
    info = read_files_config(wan(paths, tiny_dirs, configs=str(wan22[0])))
    assert info["models"] == ["transformer", "text_encoder", "vae", "transformer_2"]
    assert info["model_index"]["boundary_ratio"] == 0.875
    with pytest.raises(ConfigError, match=r"describe a model with transformer_2: give the second diffusion model .*"
                                          r"low-noise expert.*diffusion_model_2"):
        read_files_config(wan({**paths, "transformer_2": ""}, tiny_dirs, configs=str(wan22[0])))
    with pytest.raises(ConfigError, match=r"transformer_2 is given .* describe a model without it"):
        read_files_config(wan({**files["fp32"], "transformer_2": paths["transformer_2"]}, tiny_dirs))
    assert parse_files_arg("transformer=/h.safetensors,transformer_2=/l.safetensors") == {
        "transformer": "/h.safetensors", "transformer_2": "/l.safetensors"}


def test_two_14b_experts_pick_the_wan22_config():
    from dist_backend.files.wan_checks import shipped_wan_model

    expert = _info({"patch_embedding.weight": (5120, 16, 1, 2, 2)})
    assert shipped_wan_model({"transformer": expert, "transformer_2": expert}) == "wan2.2-t2v-a14b"
    small = _info({"patch_embedding.weight": (1536, 16, 1, 2, 2)})
    with pytest.raises(ModelError, match="two Wan experts of width 1536"):
        shipped_wan_model({"transformer": small, "transformer_2": small})


def test_fp8_storage_keeps_the_blocks_in_fp8_and_the_embedders_in_the_compute_dtype(files, tiny_dirs, tiny_pipes):
    from dist_backend.files.assemble import load_transformer

    info = read_files_config(wan(files["fp32"], tiny_dirs, weights="fp8"))
    model = load_transformer(info, dtype=torch.float32)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == dtypes["blocks.0.ffn.net.0.proj.weight"] == torch.float8_e4m3fn
    assert dtypes["patch_embedding.weight"] == dtypes["condition_embedder.time_embedder.linear_1.weight"] == \
        dtypes["proj_out.weight"] == torch.float32
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x, timestep=torch.tensor([500]), encoder_hidden_states=text).sample
        want = tiny_pipes["wan"].transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=text).sample
    assert got.shape == want.shape and 1e-6 < float((got - want).abs().max()) < 0.1  # fp8 rounding, not garbage
