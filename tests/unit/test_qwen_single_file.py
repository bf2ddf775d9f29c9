"""Qwen-Image from single files (ComfyUI's qwen_image_*, qwen_2.5_vl_7b*, qwen_image_vae): detection from headers
only with each bad input of the issue, the Wan-VAE layout converter (Qwen-Image's and Wan's) against diffusers'
own, the shipped configs, and the assembled pipeline's weights against the diffusers folder's."""

from __future__ import annotations

import json

import pytest
import torch

from dist_backend.errors import ConfigError, ModelError
from dist_backend.files import CONFIGS_ROOT, ModelFiles, read_files_config
from dist_backend.files.detect import FileKind, inspect_file
from dist_backend.files.tiny_files import write_flux_files, write_qwenimage_files


@pytest.fixture(scope="module")
def files(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-files")
    out = {storage: write_qwenimage_files(tiny_dirs["qwenimage"], root / storage, storage=storage, comfy_prefix=prefix)
           for storage, prefix in (("fp32", False), ("fp16", True), ("scaled_fp8", True))}
    out["flux"] = write_flux_files(tiny_dirs["flux"], root / "flux", storage="fp32")
    return out


def qwen(files, tiny_dirs, **overrides) -> ModelFiles:
    return ModelFiles(**{"family": "qwenimage", "configs": str(tiny_dirs["qwenimage"]), **files, **overrides})


def test_each_part_is_recognised_from_its_header(files):
    kinds = {part: inspect_file(path, role=part) for part, path in files["scaled_fp8"].items()}
    assert kinds["transformer"].kind is FileKind.QWENIMAGE_TRANSFORMER
    assert kinds["transformer"].prefix == "model.diffusion_model."
    assert kinds["transformer"].fp8 and kinds["transformer"].scaled_fp8
    # The whole Qwen2.5-VL checkpoint is the part (model.*, visual.*), so its prefix is empty.
    assert kinds["text_encoder"].kind is FileKind.QWEN25_VL and kinds["text_encoder"].prefix == ""
    assert kinds["text_encoder"].scaled_fp8 and "visual.patch_embed.proj.weight" in kinds["text_encoder"].shapes
    assert kinds["vae"].kind is FileKind.WAN_VAE and not kinds["vae"].fp8
    plain = inspect_file(files["fp32"]["transformer"], role="transformer")
    assert plain.prefix == "" and not plain.fp8 and set(plain.dtypes) == {"F32"}
    assert set(inspect_file(files["fp16"]["vae"], role="vae").dtypes) == {"F16"}


def test_a_good_set_gives_the_planning_info_of_the_folder(files, tiny_dirs):
    from dist_backend.pipelines import read_model_config

    info = read_files_config(qwen(files["fp16"], tiny_dirs))
    folder = read_model_config(tiny_dirs["qwenimage"])
    assert info["family"] == folder["family"] and info["class_name"] == "QwenImagePipeline"
    assert info["models"] == ["transformer", "text_encoder", "vae"]
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        assert info["components"][name] == folder["components"][name]
    assert info["tokenizers"] == {"tokenizer": str(tiny_dirs["qwenimage"] / "tokenizer")}


@pytest.mark.parametrize("part, other, found, expected", [
    ("transformer", ("flux", "transformer"), "a Flux transformer", "a Qwen-Image transformer"),
    ("transformer", ("fp32", "vae"), "a Wan / Qwen-Image video VAE", "a Qwen-Image transformer"),
    ("text_encoder", ("flux", "text_encoder_2"), "a T5 text encoder", "a Qwen2.5-VL text encoder"),
    ("vae", ("flux", "vae"), "an image VAE (LDM layout", "a Wan / Qwen-Image video VAE"),
])
def test_a_file_of_another_part_or_family_is_refused_naming_the_file(files, tiny_dirs, part, other, found, expected):
    wrong = files[other[0]][other[1]]
    with pytest.raises(ModelError) as err:
        read_files_config(qwen(files["fp32"], tiny_dirs, **{part: wrong}))
    text = str(err.value)
    assert wrong in text and found in text and f"qwenimage expects {expected}" in text, text


def test_qwen_files_with_family_flux_are_refused(files, tiny_dirs):
    with pytest.raises(ModelError, match="is a Qwen-Image transformer .*, but flux expects a Flux transformer"):
        read_files_config(ModelFiles(family="flux", configs=str(tiny_dirs["flux"]),
                                     **{**files["flux"], "transformer": files["fp32"]["transformer"]}))
    with pytest.raises(ModelError, match="text_encoder file .* is a Qwen2.5-VL text encoder .*, but flux expects"):
        read_files_config(ModelFiles(family="flux", configs=str(tiny_dirs["flux"]),
                                     **{**files["flux"], "text_encoder": files["fp32"]["text_encoder"]}))
    with pytest.raises(ConfigError, match="qwenimage has no text_encoder_2"):
        read_files_config(qwen(files["fp32"], tiny_dirs, text_encoder_2=files["flux"]["text_encoder_2"]))


def test_a_truncated_file_is_refused_before_any_rank(files, tiny_dirs, tmp_path):
    data = open(files["fp32"]["text_encoder"], "rb").read()
    cut = tmp_path / "qwen_2.5_vl_7b.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError, match=r"qwen_2\.5_vl_7b\.safetensors' is truncated.*download it again"):
        read_files_config(qwen(files["fp32"], tiny_dirs, text_encoder=str(cut)))


def test_a_missing_tokenizer_names_comfyuis_qwen_tokenizer_folder(files, tiny_dirs, tmp_path):
    (tmp_path / "comfy" / "sd1_tokenizer").mkdir(parents=True)  # an old ComfyUI: CLIP's tokenizer only
    (tmp_path / "comfy" / "sd1_tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no tokenizer \(for text_encoder\) in .*text_encoders/qwen25_tokenizer"):
        read_files_config(qwen(files["fp32"], tiny_dirs, tokenizers=str(tmp_path)))


def test_files_of_another_size_than_the_shipped_configs_are_refused(files, tiny_dirs):
    # No configs given: the shipped Qwen-Image configs are used, and the tiny files do not fit them.
    with pytest.raises(ModelError, match=r"does not match the architecture config in .*qwen-image.*img_in.weight"):
        read_files_config(ModelFiles(family="qwenimage", **files["fp32"]))


def test_a_language_model_without_the_vision_tower_is_refused(files, tiny_dirs, tmp_path):
    """A Qwen LM (as other families' text encoders are) is not Qwen2.5-VL: the check names the missing tower."""
    from safetensors.torch import load_file, save_file

    lm_only = tmp_path / "qwen_lm.safetensors"
    save_file({k: t for k, t in load_file(files["fp32"]["text_encoder"]).items() if not k.startswith("visual.")},
              str(lm_only))
    with pytest.raises(ModelError, match="qwen_lm.safetensors' does not match .*vision tower's patch embedding shape "
                                         r"is None, the config says \(16, 3, 2, 14, 14\)"):
        read_files_config(qwen(files["fp32"], tiny_dirs, text_encoder=str(lm_only)))


@pytest.mark.parametrize("model", ["qwen-image", "wan2.1-t2v-1.3b", "tiny qwenimage", "tiny wan"])
def test_our_wan_vae_converter_equals_diffusers_on_the_real_layout(model, tiny_dirs):
    """The one Wan-VAE converter, for Qwen-Image's and Wan's VAE (AutoencoderKLQwenImage, AutoencoderKLWan).
    diffusers' converter has the real VAE's block table built in, so both run on the real layout's names (one
    element per tensor); ours also reads the tiny layout, and each direction inverts the other."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from dist_backend.files.wan_vae_layout import diffusers_to_wan_vae, wan_vae_to_diffusers

    root = tiny_dirs[model.split()[1]] if model.startswith("tiny ") else CONFIGS_ROOT / model
    config = json.loads((root / "vae" / "config.json").read_text())
    cls = getattr(diffusers, json.loads((root / "model_index.json").read_text())["vae"][1])
    with torch.device("meta"):
        names = list(cls.from_config(config).state_dict())
    ours = {n: torch.tensor([float(i)]) for i, n in enumerate(names)}
    original = diffusers_to_wan_vae(ours, config=config)
    assert "decoder.upsamples.0.residual.0.gamma" in original and "decoder.head.0.gamma" in original
    back = wan_vae_to_diffusers(dict(original), config=config)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    assert (config["num_res_blocks"] == 2) is (not model.startswith("tiny "))  # the real depth; the tiny ones differ
    if config["num_res_blocks"] == 2:
        # The real decoder's flat list: upsampler after each level's three residual blocks (3, 7, 11).
        assert "decoder.upsamples.3.resample.1.weight" in original and "decoder.upsamples.4.shortcut.weight" in original
        theirs = convert_wan_vae_to_diffusers(dict(original))
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.fixture(scope="module")
def real_models():
    """The shipped Qwen-Image configs and the models they describe, built once on the meta device (no memory)."""
    import transformers
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    root = CONFIGS_ROOT / "qwen-image"
    cfg = {name: json.loads((root / name / "config.json").read_text())
           for name in ("transformer", "vae", "text_encoder")}
    with torch.device("meta"):
        models = {"transformer": QwenImageTransformer2DModel.from_config(cfg["transformer"]),
                  "vae": AutoencoderKLQwenImage.from_config(cfg["vae"]),
                  "text_encoder": transformers.Qwen2_5_VLForConditionalGeneration(
                      transformers.Qwen2_5_VLConfig(**cfg["text_encoder"]))}
    return cfg, models


def test_the_shipped_configs_describe_the_real_model(real_models):
    """Qwen-Image's 20.43 B transformer, Qwen2.5-VL-7B's 8.29 B, the 126.9 M VAE."""
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in real_models[1].items()}
    assert round(counts["transformer"] / 1e9, 2) == 20.43
    assert round(counts["text_encoder"] / 1e9, 2) == 8.29
    assert round(counts["vae"] / 1e6, 1) == 126.9


def test_assembled_weights_are_bit_identical_to_the_folder(files, tiny_dirs, tiny_pipes):
    from dist_backend.files.assemble import load_files_pipeline

    info = read_files_config(qwen(files["fp32"], tiny_dirs))
    pipe = load_files_pipeline(info, components=info["models"], dtype=torch.float32)
    assert type(pipe).__name__ == "QwenImagePipeline"
    for name in info["models"]:
        want, got = getattr(tiny_pipes["qwenimage"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        # The fixture has no lm_head (as files saved from ComfyUI): the head shares the token embedding.
        assert differ == (["lm_head.weight"] if name == "text_encoder" else []), (name, differ)
        assert not getattr(pipe, name).training
    te = pipe.text_encoder
    assert te.lm_head.weight.data_ptr() == te.model.language_model.embed_tokens.weight.data_ptr()


def test_the_folders_own_files_load_too(files, tiny_dirs, tiny_pipes):
    """The folder's transformer (diffusers names, no prefix) and text encoder (saved by transformers: original
    layout with its lm_head) used as single files load bit for bit, lm_head included."""
    from dist_backend.files.assemble import load_files_pipeline

    folder = tiny_dirs["qwenimage"]
    info = read_files_config(qwen(files["fp32"], tiny_dirs,
                                  transformer=str(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
                                  text_encoder=str(folder / "text_encoder" / "model.safetensors")))
    pipe = load_files_pipeline(info, components=["transformer", "text_encoder"], dtype=torch.float32)
    assert pipe.vae is None
    for name in ("transformer", "text_encoder"):
        want, got = getattr(tiny_pipes["qwenimage"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_comfyuis_mixed_precision_quantised_files_are_refused_on_the_host(files, tiny_dirs, tmp_path):
    """Newer ComfyUI's quantised files (per-layer `comfy_quant` settings and `weight_scale`) are not the scaled fp8
    this pack reads: refused from the header, naming the file and the files to pick instead."""
    from safetensors.torch import load_file, save_file

    state = load_file(files["fp32"]["transformer"])
    state["transformer_blocks.0.attn.to_q.weight"] = state["transformer_blocks.0.attn.to_q.weight"].to(
        torch.float8_e4m3fn)
    state["transformer_blocks.0.attn.to_q.weight_scale"] = torch.ones(())
    state["transformer_blocks.0.attn.to_q.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                       dtype=torch.uint8)
    mixed = tmp_path / "qwen_image_fp8mixed.safetensors"
    save_file(state, str(mixed))
    with pytest.raises(ModelError, match=r"qwen_image_fp8mixed.safetensors' is a Qwen-Image transformer .* "
                                         r"mixed-precision .*pick the bf16 / fp16, fp8_e4m3fn or fp8 scaled file"):
        read_files_config(qwen(files["fp32"], tiny_dirs, transformer=str(mixed)))


def _sparse_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """A safetensors file with these (dtype, shape) entries whose data is a hole (sparse: no disk, no weights),
    so its header describes a real-size file."""
    import struct

    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return str(path)


def test_real_size_comfyui_files_fit_the_shipped_configs(real_models, tmp_path):
    """Headers of real-size files in ComfyUI's layouts (names and shapes from the real architectures: the fp8
    transformer under ComfyUI's prefix, Qwen2.5-VL-7B scaled fp8 without lm_head, the bf16 Wan-layout VAE) pass the
    host check with the shipped Qwen-Image configs, which load as the real model."""
    from dist_backend.files.qwen_layout import LM_HEAD, transformers_to_text_encoder
    from dist_backend.files.wan_vae_layout import diffusers_to_wan_vae

    cfg, models = real_models
    transformer, vae, text = models["transformer"].state_dict(), models["vae"].state_dict(), models["text_encoder"]
    fp8 = {"model.diffusion_model." + k: ("F8_E4M3" if k.endswith(".weight") and t.ndim == 2 else "BF16", t.shape)
           for k, t in transformer.items()}
    te = {}
    for k, t in transformers_to_text_encoder(text.state_dict()).items():
        if k == LM_HEAD:
            continue
        if k.endswith(".weight") and t.ndim == 2 and k != "model.embed_tokens.weight":
            te[k] = ("F8_E4M3", t.shape)
            te[k[: -len("weight")] + "scale_weight"] = ("F32", ())
        else:
            te[k] = ("BF16", t.shape)
    te["scaled_fp8"] = ("F8_E4M3", (0,))
    paths = {"transformer": _sparse_safetensors(tmp_path / "qwen_image_fp8_e4m3fn.safetensors", fp8),
             "text_encoder": _sparse_safetensors(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", te),
             "vae": _sparse_safetensors(tmp_path / "qwen_image_vae.safetensors",
                                        {k: ("BF16", t.shape) for k, t in diffusers_to_wan_vae(vae, config=cfg["vae"])
                                         .items()})}
    (tmp_path / "comfy" / "text_encoders" / "qwen25_tokenizer").mkdir(parents=True)
    (tmp_path / "comfy" / "text_encoders" / "qwen25_tokenizer" / "vocab.json").write_text("{}")
    info = read_files_config(ModelFiles(family="qwenimage", tokenizers=str(tmp_path), **paths))
    assert info["configs_dir"] == str(CONFIGS_ROOT / "qwen-image") and info["class_name"] == "QwenImagePipeline"
    assert info["files"]["transformer"]["prefix"] == "model.diffusion_model." and info["files"]["transformer"]["fp8"]
    assert info["files"]["text_encoder"]["scaled_fp8"] and not info["files"]["vae"]["fp8"]
